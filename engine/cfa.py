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
- ``superpixel``: each 2x2 tile -> one pixel (R, mean(G1, G2), B), output (3, H/2, W/2); a NaN green
  is ignored if the other is finite.
"""

from __future__ import annotations

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
DEBAYER_METHODS = ("bilinear", "vng", "superpixel")
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
            out[c, y, x] = s / n if n > 0.0 else np.nan
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


def debayer(cfa_image: np.ndarray, bayer: str, *, method: str = "bilinear") -> np.ndarray:
    """Interpolate a CFA frame into (3, H, W) float32 R, G, B (superpixel: (3, H/2, W/2)).

    Parameters
    ----------
    cfa_image : np.ndarray
        (H, W) calibrated CFA data (NaN = no data).
    bayer : str
        Effective pattern of ``cfa_image[0:2, 0:2]`` (RGGB, BGGR, GRBG, GBRG).
    method : str, optional
        "bilinear", "vng" or "superpixel". Default is "bilinear".
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
    _bilinear(img, cmap, out)
    if method == "vng" and h >= 5 and w >= 5:
        vng = out.copy()
        _vng(img, cmap, _DIRS, out, vng)
        return vng
    return out
