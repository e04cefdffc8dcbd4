"""Light calibration (algorithms.md §3): C = (L - B - k(D - B)) s0/F, per CFA channel.

``D`` is the raw master dark (bias included, never pre-calibrated). With k = 1 (exposure-matched dark)
the bias cancels: C = (L - D) s0/F and no bias is needed. With k != 1 the bias is required:
C = L - k D - (1 - k) B. ``s0`` is the mean of the master flat over finite pixels, one value per CFA
channel for one-shot-colour frames (no colour cast from the flat). Flat pixels that are not finite,
<= 0 or below 0.05 s0 give NaN, never infinities or 0.

Saturation is flagged on the raw values before anything is subtracted: ``raw >= saturation``; the
bool mask (True = saturated = excluded downstream) travels with the frame in
:class:`CalibratedFrame`. Saturated pixels keep their calibrated value.

Everything runs in one numba pass (``_calibrate``) over the frame. Dark optimisation (§3.2) finds k
by minimising the noise of the calibrated frame in a central window, either by PixInsight's
golden-section search of the k-sigma noise of the first starlet layer (``"golden"``) or by a
Huber-weighted least-squares slope on the warm pixels (``"fast"``, default).

Order of operations (§3.1): overscan -> calibration -> cosmetic (:mod:`stackwatch.engine.cosmetic`)
-> noise -> debayer (:mod:`stackwatch.engine.cfa`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit, prange
from stackwatch.engine.cfa import channel_map, shift_pattern
from stackwatch.engine.errors import StackwatchError
from stackwatch.engine.fitsio import Image

__all__ = [
    "CalibratedFrame",
    "DarkOptimization",
    "DarkStructure",
    "FlatScale",
    "Overscan",
    "calibrate_light",
    "dark_structure",
    "flat_scale",
    "optimize_dark_scale",
    "output_pedestal",
    "overscan_regions",
    "subtract_overscan",
]

_DEAD_FLAT_FRAC = 0.05  # F < 0.05 s0,c -> NaN (ours, §3.1)
_MIN_WARM = 16  # fewer warm pixels in the window: optimisation disabled (PI)
_K_MAX = 3.0


@dataclass(frozen=True)
class FlatScale:
    """s0 of a master flat: ``per_pixel`` is the (2, 2) array of s0 by (y % 2, x % 2)."""

    s0: float
    channels: dict[str, float]
    per_pixel: np.ndarray


@dataclass(frozen=True)
class DarkOptimization:
    """Result of :func:`optimize_dark_scale`: ``k`` is the dark scale used, ``ok`` False when the
    optimisation was not possible (then ``k`` is the nominal scale) and ``reason`` says why."""

    k: float
    nominal: float
    method: str
    ok: bool
    n_warm: int
    reason: str


@dataclass(frozen=True, eq=False)
class CalibratedFrame:
    """A calibrated light.

    Attributes
    ----------
    data : np.ndarray
        float32 (H, W), calibrated; NaN where the flat is dead or the raw pixel was NaN.
    saturated : np.ndarray
        bool (H, W), True where the raw value was at or above the saturation level.
    dark_scale : float
        k used for the dark (1 for an exposure-matched dark, 0 without dark).
    flat_scale : tuple of float
        s0 per CFA channel (R, G, B) or one value for mono; empty without flat.
    notes : tuple of str
        What was done and what was missing, one short line each.
    dark_optimization : DarkOptimization or None
        The §3.2 result when optimisation ran.
    bayer : str or None
        CFA pattern of ``data`` (differs from the raw one after an odd overscan crop).
    overscan_levels : tuple of float
        Median of each overscan source subtracted (empty without overscan correction).
    """

    data: np.ndarray
    saturated: np.ndarray
    dark_scale: float
    flat_scale: tuple[float, ...]
    notes: tuple[str, ...]
    dark_optimization: DarkOptimization | None = None
    bayer: str | None = None
    overscan_levels: tuple[float, ...] = ()


# --------------------------------------------------------------------------------------------------
# Flat scale


def flat_scale(flat: np.ndarray, bayer: str | None = None) -> FlatScale:
    """s0 = mean of the finite, positive pixels of the master flat; per CFA sub-lattice colour when
    ``bayer`` is given (the two greens share one value). :class:`StackwatchError` when the flat has no
    positive finite pixel."""
    f = np.asarray(flat, dtype=np.float32)
    if f.ndim != 2:
        raise StackwatchError(f"master flat must be 2-D, got shape {f.shape}")

    def mean_of(a: np.ndarray) -> float:
        good = a[np.isfinite(a) & (a > 0)]
        if good.size == 0:
            raise StackwatchError("master flat has no positive finite pixel")
        return float(np.mean(good, dtype=np.float64))

    if bayer is None:
        s = mean_of(f)
        return FlatScale(s0=s, channels={"L": s}, per_pixel=np.full((2, 2), s, dtype=np.float64))
    cmap = channel_map(bayer)
    channels: dict[str, float] = {}
    per = np.zeros((2, 2), dtype=np.float64)
    for ci, name in enumerate(("R", "G", "B")):
        parts = [f[dy::2, dx::2].ravel() for dy in range(2) for dx in range(2) if cmap[dy, dx] == ci]
        channels[name] = mean_of(np.concatenate(parts))
        for dy in range(2):
            for dx in range(2):
                if cmap[dy, dx] == ci:
                    per[dy, dx] = channels[name]
    return FlatScale(s0=mean_of(f), channels=channels, per_pixel=per)


# --------------------------------------------------------------------------------------------------
# The calibration kernel


@njit(cache=True, nogil=True, parallel=True)
def _calibrate(
    light: np.ndarray,
    bias: np.ndarray,
    dark: np.ndarray,
    flat: np.ndarray,
    flags: np.ndarray,
    coef: np.ndarray,
    s0: np.ndarray,
    out: np.ndarray,
    sat: np.ndarray,
) -> None:  # pragma: no cover - numba
    """flags = (has_bias, has_dark, has_flat); coef = (k, saturation level, dead-flat fraction, bias
    factor with a dark: 1 - k for a raw light, -k for a bias-subtracted one)."""
    h, w = light.shape
    has_bias = flags[0] != 0
    has_dark = flags[1] != 0
    has_flat = flags[2] != 0
    k = coef[0]
    satlevel = coef[1]
    dead = coef[2]
    kb = coef[3]
    for y in prange(h):
        for x in range(w):
            v = np.float64(light[y, x])
            sat[y, x] = v >= satlevel
            if has_dark:
                v -= k * dark[y, x]
                if has_bias:
                    v -= kb * bias[y, x]
            elif has_bias:
                v -= bias[y, x]
            if has_flat:
                f = np.float64(flat[y, x])
                s = s0[y & 1, x & 1]
                if f > dead * s:  # False for NaN and for f <= 0
                    v = v * s / f
                else:
                    v = np.float64(np.nan)
            out[y, x] = v


def _as_master(name: str, array: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if array is None:
        return None
    a = np.asarray(array)
    if a.shape != shape:
        raise StackwatchError(f"master {name} has shape {a.shape}, the light {shape}: they do not match")
    return np.ascontiguousarray(a, dtype=np.float32)


def calibrate_light(
    raw: Image | np.ndarray,
    *,
    bias: np.ndarray | None = None,
    dark: np.ndarray | None = None,
    flat: np.ndarray | None = None,
    bayer: str | None = None,
    saturation: float | None = None,
    dark_scale: float = 1.0,
    optimize_dark: str = "none",
    flat_scale_override: FlatScale | None = None,
    overscan: Overscan | None = None,
    bias_applied: bool = False,
) -> CalibratedFrame:
    """Calibrate one light frame.

    Parameters
    ----------
    raw : Image or np.ndarray
        The raw light: an :class:`~stackwatch.engine.fitsio.Image` (its ``bayer`` and ``saturation``
        are used unless given here) or a float32 (H, W) mono/CFA array, full scale 1.0.
    bias, dark, flat : np.ndarray, optional
        Master bias, raw master dark (bias included) and master flat (bias/flat-dark subtracted, not
        normalised), same shape as ``raw``. Default is None (not applied; a note says so).
    bayer : str, optional
        Effective CFA pattern of ``raw[0:2, 0:2]``; per-channel flat scaling when given. Default is
        None (``raw.bayer`` for an Image).
    saturation : float, optional
        Raw value at or above which a pixel is flagged saturated. Default is None (``raw.saturation``
        for an Image, else 0.999).
    dark_scale : float, optional
        Nominal k = t_light / t_dark. Default is 1.0 (exposure-matched dark). k != 1 needs a bias.
    optimize_dark : str, optional
        "none" (use ``dark_scale``), "fast" (Huber slope on warm pixels) or "golden" (PixInsight's
        golden-section search); both need a bias. Default is "none".
    flat_scale_override : FlatScale, optional
        Precomputed s0 of ``flat`` (the library caches it per master). Default None (computed).
    overscan : Overscan, optional
        Overscan correction and crop applied to the raw light first when its geometry matches
        (masters must have had the same); saturation is still judged on the raw values. Default is
        None.
    bias_applied : bool, optional
        The light's bias was already subtracted (by another program): L' = L - B. ``bias`` is then
        not subtracted from the light; with a dark it takes the bias out of the dark,
        C = (L' - k(D - B))·s0/F (required, whatever k). Default is False.
    """
    if isinstance(raw, Image):
        bayer = raw.bayer if bayer is None else bayer
        saturation = raw.saturation if saturation is None else saturation
        raw_data = raw.data
    else:
        raw_data = np.asarray(raw)
    if saturation is None:
        saturation = 0.999
    if raw_data.ndim != 2:
        raise StackwatchError(f"calibrate_light needs a 2-D raw frame (mono or CFA), got shape {raw_data.shape}")
    notes: list[str] = []
    raw_sat: np.ndarray | None = None
    levels: tuple[float, ...] = ()
    if overscan is not None and overscan.applies(raw_data.shape):
        lv = overscan.levels(raw_data)
        light = overscan.correct(raw_data, lv)
        if overscan.image_rect is not None:
            x0, y0, x1, y1 = overscan.image_rect
            raw_sat = raw_data[y0:y1, x0:x1] >= saturation
        else:
            raw_sat = raw_data >= saturation
        bayer = overscan.pattern(bayer)
        levels = tuple(float(v) for v in lv)
        notes.append(overscan.describe() + " (levels " + ", ".join(f"{v * 65535:.1f}" for v in lv) + " DN)")
    else:
        if overscan is not None:
            notes.append(f"overscan: not applied to this {raw_data.shape[1]}x{raw_data.shape[0]} frame")
        light = np.ascontiguousarray(raw_data, dtype=np.float32)
    shape = light.shape
    b = _as_master("bias", bias, shape)
    d = _as_master("dark", dark, shape)
    f = _as_master("flat", flat, shape)
    opt: DarkOptimization | None = None
    k = 0.0
    if bias_applied and b is not None and d is None:
        notes.append("bias already subtracted: master bias not applied")
        b = None
    if bias_applied and d is not None and b is None:
        raise StackwatchError("the light is bias-subtracted: its dark needs a master bias to take the bias out of "
                              "the dark, and there is none")
    if d is not None:
        k = float(dark_scale)
        if optimize_dark not in ("none", "fast", "golden"):
            raise StackwatchError(f"optimize_dark {optimize_dark!r}: not one of none, fast, golden")
        if optimize_dark != "none":
            if b is None:
                notes.append("dark optimisation needs a master bias: none, dark not optimised")
            else:
                # the optimiser models a raw light (L - B - k D'): a bias-subtracted one gets its bias back
                opt_light = light + b if bias_applied else light
                opt = optimize_dark_scale(opt_light, d, b, nominal=k, method=optimize_dark, bayer=bayer)
                k = opt.k
                notes.append(f"dark scale k={k:.4f} ({opt.method}{'' if opt.ok else ': ' + opt.reason})")
        if abs(k - 1.0) > 1e-12 and b is None:
            raise StackwatchError(f"a dark scaled by k={k:.3f} needs a master bias, and there is none")
    else:
        notes.append("no dark")
        if b is None:
            notes.append("no bias")
    if f is not None:
        fs = flat_scale_override or flat_scale(f, bayer)
        s0 = fs.per_pixel.astype(np.float64)
        flat_tuple = tuple(fs.channels[c] for c in ("R", "G", "B")) if bayer else (fs.s0,)
    else:
        notes.append("no flat")
        s0 = np.ones((2, 2), dtype=np.float64)
        flat_tuple = ()
    dummy = np.zeros((1, 1), dtype=np.float32)
    flags = np.array([b is not None, d is not None, f is not None], dtype=np.uint8)
    # after an overscan correction the kernel's saturation test would see shifted values: the raw test
    # above stands and the kernel's is switched off
    satlevel = math.inf if raw_sat is not None else float(saturation)
    coef = np.array([k, satlevel, _DEAD_FLAT_FRAC, -k if bias_applied else 1.0 - k], dtype=np.float64)
    out = np.empty(shape, dtype=np.float32)
    sat = np.empty(shape, dtype=np.bool_)
    _calibrate(
        light,
        dummy if b is None else b,
        dummy if d is None else d,
        dummy if f is None else f,
        flags,
        coef,
        s0,
        out,
        sat,
    )
    return CalibratedFrame(
        data=out,
        saturated=sat if raw_sat is None else np.ascontiguousarray(raw_sat),
        dark_scale=k,
        flat_scale=flat_tuple,
        notes=tuple(notes),
        dark_optimization=opt,
        bayer=bayer,
        overscan_levels=levels,
    )


# --------------------------------------------------------------------------------------------------
# Dark optimisation (§3.2)

_B3 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


@njit(cache=True, nogil=True)
def _mirror(i: int, n: int) -> int:  # pragma: no cover - numba
    if i < 0:
        i = -i
    if i >= n:
        i = 2 * n - 2 - i
    return min(max(i, 0), n - 1)


@njit(cache=True, nogil=True, parallel=True)
def _w1_at(img: np.ndarray, ys: np.ndarray, xs: np.ndarray, h5: np.ndarray) -> np.ndarray:  # pragma: no cover
    """First starlet layer I - (B3 x B3) * I at the listed pixels (mirror borders, as
    scipy.ndimage mode="mirror")."""
    h, w = img.shape
    out = np.empty(ys.size)
    for k in prange(ys.size):
        y = ys[k]
        x = xs[k]
        acc = 0.0
        for j in range(5):
            yy = _mirror(y + j - 2, h)
            row = 0.0
            for i in range(5):
                row += h5[i] * img[yy, _mirror(x + i - 2, w)]
            acc += h5[j] * row
        out[k] = img[y, x] - acc
    return out


def _window(a: np.ndarray, size: int) -> tuple[slice, slice]:
    h, w = a.shape
    hh = min(h, size) & ~1
    ww = min(w, size) & ~1
    y0 = ((h - hh) // 2) & ~1
    x0 = ((w - ww) // 2) & ~1
    return slice(y0, y0 + hh), slice(x0, x0 + ww)


def _bin2(a: np.ndarray) -> np.ndarray:
    h, w = a.shape
    a = a[: h & ~1, : w & ~1].astype(np.float64)
    return a[0::2, 0::2] + a[0::2, 1::2] + a[1::2, 0::2] + a[1::2, 1::2]


def optimize_dark_scale(
    light: np.ndarray,
    dark: np.ndarray,
    bias: np.ndarray,
    *,
    nominal: float,
    method: str = "fast",
    bayer: str | None = None,
    window_px: int = 1024,
    threshold_sigma: float = 3.0,
) -> DarkOptimization:
    """The dark scale k minimising the noise of L - B - k (D - B) (algorithms.md §3.2).

    Works in the central ``window_px`` square (CFA data binned 2x2). D' = D - B is thresholded at
    median + ``threshold_sigma`` x 1.4826 MAD so only warm and hot pixels drive the fit.

    Parameters
    ----------
    light, dark, bias : np.ndarray
        Raw light, raw master dark (bias included) and master bias, same shape.
    nominal : float
        t_light / t_dark, returned when the optimisation is not possible or lands outside
        [0.5, 1.5] x nominal.
    method : str, optional
        "fast": Huber-weighted least-squares slope of w1(L - B) on w1(D') over the warm pixels (3
        iterations, c = 3 sigma). "golden": golden-section search over [0, 3] of the noise of
        w1(L - B - k D'_thr) (PixInsight's objective), measured as the std over the warm pixels
        minus the 5-sigma outliers at the nominal k (ours: PI's k-sigma noise of the whole window
        was too flat and noisy in tests, up to 4 % errors; re-clipping at every k makes the
        objective discontinuous). Default is "fast".
    bayer : str, optional
        CFA pattern; CFA data is binned 2x2 first. Default is None.
    window_px : int, optional
        Side of the central window. Default is 1024.
    threshold_sigma : float, optional
        Warm-pixel threshold in MAD sigma above the median of D'. Default is 3.0.
    """
    ys, xs = _window(light, window_px)
    lw = light[ys, xs].astype(np.float64) - bias[ys, xs]
    dp = dark[ys, xs].astype(np.float64) - bias[ys, xs]
    if bayer is not None:
        lw = _bin2(lw)
        dp = _bin2(dp)
    good = np.isfinite(lw) & np.isfinite(dp)
    if not good.all():
        lw = np.where(good, lw, np.nanmedian(lw))
        dp = np.where(good, dp, np.nanmedian(dp))
    med = float(np.median(dp))
    sig = 1.4826 * float(np.median(np.abs(dp - med)))
    td = med + threshold_sigma * sig
    warm = dp > td
    n_warm = int(warm.sum())
    if n_warm < _MIN_WARM:
        return DarkOptimization(nominal, nominal, method, False, n_warm, f"only {n_warm} warm pixels in the dark")
    dthr = np.where(warm, dp, 0.0)
    wy, wx = np.nonzero(warm)
    wl = _w1_at(np.ascontiguousarray(lw), wy, wx, _B3)  # first starlet layer, at the warm pixels only
    wd = _w1_at(np.ascontiguousarray(dthr), wy, wx, _B3)
    if method == "golden":
        k = _golden(wl, wd, nominal)
    elif method == "fast":
        k = _huber_slope(wl, wd)
    else:
        raise StackwatchError(f"dark optimisation method {method!r}: not one of fast, golden")
    if not math.isfinite(k) or k < 0.005:
        return DarkOptimization(nominal, nominal, method, False, n_warm, "no correlation between light and dark")
    if not (0.5 * nominal <= k <= 1.5 * nominal):
        return DarkOptimization(nominal, nominal, method, False, n_warm, f"k={k:.3f} outside [0.5, 1.5] x nominal")
    return DarkOptimization(float(k), nominal, method, True, n_warm, "")


@dataclass(frozen=True)
class DarkStructure:
    """Large-scale structure of D' = D - B near the frame edges (amp glow), from
    :func:`dark_structure`. ``glow`` True means dark optimisation should stay off (§3.2): glow is
    produced by the readout electronics and does not scale with exposure like the dark current of
    warm pixels, so a k fitted on warm pixels would subtract the wrong amount of glow.

    ``peak_sigma`` is the brightest edge block above the dark level in units of the block-to-block
    scatter, ``where`` names its place ("top-right corner", "left edge"...), ``reason`` the sentence
    for explanations ("" when no glow)."""

    glow: bool
    peak_sigma: float
    where: str
    block_px: int
    reason: str


def _place(i: int, j: int, ny: int, nx: int) -> str:
    v = "top" if i == 0 else "bottom" if i == ny - 1 else ""
    hz = "left" if j == 0 else "right" if j == nx - 1 else ""
    if v and hz:
        return f"{v}-{hz} corner"
    return f"{v or hz} edge"


def dark_structure(
    dark: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    block_px: int = 64,
    sigma: float = 5.0,
) -> DarkStructure:
    """Detect amp glow: 64-px-scale structure of D - B more than ``sigma`` above the dark level in
    the blocks along the frame edges (algorithms.md §3.2, ``optimize_darks = "auto"``).

    The frame (centre-cropped to whole blocks) is cut into ``block_px`` squares; each block's level
    is the median of every other pixel of every other row (robust to hot pixels and cosmics, 4x
    fewer samples). The dark level is the median of all block levels and the scale the larger of
    their MAD sigma (so smooth gradients of a clean dark, which spread all blocks, do not count) and
    the noise of a block median (1.2533 sigma_pixel / sqrt(samples), so a perfectly flat dark is not
    judged on rounding). Structure in the middle of the frame is not glow and is ignored.

    Parameters
    ----------
    dark : np.ndarray
        Raw master dark (bias included), (H, W).
    bias : np.ndarray, optional
        Master bias (removes the bias' own fixed patterns). Default is None (the dark alone).
    block_px : int, optional
        Block side; smaller frames use min(H, W) / 8 (at least 8 px) so there are interior blocks.
        Default is 64.
    sigma : float, optional
        Detection threshold. Default is 5.0.
    """
    d = np.asarray(dark, dtype=np.float32)
    if d.ndim != 2:
        raise StackwatchError(f"dark_structure needs a 2-D master dark, got shape {d.shape}")
    if bias is not None:
        d = d - np.asarray(bias, dtype=np.float32)
    h, w = d.shape
    b = min(int(block_px), max(8, min(h, w) // 8)) & ~1
    ny, nx = h // b, w // b
    if ny < 3 or nx < 3:
        return DarkStructure(False, 0.0, "", b, "")
    y0, x0 = (h - ny * b) // 2, (w - nx * b) // 2
    sub = d[y0 : y0 + ny * b : 2, x0 : x0 + nx * b : 2]
    finite = np.isfinite(sub)
    if not finite.all():
        sub = np.where(finite, sub, np.float32(np.median(sub[finite]) if finite.any() else 0.0))
    hb = b // 2
    blocks = np.median(sub.reshape(ny, hb, nx, hb).transpose(0, 2, 1, 3).reshape(ny, nx, hb * hb), axis=-1)
    level = float(np.median(blocks))
    spread = 1.4826 * float(np.median(np.abs(blocks - level)))
    sample = sub[::4, ::4]
    pix = 1.4826 * float(np.median(np.abs(sample - np.median(sample))))
    scale = max(spread, 1.2533 * pix / hb, 1e-12)
    z = (blocks - level) / scale
    edge = np.zeros((ny, nx), dtype=bool)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    zi = np.where(edge, z, -np.inf)
    i, j = np.unravel_index(int(np.argmax(zi)), zi.shape)
    peak = float(zi[i, j])
    where = _place(int(i), int(j), ny, nx)
    if peak <= sigma:
        return DarkStructure(False, peak, where, b, "")
    reason = f"amp glow: {b}-px structure {peak:.0f} sigma above the dark level at the {where}"
    return DarkStructure(True, peak, where, b, reason)


def _huber_slope(y: np.ndarray, x: np.ndarray, iterations: int = 3) -> float:
    den = float(np.dot(x, x))
    if den <= 0:
        return float("nan")
    k = float(np.dot(x, y)) / den
    for _ in range(iterations):
        r = y - k * x
        s = 1.4826 * float(np.median(np.abs(r - np.median(r))))
        if s <= 0:
            break
        c = 3.0 * s
        a = np.abs(r)
        wgt = np.where(a <= c, 1.0, c / np.maximum(a, 1e-300))
        den = float(np.sum(wgt * x * x))
        if den <= 0:
            break
        k = float(np.sum(wgt * x * y)) / den
    return k


def _golden(wl: np.ndarray, wd: np.ndarray, nominal: float, tol: float = 5e-4) -> float:
    # outliers (stars, cosmics on warm pixels) excluded once, at the nominal k: a fixed set keeps
    # the objective smooth (a clipped std re-selected at every k is not)
    r0 = wl - nominal * wd
    med = float(np.median(r0))
    s0 = 1.4826 * float(np.median(np.abs(r0 - med)))
    keep = np.abs(r0 - med) < 5.0 * s0 if s0 > 0 else np.ones(r0.shape, dtype=bool)
    wl = wl[keep]
    wd = wd[keep]

    def f(k: float) -> float:
        return float(np.std(wl - k * wd))

    gr = (math.sqrt(5.0) - 1.0) / 2.0
    # coarse scan brackets the minimum inside [0, 3] (robust to the flat k-sigma objective), then golden
    grid = np.linspace(0.0, _K_MAX, 31)
    vals = [f(float(k)) for k in grid]
    i = int(np.nanargmin(vals))
    a = float(grid[max(i - 1, 0)])
    b = float(grid[min(i + 1, len(grid) - 1)])
    c = b - gr * (b - a)
    d = a + gr * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - gr * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + gr * (b - a)
            fd = f(d)
    return 0.5 * (a + b)


# --------------------------------------------------------------------------------------------------
# Overscan and pedestal (§3.3)

Rect = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive ends)


def subtract_overscan(
    raw: np.ndarray,
    *,
    regions: Sequence[tuple[Rect, Rect]],
    image_rect: Rect | None = None,
) -> np.ndarray:
    """Overscan correction (PixInsight model): for each (source, target) rectangle pair subtract the
    median of the source region from the target region, then crop to ``image_rect``.

    Rectangles are (x0, y0, x1, y1) with exclusive ends in array coordinates. Returns a new float32
    array. CFA crops should use even offsets, else the Bayer pattern changes (§5.1).
    """
    out = np.array(raw, dtype=np.float32, copy=True)
    h, w = out.shape[-2:]

    def check(r: Rect, what: str) -> tuple[slice, slice]:
        x0, y0, x1, y1 = (int(v) for v in r)
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise StackwatchError(f"overscan {what} rectangle {list(r)} outside the {w}x{h} frame")
        return slice(y0, y1), slice(x0, x1)

    for src, dst in regions:
        sy, sx = check(src, "source")
        ty, tx = check(dst, "target")
        level = float(np.nanmedian(raw[..., sy, sx]))
        out[..., ty, tx] -= np.float32(level)
    if image_rect is not None:
        iy, ix = check(image_rect, "image")
        out = np.ascontiguousarray(out[..., iy, ix])
    return out


def overscan_regions(pairs: Sequence[Sequence[int]]) -> list[tuple[Rect, Rect]]:
    """(source, target) rectangle pairs from the configuration's flat 8-integer lists
    ``[sx0, sy0, sx1, sy1, tx0, ty0, tx1, ty1]``; :class:`StackwatchError` naming a malformed entry."""
    out: list[tuple[Rect, Rect]] = []
    for i, p in enumerate(pairs):
        if len(p) != 8:
            raise StackwatchError(f"calibration.overscan entry {i}: expected 8 integers, got {list(p)}")
        v = [int(x) for x in p]
        out.append(((v[0], v[1], v[2], v[3]), (v[4], v[5], v[6], v[7])))
    return out


def _inside(r: Rect, w: int, h: int) -> bool:
    x0, y0, x1, y1 = r
    return 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


@dataclass(frozen=True)
class Overscan:
    """Overscan correction of one sensor geometry (§3.3), applied alike to calibration frames (before
    integration) and lights (before calibration), so masters and lights keep the same geometry.

    Attributes
    ----------
    regions : tuple of (source, target) rectangle pairs
        (x0, y0, x1, y1), exclusive ends, raw array coordinates; the median of each source is
        subtracted from its target.
    image_rect : Rect or None
        Crop to this rectangle afterwards (None: no crop).
    frame_shape : (H, W) or None
        The raw geometry the rectangles describe; frames of another size are left alone (another
        camera, or a frame the capture program already trimmed). None: every frame that contains all
        the rectangles.
    """

    regions: tuple[tuple[Rect, Rect], ...] = ()
    image_rect: Rect | None = None
    frame_shape: tuple[int, int] | None = None

    @classmethod
    def from_config(
        cls, pairs: Sequence[Sequence[int]], image_rect: Sequence[int], frame_px: Sequence[int] = ()
    ) -> Overscan | None:
        """From the configuration's lists (``calibration.overscan``, ``overscan_image_rect``,
        ``overscan_frame_px`` = [width, height]); None when nothing is configured."""
        regions = tuple(overscan_regions(pairs))
        rect: Rect | None = None
        if len(image_rect):
            if len(image_rect) != 4:
                raise StackwatchError(f"calibration.overscan_image_rect: expected 4 integers, got {list(image_rect)}")
            x0, y0, x1, y1 = (int(v) for v in image_rect)
            rect = (x0, y0, x1, y1)
        frame: tuple[int, int] | None = None
        if len(frame_px):
            if len(frame_px) != 2:
                raise StackwatchError(f"calibration.overscan_frame_px: expected [width, height], got {list(frame_px)}")
            frame = (int(frame_px[1]), int(frame_px[0]))
        if not regions and rect is None:
            return None
        ov = cls(regions, rect, frame)
        if frame is not None and not ov._fits(frame[1], frame[0]):
            raise StackwatchError(
                f"calibration.overscan: a rectangle lies outside the {frame[1]}x{frame[0]} frame of overscan_frame_px"
            )
        return ov

    def _rects(self) -> list[Rect]:
        rects = [r for pair in self.regions for r in pair]
        return [*rects, self.image_rect] if self.image_rect is not None else rects

    def _fits(self, w: int, h: int) -> bool:
        return all(_inside(r, w, h) for r in self._rects())

    def applies(self, shape: Sequence[int]) -> bool:
        """Whether a raw frame of this shape gets the correction."""
        h, w = int(shape[-2]), int(shape[-1])
        if self.frame_shape is not None and (h, w) != self.frame_shape:
            return False
        return self._fits(w, h)

    def output_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of a corrected frame (the raw shape when the correction does not apply)."""
        if self.image_rect is None or not self.applies(shape):
            return tuple(int(v) for v in shape)
        x0, y0, x1, y1 = self.image_rect
        return (*(int(v) for v in shape[:-2]), y1 - y0, x1 - x0)

    @property
    def origin(self) -> tuple[int, int]:
        """(x0, y0) of the image rectangle in the raw frame."""
        return (0, 0) if self.image_rect is None else (self.image_rect[0], self.image_rect[1])

    def pattern(self, bayer: str | None) -> str | None:
        """The Bayer pattern of the corrected frame (an odd crop offset changes it, §5.1)."""
        return None if bayer is None else shift_pattern(bayer, *self.origin)

    def levels(self, raw: np.ndarray) -> np.ndarray:
        """Median of each source rectangle (float64, one per pair)."""
        out = np.empty(len(self.regions), dtype=np.float64)
        for i, ((x0, y0, x1, y1), _) in enumerate(self.regions):
            out[i] = float(np.nanmedian(raw[..., y0:y1, x0:x1]))
        return out

    def correct_rows(self, rows: np.ndarray, y0: int, levels: np.ndarray) -> np.ndarray:
        """Raw rows [y0, y0 + n) of the full width, corrected with ``levels`` and cropped to the image
        columns (the caller chooses rows inside the image rectangle). New float32 array."""
        out = np.array(rows, dtype=np.float32, copy=True)
        n = out.shape[-2]
        for ((_, _, _, _), (tx0, ty0, tx1, ty1)), level in zip(self.regions, levels, strict=True):
            a, b = max(ty0, y0), min(ty1, y0 + n)
            if a < b:
                out[..., a - y0 : b - y0, tx0:tx1] -= np.float32(level)
        if self.image_rect is not None:
            out = np.ascontiguousarray(out[..., self.image_rect[0] : self.image_rect[2]])
        return out

    def correct(self, raw: np.ndarray, levels: np.ndarray | None = None) -> np.ndarray:
        """The corrected, cropped frame (new float32 array)."""
        lv = self.levels(raw) if levels is None else levels
        if self.image_rect is None:
            return self.correct_rows(raw, 0, lv)
        _, y0, _, y1 = self.image_rect
        return self.correct_rows(raw[..., y0:y1, :], y0, lv)

    def describe(self) -> str:
        """One line for provenance, e.g. ``overscan [0,0,8,96]->[8,0,136,96]; crop [8,0,136,96]``."""
        def text(r: Rect) -> str:
            return "[" + ",".join(str(v) for v in r) + "]"

        bits = [f"overscan {text(s)}->{text(t)}" for s, t in self.regions]
        if self.image_rect is not None:
            bits.append(f"crop {text(self.image_rect)}")
        return "; ".join(bits)


def output_pedestal(data: np.ndarray, *, quantile: float = 1e-4) -> int:
    """Pedestal in DN for a uint16 export: ceil(max(0, -q) x 65535), q the ``quantile`` of the finite
    pixels (PixInsight's automatic pedestal). Float products keep their negatives and need none."""
    v = data[np.isfinite(data)]
    if v.size == 0:
        return 0
    q = float(np.quantile(v, quantile))
    return math.ceil(max(0.0, -q) * 65535.0)
