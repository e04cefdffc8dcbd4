"""Pixel rejection algorithms for integration (algorithms.md §7.3, §7.5).

Every algorithm has the same numba signature (the §7.3 signature plus a caller-owned scratch
buffer, so that nothing is allocated per pixel)::

    reject_<name>(values: float32[n], weights: float32[n], params: float64[:],
                  mask: uint8[n], work: float64[6, n]) -> int   # kept count

``mask`` in: 0 candidate, 3 invalid (NaN, saturated, excluded), 2 already rejected high (large-scale
rejection); out: 0 keep, 1 rejected low, 2 rejected high, 3 invalid. Non-finite candidates become 3.
Weights are accepted for uniformity and ignored (as PixInsight's rejectors; the mean uses them).

The candidates are copied into ``work`` and stable-sorted by value, i.e. by (value, frame index),
so ties are broken deterministically. As in PixInsight, every algorithm rejects from the ends of
the sorted set, stopping at the first sample inside the limits; the algorithm core therefore only
returns the kept range [lo, hi) of the sorted set and one shared routine writes the mask.

``params`` is a float64 array whose layout is given per algorithm by ``REJECTIONS[name].param_names``;
build it with ``REJECTIONS[name].pack(mapping, n_max=N)`` (ESD appends its table of critical values).

Registry: ``REJECTIONS`` (name -> Rejection). Convenience: ``reject(values, name=..., params=...)``
for one stack (N,) or a cube (N, ...) without numba in the caller. ``auto_rejection(n)`` is §7.5.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import njit, prange
from stackwatch.engine.errors import StackwatchError

__all__ = [
    "FLOOR_SIZE",
    "HIGH",
    "INVALID",
    "KEEP",
    "LOW",
    "NO_FLOOR",
    "REJECTIONS",
    "Rejection",
    "auto_rejection",
    "describe",
    "esd_critical_values",
    "get_rejection",
    "reject",
    "reject_averaged_sigma",
    "reject_esd",
    "reject_linear_fit",
    "reject_mad",
    "reject_minmax",
    "reject_none",
    "reject_percentile",
    "reject_range",
    "reject_sigma",
    "reject_winsorized",
    "run_rejection",
]

KEEP = 0
LOW = 1
HIGH = 2
INVALID = 3
WORK_ROWS = 6

# ---------------------------------------------------------------------------------------------
# shared helpers (numba)


@njit(cache=True, nogil=True)
def _merge_sort(n: int, work: np.ndarray) -> None:
    """Stable bottom-up merge sort of (work[0,:n] values, work[1,:n] frame index) by value.

    Uses rows 2 and 3 as the buffer. Stable on input in frame order = sorted by (value, index).
    """
    # insertion sort runs of 16
    run = 16
    for start in range(0, n, run):
        end = min(start + run, n)
        for i in range(start + 1, end):
            v = work[0, i]
            ix = work[1, i]
            j = i - 1
            while j >= start and work[0, j] > v:
                work[0, j + 1] = work[0, j]
                work[1, j + 1] = work[1, j]
                j -= 1
            work[0, j + 1] = v
            work[1, j + 1] = ix
    width = run
    src = 0
    while width < n:
        dst = 2 if src == 0 else 0
        for left in range(0, n, 2 * width):
            mid = min(left + width, n)
            right = min(left + 2 * width, n)
            i = left
            j = mid
            k = left
            while i < mid and j < right:
                if work[src, j] < work[src, i]:
                    work[dst, k] = work[src, j]
                    work[dst + 1, k] = work[src + 1, j]
                    j += 1
                else:
                    work[dst, k] = work[src, i]
                    work[dst + 1, k] = work[src + 1, i]
                    i += 1
                k += 1
            while i < mid:
                work[dst, k] = work[src, i]
                work[dst + 1, k] = work[src + 1, i]
                i += 1
                k += 1
            while j < right:
                work[dst, k] = work[src, j]
                work[dst + 1, k] = work[src + 1, j]
                j += 1
                k += 1
        src = dst
        width *= 2
    if src != 0:
        for k in range(n):
            work[0, k] = work[2, k]
            work[1, k] = work[3, k]


@njit(cache=True, nogil=True)
def _gather(values: np.ndarray, mask: np.ndarray, work: np.ndarray) -> int:
    """Copy the candidates (mask 0, finite) into work rows 0/1 sorted by (value, index)."""
    n = 0
    for i in range(values.shape[0]):
        if mask[i] == KEEP:
            v = values[i]
            if math.isfinite(v):
                work[0, n] = v
                work[1, n] = i
                n += 1
            else:
                mask[i] = INVALID
    _merge_sort(n, work)
    return n


@njit(cache=True, nogil=True)
def _finish(n: int, lo: int, hi: int, mask: np.ndarray, work: np.ndarray) -> int:
    for k in range(lo):
        mask[int(work[1, k])] = LOW
    for k in range(hi, n):
        mask[int(work[1, k])] = HIGH
    return hi - lo


@njit(cache=True, nogil=True)
def _median_sorted(s: np.ndarray, lo: int, hi: int) -> float:
    n = hi - lo
    m = lo + n // 2
    if n % 2 == 1:
        return s[m]
    return 0.5 * (s[m - 1] + s[m])


@njit(cache=True, nogil=True)
def _mean_std(s: np.ndarray, lo: int, hi: int, ddof: int) -> tuple[float, float]:
    n = hi - lo
    acc = 0.0
    for k in range(lo, hi):
        acc += s[k]
    mean = acc / n
    ss = 0.0
    for k in range(lo, hi):
        d = s[k] - mean
        ss += d * d
    if n - ddof <= 0:
        return mean, 0.0
    return mean, math.sqrt(ss / (n - ddof))


@njit(cache=True, nogil=True)
def _select(buf: np.ndarray, n: int, k: int) -> float:
    """k-th smallest (0-based) of buf[0:n], reordering buf (Hoare quickselect, median of 3)."""
    left = 0
    right = n - 1
    while right > left:
        mid = (left + right) // 2
        a = buf[left]
        b = buf[mid]
        c = buf[right]
        if a < b:
            pivot = b if b < c else (c if a < c else a)
        else:
            pivot = a if a < c else (c if b < c else b)
        i = left
        j = right
        while i <= j:
            while buf[i] < pivot:
                i += 1
            while buf[j] > pivot:
                j -= 1
            if i <= j:
                t = buf[i]
                buf[i] = buf[j]
                buf[j] = t
                i += 1
                j -= 1
        if k <= j:
            right = j
        elif k >= i:
            left = i
        else:
            return buf[k]
    return buf[k]


@njit(cache=True, nogil=True)
def _median_buf(buf: np.ndarray, n: int) -> float:
    """Median of buf[0:n] (mean of the two middle values for even n), reordering buf."""
    if n % 2 == 1:
        return _select(buf, n, n // 2)
    a = _select(buf, n, n // 2 - 1)
    b = buf[n // 2]
    for k in range(n // 2 + 1, n):
        if buf[k] < b:
            b = buf[k]
    return 0.5 * (a + b)


@njit(cache=True, nogil=True)
def _kth_union(s: np.ndarray, c: float, lo: int, hi: int, a: int, k: int) -> float:
    """k-th smallest (1-based) of {c - s[j] : lo <= j < a} U {s[j] - c : a <= j < hi}.

    s is sorted with s[a-1] <= c <= s[a], so both sets are ascending sequences
    A_t = c - s[a-1-t] and B_u = s[a+u] - c; binary search on how many come from A (O(log n)).
    """
    p = a - lo
    q = hi - a
    t_lo = max(0, k - q)
    t_hi = min(k, p)
    while t_lo < t_hi:
        t = (t_lo + t_hi) // 2
        u = k - t
        if u > 0 and (c - s[a - 1 - t]) < (s[a + u - 1] - c):
            t_lo = t + 1
        else:
            t_hi = t
    t = t_lo
    u = k - t
    val = -math.inf
    if t > 0:
        val = c - s[a - t]
    if u > 0:
        bu = s[a + u - 1] - c
        if bu > val:
            val = bu
    return val


@njit(cache=True, nogil=True)
def _mad_sorted(s: np.ndarray, lo: int, hi: int, c: float) -> float:
    """median(|s - c|) over the sorted range (np.median convention for even counts)."""
    n = hi - lo
    a = lo
    while a < hi and s[a] < c:
        a += 1
    if n % 2 == 1:
        return _kth_union(s, c, lo, hi, a, n // 2 + 1)
    return 0.5 * (_kth_union(s, c, lo, hi, a, n // 2) + _kth_union(s, c, lo, hi, a, n // 2 + 1))


_SN_SMALL = np.array([0.0, 0.0, 0.743, 1.851, 0.954, 1.351, 0.993, 1.198, 1.005, 1.131])


@njit(cache=True, nogil=True)
def _sn_sorted(s: np.ndarray, lo: int, hi: int, buf: np.ndarray) -> float:
    """Rousseeuw-Croux Sn = c_n * 1.1926 * lomed_i himed_j |x_i - x_j| of the sorted range.

    himed over the n distances (self included) = rank n//2 + 1; lomed = rank (n + 1)//2.
    Small-sample factors of RC93 for n < 10, n/(n - 0.9) for odd n >= 10. ``buf`` holds n values.
    """
    n = hi - lo
    if n < 2:
        return 0.0
    for i in range(lo, hi):
        buf[i - lo] = _kth_union(s, s[i], lo, hi, i, n // 2 + 1)
    med = _select(buf, n, (n + 1) // 2 - 1)
    if n < 10:
        cn = _SN_SMALL[n]
    elif n % 2 == 1:
        cn = n / (n - 0.9)
    else:
        cn = 1.0
    return cn * 1.1926 * med


@njit(cache=True, nogil=True)
def _clip_ends(s: np.ndarray, lo: int, hi: int, low_lim: float, high_lim: float) -> tuple[int, int]:
    """Move lo/hi inwards over samples strictly below low_lim / strictly above high_lim."""
    while lo < hi and s[lo] < low_lim:
        lo += 1
    while hi > lo and s[hi - 1] > high_lim:
        hi -= 1
    return lo, hi


# Noise floor (stackwatch's improvement on §7.3, see FLOOR_* below): a per-pixel lower bound on the
# σ a rejector tests against, from the frames' noise model (§10):
#     σ_floor²(c) = a + (b + ε²·s)·s,   s = max(0, c − background)
# floor = (a, b, ε², background, κ_low, κ_high); a < 0 disables it. With few frames the sample σ
# scatters widely (at n = 6 it is below 0.7σ one time in six), so a clean sample beyond κ·(sample σ)
# is common: PI's winsorized clipping rejects 0.5-1.6 % of clean samples at n = 6-24 where 0.13 % is
# expected. The floor restores the expected rate, and its ε·s term keeps star cores of the sharpest
# frames (seeing differences are signal, not outliers) — the same model the live stack uses, so live
# and batch decide alike. κ_low/κ_high are used only by rejectors without a σ (percentile): they
# reject a sample only when it is also beyond κ·σ_floor.
FLOOR_SIZE = 6
NO_FLOOR = np.array([-1.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=np.float64)


@njit(cache=True, nogil=True, inline="always")
def _floor_sd(floor: np.ndarray, c: float) -> float:
    if floor[0] < 0.0:
        return 0.0
    sig = c - floor[3]
    if not (sig > 0.0):
        sig = 0.0
    v = floor[0] + (floor[1] + floor[2] * sig) * sig
    return math.sqrt(v) if v > 0.0 else 0.0


@njit(cache=True, nogil=True, inline="always")
def quiet_count(values: np.ndarray, mask: np.ndarray, floor: np.ndarray, kappa: float) -> int:
    """The number of candidates (mask KEEP) when they all lie within kappa·σ_floor(lowest) of each
    other, else -1. A rejector whose σ the floor bounds from below (`quiet_kappa`) rejects nothing
    from such candidates: its centre lies between the lowest and the highest, and the floor grows
    with the signal. Callers skip the rejector there (its sort and iterations cost ~0.1-0.3 µs a
    pixel; most pixels of a small stack are quiet)."""
    if not (kappa > 0.0) or floor[0] < 0.0:
        return -1
    vmin = np.inf
    vmax = -np.inf
    m = 0
    for i in range(values.shape[0]):
        if mask[i] == KEEP:
            vmin = min(vmin, values[i])
            vmax = max(vmax, values[i])
            m += 1
    if m > 0 and vmax - vmin < kappa * _floor_sd(floor, vmin):
        return m
    return -1


def quiet_kappa(code: int, params: np.ndarray, floor_kappas: tuple[float, float]) -> float:
    """The κ of `quiet_count` for the rejector with registry code `code` and packed `params`, 0 for
    rejectors whose σ the floor does not bound (floor_kappas: the floor's κ_low, κ_high, which
    percentile tests against). 0.999 keeps the shortcut clear of the rejectors' own rounding."""
    if code == REJECTIONS["percentile"].code:
        return 0.999 * min(floor_kappas)
    if code in (REJECTIONS["sigma"].code, REJECTIONS["winsorized"].code):
        return 0.999 * min(float(params[0]), float(params[1]))
    return 0.0


