"""A library written before master keys had the readout mode: its masters get their members' mode
when the library is opened, so new frames of that mode join them and matching sees the mode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from astropy.io import fits
from stackwatch.daemon.library_store import CalibrationLibrary
from stackwatch.engine.library import MasterKey


def _dark(path: Path, mode: str, seed: int) -> str:
    rng = np.random.default_rng(seed)
    hdu = fits.PrimaryHDU(rng.normal(800.0, 12.0, size=(24, 32)).astype(np.uint16))
    h = hdu.header
    h["IMAGETYP"] = "DARK"
    h["EXPOSURE"] = 300.0
    h["GAIN"] = 26
    h["OFFSET"] = 30
    h["INSTRUME"] = "QHY268M"
    h["CCD-TEMP"] = -10.0
    h["READOUTM"] = mode
    h["DATE-OBS"] = f"2026-11-21T0{seed % 10}:00:00"
    hdu.writeto(path)
    return str(path)


def _as_before_the_mode_was_keyed(root: Path) -> None:
    """Rewrite the index as the previous version stored it: keys without readout_mode."""
    import sqlite3

    db = sqlite3.connect(root / "index.sqlite")
    for mid, key_json, record_json in db.execute("SELECT id, key, record FROM masters").fetchall():
        d = json.loads(key_json)
        d.pop("readout_mode", None)
        old = MasterKey.from_dict(d)
        rec = json.loads(record_json)
        rec["key"] = d
        db.execute("UPDATE masters SET key = ?, key_id = ?, record = ? WHERE id = ?",
                   (json.dumps(d), old.id, json.dumps(rec), mid))
    db.commit()
    db.close()


def test_old_masters_take_their_members_mode(tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    darks = [_dark(frames / f"dark_{i}.fits", "PhotoGraphic DSO", i) for i in range(4)]
    root = tmp_path / "lib"
    with CalibrationLibrary(root) as lib:
        lib.add_frames(darks[:3])
        (before,) = lib.masters()
    _as_before_the_mode_was_keyed(root)
    with CalibrationLibrary(root) as lib:
        (rec,) = lib.masters()
        assert rec.key.readout_mode == "photographic dso" and rec.path == before.path
        lib.add_frames(darks[3:])  # joins the old master instead of starting a new one
        (rec,) = lib.masters()
        assert rec.ncombine == 4 and rec.path == before.path


def test_old_master_of_mixed_modes_stays_without_mode(tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    root = tmp_path / "lib"
    a = _dark(frames / "a.fits", "PhotoGraphic DSO", 1)
    b = _dark(frames / "b.fits", "High Gain Mode", 2)
    with CalibrationLibrary(root) as lib:
        lib.add_frames([a, b])
    _as_before_the_mode_was_keyed(root)
    # the previous version put both in one master: give it both members
    import sqlite3

    db = sqlite3.connect(root / "index.sqlite")
    first = db.execute("SELECT id FROM masters ORDER BY id").fetchone()[0]
    db.execute("UPDATE members SET master_id = ?", (first,))
    db.execute("DELETE FROM masters WHERE id != ?", (first,))
    db.commit()
    db.close()
    with CalibrationLibrary(root) as lib:
        (rec,) = lib.masters()
        assert rec.key.readout_mode == ""
