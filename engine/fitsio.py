"""FITS input and output: the one place where file conventions become stackwatch conventions.

Reading (:func:`read_image`, :func:`read_rows`) returns native-endian, C-contiguous float32 pixels,
full scale 1.0, top-down (ROWORDER honoured), NaN for no data. Writing (:func:`write_image`) is
atomic float32 FITS with provenance.

Full scale (``Image.scale``: ``data = physical * scale`` where ``physical = raw * BSCALE + BZERO``):

============================================  ==================================================
stored as                                     scale
============================================  ==================================================
BITPIX 8 (unsigned by the standard)           1/255
BITPIX 16 with BZERO 32768 (unsigned 16-bit)  1/65535
BITPIX 16 without BZERO (signed)              1/65535; see *signed 16-bit* below
BITPIX 32 with BZERO 2**31 (unsigned 32-bit)  1/4294967295
BITPIX 32 signed                              1/65535 if every value fits 16 bits (ADU written as
                                              int32), else 1/2147483647
BITPIX -32/-64 (float)                        1 if written by write_image (SWNORM = T) or already
                                              normalised (99th percentile of a sample <= 1.5),
                                              else 1/65535 (float ADU, as many capture and
                                              stacking programs write)
============================================  ==================================================

*Signed 16-bit without BZERO*: real cameras write non-negative ADU (12- or 14-bit data, e.g. the
MicroObservatory frames, 0..4095). Negative values are kept as negative values (bias-subtracted
products legitimately have them) unless the frame looks like unsigned data written without BZERO
(wrapped, see ``_looks_wrapped16``); then 65536 is added to the negative values.

*PEDESTAL* (written by calibration programs, never by cameras): the data holds an amount added to keep
values positive; it is removed on read, physical = raw * BSCALE + BZERO - |PEDESTAL|. SBIG's FITS
extension and MaxIm DL write it negative ("add this value to get zero-based ADU", -100), PixInsight
positive (the amount to subtract, in DN of the 16-bit range): both mean the same |PEDESTAL| above
zero. On float data normalised to [0, 1] |PEDESTAL|/65535 is removed. The saturation threshold moves
with it, and the returned header has no PEDESTAL card (a HISTORY line says what was subtracted).

Orientation and colour: arrays are top-down. ``ROWORDER = 'BOTTOM-UP'`` flips the rows; absent
ROWORDER means TOP-DOWN (what camera drivers write). The Bayer pattern is read from BAYERPAT (also
COLORTYP, CFATYPE, CFA-PAT, BAYERPATT), folded with XBAYROFF/YBAYROFF (also BAYOFFX/BAYOFFY,
BAYEROFFX/BAYEROFFY) and the flip into the effective pattern of
``data[0:2, 0:2]`` (algorithms.md §5.1). The header returned with an image is rewritten to match the
array: ROWORDER='TOP-DOWN', BAYERPAT = effective pattern, XBAYROFF = YBAYROFF = 0, no BZERO/BSCALE/BLANK.

Everything that cannot be read raises :class:`~stackwatch.engine.errors.FrameError` naming the file
and the reason; sizes are checked from the header before any pixel is allocated.

XISF (PixInsight, N.I.N.A.) is read by a small reader here (the ``xisf`` package is not a dependency):
monolithic files, one image attached as uncompressed or zlib (optionally byte-shuffled) data, UInt8/
16/32 and Float32/64 samples, planar or interleaved RGB; FITSKeyword elements become the header,
ColorFilterArray becomes BAYERPAT, imageType becomes IMAGETYP. LZ4 and Zstandard compression are
refused with a clear message (no decoder in the standard library). XISF pixel data is top-down.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError
from numba import njit, prange
from stackwatch.engine.errors import FrameError

__all__ = [
    "FITS_SUFFIXES",
    "Image",
    "bayer_pattern",
    "image_shape",
    "is_fits_name",
    "is_image_name",
    "read_header",
    "read_image",
    "read_rows",
    "write_image",
]

# Recognised file names: .fits .fit .fts, any case, optionally + .gz or .fz.
FITS_SUFFIXES = (".fits", ".fit", ".fts")
_NAME_RE = re.compile(r"\.(fits|fit|fts)(\.gz|\.fz)?$", re.IGNORECASE)
_XISF_RE = re.compile(r"\.xisf$", re.IGNORECASE)

_BAYER_KEYWORDS = ("BAYERPAT", "COLORTYP", "CFATYPE", "CFA-PAT", "CFAPAT", "BAYERPATT")
_XOFF_KEYWORDS = ("XBAYROFF", "BAYOFFX", "BAYEROFFX")
_YOFF_KEYWORDS = ("YBAYROFF", "BAYOFFY", "BAYEROFFY")
_VALID_TILE = re.compile(r"^[RGB]{4}$")
_STRUCTURAL = (
    "SIMPLE",
    "XTENSION",
    "BITPIX",
    "EXTEND",
    "PCOUNT",
    "GCOUNT",
    "BZERO",
    "BSCALE",
    "BLANK",
    "CHECKSUM",
    "DATASUM",
    "EXTNAME",
)

_SAMPLE_TARGET = 65536  # pixels in the sample used for data-dependent decisions
# write_image marks its float files so that read_image never rescales them, whatever their values
_PRODUCT_KEY = "SWNORM"


@dataclass(frozen=True, eq=False)
class Image:
    """One frame as stackwatch sees it.

    Attributes
    ----------
    data : np.ndarray
        float32, (H, W) mono/CFA or (3, H, W) RGB, top-down, full scale 1.0, NaN = no data.
    header : astropy.io.fits.Header
        Header of the image HDU, rewritten to describe ``data`` (see module docstring).
    scale : float
        ``data = physical * scale`` (1/65535 for 16-bit).
    bayer : str or None
        Effective 2x2 pattern of ``data[0:2, 0:2]`` (e.g. "RGGB"); None for mono or RGB.
    path : str
        The file read.
    saturation : float
        Data value at or above which a raw pixel counts as saturated: SATURATE (physical units) times
        ``scale`` when present, else 0.999 of the full scale of the stored bit depth.
    """

    data: np.ndarray
    header: fits.Header
    scale: float
    bayer: str | None
    path: str
    saturation: float


def is_fits_name(name: str | os.PathLike[str]) -> bool:
    """True for names ending in .fits/.fit/.fts (any case), optionally followed by .gz or .fz."""
    return bool(_NAME_RE.search(os.fspath(name)))


def is_image_name(name: str | os.PathLike[str]) -> bool:
    """True for every name :func:`read_image` reads: FITS names (:func:`is_fits_name`) and .xisf."""
    text = os.fspath(name)
    return bool(_NAME_RE.search(text) or _XISF_RE.search(text))


# --------------------------------------------------------------------------------------------------
# Header helpers


def image_shape(header: fits.Header) -> tuple[int, ...]:
    """Array shape a header declares: (H, W) or (3, H, W); ``()`` when it holds no image.

    A third axis of length 1 is dropped. Other shapes are returned as declared (numpy order) so that
    the caller can say what is wrong with them.
    """
    prefix = "ZNAXIS" if _hget(header, "ZIMAGE") and "ZNAXIS" in header else "NAXIS"
    try:
        naxis = int(_hget(header, prefix, 0))
        dims = [int(_hget(header, f"{prefix}{i}", 0)) for i in range(1, naxis + 1)]
    except (TypeError, ValueError):
        return ()
    if naxis == 0:
        return ()
    while len(dims) > 2 and dims[-1] == 1:
        dims.pop()
    return tuple(reversed(dims))


def _hget(header: fits.Header, key: str, default: Any = None) -> Any:
    """header.get that reads a malformed card (seen in the wild) as absent instead of raising."""
    try:
        return header.get(key, default)
    except (VerifyError, ValueError, KeyError, IndexError, TypeError):
        return default


def _header_str(header: fits.Header, key: str) -> str:
    value = _hget(header, key)
    if value is None or isinstance(value, bool):
        return ""
    return str(value).strip()


def _header_int(header: fits.Header, key: str, default: int = 0) -> int:
    value = _hget(header, key, default)
    try:
        return round(float(value))
    except (TypeError, ValueError, OverflowError):
        return default


def _first_int(header: fits.Header, keys: tuple[str, ...]) -> int:
    for key in keys:
        if key in header:
            return _header_int(header, key)
    return 0


def _raw_bayer(header: fits.Header) -> str | None:
    for key in _BAYER_KEYWORDS:
        value = _header_str(header, key).upper().replace(" ", "")
        if _VALID_TILE.match(value):
            return value
    return None


def _bottom_up(header: fits.Header) -> bool:
    return _header_str(header, "ROWORDER").upper().replace("_", "-") in ("BOTTOM-UP", "BOTTOMUP")


def bayer_pattern(header: fits.Header) -> str | None:
    """Effective Bayer pattern of the top-down array that :func:`read_image` returns for this header.

    Follows algorithms.md §5.1: colour(x, y) = BAYERPAT[((y + YBAYROFF) % 2) * 2 + (x + XBAYROFF) % 2]
    in file order; BOTTOM-UP files are flipped, so data row r is file row H - 1 - r. None when the
    header names no pattern or the image is a colour cube.
    """
    tile = _raw_bayer(header)
    shape = image_shape(header)
    if tile is None or len(shape) != 2:
        return None
    xoff = _first_int(header, _XOFF_KEYWORDS) % 2
    yoff = _first_int(header, _YOFF_KEYWORDS) % 2
    height = shape[0]
    flip = _bottom_up(header)
    out = []
    for r in range(2):
        file_row = (height - 1 - r) if flip else r
        for c in range(2):
            out.append(tile[((file_row + yoff) % 2) * 2 + (c + xoff) % 2])
    return "".join(out)


# --------------------------------------------------------------------------------------------------
# Opening and validation


def _open(path: str) -> fits.HDUList:
    try:
        return fits.open(
            path,
            memmap=True,
            do_not_scale_image_data=True,
            lazy_load_hdus=True,
            ignore_missing_simple=True,
        )
    except FileNotFoundError:
        raise FrameError(path, "file not found") from None
    except IsADirectoryError:
        raise FrameError(path, "is a folder, not a file") from None
    except PermissionError:
        raise FrameError(path, "permission denied") from None
    except (OSError, ValueError, TypeError, IndexError, KeyError, EOFError) as exc:
        gz = _gzip_problem(path)
        if gz:
            raise FrameError(path, gz) from None
        raise FrameError(path, f"not a readable FITS file ({_short(exc)})") from None


def _gzip_problem(path: str) -> str | None:
    """For a gzip file that astropy could not open: say whether it is truncated or corrupt."""
    try:
        with open(path, "rb") as fh:
            if fh.read(2) != b"\x1f\x8b":
                return None
        with gzip.open(path, "rb") as gz:
            while gz.read(1 << 22):
                pass
    except EOFError:
        return "truncated gzip file (still being written?)"
    except (OSError, gzip.BadGzipFile, ValueError) as exc:
        return f"corrupt gzip file ({_short(exc)})"
    return None


def _data_problem(path: str, exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return "not enough memory to read the pixel data"
    if isinstance(exc, EOFError) or "too small" in str(exc) or "truncated" in str(exc).lower():
        return "truncated file: the pixel data is shorter than the header says (still being written?)"
    return _gzip_problem(path) or f"cannot read pixel data: corrupt ({_short(exc)})"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


def _find_image_hdu(path: str, hdul: fits.HDUList) -> int:
    """Index of the primary HDU if it holds an image, else of the first image extension."""
    index = 0
    try:
        while True:
            try:
                hdu = hdul[index]
            except IndexError:
                break
            if isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU) and image_shape(hdu.header):
                return index
            index += 1
    except (OSError, ValueError, EOFError) as exc:
        raise FrameError(path, f"corrupt FITS structure ({_short(exc)})") from None
    if index == 0:
        raise FrameError(path, "no FITS header found")
    raise FrameError(path, "no image in the file (no HDU with image data, e.g. tables only)")


def _validate_shape(path: str, header: fits.Header, max_mpix: float) -> tuple[int, ...]:
    shape = image_shape(header)
    if any(n <= 0 for n in shape):
        raise FrameError(path, f"image has a zero-size axis (shape {shape})")
    if len(shape) == 3 and shape[0] != 3:
        raise FrameError(path, f"image cube with {shape[0]} planes; only 2-D images and 3-colour cubes are supported")
    if len(shape) not in (2, 3):
        raise FrameError(path, f"{len(shape)}-D image {shape}; only 2-D images and 3-colour cubes are supported")
    mpix = shape[-1] * shape[-2] / 1e6
    if mpix > max_mpix:
        raise FrameError(path, f"image declares {mpix:.1f} Mpix per plane, more than the limit of {max_mpix:g} Mpix")
    bitpix = _header_int(header, "BITPIX")
    if bitpix not in (8, 16, 32, 64, -32, -64):
        raise FrameError(path, f"unsupported BITPIX {header.get('BITPIX')!r}")
    return shape


def _check_truncated(path: str, hdul: fits.HDUList, index: int, shape: tuple[int, ...]) -> None:
    hdu = hdul[index]
    if isinstance(hdu, fits.CompImageHDU):
        return  # checked by the decompressor
    info = hdul.fileinfo(index)
    fileobj = info.get("file") if info else None
    if fileobj is None or getattr(fileobj, "compression", None):
        return  # gzip: the size is only known by decompressing; read errors are caught instead
    expected = int(info["datLoc"]) + math.prod(shape) * abs(_header_int(hdu.header, "BITPIX")) // 8
    actual = os.path.getsize(path)
    if actual < expected:
        raise FrameError(
            path, f"truncated file: {actual} bytes, the header needs {expected} (still being written?)"
        )


# --------------------------------------------------------------------------------------------------
# Scaling


@dataclass(frozen=True)
class _Scaling:
    bscale: float
    bzero: float
    blank: int | None
    scale: float  # full-scale factor applied to the physical value
    wrap16: bool  # add 65536 to negative physical values
    full_scale_physical: float  # physical value of "full scale" of the stored bit depth
    pedestal: float = 0.0  # physical value subtracted after BSCALE/BZERO (the PEDESTAL keyword)


def _sample(raw: np.ndarray) -> np.ndarray:
    h, w = raw.shape[-2], raw.shape[-1]
    step = max(1, int(math.sqrt(h * w / _SAMPLE_TARGET)))
    plane = raw[0] if raw.ndim == 3 else raw
    return np.asarray(plane[::step, ::step], dtype=np.float64)


def _scaling(header: fits.Header, raw: np.ndarray) -> _Scaling:
    bitpix = _header_int(header, "BITPIX")
    bscale = float(_hget(header, "BSCALE", 1.0) or 1.0)
    bzero = float(_hget(header, "BZERO", 0.0) or 0.0)
    blank = _hget(header, "BLANK") if bitpix > 0 else None
    blank_int = int(blank) if isinstance(blank, int | float) and not isinstance(blank, bool) else None
    wrap16 = False
    if bitpix == 8:
        scale, fs = 1.0 / 255.0, 255.0
    elif bitpix == 16:
        scale, fs = 1.0 / 65535.0, 65535.0 if bzero == 32768.0 else 32767.0
        if bzero == 0.0 and bscale == 1.0 and _looks_wrapped16(raw):
            wrap16, fs = True, 65535.0
    elif bitpix == 32:
        if bzero == 2147483648.0:
            scale, fs = 1.0 / 4294967295.0, 4294967295.0
        else:
            s = _sample(raw) * bscale + bzero
            small = s.size == 0 or float(np.max(np.abs(s))) <= 65535.0 * 1.01
            scale, fs = (1.0 / 65535.0, 65535.0) if small else (1.0 / 2147483647.0, 2147483647.0)
    elif bitpix == 64:
        scale, fs = 1.0 / 65535.0, 65535.0
    elif _hget(header, _PRODUCT_KEY) is True:  # written by write_image: already full scale 1.0
        scale, fs = 1.0, 1.0
    else:  # float
        scale, fs = _float_full_scale(_sample(raw) * bscale + bzero)
    return _Scaling(bscale, bzero, blank_int, scale, wrap16, fs, _pedestal(header, scale))


def _pedestal(header: fits.Header, scale: float) -> float:
    """Physical value to subtract for a PEDESTAL keyword (0 without one).

    The pedestal is always an amount a calibration program *added* to keep values positive; the
    programs disagree only on its sign: SBIG's FITS extension and MaxIm DL write "add this value to
    get zero-based ADU" with a negative value (-100), PixInsight writes the positive amount to
    subtract. Both mean stored = real + |PEDESTAL|, so |PEDESTAL| is subtracted. The value is in DN
    of the 16-bit range (PixInsight's definition): data normalised to [0, 1] loses |PEDESTAL|/65535.
    """
    value = _hget(header, "PEDESTAL")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return 0.0
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return 0.0
    return abs(float(value)) / 65535.0 if scale == 1.0 else abs(float(value))


def _float_full_scale(sample: np.ndarray) -> tuple[float, float]:
    """(scale, full scale) of float data: normalised if the 99th percentile is <= 1.5, else 16-bit ADU."""
    s = sample[np.isfinite(sample)]
    normalised = s.size == 0 or float(np.percentile(s, 99.0)) <= 1.5
    return (1.0, 1.0) if normalised else (1.0 / 65535.0, 65535.0)


def _looks_wrapped16(raw: np.ndarray) -> bool:
    """Signed 16-bit data without BZERO that is really unsigned data written without BZERO.

    Real cameras never produce negative ADU; bias-subtracted products do (small, around a median near
    0). Wrapped means one of: adding 65536 to the negatives halves the standard deviation or better
    (a bright flat straddling 32768), or a frame with a clear positive level (median >= 64)
    whose few negatives (<= 1 %) are far below zero (median of them < -1024: bright stars >= 32768
    ADU, not noise around a subtracted bias). The negatives are looked for in the whole frame (one
    pass; this encoding is rare), the distribution on a sample.
    """
    flat = raw.reshape(-1)
    if flat.size == 0 or int(flat.min()) >= 0:
        return False
    s = _sample(raw)
    unwrapped = np.where(s < 0, s + 65536.0, s)
    if float(np.std(unwrapped)) < 0.5 * float(np.std(s)):
        return True
    negatives = flat[flat < 0]
    return bool(
        negatives.size <= 0.01 * flat.size
        and float(np.median(s)) >= 64.0
        and float(np.median(negatives)) < -1024.0
    )


@njit(cache=True, nogil=True, inline="always")
def _be16_row(raw: np.ndarray, out: np.ndarray, y: Any, oy: Any, bscale: float, bzero: float, scale: float) -> None:
    for x in range(out.shape[1]):
        v = (np.int32(raw[y, 2 * x]) << 8) | np.int32(raw[y, 2 * x + 1])
        if v >= 32768:
            v -= 65536
        out[oy, x] = np.float32((v * bscale + bzero) * scale)


@njit(cache=True, nogil=True, parallel=True)
def _k_be16(raw: np.ndarray, out: np.ndarray, bscale: float, bzero: float, scale: float, flip: bool) -> None:
    """Big-endian 16-bit bytes (H, 2W) -> float32 (H, W), (raw*bscale + bzero)*scale, optional flip."""
    h = out.shape[0]
    for yy in prange(h):
        y = np.int64(yy)
        _be16_row(raw, out, y, h - 1 - y if flip else y, bscale, bzero, scale)


@njit(cache=True, nogil=True)
def _k_be16_serial(raw: np.ndarray, out: np.ndarray, bscale: float, bzero: float, scale: float, flip: bool) -> None:
    """`_k_be16` on one thread: for row bands, where starting the thread team (~20 ms under load)
    costs more than the conversion (masters read their members in many thin bands)."""
    h = out.shape[0]
    for y in range(h):
        _be16_row(raw, out, y, h - 1 - y if flip else y, bscale, bzero, scale)


#: below this many pixels the serial kernels are used
_PARALLEL_MIN_PX = 1 << 20


@njit(cache=True, nogil=True, inline="always")
def _scale_finite_row(out: np.ndarray, y: int, scale: float) -> None:
    for x in range(out.shape[1]):
        v = out[y, x]
        if np.isinf(v):
            out[y, x] = np.nan
        elif scale != 1.0:
            out[y, x] = np.float32(np.float64(v) * scale)


@njit(cache=True, nogil=True, parallel=True)
def _k_scale_finite(out: np.ndarray, scale: float) -> None:
    """In place on a (N, W) float32 array: multiply by scale (unless 1) and turn +-inf into NaN."""
    for y in prange(out.shape[0]):
        _scale_finite_row(out, y, scale)


@njit(cache=True, nogil=True)
def _k_scale_finite_serial(out: np.ndarray, scale: float) -> None:
    for y in range(out.shape[0]):
        _scale_finite_row(out, y, scale)


def _convert(raw: np.ndarray, sc: _Scaling, flip: bool) -> np.ndarray:
    """Raw stored values (file order) -> float32 top-down full-scale-1 array, NaN for no data."""
    if raw.dtype.kind == "f" and sc.bscale == 1.0 and sc.bzero == 0.0 and sc.pedestal == 0.0:
        src = raw[..., ::-1, :] if flip else raw
        fout: np.ndarray = np.empty(raw.shape, dtype=np.float32)
        fout[...] = src  # byte swap, cast and flip in one copy
        flat = fout.reshape(-1, fout.shape[-1])
        (_k_scale_finite if fout.size >= _PARALLEL_MIN_PX else _k_scale_finite_serial)(flat, sc.scale)
        return fout
    out = np.empty(raw.shape, dtype=np.float32)
    fast16 = (
        raw.dtype == np.dtype(">i2") and sc.blank is None and not sc.wrap16 and raw.flags.c_contiguous
    )
    if fast16:
        planes = [raw] if raw.ndim == 2 else list(raw)
        outs = [out] if raw.ndim == 2 else list(out)
        kernel = _k_be16 if out.size >= _PARALLEL_MIN_PX else _k_be16_serial
        for p, o in zip(planes, outs):
            kernel(p.view(np.uint8), o, sc.bscale, sc.bzero - sc.pedestal, sc.scale, flip)
        return out
    band = 512
    height = raw.shape[-2]
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        block = np.asarray(raw[..., y0:y1, :])
        phys = block.astype(np.float64) * sc.bscale + sc.bzero
        if sc.wrap16:
            phys[phys < 0] += 65536.0
        if sc.pedestal:
            phys -= sc.pedestal
        if sc.blank is not None:
            phys[block == sc.blank] = np.nan
        vals = (phys * sc.scale).astype(np.float32)
        if not np.issubdtype(block.dtype, np.integer):
            vals[~np.isfinite(vals)] = np.nan
        if flip:
            out[..., height - y1 : height - y0, :] = vals[..., ::-1, :]
        else:
            out[..., y0:y1, :] = vals
    return out


def _clean_header(header: fits.Header, bayer: str | None, shape: tuple[int, ...], pedestal: float = 0.0) -> fits.Header:
    out = fits.Header()
    for card in header.cards:
        try:
            card.verify("exception")
            _ = card.value
        except (VerifyError, ValueError, KeyError, IndexError, TypeError):
            continue  # a malformed card would make the header unusable downstream: dropped
        out.append(card, end=True)
    for key in _STRUCTURAL:
        out.remove(key, ignore_missing=True, remove_all=True)
    for key in [k for k in out if k.startswith("ZNAXIS") or k in ("ZIMAGE", "ZBITPIX", "ZCMPTYPE")]:
        out.remove(key, ignore_missing=True, remove_all=True)
    # the pixels no longer hold the pedestal: a PEDESTAL card would have it removed twice downstream
    out.remove("PEDESTAL", ignore_missing=True, remove_all=True)
    if pedestal:
        out.add_history(f"stackwatch: PEDESTAL {pedestal:g} (physical units) subtracted from the pixels")
    was_bottom_up = _bottom_up(header)
    out["ROWORDER"] = ("TOP-DOWN", "first row is the top of the picture")
    if was_bottom_up:
        out.add_history("stackwatch: file was ROWORDER=BOTTOM-UP; rows flipped to top-down")
    if bayer is not None:
        for key in (*_BAYER_KEYWORDS, *_XOFF_KEYWORDS, *_YOFF_KEYWORDS):
            out.remove(key, ignore_missing=True, remove_all=True)
        out["BAYERPAT"] = (bayer, "Bayer pattern of data[0:2,0:2], top-down")
        out["XBAYROFF"] = (0, "folded into BAYERPAT")
        out["YBAYROFF"] = (0, "folded into BAYERPAT")
    return out


# --------------------------------------------------------------------------------------------------
# XISF (PixInsight, N.I.N.A.): monolithic files, uncompressed or zlib (with or without byte shuffling)

_XISF_FORMATS = {
    "UInt8": ("u1", 8),
    "UInt16": ("u2", 16),
    "UInt32": ("u4", 32),
    "Float32": ("f4", -32),
    "Float64": ("f8", -64),
}
_XISF_MAX_HEADER = 64 << 20


@dataclass(frozen=True)
class _Xisf:
    header: fits.Header
    shape: tuple[int, ...]  # (H, W) or (C, H, W)
    dtype: np.dtype
    position: int
    size: int
    codec: str  # "" uncompressed, "zlib", "zlib+sh", ...
    uncompressed_size: int
    item_size: int
    planar: bool


def _is_xisf(path: str) -> bool:
    return bool(_XISF_RE.search(path))


def _xisf_value(text: str) -> Any:
    text = text.strip()
    if text.startswith("'"):
        return text[1:-1].replace("''", "'").rstrip() if text.endswith("'") and len(text) > 1 else text[1:]
    if text in ("T", "F"):
        return text == "T"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _xisf_parse(path: str) -> _Xisf:
    import xml.etree.ElementTree as ET

    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
            if len(head) < 16 or head[:8] != b"XISF0100":
                raise FrameError(path, "not a monolithic XISF 1.0 file (no XISF0100 signature)")
            length = int.from_bytes(head[8:12], "little")
            if length > _XISF_MAX_HEADER:
                raise FrameError(path, f"XISF header of {length} bytes is implausibly large")
            xml = fh.read(length)
    except FileNotFoundError:
        raise FrameError(path, "file not found") from None
    except IsADirectoryError:
        raise FrameError(path, "is a folder, not a file") from None
    except PermissionError:
        raise FrameError(path, "permission denied") from None
    if len(xml) < length:
        raise FrameError(path, "truncated file: the XISF header is incomplete (still being written?)")
    try:
        root = ET.fromstring(xml.rstrip(b"\x00"))
    except ET.ParseError as exc:
        raise FrameError(path, f"corrupt XISF header ({exc})") from None
    image = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Image"), None)
    if image is None:
        raise FrameError(path, "no image in the XISF file")
    try:
        dims = [int(v) for v in image.get("geometry", "").split(":")]
    except ValueError:
        raise FrameError(path, f"bad XISF geometry {image.get('geometry')!r}") from None
    if len(dims) != 3:
        raise FrameError(path, f"{len(dims) - 1}-D XISF image; only 2-D images are supported")
    width, height, channels = dims
    fmt = image.get("sampleFormat", "")
    if fmt not in _XISF_FORMATS:
        raise FrameError(path, f"unsupported XISF sample format {fmt!r}")
    code, bitpix = _XISF_FORMATS[fmt]
    order = ">" if image.get("byteOrder", "little") == "big" else "<"
    location = image.get("location", "").split(":")
    if len(location) != 3 or location[0] != "attachment":
        raise FrameError(path, f"unsupported XISF data location {image.get('location')!r} (only attachments)")
    codec, usize, item = "", 0, 0
    if image.get("compression"):
        parts = image.get("compression", "").split(":")
        codec = parts[0]
        usize = int(parts[1]) if len(parts) > 1 else 0
        item = int(parts[2]) if len(parts) > 2 else 0
        if codec not in ("zlib", "zlib+sh"):
            raise FrameError(path, f"XISF compression {codec!r} is not supported (uncompressed or zlib only)")
    header = fits.Header()
    header["BITPIX"] = bitpix
    header["NAXIS"] = 3 if channels != 1 else 2
    header["NAXIS1"] = width
    header["NAXIS2"] = height
    if channels != 1:
        header["NAXIS3"] = channels
    for el in image.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag == "FITSKeyword":
            name = (el.get("name") or "").strip().upper()
            if not name or name in _STRUCTURAL or name.startswith("NAXIS") or name == "END":
                continue
            value = _xisf_value(el.get("value", ""))
            comment = el.get("comment", "")[:40]
            try:
                if name in ("HISTORY", "COMMENT"):
                    header.add_history(comment) if name == "HISTORY" else header.add_comment(comment)
                else:
                    header.append((name, value, comment), end=True)
            except (ValueError, VerifyError):
                continue
        elif tag == "ColorFilterArray" and "BAYERPAT" not in header:
            pattern = (el.get("pattern") or "").upper()
            if _VALID_TILE.match(pattern):
                header["BAYERPAT"] = pattern
    if image.get("imageType") and not any(k in header for k in ("IMAGETYP", "FRAME")):
        header["IMAGETYP"] = image.get("imageType")
    header["ROWORDER"] = ("TOP-DOWN", "XISF pixel data is stored top-down")
    shape = (height, width) if channels == 1 else (channels, height, width)
    return _Xisf(
        header=header,
        shape=shape,
        dtype=np.dtype(order + code),
        position=int(location[1]),
        size=int(location[2]),
        codec=codec,
        uncompressed_size=usize,
        item_size=item,
        planar=image.get("pixelStorage", "Planar") != "Normal",
    )


def _xisf_raw(path: str, x: _Xisf) -> np.ndarray:
    """Decoded samples in (H, W) or (C, H, W) order, the file's dtype."""
    import zlib

    if os.path.getsize(path) < x.position + x.size:
        raise FrameError(path, "truncated file: the XISF data block is incomplete (still being written?)")
    with open(path, "rb") as fh:
        fh.seek(x.position)
        block = fh.read(x.size)
    nbytes = math.prod(x.shape) * x.dtype.itemsize
    if x.codec:
        try:
            block = zlib.decompress(block)
        except zlib.error as exc:
            raise FrameError(path, f"corrupt zlib data in the XISF file ({exc})") from None
        if x.codec.endswith("+sh") and x.item_size > 1:
            n = len(block) // x.item_size
            body = np.frombuffer(block, np.uint8, n * x.item_size).reshape(x.item_size, n).T.reshape(-1)
            block = body.tobytes() + block[n * x.item_size :]
    if len(block) != nbytes:
        raise FrameError(path, f"XISF data block holds {len(block)} bytes, the geometry needs {nbytes}")
    flat = np.frombuffer(block, dtype=x.dtype)
    if x.planar or len(x.shape) == 2:
        return flat.reshape(x.shape)
    c, h, w = x.shape
    return np.ascontiguousarray(flat.reshape(h, w, c).transpose(2, 0, 1))


def _xisf_scaling(raw: np.ndarray, header: fits.Header) -> _Scaling:
    if raw.dtype.kind == "u":
        fs = float(2 ** (8 * raw.dtype.itemsize) - 1)
        return _Scaling(1.0, 0.0, None, 1.0 / fs, False, fs, _pedestal(header, 1.0 / fs))
    scale, fs = _float_full_scale(_sample(raw).astype(np.float64))
    return _Scaling(1.0, 0.0, None, scale, False, fs, _pedestal(header, scale))


def _read_xisf(path: str, max_mpix: float) -> tuple[np.ndarray, fits.Header, _Scaling]:
    x = _xisf_parse(path)
    shape = _validate_shape(path, x.header, max_mpix)
    raw = _xisf_raw(path, x).reshape(shape)
    sc = _xisf_scaling(raw, x.header)
    return _convert(raw, sc, False), x.header, sc


# --------------------------------------------------------------------------------------------------
# Public readers


def read_header(path: str | os.PathLike[str]) -> fits.Header:
    """Header of the image HDU (primary, or first image extension), without reading pixel data.

    Parameters
    ----------
    path : str or PathLike
        A FITS file (plain, .gz or .fz).

    Returns
    -------
    astropy.io.fits.Header
        As stored in the file (not rewritten); :func:`bayer_pattern` and :func:`image_shape` on it give
        the values :func:`read_image` would report.

    Raises
    ------
    FrameError
        Missing, unreadable, or no image HDU.
    """
    spath = os.fspath(path)
    if _is_xisf(spath):
        return _xisf_parse(spath).header
    hdul = _open(spath)
    try:
        index = _find_image_hdu(spath, hdul)
        return hdul[index].header.copy()
    finally:
        hdul.close()


def read_image(path: str | os.PathLike[str], *, max_mpix: float = 200.0, saturation_frac: float = 0.999) -> Image:
    """Read one frame as float32, full scale 1.0, top-down.

    Parameters
    ----------
    path : str or PathLike
        A FITS file (.fits/.fit/.fts, plain, .gz or tile-compressed .fz) or an XISF file (.xisf).
    max_mpix : float, optional
        Refuse images declaring more than this many megapixels per plane (checked from the header
        before reading pixels). Default is 200.0.
    saturation_frac : float, optional
        Without a SATURATE keyword, physical values at or above this fraction of the stored bit
        depth's full scale count as saturated (``Image.saturation``). Default is 0.999.

    Returns
    -------
    Image

    Raises
    ------
    FrameError
        Unreadable, truncated, too large, no image, unsupported shape, or no finite pixel.
    """
    spath = os.fspath(path)
    if _is_xisf(spath):
        return _finish_image(spath, *_read_xisf(spath, max_mpix), saturation_frac)
    hdul = _open(spath)
    try:
        index = _find_image_hdu(spath, hdul)
        hdu = hdul[index]
        header = hdu.header
        shape = _validate_shape(spath, header, max_mpix)
        _check_truncated(spath, hdul, index, shape)
        try:
            raw = hdu.data
            if raw is None:
                raise FrameError(spath, "image HDU has no data")
            raw = raw.reshape(shape)
            sc = _scaling(header, raw)
            data = _convert(raw, sc, _bottom_up(header))
            del raw
        except FrameError:
            raise
        except (OSError, ValueError, EOFError, TypeError, gzip.BadGzipFile, MemoryError) as exc:
            raise FrameError(spath, _data_problem(spath, exc)) from None
    finally:
        hdul.close()
    return _finish_image(spath, data, header, sc, saturation_frac)


def _finish_image(path: str, data: np.ndarray, header: fits.Header, sc: _Scaling, saturation_frac: float) -> Image:
    if not _any_finite(data):
        raise FrameError(path, "no valid pixels (all NaN or infinite)")
    bayer = bayer_pattern(header)
    saturate = _hget(header, "SATURATE")
    # thresholds are stored values: the pedestal comes off them as it came off the pixels
    if isinstance(saturate, int | float) and not isinstance(saturate, bool) and saturate > 0:
        saturation = (float(saturate) - sc.pedestal) * sc.scale
    else:
        saturation = (saturation_frac * sc.full_scale_physical - sc.pedestal) * sc.scale
    clean = _clean_header(header, bayer, data.shape, sc.pedestal)
    return Image(data=data, header=clean, scale=sc.scale, bayer=bayer, path=path, saturation=saturation)


def _any_finite(data: np.ndarray) -> bool:
    flat = data.reshape(-1)
    step = max(1, flat.size // 4096)
    if np.isfinite(flat[::step]).any():
        return True
    return bool(np.isfinite(flat).any())


_SCALE_CACHE: dict[tuple[str, int, int], _Scaling] = {}
_SCALE_LOCK = threading.Lock()


def read_rows(path: str | os.PathLike[str], y0: int, y1: int) -> np.ndarray:
    """Rows ``[y0, y1)`` of the top-down image, converted exactly as :func:`read_image` would.

    Uses a memory map (only those rows are read) for uncompressed files and decompresses only the
    tiles holding those rows for .fz files; .gz files are decompressed whole on every call (a band
    integrator should not read .gz frames band by band). The data-dependent scale decision (float and
    signed files) is made once per file version and cached.

    Parameters
    ----------
    path : str or PathLike
        A FITS file (plain, .gz or .fz).
    y0, y1 : int
        First row and one past the last row, top-down, ``0 <= y0 <= y1 <= H``.

    Returns
    -------
    np.ndarray
        float32 (y1 - y0, W) or (3, y1 - y0, W), native-endian, C-contiguous.

    Raises
    ------
    FrameError
        Unreadable or truncated file, or rows outside the image.
    """
    spath = os.fspath(path)
    if _is_xisf(spath):
        data = _read_xisf(spath, float("inf"))[0]
        if not (0 <= y0 <= y1 <= data.shape[-2]):
            raise FrameError(spath, f"rows [{y0}, {y1}) outside the image height {data.shape[-2]}")
        return np.ascontiguousarray(data[..., y0:y1, :])
    hdul = _open(spath)
    try:
        index = _find_image_hdu(spath, hdul)
        hdu = hdul[index]
        header = hdu.header
        shape = _validate_shape(spath, header, float("inf"))
        height = shape[-2]
        if not (0 <= y0 <= y1 <= height):
            raise FrameError(spath, f"rows [{y0}, {y1}) outside the image height {height}")
        _check_truncated(spath, hdul, index, shape)
        flip = _bottom_up(header)
        fy0, fy1 = (height - y1, height - y0) if flip else (y0, y1)
        try:
            st = os.stat(spath)
            key = (os.path.abspath(spath), st.st_mtime_ns, st.st_size)
            with _SCALE_LOCK:
                sc = _SCALE_CACHE.get(key)
            if sc is None:
                sc = _scaling(header, hdu.data.reshape(shape))
                with _SCALE_LOCK:
                    if len(_SCALE_CACHE) > 4096:
                        _SCALE_CACHE.clear()
                    _SCALE_CACHE[key] = sc
            if isinstance(hdu, fits.CompImageHDU) and _header_int(header, "NAXIS") == len(shape):
                # only the tiles that hold these rows are decompressed
                lead = (slice(None),) * (len(shape) - 2)
                band = np.asarray(hdu.section[(*lead, slice(fy0, fy1), slice(None))])
                band = band.reshape((*shape[:-2], fy1 - fy0, shape[-1]))
            else:
                band = hdu.data.reshape(shape)[..., fy0:fy1, :]
            out = _convert(np.ascontiguousarray(band), sc, flip)
        except FrameError:
            raise
        except (OSError, ValueError, EOFError, TypeError, gzip.BadGzipFile, MemoryError) as exc:
            raise FrameError(spath, _data_problem(spath, exc)) from None
    finally:
        hdul.close()
    return out


# --------------------------------------------------------------------------------------------------
# Writing


def _prepare_header(header: fits.Header | None, history: Iterable[str]) -> fits.Header:
    out = fits.Header() if header is None else header.copy(strip=True)
    for key in _STRUCTURAL:
        out.remove(key, ignore_missing=True, remove_all=True)
    for key in [k for k in out if k.startswith("NAXIS") or k.startswith("ZNAXIS")]:
        out.remove(key, ignore_missing=True, remove_all=True)
    # stackwatch data never holds a pedestal (negatives are kept): a PEDESTAL copied from a source
    # header would be subtracted again when the product is read
    out.remove("PEDESTAL", ignore_missing=True, remove_all=True)
    out["ROWORDER"] = ("TOP-DOWN", "first row is the top of the picture")
    out[_PRODUCT_KEY] = (True, "stackwatch data, full scale 1.0")
    for line in history:
        for chunk in _chunks(str(line), 70):
            out.add_history(chunk)
    return out


def _chunks(text: str, width: int) -> list[str]:
    text = text.replace("\n", " ")
    return [text[i : i + width] for i in range(0, len(text), width)] or [""]


def write_image(
    path: str | os.PathLike[str],
    data: np.ndarray,
    *,
    header: fits.Header | None = None,
    history: Iterable[str] = (),
    extra_hdus: Mapping[str, np.ndarray] | None = None,
    extra_dtype: Any = None,
) -> None:
    """Write a float32 FITS file atomically.

    Parameters
    ----------
    path : str or PathLike
        Destination; a name ending in .gz is written gzip-compressed, .fz as a lossless
        tile-compressed (GZIP_2, no quantisation) image extension.
    data : np.ndarray
        (H, W) or (3, H, W) image; written as float32, top-down (ROWORDER='TOP-DOWN').
    header : astropy.io.fits.Header, optional
        Cards to carry over (structural keywords are dropped and regenerated). Default is None.
    history : iterable of str, optional
        HISTORY lines (provenance), wrapped at 70 characters. Default is ().
    extra_hdus : mapping of str to np.ndarray, optional
        Additional image extensions by EXTNAME (bool as uint8, integers as is, others float32).
        Default is None.
    extra_dtype : numpy dtype, optional
        Store every extension as this type instead (converted while it is written). Default is None.

    The file is written under a temporary name in the destination folder, flushed and fsync'ed, then
    renamed over the destination (``os.replace``) and the folder fsync'ed: readers never see a partial
    file.
    """
    spath = os.fspath(path)
    arr = np.asarray(data)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[0] != 3):
        raise ValueError(f"write_image: data must be (H, W) or (3, H, W), got {arr.shape}")
    hdr = _prepare_header(header, history)
    lower = spath.lower()
    if lower.endswith(".fz"):
        hdus: list[Any] = [
            fits.PrimaryHDU(),
            fits.CompImageHDU(np.ascontiguousarray(arr, dtype=np.float32), header=hdr, compression_type="GZIP_2",
                              quantize_level=0.0),
        ]
        planes: list[np.ndarray | None] = [None, None]  # astropy compresses and writes these two itself
    else:
        hdus = [fits.PrimaryHDU(_placeholder(arr.shape, np.float32), header=hdr)]
        planes = [arr]
    for name, extra in (extra_hdus or {}).items():
        a = np.asarray(extra)
        dtype = _extra_dtype(str(name), a.dtype) if extra_dtype is None else np.dtype(extra_dtype)
        hdus.append(fits.ImageHDU(_placeholder(a.shape, dtype), name=str(name).upper()))
        planes.append(a)
    hdul = fits.HDUList(hdus)
    # what HDUList.writeto does to the headers before it writes (fixes, EXTEND, structural cards)
    hdul.verify(option="silentfix")
    hdul.update_extend()
    folder = os.path.dirname(os.path.abspath(spath))
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as fh:
            if lower.endswith(".gz"):
                with gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=4) as gz:
                    _write_hdus(gz, hdul, planes)
            else:
                _write_hdus(fh, hdul, planes)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, spath)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


