"""Band integrator: against numpy and the pure-Python reference, band-height invariance, weights,
NaN/coverage rules, colour, .npy sources, large-scale rejection of trails, ccdproc.combine parity."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from stackwatch.engine import integrate as I
from stackwatch.engine import reject as R
from stackwatch.engine.errors import StackwatchError

from tests import naive


def _frames(rng: np.random.Generator, n: int, h: int = 48, w: int = 64, sigma: float = 0.01) -> list[np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    sky = 0.2 + 0.05 * np.exp(-((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / 50.0)
    return [(sky + rng.normal(0, sigma, (h, w))).astype(np.float32) for _ in range(n)]


def test_no_rejection_equals_weighted_nanmean() -> None:
    rng = np.random.default_rng(0)
    fr = _frames(rng, 9)
    fr[2][5, 5] = np.nan
    fr[4][:, :3] = np.nan
    w = rng.uniform(0.5, 2.0, 9)
    res = I.integrate(fr, weights=w, rejection="none")
    cube = np.stack(fr).astype(np.float64)
    ok = np.isfinite(cube)
    ref = np.nansum(cube * w[:, None, None], 0) / np.sum(ok * w[:, None, None], 0)
    np.testing.assert_allclose(res.image, ref, rtol=2e-7)
    assert res.image.dtype == np.float32
    assert res.coverage[5, 5] == 8 and res.coverage[0, 0] == 8 and res.coverage[10, 10] == 9
    np.testing.assert_allclose(res.weight_sum, np.sum(ok * w[:, None, None], 0), rtol=1e-6)
    assert res.rej_low.sum() == 0 and res.rej_high.sum() == 0


@pytest.mark.parametrize(("name", "n"), [("winsorized", 10), ("esd", 26), ("percentile", 4), ("linear_fit", 16)])
def test_matches_pure_python_reference(name: str, n: int) -> None:
    rng = np.random.default_rng(1)
    fr = _frames(rng, n, h=12, w=14)
    fr[1][3:5, :] += 0.3  # trail
    fr[0][7, 7] = np.nan
    w = rng.uniform(0.5, 2.0, n)
    res = I.integrate(fr, weights=w, rejection=name, band_rows=5)
    params = R.REJECTIONS[name].resolve(None)
    cube = np.stack(fr)
    worst = 0.0
    mismatched = 0
    for y in range(12):
        for x in range(14):
            vals = [float(v) for v in cube[:, y, x]]
            codes = naive.reject(vals, name, params)
            ref = naive.combine(vals, list(w), codes, use_median=False)
            mismatched += codes.count(naive.LOW) != res.rej_low[y, x] or codes.count(naive.HIGH) != res.rej_high[y, x]
            worst = max(worst, abs(ref - float(res.image[y, x])) / abs(ref))
    allowed = 3 if name == "linear_fit" else 0  # non-unique LAD optimum, see test_reject
    assert mismatched <= allowed
    if mismatched == 0:
        assert worst < 1e-6


@pytest.mark.parametrize("rejection", ["winsorized", "esd", "sigma", "minmax", "mad"])
@pytest.mark.parametrize("combination", ["mean", "median"])
def test_band_height_invariance(rejection: str, combination: str) -> None:
    rng = np.random.default_rng(2)
    fr = _frames(rng, 26, h=37, w=29)
    fr[3][10:12] += 0.5
    fr[7][:, 4] = np.nan
    w = rng.uniform(0.5, 2.0, 26)
    results = [
        I.integrate(fr, weights=w, rejection=rejection, combination=combination, band_rows=h, prefetch=h % 2 == 0)
        for h in (1, 5, 16, 37)
    ]
    for r in results[1:]:
        for field in ("image", "rej_low", "rej_high", "coverage", "weight_sum"):
            assert np.array_equal(getattr(r, field), getattr(results[0], field), equal_nan=True), field


def test_budget_sets_band_rows() -> None:
    assert I.band_rows_for(100, 6248, 4176, budget_bytes=1 << 30) == 304
    assert I.band_rows_for(300, 6248, 4176, budget_bytes=1 << 30) == 109
    assert I.band_rows_for(3, 100, 50, budget_bytes=1 << 30) == 50
    rng = np.random.default_rng(3)
    res = I.integrate(_frames(rng, 5, h=40, w=30), band_budget_bytes=5 * 30 * 5 * 20, prefetch=False)
    assert res.band_rows == 16
    res = I.integrate(_frames(rng, 5, h=80, w=30), band_budget_bytes=2 * 5 * 30 * 5 * 20)
    assert res.band_rows == 16  # the budget is split between two bands when prefetching


def test_all_rejected_gives_median_and_no_data_gives_nan() -> None:
    fr = [np.full((4, 4), v, np.float32) for v in (0.1, 0.2, 0.9)]
    for f in fr:
        f[0, 0] = np.nan
    res = I.integrate(fr, rejection="range", params={"low": 0.5, "high": 0.05})  # rejects everything
    assert res.image[1, 1] == pytest.approx(0.2)
    assert res.rej_low[1, 1] + res.rej_high[1, 1] == 3
    assert np.isnan(res.image[0, 0]) and res.coverage[0, 0] == 0 and res.weight_sum[0, 0] == 0


def test_colour_per_channel_weights() -> None:
    rng = np.random.default_rng(4)
    mono = _frames(rng, 8, h=20, w=24)
    fr = [np.stack([f, 2 * f, 3 * f]) for f in mono]
    w = rng.uniform(0.5, 2.0, (8, 3))
    res = I.integrate(fr, weights=w, rejection="none")
    assert res.image.shape == (3, 20, 24)
    cube = np.stack(fr).astype(np.float64)
    for c in range(3):
        ref = np.sum(cube[:, c] * w[:, c, None, None], 0) / w[:, c].sum()
        np.testing.assert_allclose(res.image[c], ref, rtol=2e-7)


def test_npy_and_masked_sources(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    fr = _frames(rng, 7, h=30, w=20)
    paths = []
    for i, f in enumerate(fr):
        p = tmp_path / f"f{i}.npy"
        np.save(p, f)
        paths.append(p)
    a = I.integrate([I.NpySource(p) for p in paths], rejection="winsorized", band_rows=7)
    b = I.integrate(fr, rejection="winsorized", band_rows=30)
    assert np.array_equal(a.image, b.image)
    sat = np.zeros((30, 20), bool)
    sat[4, 5] = True
    c = I.integrate([I.MaskedSource(I.NpySource(paths[0]), sat), *[I.NpySource(p) for p in paths[1:]]])
    assert c.coverage[4, 5] == 6 and c.coverage[0, 0] == 7
    with pytest.raises(StackwatchError, match="cannot open frame store file"):
        I.NpySource(tmp_path / "missing.npy")
    cut = tmp_path / "cut.npy"
    cut.write_bytes(paths[0].read_bytes()[:-100])
    with pytest.raises(StackwatchError, match="truncated"):
        I.integrate([I.NpySource(cut), I.NpySource(paths[1])])
    colour = tmp_path / "rgb.npy"
    rgb = np.stack([fr[0], 2 * fr[0], 3 * fr[0]]).astype(">f8")
    np.save(colour, rgb)
    np.testing.assert_array_equal(I.NpySource(colour).read_band(3, 9), rgb[:, 3:9].astype(np.float32))


def test_user_errors() -> None:
    a = np.zeros((4, 4), np.float32)
    with pytest.raises(StackwatchError, match="no frames"):
        I.integrate([])
    with pytest.raises(StackwatchError, match="frame 1 has shape"):
        I.integrate([a, np.zeros((4, 5), np.float32)])
    with pytest.raises(StackwatchError, match="weights must"):
        I.integrate([a, a], weights=[1.0, 0.0])
    with pytest.raises(StackwatchError, match="unknown combination"):
        I.integrate([a, a], combination="sum")
    with pytest.raises(StackwatchError, match="unknown rejection"):
        I.integrate([a, a], rejection="kappa")


def test_auto_rejection_is_recorded() -> None:
    rng = np.random.default_rng(6)
    res = I.integrate(_frames(rng, 4, h=8, w=8), rejection="auto")
    assert res.rejection == "percentile" and res.params == {"p_low": 0.2, "p_high": 0.1}


def _trail(h: int, w: int, x0: float, y0: float, angle: float, width: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.abs((xx - x0) * np.sin(angle) - (yy - y0) * np.cos(angle))
    return np.exp(-0.5 * (d / width) ** 2)


@pytest.mark.parametrize("peak_sigma", [3.0, 5.0, 12.5])
def test_large_scale_rejection_removes_faint_trail(peak_sigma: float) -> None:
    """A trail of a few sigma per pixel: pixel-wise rejection only catches part of its core; large-scale
    rejection (with the 2-sigma hysteresis candidates) grows it into the whole trail."""
    rng = np.random.default_rng(7)
    n, h, w, sigma = 12, 160, 200, 0.01
    fr = [(0.2 + rng.normal(0, sigma, (h, w))).astype(np.float32) for _ in range(n)]
    trail = _trail(h, w, 100, 80, 0.3, 2.5)
    fr[5] = fr[5] + (peak_sigma * sigma * trail).astype(np.float32)
    truth = 0.2
    plain = I.integrate(fr, rejection="winsorized")
    grown = I.integrate(fr, rejection="winsorized", large_scale=True)
    sigma_stack = sigma / np.sqrt(n)
    on = trail > 0.05
    resid_plain = float(np.abs(np.mean(plain.image[on]) - truth))
    resid_grown = float(np.abs(np.mean(grown.image[on]) - truth))
    assert resid_grown < 0.3 * sigma_stack, (resid_plain, resid_grown)
    assert resid_grown < resid_plain
    assert grown.large_scale_pixels[5] > 0
    if peak_sigma == 3.0:  # without the candidates the 3-sigma trail is not found at all
        off = I.integrate(fr, rejection="winsorized", large_scale=True, large_scale_candidate_kappa=0)
        assert off.large_scale_pixels[5] == 0
    # trail-free frames get (almost) no extra rejections
    extra = sum(grown.large_scale_pixels) - grown.large_scale_pixels[5]
    assert extra / (n * h * w) < 1e-4


def test_large_scale_trail_free_field() -> None:
    rng = np.random.default_rng(8)
    fr = [(0.2 + rng.normal(0, 0.01, (120, 150))).astype(np.float32) for _ in range(10)]
    res = I.integrate(fr, rejection="winsorized", large_scale=True)
    assert sum(res.large_scale_pixels) / (10 * 120 * 150) < 1e-5
    base = I.integrate(fr, rejection="winsorized")
    assert np.array_equal(res.image, base.image)


def test_ccdproc_combine_parity() -> None:
    """ccdproc.combine(average, sigma_clip 3/3 around ma.mean with ma.std, one iteration) ==
    our sigma rejection with centre=mean, ddof 0, max_iterations 1, min_n 0 (masters: no weights)."""
    ccdproc = pytest.importorskip("ccdproc")
    from astropy.nddata import CCDData

    rng = np.random.default_rng(9)
    n = 15
    fr = _frames(rng, n, h=40, w=50)
    fr[2][10:13] += 0.2
    fr[6][:, 20] -= 0.1
    ccds = [CCDData(f.astype(np.float64), unit="adu") for f in fr]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ccdproc.combine(
            ccds, method="average", sigma_clip=True, sigma_clip_low_thresh=3, sigma_clip_high_thresh=3,
            sigma_clip_func=np.ma.mean, sigma_clip_dev_func=np.ma.std,
        )
    ours = I.integrate(
        fr, rejection="sigma",
        params={"kappa_low": 3, "kappa_high": 3, "center_mean": 1, "ddof": 0, "max_iterations": 1, "min_n": 0},
    )
    rel = np.abs(ours.image - ref.data) / np.abs(ref.data)
    assert float(rel.max()) < 1e-5
    assert ours.rej_low[:, 20].sum() + ours.rej_high[10:13].sum() > 0  # the clipping did something


def test_large_scale_leaves_stars_with_seeing_changes_alone() -> None:
    """Stars whose FWHM changes 2-4 px between frames (sharp cores are high in the best frames):
    no structure is grown, the image equals plain integration."""
    rng = np.random.default_rng(3)
    h, w, n, sig = 160, 200, 16, 0.003
    yy, xx = np.mgrid[0:h, 0:w]
    stars = [(rng.uniform(5, w - 5), rng.uniform(5, h - 5), rng.uniform(0.01, 0.6)) for _ in range(60)]
    fr = []
    for _ in range(n):
        fwhm = rng.uniform(2.0, 4.0)
        s = fwhm / 2.355
        img = np.full((h, w), 0.1)
        for x, y, a in stars:
            img += a * (2.5 / fwhm) ** 2 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))
        fr.append((img + rng.normal(0, sig, (h, w))).astype(np.float32))
    plain = I.integrate(fr, rejection="winsorized")
    grown = I.integrate(fr, rejection="winsorized", large_scale=True)
    assert sum(grown.large_scale_pixels) == 0
    assert np.array_equal(grown.image, plain.image)


def test_large_scale_grows_compact_bright_blob() -> None:
    """A compact bright blob (aircraft light, meteor head) with faint wings is grown as a whole."""
    rng = np.random.default_rng(10)
    n, h, w, sigma = 12, 100, 120, 0.01
    fr = [(0.2 + rng.normal(0, sigma, (h, w))).astype(np.float32) for _ in range(n)]
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-((xx - 60) ** 2 + (yy - 50) ** 2) / (2 * 4.0**2))
    fr[3] = fr[3] + (0.5 * blob).astype(np.float32)
    grown = I.integrate(fr, rejection="winsorized", large_scale=True)
    assert grown.large_scale_pixels[3] > 100
    wing = (blob > 0.01) & (blob < 0.1)  # 0.5-5 sigma above the sky: mostly not rejected pixel-wise
    plain = I.integrate(fr, rejection="winsorized")
    assert abs(float(np.mean(grown.image[wing])) - 0.2) < abs(float(np.mean(plain.image[wing])) - 0.2)


def test_noise_model_floor_matches_reject_and_interpolates_the_background() -> None:
    """integrate(noise_model=...) uses, per pixel, the mean a and b of the frames with a valid sample
    and the bilinearly interpolated reference background: equal to reject.reject with the same
    floor where those are constant, and band-height invariant."""
    rng = np.random.default_rng(3)
    n, h, w = 8, 40, 56
    frames = _frames(rng, n, h, w, sigma=0.01)
    frames[2][10:12, :] += 0.2  # a trail
    frames[5][20, 30] = np.nan
    a = np.full(n, 0.01**2)
    nm = I.NoiseModel(a=a, b=np.zeros(n), background=0.2, epsilon=0.2)
    res = I.integrate(frames, rejection="winsorized", noise_model=nm)
    codes = R.reject(np.stack(frames), name="winsorized", noise_floor=[1e-4, 0.0, 0.04, 0.2, 4.0, 3.0])
    assert np.array_equal(res.rej_high, (codes == R.HIGH).sum(0))
    assert np.array_equal(res.rej_low, (codes == R.LOW).sum(0))
    assert res.rej_high[10:12].min() >= 1
    # a grid background, per-frame a: invariant under the band height, and a huge floor rejects nothing
    grid = 0.2 + 0.01 * rng.random((3, 4))
    nm2 = I.NoiseModel(a=np.linspace(0.5, 1.5, n) * 1e-4, b=np.full(n, 1e-3), background=grid, background_step_px=20)
    r1 = I.integrate(frames, rejection="winsorized", noise_model=nm2, band_rows=7)
    r2 = I.integrate(frames, rejection="winsorized", noise_model=nm2)
    assert np.array_equal(r1.image, r2.image, equal_nan=True)
    huge = I.NoiseModel(a=np.ones(n), b=np.zeros(n))
    assert int(I.integrate(frames, rejection="winsorized", noise_model=huge).rej_high.sum()) == 0
    with pytest.raises(StackwatchError, match="noise model"):
        I.integrate(frames, noise_model=I.NoiseModel(a=np.ones(n - 1), b=np.zeros(n - 1)))


@pytest.mark.parametrize("rejection", ["percentile", "sigma", "winsorized", "esd"])
@pytest.mark.parametrize("n", [3, 6, 12])
def test_quiet_pixel_shortcut_changes_nothing(monkeypatch: pytest.MonkeyPatch, rejection: str, n: int) -> None:
    """Pixels whose samples all lie within κ·σ_floor of each other skip the rejector: the products
    are those of running it everywhere, to the bit, with outliers, stars (the floor's ε·s and b·s
    terms), NaN, a background grid, pre-rejections (large-scale pass 2) and several bands."""
    rng = np.random.default_rng(n)
    h, w = 40, 56
    frames = _frames(rng, n, h, w, sigma=0.01)
    yy, xx = np.mgrid[0:h, 0:w]
    star = 2.0 * np.exp(-((xx - 20) ** 2 + (yy - 15) ** 2) / 4.0)
    for i, f in enumerate(frames):
        f += (star * rng.uniform(0.8, 1.2)).astype(np.float32)  # seeing: the core varies by +-20 %
        f.ravel()[rng.integers(0, h * w, 30)] += rng.uniform(0.02, 0.5, 30).astype(np.float32)
        if i == 1:
            f[12:14, :] += 0.1  # a trail
            f[30, 40] = np.nan
    grid = 0.2 + 0.01 * rng.random((3, 4))
    nm = I.NoiseModel(a=np.linspace(0.8, 1.2, n) * 1e-4, b=np.full(n, 2e-3), background=grid,
                      background_step_px=20, epsilon=0.2)
    out = {}
    for quiet in (True, False):
        monkeypatch.setattr(I, "_QUIET_SHORTCUT", quiet)
        out[quiet] = I.integrate(frames, rejection=rejection, noise_model=nm, band_rows=9, large_scale=True)
    a, b = out[True], out[False]
    assert np.array_equal(a.image, b.image, equal_nan=True)
    for field in ("rej_low", "rej_high", "coverage", "weight_sum"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    # something to reject, and rejected (sigma clipping around the sample σ cannot reach 3σ with one
    # outlier among n <= 10 samples: its largest z is (n - 1)/√n)
    assert int(b.rej_high.sum()) > 0 or (rejection == "sigma" and n < 12)


@pytest.mark.parametrize("channels", [1, 3])
def test_large_scale_pass_2_recomputes_only_pre_rejected_pixels(monkeypatch: pytest.MonkeyPatch, channels: int) -> None:
    """Large-scale pass 2 recomputes only the pixels (and reads only the bands) holding a pre-rejected
    sample; the products are those of recomputing everything, to the bit: two trails in different
    bands, one crossing a star, a band without any, NaN, colour planes, several bands."""
    rng = np.random.default_rng(7)
    n, h, w = 10, 45, 60
    yy, xx = np.mgrid[0:h, 0:w]
    star = 1.5 * np.exp(-((xx - 30) ** 2 + (yy - 8) ** 2) / 5.0)
    frames = []
    for i in range(n):
        f = np.stack([g + (star * rng.uniform(0.8, 1.2)).astype(np.float32) for g in _frames(rng, channels, h, w)])
        f.reshape(channels, -1)[:, rng.integers(0, h * w, 20)] += 0.3
        if i == 2:
            f[:, 7:9, :] += 0.08  # across the star
        if i == 5:
            f[:, np.arange(20, 40), np.arange(5, 25)] += 0.1  # a diagonal trail in other bands
            f[:, 30, 40] = np.nan
        frames.append(f if channels > 1 else f[0])
    nm = I.NoiseModel(a=np.full(n, 1e-4), b=np.full(n, 2e-3), background=0.2, epsilon=0.2)
    out = {}
    for pre_only in (True, False):
        monkeypatch.setattr(I, "_PASS2_PRE_ONLY", pre_only)
        out[pre_only] = I.integrate(frames, rejection="winsorized", noise_model=nm, band_rows=6, large_scale=True)
    a, b = out[True], out[False]
    assert sum(b.large_scale_pixels) > 0  # pass 2 had something to do
    assert np.array_equal(a.image, b.image, equal_nan=True)
    for field in ("rej_low", "rej_high", "coverage", "weight_sum"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert a.large_scale_pixels == b.large_scale_pixels


@pytest.mark.parametrize("r", [0, 1, 2, 3])
def test_grow_is_the_binary_dilation_by_a_disc(r: int) -> None:
    """Large-scale rejection grows kept structures from their pixel indices (no full-frame mask):
    the same pixels as scipy's binary dilation by the disc, edges and corners included."""
    from scipy import ndimage

    rng = np.random.default_rng(r)
    h, w = 23, 31
    mask = rng.random((h, w)) < 0.03
    mask[0, 0] = mask[h - 1, 5] = mask[7, w - 1] = True
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = (xx * xx + yy * yy) <= r * r + 0.5
    want = ndimage.binary_dilation(mask, structure=disk) if r > 0 else mask
    got = I._grow(np.flatnonzero(mask)[::-1].copy(), h, w, disk, r)
    assert np.array_equal(got, np.flatnonzero(want))


