"""Resampling of a frame onto the reference grid (algorithms.md §9.2).

A transform is a 3x3 matrix mapping frame (x, y) -> reference (x, y) (x = column, y = row, 0-based,
pixel centres at integers; affine/similarity in its top two rows, a homography uses all nine). The
warp works by inverse mapping: every output pixel (x, y) of the reference grid samples the source at
(u, v) = T^-1 (x, y).

- ``lanczos3`` (default): 6x6 taps, weights from a look-up table (4096 steps per pixel, linear
  interpolation between rows, rows normalised to sum 1), with a clamp against ringing (below).
- ``bilinear``: 2x2 taps, fast option.

Pixels whose source position lies outside the source image (beyond half a pixel from the outermost
pixel centres) are NaN; taps beyond the border of an inside position are mirrored. A NaN among the
36 Lanczos taps falls back to bilinear on the finite pixels of the central 2x2 (renormalised); none
finite -> NaN. The ``footprint`` is the map of finite outputs. ``variance_factor`` is the mean over
output pixels of sum(w^2)/(sum w)^2 of the (unclamped) interpolation weights: the factor by which
resampling multiplies white-noise variance (1.0 at integer offsets, ~0.62 at half a pixel for
Lanczos-3), needed by the live noise model.

A pure translation (every output pixel has the same fractional offsets) takes a two-pass path with
one set of weights: columns, then rows, in the same summation order as the per-pixel kernel.

An affine map close to a translation (a dither with field rotation, a scale change, a meridian flip:
|b|, |d| <= 0.035 |e| ~ tan 2 deg, for u = a x + b y + c, v = d x + e y + f) takes a separable two-pass
path (Catmull-Smith): pass 1 resamples each source row j at u(x, j) = alpha x + beta j + gamma, pass 2
those rows at v, 6 taps each with per-pixel normalised LUT weights, in tiles of output pixels (26 MP,
0.05 deg: 0.87 CPU-s against 1.25 for the 2-D kernel, bench/bench_resample.py). Its taps in row j sit
beta (j - v) px (beta = b / e) from the 2-D kernel's: a kernel sheared by beta, which departs from the
2-D result in proportion to beta and the local gradient (26 MP star field, in sky sigma: 0.05 deg 0.0019
RMS, at most 0.6 beside the brightest stars; 2 deg 0.077 RMS, 2.1, and 9.5 at saturated cores) and not
at all when b = 0 (a scale; a 180-degree rotation is a = e = -1 and needs no flipped copy of the source:
the decomposition only needs e away from 0). Against the true band-limited image both kernels err the
same (RMS within 1 % of each other up to 10 deg). The bound is 2 deg because the departure from the 2-D
kernel grows as tan(theta), and with it the Catmull-Smith bottleneck (pass 1 compresses the rows by
cos(theta) and e -> 0 at 90 deg) and the intermediate rows per tile (136 + 128 tan(theta)). Beyond it,
for homographies and for ``clamp_method="pixinsight"`` the 2-D kernel runs. Same contracts: NaN outside
the source, mirrored taps, a NaN among the taps used -> bilinear on the finite central 2x2, the local
bound over the central 4x4 of the sheared kernel, the footprint (identical to the 2-D kernel's), and
the variance factor of the weights used (its mean over every 4th output column: 26 MP, within 4e-5 of
the 2-D kernel's mean over every pixel). Measured (tests/engine/test_resample.py, there and back at
0.01-0.5 deg, scale 1.005 and 180.4 deg): star flux +0.020-0.032 % at FWHM 2-5 px, as the 2-D kernel's
+0.03 %; one way, no pixel below the sky on the noiseless field, nor around hot pixels and saturated
cores.

Clamping, ``clamp_method="local"`` (default): the result is never below the lowest of the 16 source
pixels of the central 4x4 taps. Lanczos undershoots (the ringing next to hot pixels, cosmic rays and
saturated cores) are cut to the local data minimum; peaks are left alone, because a star's true peak
lies between samples and exceeds its 2x2 neighbours. Measured (tests/engine/test_resample.py, star
field with noise, shift by (0.37, -0.61) and back): total star flux +0.03 % at FWHM 2, 3 and 5 px
(unclamped -2e-6, PI rule +3.2 % / +0.73 % / +0.12 %); one way on the noiseless field, no pixel below
the sky. Around hot pixels and saturated stars unclamped Lanczos undershoots by hundreds of sigma, the
PI rule by ~25 sigma, the local bound not at all (those stars gain 1-3 % of flux: the undershoots go,
the overshoot of the flat top stays; they are masked as saturated). On pure noise the bound raises
the mean by 0.002 sigma (upper bound and 2x2 or 3x3 windows were measured too: an upper bound cuts
FWHM-2 peaks by 1 %, a 2x2 window adds +0.07 % of flux through the noise).

``clamp_method="pixinsight"``: PCL's rule on the 36 products (``LanczosInterpolation.h``): s = f*L
split by sign, r = s-/s+; r >= 1 -> s+/w+; r > c -> s-, w- scaled by 1 - ((r - c)/(1 - c))^2; only
negative lobes over positive data (s+ = 0) -> 0. Deviation, stated: when s+ = 0 because the data are
negative (dark-subtracted sky near zero) the plain weighted sum is returned instead of PCL's 0. It is
not flux-conserving on sharp stars, because on smooth data r is already 0.2-0.41 at fractional
offsets (above c = 0.3), so the negative lobes are damped more where the profile is curved.
``relative_clamp=True`` (ours) never clamps below the weights' own flat-data ratio, which cuts the
gain to +0.11 % (FWHM 3) / +1.5 % (FWHM 2). ``clamp=0`` disables clamping.

Colour frames (3, H, W) are warped with one weight computation per output pixel for the 3 planes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange
from stackwatch.engine.errors import StackwatchError

__all__ = ["CLAMP_METHODS", "METHODS", "Warped", "invert_transform", "lanczos3_weights", "warp", "warp_mask"]

METHODS = ("lanczos3", "bilinear")
CLAMP_METHODS = ("local", "pixinsight")

_LUT_STEPS = 4096  # LUT entries per unit of fractional offset
_TWO_PASS_MAX_SHEAR = 0.035  # ~tan(2 deg): see the module doc
_TWO_PASS_TILE = (128, 128)  # output rows, columns of one two-pass tile (buffers ~350 kB: in L2)
# warp_mask: per True pixel the forward path tests ~25 candidates (the bounding box of the pixel's image
# and a pixel of margin) and writes 9 per hit, about 32 inverse-mapped output pixels' worth of work; below
# one True pixel in that many output pixels it wins (26 MP, 8549 saturated pixels: 14 ms vs 134 ms CPU)
_SPARSE_MASK_COST = 32
_SPARSE_MASK_MAX_SPAN = 16.0  # output pixels one source pixel's square may span before the dense path takes over


@dataclass(frozen=True)
class Warped:
    """A frame resampled onto the reference grid.

    data: float32 (H, W) or (C, H, W), NaN where there is no data. footprint: bool (H, W), True
    where the output is finite (in every channel). variance_factor: mean sum(w^2)/(sum w)^2 over
    the footprint (1.0 for an integer shift).
    """

    data: np.ndarray
    footprint: np.ndarray
    variance_factor: float


def _lanczos(t: np.ndarray) -> np.ndarray:
    t = np.asarray(t, dtype=np.float64)
    out = np.sinc(t) * np.sinc(t / 3.0)
    out[np.abs(t) >= 3.0] = 0.0
    # exact zeros at the non-zero integers, exact 1 at 0: identity is bit-exact
    ti = np.round(t)
    on_int = np.abs(t - ti) < 1e-12
    out[on_int] = np.where(ti[on_int] == 0.0, 1.0, 0.0)
    return out


def lanczos3_weights(frac: float) -> np.ndarray:
    """The 6 Lanczos-3 weights of taps floor(u)-2 .. floor(u)+3 for a fractional offset ``frac`` in [0, 1)."""
    k = np.arange(6, dtype=np.float64) - 2.0
    return _lanczos(k - float(frac))


def _build_lut() -> np.ndarray:
    fr = np.arange(_LUT_STEPS + 1, dtype=np.float64) / _LUT_STEPS
    k = np.arange(6, dtype=np.float64) - 2.0
    return np.ascontiguousarray(_lanczos(k[None, :] - fr[:, None]))


_LUT = _build_lut()
_LUTSTAT = np.ascontiguousarray(
    np.column_stack([_LUT.sum(axis=1), (_LUT**2).sum(axis=1), np.where(_LUT > 0, _LUT, 0).sum(axis=1),
                     -np.where(_LUT < 0, _LUT, 0).sum(axis=1)])
)
# Rows divided by their sum: a product of two rows sums to 1, so the 36-tap sum needs no division, and a
# linear interpolation between two rows still sums to 1 (to rounding). Row 0 is (0, 0, 1, 0, 0, 0) exactly.
_LUTN = np.ascontiguousarray(_LUT / _LUT.sum(axis=1)[:, None])
# sum of squares of each normalised row: the 1-D white-noise variance factor of that offset
_LUTN_SQ = np.ascontiguousarray((_LUTN**2).sum(axis=1))
# the two-pass kernel's table: per row the 6 normalised weights, their steps to the next row (so
# w = row + a * step is the same linear interpolation as `_lut_weights`), the sum of squares and its step
_LUT2P = np.ascontiguousarray(np.column_stack([
    _LUTN, np.vstack([np.diff(_LUTN, axis=0), np.zeros((1, 6))]),
    _LUTN_SQ, np.append(np.diff(_LUTN_SQ), 0.0),
]))


def invert_transform(matrix: np.ndarray) -> np.ndarray:
    """The 3x3 inverse of a frame -> reference transform (reference -> frame); refuses singular ones."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape == (2, 3):
        m = np.vstack([m, [0.0, 0.0, 1.0]])
    if m.shape != (3, 3) or not np.all(np.isfinite(m)):
        raise StackwatchError(f"transform must be a finite 3x3 or 2x3 matrix, got shape {m.shape}")
    det = float(np.linalg.det(m))
    if not math.isfinite(det) or abs(det) < 1e-12:
        raise StackwatchError(f"transform is singular (det {det:.3g})")
    inv = np.linalg.inv(m)
    return inv / inv[2, 2] if abs(inv[2, 2]) > 1e-300 else inv


