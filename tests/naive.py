"""Slow pure-Python reference versions of the stats/reject/integrate kernels, written from the text
of algorithms.md §1.1, §7.1 and §7.3 (not from the numba code). Used only by tests."""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy.stats import t as student_t

KEEP, LOW, HIGH, INVALID = 0, 1, 2, 3


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n % 2:
        return s[n // 2]
    return 0.5 * (s[n // 2 - 1] + s[n // 2])


def mean_std(xs: Sequence[float], ddof: int) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    ss = 0.0
    for x in xs:
        ss += (x - m) * (x - m)
    return m, (math.sqrt(ss / (n - ddof)) if n - ddof > 0 else 0.0)


def sn(xs: Sequence[float]) -> float:
    """Rousseeuw-Croux Sn by brute force, with the RC93 small-sample factors."""
    n = len(xs)
    if n < 2:
        return 0.0
    inner = []
    for xi in xs:
        d = sorted(abs(xi - xj) for xj in xs)
        inner.append(d[n // 2])  # himed: rank n//2 + 1
    lomed = sorted(inner)[(n + 1) // 2 - 1]
    small = {2: 0.743, 3: 1.851, 4: 0.954, 5: 1.351, 6: 0.993, 7: 1.198, 8: 1.005, 9: 1.131}
    cn = small[n] if n < 10 else (n / (n - 0.9) if n % 2 else 1.0)
    return cn * 1.1926 * lomed


def _result(values: Sequence[float], order: list[int], lo: int, hi: int, invalid: set[int]) -> list[int]:
    out = [INVALID if i in invalid else KEEP for i in range(len(values))]
    for k in range(lo):
        out[order[k]] = LOW
    for k in range(hi, len(order)):
        out[order[k]] = HIGH
    return out


def reject(values: Sequence[float], name: str, params: dict[str, float]) -> list[int]:
    """Codes per sample (0 keep, 1 low, 2 high, 3 invalid) for one pixel stack."""
    invalid = {i for i, v in enumerate(values) if not math.isfinite(v)}
    order = sorted((i for i in range(len(values)) if i not in invalid), key=lambda i: (values[i], i))
    s = [float(values[i]) for i in order]
    n = len(s)
    if n == 0:
        return _result(values, order, 0, 0, invalid)
    lo, hi = globals()["_" + name](s, params)
    return _result(values, order, lo, hi, invalid)


def _none(s: list[float], p: dict[str, float]) -> tuple[int, int]:
    return 0, len(s)


def _minmax(s: list[float], p: dict[str, float]) -> tuple[int, int]:
    n, kl, kh = len(s), int(p["k_low"]), int(p["k_high"])
    return (0, n) if n < kl + kh + 2 else (kl, n - kh)


def _percentile(s: list[float], p: dict[str, float]) -> tuple[int, int]:
    n = len(s)
    m = median(s)
    if n < 2 or not m > 0:
        return 0, n
    lo, hi = 0, n
    while lo < hi and (m - s[lo]) / m > p["p_low"]:
        lo += 1
    while hi > lo and (s[hi - 1] - m) / m > p["p_high"]:
        hi -= 1
    return lo, hi


def _sigma(s: list[float], p: dict[str, float]) -> tuple[int, int]:
    lo, hi, it = 0, len(s), 0
    while hi - lo > 0 and hi - lo >= p["min_n"]:
        if p["max_iterations"] > 0 and it >= p["max_iterations"]:
            break
        kept = s[lo:hi]
        m, sd = mean_std(kept, int(p["ddof"]))
        c = m if p["center_mean"] else median(kept)
        nlo, nhi = lo, hi
        while nlo < nhi and s[nlo] < c - sd * p["kappa_low"]:
            nlo += 1
        while nhi > nlo and s[nhi - 1] > c + sd * p["kappa_high"]:
            nhi -= 1
        it += 1
        if (nlo, nhi) == (lo, hi):
            break
        lo, hi = nlo, nhi
    return lo, hi


def _winsorized(s: list[float], p: dict[str, float]) -> tuple[int, int]:
    lo, hi, first = 0, len(s), True
    while hi - lo >= 3:
        v = list(s[lo:hi])
        c = median(v)
        sd = sn(v)
        if not sd > 0:
            break
        cut = p["cutoff"] if first else 0.0
        first = False
        it = 0
        while True:
            t0, t1 = c - 1.5 * sd, c + 1.5 * sd
            if cut > 0:
                v = [(t0 if x > c - cut * sd else c) if x < t0 else ((t1 if x < c + cut * sd else c) if x > t1 else x) for x in v]
            else:
                v = [t0 if x < t0 else (t1 if x > t1 else x) for x in v]
            prev = sd
            m, s1 = mean_std(v, 1)
            sd, c = 1.134 * s1, m
            it += 1
            if sd == 0 or (it >= 2 and abs(sd - prev) / prev < 5e-4) or it >= 50:
                break
        if not sd > 0:
            break
        nlo, nhi = lo, hi
        while nlo < nhi and (c - s[nlo]) / sd > p["kappa_low"]:
            nlo += 1
        while nhi > nlo and (s[nhi - 1] - c) / sd > p["kappa_high"]:
            nhi -= 1
        if (nlo, nhi) == (lo, hi):
            break
        lo, hi = nlo, nhi
    return lo, hi


def _averaged_sigma(s: list[float], p: dict[str, float]) -> tuple[int, int]:
    n = len(s)
    if n < 3:
        return 0, n
    c = median(s)
    if not c > 0:
        return 0, n
    k2 = sum((x - c) ** 2 for x in s) / c / (n - 1)
    lo, hi = 0, n
    while hi - lo >= 3 and c > 0:
        sd = math.sqrt(k2 * c)
        if sd == 0:
            break
        nlo, nhi = lo, hi
        while nlo < nhi and (c - s[nlo]) / sd > p["kappa_low"]:
            nlo += 1
        while nhi > nlo and (s[nhi - 1] - c) / sd > p["kappa_high"]:
            nhi -= 1
        if (nlo, nhi) == (lo, hi):
            break
        lo, hi = nlo, nhi
        c = median(s[lo:hi])
    return lo, hi


def lad_line(y: list[float]) -> tuple[float, float, float]:
    """Least-absolute-deviation line y = a + b*j by brute force (an optimum passes through two points)."""
    n = len(y)
    best = (math.inf, 0.0, median(y))
    for i in range(n):
        for j in range(i + 1, n):
            b = (y[j] - y[i]) / (j - i)
            a = y[i] - b * i
            cost = sum(abs(y[k] - a - b * k) for k in range(n))
            if cost < best[0] - 1e-15:
                best = (cost, b, a)
    cost, b, a = best
    return a, b, cost / n


def _linear_fit(s: list[float], p: dict[str, float]) -> tuple[int, int]:
    lo, hi = 0, len(s)
    while hi - lo >= 5:
        a, b, adev = lad_line(s[lo:hi])
        sd = 2 * adev * math.sqrt(1 + b * b)
        if not sd > 0:
            break
        nlo, nhi = lo, hi
        while nlo < nhi and (a + b * (nlo - lo) - s[nlo]) / sd >= p["kappa_low"]:
            nlo += 1
        while nhi > nlo and (s[nhi - 1] - a - b * (nhi - 1 - lo)) / sd >= p["kappa_high"]:
            nhi -= 1
        if (nlo, nhi) == (lo, hi):
            break
        lo, hi = nlo, nhi
    return lo, hi


def esd_lambda(n: int, i: int, alpha: float) -> float:
    pp = 1 - alpha / (2 * (n - i + 1))
    t = float(student_t.ppf(pp, n - i - 1))
    return (n - i) * t / math.sqrt((n - i - 1 + t * t) * (n - i + 1))


def _esd(s: list[float], p: dict[str, float]) -> tuple[int, int]:
    n = len(s)
    if n < 3:
        return 0, n
    r = max(1, min(math.floor(p["outlier_fraction"] * n), n - 2))
    lo, hi, best, sides = 0, n, 0, []
    for i in range(1, r + 1):
        m, sd = mean_std(s[lo:hi], 1)
        if not sd > 0:
            break
        rh = (s[hi - 1] - m) / sd
        rl = (m - s[lo]) / (p["low_relaxation"] * sd)
        if rh >= rl:
            ri, hi = rh, hi - 1
            sides.append(1)
        else:
            ri, lo = rl, lo + 1
            sides.append(-1)
        if ri > esd_lambda(n, i, p["alpha"]):
            best = i
    lo, hi = 0, n
    for side in sides[:best]:
        if side > 0:
            hi -= 1
        else:
            lo += 1
    return lo, hi


def _mad(s: list[float], p: dict[str, float]) -> tuple[int, int]:
    lo, hi = 0, len(s)
    while hi - lo > 3:
        kept = s[lo:hi]
        c = median(kept)
        sd = 1.482602218505602 * median([abs(x - c) for x in kept])
        if not sd > 0:
            break
        nlo, nhi = lo, hi
        while nlo < nhi and s[nlo] < c - sd * p["kappa_low"]:
            nlo += 1
        while nhi > nlo and s[nhi - 1] > c + sd * p["kappa_high"]:
            nhi -= 1
        if (nlo, nhi) == (lo, hi):
            break
        lo, hi = nlo, nhi
    return lo, hi


def _range(s: list[float], p: dict[str, float]) -> tuple[int, int]:
    lo, hi = 0, len(s)
    while lo < hi and s[lo] <= p["low"]:
        lo += 1
    while hi > lo and s[hi - 1] >= p["high"]:
        hi -= 1
    return lo, hi


def combine(values: Sequence[float], weights: Sequence[float], codes: Sequence[int], *, use_median: bool) -> float:
    """§7.1: weighted mean (or median) of kept samples; all valid rejected -> median of valid; none -> NaN."""
    valid = [i for i, c in enumerate(codes) if c != INVALID]
    if not valid:
        return math.nan
    kept = [i for i in valid if codes[i] == KEEP]
    if not kept:
        return median([values[i] for i in valid])
    if use_median:
        return median([values[i] for i in kept])
    sw = sum(weights[i] for i in kept)
    return sum(weights[i] * values[i] for i in kept) / sw


def starlet_smooth(img: list[list[float]], step: int) -> list[list[float]]:
    """One B3-spline smoothing with taps ``step`` apart and mirror borders (index -i, 2(n-1)-i)."""
    h, w = len(img), len(img[0])
    k = [1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16]

    def mirror(i: int, n: int) -> int:
        if n == 1:
            return 0
        while i < 0 or i >= n:
            i = -i if i < 0 else i
            i = 2 * (n - 1) - i if i >= n else i
        return i

    tmp = [[sum(k[t] * img[y][mirror(x + (t - 2) * step, w)] for t in range(5)) for x in range(w)] for y in range(h)]
    return [[sum(k[t] * tmp[mirror(y + (t - 2) * step, h)][x] for t in range(5)) for x in range(w)] for y in range(h)]