# ---------------------------------------------------------------------------------------------
# algorithm cores: sorted s = work[0, :n] -> kept range (lo, hi)


@njit(cache=True, nogil=True)
def _core_minmax(n: int, params: np.ndarray, work: np.ndarray, floor: np.ndarray) -> tuple[int, int]:
    kl = int(params[0])
    kh = int(params[1])
    if n < kl + kh + 2:
        return 0, n
    return kl, n - kh


@njit(cache=True, nogil=True)
def _core_percentile(n: int, params: np.ndarray, work: np.ndarray, floor: np.ndarray) -> tuple[int, int]:
    s = work[0]
    if n < 2:
        return 0, n
    m = _median_sorted(s, 0, n)
    if not (m > 0.0):
        return 0, n
    fsd = _floor_sd(floor, m)
    lo = 0
    hi = n
    while lo < hi and (m - s[lo]) / m > params[0] and m - s[lo] > floor[4] * fsd:
        lo += 1
    while hi > lo and (s[hi - 1] - m) / m > params[1] and s[hi - 1] - m > floor[5] * fsd:
        hi -= 1
    return lo, hi


@njit(cache=True, nogil=True)
def _core_sigma(n: int, params: np.ndarray, work: np.ndarray, floor: np.ndarray) -> tuple[int, int]:
    """params: kl, kh, centre (0 median, 1 mean), ddof, maxiters (0 = until stable), min_n."""
    s = work[0]
    kl = params[0]
    kh = params[1]
    use_mean = params[2] != 0.0
    ddof = int(params[3])
    maxiters = int(params[4])
    min_n = int(params[5])
    lo = 0
    hi = n
    it = 0
    while hi - lo > 0 and hi - lo >= min_n:
        if maxiters > 0 and it >= maxiters:
            break
        mean, sd = _mean_std(s, lo, hi, ddof)
        c = mean if use_mean else _median_sorted(s, lo, hi)
        sd = max(sd, _floor_sd(floor, c))
        nlo, nhi = _clip_ends(s, lo, hi, c - sd * kl, c + sd * kh)
        it += 1
        if nlo == lo and nhi == hi:
            break
        lo = nlo
        hi = nhi
    return lo, hi


