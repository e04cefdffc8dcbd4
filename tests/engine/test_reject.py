"""Rejection algorithms: parity with the pure-Python references (tests/naive.py), with astropy's
sigma_clip, planted outliers per algorithm, clean-sample rejection rates, the registry and §7.5."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.stats import sigma_clip
from hypothesis import given, settings
from hypothesis import strategies as st
from stackwatch.engine import reject as R
from stackwatch.engine.errors import StackwatchError

from tests import naive

ALGOS = [name for name in R.REJECTIONS]


def _stacks(rng: np.random.Generator, n: int, count: int, outlier_frac: float) -> np.ndarray:
    """Gaussian stacks (level 0.3, sigma 0.01) with a fraction of 5-40 sigma outliers of both signs."""
    v = rng.normal(0.3, 0.01, (n, count))
    k = round(outlier_frac * n)
    for p in range(count):
        idx = rng.choice(n, size=k, replace=False)
        v[idx, p] += rng.choice([-1.0, 1.0], size=k) * rng.uniform(0.05, 0.4, size=k)
    return v.astype(np.float32)


@pytest.mark.parametrize("name", ALGOS)
@pytest.mark.parametrize("n", [3, 4, 7, 12, 25])
def test_matches_naive_reference(name: str, n: int) -> None:
    rng = np.random.default_rng(100 + n)
    count = 60
    cube = _stacks(rng, n, count, 0.2 if n >= 7 else 0.0)
    cube[0, :5] = np.nan  # invalid samples
    cube[:, 7] = cube[0, 7]  # all tied
    params = R.REJECTIONS[name].resolve(None)
    if name == "range":
        params = {"low": 0.28, "high": 0.33}
    codes = R.reject(cube, name=name, params=params)
    differ = 0
    for p in range(count):
        ref = naive.reject([float(x) for x in cube[:, p]], name, params)
        differ += codes[:, p].tolist() != ref
    # the LAD line of linear fit clipping is not unique (a convex set of optimal lines): the kernel's
    # bisection and the brute-force reference may pick different optima; test_lad_fit_is_optimal checks it
    assert differ <= (count // 10 if name == "linear_fit" else 0), (name, n, differ)


def test_lad_fit_is_optimal() -> None:
    rng = np.random.default_rng(5)
    for n in (5, 9, 16, 30):
        for _ in range(20):
            s = np.sort(_stacks(rng, n, 1, 0.2)[:, 0].astype(np.float64))
            _, _, adev = R._lad_fit(s, 0, n, np.empty(n))
            _, _, best = naive.lad_line(s.tolist())
            assert adev == pytest.approx(best, rel=1e-6, abs=1e-12)


def test_signature_and_mask_convention() -> None:
    values = np.array([0.30, 0.31, np.nan, 0.29, 0.30, 5.0, 0.30, 0.31, 0.29, 0.30], dtype=np.float32)
    weights = np.ones(10, dtype=np.float32)
    mask = np.zeros(10, dtype=np.uint8)
    mask[8] = R.INVALID  # excluded by the caller (e.g. saturated)
    work = np.empty((R.WORK_ROWS, 10))
    params = R.REJECTIONS["winsorized"].pack(None)
    kept = R.reject_winsorized(values, weights, params, mask, work)
    assert mask[2] == R.INVALID and mask[8] == R.INVALID
    assert mask[5] == R.HIGH
    assert kept == int((mask == R.KEEP).sum()) == 7


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigma_clip_mirrors_astropy(seed: int) -> None:
    """Astropy mode (median centre, std ddof 0, maxiters 5, no minimum n) agrees mask for mask."""
    rng = np.random.default_rng(seed)
    n, count = 20, 3000
    cube = _stacks(rng, n, count, 0.1).astype(np.float64)
    cube[3, ::7] = np.nan
    ours = R.reject(cube, name="sigma", params={"kappa_low": 3, "kappa_high": 3, "ddof": 0, "max_iterations": 5, "min_n": 0})
    ref = sigma_clip(cube, sigma=3, maxiters=5, cenfunc="median", stdfunc="std", axis=0, masked=True).mask
    assert np.array_equal(ours != R.KEEP, ref)
    # asymmetric kappas and mean centre
    ours = R.reject(
        cube,
        name="sigma",
        params={"kappa_low": 2.5, "kappa_high": 2.0, "ddof": 0, "max_iterations": 3, "min_n": 0, "center_mean": 1},
    )
    ref = sigma_clip(cube, sigma_lower=2.5, sigma_upper=2.0, maxiters=3, cenfunc="mean", stdfunc="std", axis=0).mask
    assert np.array_equal(ours != R.KEEP, ref)


PLANTED = {
    # name: (n, params)
    "minmax": (8, None),
    "percentile": (5, None),
    "sigma": (20, None),
    "winsorized": (10, None),
    "averaged_sigma": (12, None),
    "linear_fit": (25, None),
    "esd": (25, None),
    "mad": (12, None),
}


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_planted_outliers(name: str) -> None:
    """Hand-built stack: flat level 0.3, noise 0.003, one bright (trail) and one dark outlier."""
    n, params = PLANTED[name]
    rng = np.random.default_rng(7)
    base = (0.3 + rng.normal(0.0, 0.003, n)).astype(np.float32)
    base[2] = 0.6  # satellite trail, 100 sigma
    base[n - 2] = 0.2  # dark outlier, 33 sigma
    codes = R.reject(base, name=name, params=params)
    assert codes[2] == R.HIGH, codes
    if name != "averaged_sigma":  # its k^2 includes the outliers once; low side is conservative at kappa 4
        assert codes[n - 2] == R.LOW, codes
    others = np.delete(codes, [2, n - 2])
    if name == "minmax":
        assert (others == R.KEEP).all()
    else:
        assert (others != R.KEEP).sum() <= 1


def test_averaged_sigma_poisson_stack() -> None:
    """Averaged sigma on raw-like data where variance is proportional to the level."""
    rng = np.random.default_rng(3)
    level = 0.2
    k = 0.0005  # sigma^2 = k*level
    v = rng.normal(level, np.sqrt(k * level), (12, 500)).astype(np.float32)
    v[4] += 0.3
    codes = R.reject(v, name="averaged_sigma")
    assert (codes[4] == R.HIGH).mean() > 0.99
    assert (np.delete(codes, 4, axis=0) != R.KEEP).mean() < 0.01


@pytest.mark.parametrize(
    ("name", "n", "max_rate"),
    [("winsorized", 30, 0.006), ("esd", 50, 0.004), ("sigma", 50, 0.004), ("linear_fit", 30, 0.008)],
)
def test_clean_rejection_rate_and_recall(name: str, n: int, max_rate: float) -> None:
    rng = np.random.default_rng(11)
    clean = rng.normal(0.3, 0.01, (n, 4000)).astype(np.float32)
    rate = float((R.reject(clean, name=name) != R.KEEP).mean())
    assert rate < max_rate, rate
    dirty = clean.copy()
    dirty[0] += 0.1 + 0.1 * rng.random(4000).astype(np.float32)  # >= 10 sigma
    codes = R.reject(dirty, name=name)
    assert (codes[0] == R.HIGH).mean() >= 0.99


def test_esd_critical_values_match_reference_text() -> None:
    table = R.esd_critical_values(100, 30, 0.05)
    for n, lam in [(10, 2.290), (20, 2.708), (30, 2.908), (50, 3.128), (100, 3.384)]:
        assert table[n, 1] == pytest.approx(lam, abs=6e-4)
        assert table[n, 1] == pytest.approx(naive.esd_lambda(n, 1, 0.05), rel=1e-12)


def test_registry_and_params() -> None:
    assert set(R.REJECTIONS) >= {
        "none", "minmax", "percentile", "sigma", "winsorized", "averaged_sigma", "linear_fit", "esd", "mad",
    }
    codes = sorted(r.code for r in R.REJECTIONS.values())
    assert codes == list(range(len(codes)))
    with pytest.raises(StackwatchError, match="unknown parameter 'kappa'"):
        R.REJECTIONS["winsorized"].pack({"kappa": 3})
    with pytest.raises(StackwatchError, match="unknown rejection algorithm 'foo'"):
        R.reject(np.zeros((3, 2)), name="foo")


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, "none"), (2, "none"), (3, "percentile"), (5, "percentile"), (6, "winsorized"), (24, "winsorized"), (25, "esd")],
)
def test_auto_rejection(n: int, expected: str) -> None:
    name, params = R.auto_rejection(n)
    assert name == expected
    R.REJECTIONS[name].pack(params, n_max=n)  # the parameters are valid names
    assert R.auto_rejection(30, normalization="global")[0] == "linear_fit"
    assert R.auto_rejection(10, raw=True)[0] == "averaged_sigma"


def test_edge_cases() -> None:
    # all NaN, one sample, two samples: nothing rejected, invalid marked
    for vals in ([np.nan, np.nan], [0.5], [0.5, 0.52], [np.nan, 0.5, 0.52]):
        for name in ALGOS:
            codes = R.reject(np.array(vals, dtype=np.float32), name=name, params={"low": -1, "high": 2} if name == "range" else None)
            assert all(c in (R.KEEP, R.INVALID) for c in codes)
            assert [c == R.INVALID for c in codes] == [not np.isfinite(v) for v in vals]
    # percentile needs a positive median
    codes = R.reject(np.array([-0.1, -0.1, -0.1, 5.0], np.float32), name="percentile")
    assert (codes == R.KEEP).all()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 40),
    name=st.sampled_from([a for a in ALGOS if a != "range"]),
)
def test_properties_permutation_and_scale(seed: int, n: int, name: str) -> None:
    """Codes follow the samples under a permutation (no ties) and do not change when every value is
    doubled (exact in floating point); kept count + rejected + invalid = n."""
    rng = np.random.default_rng(seed)
    v = _stacks(rng, n, 1, 0.2 if n >= 5 else 0.0)[:, 0]
    v[rng.random(n) < 0.1] = np.nan
    codes = R.reject(v, name=name)
    perm = rng.permutation(n)
    assert np.array_equal(R.reject(v[perm], name=name), codes[perm])
    assert np.array_equal(R.reject(v * np.float32(2.0), name=name), codes)
    assert np.array_equal(codes == R.INVALID, ~np.isfinite(v))


@pytest.mark.parametrize(
    ("name", "max_fp"),
    [("winsorized", 0.006), ("esd", 0.002), ("mad", 0.02), ("percentile", 0.003), ("sigma", 0.002)],
)
@pytest.mark.parametrize("n", [30, 100, 300])
@pytest.mark.parametrize("frac", [0.0, 0.02, 0.1])
def test_rate_and_recall_sweep(name: str, max_fp: float, n: int, frac: float) -> None:
    """§7.3 test: Gaussian stacks with 0/2/10 % outliers of 10-30 sigma (both signs): clean-sample
    rejection rate within the bound for the algorithm, recall >= 99 % (sigma clipping, whose std
    includes the outliers, only at 2 % or for n >= 100)."""
    rng = np.random.default_rng(n + int(frac * 100))
    m = 600 if n < 300 else 200
    v = rng.normal(0.3, 0.01, (n, m))
    k = round(frac * n)
    out = np.zeros((n, m), bool)
    for p in range(m):
        idx = rng.choice(n, size=k, replace=False)
        out[idx, p] = True
        v[idx, p] += rng.choice([-1.0, 1.0], size=k) * rng.uniform(0.1, 0.3, size=k)
    codes = R.reject(v.astype(np.float32), name=name)
    assert float((codes[~out] != R.KEEP).mean()) < max_fp
    if out.any() and not (name == "sigma" and frac > 0.05 and n < 100):
        assert float((codes[out] != R.KEEP).mean()) >= 0.99


def _floor(sigma: float, *, eps: float = 0.2, background: float = 0.0) -> list[float]:
    return [sigma**2, 0.0, eps * eps, background, 4.0, 3.0]


@pytest.mark.parametrize("name", ["winsorized", "sigma", "mad", "esd", "linear_fit"])
@pytest.mark.parametrize("n", [6, 10, 24])
def test_noise_floor_restores_the_expected_clean_rate(name: str, n: int) -> None:
    """With few frames the sample σ is often far below the true one. Measured without the floor
    (winsorized): 0.9 % of clean samples rejected at n = 6, 0.5 % at n = 10, where one-sided 3σ
    gives 0.13 %. A floor at the true σ brings every σ-based rejector to ≤ 0.2 %, and ≥ 10σ
    outliers are still all caught."""
    if (name == "linear_fit" and n < 15) or (name == "esd" and n < 10) or (name == "sigma" and n < 24):
        pytest.skip("below the algorithm's minimum (§7.3: sigma clipping needs n ≥ 10 and more to catch one outlier)")
    rng = np.random.default_rng(n)
    sigma = 0.01
    clean = rng.normal(0.3, sigma, (n, 20000)).astype(np.float32)
    floor = _floor(sigma, background=0.3)
    rate = float((R.reject(clean, name=name, noise_floor=floor) != R.KEEP).mean())
    assert rate < (0.003 if name == "mad" else 0.002), rate  # MAD clips both sides at 3σ: 0.27 %
    if name == "winsorized":
        without = float((R.reject(clean, name=name) != R.KEEP).mean())
        assert without > 2 * rate, (without, rate)
    dirty = clean.copy()
    dirty[0] += 0.1 + 0.1 * rng.random(clean.shape[1]).astype(np.float32)
    assert ((R.reject(dirty, name=name, noise_floor=floor)[0]) == R.HIGH).mean() >= 0.99


@pytest.mark.parametrize("name", ["winsorized", "percentile", "esd"])
def test_noise_floor_keeps_star_cores_under_changing_seeing(name: str) -> None:
    """A bright star core whose peak changes with seeing (FWHM 2.7-3.3 px: peak ×0.83-1.23) is
    signal, not an outlier: with the floor's ε·signal term none of it is rejected, while a trail on
    the sky beside it still is. PI's rejectors (no floor) reject some of these cores when the
    sample σ happens to be small (printed). Measured with FWHM 2.5-3.5 px (peak ×0.73-1.44): kept
    with / without the floor: winsorized (n 8) 99.78 % / 97.98 %, percentile (n 5) 99.25 % / 65.1 %,
    ESD (n 30) 100 % / 99.79 %."""
    rng = np.random.default_rng(5)
    n = {"winsorized": 8, "percentile": 5, "esd": 30}[name]
    sky, sigma, peak = 0.1, 0.002, 1.0
    fwhm = rng.uniform(2.7, 3.3, (n, 3000))
    core = sky + peak * (3.0 / fwhm) ** 2 + rng.normal(0, sigma, (n, 3000))  # peak ∝ 1/FWHM² at fixed flux
    floor = _floor(sigma, background=sky)
    kept_floor = (R.reject(core.astype(np.float32), name=name, noise_floor=floor) == R.KEEP).mean()
    kept_pi = (R.reject(core.astype(np.float32), name=name) == R.KEEP).mean()
    print(f"{name}: core samples kept with the floor {kept_floor:.4f}, without {kept_pi:.4f}")
    assert kept_floor == 1.0, kept_floor
    sky_px = rng.normal(sky, sigma, (n, 3000))
    sky_px[0] += 0.05  # 25σ trail
    codes = R.reject(sky_px.astype(np.float32), name=name, noise_floor=floor)
    assert (codes[0] == R.HIGH).mean() >= 0.99


def test_noise_floor_validation_and_off_is_identity() -> None:
    rng = np.random.default_rng(1)
    v = rng.normal(0.3, 0.01, (10, 500)).astype(np.float32)
    assert np.array_equal(R.reject(v, name="winsorized", noise_floor=R.NO_FLOOR), R.reject(v, name="winsorized"))
    with pytest.raises(StackwatchError, match="noise_floor"):
        R.reject(v, name="winsorized", noise_floor=[1.0, 2.0])
