"""Live integration: a running weighted mean with on-arrival and retroactive rejection (§10).

`LiveStack` keeps per-pixel accumulators (structure of arrays, one contiguous plane per field):

    S, W      float32  Σw·y and Σw over accepted samples
    n         uint16   accepted count
    r_lo,r_hi uint16   rejected counts (on arrival or retroactive)
    hv, hi    float32 + uint16 frame slot, k_high planes: largest accepted samples, descending
    lv, li    float32 + uint16 frame slot, k_low planes: smallest accepted samples, ascending

so memory does not grow with the number of frames (k_high = 2, k_low = 1: 32 B/px mono). A new
normalised frame is tested against a trimmed centre (accepted samples that are not retained
extremes) with a per-frame noise model

    σ_f²(c) = ρ_f·((m_f·σ_f)² + m_f·s/g_f) + (ε·s)²,  s = max(0, c − b_ref)

(§10): rejected on arrival, or accepted, after which the retained extremes are tested again and
removed retroactively when they are outliers (a satellite trail in frame 1 is removed once enough
frames show it). For the default k_high = 2, k_low = 1 a vectorised pass first finishes the pixels
where nothing can be rejected (the new sample and the retained extremes well inside κ·√A_min of the
centre: ~99 % of a frame), bit for bit as the full logic would, and leaves the rest to it. Per-frame rejection lists record every rejected (pixel, side) so a frame can be
excluded later. `exact_pass` runs the batch integrator (stackwatch.engine.integrate) over the frame
store with §7.5's algorithm and rebuilds the accumulators from its decisions: the live image then
equals the batch integration, and live updates continue from that exact state.

Checkpoints (`save`/`load`): each array to ``<name>.g<generation>.npy.tmp``, fsync, rename; then
``manifest.json`` (generation, frames, parameters, CRC32 checksums) the same way, last; older
generations are deleted after the manifest is in place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numba import njit, prange
from stackwatch.engine import integrate as _integrate
from stackwatch.engine import reject as _reject
from stackwatch.engine.errors import StackwatchError
from stackwatch.engine.integrate import NoiseModel, _bg

_CANDIDATE = _integrate.CANDIDATE  # a kept sample, flagged for large-scale rejection

__all__ = ["EMPTY", "ExactResult", "FrameRecord", "LiveStack", "UpdateResult"]

#: Frame slot meaning "no retained sample".
EMPTY = 0xFFFF
_MAX_SLOTS = 0xFFFE
_MANIFEST = "manifest.json"
_FORMAT = 2  # 1: rejection lists as rej_enc + rej_slot arrays (still read)

# frame table rows (per channel): weight, scale m, noise σ (pre-resampling), ρ, 1/gain, and the derived
# noise-model coefficients A = ρ·(m·σ)², B = ρ·m/g (σ² = A + B·s + ε²·s²)
_T_W, _T_M, _T_S, _T_RHO, _T_IG, _T_A, _T_B = 0, 1, 2, 3, 4, 5, 6
_T_ROWS = 7
# float32 constants for the k21 kernel (float64 ones would widen its float32 registers); typed Any for
# mypy, which sees np.float32 as not a float
_NEG_INF32: Any = np.float32(-np.inf)
_POS_INF32: Any = np.float32(np.inf)
_NAN32: Any = np.float32(np.nan)


class _BandSource(Protocol):
    shape: tuple[int, ...]

    def read_band(self, y0: int, y1: int) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------
# Numba kernels
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _var(tab: np.ndarray, ch: int, f: int, s: float, eps2: float) -> float:
    """Noise-model variance of frame f's sample at signal s = max(0, c − b_ref) above the background."""
    return tab[ch, _T_A, f] + (tab[ch, _T_B, f] + eps2 * s) * s


@njit(cache=True, nogil=True, inline="always")
def _trimmed_hi(hi: np.ndarray, f: int, t: int, r: int, x: int) -> bool:
    for q in range(t):
        if hi[q, r, x] == f:
            return True
    return False


@njit(cache=True, nogil=True, inline="always")
def _centre(
    s_acc: float,
    w_acc: float,
    n_acc: int,
    hv: np.ndarray,
    hi: np.ndarray,
    lv: np.ndarray,
    li: np.ndarray,
    r: int,
    x: int,
    tab: np.ndarray,
    ch: int,
    extra: float,
    buf: np.ndarray,
) -> tuple[float, int]:
    """Symmetrically trimmed weighted mean of the accepted samples and the number it averages.

    The t = min(#retained high, #retained low) most extreme retained samples of each side are left
    out (a symmetric trim keeps the centre unbiased; the spec's "untracked samples only" trims 2
    high and 1 low and biases the centre low). When nothing is left: the median of the retained
    values (and `extra` unless NaN)."""
    kh = hv.shape[0]
    kl = lv.shape[0]
    nh = 0
    for j in range(kh):
        if hi[j, r, x] != EMPTY:
            nh += 1
    nl = 0
    for j in range(kl):
        if li[j, r, x] != EMPTY:
            nl += 1
    t = min(nh, nl)
    sret = 0.0
    wret = 0.0
    nret = 0
    for j in range(t):
        f = hi[j, r, x]
        w = tab[ch, _T_W, f]
        sret += w * hv[j, r, x]
        wret += w
        nret += 1
    for j in range(t):
        f = li[j, r, x]
        if not _trimmed_hi(hi, f, t, r, x):
            w = tab[ch, _T_W, f]
            sret += w * lv[j, r, x]
            wret += w
            nret += 1
    ncore = n_acc - nret
    wc = w_acc - wret
    if ncore > 0 and wc > 1e-6 * w_acc:
        return (s_acc - sret) / wc, ncore
    nb = 0
    for j in range(kh):
        if hi[j, r, x] != EMPTY:
            buf[nb] = hv[j, r, x]
            nb += 1
    for j in range(kl):
        f = li[j, r, x]
        if f != EMPTY and not _trimmed_hi(hi, f, kh, r, x):
            buf[nb] = lv[j, r, x]
            nb += 1
    if not math.isnan(extra):
        buf[nb] = extra
        nb += 1
    if nb == 0:
        return math.nan, 0
    for i in range(1, nb):  # insertion sort of at most k_high + k_low + 1 values
        t_v = buf[i]
        j = i - 1
        while j >= 0 and buf[j] > t_v:
            buf[j + 1] = buf[j]
            j -= 1
        buf[j + 1] = t_v
    h = nb // 2
    return (buf[h] if nb % 2 else 0.5 * (buf[h - 1] + buf[h])), 0


@njit(cache=True, nogil=True, inline="always")
def _drop(vals: np.ndarray, idx: np.ndarray, j: int, r: int, x: int) -> None:
    k = vals.shape[0]
    for q in range(j, k - 1):
        vals[q, r, x] = vals[q + 1, r, x]
        idx[q, r, x] = idx[q + 1, r, x]
    idx[k - 1, r, x] = EMPTY
    vals[k - 1, r, x] = np.nan


@njit(cache=True, nogil=True, inline="always")
def _drop_slot(vals: np.ndarray, idx: np.ndarray, f: int, r: int, x: int) -> None:
    for j in range(vals.shape[0]):
        if idx[j, r, x] == f:
            _drop(vals, idx, j, r, x)
            return


@njit(cache=True, nogil=True, inline="always")
def _insert(vals: np.ndarray, idx: np.ndarray, v: float, f: int, r: int, x: int, descending: bool) -> None:
    k = vals.shape[0]
    for j in range(k):
        cur = idx[j, r, x]
        better = cur == EMPTY or (v > vals[j, r, x] if descending else v < vals[j, r, x])
        if better:
            for q in range(k - 1, j, -1):
                vals[q, r, x] = vals[q - 1, r, x]
                idx[q, r, x] = idx[q - 1, r, x]
            vals[j, r, x] = v
            idx[j, r, x] = f
            return


