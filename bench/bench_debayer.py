"""Debayer methods against the truth and against the clock: bilinear (the baseline), VNG and RCD.

Quality, on noise-free simulated one-shot-colour fields (RGGB; every channel also rendered at every pixel
as the truth, the simulator's Moffat β = 4 stars with its black-body star colours from B-V ~ N(0.7, 0.35)
and its light-pollution sky colour):

- ``stars``: 144 stars per FWHM (1.8, 2.5, 3.5 px) at random sub-pixel phases and fluxes; per star and
  channel the flux in a 25 x 25 box minus the known sky against the true flux (median and 95th percentile
  of |error|), the R/G and B/G ratio errors likewise, and the RMS pixel error over the stars' pixels.
- ``noise``: a flat coloured sky plus white Gaussian noise (σ the same in every CFA pixel): each output
  channel's standard deviation / σ per pixel and after 4 x 4 binning (the scale faint sources are seen
  at: interpolation lowers the per-pixel figure without adding information).
- ``edges``: straight step edges (grey and red-to-blue, 5° and 30° from the columns, pixel-integrated):
  RMS error within 3 px of the edge over the edge's contrast, and the zipper index: the RMS of the
  luminance error's part that alternates along the edge (e - mean of its two neighbours along the
  edge's nearest axis), same units.
- ``border``: a smooth pattern (periods 9-17 px, the same in every channel, with a slow colour drift): RMS error in the outer 2 px ring over the RMS
  error inside (1 = borders as good as the interior).

Time: a 26 MP frame (6248 x 4176, Poisson star field) per method; best wall time of ``--repeat`` runs,
the CPU time of that run (all threads) and the 1-minute load average next to it (the machine is shared:
CPU time is the figure to compare), and the ratio to bilinear in the same run.

    .venv/bin/python bench/bench_debayer.py [--width 6248 --height 4176] [--repeat 3] [--no-time]

Writes bench/results/debayer.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("bilinear", "vng", "rcd")
_SKY_COLOUR = np.array([0.45, 0.35, 0.20])  # engine/simulate.py's light-pollution sky share in R, G, B


def _mosaic(rgb: np.ndarray, bayer: str = "RGGB") -> np.ndarray:
    from stackwatch.engine import cfa

    cmap = cfa.channel_map(bayer)
    h, w = rgb.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w]
    return rgb[cmap[yy % 2, xx % 2], yy, xx].astype(np.float32)


def star_field(fwhm: float, *, n_side: int = 12, spacing: int = 40, seed: int = 1, sky: float = 0.01
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(raw CFA, truth (3, H, W) without sky, xs, ys, sky per channel): stars on a grid, random phases."""
    from stackwatch.engine import simulate_sky

    rng = np.random.default_rng(seed)
    size = n_side * spacing
    gy, gx = np.mgrid[0:n_side, 0:n_side]
    xs = (gx.ravel() + 0.5) * spacing + rng.uniform(-1, 1, gx.size)
    ys = (gy.ravel() + 0.5) * spacing + rng.uniform(-1, 1, gx.size)
    bv = np.clip(rng.normal(0.7, 0.35, xs.size), -0.3, 2.0)
    flux = rng.uniform(0.3, 3.0, xs.size)[:, None] * 3.0 * simulate_sky.star_colour_weights(bv)
    sky_rgb = sky * _SKY_COLOUR / _SKY_COLOUR.mean()
    truth = np.zeros((3, size, size), np.float32)
    for c in range(3):
        simulate_sky.render_stars(truth[c], xs, ys, flux, fwhm_px=fwhm, beta=4.0, cmap=np.full((2, 2), c), floor_e=1e-7)
    raw = _mosaic(truth + sky_rgb[:, None, None].astype(np.float32))
    return raw, truth, xs, ys, sky_rgb


def _stats(values: np.ndarray) -> dict[str, list[float]]:
    a = np.abs(values) * 100.0
    return {"median_pct": np.round(np.median(a, axis=0), 3).tolist(), "p95_pct": np.round(np.percentile(a, 95, axis=0), 3).tolist()}


