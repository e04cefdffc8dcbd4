"""Robust statistics and noise: against numpy/astropy, the B3 starlet against a direct convolution,
and the MRS noise estimator against known Gaussian noise under stars and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.stats import biweight_midvariance as apy_bwmv
from astropy.stats import mad_std
from stackwatch.engine import stats

from tests import naive


@pytest.mark.parametrize("data", [
    [1.0], [1.0, 2.0], [3.0, 3.0, 3.0, 7.0], [np.nan, 1.0, 5.0, 2.0], list(np.random.default_rng(0).normal(2, 3, 1001)),
])
def test_location_scale_against_numpy_astropy(data: list[float]) -> None:
    a = np.array(data)
    m, s = stats.robust_location_scale(a)
    assert m == pytest.approx(float(np.nanmedian(a)), rel=1e-12)
    assert s == pytest.approx(float(mad_std(a, ignore_nan=True)), rel=1e-6)
    assert stats.sigma_mad(a) == s


def test_all_nan_and_empty() -> None:
    assert math.isnan(stats.sigma_mad(np.array([np.nan, np.nan])))
    assert all(math.isnan(v) for v in stats.robust_location_scale(np.array([])))
    assert math.isnan(stats.biweight_midvariance(np.array([np.nan])))
    assert all(math.isnan(v) for v in stats.iks_location_scale(np.array([2.0, -1.0])))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_biweight_against_astropy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.2, 0.01, 500)
    x[:20] = rng.uniform(0.5, 1.0, 20)
    x[5] = np.nan
    ours = stats.biweight_midvariance(x)
    ref = float(apy_bwmv(x, ignore_nan=True))
    assert ours == pytest.approx(ref, rel=1e-10)
    # ties and a constant sample
    ties = np.round(x[np.isfinite(x)], 3)
    assert stats.biweight_midvariance(ties) == pytest.approx(float(apy_bwmv(ties)), rel=1e-10)
    assert stats.biweight_midvariance(np.full(10, 0.3)) == 0.0


def test_iks_location_scale_gaussian_with_outliers() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(0.25, 0.01, 50000)
    x[:2000] = rng.uniform(0.3, 0.99, 2000)  # stars / nebula
    loc, scale = stats.iks_location_scale(x)
    assert loc == pytest.approx(0.25, abs=1e-3)
    # 0.991 * sqrt(BWMV) of a clipped Gaussian: within a few percent of sigma
    assert scale == pytest.approx(0.01, rel=0.05)


def test_starlet_matches_direct_convolution() -> None:
    rng = np.random.default_rng(2)
    img = rng.normal(0, 1, (13, 17))
    ws, cj = stats.starlet_transform(img, layers=3)
    ref = img.tolist()
    cur = ref
    for j in range(3):
        nxt = naive.starlet_smooth(cur, 1 << j)
        wj = np.array(cur) - np.array(nxt)
        np.testing.assert_allclose(ws[j], wj, atol=1e-12)
        cur = nxt
    np.testing.assert_allclose(cj, np.array(cur), atol=1e-12)
    np.testing.assert_allclose(sum(ws) + cj, img, atol=1e-12)
    w1 = stats.starlet_layer1(img.astype(np.float32))
    np.testing.assert_allclose(w1, ws[0], atol=1e-6)


def test_layer_noise_constants() -> None:
    """Monte Carlo check of the starlet layer noise of unit white noise (§1.2 table)."""
    rng = np.random.default_rng(8)
    ws, _ = stats.starlet_transform(rng.normal(0, 1, (512, 512)), layers=3)
    for j in range(3):
        assert float(np.std(ws[j][32:-32, 32:-32])) == pytest.approx(stats.MRS_LAYER_NOISE[j], rel=0.03)


def _sky(rng: np.random.Generator, h: int, w: int, sigma: float, stars: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = 0.1 + 0.05 * xx / w + 0.04 * (yy / h) ** 2 + 0.01 * np.sin(xx / 90.0)
    for _ in range(stars):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        amp = rng.uniform(5 * sigma, 0.6)
        s = rng.uniform(0.8, 2.5)
        r2 = (xx - x) ** 2 + (yy - y) ** 2
        img += amp * np.exp(-r2 / (2 * s * s))
    return img + rng.normal(0, sigma, (h, w))


@pytest.mark.parametrize(("sigma", "seed"), [(0.002, 0), (0.005, 1), (0.01, 2), (0.0008, 3)])
def test_mrs_noise_known_sigma(sigma: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    img = _sky(rng, 480, 600, sigma, 250).astype(np.float32)
    est = stats.mrs_noise(img)
    assert est.method == "MRS"
    assert abs(est.sigma / sigma - 1) < 0.01, est
    # the simple std is far off (stars, gradient): the test can fail
    assert float(np.std(img)) > 2 * sigma


def test_mrs_noise_nan_mask_and_window() -> None:
    rng = np.random.default_rng(5)
    sigma = 0.003
    img = _sky(rng, 400, 500, sigma, 150).astype(np.float32)
    img[:40, :] = np.nan  # outside the footprint
    sat = np.zeros(img.shape, bool)
    sat[200:210, 200:260] = True
    img[sat] = 1.0
    est = stats.mrs_noise(img, mask=sat)
    assert abs(est.sigma / sigma - 1) < 0.015, est
    win = stats.mrs_noise(img, mask=sat, window_px=256)
    assert abs(win.sigma / sigma - 1) < 0.03, win


def test_mrs_noise_fallback_and_degenerate() -> None:
    flat = np.full((64, 64), 0.2, np.float32)
    est = stats.mrs_noise(flat)
    assert est.sigma == 0.0 or math.isnan(est.sigma) or est.method == "KSIGMA"
    tiny = np.full((3, 3), np.nan, np.float32)
    assert math.isnan(stats.mrs_noise(tiny).sigma)


def _mrs_numpy(img: np.ndarray, layers: int, sigma0: float) -> tuple[float, float]:
    """§1.2 step 4 written out in numpy on stats.starlet_transform: (sigma / 0.974, noise-set fraction)."""
    ws, c_j = stats.starlet_transform(img, layers=layers)
    resid = img.astype(np.float64) - c_j
    sigma = sigma0
    for _ in range(17):
        support = np.zeros(img.shape, bool)
        for j, w in enumerate(ws):
            support |= np.abs(w) > 3.0 * sigma * stats.MRS_LAYER_NOISE[j]
        r = resid[~support]
        new = float(np.std(r, ddof=1))
        change = abs(new - sigma) / sigma
        sigma = new
        if change < 1e-4:
            break
    return sigma / 0.974, r.size / img.size


def test_mrs_noise_matches_numpy_support_iteration() -> None:
    # the fused nogil estimate (one numba call) against the algorithm written out in numpy (float64 planes)
    rng = np.random.default_rng(11)
    img = _sky(rng, 300, 360, 0.004, 120).astype(np.float32)
    est = stats.mrs_noise(img)
    assert est.method == "MRS" and est.layers == 4
    sigma0 = stats.ksigma_noise(stats.starlet_layer1(img)) / stats.MRS_LAYER_NOISE[0]
    ref_sigma, ref_fraction = _mrs_numpy(img, 4, sigma0)
    assert est.sigma == pytest.approx(ref_sigma, rel=1e-4)
    assert est.fraction == pytest.approx(ref_fraction, abs=1e-3)


def test_mrs_noise_layer_retry_and_ksigma_fallback() -> None:
    rng = np.random.default_rng(12)
    img = _sky(rng, 200, 240, 0.004, 60).astype(np.float32)
    full = stats.mrs_noise(img)
    # a noise set of >= 99.9 % is never reached: J = 4, 3, 2 all refused, the k-sigma start value remains
    ks = stats.mrs_noise(img, min_fraction=0.999)
    assert ks.method == "KSIGMA" and ks.layers == 0
    assert ks.sigma == pytest.approx(stats.ksigma_noise(stats.starlet_layer1(img)) / stats.MRS_LAYER_NOISE[0],
                                     rel=1e-6)
    # J = 2 on request (layers=2 is the last retry of the fallback chain)
    two = stats.mrs_noise(img, layers=2)
    assert two.layers == 2 and two.method == "MRS"
    assert two.sigma != full.sigma and abs(two.sigma / full.sigma - 1) < 0.05


def test_ksigma_noise_of_first_layer() -> None:
    rng = np.random.default_rng(9)
    img = rng.normal(0.2, 0.01, (300, 300))
    img[100:110, 100:110] += 0.5
    w1 = stats.starlet_layer1(img)
    assert stats.ksigma_noise(w1) / stats.MRS_LAYER_NOISE[0] == pytest.approx(0.01, rel=0.03)


def test_cfa_noise_per_channel() -> None:
    rng = np.random.default_rng(6)
    h, w = 400, 480
    sig = {"R": 0.004, "G": 0.002, "B": 0.006}
    img = np.empty((h, w), np.float32)
    pattern = "GRBG"
    for k, colour in enumerate(pattern):
        dy, dx = divmod(k, 2)
        img[dy::2, dx::2] = rng.normal(0.1 + 0.05 * k, sig[colour], (h // 2, w // 2))
    out = stats.cfa_noise(img, pattern)
    for colour, s in sig.items():
        assert out[colour] == pytest.approx(s, rel=0.02)
    with pytest.raises(ValueError, match="unknown Bayer pattern"):
        stats.cfa_noise(img, "RGBX")


@pytest.mark.slow
def test_mrs_noise_26mp_full_and_central_window() -> None:
    """Full 26 MP frame vs the live path's central 2048^2 window: both within 1 % of the truth."""
    from tests.conftest import slow_count

    for seed in range(slow_count(2)):
        rng = np.random.default_rng(seed)
        h, w, sigma = 4176, 6248, 0.003
        img = (0.1 + 0.02 * np.linspace(0, 1, w, dtype=np.float32)[None, :]
               + rng.standard_normal((h, w), dtype=np.float32) * np.float32(sigma))
        for window in (None, 2048):
            est = stats.mrs_noise(img, window_px=window)
            assert abs(est.sigma / sigma - 1) < 0.01, (window, est)