@njit(cache=True, nogil=True)
def _core_mad(n: int, params: np.ndarray, work: np.ndarray, floor: np.ndarray) -> tuple[int, int]:
    """Siril-style MAD clipping: c = median, scale = 1.4826*MAD; iterate while rejecting and n > 3."""
    s = work[0]
    lo = 0
    hi = n
    while hi - lo > 3:
        c = _median_sorted(s, lo, hi)
        sd = max(1.482602218505602 * _mad_sorted(s, lo, hi, c), _floor_sd(floor, c))
        if sd <= 0.0:
            break
        nlo, nhi = _clip_ends(s, lo, hi, c - sd * params[0], c + sd * params[1])
        if nlo == lo and nhi == hi:
            break
        lo = nlo
        hi = nhi
    return lo, hi


@njit(cache=True, nogil=True)
def _winsorize(s: np.ndarray, lo: int, hi: int, cutoff: float, first: bool, work: np.ndarray) -> tuple[float, float]:
    """Huber-style winsorized centre and scale of the sorted range (PCL RejectionWinsorization).

    c = median, s = 1.1926*Sn; repeat: values beyond c +- 1.5s are set to the bound, or in the first
    outer iteration (``first``) to c when beyond c +- cutoff*s; s = 1.134*std, c = mean; until the
    second inner iteration or later changes s by less than 5e-4 (relative).
    """
    n = hi - lo
    v = work[2]
    for k in range(n):
        v[k] = s[lo + k]
    c = _median_sorted(s, lo, hi)
    sd = _sn_sorted(s, lo, hi, work[3])
    if not (sd > 0.0):
        return c, 0.0
    use_cut = first and cutoff > 0.0
    it = 0
    while True:
        low = c - 1.5 * sd
        high = c + 1.5 * sd
        cut_lo = c - cutoff * sd
        cut_hi = c + cutoff * sd
        for k in range(n):
            if v[k] < low:
                v[k] = c if (use_cut and not v[k] > cut_lo) else low
            elif v[k] > high:
                v[k] = c if (use_cut and not v[k] < cut_hi) else high
        prev = sd
        m, sd1 = _mean_std(v, 0, n, 1)
        sd = 1.134 * sd1
        c = m
        it += 1
        if sd == 0.0:
            break
        if it >= 2 and abs(sd - prev) / prev < 5e-4:
            break
        if it >= 50:
            break
    return c, sd


