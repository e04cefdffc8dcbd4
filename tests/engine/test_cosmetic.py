"""Cosmetic correction: defect maps from master darks, automatic outliers, star-core protection."""

from __future__ import annotations

import numpy as np
import pytest
from stackwatch.engine import cosmetic


def _gauss_star(img: np.ndarray, x0: float, y0: float, fwhm: float, amp: float) -> None:
    s = fwhm / 2.3548
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    img += (amp * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s))).astype(np.float32)


def test_defect_map_finds_hot_and_cold_pixels_per_channel() -> None:
    rng = np.random.default_rng(3)
    h, w = 200, 240
    bias = (0.012 + rng.normal(0, 2e-4, (h, w))).astype(np.float32)
    dark = bias + rng.normal(0.002, 1e-4, (h, w)).astype(np.float32)
    dark[0::2, 1::2] += 0.001  # a brighter sub-lattice must not be flagged as hot
    hot = rng.choice(h * w, 40, replace=False)
    dark.ravel()[hot[:30]] += 0.05
    dark.ravel()[hot[30:]] -= 0.003
    dm = cosmetic.defect_map(dark, bias=bias, bayer="RGGB")
    assert set(hot[:30]) <= set(dm.hot.tolist())
    assert set(hot[30:]) <= set(dm.cold.tolist())
    assert dm.fraction < 1e-3
    back = cosmetic.DefectMap.from_arrays(dm.shape, dm.to_arrays())
    assert np.array_equal(back.indices, dm.indices)


def test_dead_flat_pixels() -> None:
    flat = np.full((64, 64), 0.4, dtype=np.float32)
    flat[10, 11] = 0.1
    flat[30, 30] = 0.0
    dm = cosmetic.defect_map(None, flat=flat, bayer="RGGB")
    assert sorted(dm.dead.tolist()) == [10 * 64 + 11, 30 * 64 + 30]


@pytest.mark.parametrize("bayer", [None, "RGGB"])
def test_auto_detection_finds_injected_outliers_and_spares_stars(bayer: str | None) -> None:
    rng = np.random.default_rng(5)
    h, w = 300, 320
    sigma = 0.002
    img = (0.1 + rng.normal(0, sigma, (h, w))).astype(np.float32)
    # stars of FWHM 1.5..4 px at sub-pixel positions and all brightnesses
    stars = []
    for i in range(60):
        x0 = 10 + (i % 10) * 30 + rng.uniform(0, 1)
        y0 = 15 + (i // 10) * 45 + rng.uniform(0, 1)
        fwhm = 1.5 + 2.5 * rng.uniform()
        amp = sigma * 10 ** rng.uniform(1, 2.6)
        _gauss_star(img, x0, y0, fwhm, amp)
        stars.append((x0, y0))
    clean = img.copy()
    # outliers away from the stars
    star_mask = np.zeros((h, w), dtype=bool)
    for x0, y0 in stars:
        star_mask[max(0, int(y0) - 8): int(y0) + 9, max(0, int(x0) - 8): int(x0) + 9] = True
    free = np.flatnonzero(~star_mask.ravel())
    picks = rng.choice(free, 200, replace=False)
    hot, cold = picks[:150], picks[150:]
    img.ravel()[hot] += rng.uniform(20, 200, hot.size).astype(np.float32) * sigma
    img.ravel()[cold] -= 20 * sigma
    found_hot, found_cold = cosmetic.detect_outliers(img, bayer=bayer)
    assert np.isin(hot, found_hot).mean() >= 0.99
    assert np.isin(cold, found_cold).mean() >= 0.99
    # no star pixel touched
    assert not star_mask.ravel()[found_hot].any()
    res = cosmetic.correct(img, bayer=bayer)
    assert np.array_equal(res.data[star_mask], clean[star_mask])
    resid = res.data.ravel()[hot] - clean.ravel()[hot]
    assert np.nanmax(np.abs(resid)) < 6 * sigma
    # false positives on clean noise are rare
    assert np.setdiff1d(found_hot, hot).size < 5e-4 * h * w


def test_replacement_never_zero_and_clusters_become_nan() -> None:
    img = np.full((40, 40), 0.3, dtype=np.float32)
    dm = cosmetic.DefectMap.from_arrays((40, 40), {"HOT": np.array([5 * 40 + 5, 20 * 40 + 20, 20 * 40 + 21, 20 * 40 + 22])})
    img.ravel()[dm.hot] = 0.9
    res = cosmetic.correct(img, defects=dm, auto=False)
    assert res.data[5, 5] == pytest.approx(0.3)
    assert np.isnan(res.data[20, 20:23]).all()
    assert res.nan == 3 and res.replaced == 1
    assert np.count_nonzero(res.data == 0) == 0


def test_inplace_equals_copy_and_nan_neighbours() -> None:
    rng = np.random.default_rng(9)
    img = (0.2 + rng.normal(0, 0.001, (80, 90))).astype(np.float32)
    img[10, 10] = 0.9
    img[40, 41] = np.nan
    img[40, 43] = 0.8  # outlier next to a NaN (same colour for RGGB)
    a = cosmetic.correct(img, bayer="RGGB")
    b_in = img.copy()
    b = cosmetic.correct(b_in, bayer="RGGB", inplace=True)
    assert b.data is b_in
    np.testing.assert_array_equal(a.data, b.data)
    assert abs(a.data[10, 10] - 0.2) < 0.01 and abs(a.data[40, 43] - 0.2) < 0.01
    assert np.isnan(a.data[40, 41])  # no data stays no data


@pytest.mark.parametrize("folder", ["asi224mc_m27", "microobs_hatp32"])
def test_real_frames_star_fluxes_untouched(real_data, folder: str) -> None:  # type: ignore[no-untyped-def]
    """On real lights (uncalibrated, so with real hot pixels), automatic correction leaves the
    photometry of the brightest stars alone."""
    sep = pytest.importorskip("sep")
    from stackwatch.engine import cfa, fitsio

    path = sorted((real_data / folder).iterdir())[0]
    im = fitsio.read_image(path)
    res = cosmetic.correct(im.data, bayer=im.bayer)

    def lum(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(cfa.luminance(cfa.debayer(a, im.bayer)) if im.bayer else a, dtype=np.float32)

    before, after = lum(im.data), lum(res.data)
    bkg = sep.Background(before)
    objs = sep.extract(before - bkg.back(), 8, err=bkg.globalrms)
    objs = objs[np.argsort(-objs["flux"])][:60]
    f0, _, _ = sep.sum_circle(before - bkg.back(), objs["x"], objs["y"], 6.0)
    f1, _, _ = sep.sum_circle(after - bkg.back(), objs["x"], objs["y"], 6.0)
    changed = np.abs(f1 / f0 - 1) > 0.01
    print(f"{folder}: {res.n_auto} outliers replaced; {changed.sum()} of {len(objs)} bright stars changed > 1 %")
    assert res.n_auto > 0
    assert changed.mean() <= 0.05
