"""Benchmark NSG normalisation (engine.normalize) at 26 MP mono (6248 x 4176): fit and apply.

A seeded scene: ~2700 stars, a sky with a tilt, the frame = 0.8·reference + a light dome from beyond
the left edge + its own noise. After a warm-up on a contiguous 1024² crop (compiles or loads the numba cache),
each variant is timed ``--repeat`` times (median): ``normalize`` (fit) and ``apply``, wall and CPU
(time.process_time: all threads of the process), and the peak of traced (numpy) memory. Variants:

- ``engine``: stackwatch.engine.normalize as installed;
- ``--module FILE`` (repeatable): another normalize.py in the same process, e.g. the previous
  version from git (``git show REV:engine/normalize.py > /tmp/normalize_before.py``);
- ``numpy_scipy``: a plain numpy/scipy path doing the same work, the baseline of the ratios: bin
  medians with np.nanmedian on a masked reshape, scipy RBFInterpolator thin-plate spline with the
  discrepancy principle by refitting, evaluated on the node grid, and
  scipy.ndimage.map_coordinates (cubic) to upsample inside y = m·x + g.

Colour case (``--cases``, default both): the same scene as three channels of different brightness
and noise ((3, H, W); reference c = k_c·mono reference + an offset, frame c = 0.8·reference c + the
dome × d_c + noise k_c·σ), timed for ``engine`` and every ``--module`` in the same run, with each
module's scales and gradient grids against the engine's (identical results expected after a pure
speed change). BLAS runs on one thread as in the service (daemon/cli.py sets OPENBLAS_NUM_THREADS=1
before numpy loads: threaded OpenBLAS took 0.5-3.8 s for the 500-sample eigendecomposition on the
loaded 2-core machine instead of 0.03 s); the environment's value wins.

Accuracy: each variant's gradient (apply of a zero frame) against the truth, RMS and max in units
of the frame noise σ (in the whole frame and the outer 32 px band, on a 1-in-8 pixel lattice away
from stars), and its scale against 1.25. The machine is shared: compare CPU times, and ratios
measured in the same run. Writes bench/results/normalize.json.

    .venv/bin/python bench/bench_normalize.py [--repeat 3] [--max-samples 600] [--module FILE] [--cases mono,colour]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

# as the service (daemon/cli.py): numba has the cores, BLAS threads on top oversubscribe them
for _blas in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_blas, "1")

import numpy as np  # noqa: E402 (after the BLAS setting)
from scipy.interpolate import RBFInterpolator  # noqa: E402
from scipy.ndimage import map_coordinates  # noqa: E402
from stackwatch.engine import normalize as nz  # noqa: E402

H, W = 4176, 6248
SIG = 0.002


def add_star_grid(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian stars (σ 1.3 px) every 97 px, peaks 0.01-0.2, added in place; returns their x, y."""
    h, w = img.shape
    yy, xx = np.mgrid[0:h:97, 0:w:97]
    xs = (xx.ravel() + 48.3).astype(np.float64)
    ys = (yy.ravel() + 48.7).astype(np.float64)
    ok = (xs < w - 20) & (ys < h - 20)
    xs, ys = xs[ok], ys[ok]
    r = 6
    psf = np.exp(-(np.arange(-r, r + 1)[:, None] ** 2 + np.arange(-r, r + 1)[None, :] ** 2) / (2 * 1.3**2)).astype(np.float32)
    amp = 10 ** rng.uniform(-2, -0.7, xs.size)
    for x, y0, a in zip(xs, ys, amp, strict=True):
        ix, iy = round(x), round(y0)
        img[iy - r : iy + r + 1, ix - r : ix + r + 1] += np.float32(a) * psf
    return xs, ys