@njit(cache=True, nogil=True)
def _core_winsorized(n: int, params: np.ndarray, work: np.ndarray, floor: np.ndarray) -> tuple[int, int]:
    """params: kl, kh, cutoff. Outer loop as sigma clipping while n >= 3."""
    s = work[0]
    lo = 0
    hi = n
    first = True
    while hi - lo >= 3:
        c, sd = _winsorize(s, lo, hi, params[2], first, work)
        sd = max(sd, _floor_sd(floor, c))
        first = False
        if not (sd > 0.0):
            break
        nlo = lo
        nhi = hi
        while nlo < nhi and (c - s[nlo]) / sd > params[0]:
            nlo += 1
        while nhi > nlo and (s[nhi - 1] - c) / sd > params[1]:
            nhi -= 1
        if nlo == lo and nhi == hi:
            break
        lo = nlo
        hi = nhi
    return lo, hi


@njit(cache=True, nogil=True)
def _core_averaged_sigma(n: int, params: np.ndarray, work: np.ndarray, floor: np.ndarray) -> tuple[int, int]:
    """PI averaged sigma clipping: k^2 = sum((x-c)^2)/c/(n-1) once; sigma = k*sqrt(c)."""
    s = work[0]
    if n < 3:
        return 0, n
    c = _median_sorted(s, 0, n)
    if not (c > 0.0):
        return 0, n
    ss = 0.0
    for k in range(n):
        d = s[k] - c
        ss += d * d
    k2 = ss / c / (n - 1)
    lo = 0
    hi = n
    while hi - lo >= 3:
        if not (c > 0.0):
            break
        sd = max(math.sqrt(k2 * c), _floor_sd(floor, c))
        if sd == 0.0:
            break
        nlo, nhi = _clip_ends(s, lo, hi, c - sd * params[0], c + sd * params[1])
        if nlo == lo and nhi == hi:
            break
        lo = nlo
        hi = nhi
        c = _median_sorted(s, lo, hi)
    return lo, hi


