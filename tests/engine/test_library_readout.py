"""Readout mode in master keys and matching (algorithms.md §2.4 "readout mode if present"), from the
headers N.I.N.A./ASCOM (READOUTM), INDI (READMODE) and XISF (HIERARCH READOUT MODE) write for
cameras with several modes (QHY268C: 'PhotoGraphic DSO', 'High Gain Mode', ...)."""

from __future__ import annotations

import dataclasses

import pytest
from astropy.io import fits
from stackwatch.engine import library
from stackwatch.engine.classify import FrameInfo, classify
from stackwatch.engine.library import MasterKey, MasterRecord


def _nina_header(kind: str, mode: str | None, *, exptime: float = 300.0, key: str = "READOUTM") -> fits.Header:
    """A N.I.N.A. 3 header of a QHY268C (one-shot colour) as it writes it."""
    h = fits.Header()
    h["SIMPLE"] = True
    h["BITPIX"] = 16
    h["NAXIS"] = 2
    h["NAXIS1"] = 600
    h["NAXIS2"] = 400
    h["IMAGETYP"] = (kind, "Type of exposure")
    h["EXPOSURE"] = (exptime, "[s] Exposure duration")
    h["EXPTIME"] = (exptime, "[s] Exposure duration")
    h["DATE-OBS"] = ("2026-11-21T22:00:00.123", "Time of observation (UTC)")
    h["XBINNING"] = (1, "X axis binning factor")
    h["YBINNING"] = (1, "Y axis binning factor")
    h["GAIN"] = (26, "Sensor gain")
    h["OFFSET"] = (30, "Sensor gain offset")
    h["INSTRUME"] = ("QHY268C", "Imaging instrument name")
    h["SET-TEMP"] = (-10.0, "[degC] CCD temperature setpoint")
    h["CCD-TEMP"] = (-10.0, "[degC] CCD temperature")
    if mode is not None:
        if " " in key:
            h[f"HIERARCH {key}"] = mode
        else:
            h[key] = (mode, "Sensor readout mode")
    h["BAYERPAT"] = ("RGGB", "Sensor Bayer pattern")
    h["FILTER"] = ("L-eXtreme", "Active filter name")
    h["OBJECT"] = ("NGC 7000", "Name of the object of interest")
    return h


def _info(kind: str, mode: str | None, **kw: object) -> FrameInfo:
    return classify(_nina_header(kind, mode, **kw), f"/night/{kind}.fits")  # type: ignore[arg-type]


def _rec(info: FrameInfo, n: int = 20) -> MasterRecord:
    key = library.master_key(info)
    assert key is not None
    return MasterRecord(key=key, path=f"/lib/{key.id}-{n}.fits", ncombine=n, exposure_s=info.exposure_s,
                        temperature_c=info.temperature_c, date_first=info.date_obs, date_last=info.date_obs)


@pytest.mark.parametrize("key", ["READOUTM", "READMODE", "READOUT MODE"])
def test_readout_mode_read_from_each_keyword(key: str) -> None:
    assert _info("DARK", "High Gain Mode", key=key).readout_mode == "High Gain Mode"
    assert _info("DARK", "  Raw     ", key=key).readout_mode == "Raw"  # padded as some drivers write it


def test_keys_split_by_mode_and_old_keys_keep_their_ids() -> None:
    dso = library.master_key(_info("DARK", "PhotoGraphic DSO"))
    hg = library.master_key(_info("DARK", "High Gain Mode"))
    none = library.master_key(_info("DARK", None))
    assert dso is not None and hg is not None and none is not None
    assert len({dso.id, hg.id, none.id}) == 3
    # case and padding are not another mode
    assert library.master_key(_info("DARK", "photographic  dso ")) == dso
    assert MasterKey.from_dict(dso.as_dict()) == dso
    # a key without a mode is stored as before the mode was keyed: same dict, same id (the id of this
    # key computed by the previous version of library.py), so libraries written then are still read
    assert "readout_mode" not in none.as_dict()
    assert none.id == "dark_300s_g26_o30_-10C_600x400_RGGB_ed2b20cd"
    old = {k: v for k, v in dso.as_dict().items() if k != "readout_mode"}
    assert MasterKey.from_dict(old) == none


def test_dark_of_another_mode_never_calibrates_a_light() -> None:
    light = _info("LIGHT", "PhotoGraphic DSO")
    dark_hg = _rec(_info("DARK", "High Gain Mode"), n=60)  # more frames: would win on every other rule
    bias_hg = _rec(_info("BIAS", "High Gain Mode", exptime=0.0), n=60)
    flat_hg = _rec(_info("FLAT", "High Gain Mode", exptime=2.0), n=60)
    ms = library.match(light, [dark_hg, bias_hg, flat_hg])
    assert ms.dark is None and ms.bias is None and ms.flat is None
    assert set(ms.missing) == {"dark", "bias", "flat"}
    assert any("readout mode 'high gain mode' not used for a 'photographic dso' frame" in e for e in ms.explanations)
    dark_dso = _rec(_info("DARK", "PhotoGraphic DSO"), n=5)
    flat_dso = _rec(_info("FLAT", "PhotoGraphic DSO", exptime=2.0), n=5)
    ms = library.match(light, [dark_hg, bias_hg, flat_hg, dark_dso, flat_dso])
    assert ms.dark is dark_dso and ms.flat is flat_dso and ms.dark_scale == 1.0
    assert not any("readout mode" in e for e in ms.explanations)


def test_absent_mode_matches_absent_mode_and_unknown_is_a_fallback_with_a_warning() -> None:
    light_none = _info("LIGHT", None)
    dark_none = _rec(_info("DARK", None))
    ms = library.match(light_none, [dark_none])
    assert ms.dark is dark_none and not any("readout mode" in e for e in ms.explanations)
    # the light says its mode, the only dark does not: used, with a warning
    light = _info("LIGHT", "PhotoGraphic DSO")
    ms = library.match(light, [dark_none])
    assert ms.dark is dark_none
    assert "dark: warning: master readout mode unknown, frame 'photographic dso'" in ms.explanations
    # ... but a dark of the light's own mode wins over it, even with fewer frames
    dark_dso = _rec(_info("DARK", "PhotoGraphic DSO"), n=3)
    assert library.match(light, [dark_none, dark_dso]).dark is dark_dso
    # and the other way round: a light without a mode takes a master that has one, with a warning
    ms = library.match(light_none, [dark_dso])
    assert ms.dark is dark_dso
    assert "dark: warning: frame readout mode unknown, master 'photographic dso'" in ms.explanations
    # while a master without a mode wins for a light without one
    assert library.match(light_none, [dark_dso, dataclasses.replace(dark_none, ncombine=2)]).dark.ncombine == 2  # type: ignore[union-attr]


def test_flat_calibration_uses_flat_darks_of_its_own_mode() -> None:
    flat = _info("FLAT", "High Gain Mode", exptime=2.0)
    fd_dso = _rec(_info("DARKFLAT", "PhotoGraphic DSO", exptime=2.0), n=30)
    bias_hg = _rec(_info("BIAS", "High Gain Mode", exptime=0.0))
    ms = library.match(flat, [fd_dso, bias_hg])
    assert ms.darkflat is None and ms.bias is bias_hg
    assert any("flat-dark: masters of readout mode 'photographic dso'" in e for e in ms.explanations)
    fd_hg = _rec(_info("DARKFLAT", "High Gain Mode", exptime=2.0), n=5)
    assert library.match(flat, [fd_dso, bias_hg, fd_hg]).darkflat is fd_hg