@njit(cache=True, nogil=True)
def _mirror(i: int, n: int) -> int:  # pragma: no cover - numba
    if i < 0:
        i = -i
    if i >= n:
        i = 2 * n - 2 - i
    if i < 0:
        i = 0
    if i >= n:
        i = n - 1
    return i


@njit(cache=True, nogil=True)
def _src(inv: np.ndarray, x: float, y: float) -> tuple[float, float]:  # pragma: no cover - numba
    den = inv[2, 0] * x + inv[2, 1] * y + inv[2, 2]
    u = (inv[0, 0] * x + inv[0, 1] * y + inv[0, 2]) / den
    v = (inv[1, 0] * x + inv[1, 1] * y + inv[1, 2]) / den
    return u, v


@njit(cache=True, nogil=True)
def _bilinear_at(src: np.ndarray, c: int, u: float, v: float) -> float:  # pragma: no cover - numba
    """Bilinear on the finite pixels of the 2x2 around (u, v), renormalised; NaN if none."""
    h = src.shape[1]
    w = src.shape[2]
    x0 = math.floor(u)
    y0 = math.floor(v)
    fx = u - x0
    fy = v - y0
    acc = 0.0
    ws = 0.0
    for j in range(2):
        wy = fy if j == 1 else 1.0 - fy
        yy = _mirror(y0 + j, h)
        for i in range(2):
            wx = fx if i == 1 else 1.0 - fx
            xx = _mirror(x0 + i, w)
            val = src[c, yy, xx]
            wt = wx * wy
            if wt > 0.0 and math.isfinite(val):
                acc += wt * val
                ws += wt
    if ws <= 0.0:
        # exactly on a pixel whose value is NaN, or all four NaN
        return np.nan
    return acc / ws


