"""`stackwatch masters`: builds the library from folders, ignores lights, prints one record per master."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stackwatch.daemon.cli import main

pytest.importorskip("stackwatch.engine.integrate")
sim = pytest.importorskip("stackwatch.engine.simulate")


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = sim.SimulationSpec(width=96, height=64, n_lights=2, n_darks=3, n_biases=3, n_flats=3, n_darkflats=3, seed=5)
    truth = sim.make_truth(spec)
    folder = tmp_path_factory.mktemp("night")
    for fr in sim.iter_night(truth):
        sim.write_fits(folder / fr.filename, fr.data, fr.header)
    return folder


def test_masters_json_and_update(night: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lib = tmp_path / "lib"
    assert main(["masters", str(night), "--library", str(lib), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    kinds = sorted(r["kind"] for r in records)
    assert kinds == ["bias", "dark", "darkflat", "flat"]
    for r in records:
        assert r["ncombine"] == 3 and Path(r["path"]).is_file() and r["updated"]
        assert {"exposure_s", "gain", "offset", "binning", "shape"} <= set(r["key"])
    # second run over the same files: nothing to update, same masters
    assert main(["masters", str(night), "--library", str(lib)]) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert lines[0].split()[:2] == ["kind", "exposure_s"] and len(lines) == 5
    assert "*" not in out.out and "0 updated" in out.err


def test_bad_usage_and_unreadable_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["masters", str(tmp_path / "nope"), "--library", str(tmp_path / "lib")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "in" / "bad.fits"
    bad.parent.mkdir()
    bad.write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    assert main(["masters", str(bad.parent), "--library", str(tmp_path / "lib")]) == 0
    err = capsys.readouterr().err
    assert "bad.fits" in err and "Traceback" not in err and "no calibration frames" in err


def test_debayered_calibration_frame_is_refused_by_name(night: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np
    from astropy.io import fits

    rgb = tmp_path / "rgb" / "FLAT_RGB_001.fits"
    rgb.parent.mkdir()
    hdr = fits.Header({"IMAGETYP": "Flat Field", "EXPTIME": 2.0, "FILTER": "L", "DATE-OBS": "2026-11-21T17:00:00"})
    fits.PrimaryHDU(np.full((3, 64, 96), 20000, np.uint16), hdr).writeto(rgb)
    assert main(["masters", str(night), str(rgb.parent), "--library", str(tmp_path / "lib"), "--json"]) == 0
    out = capsys.readouterr()
    assert sorted(r["kind"] for r in json.loads(out.out)) == ["bias", "dark", "darkflat", "flat"]
    line = next(x for x in out.err.splitlines() if "FLAT_RGB_001.fits" in x)
    assert "3 colour planes" in line and "raw" in line and "Traceback" not in out.err


def test_overscan_from_the_configuration(night: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from astropy.io import fits

    cfg = tmp_path / "stackwatch.toml"
    cfg.write_text("[calibration]\noverscan = [[0, 0, 2, 64, 2, 0, 96, 64]]\noverscan_image_rect = [2, 0, 96, 64]\n")
    assert main(["masters", str(night), "--library", str(tmp_path / "lib"), "--config", str(cfg), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 4
    for r in records:
        assert r["overscan"].startswith("overscan [0,0,2,64]->[2,0,96,64]") and r["key"]["shape"] == [64, 96]
        assert fits.getdata(r["path"]).shape == (64, 94) and fits.getheader(r["path"])["OVERSCAN"] is True
