"""write_image converts and writes each HDU's data a chunk of rows at a time: its files must be
byte for byte those of astropy's HDUList.writeto with the whole converted arrays (as it wrote them
before), for every type the extensions take."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from astropy.io import fits
from stackwatch.engine import fitsio


def _reference(path, data, header, history, extras):
    """The former write_image: HDUList.writeto with whole float32 / converted arrays."""
    hdr = fitsio._prepare_header(header, history)
    hdus = [fits.PrimaryHDU(np.ascontiguousarray(data, dtype=np.float32), header=hdr)]
    for name, a in extras.items():
        a = np.asarray(a)
        if a.dtype == np.bool_:
            a = a.astype(np.uint8)
        elif a.dtype.kind in "iu" and a.dtype.itemsize <= 4:
            a = a.astype(a.dtype.newbyteorder("="), copy=False)
        else:
            a = a.astype(np.float32)
        hdus.append(fits.ImageHDU(a, name=name.upper()))
    with open(path, "wb") as fh:
        fits.HDUList(hdus).writeto(fh, output_verify="silentfix")


def _extras(rng, shape):
    h, w = shape[-2:]
    return {
        "rej_low": rng.integers(0, 7, (h, w)).astype(np.uint16),
        "COVERAGE": rng.integers(0, 65535, (h, w)).astype(np.uint16),
        "WEIGHT": rng.random((h, w)),  # float64 -> float32
        "MASK": rng.random((h, w)) > 0.5,
        "I8": rng.integers(-128, 127, (h, w)).astype(np.int8),
        "U8": rng.integers(0, 255, (h, w)).astype(np.uint8),
        "I16": rng.integers(-30000, 30000, (h, w)).astype(np.int16),
        "I32": rng.integers(-(2**31), 2**31 - 1, (h, w)).astype(np.int32),
        "U32": rng.integers(0, 2**32 - 1, (h, w), dtype=np.uint64).astype(np.uint32),
        "I64": rng.integers(-(2**40), 2**40, (h, w)).astype(np.int64),  # -> float32
        "BE": rng.random((h, w)).astype(">f4"),
        "EMPTY": np.zeros((0,), np.float32),  # a product with no pixel (an empty mask list)
    }


@pytest.mark.parametrize("shape", [(37, 53), (3, 29, 41), (1000, 3001)])
def test_write_image_bytes_equal_astropy_writeto(tmp_path, monkeypatch, shape):
    # small chunks: several per plane, the last one short
    monkeypatch.setattr(fitsio, "_WRITE_CHUNK_BYTES", 7 * 4 * shape[-1] + 5)
    rng = np.random.default_rng(3)
    data = rng.normal(0.1, 0.02, shape).astype(np.float64)
    data.flat[::97] = np.nan
    header = fits.Header()
    header["OBJECT"] = "M31"
    header["EXPTIME"] = 120.0
    header["BITPIX"] = 16  # structural: dropped
    header["LONGSTR"] = "x" * 120  # CONTINUE cards
    extras = _extras(rng, shape) if len(shape) == 2 else {"COVERAGE": rng.integers(0, 9, shape).astype(np.uint16)}
    history = ["stackwatch: stacked /a/b.fits", "y" * 150]
    fitsio.write_image(tmp_path / "new.fits", data, header=header, history=history, extra_hdus=extras)
    _reference(tmp_path / "ref.fits", data, header, history, extras)
    new = (tmp_path / "new.fits").read_bytes()
    assert new == (tmp_path / "ref.fits").read_bytes()
    with fits.open(tmp_path / "new.fits") as hdul:  # and astropy reads back the values
        np.testing.assert_array_equal(hdul[0].data, data.astype(np.float32))
        for name, a in extras.items():
            got = hdul[name.upper()].data
            want = a.astype(np.uint8) if a.dtype == np.bool_ else a
            if a.dtype.kind == "f" or a.dtype == np.int64:
                want = a.astype(np.float32)
            np.testing.assert_array_equal(got, want)
            assert got.dtype.kind == want.dtype.kind and got.dtype.itemsize == want.dtype.itemsize


def test_write_image_gz_content_equal_astropy_writeto(tmp_path):
    rng = np.random.default_rng(4)
    data = rng.random((3, 31, 47)).astype(np.float32)
    extras = {"WEIGHT": rng.random((31, 47)).astype(np.float32), "REJ_LOW": np.ones((31, 47), np.uint16)}
    fitsio.write_image(tmp_path / "new.fits.gz", data, extra_hdus=extras)
    _reference(tmp_path / "ref.fits", data, None, (), extras)
    assert gzip.decompress((tmp_path / "new.fits.gz").read_bytes()) == (tmp_path / "ref.fits").read_bytes()


def test_write_image_fz_keeps_extras(tmp_path):
    rng = np.random.default_rng(5)
    data = rng.random((31, 47)).astype(np.float32)
    extras = {"COVERAGE": np.full((31, 47), 6, np.uint16).astype(np.float32), "MASK": data > 0.5}
    fitsio.write_image(tmp_path / "x.fits.fz", data, extra_hdus=extras)
    with fits.open(tmp_path / "x.fits.fz") as hdul:
        np.testing.assert_array_equal(hdul[1].data, data)
        np.testing.assert_array_equal(hdul["COVERAGE"].data, extras["COVERAGE"])
        np.testing.assert_array_equal(hdul["MASK"].data, (data > 0.5).astype(np.uint8))