def test_mrs_noise_background_near_zero() -> None:
    """Bias-subtracted dark background (mean 0): negatives are data, sigma is not biased low."""
    rng = np.random.default_rng(12)
    sigma = 0.002
    img = _sky(rng, 400, 500, sigma, 100)
    yy, xx = np.mgrid[0:400, 0:500]
    img -= 0.1 + 0.05 * xx / 500 + 0.04 * (yy / 400) ** 2 + 0.01 * np.sin(xx / 90.0)
    img = img.astype(np.float32)  # stars on a zero background
    est = stats.mrs_noise(img)
    assert abs(est.sigma / sigma - 1) < 0.01, est
    pcl = stats.mrs_noise(img, valid_range=(2e-5, 0.99998))  # PCL's rule drops the negative half
    assert pcl.sigma < 0.9 * sigma, pcl


def test_sn_qn_scales() -> None:
    rng = np.random.default_rng(13)
    for n in (3, 8, 25):
        x = rng.normal(0, 1, n)
        assert stats.sn_scale(x) == pytest.approx(naive.sn(sorted(x.tolist())), rel=1e-12)
    big = rng.normal(5.0, 2.0, 3000)
    assert stats.sn_scale(big) == pytest.approx(2.0, rel=0.05)
    assert stats.qn_scale(big) == pytest.approx(2.0, rel=0.05)
    big[:300] = 100.0  # 10 % gross one-sided outliers: bounded bias (like the MAD), std is useless
    assert 2.0 < stats.sn_scale(big) < 2.5 and 2.0 < stats.qn_scale(big) < 2.5
    assert float(np.std(big)) > 10
    assert math.isnan(stats.qn_scale(np.array([1.0]))) and math.isnan(stats.sn_scale(np.array([np.nan])))
