"""Light calibration: formula, flat scaling per CFA channel, saturation, dark optimisation, and the
done-means figures on the project's simulator (residual vignetting, dark scale, hot pixels)."""

from __future__ import annotations

import numpy as np
import pytest
from stackwatch.engine import calibrate, cosmetic
from stackwatch.engine.errors import StackwatchError

FS = 65535.0


def _synthetic(rng: np.random.Generator, shape: tuple[int, int] = (120, 160)) -> dict[str, np.ndarray]:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    r2 = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / (w / 2) ** 2
    flat = (0.4 * (1 - 0.3 * r2)).astype(np.float32)
    bias = (0.0122 + rng.normal(0, 1e-4, shape)).astype(np.float32)
    dark_rate = rng.exponential(2e-6, shape).astype(np.float32)  # per second
    sky = (0.05 + 0.01 * xx / w).astype(np.float32)
    return {"flat": flat, "bias": bias, "dark_rate": dark_rate, "sky": sky}


def test_formula_recovers_sky_times_s0() -> None:
    rng = np.random.default_rng(0)
    s = _synthetic(rng)
    t = 300.0
    dark = s["bias"] + s["dark_rate"] * t
    light = s["sky"] * s["flat"] + s["dark_rate"] * t + s["bias"]
    out = calibrate.calibrate_light(light, dark=dark, flat=s["flat"])
    s0 = float(np.mean(s["flat"], dtype=np.float64))
    np.testing.assert_allclose(out.data, s["sky"] * s0, rtol=2e-5)
    assert out.dark_scale == 1.0 and out.flat_scale == pytest.approx((s0,))
    # the k = 1 path equals the general path with a bias (B cancels)
    general = calibrate.calibrate_light(light, bias=s["bias"], dark=dark, flat=s["flat"], dark_scale=1.0)
    np.testing.assert_allclose(general.data, out.data, rtol=1e-6, atol=1e-7)
    # scaled dark: 120 s light with the 300 s dark, k = 0.4
    light120 = s["sky"] * s["flat"] + s["dark_rate"] * 120.0 + s["bias"]
    out = calibrate.calibrate_light(light120, bias=s["bias"], dark=dark, flat=s["flat"], dark_scale=0.4)
    np.testing.assert_allclose(out.data, s["sky"] * s0, rtol=2e-5)


def test_scaled_dark_without_bias_is_refused() -> None:
    a = np.ones((8, 8), np.float32)
    with pytest.raises(StackwatchError, match="needs a master bias"):
        calibrate.calibrate_light(a, dark=a, dark_scale=0.5)
    with pytest.raises(StackwatchError, match="do not match"):
        calibrate.calibrate_light(a, dark=np.ones((8, 6), np.float32))


def test_dead_flat_pixels_are_nan_and_saturation_comes_from_raw() -> None:
    light = np.full((10, 10), 0.5, np.float32)
    light[3, 3] = 0.9995
    flat = np.full((10, 10), 0.4, np.float32)
    flat[1, 1] = 0.0
    flat[2, 2] = -0.01
    flat[4, 4] = np.nan
    flat[5, 5] = 0.01  # < 0.05 s0
    dark = np.full((10, 10), 0.6, np.float32)  # makes the calibrated value negative: kept
    out = calibrate.calibrate_light(light, dark=dark, flat=flat, saturation=0.999)
    for y, x in [(1, 1), (2, 2), (4, 4), (5, 5)]:
        assert np.isnan(out.data[y, x])
    assert np.isfinite(out.data).sum() == 96
    assert out.saturated.sum() == 1 and out.saturated[3, 3]
    assert out.data[0, 0] < 0  # floats keep their negatives


