"""fitsio against headers of other programs' calibrated files: the PEDESTAL keyword.

The pixel values are the truth the files were made from (zero-based, negatives included, as a
calibration program has them before it adds its pedestal); each file stores them the way the program
does, and the reader must give the truth back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from stackwatch.engine import fitsio

from tests.engine.test_fitsio import _write_xisf


def _truth(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Calibrated sky: a level of a few hundred ADU with read noise, some pixels below zero."""
    rng = np.random.default_rng(seed)
    sky = rng.normal(40.0, 30.0, size=shape)
    sky[::7, ::5] = rng.uniform(-60.0, -1.0, size=sky[::7, ::5].shape)  # over-subtracted pixels
    sky[3, 4] = 60000.0  # a star core
    return np.round(sky)


def _maxim_header() -> fits.Header:
    """A MaxIm DL calibrated light (SBIG FITS extension: PEDESTAL negative, "add to get zero-based")."""
    h = fits.Header()
    h["EXPTIME"] = (300.0, "duration of exposure in seconds")
    h["CCD-TEMP"] = (-20.05, "CCD temperature at start of exposure in C")
    h["IMAGETYP"] = ("Light Frame", "Type of image")
    h["CALSTAT"] = ("BDF", "Calibration status of image")
    h["PEDESTAL"] = (-100, "Correction to add for zero-based ADU")
    h["SWCREATE"] = ("MaxIm DL Version 6.40 200622 23VQA", "Name of software")
    return h


def test_maxim_negative_pedestal_uint16(tmp_path: Path) -> None:
    truth = _truth((40, 60), 1)
    stored = (truth + 100.0).astype(np.uint16)  # MaxIm writes BZERO 32768 unsigned 16-bit
    path = tmp_path / "M51_Light_001.fit"
    fits.PrimaryHDU(stored, header=_maxim_header()).writeto(path)
    assert fits.getheader(path)["BZERO"] == 32768
    img = fitsio.read_image(path)
    np.testing.assert_allclose(img.data, truth / 65535.0, rtol=2e-7, atol=1e-9)
    assert float(np.min(img.data)) < 0  # negatives survive: no clipping at the old zero
    np.testing.assert_array_equal(fitsio.read_rows(path, 5, 17), img.data[5:17])
    # the returned header describes pedestal-free data: reading a product written with it is exact
    assert "PEDESTAL" not in img.header
    assert any("PEDESTAL" in str(line) for line in img.header.get("HISTORY", []))
    out = tmp_path / "product.fits"
    fitsio.write_image(out, img.data, header=img.header)
    np.testing.assert_array_equal(fitsio.read_image(out).data, img.data)
    # saturation: the stored full scale minus the pedestal
    assert img.saturation == pytest.approx((0.999 * 65535 - 100) / 65535)


def test_pixinsight_positive_pedestal_float_normalised(tmp_path: Path) -> None:
    """PixInsight's ImageCalibration output pedestal: positive DN, float data in [0, 1]."""
    truth = _truth((32, 48), 2) / 65535.0
    h = fits.Header()
    h["IMAGETYP"] = "Light"
    h["PEDESTAL"] = (150, "Value in DN added to enforce positivity")
    h.add_history("ImageCalibration.outputPedestal: 150")
    path = tmp_path / "M51_Light_001_c.fits"
    fits.PrimaryHDU((truth + 150.0 / 65535.0).astype(np.float32), header=h).writeto(path)
    img = fitsio.read_image(path)
    assert img.scale == 1.0
    np.testing.assert_allclose(img.data, truth, rtol=0, atol=2e-7)  # float32 storage of the sum
    np.testing.assert_array_equal(fitsio.read_rows(path, 0, 32), img.data)


def test_pedestal_as_product_of_the_same_program_sign_does_not_matter(tmp_path: Path) -> None:
    """Both signs mean the same amount above zero; a product the pipeline wrote (SWNORM) carries no
    PEDESTAL even when the source header had one."""
    truth = _truth((20, 30), 3)
    for sign in (1, -1):
        h = fits.Header()
        h["PEDESTAL"] = sign * 200
        path = tmp_path / f"s{sign}.fits"
        fits.PrimaryHDU((truth + 200.0).astype(np.int32), header=h).writeto(path)  # int32 ADU
        np.testing.assert_allclose(fitsio.read_image(path).data, truth / 65535.0, rtol=2e-7, atol=1e-9)
    written = tmp_path / "w.fits"
    h = fits.Header()
    h["PEDESTAL"] = 100
    fitsio.write_image(written, truth / 65535.0, header=h)
    assert "PEDESTAL" not in fits.getheader(written)


def test_pedestal_xisf_uint16(tmp_path: Path) -> None:
    truth = _truth((23, 31), 4)
    stored = (truth + 100.0).astype(np.uint16)
    path = _write_xisf(tmp_path / "cal.xisf", stored, fmt="UInt16", keywords={"PEDESTAL": "100", "IMAGETYP": "'Light'"})
    img = fitsio.read_image(path)
    np.testing.assert_allclose(img.data, truth / 65535.0, rtol=2e-7, atol=1e-9)
    np.testing.assert_array_equal(fitsio.read_rows(path, 2, 9), img.data[2:9])


@pytest.mark.parametrize("value", [0, "junk", None])
def test_no_or_bad_pedestal_changes_nothing(tmp_path: Path, value: object) -> None:
    raw = np.random.default_rng(5).integers(0, 65535, size=(10, 12)).astype(np.uint16)
    hdu = fits.PrimaryHDU(raw)
    if value is not None:
        hdu.header["PEDESTAL"] = value
    img = fitsio.read_image(_write_path(tmp_path / "a.fits", hdu))
    np.testing.assert_array_equal(img.data, (raw / 65535.0).astype(np.float32))


def _write_path(path: Path, hdu: fits.PrimaryHDU) -> Path:
    hdu.writeto(path)
    return path
