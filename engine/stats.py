"""Robust statistics and noise estimation (algorithms.md §1.1, §1.2).

Everything works on the finite values of its input (NaN = no data). Scales are Gaussian-consistent
standard deviations. The noise estimator is the multiresolution-support (MRS) method of Starck &
Murtagh (1998) as PixInsight implements it: a starlet (à trous, B3-spline) transform with mirror
borders, a significance support at 3 sigma per layer, and the standard deviation of the image minus
its large-scale layer over the pixels outside the support.

Public functions
----------------
sigma_mad, robust_location_scale, biweight_midvariance, iks_location_scale,
starlet_layer1, starlet_transform, ksigma_noise, mrs_noise, cfa_noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

__all__ = [
    "MRS_LAYER_NOISE",
    "NoiseEstimate",
    "biweight_midvariance",
    "cfa_noise",
    "iks_location_scale",
    "ksigma_noise",
    "mrs_noise",
    "qn_scale",
    "robust_location_scale",
    "sigma_mad",
    "sn_scale",
    "starlet_layer1",
    "starlet_transform",
]

#: 1/Phi^-1(0.75): MAD -> sigma for a normal distribution.
MAD_TO_SIGMA = 1.482602218505602
#: Noise of starlet layers 1..6 for unit Gaussian white noise (PCL values).
MRS_LAYER_NOISE = (0.8907, 0.2007, 0.0856, 0.0413, 0.0205, 0.0103)
_MRS_BIAS = 0.974  # PCL's 2 % bias correction of the MRS estimate
_K1 = np.float32(1.0 / 16.0)  # B3-spline taps as float32 constants (exact binary fractions)
_K4 = np.float32(4.0 / 16.0)
_K6 = np.float32(6.0 / 16.0)
_KSIGMA_SAMPLE_PX = 4_000_000  # the k-sigma start value uses every k-th row above this many pixels


@dataclass(frozen=True)
class NoiseEstimate:
    """A noise estimate: sigma (data units), the method that produced it and the fraction of pixels used.

    method is "MRS" (converged multiresolution support) or "KSIGMA" (fallback: k-sigma noise of the
    first starlet layer, scaled to the image); layers is the number of starlet layers used (0 for KSIGMA).
    """

    sigma: float
    method: str
    fraction: float
    layers: int
    iterations: int


# ---------------------------------------------------------------------------------------------
# location and scale


def _finite(x: np.ndarray | float) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


def sigma_mad(x: np.ndarray) -> float:
    """1.4826 * median(|x - median(x)|) over the finite values of x; NaN when there are none."""
    a = _finite(x)
    if a.size == 0:
        return math.nan
    m = float(np.median(a))
    return float(MAD_TO_SIGMA * np.median(np.abs(a - m)))


def robust_location_scale(x: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826*MAD) of the finite values of x; (NaN, NaN) when there are none."""
    a = _finite(x)
    if a.size == 0:
        return math.nan, math.nan
    m = float(np.median(a))
    return m, float(MAD_TO_SIGMA * np.median(np.abs(a - m)))


def biweight_midvariance(x: np.ndarray, *, c: float = 9.0, location: float | None = None) -> float:
    """Biweight midvariance of the finite values of x (§1.1), as astropy's default.

    u = (x - M)/(c*MAD) with M = ``location`` (default: the median) and MAD taken about the median;
    BWMV = n*sum((x-M)^2 (1-u^2)^4) / (sum((1-u^2)(1-5u^2)))^2 over |u| < 1 with n = all finite
    samples (astropy's modify_sample_size=False). MAD = 0 returns 0; no finite value returns NaN.
    Default c is 9.0.
    """
    a = _finite(x)
    if a.size == 0:
        return math.nan
    med = float(np.median(a))
    mad = float(np.median(np.abs(a - med)))
    m = med if location is None else float(location)
    return _bwmv(a, m, mad, c)