@njit(cache=True, nogil=True)
def _lad_eval(s: np.ndarray, lo: int, n: int, b: float, buf: np.ndarray) -> tuple[float, float, float]:
    """For slope b: a = median(y - b*j), f = sum j*sign(y - a - b*j), adev = mean |y - a - b*j|."""
    for j in range(n):
        buf[j] = s[lo + j] - b * j
    a = _median_buf(buf, n)
    f = 0.0
    adev = 0.0
    for j in range(n):
        r = s[lo + j] - a - b * j
        adev += abs(r)
        if r > 0.0:
            f += j
        elif r < 0.0:
            f -= j
    return a, f, adev / n


@njit(cache=True, nogil=True)
def _lad_fit(s: np.ndarray, lo: int, hi: int, buf: np.ndarray) -> tuple[float, float, float]:
    """Least-absolute-deviation line y = a + b*j through the sorted range (j = 0..n-1); bisection on b."""
    n = hi - lo
    rng = s[hi - 1] - s[lo]
    b_lo = 0.0
    b_hi = rng
    a, f, adev = _lad_eval(s, lo, n, 0.0, buf)
    if rng <= 0.0 or f <= 0.0:
        return a, 0.0, adev
    for _ in range(40):
        b = 0.5 * (b_lo + b_hi)
        a, f, adev = _lad_eval(s, lo, n, b, buf)
        if f > 0.0:
            b_lo = b
        elif f < 0.0:
            b_hi = b
        else:
            return a, b, adev
        if b_hi - b_lo <= 1e-7 * rng:
            break
    b = 0.5 * (b_lo + b_hi)
    a, f, adev = _lad_eval(s, lo, n, b, buf)
    return a, b, adev


@njit(cache=True, nogil=True)
def _core_linear_fit(n: int, params: np.ndarray, work: np.ndarray, floor: np.ndarray) -> tuple[int, int]:
    """PI linear fit clipping: LAD line through the sorted kept values vs rank; s = 2*adev*sqrt(1+b^2)."""
    s = work[0]
    lo = 0
    hi = n
    while hi - lo >= 5:
        a, b, adev = _lad_fit(s, lo, hi, work[4])
        sd = max(2.0 * adev * math.sqrt(1.0 + b * b), _floor_sd(floor, _median_sorted(s, lo, hi)))
        if not (sd > 0.0):
            break
        nlo = lo
        nhi = hi
        while nlo < nhi and (a + b * (nlo - lo) - s[nlo]) / sd >= params[0]:
            nlo += 1
        while nhi > nlo and (s[nhi - 1] - a - b * (nhi - 1 - lo)) / sd >= params[1]:
            nhi -= 1
        if nlo == lo and nhi == hi:
            break
        lo = nlo
        hi = nhi
    return lo, hi


@njit(cache=True, nogil=True)
def _core_esd(n: int, params: np.ndarray, work: np.ndarray, floor: np.ndarray) -> tuple[int, int]:
    """Generalized ESD (Rosner): largest i with R_i > lambda_i; low deviations divided by rho.

    params: f, alpha, rho, n_max, r_max, then lambda[n*(r_max+1) + i] for n <= n_max, i <= r_max.
    """
    s = work[0]
    if n < 3:
        return 0, n
    f = params[0]
    rho = params[2]
    n_max = int(params[3])
    r_max = int(params[4])
    if n > n_max:
        return 0, n
    r = math.floor(f * n)
    r = max(1, min(r, n - 2, r_max))
    side = work[5]
    lo = 0
    hi = n
    best = 0
    # running sums about a shift (the median) keep the update O(1) per removal and accurate
    c0 = _median_sorted(s, 0, n)
    s1 = 0.0
    s2 = 0.0
    for k in range(n):
        d = s[k] - c0
        s1 += d
        s2 += d * d
    for i in range(1, r + 1):
        m = hi - lo
        mean = c0 + s1 / m
        var = max((s2 - s1 * s1 / m) / (m - 1), _floor_sd(floor, mean) ** 2)
        if not (var > 0.0):
            break
        sd = math.sqrt(var)
        rh = (s[hi - 1] - mean) / sd
        rl = (mean - s[lo]) / (rho * sd)
        if rh >= rl:
            ri = rh
            side[i] = 1.0
            hi -= 1
            d = s[hi] - c0
        else:
            ri = rl
            side[i] = -1.0
            d = s[lo] - c0
            lo += 1
        s1 -= d
        s2 -= d * d
        if ri > params[5 + n * (r_max + 1) + i]:
            best = i
    lo = 0
    hi = n
    for i in range(1, best + 1):
        if side[i] > 0.0:
            hi -= 1
        else:
            lo += 1
    return lo, hi


