"""Resampling: Lanczos-3 with clamping and bilinear, against truth and a slow reference (§9.2)."""

from __future__ import annotations

import math
from typing import Any

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


def _naive_lanczos(src: np.ndarray, u: float, v: float, clamp: float, method: str = "pixinsight") -> float:
    """Slow reference: exact sinc weights (no LUT), PCL clamping rule or the local lower bound (the
    lowest of the central 4x4 taps), mirrored borders."""
    h, w = src.shape
    x0, y0 = math.floor(u), math.floor(v)

    def lz(t: float) -> float:
        return float(np.sinc(t) * np.sinc(t / 3.0)) if abs(t) < 3 else 0.0

    def mir(i: int, n: int) -> int:
        i = -i if i < 0 else i
        return 2 * n - 2 - i if i >= n else i

    if method == "local":
        acc = wsum = 0.0
        for j in range(y0 - 2, y0 + 4):
            for i in range(x0 - 2, x0 + 4):
                wt = lz(i - u) * lz(j - v)
                acc += wt * float(src[mir(j, h), mir(i, w)])
                wsum += wt
        lo = min(float(src[mir(j, h), mir(i, w)]) for j in range(y0 - 1, y0 + 3) for i in range(x0 - 1, x0 + 3))
        return max(acc / wsum, lo) if clamp > 0 else acc / wsum
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


@pytest.mark.parametrize(("method", "clamp", "rel"), [("local", 0.3, 1e-6), ("local", 0.0, 1e-6), ("pixinsight", 0.3, 2e-4)])
def test_matches_slow_reference_at_random_positions(method: str, clamp: float, rel: float) -> None:
    img, _ = _field(seed=4)
    t = _sim(0.3, 0.995, 12.7, -8.2)
    out = warp(img, t, img.shape, clamp=clamp, clamp_method=method).data
    inv = np.linalg.inv(t)
    rng = np.random.default_rng(0)
    for _ in range(200):
        x, y = int(rng.integers(0, img.shape[1])), int(rng.integers(0, img.shape[0]))
        u, v, wgt = inv @ np.array([x, y, 1.0])
        u, v = u / wgt, v / wgt
        if not (-0.5 <= u <= img.shape[1] - 0.5 and -0.5 <= v <= img.shape[0] - 0.5):
            assert np.isnan(out[y, x])
            continue
        ref = _naive_lanczos(img.astype(np.float64), u, v, clamp, method)
        # LUT with 4096 steps per pixel: interpolated (local) < 1e-7 of a tap, nearest row (PI) < 1e-3
        assert out[y, x] == pytest.approx(ref, rel=rel, abs=rel * 1e-3)


def _gain_and_ring(img: np.ndarray, clean: np.ndarray, **kw: Any) -> tuple[float, float]:
    """Total-flux gain of a shift by (0.37, -0.61) and back on ``img``, and the lowest value of the
    one-way shift of the noiseless ``clean`` field relative to the sky in units of the noise (3 e on a
    500 e sky). One way, because shifting back undoes most of the ringing of the first shift."""
    t = _sim(0.0, 1.0, 0.37, -0.61)
    there = warp(img, t, img.shape, **kw).data
    back = warp(there, np.linalg.inv(t), img.shape, **kw).data
    inner = (slice(20, -20), slice(20, -20))
    bg = 500.0 / 65535.0
    gain = float(np.sum(back[inner] - bg)) / float(np.sum(img[inner] - bg)) - 1.0
    one_way = warp(clean, t, clean.shape, **kw).data
    ring = float(np.nanmin(one_way[inner] - bg)) / (3.0 / 65535.0)
    return gain, ring


