"""Batch integration with pixel rejection over row bands (algorithms.md §7.1, §7.4, §7.6, §7.7).

Frames come from ``BandSource`` objects that deliver rows [y0, y1) as float32 (h, W) or (C, h, W);
NaN means no data *or excluded*: a caller with per-frame exclusion masks (saturation, defects,
outside the footprint) sets those pixels to NaN in its source (see ``MaskedSource``) and nothing
else is needed. Only one band of all frames is in memory at a time, so memory is bounded by the
band budget, not by the number of frames.

Per output pixel: the weighted mean (float64 accumulation) or the median of the samples kept by
the rejection algorithm; coverage = number of finite samples; rej_low/rej_high = rejected counts;
weight_sum = sum of the weights of the kept samples. When every valid sample is rejected the
result is the median of all valid samples (PixInsight behaviour) and weight_sum is the sum over
all valid samples; with no valid sample the result is NaN. Every pixel is computed independently,
so the output is bit-identical for any band height.

Large-scale rejection (``large_scale=True``, §7.4): pass 1 integrates and records each frame's
high rejections; per frame, 8-connected components of at least ``min_area_px`` pixels or
``min_length_px`` long are grown by ``growth_px`` and become pre-rejected (high) samples of
pass 2, which integrates again. Satellite and aircraft trails are removed whole this way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numba import njit, prange
from stackwatch.engine.errors import StackwatchError
from stackwatch.engine.reject import (
    FLOOR_SIZE,
    HIGH,
    INVALID,
    KEEP,
    LOW,
    WORK_ROWS,
    _median_buf,
    _run,
    auto_rejection,
    get_rejection,
    quiet_count,
)
from stackwatch.engine.reject import quiet_kappa as quiet_kappa_for

__all__ = [
    "ArraySource",
    "BandSource",
    "Integration",
    "MaskedSource",
    "NoiseModel",
    "NpySource",
    "band_rows_for",
    "integrate",
]


# ---------------------------------------------------------------------------------------------
# sources


@runtime_checkable
class BandSource(Protocol):
    """A frame that can deliver row bands: ``shape`` is (H, W) or (C, H, W)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def read_band(self, y0: int, y1: int) -> np.ndarray:
        """Rows [y0, y1) as float32, (y1 - y0, W) or (C, y1 - y0, W); NaN = no data or excluded."""
        ...


class ArraySource:
    """An in-memory frame (H, W) or (C, H, W)."""

    def __init__(self, array: np.ndarray) -> None:
        a = np.asarray(array)
        if a.ndim not in (2, 3):
            raise StackwatchError(f"integration source must be (H, W) or (C, H, W), got shape {a.shape}")
        self._a = a
        self.shape: tuple[int, ...] = tuple(a.shape)

    def read_band(self, y0: int, y1: int) -> np.ndarray:
        if self._a.ndim == 2:
            return np.asarray(self._a[y0:y1], dtype=np.float32)
        return np.asarray(self._a[:, y0:y1], dtype=np.float32)


