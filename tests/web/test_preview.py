"""Preview rendering: MTF and STF auto-stretch against their definitions, downsampling against numpy,
PNG against an independent decoder."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from pngdecode import decode_png, png_size
from stackwatch.engine.errors import StackwatchError
from stackwatch.web import preview as pv


def _naive_stf(channel: np.ndarray, clip: float = -2.8, target: float = 0.25) -> tuple[float, float]:
    """The auto-stretch from its definition, on every finite pixel at full resolution."""
    v = channel[np.isfinite(channel)].astype(np.float64)
    med = float(np.median(v))
    madn = 1.4826 * float(np.median(np.abs(v - med)))
    c0 = min(max(med + clip * madn, 0.0), 1.0)
    d = (med - c0) / (1.0 - c0)
    m = (target - 1) * d / ((2 * target - 1) * d - target)  # MTF(target, d)
    return c0, m


def test_mtf_fixed_points_and_inverse() -> None:
    x = np.linspace(0, 1, 101)
    for m in (0.01, 0.1, 0.25, 0.5, 0.9):
        y = pv.mtf(m, x)
        assert y[0] == 0.0 and y[-1] == 1.0
        assert np.all(np.diff(y) > 0)
        assert float(pv.mtf(m, m)) == pytest.approx(0.5, abs=1e-12)
    # the balance that sends d to t is MTF(t, d): MTF(MTF(t, d), d) == t
    for t in (0.1, 0.25, 0.5):
        for d in (0.001, 0.01, 0.2):
            assert float(pv.mtf(pv.mtf(t, d), d)) == pytest.approx(t, abs=1e-12)
    assert float(pv.mtf(0.5, 0.3)) == pytest.approx(0.3)  # m = 0.5 is the identity


def test_stf_matches_full_resolution_definition() -> None:
    rng = np.random.default_rng(1)
    img = (0.08 + 0.003 * rng.standard_normal((1500, 1800))).astype(np.float32)
    img[rng.random(img.shape) < 0.001] = 0.9  # stars / hot pixels barely move median and MAD
    img[:20, :] = np.nan
    (p,) = pv.stf_params(img)
    c0, m = _naive_stf(img)
    sigma = 0.003
    assert abs(p.shadows - c0) < 0.02 * sigma  # subsample statistics: within 2 % of a sigma
    assert p.midtones == pytest.approx(m, rel=0.02)
    assert abs(p.shadows - (0.08 - 2.8 * sigma)) < 0.05 * sigma


def test_stretch_puts_background_on_target() -> None:
    rng = np.random.default_rng(2)
    img = (0.02 + 0.001 * rng.standard_normal((400, 500))).astype(np.float32)
    for strength, target in ((1.0, 0.25), (2.0, 0.5), (0.5, 0.0625)):
        prev = pv.render_preview(img, max_px=600, strength=strength)
        pix = decode_png(prev.png)
        assert abs(np.median(pix) / 255.0 - target) <= 1.5 / 255
        assert prev.histogram.sum() == img.size
    assert pv.strength_to_target(1.0) == 0.25
    with pytest.raises(StackwatchError):
        pv.strength_to_target(0.0)


def test_linked_and_unlinked_colour() -> None:
    rng = np.random.default_rng(3)
    base = rng.standard_normal((3, 300, 300)).astype(np.float32)
    levels = np.array([0.03, 0.05, 0.08], dtype=np.float32)[:, None, None]
    sig = np.array([0.001, 0.0015, 0.002], dtype=np.float32)[:, None, None]
    img = levels + sig * base
    unl = pv.stf_params(img, linked=False)
    lnk = pv.stf_params(img, linked=True)
    assert len(set(lnk)) == 1 and len(set(unl)) == 3
    pix_u = decode_png(pv.render_preview(img, linked=False).png)
    med_u = np.median(pix_u.reshape(-1, 3), axis=0) / 255
    assert np.all(np.abs(med_u - 0.25) < 2 / 255)  # unlinked: every channel's background neutral grey
    pix_l = decode_png(pv.render_preview(img, linked=True).png)
    med_l = np.median(pix_l.reshape(-1, 3), axis=0)
    assert med_l[0] < med_l[1] < med_l[2]  # linked: keeps the colour cast of the data
    for c in range(3):
        c0, m = _naive_stf(img[c])
        assert abs(unl[c].shadows - c0) < 0.05 * float(sig[c, 0, 0])
        assert unl[c].midtones == pytest.approx(m, rel=0.03)


@pytest.mark.parametrize("shape,max_px", [((97, 131), 40), ((120, 80), 40), ((64, 64), 64), ((3, 50, 70), 20)])
def test_downsample_is_nan_aware_block_mean(shape: tuple[int, ...], max_px: int) -> None:
    rng = np.random.default_rng(4)
    img = rng.random(shape).astype(np.float32)
    img[rng.random(shape) < 0.2] = np.nan
    small, f = pv.downsample(img, max_px=max_px)
    chans = img if img.ndim == 3 else img[None]
    h, w = chans.shape[1:]
    assert f == max(1, math.ceil(max(h, w) / max_px))
    assert max(small.shape[1:]) <= max_px
    ph, pw = math.ceil(h / f) * f, math.ceil(w / f) * f
    padded = np.full((chans.shape[0], ph, pw), np.nan, dtype=np.float64)
    padded[:, :h, :w] = chans
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks
        ref = np.nanmean(padded.reshape(chans.shape[0], ph // f, f, pw // f, f), axis=(2, 4))
    np.testing.assert_allclose(small, ref, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_all_nan_block_is_nan_and_drawn_black() -> None:
    img = np.full((40, 40), 0.1, dtype=np.float32) + np.random.default_rng(5).normal(0, 0.01, (40, 40)).astype(np.float32)
    img[:10, :10] = np.nan
    small, f = pv.downsample(img, max_px=4)
    assert f == 10 and np.isnan(small[0, 0, 0]) and np.isfinite(small[0, 1:, 1:]).all()
    pix = decode_png(pv.render_preview(img, max_px=4).png)
    assert pix[0, 0] == 0


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (33, 64), (20, 30, 3)])
def test_png_roundtrip(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(6)
    pix = rng.integers(0, 256, shape, dtype=np.uint8)
    data = pv.encode_png(pix)
    assert png_size(data)[:2] == (shape[1], shape[0])
    np.testing.assert_array_equal(decode_png(data), pix)


def test_png_refuses_bad_input() -> None:
    with pytest.raises(StackwatchError):
        pv.encode_png(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(StackwatchError):
        pv.encode_png(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(StackwatchError):
        pv.render_preview(np.zeros((2, 4, 4), dtype=np.float32))


def test_constant_image_does_not_divide_by_zero() -> None:
    prev = pv.render_preview(np.full((30, 30), 0.2, dtype=np.float32))
    assert np.all(np.isfinite([prev.params[0].shadows, prev.params[0].midtones]))
    prev = pv.render_preview(np.full((30, 30), np.nan, dtype=np.float32))
    assert decode_png(prev.png).max() == 0


def test_crop_region_and_render() -> None:
    assert pv.crop_region((100, 200), 190, 90, 50, 50) == (190, 90, 200, 100)
    for bad in ((0, 0, 0, 10), (0, 0, 2000, 10), (200, 0, 10, 10), (-1, 0, 10, 10), (0, 100, 10, 10)):
        with pytest.raises(StackwatchError):
            pv.crop_region((100, 200), *bad)
    rng = np.random.default_rng(7)
    img = (0.1 + 0.01 * rng.standard_normal((100, 200))).astype(np.float32)
    params = pv.stf_params(img)
    png = pv.render_crop(img, (10, 20, 60, 45), params)
    pix = decode_png(png)
    assert pix.shape == (25, 50)
    full, _ = pv.apply_stretch(img[None], params)
    np.testing.assert_array_equal(pix, full[20:45, 10:60, 0])


def test_render_map_rejection_colours() -> None:
    low = np.zeros((50, 60), dtype=np.uint16)
    high = np.zeros((50, 60), dtype=np.uint16)
    high[10, :] = 4
    low[30, 30] = 2
    pix = decode_png(pv.render_map([low, high], max_px=100).png)
    assert pix.shape == (50, 60, 3)
    assert pix[10, 5, 0] == 255 and pix[10, 5, 2] == 0
    assert pix[30, 30, 2] == 255 and pix[30, 30, 0] == 0
    assert pix[0, 0].sum() == 0


def test_composite_requires_matching_mono() -> None:
    a = np.zeros((10, 12), dtype=np.float32)
    assert pv.composite(a, a + 1, a + 2).shape == (3, 10, 12)
    with pytest.raises(StackwatchError):
        pv.composite(a, a, np.zeros((10, 11), dtype=np.float32))


@pytest.mark.slow
def test_26mp_preview_renders_within_size() -> None:
    rng = np.random.default_rng(8)
    img = (0.05 + 0.002 * rng.standard_normal((4176, 6248))).astype(np.float32)
    prev = pv.render_preview(img, max_px=2048)
    assert (prev.width, prev.height) == (1562, 1044) and prev.factor == 4
    c0, _ = _naive_stf(img[::4, ::4])
    assert abs(prev.params[0].shadows - c0) < 0.05 * 0.002


def test_data_outside_unit_range_is_mapped_first() -> None:
    rng = np.random.default_rng(9)
    adu = (3000 + 100 * rng.standard_normal((300, 300))).astype(np.float32)  # a stack left in ADU
    assert abs(np.median(decode_png(pv.render_preview(adu).png)) - 64) <= 1
    unit = adu / np.float32(65535)
    (p,) = pv.stf_params(unit)
    assert (p.offset, p.span) == (0.0, 1.0)  # ordinary data: identity mapping, the PixInsight definition
    neg = (0.001 * rng.standard_normal((300, 300))).astype(np.float32)  # sky-subtracted, around 0
    assert abs(np.median(decode_png(pv.render_preview(neg).png)) - 64) <= 2


def test_real_frames_stretch_like_stf(real_data: Path) -> None:
    """Real skies (mono 12-bit in 16, and one-shot colour read as CFA): the background lands on the
    target and the brightest stars saturate, as PixInsight's auto-STF shows them."""
    fitsio = pytest.importorskip("stackwatch.engine.fitsio")
    for path in (sorted((real_data / "microobs_hatp32").glob("*.fits*"))[0],
                 sorted((real_data / "asi224mc_m27").glob("*.fits*"))[0]):
        data = fitsio.read_image(path).data
        prev = pv.render_preview(data, max_px=512)
        pix = decode_png(prev.png)
        assert abs(float(np.median(pix)) - 64) <= 3, path.name
        assert pix.max() >= 250 and np.mean(pix == 0) < 0.03, path.name