def quality_stars(fwhm: float) -> dict[str, Any]:
    from stackwatch.engine import cfa

    raw, truth, xs, ys, sky_rgb = star_field(fwhm)
    half = 12
    stars_px = truth.sum(axis=0) > 0.002
    res: dict[str, Any] = {}
    for method in METHODS:
        out = cfa.debayer(raw, "RGGB", method=method).astype(np.float64) - sky_rgb[:, None, None]
        flux_err, colour_err = [], []
        for x, y in zip(xs, ys, strict=True):
            ix, iy = round(x), round(y)
            box = (slice(None), slice(iy - half, iy + half + 1), slice(ix - half, ix + half + 1))
            got = out[box].sum(axis=(1, 2))
            true = truth[box].astype(np.float64).sum(axis=(1, 2))
            flux_err.append(got / true - 1.0)
            colour_err.append([(got[0] / got[1]) / (true[0] / true[1]) - 1.0, (got[2] / got[1]) / (true[2] / true[1]) - 1.0])
        err = out - truth
        res[method] = {"flux_RGB": _stats(np.array(flux_err)), "colour_RG_BG": _stats(np.array(colour_err)),
                       "rms_pixel_error_in_stars": float(np.sqrt((err[:, stars_px] ** 2).mean()))}
    return res


