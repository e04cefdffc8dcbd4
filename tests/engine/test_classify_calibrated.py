"""What another program already did to a frame, from its header: calibration steps applied to a light
(MaxIm DL, PixInsight, Siril, IRAF) and masters integrated elsewhere."""

from __future__ import annotations

import pytest
from astropy.io import fits
from stackwatch.engine.classify import classify


def _light(**cards: object) -> fits.Header:
    h = fits.Header()
    h["NAXIS"], h["NAXIS1"], h["NAXIS2"] = 2, 64, 48
    h["IMAGETYP"], h["EXPTIME"], h["OBJECT"] = "Light Frame", 300.0, "M 31"
    for k, v in cards.items():
        h[k] = v
    return h


@pytest.mark.parametrize(
    ("cards", "history", "steps", "evidence"),
    [
        ({"CALSTAT": "BDF"}, [], ("bias", "dark", "flat"), "MaxIm DL CALSTAT 'BDF'"),
        ({"CALSTAT": "BD"}, [], ("bias", "dark"), "MaxIm DL CALSTAT 'BD'"),
        ({"CALSTAT": "D"}, [], ("bias", "dark"), "MaxIm DL CALSTAT 'D'"),  # a raw dark holds the bias
        ({"CALSTAT": "B"}, [], ("bias",), "MaxIm DL CALSTAT 'B'"),
        ({}, ["ImageCalibration.masterBias.fileName: C:/m/MasterBias.xisf",
              "ImageCalibration.masterFlat.fileName: C:/m/MasterFlat_Ha.xisf"], ("bias", "flat"),
         "PixInsight ImageCalibration HISTORY (bias, flat)"),
        ({}, ["Calibrated with an optimized master dark (factor: 0.981)",
              "Calibrated with a master flat, normalization of 0.412"], ("bias", "dark", "flat"), "Siril HISTORY (dark, flat)"),
        ({}, ["Calibrated with a synthetic bias of 2048"], ("bias",), "Siril HISTORY (bias)"),
        ({"ZEROCOR": "Jan 5 12:00 Zero level correction image is Zero"}, [], ("bias",), "ZEROCOR"),
        ({}, [], (), ""),
        ({"CALSTAT": ""}, ["Calibrated? not by us"], (), ""),
    ],
)
def test_applied_calibration(cards: dict[str, object], history: list[str], steps: tuple[str, ...], evidence: str) -> None:
    h = _light(**cards)
    for line in history:
        h.add_history(line)
    info = classify(h, "/night/LIGHT_0001.fits")
    assert info.kind == "light"
    assert info.calibrated == steps
    assert info.calibrated_by == evidence


@pytest.mark.parametrize(
    ("imagetyp", "name", "ncombine", "kind", "evidence"),
    [
        ("Master Dark", "dark_300s.fits", None, "dark", "IMAGETYP 'Master Dark'"),
        ("MasterFlat", "flat_Ha.fits", None, "flat", "IMAGETYP 'MasterFlat'"),
        ("Master Flat Dark", "x.fits", None, "darkflat", "IMAGETYP 'Master Flat Dark'"),
        (None, "master_dark_300s.fits", None, "dark", "file name 'master_dark_300s.fits'"),
        (None, "MasterBias_gain100.xisf", None, "bias", "file name 'MasterBias_gain100.xisf'"),
        ("Dark", "integration.fits", 20, "dark", "NCOMBINE 20"),
        ("Dark", "dark_0001.fits", None, "dark", ""),
        ("Dark", "dark_0001.fits", 1, "dark", ""),
    ],
)
def test_foreign_masters(imagetyp: str | None, name: str, ncombine: int | None, kind: str, evidence: str) -> None:
    h = fits.Header()
    h["NAXIS"], h["NAXIS1"], h["NAXIS2"], h["EXPTIME"] = 2, 64, 48, 300.0
    if imagetyp:
        h["IMAGETYP"] = imagetyp
    if ncombine is not None:
        h["NCOMBINE"] = ncombine
    info = classify(h, f"/night/{name}")
    assert info.kind == kind
    assert info.foreign_master == evidence
    assert info.calibrated == ()  # only lights carry applied steps
