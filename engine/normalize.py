"""Normalisation of registered lights to a reference (the NormalizeScaleGradient approach, §8).

Both images are on the reference grid (the frame is registered and resampled; NaN = outside its
footprint) and the star positions of both are given in reference coordinates. The result is

    y = m·x + g(x, y)

with m the photometric scale from stars matched between the two images (same aperture in both,
local annulus background, Tukey IRLS fit through the origin) and g a smooth surface (thin-plate
spline, smoothing by the discrepancy principle; polynomial fallback) fitted to star-free bin medians
of d = ref − m·frame. The weight is w = (σ_ref/(m·σ))² with σ the pre-resampling noise (§8.3).

A `Normalization` stores only small parameters (scales, coarse gradient grids and their geometry),
serialisable with `to_dict`/`from_dict`, so a frame can be re-normalised with `apply` without
re-registration. Colour images (3, H, W) get a scale and a gradient per channel from the same
star set. When too few stars pair up, a global additive + scaling normalisation (§8.4) is used and
flagged ``method="global"`` with the reason; ``method="local"`` is an option (§8.4).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import njit, prange
from scipy.ndimage import uniform_filter
from scipy.spatial import cKDTree
from stackwatch.engine.errors import StackwatchError

__all__ = [
    "ChannelNorm",
    "Normalization",
    "apply",
    "gradient_amplitude",
    "normalize",
    "rank_reference_candidates",
]

_METHODS = ("nsg", "global", "local")


# --------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelNorm:
    """Normalisation of one channel: y = scale·x + offset(x, y) (or scale_map(x, y)·x + offset).

    ``offset`` is a coarse grid of the additive term at nodes (i·step, j·step) (row, column) of the
    parent `Normalization`; ``scale_map`` (local normalisation only) is a coarse grid of the
    multiplicative term, None otherwise.
    """

    scale: float
    scale_err: float
    n_pairs: int
    noise: float
    weight: float
    offset: np.ndarray = field(repr=False)
    scale_map: np.ndarray | None = field(default=None, repr=False)
    smoothing: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "scale_err": self.scale_err,
            "n_pairs": self.n_pairs,
            "noise": self.noise,
            "weight": self.weight,
            "smoothing": self.smoothing,
            "offset": np.asarray(self.offset, np.float64).tolist(),
            "scale_map": None if self.scale_map is None else np.asarray(self.scale_map, np.float64).tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChannelNorm:
        sm = d.get("scale_map")
        return cls(
            scale=float(d["scale"]),
            scale_err=float(d["scale_err"]),
            n_pairs=int(d["n_pairs"]),
            noise=float(d["noise"]),
            weight=float(d["weight"]),
            offset=np.asarray(d["offset"], np.float32),
            scale_map=None if sm is None else np.asarray(sm, np.float32),
            smoothing=float(d.get("smoothing", float("nan"))),
        )


@dataclass(frozen=True)
class Normalization:
    """Stored normalisation of one frame to one reference.

    ``shape`` is the image shape ((H, W) or (3, H, W)); ``step_px`` the node spacing of the coarse
    grids; ``method`` is "nsg", "global" or "local"; ``reason`` says why a fallback was used
    ("" when none). ``scale``, ``scale_err`` and ``weight`` are the channel means (NWEIGHT).
    """

    channels: tuple[ChannelNorm, ...]
    shape: tuple[int, ...]
    step_px: int
    method: str
    reason: str = ""
    reference_id: str = ""

    @property
    def scale(self) -> float:
        return float(np.mean([c.scale for c in self.channels]))

    @property
    def scale_err(self) -> float:
        return float(np.mean([c.scale_err for c in self.channels]))

    @property
    def weight(self) -> float:
        return float(np.mean([c.weight for c in self.channels]))

    @property
    def n_pairs(self) -> int:
        return int(min(c.n_pairs for c in self.channels))

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "step_px": self.step_px,
            "method": self.method,
            "reason": self.reason,
            "reference_id": self.reference_id,
            "channels": [c.to_dict() for c in self.channels],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Normalization:
        return cls(
            channels=tuple(ChannelNorm.from_dict(c) for c in d["channels"]),
            shape=tuple(int(v) for v in d["shape"]),
            step_px=int(d["step_px"]),
            method=str(d["method"]),
            reason=str(d.get("reason", "")),
            reference_id=str(d.get("reference_id", "")),
        )


# --------------------------------------------------------------------------------------------
# Numba kernels
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _plane_values(img: np.ndarray, yy: int, xx: int, with_luma: bool, vals: np.ndarray) -> None:
    """vals[c] = img[c, yy, xx] (as float32 values), and vals[C] = their float32 mean when with_luma."""
    nch = img.shape[0]
    acc = img[0, yy, xx]
    vals[0] = acc
    for c in range(1, nch):
        v = img[c, yy, xx]
        vals[c] = v
        acc = acc + v
    if with_luma:
        vals[nch] = np.float32(acc / nch)


@njit(cache=True, nogil=True, parallel=True)
def _phot_kernel(
    img: np.ndarray,
    bad: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    radii: np.ndarray,
    with_luma: bool,
    out: np.ndarray,
) -> None:
    """Aperture photometry with annulus-median background on every plane of img (C, H, W).

    out[p, s, k] for plane p (the C channels, then their mean when with_luma) and star s; k = flux,
    bkg, bkg_sigma, peak (above bkg), ok (1/0), n_ap, n_ann, peak_ok (1/0). radii = (r_ap, r_in,
    r_out). ok = 0 when any aperture pixel is outside the image, NaN or flagged bad, or the annulus
    has < 8 px. Boundary pixels of the aperture are 5×5 sub-sampled. peak_ok = 1 when the peak
    could be measured from the part of the aperture inside the image with ≥ 8 annulus pixels and no
    bad pixel in the aperture: stars at the frame edge then get a star-avoidance radius from their
    brightness rather than the cap (which emptied edge bins).

    The aperture geometry (distances, sub-pixel fractions) is computed once per pixel for all
    planes, and the mean plane is formed on the aperture pixels only: a colour frame's three
    channels and its luminance cost one pass instead of a full-frame mean and six passes. The
    mean is float32 ((c0 + c1) + c2, then / C in float64 rounded to float32), bit for bit
    np.mean(np.stack(channels), axis=0, dtype=np.float32).
    """
    nch, h, w = img.shape
    npl = nch + 1 if with_luma else nch
    r_ap, r_in, r_out = radii[0], radii[1], radii[2]
    rb = math.ceil(r_out) + 1
    for s in prange(xs.size):
        side = 2 * rb + 1
        buf = np.empty((npl, side * side), np.float64)
        vals = np.empty(npl, np.float64)
        nb = np.zeros(npl, np.int64)
        okp = np.ones(npl, np.bool_)
        flux = np.zeros(npl, np.float64)
        area = np.zeros(npl, np.float64)
        peak = np.full(npl, -np.inf)
        bk = np.empty(npl, np.float64)
        x0 = xs[s]
        y0 = ys[s]
        for p in range(npl):
            out[p, s, 4] = 0.0
            out[p, s, 7] = 0.0
        if not (np.isfinite(x0) and np.isfinite(y0)):
            continue
        ix = math.floor(x0 + 0.5)
        iy = math.floor(y0 + 0.5)
        if ix + rb < 0 or iy + rb < 0 or ix - rb >= w or iy - rb >= h:
            continue
        inside = ix - rb >= 0 and iy - rb >= 0 and ix + rb < w and iy + rb < h
        ya, yb = max(0, iy - rb), min(h - 1, iy + rb)
        xa, xb = max(0, ix - rb), min(w - 1, ix + rb)
        bad_ap = False
        for yy in range(ya, yb + 1):
            for xx in range(xa, xb + 1):
                d = math.sqrt((xx - x0) ** 2 + (yy - y0) ** 2)
                ann = d >= r_in and d <= r_out
                if not ann and d > r_ap + 0.75:
                    continue
                _plane_values(img, yy, xx, with_luma, vals)
                b = bad[yy, xx]
                if ann:
                    if not b:
                        for p in range(npl):
                            if np.isfinite(vals[p]):
                                buf[p, nb[p]] = vals[p]
                                nb[p] += 1
                else:
                    if b:
                        bad_ap = True
                    for p in range(npl):
                        if b or not np.isfinite(vals[p]):
                            okp[p] = False
        for p in range(npl):
            if nb[p] >= 8:
                bk[p] = np.median(buf[p, : nb[p]])
        for yy in range(ya, yb + 1):
            for xx in range(xa, xb + 1):
                d = math.sqrt((xx - x0) ** 2 + (yy - y0) ** 2)
                if d > r_ap + 0.75:
                    continue
                if d < r_ap - 0.75:
                    frac = 1.0
                else:
                    cnt = 0
                    for sy in range(5):
                        for sx in range(5):
                            px = xx - 0.4 + 0.2 * sx
                            py = yy - 0.4 + 0.2 * sy
                            if (px - x0) ** 2 + (py - y0) ** 2 <= r_ap * r_ap:
                                cnt += 1
                    frac = cnt / 25.0
                if frac > 0.0:
                    _plane_values(img, yy, xx, with_luma, vals)
                    for p in range(npl):
                        if nb[p] < 8:
                            continue
                        v = vals[p] - bk[p]
                        if np.isfinite(v):
                            flux[p] += frac * v
                            area[p] += frac
                            if v > peak[p]:
                                peak[p] = v
        for p in range(npl):
            n = nb[p]
            if n < 8:
                continue
            dev = np.abs(buf[p, :n] - bk[p])
            out[p, s, 1] = bk[p]
            out[p, s, 2] = 1.4826 * np.median(dev)
            out[p, s, 3] = peak[p]
            out[p, s, 6] = n
            if not bad_ap and np.isfinite(peak[p]):
                out[p, s, 7] = 1.0
            if okp[p] and inside:
                out[p, s, 0] = flux[p]
                out[p, s, 4] = 1.0
                out[p, s, 5] = area[p]


@njit(cache=True, nogil=True)
def _paint_disks(mask: np.ndarray, xs: np.ndarray, ys: np.ndarray, rs: np.ndarray) -> None:
    h, w = mask.shape
    for s in range(xs.size):
        r = rs[s]
        x0 = xs[s]
        y0 = ys[s]
        if not (np.isfinite(x0) and np.isfinite(y0)) or r <= 0:
            continue
        ya = max(0, math.floor(y0 - r))
        yb = min(h - 1, math.ceil(y0 + r))
        xa = max(0, math.floor(x0 - r))
        xb = min(w - 1, math.ceil(x0 + r))
        r2 = r * r
        for yy in range(ya, yb + 1):
            for xx in range(xa, xb + 1):
                if (xx - x0) ** 2 + (yy - y0) ** 2 <= r2:
                    mask[yy, xx] = True


@njit(cache=True, nogil=True)
def _dilate_into(mask: np.ndarray, r: int, out: np.ndarray) -> None:
    """out |= mask dilated by a (2r+1)² square: a row pass, then a running column count."""
    h, w = mask.shape
    rows = np.zeros((h, w), np.bool_)
    for y in range(h):
        last = -1
        for x in range(w):
            if mask[y, x]:
                for xx in range(max(x - r, last + 1), min(w, x + r + 1)):
                    rows[y, xx] = True
                last = min(w - 1, x + r)
    cnt = np.zeros(w, np.int32)
    for y in range(min(r, h)):
        for x in range(w):
            cnt[x] += rows[y, x]
    for y in range(h):
        if y + r < h:
            for x in range(w):
                cnt[x] += rows[y + r, x]
        if y - r - 1 >= 0:
            for x in range(w):
                cnt[x] -= rows[y - r - 1, x]
        for x in range(w):
            if cnt[x] > 0:
                out[y, x] = True


_HIST_CELLS = 64  # histogram of one bin: ±4σ around a pivot in σ/8 cells


@njit(cache=True, nogil=True, parallel=True)
def _bin_medians(
    ref: np.ndarray,
    frame: np.ndarray,
    m: float,
    gmask: np.ndarray,
    bad: np.ndarray,
    s: int,
    sigma: float,
    limits: np.ndarray,
    out: np.ndarray,
    count: np.ndarray,
) -> None:
    """out[i, j] = median of ref − m·frame over usable pixels of bin (i, j), NaN if unusable.

    count[i, j] = the usable pixels. limits = (min_good_frac, max_bad_frac): a bin needs at least
    min_good_frac of its pixels unmasked and at most max_bad_frac NaN/bad. The median is read from
    a histogram (σ/8 cells over ±4σ around the median of a 1-in-16 subsample, linear within the
    cell): one pass over the pixels instead of a selection over them, 2.5× less CPU at 26 MP and
    as precise as the sample median (its spread vs the exact one is ~0.15 of the bin's noise, the
    noise of both against the truth is equal). Bins whose median falls outside the window (σ
    wrong, a trail) or with sigma ≤ 0 use the exact median.

    Each thread takes a band of s rows and reads it row by row across all its bins (the subsample,
    then the histograms): bin by bin, 32 short strided segments per bin, the same work cost 1.6×
    the CPU. Per bin the samples and counts are the same, so the result is.
    """
    gh, gw = out.shape
    h, w = ref.shape
    nc = _HIST_CELLS
    nc_f = float(nc)
    cell = sigma / 8.0
    inv = 1.0 / cell if sigma != 0.0 else 0.0
    use_hist = sigma > 0.0 and np.isfinite(sigma)
    min_good, max_bad = limits[0], limits[1]
    cap = (s // 4 + 1) ** 2  # subsample pixels of one bin: every 4th row, every 4th column
    for i in prange(gh):
        y0 = i * s
        y1 = min(h, y0 + s)
        # mode per bin: 0 too small (partial edge bin), 1 histogram, 2 exact median
        mode = np.zeros(gw, np.int8)
        lo = np.zeros(gw)
        ns = np.zeros(gw, np.int64)
        sub = np.empty((gw, cap), np.float64)
        hist = np.zeros((gw, nc + 4), np.int64)
        buf = np.empty(s * s, np.float64)
        for j in range(gw):
            x0 = j * s
            x1 = min(w, x0 + s)
            out[i, j] = np.nan
            count[i, j] = 0
            if (y1 - y0) * (x1 - x0) >= s * s // 2:
                mode[j] = 1 if use_hist else 2
        if use_hist:
            for yy in range(y0 + 1, y1, 4):
                off = yy & 3
                for j in range(gw):
                    if mode[j] != 1:
                        continue
                    x0 = j * s
                    x1 = min(w, x0 + s)
                    k = ns[j]
                    for xx in range(x0 + off, x1, 4):
                        a = ref[yy, xx]
                        b = frame[yy, xx]
                        if np.isfinite(a) and np.isfinite(b) and not bad[yy, xx] and not gmask[yy, xx]:
                            sub[j, k] = a - m * b
                            k += 1
                    ns[j] = k
            for j in range(gw):
                if mode[j] == 1:
                    if ns[j] < 8:
                        mode[j] = 2
                    else:
                        lo[j] = np.median(sub[j, : ns[j]]) - 0.5 * nc * cell
            # every pixel increments one cell of its bin's histogram [below, the nc cells, above,
            # bad or NaN, masked] (branch-free); the counts are read from the extra cells afterwards
            for yy in range(y0, y1):
                for j in range(gw):
                    if mode[j] != 1:
                        continue
                    x0 = j * s
                    x1 = min(w, x0 + s)
                    lj = lo[j]
                    for xx in range(x0, x1):
                        v = ref[yy, xx] - m * frame[yy, xx]
                        good = np.isfinite(v) and not bad[yy, xx]
                        t = (v - lj) * inv if good else -1.0
                        k = math.floor(min(max(t, -1.0), nc_f)) + 1
                        k = (nc + 3 if gmask[yy, xx] else k) if good else nc + 2
                        hist[j, k] += 1
        for j in range(gw):
            if mode[j] == 0:
                continue
            x0 = j * s
            x1 = min(w, x0 + s)
            npx = (y1 - y0) * (x1 - x0)
            exact = mode[j] == 2
            below = hist[j, 0]
            nbad = hist[j, nc + 2]
            n = npx - nbad - hist[j, nc + 3]
            if not exact and (2 * below >= n or 2 * hist[j, nc + 1] >= n):
                exact = True
            if exact:
                nbad = 0
                n = 0
                for yy in range(y0, y1):
                    for xx in range(x0, x1):
                        v = ref[yy, xx] - m * frame[yy, xx]
                        if bad[yy, xx] or not np.isfinite(v):
                            nbad += 1
                        elif not gmask[yy, xx]:
                            buf[n] = v
                            n += 1
            if nbad > max_bad * npx or n < min_good * npx or n < 16:
                continue
            count[i, j] = n
            if exact:
                out[i, j] = np.median(buf[:n])
            else:
                half = 0.5 * n
                cum = float(below)
                k = 0
                while cum + hist[j, k + 1] < half:
                    cum += hist[j, k + 1]
                    k += 1
                out[i, j] = lo[j] + (k + (half - cum) / hist[j, k + 1]) * cell


@njit(cache=True, nogil=True, parallel=True)
def _nanmedian_5x5(a: np.ndarray, out: np.ndarray) -> None:
    """out[i, j] = median of the non-NaN values of a's 5×5 neighbourhood of (i, j), NaN if none.

    np.nanmedian over sliding 5×5 windows of the NaN-padded grid, value for value (the middle value,
    or the mean of the two middle ones, (low + high) / 2); numpy took that path through masked arrays
    and cost 15 ms per call at 26 MP, six calls per colour frame.
    """
    h, w = a.shape
    for i in prange(h):
        buf = np.empty(25, np.float64)
        for j in range(w):
            n = 0
            for y in range(max(0, i - 2), min(h, i + 3)):
                for x in range(max(0, j - 2), min(w, j + 3)):
                    v = a[y, x]
                    if v == v:
                        k = n
                        while k > 0 and buf[k - 1] > v:
                            buf[k] = buf[k - 1]
                            k -= 1
                        buf[k] = v
                        n += 1
            if n == 0:
                out[i, j] = np.nan
            elif n % 2 == 1:
                out[i, j] = buf[n // 2]
            else:
                out[i, j] = (buf[n // 2 - 1] + buf[n // 2]) / 2.0


@njit(cache=True, nogil=True, parallel=True)
def _tps_matrix(ay: np.ndarray, ax: np.ndarray, by: np.ndarray, bx: np.ndarray, out: np.ndarray) -> None:
    """out[i, j] = φ(|a_i − b_j|) with the thin-plate kernel φ(r) = r² log r."""
    for i in prange(ay.size):
        for j in range(by.size):
            d2 = (ay[i] - by[j]) ** 2 + (ax[i] - bx[j]) ** 2
            out[i, j] = 0.5 * d2 * math.log(d2) if d2 > 0.0 else 0.0


@njit(cache=True, nogil=True, parallel=True)
def _tps_grid(ys: np.ndarray, xs: np.ndarray, py: np.ndarray, px: np.ndarray, c: np.ndarray, out: np.ndarray) -> None:
    """out[i, j] = Σ_k c_k φ(|(ys[i], xs[j]) − p_k|) (the radial part of the spline at grid nodes)."""
    for i in prange(ys.size):
        for j in range(xs.size):
            acc = 0.0
            for k in range(py.size):
                d2 = (ys[i] - py[k]) ** 2 + (xs[j] - px[k]) ** 2
                if d2 > 0.0:
                    acc += c[k] * d2 * math.log(d2)
            out[i, j] = 0.5 * acc


@njit(cache=True, nogil=True, parallel=True)
def _apply_kernel(
    x: np.ndarray,
    scale: float,
    off_cols: np.ndarray,
    scale_cols: np.ndarray,
    rows_i: np.ndarray,
    rows_w: np.ndarray,
    use_map: bool,
    out: np.ndarray,
) -> None:
    """out = scale·x + g (or s(x, y)·x + g) with g, s bicubic in rows from column-interpolated tables.

    off_cols (and scale_cols) hold the grid rows already interpolated to every column; rows_i and
    rows_w give, per image row, the first of 4 table rows and their Catmull-Rom weights.
    """
    h, w = x.shape
    for y in prange(h):
        i0 = rows_i[y]
        w0, w1, w2, w3 = rows_w[y, 0], rows_w[y, 1], rows_w[y, 2], rows_w[y, 3]
        for xx in range(w):
            g = w0 * off_cols[i0, xx] + w1 * off_cols[i0 + 1, xx] + w2 * off_cols[i0 + 2, xx] + w3 * off_cols[i0 + 3, xx]
            if use_map:
                sc = (
                    w0 * scale_cols[i0, xx]
                    + w1 * scale_cols[i0 + 1, xx]
                    + w2 * scale_cols[i0 + 2, xx]
                    + w3 * scale_cols[i0 + 3, xx]
                )
                out[y, xx] = sc * x[y, xx] + g
            else:
                out[y, xx] = scale * x[y, xx] + g


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _star_arrays(stars: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """x, y (reference coordinates) and per-star FWHM (or None) from a star table or an (N, ≥2) array."""
    if stars is None:
        return np.empty(0), np.empty(0), None
    if isinstance(stars, np.ndarray):
        a = np.asarray(stars, np.float64)
        if a.size == 0:
            return np.empty(0), np.empty(0), None
        if a.ndim != 2 or a.shape[1] < 2:
            raise StackwatchError(f"star positions must be an (N, 2) array, got shape {a.shape}")
        return a[:, 0].copy(), a[:, 1].copy(), None
    x = np.asarray(stars.x, np.float64)
    y = np.asarray(stars.y, np.float64)
    fw = getattr(stars, "fwhm", None)
    fwa = None if fw is None else np.asarray(fw, np.float64)
    flags = getattr(stars, "flags", None)
    if flags is not None:
        # Flagged detections (saturated, blended, edge) still mask the gradient samples but we
        # keep them: the photometry below applies its own exclusions.
        pass
    return x, y, fwa


def _channels(a: np.ndarray) -> list[np.ndarray]:
    if a.ndim == 2:
        return [a]
    if a.ndim == 3:
        return [a[c] for c in range(a.shape[0])]
    raise StackwatchError(f"image must be (H, W) or (C, H, W), got shape {a.shape}")


def _per_channel(v: float | Sequence[float] | np.ndarray, nc: int, what: str) -> list[float]:
    arr = np.atleast_1d(np.asarray(v, np.float64))
    if arr.size == 1:
        return [float(arr[0])] * nc
    if arr.size != nc:
        raise StackwatchError(f"{what}: {arr.size} values for {nc} channels")
    return [float(x) for x in arr]


def _bad_plane(mask: np.ndarray | None, shape2: tuple[int, int]) -> np.ndarray:
    if mask is None:
        return np.zeros(shape2, np.bool_)
    mk = np.asarray(mask, np.bool_)
    if mk.ndim == 3:
        mk = np.asarray(mk.any(axis=0), np.bool_)
    if mk.shape != shape2:
        raise StackwatchError(f"mask shape {mk.shape} does not match image {shape2}")
    return np.ascontiguousarray(mk)


def _robust_loc_scale(x: np.ndarray) -> tuple[float, float]:
    """IKSS location/scale (stats.iks_location_scale) when available, else clipped median/σ_MAD."""
    try:
        from stackwatch.engine import stats  # owned by H3; may not exist yet

        loc, sc = stats.iks_location_scale(x)  # type: ignore[attr-defined]
        return float(loc), float(sc)
    except (ImportError, AttributeError):
        pass
    v = x[np.isfinite(x)]
    loc = float(np.median(v))
    sc = 1.4826 * float(np.median(np.abs(v - loc)))
    for _ in range(5):
        keep = np.abs(v - loc) <= 4.0 * sc
        if not keep.any():
            break
        w = v[keep]
        loc = float(np.median(w))
        sc = 1.4826 * float(np.median(np.abs(w - loc)))
    return loc, sc


def _tukey_origin_fit(fr: np.ndarray, ff: np.ndarray, sr: np.ndarray, sf: np.ndarray) -> tuple[float, float, int]:
    """F_ref = m·F_frm through the origin, Tukey biweight IRLS; returns m, σ_m, n_eff (pairs with weight > 0)."""
    med = float(np.median(fr / ff))
    m = med
    c = 4.685
    wt = np.ones_like(fr)
    for _ in range(50):
        var = sr**2 + (m * sf) ** 2
        r = (fr - m * ff) / np.sqrt(var)
        # robust residual scale: the formal errors may be underestimated (resampled noise, PSF changes)
        s = max(1.0, 1.4826 * float(np.median(np.abs(r))))
        u = r / (c * s)
        wt = np.where(np.abs(u) < 1.0, (1.0 - u**2) ** 2, 0.0) / var
        den = float(np.sum(wt * ff * ff))
        if den <= 0:
            return float("nan"), float("nan"), 0
        m_new = float(np.sum(wt * fr * ff) / den)
        done = abs(m_new - m) <= 1e-7 * abs(m)
        m = m_new
        if done:
            break
    var = sr**2 + (m * sf) ** 2
    r = fr - m * ff
    n_eff = int(np.count_nonzero(wt > 0))
    den = float(np.sum(wt * ff * ff))
    if n_eff < 2 or den <= 0:
        return m, float("nan"), n_eff
    sig_m = math.sqrt(float(np.sum(wt * r * r)) / (n_eff - 1) / den)
    return m, sig_m, n_eff


def _poly_terms(u: np.ndarray, v: np.ndarray, deg: int) -> np.ndarray:
    cols = [u**i * v**j for i in range(deg + 1) for j in range(deg + 1 - i)]
    return np.stack(cols, axis=1)


def _poly_fit_robust(u: np.ndarray, v: np.ndarray, z: np.ndarray, deg: int) -> np.ndarray:
    """Tukey IRLS polynomial fit; returns coefficients for `_poly_terms`."""
    a = _poly_terms(u, v, deg)
    wt = np.ones_like(z)
    coef = np.zeros(a.shape[1])
    for _ in range(6):
        # weighted normal equations: 25 000 bins × ≤ 10 terms on [-0.5, 0.5] coordinates are well
        # conditioned, and this is 10× faster than lstsq on the weighted design matrix
        aw = a * wt[:, None]
        try:
            coef = np.linalg.solve(aw.T @ a, aw.T @ z)
        except np.linalg.LinAlgError:
            coef = np.linalg.lstsq(a * np.sqrt(wt)[:, None], z * np.sqrt(wt), rcond=None)[0]
        r = z - a @ coef
        s = 1.4826 * float(np.median(np.abs(r))) + 1e-30
        q = r / (4.685 * s)
        wt = np.where(np.abs(q) < 1.0, (1.0 - q**2) ** 2, 0.0)
    return coef


def _tps_poly(y: np.ndarray, x: np.ndarray, deg: int) -> np.ndarray:
    cols = [np.ones_like(y)]
    if deg >= 1:
        cols += [y, x]
    if deg >= 2:
        cols += [y * y, y * x, x * x]
    return np.stack(cols, axis=1)


@dataclass
class _SplineBasis:
    """The λ-independent part of a whitened thin-plate fit (see `_fit_surface`) for one sample set."""

    py: np.ndarray
    px: np.ndarray
    sn: np.ndarray
    deg: int
    kt: np.ndarray
    q1: np.ndarray
    q2: np.ndarray
    r: np.ndarray
    lam_e: np.ndarray
    vec: np.ndarray

    def fits(self, py: np.ndarray, px: np.ndarray, sn: np.ndarray, deg: int) -> bool:
        # the channels of a colour frame usually keep the same bins, and their sample noises differ
        # by one factor per channel, so sn = σ/median(σ) agrees to a few ulps: reusing the basis
        # then changes the fit by ~1e-12 relative and saves the O(n³) eigendecomposition
        return (
            deg == self.deg
            and py.shape == self.py.shape
            and np.array_equal(py, self.py)
            and np.array_equal(px, self.px)
            and bool(np.all(np.abs(sn - self.sn) <= 1e-12 * self.sn))
        )


def _spline_basis(py: np.ndarray, px: np.ndarray, sn: np.ndarray, deg: int) -> _SplineBasis:
    n = py.size
    kern = np.empty((n, n))
    _tps_matrix(py, px, py, px, kern)
    poly = _tps_poly(py, px, deg)
    npoly = poly.shape[1]
    # whiten by the sample noise: K̃ = S⁻¹KS⁻¹, P̃ = S⁻¹P
    kt = kern / np.outer(sn, sn)
    pt = poly / sn[:, None]
    q, r = np.linalg.qr(pt, mode="complete")
    q1, q2, r = q[:, :npoly], q[:, npoly:], r[:npoly]
    lam_e, vec = np.linalg.eigh(q2.T @ kt @ q2)
    lam_e = np.maximum(lam_e, 0.0)
    return _SplineBasis(py, px, sn, deg, kt, q1, q2, r, lam_e, vec)


def _fit_surface(
    by: np.ndarray,
    bx: np.ndarray,
    z: np.ndarray,
    sig: np.ndarray,
    shape2: tuple[int, int],
    step: int,
    bases: list[_SplineBasis] | None = None,
) -> tuple[np.ndarray, float, str]:
    """Smooth surface through samples at pixel positions (bx, by); evaluated at the node grid.

    Thin-plate smoothing spline: minimise Σ((z − f)/σ)² + λ·bending energy over f = radial part +
    polynomial. The polynomial part is of degree 2 from 50 samples on (degree 1 below): it is not
    penalised, so a sky's curvature is not flattened toward the frame edges, where the samples end
    (with degree 1, a light dome's curvature was underfit there: 0.3σ of stack residual in the
    outer 32 px). λ by the discrepancy principle: the largest λ whose normalised residual RMS is
    ≤ 1 (smoothest surface consistent with the sample noise).

    One symmetric eigendecomposition of the kernel projected off the polynomial space gives the
    residual of every λ in O(n), so λ is found exactly without refitting (scipy's
    RBFInterpolator refitted O(n³) per trial; same solution, verified to 1e-13).
    ``bases`` (the channels of one frame): decompositions already made, reused when the samples
    and their relative noise are the same, and the new one is added.
    Degree-3 (1 below 50 samples) robust polynomial if that fails. Returns (grid, λ, model name).
    """
    h, w = shape2
    gh = (h - 1) // step + 2
    gw = (w - 1) // step + 2
    sxy = float(max(h, w))
    py, px = by / sxy, bx / sxy
    ny = np.arange(gh) * step / sxy
    nx = np.arange(gw) * step / sxy
    n = z.size
    if n >= 12:
        try:
            deg = 2 if n >= 50 else 1
            zs = float(np.median(sig)) or 1.0
            sn = sig / zs
            basis = next((bs for bs in bases or () if bs.fits(py, px, sn, deg)), None)
            if basis is None:
                basis = _spline_basis(py, px, sn, deg)
                if bases is not None:
                    bases.append(basis)
            kt, q1, q2, r, lam_e, vec = basis.kt, basis.q1, basis.q2, basis.r, basis.lam_e, basis.vec
            # whitened by the sample noise (z̃ = S⁻¹z): the residual of the whitened system is λ·c̃
            # with c̃ = Q₂V(b/(Λ + λ)), b = VᵀQ₂ᵀz̃
            zt = z / zs / sn
            b = vec.T @ (q2.T @ zt)

            def rms(lam: float) -> float:
                return lam * math.sqrt(float(np.sum((b / (lam_e + lam)) ** 2)) / n)

            lo, hi = -10.0, 10.0
            if rms(10.0**hi) <= 1.0:
                lam = 10.0**hi
            elif rms(10.0**lo) >= 1.0:
                lam = 10.0**lo
            else:
                while hi - lo > 1e-3:
                    mid = 0.5 * (lo + hi)
                    if rms(10.0**mid) >= 1.0:
                        hi = mid
                    else:
                        lo = mid
                lam = 10.0**lo
            ct = q2 @ (vec @ (b / (lam_e + lam)))
            a = np.linalg.solve(r, q1.T @ (zt - kt @ ct - lam * ct))
            c = ct / sn
            radial = np.empty((gh, gw))
            _tps_grid(ny, nx, py, px, c, radial)
            yy, xx = np.meshgrid(ny, nx, indexing="ij")
            grid = (radial + (_tps_poly(yy.ravel(), xx.ravel(), deg) @ a).reshape(gh, gw)) * zs
            if np.all(np.isfinite(grid)):
                return grid.astype(np.float32), lam, "tps"
        except (np.linalg.LinAlgError, ValueError):
            pass
    deg = 3 if n >= 50 else (1 if n >= 3 else 0)
    coef = _poly_fit_robust(px - 0.5, py - 0.5, z, deg)
    yy, xx = np.meshgrid(ny, nx, indexing="ij")
    grid = (_poly_terms(xx.ravel() - 0.5, yy.ravel() - 0.5, deg) @ coef).reshape(gh, gw)
    return grid.astype(np.float32), float("nan"), f"poly{deg}"


def _catmull_rom(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer base index and the 4 Catmull-Rom weights for fractional node coordinates t."""
    i = np.floor(t).astype(np.int64)
    f = t - i
    f2 = f * f
    f3 = f2 * f
    wts = np.stack(
        [
            -0.5 * f3 + f2 - 0.5 * f,
            1.5 * f3 - 2.5 * f2 + 1.0,
            -1.5 * f3 + 2.0 * f2 + 0.5 * f,
            0.5 * f3 - 0.5 * f2,
        ],
        axis=1,
    )
    return i, wts