@njit(cache=True, nogil=True, parallel=True)
def _warp_lanczos(src, out, inv, lut, lutstat, clamp, relative, steps, rowvar, rowcount):  # pragma: no cover - numba
    nc = src.shape[0]
    h = src.shape[1]
    w = src.shape[2]
    ho = out.shape[1]
    wo = out.shape[2]
    umax = w - 0.5
    vmax = h - 0.5
    for y in prange(ho):
        wxs = np.empty(6)
        wys = np.empty(6)
        ixs = np.empty(6, dtype=np.int64)
        iys = np.empty(6, dtype=np.int64)
        vacc = 0.0
        vcnt = 0
        for x in range(wo):
            u, v = _src(inv, float(x), float(y))
            if not (u >= -0.5 and u <= umax and v >= -0.5 and v <= vmax):
                for c in range(nc):
                    out[c, y, x] = np.nan
                continue
            x0 = math.floor(u)
            y0 = math.floor(v)
            fx = int((u - x0) * steps + 0.5)
            fy = int((v - y0) * steps + 0.5)
            for k in range(6):
                wxs[k] = lut[fx, k]
                wys[k] = lut[fy, k]
            if x0 >= 2 and x0 + 3 < w:
                for k in range(6):
                    ixs[k] = x0 - 2 + k
            else:
                for k in range(6):
                    ixs[k] = _mirror(x0 - 2 + k, w)
            if y0 >= 2 and y0 + 3 < h:
                for k in range(6):
                    iys[k] = y0 - 2 + k
            else:
                for k in range(6):
                    iys[k] = _mirror(y0 - 2 + k, h)
            # lutstat: sum, sum of squares, positive sum, |negative| sum of each weight set
            vacc += lutstat[fx, 1] * lutstat[fy, 1] / (lutstat[fx, 0] * lutstat[fx, 0] * lutstat[fy, 0] * lutstat[fy, 0])
            vcnt += 1
            cth = clamp
            if relative:
                # the weights' own negative/positive ratio (what flat data gives): never clamp below it
                pxs = lutstat[fx, 2]
                nxs = lutstat[fx, 3]
                pys = lutstat[fy, 2]
                nys = lutstat[fy, 3]
                rflat = (pxs * nys + nxs * pys) / (pxs * pys + nxs * nys)
                if rflat > cth:
                    cth = rflat
            for c in range(nc):
                plane = src[c]
                sp = 0.0
                sn = 0.0
                wp = 0.0
                wn = 0.0
                for j in range(6):
                    wyj = wys[j]
                    row = plane[iys[j]]
                    for i in range(6):
                        wt = wxs[i] * wyj
                        s = row[ixs[i]] * wt
                        if s < 0.0:
                            sn -= s
                            wn -= wt
                        else:
                            sp += s
                            wp += wt
                if not math.isfinite(sp + sn):
                    # a NaN (or inf) among the taps: bilinear on the finite central 2x2
                    out[c, y, x] = _bilinear_at(src, c, u, v)
                    continue
                if clamp > 0.0 and sp == 0.0 and wn > 0.0:
                    # only negative lobes over positive data (PCL: "empty data" -> 0)
                    out[c, y, x] = 0.0
                    continue
                if clamp > 0.0 and sp > 0.0:
                    r = sn / sp
                    if r >= 1.0:
                        if wp != 0.0:
                            out[c, y, x] = sp / wp
                            continue
                    elif r > cth:
                        q = (r - cth) / (1.0 - cth)
                        q = 1.0 - q * q
                        sn *= q
                        wn *= q
                den = wp - wn
                if den != 0.0:
                    out[c, y, x] = (sp - sn) / den
                else:
                    out[c, y, x] = _bilinear_at(src, c, u, v)
        rowvar[y] = vacc
        rowcount[y] = vcnt


@njit(cache=True, nogil=True)
def _lut_weights(lut: np.ndarray, steps: float, frac: float, wts: np.ndarray) -> None:  # pragma: no cover - numba
    """Fill ``wts`` with the 6 normalised Lanczos-3 weights of offset ``frac`` in [0, 1] by linear
    interpolation between LUT rows.

    Between rows 1/steps apart the interpolation error is <= max|L''|/(8 steps^2) ~ 7e-8 of a weight
    at 4096 steps (nearest-row lookup: ~4e-4), and frac = 0 gives row 0, (0, 0, 1, 0, 0, 0), exactly.
    """
    t = frac * steps
    i = min(int(t), lut.shape[0] - 2)
    a = t - i
    for k in range(6):
        w0 = lut[i, k]
        wts[k] = w0 + a * (lut[i + 1, k] - w0)


@njit(cache=True, nogil=True)
def _taps(i0: int, n: int, idx: np.ndarray) -> None:  # pragma: no cover - numba
    """Indices of taps i0-2 .. i0+3, mirrored at the borders."""
    if i0 >= 2 and i0 + 3 < n:
        for k in range(6):
            idx[k] = i0 - 2 + k
    else:
        for k in range(6):
            idx[k] = _mirror(i0 - 2 + k, n)


