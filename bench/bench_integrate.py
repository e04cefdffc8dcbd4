"""Benchmark batch integration by row bands (algorithms.md §7.7): N synthetic float32 .npy frames,
default 100 frames of 26 MP (6248 x 4176, 10 GB of disk: use --frames/--width/--height to reduce).

Steps:
1. a child process writes the frames (sky + gradient + noise + a trail in some frames) into a
   temporary folder, one frame at a time;
2. this process integrates them from NpySource memmaps with ``integrate`` (rejection as given,
   default "auto" = §7.5) and reports wall time, peak RSS (getrusage, this process only: frame
   generation ran in the child) and the tracemalloc peak of Python/numpy allocations;
3. numpy/astropy baseline on the same data in the same run: for ``--baseline-bands`` bands of the
   same height, read the band, ``astropy.stats.sigma_clip(axis=0, sigma=3, maxiters=5)`` and a
   weighted ``np.nanmean``-style average; ours with sigma clipping in astropy mode on the same
   bands for a like-for-like ratio; times are extrapolated per row to the full frame.
Writes bench/results/integrate_<N>x<H>x<W>[_ls].json. Budget (design.md): 100 frames of 26 MP, memory < 3 GB.

    .venv/bin/python bench/bench_integrate.py [--frames 100] [--width 6248 --height 4176]
        [--rejection auto] [--budget-mb 1024] [--baseline-bands 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def generate(folder: Path, frames: int, height: int, width: int, seed: int) -> None:
    """Write the frames: level 0.1 + gradient, noise 0.003, a 3-px trail in every 10th frame."""
    rng = np.random.default_rng(seed)
    grad = (0.1 + 0.02 * np.linspace(0.0, 1.0, width, dtype=np.float32))[None, :]
    for i in range(frames):
        f = np.empty((height, width), np.float32)
        for y0 in range(0, height, 512):  # bounded memory in the writer too
            y1 = min(height, y0 + 512)
            f[y0:y1] = grad + rng.standard_normal((y1 - y0, width), dtype=np.float32) * np.float32(0.003)
        if i % 10 == 3:
            y = (i * 37) % max(1, height - 3)
            f[y : y + 3, :] += np.float32(0.05)
        np.save(folder / f"frame_{i:04d}.npy", f)
        del f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--width", type=int, default=6248)
    ap.add_argument("--height", type=int, default=4176)
    ap.add_argument("--rejection", default="auto")
    ap.add_argument("--budget-mb", type=float, default=1024.0)
    ap.add_argument("--baseline-bands", type=int, default=1)
    ap.add_argument("--large-scale", action="store_true", help="two-pass large-scale rejection (§7.4)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", default=None, help="write/reuse frames in this folder and do not delete it")
    ap.add_argument("--generate-only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate_only:
        generate(Path(args.generate_only), args.frames, args.height, args.width, args.seed)
        return

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sw_bench_integrate_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        paths = sorted(folder.glob("frame_*.npy"))
        t0 = time.perf_counter()
        if len(paths) != args.frames:
            for p in paths:
                p.unlink()
            subprocess.run(
                [sys.executable, __file__, "--generate-only", str(folder), "--frames", str(args.frames),
                 "--width", str(args.width), "--height", str(args.height), "--seed", str(args.seed)],
                check=True,
            )
            paths = sorted(folder.glob("frame_*.npy"))
        t_gen = time.perf_counter() - t0
        print(f"frames: {len(paths)} x {args.height} x {args.width} in {folder} ({t_gen:.1f} s to write)")
        run(paths, args, t_gen)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def run(paths: list[Path], args: argparse.Namespace, t_gen: float) -> None:
    from stackwatch.engine.integrate import NpySource, band_rows_for, integrate

    n, h, w = len(paths), args.height, args.width
    budget = int(args.budget_mb * 1024 * 1024)
    weights = np.linspace(0.8, 1.2, n)
    # warm-up: compile / load the numba cache on a tiny stack (not timed)
    tiny = [np.random.default_rng(i).normal(0.1, 0.003, (16, 16)).astype(np.float32) for i in range(n)]
    for rej in ("auto", "sigma", args.rejection):
        integrate(tiny, rejection=rej)
    rss_before = _rss_mb()
    sources = [NpySource(p) for p in paths]
    tracemalloc.start()
    t0 = time.perf_counter()
    c0 = time.process_time()
    res = integrate(
        sources, weights=weights, rejection=args.rejection, band_budget_bytes=budget, large_scale=args.large_scale
    )
    t_ours = time.perf_counter() - t0
    cpu_ours = time.process_time() - c0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = _rss_mb()
    lo, hi = res.rejected_fraction()
    print(
        f"ours: {res.rejection} {res.params} band {res.band_rows} rows: {t_ours:.1f} s (CPU {cpu_ours:.1f} s), "
        f"peak RSS {rss_after:.0f} MB (before {rss_before:.0f}), traced peak {traced_peak / 2**20:.0f} MB, "
        f"rejected low {lo:.2e} high {hi:.2e}"
    )
    out: dict[str, Any] = {
        "frames": n, "height": h, "width": w, "cpus": os.cpu_count(),
        "loadavg_1min_start": os.getloadavg()[0],
        "rejection": res.rejection, "params": res.params, "band_rows": res.band_rows,
        "large_scale": args.large_scale, "large_scale_pixels": sum(res.large_scale_pixels),
        "budget_mb": args.budget_mb, "write_s": t_gen,
        "ours_s": t_ours, "ours_cpu_s": cpu_ours, "ours_us_per_pixel": t_ours / (h * w) * 1e6,
        "peak_rss_mb": rss_after, "rss_before_mb": rss_before, "traced_peak_mb": traced_peak / 2**20,
        "rejected_low_frac": lo, "rejected_high_frac": hi,
    }
    del res

    # baseline: astropy sigma_clip + weighted mean on the same bands; ours (sigma, astropy mode) likewise
    from astropy.stats import sigma_clip

    hb = band_rows_for(n, w, h, budget_bytes=budget)
    nb = max(1, min(args.baseline_bands, (h + hb - 1) // hb))
    t_base = 0.0
    t_like = 0.0
    c_base = 0.0
    c_like = 0.0
    rows = 0
    max_diff = 0.0
    apy = {"kappa_low": 3, "kappa_high": 3, "ddof": 0, "max_iterations": 5, "min_n": 0}
    for b in range(nb):
        y0 = b * hb
        y1 = min(h, y0 + hb)
        rows += y1 - y0
        t0 = time.perf_counter()
        c0 = time.process_time()
        band = np.stack([np.load(p, mmap_mode="r")[y0:y1] for p in paths]).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clipped = sigma_clip(band, sigma=3, maxiters=5, cenfunc="median", stdfunc="std", axis=0, masked=True)
        wb = np.where(clipped.mask, 0.0, weights[:, None, None])
        base_img = (np.sum(wb * np.where(clipped.mask, 0.0, band), axis=0) / wb.sum(axis=0)).astype(np.float32)
        t_base += time.perf_counter() - t0
        c_base += time.process_time() - c0
        del band, clipped, wb
        t0 = time.perf_counter()
        c0 = time.process_time()
        sub = [_Rows(p, y0, y1) for p in paths]
        like = integrate(sub, weights=weights, rejection="sigma", params=apy, band_budget_bytes=budget)
        t_like += time.perf_counter() - t0
        c_like += time.process_time() - c0
        max_diff = max(max_diff, float(np.max(np.abs(like.image - base_img))))
    scale = h / rows
    out.update({
        "baseline": "numpy/astropy: sigma_clip(axis=0, sigma 3, maxiters 5, median/std) + weighted mean, per band",
        "baseline_rows": rows,
        "baseline_s_extrapolated": t_base * scale,
        "ours_sigma_astropy_mode_s_extrapolated": t_like * scale,
        "baseline_cpu_s_extrapolated": c_base * scale,
        "ours_sigma_astropy_mode_cpu_s_extrapolated": c_like * scale,
        "ratio_baseline_over_ours_same_algorithm": (t_base / t_like) if t_like > 0 else None,
        "cpu_ratio_baseline_over_ours_same_algorithm": (c_base / c_like) if c_like > 0 else None,
        "ratio_baseline_over_ours_full_run": (t_base * scale / t_ours) if t_ours > 0 else None,
        "max_abs_diff_vs_baseline": max_diff,
        "peak_rss_mb_end": _rss_mb(),
    })
    print(
        f"baseline (astropy sigma_clip + mean) {t_base * scale:.1f} s extrapolated from {rows} rows; "
        f"ours sigma/astropy mode {t_like * scale:.1f} s; ratio {out['ratio_baseline_over_ours_same_algorithm']:.2f}x "
        f"(CPU {c_base * scale:.1f} s vs {c_like * scale:.1f} s); "
        f"max |diff| {max_diff:.2e}; peak RSS now {out['peak_rss_mb_end']:.0f} MB (includes the baseline band)"
    )
    dest = Path(__file__).resolve().parent / "results"
    dest.mkdir(exist_ok=True)
    name = f"integrate_{n}x{h}x{w}{'_ls' if args.large_scale else ''}.json"
    (dest / name).write_text(json.dumps(out, indent=2))
    print(f"wrote {dest / name}")


class _Rows:
    """Rows [y0, y1) of a .npy frame as a band source of that height."""

    def __init__(self, path: Path, y0: int, y1: int) -> None:
        self._mm = np.load(path, mmap_mode="r")
        self._y0 = y0
        self.shape = (y1 - y0, self._mm.shape[1])

    def read_band(self, a: int, b: int) -> np.ndarray:
        return np.array(self._mm[self._y0 + a : self._y0 + b], dtype=np.float32)


if __name__ == "__main__":
    main()
