"""Benchmark light calibration and master integration on 26 MP frames (6248 x 4176).

Cases (each runs in a fresh subprocess so that its peak RSS is its own):

- ``calibrate``: one mono light, (L - D) s0/F with saturation flag + cosmetic correction (cached
  defect map + automatic outliers); also the scaled-dark path with a bias, and the fast dark
  optimisation. Baselines in the same run: the same formula in numpy, and ccdproc
  (subtract_dark + flat_correct, no cosmetic).
- ``calibrate_osc``: the same on a CFA frame (per-channel s0, CFA-aware cosmetic) + bilinear debayer.
- ``master``: a master dark from N uint16 FITS files (default 50; ``--frames``) through
  ``library.integrate_master`` (winsorized 3/3, band budget 256 MiB). Baseline: numpy mean of the
  same frames (float64 accumulation, no rejection) read whole, one at a time.
- ``members_open``: many members, few rows each (``--members``, default 200 frames of W x 320 rows,
  budget scaled so bands are as thin as for 26 MP frames): master integration with the member files
  kept open across bands vs re-opened for every band (the library before the open-member cache),
  in the same run.

``--quick`` runs everything at 2048 x 1536 with 10 frames and 1 repeat (a smoke run; the figures
are not the budget's).

Budget (design.md): calibrate + cosmetic <= 0.5 s; debayer <= 0.4 s.

    .venv/bin/python bench/bench_calibration.py [--frames 50] [--width 6248 --height 4176] [--repeat 3] [--quick]

Writes bench/results/calibration.json. Peak memory is the process's maximum RSS (ru_maxrss), which
includes the inputs the case allocates (``inputs_rss_mb``). ``*_cpu_s`` is process CPU time (all
threads): on a shared, loaded machine, cpu / 2 estimates the wall time on 2 idle cores. The load
average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_CPU: dict[int, float] = {}


def _best(fn: Callable[[], Any], repeat: int) -> float:
    """Best wall time of ``repeat`` runs; the best CPU time (all threads) is kept in _CPU[id(fn)]:
    on a shared, loaded machine CPU time / 2 estimates the wall time on 2 idle cores."""
    fn()  # warm-up: numba compile / cache load
    best = float("inf")
    cpu = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        c0 = time.process_time()
        fn()
        cpu = min(cpu, time.process_time() - c0)
        best = min(best, time.perf_counter() - t0)
    _CPU[id(fn)] = cpu
    return best


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _frames(h: int, w: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    flat = (0.4 * (1 - 0.3 * (xx * xx + yy * yy))).astype(np.float32)
    bias = np.float32(0.0122) + rng.normal(0, 1e-4, (h, w)).astype(np.float32)
    dark = bias + np.float32(3e-4) + rng.normal(0, 3e-5, (h, w)).astype(np.float32)
    light = (np.float32(0.05) * flat + dark + rng.normal(0, 2e-3, (h, w)).astype(np.float32)).astype(np.float32)
    hot = rng.choice(h * w, h * w // 2000, replace=False)
    dark.ravel()[hot] += np.float32(0.05)
    light.ravel()[hot] += np.float32(0.05)
    return {"light": light, "bias": bias, "dark": dark, "flat": flat}


def case_calibrate(args: argparse.Namespace, osc: bool) -> dict[str, Any]:
    from stackwatch.engine import calibrate, cfa, cosmetic

    f = _frames(args.height, args.width)
    bayer = "RGGB" if osc else None
    base_rss = _rss_mb()
    dm = cosmetic.defect_map(f["dark"], bias=f["bias"], bayer=bayer)
    fs = calibrate.flat_scale(f["flat"], bayer)
    out: dict[str, Any] = {"defects": int(dm.indices.size)}

    def ours() -> None:
        c = calibrate.calibrate_light(f["light"], dark=f["dark"], flat=f["flat"], bayer=bayer, saturation=0.999,
                                      flat_scale_override=fs)
        cosmetic.correct(c.data, defects=dm, bayer=bayer)

    def ours_cal_only() -> None:
        calibrate.calibrate_light(f["light"], dark=f["dark"], flat=f["flat"], bayer=bayer, saturation=0.999,
                                  flat_scale_override=fs)

    def ours_scaled() -> None:
        calibrate.calibrate_light(f["light"], bias=f["bias"], dark=f["dark"], flat=f["flat"], bayer=bayer,
                                  dark_scale=0.4, flat_scale_override=fs)

    def numpy_baseline() -> None:
        light, dark, flat = f["light"], f["dark"], f["flat"]
        s0 = np.float32(np.mean(flat, dtype=np.float64))
        sat = light >= np.float32(0.999)
        good = flat > np.float32(0.05) * s0
        c = np.where(good, (light - dark) * s0 / np.where(good, flat, np.float32(1)), np.float32(np.nan))
        del sat, c

    out["calibrate_cosmetic_s"] = _best(ours, args.repeat)
    out["calibrate_cosmetic_cpu_s"] = _CPU[id(ours)]
    out["calibrate_only_s"] = _best(ours_cal_only, args.repeat)
    out["calibrate_only_cpu_s"] = _CPU[id(ours_cal_only)]
    out["calibrate_scaled_dark_s"] = _best(ours_scaled, args.repeat)
    out["numpy_calibrate_s"] = _best(numpy_baseline, args.repeat)
    out["ratio_numpy_over_ours_calibrate"] = out["numpy_calibrate_s"] / out["calibrate_only_s"]
    t0 = time.perf_counter()
    opt = calibrate.optimize_dark_scale(f["light"], f["dark"], f["bias"], nominal=1.0, method="fast", bayer=bayer)
    out["dark_optimisation_fast_s"] = time.perf_counter() - t0
    out["dark_optimisation_k"] = opt.k
    t0 = time.perf_counter()
    c0 = time.process_time()
    calibrate.dark_structure(f["dark"], f["bias"])
    out["amp_glow_check_s"] = time.perf_counter() - t0  # once per master dark (cached by the library)
    out["amp_glow_check_cpu_s"] = time.process_time() - c0
    if osc:
        c = calibrate.calibrate_light(f["light"], dark=f["dark"], flat=f["flat"], bayer=bayer).data
        def bil() -> None:
            cfa.debayer(c, "RGGB")

        out["debayer_bilinear_s"] = _best(bil, args.repeat)
        out["debayer_bilinear_cpu_s"] = _CPU[id(bil)]
        out["debayer_superpixel_s"] = _best(lambda: cfa.debayer(c, "RGGB", method="superpixel"), args.repeat)
        out["debayer_vng_s"] = _best(lambda: cfa.debayer(c, "RGGB", method="vng"), 1)
    else:
        try:
            import ccdproc
            from astropy import units
            from astropy.nddata import CCDData

            def ccdproc_baseline() -> None:
                c = ccdproc.subtract_dark(CCDData(f["light"], unit="adu"), CCDData(f["dark"], unit="adu"),
                                          dark_exposure=300 * units.s, data_exposure=300 * units.s)
                ccdproc.flat_correct(c, CCDData(f["flat"], unit="adu"))

            out["ccdproc_flat_correct_s"] = _best(ccdproc_baseline, 1)
            out["ratio_ccdproc_over_ours_calibrate"] = out["ccdproc_flat_correct_s"] / out["calibrate_only_s"]
        except ImportError:
            pass
    out["peak_rss_mb"] = _rss_mb()
    out["inputs_rss_mb"] = base_rss
    return out


def case_master(args: argparse.Namespace) -> dict[str, Any]:
    from astropy.io import fits
    from stackwatch.engine import fitsio, library

    h, w, n = args.height, args.width, args.frames
    rng = np.random.default_rng(3)
    base = (800 + rng.normal(0, 8, (h, w))).astype(np.float32)
    out: dict[str, Any] = {"frames": n}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        paths = []
        t0 = time.perf_counter()
        for i in range(n):
            frame = base + rng.normal(30, 6, (h, w)).astype(np.float32)
            hdu = fits.PrimaryHDU(np.clip(frame, 0, 65535).astype(np.uint16))
            hdu.header["IMAGETYP"] = "Dark Frame"
            hdu.header["EXPTIME"] = 300.0
            p = os.path.join(tmp, f"dark_{i:03d}.fits")
            hdu.writeto(p)
            paths.append(p)
            del frame, hdu
        out["write_inputs_s"] = time.perf_counter() - t0
        # warm-up on 6 small frames (same rejection): loads the numba cache, which the timing must not hold
        small = [os.path.join(tmp, f"warm_{i}.fits") for i in range(6)]
        for p in small:
            fits.PrimaryHDU(rng.integers(800, 900, (64, 64), dtype=np.uint16)).writeto(p)
        library.integrate_master("dark", small)
        rss0 = _rss_mb()
        t0 = time.perf_counter()
        c0 = time.process_time()
        res = library.integrate_master("dark", paths, band_budget_bytes=args.band_mb << 20)
        out["master_s"] = time.perf_counter() - t0
        out["master_cpu_s"] = time.process_time() - c0
        out["ns_per_sample_wall"] = out["master_s"] / (n * h * w) * 1e9
        out["master_peak_rss_mb"] = _rss_mb()
        out["rss_before_master_mb"] = rss0
        out["rejection"] = res.rejection
        del res
        t0 = time.perf_counter()
        acc = np.zeros((h, w), dtype=np.float64)
        for p in paths:
            acc += fitsio.read_image(p).data
        (acc / n).astype(np.float32)
        out["numpy_mean_no_rejection_s"] = time.perf_counter() - t0
        out["ratio_numpy_mean_over_ours"] = out["numpy_mean_no_rejection_s"] / out["master_s"]
    return out


def case_members_open(args: argparse.Namespace) -> dict[str, Any]:
    from astropy.io import fits
    from stackwatch.engine import integrate, library

    n, w, h = args.members, args.width, 320
    # the band height of a 26 MP master of n frames at the full budget (band_rows_for, 16-row floor)
    budget = (args.band_mb << 20) * h // args.height
    rows = integrate.band_rows_for(n, w, h, budget_bytes=budget // 2)
    rng = np.random.default_rng(5)
    out: dict[str, Any] = {"members": n, "member_shape": [h, w], "band_rows": rows, "band_reads": n * -(-h // rows)}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        paths = []
        for i in range(n):
            p = os.path.join(tmp, f"dark_{i:03d}.fits")
            fits.PrimaryHDU(rng.integers(800, 900, (h, w), dtype=np.uint16)).writeto(p)
            paths.append(p)
        small = [os.path.join(tmp, f"warm_{i}.fits") for i in range(6)]
        for p in small:
            fits.PrimaryHDU(rng.integers(800, 900, (64, 64), dtype=np.uint16)).writeto(p)
        library.integrate_master("dark", small)  # numba cache load, outside the timings
        images = {}
        for label, capacity in (("reopen_per_band", 0), ("kept_open", None), ("reopen_per_band_again", 0)):
            saved = library._open_file_budget
            if capacity is not None:
                library._open_file_budget = lambda c=capacity: c  # type: ignore[assignment]
            try:
                t0 = time.perf_counter()
                c0 = time.process_time()
                res = library.integrate_master("dark", paths, band_budget_bytes=budget)
                out[f"{label}_s"] = time.perf_counter() - t0
                out[f"{label}_cpu_s"] = time.process_time() - c0
                images[label] = res.image
            finally:
                library._open_file_budget = saved
        out["identical"] = bool(np.array_equal(images["kept_open"], images["reopen_per_band"]))
        base = min(out["reopen_per_band_s"], out["reopen_per_band_again_s"])
        base_cpu = min(out["reopen_per_band_cpu_s"], out["reopen_per_band_again_cpu_s"])
        out["ratio_reopen_over_open_wall"] = base / out["kept_open_s"]
        out["ratio_reopen_over_open_cpu"] = base_cpu / out["kept_open_cpu_s"]
        out["saved_ms_per_band_read_cpu"] = (base_cpu - out["kept_open_cpu_s"]) / out["band_reads"] * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--width", type=int, default=6248)
    parser.add_argument("--height", type=int, default=4176)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--band-mb", type=int, default=256)
    parser.add_argument("--tmp", default=None, help="folder for the master's input files")
    parser.add_argument("--members", type=int, default=200, help="members_open case: number of thin members")
    parser.add_argument("--case", choices=("calibrate", "calibrate_osc", "master", "members_open"), default=None)
    parser.add_argument("--cases", default="calibrate,calibrate_osc,master,members_open", help="comma-separated cases to run")
    parser.add_argument("--skip-master", action="store_true")
    parser.add_argument("--quick", action="store_true", help="2048 x 1536, 10 frames, 1 repeat: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.width, args.height, args.frames, args.repeat, args.members = 2048, 1536, 10, 1, 40
    if args.case:
        if args.case == "members_open":
            res = case_members_open(args)
        elif args.case == "master":
            res = case_master(args)
        else:
            res = case_calibrate(args, args.case == "calibrate_osc")
        print(json.dumps(res))
        return
    results: dict[str, Any] = {"shape": [args.height, args.width], "cpus": os.cpu_count(),
                               "loadavg_start": os.getloadavg()[0]}
    cases = [c for c in args.cases.split(",") if c and not (args.skip_master and c == "master")]
    for case in cases:
        cmd = [sys.executable, __file__, "--case", case, "--frames", str(args.frames), "--width", str(args.width),
               "--height", str(args.height), "--repeat", str(args.repeat), "--band-mb", str(args.band_mb),
               "--members", str(args.members)]
        if args.tmp:
            cmd += ["--tmp", args.tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"case {case} failed")
        results[case] = json.loads(proc.stdout.strip().splitlines()[-1])
        for k, v in results[case].items():
            print(f"{case:14s} {k:36s} {v:.3f}" if isinstance(v, float) else f"{case:14s} {k:36s} {v}")
    results["loadavg_end"] = os.getloadavg()[0]
    print(f"load average: {results['loadavg_start']:.1f} at start, {results['loadavg_end']:.1f} at end (2 cores)")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    name = "calibration_quick.json" if args.quick else "calibration.json"
    (out / name).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