def _scene(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    ref = (0.1 + 0.01 * np.linspace(0, 1, w, dtype=np.float32)[None, :]) + rng.normal(0, SIG, (h, w)).astype(np.float32)
    ref = ref.astype(np.float32)
    xs, ys = add_star_grid(ref, rng)
    gy = np.arange(h, dtype=np.float32)[:, None] / max(h, w)
    gx = np.arange(w, dtype=np.float32)[None, :] / max(h, w)
    # a light dome from beyond the left edge (8σ at the edge) and a tilt
    dome = (0.016 * np.exp(-np.hypot(gx + 0.2, gy - 0.3) / 0.35) + 0.004 * gy).astype(np.float32)
    frame = (0.8 * ref + dome).astype(np.float32)
    frame += rng.normal(0, SIG, (h, w)).astype(np.float32)
    return ref, frame, dome, np.column_stack([xs, ys])


def _load(path: str) -> Any:
    # a name stable across runs: numba's on-disk cache of the module's kernels records it, and a
    # salted hash(path) made the next run's cache load fail (ModuleNotFoundError)
    name = "normalize_" + hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class _NumpyScipy:
    """The gradient fit and the apply in plain numpy/scipy (the baseline). The photometric scale and
    the node grid geometry are the engine's, computed before timing: the fit time here is the
    gradient only (bins, spline, nodes), so the ratio understates the engine's gain."""

    scale = 1.0
    node = 64
    gshape = (2, 2)

    @classmethod
    def normalize(cls, frame: np.ndarray, ref: np.ndarray, **kw: Any) -> Any:
        m = cls.scale
        s = int(kw.get("bin_px", 32))
        h, w = frame.shape
        bh, bw = h // s, w // s
        d = (ref[: bh * s, : bw * s] - np.float32(m) * frame[: bh * s, : bw * s]).astype(np.float64)
        stars = kw["ref_stars"]
        mask = np.zeros_like(d, bool)
        for x, y in stars:
            ix, iy = round(x), round(y)
            mask[max(0, iy - 12) : iy + 13, max(0, ix - 12) : ix + 13] = True
        d[mask] = np.nan
        blocks = d.reshape(bh, s, bw, s).transpose(0, 2, 1, 3).reshape(bh, bw, s * s)
        med = np.nanmedian(blocks, axis=2)
        k = 1
        while bh * bw / (k * k) > kw.get("max_samples", 600):
            k *= 2
        zb = np.nanmean(med[: bh // k * k, : bw // k * k].reshape(bh // k, k, bw // k, k), axis=(1, 3))
        cy = (np.arange(bh // k) * k * s + k * s / 2 - 0.5) / max(h, w)
        cx = (np.arange(bw // k) * k * s + k * s / 2 - 0.5) / max(h, w)
        py, px = np.meshgrid(cy, cx, indexing="ij")
        ok = np.isfinite(zb)
        pts = np.column_stack([py[ok], px[ok]])
        z = zb[ok]
        sig = 1.2533 * math.sqrt(SIG**2 + (m * SIG) ** 2) / math.sqrt(0.8 * s * s) / k
        lo, hi = -8.0, 4.0
        best = None
        for _ in range(14):
            mid = 0.5 * (lo + hi)
            rbf = RBFInterpolator(pts, z / sig, kernel="thin_plate_spline", smoothing=10.0**mid, degree=1)
            if float(np.sqrt(np.mean((z / sig - rbf(pts)) ** 2))) >= 1.0:
                hi, best = mid, rbf
            else:
                lo = mid
            if hi - lo < 0.1:
                break
        if best is None:
            best = RBFInterpolator(pts, z / sig, kernel="thin_plate_spline", smoothing=10.0**hi, degree=1)
        node = cls.node
        gh, gw = cls.gshape
        ny, nx = np.meshgrid(np.arange(gh) * node / max(h, w), np.arange(gw) * node / max(h, w), indexing="ij")
        grid = best(np.column_stack([ny.ravel(), nx.ravel()])).reshape(gh, gw) * sig
        return (m, grid.astype(np.float32), node)

    @staticmethod
    def apply(frame: np.ndarray, norm: Any) -> np.ndarray:
        m, grid, node = norm
        h, w = frame.shape
        out = np.empty_like(frame)
        cols = np.arange(w, dtype=np.float64) / node
        for y0 in range(0, h, 512):
            y1 = min(h, y0 + 512)
            yy, xx = np.meshgrid(np.arange(y0, y1) / node, cols, indexing="ij")
            g = map_coordinates(grid, [yy, xx], order=3, mode="nearest")
            np.multiply(frame[y0:y1], np.float32(m), out=out[y0:y1])
            out[y0:y1] += g
        return out


def _time(fn: Any, repeat: int) -> tuple[float, float, float, Any]:
    walls, cpus, peaks = [], [], []
    res = None
    for _ in range(repeat):
        tracemalloc.start()
        t0, c0 = time.perf_counter(), time.process_time()
        res = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        peaks.append(tracemalloc.get_traced_memory()[1] / 1e6)
        tracemalloc.stop()
    return statistics.median(walls), statistics.median(cpus), max(peaks), res


COLOUR_GAIN = (1.0, 0.6, 1.3)  # k_c: channel brightness and noise relative to the mono scene
COLOUR_DOME = (1.0, 0.7, 1.4)  # d_c: the light dome's colour


def _colour_scene(h: int, w: int, dome: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(3, H, W) reference and frame: the mono scene's sky and stars scaled per channel, the frame
    = 0.8·reference + the dome × d_c, each channel with its own noise k_c·σ (independent channels,
    so their outlier bins differ as in a real one-shot-colour frame)."""
    rng = np.random.default_rng(6)
    scene = np.zeros((h, w), np.float32)
    add_star_grid(scene, rng)  # the mono scene's star positions (a fixed grid), other amplitudes
    scene += 0.1 + 0.01 * np.linspace(0, 1, w, dtype=np.float32)[None, :]
    ref = np.empty((3, h, w), np.float32)
    frame = np.empty((3, h, w), np.float32)
    for c, (k, d) in enumerate(zip(COLOUR_GAIN, COLOUR_DOME, strict=True)):
        ref[c] = k * scene + 0.01 * c
        ref[c] += rng.normal(0, k * SIG, (h, w)).astype(np.float32)
        frame[c] = 0.8 * k * scene + 0.008 * c + d * dome
        frame[c] += rng.normal(0, k * SIG, (h, w)).astype(np.float32)
    return ref, frame


def _colour_case(dome: np.ndarray, stars: np.ndarray, variants: list[tuple[str, Any]], args: Any) -> dict[str, Any]:
    """Times normalize + apply on a 26 MP (3, H, W) frame for every variant; each module's results
    against the first variant's (scales, gradient grids, the applied frame)."""
    h, w = dome.shape
    ref, frame = _colour_scene(h, w, dome)
    sig = [k * SIG for k in COLOUR_GAIN]
    kw = dict(frame_stars=stars, ref_stars=stars, frame_noise=sig, ref_noise=sig, fwhm_px=3.0,
              max_samples=args.max_samples)
    lattice = np.zeros((h, w), bool)
    lattice[::8, ::8] = True
    for x, y in stars:
        ix, iy = round(x), round(y)
        lattice[max(0, iy - 15) : iy + 16, max(0, ix - 15) : ix + 16] = False
    out: dict[str, Any] = {"load_average_1min_start": os.getloadavg()[0]}
    first: tuple[Any, np.ndarray] | None = None
    small = _crop_kw(kw, stars)
    for name, mod in variants:
        # warm-up on contiguous crops: a strided view is another numba signature, compiled again at full size
        crop_f, crop_r = np.ascontiguousarray(frame[:, :1024, :1024]), np.ascontiguousarray(ref[:, :1024, :1024])
        mod.apply(crop_f, mod.normalize(crop_f, crop_r, **small))
        load0 = os.getloadavg()[0]
        fw, fc, fm, norm = _time(lambda mod=mod: mod.normalize(frame, ref, **kw), args.repeat)
        aw, ac, am, y = _time(lambda mod=mod, norm=norm: mod.apply(frame, norm), args.repeat)
        # into a preallocated output: the kernel alone (a new 313 MB output's page faults cost 0.05-0.5 s
        # here depending on the kernel's free huge pages, a variation between runs, not between variants)
        y_out = np.empty_like(frame)
        ow, oc, _, _ = _time(lambda mod=mod, norm=norm, y_out=y_out: mod.apply(frame, norm, out=y_out), args.repeat)
        del y_out
        r: dict[str, Any] = {"fit_wall_s": fw, "fit_cpu_s": fc, "fit_peak_traced_mb": fm, "apply_wall_s": aw,
                             "apply_cpu_s": ac, "apply_out_wall_s": ow, "apply_out_cpu_s": oc,
                             "apply_peak_traced_mb": am, "total_wall_s": fw + aw,
                             "total_cpu_s": fc + ac, "load_average_1min": [load0, os.getloadavg()[0]],
                             "scales": [c.scale for c in norm.channels]}
        rows = min(h, 1024)
        grad = mod.apply(np.zeros_like(frame[:, :rows]), _crop_norm(mod, norm, rows)).astype(np.float64)
        errs = []
        for c, d in enumerate(COLOUR_DOME):
            e = (grad[c] + 1.25 * d * dome[:rows].astype(np.float64)) / sig[c]
            errs.append(float(np.sqrt(np.mean(e[lattice[:rows]] ** 2))))
        r["gradient_rms_sigma_top_1024_rows"] = errs
        if first is None:
            first = (norm, y)
        else:
            n0, y0 = first
            r["vs_" + variants[0][0]] = {
                "scale_rel_max": max(abs(a.scale / b.scale - 1) for a, b in zip(norm.channels, n0.channels, strict=True)),
                "offset_max_over_sigma": max(
                    float(np.max(np.abs(a.offset.astype(np.float64) - b.offset))) / sg
                    for a, b, sg in zip(norm.channels, n0.channels, sig, strict=True)
                ),
                "apply_identical": bool(np.array_equal(y, y0, equal_nan=True)),
            }
        out[name] = r
        print(f"colour {name:>15}: fit {fw:.3f} s (cpu {fc:.3f}, peak {fm:.0f} MB)  apply {aw:.3f} s (cpu {ac:.3f};"
              f" into out= {ow:.3f} s, cpu {oc:.3f})"
              f"  total {fw + aw:.3f} s (cpu {fc + ac:.3f})  load {load0:.2f}-{os.getloadavg()[0]:.2f}  scales "
              + " ".join(f"{v:.6f}" for v in r["scales"]) + "  gradient err/σ rms " + " ".join(f"{v:.4f}" for v in errs)
              + (f"  vs {variants[0][0]}: {r['vs_' + variants[0][0]]}" if "vs_" + variants[0][0] in r else ""),
              flush=True)
        del norm, y, grad
    return out


def _crop_kw(kw: dict[str, Any], stars: np.ndarray) -> dict[str, Any]:
    """Arguments for the warm-up on the top-left 1024² crop: its ~100 stars take the NSG path, so
    every kernel is compiled or loaded before timing (a 512² crop fell back to global)."""
    inside = stars[(stars[:, 0] < 1000) & (stars[:, 1] < 1000)]
    return {**kw, "frame_stars": inside, "ref_stars": inside}


def _crop_norm(mod: Any, norm: Any, rows: int) -> Any:
    """The normalisation restricted to the top rows (the gradient check on a crop: less memory)."""
    return mod.Normalization(channels=norm.channels, shape=(norm.shape[0], rows, norm.shape[2]), step_px=norm.step_px,
                             method=norm.method, reason=norm.reason, reference_id=norm.reference_id)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-samples", type=int, default=600)
    ap.add_argument("--module", action="append", default=[], help="another normalize.py to time in the same run")
    ap.add_argument("--width", type=int, default=W)
    ap.add_argument("--height", type=int, default=H)
    ap.add_argument("--cases", default="mono,colour", help="comma-separated: mono, colour")
    ap.add_argument("--prefault-mb", type=int, default=2048,
                    help="touch this much memory once before timing (see below)")
    args = ap.parse_args()
    cases = set(args.cases.split(","))
    # on this VM the first touch of memory the process never had costs ~1.5 ms/MB (0.47 s for a
    # 313 MB colour output), later allocations of freed memory do not: whichever variant first
    # raised the process's high-water mark paid it. A long-running service is past that point.
    np.ones(args.prefault_mb * (1 << 20) // 8)
    h, w = args.height, args.width
    ref, frame, dome, stars = _scene(h, w)
    truth = -1.25 * dome.astype(np.float64)  # g = ref − m·frame on the sky
    lattice = np.zeros((h, w), bool)
    lattice[::8, ::8] = True
    for x, y in stars:
        ix, iy = round(x), round(y)
        lattice[max(0, iy - 15) : iy + 16, max(0, ix - 15) : ix + 16] = False
    band = np.ones((h, w), bool)
    band[32:-32, 32:-32] = False
    kw = dict(frame_stars=stars, ref_stars=stars, frame_noise=SIG, ref_noise=SIG, fwhm_px=3.0, max_samples=args.max_samples)
    variants: list[tuple[str, Any]] = [("engine", nz)] + [(Path(p).name, _load(p)) for p in args.module]
    variants.append(("numpy_scipy", _NumpyScipy))
    results: dict[str, Any] = {"shape": [h, w], "cpus": os.cpu_count(), "load_average_1min_start": os.getloadavg()[0],
                               "max_samples": args.max_samples,
                               "blas_threads_env": os.environ.get("OPENBLAS_NUM_THREADS", "")}
    zero = np.zeros((h, w), np.float32)
    eng = nz.normalize(frame, ref, **kw)
    _NumpyScipy.scale, _NumpyScipy.node, _NumpyScipy.gshape = eng.scale, eng.step_px, eng.channels[0].offset.shape
    del eng
    for name, mod in variants if "mono" in cases else []:
        if mod is not _NumpyScipy:  # warm-up: numba compile or cache load
            crop_f, crop_r = np.ascontiguousarray(frame[:1024, :1024]), np.ascontiguousarray(ref[:1024, :1024])
            mod.apply(crop_f, mod.normalize(crop_f, crop_r, **_crop_kw(kw, stars)))
        fw, fc, fm, norm = _time(lambda mod=mod: mod.normalize(frame, ref, **kw), args.repeat)
        aw, ac, am, _ = _time(lambda mod=mod, norm=norm: mod.apply(frame, norm), args.repeat)
        grad = mod.apply(zero, norm).astype(np.float64)
        err = (grad - truth) / SIG
        scale = norm[0] if isinstance(norm, tuple) else norm.scale
        r = {"fit_wall_s": fw, "fit_cpu_s": fc, "fit_peak_traced_mb": fm, "apply_wall_s": aw, "apply_cpu_s": ac,
             "apply_peak_traced_mb": am, "total_wall_s": fw + aw, "total_cpu_s": fc + ac, "scale": scale,
             "scale_err_rel": scale / 1.25 - 1,
             "gradient_rms_sigma": float(np.sqrt(np.mean(err[lattice] ** 2))),
             "gradient_max_sigma": float(np.abs(err[lattice]).max()),
             "gradient_band_rms_sigma": float(np.sqrt(np.mean(err[lattice & band] ** 2))),
             "gradient_band_max_sigma": float(np.abs(err[lattice & band]).max())}
        results[name] = r
        print(f"{name:>22}: fit {fw:.3f} s (cpu {fc:.3f}, peak {fm:.0f} MB)  apply {aw:.3f} s (cpu {ac:.3f}, peak {am:.0f} MB)"
              f"  scale {scale:.5f}  gradient err/σ rms {r['gradient_rms_sigma']:.4f} max {r['gradient_max_sigma']:.3f}"
              f"  band rms {r['gradient_band_rms_sigma']:.4f} max {r['gradient_band_max_sigma']:.3f}", flush=True)
        del norm, grad, err
    for name, _ in variants[:-1] if "mono" in cases else []:
        base = results["numpy_scipy"]
        r = results[name]
        r["ratio_total_wall_vs_numpy_scipy"] = r["total_wall_s"] / base["total_wall_s"]
        r["ratio_total_cpu_vs_numpy_scipy"] = r["total_cpu_s"] / base["total_cpu_s"]
        print(f"{name}: total wall {r['total_wall_s']:.3f} s, cpu {r['total_cpu_s']:.3f} s; "
              f"ratio vs numpy/scipy wall {r['ratio_total_wall_vs_numpy_scipy']:.3f} cpu {r['ratio_total_cpu_vs_numpy_scipy']:.3f}")
    if "colour" in cases:
        del ref, frame, zero, lattice, band
        results["colour"] = _colour_case(dome, stars, variants[:-1], args)
    results["rss_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["load_average_1min_end"] = os.getloadavg()[0]
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "normalize.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}))


if __name__ == "__main__":
    main()