@njit(cache=True, nogil=True, parallel=True)
def _warp_lanczos_bounded(src, out, foot, inv, lut, lutsq, steps, bounded, rowvar, rowcount):  # pragma: no cover - numba
    """Lanczos-3 for any transform: normalised LUT weights per output pixel, columns first (six
    independent accumulators, then one weighted sum: short dependency chains), optional local lower
    bound (the lowest of the central 4x4 taps)."""
    nc = src.shape[0]
    h = src.shape[1]
    w = src.shape[2]
    ho = out.shape[1]
    wo = out.shape[2]
    umax = w - 0.5
    vmax = h - 0.5
    last = lut.shape[0] - 2
    projective = inv[2, 0] != 0.0 or inv[2, 1] != 0.0 or inv[2, 2] != 1.0
    for y in prange(ho):
        wys = np.empty(6)
        ixs = np.empty(6, dtype=np.int64)
        iys = np.empty(6, dtype=np.int64)
        # affine: u, v are linear along the row (no division per pixel)
        ur = inv[0, 1] * y + inv[0, 2]
        vr = inv[1, 1] * y + inv[1, 2]
        vacc = 0.0
        vcnt = 0
        for x in range(wo):
            if projective:
                u, v = _src(inv, float(x), float(y))
            else:
                u = inv[0, 0] * x + ur
                v = inv[1, 0] * x + vr
            if not (u >= -0.5 and u <= umax and v >= -0.5 and v <= vmax):
                for c in range(nc):
                    out[c, y, x] = np.nan
                foot[y, x] = False
                continue
            x0 = math.floor(u)
            y0 = math.floor(v)
            tx = (u - x0) * steps
            jx = min(int(tx), last)
            ax = tx - jx
            ty = (v - y0) * steps
            jy = min(int(ty), last)
            ay = ty - jy
            wx0 = lut[jx, 0] + ax * (lut[jx + 1, 0] - lut[jx, 0])
            wx1 = lut[jx, 1] + ax * (lut[jx + 1, 1] - lut[jx, 1])
            wx2 = lut[jx, 2] + ax * (lut[jx + 1, 2] - lut[jx, 2])
            wx3 = lut[jx, 3] + ax * (lut[jx + 1, 3] - lut[jx, 3])
            wx4 = lut[jx, 4] + ax * (lut[jx + 1, 4] - lut[jx, 4])
            wx5 = lut[jx, 5] + ax * (lut[jx + 1, 5] - lut[jx, 5])
            for k in range(6):
                b0 = lut[jy, k]
                wys[k] = b0 + ay * (lut[jy + 1, k] - b0)
            vacc += lutsq[jx] * lutsq[jy]
            vcnt += 1
            _taps(x0, w, ixs)
            _taps(y0, h, iys)
            i0 = ixs[0]
            i1 = ixs[1]
            i2 = ixs[2]
            i3 = ixs[3]
            i4 = ixs[4]
            i5 = ixs[5]
            fin = True
            for c in range(nc):
                c0 = 0.0
                c1 = 0.0
                c2 = 0.0
                c3 = 0.0
                c4 = 0.0
                c5 = 0.0
                lo = -np.inf
                for j in range(6):
                    r = iys[j]
                    wj = wys[j]
                    f1 = src[c, r, i1]
                    f2 = src[c, r, i2]
                    f3 = src[c, r, i3]
                    f4 = src[c, r, i4]
                    c0 += wj * src[c, r, i0]
                    c1 += wj * f1
                    c2 += wj * f2
                    c3 += wj * f3
                    c4 += wj * f4
                    c5 += wj * src[c, r, i5]
                    if bounded and j >= 1 and j <= 4:
                        m4 = min(min(f1, f2), min(f3, f4))
                        lo = m4 if j == 1 else min(lo, m4)
                val = wx0 * c0 + wx1 * c1 + wx2 * c2 + wx3 * c3 + wx4 * c4 + wx5 * c5
                if val < lo:
                    val = lo
                if not math.isfinite(val):
                    # a NaN (or inf) among the taps: bilinear on the finite central 2x2
                    val = _bilinear_at(src, c, u, v)
                    fin = fin and math.isfinite(val)
                out[c, y, x] = val
            foot[y, x] = fin
        rowvar[y] = vacc
        rowcount[y] = vcnt


@njit(cache=True, nogil=True, parallel=True)
def _warp_lanczos_shift(src, out, foot, du, dv, lut, steps, bounded):  # pragma: no cover - numba
    """Pure translation, output (x, y) <- source (x + du, y + dv): the fractional offsets, hence the
    weights, are the same for every pixel, so the 6x6 sum splits into a vertical pass over the six
    source rows of an output row (a buffer of wo + 5 columns) and a horizontal one: 12 multiply-adds
    per pixel instead of 42, in the same order as `_warp_lanczos_bounded` (columns first)."""
    nc = src.shape[0]
    h = src.shape[1]
    w = src.shape[2]
    ho = out.shape[1]
    wo = out.shape[2]
    ix0 = math.floor(du)
    iy0 = math.floor(dv)
    wxs = np.empty(6)
    wys = np.empty(6)
    _lut_weights(lut, steps, du - ix0, wxs)
    _lut_weights(lut, steps, dv - iy0, wys)
    wx0 = wxs[0]
    wx1 = wxs[1]
    wx2 = wxs[2]
    wx3 = wxs[3]
    wx4 = wxs[4]
    wx5 = wxs[5]
    umax = w - 0.5
    vmax = h - 0.5
    ncol = wo + 5
    # buffer column k holds source column k + ix0 - 2 (mirrored); the interior ones need no mirroring
    k_lo = min(max(0, 2 - ix0), ncol)
    k_hi = max(min(ncol, w + 2 - ix0), k_lo)
    for y in prange(ho):
        v = y + dv
        if not (v >= -0.5 and v <= vmax):
            for c in range(nc):
                for x in range(wo):
                    out[c, y, x] = np.nan
            for x in range(wo):
                foot[y, x] = False
            continue
        iys = np.empty(6, dtype=np.int64)
        _taps(y + iy0, h, iys)
        col = np.empty(ncol)
        cmin = np.empty(ncol)
        for x in range(wo):
            foot[y, x] = True
        for c in range(nc):
            plane = src[c]
            col[:] = 0.0
            for j in range(6):
                row = plane[iys[j]]
                wj = wys[j]
                for k in range(k_lo, k_hi):
                    col[k] += wj * row[k + ix0 - 2]
                for k in range(k_lo):
                    col[k] += wj * row[_mirror(k + ix0 - 2, w)]
                for k in range(k_hi, ncol):
                    col[k] += wj * row[_mirror(k + ix0 - 2, w)]
            if bounded:
                for k in range(ncol):
                    xs = _mirror(k + ix0 - 2, w)
                    cm = plane[iys[1], xs]
                    for j in range(2, 5):
                        cm = min(cm, plane[iys[j], xs])
                    cmin[k] = cm
            for x in range(wo):
                u = x + du
                if not (u >= -0.5 and u <= umax):
                    out[c, y, x] = np.nan
                    foot[y, x] = False
                    continue
                val = wx0 * col[x] + wx1 * col[x + 1] + wx2 * col[x + 2] + wx3 * col[x + 3] + wx4 * col[x + 4] + wx5 * col[x + 5]
                if bounded:
                    lo = min(min(cmin[x + 1], cmin[x + 2]), min(cmin[x + 3], cmin[x + 4]))
                    if val < lo:
                        val = lo
                if not math.isfinite(val):
                    val = _bilinear_at(src, c, u, v)
                    if not math.isfinite(val):
                        foot[y, x] = False
                out[c, y, x] = val


