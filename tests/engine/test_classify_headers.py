"""classify against the headers capture programs write: frame types, exposure, gain/ISO, temperature,
binning, filter spellings, and the target when OBJECT names none."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from stackwatch.engine.classify import classify, is_no_target, target_name


def _header(cards: dict[str, object]) -> fits.Header:
    h = fits.Header()
    h["SIMPLE"] = True
    h["BITPIX"] = 16
    h["NAXIS"] = 2
    h["NAXIS1"] = 64
    h["NAXIS2"] = 48
    for k, v in cards.items():
        h[f"HIERARCH {k}" if len(k) > 8 or " " in k else k] = v
    return h


# (program, cards, expected kind, exposure s, gain, temperature °C, binning, filter)
PROGRAMS = [
    ("MaxIm DL light", {"IMAGETYP": "Light Frame", "EXPTIME": 300.0, "EXPOSURE": 300.0, "CCD-TEMP": -19.87,
                        "SET-TEMP": -20.0, "XBINNING": 2, "YBINNING": 2, "FILTER": "Red", "EGAIN": 1.4},
     "light", 300.0, None, -19.87, (2, 2), "red"),
    ("MaxIm DL dark", {"IMAGETYP": "Dark Frame", "EXPTIME": 300.0, "CCD-TEMP": -20.1}, "dark", 300.0, None, -20.1,
     (1, 1), ""),
    ("MaxIm DL flat", {"IMAGETYP": "Flat Field", "EXPTIME": 1.5, "FILTER": "Ha      "}, "flat", 1.5, None, None,
     (1, 1), "ha"),
    ("MaxIm DL bias", {"IMAGETYP": "Bias Frame", "EXPTIME": 0.0}, "bias", 0.0, None, None, (1, 1), ""),
    ("N.I.N.A. light", {"IMAGETYP": "LIGHT", "EXPOSURE": 180.0, "EXPTIME": 180.0, "GAIN": 100, "OFFSET": 50,
                        "CCD-TEMP": -10.0, "SET-TEMP": -10.0, "XBINNING": 1, "FILTER": "L"},
     "light", 180.0, 100.0, -10.0, (1, 1), "l"),
    ("N.I.N.A. flat dark", {"IMAGETYP": "DARKFLAT", "EXPOSURE": 2.4, "GAIN": 100}, "darkflat", 2.4, 100.0, None,
     (1, 1), ""),
    ("SGP flat dark", {"IMAGETYP": "Flat Dark", "EXPOSURE": 2.4}, "darkflat", 2.4, None, None, (1, 1), ""),
    ("Ekos light", {"FRAME": "Light", "IMAGETYP": "Light Frame", "EXPTIME": 120.0, "GAIN": 139.0,
                    "CCD-TEMP": -15.0, "XBINNING": 1, "FILTER": "Luminance"},
     "light", 120.0, 139.0, -15.0, (1, 1), "luminance"),
    ("Ekos dark flat", {"FRAME": "Dark Flat", "EXPTIME": 1.0}, "darkflat", 1.0, None, None, (1, 1), ""),
    ("SharpCap light", {"IMAGETYP": "Light", "EXPOINUS": 15000000, "GAIN": 200, "BLKLEVEL": 40,
                        "CCD-TEMP": -5.2, "XBINNING": 1}, "light", 15.0, 200.0, -5.2, (1, 1), ""),
    ("ASIAIR flat", {"IMAGETYP": "Flat", "EXPTIME": 0.85, "GAIN": 100, "OFFSET": 50, "CCD-TEMP": 0.3,
                     "FILTER": "L-eNhance "}, "flat", 0.85, 100.0, 0.3, (1, 1), "l-enhance"),
    ("APT DSLR light", {"IMAGETYP": "Light", "EXPTIME": 240.0, "ISOSPEED": 800, "CCD-TEMP": 21.0},
     "light", 240.0, 800.0, 21.0, (1, 1), ""),
    ("Siril DSLR conversion", {"EXPTIME": 240.0, "ISOSPEED": 1600, "OBJECT": "M 31"}, "light", 240.0, 1600.0, None,
     (1, 1), ""),
    ("Siril, temperature as CAMTCCD", {"IMAGETYP": "Dark", "EXPTIME": 60.0, "CAMTCCD": -9.8}, "dark", 60.0, None,
     -9.8, (1, 1), ""),
    ("Voyager light", {"IMAGETYP": "LIGHT", "EXPTIME": 300.0, "CCD-TEMP": -10.0, "FRAMETYP": "Light"},
     "light", 300.0, None, -10.0, (1, 1), ""),
    ("FRAMETYP only", {"FRAMETYP": "Dark", "EXPTIME": 30.0}, "dark", 30.0, None, None, (1, 1), ""),
    ("lightframe", {"IMAGETYP": "lightframe", "EXPTIME": 30.0}, "light", 30.0, None, None, (1, 1), ""),
    ("a set point only", {"IMAGETYP": "Dark", "EXPTIME": 30.0, "SET-TEMP": -10.0}, "dark", 30.0, None, -10.0,
     (1, 1), ""),
]


@pytest.mark.parametrize(("program", "cards", "kind", "exposure", "gain", "temp", "binning", "filt"), PROGRAMS,
                         ids=[p[0] for p in PROGRAMS])
def test_programs(program: str, cards: dict[str, object], kind: str, exposure: float, gain: float | None,
                  temp: float | None, binning: tuple[int, int], filt: str) -> None:
    info = classify(_header(cards), "/capture/frame_0001.fits")
    assert (info.kind, info.exposure_s, info.gain, info.temperature_c, info.binning, info.filter) == (
        kind, exposure, gain, temp, binning, filt
    ), program


def test_measured_temperature_wins_over_the_set_point() -> None:
    info = classify(_header({"IMAGETYP": "Dark", "EXPTIME": 30.0, "SET-TEMP": -10.0, "CCD-TEMP": -8.4}))
    assert info.temperature_c == -8.4


# --------------------------------------------------------------------------------------------------
# The target when OBJECT names none


@pytest.mark.parametrize("name", ["", "Unknown", "UNKNOWN ", "undefined", "None", "none", "-", " -- ", "?", "N/A"])
def test_placeholder_objects_name_no_target(name: str) -> None:
    assert is_no_target(name)


@pytest.mark.parametrize("name", ["M 42", "NGC 7000", "C/2025 R2 (SWAN)", "Sh2-129", "IC 1396 - Elephant", "Mars"])
def test_real_names_are_kept(name: str) -> None:
    assert not is_no_target(name)
    assert target_name(name, 10.0, 20.0) == name


@pytest.mark.parametrize(
    ("ra", "dec"), [(83.82, -5.39), (10.68, 41.27), (299.9, 40.7), (0.1, 0.3), (359.95, -0.2), (37.95, 89.26)]
)
def test_a_dithered_night_of_one_field_is_one_target(ra: float, dec: float) -> None:
    """Placeholders from several programs over a night dithered by up to ±3' (and a night's pointing
    repeatability of a go-to): one target, named after the field; 3° away is another target."""
    rng = np.random.default_rng(int(ra * 100 + dec))
    spellings = ["Unknown", "", "undefined", "none", "-"]
    names = set()
    for i in range(60):
        dra = rng.uniform(-3, 3) / 60.0 / max(np.cos(np.radians(dec)), 0.05)
        ddec = rng.uniform(-3, 3) / 60.0
        cards: dict[str, object] = {"IMAGETYP": "LIGHT", "EXPTIME": 60.0, "RA": (ra + dra) % 360.0,
                                    "DEC": min(90.0, dec + ddec)}
        if spellings[i % 5]:
            cards["OBJECT"] = spellings[i % 5]
        info = classify(_header(cards))
        names.add(info.object)
    assert len(names) == 1, names
    (name,) = names
    assert name.startswith("field ")
    other = classify(_header({"IMAGETYP": "LIGHT", "EXPTIME": 60.0, "OBJECT": "Unknown", "RA": ra, "DEC": dec - 3.0}))
    assert other.object != name


def test_sexagesimal_pointing_and_no_pointing() -> None:
    # OBJCTRA/OBJCTDEC strings (MaxIm, N.I.N.A.) give the same field as RA/DEC in degrees
    a = classify(_header({"IMAGETYP": "LIGHT", "EXPTIME": 60.0, "OBJECT": "Unknown",
                          "OBJCTRA": "05 35 17.3", "OBJCTDEC": "-05 23 28"}))
    b = classify(_header({"IMAGETYP": "LIGHT", "EXPTIME": 60.0, "RA": 83.822, "DEC": -5.391}))
    assert a.object == b.object == "field 05h34m -05°"
    # no name, no pointing: no target (the pipeline's single "unknown" stack)
    assert classify(_header({"IMAGETYP": "LIGHT", "EXPTIME": 60.0, "OBJECT": "Unknown"})).object == ""
    # a placeholder alone does not make a frame without type a light; a pointing does
    assert classify(_header({"EXPTIME": 60.0, "OBJECT": "undefined"})).kind == "unknown"
    assert classify(_header({"EXPTIME": 60.0, "OBJECT": "undefined", "RA": 83.8, "DEC": -5.4})).kind == "light"
