"""Benchmark the web preview (STF auto-stretch + downsample + PNG) of a 26 MP stack against a plain
numpy version of the same steps, in the same run.

Prints time (best of N) and peak traced memory per case and writes bench/results/preview.json.
Budget (issue 7): a 26 MP stack renders in <= 0.3 s.

    .venv/bin/python bench/bench_preview.py [--repeat 5] [--width 6248 --height 4176] [--size 2048]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import tracemalloc
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from stackwatch.web import preview as pv

_CPU: dict[int, float] = {}


def _measure(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """Best wall time, peak traced memory (MB); the best process CPU time (all threads) goes to _CPU,
    a figure that other processes' load on a shared machine does not inflate."""
    fn()  # warm-up (numba cache load)
    best = best_cpu = float("inf")
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    _CPU[id(fn)] = best_cpu
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return best, peak / 1e6


def _numpy_preview(image: np.ndarray, max_px: int) -> bytes:
    """The same rendering in plain numpy: full-resolution nanmedian/MAD, reshape nanmean, MTF, zlib."""
    chans = image if image.ndim == 3 else image[None]
    _, h, w = chans.shape
    f = max(1, math.ceil(max(h, w) / max_px))
    ph, pw = math.ceil(h / f) * f, math.ceil(w / f) * f
    out = []
    for ch in chans:
        med = float(np.nanmedian(ch))
        madn = 1.4826 * float(np.nanmedian(np.abs(ch - med)))
        c0 = min(max(med - 2.8 * madn, 0.0), 1.0)
        m = float(pv.mtf(0.25, (med - c0) / (1 - c0)))
        padded = np.full((ph, pw), np.nan, dtype=np.float32)
        padded[:h, :w] = ch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            small = np.nanmean(padded.reshape(ph // f, f, pw // f, f), axis=(1, 3))
        x = np.clip((small - c0) / (1 - c0), 0, 1)
        y = (m - 1) * x / ((2 * m - 1) * x - m)
        out.append(np.nan_to_num(y * 255 + 0.5, nan=0).astype(np.uint8))
    pix = np.stack(out, axis=-1)
    rows = pix.reshape(pix.shape[0], -1)
    raw = np.concatenate([np.zeros((rows.shape[0], 1), np.uint8), rows], axis=1)
    return zlib.compress(raw.tobytes(), 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--width", type=int, default=6248)
    parser.add_argument("--height", type=int, default=4176)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    mono = (0.05 + 0.002 * rng.standard_normal((args.height, args.width))).astype(np.float32)
    mono[:, :40] = np.nan  # outside the footprint
    rgb = np.stack([mono, mono * np.float32(1.1), mono * np.float32(0.9)])
    results: dict[str, Any] = {"shape": [args.height, args.width], "size": args.size, "cpus": os.cpu_count(),
                               "budget_s": 0.3, "loadavg_before": os.getloadavg()[0]}
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (wall times scale with it; cpu times"
          " less so)")
    for name, img in (("mono", mono), ("rgb", rgb)):
        f_ours = lambda img=img: pv.render_preview(img, max_px=args.size)  # noqa: E731
        f_base = lambda img=img: _numpy_preview(img, args.size)  # noqa: E731
        ours, ours_mb = _measure(f_ours, args.repeat)
        base, base_mb = _measure(f_base, max(1, args.repeat // 2))
        ours_cpu, base_cpu = _CPU[id(f_ours)], _CPU[id(f_base)]
        stats_t, _ = _measure(lambda img=img: pv.stf_params(img), args.repeat)
        down_t, _ = _measure(lambda img=img: pv.downsample(img, max_px=args.size), args.repeat)
        results[name] = {
            "render_s": ours, "render_peak_mb": ours_mb, "numpy_s": base, "numpy_peak_mb": base_mb,
            "speedup_vs_numpy": base / ours, "stats_s": stats_t, "downsample_s": down_t,
            "render_cpu_s": ours_cpu, "numpy_cpu_s": base_cpu,
        }
        print(f"{name:5s} render {ours:.3f} s (cpu {ours_cpu:.3f} s, peak {ours_mb:.0f} MB)  numpy {base:.3f} s "
              f"(cpu {base_cpu:.3f} s, peak {base_mb:.0f} MB)  x{base / ours:.1f}  "
              f"[stats {stats_t:.3f} s, downsample {down_t:.3f} s]  budget 0.3 s")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "preview.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