def quality_noise(size: int = 512, sigma: float = 1e-3) -> dict[str, Any]:
    from stackwatch.engine import cfa

    rng = np.random.default_rng(5)
    sky_rgb = 0.01 * _SKY_COLOUR / _SKY_COLOUR.mean()
    raw = _mosaic(np.broadcast_to(sky_rgb[:, None, None], (3, size, size)).astype(np.float32))
    raw += rng.normal(0.0, sigma, raw.shape).astype(np.float32)
    res: dict[str, Any] = {}
    for method in METHODS:
        out = cfa.debayer(raw, "RGGB", method=method).astype(np.float64)[:, 8:-8, 8:-8]
        binned = out.reshape(3, out.shape[1] // 4, 4, out.shape[2] // 4, 4).mean(axis=(2, 4))
        res[method] = {"std_over_sigma_RGB": np.round(out.std(axis=(1, 2)) / sigma, 4).tolist(),
                       "std_4x4_over_sigma_RGB": np.round(binned.std(axis=(1, 2)) / sigma, 4).tolist()}
    return res


def _edge_field(angle_deg: float, lo: np.ndarray, hi: np.ndarray, size: int = 160, sub: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(truth (3, H, W), signed distance of each pixel centre to the edge): a step through the centre,
    ``angle_deg`` from the columns, each pixel the mean of sub x sub point samples."""
    t = np.deg2rad(angle_deg)
    nx, ny = np.cos(t), -np.sin(t)  # normal of an edge tilted angle_deg from vertical
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c = size / 2.0
    frac = np.zeros((size, size))
    for oy in offs:
        for ox in offs:
            frac += ((xx + ox - c) * nx + (yy + oy - c) * ny) > 0
    frac /= sub * sub
    truth = lo[:, None, None] + (hi - lo)[:, None, None] * frac[None]
    return truth.astype(np.float32), (xx - c) * nx + (yy - c) * ny


def quality_edges() -> dict[str, Any]:
    from stackwatch.engine import cfa

    cases = {"grey": (np.array([0.01, 0.01, 0.01]), np.array([0.05, 0.05, 0.05])),
             "red_to_blue": (np.array([0.04, 0.015, 0.005]), np.array([0.005, 0.015, 0.04]))}
    res: dict[str, Any] = {}
    for name, (lo, hi) in cases.items():
        for angle in (5.0, 30.0):
            truth, dist = _edge_field(angle, lo, hi)
            band = (np.abs(dist) <= 3.0)
            band[:8] = band[-8:] = False
            band[:, :8] = band[:, -8:] = False
            contrast = float(np.abs(hi - lo).max())
            rec: dict[str, Any] = {}
            for method in METHODS:
                err = cfa.debayer(_mosaic(truth), "RGGB", method=method).astype(np.float64) - truth
                lum = err.mean(axis=0)
                along = lum - 0.5 * (np.roll(lum, 1, axis=0) + np.roll(lum, -1, axis=0))  # edge near the columns
                rec[method] = {"rms_error_over_contrast": round(float(np.sqrt((err[:, band] ** 2).mean())) / contrast, 5),
                               "zipper_over_contrast": round(float(np.sqrt((along[band] ** 2).mean())) / contrast, 5)}
            res[f"{name}_{angle:g}deg"] = rec
    return res


def quality_border(size: int = 200) -> dict[str, Any]:
    from stackwatch.engine import cfa

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # structure shared by the channels (what real scenes have and what RCD's colour-difference steps assume)
    # plus a slow colour drift
    lum = 1.0 + 0.3 * np.sin(xx / 9 * 2 * np.pi + 0.3) * np.cos(yy / 13 * 2 * np.pi) + 0.2 * np.sin((xx + yy) / 17 * 2 * np.pi)
    drift = 0.1 * np.stack([xx / size, yy / size, (xx + yy) / (2 * size)])
    truth = (0.03 * lum[None] * (_SKY_COLOUR[:, None, None] / _SKY_COLOUR.mean() + drift)).astype(np.float32)
    ring = np.ones((size, size), bool)
    ring[2:-2, 2:-2] = False
    inner = np.zeros((size, size), bool)
    inner[12:-12, 12:-12] = True
    res: dict[str, Any] = {}
    for method in METHODS:
        err = cfa.debayer(_mosaic(truth), "RGGB", method=method).astype(np.float64) - truth
        rms_ring = float(np.sqrt((err[:, ring] ** 2).mean()))
        rms_in = float(np.sqrt((err[:, inner] ** 2).mean()))
        res[method] = {"rms_outer_2px": rms_ring, "rms_interior": rms_in, "ratio": round(rms_ring / rms_in, 3)}
    return res


def _step(out: dict[str, Any], name: str, fn: Callable[[], Any], repeat: int) -> None:
    """``name``_wall_s (best of ``repeat``), ``name``_cpu_s (CPU of all threads in that run), load."""
    fn()  # warm-up on the full frame: numba cache load, first touch of the output's pages
    best = cpu = float("inf")
    for _ in range(repeat):
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if dt < best:
            best, cpu = dt, dc
    out[f"{name}_wall_s"] = round(best, 4)
    out[f"{name}_cpu_s"] = round(cpu, 4)
    out[f"{name}_load_1min"] = round(os.getloadavg()[0], 2)


def timing(h: int, w: int, repeat: int) -> dict[str, Any]:
    from stackwatch.engine import cfa
    from stackwatch.engine.simulate_sky import bayer_channel_map, render_stars, star_colour_weights

    rng = np.random.default_rng(1)
    n = int(600 * h * w / 1e6)
    img = np.full((h, w), 800.0, dtype=np.float32)
    flux = 10 ** (rng.uniform(0, 1, n) ** 0.6 * 3.6 + 2.6)  # the brightest ~1 % saturate
    colour = 3.0 * star_colour_weights(np.clip(rng.normal(0.7, 0.35, n), -0.3, 2.0))
    render_stars(img, rng.uniform(0, w, n), rng.uniform(0, h, n), flux[:, None] * colour, fwhm_px=2.5, beta=4.0,
                 cmap=bayer_channel_map("RGGB"))
    np.minimum(img, 65000.0, out=img)
    img = (rng.poisson(img).astype(np.float32) / np.float32(65535.0)).astype(np.float32)
    res: dict[str, Any] = {"width": w, "height": h, "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}
    for method in METHODS:
        cfa.debayer(img[:64, :64], "RGGB", method=method)  # compile or load the cache outside the timing
        _step(res, method, lambda m=method: cfa.debayer(img, "RGGB", method=m), repeat)
    for method in METHODS[1:]:
        res[f"{method}_vs_bilinear_cpu"] = round(res[f"{method}_cpu_s"] / res["bilinear_cpu_s"], 3)
        res[f"{method}_vs_bilinear_wall"] = round(res[f"{method}_wall_s"] / res["bilinear_wall_s"], 3)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=6248)
    ap.add_argument("--height", type=int, default=4176)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-time", action="store_true", help="quality figures only")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    res: dict[str, Any] = {"stars": {f"fwhm_{f:g}": quality_stars(f) for f in (1.8, 2.5, 3.5)},
                           "noise": quality_noise(), "edges": quality_edges(), "border": quality_border()}
    if not args.no_time:
        res["time"] = timing(args.height, args.width, args.repeat)
    text = json.dumps(res, indent=1)
    print(text)
    if not args.no_write:
        path = Path(__file__).resolve().parent / "results" / "debayer.json"
        path.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