@njit(cache=True, nogil=True, parallel=True)
def _warp_lanczos_twopass(src, out, foot, inv, tab, steps, bounded, tile, tilevar, tilecount):  # pragma: no cover - numba
    """Lanczos-3 for an affine map close to a translation, in two 1-D passes per tile of output pixels
    (Catmull-Smith). With u = a x + b y + c, v = d x + e y + f, the output pixels of column x that sample
    source row v lie where y = (v - d x - f) / e, so along a source row j the sampled column is
    u(x, j) = alpha x + beta j + gamma (alpha = a - b d / e, beta = b / e, gamma = c - b f / e).
    Pass 1 resamples the source rows a tile needs at u(x, j) (6 taps, normalised LUT weights of that
    pixel's own offset); pass 2 resamples those intermediate rows at v (6 taps). The taps of row j sit
    beta (j - v) from where the 2-D kernel puts them, the only departure from `_warp_lanczos_bounded`
    (none when b = 0: a scale, a 180-degree rotation). Mirrored taps: a row beyond the border is the
    mirrored source row resampled at its own (geometric) u, as the 2-D kernel's taps.

    Local lower bound: pass 1 keeps the lowest of the central 4 taps of every intermediate pixel, pass 2
    the lowest of those of the central 4 rows: the central 4x4 of the sheared kernel. Variance factor:
    sum_j wy_j^2 sum_i wx_ji^2 of the weights used (the rows are distinct source pixels).

    ``tab``: per LUT row, the 6 normalised weights, their differences to the next row, the sum of squares
    and its difference (one 112-byte record per lookup). ``tile`` = (rows, columns) of output per tile;
    tiles run in parallel, each with its own buffers of intermediate rows (float64 values, float32
    bounds: the source is float32, so its minima are exact).
    """
    nc = src.shape[0]
    h = src.shape[1]
    w = src.shape[2]
    ho = out.shape[1]
    wo = out.shape[2]
    a = inv[0, 0]
    b = inv[0, 1]
    cu = inv[0, 2]
    d = inv[1, 0]
    e = inv[1, 1]
    fv = inv[1, 2]
    beta = b / e
    alpha = a - beta * d
    gamma = cu - beta * fv
    umax = w - 0.5
    vmax = h - 0.5
    last = tab.shape[0] - 2
    th = tile[0]
    tw = tile[1]
    nty = (ho + th - 1) // th
    ntx = (wo + tw - 1) // tw
    for t in prange(nty * ntx):
        ty0 = (t // ntx) * th
        tx0 = (t % ntx) * tw
        ty1 = min(ho, ty0 + th)
        tx1 = min(wo, tx0 + tw)
        nx = tx1 - tx0
        # v over the tile: affine, so its extremes are at the corners
        vlo = np.inf
        vhi = -np.inf
        for yy in (ty0, ty1 - 1):
            for xx in (tx0, tx1 - 1):
                vc = d * xx + (e * yy + fv)
                vlo = min(vlo, vc)
                vhi = max(vhi, vc)
        vlo = max(vlo, -0.5)
        vhi = min(vhi, vmax)
        if vlo > vhi:
            # no output pixel of the tile maps inside the source rows
            for y in range(ty0, ty1):
                for x in range(tx0, tx1):
                    foot[y, x] = False
                    for c in range(nc):
                        out[c, y, x] = np.nan
            tilevar[t] = 0.0
            tilecount[t] = 0
            continue
        # geometric rows (mirrored when read) of every pixel's 6 taps, one row of margin for rounding
        j0 = math.floor(vlo) - 3
        nr = math.floor(vhi) + 4 - j0 + 1
        # column-major buffers: pass 2 reads the 6 rows of one column from one place
        buf = np.empty((nc, nx, nr))
        bmin = np.empty((nc, nx, nr), dtype=np.float32)
        bsq = np.empty((nx, nr))
        # the weights once per tap position, for every channel (colour: 3 planes share them)
        for r in range(nr):
            j = j0 + r
            jm = _mirror(j, h)
            uj = beta * j + gamma
            for xl in range(nx):
                u = alpha * (tx0 + xl) + uj
                iu = math.floor(u)
                tx = (u - iu) * steps
                jx = min(int(tx), last)
                ax = tx - jx
                w0 = tab[jx, 0] + ax * tab[jx, 6]
                w1 = tab[jx, 1] + ax * tab[jx, 7]
                w2 = tab[jx, 2] + ax * tab[jx, 8]
                w3 = tab[jx, 3] + ax * tab[jx, 9]
                w4 = tab[jx, 4] + ax * tab[jx, 10]
                w5 = tab[jx, 5] + ax * tab[jx, 11]
                bsq[xl, r] = tab[jx, 12] + ax * tab[jx, 13]
                if iu >= 2 and iu + 3 < w:
                    i0 = iu - 2
                    i1 = iu - 1
                    i2 = iu
                    i3 = iu + 1
                    i4 = iu + 2
                    i5 = iu + 3
                else:
                    i0 = _mirror(iu - 2, w)
                    i1 = _mirror(iu - 1, w)
                    i2 = _mirror(iu, w)
                    i3 = _mirror(iu + 1, w)
                    i4 = _mirror(iu + 2, w)
                    i5 = _mirror(iu + 3, w)
                for c in range(nc):
                    row = src[c, jm]
                    f0 = row[i0]
                    f1 = row[i1]
                    f2 = row[i2]
                    f3 = row[i3]
                    f4 = row[i4]
                    f5 = row[i5]
                    buf[c, xl, r] = w0 * f0 + w1 * f1 + w2 * f2 + w3 * f3 + w4 * f4 + w5 * f5
                    if bounded:
                        bmin[c, xl, r] = min(min(f1, f2), min(f3, f4))
        tvar = 0.0
        tcnt = 0
        # down the columns: the intermediate column a pixel reads is contiguous and shared with the next row
        for x in range(tx0, tx1):
            xl = x - tx0
            sq = bsq[xl]
            # the variance factor is a mean: every 4th column of the footprint (exact per pixel) estimates
            # it to ~1e-5 at a quarter of its cost (next columns share their u offsets to |a - 1|)
            sampled = (x & 3) == 0
            cols = buf[:, xl]
            cmins = bmin[:, xl]
            for y in range(ty0, ty1):
                # the same expressions as the 2-D kernel's, so the footprints agree to the bit
                u = a * x + (b * y + cu)
                v = d * x + (e * y + fv)
                if not (u >= -0.5 and u <= umax and v >= -0.5 and v <= vmax):
                    for c in range(nc):
                        out[c, y, x] = np.nan
                    foot[y, x] = False
                    continue
                iv = math.floor(v)
                tyf = (v - iv) * steps
                jy = min(int(tyf), last)
                ay = tyf - jy
                w0 = tab[jy, 0] + ay * tab[jy, 6]
                w1 = tab[jy, 1] + ay * tab[jy, 7]
                w2 = tab[jy, 2] + ay * tab[jy, 8]
                w3 = tab[jy, 3] + ay * tab[jy, 9]
                w4 = tab[jy, 4] + ay * tab[jy, 10]
                w5 = tab[jy, 5] + ay * tab[jy, 11]
                r = iv - 2 - j0
                if sampled:
                    tvar += (w0 * w0 * sq[r] + w1 * w1 * sq[r + 1] + w2 * w2 * sq[r + 2] + w3 * w3 * sq[r + 3]
                             + w4 * w4 * sq[r + 4] + w5 * w5 * sq[r + 5])
                    tcnt += 1
                fin = True
                for c in range(nc):
                    val = (w0 * cols[c, r] + w1 * cols[c, r + 1] + w2 * cols[c, r + 2] + w3 * cols[c, r + 3]
                           + w4 * cols[c, r + 4] + w5 * cols[c, r + 5])
                    if bounded:
                        lo = min(min(cmins[c, r + 1], cmins[c, r + 2]), min(cmins[c, r + 3], cmins[c, r + 4]))
                        if val < lo:
                            val = lo
                    if not math.isfinite(val):
                        # a NaN (or inf) among the taps: bilinear on the finite central 2x2, as the 2-D kernel
                        val = _bilinear_at(src, c, u, v)
                        fin = fin and math.isfinite(val)
                    out[c, y, x] = val
                foot[y, x] = fin
        tilevar[t] = tvar
        tilecount[t] = tcnt


@njit(cache=True, nogil=True, parallel=True)
def _warp_bilinear(src, out, foot, inv, rowvar, rowcount):  # pragma: no cover - numba
    nc = src.shape[0]
    h = src.shape[1]
    w = src.shape[2]
    ho = out.shape[1]
    wo = out.shape[2]
    umax = w - 0.5
    vmax = h - 0.5
    for y in prange(ho):
        vacc = 0.0
        vcnt = 0
        for x in range(wo):
            u, v = _src(inv, float(x), float(y))
            if not (u >= -0.5 and u <= umax and v >= -0.5 and v <= vmax):
                for c in range(nc):
                    out[c, y, x] = np.nan
                foot[y, x] = False
                continue
            x0 = math.floor(u)
            y0 = math.floor(v)
            fx = u - x0
            fy = v - y0
            a = (1.0 - fx) * (1.0 - fx) + fx * fx
            b = (1.0 - fy) * (1.0 - fy) + fy * fy
            vacc += a * b
            vcnt += 1
            inner = x0 >= 0 and x0 + 1 < w and y0 >= 0 and y0 + 1 < h
            fin = True
            for c in range(nc):
                val = np.nan
                if inner:
                    # same terms and order as _bilinear_at when the four pixels are finite
                    w00 = (1.0 - fx) * (1.0 - fy)
                    w01 = fx * (1.0 - fy)
                    w10 = (1.0 - fx) * fy
                    w11 = fx * fy
                    acc = w00 * src[c, y0, x0] + w01 * src[c, y0, x0 + 1] + w10 * src[c, y0 + 1, x0] + w11 * src[c, y0 + 1, x0 + 1]
                    val = acc / (w00 + w01 + w10 + w11)
                if not math.isfinite(val):
                    val = _bilinear_at(src, c, u, v)
                    fin = fin and math.isfinite(val)
                out[c, y, x] = val
            foot[y, x] = fin
        rowvar[y] = vacc
        rowcount[y] = vcnt


@njit(cache=True, nogil=True, parallel=True)
def _warp_nearest_mask(src, out, inv):  # pragma: no cover - numba
    h = src.shape[0]
    w = src.shape[1]
    ho = out.shape[0]
    wo = out.shape[1]
    for y in prange(ho):
        for x in range(wo):
            u, v = _src(inv, float(x), float(y))
            iu = math.floor(u + 0.5)
            iv = math.floor(v + 0.5)
            if iu >= 0 and iu < w and iv >= 0 and iv < h:
                out[y, x] = src[iv, iu]
            else:
                out[y, x] = False


def _check_shape(out_shape: tuple[int, ...]) -> tuple[int, int]:
    if len(out_shape) < 2:
        raise StackwatchError(f"output shape must be (H, W), got {out_shape}")
    ho, wo = int(out_shape[-2]), int(out_shape[-1])
    if ho <= 0 or wo <= 0:
        raise StackwatchError(f"output shape must be positive, got {out_shape}")
    return ho, wo


def _is_translation(inv: np.ndarray) -> bool:
    return bool(inv[0, 0] == 1.0 and inv[1, 1] == 1.0 and inv[0, 1] == 0.0 and inv[1, 0] == 0.0
                and inv[2, 0] == 0.0 and inv[2, 1] == 0.0 and inv[2, 2] == 1.0)


def warp(
    image: np.ndarray,
    matrix: np.ndarray,
    out_shape: tuple[int, ...],
    *,
    method: str = "lanczos3",
    clamp: float = 0.3,
    clamp_method: str = "local",
    relative_clamp: bool = False,
) -> Warped:
    """Resample ``image`` onto the reference grid of ``out_shape`` through the frame -> reference ``matrix``.

    Parameters
    ----------
    image : float32 (H, W) or (C, H, W); NaN = no data.
    matrix : 3x3 (or 2x3 affine) transform mapping frame (x, y) to reference (x, y).
    out_shape : (H, W) or (C, H, W) of the reference grid; only the last two are used.
    method : "lanczos3" or "bilinear". Default is "lanczos3".
    clamp : 0 disables clamping; otherwise PixInsight's threshold for ``clamp_method="pixinsight"``
        (any value > 0 enables the local bound). Default is 0.3.
    clamp_method : "local" (never below the lowest of the 16 source pixels of the central 4x4 taps:
        no ringing, star flux kept; see module doc) or "pixinsight" (PCL's rule). Default is "local".
    relative_clamp : with "pixinsight", never clamp below the weights' own negative/positive ratio
        (see module doc). Default is False.

    A pure translation and an affine map within ~2 deg of a translation or of a 180-degree rotation run
    as two 1-D passes, anything else as the per-pixel 2-D kernel (module doc).
    """
    if method not in METHODS:
        raise StackwatchError(f"unknown resampling method {method!r} (expected one of {', '.join(METHODS)})")
    if clamp_method not in CLAMP_METHODS:
        raise StackwatchError(f"unknown clamp method {clamp_method!r} (expected one of {', '.join(CLAMP_METHODS)})")
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or arr.shape[-1] == 0 or arr.shape[-2] == 0:
        raise StackwatchError(f"image must be (H, W) or (C, H, W) and non-empty, got shape {arr.shape}")
    if not 0.0 <= float(clamp) < 1.0:
        raise StackwatchError(f"clamp must be in [0, 1), got {clamp}")
    ho, wo = _check_shape(tuple(out_shape))
    src = np.ascontiguousarray(arr.reshape((-1, *arr.shape[-2:])), dtype=np.float32)
    inv = np.ascontiguousarray(invert_transform(matrix))
    out = np.empty((src.shape[0], ho, wo), dtype=np.float32)
    footprint = np.empty((ho, wo), dtype=np.bool_)
    rowvar = np.zeros(ho, dtype=np.float64)
    rowcount = np.zeros(ho, dtype=np.int64)
    if method == "lanczos3" and clamp > 0.0 and clamp_method == "pixinsight":
        _warp_lanczos(src, out, inv, _LUT, _LUTSTAT, float(clamp), bool(relative_clamp), float(_LUT_STEPS), rowvar, rowcount)
        footprint = np.asarray(np.isfinite(out).all(axis=0))
    elif method == "lanczos3" and _is_translation(inv):
        du, dv = float(inv[0, 2]), float(inv[1, 2])
        _warp_lanczos_shift(src, out, footprint, du, dv, _LUTN, float(_LUT_STEPS), clamp > 0.0)
        # one set of weights for every output pixel that maps inside the source (NaN if none does)
        inside = _covers(du, wo, src.shape[2]) and _covers(dv, ho, src.shape[1])
        vf = float(_LUTN_SQ[_lut_row(du)] * _LUTN_SQ[_lut_row(dv)]) if inside else float("nan")
        data = out[0] if arr.ndim == 2 else out
        return Warped(data=data, footprint=footprint, variance_factor=vf)
    elif method == "lanczos3" and _two_pass_applies(inv):
        tile = np.array(_TWO_PASS_TILE, dtype=np.int64)
        ntiles = -(-ho // _TWO_PASS_TILE[0]) * -(-wo // _TWO_PASS_TILE[1])
        tilevar = np.zeros(ntiles, dtype=np.float64)
        tilecount = np.zeros(ntiles, dtype=np.int64)
        _warp_lanczos_twopass(src, out, footprint, inv, _LUT2P, float(_LUT_STEPS), clamp > 0.0, tile,
                              tilevar, tilecount)
        n = int(tilecount.sum())
        vf = float(tilevar.sum() / n) if n else float("nan")
        data = out[0] if arr.ndim == 2 else out
        return Warped(data=data, footprint=footprint, variance_factor=vf)
    elif method == "lanczos3":
        _warp_lanczos_bounded(src, out, footprint, inv, _LUTN, _LUTN_SQ, float(_LUT_STEPS), clamp > 0.0, rowvar, rowcount)
    else:
        _warp_bilinear(src, out, footprint, inv, rowvar, rowcount)
    n = int(rowcount.sum())
    vf = float(rowvar.sum() / n) if n else float("nan")
    data = out[0] if arr.ndim == 2 else out
    return Warped(data=data, footprint=footprint, variance_factor=vf)


def _two_pass_applies(inv: np.ndarray) -> bool:
    """Whether the reference -> frame map ``inv`` is an affine map the two-pass kernel resamples: the
    shear of its rows, |b / e| (u = a x + b y + c, v = d x + e y + f), at most _TWO_PASS_MAX_SHEAR, and
    the same bound on |d / e| (the rows one tile of output spans)."""
    if inv[2, 0] != 0.0 or inv[2, 1] != 0.0 or inv[2, 2] != 1.0:
        return False
    e = abs(float(inv[1, 1]))
    return bool(e >= 0.5 and abs(float(inv[0, 1])) <= _TWO_PASS_MAX_SHEAR * e
                and abs(float(inv[1, 0])) <= _TWO_PASS_MAX_SHEAR * e)


def _covers(shift: float, n_out: int, n_src: int) -> bool:
    """Whether some output index i in [0, n_out) samples i + shift inside [-0.5, n_src - 0.5]."""
    lo = max(0, math.ceil(-0.5 - shift))
    hi = min(n_out - 1, math.floor(n_src - 0.5 - shift))
    return hi >= lo


def _lut_row(shift: float) -> int:
    return min(int((shift - math.floor(shift)) * _LUT_STEPS), _LUT_STEPS - 1)


def warp_mask(mask: np.ndarray, matrix: np.ndarray, out_shape: tuple[int, ...], *, dilate_px: int = 1) -> np.ndarray:
    """Warp a bool mask (True = excluded, e.g. saturated) nearest-neighbour, then dilate it by ``dilate_px``.

    Outside the source the result is False (coverage is the footprint's business). Default dilation is 1 px
    (a 3x3 square), so every output pixel whose interpolation taps touch a masked pixel's centre is covered.

    A mask with few True pixels (the usual saturated cores: a few thousand of 26 M) is warped forward:
    only the output pixels near the image of each True pixel are tested with the same inverse-nearest
    rule, so the result equals the full-frame warp at the cost of the True pixels alone; an empty mask
    costs only the count.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise StackwatchError(f"mask must be (H, W), got shape {m.shape}")
    ho, wo = _check_shape(tuple(out_shape))
    dil = max(0, int(dilate_px))
    src = np.ascontiguousarray(m, dtype=np.bool_)
    inv = np.ascontiguousarray(invert_transform(matrix))
    n_true = int(np.count_nonzero(src))
    out = np.zeros((ho, wo), dtype=np.bool_)
    if n_true == 0:
        return out
    if n_true * _SPARSE_MASK_COST <= ho * wo:
        fwd = np.asarray(matrix, dtype=np.float64)
        fwd = np.vstack([fwd, [0.0, 0.0, 1.0]]) if fwd.shape == (2, 3) else fwd
        ys, xs = _true_pixels(src)
        if _warp_mask_sparse(ys, xs, out, np.ascontiguousarray(fwd), inv, src.shape[0], src.shape[1], dil):
            return out
        out[:] = False
    return _warp_mask_dense(src, out, inv, dil)


def _true_pixels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the True pixels of a C-contiguous bool mask; a sparse mask is scanned eight
    pixels at a time (np.nonzero reads every byte: ~8x slower on a 26 MP mask with a few True pixels)."""
    flat = mask.reshape(-1)
    n8 = flat.size - flat.size % 8
    words = np.flatnonzero(flat[:n8].view(np.uint64))
    idx = (words[:, None] * 8 + np.arange(8)).reshape(-1)
    idx = np.concatenate([idx[flat[idx]], n8 + np.flatnonzero(flat[n8:])])
    ys, xs = np.divmod(idx, mask.shape[1])
    return ys, xs


def _warp_mask_dense(src: np.ndarray, out: np.ndarray, inv: np.ndarray, dilate_px: int) -> np.ndarray:
    """The inverse-nearest warp of every output pixel, then ``dilate_px`` 3x3 dilations."""
    _warp_nearest_mask(src, out, inv)
    for _ in range(dilate_px):
        grown = out.copy()
        grown[1:, :] |= out[:-1, :]
        grown[:-1, :] |= out[1:, :]
        g2 = grown.copy()
        g2[:, 1:] |= grown[:, :-1]
        g2[:, :-1] |= grown[:, 1:]
        out = g2
    return out


@njit(cache=True, nogil=True)
def _warp_mask_sparse(ys, xs, out, fwd, inv, h, w, dil):  # pragma: no cover - numba
    """Forward warp of the True source pixels (ys, xs): the output pixels whose inverse-nearest source
    pixel is (xs[k], ys[k]) lie in the image under ``fwd`` of the unit square around it; every output
    pixel of that image's bounding box (plus one pixel for rounding) is tested with `_warp_nearest_mask`'s
    rule, and a hit sets its (2 dil + 1)^2 square. Returns False (out partly written) when a square's
    image is not a small finite box (a homography near its horizon, a strong magnification): the caller
    then runs the dense warp."""
    ho = out.shape[0]
    wo = out.shape[1]
    for k in range(ys.size):
        sx = xs[k]
        sy = ys[k]
        if sx >= w or sy >= h:
            continue
        xlo = np.inf
        xhi = -np.inf
        ylo = np.inf
        yhi = -np.inf
        for cy in (-0.5, 0.5):
            for cx in (-0.5, 0.5):
                den = fwd[2, 0] * (sx + cx) + fwd[2, 1] * (sy + cy) + fwd[2, 2]
                if not den > 0.0:
                    return False
                px, py = _src(fwd, sx + cx, sy + cy)
                xlo = min(xlo, px)
                xhi = max(xhi, px)
                ylo = min(ylo, py)
                yhi = max(yhi, py)
        if not (xhi - xlo <= _SPARSE_MASK_MAX_SPAN and yhi - ylo <= _SPARSE_MASK_MAX_SPAN):
            return False
        x0 = max(0, math.floor(xlo) - 1)
        x1 = min(wo - 1, math.ceil(xhi) + 1)
        y0 = max(0, math.floor(ylo) - 1)
        y1 = min(ho - 1, math.ceil(yhi) + 1)
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                u, v = _src(inv, float(x), float(y))
                if math.floor(u + 0.5) == sx and math.floor(v + 0.5) == sy:
                    for yy in range(max(0, y - dil), min(ho, y + dil + 1)):
                        for xx in range(max(0, x - dil), min(wo, x + dil + 1)):
                            out[yy, xx] = True
    return True
