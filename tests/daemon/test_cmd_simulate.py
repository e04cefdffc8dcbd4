"""`stackwatch simulate`: writes a night, refuses a non-empty folder, reports bad options in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from astropy.io import fits
from stackwatch.daemon.cli import main


def test_simulate_writes_a_night(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "night"
    rc = main(["simulate", str(out), "--lights", "4", "--calibration", "1", "--width", "96", "--height", "64",
               "--flip", "--clouds", "2:0.7", "--seed", "3", "--field-psf", "0.2"])
    assert rc == 0
    assert "4 light" in capsys.readouterr().out
    for folder, n in (("lights", 4), ("darks", 1), ("flats", 1), ("darkflats", 1), ("biases", 1)):
        assert len(list((out / folder).glob("*.fits"))) == n
    doc = json.loads((out / "truth" / "truth.json").read_text())
    lights = [f for f in doc["frames"] if f["kind"] == "light"]
    assert doc["spec"]["seed"] == 3 and doc["spec"]["meridian_flip_after"] == 1 and doc["spec"]["field_psf"] == 0.2
    assert lights[2]["cloud"] == 0.7 and lights[1]["trails"]  # default: a satellite in light 1
    assert [f["pier_side"] for f in lights] == ["West", "West", "East", "East"]
    hdr = fits.getheader(out / lights[3]["file"])
    assert hdr["PIERSIDE"] == "East" and hdr["IMAGETYP"] == "LIGHT"


def test_simulate_osc_lights_only(tmp_path: Path) -> None:
    out = tmp_path / "osc"
    assert main(["simulate", str(out), "--osc", "--lights", "2", "--no-calibration", "--no-truth",
                 "--width", "64", "--height", "48", "--quiet", "--style", "ekos", "--bottom-up"]) == 0
    files = sorted(out.rglob("*.fits"))
    assert [p.name for p in files] == ["Light_001.fits", "Light_002.fits"]
    hdrs = [fits.getheader(p) for p in files]
    assert all(h["BAYERPAT"] == "GBRG" and h["ROWORDER"] == "BOTTOM-UP" and h["FRAME"] == "Light" for h in hdrs)
    assert not (out / "truth").exists()


def test_simulate_refuses_non_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.txt").write_text("x")
    assert main(["simulate", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "Traceback" not in err


def test_simulate_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", str(tmp_path / "a"), "--clouds", "x"]) == 2
    assert main(["simulate", str(tmp_path / "b"), "--lights", "3", "--trails", "7"]) == 1
    assert "only 3 lights" in capsys.readouterr().err
    assert main(["simulate", str(tmp_path / "c"), "--width", "101"]) == 1
    assert main(["simulate", str(tmp_path / "d"), "--lights", "3", "--flip-after", "2"]) == 1
    assert "--flip-after 2" in capsys.readouterr().err


@pytest.mark.parametrize("osc", [False, True])
def test_inspect_classifies_every_simulated_frame(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  osc: bool) -> None:
    out = tmp_path / "night"
    argv = ["simulate", str(out), "--lights", "3", "--calibration", "2", "--width", "64", "--height", "48", "--quiet"]
    if osc:
        argv.append("--osc")
    else:
        argv += ["--filters", "L,Ha", "--dark-exposure", "300"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    doc = json.loads((out / "truth" / "truth.json").read_text())
    truth = {str(out / f["file"]): f for f in doc["frames"]}
    seen = {str(Path(r["path"])): r for r in records if r.get("error") is None}
    assert set(truth) <= set(seen)
    for path, f in truth.items():
        rec = seen[path]
        assert rec["kind"] == f["kind"], path
        assert rec["exposure_s"] == pytest.approx(f["exposure_s"])
        assert rec["temperature_c"] == pytest.approx(f["temperature_c"])
        assert rec["shape"] == [48, 64]
        if f["kind"] in ("light", "flat"):
            assert (rec["filter"] or "").lower() == f["filter"].lower()
        if osc:
            assert rec["bayer"] == "RGGB"
    assert not [r for r in records if str(Path(r["path"])) not in truth]  # truth/ holds no frames
