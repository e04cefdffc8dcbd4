"""classify: frame kinds and keys from the headers real capture programs write, and from paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from astropy.io import fits
from stackwatch.engine import fitsio
from stackwatch.engine.classify import (
    BIAS_MAX_EXPOSURE_S,
    classify,
    kind_from_name,
    kind_from_value,
    normalize_filter,
)

HEADERS = Path(__file__).resolve().parent.parent / "data" / "headers"


def _fixture(name: str) -> fits.Header:
    return fits.Header.fromtextfile(str(HEADERS / name))


# --------------------------------------------------------------------------------------------------
# One header per capture program (written from each program's documented keyword conventions)


def test_nina_light() -> None:
    info = classify(_fixture("nina_light.txt"), "/night/M 42/LIGHT/M42_2024-03-09_0001.fits")
    assert info.kind == "light" and info.kind_source == "header:IMAGETYP"
    assert info.camera == "ZWO ASI2600MM Pro"
    assert info.exposure_s == 300.0 and info.gain == 100 and info.offset == 50
    assert info.temperature_c == -9.8  # CCD-TEMP wins over SET-TEMP
    assert info.binning == (1, 1) and info.shape == (4176, 6248)
    assert info.filter == "ha" and info.object == "M 42"
    assert info.ra_deg == pytest.approx(83.8220833) and info.dec_deg == pytest.approx(-5.3911111)
    assert info.bayer is None and info.pixel_size_um == 3.76 and info.focal_length_mm == 550.0
    assert info.date_obs == "2024-03-09T21:15:03.123"
    assert info.pixel_scale_arcsec == pytest.approx(206.265 * 3.76 / 550, rel=1e-4)
    assert not info.is_calibration


def test_sgp_flat() -> None:
    info = classify(_fixture("sgp_flat.txt"), "C:/SGP/NGC7000/Flats/NGC7000_Flat_OIII_001.fit")
    assert info.kind == "flat" and info.exposure_s == 1.52
    assert info.gain == 139 and info.offset == 21 and info.temperature_c == -15.2
    assert info.filter == "oiii" and info.bayer == "RGGB" and info.shape == (3520, 4656)
    assert info.date_obs == "2023-08-14T03:58:40.123"  # 7 fractional digits trimmed
    assert info.is_calibration


def test_ekos_dark_frame_keyword() -> None:
    info = classify(_fixture("ekos_dark.txt"), "/home/u/Pictures/Darks/Dark_001.fits")
    assert info.kind == "dark" and info.kind_source == "header:FRAME"
    assert info.exposure_s == 60.0 and info.gain == 180 and info.offset == 10
    assert info.pixel_size_um == 3.75 and info.temperature_c == 21.5 and info.bayer == "RGGB"


def test_sharpcap_light_without_imagetyp() -> None:
    header = _fixture("sharpcap_light.txt")
    info = classify(header, "/SharpCap Captures/2023-12-01/NGC 281/Light/21_04_33/Light_00001.fits")
    assert info.kind == "light" and info.kind_source == "name"
    # YBAYROFF = 1 folds into the effective pattern of data[0:2, 0:2]
    assert info.bayer == "GBRG" and info.exposure_s == 30.0
    assert info.gain == 100 and info.offset == 30 and info.temperature_c == -4.9
    # the same header in a darks folder with an uninformative name is a dark
    assert classify(header, "/SharpCap Captures/darks/Capture_00001.fits").kind == "dark"
    del header["EXPTIME"]
    assert classify(header, "/x/Capture_00001.fits").exposure_s == pytest.approx(30.0)  # EXPOINUS


def test_apt_dslr_bias() -> None:
    info = classify(_fixture("apt_bias.txt"), "/APT_Images/Camera_1/Bias/bias_0001.fits")
    assert info.kind == "bias" and info.exposure_s == pytest.approx(0.00025)
    assert info.gain == 800  # ISOSPEED for DSLRs
    assert info.camera == "Canon EOS 6D" and info.bayer == "RGGB"


def test_asiair_dark_flat() -> None:
    info = classify(_fixture("asiair_flatdark.txt"), "/ASIAIR/Autorun/Flat/x.fit")
    assert info.kind == "darkflat"  # the keyword beats the folder name
    assert info.exposure_s == 0.46 and info.gain == 120 and info.offset == 30
    assert info.temperature_c == pytest.approx(-0.1)


def test_maxim_light() -> None:
    info = classify(_fixture("maxim_light.txt"), "D:/Images/NGC3368-001-Lum.fit")
    assert info.kind == "light" and info.binning == (2, 2)
    assert info.gain is None  # EGAIN is e-/ADU, not the gain setting
    assert info.offset is None and info.filter == "lum"
    assert info.ra_deg == pytest.approx((10 + 47 / 60 + 15 / 3600) * 15)
    assert info.dec_deg == pytest.approx(12 + 34 / 60 + 56 / 3600)
    assert info.temperature_c == pytest.approx(-19.95)


def test_fixtures_cover_every_program() -> None:
    names = {p.stem for p in HEADERS.glob("*.txt")}
    for program in ("nina", "sgp", "ekos", "sharpcap", "apt", "asiair", "maxim"):
        assert any(n.startswith(program) for n in names), program


# --------------------------------------------------------------------------------------------------
# Every spelling


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("LIGHT", "light"),
        ("Light Frame", "light"),
        ("Light", "light"),
        ("light_frame", "light"),
        ("OBJECT", "light"),
        ("Science", "light"),
        ("DARK", "dark"),
        ("Dark Frame", "dark"),
        ("dark", "dark"),
        ("BIAS", "bias"),
        ("Bias Frame", "bias"),
        ("Offset", "bias"),
        ("OFFSET FRAME", "bias"),
        ("ZERO", "bias"),
        ("FLAT", "flat"),
        ("Flat Field", "flat"),
        ("Flat Frame", "flat"),
        ("SKYFLAT", "flat"),
        ("Dome Flat", "flat"),
        ("DARKFLAT", "darkflat"),
        ("FLATDARK", "darkflat"),
        ("Dark Flat", "darkflat"),
        ("Flat Dark", "darkflat"),
        ("Flat-Dark", "darkflat"),
        ("Dark-Flat", "darkflat"),
        ("FlatDark", "darkflat"),
        ("DarkFlat", "darkflat"),
        ("dark_flat", "darkflat"),
        ("  light  ", "light"),
    ],
)
def test_every_imagetyp_spelling(value: str, kind: str) -> None:
    assert kind_from_value(value) == kind
    for key in ("IMAGETYP", "IMAGETYPE", "FRAMETYP", "FRAME", "OBSTYPE"):
        header = fits.Header({key: value, "EXPTIME": 10.0})
        info = classify(header, "/x/y.fits")
        assert info.kind == kind, (key, value)
        assert info.kind_source == f"header:{key}"


@pytest.mark.parametrize("value", ["Tricolor Image", "", "FK5", "whatever"])
def test_unknown_values_fall_through(value: str) -> None:
    assert kind_from_value(value) is None
    assert classify(fits.Header({"IMAGETYP": value}), "/x/darks/001.fits").kind == "dark"
    assert classify(fits.Header({"IMAGETYP": value}), "/x/001.fits").kind == "unknown"


def test_bias_from_short_dark() -> None:
    for exposure, kind in [(0.0, "bias"), (0.000032, "bias"), (BIAS_MAX_EXPOSURE_S, "bias"), (0.0011, "dark"), (300.0, "dark")]:
        assert classify(fits.Header({"IMAGETYP": "Dark Frame", "EXPTIME": exposure}), "d.fits").kind == kind
    # short flats and flat-darks stay what they are (bright panels need sub-millisecond flats)
    assert classify(fits.Header({"IMAGETYP": "FLAT", "EXPTIME": 0.0005}), "f.fits").kind == "flat"
    assert classify(fits.Header({"IMAGETYP": "DARKFLAT", "EXPTIME": 0.0005}), "f.fits").kind == "darkflat"
    # a darks folder with zero-second frames: bias
    assert classify(fits.Header({"EXPTIME": 0.0}), "/x/darks/d_0001.fits").kind == "bias"


# --------------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/night/Lights/img_0001.fits", "light"),
        ("/night/LIGHT_0001.fits", "light"),
        ("/night/M31_LIGHT_gain100_offset50_0001.fits", "light"),  # offset setting is not a bias
        ("/night/M31_300s_DARK_-10C_0001.fits", "dark"),
        ("/night/darks/0001.fits", "dark"),
        ("/night/FlatWizard/Frame_0001.fits", "flat"),
        ("/night/flat-darks/0001.fits", "darkflat"),
        ("/night/DarkFlats/0001.fits", "darkflat"),
        ("/night/FlatDarks/0001.fits", "darkflat"),
        ("/night/Dark_Flat_0001.fits", "darkflat"),
        ("/night/flats/0001_dark.fits", "dark"),  # the file name is nearer than the folder
        ("/night/biases/0001.fits", "bias"),
        ("/night/Bias_0001.fits", "bias"),
        ("/night/Offsets/0001.fits", "bias"),
        ("/night/Flats/Ha/0001.fits.gz", "flat"),
        ("/night/microobs_hatp32/HATP-32171220013343.fits.gz", None),
        ("/darkstar/obs/img.fits", None),  # "darkstar" is not the word "dark"
        ("/Dark Sky Site/2024/M31/Ha/session1/img.fits", None),  # too far up to describe the frame
        ("/night/Darks/2024-01-01/gain100/-10C/img.fits", "dark"),  # 4th folder up still counts
        ("C:\\Astro\\Flats\\f_001.fits", "flat"),  # one POSIX name, its words still tell
        ("", None),
    ],
)
def test_kind_from_name(path: str, kind: str | None) -> None:
    assert kind_from_name(path) == kind


def test_content_rule_for_silent_headers() -> None:
    # MicroObservatory style: no type keyword, no telling name, but a target and an exposure
    header = fits.Header({"OBJECT": "HATP-32", "EXPTIME": 60.0, "RA": 31.31, "DEC": 46.77})
    info = classify(header, "/data/microobs_hatp32/HATP-32171220013343.fits.gz")
    assert info.kind == "light" and info.kind_source == "content"
    assert classify(fits.Header({"EXPTIME": 60.0}), "/data/x/001.fits").kind == "unknown"
    assert classify(fits.Header({"OBJECT": "Unknown", "EXPTIME": 6.0}), "/data/x/001.fits").kind == "unknown"
    assert classify(fits.Header({"OBJECT": "M 1", "EXPTIME": 0.0}), "/data/x/001.fits").kind == "unknown"


# --------------------------------------------------------------------------------------------------
# Keys


def test_temperature_rules() -> None:
    assert classify(fits.Header({"CAMTEMP": 271.0}), "").temperature_c == pytest.approx(-2.15)  # kelvin
    assert classify(fits.Header({"CAMTEMP": -1}), "").temperature_c is None  # MicroObservatory: no data
    assert classify(fits.Header({"SET-TEMP": -10.0}), "").temperature_c == -10.0
    assert classify(fits.Header({"CCD_TEMP": -5.5, "SET-TEMP": -10.0}), "").temperature_c == -5.5
    assert classify(fits.Header({"TEMPERAT": 12.0}), "").temperature_c == 12.0
    assert classify(fits.Header({"CCD-TEMP": "n/a", "SET-TEMP": -3.0}), "").temperature_c == -3.0


def test_keys_defaults_and_alternatives() -> None:
    info = classify(fits.Header({"NAXIS": 3, "NAXIS1": 40, "NAXIS2": 30, "NAXIS3": 3}), "")
    assert info.shape == (3, 30, 40) and info.binning == (1, 1) and info.exposure_s is None
    assert info.gain is None and info.filter == "" and info.camera == "" and info.date_obs is None
    h = fits.Header({"EXPOSURE": 120.0, "BLKLEVEL": 7, "ISO": 1600, "PIXSIZE1": 4.3, "XBINNING": 2, "YBINNING": 2})
    info = classify(h, "")
    assert info.exposure_s == 120.0 and info.offset == 7 and info.gain == 1600
    assert info.pixel_size_um == 8.6 and info.binning == (2, 2)  # PIXSIZE1 is unbinned
    assert normalize_filter("  Ha ") == "ha" and normalize_filter("None") == "" and normalize_filter("L") == "l"


@pytest.mark.parametrize(
    ("ra", "dec", "ra_deg", "dec_deg"),
    [
        ("05 35 17.3", "-05 23 28", 83.8220833, -5.3911111),
        ("05:35:17.3", "-05:23:28", 83.8220833, -5.3911111),
        ("05h35m17.3s", "-05d23m28s", 83.8220833, -5.3911111),
        ("00 00 00", "-00 30 00", 0.0, -0.5),
        (83.822, -5.391, 83.822, -5.391),
    ],
)
def test_pointing(ra: object, dec: object, ra_deg: float, dec_deg: float) -> None:
    key_ra, key_dec = ("RA", "DEC") if isinstance(ra, float) else ("OBJCTRA", "OBJCTDEC")
    info = classify(fits.Header({key_ra: ra, key_dec: dec}), "")
    assert info.ra_deg == pytest.approx(ra_deg, abs=1e-4) and info.dec_deg == pytest.approx(dec_deg, abs=1e-4)


def test_dates() -> None:
    # local time with a zone (MicroObservatory) is converted to UTC
    assert classify(fits.Header({"DATE-OBS": "2017-12-19T18:33:43.317-0700"}), "").date_obs == "2017-12-20T01:33:43.317"
    assert classify(fits.Header({"DATE-OBS": "2024-01-02", "TIME-OBS": "03:04:05.5"}), "").date_obs == "2024-01-02T03:04:05.500"
    assert classify(fits.Header({"DATE-OBS": "2024-01-02T03:04:05Z"}), "").date_obs == "2024-01-02T03:04:05.000"
    assert classify(fits.Header({"MJD-OBS": 60000.5}), "").date_obs == "2023-02-25T12:00:00.000"
    assert classify(fits.Header({"DATE-OBS": "28/03/93"}), "").date_obs is None


def test_malformed_card_reads_as_absent() -> None:
    header = fits.Header.fromstring(
        "EXPTIME =                 30.0 / ok".ljust(80) + "GAIN    = 'unterminated / broken".ljust(80), sep=""
    )
    info = classify(header, "/x/Lights/a.fits")
    assert info.kind == "light" and info.exposure_s == 30.0 and info.gain is None


def test_same_result_from_file_header_and_image_header(tmp_path: Path) -> None:
    import numpy as np

    hdu = fits.PrimaryHDU(np.zeros((10, 12), np.uint16))
    hdu.header.update({"IMAGETYP": "LIGHT", "BAYERPAT": "RGGB", "ROWORDER": "BOTTOM-UP", "EXPTIME": 5.0})
    path = tmp_path / "a.fits"
    hdu.writeto(path)
    a = classify(fitsio.read_header(path), str(path))
    b = classify(fitsio.read_image(path).header, str(path))
    assert a == b and a.bayer == "GBRG"


def test_real_frames(real_data: Path) -> None:
    for path in sorted((real_data / "asi224mc_m27").glob("*.fits.gz")):
        info = classify(fitsio.read_header(path), str(path))
        assert info.kind == "light" and info.kind_source == "header:FRAME"
        assert info.bayer == "RGGB" and info.exposure_s == 6.0 and info.gain == 180
        assert info.pixel_scale_arcsec == pytest.approx(1.5169, rel=1e-3)  # SECPIX1 in the header
    for path in sorted((real_data / "microobs_hatp32").glob("*.fits.gz")):
        info = classify(fitsio.read_header(path), str(path))
        assert info.kind == "light" and info.kind_source == "content"
        assert info.exposure_s == 60.0 and info.object == "HATP-32" and info.filter == "clear"
        assert info.temperature_c is not None and -30 < info.temperature_c < 30
        assert info.date_obs is not None and info.date_obs.startswith("2017-12-20T")
        assert info.pixel_scale_arcsec == pytest.approx(5.21)  # IM_SCALE


def test_matching_keys() -> None:
    info = classify(_fixture("maxim_light.txt"), "a.fit")
    assert info.readout_mode == "Monochrome" and info.subframe_origin == (0, 0)
    assert info.pixel_size_um == pytest.approx(10.8)  # XPIXSZ already includes binning
    h = fits.Header({"PIXSIZE1": 3.75, "XBINNING": 2, "YBINNING": 2, "ROTATANG": -90.0, "XORGSUBF": 10, "YORGSUBF": 20})
    info = classify(h, "a.fits")
    assert info.pixel_size_um == 7.5  # INDI's PIXSIZE1 is unbinned
    assert info.rotator_deg == 270.0 and info.subframe_origin == (10, 20)
    a = classify(fits.Header({"INSTRUME": "cam", "GAIN": 100, "READOUTM": "High Gain"}), "a.fits")
    b = classify(fits.Header({"INSTRUME": "cam", "GAIN": 100, "READOUTM": "Low Noise"}), "a.fits")
    assert a.sensor_key != b.sensor_key


def test_json_round_trip_and_calibration_key() -> None:
    import dataclasses
    import json

    info = classify(_fixture("ekos_dark.txt"), "/x/Darks/d1.fits")
    back = type(info)(**json.loads(json.dumps(dataclasses.asdict(info))))
    assert back == info and hash(back.sensor_key) == hash(info.sensor_key)
    assert info.calibration_key[0] == "dark" and info.calibration_key[-2] == 60000
    h = _fixture("ekos_dark.txt")
    h["EXPTIME"] = 120.0
    longer = classify(h, "/x/Darks/d2.fits")
    assert longer.calibration_key != info.calibration_key
    h = _fixture("ekos_dark.txt")
    h["CCD-TEMP"] = 25.0
    warmer = classify(h, "/x/Darks/d3.fits")
    assert warmer.calibration_key == info.calibration_key  # temperature is matched with a tolerance
    flat_l = classify(fits.Header({"IMAGETYP": "FLAT", "FILTER": "L"}), "f.fits")
    flat_r = classify(fits.Header({"IMAGETYP": "FLAT", "FILTER": "R"}), "f.fits")
    assert flat_l.calibration_key != flat_r.calibration_key