def _bwmv(a: np.ndarray, m: float, mad: float, c: float) -> float:
    if mad == 0.0:
        return 0.0
    d = a - m
    u2 = (d / (c * mad)) ** 2
    sel = u2 < 1.0
    num = a.size * float(np.sum((d[sel] ** 2) * (1.0 - u2[sel]) ** 4))
    den = float(np.sum((1.0 - u2[sel]) * (1.0 - 5.0 * u2[sel]))) ** 2
    return num / den if den > 0 else math.nan


_QN_SMALL = {2: 0.399, 3: 0.994, 4: 0.512, 5: 0.844, 6: 0.611, 7: 0.857, 8: 0.669, 9: 0.872}


def sn_scale(x: np.ndarray) -> float:
    """Rousseeuw-Croux Sn = c_n*1.1926*lomed_i himed_j |x_i - x_j| of the finite values (§1.1).

    50 % breakdown, 58 % Gaussian efficiency, no location needed; RC93 small-sample factors.
    O(n log n) after sorting. Fewer than 2 values: NaN.
    """
    from stackwatch.engine.reject import _sn_sorted

    a = np.sort(_finite(x))
    if a.size < 2:
        return math.nan
    return float(_sn_sorted(a, 0, a.size, np.empty(a.size)))


def qn_scale(x: np.ndarray, *, max_samples: int = 4000) -> float:
    """Rousseeuw-Croux Qn = d_n*2.2219*{|x_i - x_j|, i < j}_(k), k = C(h, 2), h = n//2 + 1 (§1.1).

    82 % Gaussian efficiency. Brute force O(n^2): above ``max_samples`` finite values (default 4000)
    an evenly spaced subsample of the sorted values is used. Fewer than 2 values: NaN.
    """
    a = np.sort(_finite(x))
    if a.size > max_samples:
        a = a[np.linspace(0, a.size - 1, max_samples).round().astype(np.int64)]
    n = a.size
    if n < 2:
        return math.nan
    i, j = np.triu_indices(n, k=1)
    d = np.abs(a[i] - a[j])
    h = n // 2 + 1
    k = h * (h - 1) // 2
    q = float(np.partition(d, k - 1)[k - 1])
    if n < 10:
        dn = _QN_SMALL[n]
    elif n % 2:
        dn = n / (n + 1.4)
    else:
        dn = n / (n + 3.8)
    return dn * 2.2219 * q


def iks_location_scale(x: np.ndarray, *, tolerance: float = 1e-6, max_iterations: int = 100) -> tuple[float, float]:
    """Iterative k-sigma location and scale (IKSS, PixInsight's normalisation estimator, §1.1).

    Keeps 0 < x < 1, then iterates: m = median of the current range, s = sqrt(BWMV(m, MAD));
    stops when (s0 - s)/s0 < ``tolerance`` (default 1e-6) and returns (m, 0.991*s); else the range
    becomes [m - 4s, m + 4s]. No usable value returns (NaN, NaN); a constant sample returns (m, 0).
    """
    a = _finite(x)
    a = np.sort(a[(a > 0.0) & (a < 1.0)])
    if a.size == 0:
        return math.nan, math.nan
    lo, hi = 0, a.size
    s0 = 0.0
    m = math.nan
    for it in range(max_iterations):
        cur = a[lo:hi]
        if cur.size == 0:
            break
        m = float(np.median(cur))
        mad = float(np.median(np.abs(cur - m)))
        s = math.sqrt(_bwmv(cur, m, mad, 9.0)) if mad > 0 else 0.0
        if s == 0.0:
            return m, 0.0
        if it > 0 and (s0 - s) / s0 < tolerance:
            return m, 0.991 * s
        s0 = s
        lo = int(np.searchsorted(a, m - 4.0 * s, side="left"))
        hi = int(np.searchsorted(a, m + 4.0 * s, side="right"))
    return m, 0.991 * s0


# ---------------------------------------------------------------------------------------------
# starlet transform


@njit(cache=True, nogil=True)
def _mirror(i: int, n: int) -> int:
    if n == 1:
        return 0
    while i < 0 or i >= n:
        if i < 0:
            i = -i
        if i >= n:
            i = 2 * (n - 1) - i
    return i


