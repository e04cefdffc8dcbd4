"""The on-disk calibration library: incremental masters equal batch masters, matching, provenance,
frozen masters, defect-map cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from stackwatch.daemon.library_store import CalibrationLibrary, record_dict
from stackwatch.engine import fitsio
from stackwatch.engine.classify import classify

pytest.importorskip("stackwatch.engine.integrate")
sim = pytest.importorskip("stackwatch.engine.simulate")


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    spec = sim.SimulationSpec(width=128, height=96, n_lights=2, n_darks=9, n_biases=9, n_flats=7, n_darkflats=6,
                              exposure_s=120.0, dark_exposure_s=300.0, seed=21)
    truth = sim.make_truth(spec)
    folder = tmp_path_factory.mktemp("night")
    files: dict[str, list[str]] = {k: [] for k in sim.KINDS}
    for fr in sim.iter_night(truth):
        p = folder / fr.filename
        sim.write_fits(p, fr.data, fr.header)
        files[fr.kind].append(str(p))
    return {"spec": spec, "truth": truth, "files": files, "folder": folder}


def _calibration_files(files: dict[str, list[str]]) -> list[str]:
    return files["bias"] + files["dark"] + files["darkflat"] + files["flat"]


def test_incremental_master_equals_batch(night: dict, tmp_path: Path) -> None:
    files = night["files"]
    batch = CalibrationLibrary(tmp_path / "batch")
    batch.add_frames(_calibration_files(files) + files["light"])
    inc = CalibrationLibrary(tmp_path / "inc")
    # arrive one by one in a different order, rebuilding after each
    order = files["dark"][::-1] + files["bias"] + files["darkflat"] + files["flat"]
    for p in order[:5]:
        inc.add_frames([p])
    inc.add_frames(order[5:])
    mb = {r.key.id: r for r in batch.masters()}
    mi = {r.key.id: r for r in inc.masters()}
    assert set(mb) == set(mi) and {r.kind for r in mb.values()} == {"bias", "dark", "darkflat", "flat"}
    worst = 0.0
    for k in mb:
        a = fitsio.read_image(mb[k].path).data
        b = fitsio.read_image(mi[k].path).data
        assert mb[k].ncombine == mi[k].ncombine
        worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-6))))
    print(f"incremental vs batch masters: max relative difference {worst:.2e}")
    assert worst <= 2e-7  # float32 rounding (bit-identical expected)
    batch.close()
    inc.close()


def test_lights_are_ignored_and_unchanged_files_not_reintegrated(night: dict, tmp_path: Path) -> None:
    lib = CalibrationLibrary(tmp_path)
    assert lib.add_frames(night["files"]["light"]) == []
    assert lib.masters() == []
    first = lib.add_frames(night["files"]["bias"])
    assert len(first) == 1 and first[0].ncombine == 9
    assert lib.add_frames(night["files"]["bias"]) == []  # same size and mtime: nothing to do


def test_provenance_in_fits_header(night: dict, tmp_path: Path) -> None:
    lib = CalibrationLibrary(tmp_path)
    lib.add_frames(night["files"]["dark"])
    (rec,) = lib.masters()
    h = fits.getheader(rec.path)
    assert h["NCOMBINE"] == 9 and h["IMAGETYP"] == "Master Dark" and h["REJALG"] == "winsorized"
    assert h["EXPTIME"] == pytest.approx(300.0) and "DATE-OBS" in h and "DATE-END" in h
    hist = " ".join(str(v) for v in h["HISTORY"])
    assert "member" in hist and os.path.basename(night["files"]["dark"][0])[:20] in hist.replace(" ", "")
    d = record_dict(rec)
    assert d["kind"] == "dark" and d["ncombine"] == 9 and d["age_days"] is not None and len(d["members"]) == 9
    # the library is reused: a new object over the same folder sees the same masters
    lib.close()
    again = CalibrationLibrary(tmp_path)
    assert [r.path for r in again.masters()] == [rec.path]


def test_match_light_through_the_library(night: dict, tmp_path: Path) -> None:
    files = night["files"]
    lib = CalibrationLibrary(tmp_path)
    lib.add_frames(_calibration_files(files))
    info = classify(fitsio.read_header(files["light"][0]), files["light"][0])
    ms = lib.match(info)
    assert ms.bias is not None and ms.dark is not None and ms.flat is not None
    # the simulator's CMOS has amp glow: §3.2 keeps the nominal k = t_L/t_D and says why
    assert ms.dark_scale == pytest.approx(0.4) and not ms.optimize_dark
    dark_line = next(e for e in ms.explanations if e.startswith("dark: 300 s for 120 s"))
    assert "optimisation off: amp glow" in dark_line and "to be optimised" not in dark_line, dark_line
    flat_hist = " ".join(str(v) for v in fits.getheader(ms.flat.path)["HISTORY"])
    assert "flat-dark" in flat_hist
    dm = lib.defects(ms.dark, bias=ms.bias, flat=ms.flat)
    assert dm is not None and dm.hot.size > 0
    again = lib.defects(ms.dark, bias=ms.bias, flat=ms.flat)  # from the cache file
    assert again is not None and np.array_equal(again.indices, dm.indices)


def test_missing_member_freezes_master_and_new_frames_start_another(night: dict, tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    copies = []
    for p in night["files"]["bias"]:
        q = src / Path(p).name
        shutil.copy(p, q)
        copies.append(str(q))
    lib = CalibrationLibrary(tmp_path / "lib")
    lib.add_frames(copies[:4])
    os.unlink(copies[0])
    assert lib.add_frames(copies[4:6]) == []  # frozen: the 4-frame master stays as it is
    recs = lib.masters()
    assert len(recs) == 1 and recs[0].ncombine == 4
    out = lib.add_frames(copies[6:])
    assert len(out) == 1 and out[0].ncombine == 3 and out[0].path.endswith("-2.fits")


def test_debounce(night: dict, tmp_path: Path) -> None:
    now = [0.0]
    lib = CalibrationLibrary(tmp_path, clock=lambda: now[0])
    lib.add_frames(night["files"]["bias"][:3], rebuild=False)
    assert lib.pending() and lib.due(debounce_s=20, debounce_members=10) == []
    now[0] = 25.0
    assert lib.due(debounce_s=20, debounce_members=10) == lib.pending()
    assert lib.due(debounce_s=100, debounce_members=3) == lib.pending()
    assert len(lib.rebuild(lib.due(debounce_s=20))) == 1 and lib.pending() == []


def test_unusable_master_is_reported_and_others_still_build(night: dict, tmp_path: Path) -> None:
    """Flats that all fail the level checks: that master is an error, the bias is still built."""
    src = tmp_path / "src"
    src.mkdir()
    flats = []
    for i, p in enumerate(night["files"]["flat"][:3]):
        with fits.open(p) as hdul:
            data = np.full(hdul[0].data.shape, 65535, dtype=np.uint16)  # saturated flat
            q = src / f"flat_{i}.fits"
            fits.PrimaryHDU(data, header=hdul[0].header).writeto(q)
            flats.append(str(q))
    lib = CalibrationLibrary(tmp_path / "lib")
    out = lib.add_frames(night["files"]["bias"][:3] + flats)
    assert [r.kind for r in out] == ["bias"]
    assert len(lib.last_errors) == 1 and "no usable flat" in lib.last_errors[0] and "saturated" in lib.last_errors[0]


def test_truncated_member_is_refused_at_add(night: dict, tmp_path: Path) -> None:
    from stackwatch.engine.errors import FrameError

    p = tmp_path / "bias_trunc.fits"
    p.write_bytes(Path(night["files"]["bias"][0]).read_bytes()[:-20000])
    lib = CalibrationLibrary(tmp_path / "lib")
    with pytest.raises(FrameError):
        lib.add_frames([p])
    assert lib.masters() == [] and lib.pending() == []


def test_osc_end_to_end_calibration_is_flat_per_channel(tmp_path: Path) -> None:
    """One-shot colour: masters from the library, light calibrated with per-CFA-channel flat scaling;
    the large-scale residual against the true sky + scene stays below 0.3 % of the sky per channel."""
    from stackwatch.engine import calibrate
    from stackwatch.engine.cfa import channel_map

    spec = sim.SimulationSpec(width=256, height=192, n_lights=2, n_darks=8, n_biases=8, n_flats=8, n_darkflats=8,
                              osc=True, exposure_s=120.0, sky_e_per_s=60.0, target="none", stars_per_mpix=30.0,
                              seed=31)
    truth = sim.make_truth(spec)
    files: dict[str, list[str]] = {k: [] for k in sim.KINDS}
    for fr in sim.iter_night(truth):
        p = tmp_path / "night" / fr.filename
        sim.write_fits(p, fr.data, fr.header)
        files[fr.kind].append(str(p))
    lib = CalibrationLibrary(tmp_path / "lib")
    lib.add_frames(files["bias"] + files["dark"] + files["darkflat"] + files["flat"])
    worst = 0.0
    for i, path in enumerate(files["light"]):
        img = fitsio.read_image(path)
        info = classify(img.header, path)
        ms = lib.match(info)
        assert ms.dark is not None and ms.flat is not None and ms.dark_scale == 1.0
        cal = calibrate.calibrate_light(img, dark=lib.load(ms.dark), flat=lib.load(ms.flat),
                                        flat_scale_override=lib.flat_scale(ms.flat))
        comp = sim.light_components(truth, i)
        expected = (comp.signal + comp.sky) / spec.gain_e_per_adu / 65535.0
        resid = cal.data - expected
        cmap = channel_map(img.bayer)
        for dy in range(2):
            for dx in range(2):
                r = resid[dy::2, dx::2]
                sky = float(np.median(comp.sky[dy::2, dx::2])) / spec.gain_e_per_adu / 65535.0
                h, w = r.shape
                b = np.nanmedian(r[: h // 32 * 32, : w // 32 * 32].reshape(h // 32, 32, w // 32, 32), axis=(1, 3))
                dev = float(np.max(np.abs(b - np.median(b)))) / sky
                worst = max(worst, dev)
                assert dev < 0.003, (i, "RGB"[cmap[dy, dx]], dev)
                # and no colour cast: each channel's level is the true one
                assert abs(float(np.nanmedian(r)) / sky) < 0.003, (i, "RGB"[cmap[dy, dx]])
    print(f"OSC end to end: worst binned residual {worst * 100:.3f} % of the channel's sky")


# ------------------------------------------------------------------------------------------------
# Overscan (algorithms.md §3.3): a CCD whose bias level drifts from frame to frame; the overscan
# strip (columns 96-103, no light) follows the drift.

_OV_H, _OV_W, _OV_IMG_W = 72, 104, 96


def _overscan_night(folder: Path) -> dict[str, object]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(33)
    yy, xx = np.mgrid[0:_OV_H, 0:_OV_IMG_W]
    pattern = 900.0 + 4.0 * np.sin(xx / 5.0) + rng.normal(0, 3.0, (_OV_H, _OV_IMG_W))  # fixed bias structure, ADU
    dark_rate = rng.exponential(0.02, (_OV_H, _OV_IMG_W))  # ADU/s
    vign = 1.0 - 0.3 * (((xx - 48) ** 2 + (yy - 36) ** 2) / 48.0**2)
    sky = 800.0 + 2.0 * xx
    files: dict[str, list[str]] = {"bias": [], "dark": [], "flat": [], "light": []}
    n = 0

    def write(kind: str, exposure: float, signal: np.ndarray) -> None:
        nonlocal n
        drift = rng.uniform(-60.0, 60.0)  # the whole readout shifts, overscan included
        raw = np.empty((_OV_H, _OV_W))
        raw[:, :_OV_IMG_W] = pattern + signal + rng.normal(0, 2.0, signal.shape)
        raw[:, _OV_IMG_W:] = 880.0 + rng.normal(0, 2.0, (_OV_H, _OV_W - _OV_IMG_W))
        raw += drift
        hdr = fits.Header()
        hdr["IMAGETYP"] = {"bias": "Bias Frame", "dark": "Dark Frame", "flat": "Flat Field", "light": "Light Frame"}[kind]
        hdr["EXPTIME"] = exposure
        hdr["DATE-OBS"] = f"2026-11-21T22:{n // 60:02d}:{n % 60:02d}"
        hdr["INSTRUME"] = "CCD with overscan"
        hdr["GAIN"] = 1.0
        hdr["CCD-TEMP"] = -20.0
        hdr["XBINNING"] = 1
        hdr["YBINNING"] = 1
        if kind in ("flat", "light"):
            hdr["FILTER"] = "L"
        if kind == "light":
            hdr["OBJECT"] = "M 1"
        p = folder / f"{kind}_{n:03d}.fits"
        fits.PrimaryHDU(np.clip(np.rint(raw), 0, 65535).astype(np.uint16), hdr).writeto(p)
        files[kind].append(str(p))
        n += 1

    for _ in range(7):
        write("bias", 0.0, np.zeros_like(pattern))
    for _ in range(7):
        write("dark", 300.0, dark_rate * 300.0)
    for _ in range(7):
        write("flat", 2.0, 20000.0 * vign)
    write("light", 300.0, sky * vign + dark_rate * 300.0)
    return {"files": files, "pattern": pattern, "sky": sky, "vign": vign}


def test_overscan_masters_and_lights_share_the_cropped_geometry(tmp_path: Path) -> None:
    from stackwatch.engine.calibrate import Overscan, calibrate_light

    ov_night = _overscan_night(tmp_path / "raw")
    files = ov_night["files"]
    ov = Overscan.from_config([[_OV_IMG_W, 0, _OV_W, _OV_H, 0, 0, _OV_IMG_W, _OV_H]], [0, 0, _OV_IMG_W, _OV_H])
    assert ov is not None
    lib = CalibrationLibrary(tmp_path / "lib", overscan=ov)
    lib.add_frames(files["bias"] + files["dark"] + files["flat"])
    recs = {r.kind: r for r in lib.masters()}
    assert set(recs) == {"bias", "dark", "flat"}
    for r in recs.values():
        assert r.key.shape == (_OV_H, _OV_W)  # the key keeps the raw geometry lights are matched on
        assert fitsio.read_image(r.path).data.shape == (_OV_H, _OV_IMG_W)
        h = fits.getheader(r.path)
        assert h["OVERSCAN"] is True and r.overscan == ov.describe() and record_dict(r)["overscan"] == ov.describe()
        assert "members corrected: overscan" in "".join(str(v) for v in h["HISTORY"])
    # master bias = pattern - overscan level, whatever each frame's drift (7 frames: noise 2/sqrt(7) ADU)
    bias = lib.load(recs["bias"]) * 65535.0
    resid = bias - (ov_night["pattern"] - 880.0)
    assert abs(float(np.mean(resid))) < 0.5 and float(np.std(resid)) < 1.6

    light = fitsio.read_image(files["light"][0])
    info = classify(light.header, files["light"][0])
    ms = lib.match(info)
    assert ms.bias is not None and ms.dark is not None and ms.flat is not None and ms.dark_scale == 1.0
    kw = {"bias": lib.load(ms.bias), "dark": lib.load(ms.dark), "flat": lib.load(ms.flat),
          "flat_scale_override": lib.flat_scale(ms.flat)}
    cal = calibrate_light(light, overscan=lib.overscan, **kw)
    assert cal.data.shape == (_OV_H, _OV_IMG_W) and cal.saturated.shape == cal.data.shape
    assert cal.overscan_levels and any(n.startswith("overscan") for n in cal.notes)
    s0 = cal.flat_scale[0]
    truth = ov_night["sky"] / 65535.0 * s0 / (20000.0 / 65535.0)  # sky in the flat's units: C = sky * s0 / F_level
    err = float(np.median(np.abs(cal.data / truth - 1.0)))
    assert err < 0.01, err  # without the correction the light's drift (up to 120 ADU on 800) stays

    # a light of another geometry is left alone and says so
    other = calibrate_light(np.full((10, 12), 0.1, np.float32), overscan=lib.overscan)
    assert other.data.shape == (10, 12) and any("not applied" in n for n in other.notes)

    # another overscan setting: the masters are re-integrated, not matched in their old geometry
    lib.close()
    plain = CalibrationLibrary(tmp_path / "lib")
    assert plain.match(info).dark is None and set(plain.pending()) == {r.path.rsplit("/", 1)[1][:-5] for r in recs.values()}
    plain.rebuild()
    assert {fitsio.read_image(r.path).data.shape for r in plain.masters()} == {(_OV_H, _OV_W)}
    assert all(r.overscan == "" for r in plain.masters()) and plain.match(info).dark is not None
    ms = plain.match(info)
    uncorrected = calibrate_light(light, bias=plain.load(ms.bias), dark=plain.load(ms.dark), flat=plain.load(ms.flat))
    err_plain = float(np.median(np.abs(uncorrected.data[:, :_OV_IMG_W] / truth - 1.0)))
    print(f"overscan: median error {err:.4f} corrected, {err_plain:.4f} without")
    assert err_plain > 3 * err  # the drift this seed draws is what the correction removes
    plain.close()


def test_pipeline_passes_the_overscan_configuration(tmp_path: Path) -> None:
    from stackwatch.daemon.config import config_from_mapping
    from stackwatch.daemon.pipeline import Pipeline

    files = _overscan_night(tmp_path / "raw")["files"]
    cfg = config_from_mapping({"calibration": {
        "overscan": [[_OV_IMG_W, 0, _OV_W, _OV_H, 0, 0, _OV_IMG_W, _OV_H]],
        "overscan_image_rect": [0, 0, _OV_IMG_W, _OV_H], "overscan_frame_px": [_OV_W, _OV_H]}})
    pipe = Pipeline(cfg, tmp_path / "state")
    try:
        for p in files["bias"] + files["dark"] + files["flat"]:
            pipe.add_calibration(Path(p))
        assert {m["overscan"] for m in pipe.flush_masters() + pipe.masters()} == {pipe.library.overscan.describe()}
        prep = pipe._prepare(files["light"][0])
        assert prep.data.shape == (_OV_H, _OV_IMG_W) and prep.saturated.shape == prep.data.shape
        assert prep.masters.dark is not None and prep.masters.flat is not None
        assert any(n.startswith("overscan") for n in prep.notes), prep.notes
    finally:
        pipe.close()


def test_clean_dark_is_optimised_and_always_mode_warns_about_glow(night: dict, tmp_path: Path) -> None:
    from stackwatch.engine.library import MatchRules

    spec = sim.SimulationSpec(width=128, height=96, n_lights=1, n_darks=7, n_biases=7, n_flats=0, n_darkflats=0,
                              exposure_s=120.0, dark_exposure_s=300.0, amp_glow_e_per_s=0.0, seed=22)
    truth = sim.make_truth(spec)
    folder = tmp_path / "clean"
    folder.mkdir()
    paths: dict[str, list[str]] = {"bias": [], "dark": [], "light": []}
    for fr in sim.iter_night(truth, kinds=("bias", "dark", "light")):
        p = folder / fr.filename
        sim.write_fits(p, fr.data, fr.header)
        paths[fr.kind].append(str(p))
    lib = CalibrationLibrary(tmp_path / "lib")
    lib.add_frames(paths["bias"] + paths["dark"])
    light = paths["light"][0]
    ms = lib.match(classify(fitsio.read_header(light), light))
    assert ms.optimize_dark and not any("glow" in e for e in ms.explanations), ms.explanations
    lib.close()
    # the glowing night with optimisation forced: it runs, with a warning
    files = night["files"]
    forced = CalibrationLibrary(tmp_path / "forced", rules=MatchRules(optimize_darks="always"))
    forced.add_frames(files["bias"] + files["dark"])
    ms = forced.match(classify(fitsio.read_header(files["light"][0]), files["light"][0]))
    assert ms.optimize_dark and any("warning: amp glow" in e for e in ms.explanations), ms.explanations
    forced.close()
