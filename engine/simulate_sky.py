"""Rendering kernels and sky models for the night simulator (`stackwatch.engine.simulate`).

Everything here works in electrons on a pixel grid whose pixel *centres* are at integer (x, y)
(x = column, y = row, 0-based). Kernels are private numba functions; the public wrappers validate and
allocate. Nothing here draws random numbers: callers pass the drawn parameters, so rendering is
deterministic for given inputs.

Colour: a "channel map" is a (2, 2) int array giving, for a pixel at (x, y), the index of the channel
it samples, ``cmap[y % 2, x % 2]``; weights arrays have one column per channel. Mono images use one
channel and ``cmap`` all zeros.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numba import njit, prange

__all__ = [
    "FILTER_RESPONSE",
    "add_cosmic_rays",
    "bayer_channel_map",
    "dust_and_vignetting",
    "moffat_alpha",
    "psf_shape",
    "render_galaxy",
    "render_nebula",
    "render_stars",
    "render_trail",
    "star_colour_weights",
]

# Relative throughput of a filter in the (R, G, B) bands of the simulated spectrum. Broadband
# filters pass their band; narrowband ones pass a small part of the continuum.
FILTER_RESPONSE: dict[str, tuple[float, float, float]] = {
    "": (1.0, 1.0, 1.0),
    "L": (1.0, 1.0, 1.0),
    "R": (1.0, 0.0, 0.0),
    "G": (0.0, 1.0, 0.0),
    "B": (0.0, 0.0, 1.0),
    "HA": (0.06, 0.0, 0.0),
    "SII": (0.06, 0.0, 0.0),
    "OIII": (0.0, 0.05, 0.01),
}

_CHANNEL_INDEX = {"R": 0, "G": 1, "B": 2}


def bayer_channel_map(pattern: str | None) -> np.ndarray:
    """(2, 2) int64 channel index (0 R, 1 G, 2 B) of a CFA tile such as "RGGB"; None -> mono (zeros)."""
    if pattern is None:
        return np.zeros((2, 2), dtype=np.int64)
    if len(pattern) != 4 or any(c not in _CHANNEL_INDEX for c in pattern.upper()):
        raise ValueError(f"bad Bayer pattern {pattern!r}")
    return np.array([_CHANNEL_INDEX[c] for c in pattern.upper()], dtype=np.int64).reshape(2, 2)


def moffat_alpha(fwhm_px: float, beta: float) -> float:
    """Moffat core width alpha for a given FWHM: FWHM = 2 alpha sqrt(2^(1/beta) - 1)."""
    return fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def star_colour_weights(bv: np.ndarray) -> np.ndarray:
    """(N, 3) fraction of a star's flux in R, G, B from its B-V colour index (black body, rows sum to 1)."""
    bv = np.asarray(bv, dtype=np.float64)
    temp = 4600.0 * (1.0 / (0.92 * bv + 1.7) + 1.0 / (0.92 * bv + 0.62))  # Ballesteros 2012
    lam = np.array([0.61e-6, 0.53e-6, 0.46e-6])
    hc_k = 1.4388e-2  # h c / k, m K
    planck = lam[None, :] ** -5 / np.expm1(hc_k / (lam[None, :] * temp[:, None]))
    # photon counts scale with lambda * energy flux
    photons = planck * lam[None, :]
    return photons / photons.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------- stars


