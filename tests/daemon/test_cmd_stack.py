"""`stackwatch stack` on simulated nights: report contract, registration vs truth, trails, reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from stackwatch.daemon.cli import main
from stackwatch.engine import simulate, stats


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, simulate.Truth]:
    out = tmp_path_factory.mktemp("night")
    spec = simulate.preset("small", n_lights=8, n_darks=4, n_flats=4, n_darkflats=4, n_biases=4, seed=21,
                           trails=(2,), clouds=((5, 0.6),), stars_per_mpix=30000.0)
    truth = simulate.simulate_night(spec, out)
    return out, truth


@pytest.fixture(scope="module")
def stacked(night: tuple[Path, simulate.Truth], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder, _ = night
    out = tmp_path_factory.mktemp("out")
    code = main(["stack", str(folder), "--out", str(out / "stack.fits"), "--report", str(out / "report.json"),
                 "--quiet"])
    assert code == 0
    return out, json.loads((out / "report.json").read_text())


def _grid_error(m: np.ndarray, t: np.ndarray, shape: tuple[int, int]) -> float:
    ys, xs = np.mgrid[0 : shape[0] : 16, 0 : shape[1] : 16]
    pts = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    d = (m @ pts - t @ pts)[:2]
    return float(np.sqrt((d**2).sum(0).mean()))


def test_report_contract(stacked: tuple[Path, dict], night: tuple[Path, simulate.Truth]) -> None:
    out, report = stacked
    assert set(report) >= {"frames", "stacks"}
    lights = [f for f in report["frames"] if f["kind"] == "light"]
    assert len(lights) == 8
    for f in lights:
        for key in ("path", "kind", "status", "reason", "stars", "fwhm_px", "fwhm_arcsec", "eccentricity",
                    "background", "noise", "transform", "scale", "weight", "masters"):
            assert key in f, key
        assert f["status"] in ("stacked", "rejected", "failed")
        assert np.asarray(f["transform"]).shape == (2, 3)
    (stack,) = report["stacks"]
    for key in ("target", "filter", "path", "ncombine", "exposure_s", "reference"):
        assert key in stack
    assert stack["ncombine"] == sum(f["status"] == "stacked" for f in lights)
    with fits.open(stack["path"]) as hdul:
        assert hdul[0].data.dtype.byteorder in (">", "=") and hdul[0].data.shape == (384, 512)
        assert hdul[0].header["NCOMBINE"] == stack["ncombine"]
        assert {"REJ_LOW", "REJ_HIGH", "COVERAGE", "WEIGHT"} <= {h.name for h in hdul}
        h0 = hdul[0].header
        cov = hdul["COVERAGE"].data.astype(np.float64).sum()
        assert h0["REJHIGH"] == pytest.approx(hdul["REJ_HIGH"].data.astype(np.float64).sum() / cov, rel=1e-6)
        assert 0 <= h0["REJLOW"] < 0.01 and 0 < h0["REJHIGH"] < 0.05  # trails are rejected, little else
        assert any("stackwatch" in str(h) for h in hdul[0].header.get("HISTORY", []))
    for suffix in ("rejlow", "rejhigh", "coverage"):
        assert (out / f"stack_{suffix}.fits").exists()
    masters = lights[0]["masters"]
    assert masters["bias"] and masters["dark"] and masters["flat"], masters


def test_registration_and_scale_vs_truth(stacked: tuple[Path, dict], night: tuple[Path, simulate.Truth]) -> None:
    _, report = stacked
    folder, _ = night
    tj = json.loads((folder / "truth" / "truth.json").read_text())
    by_name = {Path(f["file"]).name: f for f in tj["frames"] if f["kind"] == "light"}
    ref_name = Path(report["stacks"][0]["reference"]).name
    t_ref = np.asarray(by_name[ref_name]["matrix"])
    errors = []
    for f in report["frames"]:
        if f["kind"] != "light" or f["status"] != "stacked":
            continue
        t = np.asarray(by_name[Path(f["path"]).name]["matrix"])
        # truth maps frame -> light 1; ours maps frame -> the chosen reference
        t_to_ref = np.linalg.inv(t_ref) @ t
        m = np.vstack([np.asarray(f["transform"]), [0.0, 0.0, 1.0]])
        errors.append(_grid_error(m, t_to_ref, (384, 512)))
    assert max(errors) < 0.05, errors
    cloud = next(f for f in report["frames"] if Path(f["path"]).name == tj["frames"][[
        i for i, fr in enumerate(tj["frames"]) if fr["kind"] == "light"][5]]["file"].split("/")[-1])
    if cloud["status"] == "stacked":
        tr = by_name[Path(cloud["path"]).name]["transparency"] / by_name[ref_name]["transparency"]
        assert cloud["scale"] == pytest.approx(1.0 / tr, rel=0.02)


def test_trail_leaves_nothing(stacked: tuple[Path, dict], night: tuple[Path, simulate.Truth],
                              tmp_path: Path) -> None:
    """The stack equals, on the trail's pixels, a stack made without the trailed frame (within 5σ)."""
    out, report = stacked
    folder, truth = night
    trail_frame = next(fr for fr in truth.frames if fr.kind == "light" and fr.trails)
    subset = tmp_path / "subset"
    shutil.copytree(folder, subset, ignore=shutil.ignore_patterns("truth"))
    (subset / trail_frame.file).unlink()
    ref = report["stacks"][0]["reference"]
    ref_in_subset = subset / Path(ref).relative_to(folder)
    code = main(["stack", str(subset), "--out", str(tmp_path / "s.fits"), "--reference", str(ref_in_subset),
                 "--quiet"])
    assert code == 0
    full = fits.getdata(out / "stack.fits").astype(np.float64)
    without = fits.getdata(tmp_path / "s.fits").astype(np.float64)
    sigma = stats.mrs_noise(np.nan_to_num(full, nan=float(np.nanmedian(full))).astype(np.float32)).sigma
    mask = simulate.trail_mask(truth, trail_frame)
    # the trail is in frame coordinates; dithers are a few px, so dilate generously
    from scipy import ndimage

    both = ndimage.binary_dilation(mask, iterations=12) & np.isfinite(full) & np.isfinite(without)
    # sky pixels only: star cores carry shot noise far above the background σ and differ between
    # any two frame sets
    sky = without < np.nanmedian(without) + 5 * sigma
    both &= ndimage.binary_erosion(sky, iterations=3)
    assert both.sum() > 100
    resid = full[both] - without[both]
    assert resid.max() < 5 * sigma, (resid.max() / sigma)
    assert abs(float(np.mean(resid))) < 0.3 * sigma, float(np.mean(resid)) / sigma