def _pad_ghost(grid: np.ndarray, axis: int) -> np.ndarray:
    """The grid with one ghost node at each end of axis, extrapolated quadratically.

    Catmull-Rom needs a node beyond each end; a clamped (repeated) node halves the slope at the
    edge nodes (0.04σ RMS, 0.12σ max in the outer band with a 10σ gradient), the quadratic ghost
    keeps the interpolation exact for quadratic surfaces up to the edges.
    """
    g = np.moveaxis(np.asarray(grid, np.float64), axis, 0)
    n = g.shape[0]
    if n >= 3:
        lo, hi = 3.0 * g[0] - 3.0 * g[1] + g[2], 3.0 * g[-1] - 3.0 * g[-2] + g[-3]
    elif n == 2:
        lo, hi = 2.0 * g[0] - g[1], 2.0 * g[1] - g[0]
    else:
        lo, hi = g[0], g[-1]
    return np.moveaxis(np.concatenate([lo[None], g, hi[None]], axis=0), 0, axis)


def _axis_weights(n_px: int, n_nodes: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the first of the 4 ghost-padded nodes and their Catmull-Rom weights."""
    i, wts = _catmull_rom(np.arange(n_px, dtype=np.float64) / step)
    return np.clip(i, 0, n_nodes - 2), wts


def _columns_table(grid: np.ndarray, step: int, width: int) -> np.ndarray:
    """Every (ghost-padded) grid row interpolated to all columns: (rows + 2, width) float64."""
    gp = _pad_ghost(_pad_ghost(grid, 0), 1)
    i, wts = _axis_weights(width, grid.shape[1], step)
    out = np.zeros((gp.shape[0], width))
    for k in range(4):
        out += gp[:, i + k] * wts[:, k][None, :]
    return out


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def apply(frame: np.ndarray, norm: Normalization, *, band_rows: int = 512, out: np.ndarray | None = None) -> np.ndarray:
    """The normalised frame y = scale·x + offset (per channel), float32, NaN preserved.

    One fused numba pass per channel: the coarse grids are interpolated to every column once
    (a few MB), each row then takes 4 table rows (Catmull-Rom) and writes y directly, so no
    full-size temporary is made.

    Parameters
    ----------
    frame : the registered frame, (H, W) or (C, H, W), the shape `norm` was computed for.
    norm : the stored `Normalization`.
    band_rows : kept for callers of the former banded version; the fused pass needs no bands, the
        result does not depend on it. Default is 512.
    out : optional float32 output array of the frame's shape (may be `frame` itself).
    """
    x = np.asarray(frame)
    if tuple(x.shape) != tuple(norm.shape):
        raise StackwatchError(f"frame shape {x.shape} does not match the normalisation's {tuple(norm.shape)}")
    if band_rows < 1:
        raise StackwatchError(f"band_rows must be ≥ 1, got {band_rows}")
    y = np.empty(x.shape, np.float32) if out is None else out
    if y.dtype != np.float32 or y.shape != x.shape:
        raise StackwatchError("apply: out must be a float32 array of the frame's shape")
    xs = _channels(x)
    ys = _channels(y)
    h, w = xs[0].shape
    for xc, yc, cn in zip(xs, ys, norm.channels, strict=True):
        offset = np.asarray(cn.offset, np.float64)
        rows_i, rows_w = _axis_weights(h, offset.shape[0], norm.step_px)
        off_cols = _columns_table(offset, norm.step_px, w)
        use_map = cn.scale_map is not None
        sc_cols = _columns_table(np.asarray(cn.scale_map, np.float64), norm.step_px, w) if use_map else off_cols
        xin = xc if xc.dtype == np.float32 else np.asarray(xc, np.float32)
        _apply_kernel(xin, float(cn.scale), off_cols, sc_cols, rows_i, np.ascontiguousarray(rows_w), use_map, yc)
    return y


def gradient_amplitude(norm: Normalization) -> float:
    """Max − min of the gradient surface (mean over channels): a reference-choice criterion (§8.5)."""
    vals = [float(np.nanmax(c.offset) - np.nanmin(c.offset)) for c in norm.channels]
    return float(np.mean(vals))


def _global_channel(xc: np.ndarray, rc: np.ndarray, sig: float, sig_ref: float, gshape: tuple[int, int]) -> ChannelNorm:
    both = np.isfinite(xc) & np.isfinite(rc)
    n = int(np.count_nonzero(both))
    if n < 100:
        raise StackwatchError("normalisation: frame and reference overlap in fewer than 100 pixels")
    stride = max(1, n // 2_000_000)
    xv = xc[both][::stride]
    rv = rc[both][::stride]
    loc_i, sc_i = _robust_loc_scale(xv)
    loc_r, sc_r = _robust_loc_scale(rv)
    s = sc_r / sc_i if sc_i > 0 else 1.0
    off = np.full(gshape, loc_r - s * loc_i, np.float32)
    # the dispersion ratio is not a photometric scale (gradients and sky noise dominate it), so a
    # fallback frame is never weighted above the reference
    wgt = min(1.0, (sig_ref / (s * sig)) ** 2) if sig > 0 and s > 0 else float("nan")
    return ChannelNorm(scale=s, scale_err=float("nan"), n_pairs=0, noise=sig, weight=wgt, offset=off)


def _local_channel(
    xc: np.ndarray, rc: np.ndarray, star_mask: np.ndarray, sig: float, sig_ref: float, cell: int
) -> ChannelNorm:
    """Local normalisation: robust location/scale maps on a cell grid, y = (x − L_i)·S_r/S_i + L_r."""
    h, w = xc.shape
    gh = (h - 1) // cell + 2
    gw = (w - 1) // cell + 2
    li = np.full((gh, gw), np.nan)
    lr = np.full((gh, gw), np.nan)
    ratio = np.full((gh, gw), np.nan)
    for i in range(gh):
        for j in range(gw):
            ya, yb = max(0, int(i * cell - cell // 2)), min(h, int(i * cell + cell // 2))
            xa, xb = max(0, int(j * cell - cell // 2)), min(w, int(j * cell + cell // 2))
            if yb <= ya or xb <= xa:
                continue
            a = xc[ya:yb, xa:xb]
            b = rc[ya:yb, xa:xb]
            ok = np.isfinite(a) & np.isfinite(b) & ~star_mask[ya:yb, xa:xb]
            if np.count_nonzero(ok) < 64:
                continue
            la, sa = _robust_loc_scale(a[ok])
            lb, sb = _robust_loc_scale(b[ok])
            if sa > 0:
                li[i, j], lr[i, j], ratio[i, j] = la, lb, sb / sa
    good = np.isfinite(ratio)
    if not good.any():
        raise StackwatchError("local normalisation: no usable cells in the overlap")
    # fill empty cells with the nearest good one, then smooth 3×3
    gy, gx = np.nonzero(good)
    tree = cKDTree(np.column_stack([gy, gx]))
    ay, ax = np.nonzero(~good)
    if ay.size:
        _, nn = tree.query(np.column_stack([ay, ax]))
        for arr in (li, lr, ratio):
            arr[ay, ax] = arr[gy[nn], gx[nn]]
    li, lr, ratio = (uniform_filter(a, 3, mode="nearest") for a in (li, lr, ratio))
    off = (lr - ratio * li).astype(np.float32)
    s = float(np.median(ratio))
    wgt = (sig_ref / (s * sig)) ** 2 if sig > 0 and s > 0 else float("nan")
    return ChannelNorm(
        scale=s, scale_err=float("nan"), n_pairs=0, noise=sig, weight=wgt, offset=off, scale_map=ratio.astype(np.float32)
    )


def normalize(
    frame: np.ndarray,
    reference: np.ndarray,
    *,
    frame_stars: Any,
    ref_stars: Any,
    frame_noise: float | Sequence[float],
    ref_noise: float | Sequence[float],
    frame_mask: np.ndarray | None = None,
    ref_mask: np.ndarray | None = None,
    fwhm_px: float = 3.0,
    frame_fwhm_px: float | None = None,
    method: str = "nsg",
    bin_px: int = 32,
    min_pairs: int = 10,
    max_pairs: int = 500,
    min_snr: float = 20.0,
    max_scale_err_frac: float = 0.02,
    max_samples: int = 600,
    star_mask_cap_px: float = 40.0,
    local_cell_px: int = 512,
    ref_beta: float | None = None,
    frame_beta: float | None = None,
    reference_id: str = "",
) -> Normalization:
    """Normalise a registered frame to the reference (§8).

    Parameters
    ----------
    frame, reference : float32 images on the reference grid, (H, W) or (C, H, W); NaN = no data.
    frame_stars, ref_stars : star tables (attributes ``x``, ``y`` and optionally ``fwhm``) or (N, 2)
        arrays of (x, y), both in reference coordinates.
    frame_noise, ref_noise : pre-resampling background noise σ (one value or one per channel).
    frame_mask, ref_mask : bool, True = saturated/bad pixel (excluded). Default is None (none).
    fwhm_px : reference FWHM in pixels. Default is 3.0.
    frame_fwhm_px : frame FWHM in pixels. Default is None (= fwhm_px).
    method : "nsg", "global" or "local". Default is "nsg".
    bin_px : gradient sample bin size. Default is 32.
    min_pairs : fewer matched photometric stars falls back to global. Default is 10.
    max_pairs : brightest pairs used for the scale. Default is 500.
    min_snr : minimum photometric SNR in both images. Default is 20.0.
    max_scale_err_frac : σ_m/m above this falls back to global. Default is 0.02.
    max_samples : at most this many (block-averaged) samples for the spline. Default is 600.
    star_mask_cap_px : largest star-avoidance radius. Default is 40.0.
    local_cell_px : cell size of local normalisation. Default is 512.
    ref_beta, frame_beta : Moffat β of the reference's and the frame's PSF (from the PSF fits). When
        both are given (with the FWHMs), the scale is corrected for the flux outside the common
        aperture, which differs when the seeing differs (β = 4, aperture 2·FWHM: ~1 % of scale
        per 10 % of FWHM difference). Default is None (no correction).
    reference_id : recorded in the result. Default is "".
    """
    if method not in _METHODS:
        raise StackwatchError(f"normalisation method {method!r} is not one of {', '.join(_METHODS)}")
    fr = np.asarray(frame, np.float32)
    rf = np.asarray(reference, np.float32)
    if fr.shape != rf.shape:
        raise StackwatchError(f"normalisation: frame shape {fr.shape} differs from reference shape {rf.shape}")
    fch = _channels(fr)
    rch = _channels(rf)
    nc = len(fch)
    shape2 = (int(fch[0].shape[0]), int(fch[0].shape[1]))
    sig_f = _per_channel(frame_noise, nc, "frame_noise")
    sig_r = _per_channel(ref_noise, nc, "ref_noise")
    bad_f = _bad_plane(frame_mask, shape2)
    bad_r = _bad_plane(ref_mask, shape2)
    bad = bad_f | bad_r
    step = int(bin_px)
    if step < 4:
        raise StackwatchError(f"normalisation: gradient bins of {step} px are too small (need ≥ 4)")
    # gradient nodes: the bin size, coarsened on large frames (~100 nodes across: the surface is
    # smooth on that scale and evaluating the spline at 25 000 nodes dominated the time at 26 MP)
    node = max(step, -(-max(shape2) // 100))
    gshape = ((shape2[0] - 1) // node + 2, (shape2[1] - 1) // node + 2)

    fw_r = float(fwhm_px)
    fw_f = float(frame_fwhm_px) if frame_fwhm_px is not None else fw_r
    fw = max(fw_r, fw_f)
    rx, ry, _ = _star_arrays(ref_stars)
    fx, fy, _ = _star_arrays(frame_stars)

    # union of stars for masking and blending
    if fx.size and rx.size:
        d, _ = cKDTree(np.column_stack([rx, ry])).query(np.column_stack([fx, fy]))
        extra = d > max(2.0, fw)
        ux = np.concatenate([rx, fx[extra]])
        uy = np.concatenate([ry, fy[extra]])
    else:
        ux = np.concatenate([rx, fx])
        uy = np.concatenate([ry, fy])

    r_ap = max(2.0 * fw_r, 2.0 * fw_f, 3.0)
    r_in = r_ap + 2.0
    r_out = r_in + max(4.0, fw)
    radii = np.array([r_ap, r_in, r_out])

    # star-avoidance radii from peaks measured on the reference (0.5σ of a Moffat β = 2.5)
    gmask = np.zeros(shape2, np.bool_)
    # photometry of every star of the union on every channel and on the luminance (channel mean;
    # the channel itself for mono) in one pass per image: the luminance gives the star-avoidance
    # radii, the channels the scale pairs (the reference stars come first in the union)
    n_planes = nc + 1 if nc > 1 else 1
    ph_r = np.zeros((n_planes, ux.size, 8))
    ph_f = np.zeros((n_planes, ux.size, 8))
    ph_u, ph_uf = ph_r[-1], ph_f[-1]
    if ux.size:
        planes_r = np.ascontiguousarray(rf.reshape((nc, *shape2)))
        planes_f = np.ascontiguousarray(fr.reshape((nc, *shape2)))
        _phot_kernel(planes_r, bad, ux, uy, radii, nc > 1, ph_r)
        _phot_kernel(planes_f, bad, ux, uy, radii, nc > 1, ph_f)
        peak = np.fmax(np.where(ph_u[:, 7] > 0, ph_u[:, 3], np.nan), np.where(ph_uf[:, 7] > 0, ph_uf[:, 3], np.nan))
        t = 0.5 * float(np.mean(sig_r))
        beta = 2.5
        alpha = fw / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            rr = alpha * np.sqrt(np.maximum((np.maximum(peak, 0.0) / t) ** (1.0 / beta) - 1.0, 0.0))
        rr = np.where(np.isfinite(rr), rr, star_mask_cap_px)  # unmeasurable (saturated, off the image): be generous
        rr = np.clip(np.maximum(rr, 2.0 * fw), 0.0, star_mask_cap_px)
        _paint_disks(gmask, ux, uy, rr)
    if bad.any():
        _dilate_into(bad, 5, gmask)

    psf_ok = all(
        v is not None and math.isfinite(float(v)) and float(v) > 1.0 for v in (ref_beta, frame_beta)
    ) and frame_fwhm_px is not None and fw_f > 0 and fw_r > 0
    reason = ""
    chans: list[ChannelNorm] = []
    use = method
    scales: list[tuple[float, float, int]] = []
    if method == "nsg":
        # pairs: reference stars that are isolated (no other star of the union within r_out)
        if rx.size >= min_pairs and fx.size:
            tree_u = cKDTree(np.column_stack([ux, uy]))
            cnt = np.array([len(v) for v in tree_u.query_ball_point(np.column_stack([rx, ry]), r_out)])
            dfr, _ = cKDTree(np.column_stack([fx, fy])).query(np.column_stack([rx, ry]))
            sel = (cnt <= 1) & (dfr <= max(2.0, fw))
        else:
            sel = np.zeros(rx.size, np.bool_)
        n_sel = int(np.count_nonzero(sel))
        for c in range(nc):
            if n_sel < min_pairs:
                scales.append((float("nan"), float("nan"), n_sel))
                continue
            a, b = ph_r[c, : rx.size][sel], ph_f[c, : rx.size][sel]
            ok = (a[:, 4] > 0) & (b[:, 4] > 0)
            na, nn = a[:, 5], a[:, 6]
            with np.errstate(invalid="ignore", divide="ignore"):
                s_a = np.sqrt(na * np.fmax(a[:, 2], sig_r[c]) ** 2 * (1.0 + na / nn))
                s_b = np.sqrt(na * np.fmax(b[:, 2], sig_f[c]) ** 2 * (1.0 + na / nn))
                ok &= (a[:, 0] > min_snr * s_a) & (b[:, 0] > min_snr * s_b)
            idx = np.flatnonzero(ok)
            idx = idx[np.argsort(-a[idx, 0])][:max_pairs]
            if idx.size < min_pairs:
                scales.append((float("nan"), float("nan"), int(idx.size)))
                continue
            # errors: background term + 0.3 % of the flux (shot noise and PSF/aperture differences; the
            # IRLS also rescales by the robust residual scale when these are too small)
            m, sm, ne = _tukey_origin_fit(a[idx, 0], b[idx, 0], s_a[idx] + 0.003 * a[idx, 0], s_b[idx] + 0.003 * b[idx, 0])
            if np.isfinite(m) and psf_ok:
                # the same aperture catches less of the broader star: m_true = m_raw·E_frame/E_ref
                corr = _moffat_enclosed(r_ap, fw_f, float(frame_beta)) / _moffat_enclosed(r_ap, fw_r, float(ref_beta))  # type: ignore[arg-type]
                m, sm = m * corr, sm * corr
            scales.append((m, sm, ne))
        bad_ch = [
            (m, sm, n)
            for m, sm, n in scales
            if not (n >= min_pairs and np.isfinite(m) and 0.1 <= m <= 10.0 and np.isfinite(sm) and sm / m <= max_scale_err_frac)
        ]
        if bad_ch:
            m, sm, n = bad_ch[0]
            if n < min_pairs:
                reason = f"too few star pairs for photometry ({n} < {min_pairs})"
            elif not (np.isfinite(m) and 0.1 <= m <= 10.0):
                reason = f"photometric scale {m:.4g} outside [0.1, 10]"
            else:
                reason = f"photometric scale too uncertain (σ_m/m = {sm / m:.3g} > {max_scale_err_frac})"
            use = "global"
    if use == "nsg":
        bases: list[_SplineBasis] = []
        sig_ds = [math.sqrt(sig_r[c] ** 2 + (scales[c][0] * sig_f[c]) ** 2) for c in range(nc)]
        meds, cnts = _bin_grids(rf, fr, [sc[0] for sc in scales], sig_ds, bad, gmask, step)
        for c in range(nc):
            m, sm, ne = scales[c]
            grid, lam = _gradient_grid(
                meds[c], cnts[c], rch[c], fch[c], m, sig_ds[c], step, node, max_samples, shape2, bases
            )
            wgt = (sig_r[c] / (m * sig_f[c])) ** 2 if sig_f[c] > 0 else float("nan")
            chans.append(
                ChannelNorm(scale=m, scale_err=sm, n_pairs=ne, noise=sig_f[c], weight=wgt, offset=grid, smoothing=lam)
            )
    elif use == "global":
        for c in range(nc):
            chans.append(_global_channel(fch[c], rch[c], sig_f[c], sig_r[c], gshape))
    else:
        cell = int(local_cell_px)
        for c in range(nc):
            chans.append(_local_channel(fch[c], rch[c], gmask, sig_f[c], sig_r[c], cell))
        node = cell
    return Normalization(
        channels=tuple(chans),
        shape=tuple(int(v) for v in fr.shape),
        step_px=node,
        method=use,
        reason=reason,
        reference_id=reference_id,
    )


def _moffat_enclosed(r: float, fwhm: float, beta: float) -> float:
    """Fraction of a Moffat star's flux inside radius r (FWHM in px, β > 1)."""
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return 1.0 - (1.0 + (r / alpha) ** 2) ** (1.0 - beta)


def _block_edges(n: int, k: int) -> np.ndarray:
    """Boundaries of ⌈n/k⌉ near-equal groups of n fine bins (symmetric: no sliver at one end)."""
    nb = max(1, -(-n // k))
    return np.round(np.linspace(0, n, nb + 1)).astype(np.int64)


def _group_sums(a: np.ndarray, ey: np.ndarray | None, ex: np.ndarray | None) -> np.ndarray:
    if ey is not None:
        a = np.add.reduceat(a, ey[:-1], axis=0)
    if ex is not None:
        a = np.add.reduceat(a, ex[:-1], axis=1)
    return a


def _bin_grids(
    ref: np.ndarray,
    frame: np.ndarray,
    m: Sequence[float],
    sig_d: Sequence[float],
    bad: np.ndarray,
    gmask: np.ndarray,
    step: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per channel: the star-free bin medians of ref − m·frame (C, bh, bw) and their pixel counts.

    ref, frame are (C, H, W) (or (H, W)); sig_d is the pixel noise of each channel's difference.
    """
    nch = len(m)
    h, w = ref.shape[-2:]
    bh = (h + step - 1) // step
    bw = (w + step - 1) // step
    med = np.empty((nch, bh, bw), np.float64)
    cnt_px = np.zeros((nch, bh, bw), np.int64)
    planes_r = ref.reshape((nch, h, w))
    planes_f = frame.reshape((nch, h, w))
    # one channel at a time: a pass over all channels per bin (masks read once) cost 40 % more CPU
    # (the channel loop inside the pixel loop defeats numba's code for the one-plane loop)
    for c in range(nch):
        _bin_medians(
            np.ascontiguousarray(planes_r[c]), np.ascontiguousarray(planes_f[c]), float(m[c]), gmask, bad, step,
            float(sig_d[c]), np.array([0.3, 0.01]), med[c], cnt_px[c],
        )
    return med, cnt_px


def _gradient_grid(
    med: np.ndarray,
    cnt_px: np.ndarray,
    rc: np.ndarray,
    xc: np.ndarray,
    m: float,
    sig_d: float,
    step: int,
    node: int,
    max_samples: int,
    shape2: tuple[int, int],
    bases: list[_SplineBasis] | None = None,
) -> tuple[np.ndarray, float]:
    """Coarse grid of g = smooth(ref − m·frame) and the smoothing used, from the channel's bin medians.

    med, cnt_px are the channel's grids from `_bin_grids`; rc, xc its reference and frame planes.
    sig_d is the pixel noise of ref − m·frame, √(σ_ref² + m²σ²) from the pre-resampling noises
    (the bin median of resampled, correlated noise has about the pre-resampling variance).
    """
    h, w = shape2
    bh, bw = med.shape
    gshape = ((h - 1) // node + 2, (w - 1) // node + 2)
    valid = np.isfinite(med)
    if np.count_nonzero(valid) < 3:
        lvl = float(np.nanmedian(med)) if valid.any() else float(np.nanmedian(rc - m * xc))
        return np.full(gshape, lvl, np.float32), float("nan")
    # fine-bin noise from second differences of neighbouring bins (a smooth surface has nearly
    # constant curvature over 3 bins, so these are noise: var = 6σ²); robust to slopes and outliers
    dx = (med[:, 2:] - 2.0 * med[:, 1:-1] + med[:, :-2]).ravel()
    dy = (med[2:, :] - 2.0 * med[1:-1, :] + med[:-2, :]).ravel()
    dd = np.concatenate([dx, dy])
    dd = dd[np.isfinite(dd)]
    sig0 = 1.4826 * float(np.median(np.abs(dd - np.median(dd)))) / math.sqrt(6.0) if dd.size >= 8 else float("nan")
    cy = np.array([(i * step + min(h, i * step + step) - 1) / 2.0 for i in range(bh)])
    cx = np.array([(j * step + min(w, j * step + step) - 1) / 2.0 for j in range(bw)])
    yy, xx = np.meshgrid(cy, cx, indexing="ij")
    # outlier bins (trails, residual stars): > 4σ from the median of their 5×5 neighbourhood
    # after removing a robust quadratic, twice. The quadratic alone (§8.2) also rejected genuine
    # bins along an edge where a light dome curves more than a quadratic (the surface was then
    # extrapolated there); the neighbourhood alone is one-sided at the edges and biased by steep
    # slopes. Together they follow the sky and still single out trails and star residuals.
    sxy = float(max(h, w))
    for _ in range(2):
        iy, ix = np.nonzero(valid)
        if iy.size < 10:
            break
        u = xx / sxy - 0.5
        v = yy / sxy - 0.5
        coef = _poly_fit_robust(u[iy, ix], v[iy, ix], med[iy, ix], 2)
        rq = np.where(valid, med - (_poly_terms(u.ravel(), v.ravel(), 2) @ coef).reshape(bh, bw), np.nan)
        local = np.empty_like(rq)
        _nanmedian_5x5(rq, local)
        r = np.where(valid & np.isfinite(local), rq - local, 0.0)
        rv = r[valid]
        s = 1.4826 * float(np.median(np.abs(rv - np.median(rv))))
        if not np.isfinite(sig0) or sig0 <= 0:
            sig0 = s
        badb = valid & (np.abs(r) > 4.0 * max(s, sig0))
        if not badb.any():
            break
        valid &= ~badb
    if not np.isfinite(sig0) or sig0 <= 0:
        sig0 = 1e-6
    # per-bin noise of a median: 1.2533·σ_d/√n. The second-difference estimate above also holds
    # the sky's curvature at the bin scale (a light dome near an edge), which made the spline too
    # smooth there; it only lowers the theoretical value (noise inputs that overstate the noise)
    if math.isfinite(sig_d) and sig_d > 0:
        var = np.where(valid, (1.2533 * sig_d) ** 2 / np.maximum(cnt_px, 1), 0.0)
        theo = math.sqrt(float(np.median(var[valid])))
        if sig0 < theo:
            var *= (sig0 / theo) ** 2
    else:
        var = np.where(valid, sig0 * sig0, 0.0)
    # block-average fine bins until at most max_samples remain
    k = 1
    while np.count_nonzero(valid) / (k * k) > max_samples and k < max(bh, bw):
        k *= 2
    vz = np.where(valid, med, 0.0)
    vc = valid.astype(np.float64)
    vy = np.where(valid, yy, 0.0)
    vx = np.where(valid, xx, 0.0)
    if k == 1:
        iy, ix = np.nonzero(valid)
        z, py, px, sg = med[iy, ix], yy[iy, ix], xx[iy, ix], np.sqrt(var[iy, ix])
    else:
        ey, ex = _block_edges(bh, k), _block_edges(bw, k)
        parts: list[tuple[np.ndarray, ...]] = []
        # interior blocks of k×k bins, and edge-anchored samples: the outermost row/column of bins
        # averaged along each edge in groups of k, so the surface is pinned ~s/2 from the border
        # instead of extrapolated over the half block (k·s/2 px) beyond the outer block centres
        for sl, gy, gx in (
            ((slice(None), slice(None)), ey, ex),
            ((slice(0, 1), slice(None)), None, ex),
            ((slice(bh - 1, bh), slice(None)), None, ex),
            ((slice(None), slice(0, 1)), ey, None),
            ((slice(None), slice(bw - 1, bw)), ey, None),
        ):
            c = _group_sums(vc[sl], gy, gx)
            full = _group_sums(np.ones_like(vc[sl]), gy, gx)
            ok = (c >= np.maximum(1.0, 0.25 * full)).ravel()
            cc = c.ravel()[ok]
            parts.append(
                (
                    _group_sums(vz[sl], gy, gx).ravel()[ok] / cc,
                    _group_sums(vy[sl], gy, gx).ravel()[ok] / cc,
                    _group_sums(vx[sl], gy, gx).ravel()[ok] / cc,
                    np.sqrt(_group_sums(var[sl], gy, gx).ravel()[ok]) / cc,
                )
            )
        z, py, px, sg = (np.concatenate([p[i] for p in parts]) for i in range(4))
    grid, lam, _model = _fit_surface(py, px, z, sg, shape2, node, bases)
    return grid, lam


def _get(metric: Any, name: str) -> float:
    v = metric.get(name) if isinstance(metric, Mapping) else getattr(metric, name, None)
    try:
        return float(v) if v is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def rank_reference_candidates(metrics: Sequence[Any]) -> int:
    """Index of the best normalisation/registration reference among candidate frames (§8.5).

    Each candidate (a mapping or an object with attributes) is ranked on ``fwhm_px`` (low),
    ``stars`` (high), ``background`` (low), ``gradient_amplitude`` (low), ``transmission`` (high)
    and ``eccentricity`` (low); missing or non-finite values rank last on that criterion. The
    lowest rank sum wins; ties go to the later frame.
    """
    n = len(metrics)
    if n == 0:
        raise StackwatchError("no candidate frames to choose a reference from")
    crit = (
        ("fwhm_px", 1.0),
        ("stars", -1.0),
        ("background", 1.0),
        ("gradient_amplitude", 1.0),
        ("transmission", -1.0),
        ("eccentricity", 1.0),
    )
    total = np.zeros(n)
    for name, sign in crit:
        vals = np.array([_get(mt, name) for mt in metrics]) * sign
        if not np.isfinite(vals).any():
            continue
        vals = np.where(np.isfinite(vals), vals, np.inf)
        # average ranks for ties (1-based)
        order = np.argsort(vals, kind="stable")
        ranks = np.empty(n)
        sv = vals[order]
        i = 0
        while i < n:
            j = i
            while j + 1 < n and sv[j + 1] == sv[i]:
                j += 1
            ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
            i = j + 1
        total += ranks
    best = float(np.min(total))
    return int(np.flatnonzero(total == best)[-1])