@njit(cache=True, nogil=True)
def _core_range(n: int, params: np.ndarray, work: np.ndarray, floor: np.ndarray) -> tuple[int, int]:
    """Reject x <= low and x >= high."""
    s = work[0]
    lo = 0
    hi = n
    while lo < hi and s[lo] <= params[0]:
        lo += 1
    while hi > lo and s[hi - 1] >= params[1]:
        hi -= 1
    return lo, hi


# ---------------------------------------------------------------------------------------------
# public numba rejectors, one signature


@njit(cache=True, nogil=True)
def _run(
    code: int, values: np.ndarray, params: np.ndarray, mask: np.ndarray, work: np.ndarray, floor: np.ndarray
) -> int:
    if code == 0:  # no rejection: no need to sort
        kept = 0
        for i in range(values.shape[0]):
            if mask[i] == KEEP:
                if math.isfinite(values[i]):
                    kept += 1
                else:
                    mask[i] = INVALID
        return kept
    n = _gather(values, mask, work)
    if n == 0:
        return 0
    if code == 0:
        lo, hi = 0, n
    elif code == 1:
        lo, hi = _core_minmax(n, params, work, floor)
    elif code == 2:
        lo, hi = _core_percentile(n, params, work, floor)
    elif code == 3:
        lo, hi = _core_sigma(n, params, work, floor)
    elif code == 4:
        lo, hi = _core_winsorized(n, params, work, floor)
    elif code == 5:
        lo, hi = _core_averaged_sigma(n, params, work, floor)
    elif code == 6:
        lo, hi = _core_linear_fit(n, params, work, floor)
    elif code == 7:
        lo, hi = _core_esd(n, params, work, floor)
    elif code == 8:
        lo, hi = _core_mad(n, params, work, floor)
    elif code == 9:
        lo, hi = _core_range(n, params, work, floor)
    else:
        lo, hi = 0, n
    return _finish(n, lo, hi, mask, work)


@njit(cache=True, nogil=True)
def run_rejection(
    code: int,
    values: np.ndarray,
    weights: np.ndarray,
    params: np.ndarray,
    mask: np.ndarray,
    work: np.ndarray,
    floor: np.ndarray,
) -> int:
    """Run the algorithm with registry code ``code`` (REJECTIONS[name].code) on one pixel stack,
    with a noise floor (FLOOR_SIZE values; NO_FLOOR for none)."""
    return _run(code, values, params, mask, work, floor)


@njit(cache=True, nogil=True)
def reject_none(values: np.ndarray, weights: np.ndarray, params: np.ndarray, mask: np.ndarray, work: np.ndarray) -> int:
    """No rejection: every finite candidate is kept."""
    return _run(0, values, params, mask, work, NO_FLOOR)


@njit(cache=True, nogil=True)
def reject_minmax(values: np.ndarray, weights: np.ndarray, params: np.ndarray, mask: np.ndarray, work: np.ndarray) -> int:
    """Min/max: reject the k_low lowest and k_high highest; keep all if n < k_low + k_high + 2."""
    return _run(1, values, params, mask, work, NO_FLOOR)


@njit(cache=True, nogil=True)
def reject_percentile(
    values: np.ndarray, weights: np.ndarray, params: np.ndarray, mask: np.ndarray, work: np.ndarray
) -> int:
    """Percentile clipping around the median m > 0: (m - x)/m > p_low, (x - m)/m > p_high; one pass."""
    return _run(2, values, params, mask, work, NO_FLOOR)


@njit(cache=True, nogil=True)
def reject_sigma(values: np.ndarray, weights: np.ndarray, params: np.ndarray, mask: np.ndarray, work: np.ndarray) -> int:
    """Iterative sigma clipping (PI style by default; astropy/ccdproc modes via params)."""
    return _run(3, values, params, mask, work, NO_FLOOR)


@njit(cache=True, nogil=True)
def reject_winsorized(
    values: np.ndarray, weights: np.ndarray, params: np.ndarray, mask: np.ndarray, work: np.ndarray
) -> int:
    """Winsorized sigma clipping (PI 2021: Sn start, Huber winsorization at 1.5 sigma, cutoff)."""
    return _run(4, values, params, mask, work, NO_FLOOR)


@njit(cache=True, nogil=True)
def reject_averaged_sigma(
    values: np.ndarray, weights: np.ndarray, params: np.ndarray, mask: np.ndarray, work: np.ndarray
) -> int:
    """Averaged sigma clipping (PI): Poisson-like sigma = k*sqrt(median)."""
    return _run(5, values, params, mask, work, NO_FLOOR)


@njit(cache=True, nogil=True)
def reject_linear_fit(
    values: np.ndarray, weights: np.ndarray, params: np.ndarray, mask: np.ndarray, work: np.ndarray
) -> int:
    """Linear fit clipping (PI): LAD line through the sorted stack."""
    return _run(6, values, params, mask, work, NO_FLOOR)


