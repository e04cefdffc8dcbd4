"""Benchmark fitsio on a 26 MP frame (6248 x 4176) against plain astropy in the same run.

Prints time (best of N) and peak traced memory for each case and writes bench/results/fitsio.json.
Budget (design.md): read 16-bit FITS <= 0.15 s.

    .venv/bin/python bench/bench_fitsio.py [--repeat 5] [--width 6248 --height 4176]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from stackwatch.engine import fitsio


def _measure(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    fn()  # warm-up (numba compile/cache load, page cache)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return best, peak / 1e6


def _astropy_read(path: str) -> np.ndarray:
    with fits.open(path, memmap=False) as hdul:
        return np.ascontiguousarray(hdul[0].data, dtype=np.float32) / np.float32(65535.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--width", type=int, default=6248)
    parser.add_argument("--height", type=int, default=4176)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 65536, size=(args.height, args.width), dtype=np.uint16)
    results: dict[str, Any] = {"shape": [args.height, args.width], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        p16 = os.path.join(tmp, "u16.fits")
        fits.PrimaryHDU(raw).writeto(p16)
        pgz = os.path.join(tmp, "u16.fits.gz")
        with open(p16, "rb") as src, gzip.open(pgz, "wb", compresslevel=1) as dst:
            dst.write(src.read())
        pbu = os.path.join(tmp, "bu.fits")
        hdu = fits.PrimaryHDU(raw)
        hdu.header["ROWORDER"] = "BOTTOM-UP"
        hdu.header["BAYERPAT"] = "RGGB"
        hdu.writeto(pbu)
        pf = os.path.join(tmp, "f32.fits")
        data32 = (raw / 65535.0).astype(np.float32)
        fitsio.write_image(pf, data32)
        pout = os.path.join(tmp, "out.fits")

        ours = fitsio.read_image(p16).data
        base = _astropy_read(p16)
        assert np.array_equal(ours, base), "fitsio and astropy disagree"

        cases: list[tuple[str, Callable[[], Any]]] = [
            ("read_uint16 fitsio", lambda: fitsio.read_image(p16)),
            ("read_uint16 astropy baseline", lambda: _astropy_read(p16)),
            ("read_uint16_bottom_up fitsio", lambda: fitsio.read_image(pbu)),
            ("read_float32 fitsio", lambda: fitsio.read_image(pf)),
            ("read_uint16_gz fitsio", lambda: fitsio.read_image(pgz)),
            ("read_rows 256-row band fitsio", lambda: fitsio.read_rows(p16, 2000, 2256)),
            ("read_header fitsio", lambda: fitsio.read_header(p16)),
            ("write_float32 fitsio (atomic, fsync)", lambda: fitsio.write_image(pout, data32)),
            ("write_float32 astropy baseline (no fsync)", lambda: fits.PrimaryHDU(data32).writeto(pout, overwrite=True)),
        ]
        for name, fn in cases:
            repeat = 1 if "gz" in name else args.repeat
            t, peak = _measure(fn, repeat)
            results[name] = {"time_s": round(t, 4), "peak_mb": round(peak, 1)}
            print(f"{name:45s} {t * 1000:8.1f} ms   peak {peak:7.1f} MB")
    r = results["read_uint16 fitsio"]["time_s"] / results["read_uint16 astropy baseline"]["time_s"]
    results["ratio_read_uint16_vs_astropy"] = round(r, 3)
    print(f"read_uint16: fitsio / astropy time ratio {r:.2f} (budget 0.15 s)")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "fitsio.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
