"""Masters: keys, matching rules and explanations, integration against ground truth (simulator) and
against ccdproc."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from stackwatch.engine import calibrate, library
from stackwatch.engine.classify import FrameInfo
from stackwatch.engine.errors import StackwatchError
from stackwatch.engine.library import MasterKey, MasterRecord, MatchRules

FS = 65535.0


def _info(kind: str = "light", **kw: object) -> FrameInfo:
    base: dict[str, object] = dict(
        path=f"/x/{kind}.fits", kind=kind, camera="ZWO ASI2600MM Pro", exposure_s=300.0, gain=100.0, offset=50.0,
        temperature_c=-9.6, binning=(1, 1), shape=(400, 600), filter="Ha", object="M31", ra_deg=None, dec_deg=None,
        bayer=None, pixel_size_um=3.76, focal_length_mm=530.0, date_obs="2026-11-21T22:00:00",
    )
    base.update(kw)
    return FrameInfo(**base)  # type: ignore[arg-type]


def _rec(kind: str, n: int = 20, date: str = "2026-11-21T15:00:00", **kw: object) -> MasterRecord:
    info = _info(kind, date_obs=date, **kw)
    key = library.master_key(info)
    assert key is not None
    return MasterRecord(key=key, path=f"/lib/{key.id}.fits", ncombine=n, exposure_s=info.exposure_s,
                        temperature_c=info.temperature_c, date_first=date, date_last=date)


def test_keys_and_nights() -> None:
    assert library.night_of("2026-11-22T03:00:00") == "2026-11-21"
    assert library.night_of("2026-11-21T19:00:00") == "2026-11-21"
    assert library.night_of(None) == ""
    assert library.master_key(_info("light")) is None
    k = library.master_key(_info("dark", temperature_c=-10.4))
    assert k is not None and k.exposure_s == 300.0 and k.temperature_c == -10.0 and k.filter == ""
    assert k.id.startswith("dark_300s_g100_o50_-10C_600x400")
    assert MasterKey.from_dict(k.as_dict()) == k
    # readings around one set point share a master; another set point does not
    assert library.master_key(_info("dark", temperature_c=-9.5)) == k
    assert library.master_key(_info("dark", temperature_c=-11.9)) == k
    assert library.master_key(_info("dark", temperature_c=-15.1)) != k
    f = library.master_key(_info("flat", date_obs="2026-11-22T06:30:00"))
    assert f is not None and f.filter == "Ha" and f.night == "2026-11-21" and f.exposure_s is None
    with pytest.raises(StackwatchError, match="without exposure"):
        library.master_key(_info("dark", exposure_s=None))


def test_match_exact_dark_and_same_night_flat() -> None:
    masters = [
        _rec("bias", 50, exposure_s=0.0),
        _rec("dark", 40, temperature_c=-10.0),
        _rec("dark", 10, temperature_c=-10.0, exposure_s=600.0),
        _rec("flat", 25, date="2026-11-22T06:40:00", exposure_s=2.0),
        _rec("flat", 25, date="2026-11-10T06:40:00", exposure_s=2.0),
        _rec("dark", 40, temperature_c=-10.0, gain=200.0),  # other gain: never
    ]
    ms = library.match(_info("light"), masters)
    assert ms.dark is masters[1] and ms.dark_scale == 1.0 and not ms.optimize_dark
    assert ms.flat is masters[3] and ms.bias is masters[0]
    assert ms.missing == ()
    text = " | ".join(ms.explanations)
    assert "dark: 300 s, -10.0 °C (frame -9.6 °C, Δ0.4 ≤ 2), 40 frames, k=1" in text
    assert "same night 2026-11-21" in text


def test_match_scaled_dark_needs_bias_and_temperature_window() -> None:
    dark600 = _rec("dark", 10, temperature_c=-10.0, exposure_s=600.0)
    dark60 = _rec("dark", 10, temperature_c=-10.0, exposure_s=60.0)
    bias = _rec("bias", 50, exposure_s=0.0)
    light = _info("light", exposure_s=120.0)
    ms = library.match(light, [dark600, dark60, bias])
    assert ms.dark is dark600 and ms.dark_scale == pytest.approx(0.2) and ms.optimize_dark
    assert any("scaled k=0.2" in e for e in ms.explanations)
    ms = library.match(light, [dark600, dark60])
    assert ms.dark is None and "dark" in ms.missing and "bias" in ms.missing
    assert any("no bias to scale the 60, 600 s dark" in e for e in ms.explanations)
    ms = library.match(light, [dark600, bias], rules=MatchRules(allow_scaled_darks=False))
    assert ms.dark is None
    warm = _rec("dark", 10, temperature_c=-5.0)
    ms = library.match(_info("light"), [warm, bias])
    assert ms.dark is None and any("none within 2 °C of -9.6 °C" in e for e in ms.explanations)


def test_match_flat_age_and_missing_filter() -> None:
    old = _rec("flat", 20, date="2026-11-01T06:00:00", exposure_s=2.0)
    ms = library.match(_info("light"), [old])
    assert ms.flat is old and any("days from the frame" in e for e in ms.explanations)
    ms = library.match(_info("light"), [old], rules=MatchRules(flat_max_age_days=10))
    assert ms.flat is None and "flat" in ms.missing
    assert any(e.startswith("flat: none for filter Ha within 10 days") for e in ms.explanations)
    ms = library.match(_info("light", filter="OIII"), [old])
    assert ms.flat is None and any("filter OIII" in e for e in ms.explanations)


def test_match_for_flat_calibration() -> None:
    fd = _rec("darkflat", 20, exposure_s=2.0, temperature_c=-10.0)
    bias = _rec("bias", 50, exposure_s=0.0)
    flat = _info("flat", exposure_s=2.01)
    ms = library.match(flat, [fd, bias])
    assert ms.darkflat is fd
    ms = library.match(_info("flat", exposure_s=3.0), [fd, bias])
    assert ms.darkflat is None and ms.bias is bias and "darkflat" in ms.missing
    ms = library.match(_info("flat", exposure_s=3.0), [fd])
    assert ms.darkflat is None and ms.bias is None


def test_master_rejection_by_count() -> None:
    assert library.master_rejection(2)[0] == "none"
    assert library.master_rejection(5) == ("percentile", {"p_low": 0.2, "p_high": 0.1})
    assert library.master_rejection(6)[0] == "winsorized"
    assert library.master_rejection(6)[1]["kappa_high"] == 3.0


# --------------------------------------------------------------------------------------------------
# Integration on files (needs the band integrator and the simulator)

pytest.importorskip("stackwatch.engine.integrate")
sim = pytest.importorskip("stackwatch.engine.simulate")


def _write(truth: object, folder: Path, kinds: tuple[str, ...]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {k: [] for k in kinds}
    for fr in sim.iter_night(truth, kinds=kinds):
        p = folder / fr.filename
        sim.write_fits(p, fr.data, fr.header)
        out[fr.kind].append(str(p))
    return out


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    spec = sim.SimulationSpec(width=256, height=192, n_lights=1, n_darks=12, n_biases=12, n_flats=8, n_darkflats=8,
                              exposure_s=300.0, hot_pixel_frac=1e-3, seed=11)
    truth = sim.make_truth(spec)
    folder = tmp_path_factory.mktemp("night")
    files = _write(truth, folder, ("bias", "dark", "flat", "darkflat"))
    return {"spec": spec, "truth": truth, "files": files}


def _single_sigma(files: list[str], truth_adu: np.ndarray) -> np.ndarray:
    from stackwatch.engine.fitsio import read_image

    stack = np.stack([read_image(p).data * FS for p in files]) - truth_adu
    return stack


def test_master_bias_and_dark_within_1_15_of_expected_noise(night: dict) -> None:
    spec, truth, files = night["spec"], night["truth"], night["files"]
    g = spec.gain_e_per_adu
    base_var = (spec.read_noise_e / g) ** 2 + spec.row_noise_adu**2 + 1.0 / 12.0
    for kind in ("bias", "dark"):
        res = library.integrate_master(kind, files[kind])
        n = res.ncombine
        truth_adu = truth.bias_adu.astype(np.float64)
        var = np.full(truth_adu.shape, base_var)
        if kind == "dark":
            dark_e = truth.dark_e_per_s.astype(np.float64) * spec.dark_exposure
            truth_adu = truth_adu + dark_e / g
            var = var + dark_e / g**2
        err = res.image * FS - truth_adu
        z = err / np.sqrt(var / n)
        rms = float(np.sqrt(np.mean(z**2)))
        print(f"master {kind}: N={n}, RMS error / expected noise = {rms:.3f}, rejection {res.rejection} "
              f"low {res.rej_low_frac:.4f} high {res.rej_high_frac:.4f}")
        assert rms <= 1.15
        assert abs(float(np.mean(err))) < 0.1 * np.sqrt(base_var / n) * 3
    # hot pixels and amp glow are in the master dark
    res = library.integrate_master("dark", files["dark"])
    xs, ys = np.array(truth.hot_pixels).T
    expect = truth.bias_adu[ys, xs] + truth.dark_e_per_s[ys, xs] * spec.dark_exposure / g
    np.testing.assert_allclose(res.image[ys, xs] * FS, expect, rtol=0.05)


def _true_flat(truth: object) -> np.ndarray:
    r = truth.response.astype(np.float64)
    return r / r.mean()


def test_master_flat_matches_true_response(night: dict) -> None:
    spec, truth, files = night["spec"], night["truth"], night["files"]
    fd = library.integrate_master("darkflat", files["darkflat"])
    res = library.integrate_master("flat", files["flat"], subtract=fd.image)
    f = res.image.astype(np.float64) / res.flat_scale.s0
    resp = _true_flat(truth)
    g = spec.gain_e_per_adu
    level_adu = np.mean(res.image) * FS
    sig_e = level_adu * g * resp
    var = (sig_e / g**2 + (spec.read_noise_e / g) ** 2 * (1 + 1 / fd.ncombine)) / res.ncombine
    expected = np.sqrt(var) / level_adu
    z = (f - resp) / expected
    rms = float(np.sqrt(np.mean(z**2)))
    print(f"master flat: N={res.ncombine}, RMS error / expected = {rms:.3f}, RMS error {np.std(f - resp) * 100:.3f} %")
    assert rms <= 1.15
    # dust shadows are in the master: the darkest 0.5 % pixels of the truth are reproduced
    low = resp < np.quantile(resp, 0.005)
    assert np.abs(f[low] - resp[low]).mean() < 3 * expected[low].mean()


def test_sky_flats_with_stars_give_the_same_master(tmp_path: Path) -> None:
    spec = sim.SimulationSpec(width=256, height=192, n_lights=1, n_darks=0, n_biases=8, n_flats=10, n_darkflats=8,
                              sky_flats_with_stars=True, seed=12)
    truth = sim.make_truth(spec)
    files = _write(truth, tmp_path, ("flat", "darkflat"))
    fd = library.integrate_master("darkflat", files["darkflat"])
    res = library.integrate_master("flat", files["flat"], subtract=fd.image)
    f = res.image.astype(np.float64) / res.flat_scale.s0
    resp = _true_flat(truth)
    # per-pixel expectation as above; stars must not leave bumps
    level_adu = np.mean(res.image) * FS
    g = spec.gain_e_per_adu
    var = (level_adu * g * resp / g**2 + (spec.read_noise_e / g) ** 2 * (1 + 1 / fd.ncombine)) / res.ncombine
    z = (f - resp) / (np.sqrt(var) / level_adu)
    rms = float(np.sqrt(np.mean(z**2)))
    print(f"sky flats with stars: RMS error / expected = {rms:.3f}, max |z| = {np.abs(z).max():.1f}, "
          f"high rejections {res.rej_high_frac * 100:.2f} %")
    assert rms <= 1.15
    assert np.abs(z).max() < 8


def test_osc_flat_channels_agree_after_per_channel_normalisation(tmp_path: Path) -> None:
    spec = sim.SimulationSpec(width=256, height=192, n_lights=1, n_darks=0, n_biases=6, n_flats=6, n_darkflats=6,
                              osc=True, seed=13)
    truth = sim.make_truth(spec)
    files = _write(truth, tmp_path, ("flat", "darkflat"))
    fd = library.integrate_master("darkflat", files["darkflat"])
    res = library.integrate_master("flat", files["flat"], subtract=fd.image, bayer="RGGB")
    fs = res.flat_scale
    norm = res.image / fs.per_pixel[np.arange(192)[:, None] % 2, np.arange(256)[None, :] % 2]
    meds = [float(np.median(norm[dy::2, dx::2])) for dy in range(2) for dx in range(2)]
    spread = max(meds) / min(meds) - 1
    print(f"OSC normalised flat channel medians {[round(m, 4) for m in meds]}, spread {spread * 100:.3f} %")
    assert spread < 0.005


def test_parity_with_ccdproc(night: dict) -> None:
    ccdproc = pytest.importorskip("ccdproc")
    from astropy import units
    from astropy.nddata import CCDData

    files = night["files"]["bias"][:8]
    ours = library.integrate_master("bias", files, rejection="sigma",
                                    params={"kappa_low": 3, "kappa_high": 3, "center_mean": 0, "ddof": 0,
                                            "max_iterations": 1, "min_n": 0})
    theirs = ccdproc.combine(files, method="average", sigma_clip=True, sigma_clip_low_thresh=3,
                             sigma_clip_high_thresh=3, sigma_clip_func=np.ma.median, sigma_clip_dev_func=np.ma.std,
                             unit="adu", dtype=np.float64)
    rel = np.abs(ours.image * FS - theirs.data) / np.abs(theirs.data)
    print(f"ccdproc.combine parity: max relative difference {rel.max():.2e}")
    assert rel.max() < 1e-5

    rng = np.random.default_rng(4)
    shape = (64, 80)
    bias = (800 + rng.normal(0, 5, shape))
    dark = bias + rng.exponential(30, shape)
    flat = 20000 * (1 - 0.2 * rng.uniform(size=shape))
    light = 0.3 * flat + 0.4 * (dark - bias) + bias + rng.normal(0, 3, shape)
    u = "adu"
    c = ccdproc.subtract_bias(CCDData(light, unit=u), CCDData(bias, unit=u))
    c = ccdproc.subtract_dark(c, CCDData(dark - bias, unit=u), dark_exposure=300 * units.s,
                              data_exposure=120 * units.s, scale=True)
    c = ccdproc.flat_correct(c, CCDData(flat, unit=u))
    mine = calibrate.calibrate_light((light / FS).astype(np.float32), bias=(bias / FS).astype(np.float32),
                                     dark=(dark / FS).astype(np.float32), flat=(flat / FS).astype(np.float32),
                                     dark_scale=0.4)
    rel = np.abs(mine.data * FS - c.data) / np.abs(c.data)
    print(f"ccdproc subtract_bias/subtract_dark/flat_correct parity: max relative difference {rel.max():.2e}")
    assert rel.max() < 1e-5


def test_flat_level_checks_use_the_apparent_bit_depth() -> None:
    rng = np.random.default_rng(3)
    ok12 = (rng.normal(2500, 30, (64, 64)) / FS).astype(np.float32)  # a good 12-bit flat (61 % of 4095)
    assert library.flat_level_problem(ok12, saturation=0.999, bayer=None) is None
    dark16 = (rng.normal(2500, 30, (64, 64)) / FS).astype(np.float32)
    dark16[0, 0] = 60000 / FS  # clearly 16-bit data: 2500 ADU is too dark
    assert "too dark" in (library.flat_level_problem(dark16, saturation=0.999, bayer=None) or "")
    sat = np.full((64, 64), 4095 / FS, dtype=np.float32)
    assert "saturated" in (library.flat_level_problem(sat, saturation=0.999, bayer=None) or "")
    bright = (rng.normal(58000, 100, (64, 64)) / FS).astype(np.float32)
    assert "non-linear" in (library.flat_level_problem(bright, saturation=0.999, bayer=None) or "")


def test_flat_band_source_factors_follow_row_parity(tmp_path: Path) -> None:
    """Per-CFA-position normalisation must not depend on where a band starts (odd y0)."""
    from stackwatch.engine import fitsio

    rng = np.random.default_rng(8)
    data = rng.uniform(0.2, 0.4, (21, 10)).astype(np.float32)
    p = tmp_path / "f.fits"
    fitsio.write_image(p, data)
    sub = np.full(data.shape, 0.01, np.float32)
    q = np.array([[1.0, 2.0], [3.0, 4.0]])
    src = library._FileSource(str(p), data.shape, sub, q)
    yy, xx = np.mgrid[0:21, 0:10]
    expected = (data - sub) * q[yy % 2, xx % 2]
    for y0, y1 in [(0, 21), (1, 4), (3, 10), (7, 8), (20, 21)]:
        np.testing.assert_allclose(src.read_band(y0, y1), expected[y0:y1], rtol=1e-6)


def test_flat_deviating_from_the_group_is_not_used(tmp_path: Path) -> None:
    """§2.2: a panel flat 40 % brighter than the others (panel brightness changed) is refused by
    name; one 20 % brighter is kept (multiplicative normalisation handles it)."""
    from stackwatch.engine import fitsio

    rng = np.random.default_rng(31)
    yy, xx = np.mgrid[0:48, 0:64]
    vign = 1 - 0.2 * (((xx - 32) ** 2 + (yy - 24) ** 2) / 32.0**2)
    paths = []
    for i, level in enumerate((20000, 20500, 19800, 20200, 24000, 28000)):
        data = (level * vign + rng.normal(0, 60, vign.shape)) / FS
        p = tmp_path / f"flat_{i}.fits"
        fitsio.write_image(p, data.astype(np.float32))
        paths.append(str(p))
    res = library.integrate_master("flat", paths)
    assert res.ncombine == 5 and paths[5] not in res.members and paths[4] in res.members
    assert any(w.startswith("flat_5.fits not used: level +") and "30 %" in w for w in res.warnings), res.warnings


def test_flat_rotator_angle_is_matched_and_a_turned_flat_warned() -> None:
    at0 = _rec("flat", 20, rotator_deg=0.2)
    at90 = _rec("flat", 10, rotator_deg=90.0)
    assert at0.key.rotator_deg == 0.0 and at90.key.id != at0.key.id and "rot90" in at90.key.id
    assert _rec("flat").key.id == library.master_key(_info("flat", date_obs="2026-11-21T15:00:00")).id
    ms = library.match(_info("light", rotator_deg=90.4), [at0, at90])
    assert ms.flat is at90 and not any("warning" in e for e in ms.explanations)
    ms = library.match(_info("light", rotator_deg=359.5), [at0, at90])
    assert ms.flat is at0  # 359.5° is 0.5° from 0°
    ms = library.match(_info("light", rotator_deg=45.0), [at90])
    flat_line = next(e for e in ms.explanations if e.startswith("flat:"))
    assert ms.flat is at90 and "warning: flat rotator angle 90° vs light 45.0°" in flat_line
    ms = library.match(_info("light"), [at90])  # the light does not say: no warning
    assert ms.flat is at90 and not any("warning" in e for e in ms.explanations)


def test_open_member_rows_equal_read_rows(tmp_path: Path) -> None:
    """Members kept open across bands give exactly fitsio.read_rows' rows: 16-bit, bottom-up, float,
    tile-compressed; beyond the capacity files are read the old way."""
    from astropy.io import fits
    from stackwatch.engine import fitsio

    rng = np.random.default_rng(4)
    raw = rng.integers(0, 65535, (37, 23), dtype=np.uint16)
    p16 = tmp_path / "a16.fits"
    fits.PrimaryHDU(raw).writeto(p16)
    pbu = tmp_path / "bottom_up.fits"
    fits.PrimaryHDU(raw, fits.Header({"ROWORDER": "BOTTOM-UP"})).writeto(pbu)
    pf = tmp_path / "float.fits"
    fits.PrimaryHDU(rng.normal(0.2, 0.01, (37, 23)).astype(">f4")).writeto(pf)
    pfz = tmp_path / "comp.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(raw.astype(np.int32) - 32768, tile_shape=(8, 23))]).writeto(pfz)
    files = library._MemberFiles(capacity=3)
    try:
        for _ in range(2):
            for p in (p16, pfz, pbu, pf):
                for y0, y1 in ((0, 37), (0, 5), (5, 19), (36, 37), (9, 9)):
                    np.testing.assert_array_equal(files.rows(str(p), y0, y1), fitsio.read_rows(p, y0, y1))
        assert len(files._open) == 3  # the fourth file was read per band
        # plain files are read with pread, not kept memory-mapped (RSS would grow with every band)
        assert files._open[str(p16)]._hdul is None and files._open[str(pfz)]._hdul is not None
        with pytest.raises(StackwatchError, match="outside the image height"):
            files.rows(str(p16), 30, 40)
    finally:
        files.close()
    assert files._open == {}
