"""Benchmark the live accumulator update and NSG apply on a 26 MP mono frame (6248 x 4176).

Prints per-update time (median and max over the frames after the first), peak memory, and numpy
baselines measured in the same run: a plain running weighted mean (S += w*y; W += w; S/W, no
rejection) and a naive np.nanmean over the stack of all frames so far (what "keep everything and
re-average" costs). Also times normalize.apply (y = m*x + bicubic gradient) and a full normalize()
fit on the same frame size. Writes bench/results/live.json.
Budget (design.md): live integration update <= 0.3 s mono.

    .venv/bin/python bench/bench_live.py [--frames 8] [--width 6248 --height 4176]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
from stackwatch.engine import normalize as nz
from stackwatch.engine.live import LiveStack


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--width", type=int, default=6248)
    ap.add_argument("--height", type=int, default=4176)
    ap.add_argument("--skip-normalize", action="store_true")
    ap.add_argument("--exact-frames", type=int, default=0, help="also time an exact pass over this many .npy frames")
    args = ap.parse_args()
    h, w, nfr = args.height, args.width, args.frames
    rng = np.random.default_rng(3)
    base = (0.1 + 0.01 * np.linspace(0, 1, w, dtype=np.float32)[None, :]).astype(np.float32) * np.ones((h, 1), np.float32)
    pool = [rng.normal(0, 0.002, (h, w)).astype(np.float32) for _ in range(2)]

    def frame(i: int) -> np.ndarray:
        y = base + np.roll(pool[i % 2], 37 * i, axis=1)
        if i == 0:
            y[h // 2 : h // 2 + 3, :] += 0.05  # a trail across the frame
        return y

    results: dict[str, Any] = {"shape": [h, w], "frames": nfr, "cpus": os.cpu_count()}

    # warm-up: compile / load the numba cache on a tiny stack
    warm = LiveStack((64, 64), background=0.1)
    for i in range(6):
        warm.update(f"w{i}", np.full((64, 64), 0.1, np.float32), weight=1.0, noise=0.002)

    rss0 = _rss_mb()
    st = LiveStack((h, w), background=0.1)
    times: list[float] = []
    cpu: list[float] = []
    tracemalloc.start()
    for i in range(nfr):
        y = frame(i)
        t0, c0 = time.perf_counter(), time.process_time()
        r = st.update(f"f{i}", y, weight=1.0, noise=0.002)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        print(f"update {i + 1}: wall {times[-1]:.3f} s cpu {cpu[-1]:.3f} s  retro {r.retro_removed}  arrival hi {r.rejected_high}")
        del y
    _, peak_traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    t0 = time.perf_counter()
    img = st.image()
    t_image = time.perf_counter() - t0
    trail_resid = float(np.nanmean(img[h // 2 : h // 2 + 3]) - np.nanmean(img[h // 2 + 10 : h // 2 + 13]))
    steady = times[1:] if len(times) > 1 else times
    results["live_update_s_median"] = statistics.median(steady)
    results["live_update_s_max"] = max(steady)
    results["live_update_s_first"] = times[0]
    results["live_update_cpu_s_median"] = statistics.median(cpu[1:] if len(cpu) > 1 else cpu)
    results["load_average_1min"] = os.getloadavg()[0]
    results["live_image_s"] = t_image
    results["live_state_mb"] = st.nbytes / 1e6
    results["live_peak_traced_mb"] = peak_traced / 1e6
    results["rss_peak_mb_before_stack"] = rss0
    results["rss_peak_mb"] = _rss_mb()
    results["trail_residual_after_n"] = trail_resid
    del st, img

    # baseline 1: running weighted mean, no rejection
    s = np.zeros((h, w), np.float32)
    ws = np.zeros((h, w), np.float32)
    tb: list[float] = []
    tbc: list[float] = []
    for i in range(nfr):
        y = frame(i)
        t0, c0 = time.perf_counter(), time.process_time()
        fin = np.isfinite(y)
        s += np.where(fin, y, 0)
        ws += fin
        _ = s / ws
        tb.append(time.perf_counter() - t0)
        tbc.append(time.process_time() - c0)
    results["numpy_running_mean_s"] = statistics.median(tb[1:] if len(tb) > 1 else tb)
    results["numpy_running_mean_cpu_s"] = statistics.median(tbc[1:] if len(tbc) > 1 else tbc)
    del s, ws

    # baseline 2: naive np.nanmean over the stack kept so far (memory grows with N)
    keep = min(nfr, 4)
    cube = np.empty((keep, h, w), np.float32)
    for i in range(keep):
        cube[i] = frame(i)
    t0 = time.perf_counter()
    _ = np.nanmean(cube, axis=0)
    results["numpy_nanmean_stack_s"] = time.perf_counter() - t0
    results["numpy_nanmean_stack_frames"] = keep
    del cube
    results["ratio_live_vs_running_mean"] = results["live_update_s_median"] / results["numpy_running_mean_s"]
    results["ratio_live_vs_running_mean_cpu"] = results["live_update_cpu_s_median"] / results["numpy_running_mean_cpu_s"]
    results["ratio_live_vs_nanmean_stack"] = results["live_update_s_median"] / results["numpy_nanmean_stack_s"]

    if not args.skip_normalize:
        # NSG on the same frame size: stars on a grid, frame = 0.8·ref + gradient
        ref = frame(1)
        yy, xx = np.mgrid[0:h:97, 0:w:97]
        xs = (xx.ravel() + 48.3).astype(np.float64)
        ys = (yy.ravel() + 48.7).astype(np.float64)
        ok = (xs < w - 20) & (ys < h - 20)
        xs, ys = xs[ok], ys[ok]
        r = 6
        g = np.exp(-(np.arange(-r, r + 1)[:, None] ** 2 + np.arange(-r, r + 1)[None, :] ** 2) / (2 * 1.3**2)).astype(np.float32)
        amp = 10 ** rng.uniform(-2, -0.7, xs.size)
        for x, y0, a in zip(xs, ys, amp, strict=True):
            ix, iy = round(x), round(y0)
            ref[iy - r : iy + r + 1, ix - r : ix + r + 1] += np.float32(a) * g
        fr = (0.8 * ref + 0.005 * np.linspace(0, 1, h, dtype=np.float32)[:, None]).astype(np.float32)
        stars = np.column_stack([xs, ys])
        nz.normalize(fr[:512, :512], ref[:512, :512], frame_stars=stars[:5], ref_stars=stars[:5], frame_noise=0.002,
                     ref_noise=0.002)  # warm-up (numba)
        t0 = time.perf_counter()
        norm = nz.normalize(fr, ref, frame_stars=stars, ref_stars=stars, frame_noise=0.0016, ref_noise=0.002,
                            fwhm_px=3.0)
        results["normalize_fit_s"] = time.perf_counter() - t0
        results["normalize_scale"] = norm.scale
        results["normalize_scale_truth"] = 1.25
        results["normalize_pairs"] = norm.n_pairs
        t0 = time.perf_counter()
        out = nz.apply(fr, norm)
        results["normalize_apply_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        _ = fr * np.float32(1.25)
        results["numpy_scale_only_s"] = time.perf_counter() - t0
        del out
    if args.exact_frames:
        import tempfile

        from stackwatch.engine.integrate import NpySource

        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
            st = LiveStack((h, w), background=0.1)
            paths = []
            for i in range(args.exact_frames):
                y = frame(i)
                p = Path(tmp) / f"f{i}.npy"
                np.save(p, y)
                paths.append(p)
                st.update(f"f{i}", y, weight=1.0, noise=0.002)
                del y
            t0, c0 = time.perf_counter(), time.process_time()
            res = st.exact_pass([NpySource(p) for p in paths])
            results["exact_pass_s"] = time.perf_counter() - t0
            results["exact_pass_cpu_s"] = time.process_time() - c0
            results["exact_pass_frames"] = args.exact_frames
            results["exact_pass_rejection"] = res.rejection
            from stackwatch.engine.integrate import integrate

            t0, c0 = time.perf_counter(), time.process_time()
            integrate([NpySource(p) for p in paths], weights=np.ones(len(paths)), rejection=res.rejection,
                      params=res.params)
            results["batch_integrate_only_s"] = time.perf_counter() - t0
            results["batch_integrate_only_cpu_s"] = time.process_time() - c0
            del st
    results["rss_peak_mb_end"] = _rss_mb()
    for k, v in results.items():
        print(f"{k:32s} {v}")
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "live.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