def test_per_channel_flat_scale_removes_no_colour() -> None:
    """OSC: a coloured flat panel must not put a colour cast on the light; the normalised flat of a
    grey flat field has equal channel medians."""
    rng = np.random.default_rng(2)
    h, w = 200, 260
    yy, xx = np.mgrid[0:h, 0:w]
    vign = 1 - 0.25 * (((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / (w / 2) ** 2)
    panel = np.array([[0.6, 1.0], [1.0, 0.35]])  # RGGB: red and blue weaker
    flat = (0.4 * vign * panel[yy % 2, xx % 2] * (1 + rng.normal(0, 0.002, (h, w)))).astype(np.float32)
    fs = calibrate.flat_scale(flat, "RGGB")
    norm = flat / fs.per_pixel[yy % 2, xx % 2]
    meds = [float(np.median(norm[dy::2, dx::2])) for dy, dx in ((0, 0), (0, 1), (1, 1))]
    assert max(meds) / min(meds) - 1 < 0.005
    # a grey sky with the sensor's own colour response (r, g, b)
    resp = np.array([[0.9, 1.0], [1.0, 0.8]])
    light = (0.1 * vign * resp[yy % 2, xx % 2] * panel[yy % 2, xx % 2] / panel[yy % 2, xx % 2]).astype(np.float32)
    light = (light * flat / (0.4 * panel[yy % 2, xx % 2]) / vign).astype(np.float32)
    out = calibrate.calibrate_light(light, flat=flat, bayer="RGGB")
    r = np.median(out.data[0::2, 0::2]) / np.median(out.data[0::2, 1::2])
    b = np.median(out.data[1::2, 1::2]) / np.median(out.data[0::2, 1::2])
    assert r == pytest.approx(0.9, rel=0.005) and b == pytest.approx(0.8, rel=0.005)
    assert len(out.flat_scale) == 3


def test_overscan_and_pedestal() -> None:
    raw = np.full((20, 30), 0.1, np.float32)
    raw[:, 25:] = 0.02  # overscan columns at the bias level
    out = calibrate.subtract_overscan(raw, regions=[((25, 0, 30, 20), (0, 0, 24, 20))], image_rect=(0, 0, 24, 20))
    assert out.shape == (20, 24)
    np.testing.assert_allclose(out, 0.08, rtol=1e-6)
    with pytest.raises(StackwatchError, match="outside"):
        calibrate.subtract_overscan(raw, regions=[((25, 0, 40, 20), (0, 0, 24, 20))])
    data = np.random.default_rng(1).normal(0, 0.001, (200, 200)).astype(np.float32)
    p = calibrate.output_pedestal(data)
    assert 0.003 * FS < p < 0.0045 * FS
    assert calibrate.output_pedestal(data + 0.1) == 0


# --------------------------------------------------------------------------------------------------
# Done-means on the simulator

sim = pytest.importorskip("stackwatch.engine.simulate")


def _clipped_mean(stack: np.ndarray) -> np.ndarray:
    """Mean after dropping samples > 5 MAD-sigma from the per-pixel median (cosmics): a test helper,
    not the project's integrator."""
    med = np.median(stack, axis=0)
    mad = 1.4826 * np.median(np.abs(stack - med), axis=0) + 1e-9
    keep = np.abs(stack - med) <= 5 * mad
    return (np.where(keep, stack, 0).sum(0) / keep.sum(0)).astype(np.float32)


@pytest.fixture(scope="module")
def night() -> dict[str, object]:
    spec = sim.SimulationSpec(
        width=384, height=320, n_lights=4, n_darks=16, n_biases=16, n_flats=12, n_darkflats=12,
        exposure_s=120.0, dark_exposure_s=300.0, target="none", stars_per_mpix=300.0, sky_e_per_s=20.0,
        n_dust=4, hot_pixel_frac=1e-3, seed=7,
    )
    truth = sim.make_truth(spec)
    frames: dict[str, list[np.ndarray]] = {k: [] for k in sim.KINDS}
    for f in truth.frames:
        frames[f.kind].append(sim.render_frame(truth, f).astype(np.float32) / np.float32(FS))
    bias = _clipped_mean(np.stack(frames["bias"]))
    dark = _clipped_mean(np.stack(frames["dark"]))
    darkflat = _clipped_mean(np.stack(frames["darkflat"]))
    flats = np.stack(frames["flat"]) - darkflat
    flat = _clipped_mean(flats)
    return {"truth": truth, "spec": spec, "bias": bias, "dark": dark, "flat": flat, "lights": frames["light"]}


def test_residual_vignetting_and_dust_below_0_3_percent(night: dict) -> None:
    truth, spec = night["truth"], night["spec"]
    fracs = []
    for i, light in enumerate(night["lights"]):
        out = calibrate.calibrate_light(light, bias=night["bias"], dark=night["dark"], flat=night["flat"],
                                        dark_scale=120.0 / 300.0)
        comp = sim.light_components(truth, i)
        expected = (comp.signal + comp.sky) / spec.gain_e_per_adu / FS  # response mean 1 -> s0/F removes it
        resid = out.data - expected
        # 32x32 bins: large-scale residual relative to the sky level
        h, w = resid.shape
        b = resid[: h // 32 * 32, : w // 32 * 32].reshape(h // 32, 32, w // 32, 32)
        binned = np.nanmedian(b, axis=(1, 3))
        sky_level = float(np.median(comp.sky)) / spec.gain_e_per_adu / FS
        fracs.append(binned / sky_level)
    mean_frac = np.mean(fracs, axis=0)
    worst = float(np.max(np.abs(mean_frac - np.median(mean_frac))))
    print(f"residual vignetting/dust: max |binned residual| = {worst * 100:.3f} % of sky")
    assert worst < 0.003


@pytest.mark.parametrize("method", ["fast", "golden"])
def test_dark_optimisation_recovers_scale_within_3_percent(night: dict, method: str) -> None:
    errors = []
    for light in night["lights"]:
        opt = calibrate.optimize_dark_scale(light, night["dark"], night["bias"], nominal=0.4, method=method)
        assert opt.ok, opt.reason
        errors.append(opt.k / 0.4 - 1)
    print(f"dark optimisation {method}: k/0.4 - 1 = {[round(e, 4) for e in errors]} ({opt.n_warm} warm pixels)")
    assert max(abs(e) for e in errors) < 0.03


def test_fast_and_golden_agree_and_golden_minimises_noise(night: dict) -> None:
    light = night["lights"][1]
    fast = calibrate.optimize_dark_scale(light, night["dark"], night["bias"], nominal=0.4, method="fast")
    gold = calibrate.optimize_dark_scale(light, night["dark"], night["bias"], nominal=0.4, method="golden")
    print(f"fast k = {fast.k:.4f}, golden k = {gold.k:.4f}")
    assert abs(fast.k / gold.k - 1) < 0.01


def _masters_of(spec: object) -> tuple[np.ndarray, np.ndarray]:
    truth = sim.make_truth(spec)
    frames: dict[str, list[np.ndarray]] = {"bias": [], "dark": []}
    for f in truth.frames:
        if f.kind in frames:
            frames[f.kind].append(sim.render_frame(truth, f).astype(np.float32) / np.float32(FS))
    return _clipped_mean(np.stack(frames["dark"])), _clipped_mean(np.stack(frames["bias"]))


@pytest.mark.parametrize(("glow_e_per_s", "expected"), [(0.3, True), (0.05, True), (0.0, False)])
def test_amp_glow_turns_dark_optimisation_off(glow_e_per_s: float, expected: bool) -> None:
    """§3.2: CMOS amp glow (the simulator's top-right corner) is 64-px structure near an edge; a
    clean CCD-like dark (warm and hot pixels, no glow) is not."""
    spec = sim.SimulationSpec(width=256, height=192, n_lights=1, n_darks=9, n_biases=9, n_flats=0, n_darkflats=0,
                              amp_glow_e_per_s=glow_e_per_s, hot_pixel_frac=1e-3, seed=3)
    dark, bias = _masters_of(spec)
    st = calibrate.dark_structure(dark, bias)
    print(f"amp glow {glow_e_per_s} e/s: peak {st.peak_sigma:.1f} sigma at the {st.where} ({st.block_px}-px blocks)")
    assert st.glow is expected
    if expected:
        assert st.where == "top-right corner" and st.reason.startswith("amp glow:")
    else:
        assert st.reason == "" and st.peak_sigma < 4.0
    # a central warm spot (a CCD's hot amplifier-free region) is not glow
    spot = dark.copy()
    spot[80:112, 112:144] += 0.01
    assert calibrate.dark_structure(spot, bias).glow is expected


def test_hot_pixels_removed_by_cosmetic_correction(night: dict) -> None:
    """A simulated hot pixel 'remains' when cosmetic correction left its calibrated value unchanged."""
    truth = night["truth"]
    dm = cosmetic.defect_map(night["dark"], bias=night["bias"], flat=night["flat"])
    xs, ys = np.array(truth.hot_pixels).T  # (x, y) pairs
    fracs = []
    for light in night["lights"][:2]:
        cal = calibrate.calibrate_light(light, bias=night["bias"], dark=night["dark"], flat=night["flat"],
                                        dark_scale=0.4)
        res = cosmetic.correct(cal.data, defects=dm)
        remain = res.data[ys, xs] == cal.data[ys, xs]
        fracs.append(float(remain.mean()))
        # and the corrected values are sky-like (vignetting-free sky, faint stars allowed)
        changed = ~remain & np.isfinite(res.data[ys, xs])
        local = np.nanmedian(res.data)
        sigma = 1.4826 * np.nanmedian(np.abs(res.data - local))
        assert np.all(np.abs(res.data[ys, xs][changed] - local) < 8 * sigma + 0.2 * local)
    print(f"hot pixels remaining after cosmetic correction: {max(fracs) * 100:.2f} % of {len(xs)}; "
          f"defect map {dm.hot.size} hot, {dm.cold.size} cold, {dm.dead.size} dead")
    assert max(fracs) < 0.01


def test_overscan_regions_from_config() -> None:
    assert calibrate.overscan_regions([[25, 0, 30, 20, 0, 0, 24, 20]]) == [((25, 0, 30, 20), (0, 0, 24, 20))]
    with pytest.raises(StackwatchError, match="entry 0"):
        calibrate.overscan_regions([[1, 2, 3, 4]])


def test_overscan_object_bands_geometry_and_pattern() -> None:
    rng = np.random.default_rng(5)
    raw = rng.normal(0.1, 0.001, (30, 44)).astype(np.float32)
    raw[:, 40:] = rng.normal(0.02, 0.001, (30, 4))  # a column strip
    raw[28:, :] = rng.normal(0.03, 0.001, (2, 44))  # a row strip for the bottom rows only
    ov = calibrate.Overscan.from_config(
        [[40, 0, 44, 28, 0, 0, 40, 28], [0, 28, 40, 30, 0, 27, 40, 28]], [1, 1, 39, 27], [44, 30]
    )
    assert ov is not None and ov.applies((30, 44)) and not ov.applies((30, 46))
    assert ov.output_shape((30, 44)) == (26, 38) and ov.output_shape((8, 8)) == (8, 8)
    lv = ov.levels(raw)
    np.testing.assert_allclose(lv, [np.median(raw[:28, 40:]), np.median(raw[28:, :40])])
    full = ov.correct(raw, lv)
    ref = calibrate.subtract_overscan(raw, regions=ov.regions, image_rect=ov.image_rect)
    np.testing.assert_array_equal(full, ref)
    # band by band (as the master integrator reads members) equals the whole frame
    bands = [ov.correct_rows(raw[1 + y0 : 1 + y1], 1 + y0, lv) for y0, y1 in ((0, 7), (7, 20), (20, 26))]
    np.testing.assert_array_equal(np.concatenate(bands), full)
    # an odd crop offset changes the CFA pattern (§5.1: odd x and odd y -> DC/BA)
    assert ov.pattern("RGGB") == "BGGR" and ov.pattern(None) is None
    cal = calibrate.calibrate_light(raw, bayer="RGGB", overscan=ov, saturation=0.1005)
    assert cal.bayer == "BGGR" and cal.data.shape == (26, 38)
    np.testing.assert_array_equal(cal.saturated, raw[1:27, 1:39] >= 0.1005)  # judged on raw values
    with pytest.raises(StackwatchError, match="overscan_image_rect"):
        calibrate.Overscan.from_config([], [1, 2, 3])
    with pytest.raises(StackwatchError, match="outside the 20x30 frame"):
        calibrate.Overscan.from_config([[40, 0, 44, 28, 0, 0, 40, 28]], [], [20, 30])
    assert calibrate.Overscan.from_config([], []) is None


@pytest.mark.parametrize(
    ("dx", "dy", "expected"),
    [(1, 0, ("GRBG", "GBRG", "RGGB", "BGGR")), (0, 1, ("GBRG", "GRBG", "BGGR", "RGGB")),
     (1, 1, ("BGGR", "RGGB", "GBRG", "GRBG")), (2, 4, ("RGGB", "BGGR", "GRBG", "GBRG"))],
)
def test_shift_pattern_follows_the_orientation_table(dx: int, dy: int, expected: tuple[str, ...]) -> None:
    from stackwatch.engine.cfa import shift_pattern

    assert tuple(shift_pattern(p, dx, dy) for p in ("RGGB", "BGGR", "GRBG", "GBRG")) == expected


def test_w1_at_matches_scipy_starlet_layer() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(12)
    img = rng.normal(0, 1, (40, 50))
    h5 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    ref = img - ndimage.convolve1d(ndimage.convolve1d(img, h5, axis=0, mode="mirror"), h5, axis=1, mode="mirror")
    ys, xs = np.nonzero(np.ones(img.shape, dtype=bool))
    got = calibrate._w1_at(img, ys, xs, h5)
    np.testing.assert_allclose(got, ref[ys, xs], rtol=1e-12, atol=1e-12)
