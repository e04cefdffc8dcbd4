"""classify against the headers capture programs write: frame types, exposure, gain/ISO, temperature,
binning, filter spellings, and the target when OBJECT names none."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from stackwatch.engine.classify import (
    classify,
    field_name,
    field_target,
    is_no_target,
    kind_from_value,
    separation_deg,
)


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


@pytest.mark.parametrize(
    ("value", "kind"),
    [("Sky Flats", "flat"), ("Twilight Flats", "flat"), ("Dusk Flat", "flat"), ("Dawn flat", "flat"),
     ("EL Flat", "flat"), ("Flat-Field", "flat"), ("Dark Flats", "darkflat"), ("Flat Darks", "darkflat"),
     ("DarkFlat Frame", "darkflat"), ("Offset Frame", "bias"), ("Bias Frames", "bias"), ("Lights", "light"),
     ("Master Flat", None), ("Master Dark", None), ("Tricolor Image", None)],
)
def test_frame_type_spellings(value: str, kind: str | None) -> None:
    assert kind_from_value(value) == kind


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
    assert classify(_header({"IMAGETYP": "LIGHT", "EXPTIME": 60.0, "OBJECT": name})).object == name


def test_placeholders_are_one_target_and_keep_their_pointing() -> None:
    infos = [classify(_header({"IMAGETYP": "LIGHT", "EXPTIME": 60.0, "RA": 83.8, "DEC": -5.4, "OBJECT": o}))
             for o in ("Unknown", "undefined", "none", "-", "N/A")]
    infos.append(classify(_header({"IMAGETYP": "LIGHT", "EXPTIME": 60.0, "OBJCTRA": "05 35 17.3",
                                   "OBJCTDEC": "-05 23 28"})))
    assert {i.object for i in infos} == {""}
    assert all(i.ra_deg is not None and i.dec_deg is not None for i in infos)
    # a placeholder alone does not make a frame without type a light; a pointing does
    assert classify(_header({"EXPTIME": 60.0, "OBJECT": "undefined"})).kind == "unknown"
    assert classify(_header({"EXPTIME": 60.0, "OBJECT": "undefined", "RA": 83.8, "DEC": -5.4})).kind == "light"


def _offset(ra: float, dec: float, east_deg: float, north_deg: float) -> tuple[float, float]:
    return (ra + east_deg / max(np.cos(np.radians(dec)), 1e-6)) % 360.0, float(np.clip(dec + north_deg, -90, 90))


@pytest.mark.parametrize("spread_arcmin", [3.0, 10.0, 20.0])
def test_field_target_never_splits_a_dithered_field(spread_arcmin: float) -> None:
    """150 random fields (uniform on the sky), 30 frames each dithered by up to ±spread in both axes, in
    random order of arrival: every field gets one target, and no two fields (≥ 2.5° apart) share one."""
    rng = np.random.default_rng(int(spread_arcmin))
    centres: list[tuple[float, float]] = []
    while len(centres) < 150:
        c = (rng.uniform(0, 360), float(np.degrees(np.arcsin(rng.uniform(-1, 1)))))
        if all(separation_deg(*c, *o) >= 2.5 for o in centres):
            centres.append(c)
    frames = [(i, *_offset(*c, *(rng.uniform(-spread_arcmin, spread_arcmin, 2) / 60.0)))
              for i, c in enumerate(centres) for _ in range(30)]
    rng.shuffle(frames)
    fields: dict[str, tuple[float, float]] = {}
    names: dict[int, set[str]] = {}
    for i, ra, dec in frames:
        name = field_target(ra, dec, fields)
        fields.setdefault(name, (ra, dec))
        names.setdefault(i, set()).add(name)
    assert all(len(n) == 1 for n in names.values())
    assert len({next(iter(n)) for n in names.values()}) == len(centres)


def test_field_names_and_separation() -> None:
    assert field_name(83.822, -5.391) == "field 05h35m S05d23m"
    assert field_name(83.822, 5.391) == "field 05h35m N05d23m"
    assert field_name(359.999, 89.99) == "field 00h00m N89d59m"
    # against astropy's separation (Vincenty) from arcseconds to the antipode
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    rng = np.random.default_rng(7)
    for _ in range(200):
        ra1, ra2 = rng.uniform(0, 360, 2)
        dec1, dec2 = np.degrees(np.arcsin(rng.uniform(-1, 1, 2)))
        if rng.uniform() < 0.5:
            ra2, dec2 = _offset(ra1, dec1, *(rng.normal(0, 1.0 / 60, 2)))
        ref = SkyCoord(ra1 * u.deg, dec1 * u.deg).separation(SkyCoord(ra2 * u.deg, dec2 * u.deg)).deg
        assert separation_deg(ra1, dec1, ra2, dec2) == pytest.approx(ref, abs=1e-9)