@njit(cache=True, nogil=True, parallel=True)
def _b3_rows(src: np.ndarray, dst: np.ndarray, step: int) -> None:
    """Horizontal B3 pass with taps ``step`` apart, mirror borders."""
    h, w = src.shape
    x_lo = min(2 * step, w)
    x_hi = max(w - 2 * step, x_lo)
    for y in prange(h):
        for x in range(x_lo):
            acc = 0.0
            for k in range(5):
                c = 1.0 if (k == 0 or k == 4) else (4.0 if (k == 1 or k == 3) else 6.0)
                acc += c * src[y, _mirror(x + (k - 2) * step, w)]
            dst[y, x] = acc / 16.0
        # shifted views indexed by k >= 0: no negative-index wraparound test, so the loop vectorises
        m = x_hi - x_lo
        a0 = src[y, x_lo - 2 * step : x_hi - 2 * step]
        a1 = src[y, x_lo - step : x_hi - step]
        a2 = src[y, x_lo:x_hi]
        a3 = src[y, x_lo + step : x_hi + step]
        a4 = src[y, x_lo + 2 * step : x_hi + 2 * step]
        d = dst[y, x_lo:x_hi]
        for k in range(m):
            d[k] = (a0[k] + a4[k]) * _K1 + (a1[k] + a3[k]) * _K4 + a2[k] * _K6
        for x in range(x_hi, w):
            acc = 0.0
            for k in range(5):
                c = 1.0 if (k == 0 or k == 4) else (4.0 if (k == 1 or k == 3) else 6.0)
                acc += c * src[y, _mirror(x + (k - 2) * step, w)]
            dst[y, x] = acc / 16.0


@njit(cache=True, nogil=True, parallel=True)
def _b3_cols(src: np.ndarray, dst: np.ndarray, step: int) -> None:
    """Vertical B3 pass with taps ``step`` apart, mirror borders (row-contiguous access)."""
    h, w = src.shape
    for y in prange(h):
        y0 = _mirror(y - 2 * step, h)
        y1 = _mirror(y - step, h)
        y3 = _mirror(y + step, h)
        y4 = _mirror(y + 2 * step, h)
        for x in range(w):
            dst[y, x] = (src[y0, x] + src[y4, x]) * _K1 + (src[y1, x] + src[y3, x]) * _K4 + src[y, x] * _K6


@njit(cache=True, nogil=True, parallel=True)
def _layer_update(c_prev: np.ndarray, c_next: np.ndarray, ratio: np.ndarray, inv_noise: float) -> None:
    """ratio = max(ratio, |c_prev - c_next| / layer_noise)."""
    h, w = c_prev.shape
    for y in prange(h):
        for x in range(w):
            r = abs(c_prev[y, x] - c_next[y, x]) * inv_noise
            if r > ratio[y, x]:
                ratio[y, x] = r