@njit(cache=True, nogil=True)
def reject_esd(values: np.ndarray, weights: np.ndarray, params: np.ndarray, mask: np.ndarray, work: np.ndarray) -> int:
    """Generalized extreme Studentized deviate test (Rosner 1983) with low-side relaxation rho."""
    return _run(7, values, params, mask, work, NO_FLOOR)


@njit(cache=True, nogil=True)
def reject_mad(values: np.ndarray, weights: np.ndarray, params: np.ndarray, mask: np.ndarray, work: np.ndarray) -> int:
    """MAD clipping (Siril): median centre, 1.4826*MAD scale."""
    return _run(8, values, params, mask, work, NO_FLOOR)


@njit(cache=True, nogil=True)
def reject_range(values: np.ndarray, weights: np.ndarray, params: np.ndarray, mask: np.ndarray, work: np.ndarray) -> int:
    """Range rejection: x <= low rejected low, x >= high rejected high."""
    return _run(9, values, params, mask, work, NO_FLOOR)


# ---------------------------------------------------------------------------------------------
# registry


def esd_critical_values(n_max: int, r_max: int, alpha: float) -> np.ndarray:
    """lambda[n, i] of the generalized ESD test for 3 <= n <= n_max, 1 <= i <= min(r_max, n - 2).

    lambda_i = (n - i) t / sqrt((n - i - 1 + t^2)(n - i + 1)), t = t_{p, n-i-1}, p = 1 - alpha/(2(n - i + 1)).
    Entries outside the domain are +inf. Shape (n_max + 1, r_max + 1).
    """
    from scipy.stats import t as student_t

    table = np.full((n_max + 1, r_max + 1), np.inf)
    for n in range(3, n_max + 1):
        i = np.arange(1, min(r_max, n - 2) + 1)
        if i.size == 0:
            continue
        p = 1.0 - alpha / (2.0 * (n - i + 1))
        t = student_t.ppf(p, n - i - 1)
        table[n, i] = (n - i) * t / np.sqrt((n - i - 1 + t * t) * (n - i + 1))
    return table


def _pack_esd(values: tuple[float, ...], n_max: int) -> np.ndarray:
    f, alpha, rho = values
    n_max = max(int(n_max), 3)
    r_max = max(1, math.floor(f * n_max))
    table = esd_critical_values(n_max, r_max, alpha)
    return np.concatenate([np.array([f, alpha, rho, n_max, r_max], dtype=np.float64), table.ravel()])


@dataclass(frozen=True)
class Rejection:
    """One registered rejection algorithm.

    code selects it in the integration kernel; kernel is its numba function (common signature);
    param_names/defaults give the layout of the packed float64 parameter array; min_n is the
    smallest stack it is meant for (it keeps everything below its own technical minimum).
    """

    name: str
    code: int
    kernel: Callable[..., int]
    param_names: tuple[str, ...]
    defaults: tuple[float, ...]
    min_n: int
    description: str
    _packer: Callable[[tuple[float, ...], int], np.ndarray] | None = field(default=None, repr=False)

    def resolve(self, params: Mapping[str, float] | None) -> dict[str, float]:
        """Defaults overridden by ``params``; unknown names raise StackwatchError naming them."""
        out = dict(zip(self.param_names, self.defaults))
        for key, value in (params or {}).items():
            if key not in out:
                raise StackwatchError(
                    f"rejection {self.name}: unknown parameter {key!r} (known: {', '.join(self.param_names) or 'none'})"
                )
            out[key] = float(value)
        return out

    def pack(self, params: Mapping[str, float] | None = None, *, n_max: int = 1000) -> np.ndarray:
        """The float64 parameter array for the kernel (n_max: largest stack, used by ESD's table)."""
        resolved = self.resolve(params)
        vals = tuple(resolved[k] for k in self.param_names)
        if self._packer is not None:
            return self._packer(vals, n_max)
        return np.array(vals if vals else (0.0,), dtype=np.float64)


REJECTIONS: dict[str, Rejection] = {
    r.name: r
    for r in (
        Rejection("none", 0, reject_none, (), (), 1, "no rejection"),
        Rejection("minmax", 1, reject_minmax, ("k_low", "k_high"), (1.0, 1.0), 3, "reject the k lowest/highest"),
        Rejection(
            "percentile", 2, reject_percentile, ("p_low", "p_high"), (0.2, 0.1), 2, "relative distance from the median"
        ),
        Rejection(
            "sigma",
            3,
            reject_sigma,
            ("kappa_low", "kappa_high", "center_mean", "ddof", "max_iterations", "min_n"),
            (4.0, 3.0, 0.0, 1.0, 0.0, 3.0),
            10,
            "iterative sigma clipping around the median (center_mean=1: mean); astropy: ddof 0, max_iterations 5, min_n 0",
        ),
        Rejection(
            "winsorized",
            4,
            reject_winsorized,
            ("kappa_low", "kappa_high", "cutoff"),
            (4.0, 3.0, 5.0),
            6,
            "winsorized sigma clipping (PI 2021)",
        ),
        Rejection(
            "averaged_sigma",
            5,
            reject_averaged_sigma,
            ("kappa_low", "kappa_high"),
            (4.0, 3.0),
            6,
            "averaged sigma clipping (variance proportional to level; raw bias-free data)",
        ),
        Rejection(
            "linear_fit", 6, reject_linear_fit, ("kappa_low", "kappa_high"), (5.0, 4.0), 15, "linear fit clipping (PI)"
        ),
        Rejection(
            "esd",
            7,
            reject_esd,
            ("outlier_fraction", "alpha", "low_relaxation"),
            (0.3, 0.05, 1.5),
            20,
            "generalized extreme Studentized deviate test",
            _pack_esd,
        ),
        Rejection("mad", 8, reject_mad, ("kappa_low", "kappa_high"), (3.0, 3.0), 8, "MAD clipping (Siril)"),
        Rejection(
            "range", 9, reject_range, ("low", "high"), (-math.inf, math.inf), 1, "reject x <= low and x >= high"
        ),
    )
}