@njit(cache=True, nogil=True, parallel=True)
def _render_stars(out, xs, ys, flux, shapes, radii, subs, cmap, beta_par, band_rows):  # pragma: no cover - numba
    """Add elliptical Moffat stars, each integrated over a pixel by subs[k] x subs[k] point samples.

    shapes[k] = (1/alpha_major^2, 1/alpha_minor^2, cos_theta, sin_theta, norm), norm the peak per unit
    flux; beta_par = (beta, integer beta or 0). Threads take row bands: no two write the same pixel.
    """
    h, w = out.shape
    beta = beta_par[0]
    ibeta = int(beta_par[1])
    nband = (h + band_rows - 1) // band_rows
    for b in prange(nband):
        by0 = b * band_rows
        by1 = min(h, by0 + band_rows) - 1
        for k in range(xs.shape[0]):
            x0 = xs[k]
            y0 = ys[k]
            r = radii[k]
            iy0 = max(by0, math.floor(y0 - r))
            iy1 = min(by1, math.ceil(y0 + r))
            if iy0 > iy1:
                continue
            ix0 = max(0, math.floor(x0 - r))
            ix1 = min(w - 1, math.ceil(x0 + r))
            if ix0 > ix1:
                continue
            inv_ax2 = shapes[k, 0]
            inv_ay2 = shapes[k, 1]
            ct = shapes[k, 2]
            st = shapes[k, 3]
            norm = shapes[k, 4]
            sub = subs[k]
            inv_sub2 = 1.0 / (sub * sub)
            for y in range(iy0, iy1 + 1):
                for x in range(ix0, ix1 + 1):
                    acc = 0.0
                    for sy in range(sub):
                        dy = y + (sy + 0.5) / sub - 0.5 - y0
                        for sx in range(sub):
                            dx = x + (sx + 0.5) / sub - 0.5 - x0
                            u = dx * ct + dy * st
                            v = -dx * st + dy * ct
                            q = u * u * inv_ax2 + v * v * inv_ay2
                            if ibeta > 0:
                                inv = 1.0 / (1.0 + q)
                                p = inv
                                for _ in range(ibeta - 1):
                                    p *= inv
                                acc += p
                            else:
                                acc += (1.0 + q) ** (-beta)
                    out[y, x] += flux[k, cmap[y & 1, x & 1]] * norm * acc * inv_sub2