def test_nothing_to_stack_is_a_clear_error(tmp_path: Path, night: tuple[Path, simulate.Truth], capsys) -> None:
    folder, _ = night
    code = main(["stack", str(folder / "darks"), "--out", str(tmp_path / "x.fits"), "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "no light frames" in err and "Traceback" not in err


def test_duplicate_content_is_stacked_once(tmp_path: Path, night: tuple[Path, simulate.Truth]) -> None:
    folder, _ = night
    sub = tmp_path / "sub"
    shutil.copytree(folder / "lights", sub / "lights")
    first = sorted((sub / "lights").iterdir())[0]
    shutil.copyfile(first, sub / "lights" / "copy.fits")
    report = tmp_path / "r.json"
    assert main(["stack", str(sub), "--out", str(tmp_path / "s.fits"), "--report", str(report), "--quiet"]) == 0
    rep = json.loads(report.read_text())
    dup = [f for f in rep["frames"] if "duplicate" in (f.get("reason") or "")]
    assert len(dup) == 1 and dup[0]["status"] == "rejected"
    assert rep["stacks"][0]["ncombine"] <= 8
    # no calibration frames: each light says what it lacked
    lights = [f for f in rep["frames"] if f["status"] == "stacked"]
    assert lights and all(f["masters"]["missing"] for f in lights)


def test_excluding_a_frame_equals_batch_without_it(tmp_path: Path, night: tuple[Path, simulate.Truth],
                                                   stacked: tuple[Path, dict]) -> None:
    """The service's exclusion path: live removal, then the exact pass equals a batch without the frame."""
    from stackwatch.daemon.config import Config
    from stackwatch.daemon.pipeline import Pipeline, classify_paths

    folder, _ = night
    _, report = stacked
    ref = report["stacks"][0]["reference"]
    pipe = Pipeline(Config(), tmp_path / "state")
    try:
        for path, info, _err in classify_paths([folder]):
            assert info is not None
            if info.kind == "light":
                pipe.process_light(path, info)
            else:
                pipe.add_calibration(path, info)
        (sid,) = [s["id"] for s in pipe.stacks()]
        pipe.finalize(sid)
        members = [m for m in pipe.members(sid) if m["status"] == "stacked" and m["path"] != ref]
        victim = members[1]["path"]
        before = pipe.stacks()[0]["ncombine"]
        pipe.exclude_frame(victim, True)
        assert pipe.stacks()[0]["ncombine"] == before - 1
        image = pipe.finalize(sid, out_path=tmp_path / "live.fits")["path"]
    finally:
        pipe.close()
    sub = tmp_path / "sub"
    shutil.copytree(folder, sub, ignore=shutil.ignore_patterns("truth"))
    (sub / Path(victim).relative_to(folder)).unlink()
    assert main(["stack", str(sub), "--out", str(tmp_path / "batch.fits"), "--reference",
                 str(sub / Path(ref).relative_to(folder)), "--quiet"]) == 0
    a = fits.getdata(image).astype(np.float64)
    b = fits.getdata(tmp_path / "batch.fits").astype(np.float64)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    ok = np.isfinite(a)
    assert np.max(np.abs(a[ok] - b[ok])) <= 1e-6 * np.nanmax(np.abs(b))


def test_new_stack_takes_the_next_lights(tmp_path: Path, night: tuple[Path, simulate.Truth]) -> None:
    from stackwatch.daemon.config import Config
    from stackwatch.daemon.pipeline import Pipeline, classify_paths

    folder, _ = night
    lights = [(p, i) for p, i, _ in classify_paths([folder / "lights"]) if i is not None]
    pipe = Pipeline(Config(), tmp_path / "state")
    try:
        first = pipe.process_light(*lights[0])
        created = pipe.new_stack(lights[0][1].object, lights[0][1].filter)
        assert created["id"] != first["stack_id"] and created["ncombine"] == 0
        second = pipe.process_light(*lights[1])
        assert second["stack_id"] == created["id"]
        assert pipe.process_light(*lights[0])["stack_id"] == first["stack_id"]  # idempotent, stays put
    finally:
        pipe.close()
    reopened = Pipeline(Config(), tmp_path / "state")  # the choice survives a restart
    try:
        assert {s["id"]: s["closed"] for s in reopened.stacks()} == {first["stack_id"]: True, created["id"]: False}
    finally:
        reopened.close()


@pytest.mark.parametrize(("folder", "min_stacked"), [("microobs_hatp32", 14), ("asi224mc_m27", 6)])
def test_stack_real_frames(real_data: Path, tmp_path: Path, folder: str, min_stacked: int) -> None:
    """Real skies, no calibration frames (MicroObservatory mono without IMAGETYP; INDI one-shot colour):
    the stack is written, its background noise drops as the weighted frames predict, and its stars are
    as sharp as the frames'."""
    from stackwatch.engine import fitsio, stars

    out = tmp_path / "stack.fits"
    code = main(["stack", str(real_data / folder), "--out", str(out), "--report", str(tmp_path / "r.json"),
                 "--state", str(tmp_path / "state"), "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    done = [f for f in report["frames"] if f["status"] == "stacked"]
    assert len(done) >= min_stacked, [(f["path"], f["reason"]) for f in report["frames"]]
    assert all(f["reason"] for f in report["frames"] if f["status"] != "stacked")
    (st,) = report["stacks"]
    assert st["ncombine"] == len(done)
    image = fitsio.read_image(out).data
    lum = image if image.ndim == 2 else image.mean(axis=0)
    core = lum[lum.shape[0] // 8 : -lum.shape[0] // 8, lum.shape[1] // 8 : -lum.shape[1] // 8]
    assert np.isfinite(core).all()
    w = np.array([f["weight"] for f in done])
    n_eff = w.sum() ** 2 / (w**2).sum()
    noise = float(stats.mrs_noise(core).sigma)
    # the reference as stacked (calibrated, debayered, on its own grid) from the frame store
    (ref_file,) = [p for p in (tmp_path / "state" / "frames").glob("*/*.npy") if not p.name.endswith(".sat.npy")
                   and np.load(p, mmap_mode="r").shape == image.shape and p.stem in _reference_ids(tmp_path)]
    ref_img = np.load(ref_file)
    ref_lum = ref_img if ref_img.ndim == 2 else ref_img.mean(axis=0)
    ref_noise = float(stats.mrs_noise(ref_lum[lum.shape[0] // 8 : -lum.shape[0] // 8,
                                              lum.shape[1] // 8 : -lum.shape[1] // 8]).sigma)
    # no darks or flats: fixed-pattern noise does not average down (measured 1.18 mono, 0.93 colour)
    assert noise < 1.35 * ref_noise / np.sqrt(n_eff), (noise, ref_noise, n_eff)
    m = stars.measure(np.ascontiguousarray(core, np.float32))
    median_fwhm = float(np.median([f["fwhm_px"] for f in done]))
    assert m.metrics.fwhm_px <= 1.08 * median_fwhm, (m.metrics.fwhm_px, median_fwhm)


def _reference_ids(tmp_path: Path) -> set[str]:
    return {json.loads(p.read_text())["reference"]["frame_id"] for p in (tmp_path / "state" / "stacks").glob("*/stack.json")}