@njit(cache=True, nogil=True, parallel=True)
def _sub(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    h, w = a.shape
    for y in prange(h):
        for x in range(w):
            out[y, x] = a[y, x] - b[y, x]


@njit(cache=True, nogil=True, parallel=True)
def _masked_moments(
    values: np.ndarray, valid: np.ndarray, ratio: np.ndarray, thr: float, center: float, clip: float
) -> tuple[float, float, float]:
    """Count, sum and sum of squares of values where valid and ratio <= thr and |v - center| < clip.

    Per-row partial sums, then a serial reduction: deterministic for any thread count.
    """
    h, w = values.shape
    cnt = np.zeros(h)
    s1 = np.zeros(h)
    s2 = np.zeros(h)
    for y in prange(h):
        c = 0.0
        a = 0.0
        b = 0.0
        for x in range(w):
            if valid[y, x] and ratio[y, x] <= thr:
                v = values[y, x]
                if abs(v - center) < clip:
                    d = v - center
                    c += 1.0
                    a += d
                    b += d * d
        cnt[y] = c
        s1[y] = a
        s2[y] = b
    n = 0.0
    t1 = 0.0
    t2 = 0.0
    for y in range(h):
        n += cnt[y]
        t1 += s1[y]
        t2 += s2[y]
    return n, t1, t2


def _as_plane(image: np.ndarray, name: str = "image") -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (H, W), got shape {a.shape}")
    return a


def _filled(image: np.ndarray, dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """C-contiguous copy with NaN replaced by the median of the finite values, and the finite map."""
    data: np.ndarray = np.array(image, dtype=dtype, order="C")
    finite = np.isfinite(data)
    if not finite.all():
        fill = float(np.median(data[finite])) if finite.any() else 0.0
        data[~finite] = fill
    return data, finite


def _smooth(c: np.ndarray, tmp: np.ndarray, out: np.ndarray, step: int) -> None:
    _b3_rows(c, tmp, step)
    _b3_cols(tmp, out, step)


def starlet_transform(image: np.ndarray, *, layers: int = 4) -> tuple[list[np.ndarray], np.ndarray]:
    """Starlet (à trous, B3-spline) transform with mirror borders: ([w_1..w_J], c_J), float64.

    image = sum(w_j) + c_J exactly (up to rounding). NaN pixels are filled with the median of the
    finite pixels first. Default ``layers`` is 4.
    """
    data, _ = _filled(_as_plane(image))
    c = data
    tmp = np.empty_like(data)
    ws: list[np.ndarray] = []
    for j in range(layers):
        nxt = np.empty_like(data)
        _smooth(c, tmp, nxt, 1 << j)
        w = np.empty_like(data)
        _sub(c, nxt, w)
        ws.append(w)
        c = nxt
    return ws, c


def starlet_layer1(image: np.ndarray) -> np.ndarray:
    """First starlet layer w_1 = I - B3*I (float32, mirror borders; NaN stays NaN)."""
    a = _as_plane(image)
    data, finite = _filled(a)
    tmp = np.empty_like(data)
    c1 = np.empty_like(data)
    _smooth(data, tmp, c1, 1)
    w1 = (data - c1).astype(np.float32)
    w1[~finite] = np.nan
    return w1


@njit(cache=True, nogil=True)
def _ksigma_core(values: np.ndarray, valid: np.ndarray, k: float, tol: float, iters: int) -> float:  # pragma: no cover
    ones = np.zeros(values.shape, dtype=np.float32)  # ratio 0 everywhere: no support
    n, s1, s2 = _masked_moments(values, valid, ones, 1.0, 0.0, np.inf)
    if n < 2:
        return math.nan
    mean = s1 / n
    sigma = math.sqrt(max(s2 / n - mean * mean, 0.0))
    for _ in range(iters):
        if sigma == 0.0:
            return 0.0
        n, s1, s2 = _masked_moments(values, valid, ones, 1.0, mean, k * sigma)
        if n < 2:
            break
        d = s1 / n
        new_mean = mean + d
        new_sigma = math.sqrt(max(s2 / n - d * d, 0.0))
        change = abs(new_sigma - sigma) / sigma
        mean, sigma = new_mean, new_sigma
        if change < tol:
            break
    return sigma


def _ksigma(values: np.ndarray, valid: np.ndarray, *, k: float = 3.0, tol: float = 0.01, iters: int = 10) -> float:
    return float(_ksigma_core(values, valid, float(k), float(tol), int(iters)))


def ksigma_noise(layer: np.ndarray, *, k: float = 3.0) -> float:
    """Standard deviation of ``layer`` iteratively clipped at k sigma about its mean (default k = 3).

    Stops when the relative change is below 0.01 or after 10 iterations (PCL's k-sigma noise);
    NaN values are ignored. Unscaled: divide by MRS_LAYER_NOISE[0] for the noise of the image
    whose first starlet layer this is.
    """
    a = np.ascontiguousarray(_as_plane(layer), dtype=np.float64)
    valid = np.isfinite(a)
    return _ksigma(a, valid, k=k)


def _central(a: np.ndarray, window_px: int | None) -> np.ndarray:
    if window_px is None:
        return a
    h, w = a.shape
    wh, ww = min(window_px, h), min(window_px, w)
    y0, x0 = (h - wh) // 2, (w - ww) // 2
    return a[y0 : y0 + wh, x0 : x0 + ww]


def mrs_noise(
    image: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    layers: int = 4,
    window_px: int | None = None,
    valid_range: tuple[float, float] = (-math.inf, 0.99998),
    min_fraction: float = 0.01,
    max_iterations: int = 17,
    tolerance: float = 1e-4,
) -> NoiseEstimate:
    """Multiresolution-support noise estimate of a 2-D image (§1.2).

    Parameters
    ----------
    image : (H, W) array; NaN = no data.
    mask : bool (H, W), True = excluded (saturated, defects). Default is None.
    layers : starlet layers J. Default is 4; when the support does not converge or leaves less than
        ``min_fraction`` of the pixels, J = 3 then 2 are tried, then the k-sigma value (method "KSIGMA").
    window_px : estimate on the central window of this size (e.g. 2048 for the live path on 26 MP).
        Default is None (whole image).
    valid_range : pixels outside (low, high) are never noise pixels. Default (-inf, 0.99998): near
        saturation is excluded; PCL also drops I <= 2e-5 because PixInsight truncates calibrated data
        at 0, but stackwatch keeps negatives, and a lower bound would cut the lower half of the noise
        of a dark (narrowband, bias-subtracted) background and bias sigma low. Pass (2e-5, 0.99998)
        for PCL's exact rule on data truncated at 0.
    min_fraction : smallest accepted noise-set fraction. Default is 0.01.
    max_iterations, tolerance : support iteration limits. Defaults 17 and 1e-4 (relative change).

    Returns
    -------
    NoiseEstimate with sigma already divided by 0.974 (PCL's bias correction) for MRS.
    """
    a = _central(_as_plane(image), window_px)
    data, finite = _filled(a, np.float32)
    lo, hi = valid_range
    valid = finite & (data > lo) & (data < hi)
    if mask is not None:
        m = _central(_as_plane(np.asarray(mask, dtype=bool), "mask"), window_px)
        if m.shape != a.shape:
            raise ValueError(f"mask shape {m.shape} differs from image shape {a.shape}")
        valid &= ~m
    total = int(valid.sum())
    if total < 16:
        return NoiseEstimate(math.nan, "KSIGMA", 0.0, 0, 0)
    stride = max(1, data.size // _KSIGMA_SAMPLE_PX)  # start value: a row subsample is plenty
    # one nogil call for the whole estimate: stars.measure runs it in a thread while sep (which holds
    # the GIL) extracts, and Python glue between kernels would stall it for the length of a sep call
    sigma, n, nl, it = _mrs_core(data, valid, stride, max(layers, 2), max_iterations, tolerance, float(total),
                                 min_fraction)
    if nl > 0:
        return NoiseEstimate(sigma / _MRS_BIAS, "MRS", n / total, nl, it)
    return NoiseEstimate(sigma, "KSIGMA", 1.0, 0, 0)


@njit(cache=True, nogil=True)
def _smooth_core(c: np.ndarray, tmp: np.ndarray, out: np.ndarray, step: int) -> None:  # pragma: no cover
    _b3_rows(c, tmp, step)
    _b3_cols(tmp, out, step)


@njit(cache=True, nogil=True)
def _mrs_core(
    data: np.ndarray, valid: np.ndarray, stride: int, layers: int, max_iterations: int, tolerance: float,
    total: float, min_fraction: float,
) -> tuple[float, float, int, int]:  # pragma: no cover - numba
    """(sigma before the bias correction, noise-set size, layers, iterations) of the first accepted
    support iteration for J = layers .. 2; layers 0 = none accepted, sigma is then the k-sigma value."""
    tmp = np.empty_like(data)
    c1 = np.empty_like(data)
    _smooth_core(data, tmp, c1, 1)
    _sub(data, c1, tmp)
    w1_sample = np.ascontiguousarray(tmp[::stride])
    sigma_k = _ksigma_core(w1_sample, np.ascontiguousarray(valid[::stride]), 3.0, 0.01, 10) / MRS_LAYER_NOISE[0]
    ratio = np.empty_like(data)
    plane_a = np.empty_like(data)
    plane_b = np.empty_like(data)
    for nl in range(layers, 1, -1):
        ok, sigma, n, it = _mrs_try(data, c1, valid, tmp, ratio, plane_a, plane_b, nl, sigma_k, max_iterations,
                                    tolerance)
        if ok and n / total >= min_fraction:
            return sigma, n, nl, it
    return sigma_k, 0.0, 0, 0


@njit(cache=True, nogil=True)
def _mrs_try(
    data: np.ndarray,
    c1: np.ndarray,
    valid: np.ndarray,
    tmp: np.ndarray,
    ratio: np.ndarray,
    plane_a: np.ndarray,
    plane_b: np.ndarray,
    layers: int,
    sigma0: float,
    max_iterations: int,
    tolerance: float,
) -> tuple[bool, float, float, int]:  # pragma: no cover - numba
    """Support iteration with ``layers`` starlet layers: (converged, sigma, noise-set size, iterations).

    c1 is the first smoothing of data (kept intact for retries); tmp, ratio, plane_a and plane_b are
    scratch planes of data's shape.
    """
    ratio[:, :] = 0.0
    _layer_update(data, c1, ratio, 1.0 / MRS_LAYER_NOISE[0])
    prev = c1
    for j in range(1, layers):
        out = plane_a if j % 2 == 1 else plane_b
        _smooth_core(prev, tmp, out, 1 << j)
        _layer_update(prev, out, ratio, 1.0 / MRS_LAYER_NOISE[j])
        prev = out
    resid = tmp
    _sub(data, prev, resid)  # I - c_J
    sigma = sigma0
    for it in range(1, max_iterations + 1):
        if not (sigma > 0.0):
            return False, sigma, 0.0, it
        n, s1, s2 = _masked_moments(resid, valid, ratio, 3.0 * sigma, 0.0, np.inf)
        if n < 2:
            return False, sigma, n, it
        mean = s1 / n
        new = math.sqrt(max((s2 - n * mean * mean) / (n - 1.0), 0.0))
        change = abs(new - sigma) / sigma
        sigma = new
        if change < tolerance:
            return True, sigma, n, it
    return False, sigma, 0.0, max_iterations


_CFA_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")


def cfa_noise(image: np.ndarray, bayer: str, **kwargs: object) -> dict[str, float]:
    """MRS noise per CFA colour from the four sub-lattices of a raw CFA frame (§1.2).

    Returns {"R", "G", "B", "G1", "G2"}: G = sqrt((G1^2 + G2^2)/2), G1 the green of the first row.
    ``bayer`` is the 2x2 pattern of image[0:2, 0:2] (RGGB, BGGR, GRBG, GBRG); keyword arguments go
    to mrs_noise. Never use on debayered data (interpolated pixels carry correlated, reduced noise).
    """
    pat = bayer.upper()
    if pat not in _CFA_PATTERNS:
        raise ValueError(f"unknown Bayer pattern {bayer!r}: expected one of {', '.join(_CFA_PATTERNS)}")
    a = _as_plane(image)
    mask = kwargs.pop("mask", None)
    out: dict[str, float] = {}
    greens: list[float] = []
    for k, colour in enumerate(pat):
        dy, dx = divmod(k, 2)
        sub = np.ascontiguousarray(a[dy::2, dx::2])
        sub_mask = None if mask is None else np.ascontiguousarray(np.asarray(mask)[dy::2, dx::2])
        sigma = mrs_noise(sub, mask=sub_mask, **kwargs).sigma  # type: ignore[arg-type]
        if colour == "G":
            greens.append(sigma)
            out[f"G{len(greens)}"] = sigma
        else:
            out[colour] = sigma
    out["G"] = math.sqrt((greens[0] ** 2 + greens[1] ** 2) / 2.0)
    return out
