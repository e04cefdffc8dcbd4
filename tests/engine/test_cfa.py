"""Bayer helpers and debayering: flat fields, channel ratios, NaN handling, orientation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from stackwatch.engine import cfa
from stackwatch.engine.errors import StackwatchError

PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")


def _mosaic(rgb: np.ndarray, bayer: str) -> np.ndarray:
    """CFA sampling of a (3, H, W) image: each pixel keeps its own colour."""
    cmap = cfa.channel_map(bayer)
    h, w = rgb.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w]
    return rgb[cmap[yy % 2, xx % 2], yy, xx].astype(np.float32)


def test_channel_map_and_offsets() -> None:
    assert cfa.channel_map("RGGB").tolist() == [[0, 1], [1, 2]]
    assert cfa.channel_map("gbrg").tolist() == [[1, 2], [0, 1]]
    assert cfa.channel_offsets("GRBG") == {"R": [(0, 1)], "G": [(0, 0), (1, 1)], "B": [(1, 0)]}
    with pytest.raises(StackwatchError, match="XGGB"):
        cfa.channel_map("XGGB")


@pytest.mark.parametrize("bayer", PATTERNS)
@pytest.mark.parametrize("method", ["bilinear", "vng"])
def test_flat_cfa_gives_flat_rgb_with_exact_ratios(bayer: str, method: str) -> None:
    levels = np.array([0.30, 0.50, 0.20], dtype=np.float32)
    rgb = np.broadcast_to(levels[:, None, None], (3, 40, 50)).copy()
    out = cfa.debayer(_mosaic(rgb, bayer), bayer, method=method)
    assert out.shape == (3, 40, 50) and out.dtype == np.float32
    np.testing.assert_allclose(out, rgb, rtol=1e-6)


@pytest.mark.parametrize("method", ["bilinear", "vng"])
def test_smooth_gradient_is_reproduced(method: str) -> None:
    h, w = 60, 64
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([0.1 + 0.002 * xx, 0.2 + 0.001 * yy, 0.15 + 0.001 * (xx + yy)]).astype(np.float32)
    out = cfa.debayer(_mosaic(rgb, "RGGB"), "RGGB", method=method)
    # linear ramps are reproduced exactly by bilinear interpolation away from the border
    np.testing.assert_allclose(out[:, 2:-2, 2:-2], rgb[:, 2:-2, 2:-2], atol=2e-6)


def test_bilinear_matches_textbook_neighbours() -> None:
    rng = np.random.default_rng(1)
    img = rng.uniform(0.1, 0.9, (8, 8)).astype(np.float32)
    out = cfa.debayer(img, "RGGB", method="bilinear")
    y, x = 2, 2  # R site
    assert out[0, y, x] == img[y, x]
    assert out[1, y, x] == pytest.approx((img[y - 1, x] + img[y + 1, x] + img[y, x - 1] + img[y, x + 1]) / 4, rel=1e-6)
    assert out[2, y, x] == pytest.approx((img[y - 1, x - 1] + img[y - 1, x + 1] + img[y + 1, x - 1] + img[y + 1, x + 1]) / 4, rel=1e-6)
    y, x = 2, 3  # G site on an R row: R from left/right, B from above/below
    assert out[0, y, x] == pytest.approx((img[y, x - 1] + img[y, x + 1]) / 2, rel=1e-6)
    assert out[2, y, x] == pytest.approx((img[y - 1, x] + img[y + 1, x]) / 2, rel=1e-6)


@pytest.mark.parametrize("method", ["bilinear", "vng"])
def test_single_bright_pixel_no_nan_no_negative(method: str) -> None:
    img = np.full((21, 21), 0.1, dtype=np.float32)
    img[10, 10] = 0.9
    out = cfa.debayer(img, "RGGB", method=method)
    assert np.isfinite(out).all()
    assert out.min() >= 0.1 - 1e-6


def test_nan_is_interpolated_from_finite_same_colour_neighbours() -> None:
    img = np.full((12, 12), 0.25, dtype=np.float32)
    img[4, 4] = np.nan  # an R site of RGGB
    out = cfa.debayer(img, "RGGB")
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, 0.25, rtol=1e-6)
    all_nan = np.full((6, 6), np.nan, dtype=np.float32)
    assert np.isnan(cfa.debayer(all_nan, "RGGB")).all()


def test_superpixel() -> None:
    img = np.array([[1, 2, 1, 2], [3, 4, 3, np.nan]], dtype=np.float32)
    out = cfa.debayer(img, "RGGB", method="superpixel")
    assert out.shape == (3, 1, 2)
    assert out[:, 0, 0].tolist() == [1.0, 2.5, 4.0]
    assert out[0, 0, 1] == 1.0 and out[1, 0, 1] == 2.5 and np.isnan(out[2, 0, 1])
    out = cfa.debayer(img, "GBRG", method="superpixel")
    assert out[:, 0, 0].tolist() == [3.0, 2.5, 2.0]


def test_bad_method_is_a_user_error() -> None:
    with pytest.raises(StackwatchError, match="debayer method"):
        cfa.debayer(np.zeros((4, 4), np.float32), "RGGB", method="ahd")


# --------------------------------------------------------------------------------------------------
# Star flux per channel against the truth (issue #5): a Moffat star (β = 4) rendered by the simulator on a
# coloured sky, once as the CFA sees it and once per channel at every pixel; the debayered channel's
# total flux over the stamp (minus the sky) against the true channel flux, over random sub-pixel phases.

_SKY = np.array([0.012, 0.010, 0.008])


def _star_cfa_and_truth(fwhm: float, x: float, y: float, flux: np.ndarray, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    from stackwatch.engine import simulate_sky

    cmap = simulate_sky.bayer_channel_map("RGGB")
    cfa_img = np.zeros((size, size), np.float32)
    simulate_sky.render_stars(cfa_img, np.array([x]), np.array([y]), flux[None], fwhm_px=fwhm, beta=4.0, cmap=cmap,
                              floor_e=1e-6)
    yy, xx = np.mgrid[0:size, 0:size]
    cfa_img += _SKY[cmap[yy % 2, xx % 2]].astype(np.float32)
    truth = np.zeros((3, size, size), np.float32)
    for c in range(3):
        simulate_sky.render_stars(truth[c], np.array([x]), np.array([y]), flux[None], fwhm_px=fwhm, beta=4.0,
                                  cmap=np.full((2, 2), c), floor_e=1e-6)
    return cfa_img, truth


def _channel_flux_errors(fwhm: float, method: str, n: int = 24, *, phase_grid: bool = False) -> np.ndarray:
    """(n, 3) relative errors of the debayered channel fluxes over random star colours and random sub-pixel
    phases (``phase_grid``: an even √n x √n grid over the 2 x 2 px Bayer period instead)."""
    rng = np.random.default_rng(11)
    k = math.isqrt(n)
    errs = []
    for i in range(n):
        flux = np.array([1.0, 1.0, 1.0]) * rng.uniform(0.6, 1.6, 3)
        if phase_grid:
            x, y = 31 + 2 * (i % k + 0.5) / k, 31 + 2 * (i // k % k + 0.5) / k
        else:
            x, y = 32 + rng.uniform(-1, 1), 32 + rng.uniform(-1, 1)
        cfa_img, truth = _star_cfa_and_truth(fwhm, x, y, flux)
        rgb = cfa.debayer(cfa_img, "RGGB", method=method).astype(np.float64)
        got = (rgb - _SKY[:, None, None]).sum(axis=(1, 2))
        errs.append(got / truth.astype(np.float64).sum(axis=(1, 2)) - 1.0)
    return np.array(errs)


@pytest.mark.parametrize("fwhm", [3.0, 4.0])
def test_bilinear_star_flux_is_unbiased_over_phases(fwhm: float) -> None:
    # what a dithered stack sees: the phase error averages out over the frames
    errs = _channel_flux_errors(fwhm, "bilinear", 36, phase_grid=True)
    assert np.abs(errs.mean(axis=0)).max() < 0.001
    assert np.abs(errs[:, 1]).max() < 0.001  # G (1 in 2, quincunx) is well sampled from FWHM 3 px


@pytest.mark.parametrize("fwhm", [3.5, 4.0])
def test_bilinear_keeps_each_channels_star_flux(fwhm: float) -> None:
    assert np.abs(_channel_flux_errors(fwhm, "bilinear")).max() < 0.005


@pytest.mark.xfail(strict=True, reason=(
    "any linear debayer (bilinear, colour difference, gradient-corrected) makes an R or B channel's flux "
    "4 x the sum of its 1-in-4 samples, which depends on the star's phase: measured at FWHM 2 px sd 3.3 %, "
    "max 8 %; FWHM 2.5 px sd 1.1 %, max 2 %; FWHM 3 px sd 0.35 %, max 0.64 %. RCD as published does not "
    "help (2.9/3.8 % median R/B at 2.5 px: not flux-conserving, test_cfa_rcd.py); a flux-preserving "
    "colour-difference hybrid measured 0.9 % (bench_debayer, not shipped)"))
@pytest.mark.parametrize("fwhm", [2.0, 2.5, 3.0])
def test_bilinear_keeps_each_channels_star_flux_undersampled(fwhm: float) -> None:
    assert np.abs(_channel_flux_errors(fwhm, "bilinear")).max() < 0.005


@pytest.mark.xfail(strict=True, reason=(
    "our VNG estimates a missing colour as own value + colour difference against the neighbours' bilinear "
    "own colour, which is low at a concave star core: mean over phases +0.2 to +1.5 % per channel and up to "
    "15 % (FWHM 3 px) / 10 % (FWHM 4 px) for one star on a coloured sky; not fit for photometry as it is"))
def test_vng_keeps_each_channels_star_flux() -> None:
    errs = _channel_flux_errors(4.0, "vng")
    assert np.abs(errs.mean(axis=0)).max() < 0.002