@njit(cache=True, nogil=True, parallel=True)
def _update_kernel(
    y: np.ndarray,
    slot: int,
    acc: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    ret: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    tab: np.ndarray,
    bgrid: np.ndarray,
    params: np.ndarray,
    arrival: np.ndarray,
    events: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """Add frame `slot`'s normalised samples y (R, W); see the module docstring.

    params = (kappa_low, kappa_high, n_min, eps, bg_step, plane_rows).
    arrival (out): in rows whose event buffer overflowed (arr_over > 0) only: the arrival
    rejections that did not fit the buffer (1 low, 2 high), 0 elsewhere in the row; the row is
    cleared at its first overflow, so other rows are never written (a dense plane per update cost
    26 MB of memory traffic at 26 MP).
    events: (ev_x int32 (R, cap), ev_f uint16 (R, cap), ev_side uint8 (R, cap), ev_n int32 (R,),
    overflow int32 (R,)) retroactive removals per row, then arr_over, nodata and full_px int32 (R,)
    (arrival rejections beyond the buffer, NaN samples, pixels through the full logic: all here).
    """
    S, Wt, N, RLO, RHI = acc
    hv, hi, lv, li = ret
    ev_x, ev_f, ev_side, ev_n, overflow, arr_over, nodata, full_px = events
    kl_, kh_, n_min, eps, step, hrows = params[0], params[1], int(params[2]), params[3], params[4], int(params[5])
    kl2, kh2, eps2, inv_step = kl_ * kl_, kh_ * kh_, eps * eps, 1.0 / step
    rows, width = y.shape
    cap = ev_x.shape[1]
    gh = bgrid.shape[1]
    w_new = tab[0, _T_W, slot]
    for r in prange(rows):
        buf = np.empty(hv.shape[0] + lv.shape[0] + 1, np.float64)
        ch = r // hrows
        yy = (r - ch * hrows) * inv_step
        iy = min(int(yy), gh - 1)
        iy1 = min(iy + 1, gh - 1)
        fy = yy - iy if iy1 > iy else 0.0
        ev_n[r] = 0
        overflow[r] = 0
        arr_over[r] = 0
        nodata[r] = 0
        full_px[r] = width
        for x in range(width):
            v = y[r, x]
            n0 = int(N[r, x])
            b = math.nan
            if not math.isfinite(v):
                nodata[r] += 1
            else:
                code = 0
                if n0 >= n_min:
                    c, ncore = _centre(float(S[r, x]), float(Wt[r, x]), n0, hv, hi, lv, li, r, x, tab, ch, v, buf)
                    if math.isfinite(c):
                        b = _bg(bgrid, ch, iy, iy1, fy, x, inv_step)
                        lim = (1.0 + 1.0 / max(ncore, 1)) * _var(tab, ch, slot, max(c - b, 0.0), eps2)
                        d = v - c
                        if d > 0 and d * d > kh2 * lim:
                            code = 2
                        elif d < 0 and d * d > kl2 * lim:
                            code = 1
                if code != 0:
                    k = ev_n[r]
                    if k >= cap:
                        if arr_over[r] == 0:
                            arrival[r, :] = 0
                        arr_over[r] += 1
                        arrival[r, x] = code
                    else:
                        ev_x[r, k] = x
                        ev_f[r, k] = slot
                        ev_side[r, k] = 4 + code
                        ev_n[r] = k + 1
                if code == 2:
                    RHI[r, x] += 1
                elif code == 1:
                    RLO[r, x] += 1
                else:
                    S[r, x] = np.float32(float(S[r, x]) + w_new * v)
                    Wt[r, x] = np.float32(float(Wt[r, x]) + w_new)
                    N[r, x] = n0 + 1
                    _insert(hv, hi, v, slot, r, x, True)
                    _insert(lv, li, v, slot, r, x, False)
            # retroactive test of the retained extremes
            n1 = int(N[r, x])
            if n1 < n_min or (hi[0, r, x] == EMPTY and li[0, r, x] == EMPTY):
                continue
            c, ncore = _centre(float(S[r, x]), float(Wt[r, x]), n1, hv, hi, lv, li, r, x, tab, ch, math.nan, buf)
            if not math.isfinite(c):
                continue
            if math.isnan(b):
                b = _bg(bgrid, ch, iy, iy1, fy, x, inv_step)
            s_c = max(c - b, 0.0)
            ke2 = 1.0 + 1.0 / max(ncore, 1)
            # high side, largest first, stop at the first retained sample inside the limit
            while hi[0, r, x] != EMPTY and int(N[r, x]) >= n_min:
                f = int(hi[0, r, x])
                val = float(hv[0, r, x])
                d = val - c
                if not (d > 0 and d * d > kh2 * ke2 * _var(tab, ch, f, s_c, eps2)):
                    break
                k = ev_n[r]
                if k >= cap:
                    overflow[r] += 1
                    break
                ev_x[r, k] = x
                ev_f[r, k] = f
                ev_side[r, k] = 2
                ev_n[r] = k + 1
                w = tab[ch, _T_W, f]
                S[r, x] = np.float32(float(S[r, x]) - w * val)
                Wt[r, x] = np.float32(float(Wt[r, x]) - w)
                N[r, x] -= 1
                RHI[r, x] += 1
                _drop(hv, hi, 0, r, x)
                _drop_slot(lv, li, f, r, x)
            # low side, smallest first
            while li[0, r, x] != EMPTY and int(N[r, x]) >= n_min:
                f = int(li[0, r, x])
                val = float(lv[0, r, x])
                d = c - val
                if not (d > 0 and d * d > kl2 * ke2 * _var(tab, ch, f, s_c, eps2)):
                    break
                k = ev_n[r]
                if k >= cap:
                    overflow[r] += 1
                    break
                ev_x[r, k] = x
                ev_f[r, k] = f
                ev_side[r, k] = 1
                ev_n[r] = k + 1
                w = tab[ch, _T_W, f]
                S[r, x] = np.float32(float(S[r, x]) - w * val)
                Wt[r, x] = np.float32(float(Wt[r, x]) - w)
                N[r, x] -= 1
                RLO[r, x] += 1
                _drop(lv, li, 0, r, x)
                _drop_slot(hv, hi, f, r, x)


@njit(cache=True, nogil=True, inline="always")
def _insert_k21(
    v: float, slot: int, h0: float, h1: float, l0: float, f0: int, f1: int, g0: int
) -> tuple[float, float, float, int, int, int]:
    """Insert a finite sample into the retained extremes (k_high = 2, k_low = 1), as `_insert` does.

    Written with min/max on ±inf stand-ins for empty slots, because whether a sample is a new
    extreme is a coin toss that a branch predictor loses (a misprediction per pixel and update
    cost more than the rest of an early update)."""
    h0e = h0 if f0 != EMPTY else _NEG_INF32
    h1e = h1 if f1 != EMPTY else _NEG_INF32
    l0e = l0 if g0 != EMPTY else _POS_INF32
    up0 = v > h0e
    f1n = f0 if up0 else (slot if v > h1e else f1)
    h1n = max(h1e, min(h0e, v))
    return (
        max(h0e, v),
        h1n if f1n != EMPTY else _NAN32,
        min(l0e, v),
        slot if up0 else f0,
        f1n,
        slot if v < l0e else g0,
    )


@njit(cache=True, nogil=True, inline="always")
def _centre_k21(
    s_acc: float, w_acc: float, n: int, h0: float, h1: float, l0: float, f0: int, f1: int, g0: int, tab: np.ndarray,
    ch: int, extra: float
) -> tuple[float, int]:
    """`_centre` for k_high = 2, k_low = 1 with the retained samples in registers."""
    sret = 0.0
    wret = 0.0
    nret = 0
    if f0 != EMPTY and g0 != EMPTY:
        wf = tab[ch, _T_W, f0]
        sret += wf * h0
        wret += wf
        nret += 1
        if g0 != f0:
            wg = tab[ch, _T_W, g0]
            sret += wg * l0
            wret += wg
            nret += 1
    ncore = n - nret
    wc = w_acc - wret
    if ncore > 0 and wc > 1e-6 * w_acc:
        return (s_acc - sret) / wc, ncore
    a0 = h0 if f0 != EMPTY else math.nan
    a1 = h1 if f1 != EMPTY else math.nan
    a2 = l0 if (g0 != EMPTY and g0 != f0 and g0 != f1) else math.nan
    return _median4(a0, a1, a2, np.float64(extra)), 0


@njit(cache=True, nogil=True)
def _accept_row_k21(
    yr: np.ndarray, slot: int, w_new: float, acc: tuple[np.ndarray, ...], ret: tuple[np.ndarray, ...]
) -> int:
    """Accept every sample of a row in which no pixel can be tested yet (n + 1 < n_min); returns
    the number of NaN samples. acc = (S, W, n) and ret = (hv0, hv1, lv0, hi0, hi1, li0) row slices.

    No branch: a NaN sample stores the pixel's old values back, so that LLVM vectorises the loop
    (4 instead of 11-13 ns/px per update and thread)."""
    s_r, w_r, n_r = acc
    h0_r, h1_r, l0_r, f0_r, f1_r, g0_r = ret
    n_nodata = 0
    for x in range(yr.shape[0]):
        v = yr[x]
        fin = math.isfinite(v)
        n_nodata += not fin
        s_old = s_r[x]
        w_old = w_r[x]
        n_old = n_r[x]
        h0_old = h0_r[x]
        h1_old = h1_r[x]
        l0_old = l0_r[x]
        f0_old = f0_r[x]
        f1_old = f1_r[x]
        g0_old = g0_r[x]
        h0, h1, l0, f0, f1, g0 = _insert_k21(v, slot, h0_old, h1_old, l0_old, int(f0_old), int(f1_old), int(g0_old))
        s_r[x] = np.float32(float(s_old) + w_new * v) if fin else s_old
        w_r[x] = np.float32(float(w_old) + w_new) if fin else w_old
        n_r[x] = n_old + 1 if fin else n_old
        h0_r[x] = h0 if fin else h0_old
        h1_r[x] = h1 if fin else h1_old
        l0_r[x] = l0 if fin else l0_old
        f0_r[x] = f0 if fin else f0_old
        f1_r[x] = f1 if fin else f1_old
        g0_r[x] = g0 if fin else g0_old
    return n_nodata


@njit(cache=True, nogil=True)
def _simple_row_k21(
    yr: np.ndarray,
    acc: tuple[np.ndarray, np.ndarray, np.ndarray],
    ret: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    wts: tuple[np.ndarray, np.ndarray],
    done: np.ndarray,
    slot: int,
    w_new: float,
    bounds: np.ndarray,
) -> int:
    """Finish the pixels of a row whose update is certainly simple; returns their NaN samples.

    A pixel is simple when its retained slots are filled, both centres of `_update_row_k21` would be
    trimmed means without the two retained extremes, and neither the new sample (tested from n_min
    accepted samples on) nor the retained extremes after it (from n_min on) can be rejected: then the
    update is "accept (if finite) and insert", and that is all this pass computes, with the same
    operations as `_update_row_k21`, so the state is bit for bit the one the full logic writes. The
    tests need no division, centre, background or noise-model term: with num/den the centre's sum
    and weight, |y − c| < κ·√(A_min) is (y·den − num)² < κ²·A_min·den², and σ² ≥ A_min for every
    frame (σ² = A + (B + ε²s)·s with B, s ≥ 0, and the κ_eff factor ≥ 1; A_min is the smallest A of
    any frame). Rounding: both sides of the tests carry a relative margin δ = 1e-4 and the values are
    bounded by |y| < 1e6·√A_min, so the float64 error of y·den − num against the full logic's y − c
    (≤ 2⁻⁵¹·(|y| + |y − c|)·den) is < 1e-9 of the threshold. Everything else (~1 % of the pixels of
    a night's frame, those near a threshold or with an empty slot) is left to the full logic
    (done[x] = False, its state untouched).

    Written without branches or gathers (the retained frames' weights come in `wts`, gathered by
    the caller) so that LLVM vectorises the loop: 9 instead of 35 ns/px per update and thread.
    acc = (S, W, n), ret = (hv0, hv1, lv0, hi0, hi1, li0) row slices; wts = (weight of hi0, weight
    of li0) per pixel; bounds = (κ_min²·A_min·(1 − δ), κ_high²·A_min·(1 − δ), κ_low²·A_min·(1 − δ),
    1e12·A_min, n_min) of the row's channel (negative thresholds: nothing is simple)."""
    s_r, w_r, n_r = acc
    h0_r, h1_r, l0_r, f0_r, f1_r, g0_r = ret
    wf_r, wg_r = wts
    qa, qh, ql, vmax2, n_min = bounds[0], bounds[1], bounds[2], bounds[3], int(bounds[4])
    n_nodata = 0
    for x in range(yr.shape[0]):
        v32 = yr[x]
        v = float(v32)
        fin = math.isfinite(v)
        n = int(n_r[x])
        s_acc = float(s_r[x])
        w_acc = float(w_r[x])
        h0 = h0_r[x]
        h1 = h1_r[x]
        l0 = l0_r[x]
        f0 = int(f0_r[x])
        f1 = int(f1_r[x])
        g0 = int(g0_r[x])
        # every slot filled and distinct; the centres are then trimmed means without hi0 and li0 (as
        # `_centre_k21` computes them); below n_min the sample is accepted untested
        ok = (n > 2) & (f0 != EMPTY) & (f1 != EMPTY) & (g0 != EMPTY) & (g0 != f0) & (g0 != f1)
        test_arrival = n >= n_min
        wf = wf_r[x]
        wg = wg_r[x]
        sret = 0.0
        wret = 0.0
        sret += wf * h0
        wret += wf
        sret += wg * l0
        wret += wg
        num = s_acc - sret
        den = w_acc - wret
        e = v * den - num
        ok &= (not test_arrival) | (not fin) | ((den > 1e-6 * w_acc) & (e * e < qa * (den * den)) & (v * v < vmax2))
        # accept and insert (`_insert_k21` with every slot filled)
        s1 = float(np.float32(s_acc + w_new * v)) if fin else s_acc
        w1 = float(np.float32(w_acc + w_new)) if fin else w_acc
        n1 = n + 1 if fin else n
        up0 = v32 > h0
        h0n = max(h0, v32)
        h1n = max(h1, min(h0, v32))
        l0n = min(l0, v32)
        f0n = slot if up0 else f0
        f1n = f0 if up0 else (slot if v32 > h1 else f1)
        g0n = slot if v32 < l0 else g0
        if not fin:
            h0n, h1n, l0n, f0n, f1n, g0n = h0, h1, l0, f0, f1, g0
        # the retroactive tests of the new hi0 and li0 against the new centre
        wfn = w_new if f0n == slot else wf
        wgn = w_new if g0n == slot else wg
        sret = 0.0
        wret = 0.0
        sret += wfn * h0n
        wret += wfn
        sret += wgn * l0n
        wret += wgn
        num = s1 - sret
        den = w1 - wret
        dd = den * den
        eh = h0n * den - num
        el = l0n * den - num
        keep = (g0n != f0n) & (den > 1e-6 * w1) & (eh * eh < qh * dd) & (el * el < ql * dd)
        keep &= (float(h0n) * float(h0n) < vmax2) & (float(l0n) * float(l0n) < vmax2)
        ok &= (n1 < n_min) | keep
        done[x] = ok
        n_nodata += ok & (not fin)
        # unconditional stores (the old value where the full logic takes over) keep the loop vectorisable
        s_r[x] = s1 if ok else s_acc
        w_r[x] = w1 if ok else w_acc
        n_r[x] = n1 if ok else n
        h0_r[x] = h0n if ok else h0
        h1_r[x] = h1n if ok else h1
        l0_r[x] = l0n if ok else l0
        f0_r[x] = f0n if ok else f0
        f1_r[x] = f1n if ok else f1
        g0_r[x] = g0n if ok else g0
    return n_nodata


@njit(cache=True, nogil=True, inline="always")
def _update_row_k21(
    yr: np.ndarray,
    slot: int,
    ch: int,
    acc: tuple[np.ndarray, ...],
    ret: tuple[np.ndarray, ...],
    ev: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    tab: np.ndarray,
    bg: tuple[np.ndarray, int, int, float, float],
    ke_tab: np.ndarray,
    params: np.ndarray,
    counts: np.ndarray,
    done: np.ndarray,
) -> None:
    """One row of `_update_k21` once tests can run, for the pixels `_simple_row_k21` left (done[x]
    False): acc = (S, W, n, r_lo, r_hi), ret = (hv0, hv1, lv0, hi0, hi1, li0) and ev = (ev_x, ev_f,
    ev_side, arrival) row slices; bg = (grid, iy, iy1, fy, 1/step) of the row's background.
    counts (out): events, deferred retroactive removals, arrival rejections beyond the buffer;
    NaN samples are added to counts[3]."""
    s_r, w_r, n_r, rlo_r, rhi_r = acc
    h0_r, h1_r, l0_r, f0_r, f1_r, g0_r = ret
    evx_r, evf_r, evs_r, arr_r = ev
    bgrid, iy, iy1, fy, inv_step = bg
    kl2, kh2, n_min, eps2 = params[0] ** 2, params[1] ** 2, int(params[2]), params[3] ** 2
    w_new = tab[ch, _T_W, slot]
    cap = evx_r.shape[0]
    k = 0
    n_nodata = 0
    n_over = 0
    n_arr_over = 0
    for x in range(yr.shape[0]):
        if done[x]:
            continue
        v = yr[x]
        n = int(n_r[x])
        s_acc = float(s_r[x])
        w_acc = float(w_r[x])
        h0 = h0_r[x]
        h1 = h1_r[x]
        l0 = l0_r[x]
        f0 = int(f0_r[x])
        f1 = int(f1_r[x])
        g0 = int(g0_r[x])
        # interpolated here for the few pixels that reach this logic (3 ns/px for a whole row)
        b = _bg(bgrid, ch, iy, iy1, fy, x, inv_step)
        changed = False
        # arrival test of v against the centre of the accepted samples
        if not math.isfinite(v):
            n_nodata += 1
        else:
            code = 0
            if n >= n_min:
                c, ncore = _centre_k21(s_acc, w_acc, n, h0, h1, l0, f0, f1, g0, tab, ch, float(v))
                if math.isfinite(c):
                    lim = ke_tab[ncore] * _var(tab, ch, slot, max(c - b, 0.0), eps2)
                    d = v - c
                    if d > 0 and d * d > kh2 * lim:
                        code = 2
                    elif d < 0 and d * d > kl2 * lim:
                        code = 1
            if code != 0:
                if k < cap:
                    evx_r[k] = x
                    evf_r[k] = slot
                    evs_r[k] = 4 + code
                    k += 1
                else:
                    if n_arr_over == 0:
                        arr_r[:] = 0
                    n_arr_over += 1
                    arr_r[x] = code
                if code == 2:
                    rhi_r[x] += 1
                else:
                    rlo_r[x] += 1
            else:
                changed = True
                s_acc = float(np.float32(s_acc + w_new * v))
                w_acc = float(np.float32(w_acc + w_new))
                n += 1
                h0, h1, l0, f0, f1, g0 = _insert_k21(v, slot, h0, h1, l0, f0, f1, g0)
        # retroactive test of the retained extremes against the new centre
        if n >= n_min and (f0 != EMPTY or g0 != EMPTY):
            c, ncore = _centre_k21(s_acc, w_acc, n, h0, h1, l0, f0, f1, g0, tab, ch, math.nan)
            if math.isfinite(c):
                s_c = max(c - b, 0.0)
                ke2 = ke_tab[ncore]
                while f0 != EMPTY and n >= n_min:
                    d = h0 - c
                    if not (d > 0 and d * d > kh2 * ke2 * _var(tab, ch, f0, s_c, eps2)):
                        break
                    if k >= cap:
                        n_over += 1
                        break
                    evx_r[k] = x
                    evf_r[k] = f0
                    evs_r[k] = 2
                    k += 1
                    wf = tab[ch, _T_W, f0]
                    s_acc = float(np.float32(s_acc - wf * h0))
                    w_acc = float(np.float32(w_acc - wf))
                    n -= 1
                    rhi_r[x] += 1
                    changed = True
                    if g0 == f0:
                        l0, g0 = _NAN32, EMPTY
                    h0, f0 = h1, f1
                    h1, f1 = _NAN32, EMPTY
                while g0 != EMPTY and n >= n_min:
                    d = c - l0
                    if not (d > 0 and d * d > kl2 * ke2 * _var(tab, ch, g0, s_c, eps2)):
                        break
                    if k >= cap:
                        n_over += 1
                        break
                    evx_r[k] = x
                    evf_r[k] = g0
                    evs_r[k] = 1
                    k += 1
                    wg = tab[ch, _T_W, g0]
                    s_acc = float(np.float32(s_acc - wg * l0))
                    w_acc = float(np.float32(w_acc - wg))
                    n -= 1
                    rlo_r[x] += 1
                    changed = True
                    if f0 == g0:
                        h0, f0 = h1, f1
                        h1, f1 = _NAN32, EMPTY
                    elif f1 == g0:
                        h1, f1 = _NAN32, EMPTY
                    l0, g0 = _NAN32, EMPTY
        if changed:
            s_r[x] = s_acc
            w_r[x] = w_acc
            n_r[x] = n
            h0_r[x] = h0
            h1_r[x] = h1
            f0_r[x] = f0
            f1_r[x] = f1
            l0_r[x] = l0
            g0_r[x] = g0
    counts[0] = k
    counts[1] = n_over
    counts[2] = n_arr_over
    counts[3] += n_nodata


@njit(cache=True, nogil=True, parallel=True)
def _update_k21(
    y: np.ndarray,
    slot: int,
    acc: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    ret: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    tab: np.ndarray,
    bgrid: np.ndarray,
    params: np.ndarray,
    arrival: np.ndarray,
    events: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """`_update_kernel` specialised to k_high = 2, k_low = 1 (the default), with the same decisions
    (tests compare the states bit for bit).

    Each row in which tests can run takes two passes: `_simple_row_k21` (vectorised) finishes the
    pixels whose update is certainly a plain accept-and-insert (~99 % of a night's frame), then
    `_update_row_k21` runs the full logic on the rest. Per update and thread (one thread, 3.2 Mpx
    of the bench's frames, loaded 2-core machine): 9 ns/px, where the full logic alone (the
    previous kernel) cost 35 (generic kernel ~38); rows that cannot be tested yet take
    `_accept_row_k21` (no centre, noise model or retroactive test), 11-13 ns/px. In the full logic
    the pixel's state lives in registers and is stored only where it changed; the insertion of a new
    extreme avoids unpredictable branches (`_insert_k21`); 1 + 1/n_core comes from a table; per-row
    counters stay local; the arrival plane is written only in rows whose event buffer overflowed.
    params[6] = 0 turns the simple pass off (tests compare both ways)."""
    S, Wt, N, RLO, RHI = acc
    hv, hi, lv, li = ret
    ev_x, ev_f, ev_side, ev_n, overflow, arr_over, nodata, full_px = events
    n_min, step, hrows = int(params[2]), params[4], int(params[5])
    inv_step = 1.0 / step
    rows, width = y.shape
    gh = bgrid.shape[1]
    w_new = tab[0, _T_W, slot]
    # κ_eff²/κ² = 1 + 1/max(n_core, 1) for every possible n_core (uint16 counts)
    ke_tab = np.empty(EMPTY + 1, np.float64)
    for i in range(EMPTY + 1):
        ke_tab[i] = 1.0 + 1.0 / max(i, 1)
    # the simple pass's thresholds per channel (see `_simple_row_k21`): A and B over every slot
    # used so far (excluded frames too: a lower bound needs no knowledge of which are retained)
    bounds = np.empty((tab.shape[0], 5), np.float64)
    kl2, kh2, margin = params[0] ** 2, params[1] ** 2, 1.0 - 1e-4
    for c_ in range(tab.shape[0]):
        a_min = math.inf
        b_min = math.inf
        for f in range(slot + 1):
            a_min = min(a_min, tab[c_, _T_A, f])
            b_min = min(b_min, tab[c_, _T_B, f])
        usable = params[6] != 0 and a_min > 0 and b_min >= 0 and math.isfinite(a_min) and math.isfinite(b_min)
        bounds[c_, 0] = min(kl2, kh2) * a_min * margin if usable else -1.0
        bounds[c_, 1] = kh2 * a_min * margin if usable else -1.0
        bounds[c_, 2] = kl2 * a_min * margin if usable else -1.0
        bounds[c_, 3] = 1e12 * a_min if usable else -1.0
        bounds[c_, 4] = n_min
    # per row: events, deferred removals, arrival overflow, NaN samples, pixels through the full logic
    counts = np.zeros((rows, 5), np.int64)
    for r in prange(rows):
        ch = r // hrows
        ret_r = (hv[0, r], hv[1, r], lv[0, r], hi[0, r], hi[1, r], li[0, r])
        n_max = 0
        for x in range(width):
            n_max = max(n_max, int(N[r, x]))
        if n_max + 1 < n_min:
            counts[r, 3] = _accept_row_k21(y[r], slot, w_new, (S[r], Wt[r], N[r]), ret_r)
        else:
            # the retained extremes' weights, gathered apart: a gather in the simple pass's loop
            # would keep LLVM from vectorising it
            wf = np.empty(width, np.float64)
            wg = np.empty(width, np.float64)
            for x in range(width):
                f0 = hi[0, r, x]
                g0 = li[0, r, x]
                wf[x] = tab[ch, _T_W, f0 if f0 != EMPTY else slot]
                wg[x] = tab[ch, _T_W, g0 if g0 != EMPTY else slot]
            done = np.empty(width, np.bool_)
            counts[r, 3] = _simple_row_k21(y[r], (S[r], Wt[r], N[r]), ret_r, (wf, wg), done, slot, w_new, bounds[ch])
            n_full = 0
            for x in range(width):
                n_full += not done[x]
            counts[r, 4] = n_full
            if n_full:
                yy = (r - ch * hrows) * inv_step
                iy = min(int(yy), gh - 1)
                iy1 = min(iy + 1, gh - 1)
                fy = yy - iy if iy1 > iy else 0.0
                _update_row_k21(
                    y[r], slot, ch, (S[r], Wt[r], N[r], RLO[r], RHI[r]), ret_r,
                    (ev_x[r], ev_f[r], ev_side[r], arrival[r]), tab, (bgrid, iy, iy1, fy, inv_step), ke_tab,
                    params, counts[r], done,
                )
    # copied after the loop: stores into the 1-d per-row arrays inside this prange body were lost
    # (numba 0.61 parfor lowering; the serial compile of the same code kept them). The full-logic
    # row helper is inlined: as a call it cost 48 instead of 35 ns/px.
    for r in range(rows):
        ev_n[r] = counts[r, 0]
        overflow[r] = counts[r, 1]
        arr_over[r] = counts[r, 2]
        nodata[r] = counts[r, 3]
        full_px[r] = counts[r, 4]


@njit(cache=True, nogil=True, inline="always")
def _median4(a0: float, a1: float, a2: float, a3: float) -> float:
    """Median of the non-NaN values among four (NaN if none)."""
    buf0 = math.nan
    buf1 = math.nan
    buf2 = math.nan
    buf3 = math.nan
    nb = 0
    for v in (a0, a1, a2, a3):
        if not math.isnan(v):
            if nb == 0:
                buf0 = v
            elif nb == 1:
                buf1 = v
            elif nb == 2:
                buf2 = v
            else:
                buf3 = v
            nb += 1
    if nb == 0:
        return math.nan
    # sort the nb values (a tiny network)
    if nb >= 2 and buf1 < buf0:
        buf0, buf1 = buf1, buf0
    if nb >= 3:
        if buf2 < buf1:
            buf1, buf2 = buf2, buf1
        if buf1 < buf0:
            buf0, buf1 = buf1, buf0
    if nb == 4:
        if buf3 < buf2:
            buf2, buf3 = buf3, buf2
        if buf2 < buf1:
            buf1, buf2 = buf2, buf1
        if buf1 < buf0:
            buf0, buf1 = buf1, buf0
    if nb == 1:
        return buf0
    if nb == 2:
        return 0.5 * (buf0 + buf1)
    if nb == 3:
        return buf1
    return 0.5 * (buf1 + buf2)


@njit(cache=True, nogil=True, parallel=True)
def _exclude_kernel(
    y: np.ndarray,
    slot: int,
    w: float,
    rej: np.ndarray,
    acc: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    ret: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    S, Wt, N, RLO, RHI = acc
    hv, hi, lv, li = ret
    rows, width = y.shape
    for r in prange(rows):
        for x in range(width):
            v = y[r, x]
            if not math.isfinite(v):
                continue
            code = rej[r, x]
            if code == 1:
                if RLO[r, x] > 0:
                    RLO[r, x] -= 1
            elif code == 2:
                if RHI[r, x] > 0:
                    RHI[r, x] -= 1
            else:
                S[r, x] = np.float32(float(S[r, x]) - w * v)
                Wt[r, x] = np.float32(float(Wt[r, x]) - w)
                if N[r, x] > 0:
                    N[r, x] -= 1
                if N[r, x] == 0:
                    S[r, x] = 0.0
                    Wt[r, x] = 0.0
                _drop_slot(hv, hi, slot, r, x)
                _drop_slot(lv, li, slot, r, x)


@njit(cache=True, nogil=True, parallel=True)
def _extremes_kernel(
    vals: np.ndarray,
    codes: np.ndarray,
    slots: np.ndarray,
    todo: np.ndarray,
    hv: np.ndarray,
    hi: np.ndarray,
    lv: np.ndarray,
    li: np.ndarray,
) -> None:
    """The retained extremes of the accepted samples, from a band of all frames (N, h, W) and the
    batch integrator's decision on each sample (codes (N, h, W): reject.KEEP or integrate's
    CANDIDATE = accepted); todo (h, W) bool: only those pixels (shape (0, 0): all)."""
    nf, h, width = vals.shape
    kh = hv.shape[0]
    kl = lv.shape[0]
    every = todo.shape[0] == 0
    for r in prange(h):
        for x in range(width):
            if not every and not todo[r, x]:
                continue
            for j in range(kh):
                hi[j, r, x] = EMPTY
                hv[j, r, x] = np.nan
            for j in range(kl):
                li[j, r, x] = EMPTY
                lv[j, r, x] = np.nan
        # frame by frame along the row (the frames lie h·W apart: a pixel-major loop over them ran
        # 1.3x slower at 30 frames of 26 MP); each pixel still sees its samples in frame order
        for i in range(nf):
            s = slots[i]
            for x in range(width):
                c = codes[i, r, x]
                if (c == _reject.KEEP or c == _CANDIDATE) and (every or todo[r, x]):
                    v = vals[i, r, x]
                    _insert(hv, hi, v, s, r, x, True)
                    _insert(lv, li, v, s, r, x, False)


@njit(cache=True, nogil=True, parallel=True)
def _image_kernel(
    S: np.ndarray,
    Wt: np.ndarray,
    N: np.ndarray,
    RLO: np.ndarray,
    RHI: np.ndarray,
    hv: np.ndarray,
    hi: np.ndarray,
    lv: np.ndarray,
    li: np.ndarray,
    tab: np.ndarray,
    bgrid: np.ndarray,
    h: int,
    inv_step: float,
    code: int,
    params: np.ndarray,
    nm_par: np.ndarray,
    n_exact: int,
    quiet_kappa: float,
    out: np.ndarray,
) -> None:
    """S/W, except at pixels whose accepted samples are all known: there the batch integrator's
    decision (rejection `code` with `params`, floored by the pooled noise model as
    integrate.NoiseModel floors it) and its weighted mean of the kept samples.

    A pixel's samples are known when none was rejected and at most one accepted sample is not
    retained (n ≤ retained + 1: that one is (S − Σw·y)/(W − Σw) over the retained ones). Below
    `n_min` live rejects nothing, so without this the first frames (and the edges of a dithered
    stack, covered by few frames all night) kept every cosmic ray until the n_min-th frame or the
    next exact pass; the accumulators are left as they are, so the decision is redone from all
    the samples after every frame, as batch does. Quiet pixels (reject.quiet_count with
    `quiet_kappa`: nearly all) skip the rejector, whose generic per-pixel cost is ~120 ns."""
    rows, width = S.shape
    kh = hv.shape[0]
    kl = lv.shape[0]
    gh = bgrid.shape[1]
    for r in prange(rows):
        ch = r // h
        yy = (r - ch * h) * inv_step
        iy = min(int(yy), gh - 1)
        iy1 = min(iy + 1, gh - 1)
        fy = yy - iy if iy1 > iy else 0.0
        vals = np.empty(n_exact, np.float32)
        wts = np.empty(n_exact, np.float64)
        slots = np.empty(n_exact, np.int64)
        mask = np.empty(n_exact, np.uint8)
        work = np.empty((_reject.WORK_ROWS, n_exact), np.float64)
        buf = np.empty(n_exact, np.float64)
        floor = np.empty(_reject.FLOOR_SIZE, np.float64)
        for x in range(width):
            wsum = float(Wt[r, x])
            if not (wsum > 0.0):
                out[r, x] = np.nan
                continue
            out[r, x] = S[r, x] / Wt[r, x]
            n = int(N[r, x])
            if code == 0 or n < 2 or n > n_exact or RLO[r, x] != 0 or RHI[r, x] != 0:
                continue
            m = 0
            for j in range(kh + kl):
                s = int(hi[j, r, x]) if j < kh else int(li[j - kh, r, x])
                if s == EMPTY:
                    continue
                seen = False
                for q in range(m):
                    if slots[q] == s:
                        seen = True
                if seen or m >= n:
                    continue
                slots[m] = s
                vals[m] = hv[j, r, x] if j < kh else lv[j - kh, r, x]
                wts[m] = tab[ch, _T_W, s]
                m += 1
            if m + 1 == n:  # the one sample not retained
                sy = 0.0
                sw = 0.0
                for q in range(m):
                    sy += wts[q] * vals[q]
                    sw += wts[q]
                wr = wsum - sw
                if not (wr > 1e-6 * wsum):
                    continue
                vals[m] = (float(S[r, x]) - sy) / wr
                wts[m] = wr
                slots[m] = slots[0]  # the noise model is pooled: every slot has the same A, B
                m += 1
            if m != n:
                continue
            floor[0] = tab[ch, _T_A, slots[0]]
            floor[1] = tab[ch, _T_B, slots[0]]
            floor[2] = nm_par[0]
            floor[3] = _bg(bgrid, ch, iy, iy1, fy, x, inv_step)
            floor[4] = nm_par[1]
            floor[5] = nm_par[2]
            for q in range(n):
                mask[q] = _reject.KEEP
            if _reject.quiet_count(vals[:n], mask[:n], floor, quiet_kappa) >= 0:
                continue  # the rejector could reject nothing: S/W is the batch result
            kept = _reject.run_rejection(code, vals[:n], wts[:n], params, mask[:n], work, floor)
            sy = 0.0
            sw = 0.0
            if kept == 0:  # as the batch integrator: the median of all samples
                for q in range(n):
                    buf[q] = vals[q]
                out[r, x] = _reject._median_buf(buf, n)
                continue
            for q in range(n):
                if mask[q] == _reject.KEEP:
                    sy += wts[q] * vals[q]
                    sw += wts[q]
            out[r, x] = sy / sw


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameRecord:
    """One frame of the live stack: its id, slot and per-channel noise-model parameters."""

    frame_id: str
    slot: int
    weight: float
    scale: tuple[float, ...]
    noise: tuple[float, ...]
    rho: float
    gain: float | None
    excluded: bool = False


@dataclass(frozen=True)
class UpdateResult:
    """What one update did: arrival rejections, retroactive removals (from earlier frames)."""

    frame_id: str
    n_frames: int
    duplicate: bool
    rejected_low: int
    rejected_high: int
    no_data: int
    retro_removed: int
    overflow_rows: int


@dataclass(frozen=True)
class ExactResult:
    """What an exact pass did: the algorithm and parameters used and the frames integrated."""

    rejection: str
    params: dict[str, float]
    n_frames: int


class _Rejections:
    """Per-frame rejection lists (flat index << 2 | side, int64), slot -> list.

    In memory, or, with a directory, spilled to one append-only raw file per frame
    (``<slot>.rej``) so that the stack's RAM does not grow with the number of frames (§10: at 26 MP
    a frame's list is ~0.3 MB of arrival rejections plus the retroactive ones; 300 frames held
    ~0.1 GB). The lists are read only for an exclusion and for checkpoints."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._mem: dict[int, list[np.ndarray]] = {}
        self._count: dict[int, int] = {}
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            for old in directory.glob("*.rej"):  # a new stack starts without lists
                old.unlink()

    def _path(self, slot: int) -> Path:
        assert self.directory is not None
        return self.directory / f"{slot}.rej"

    def slots(self) -> list[int]:
        return sorted(self._count)

    def count(self, slot: int) -> int:
        return self._count.get(slot, 0)

    def ensure(self, slot: int) -> None:
        """Make an (empty) list exist for a slot."""
        if slot not in self._count:
            self._count[slot] = 0
            if self.directory is None:
                self._mem[slot] = []
            else:
                self._path(slot).touch()

    def append(self, slot: int, enc: np.ndarray) -> None:
        self.ensure(slot)
        enc = np.ascontiguousarray(enc, np.int64)
        if not enc.size:
            return
        if self.directory is None:
            self._mem[slot].append(enc)
        else:
            with open(self._path(slot), "ab") as fh:
                fh.write(enc.data)
        self._count[slot] += int(enc.size)

    def get(self, slot: int) -> np.ndarray:
        if slot not in self._count:
            return np.empty(0, np.int64)
        if self.directory is None:
            chunks = self._mem[slot]
            return np.concatenate(chunks) if chunks else np.empty(0, np.int64)
        return np.fromfile(self._path(slot), np.int64, count=self._count[slot])

    def drop(self, slot: int) -> None:
        if self._count.pop(slot, None) is not None:
            if self.directory is None:
                del self._mem[slot]
            else:
                self._path(slot).unlink(missing_ok=True)

    def clear(self) -> None:
        for slot in list(self._count):
            self.drop(slot)

    def set(self, slot: int, enc: np.ndarray) -> None:
        """Replace a slot's list."""
        self.drop(slot)
        self.append(slot, enc)

    def sibling(self) -> _Rejections:
        """Empty lists of the same kind beside these (``<dir>.new``), for `adopt`."""
        if self.directory is None:
            return _Rejections(None)
        return _Rejections(self.directory.with_name(self.directory.name + ".new"))

    def adopt(self, other: _Rejections) -> None:
        """Replace every list by other's (a `sibling`), which is consumed."""
        self.clear()
        if self.directory is not None and other.directory is not None:
            for slot in other.slots():
                os.replace(other._path(slot), self._path(slot))
            self._count = dict(other._count)
            other._count.clear()
        else:
            for slot in other.slots():
                self.set(slot, other.get(slot))
        other.discard()

    def discard(self) -> None:
        """Drop every list and the folder."""
        self.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def values(self) -> list[list[np.ndarray]]:
        """The chunk lists held in RAM (none when spilled): bench_service sums their bytes."""
        return list(self._mem.values())

    def in_memory_copy(self) -> _Rejections:
        """An independent copy held in memory (a snapshot must not see later appends)."""
        new = _Rejections(None)
        for slot in self.slots():
            new.ensure(slot)
            new.append(slot, self.get(slot))
        return new



def _read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view of `a` (handed out without a copy: callers must not change the state)."""
    v = a.view()
    v.flags.writeable = False
    return v


class _StateFromBatch:
    """The live state's retained extremes and rejection lists rebuilt from the batch integrator's
    decisions as it makes them (`integrate`'s on_band), band by band: the frames are not read again,
    and the lists hold the samples the batch rejected, large-scale rejections included (inferring
    them from the rejected counts took the extreme values, which a grown trail's edge is not)."""

    def __init__(self, live: LiveStack, slots: list[int], rejections: _Rejections) -> None:
        self.live = live
        self.slots = slots
        self.slot_arr = np.array(slots, np.uint16)
        self.rejections = rejections
        for s in slots:
            rejections.ensure(s)
        self.redone = np.zeros(0, bool)  # (H·W) pixels whose pass-1 decisions pass 2 replaced
        self.redone_lists: dict[int, list[np.ndarray]] = {}

    def band(self, y0: int, y1: int, band: np.ndarray, codes: np.ndarray, redo: np.ndarray | None) -> None:
        """`integrate`'s on_band: rows [y0, y1) of every channel, every pixel or those in redo."""
        live = self.live
        h, w = live._h, live._w
        todo = _NO_PIXELS if redo is None else redo
        if redo is not None and self.redone.size == 0:
            self.redone = np.zeros(h * w, bool)
        for ch in range(live._c):
            r0, r1 = ch * h + y0, ch * h + y1
            _extremes_kernel(band[ch], codes[ch], self.slot_arr, todo,
                             live._hv[:, r0:r1], live._hi[:, r0:r1], live._lv[:, r0:r1], live._li[:, r0:r1])
            for i, s in enumerate(self.slots):
                c = codes[ch, i]
                rejected = (c == _reject.LOW) | (c == _reject.HIGH)
                if redo is not None:
                    rejected &= redo
                idx = np.flatnonzero(rejected)
                if not idx.size:
                    continue
                enc = ((idx.astype(np.int64) + r0 * w) << 2) | c.ravel()[idx].astype(np.int64)
                if redo is None:
                    self.rejections.append(s, enc)
                else:
                    self.redone_lists.setdefault(s, []).append(enc)
        if redo is not None:
            self.redone[y0 * w : y1 * w] |= redo.ravel()

    def finish(self) -> _Rejections:
        """The lists, pass 2's decisions in place of pass 1's where it recomputed a pixel."""
        if self.redone.any():
            hw = self.live._h * self.live._w
            for s in self.slots:
                enc = self.rejections.get(s)
                keep = enc[~self.redone[(enc >> 2) % hw]]
                self.rejections.set(s, np.concatenate([keep, *self.redone_lists.get(s, [])]))
        return self.rejections


_NO_PIXELS = np.zeros((0, 0), np.bool_)


class LiveStack:
    """A running integration with retroactive rejection; memory independent of the frame count.

    Parameters
    ----------
    shape : (H, W) or (C, H, W) of the normalised frames.
    k_high, k_low : retained extreme samples per pixel. Default is 2 and 1.
    kappa_low, kappa_high : rejection thresholds in σ of the noise model. Default is 4.0 and 3.0.
    n_min : no rejection before this many accepted samples. Default is 5.
    epsilon : relative scale-noise term of the noise model. Default is 0.3 (see integrate.NoiseModel).
    background : the reference background b_ref: a scalar, or a coarse grid (C, gh, gw) / (gh, gw)
        with nodes every `background_step_px`. Default is 0.0.
    background_step_px : node spacing of the background grid. Default is 64.
    event_capacity : retroactive removals recorded per row and update (more are deferred to the
        next exact pass and the row is marked dirty). Default is None (W // 4, at least 256).
    rejections_dir : a directory of its own where the per-frame rejection lists are spilled (one
        append-only file per frame; existing lists in it are deleted), so that RAM does not grow
        with the frame count. Default is None (kept in memory).
    rejection, rejection_params : the batch integrator's rejection ("auto": §7.5 by frame count),
        which `image` applies where a pixel's samples are all known. Default is "auto", None.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        *,
        k_high: int = 2,
        k_low: int = 1,
        kappa_low: float = 4.0,
        kappa_high: float = 3.0,
        n_min: int = 5,
        epsilon: float = 0.3,
        background: float | np.ndarray = 0.0,
        background_step_px: int = 64,
        event_capacity: int | None = None,
        rejections_dir: str | os.PathLike[str] | None = None,
        rejection: str = "auto",
        rejection_params: dict[str, float] | None = None,
    ) -> None:
        shp = tuple(int(v) for v in shape)
        if len(shp) == 2:
            c, h, w = 1, shp[0], shp[1]
        elif len(shp) == 3:
            c, h, w = shp
        else:
            raise StackwatchError(f"live stack shape must be (H, W) or (C, H, W), got {shape}")
        if min(c, h, w) <= 0 or not (1 <= k_high <= 8 and 1 <= k_low <= 8):
            raise StackwatchError(f"live stack: invalid shape {shape} or k_high/k_low {k_high}/{k_low}")
        self.shape = shp
        self._c, self._h, self._w = c, h, w
        self.k_high, self.k_low = int(k_high), int(k_low)
        self.kappa_low, self.kappa_high = float(kappa_low), float(kappa_high)
        self.n_min = int(n_min)
        if rejection != "auto":
            _reject.get_rejection(rejection)  # an unknown name fails here, not at the first image
        self.rejection = str(rejection)
        self.rejection_params = dict(rejection_params or {})
        self.epsilon = float(epsilon)
        self.background_step_px = int(background_step_px)
        self._bgrid = self._make_bgrid(background)
        rows = c * h
        self._S = np.zeros((rows, w), np.float32)
        self._Wt = np.zeros((rows, w), np.float32)
        self._N = np.zeros((rows, w), np.uint16)
        self._RLO = np.zeros((rows, w), np.uint16)
        self._RHI = np.zeros((rows, w), np.uint16)
        self._hv = np.full((self.k_high, rows, w), np.nan, np.float32)
        self._hi = np.full((self.k_high, rows, w), EMPTY, np.uint16)
        self._lv = np.full((self.k_low, rows, w), np.nan, np.float32)
        self._li = np.full((self.k_low, rows, w), EMPTY, np.uint16)
        self._tab = np.zeros((c, _T_ROWS, 64), np.float64)
        self._frames: list[FrameRecord] = []
        self._by_id: dict[str, int] = {}
        self._rej = _Rejections(None if rejections_dir is None else Path(rejections_dir))
        self._dirty = np.zeros(rows, np.bool_)
        self._exact: np.ndarray | None = None
        self.generation = 0
        cap = event_capacity if event_capacity is not None else max(256, w // 4)
        self._cap = int(cap)
        self._arrival: np.ndarray | None = None
        self._generic = False  # tests: force the generic kernel
        self._simple = True  # tests: False sends every pixel through the full logic of the k21 kernel
        self._events: tuple[np.ndarray, ...] | None = None
        #: pixels of the last update that went through the full logic (the rest took the simple pass)
        self._full_path_px = 0

    # ---------------------------------------------------------------- helpers
    def _make_bgrid(self, background: float | np.ndarray) -> np.ndarray:
        b = np.asarray(background, np.float64)
        if b.ndim == 0:
            return np.full((self._c, 1, 1), float(b))
        if b.ndim == 2:
            b = np.broadcast_to(b, (self._c, *b.shape))
        if b.ndim != 3 or b.shape[0] != self._c:
            raise StackwatchError(f"background grid shape {b.shape} does not fit a stack of shape {self.shape}")
        # a copy: a contiguous (1, gh, gw) broadcast view is read-only, a different numba type (a
        # second 20 s compile of the update kernel on the first frame)
        return np.array(b, np.float64, order="C", copy=True)

    def _rows(self, a: np.ndarray, what: str) -> np.ndarray:
        arr = np.asarray(a)
        if tuple(arr.shape) != self.shape:
            raise StackwatchError(f"{what}: shape {arr.shape} does not match the live stack's {self.shape}")
        return np.ascontiguousarray(arr.reshape(self._c * self._h, self._w), dtype=np.float32)

    def _per_channel(self, v: float | Sequence[float], what: str) -> tuple[float, ...]:
        arr = np.atleast_1d(np.asarray(v, np.float64))
        if arr.size == 1:
            arr = np.repeat(arr, self._c)
        if arr.size != self._c or not np.all(np.isfinite(arr)):
            raise StackwatchError(f"{what}: need 1 or {self._c} finite values, got {v!r}")
        return tuple(float(x) for x in arr)

    def _ensure_slot_capacity(self, slot: int) -> None:
        if slot >= self._tab.shape[2]:
            new = np.zeros((self._c, _T_ROWS, max(slot + 1, 2 * self._tab.shape[2])), np.float64)
            new[:, :, : self._tab.shape[2]] = self._tab
            self._tab = new

    def _set_tab(self, rec: FrameRecord) -> None:
        self._ensure_slot_capacity(rec.slot)
        for ch in range(self._c):
            self._tab[ch, _T_W, rec.slot] = 0.0 if rec.excluded else rec.weight
            self._tab[ch, _T_M, rec.slot] = rec.scale[ch]
            self._tab[ch, _T_S, rec.slot] = rec.noise[ch]
            self._tab[ch, _T_RHO, rec.slot] = rec.rho
            self._tab[ch, _T_IG, rec.slot] = 0.0 if not rec.gain else 1.0 / rec.gain
        self._pool_noise(rec)

    def _pool_noise(self, rec: FrameRecord | None = None) -> None:
        """Noise-model coefficients A = ρ(mσ)², B = ρm/g pooled (averaged) over the included frames.

        The batch rejectors test every sample of a pixel against one σ (the stack's own scatter,
        floored by the same pooled model: integrate.NoiseModel); testing each live sample against its
        own frame's σ instead made the two disagree on borderline samples of the sharpest and the
        noisiest frames (RMS live − batch 0.115σ → 0.10σ on the test night)."""
        frames = list(self._frames)
        if rec is not None:  # a frame being added is not in the list yet
            if rec.slot < len(frames):
                frames[rec.slot] = rec
            else:
                frames.append(rec)
        incl = [f for f in frames if not f.excluded]
        if not incl:
            return
        slots = [f.slot for f in incl]
        for ch in range(self._c):
            a = [f.rho * (f.scale[ch] * f.noise[ch]) ** 2 for f in incl]
            b = [f.rho * f.scale[ch] * (1.0 / f.gain if f.gain else 0.0) for f in incl]
            self._tab[ch, _T_A, slots] = float(np.mean(a))
            self._tab[ch, _T_B, slots] = float(np.mean(b))

    def _acc(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return (self._S, self._Wt, self._N, self._RLO, self._RHI)

    def _ret(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return (self._hv, self._hi, self._lv, self._li)

    def _params(self) -> np.ndarray:
        return np.array(
            [self.kappa_low, self.kappa_high, self.n_min, self.epsilon, self.background_step_px, self._h,
             1.0 if self._simple else 0.0],
            np.float64,
        )

    # ---------------------------------------------------------------- properties
    @property
    def frames(self) -> tuple[FrameRecord, ...]:
        """Every frame ever added (excluded ones flagged), in arrival order."""
        return tuple(self._frames)

    @property
    def frame_ids(self) -> tuple[str, ...]:
        """Ids of the frames currently included."""
        return tuple(f.frame_id for f in self._frames if not f.excluded)

    @property
    def n_frames(self) -> int:
        return sum(1 for f in self._frames if not f.excluded)

    @property
    def nbytes(self) -> int:
        """Bytes held by the per-pixel state (the accumulators and retained extremes)."""
        arrs = (self._S, self._Wt, self._N, self._RLO, self._RHI, self._hv, self._hi, self._lv, self._li)
        return int(sum(a.nbytes for a in arrs))

    def _shape_out(self, a: np.ndarray) -> np.ndarray:
        return a.reshape(self.shape)

    def image(self, *, copy: bool = True) -> np.ndarray:
        """The current stack (float32, NaN where no accepted sample): the exact-pass image if no
        update happened since, else S/W; where every accepted sample of a pixel is known (the first
        frames, the edges few frames cover: see `_image_kernel`), the batch integrator's result
        from them. ``copy=False``: the exact-pass image itself, read-only (valid until the next
        update), instead of a 0.1 GB copy at 26 MP."""
        if self._exact is not None:
            return self._exact.copy() if copy else _read_only(self._exact)
        out = np.empty(self._S.shape, np.float32)
        code, packed, nm_par = self._batch_rule()
        quiet = _reject.quiet_kappa(code, packed, (self.kappa_low, self.kappa_high))
        _image_kernel(self._S, self._Wt, self._N, self._RLO, self._RHI, self._hv, self._hi, self._lv, self._li,
                      self._tab, self._bgrid, self._h, 1.0 / self.background_step_px, code, packed, nm_par,
                      self.k_high + self.k_low + 1, quiet, out)
        return self._shape_out(out)

    @property
    def is_exact(self) -> bool:
        """Whether `image` is the exact pass's result (the batch integration of the included frames):
        no update or exclusion since the last exact pass."""
        return self._exact is not None

    def _batch_rule(self) -> tuple[int, np.ndarray, np.ndarray]:
        """The batch integrator's rejection for the included frames (registry code, packed
        parameters) and its noise-floor parameters (ε², κ_low, κ_high), as `exact_pass` runs it."""
        n = max(1, self.n_frames)
        name, params = self.rejection, dict(self.rejection_params or {})
        if name == "auto":
            name, auto_params = _reject.auto_rejection(n)
            params = {**auto_params, **params}
        spec = _reject.get_rejection(name)
        nm_par = np.array([self.epsilon**2, self.kappa_low, self.kappa_high], np.float64)
        return spec.code, spec.pack(params, n_max=n), nm_par

    def coverage(self) -> np.ndarray:
        """Valid samples per pixel (accepted + rejected), uint16."""
        # all three are uint16 and at most 65535 frames: no int32 temporaries (0.1 GB each at 26 MP)
        out = self._RLO + self._RHI
        out += self._N
        return self._shape_out(out)

    def rejection_counts(self, *, copy: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Rejected counts (low, high) per pixel; ``copy=False``: the planes themselves, read-only
        (valid until the next update)."""
        if not copy:
            return self._shape_out(_read_only(self._RLO)), self._shape_out(_read_only(self._RHI))
        return self._shape_out(self._RLO.copy()), self._shape_out(self._RHI.copy())

    def weight_sum(self, *, copy: bool = True) -> np.ndarray:
        """Weight of the accepted samples per pixel; ``copy=False``: the plane itself, read-only."""
        return self._shape_out(self._Wt.copy() if copy else _read_only(self._Wt))

    def accepted_count(self) -> np.ndarray:
        return self._shape_out(self._N.copy())

    def dirty_rows(self) -> np.ndarray:
        """Rows (of the (C·H, W) plane stack) where a retroactive removal or deferred event happened
        since the last exact pass: candidates for a banded exact pass."""
        return self._dirty.copy()

    def rejections(self, frame_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Flat pixel indices (into the (C·H·W) image) and sides (1 low, 2 high) rejected in a frame."""
        enc = self._rej.get(self._slot(frame_id))
        return enc >> 2, (enc & 3).astype(np.uint8)

    def _slot(self, frame_id: str) -> int:
        if frame_id not in self._by_id:
            raise StackwatchError(f"frame {frame_id!r} is not in the live stack")
        return self._by_id[frame_id]

    # ---------------------------------------------------------------- update
    def update(
        self,
        frame_id: str,
        y: np.ndarray,
        *,
        weight: float,
        scale: float | Sequence[float] = 1.0,
        noise: float | Sequence[float],
        rho: float = 1.0,
        gain: float | None = None,
    ) -> UpdateResult:
        """Add a normalised frame y (NaN = no data). Idempotent by frame id.

        Parameters
        ----------
        frame_id : unique id of the frame (e.g. its catalogue id or path).
        y : normalised frame, the stack's shape.
        weight : integration weight (NWEIGHT), > 0.
        scale : photometric scale m (one value or per channel). Default is 1.0.
        noise : pre-resampling noise σ of the un-normalised frame (one value or per channel).
        rho : mean resampling variance factor Σw²/(Σw)². Default is 1.0.
        gain : effective gain in e⁻ per unit of normalised signal; None = no shot-noise term.
            Default is None.
        """
        if frame_id in self._by_id:
            return UpdateResult(frame_id, self.n_frames, True, 0, 0, 0, 0, 0)
        if not (math.isfinite(weight) and weight > 0):
            raise StackwatchError(f"frame {frame_id!r}: weight must be finite and > 0, got {weight}")
        if len(self._frames) >= _MAX_SLOTS:
            raise StackwatchError(f"live stack is full ({_MAX_SLOTS} frames); run an exact pass into a new stack")
        rows = self._rows(y, f"frame {frame_id!r}")
        slot = len(self._frames)
        rec = FrameRecord(
            frame_id=frame_id,
            slot=slot,
            weight=float(weight),
            scale=self._per_channel(scale, "scale"),
            noise=self._per_channel(noise, "noise"),
            rho=float(rho),
            gain=None if gain is None else float(gain),
        )
        self._set_tab(rec)
        nrow = rows.shape[0]
        if self._arrival is None or self._events is None:
            self._arrival = np.zeros(rows.shape, np.uint8)  # written only in overflowing rows
            self._events = (
                np.empty((nrow, self._cap), np.int32),
                np.empty((nrow, self._cap), np.uint16),
                np.empty((nrow, self._cap), np.uint8),
                np.zeros(nrow, np.int32),
                np.zeros(nrow, np.int32),
                np.zeros(nrow, np.int32),
                np.zeros(nrow, np.int32),
                np.zeros(nrow, np.int32),
            )
        ev = self._events
        assert ev is not None
        kernel = _update_k21 if (self.k_high, self.k_low) == (2, 1) and not self._generic else _update_kernel
        kernel(rows, slot, self._acc(), self._ret(), self._tab, self._bgrid, self._params(), self._arrival, ev)  # type: ignore[arg-type]
        self._frames.append(rec)
        self._by_id[frame_id] = slot
        self._exact = None
        ev_x, ev_f, ev_side, ev_n, overflow, arr_over, nodata, full_px = ev
        self._full_path_px = int(full_px.sum())
        w = self._w
        rr = np.flatnonzero(ev_n)
        n_lo = n_hi = n_ret = 0
        if rr.size:
            # gather the rows' used event slots only (copying whole (rows, cap) blocks cost ~50 MB per update)
            k_all = ev_n[rr].astype(np.int64)
            starts = np.cumsum(k_all) - k_all
            rows_rep = np.repeat(rr.astype(np.int64), k_all)
            flat = rows_rep * ev_x.shape[1] + (np.arange(int(k_all.sum()), dtype=np.int64) - np.repeat(starts, k_all))
            xs = ev_x.ravel()[flat].astype(np.int64)
            sides = ev_side.ravel()[flat]
            enc = ((rows_rep * w + xs) << 2) | (sides & 3).astype(np.int64)
            arrived = sides >= 4
            n_lo = int(np.count_nonzero(sides == 5))
            n_hi = int(np.count_nonzero(sides == 6))
            retro = ~arrived
            n_ret = int(np.count_nonzero(retro))
            if n_lo + n_hi:
                self._rej.append(slot, enc[arrived])
            if n_ret:
                fs = ev_f.ravel()[flat][retro]
                enc_r = enc[retro]
                order = np.argsort(fs, kind="stable")
                fs, enc_r = fs[order], enc_r[order]
                cut = np.flatnonzero(np.diff(fs)) + 1
                for part_f, part in zip(fs[np.r_[0, cut]], np.split(enc_r, cut), strict=True):
                    self._rej.append(int(part_f), part)
                self._dirty[np.unique(rows_rep[retro])] = True
        for r in np.flatnonzero(arr_over):  # arrival rejections beyond the event buffer
            row = self._arrival[r]
            xs_o = np.flatnonzero(row)
            n_lo += int(np.count_nonzero(row[xs_o] == 1))
            n_hi += int(np.count_nonzero(row[xs_o] == 2))
            self._rej.append(slot, ((r * w + xs_o.astype(np.int64)) << 2) | row[xs_o].astype(np.int64))
        self._rej.ensure(slot)
        no_data = int(nodata.sum())
        n_over = int(np.count_nonzero(overflow))
        if n_over:
            self._dirty[overflow > 0] = True
        self.generation += 1
        return UpdateResult(frame_id, self.n_frames, False, n_lo, n_hi, no_data, n_ret, n_over)

    # ---------------------------------------------------------------- exclusion
    def exclude(self, frame_id: str, y: np.ndarray) -> None:
        """Remove a frame from the running sums; y is that frame's normalised data (from the frame
        store), exactly as it was added. Follow with `exact_pass` for the batch-exact result."""
        slot = self._slot(frame_id)
        rec = self._frames[slot]
        if rec.excluded:
            return
        rows = self._rows(y, f"frame {frame_id!r}")
        rej = np.zeros(rows.shape, np.uint8)
        idx, side = self.rejections(frame_id)
        rej.ravel()[idx] = side
        _exclude_kernel(rows, slot, rec.weight, rej, self._acc(), self._ret())  # type: ignore[arg-type]
        self._frames[slot] = FrameRecord(**{**rec.__dict__, "excluded": True})
        self._set_tab(self._frames[slot])
        self._rej.drop(slot)
        self._exact = None
        self.generation += 1

    # ---------------------------------------------------------------- exact pass
    def noise_model(self, frame_ids: Sequence[str] | None = None) -> NoiseModel:
        """The noise model of the given frames (default: the included ones, in order) as an
        `integrate.NoiseModel`: the same variances, ε, κ and reference background the live
        rejection uses."""
        from stackwatch.engine.integrate import NoiseModel

        ids = list(self.frame_ids if frame_ids is None else frame_ids)
        slots = [self._slot(fid) for fid in ids]
        a = np.ascontiguousarray(self._tab[:, _T_A, slots].T)
        b = np.ascontiguousarray(self._tab[:, _T_B, slots].T)
        return NoiseModel(
            a=a,
            b=b,
            background=self._bgrid.copy(),
            background_step_px=float(self.background_step_px),
            epsilon=self.epsilon,
            kappa_low=self.kappa_low,
            kappa_high=self.kappa_high,
        )

    def exact_pass(
        self,
        sources: Sequence[_BandSource],
        *,
        frame_ids: Sequence[str] | None = None,
        rejection: str = "auto",
        params: dict[str, float] | None = None,
        large_scale: bool = False,
        band_budget_bytes: int = 1 << 30,
        noise_floor: bool = True,
    ) -> ExactResult:
        """Batch-integrate the included frames and rebuild the live state from its decisions.

        Parameters
        ----------
        sources : one BandSource per included frame (the frame store), in the order of `frame_ids`.
        frame_ids : the frames the sources hold. Default is None (`self.frame_ids`, in order).
        rejection : an algorithm name of stackwatch.engine.reject, or "auto" (§7.5 for the current
            number of frames). Default is "auto".
        params : rejection parameters. Default is None (the algorithm's defaults / §7.5's).
        large_scale : large-scale rejection in the batch integrator. Default is False.
        band_budget_bytes : memory for one band of all frames. Default is 1 GiB.
        noise_floor : floor the batch rejectors' σ by this stack's noise model (`noise_model`), so
            that batch and live decide alike and star cores survive. Default is True.
        """
        ids = list(self.frame_ids if frame_ids is None else frame_ids)
        if len(ids) != len(sources):
            raise StackwatchError(f"exact pass: {len(sources)} sources for {len(ids)} frames")
        if not ids:
            raise StackwatchError("exact pass: no frames")
        slots = []
        for fid in ids:
            s = self._slot(fid)
            if self._frames[s].excluded:
                raise StackwatchError(f"exact pass: frame {fid!r} is excluded")
            slots.append(s)
        if sorted(slots) != sorted(self._by_id[f] for f in self.frame_ids):
            raise StackwatchError("exact pass: the sources must cover exactly the included frames")
        for src in sources:
            if tuple(src.shape) != self.shape:
                raise StackwatchError(f"exact pass: source shape {tuple(src.shape)} differs from {self.shape}")
        if rejection == "auto":
            name, auto_params = _reject.auto_rejection(len(ids))
            use_params = dict(auto_params) if params is None else dict(params)
        else:
            name, use_params = rejection, dict(params or {})
        weights = np.array([self._frames[s].weight for s in slots], np.float64)
        rebuild = _StateFromBatch(self, slots, self._rej.sibling())
        try:
            res = _integrate.integrate(
                list(sources),
                weights=weights,
                combination="mean",
                rejection=name,
                params=use_params,
                large_scale=large_scale,
                band_budget_bytes=band_budget_bytes,
                noise_model=self.noise_model(ids) if noise_floor else None,
                on_band=rebuild.band,
            )
        except BaseException:
            # the extremes of the bands done so far hold the batch's decisions, S and W still the
            # live ones: forget the extremes rather than mix them (no retroactive removal of the
            # samples accepted so far until the next exact pass) and keep the lists
            rebuild.rejections.discard()
            self._hv[:] = np.nan
            self._hi[:] = EMPTY
            self._lv[:] = np.nan
            self._li[:] = EMPTY
            self._dirty[:] = True
            raise
        self._rej.adopt(rebuild.finish())
        # straight into the planes, without full-size temporaries (0.1 GB each at 26 MP: this runs
        # beside the live state and the batch products, at the service's memory peak)
        img = np.asarray(res.image, np.float32).reshape(self._c * self._h, self._w)
        ws = np.asarray(res.weight_sum, np.float32).reshape(img.shape)
        self._RLO[:] = np.asarray(res.rej_low).reshape(img.shape)
        self._RHI[:] = np.asarray(res.rej_high).reshape(img.shape)
        nacc = np.asarray(res.coverage).reshape(img.shape).astype(np.int32)
        nacc -= self._RLO
        nacc -= self._RHI
        good = (nacc > 0) & np.isfinite(img) & (ws > 0)
        np.multiply(img, ws, out=self._S)
        self._S[~good] = 0.0
        self._Wt[:] = ws
        self._Wt[~good] = 0.0
        nacc[~good] = 0
        self._N[:] = nacc
        del nacc, good
        # the batch image itself (float32, contiguous, owned by nobody else once `res` goes): a copy
        # was 104 MB more at the exact pass's memory peak (26 MP mono)
        self._exact = np.asarray(res.image, np.float32).reshape(self.shape)
        self._dirty[:] = False
        self.generation += 1
        return ExactResult(rejection=name, params=use_params, n_frames=len(ids))

    # ---------------------------------------------------------------- checkpoints
    def snapshot(self, into: LiveStack | None = None) -> LiveStack:
        """An independent copy of the whole state (a memcpy of the planes): take it between updates,
        then `save` the copy from a background thread while updates continue.

        Parameters
        ----------
        into : an earlier snapshot of this stack whose planes are overwritten and returned. At 26 MP
            a fresh copy spends most of its ~2 CPU-s faulting in 0.8 GB of new pages; reusing the
            previous checkpoint's snapshot avoids that. Default is None (new arrays).
        """
        new = LiveStack.__new__(LiveStack)
        old = {} if into is None else into.__dict__
        for k, v in self.__dict__.items():
            if k in ("_arrival", "_events"):
                new.__dict__[k] = None  # scratch buffers, reallocated on the next update
            elif isinstance(v, np.ndarray):
                prev = old.get(k)
                if isinstance(prev, np.ndarray) and prev.shape == v.shape and prev.dtype == v.dtype and prev is not v:
                    np.copyto(prev, v)
                    new.__dict__[k] = prev
                else:
                    new.__dict__[k] = v.copy()
            elif k == "_rej":
                new.__dict__[k] = v.in_memory_copy()
            elif k in ("_frames",):
                new.__dict__[k] = list(v)
            elif k == "_by_id":
                new.__dict__[k] = dict(v)
            else:
                new.__dict__[k] = v
        if into is not None:
            into.__dict__.clear()  # its arrays now belong to the new snapshot
        return new

    def _arrays(self) -> dict[str, np.ndarray]:
        """The per-pixel state and small arrays a checkpoint holds (the rejection lists go apart)."""
        out: dict[str, np.ndarray] = {
            "S": self._S,
            "W": self._Wt,
            "n": self._N,
            "r_lo": self._RLO,
            "r_hi": self._RHI,
            "hv": self._hv,
            "hi": self._hi,
            "lv": self._lv,
            "li": self._li,
            "bgrid": self._bgrid,
            "dirty": self._dirty,
        }
        if self._exact is not None:
            out["exact"] = self._exact
        return out

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write an atomic checkpoint into `directory`; returns the manifest path.

        Each plane is streamed to ``<name>.g<generation>.npy.tmp`` in 16 MiB pieces (CRC32 of each
        piece as it goes: file writes and zlib release the GIL, so a `snapshot` saved from a thread
        barely slows the updates), fsync, rename; the rejection lists go frame after frame into one
        ``rej`` file (bounded memory when they are spilled); then ``manifest.json`` the same way,
        last. Older generations are deleted once the manifest is in place."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        gen = self.generation
        files: dict[str, dict[str, Any]] = {}
        for name, arr in self._arrays().items():
            fn = f"{name}.g{gen:08d}.npy"
            files[name] = {"file": fn, **_write_npy(d / fn, [np.ascontiguousarray(arr)], arr.shape, arr.dtype)}
        rej_slots = [s for s in self._rej.slots()]
        rej_counts = [self._rej.count(s) for s in rej_slots]
        fn = f"rej.g{gen:08d}.npy"
        pieces = (self._rej.get(s) for s in rej_slots)
        files["rej"] = {"file": fn, **_write_npy(d / fn, pieces, (sum(rej_counts),), np.dtype(np.int64))}
        manifest = {
            "format": _FORMAT,
            "generation": gen,
            "shape": list(self.shape),
            "params": {
                "k_high": self.k_high,
                "k_low": self.k_low,
                "kappa_low": self.kappa_low,
                "kappa_high": self.kappa_high,
                "n_min": self.n_min,
                "epsilon": self.epsilon,
                "background_step_px": self.background_step_px,
                "event_capacity": self._cap,
                "rejection": self.rejection,
                "rejection_params": self.rejection_params,
            },
            "frames": [{**f.__dict__, "scale": list(f.scale), "noise": list(f.noise)} for f in self._frames],
            "included": list(self.frame_ids),
            "rejections": {"slots": rej_slots, "counts": rej_counts},
            "files": files,
        }
        tmp = d / (_MANIFEST + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, d / _MANIFEST)
        _fsync_dir(d)
        keep = {v["file"] for v in files.values()}
        for p in d.glob("*.g*.npy*"):
            if p.name not in keep:
                p.unlink(missing_ok=True)
        return d / _MANIFEST

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], *, rejections_dir: str | os.PathLike[str] | None = None
    ) -> LiveStack:
        """Read the checkpoint in `directory` (checksums verified).

        Parameters
        ----------
        directory : the checkpoint directory (`save`).
        rejections_dir : where the loaded stack spills its rejection lists (see `LiveStack`).
            Default is None (in memory).
        """
        d = Path(directory)
        mpath = d / _MANIFEST
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as exc:
            raise StackwatchError(f"{mpath}: cannot read live-stack checkpoint ({exc})") from None
        fmt = manifest.get("format")
        if fmt not in (1, _FORMAT):
            raise StackwatchError(f"{mpath}: unknown checkpoint format {fmt!r}")
        p = manifest["params"]
        files = manifest["files"]
        bgrid = _read_npy(d / files["bgrid"]["file"], files["bgrid"]["crc32"])
        st = cls(
            tuple(manifest["shape"]),
            k_high=p["k_high"],
            k_low=p["k_low"],
            kappa_low=p["kappa_low"],
            kappa_high=p["kappa_high"],
            n_min=p["n_min"],
            epsilon=p["epsilon"],
            background=bgrid,
            background_step_px=p["background_step_px"],
            event_capacity=p["event_capacity"],
            rejections_dir=rejections_dir,
            rejection=p.get("rejection", "auto"),  # checkpoints before 2026-12 did not record it
            rejection_params=p.get("rejection_params"),
        )
        # read straight into the planes (no second copy of 0.8 GB at 26 MP)
        planes: dict[str, np.ndarray] = {"S": st._S, "W": st._Wt, "n": st._N, "r_lo": st._RLO, "r_hi": st._RHI, "hv": st._hv,
                  "hi": st._hi, "lv": st._lv, "li": st._li, "dirty": st._dirty}
        for name, dest in planes.items():
            _read_npy(d / files[name]["file"], files[name]["crc32"], out=dest)
        if "exact" in files:
            st._exact = _read_npy(d / files["exact"]["file"], files["exact"]["crc32"]).astype(np.float32)
            st._exact = st._exact.reshape(st.shape)
        for fd in manifest["frames"]:
            rec = FrameRecord(
                frame_id=fd["frame_id"],
                slot=int(fd["slot"]),
                weight=float(fd["weight"]),
                scale=tuple(fd["scale"]),
                noise=tuple(fd["noise"]),
                rho=float(fd["rho"]),
                gain=fd["gain"],
                excluded=bool(fd["excluded"]),
            )
            st._frames.append(rec)
            st._by_id[rec.frame_id] = rec.slot
            st._set_tab(rec)
        if fmt == 1:  # all lists in one array, with a parallel array of slots
            enc = _read_npy(d / files["rej_enc"]["file"], files["rej_enc"]["crc32"])
            sl = _read_npy(d / files["rej_slot"]["file"], files["rej_slot"]["crc32"])
            for s in np.unique(sl):
                st._rej.append(int(s), enc[sl == s].astype(np.int64))
            for rec in st._frames:
                if not rec.excluded:
                    st._rej.ensure(rec.slot)
        else:
            rej = _read_npy(d / files["rej"]["file"], files["rej"]["crc32"], mmap=True)
            start = 0
            for s, k in zip(manifest["rejections"]["slots"], manifest["rejections"]["counts"], strict=True):
                st._rej.ensure(int(s))
                st._rej.append(int(s), np.array(rej[start : start + k]))
                start += k
            del rej
        st.generation = int(manifest["generation"])
        return st


_PIECE = 1 << 24


def _fsync_dir(d: Path) -> None:
    try:
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _write_npy(path: Path, arrays: Any, shape: tuple[int, ...], dtype: np.dtype[Any]) -> dict[str, Any]:
    """Stream the arrays (contiguous, `dtype`, together `shape`) into one .npy via ``.tmp``, fsync,
    rename; the CRC32 of the data is computed piece by piece on the way."""
    tmp = path.with_name(path.name + ".tmp")
    crc = 0
    with open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
        )
        for arr in arrays:
            raw = np.ascontiguousarray(arr, dtype).reshape(-1).view(np.uint8)
            for i in range(0, raw.size, _PIECE):
                piece = raw[i : i + _PIECE]
                crc = zlib.crc32(piece.data, crc)
                fh.write(piece.data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return {"crc32": crc, "shape": list(shape), "dtype": np.dtype(dtype).str}


def _read_npy(path: Path, crc32: int, *, out: np.ndarray | None = None, mmap: bool = False) -> np.ndarray:
    """Read a checkpoint array (into `out` when given; memory-mapped when `mmap`) piece by piece,
    verifying its CRC32 on the way."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            if fortran:
                raise ValueError("Fortran-ordered array")
            if out is not None and (tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous):
                raise ValueError(f"holds {dtype}{list(shape)}, expected {out.dtype}{list(out.shape)}")
            nbytes = int(np.prod(shape)) * dtype.itemsize
            crc = 0
            if mmap and nbytes:
                arr: np.ndarray = np.memmap(path, dtype=dtype, mode="r", offset=fh.tell(), shape=shape)
                raw = arr.reshape(-1).view(np.uint8)
                for i in range(0, raw.size, _PIECE):
                    crc = zlib.crc32(raw[i : i + _PIECE].data, crc)
            else:
                arr = np.empty(shape, dtype) if out is None else out
                raw = arr.reshape(-1).view(np.uint8)
                for i in range(0, raw.size, _PIECE):
                    piece = raw[i : i + _PIECE]
                    if fh.readinto(piece.data) != piece.size:
                        raise ValueError("file is truncated")
                    crc = zlib.crc32(piece.data, crc)
    except (OSError, ValueError) as exc:
        raise StackwatchError(f"{path}: cannot read checkpoint array ({exc})") from None
    if crc != crc32:
        raise StackwatchError(f"{path}: checksum mismatch (checkpoint corrupt)")
    return arr
