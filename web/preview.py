"""Preview rendering for the web view: screen stretch, downsampling and PNG encoding.

The screen stretch is the automatic screen transfer function astrophotographers know from
PixInsight (STF auto-stretch): per channel, the shadows clipping point is ``median + clip * MADN``
(clip = -2.8, MADN = 1.4826 * MAD) and the midtones balance is chosen so that the median (the sky
background) lands on the target background (0.25) after the midtones transfer function (MTF)

    MTF(m, x) = (m - 1) x / ((2m - 1) x - m).

Linked mode uses one transfer function for all channels (averaged parameters; keeps the colour
balance of the data); unlinked fits each channel separately (neutralises the background colour).

The statistics come from a strided subsample of the full-resolution image (full-resolution noise,
as a 1:1 crop shows it); the stretch is applied to a NaN-aware block-mean downsampled copy. PNG is
encoded with the standard library's zlib (no imaging library at runtime). NaN (no data) is drawn
black in the 8-bit display only.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from numba import njit, prange
from stackwatch.engine.errors import StackwatchError

__all__ = [
    "DEFAULT_SHADOWS_CLIP",
    "DEFAULT_TARGET_BACKGROUND",
    "Preview",
    "StretchParams",
    "apply_stretch",
    "composite",
    "crop_region",
    "downsample",
    "encode_png",
    "mtf",
    "render_crop",
    "render_map",
    "render_preview",
    "stf_params",
    "strength_to_target",
]

DEFAULT_SHADOWS_CLIP = -2.8
DEFAULT_TARGET_BACKGROUND = 0.25
_MADN = 1.4826
_STATS_SAMPLES = 600_000  # pixels per channel for the median/MAD statistics (median error ~ 0.002 sigma)


@dataclass(frozen=True)
class StretchParams:
    """Screen transfer function of one channel: clip below `shadows`, MTF with `midtones`, top 1.

    Data outside [0, 1] (a stack in ADU, negative pedestal-free values) are first mapped onto
    [0, 1] with `offset` and `span`; for ordinary data in [0, 1] these are 0 and 1."""

    shadows: float
    midtones: float
    highlights: float = 1.0
    offset: float = 0.0  # data are first mapped to (x - offset) / span: identity for data in [0, 1]
    span: float = 1.0


@dataclass(frozen=True)
class Preview:
    """A rendered, stretched preview.

    png: the encoded image; width, height: its size in pixels; factor: downsampling block size
    (source pixels per preview pixel along each axis); source_shape: (H, W) of the full image;
    params: the per-channel stretch applied (one per output channel); histogram: (C, 256) counts of
    the stretched 8-bit values per channel (NaN pixels excluded).
    """

    png: bytes
    width: int
    height: int
    factor: int
    source_shape: tuple[int, int]
    params: tuple[StretchParams, ...]
    histogram: np.ndarray


def mtf(m: float | np.ndarray, x: float | np.ndarray) -> np.ndarray:
    """The midtones transfer function MTF(m, x) for x in [0, 1] (0 -> 0, m -> 0.5, 1 -> 1)."""
    xa = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    ma = np.asarray(m, dtype=np.float64)
    den = (2.0 * ma - 1.0) * xa - ma
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den != 0.0, (ma - 1.0) * xa / np.where(den != 0.0, den, 1.0), 0.5)
    return np.clip(out, 0.0, 1.0)


def strength_to_target(strength: float) -> float:
    """Target background of the auto-stretch for a strength (1.0 -> 0.25; 2.0 -> 0.5; 0.5 -> 0.0625).

    target = 0.25 ** (1 / strength), so the page's "strength" slider is monotone and never leaves
    (0, 1). Strength must be positive.
    """
    if not (strength > 0.0 and math.isfinite(strength)):
        raise StackwatchError(f"stretch strength must be a positive number, got {strength!r}")
    return float(DEFAULT_TARGET_BACKGROUND ** (1.0 / strength))


def _channels(image: np.ndarray) -> np.ndarray:
    """(C, H, W) view of a (H, W) or (3, H, W) image; refuses anything else."""
    if image.ndim == 2:
        return image[None, :, :]
    if image.ndim == 3 and image.shape[0] in (1, 3):
        return image
    raise StackwatchError(f"preview: expected an image of shape (H, W) or (3, H, W), got {image.shape}")


def _sample(channel: np.ndarray) -> np.ndarray:
    """A strided subsample of about _STATS_SAMPLES finite pixels at full resolution."""
    h, w = channel.shape
    step = max(1, int(math.sqrt(h * w / _STATS_SAMPLES)))
    s = np.asarray(channel[::step, ::step], dtype=np.float32).ravel()
    return s[np.isfinite(s)]


def _median_madn(values: np.ndarray) -> tuple[float, float]:
    if values.size == 0:
        return 0.0, 0.0
    med = float(np.median(values))
    madn = _MADN * float(np.median(np.abs(values - np.float32(med))))
    return med, madn


def stf_params(
    image: np.ndarray,
    *,
    linked: bool = True,
    shadows_clip: float = DEFAULT_SHADOWS_CLIP,
    target_background: float = DEFAULT_TARGET_BACKGROUND,
) -> tuple[StretchParams, ...]:
    """Automatic screen stretch parameters, one StretchParams per channel.

    Parameters
    ----------
    image : (H, W) or (3, H, W) float array, full scale 1.0, NaN = no data.
    linked : one transfer function for all channels (True) or one per channel. Default is True.
    shadows_clip : shadows clipping point in MADN units from the median. Default is -2.8.
    target_background : where the median lands after the stretch, in (0, 1). Default is 0.25.
    """
    if not 0.0 < target_background < 1.0:
        raise StackwatchError(f"stretch target background must be in (0, 1), got {target_background}")
    chans = _channels(image)
    samples = [_sample(c) for c in chans]
    ranges = [(min(0.0, float(v.min())), max(1.0, float(v.max()))) if v.size else (0.0, 1.0) for v in samples]
    if linked:
        common = (min(r[0] for r in ranges), max(r[1] for r in ranges))
        ranges = [common for _ in ranges]
    stats = []
    for v, (lo, hi) in zip(samples, ranges):
        med, madn = _median_madn(v)
        stats.append(((med - lo) / (hi - lo), madn / (hi - lo)))

    def balance(med: float, c0: float) -> float:
        d = (med - c0) / (1.0 - c0) if c0 < 1.0 else 0.0
        return float(mtf(target_background, d)) if d > 0.0 else 0.5

    out = []
    for (med, madn), (lo, hi) in zip(stats, ranges):
        c0 = min(max(med + shadows_clip * madn, 0.0), 1.0)
        if madn == 0.0:  # constant image (or nothing finite): show it on the target rather than dividing by 0
            c0 = min(max(med - 1e-6, 0.0), 1.0)
        out.append(StretchParams(shadows=float(c0), midtones=balance(med, c0), offset=lo, span=hi - lo))
    if linked and len(stats) > 1:
        med = float(np.mean([s[0] for s in stats]))
        c0 = float(np.mean([p.shadows for p in out]))
        p = StretchParams(shadows=c0, midtones=balance(med, c0), offset=ranges[0][0], span=ranges[0][1] - ranges[0][0])
        return tuple(p for _ in stats)
    return tuple(out)


@njit(cache=True, nogil=True, parallel=True)
def _block_mean(src: np.ndarray, f: int, out: np.ndarray) -> None:
    c_n, h, w = src.shape
    oh, ow = out.shape[1], out.shape[2]
    for k in prange(c_n * oh):
        c = k // oh
        oy = k % oh
        y0 = oy * f
        y1 = min(y0 + f, h)
        acc = np.zeros(ow, dtype=np.float64)
        cnt = np.zeros(ow, dtype=np.int64)
        for y in range(y0, y1):  # whole input rows, read contiguously
            for ox in range(ow):
                x1 = min(ox * f + f, w)
                s = 0.0
                n = 0
                for x in range(ox * f, x1):
                    v = src[c, y, x]
                    if not np.isnan(v):
                        s += v
                        n += 1
                acc[ox] += s
                cnt[ox] += n
        for ox in range(ow):
            out[c, oy, ox] = acc[ox] / cnt[ox] if cnt[ox] > 0 else np.nan


def downsample(image: np.ndarray, *, max_px: int = 2048) -> tuple[np.ndarray, int]:
    """NaN-aware block mean so that the longest side is at most `max_px`.

    Returns ``(small, factor)`` with small of shape (C, ceil(H/f), ceil(W/f)) float32 and factor f
    (1 when the image already fits). A block with no finite pixel is NaN. Default max_px is 2048.
    """
    if max_px < 1:
        raise StackwatchError(f"preview size must be at least 1 pixel, got {max_px}")
    chans = _channels(image)
    _, h, w = chans.shape
    f = max(1, math.ceil(max(h, w) / max_px))
    src = np.ascontiguousarray(chans, dtype=np.float32)
    if f == 1:
        return src, 1
    out = np.empty((src.shape[0], math.ceil(h / f), math.ceil(w / f)), dtype=np.float32)
    _block_mean(src, f, out)
    return out, f


@njit(cache=True, nogil=True, parallel=True)
def _stretch_kernel(
    src: np.ndarray, c0: np.ndarray, m: np.ndarray, off: np.ndarray, span: np.ndarray, out: np.ndarray,
    hist: np.ndarray
) -> None:
    c_n, h, w = src.shape
    nthreads_hist = hist.shape[0]
    for t in prange(nthreads_hist):
        rows_per = (h + nthreads_hist - 1) // nthreads_hist
        r0 = t * rows_per
        r1 = min(h, r0 + rows_per)
        for y in range(r0, r1):
            for c in range(c_n):
                s = c0[c]
                mm = m[c]
                o = off[c]
                inv_span = 1.0 / span[c]
                scale = 1.0 / (1.0 - s) if s < 1.0 else 0.0
                for x in range(w):
                    v = src[c, y, x]
                    if np.isnan(v):
                        out[y, x, c] = 0
                        continue
                    xn = ((v - o) * inv_span - s) * scale
                    if s >= 1.0:
                        xn = 1.0 if (v - o) * inv_span >= 1.0 else 0.0
                    if xn <= 0.0:
                        r = 0.0
                    elif xn >= 1.0:
                        r = 1.0
                    elif xn == mm:
                        r = 0.5
                    else:
                        r = (mm - 1.0) * xn / ((2.0 * mm - 1.0) * xn - mm)
                    q = int(r * 255.0 + 0.5)
                    q = 0 if q < 0 else (255 if q > 255 else q)
                    out[y, x, c] = q
                    hist[t, c, q] += 1


def apply_stretch(small: np.ndarray, params: tuple[StretchParams, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Stretch a (C, h, w) image to 8 bits: returns ``(pixels (h, w, C) uint8, histogram (C, 256))``."""
    chans = _channels(small)
    if len(params) != chans.shape[0]:
        raise StackwatchError(f"preview: {len(params)} stretch parameter sets for {chans.shape[0]} channels")
    src = np.ascontiguousarray(chans, dtype=np.float32)
    c_n, h, w = src.shape
    out = np.empty((h, w, c_n), dtype=np.uint8)
    nt = max(1, min(16, h))
    hist = np.zeros((nt, c_n, 256), dtype=np.int64)
    c0 = np.array([p.shadows for p in params], dtype=np.float64)
    m = np.array([p.midtones for p in params], dtype=np.float64)
    off = np.array([p.offset for p in params], dtype=np.float64)
    span = np.array([p.span if p.span > 0 else 1.0 for p in params], dtype=np.float64)
    _stretch_kernel(src, c0, m, off, span, out, hist)
    return out, hist.sum(axis=0)


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray, *, level: int = 1) -> bytes:
    """PNG bytes of an (h, w) or (h, w, 1|3) uint8 array (grey or RGB), "Up" row filter, zlib `level`.

    Default level is 1 (fast; previews are regenerated every stack update).
    """
    if pixels.dtype != np.uint8:
        raise StackwatchError(f"encode_png: expected uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3) or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise StackwatchError(f"encode_png: expected (h, w), (h, w, 1) or (h, w, 3), got {pixels.shape}")
    h, w, c = pixels.shape
    rows = np.ascontiguousarray(pixels).reshape(h, w * c)
    filtered = np.empty((h, w * c + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # filter type "Up": byte minus the byte above (mod 256)
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 arithmetic wraps mod 256
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", ihdr),
            _png_chunk(b"IDAT", zlib.compress(filtered.tobytes(), level)),
            _png_chunk(b"IEND", b""),
        )
    )


def render_preview(
    image: np.ndarray,
    *,
    max_px: int = 2048,
    linked: bool = True,
    strength: float = 1.0,
    shadows_clip: float = DEFAULT_SHADOWS_CLIP,
) -> Preview:
    """Auto-stretched PNG preview of a (H, W) or (3, H, W) stack, longest side at most `max_px`.

    Parameters
    ----------
    image : the linear stack, full scale 1.0, NaN = no data.
    max_px : longest side of the preview. Default is 2048.
    linked : linked (True) or unlinked colour stretch. Default is True.
    strength : 1.0 is the standard auto-stretch; see `strength_to_target`. Default is 1.0.
    shadows_clip : shadows clipping in MADN units. Default is -2.8.
    """
    chans = _channels(image)
    params = stf_params(chans, linked=linked, shadows_clip=shadows_clip, target_background=strength_to_target(strength))
    small, f = downsample(chans, max_px=max_px)
    pixels, hist = apply_stretch(small, params)
    return Preview(
        png=encode_png(pixels),
        width=int(pixels.shape[1]),
        height=int(pixels.shape[0]),
        factor=f,
        source_shape=(int(chans.shape[1]), int(chans.shape[2])),
        params=params,
        histogram=hist,
    )


def crop_region(shape: tuple[int, int], x: int, y: int, w: int, h: int, *, max_side: int = 1024) -> tuple[int, int, int, int]:
    """Validate a 1:1 crop request against an image of `shape` (H, W); returns (x0, y0, x1, y1).

    The origin must lie inside the image and 1 <= w, h <= max_side; the region is clipped at the
    image edges. Raises StackwatchError naming the bad value.
    """
    hh, ww = shape
    if not (1 <= w <= max_side and 1 <= h <= max_side):
        raise StackwatchError(f"crop size {w}x{h} is outside 1..{max_side} pixels")
    if not (0 <= x < ww and 0 <= y < hh):
        raise StackwatchError(f"crop origin ({x}, {y}) is outside the {ww}x{hh} image")
    return x, y, min(ww, x + w), min(hh, y + h)


def render_crop(
    image: np.ndarray, region: tuple[int, int, int, int], params: tuple[StretchParams, ...]
) -> bytes:
    """PNG of the 1:1 region (x0, y0, x1, y1) stretched with `params` (those of the preview)."""
    x0, y0, x1, y1 = region
    chans = _channels(image)
    pixels, _ = apply_stretch(np.ascontiguousarray(chans[:, y0:y1, x0:x1], dtype=np.float32), params)
    return encode_png(pixels, level=3)


def render_map(layers: list[np.ndarray], *, max_px: int = 2048) -> Preview:
    """Linear PNG of count maps (rejection, coverage): one layer -> grey, several -> RGB channels.

    Each layer is scaled from 0 to its own maximum (so a map with few rejections is still visible);
    two layers (low, high rejection) are drawn high = red, low = blue.
    """
    if not layers:
        raise StackwatchError("render_map: no layer given")
    stackd = np.stack([np.asarray(a, dtype=np.float32) for a in layers])
    if len(layers) == 2:
        low, high = stackd[0], stackd[1]
        stackd = np.stack([high, np.zeros_like(high), low])
    small, f = downsample(stackd, max_px=max_px)
    params = []
    for c in range(small.shape[0]):
        top = float(np.nanmax(small[c])) if np.isfinite(small[c]).any() else 0.0
        params.append(StretchParams(shadows=0.0, midtones=0.5, highlights=1.0))
        if top > 0:
            small[c] /= np.float32(top)
    pixels, hist = apply_stretch(small, tuple(params))
    hh, ww = stackd.shape[1], stackd.shape[2]
    return Preview(encode_png(pixels), int(pixels.shape[1]), int(pixels.shape[0]), f, (hh, ww), tuple(params), hist)


def composite(red: np.ndarray, green: np.ndarray, blue: np.ndarray) -> np.ndarray:
    """(3, H, W) float32 colour composite of three mono stacks of the same shape (no copy of NaN)."""
    planes = [np.asarray(p) for p in (red, green, blue)]
    if any(p.ndim != 2 for p in planes) or len({p.shape for p in planes}) != 1:
        raise StackwatchError(
            "colour composite needs three mono stacks of the same shape, got " + ", ".join(str(p.shape) for p in planes)
        )
    return np.stack(planes).astype(np.float32, copy=False)