def get_rejection(name: str) -> Rejection:
    try:
        return REJECTIONS[name]
    except KeyError:
        raise StackwatchError(
            f"unknown rejection algorithm {name!r} (known: {', '.join(sorted(REJECTIONS))}, auto)"
        ) from None


def auto_rejection(n: int, *, normalization: str = "nsg", raw: bool = False) -> tuple[str, dict[str, float]]:
    """§7.5: the algorithm and parameters for n valid frames.

    1-2 none; 3-5 percentile 0.2/0.1; 6-24 winsorized 4/3 cutoff 5 (averaged sigma 4/3 for ``raw``
    bias-free data when n < 15); >= 25 ESD 0.3/0.05/1.5 with NSG normalisation, linear fit 5/4
    otherwise (``normalization`` != "nsg").
    """
    if n <= 2:
        return "none", {}
    if n <= 5:
        return "percentile", {"p_low": 0.2, "p_high": 0.1}
    if n <= 24:
        if raw and n <= 14:
            return "averaged_sigma", {"kappa_low": 4.0, "kappa_high": 3.0}
        return "winsorized", {"kappa_low": 4.0, "kappa_high": 3.0, "cutoff": 5.0}
    if normalization == "nsg":
        return "esd", {"outlier_fraction": 0.3, "alpha": 0.05, "low_relaxation": 1.5}
    return "linear_fit", {"kappa_low": 5.0, "kappa_high": 4.0}


@njit(cache=True, nogil=True, parallel=True)
def _reject_cube(code: int, cube: np.ndarray, params: np.ndarray, mask: np.ndarray, floor: np.ndarray) -> None:
    n, m = cube.shape
    for p in prange(m):
        values = np.empty(n, dtype=np.float32)
        pm = np.empty(n, dtype=np.uint8)
        work = np.empty((WORK_ROWS, n), dtype=np.float64)
        for i in range(n):
            values[i] = cube[i, p]
            pm[i] = mask[i, p]
        _run(code, values, params, pm, work, floor)
        for i in range(n):
            mask[i, p] = pm[i]


def reject(
    values: np.ndarray,
    *,
    name: str = "winsorized",
    params: Mapping[str, float] | None = None,
    invalid: np.ndarray | None = None,
    noise_floor: Sequence[float] | None = None,
) -> np.ndarray:
    """Rejection codes (uint8, same shape as ``values``) for a stack (N,) or cube (N, ...) along axis 0.

    0 keep, 1 low, 2 high, 3 invalid (non-finite or ``invalid`` True). Convenience for tests and
    small callers; the integrator calls the kernels directly. Values are cast to float32 (the
    pixel type) before rejection, as in the integrator. ``noise_floor``: (a, b, ε², background,
    κ_low, κ_high), the same floor for every pixel (see FLOOR_SIZE); None for none.
    """
    spec = get_rejection(name)
    arr = np.asarray(values, dtype=np.float32)
    if arr.ndim == 0:
        raise StackwatchError("reject: values must have at least one axis (frames)")
    n = arr.shape[0]
    flat = np.ascontiguousarray(arr.reshape(n, -1))
    mask = np.zeros(flat.shape, dtype=np.uint8)
    if invalid is not None:
        mask[np.asarray(invalid, dtype=bool).reshape(n, -1)] = INVALID
    floor = NO_FLOOR if noise_floor is None else np.asarray(noise_floor, dtype=np.float64)
    if floor.shape != (FLOOR_SIZE,):
        raise StackwatchError(f"reject: noise_floor needs {FLOOR_SIZE} values (a, b, eps², background, κ_low, κ_high)")
    _reject_cube(spec.code, flat, spec.pack(params, n_max=n), mask, floor)
    return mask.reshape(arr.shape)


def describe(name: str, params: Mapping[str, float] | None) -> dict[str, Any]:
    """Resolved parameters of an algorithm as a plain dict (for headers and reports)."""
    return get_rejection(name).resolve(params)
