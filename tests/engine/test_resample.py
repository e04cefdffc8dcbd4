"""Resampling: Lanczos-3 with clamping and bilinear, against truth and a slow reference (§9.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from stackwatch.engine.errors import StackwatchError
from stackwatch.engine.resample import lanczos3_weights, warp, warp_mask
from stackwatch.engine.simulate_sky import render_stars


def _sim(theta: float, s: float, tx: float, ty: float) -> np.ndarray:
    c, si = math.cos(theta) * s, math.sin(theta) * s
    return np.array([[c, -si, tx], [si, c, ty], [0.0, 0.0, 1.0]])


def _field(seed: int = 1, shape: tuple[int, int] = (200, 240), n: int = 60, fwhm: float = 3.0,
           noise: float = 3.0) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(seed)
    h, w = shape
    img = np.full(shape, 500.0, dtype=np.float32)
    xs = rng.uniform(30, w - 30, n)
    ys = rng.uniform(30, h - 30, n)
    render_stars(img, xs, ys, 10 ** rng.uniform(3.5, 5.0, n), fwhm_px=fwhm, beta=4.0)
    img += rng.normal(0, noise, shape).astype(np.float32)
    return (img / 65535.0).astype(np.float32), noise / 65535.0


def _naive_lanczos(src: np.ndarray, u: float, v: float, clamp: float) -> float:
    """Slow reference: exact sinc weights (no LUT), PCL clamping rule, mirrored borders."""
    h, w = src.shape
    x0, y0 = math.floor(u), math.floor(v)

    def lz(t: float) -> float:
        return float(np.sinc(t) * np.sinc(t / 3.0)) if abs(t) < 3 else 0.0

    def mir(i: int, n: int) -> int:
        i = -i if i < 0 else i
        return 2 * n - 2 - i if i >= n else i

    sp = sn = wp = wn = 0.0
    for j in range(y0 - 2, y0 + 4):
        for i in range(x0 - 2, x0 + 4):
            wt = lz(i - u) * lz(j - v)
            s = float(src[mir(j, h), mir(i, w)]) * wt
            if s < 0:
                sn -= s
                wn -= wt
            else:
                sp += s
                wp += wt
    if clamp > 0 and sp > 0:
        r = sn / sp
        if r >= 1:
            return sp / wp
        if r > clamp:
            q = 1 - ((r - clamp) / (1 - clamp)) ** 2
            sn *= q
            wn *= q
    return (sp - sn) / (wp - wn)


def test_identity_is_bit_exact_mono_and_colour() -> None:
    img, _ = _field()
    out = warp(img, np.eye(3), img.shape)
    assert np.array_equal(out.data, img)
    assert out.footprint.all()
    assert out.variance_factor == pytest.approx(1.0)
    rgb = np.stack([img, img * 0.5, img * 2.0])
    out3 = warp(rgb, np.eye(3), rgb.shape)
    assert out3.data.shape == rgb.shape
    assert np.array_equal(out3.data, rgb)


def test_constant_image_stays_constant() -> None:
    img = np.full((180, 220), 0.3141, dtype=np.float32)
    for method in ("lanczos3", "bilinear"):
        for t in (_sim(0.0, 1.0, 0.5, 0.5), _sim(0.4, 1.005, 7.3, -4.1), _sim(math.pi, 1.0, 219.0, 179.0)):
            out = warp(img, t, img.shape, method=method)
            d = out.data[out.footprint]
            assert d.size > 0.5 * img.size
            assert np.max(np.abs(d - 0.3141)) <= 1e-6
            # outside the source: NaN, never 0
            assert np.all(np.isnan(out.data[~out.footprint]))


def test_matches_slow_reference_at_random_positions() -> None:
    img, _ = _field(seed=4)
    t = _sim(0.3, 0.995, 12.7, -8.2)
    out = warp(img, t, img.shape).data
    inv = np.linalg.inv(t)
    rng = np.random.default_rng(0)
    for _ in range(200):
        x, y = int(rng.integers(0, img.shape[1])), int(rng.integers(0, img.shape[0]))
        u, v, wgt = inv @ np.array([x, y, 1.0])
        u, v = u / wgt, v / wgt
        if not (-0.5 <= u <= img.shape[1] - 0.5 and -0.5 <= v <= img.shape[0] - 0.5):
            assert np.isnan(out[y, x])
            continue
        ref = _naive_lanczos(img.astype(np.float64), u, v, 0.3)
        # LUT with 4096 steps per pixel: weights differ by < 1e-3 of a tap
        assert out[y, x] == pytest.approx(ref, rel=2e-4, abs=2e-7)


@pytest.mark.parametrize(("clamp", "relative", "max_gain"), [(0.0, False, 1e-3), (0.3, False, 1e-2), (0.3, True, 2e-3)])
def test_shift_and_back_flux(clamp: float, relative: bool, max_gain: float) -> None:
    """Unclamped Lanczos keeps total flux to 0.1 %; PI clamping gains flux on sharp (FWHM 3) stars."""
    img, _ = _field(seed=2, noise=3.0)
    t = _sim(0.0, 1.0, 0.37, -0.61)
    there = warp(img, t, img.shape, clamp=clamp, relative_clamp=relative).data
    back = warp(there, np.linalg.inv(t), img.shape, clamp=clamp, relative_clamp=relative).data
    inner = (slice(20, -20), slice(20, -20))
    bg = 500.0 / 65535.0
    gain = float(np.sum(back[inner] - bg)) / float(np.sum(img[inner] - bg)) - 1.0
    assert -1e-3 < gain < max_gain


@pytest.mark.parametrize("fwhm", [2.0, 3.0, 5.0])
def test_shift_and_back_adds_no_ringing(fwhm: float) -> None:
    """Noiseless star field: nothing dips below the sky by more than 1 sigma of a realistic noise."""
    img, _ = _field(seed=2, noise=0.0, fwhm=fwhm)
    sigma = 3.0 / 65535.0
    t = _sim(0.0, 1.0, 0.37, -0.61)
    back = warp(warp(img, t, img.shape).data, np.linalg.inv(t), img.shape).data
    inner = (slice(20, -20), slice(20, -20))
    assert float(np.nanmin(back[inner] - 500.0 / 65535.0)) > -sigma


def test_point_source_with_clamping_has_no_negative_ring() -> None:
    img = np.zeros((64, 64), dtype=np.float32)
    img[32, 32] = 1.0
    t = _sim(0.0, 1.0, 0.5, 0.5)
    clamped = warp(img, t, img.shape, clamp=0.3).data
    raw = warp(img, t, img.shape, clamp=0.0).data
    assert np.nanmin(raw) < -0.01  # Lanczos alone rings
    assert np.nanmin(clamped) >= 0.0


def test_variance_factor_half_pixel() -> None:
    img = np.zeros((50, 60), dtype=np.float32)
    out = warp(img, _sim(0.0, 1.0, 0.5, 0.5), img.shape)
    w = lanczos3_weights(0.5)
    expect = (np.sum(w**2) / np.sum(w) ** 2) ** 2
    assert out.variance_factor == pytest.approx(expect, rel=1e-3)
    assert 0.6 < out.variance_factor < 0.64
    assert warp(img, _sim(0.0, 1.0, 3.0, -2.0), img.shape).variance_factor == pytest.approx(1.0)


def test_noise_reduction_matches_variance_factor() -> None:
    rng = np.random.default_rng(5)
    img = rng.normal(1.0, 0.01, (300, 300)).astype(np.float32)
    out = warp(img, _sim(0.0, 1.0, 0.5, 0.25), img.shape, clamp=0.0)
    d = out.data[out.footprint]
    assert (np.var(d) / 0.01**2) == pytest.approx(out.variance_factor, rel=0.05)


def test_nan_falls_back_to_bilinear_and_propagates_only_locally() -> None:
    img = np.full((40, 40), 2.0, dtype=np.float32)
    img[20, 20] = np.nan
    out = warp(img, _sim(0.0, 1.0, 0.3, 0.2), img.shape)
    # output pixels whose central 2x2 has finite pixels are finite and exact on a constant
    fin = np.isfinite(out.data)
    assert fin.sum() >= img.size - 40 - 40 - 1  # edges (shift) plus at most the NaN's own pixel
    assert np.allclose(out.data[fin], 2.0, atol=1e-6)
    allnan = np.full((10, 10), np.nan, dtype=np.float32)
    assert np.isnan(warp(allnan, np.eye(3), allnan.shape).data).all()


def test_bilinear_half_pixel_is_average() -> None:
    img = np.arange(100, dtype=np.float32).reshape(10, 10)
    out = warp(img, _sim(0.0, 1.0, -0.5, 0.0), img.shape, method="bilinear").data
    # output x samples source u = x + 0.5
    assert out[4, 3] == pytest.approx(0.5 * (img[4, 3] + img[4, 4]))


def test_colour_equals_per_plane() -> None:
    img, _ = _field(seed=3, shape=(120, 140))
    rgb = np.stack([img, img * 0.7 + 0.01, img * 1.3])
    t = _sim(0.2, 1.0, 3.3, 1.7)
    out = warp(rgb, t, rgb.shape)
    for c in range(3):
        assert np.array_equal(out.data[c], warp(rgb[c], t, rgb[c].shape).data, equal_nan=True)


def test_homography_matches_affine_when_affine() -> None:
    img, _ = _field(seed=6, shape=(100, 120))
    t = _sim(0.1, 1.0, 2.0, 3.0)
    a = warp(img, t, img.shape).data
    b = warp(img, t * 2.0, img.shape).data  # same projective map, scaled matrix
    assert np.allclose(a, b, equal_nan=True, atol=1e-6)


def test_warp_mask_nearest_and_dilated() -> None:
    mask = np.zeros((30, 30), dtype=bool)
    mask[10, 12] = True
    out = warp_mask(mask, _sim(0.0, 1.0, 3.0, -2.0), mask.shape)
    ys, xs = np.nonzero(out)
    assert set(zip(ys.tolist(), xs.tolist(), strict=True)) == {(8 + dy, 15 + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    assert not warp_mask(mask, _sim(0.0, 1.0, 100.0, 0.0), mask.shape).any()


def test_errors() -> None:
    img = np.zeros((10, 10), dtype=np.float32)
    with pytest.raises(StackwatchError, match="method"):
        warp(img, np.eye(3), img.shape, method="cubic")
    with pytest.raises(StackwatchError, match="singular"):
        warp(img, np.zeros((3, 3)), img.shape)
    with pytest.raises(StackwatchError, match="shape"):
        warp(np.zeros(5, dtype=np.float32), np.eye(3), (5, 5))