def psf_shape(
    xs: np.ndarray,
    ys: np.ndarray,
    *,
    fwhm_px: float,
    eccentricity: float = 0.0,
    angle_deg: float = 0.0,
    beta: float = 4.0,
    field_psf: float = 0.0,
    optical_centre: tuple[float, float] = (0.0, 0.0),
    field_radius_px: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Moffat (alpha_major, alpha_minor, angle rad) of the PSF at each (x, y).

    The on-axis PSF has ``fwhm_px`` (geometric mean), ``eccentricity`` and ``angle_deg`` (tracking).
    Off axis (field_psf > 0) its second moments grow like a mediocre flattener: isotropically by
    (1 + field_psf r^2)^2 and radially by 2 field_psf r^2 alpha^2, r = distance to ``optical_centre``
    over ``field_radius_px``; at r = 1 the FWHM is ~(1 + 1.2 field_psf) and the eccentricity ~0.47 for 0.2.
    """
    e = min(max(float(eccentricity), 0.0), 0.99)
    ratio = math.sqrt(1.0 - e * e)  # b / a
    alpha = moffat_alpha(fwhm_px, beta)
    a2 = alpha * alpha / ratio
    b2 = alpha * alpha * ratio
    th = math.radians(angle_deg)
    c, s = math.cos(th), math.sin(th)
    cxx = a2 * c * c + b2 * s * s
    cyy = a2 * s * s + b2 * c * c
    cxy = (a2 - b2) * c * s
    n = np.asarray(xs).size
    if field_psf <= 0:
        return (np.full(n, math.sqrt(a2)), np.full(n, math.sqrt(b2)), np.full(n, th))
    dx = (np.asarray(xs, dtype=np.float64) - optical_centre[0]) / field_radius_px
    dy = (np.asarray(ys, dtype=np.float64) - optical_centre[1]) / field_radius_px
    r2 = dx * dx + dy * dy
    grow = (1.0 + field_psf * r2) ** 2
    rad = 2.0 * field_psf * alpha * alpha  # times r^2 u u^T = times (dx, dy)(dx, dy)^T
    sxx = cxx * grow + rad * dx * dx
    syy = cyy * grow + rad * dy * dy
    sxy = cxy * grow + rad * dx * dy
    half_tr = 0.5 * (sxx + syy)
    disc = np.sqrt(np.maximum(0.25 * (sxx - syy) ** 2 + sxy * sxy, 0.0))
    return np.sqrt(half_tr + disc), np.sqrt(np.maximum(half_tr - disc, 1e-12)), 0.5 * np.arctan2(2 * sxy, sxx - syy)


def render_stars(
    out: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    flux: np.ndarray,
    *,
    fwhm_px: float,
    eccentricity: float = 0.0,
    angle_deg: float = 0.0,
    beta: float = 4.0,
    cmap: np.ndarray | None = None,
    floor_e: float = 0.02,
    field_psf: float = 0.0,
    optical_centre: tuple[float, float] = (0.0, 0.0),
    field_radius_px: float = 1.0,
) -> None:
    """Add Moffat stars to ``out`` (float32 (H, W), electrons) in place.

    Parameters
    ----------
    xs, ys : star centres in ``out``'s pixel grid (pixel centres at integers).
    flux : (N,) or (N, C) total electrons per star (per channel C of ``cmap``).
    fwhm_px : on-axis geometric-mean FWHM sqrt(FWHM_major * FWHM_minor) of the PSF (before pixels).
    eccentricity : sqrt(1 - (b/a)^2) of the on-axis PSF. Default is 0.
    angle_deg : position angle of the major axis from +x towards +y. Default is 0.
    beta : Moffat beta. Default is 4.
    cmap : (2, 2) channel map (see module doc); None = mono. Default is None.
    floor_e : each star is drawn out to the radius where its profile falls below this. Default 0.02.
    field_psf, optical_centre, field_radius_px : off-axis PSF growth, see `psf_shape`. Default 0 (none).
    """
    if out.dtype != np.float32 or out.ndim != 2:
        raise ValueError("out must be a float32 (H, W) array")
    xs = np.ascontiguousarray(xs, dtype=np.float64)
    ys = np.ascontiguousarray(ys, dtype=np.float64)
    fl = np.asarray(flux, dtype=np.float64)
    if fl.ndim == 1:
        fl = fl[:, None]
    fl = np.ascontiguousarray(fl)
    cm = np.zeros((2, 2), dtype=np.int64) if cmap is None else np.ascontiguousarray(cmap, dtype=np.int64)
    if int(cm.max()) >= fl.shape[1]:
        raise ValueError("flux has fewer channels than the channel map needs")
    if xs.size == 0:
        return
    ax, ay, th = psf_shape(xs, ys, fwhm_px=fwhm_px, eccentricity=eccentricity, angle_deg=angle_deg, beta=beta,
                           field_psf=field_psf, optical_centre=optical_centre, field_radius_px=field_radius_px)
    norm = (beta - 1.0) / (math.pi * ax * ay)
    peak = fl.max(axis=1) * norm
    ratio_floor = np.maximum(peak / floor_e, 1.0)
    radii = ax * np.sqrt(np.maximum(ratio_floor ** (1.0 / beta) - 1.0, 0.0))
    radii = np.clip(radii, 1.5 * fwhm_px, 40.0 * fwhm_px + 10.0)
    # sub-pixel sampling where it shows: faint stars (peak below 10 e-, lost in the sky noise) are
    # point-sampled, which keeps their centroid exact but not their width
    sub_bright = int(min(5, max(1, math.ceil(6.0 / fwhm_px))))
    subs = np.where(peak >= 10.0, sub_bright, 1).astype(np.int64)
    ibeta = float(beta) if float(beta).is_integer() and 1 < beta <= 12 else 0.0
    shapes = np.ascontiguousarray(np.stack([1.0 / (ax * ax), 1.0 / (ay * ay), np.cos(th), np.sin(th), norm], axis=1))
    _render_stars(out, xs, ys, fl, shapes, radii, subs, cm, np.array([beta, ibeta]), 64)


# ------------------------------------------------------------------------------ extended targets


@njit(cache=True, nogil=True, parallel=True)
def _render_galaxy(out, mat, comps, colour, cmap):  # pragma: no cover - numba
    """Sum of softened elliptical Sérsic components evaluated at the reference position of each pixel.

    mat: (2, 3) frame -> reference. comps rows: (x0, y0, ie, re, n, b_n, q, cos_pa, sin_pa, r_core).
    colour: (C,) multiplier per channel of cmap.
    """
    h, w = out.shape
    nc = comps.shape[0]
    for y in prange(h):
        for x in range(w):
            xr = mat[0, 0] * x + mat[0, 1] * y + mat[0, 2]
            yr = mat[1, 0] * x + mat[1, 1] * y + mat[1, 2]
            acc = 0.0
            for k in range(nc):
                dx = xr - comps[k, 0]
                dy = yr - comps[k, 1]
                u = dx * comps[k, 7] + dy * comps[k, 8]
                v = (-dx * comps[k, 8] + dy * comps[k, 7]) / comps[k, 6]
                r = math.sqrt(u * u + v * v + comps[k, 9] * comps[k, 9]) / comps[k, 3]
                if r < 12.0:
                    acc += comps[k, 2] * math.exp(-comps[k, 5] * (r ** (1.0 / comps[k, 4]) - 1.0))
            out[y, x] += acc * colour[cmap[y & 1, x & 1]]


def render_galaxy(
    out: np.ndarray,
    matrix: np.ndarray,
    components: np.ndarray,
    *,
    colour: np.ndarray | None = None,
    cmap: np.ndarray | None = None,
) -> None:
    """Add a galaxy (Sérsic components, reference-grid parameters) seen through ``matrix`` (frame -> ref).

    ``components`` rows: (x0, y0, Ie electrons at Re, Re px, n, b_n, axis ratio q, cos PA, sin PA, core px).
    ``colour``: multiplier per channel of ``cmap``. Default is None (1). ``cmap``: channel map. Default is
    None (mono).
    """
    mat = np.ascontiguousarray(np.asarray(matrix, dtype=np.float64)[:2, :3])
    col = np.ones(1) if colour is None else np.ascontiguousarray(colour, dtype=np.float64)
    cm = np.zeros((2, 2), dtype=np.int64) if cmap is None else np.ascontiguousarray(cmap, dtype=np.int64)
    _render_galaxy(out, mat, np.ascontiguousarray(components, dtype=np.float64), col, cm)


def render_nebula(
    out: np.ndarray,
    matrix: np.ndarray,
    field: np.ndarray,
    *,
    origin: tuple[float, float],
    step_px: float,
    colour: np.ndarray | None = None,
    cmap: np.ndarray | None = None,
    band_rows: int = 512,
) -> None:
    """Add a smooth nebula (electrons on a coarse reference grid) seen through ``matrix`` (frame -> ref).

    field[j, i] is the nebula at reference (origin[0] + i * step_px, origin[1] + j * step_px); it is
    evaluated with cubic spline interpolation (the field is smooth on the coarse scale). ``colour`` and
    ``cmap`` as for `render_galaxy` (Default is None: mono); ``band_rows`` rows per evaluation band.
    Default is 512.
    """
    from scipy.ndimage import map_coordinates

    h, w = out.shape
    mat = np.asarray(matrix, dtype=np.float64)
    cm = np.zeros((2, 2), dtype=np.int64) if cmap is None else np.asarray(cmap, dtype=np.int64)
    col = np.ones(1) if colour is None else np.asarray(colour, dtype=np.float64)
    xx = np.arange(w, dtype=np.float64)
    colrow = np.stack([col[cm[0, xx.astype(np.int64) & 1]], col[cm[1, xx.astype(np.int64) & 1]]])
    for y0 in range(0, h, band_rows):
        y1 = min(h, y0 + band_rows)
        yy = np.arange(y0, y1, dtype=np.float64)[:, None]
        xr = mat[0, 0] * xx[None, :] + mat[0, 1] * yy + mat[0, 2]
        yr = mat[1, 0] * xx[None, :] + mat[1, 1] * yy + mat[1, 2]
        ci = (xr - origin[0]) / step_px
        cj = (yr - origin[1]) / step_px
        vals = map_coordinates(field, [cj.ravel(), ci.ravel()], order=3, mode="nearest").reshape(ci.shape)
        par = (np.arange(y0, y1) & 1)[:, None]
        out[y0:y1] += (np.maximum(vals, 0.0) * np.where(par == 0, colrow[0][None, :], colrow[1][None, :])).astype(
            np.float32
        )


# ----------------------------------------------------------------------------------------- trails


@njit(cache=True, nogil=True, parallel=True)
def _render_trail(out, mask, line, profile, cmap, colour, mask_e):  # pragma: no cover - numba
    """Gaussian line (a x + b y + c = 0, unit normal) of sigma ``profile[0]`` and peak ``profile[1]``,
    along-track modulation: period ``profile[2]`` px (0 = continuous) with duty ``profile[3]``,
    limited to the segment t in [profile[4], profile[5]] along the direction (-b, a)."""
    h, w = out.shape
    a = line[0]
    b = line[1]
    c = line[2]
    sig = profile[0]
    peak = profile[1]
    period = profile[2]
    duty = profile[3]
    inv2s2 = 0.5 / (sig * sig)
    reach = 5.0 * sig
    for y in prange(h):
        for x in range(w):
            d = a * x + b * y + c
            if abs(d) > reach:
                continue
            t = -b * x + a * y
            if t < profile[4] or t > profile[5]:
                continue
            val = peak * math.exp(-d * d * inv2s2)
            if period > 0.0:
                ph = (t % period) / period
                if ph > duty:
                    val = 0.0
            val *= colour[cmap[y & 1, x & 1]]
            out[y, x] += val
            if val >= mask_e:
                mask[y, x] = True


def render_trail(
    out: np.ndarray,
    mask: np.ndarray,
    *,
    x0: float,
    y0: float,
    x1: float,
    y1: float,
    sigma_px: float,
    peak_e: float,
    period_px: float = 0.0,
    duty: float = 1.0,
    colour: np.ndarray | None = None,
    cmap: np.ndarray | None = None,
    mask_e: float = 2.0,
) -> None:
    """Add a straight trail from (x0, y0) to (x1, y1) (electrons) and mark ``mask`` where it adds >= mask_e.

    Gaussian cross-profile of ``sigma_px`` and ``peak_e``; blinking with ``period_px`` (Default is 0:
    continuous) and ``duty`` (lit fraction, Default is 1); ``colour``/``cmap`` as for `render_galaxy`
    (Default is None: mono); ``mask_e`` Default is 2 electrons.
    """
    dx = x1 - x0
    dy = y1 - y0
    length = math.hypot(dx, dy)
    if length == 0:
        return
    # unit normal (a, b) and along-track coordinate t = -b x + a y
    a = -dy / length
    b = dx / length
    c = -(a * x0 + b * y0)
    t0 = -b * x0 + a * y0
    t1 = -b * x1 + a * y1
    line = np.array([a, b, c], dtype=np.float64)
    prof = np.array([sigma_px, peak_e, period_px, duty, min(t0, t1), max(t0, t1)], dtype=np.float64)
    col = np.ones(1) if colour is None else np.ascontiguousarray(colour, dtype=np.float64)
    cm = np.zeros((2, 2), dtype=np.int64) if cmap is None else np.ascontiguousarray(cmap, dtype=np.int64)
    _render_trail(out, mask, line, prof, cm, col, float(mask_e))


# ------------------------------------------------------------------------------------ cosmic rays


def add_cosmic_rays(out: np.ndarray, hits: Sequence[Sequence[float]]) -> None:
    """Deposit cosmic-ray tracks (x, y, energy_e, length_px, angle_deg) into ``out`` (electrons).

    The energy is spread evenly along the track (at least one pixel), nearest pixel per step.
    """
    h, w = out.shape
    for x, y, energy, length, angle in hits:
        nstep = max(1, round(length) + 1)
        ca = math.cos(math.radians(angle))
        sa = math.sin(math.radians(angle))
        per = energy / nstep
        for k in range(nstep):
            xi = round(x + k * ca)
            yi = round(y + k * sa)
            if 0 <= xi < w and 0 <= yi < h:
                out[yi, xi] += per


# ------------------------------------------------------------------------------------------ flats


def dust_and_vignetting(
    shape: tuple[int, int],
    *,
    vignetting: float,
    centre: tuple[float, float],
    dust: list[tuple[float, float, float, float]],
) -> np.ndarray:
    """Optical response (float32, not normalised): cos^4-like vignetting times dust donuts.

    vignetting: fractional loss at the farthest corner from ``centre``. dust rows: (x, y, outer radius
    px, depth): an annular shadow (the central obstruction makes the centre shallower) with soft edges.
    """
    h, w = shape
    cx, cy = centre
    dx2 = ((np.arange(w, dtype=np.float64) - cx) ** 2)[None, :]
    dy2 = ((np.arange(h, dtype=np.float64) - cy) ** 2)[:, None]
    rmax2 = max(cx**2, (w - 1 - cx) ** 2) + max(cy**2, (h - 1 - cy) ** 2)
    # (1 + r^2/f^2)^-2 = 1 - vignetting at the farthest corner
    inv_f2 = ((1.0 - vignetting) ** -0.5 - 1.0) / rmax2 if vignetting > 0 else 0.0
    resp = (dx2 * inv_f2 + 1.0).astype(np.float32) + (dy2 * inv_f2).astype(np.float32)
    resp *= resp
    np.reciprocal(resp, out=resp)
    for x0d, y0d, rad, depth in dust:
        x0, x1 = max(0, int(x0d - rad - 6)), min(w, int(x0d + rad + 7))
        y0, y1 = max(0, int(y0d - rad - 6)), min(h, int(y0d + rad + 7))
        if x0 >= x1 or y0 >= y1:
            continue
        r = np.hypot(np.arange(x0, x1)[None, :] - x0d, np.arange(y0, y1)[:, None] - y0d)
        edge = max(1.0, 0.12 * rad)
        outer = 1.0 / (1.0 + np.exp((r - rad) / edge))
        inner = 1.0 / (1.0 + np.exp((r - 0.45 * rad) / edge))
        shadow = depth * (outer - 0.6 * inner)
        resp[y0:y1, x0:x1] *= (1.0 - shadow).astype(np.float32)
    return resp
