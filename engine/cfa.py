"""Colour filter arrays: Bayer pattern helpers and debayering (algorithms.md §5).

Patterns are the effective 2x2 tile of ``data[0:2, 0:2]`` of the top-down array, as
:class:`stackwatch.engine.fitsio.Image` carries it ("RGGB", "BGGR", "GRBG", "GBRG"): the colour of
pixel (x, y) is ``pattern[(y % 2) * 2 + x % 2]``.

Debayer methods (output (3, H, W) float32 in R, G, B order, except superpixel):

- ``bilinear`` (default): every missing colour is the mean of the finite pixels of that colour among
  the 8 neighbours (at R/B sites: G from the 4 edge neighbours, the opposite colour from the 4
  diagonals; at G sites: 2 horizontal or 2 vertical neighbours). A NaN own-colour pixel is replaced by
  the mean of its finite same-colour neighbours (3x3, then the 5x5 same-colour ring); none -> NaN.
- ``vng``: variable number of gradients (Chang, Cheung & Pang 1999): 8 directional gradients over the
  5x5 window, threshold T = 1.5 min + 0.5 (max - min), the missing colours are the own value plus the
  mean colour difference over the directions with gradient <= T, clamped to the range of that colour in the 5x5 window. Falls back to bilinear where the
  5x5 window holds NaN or touches the border.
- ``rcd``: ratio corrected demosaicing (L. Sanz Rodríguez, 2017; Siril's and darktable's default): green
  at the R/B sites from its 4 neighbours, each scaled by a low-pass ratio and weighted by the inverse
  directional gradients, mixed vertically/horizontally by a high-pass discrimination; R and B from
  gradient-weighted colour differences (diagonal, then cardinal). No clamp (calibrated data keep their
  negatives); the frame borders use a mirrored copy of the frame (Bayer parity kept), and a value whose
  window holds NaN is the bilinear one. Frames of 10 rows or columns or fewer are debayered bilinearly.
  Measured against the simulator's truth: 3-4x lower pixel error in stars, 20x at straight edges, fewer
  zipper artefacts and better borders than bilinear, but star fluxes 1-4 % off where bilinear is within
  0.1 % (FWHM 3.5 px) and per-pixel sky noise 0.93 instead of 0.75 sigma in R and B: not for photometry.
- ``superpixel``: each 2x2 tile -> one pixel (R, mean(G1, G2), B), output (3, H/2, W/2); a NaN green
  is ignored if the other is finite.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange
from stackwatch.engine.errors import StackwatchError

__all__ = [
    "CHANNELS",
    "DEBAYER_METHODS",
    "channel_map",
    "channel_offsets",
    "debayer",
    "luminance",
    "shift_pattern",
    "validate_pattern",
]

CHANNELS = ("R", "G", "B")
DEBAYER_METHODS = ("bilinear", "vng", "rcd", "superpixel")
_VALID = ("RGGB", "BGGR", "GRBG", "GBRG")


def validate_pattern(bayer: str) -> str:
    """The pattern upper-cased; :class:`StackwatchError` unless it is RGGB, BGGR, GRBG or GBRG."""
    pattern = str(bayer).strip().upper()
    if pattern not in _VALID:
        raise StackwatchError(f"Bayer pattern {bayer!r}: not one of {', '.join(_VALID)}")
    return pattern


def channel_map(bayer: str) -> np.ndarray:
    """(2, 2) int8 array: channel index (0 R, 1 G, 2 B) of ``data[y % 2, x % 2]``."""
    pattern = validate_pattern(bayer)
    return np.array([[CHANNELS.index(pattern[0]), CHANNELS.index(pattern[1])],
                     [CHANNELS.index(pattern[2]), CHANNELS.index(pattern[3])]], dtype=np.int8)


def shift_pattern(bayer: str, dx: int, dy: int) -> str:
    """The pattern of ``data[dy:, dx:]`` (a crop starting at column ``dx``, row ``dy``): an odd column
    offset swaps the columns of the tile, an odd row offset its rows (§5.1)."""
    p = validate_pattern(bayer)
    tile = [[p[0], p[1]], [p[2], p[3]]]
    return "".join(tile[(r + dy) % 2][(c + dx) % 2] for r in range(2) for c in range(2))


def channel_offsets(bayer: str) -> dict[str, list[tuple[int, int]]]:
    """Sub-lattice origins (dy, dx) per channel letter, e.g. RGGB -> R [(0, 0)], G [(0, 1), (1, 0)], B [(1, 1)]."""
    pattern = validate_pattern(bayer)
    out: dict[str, list[tuple[int, int]]] = {"R": [], "G": [], "B": []}
    for dy in range(2):
        for dx in range(2):
            out[pattern[dy * 2 + dx]].append((dy, dx))
    return out


def luminance(rgb: np.ndarray) -> np.ndarray:
    """(R + G + B)/3 of a (3, H, W) image as float32 (detection and registration use it)."""
    if rgb.ndim != 3 or rgb.shape[0] != 3:
        raise StackwatchError(f"luminance needs a (3, H, W) image, got shape {rgb.shape}")
    return ((rgb[0].astype(np.float32) + rgb[1] + rgb[2]) / np.float32(3.0)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Kernels


@njit(cache=True, nogil=True, inline="always")
def _ring_mean(img: np.ndarray, y: int, x: int) -> float:  # pragma: no cover - numba
    """Mean of the finite pixels of the same colour two pixels away (the 5x5 ring), NaN if none: a
    NaN own pixel with no same-colour pixel in its 3x3 (R/B sites)."""
    h, w = img.shape
    s = 0.0
    n = 0.0
    for dy in range(-2, 3, 2):
        yy = y + dy
        if yy < 0 or yy >= h:
            continue
        for dx in range(-2, 3, 2):
            xx = x + dx
            if (dy == 0 and dx == 0) or xx < 0 or xx >= w:
                continue
            v = img[yy, xx]
            if v == v:
                s += v
                n += 1.0
    return s / n if n > 0.0 else np.nan


@njit(cache=True, nogil=True)
def _bilinear_pixel(img: np.ndarray, cmap: np.ndarray, out: np.ndarray, y: int, x: int) -> None:  # pragma: no cover
    """General case (borders, NaN in the 3x3): mean of the finite same-colour pixels among the 8
    neighbours; a NaN own pixel from the same-colour ring; none -> NaN."""
    h, w = img.shape
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    n0 = 0.0
    n1 = 0.0
    n2 = 0.0
    for dy in range(-1, 2):
        yy = y + dy
        if yy < 0 or yy >= h:
            continue
        for dx in range(-1, 2):
            if dy == 0 and dx == 0:
                continue
            xx = x + dx
            if xx < 0 or xx >= w:
                continue
            v = img[yy, xx]
            if v == v:
                c = cmap[yy & 1, xx & 1]
                if c == 0:
                    s0 += v
                    n0 += 1.0
                elif c == 1:
                    s1 += v
                    n1 += 1.0
                else:
                    s2 += v
                    n2 += 1.0
    own = cmap[y & 1, x & 1]
    centre = img[y, x]
    for c in range(3):
        sc = s0 if c == 0 else (s1 if c == 1 else s2)
        nc = n0 if c == 0 else (n1 if c == 1 else n2)
        if c == own and centre == centre:
            out[c, y, x] = centre
        elif nc > 0.0:
            out[c, y, x] = sc / nc
        elif c == own:
            # NaN own pixel with no same-colour pixel in 3x3 (R/B sites): the 5x5 ring
            out[c, y, x] = _ring_mean(img, y, x)
        else:
            out[c, y, x] = np.nan


@njit(cache=True, nogil=True, parallel=True)
def _bilinear(img: np.ndarray, cmap: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - numba
    h, w = img.shape
    for y in prange(h):
        if y == 0 or y == h - 1:
            for x in range(w):
                _bilinear_pixel(img, cmap, out, y, x)
            continue
        up = img[y - 1]
        mid = img[y]
        dn = img[y + 1]
        _bilinear_pixel(img, cmap, out, y, 0)
        _bilinear_pixel(img, cmap, out, y, w - 1)
        for x in range(1, w - 1):
            v = mid[x]
            u = up[x]
            d = dn[x]
            left = mid[x - 1]
            right = mid[x + 1]
            ul = up[x - 1]
            ur = up[x + 1]
            dl = dn[x - 1]
            dr = dn[x + 1]
            total = v + u + d + left + right + ul + ur + dl + dr
            if total != total:
                _bilinear_pixel(img, cmap, out, y, x)
                continue
            own = cmap[y & 1, x & 1]
            if own == 1:
                ch = cmap[y & 1, (x + 1) & 1]
                cv = cmap[(y + 1) & 1, x & 1]
                out[1, y, x] = v
                out[ch, y, x] = 0.5 * (left + right)
                out[cv, y, x] = 0.5 * (u + d)
            else:
                out[own, y, x] = v
                out[1, y, x] = 0.25 * (u + d + left + right)
                out[2 - own, y, x] = 0.25 * (ul + ur + dl + dr)


@njit(cache=True, nogil=True, parallel=True)
def _superpixel(img: np.ndarray, cmap: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - numba
    h2 = out.shape[1]
    w2 = out.shape[2]
    for j in prange(h2):
        for i in range(w2):
            gs = 0.0
            gn = 0.0
            for dy in range(2):
                for dx in range(2):
                    v = img[2 * j + dy, 2 * i + dx]
                    c = cmap[dy, dx]
                    if c == 1:
                        if v == v:
                            gs += v
                            gn += 1.0
                    else:
                        out[c, j, i] = v
            out[1, j, i] = gs / gn if gn > 0.0 else np.nan


# The 8 VNG directions (dy, dx): N, E, S, W, NE, SE, NW, SW.
_DIRS = np.array([[-1, 0], [0, 1], [1, 0], [0, -1], [-1, 1], [1, 1], [-1, -1], [1, -1]], dtype=np.int64)


@njit(cache=True, nogil=True, parallel=True)
def _vng(img: np.ndarray, cmap: np.ndarray, dirs: np.ndarray, bil: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    """VNG for interior pixels whose 5x5 window is finite; ``bil`` holds the bilinear image (read only),
    ``out`` a copy of it that is overwritten where VNG applies."""
    h, w = img.shape
    for y in prange(2, h - 2):
        grad = np.zeros(8)
        acc = np.zeros(3)
        for x in range(2, w - 2):
            finite = True
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    v = img[y + dy, x + dx]
                    if v != v:
                        finite = False
            if not finite:
                continue
            # Gradient of direction d: absolute differences along d on the centre line (adjacent pair
            # through the centre and the same-colour pair centre -> 2 away) and, half-weighted, on the
            # two lines beside it.
            for d in range(8):
                ddy = dirs[d, 0]
                ddx = dirs[d, 1]
                py = ddx
                px = -ddy
                g = abs(img[y + ddy, x + ddx] - img[y - ddy, x - ddx])
                g += abs(img[y + 2 * ddy, x + 2 * ddx] - img[y, x])
                g += 0.5 * abs(img[y + ddy + py, x + ddx + px] - img[y - ddy + py, x - ddx + px])
                g += 0.5 * abs(img[y + ddy - py, x + ddx - px] - img[y - ddy - py, x - ddx - px])
                grad[d] = g
            gmin = grad[0]
            gmax = grad[0]
            for d in range(1, 8):
                gmin = min(gmin, grad[d])
                gmax = max(gmax, grad[d])
            thr = 1.5 * gmin + 0.5 * (gmax - gmin)
            own = cmap[y & 1, x & 1]
            for c in range(3):
                acc[c] = 0.0
            n = 0.0
            # colour differences at the neighbour in each smooth direction (from its bilinear colours)
            for d in range(8):
                if grad[d] > thr:
                    continue
                yy = y + dirs[d, 0]
                xx = x + dirs[d, 1]
                for c in range(3):
                    acc[c] += bil[c, yy, xx] - bil[own, yy, xx]
                n += 1.0
            if n == 0.0:
                continue
            centre = img[y, x]
            for c in range(3):
                if c == own:
                    continue
                # clamp to the range of colour c in the 5x5 window: no overshoot next to sharp stars
                lo = np.inf
                hi = -np.inf
                for dy in range(-2, 3):
                    for dx in range(-2, 3):
                        if cmap[(y + dy) & 1, (x + dx) & 1] == c:
                            v = img[y + dy, x + dx]
                            lo = min(lo, v)
                            hi = max(hi, v)
                out[c, y, x] = min(max(centre + acc[c] / n, lo), hi)


# RCD, ratio corrected demosaicing (Luis Sanz Rodríguez, 2017; Siril's and darktable's default), from its
# published description. Each band of output rows is computed from a mirrored copy of the raw rows and
# columns around it: reflection about the edge pixel (index -k -> k) keeps the Bayer parity, so the
# frame borders get the same interpolation as the interior instead of a bilinear fringe.
_RCD_PAD = 10  # context each band reads: the last step (R/B at G sites) reaches 10 px into the raw frame
_RCD_BAND_ROWS = 128  # rows per band: scratch of 9 float32 planes of (128 + 20) x (W + 20) per thread (33 MB at 26 MP)
_RCD_EPS = 1e-5  # RCD's guard against division by zero for data in [0, 1] (our full scale is 1.0 too)
_RCD_EPSSQ = 1e-10


@njit(cache=True, nogil=True)
def _reflect(i: int, n: int) -> int:  # pragma: no cover - numba
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


@njit(cache=True, nogil=True)
def _bilinear_at(img: np.ndarray, cmap: np.ndarray, y: int, x: int, c: int) -> float:  # pragma: no cover
    """The bilinear value of colour ``c`` at (y, x), as ``_bilinear_pixel`` computes it (RCD's fallback where
    its window holds NaN)."""
    h, w = img.shape
    own = cmap[y & 1, x & 1]
    if c == own:
        v = img[y, x]
        if v == v:
            return np.float64(v)
    s = 0.0
    n = 0.0
    for dy in range(-1, 2):
        yy = y + dy
        if yy < 0 or yy >= h:
            continue
        for dx in range(-1, 2):
            xx = x + dx
            if (dy == 0 and dx == 0) or xx < 0 or xx >= w:
                continue
            v = img[yy, xx]
            if v == v and cmap[yy & 1, xx & 1] == c:
                s += v
                n += 1.0
    if n > 0.0:
        return s / n
    if c != own:
        return np.nan
    return _ring_mean(img, y, x)


@njit(cache=True, nogil=True)
def _ratio_estimate(neighbour: float, lpf_here: float, lpf_there: float) -> float:  # pragma: no cover
    """RCD's ratio-corrected estimate: the neighbour's green scaled by the low-pass ratio between this site
    and the midpoint towards the same-colour site beyond the neighbour. The ratio only means something for
    positive light; where a low-pass value is not positive (a calibrated frame's noise around zero) the
    neighbour's value is used unscaled, and the factor is within (0, 2) otherwise."""
    if lpf_here > 0.0 and lpf_there > 0.0:
        return neighbour * (1.0 + (lpf_here - lpf_there) / (_RCD_EPS + lpf_here + lpf_there))
    if lpf_here != lpf_here or lpf_there != lpf_there:
        return np.nan
    return neighbour


@njit(cache=True, nogil=True)
def _blend(a: float, b: float, weight_b: float) -> float:  # pragma: no cover - numba
    """(1 - weight_b) a + weight_b b written so that a == b gives a exactly (a flat field stays flat)."""
    return a + weight_b * (b - a)


@njit(cache=True, nogil=True)
def _refined(direction: np.ndarray, r: int, c: int) -> float:  # pragma: no cover - numba
    """RCD's refinement of a direction map: the mean of the 4 diagonal neighbours when it is more decided
    (further from 0.5) than the pixel's own value; NaN when any of them is."""
    centre = direction[r, c]
    around = 0.25 * (np.float64(direction[r - 1, c - 1]) + direction[r - 1, c + 1] + direction[r + 1, c - 1]
                     + direction[r + 1, c + 1])
    if around != around:
        return around
    return around if abs(0.5 - centre) < abs(0.5 - around) else np.float64(centre)


@njit(cache=True, nogil=True)
def _rcd_band(img: np.ndarray, cmap: np.ndarray, y0: int, y1: int, planes: np.ndarray, rgb: np.ndarray,
              out: np.ndarray) -> None:  # pragma: no cover - numba
    """RCD for output rows [y0, y1), every column, written into ``out``. Local row r is frame row
    y0 - P + r and local column k frame column k - P (P = _RCD_PAD, mirrored beyond the frame). Each step
    runs on the local rectangle its successors read; a value that comes out NaN (NaN raw pixels in its
    window) is replaced by the bilinear one, so the next steps see finite data wherever bilinear has it.
    ``planes`` (6, >= nr, nc) and ``rgb`` (3, >= nr, nc) are the caller's scratch, reused band after band
    (fresh memory costs a page fault per 4 KB on first touch: allocating per band doubled the time)."""
    h, w = img.shape
    pad = _RCD_PAD
    nr = y1 - y0 + 2 * pad
    nc = w + 2 * pad
    py = y0 & 1  # local (r, k) has the colour of cmap[(r + py) & 1, k & 1]: pad is even
    eps = _RCD_EPS
    # column parity of the R/B sites in a row of parity i (each row has one R or B site per 2 columns)
    rb_col = np.empty(2, dtype=np.int64)
    for i in range(2):
        rb_col[i] = 1 if cmap[i, 0] == 1 else 0
    cf = planes[0]
    for r in range(nr):
        yy = _reflect(y0 - pad + r, h)
        cf[r, pad : pad + w] = img[yy]
        for k in range(pad):
            cf[r, k] = img[yy, pad - k]
            cf[r, pad + w + k] = img[yy, w - 2 - k]

    # Step 1: vertical / horizontal discrimination from squared 7-tap high-pass responses summed over
    # 3 pixels across the direction: VH -> 1 where the vertical response dominates (interpolate along rows)
    hpv = planes[1]
    hph = planes[2]
    for r in range(3, nr - 3):
        for k in range(3, nc - 3):
            v = (np.float64(cf[r - 3, k]) - cf[r - 1, k] - cf[r + 1, k] + cf[r + 3, k]
                 - 3.0 * (np.float64(cf[r - 2, k]) + cf[r + 2, k]) + 6.0 * cf[r, k])
            hz = (np.float64(cf[r, k - 3]) - cf[r, k - 1] - cf[r, k + 1] + cf[r, k + 3]
                  - 3.0 * (np.float64(cf[r, k - 2]) + cf[r, k + 2]) + 6.0 * cf[r, k])
            hpv[r, k] = v * v
            hph[r, k] = hz * hz
    vh = planes[3]
    for r in range(4, nr - 4):
        for k in range(4, nc - 4):
            sv = _RCD_EPSSQ + np.float64(hpv[r - 1, k]) + hpv[r, k] + hpv[r + 1, k]
            sh = _RCD_EPSSQ + np.float64(hph[r, k - 1]) + hph[r, k] + hph[r, k + 1]
            vh[r, k] = sv / (sv + sh)

    # Step 2: low-pass (3x3 binomial, x4) at the R/B sites; every colour contributes in a fixed proportion
    lpf = planes[4]
    for r in range(3, nr - 3):
        for k in range(3 + ((rb_col[(r + py) & 1] - 3) & 1), nc - 3, 2):
            lpf[r, k] = (np.float64(cf[r, k]) + 0.5 * (np.float64(cf[r - 1, k]) + cf[r + 1, k] + cf[r, k - 1] + cf[r, k + 1])
                         + 0.25 * (np.float64(cf[r - 1, k - 1]) + cf[r - 1, k + 1] + cf[r + 1, k - 1] + cf[r + 1, k + 1]))

    # Own colours from the raw pixels (a NaN one from bilinear); missing colours are filled below.
    for r in range(nr):
        yy = _reflect(y0 - pad + r, h)
        for k in range(nc):
            own = cmap[(r + py) & 1, k & 1]
            v = np.float64(cf[r, k])
            if v != v:
                v = _bilinear_at(img, cmap, yy, _reflect(k - pad, w), own)
            rgb[own, r, k] = v

    # Step 3: green at the R/B sites, ratio corrected along each cardinal direction, weighted by the
    # inverse gradients, then vertical and horizontal mixed by the refined VH discrimination
    for r in range(5, nr - 5):
        for k in range(5 + ((rb_col[(r + py) & 1] - 5) & 1), nc - 5, 2):
            c0 = np.float64(cf[r, k])
            grad_n = eps + abs(np.float64(cf[r - 1, k]) - cf[r + 1, k]) + abs(c0 - cf[r - 2, k]) \
                + abs(np.float64(cf[r - 1, k]) - cf[r - 3, k]) + abs(np.float64(cf[r - 2, k]) - cf[r - 4, k])
            grad_s = eps + abs(np.float64(cf[r + 1, k]) - cf[r - 1, k]) + abs(c0 - cf[r + 2, k]) \
                + abs(np.float64(cf[r + 1, k]) - cf[r + 3, k]) + abs(np.float64(cf[r + 2, k]) - cf[r + 4, k])
            grad_w = eps + abs(np.float64(cf[r, k - 1]) - cf[r, k + 1]) + abs(c0 - cf[r, k - 2]) \
                + abs(np.float64(cf[r, k - 1]) - cf[r, k - 3]) + abs(np.float64(cf[r, k - 2]) - cf[r, k - 4])
            grad_e = eps + abs(np.float64(cf[r, k + 1]) - cf[r, k - 1]) + abs(c0 - cf[r, k + 2]) \
                + abs(np.float64(cf[r, k + 1]) - cf[r, k + 3]) + abs(np.float64(cf[r, k + 2]) - cf[r, k + 4])
            lp = np.float64(lpf[r, k])
            est_n = _ratio_estimate(cf[r - 1, k], lp, lpf[r - 2, k])
            est_s = _ratio_estimate(cf[r + 1, k], lp, lpf[r + 2, k])
            est_w = _ratio_estimate(cf[r, k - 1], lp, lpf[r, k - 2])
            est_e = _ratio_estimate(cf[r, k + 1], lp, lpf[r, k + 2])
            est_v = _blend(est_n, est_s, grad_n / (grad_n + grad_s))
            est_h = _blend(est_w, est_e, grad_w / (grad_w + grad_e))
            g = _blend(est_v, est_h, _refined(vh, r, k))
            if g != g:
                g = _bilinear_at(img, cmap, _reflect(y0 - pad + r, h), _reflect(k - pad, w), 1)
            rgb[1, r, k] = g

    # Step 4.1: diagonal discrimination (P: NW-SE, Q: NE-SW) at the R/B sites
    hpp = planes[1]  # the vertical / horizontal responses are no longer needed
    hpq = planes[2]
    for r in range(3, nr - 3):
        for k in range(3 + ((rb_col[(r + py) & 1] - 3) & 1), nc - 3, 2):
            p = (np.float64(cf[r - 3, k - 3]) - cf[r - 1, k - 1] - cf[r + 1, k + 1] + cf[r + 3, k + 3]
                 - 3.0 * (np.float64(cf[r - 2, k - 2]) + cf[r + 2, k + 2]) + 6.0 * cf[r, k])
            q = (np.float64(cf[r - 3, k + 3]) - cf[r - 1, k + 1] - cf[r + 1, k - 1] + cf[r + 3, k - 3]
                 - 3.0 * (np.float64(cf[r - 2, k + 2]) + cf[r + 2, k - 2]) + 6.0 * cf[r, k])
            hpp[r, k] = p * p
            hpq[r, k] = q * q
    pq = planes[5]
    for r in range(4, nr - 4):
        for k in range(4 + ((rb_col[(r + py) & 1] - 4) & 1), nc - 4, 2):
            sp = _RCD_EPSSQ + np.float64(hpp[r - 1, k - 1]) + hpp[r, k] + hpp[r + 1, k + 1]
            sq = _RCD_EPSSQ + np.float64(hpq[r - 1, k + 1]) + hpq[r, k] + hpq[r + 1, k - 1]
            pq[r, k] = sp / (sp + sq)

    # Step 4.2: the opposite colour at the R/B sites: own green plus the diagonal colour differences
    for r in range(7, nr - 7):
        for k in range(7 + ((rb_col[(r + py) & 1] - 7) & 1), nc - 7, 2):
            own = cmap[(r + py) & 1, k & 1]
            c = 2 - own
            col = rgb[c]
            grn = rgb[1]
            g0 = np.float64(grn[r, k])
            grad_nw = eps + abs(np.float64(col[r - 1, k - 1]) - col[r + 1, k + 1]) \
                + abs(np.float64(col[r - 1, k - 1]) - col[r - 3, k - 3]) + abs(g0 - grn[r - 2, k - 2])
            grad_ne = eps + abs(np.float64(col[r - 1, k + 1]) - col[r + 1, k - 1]) \
                + abs(np.float64(col[r - 1, k + 1]) - col[r - 3, k + 3]) + abs(g0 - grn[r - 2, k + 2])
            grad_sw = eps + abs(np.float64(col[r + 1, k - 1]) - col[r - 1, k + 1]) \
                + abs(np.float64(col[r + 1, k - 1]) - col[r + 3, k - 3]) + abs(g0 - grn[r + 2, k - 2])
            grad_se = eps + abs(np.float64(col[r + 1, k + 1]) - col[r - 1, k - 1]) \
                + abs(np.float64(col[r + 1, k + 1]) - col[r + 3, k + 3]) + abs(g0 - grn[r + 2, k + 2])
            d_nw = np.float64(col[r - 1, k - 1]) - grn[r - 1, k - 1]
            d_ne = np.float64(col[r - 1, k + 1]) - grn[r - 1, k + 1]
            d_sw = np.float64(col[r + 1, k - 1]) - grn[r + 1, k - 1]
            d_se = np.float64(col[r + 1, k + 1]) - grn[r + 1, k + 1]
            est_p = _blend(d_nw, d_se, grad_nw / (grad_nw + grad_se))
            est_q = _blend(d_ne, d_sw, grad_ne / (grad_ne + grad_sw))
            v = g0 + _blend(est_p, est_q, _refined(pq, r, k))
            if v != v:
                v = _bilinear_at(img, cmap, _reflect(y0 - pad + r, h), _reflect(k - pad, w), c)
            col[r, k] = v

    # Step 4.3: R and B at the G sites from the cardinal colour differences, mixed by the refined VH
    for r in range(pad, nr - pad):
        yy = y0 - pad + r
        for k in range(pad, nc - pad):
            if cmap[(r + py) & 1, k & 1] != 1:
                for c in range(3):
                    out[c, yy, k - pad] = rgb[c, r, k]
                continue
            grn = rgb[1]
            g0 = np.float64(grn[r, k])
            g_n = eps + abs(g0 - grn[r - 2, k])
            g_s = eps + abs(g0 - grn[r + 2, k])
            g_w = eps + abs(g0 - grn[r, k - 2])
            g_e = eps + abs(g0 - grn[r, k + 2])
            disc = _refined(vh, r, k)
            out[1, yy, k - pad] = g0
            for c in range(0, 3, 2):
                col = rgb[c]
                sn = abs(np.float64(col[r - 1, k]) - col[r + 1, k])
                ew = abs(np.float64(col[r, k - 1]) - col[r, k + 1])
                grad_n = g_n + sn + abs(np.float64(col[r - 1, k]) - col[r - 3, k])
                grad_s = g_s + sn + abs(np.float64(col[r + 1, k]) - col[r + 3, k])
                grad_w = g_w + ew + abs(np.float64(col[r, k - 1]) - col[r, k - 3])
                grad_e = g_e + ew + abs(np.float64(col[r, k + 1]) - col[r, k + 3])
                d_n = np.float64(col[r - 1, k]) - grn[r - 1, k]
                d_s = np.float64(col[r + 1, k]) - grn[r + 1, k]
                d_w = np.float64(col[r, k - 1]) - grn[r, k - 1]
                d_e = np.float64(col[r, k + 1]) - grn[r, k + 1]
                est_v = _blend(d_n, d_s, grad_n / (grad_n + grad_s))
                est_h = _blend(d_w, d_e, grad_w / (grad_w + grad_e))
                v = g0 + _blend(est_v, est_h, disc)
                if v != v:
                    v = _bilinear_at(img, cmap, yy, k - pad, c)
                out[c, yy, k - pad] = v


@njit(cache=True, nogil=True, parallel=True)
def _rcd(img: np.ndarray, cmap: np.ndarray, band_rows: int, chunks: int, out: np.ndarray) -> None:  # pragma: no cover
    """Bands of ``band_rows`` rows; each of ``chunks`` parallel tasks takes consecutive bands with one scratch."""
    h, w = img.shape
    nbands = (h + band_rows - 1) // band_rows
    per_chunk = (nbands + chunks - 1) // chunks
    for t in prange(chunks):
        planes = np.empty((6, band_rows + 2 * _RCD_PAD, w + 2 * _RCD_PAD), dtype=np.float32)
        rgb = np.empty((3, band_rows + 2 * _RCD_PAD, w + 2 * _RCD_PAD), dtype=np.float32)
        for b in range(t * per_chunk, min(nbands, (t + 1) * per_chunk)):
            y0 = b * band_rows
            _rcd_band(img, cmap, y0, min(h, y0 + band_rows), planes, rgb, out)

def debayer(cfa_image: np.ndarray, bayer: str, *, method: str = "bilinear") -> np.ndarray:
    """Interpolate a CFA frame into (3, H, W) float32 R, G, B (superpixel: (3, H/2, W/2)).

    Parameters
    ----------
    cfa_image : np.ndarray
        (H, W) calibrated CFA data (NaN = no data).
    bayer : str
        Effective pattern of ``cfa_image[0:2, 0:2]`` (RGGB, BGGR, GRBG, GBRG).
    method : str, optional
        "bilinear", "vng", "rcd" or "superpixel". Default is "bilinear".
    """
    if cfa_image.ndim != 2:
        raise StackwatchError(f"debayer needs a 2-D CFA image, got shape {cfa_image.shape}")
    cmap = channel_map(bayer)
    img = np.ascontiguousarray(cfa_image, dtype=np.float32)
    h, w = img.shape
    if method == "superpixel":
        out = np.empty((3, h // 2, w // 2), dtype=np.float32)
        _superpixel(img, cmap, out)
        return out
    if method not in DEBAYER_METHODS:
        raise StackwatchError(f"debayer method {method!r}: not one of {', '.join(DEBAYER_METHODS)}")
    out = np.empty((3, h, w), dtype=np.float32)
    if method == "rcd" and h > _RCD_PAD and w > _RCD_PAD:
        nbands = -(-h // _RCD_BAND_ROWS)
        _rcd(img, cmap, _RCD_BAND_ROWS, max(1, min(nbands, numba.get_num_threads())), out)
        return out
    _bilinear(img, cmap, out)
    if method == "vng" and h >= 5 and w >= 5:
        vng = out.copy()
        _vng(img, cmap, _DIRS, out, vng)
        return vng
    return out