class NpySource:
    """A frame stored as a .npy file (float32, (H, W) or (C, H, W), C order), read band by band.

    Bands are read with ordinary positioned reads (no memory map), so the pages of frames already
    integrated do not stay mapped in the process and its resident memory stays bounded by the band.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                self._offset = f.tell()
        except (OSError, ValueError) as exc:
            raise StackwatchError(f"{self.path}: cannot open frame store file ({exc})") from None
        if len(shape) not in (2, 3) or fortran or dtype.kind != "f":
            raise StackwatchError(
                f"{self.path}: frame must be a C-order float (H, W) or (C, H, W) array, got {dtype} {shape}"
            )
        self._dtype = dtype
        self.shape = tuple(int(v) for v in shape)
        self._row_bytes = self.shape[-1] * dtype.itemsize
        self._plane_bytes = self.shape[-2] * self._row_bytes

    def read_band(self, y0: int, y1: int) -> np.ndarray:
        planes = 1 if len(self.shape) == 2 else self.shape[0]
        w = self.shape[-1]
        out = np.empty((planes, y1 - y0, w), dtype=self._dtype)
        try:
            with open(self.path, "rb", buffering=0) as f:
                for c in range(planes):
                    f.seek(self._offset + c * self._plane_bytes + y0 * self._row_bytes)
                    view = memoryview(out[c]).cast("B")
                    got = f.readinto(view)
                    if got != view.nbytes:
                        raise StackwatchError(f"{self.path}: truncated frame store file (rows {y0}..{y1})")
        except OSError as exc:
            raise StackwatchError(f"{self.path}: cannot read rows {y0}..{y1} ({exc})") from None
        band = out if planes > 1 else out[0]
        return band if band.dtype == np.float32 else band.astype(np.float32)


class MaskedSource:
    """Wraps a source and an exclusion mask (bool (H, W), True = excluded): excluded pixels read as NaN.

    The mask may be a numpy array or memmap; for colour sources it applies to every channel.
    """

    def __init__(self, source: BandSource, mask: np.ndarray) -> None:
        if tuple(mask.shape) != tuple(source.shape[-2:]):
            raise StackwatchError(f"exclusion mask shape {mask.shape} differs from frame shape {source.shape}")
        self._src = source
        self._mask = mask
        self.shape = tuple(source.shape)

    def read_band(self, y0: int, y1: int) -> np.ndarray:
        band = np.array(self._src.read_band(y0, y1), dtype=np.float32, copy=True)
        m = np.asarray(self._mask[y0:y1], dtype=bool)
        if band.ndim == 3:
            band[:, m] = np.nan
        else:
            band[m] = np.nan
        return band


# ---------------------------------------------------------------------------------------------
# result


@dataclass(frozen=True)
class Integration:
    """Result of ``integrate``: image float32 (NaN where coverage is 0), rejection counts (uint16),
    coverage (uint16, finite samples per pixel), weight_sum (float32, sum of kept weights), the
    algorithm name and resolved parameters, the combination, and large-scale rejection figures
    (pixels pre-rejected per frame; empty when off)."""

    image: np.ndarray
    rej_low: np.ndarray
    rej_high: np.ndarray
    coverage: np.ndarray
    weight_sum: np.ndarray
    rejection: str
    params: dict[str, float]
    combination: str = "mean"
    n_frames: int = 0
    band_rows: int = 0
    large_scale_pixels: tuple[int, ...] = field(default=())

    def rejected_fraction(self) -> tuple[float, float]:
        """Global (low, high) fractions of valid samples rejected (REJLOW/REJHIGH keywords)."""
        total = float(self.coverage.sum(dtype=np.float64))
        if total == 0:
            return 0.0, 0.0
        return float(self.rej_low.sum(dtype=np.float64)) / total, float(self.rej_high.sum(dtype=np.float64)) / total


@dataclass(frozen=True)
class NoiseModel:
    """The frames' noise model (§10), a floor under the σ every rejector tests against.

    The variance of a normalised sample of frame i at signal s above the reference background is
    a_i + b_i·s + (ε·s)² (a_i = ρ_i(m_i σ_i)², b_i = ρ_i m_i / g, see LiveStack). Per pixel the floor
    uses the mean a and b of the frames with a valid sample; the signal is measured from the
    rejector's centre. Below the floor a deviation is noise, never an outlier: with few frames the
    sample σ is often much smaller than the true one, which made PI's clipping reject several times
    the expected share of clean samples and the bright cores of the sharpest frames.

    a, b : (N,) or (N, C) per frame (and channel).
    background : reference background: a scalar, or a grid (gh, gw) / (C, gh, gw) with nodes every
        ``background_step_px`` pixels, interpolated bilinearly (as LiveStack does).
    epsilon : relative scale-noise term. Default is 0.3 (the service's default: a star core up to
        1.9× brighter than the centre, as in a frame with much better seeing, is kept).
    kappa_low, kappa_high : for rejectors without a σ of their own (percentile): a sample is rejected
        only when it is also beyond κ·σ_floor. Defaults 4 and 3.
    """

    a: np.ndarray
    b: np.ndarray
    background: Any = 0.0
    background_step_px: float = 64.0
    epsilon: float = 0.3
    kappa_low: float = 4.0
    kappa_high: float = 3.0

    def per_frame(self, n: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """(C, N) float64 arrays of a and b."""
        out = []
        for name, v in (("a", self.a), ("b", self.b)):
            arr = np.asarray(v, dtype=np.float64)
            if arr.ndim == 1:
                arr = np.repeat(arr[:, None], channels, axis=1)
            if arr.shape != (n, channels) or not np.all(np.isfinite(arr)) or np.any(arr < 0):
                raise StackwatchError(f"noise model: {name} must be finite, >= 0 and of shape ({n},) or ({n}, {channels})")
            out.append(np.ascontiguousarray(arr.T))
        return out[0], out[1]

    def grid(self, channels: int) -> np.ndarray:
        """(C, gh, gw) float64 background grid."""
        g = np.asarray(self.background, dtype=np.float64)
        if g.ndim == 0:
            g = g.reshape(1, 1)
        if g.ndim == 2:
            g = np.broadcast_to(g, (channels, *g.shape))
        if g.ndim != 3 or g.shape[0] != channels:
            raise StackwatchError(f"noise model: background grid shape {g.shape} does not fit {channels} channel(s)")
        return np.ascontiguousarray(g)


@njit(cache=True, nogil=True, inline="always")
def _bg(bgrid: np.ndarray, ch: int, iy: int, iy1: int, fy: float, x: int, inv_step: float) -> float:
    """The reference background grid (C, gh, gw) interpolated bilinearly at column x of a row whose
    grid rows iy, iy1 and weight fy are given (nodes every 1/inv_step pixels; shared with LiveStack)."""
    gw = bgrid.shape[2]
    xx = x * inv_step
    ix = min(int(xx), gw - 1)
    ix1 = min(ix + 1, gw - 1)
    fx = xx - ix if ix1 > ix else 0.0
    return (1 - fy) * ((1 - fx) * bgrid[ch, iy, ix] + fx * bgrid[ch, iy, ix1]) + fy * (
        (1 - fx) * bgrid[ch, iy1, ix] + fx * bgrid[ch, iy1, ix1]
    )


@njit(cache=True, nogil=True)
def _background_rows(grid: np.ndarray, ch: int, y0: int, y1: int, width: int, step: float, out: np.ndarray) -> None:
    """Bilinear interpolation of the background grid on rows [y0, y1), as LiveStack does."""
    gh = grid.shape[1]
    inv = 1.0 / step
    for r in range(y1 - y0):
        yy = (y0 + r) * inv
        iy = min(int(yy), gh - 1)
        iy1 = min(iy + 1, gh - 1)
        fy = yy - iy if iy1 > iy else 0.0
        for x in range(width):
            out[r, x] = _bg(grid, ch, iy, iy1, fy, x, inv)


#: tests: False sends every pixel through its rejector (the quiet-pixel shortcut of _integrate_band off)
_QUIET_SHORTCUT = True
# large-scale pass 2 recomputes only the pixels with a pre-rejected sample: every other pixel has
# the same samples and mask as in pass 1, so its result is pass 1's (~30 % of an exact pass at 26 MP)
_PASS2_PRE_ONLY = True
# pass 1 keeps only the large-scale candidates linked to a high rejection or a band edge (tests: False
# keeps every candidate, with the same maps)
_CANDIDATES_NEAR_SEEDS = True

# ---------------------------------------------------------------------------------------------
# kernel


@njit(cache=True, nogil=True, parallel=True)
def _integrate_band(
    band: np.ndarray,
    pre: np.ndarray,
    weights: np.ndarray,
    code: int,
    params: np.ndarray,
    median: bool,
    out: np.ndarray,
    lo_out: np.ndarray,
    hi_out: np.ndarray,
    cov_out: np.ndarray,
    w_out: np.ndarray,
    record: np.ndarray,
    cand_kappa: float,
    nm_a: np.ndarray,
    nm_b: np.ndarray,
    nm_par: np.ndarray,
    bg: np.ndarray,
    quiet_kappa: float,
    pre_only: bool,
) -> None:
    """Integrate one band (N, h, W). pre: (N, h, W) uint8 pre-rejections (2 = high) or shape (0,0,0).
    record: (N, h, W) uint8 receiving each sample's code, or shape (0,0,0); with cand_kappa > 0 a kept
    sample more than cand_kappa standard deviations above the mean of the kept samples is recorded
    as CANDIDATE (large-scale rejection's low threshold).
    Noise floor (NoiseModel): nm_a/nm_b (N,) per frame, nm_par = (ε², κ_low, κ_high), bg (h, W) the
    reference background of the band; nm_a of shape (0,) disables it.
    quiet_kappa > 0: pixels whose candidates are quiet (reject.quiet_count) skip the rejector, with
    the same result (~0.3 µs a pixel less at 6 frames).
    pre_only (with pre): only pixels with a pre-rejected sample are computed; the others keep the
    outputs they hold (large-scale pass 2 after pass 1 over the same samples)."""
    n, h, w = band.shape
    has_pre = pre.shape[0] == n
    has_rec = record.shape[0] == n
    has_nm = nm_a.shape[0] == n
    pre_only = pre_only and has_pre
    for y in prange(h):
        todo = np.empty(w if pre_only else 0, dtype=np.bool_)
        if pre_only:
            any_row = False
            for x in range(w):
                todo[x] = False
            for i in range(n):
                for x in range(w):
                    if pre[i, y, x] == HIGH:
                        todo[x] = True
                        any_row = True
            if not any_row:
                continue
        floor = np.empty(FLOOR_SIZE, dtype=np.float64)
        floor[0] = -1.0
        floor[1] = 0.0
        floor[2] = 0.0
        floor[3] = 0.0
        floor[4] = 0.0
        floor[5] = 0.0
        if has_nm:
            floor[2] = nm_par[0]
            floor[4] = nm_par[1]
            floor[5] = nm_par[2]
        row = np.empty((w, n), dtype=np.float32)
        for i in range(n):
            for x in range(w):
                row[x, i] = band[i, y, x]
        mask = np.empty(n, dtype=np.uint8)
        work = np.empty((WORK_ROWS, n), dtype=np.float64)
        buf = np.empty(n, dtype=np.float64)
        for x in range(w):
            if pre_only and not todo[x]:
                continue
            values = row[x]
            nvalid = 0
            for i in range(n):
                if math.isfinite(values[i]):
                    nvalid += 1
                    if has_pre and pre[i, y, x] == HIGH:
                        mask[i] = HIGH
                    else:
                        mask[i] = KEEP
                else:
                    mask[i] = INVALID
            cov_out[y, x] = nvalid
            if nvalid == 0:
                out[y, x] = np.nan
                lo_out[y, x] = 0
                hi_out[y, x] = 0
                w_out[y, x] = 0.0
                if has_rec:
                    for i in range(n):
                        record[i, y, x] = INVALID
                continue
            if has_nm:
                sa = 0.0
                sb = 0.0
                for i in range(n):
                    if mask[i] != INVALID:
                        sa += nm_a[i]
                        sb += nm_b[i]
                floor[0] = sa / nvalid
                floor[1] = sb / nvalid
                floor[3] = bg[y, x]
            kept = quiet_count(values, mask, floor, quiet_kappa)
            if kept < 0:
                kept = _run(code, values, params, mask, work, floor)
            nlo = 0
            nhi = 0
            for i in range(n):
                if mask[i] == LOW:
                    nlo += 1
                elif mask[i] == HIGH:
                    nhi += 1
            lo_out[y, x] = nlo
            hi_out[y, x] = nhi
            if kept == 0:
                m = 0
                sw = 0.0
                for i in range(n):
                    if mask[i] != INVALID:
                        buf[m] = values[i]
                        sw += weights[i]
                        m += 1
                out[y, x] = _median_buf(buf, m)
                w_out[y, x] = sw
            elif median:
                m = 0
                sw = 0.0
                for i in range(n):
                    if mask[i] == KEEP:
                        buf[m] = values[i]
                        sw += weights[i]
                        m += 1
                out[y, x] = _median_buf(buf, m)
                w_out[y, x] = sw
            else:
                sw = 0.0
                s = 0.0
                for i in range(n):
                    if mask[i] == KEEP:
                        wi = weights[i]
                        s += wi * values[i]
                        sw += wi
                out[y, x] = s / sw
                w_out[y, x] = sw
            if has_rec:
                for i in range(n):
                    record[i, y, x] = mask[i]
                if cand_kappa > 0.0 and kept >= 3:
                    m1 = 0.0
                    for i in range(n):
                        if mask[i] == KEEP:
                            m1 += values[i]
                    m1 /= kept
                    ss = 0.0
                    for i in range(n):
                        if mask[i] == KEEP:
                            d = values[i] - m1
                            ss += d * d
                    lim = m1 + cand_kappa * math.sqrt(ss / (kept - 1))
                    for i in range(n):
                        if mask[i] == KEEP and values[i] > lim:
                            record[i, y, x] = CANDIDATE


# ---------------------------------------------------------------------------------------------
# wrapper


def band_rows_for(n_frames: int, width: int, height: int, *, channels: int = 1, budget_bytes: int = 1 << 30) -> int:
    """Band height h = clamp(floor(B/(N*W*5*C + 64*W*C)), 16, H) (§7.7)."""
    per_row = n_frames * width * 5 * channels + 64 * width * channels
    h = budget_bytes // max(per_row, 1)
    return int(max(1, min(max(h, 16), height)))


def _weights_array(weights: Any, n: int, channels: int) -> np.ndarray:
    if weights is None:
        return np.ones((channels, n), dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape == (n,):
        w = np.broadcast_to(w, (channels, n))
    elif w.shape == (n, channels):
        w = w.T
    else:
        raise StackwatchError(f"weights must have shape ({n},) or ({n}, {channels}), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise StackwatchError("weights must be finite and > 0 (drop a frame instead of giving it weight 0)")
    return np.ascontiguousarray(w)


def _read_band(sources: Sequence[BandSource], y0: int, y1: int, shape: tuple[int, ...]) -> np.ndarray:
    """(C, N, h, W) float32 band of all frames."""
    c = 1 if len(shape) == 2 else shape[0]
    w = shape[-1]
    out = np.empty((c, len(sources), y1 - y0, w), dtype=np.float32)
    for i, src in enumerate(sources):
        b = np.asarray(src.read_band(y0, y1), dtype=np.float32)
        if b.ndim == 2:
            b = b[None]
        if b.shape != (c, y1 - y0, w):
            raise StackwatchError(
                f"frame {i}: read_band({y0}, {y1}) returned shape {b.shape}, expected {(c, y1 - y0, w)[1 if c == 1 and len(shape) == 2 else 0:]}"
            )
        out[:, i] = b
    return out


_EMPTY_U8 = np.zeros((0, 0, 0), dtype=np.uint8)
CANDIDATE = 4  # record code: kept, but above the large-scale candidate threshold
_TRAIL_ELONGATION = 3.0  # major/minor axis ratio for a candidate-extended structure to count as a trail


def _linked_candidates(cand: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Flat indices (in the band) of the candidate pixels that can belong to a large-scale component:
    those 8-connected, within the band, to a high rejection (seed) or to the band's first or last
    row, through which a component continues into the next band. The others lie in components
    without any high rejection, which `_large_scale_maps` drops, so the maps are the same as from
    every candidate; keeping all of them (3.3 MB of bits per 26 MP frame) made the exact pass's
    memory grow with the number of frames (~1 GB at 300)."""
    if not _CANDIDATES_NEAR_SEEDS:
        return np.flatnonzero(cand)
    from scipy import ndimage

    if not cand.any():
        return np.zeros(0, dtype=np.int64)
    labels, nlab = ndimage.label(cand | seed, structure=np.ones((3, 3), dtype=bool))
    linked = np.zeros(nlab + 1, dtype=bool)
    linked[labels[seed]] = True
    linked[labels[0]] = True
    linked[labels[-1]] = True
    linked[0] = False
    return np.flatnonzero(linked[labels] & cand)


def _large_scale_maps(
    high_idx: list[list[np.ndarray]],
    cand_idx: list[list[np.ndarray]] | None,
    height: int,
    width: int,
    *,
    min_area_px: int,
    min_length_px: int,
    growth_px: int,
) -> list[np.ndarray]:
    """Per frame: sorted flat indices of pixels to pre-reject (grown large high-rejection structures).

    Components are 8-connected over high rejections and, when given, candidate pixels (hysteresis:
    a component must hold at least one high rejection). A component of high rejections only is kept
    when area >= min_area_px or extent >= min_length_px (§7.4); one extended by candidates when it
    holds >= min_area_px high rejections, or is long (extent >= min_length_px) and thin (axis ratio
    >= 3) like a trail, so the brighter wings of the blurriest frame's stars are not taken. Kept
    components are dilated by a disc of radius growth_px.
    """
    from scipy import ndimage

    out: list[np.ndarray] = []
    structure = np.ones((3, 3), dtype=bool)
    r = int(growth_px)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = (xx * xx + yy * yy) <= r * r + 0.5
    for f, parts in enumerate(high_idx):
        idx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if idx.size == 0:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        flat = np.zeros(height * width, dtype=bool)
        if cand_idx is not None:
            for part in cand_idx[f]:
                flat[part] = True
        flat[idx] = True
        bitmap = flat.reshape(height, width)
        labels, nlab = ndimage.label(bitmap, structure=structure)
        if nlab == 0:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        lab = labels.ravel()
        del labels, bitmap, flat
        # only components holding a high rejection can be kept: the others (most of them: single
        # candidate pixels of the noise) are dropped before their shapes are measured
        seeds = np.bincount(lab[idx], minlength=nlab + 1)
        seeded = seeds > 0
        seeded[0] = False
        nz = np.flatnonzero(lab)
        ln = lab[nz]
        del lab
        on = seeded[ln]
        nz, ln = nz[on], ln[on]
        if nz.size == 0:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        areas = np.bincount(ln, minlength=nlab + 1)
        # second moments of each component: elongation = major/minor axis ratio
        py, px = np.divmod(nz, width)
        cnt = np.maximum(areas, 1).astype(np.float64)
        mx = np.bincount(ln, weights=px, minlength=nlab + 1) / cnt
        my = np.bincount(ln, weights=py, minlength=nlab + 1) / cnt
        dx = px - mx[ln]
        dy = py - my[ln]
        sxx = np.bincount(ln, weights=dx * dx, minlength=nlab + 1) / cnt + 1.0 / 12.0
        syy = np.bincount(ln, weights=dy * dy, minlength=nlab + 1) / cnt + 1.0 / 12.0
        sxy = np.bincount(ln, weights=dx * dy, minlength=nlab + 1) / cnt
        half_tr = 0.5 * (sxx + syy)
        root = np.sqrt(np.maximum(half_tr * half_tr - (sxx * syy - sxy * sxy), 0.0))
        elong = np.sqrt((half_tr + root) / np.maximum(half_tr - root, 1e-12))
        # bounding-box extent per component, vectorised (there can be 1e5 small components per frame)
        order = np.argsort(ln, kind="stable")
        sl_ = ln[order]
        starts = np.flatnonzero(np.r_[True, sl_[1:] != sl_[:-1]])
        labs = sl_[starts]
        extent = np.zeros(nlab + 1, dtype=np.int64)
        pxs = px[order]
        pys = py[order]
        extent[labs] = np.maximum(
            np.maximum.reduceat(pxs, starts) - np.minimum.reduceat(pxs, starts),
            np.maximum.reduceat(pys, starts) - np.minimum.reduceat(pys, starts),
        ) + 1
        pure = areas == seeds  # high rejections only (PI-like rule)
        big_or_long = (areas >= min_area_px) | (extent >= min_length_px)
        # with hysteresis candidates: enough rejections, or a long thin (trail-like) shape
        trail = (seeds >= min_area_px) | ((extent >= min_length_px) & (elong >= _TRAIL_ELONGATION))
        keep = (seeds > 0) & np.where(pure, big_or_long, trail)
        keep[0] = False
        out.append(_grow(nz[keep[ln]], height, width, disk, r))
    return out


def _grow(flat_idx: np.ndarray, height: int, width: int, disk: np.ndarray, r: int) -> np.ndarray:
    """Sorted flat indices of the pixels within the disc (bool (2r+1, 2r+1)) of any of flat_idx: the
    binary dilation of those pixels inside the frame, without a full-frame mask (0.4 s per 26 MP frame)."""
    if r <= 0 or flat_idx.size == 0:
        return np.sort(flat_idx)
    y, x = np.divmod(flat_idx, width)
    parts = []
    for dy, dx in np.argwhere(disk) - r:
        yy, xx = y + dy, x + dx
        inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        parts.append(yy[inside] * width + xx[inside])
    return np.unique(np.concatenate(parts))


def integrate(
    sources: Sequence[BandSource | np.ndarray],
    *,
    weights: Any = None,
    combination: str = "mean",
    rejection: str = "winsorized",
    params: Mapping[str, float] | None = None,
    large_scale: bool = False,
    large_scale_min_area_px: int = 25,
    large_scale_min_length_px: int = 15,
    large_scale_growth_px: int = 2,
    large_scale_candidate_kappa: float = 2.0,
    band_budget_bytes: int = 1 << 30,
    band_rows: int | None = None,
    prefetch: bool = True,
    noise_model: NoiseModel | None = None,
    on_band: Callable[[int, int, np.ndarray, np.ndarray, np.ndarray | None], None] | None = None,
) -> Integration:
    """Integrate frames with pixel rejection, band by band.

    Parameters
    ----------
    sources : BandSource objects (or arrays, wrapped in ArraySource), all the same shape (H, W) or (C, H, W).
    weights : per frame (N,) or per frame and channel (N, C), > 0. Default is None (all 1).
    combination : "mean" (weighted, default) or "median" (unweighted, of the kept samples).
    rejection : a REJECTIONS name or "auto" (§7.5 by the number of frames). Default is "winsorized".
    params : algorithm parameters by name, over its defaults. Default is None.
    large_scale : two-pass large-scale (high-side) rejection, §7.4. Default is False.
    large_scale_min_area_px, large_scale_min_length_px, large_scale_growth_px : structures of at least
        this area or extent are grown by this many pixels. Defaults 25, 15, 2.
    large_scale_candidate_kappa : hysteresis threshold: kept samples more than this many standard
        deviations (of the kept samples) above their mean join the high rejections when the
        structures are built, so faint trail segments and wings connected to rejected cores are
        removed too; components without any high rejection are ignored. 0 disables. Default is 2.0.
    band_budget_bytes : memory for the bands of all frames. Default is 1 GiB. With ``prefetch`` the
        budget is split between two bands (one being read while the other is integrated).
    band_rows : force the band height (tests); default None = from the budget.
    prefetch : read the next band in a thread while the current one is integrated. Default is True.
    noise_model : a floor under the rejectors' σ from the frames' noise model (see NoiseModel).
        Default is None (the algorithms exactly as PixInsight defines them).
    on_band : called with each band's decisions, ``on_band(y0, y1, band, codes, redo)``: band the
        (C, N, h, W) float32 samples of rows [y0, y1), codes (C, N, h, W) uint8 the decision on each
        sample (reject.KEEP, LOW, HIGH, INVALID; CANDIDATE counts as kept). With large-scale
        rejection pass 1 reports every band (redo None), then pass 2 the bands it recomputes, with
        redo the (h, W) bool mask of the pixels whose decisions replace pass 1's (codes are valid
        only there). The live stack rebuilds its state from them without reading the frames again.
        Default is None.

    Exclusion masks: sources deliver NaN for excluded pixels (``MaskedSource`` wraps a source and a
    bool mask); such samples count neither in coverage nor in rejection.
    """
    if len(sources) == 0:
        raise StackwatchError("integrate: no frames to integrate")
    srcs: list[BandSource] = [s if isinstance(s, BandSource) else ArraySource(np.asarray(s)) for s in sources]
    shape = tuple(srcs[0].shape)
    for i, s in enumerate(srcs):
        if tuple(s.shape) != shape:
            raise StackwatchError(f"integrate: frame {i} has shape {tuple(s.shape)}, frame 0 has {shape}")
    if len(shape) not in (2, 3):
        raise StackwatchError(f"integrate: frames must be (H, W) or (C, H, W), got {shape}")
    if combination not in ("mean", "median"):
        raise StackwatchError(f"integrate: unknown combination {combination!r} (mean, median)")
    n = len(srcs)
    if n > 65535:
        raise StackwatchError("integrate: more than 65535 frames")
    channels = 1 if len(shape) == 2 else shape[0]
    height, width = shape[-2], shape[-1]
    name = rejection
    user_params = dict(params or {})
    if name == "auto":
        name, auto_params = auto_rejection(n)
        user_params = {**auto_params, **user_params}
    spec = get_rejection(name)
    resolved = spec.resolve(user_params)
    packed = spec.pack(user_params, n_max=n)
    wts = _weights_array(weights, n, channels)
    per_band = band_budget_bytes // 2 if prefetch else band_budget_bytes
    if large_scale:  # pass 1 also holds a uint8 record and two bool maps per sample: 8 bytes instead of 5
        per_band = per_band * 5 // 8
    h = band_rows if band_rows is not None else band_rows_for(n, width, height, channels=channels, budget_bytes=per_band)
    h = max(1, min(int(h), height))

    image = np.empty((channels, height, width), dtype=np.float32)
    rej_lo = np.empty((channels, height, width), dtype=np.uint16)
    rej_hi = np.empty((channels, height, width), dtype=np.uint16)
    cov = np.empty((channels, height, width), dtype=np.uint16)
    wsum = np.empty((channels, height, width), dtype=np.float32)
    median = combination == "median"
    if noise_model is not None:
        nm_a, nm_b = noise_model.per_frame(n, channels)
        nm_grid = noise_model.grid(channels)
        nm_step = float(noise_model.background_step_px)
        if not nm_step > 0:
            raise StackwatchError("noise model: background_step_px must be > 0")
        nm_par = np.array(
            [float(noise_model.epsilon) ** 2, float(noise_model.kappa_low), float(noise_model.kappa_high)], np.float64
        )
    else:
        nm_a = nm_b = np.zeros((channels, 0), np.float64)
        nm_par = np.zeros(3, np.float64)

    quiet_kappa = 0.0  # the quiet-pixel shortcut of _integrate_band (reject.quiet_count)
    if _QUIET_SHORTCUT and noise_model is not None:
        quiet_kappa = quiet_kappa_for(spec.code, packed, (float(nm_par[1]), float(nm_par[2])))
    cand_kappa = float(large_scale_candidate_kappa) if large_scale else 0.0
    cands: list[list[np.ndarray]] = [[] for _ in range(n)]  # flat indices per band (_linked_candidates)
    # the per-frame index lists of pass 1 live until the maps are built: int32 halves them (at 300
    # frames of 26 MP the bands are 9 rows high and the candidates at their edges are ~1 MB a frame)
    flat_dtype = np.int32 if height * width < 2**31 else np.int64

    def run_pass(pre_idx: list[np.ndarray] | None, record_high: bool) -> list[list[np.ndarray]]:
        highs: list[list[np.ndarray]] = [[] for _ in range(n)]
        spans = [(y0, min(height, y0 + h)) for y0 in range(0, height, h)]
        if pre_idx is not None and _PASS2_PRE_ONLY:  # pass 2: only the bands with a pre-rejection
            rows = np.zeros(height, dtype=bool)
            for idx in pre_idx:
                rows[idx // width] = True
            spans = [(y0, y1) for y0, y1 in spans if rows[y0:y1].any()]
            if not spans:
                return highs
        with ThreadPoolExecutor(max_workers=1) as reader:
            nxt = reader.submit(_read_band, srcs, spans[0][0], spans[0][1], shape) if prefetch else None
            for k, (y0, y1) in enumerate(spans):
                if nxt is not None:
                    band = nxt.result()
                    nxt = reader.submit(_read_band, srcs, *spans[k + 1], shape) if k + 1 < len(spans) else None
                else:
                    band = _read_band(srcs, y0, y1, shape)
                integrate_band(band, y0, y1, pre_idx, record_high, highs)
                del band
        return highs

    def integrate_band(
        band: np.ndarray, y0: int, y1: int, pre_idx: list[np.ndarray] | None, record_high: bool,
        highs: list[list[np.ndarray]],
    ) -> None:
        pre = _EMPTY_U8
        if pre_idx is not None:
            pre = np.zeros((n, y1 - y0, width), dtype=np.uint8)
            a, b = y0 * width, y1 * width
            for i, idx in enumerate(pre_idx):
                sel = idx[np.searchsorted(idx, a) : np.searchsorted(idx, b)] - a
                pre[i].reshape(-1)[sel] = HIGH
        codes = np.zeros((channels, n, y1 - y0, width), dtype=np.uint8) if (record_high or on_band) else None
        union = np.zeros((n, y1 - y0, width), dtype=bool) if record_high else None
        cand = np.zeros((n, y1 - y0, width), dtype=bool) if (record_high and cand_kappa > 0) else None
        bg = np.zeros((y1 - y0, width) if noise_model is not None else (0, 0), np.float64)
        for c in range(channels):
            if noise_model is not None:
                _background_rows(nm_grid, c, y0, y1, width, nm_step, bg)
            rec = _EMPTY_U8 if codes is None else codes[c]
            _integrate_band(
                band[c],
                pre,
                wts[c],
                spec.code,
                packed,
                median,
                image[c, y0:y1],
                rej_lo[c, y0:y1],
                rej_hi[c, y0:y1],
                cov[c, y0:y1],
                wsum[c, y0:y1],
                rec,
                cand_kappa if record_high else 0.0,
                nm_a[c],
                nm_b[c],
                nm_par,
                bg,
                quiet_kappa,
                pre_idx is not None and _PASS2_PRE_ONLY,
            )
            if union is not None:
                union |= rec == HIGH
            if cand is not None:
                cand |= rec == CANDIDATE
        if on_band is not None and codes is not None:
            redo: np.ndarray | None = None
            if pre_idx is not None:
                redo = np.asarray(pre.any(axis=0)) if _PASS2_PRE_ONLY else np.ones((y1 - y0, width), dtype=bool)
            on_band(y0, y1, band, codes, redo)
        if union is not None:
            for i in range(n):
                highs[i].append((np.flatnonzero(union[i]) + y0 * width).astype(flat_dtype))
        if cand is not None and union is not None:
            for i in range(n):
                cands[i].append((_linked_candidates(cand[i], union[i]) + y0 * width).astype(flat_dtype))

    ls_counts: tuple[int, ...] = ()
    if large_scale:
        highs = run_pass(None, True)
        pre_idx = _large_scale_maps(
            highs,
            cands if cand_kappa > 0 else None,
            height,
            width,
            min_area_px=large_scale_min_area_px,
            min_length_px=large_scale_min_length_px,
            growth_px=large_scale_growth_px,
        )
        ls_counts = tuple(int(p.size) for p in pre_idx)
        run_pass(pre_idx, False)
    else:
        run_pass(None, False)

    if channels == 1 and len(shape) == 2:
        image, rej_lo, rej_hi, cov, wsum = image[0], rej_lo[0], rej_hi[0], cov[0], wsum[0]
    return Integration(
        image=image,
        rej_low=rej_lo,
        rej_high=rej_hi,
        coverage=cov,
        weight_sum=wsum,
        rejection=name,
        params=resolved,
        combination=combination,
        n_frames=n,
        band_rows=h,
        large_scale_pixels=ls_counts,
    )