def test_large_scale_keeps_only_the_candidates_it_can_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass 1 keeps only the hysteresis candidates linked, within their band, to a high rejection or
    to a band edge: the large-scale maps and the products are those from every candidate, with a
    faint trail continuing across several bands from its bright part and bands of 5 rows."""
    rng = np.random.default_rng(11)
    n, h, w = 9, 50, 70
    frames = _frames(rng, n, h, w)
    xs = np.arange(5, 65)
    ys = (xs * 0.6).astype(int)
    frames[3][ys, xs] += np.where(xs < 20, 0.1, 0.025).astype(np.float32)  # bright, then faint (2.5σ)
    frames[6].ravel()[rng.integers(0, h * w, 40)] += 0.2
    out = {}
    for near in (True, False):
        monkeypatch.setattr(I, "_CANDIDATES_NEAR_SEEDS", near)
        out[near] = I.integrate(frames, rejection="winsorized", band_rows=5, large_scale=True)
    a, b = out[True], out[False]
    assert a.large_scale_pixels == b.large_scale_pixels and a.large_scale_pixels[3] > 0
    assert np.array_equal(a.image, b.image, equal_nan=True)
    for field in ("rej_low", "rej_high", "coverage", "weight_sum"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    # the maps themselves, from band-filtered candidates: a faint trail (candidates only) continuing
    # through 7 bands from 5 rejected pixels, noise candidates, stray rejections
    monkeypatch.setattr(I, "_CANDIDATES_NEAR_SEEDS", True)
    hh, ww, rows = 40, 30, 5
    cand_map = rng.random((hh, ww)) < 0.03
    seed_map = np.zeros((hh, ww), bool)
    seed_map.ravel()[rng.integers(0, hh * ww, 6)] = True
    seed_map[0:5, 10] = True
    cand_map[5:, 10] = True
    cand_map &= ~seed_map
    highs, full, linked = [], [], []
    for y0 in range(0, hh, rows):
        c, sd = cand_map[y0 : y0 + rows], seed_map[y0 : y0 + rows]
        highs.append(np.flatnonzero(sd) + y0 * ww)
        full.append(np.flatnonzero(c) + y0 * ww)
        linked.append(I._linked_candidates(c, sd) + y0 * ww)
    assert sum(p.size for p in linked) < sum(p.size for p in full)
    maps = [I._large_scale_maps([highs], [cands], hh, ww, min_area_px=25, min_length_px=15, growth_px=2)[0]
            for cands in (full, linked)]
    assert np.array_equal(maps[0], maps[1]) and np.isin(np.arange(5, hh) * ww + 10, maps[0]).all()
    # which are kept: linked to a seed (diagonally too) or to the first or last row of the band
    cand = np.zeros((7, 10), bool)
    seed = np.zeros((7, 10), bool)
    cand[3, 2] = True  # alone: dropped
    cand[0, 5] = cand[1, 6] = True  # at the band's top edge
    cand[6, 0] = True  # at its bottom edge
    seed[3, 8] = True
    cand[4, 9] = cand[5, 9] = True  # linked to the seed
    assert I._linked_candidates(cand, seed).tolist() == [5, 16, 49, 59, 60]
