"""`stackwatch inspect`: one record per file, errors reported without a traceback, exit codes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from stackwatch.daemon.cli import main


def _night(root: Path) -> dict[str, Path]:
    """A small capture folder: good frames of each kind plus every kind of broken file."""
    files: dict[str, Path] = {}
    (root / "Lights").mkdir(parents=True)
    (root / "darks").mkdir()
    (root / ".hidden").mkdir()
    data = np.random.default_rng(0).integers(100, 4000, size=(24, 32)).astype(np.uint16)

    hdu = fits.PrimaryHDU(data)
    hdu.header.update(
        {"IMAGETYP": "LIGHT", "EXPTIME": 300.0, "GAIN": 100, "OFFSET": 50, "CCD-TEMP": -10.0, "FILTER": "Ha ", "OBJECT": "M 42", "BAYERPAT": "RGGB"}
    )
    files["light"] = root / "Lights" / "M42_0001.fits"
    hdu.writeto(files["light"])

    dark = fits.PrimaryHDU(data)
    dark.header.update({"EXPTIME": 300.0, "GAIN": 100})
    files["dark"] = root / "darks" / "d_0001.FIT"
    with gzip.open(str(files["dark"]) + ".gz", "wb") as fh:
        dark.writeto(fh)
    files["dark"] = Path(str(files["dark"]) + ".gz")

    files["truncated"] = root / "Lights" / "M42_0002.fits"
    files["truncated"].write_bytes(files["light"].read_bytes()[:4000])
    files["nan"] = root / "Lights" / "M42_0003.fits"
    fits.PrimaryHDU(np.full((8, 8), np.nan, np.float32)).writeto(files["nan"])
    files["table"] = root / "table.fits"
    fits.HDUList(
        [fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column(name="a", format="E", array=np.ones(2))])]
    ).writeto(files["table"])
    files["text"] = root / "notes.fits"
    files["text"].write_text("not a fits file\n")
    files["cube"] = root / "cube.fits"
    fits.PrimaryHDU(np.zeros((4, 8, 8), np.uint16)).writeto(files["cube"])
    (root / "readme.txt").write_text("ignored: not a FITS name")
    fits.PrimaryHDU(data).writeto(root / ".hidden" / "x.fits")
    fits.PrimaryHDU(data).writeto(root / "Lights" / ".partial.fits")
    return files


def test_inspect_json_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = _night(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    records = {Path(r["path"]).name: r for r in json.loads(out)}
    assert set(records) == {p.name for p in files.values()}  # hidden files and non-FITS names skipped
    light = records["M42_0001.fits"]
    assert light["error"] is None
    assert light["kind"] == "light" and light["exposure_s"] == 300.0 and light["gain"] == 100
    assert light["offset"] == 50 and light["temperature_c"] == -10.0 and light["filter"] == "ha"
    assert light["object"] == "M 42" and light["shape"] == [24, 32] and light["binning"] == [1, 1]
    assert light["bayer"] == "RGGB"
    assert records["d_0001.FIT.gz"]["kind"] == "dark" and records["d_0001.FIT.gz"]["error"] is None
    expected = {
        "M42_0002.fits": "truncated",
        "M42_0003.fits": "no valid pixels",
        "table.fits": "no image",
        "notes.fits": "not a readable FITS file",
        "cube.fits": "4 planes",
    }
    for name, reason in expected.items():
        assert records[name]["kind"] == "unreadable"
        assert reason in records[name]["error"], (name, records[name]["error"])
    for rec in records.values():
        assert set(rec) >= {"path", "kind", "exposure_s", "gain", "offset", "temperature_c", "binning", "filter", "object", "shape", "bayer", "error"}


def test_inspect_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = _night(tmp_path)
    assert main(["inspect", str(files["light"]), str(files["truncated"])]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["path", "kind", "exposure_s", "gain", "offset", "temperature_c", "binning", "filter", "object", "shape", "bayer"]
    assert lines[1].split()[1:] == ["light", "300", "100", "50", "-10", "1x1", "ha", "M", "42", "24x32", "RGGB"]
    # columns are aligned: every field of the good row starts where its header starts
    assert lines[1].index("light") == lines[0].index("kind")
    assert lines[1].index("24x32") == lines[0].index("shape")
    assert "unreadable" in lines[2] and "error: truncated file" in lines[2]
    assert lines[2].index("unreadable") == lines[0].index("kind")
    assert lines[2].index("error:") == lines[0].index("exposure_s")
    assert "1 unreadable" in err and "Traceback" not in err


def test_inspect_headers_only_skips_pixels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = _night(tmp_path)
    assert main(["inspect", "--headers-only", "--json", str(files["nan"])]) == 0
    (rec,) = json.loads(capsys.readouterr().out)
    assert rec["error"] is None  # the header is fine; only a pixel read finds the NaN-only data


def test_inspect_bad_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "missing.fits")]) == 2
    err = capsys.readouterr().err
    assert "missing.fits" in err and "no such file" in err and "Traceback" not in err
    assert main(["inspect"]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["inspect", str(empty), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == [] and "no FITS or XISF files" in err


def test_inspect_real_data(real_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(real_data), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 27
    for rec in records:
        assert rec["error"] is None and rec["kind"] == "light", rec
        if "asi224mc" in rec["path"]:
            assert rec["bayer"] == "RGGB" and rec["kind_source"] == "header:FRAME" and rec["shape"] == [976, 1304]
        else:
            assert rec["kind_source"] == "content" and rec["exposure_s"] == 60.0 and rec["shape"] == [500, 650]
            assert -10 < rec["temperature_c"] < 5  # CAMTEMP kelvin converted