@pytest.mark.parametrize("fwhm", [2.0, 3.0, 5.0])
@pytest.mark.parametrize(("kw", "max_gain"), [
    ({"clamp": 0.0}, 1e-3),
    ({}, 1e-3),  # the default: local bound
    ({"clamp_method": "pixinsight"}, 5e-2),
    ({"clamp_method": "pixinsight", "relative_clamp": True}, 2e-2),
])
def test_shift_and_back_flux_and_ringing(fwhm: float, kw: dict[str, Any], max_gain: float) -> None:
    """Noisy star field: the default keeps total flux to 0.1 % (PI clamping gains up to +4 % at FWHM 2);
    the noiseless field shifted once dips nowhere below the sky by 1 sigma."""
    img, _ = _field(seed=2, noise=3.0, fwhm=fwhm)
    clean, _ = _field(seed=2, noise=0.0, fwhm=fwhm)
    gain, ring = _gain_and_ring(img, clean, **kw)
    assert -1e-3 < gain < max_gain
    assert ring > -1.0


def _sharp_field(fwhm: float) -> tuple[np.ndarray, np.ndarray]:
    """Saturated (flat-topped) stars and hot pixels, the features that make Lanczos ring: (noisy, clean)."""
    rng = np.random.default_rng(3)
    h, w = 200, 240
    clean = np.full((h, w), 500.0, dtype=np.float32)
    render_stars(clean, rng.uniform(30, w - 30, 40), rng.uniform(30, h - 30, 40), 10 ** rng.uniform(4.5, 7.0, 40),
                 fwhm_px=fwhm, beta=4.0)
    np.minimum(clean, 60000.0, out=clean)
    clean[rng.integers(20, h - 20, 30), rng.integers(20, w - 20, 30)] += 20000.0
    noisy = clean + rng.normal(0, 3.0, clean.shape).astype(np.float32)
    return (noisy / 65535.0).astype(np.float32), (clean / 65535.0).astype(np.float32)


@pytest.mark.parametrize("fwhm", [2.0, 5.0])
def test_local_bound_removes_ringing_of_sharp_features(fwhm: float) -> None:
    """Unclamped Lanczos rings by hundreds of sigma around hot pixels and saturated cores, PI's rule
    leaves ~-25 sigma, the local bound none. (No clamping keeps the flux of such fields: the
    undershoots go, the overshoot of the flat tops stays; those pixels are masked as saturated.)"""
    img, clean = _sharp_field(fwhm)
    assert _gain_and_ring(img, clean, clamp=0.0)[1] < -100.0
    assert _gain_and_ring(img, clean, clamp_method="pixinsight")[1] < -5.0
    assert _gain_and_ring(img, clean)[1] > -1.0


@pytest.mark.parametrize("clamp", [0.0, 0.3])
@pytest.mark.parametrize("shift", [(0.37, -0.61), (0.5, 0.5), (-13.25, 7.8), (3.0, -2.0), (239.5, 0.0), (240.5, 0.0)])
def test_translation_fast_path_equals_general_path(clamp: float, shift: tuple[float, float]) -> None:
    """The two-pass translation kernel against the per-pixel kernel on the same matrix."""
    from stackwatch.engine import resample

    img, _ = _field(seed=7)
    img = img.copy()
    img[50, 60] = np.nan  # the NaN fallback takes the same route in both
    img[0, 100] = np.nan
    rgb = np.stack([img, img * 0.5])
    t = _sim(0.0, 1.0, *shift)
    fast = warp(rgb, t, rgb.shape, clamp=clamp)
    out = np.empty_like(rgb)
    foot = np.empty(img.shape, dtype=bool)
    rowvar = np.zeros(img.shape[0])
    rowcount = np.zeros(img.shape[0], dtype=np.int64)
    resample._warp_lanczos_bounded(rgb, out, foot, resample.invert_transform(t), resample._LUTN, resample._LUTN_SQ,
                                   float(resample._LUT_STEPS), clamp > 0.0, rowvar, rowcount)
    assert np.array_equal(fast.footprint, foot)
    assert np.allclose(fast.data, out, rtol=0.0, atol=1e-6 * float(np.nanmax(img)), equal_nan=True)
    if rowcount.sum():
        assert fast.variance_factor == pytest.approx(rowvar.sum() / rowcount.sum(), rel=1e-12)
    else:
        assert math.isnan(fast.variance_factor)