# rows of an HDU converted to FITS big-endian at a time while it is written
_WRITE_CHUNK_BYTES = 8 << 20
_BLOCK = 2880


def _placeholder(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An array of `shape` and `dtype` that holds one element: astropy derives an HDU's header
    (BITPIX, NAXISn, BZERO of unsigned types) from it without a full-size copy of the data."""
    return np.broadcast_to(np.zeros((), dtype), shape)


def _write_hdus(fh: Any, hdul: fits.HDUList, planes: Sequence[np.ndarray | None]) -> None:
    """Write `hdul` as HDUList.writeto would, the data of image HDU i from planes[i] (astropy writes
    the HDUs whose plane is None, which must come first) converted to the HDU's type in chunks.

    HDUList.writeto needs each HDU's data whole in its FITS type: every float32 or uint8 copy of a
    26 MP product plane is 0.1 GB, and the products of an exact pass were written five at once."""
    first = sum(1 for p in planes if p is None)
    if first:
        head = fits.HDUList(list(hdul[:first]))
        head.writeto(fh, output_verify="silentfix")
    for hdu, plane in zip(hdul[first:], planes[first:], strict=True):
        assert plane is not None
        hdu.update_header()
        fh.write(hdu.header.tostring().encode("ascii"))
        size = _write_plane(fh, plane, hdu.data.dtype)
        if size % _BLOCK:  # data padded with zeros to whole FITS blocks
            fh.write(bytes(_BLOCK - size % _BLOCK))


def _write_plane(fh: Any, plane: np.ndarray, dtype: np.dtype[Any]) -> int:
    """Write `plane` converted to `dtype` as astropy.io.fits stores it (big-endian; unsigned 16-64 bit
    and signed 8-bit types offset by BZERO = their sign bit), a chunk of rows at a time; returns the
    bytes written."""
    dtype = np.dtype(dtype)
    offset = (dtype.kind == "u" and dtype.itemsize >= 2) or (dtype.kind == "i" and dtype.itemsize == 1)
    if plane.size == 0:
        return 0
    rows = plane.reshape(-1, plane.shape[-1])
    step = max(1, _WRITE_CHUNK_BYTES // max(1, rows.shape[1] * dtype.itemsize))
    size = 0
    for r0 in range(0, rows.shape[0], step):
        chunk = rows[r0 : r0 + step].astype(dtype.newbyteorder("="))  # a copy: changed in place below
        bits = chunk.view(f"u{dtype.itemsize}")
        if offset:  # value - BZERO (mod 2^bits) is the value with its sign bit flipped
            bits ^= np.array(1 << (8 * dtype.itemsize - 1), bits.dtype)
        if sys.byteorder == "little" and dtype.itemsize > 1:
            bits.byteswap(inplace=True)
        fh.write(bits.reshape(-1).view(np.uint8))
        size += bits.nbytes
    return size


def _extra_dtype(name: str, dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The type an extension HDU stores: bool as uint8, integers up to 32 bits as is, others float32."""
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    if dtype.kind in "iu" and dtype.itemsize <= 4:
        return dtype.newbyteorder("=")
    if dtype.kind in "iuf":
        return np.dtype(np.float32)
    raise ValueError(f"extra HDU {name!r}: unsupported dtype {dtype}")


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