def test_lut_weights_match_exact_kernel() -> None:
    """Linear interpolation in the 4096-step table: within 1e-7 of the exact normalised weights."""
    from stackwatch.engine.resample import _LUT_STEPS, _LUTN, _lut_weights

    wts = np.empty(6)
    for frac in [*np.random.default_rng(0).uniform(0.0, 1.0, 2000).tolist(), 0.0, 0.5, 1.0 - 1e-12]:
        _lut_weights(_LUTN, float(_LUT_STEPS), frac, wts)
        exact = lanczos3_weights(frac)
        assert np.max(np.abs(wts - exact / exact.sum())) < 1e-7
    _lut_weights(_LUTN, float(_LUT_STEPS), 0.0, wts)
    assert wts.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]


def test_bilinear_equals_per_pixel_reference() -> None:
    """The interior shortcut of the bilinear kernel gives the renormalised 2x2 sum."""
    img, _ = _field(seed=8, shape=(60, 70))
    t = _sim(0.25, 1.01, 2.3, -1.7)
    out = warp(img, t, img.shape, method="bilinear").data
    inv = np.linalg.inv(t)
    for y in range(0, 60, 3):
        for x in range(0, 70, 3):
            u, v, _w = inv @ np.array([x, y, 1.0])
            if not (-0.5 <= u <= 69.5 and -0.5 <= v <= 59.5):
                assert np.isnan(out[y, x])
                continue
            x0, y0 = math.floor(u), math.floor(v)
            fx, fy = u - x0, v - y0
            acc = ws = 0.0
            for j, wy in ((0, 1.0 - fy), (1, fy)):
                for i, wx in ((0, 1.0 - fx), (1, fx)):
                    yy, xx = abs(y0 + j), abs(x0 + i)  # mirrored at the borders, like the kernel
                    yy, xx = (118 - yy if yy > 59 else yy), (138 - xx if xx > 69 else xx)
                    acc += wx * wy * float(img[yy, xx])
                    ws += wx * wy
            assert out[y, x] == pytest.approx(acc / ws, rel=1e-6)


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


# --- the two-pass path for affine maps close to a translation (rotation, scale, meridian flip) ---

_TWO_PASS_CASES = [  # (rotation deg, scale): dithers with field rotation, focus/temperature scale, a flip
    (0.01, 1.0), (0.05, 1.0), (0.5, 1.0), (-0.3, 1.005), (0.2, 0.995), (2.0, 1.0), (180.0, 1.0), (180.05, 1.0),
]


def _centred(deg: float, scale: float, shape: tuple[int, int], tx: float = 2.37, ty: float = -1.61) -> np.ndarray:
    """Rotation by ``deg`` and ``scale`` about the frame centre, then (tx, ty): frame -> reference."""
    h, w = shape
    m = _sim(math.radians(deg), scale, 0.0, 0.0)
    p = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    m[:2, 2] = p - m[:2, :2] @ p + np.array([tx, ty])
    return m


def _two_d(img: np.ndarray, t: np.ndarray, clamp: float = 0.3) -> tuple[np.ndarray, np.ndarray, float]:
    """The per-pixel 2-D kernel on the same matrix: (data, footprint, variance factor)."""
    from stackwatch.engine import resample

    src = np.ascontiguousarray(img.reshape((-1, *img.shape[-2:])), dtype=np.float32)
    out = np.empty_like(src)
    foot = np.empty(src.shape[1:], dtype=bool)
    rowvar = np.zeros(src.shape[1])
    rowcount = np.zeros(src.shape[1], dtype=np.int64)
    resample._warp_lanczos_bounded(src, out, foot, resample.invert_transform(t), resample._LUTN, resample._LUTN_SQ,
                                   float(resample._LUT_STEPS), clamp > 0.0, rowvar, rowcount)
    return out.reshape(img.shape), foot, float(rowvar.sum() / rowcount.sum())


def _blobs(shape: tuple[int, int] = (150, 180), fwhm: float = 3.0, seed: int = 11) -> np.ndarray:
    """A band-limited field: point-sampled Gaussian blobs on a sky, no noise."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.full(shape, 0.01)
    s2 = 2.0 * (fwhm / 2.3548) ** 2
    for x0, y0, a in zip(rng.uniform(-5, w + 5, 70), rng.uniform(-5, h + 5, 70), rng.uniform(0.05, 1.0, 70)):
        img += a * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / s2)
    return img.astype(np.float32)


@pytest.mark.parametrize(("deg", "scale"), _TWO_PASS_CASES)
def test_two_pass_is_taken_for_near_translations_only(deg: float, scale: float) -> None:
    from stackwatch.engine.resample import _two_pass_applies, invert_transform

    assert _two_pass_applies(invert_transform(_centred(deg, scale, (100, 100))))
    for far in (_centred(2.5, 1.0, (100, 100)), _centred(90.0, 1.0, (100, 100)), _centred(177.0, 1.0, (100, 100))):
        assert not _two_pass_applies(invert_transform(far))
    homography = _centred(deg, scale, (100, 100))
    homography[2, :2] = (1e-6, -2e-6)
    assert not _two_pass_applies(invert_transform(homography))


@pytest.mark.parametrize("clamp", [0.0, 0.3])
@pytest.mark.parametrize(("deg", "scale"), _TWO_PASS_CASES)
def test_two_pass_agrees_with_2d_kernel_on_band_limited_images(deg: float, scale: float, clamp: float) -> None:
    """The two-pass kernel's taps in row j sit beta (j - v) px from the 2-D kernel's (beta = b / e): the
    results differ by at most 3 |beta| x the largest gradient x the weights' absolute sums (~1.3 each),
    bounded here by 5 |beta| max|grad| (+ rounding); with b = 0 (scale, 180 deg) they are equal to
    rounding. Footprints are identical, variance factors equal to 1e-3."""
    from stackwatch.engine.resample import invert_transform

    img = _blobs()
    t = _centred(deg, scale, img.shape)
    new = warp(img, t, img.shape, clamp=clamp)
    ref, foot, vf = _two_d(img, t, clamp)
    assert np.array_equal(new.footprint, foot)
    assert np.array_equal(np.isnan(new.data), ~foot)
    inv = invert_transform(t)
    beta = abs(inv[0, 1] / inv[1, 1])
    gy, gx = np.gradient(img.astype(np.float64))
    tol = 5.0 * beta * float(np.max(np.hypot(gx, gy))) + 1e-6 * float(img.max())
    diff = np.abs(new.data[foot].astype(np.float64) - ref[foot])
    assert diff.max() <= tol
    if beta == 0.0:
        assert diff.max() <= 1e-6 * float(img.max())
    assert new.variance_factor == pytest.approx(vf, rel=1e-3)


def _naive_two_pass(src: np.ndarray, t: np.ndarray, x: int, y: int, bounded: bool) -> float:
    """Slow reference of the two-pass kernel at output (x, y): exact Lanczos-3 weights; row j's taps
    around u(x, j) = alpha x + beta j + gamma, rows around v; mirrored; lower bound = min over the
    central 4 rows of the central 4 taps of each."""
    inv = np.linalg.inv(t)
    (a, b, c), (d, e, f) = inv[0], inv[1]
    beta = b / e
    alpha, gamma = a - beta * d, c - beta * f
    v = d * x + e * y + f
    h, w = src.shape

    def lz(s: float) -> float:
        return float(np.sinc(s) * np.sinc(s / 3.0)) if abs(s) < 3 else 0.0

    def mir(i: int, n: int) -> int:
        i = -i if i < 0 else i
        return 2 * n - 2 - i if i >= n else i

    acc = wsum = 0.0
    lo = math.inf
    y0 = math.floor(v)
    for j in range(y0 - 2, y0 + 4):
        uj = alpha * x + beta * j + gamma
        x0 = math.floor(uj)
        ws = [lz(i - uj) for i in range(x0 - 2, x0 + 4)]
        row = sum(wt * float(src[mir(j, h), mir(i, w)]) for wt, i in zip(ws, range(x0 - 2, x0 + 4))) / sum(ws)
        acc += lz(j - v) * row
        wsum += lz(j - v)
        if y0 - 1 <= j <= y0 + 2:
            lo = min(lo, *(float(src[mir(j, h), mir(i, w)]) for i in range(x0 - 1, x0 + 3)))
    val = acc / wsum
    return max(val, lo) if bounded else val


@pytest.mark.parametrize("clamp", [0.0, 0.3])
@pytest.mark.parametrize(("deg", "scale"), [(0.5, 1.0), (-1.7, 1.004), (180.3, 0.997)])
def test_two_pass_matches_slow_reference(deg: float, scale: float, clamp: float) -> None:
    """Every pixel of the sheared kernel against exact weights (the LUT interpolates to 1e-7 of a tap),
    at random positions including the mirrored borders."""
    img, _ = _field(seed=4)
    t = _centred(deg, scale, img.shape, 0.8, -0.45)
    out = warp(img, t, img.shape, clamp=clamp).data
    rng = np.random.default_rng(1)
    pts = [(int(rng.integers(0, img.shape[1])), int(rng.integers(0, img.shape[0]))) for _ in range(150)]
    pts += [(0, 0), (img.shape[1] - 1, img.shape[0] - 1), (1, img.shape[0] // 2), (img.shape[1] // 2, 1)]
    inv = np.linalg.inv(t)
    for x, y in pts:
        u, v, _w = inv @ np.array([x, y, 1.0])
        if not (-0.5 <= u <= img.shape[1] - 0.5 and -0.5 <= v <= img.shape[0] - 0.5):
            assert np.isnan(out[y, x])
            continue
        ref = _naive_two_pass(img.astype(np.float64), t, x, y, clamp > 0)
        assert out[y, x] == pytest.approx(ref, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(("deg", "scale"), _TWO_PASS_CASES)
def test_two_pass_constant_image_stays_constant(deg: float, scale: float) -> None:
    img = np.full((120, 150), 0.3141, dtype=np.float32)
    out = warp(img, _centred(deg, scale, img.shape, 7.3, -4.1), img.shape)
    d = out.data[out.footprint]
    assert d.size > 0.8 * img.size
    assert np.max(np.abs(d - 0.3141)) <= 1e-6
    assert np.all(np.isnan(out.data[~out.footprint]))


def _gain_and_ring_t(img: np.ndarray, clean: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """`_gain_and_ring` for any transform: total-flux change of ``t`` and back (the inverse), lowest
    one-way value of the noiseless field below the sky in units of the noise."""
    there = warp(img, t, img.shape).data
    back = warp(there, np.linalg.inv(t), img.shape).data
    inner = (slice(20, -20), slice(20, -20))
    bg = 500.0 / 65535.0
    gain = float(np.sum(back[inner] - bg)) / float(np.sum(img[inner] - bg)) - 1.0
    one_way = warp(clean, t, clean.shape).data
    ring = float(np.nanmin(one_way[inner] - bg)) / (3.0 / 65535.0)
    return gain, ring


@pytest.mark.parametrize("fwhm", [2.0, 3.0, 5.0])
@pytest.mark.parametrize(("deg", "scale"), [(0.01, 1.0), (0.5, 1.0), (-0.2, 1.005), (0.3, 0.995), (180.0, 1.0), (180.4, 1.0)])
def test_two_pass_flux_and_ringing(fwhm: float, deg: float, scale: float) -> None:
    """Star field with noise, there and back through the two-pass path: total flux kept to 0.1 %; the
    noiseless field one way dips nowhere below the sky by 1 sigma (the local bound over the sheared 4x4)."""
    img, _ = _field(seed=2, noise=3.0, fwhm=fwhm)
    clean, _ = _field(seed=2, noise=0.0, fwhm=fwhm)
    # the field's stars sit >= 30 px from the edges: a 0.5-deg turn about the centre keeps them inside
    gain, ring = _gain_and_ring_t(img, clean, _centred(deg, scale, img.shape, 0.37, -0.61))
    assert abs(gain) < 1e-3
    assert ring > -1.0


@pytest.mark.parametrize("fwhm", [2.0, 5.0])
@pytest.mark.parametrize(("deg", "scale"), [(0.05, 1.0), (0.5, 1.0), (180.2, 1.005)])
def test_two_pass_local_bound_removes_ringing_of_sharp_features(fwhm: float, deg: float, scale: float) -> None:
    """Hot pixels and saturated cores: unclamped the two-pass path rings by hundreds of sigma as the 2-D
    kernel does; with the bound not below -1 sigma."""
    from stackwatch.engine.resample import _two_pass_applies, invert_transform

    img, clean = _sharp_field(fwhm)
    t = _centred(deg, scale, img.shape, 0.37, -0.61)
    assert _two_pass_applies(invert_transform(t))
    inner = (slice(20, -20), slice(20, -20))
    bg, sigma = 500.0 / 65535.0, 3.0 / 65535.0
    assert float(np.nanmin(warp(clean, t, clean.shape, clamp=0.0).data[inner]) - bg) / sigma < -100.0
    assert float(np.nanmin(warp(clean, t, clean.shape).data[inner]) - bg) / sigma > -1.0


def test_two_pass_nan_and_edges() -> None:
    """NaN in the source: the footprint equals the 2-D kernel's; a pixel whose taps meet the NaN takes
    the bilinear value of its finite central 2x2 (as the 2-D kernel's), every other pixel the two-pass
    sum; outside the source (beyond half a pixel from the outer centres) NaN, and only there."""
    from stackwatch.engine.resample import _bilinear_at, invert_transform

    img = _blobs(shape=(90, 110))
    img[40, 50] = np.nan
    img[0, 30] = np.nan
    img[60:62, 20:22] = np.nan  # a 2x2 hole: the pixels whose central 2x2 is all NaN stay NaN
    rgb = np.stack([img, 2.0 * img])
    for deg, scale in ((0.3, 1.0), (180.1, 1.002)):
        t = _centred(deg, scale, img.shape, 3.6, -2.2)
        new = warp(rgb, t, rgb.shape)
        _ref, foot, _vf = _two_d(rgb, t)
        assert np.array_equal(new.footprint, foot)
        assert np.array_equal(new.footprint, np.isfinite(new.data).all(axis=0))
        inv = invert_transform(t)
        nanmask = np.isnan(img)
        near = np.zeros_like(nanmask)
        for y, x in zip(*np.nonzero(nanmask)):
            near[max(0, y - 4):y + 5, max(0, x - 4):x + 5] = True
        for y in range(img.shape[0]):
            for x in range(img.shape[1]):
                u = inv[0, 0] * x + (inv[0, 1] * y + inv[0, 2])
                v = inv[1, 0] * x + (inv[1, 1] * y + inv[1, 2])
                inside = -0.5 <= u <= img.shape[1] - 0.5 and -0.5 <= v <= img.shape[0] - 0.5
                if not inside:
                    assert np.isnan(new.data[:, y, x]).all()
                    continue
                iu, iv = math.floor(u), math.floor(v)
                if not near[min(max(iv, 0), img.shape[0] - 1), min(max(iu, 0), img.shape[1] - 1)]:
                    continue
                for c in range(2):
                    got = float(new.data[c, y, x])
                    # the two-pass sum where its taps missed the NaN, else the bilinear fallback (NaN if none finite)
                    two_pass = _naive_two_pass(rgb[c].astype(np.float64), t, x, y, True)
                    expect = two_pass if math.isfinite(two_pass) else float(_bilinear_at(rgb, c, u, v))
                    assert got == pytest.approx(expect, rel=1e-6, nan_ok=True)


def test_two_pass_colour_equals_per_plane_and_variance_matches_noise() -> None:
    img, _ = _field(seed=3, shape=(120, 140))
    rgb = np.stack([img, img * 0.7 + 0.01, img * 1.3])
    t = _centred(0.4, 1.002, img.shape, 3.3, 1.7)
    out = warp(rgb, t, rgb.shape)
    for c in range(3):
        assert np.array_equal(out.data[c], warp(rgb[c], t, rgb[c].shape).data, equal_nan=True)
    rng = np.random.default_rng(5)
    noise = rng.normal(1.0, 0.01, (300, 300)).astype(np.float32)
    for deg, scale in ((0.3, 1.0), (0.1, 1.004), (180.2, 1.0)):
        w = warp(noise, _centred(deg, scale, noise.shape, 0.5, 0.25), noise.shape, clamp=0.0)
        d = w.data[w.footprint]
        assert (np.var(d) / 0.01**2) == pytest.approx(w.variance_factor, rel=0.05)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_warp_mask_sparse_equals_full_frame_warp(seed: int) -> None:
    """The forward (sparse) mask warp against the inverse-nearest warp of every output pixel, on random
    sparse masks (borders included), rotations up to 180 deg, scales, a homography and other output shapes."""
    from stackwatch.engine import resample

    rng = np.random.default_rng(seed)
    h, w = 97, 131
    mask = np.zeros((h, w), dtype=bool)
    mask[rng.integers(0, h, 40), rng.integers(0, w, 40)] = True
    mask[0, 0] = mask[h - 1, w - 1] = mask[0, w - 1] = True
    mask[50:53, 60:64] = True  # a saturated core
    homography = _centred(0.5, 1.0, (h, w), 1.2, -0.7)
    homography[2, :2] = (2e-5, -1e-5)
    matrices = [_centred(deg, s, (h, w), float(rng.uniform(-5, 5)), float(rng.uniform(-5, 5)))
                for deg, s in ((0.0, 1.0), (0.05, 1.0), (-3.0, 1.01), (37.0, 0.9), (180.0, 1.0), (90.0, 1.3))]
    for matrix in [*matrices, homography, _sim(0.0, 1.0, 0.5, 0.5), _sim(0.0, 1.0, -0.5, -0.5)]:
        for shape in ((h, w), (80, 150)):
            inv = np.ascontiguousarray(resample.invert_transform(matrix))
            for dil in (0, 1, 3):
                full = resample._warp_mask_dense(mask, np.zeros(shape, dtype=bool), inv, dil)
                assert np.array_equal(warp_mask(mask, matrix, shape, dilate_px=dil), full)
    assert not warp_mask(np.zeros((h, w), dtype=bool), matrices[1], (h, w)).any()
    # a dense mask takes the full-frame warp
    dense = rng.random((h, w)) < 0.3
    inv = np.ascontiguousarray(resample.invert_transform(matrices[2]))
    assert np.array_equal(warp_mask(dense, matrices[2], (h, w)), resample._warp_mask_dense(dense, np.zeros((h, w), bool), inv, 1))


def test_true_pixels_finds_every_pixel() -> None:
    from stackwatch.engine.resample import _true_pixels

    rng = np.random.default_rng(3)
    for shape in ((13, 7), (8, 8), (1, 5), (31, 33)):
        m = rng.random(shape) < 0.1
        m[-1, -1] = True
        ys, xs = _true_pixels(np.ascontiguousarray(m))
        ey, ex = np.nonzero(m)
        assert sorted(zip(ys.tolist(), xs.tolist())) == sorted(zip(ey.tolist(), ex.tolist()))
