"""Star detection and frame measurement (algorithms.md §1.3, §6.1-§6.3).

`measure(image)` works on a calibrated frame: mono (H, W), or debayered colour (3, H, W) measured on
its luminance (R+G+B)/3. It returns a frozen `Measurement` with

Hot pixels and cosmic-ray hits (a peak more than 4x its brightest edge neighbour, §4.2; or moments
narrower than 0.7 px) are dropped before anything is counted: on uncalibrated frames they would
otherwise pass as stars that do not move with the sky.

- ``stars``: a `StarTable` (x, y, flux, peak, fwhm, a, b, theta, flags, snr, npix, hfr), brightest
  first, at most ``max_stars`` rows; x, y are 0-based pixel centres (x = column, y = row), windowed
  (SExtractor XWIN) positions; ``fwhm`` is the PSF-fit FWHM where the star was fitted, else NaN;
- ``metrics``: `FrameMetrics` (stars, fwhm_px, fwhm_arcsec, eccentricity, hfr, background, noise,
  psf_snr ...); frame values are medians over PSF fits of the brightest clean stars;
- the sky background model (``background_map()``, ``background_rms_map()``, ``background_box_px``).

Detection uses sep: a first background pass, extraction on the background-subtracted frame (NaN
filled and masked), then optionally a second background pass with the detected stars masked (the reported
background and the map; optional, ``refine_background``). Saturated and edge stars are flagged and
never enter the PSF fits. Frames of >= 4 M pixels (``detect_binning``) measure the background on the
decimated frame and detect on 2x2 means (sep holds the GIL and is single-threaded: at 26 MP this cuts
the measurement's CPU time by ~40 %); windowed centroids, peaks, radii and PSF fits stay at full
resolution.

PSF fits: elliptical Moffat (beta free in [1.5, 10]) or Gaussian by a small Levenberg-Marquardt
(numba normal equations, analytic Jacobian) on cutouts of the brightest unsaturated isolated stars. The model is
evaluated at pixel centres; the FWHM of each axis is then corrected for pixel integration by
subtracting the variance of a one-pixel box in quadrature (FWHM^2 - 8 ln2/12), so that the reported
FWHM is the optical PSF's. Frame values are medians of the fits after a 3-sigma MAD clip; a reduced
chi^2 cut is not applied (no gain is known here, so star cores' shot noise makes chi^2 meaningless).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sep
from numba import njit, prange
from scipy.spatial import cKDTree
from stackwatch.engine.errors import StackwatchError

__all__ = [
    "FLAG_ARTEFACT",
    "FLAG_BLENDED",
    "FLAG_EDGE",
    "FLAG_SATURATED",
    "FrameMetrics",
    "Measurement",
    "StarTable",
    "fit_psf",
    "luminance",
    "measure",
    "pixel_scale_arcsec",
]

FLAG_SATURATED = 1
FLAG_EDGE = 2
FLAG_BLENDED = 4
FLAG_ARTEFACT = 8

_FWHM_GAUSS = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.35482
_WINDOWED_STARS = 500  # brightest table rows that get windowed centroids and half-flux radii (`measure`)
_PIXEL_VAR_FWHM2 = 8.0 * math.log(2.0) / 12.0  # FWHM^2 of a one-pixel box's variance (Gaussian-equivalent)

sep.set_extract_pixstack(2_000_000)
sep.set_sub_object_limit(4096)


@dataclass(frozen=True)
class StarTable:
    """Detected stars, brightest first. All arrays have the same length (0 for an empty frame).

    x, y: windowed centroids (isophotal below the 500 brightest rows), 0-based (x = column, y = row).
    flux: background-subtracted isophotal
    flux (sep); peak: background-subtracted peak; fwhm: PSF-fit FWHM in px (NaN where not fitted);
    a, b, theta: sep second-moment ellipse (px, radians from +x towards +y); flags: FLAG_* bits;
    snr: flux / (rms * sqrt(npix)); npix: isophotal area; hfr: half-flux radius in px (NaN below the
    500 brightest rows, except PSF-fitted stars).
    """

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    peak: np.ndarray
    fwhm: np.ndarray
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    flags: np.ndarray
    snr: np.ndarray
    npix: np.ndarray
    hfr: np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @staticmethod
    def empty() -> StarTable:
        f = np.zeros(0, dtype=np.float64)
        return StarTable(
            x=f, y=f.copy(), flux=f.copy(), peak=f.copy(), fwhm=f.copy(), a=f.copy(), b=f.copy(),
            theta=f.copy(), flags=np.zeros(0, dtype=np.int32), snr=f.copy(), npix=np.zeros(0, dtype=np.int64),
            hfr=f.copy(),
        )

    def select(self, index: np.ndarray) -> StarTable:
        """A new table with rows ``index`` (bool mask or integer indices), order kept."""
        return StarTable(**{name: getattr(self, name)[index] for name in self.__dataclass_fields__})

    @property
    def clean(self) -> np.ndarray:
        """Bool mask of stars with no flag (usable for shapes and photometry)."""
        return np.asarray(self.flags == 0)


@dataclass(frozen=True)
class FrameMetrics:
    """Per-frame measurements. NaN where a value could not be measured (``reason`` says why).

    stars: detected stars (not capped by ``max_stars``, hot pixels and artefacts excluded);
    fwhm_px / fwhm_arcsec: median PSF FWHM (geometric mean of the axes, the pixel's own width taken
    out); eccentricity: sqrt(1 - b^2/a^2) of the PSF as sampled (pixel included, as PixInsight
    measures it) from the median ellipticity vector (`_frame_eccentricity`); hfr: median half-flux radius of the fitted stars (px); background: median of
    the sky mesh (data units); background_rms: sep's global RMS; noise: multiresolution noise
    (§1.2, central window) when available, else the background RMS (``noise_method`` says which); psf_snr:
    (sum of star fluxes)^2 / (noise^2 * sum of their areas), a PSF signal-to-noise figure;
    psf_fits: number of PSF fits behind the medians; fwhm_spread_px: 1.4826 MAD of the fit FWHMs.
    """

    stars: int
    fwhm_px: float
    fwhm_arcsec: float
    eccentricity: float
    hfr: float
    background: float
    background_rms: float
    noise: float
    noise_method: str
    psf_snr: float
    psf_fits: int
    fwhm_spread_px: float
    beta: float
    saturated_stars: int
    pixel_scale_arcsec: float
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of the metrics (floats/ints/strs)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class Measurement:
    """The measurement of one frame: the star table, the metrics and the background model."""

    stars: StarTable
    metrics: FrameMetrics
    shape: tuple[int, int]
    background_box_px: int
    _background: Any = field(default=None, repr=False, compare=False)

    def background_map(self) -> np.ndarray:
        """The full-resolution sky background (float32 (H, W)) from the star-masked sep mesh."""
        if self._background is None:
            return np.full(self.shape, np.nan, dtype=np.float32)
        return np.asarray(self._background.back(), dtype=np.float32)

    def background_rms_map(self) -> np.ndarray:
        """The full-resolution background RMS (float32 (H, W))."""
        if self._background is None:
            return np.full(self.shape, np.nan, dtype=np.float32)
        return np.asarray(self._background.rms(), dtype=np.float32)


def pixel_scale_arcsec(pixel_size_um: float | None, focal_length_mm: float | None, binning: int = 1) -> float:
    """Image scale in arcsec/px = 206.265 * pixel_um / focal_mm * binning; NaN when unknown.

    Pass the pixel size as the header gives it (XPIXSZ); if the header's XPIXSZ already includes binning,
    pass binning=1.
    """
    if not pixel_size_um or not focal_length_mm or pixel_size_um <= 0 or focal_length_mm <= 0:
        return float("nan")
    return 206.265 * float(pixel_size_um) / float(focal_length_mm) * max(1, int(binning))


def luminance(image: np.ndarray) -> np.ndarray:
    """The 2-D plane to measure: the image itself (H, W), or (R+G+B)/3 of a (3, H, W) frame, float32."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        return np.asarray(arr, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        return np.asarray(arr.mean(axis=0, dtype=np.float32), dtype=np.float32)
    raise StackwatchError(f"image must be (H, W) or (3, H, W), got shape {arr.shape}")


# --------------------------------------------------------------------------------------- PSF fit


@njit(cache=True, nogil=True)
def _normal_eq(p, dx, dy, z, moffat, a, g):  # pragma: no cover - numba
    """Sum of squared residuals at p; fills the normal matrix a = J^T J and gradient g = J^T r."""
    k = p.shape[0]
    b0 = p[0]
    amp = p[1]
    x0 = p[2]
    y0 = p[3]
    cxx = p[4]
    cyy = p[5]
    cxy = p[6]
    beta = p[7] if moffat else 0.0
    a[:, :] = 0.0
    g[:] = 0.0
    jr = np.empty(k)
    cost = 0.0
    for n in range(z.shape[0]):
        ex = dx[n] - x0
        ey = dy[n] - y0
        q = cxx * ex * ex + cyy * ey * ey + cxy * ex * ey
        if moffat:
            uu = max(1.0 + q, 1e-12)
            lu = math.log(uu)
            base = math.exp(-beta * lu)
            dq = -amp * beta * base / uu
            jr[7] = -amp * base * lu
        else:
            base = math.exp(-0.5 * q)
            dq = -0.5 * amp * base
        r = b0 + amp * base - z[n]
        cost += r * r
        jr[0] = 1.0
        jr[1] = base
        jr[2] = -dq * (2.0 * cxx * ex + cxy * ey)
        jr[3] = -dq * (2.0 * cyy * ey + cxy * ex)
        jr[4] = dq * ex * ex
        jr[5] = dq * ey * ey
        jr[6] = dq * ex * ey
        for i in range(k):
            g[i] += jr[i] * r
            for j in range(i + 1):
                a[i, j] += jr[i] * jr[j]
    for i in range(k):
        for j in range(i + 1, k):
            a[i, j] = a[j, i]
    return cost


@njit(cache=True, nogil=True)
def _levmar_kernel(p0, lo, hi, dx, dy, z, moffat, max_nfev):  # pragma: no cover - numba
    """Levenberg-Marquardt (Marquardt's diagonal scaling, bounds by clipping). Returns (p, ok)."""
    k = p0.shape[0]
    p = p0.copy()
    a = np.empty((k, k))
    g = np.empty(k)
    an = np.empty((k, k))
    gn = np.empty(k)
    cost = _normal_eq(p, dx, dy, z, moffat, a, g)
    if not math.isfinite(cost):
        return p, False
    lam = 1e-3
    nfev = 1
    while nfev < max_nfev:
        improved = False
        rel = 1.0
        while nfev < max_nfev:
            m = a.copy()
            for i in range(k):
                d = a[i, i] if a[i, i] > 0.0 else 1e-12
                m[i, i] = a[i, i] + lam * d
            step = np.linalg.solve(m, -g)
            pn = np.minimum(np.maximum(p + step, lo), hi)
            cn = _normal_eq(pn, dx, dy, z, moffat, an, gn)
            nfev += 1
            if math.isfinite(cn) and cn < cost:
                rel = (cost - cn) / max(cost, 1e-300)
                p = pn
                cost = cn
                a[:, :] = an
                g[:] = gn
                lam = max(lam / 3.0, 1e-9)
                improved = True
                break
            lam *= 4.0
            if lam > 1e9:
                break
        if not improved or rel < 1e-6:
            break
    for i in range(k):
        if not math.isfinite(p[i]):
            return p, False
    return p, True


def _levmar(p0: np.ndarray, lo: np.ndarray, hi: np.ndarray, dx: np.ndarray, dy: np.ndarray, z: np.ndarray,
            moffat: bool, max_nfev: int) -> np.ndarray | None:
    """Bounded Levenberg-Marquardt fit (numba); None if it goes non-finite or singular."""
    try:
        p, ok = _levmar_kernel(p0, lo, hi, dx, dy, z, moffat, int(max_nfev))
    except (np.linalg.LinAlgError, ZeroDivisionError):
        return None
    return p if ok else None


@dataclass(frozen=True)
class _Fit:
    x: float
    y: float
    fwhm: float
    fwhm_a: float  # axes of the PSF without the pixel (FWHM, px)
    fwhm_b: float
    sampled_a: float  # axes as sampled (pixel included): what eccentricity is measured on
    sampled_b: float
    ecc: float
    beta: float
    angle: float  # major axis position angle (radians from +x towards +y)


def fit_psf(
    cutout: np.ndarray,
    *,
    x0: float,
    y0: float,
    fwhm_guess_px: float,
    model: str = "moffat",
    max_nfev: int = 50,
) -> _Fit | None:
    """Fit an elliptical Moffat or Gaussian to a background-subtracted cutout; None when the fit fails.

    Parameters
    ----------
    cutout : 2-D float array (NaN pixels are ignored).
    x0, y0 : start position inside the cutout (0-based).
    fwhm_guess_px : start FWHM.
    model : "moffat" (beta free in [1.5, 10]) or "gaussian". Default is "moffat".
    max_nfev : evaluation limit. Default is 50.

    Returned FWHMs are corrected for pixel integration (see module doc).
    """
    moffat = model == "moffat"
    hh, ww = cutout.shape
    yy, xx = np.mgrid[0:hh, 0:ww]
    ok = np.isfinite(cutout)
    if ok.sum() < 12:
        return None
    z = np.ascontiguousarray(cutout[ok], dtype=np.float64)
    dx = np.ascontiguousarray(xx[ok], dtype=np.float64)
    dy = np.ascontiguousarray(yy[ok], dtype=np.float64)
    fw = max(float(fwhm_guess_px), 1.0)
    border = np.concatenate([cutout[0], cutout[-1], cutout[:, 0], cutout[:, -1]])
    border = border[np.isfinite(border)]
    b0 = float(np.median(border)) if border.size else 0.0
    amp = float(np.nanmax(cutout)) - b0
    if not amp > 0:
        return None
    if moffat:
        beta0 = 3.0
        alpha = fw / (2.0 * math.sqrt(2.0 ** (1.0 / beta0) - 1.0))
        c0 = 1.0 / (alpha * alpha)
        p0 = np.array([b0, amp, x0, y0, c0, c0, 0.0, beta0])
        lo = np.array([-np.inf, 0.0, x0 - 2.0, y0 - 2.0, 1e-5, 1e-5, -np.inf, 1.5])
        hi = np.array([np.inf, np.inf, x0 + 2.0, y0 + 2.0, 50.0, 50.0, np.inf, 10.0])
    else:
        sig = fw / _FWHM_GAUSS
        c0 = 1.0 / (sig * sig)
        p0 = np.array([b0, amp, x0, y0, c0, c0, 0.0])
        lo = np.array([-np.inf, 0.0, x0 - 2.0, y0 - 2.0, 1e-5, 1e-5, -np.inf])
        hi = np.array([np.inf, np.inf, x0 + 2.0, y0 + 2.0, 50.0, 50.0, np.inf])

    p = _levmar(p0, lo, hi, dx, dy, z, moffat, max_nfev)
    if p is None:
        return None
    cxx, cyy, cxy = p[4], p[5], p[6]
    mat = np.array([[cxx, 0.5 * cxy], [0.5 * cxy, cyy]])
    lam, vec = np.linalg.eigh(mat)  # ascending: the major axis has the smallest eigenvalue
    if not np.all(np.isfinite(lam)) or lam[0] <= 0:
        return None
    ax_major = 1.0 / math.sqrt(lam[0])
    ax_minor = 1.0 / math.sqrt(lam[1])
    if moffat:
        beta = float(p[7])
        k = 2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0)
    else:
        beta = float("inf")
        k = _FWHM_GAUSS
    fa2 = (k * ax_major) ** 2 - _PIXEL_VAR_FWHM2
    fb2 = (k * ax_minor) ** 2 - _PIXEL_VAR_FWHM2
    if fb2 <= 0.0 or fa2 <= 0.0:
        return None
    fa = math.sqrt(fa2)
    fb = math.sqrt(fb2)
    # FWHM without the pixel (the seeing), eccentricity as sampled (as PixInsight reports it, so that its
    # approval thresholds mean the same here): taking the pixel out of both axes inflates the
    # eccentricity of undersampled stars, e.g. 0.70 instead of 0.66 on a real 1.6 px frame
    sa = k * ax_major
    sb = k * ax_minor
    ecc = math.sqrt(max(0.0, 1.0 - (sb / sa) ** 2))
    angle = math.atan2(float(vec[1, 0]), float(vec[0, 0]))
    return _Fit(x=float(p[2]), y=float(p[3]), fwhm=math.sqrt(fa * fb), fwhm_a=fa, fwhm_b=fb, sampled_a=sa,
                sampled_b=sb, ecc=ecc, beta=beta, angle=angle)


def _frame_eccentricity(fits: list[_Fit], zones: np.ndarray | None = None) -> float:
    """Frame eccentricity from the median ellipticity *vector* of the fits, per zone of the field.

    Per-star eccentricity is biased high by noise (e = sqrt(1 - b^2/a^2) reaches 0.28 for a 4 % axis
    error), so the median of per-star values reports ~0.3 for round stars at low SNR. Averaging the
    polarisation (chi cos 2phi, chi sin 2phi), chi = (a^2 - b^2)/(a^2 + b^2), cancels the noise while a
    real elongation (tracking, wind, tilt) keeps its direction. Field-dependent orientation (coma,
    tilt) is kept by taking the vector median within 3x3 zones (>= 5 fits each) and the median of the
    zone magnitudes. Returns sqrt(2 chi/(1 + chi)).
    """
    fa = np.array([f.sampled_a for f in fits])
    fb = np.array([f.sampled_b for f in fits])
    ang = np.array([f.angle for f in fits])
    chi = (fa * fa - fb * fb) / (fa * fa + fb * fb)
    c1 = chi * np.cos(2.0 * ang)
    c2 = chi * np.sin(2.0 * ang)
    mags: list[float] = []
    if zones is not None and len(zones) == len(fits):
        zid = np.asarray(zones)
        for z in np.unique(zid):
            sel = zid == z
            if sel.sum() >= 5:
                mags.append(math.hypot(float(np.median(c1[sel])), float(np.median(c2[sel]))))
    if not mags:
        mags.append(math.hypot(float(np.median(c1)), float(np.median(c2))))
    chi_m = min(float(np.median(mags)), 0.999)
    return math.sqrt(2.0 * chi_m / (1.0 + chi_m))


# ----------------------------------------------------------------------------------- detection


def _box_size(fwhm_px: float | None, scale: float | None) -> int:
    cands = []
    if fwhm_px and math.isfinite(fwhm_px) and fwhm_px > 0:
        cands.append(10.0 * fwhm_px)
    if scale and math.isfinite(scale) and scale > 0:
        cands.append(60.0 / scale)
    if not cands:
        return 64
    return int(min(256, max(32, round(max(cands)))))


def _detect_binning(requested: int | None, h: int, w: int, fwhm: float) -> int:
    if requested is None:
        return 2 if h * w >= 4_000_000 and fwhm >= 2.5 else 1
    if requested not in (1, 2):
        raise StackwatchError(f"detect_binning must be 1 or 2, got {requested}")
    return 2 if requested == 2 and min(h, w) >= 64 else 1


def _gauss_kernel(fwhm: float) -> np.ndarray:
    sig = max(fwhm, 1.0) / _FWHM_GAUSS
    half = max(1, math.ceil(2.0 * sig))
    r = np.arange(-half, half + 1, dtype=np.float64)
    k = np.exp(-0.5 * (r[:, None] ** 2 + r[None, :] ** 2) / (sig * sig))
    return np.asarray(k / k.sum(), dtype=np.float32)


def _single_pixel(sub: np.ndarray, objs: np.ndarray) -> np.ndarray:
    """True for detections whose peak stands alone: a hot pixel or a cosmic-ray hit, not a star.

    §4.2's star-core test: (peak - sky) > 4 (n4 - sky), n4 = the brightest of the 4 edge-adjacent pixels.
    A PSF with FWHM >= 1.5 px has a centre/adjacent ratio <= 3.43, so no star is ever taken; an
    uncalibrated frame's hot pixels (which do not move with the sky and would pull registration
    towards the identity) are.
    """
    h, w = sub.shape
    if len(objs) == 0:
        return np.zeros(0, dtype=bool)
    xp = np.clip(np.asarray(objs["xpeak"], dtype=np.int64), 0, w - 1)
    yp = np.clip(np.asarray(objs["ypeak"], dtype=np.int64), 0, h - 1)
    centre = sub[yp, xp]
    n4 = np.maximum.reduce([
        sub[yp, np.clip(xp - 1, 0, w - 1)], sub[yp, np.clip(xp + 1, 0, w - 1)],
        sub[np.clip(yp - 1, 0, h - 1), xp], sub[np.clip(yp + 1, 0, h - 1), xp],
    ])
    return np.asarray(centre > 4.0 * np.maximum(n4, 0.0))


@njit(cache=True, nogil=True)
def _background_row(back, y, row):  # pragma: no cover - numba
    """Row ``y`` (full resolution) of a map on the decimated grid (pixel (i, j) = full (2i, 2j)),
    interpolated in y only: ``row`` keeps the decimated columns."""
    hb = back.shape[0]
    y0 = min(y // 2, hb - 1)
    y1 = min(y0 + 1, hb - 1)
    ay = 0.5 * (y - 2 * y0) if y1 > y0 else 0.0
    for j in range(back.shape[1]):
        row[j] = (1.0 - ay) * back[y0, j] + ay * back[y1, j]


@njit(cache=True, nogil=True, parallel=True)
def _subtract_and_bin(data, back, sub, binned):  # pragma: no cover - numba
    """sub = data - background, the background given on the decimated grid and interpolated bilinearly
    (even columns sit on the grid, odd ones halfway); binned = 2x2 means of sub (an odd last row or
    column is left out of ``binned``). One pass over the frame, by pairs of rows."""
    h, w = data.shape
    wb = back.shape[1]
    ww = binned.shape[1]
    for i in prange((h + 1) // 2):
        row = np.empty(wb)
        for y in range(2 * i, min(2 * i + 2, h)):
            _background_row(back, y, row)
            for j in range(wb):
                x = 2 * j
                if x < w:
                    sub[y, x] = data[y, x] - row[j]
                if x + 1 < w:
                    sub[y, x + 1] = data[y, x + 1] - 0.5 * (row[j] + row[min(j + 1, wb - 1)])
        if 2 * i + 1 < h:
            for j in range(ww):
                acc = (np.float64(sub[2 * i, 2 * j]) + sub[2 * i, 2 * j + 1]) + (
                    np.float64(sub[2 * i + 1, 2 * j]) + sub[2 * i + 1, 2 * j + 1])
                binned[i, j] = 0.25 * acc


@njit(cache=True, nogil=True, parallel=True)
def _upsample2(small, out):  # pragma: no cover - numba
    """Bilinear interpolation of a map on the decimated grid to the full-resolution ``out``."""
    h, w = out.shape
    wb = small.shape[1]
    for y in prange(h):
        row = np.empty(wb)
        _background_row(small, y, row)
        for x in range(w):
            j = x // 2
            out[y, x] = row[j] if x % 2 == 0 else 0.5 * (row[j] + row[min(j + 1, wb - 1)])


@njit(cache=True, nogil=True, parallel=True)
def _count_finite(a):  # pragma: no cover - numba
    """Number of finite pixels, without a full-frame mask."""
    h, w = a.shape
    counts = np.zeros(h, dtype=np.int64)
    for y in prange(h):
        c = 0
        for x in range(w):
            if np.isfinite(a[y, x]):
                c += 1
        counts[y] = c
    return counts.sum()


class _DecimatedBackground:
    """A sep background measured on the decimated frame (every second pixel of every second row:
    single-pixel statistics, hence the RMS, are those of the full frame), maps served at full size."""

    def __init__(self, bkg: Any, shape: tuple[int, int]) -> None:
        self._bkg = bkg
        self._shape = shape
        self.globalback = float(bkg.globalback)
        self.globalrms = float(bkg.globalrms)

    def _full(self, small: np.ndarray) -> np.ndarray:
        out = np.empty(self._shape, dtype=np.float32)
        _upsample2(np.ascontiguousarray(small, dtype=np.float32), out)
        return out

    def back(self) -> np.ndarray:
        return self._full(self._bkg.back())

    def rms(self) -> np.ndarray:
        return self._full(self._bkg.rms())


@njit(cache=True, nogil=True)
def _full_res_peaks(sub, xpb, ypb, xp, yp, peak):  # pragma: no cover - numba
    """The brightest full-resolution pixel of each binned peak pixel's 2x2 block."""
    h, w = sub.shape
    for k in range(xpb.shape[0]):
        best = -np.inf
        bx = 2 * xpb[k]
        by = 2 * ypb[k]
        for dy in range(2):
            for dx in range(2):
                yy = min(by + dy, h - 1)
                xx = min(bx + dx, w - 1)
                if sub[yy, xx] > best:
                    best = sub[yy, xx]
                    xp[k] = xx
                    yp[k] = yy
        peak[k] = best


def _to_full_resolution(objs: np.ndarray, sub: np.ndarray) -> np.ndarray:
    """sep objects detected on the 2x2-binned frame, in full-resolution units: centres (binned pixel i
    covers full pixels 2i, 2i+1), axes x2, areas x4, isophotal flux x4 (bins are means), peak and its
    position from the full-resolution pixels."""
    n = len(objs)
    out = np.zeros(n, dtype=[("x", "f8"), ("y", "f8"), ("a", "f8"), ("b", "f8"), ("theta", "f8"), ("npix", "i8"),
                             ("flux", "f8"), ("peak", "f8"), ("xpeak", "i8"), ("ypeak", "i8"), ("flag", "i8")])
    if n == 0:
        return out
    out["x"] = 2.0 * objs["x"] + 0.5
    out["y"] = 2.0 * objs["y"] + 0.5
    out["a"] = 2.0 * objs["a"]
    out["b"] = 2.0 * objs["b"]
    out["theta"] = objs["theta"]
    out["npix"] = 4 * np.asarray(objs["npix"], dtype=np.int64)
    out["flux"] = 4.0 * objs["flux"]
    out["flag"] = objs["flag"]
    xp = np.empty(n, dtype=np.int64)
    yp = np.empty(n, dtype=np.int64)
    peak = np.empty(n, dtype=np.float64)
    _full_res_peaks(sub, np.asarray(objs["xpeak"], dtype=np.int64), np.asarray(objs["ypeak"], dtype=np.int64), xp, yp,
                    peak)
    out["xpeak"] = xp
    out["ypeak"] = yp
    out["peak"] = peak
    return out


# ------------------------------------------------------------------------- cleaning (§6.1)

_CLEAN_BETA = 1.0  # SExtractor's CLEAN_PARAM: Moffat beta of the extrapolated wing (1 = r^-2, generous)
_CLEAN_ZONE = 10.0  # a neighbour is considered within CLEAN_ZONE * (a_bright + median a), SExtractor's zone
_CLEAN_CELL_PX = 16.0


@njit(cache=True, nogil=True)
def _clean_kernel(x, y, shape, wing, margin, order, cell_start, cell_members, grid, eater):  # pragma: no cover
    """For every detection j, the brighter detection i whose extrapolated wing is the largest at j's position
    among those whose wing exceeds j's detection margin: eater[j] = i, or -1.

    shape[i] = (cxx, cyy, cxy, zone radius^2) of detection i; wing[i] = (amplitude, alpha) of its Moffat wing
    amp (1 + alpha q)^-beta (q = cxx dx^2 + cyy dy^2 + cxy dx dy, beta = wing[0, 2]); margin[j]: how far j's
    peak stands above the detection threshold; order[i]: rank by filtered flux (0 = brightest), which only
    a brighter detection can remove. Detections are binned in square cells of grid[0] px (grid[1] x grid[2]
    cells), cell_members listing detection indices cell by cell from cell_start; each source visits only
    the cells of its zone, so the work is the number of pairs within the zones, not N^2.
    """
    n = x.shape[0]
    beta = wing[0, 2]
    cell = grid[0]
    ncx = int(grid[1])
    ncy = int(grid[2])
    best = np.zeros(n)
    for i in range(n):
        amp = wing[i, 0]
        alpha = wing[i, 1]
        if not alpha > 0.0:
            continue
        cxx = shape[i, 0]
        cyy = shape[i, 1]
        cxy = shape[i, 2]
        zone2 = shape[i, 3]
        r = math.sqrt(zone2)
        cx0 = max(0, int((x[i] - r) // cell))
        cx1 = min(ncx - 1, int((x[i] + r) // cell))
        cy0 = max(0, int((y[i] - r) // cell))
        cy1 = min(ncy - 1, int((y[i] + r) // cell))
        for cy in range(cy0, cy1 + 1):
            for cx in range(cx0, cx1 + 1):
                c = cy * ncx + cx
                for k in range(cell_start[c], cell_start[c + 1]):
                    j = cell_members[k]
                    if order[j] <= order[i]:
                        continue
                    dx = x[j] - x[i]
                    dy = y[j] - y[i]
                    if dx * dx + dy * dy > zone2:
                        continue
                    q = cxx * dx * dx + cyy * dy * dy + cxy * dx * dy
                    w = amp * (1.0 + alpha * q) ** (-beta)
                    if w > margin[j] and w > best[j]:
                        best[j] = w
                        eater[j] = i


def _clean(objs: np.ndarray, thresh: float, minarea: int, beta: float = _CLEAN_BETA) -> np.ndarray:
    """Remove spurious detections in brighter detections' wings (SExtractor's CLEAN rule, §6.1) from a sep
    catalogue extracted with clean=False; removed detections' flux and area go to the detection that
    accounts for them. O(N log N): a spatial grid instead of sep's pairwise pass.

    The rule (Bertin & Arnouts 1996, §3.4; CLEAN_PARAM = beta): a detection is kept only if it would still
    have been detected without its brighter neighbours. Each detection's light is extrapolated by a Moffat
    profile amp (1 + alpha q)^-beta in its own moment ellipse (q = cxx dx^2 + cyy dy^2 + cxy dx dy): amp is
    the larger of the filtered peak and the Gaussian-equivalent peak of the filtered flux cflux / (2 pi a b)
    (saturated cores are clipped, their flux much less so), alpha makes the profile fall to the threshold t
    on the isophote (area npix = pi a b q_iso). beta = 1 (SExtractor's default) falls as r^-2, slower than
    any real star's wing (beta 2-5): a generous estimate of the light a bright star puts there.
    A fainter detection j is removed when that wing at its centre exceeds its detection margin: the height
    of its minarea-th brightest filtered pixel above t, which is what the wing lifted it by at most. The
    margin is modelled from sep's catalogue (sep does not report it): for a profile with a peak P_j (cpeak)
    whose area above a level L falls as log(P_j / L) (a Gaussian), the minarea-th brightest pixel is at
    L = P_j (t / P_j)^((minarea - 1/2) / (npix_j + 1/2)): the k-th brightest pixel centre encloses an area of
    ~k - 1/2 pixels, the isophote ~npix + 1/2 (without the halves a detection of exactly minarea pixels
    would have no margin at all and any neighbour's wing would remove it: 2.3x sep's removals of real
    faint stars on binned frames, where minarea is 2). Only detections within _CLEAN_ZONE (a_i + median a) are compared,
    SExtractor's zone. The pairwise comparison uses the strongest wing at each position (not the sum).
    """
    n = len(objs)
    if n < 2 or not thresh > 0:
        return objs
    x = np.ascontiguousarray(objs["x"], dtype=np.float64)
    y = np.ascontiguousarray(objs["y"], dtype=np.float64)
    a = np.maximum(np.asarray(objs["a"], dtype=np.float64), 0.1)
    b = np.maximum(np.asarray(objs["b"], dtype=np.float64), 0.1)
    npix = np.maximum(np.asarray(objs["npix"], dtype=np.float64), 1.0)
    cflux = np.asarray(objs["cflux"], dtype=np.float64)
    peak = np.maximum(np.asarray(objs["cpeak"], dtype=np.float64), thresh)
    unit = math.pi * a * b
    amp = np.maximum(peak, cflux / (2.0 * unit))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        alpha = ((amp / thresh) ** (1.0 / beta) - 1.0) * unit / npix
        level = peak * (thresh / peak) ** np.minimum(1.0, (minarea - 0.5) / (npix + 0.5))
    alpha = np.where(np.isfinite(alpha), alpha, 0.0)
    margin = np.where(np.isfinite(level), level - thresh, 0.0)
    zone = _CLEAN_ZONE * (a + float(np.median(a)))
    shape = np.ascontiguousarray(np.column_stack([objs["cxx"], objs["cyy"], objs["cxy"], zone * zone]),
                                 dtype=np.float64)
    wing = np.zeros((n, 3))
    wing[:, 0] = amp
    wing[:, 1] = alpha
    wing[0, 2] = beta
    # rank by filtered flux, ties by index: only a strictly brighter detection removes another
    order = np.empty(n, dtype=np.int64)
    order[np.lexsort((np.arange(n), -cflux))] = np.arange(n)
    x0, y0 = float(x.min()), float(y.min())
    ncx = int((x.max() - x0) // _CLEAN_CELL_PX) + 1
    ncy = int((y.max() - y0) // _CLEAN_CELL_PX) + 1
    cid = ((y - y0) // _CLEAN_CELL_PX).astype(np.int64) * ncx + ((x - x0) // _CLEAN_CELL_PX).astype(np.int64)
    members = np.argsort(cid, kind="stable").astype(np.int64)
    start = np.searchsorted(cid[members], np.arange(ncx * ncy + 1)).astype(np.int64)
    eater = np.full(n, -1, dtype=np.int64)
    _clean_kernel(x - x0, y - y0, shape, wing, margin, order, start, members,
                  np.array([_CLEAN_CELL_PX, ncx, ncy], dtype=np.float64), eater)
    removed = eater >= 0
    if not removed.any():
        return objs
    # a removed detection's light goes to the detection that finally holds its eater (chains end: the
    # eater is always brighter)
    root = eater.copy()
    while True:
        nxt = np.where(root >= 0, eater[np.maximum(root, 0)], -1)
        chained = nxt >= 0
        if not chained.any():
            break
        root = np.where(chained, nxt, root)
    out = objs.copy()
    src = np.nonzero(removed)[0]
    for name in ("flux", "cflux", "npix", "tnpix"):
        if name in (objs.dtype.names or ()):
            np.add.at(out[name], root[src], objs[name][src])
    return out[~removed]


def _extract(data: np.ndarray, thresh: float, mask: np.ndarray | None, minarea: int, kernel: np.ndarray,
             clean: str = "moffat") -> tuple[np.ndarray, float, str]:
    """sep.extract with retries on buffer overflow (threshold x1.5, up to 3 times), cleaned by `_clean`
    ("moffat"), by sep ("sep") or not ("none")."""
    note = ""
    for attempt in range(4):
        try:
            objs = sep.extract(
                data, thresh, mask=mask, minarea=minarea, filter_kernel=kernel, filter_type="matched",
                deblend_nthresh=32, deblend_cont=0.005, clean=clean == "sep",
            )
            if clean == "moffat":
                objs = _clean(objs, thresh, minarea)
            return objs, thresh, note
        except Exception as exc:  # sep raises a bare Exception on buffer overflow
            text = str(exc)
            if "full" not in text and "overflow" not in text and "limit" not in text:
                raise
            note = f"detection threshold raised x{1.5 ** (attempt + 1):.2f} after sep overflow ({text.strip()})"
            thresh *= 1.5
    return np.zeros(0, dtype=[("x", "f8")]), thresh, note + "; gave up"


def _empty(shape: tuple[int, int], reason: str, *, background: float = float("nan"), rms: float = float("nan"),
           noise: float = float("nan"), noise_method: str = "NONE", scale: float = float("nan"),
           box: int = 64, bkg: Any = None) -> Measurement:
    nan = float("nan")
    metrics = FrameMetrics(
        stars=0, fwhm_px=nan, fwhm_arcsec=nan, eccentricity=nan, hfr=nan, background=background,
        background_rms=rms, noise=noise, noise_method=noise_method, psf_snr=nan, psf_fits=0,
        fwhm_spread_px=nan, beta=nan, saturated_stars=0, pixel_scale_arcsec=scale, reason=reason,
    )
    return Measurement(stars=StarTable.empty(), metrics=metrics, shape=shape, background_box_px=box, _background=bkg)


def _noise(lum: np.ndarray, finite: np.ndarray | None, saturated: np.ndarray | None,
           window: int) -> tuple[float | None, str]:
    """Multiresolution noise (stats.mrs_noise, §1.2) on the central window; (None, "SEP_RMS") when it fails
    (the caller falls back to the sep background RMS)."""
    try:
        from stackwatch.engine import stats  # H3's module; optional until it lands
    except ImportError:
        return None, "SEP_RMS"
    mrs = getattr(stats, "mrs_noise", None)
    if mrs is None:
        return None, "SEP_RMS"
    h, w = lum.shape
    y0 = max(0, (h - window) // 2)
    x0 = max(0, (w - window) // 2)
    win = lum[y0 : y0 + window, x0 : x0 + window]
    bad = ~(np.isfinite(win) if finite is None else finite[y0 : y0 + window, x0 : x0 + window])
    if saturated is not None:
        bad = bad | saturated[y0 : y0 + window, x0 : x0 + window]
    try:
        est = mrs(np.ascontiguousarray(win), mask=np.ascontiguousarray(bad), valid_range=(-np.inf, 0.99998))
    except StackwatchError:
        return None, "SEP_RMS"
    sigma = float(getattr(est, "sigma", float("nan")))
    if not math.isfinite(sigma) or sigma <= 0:
        return None, "SEP_RMS"
    return sigma, str(getattr(est, "method", "MRS"))


class _NoiseJob:
    """`_noise` in a thread of its own. The estimate is one nogil numba call (stats._mrs_core), so it runs
    on the second core while sep, which holds the GIL and is single-threaded, models the background and
    extracts; at 26 MP this takes the noise estimate off the measurement's wall time."""

    def __init__(self, lum: np.ndarray, finite: np.ndarray | None, saturated: np.ndarray | None,
                 window: int) -> None:
        self._args = (lum, finite, saturated, window)
        self._out: tuple[float | None, str] = (None, "SEP_RMS")
        self._exc: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="stackwatch-noise", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._out = _noise(*self._args)
        except BaseException as exc:  # re-raised in the caller's thread by result()
            self._exc = exc

    def result(self, fallback: float) -> tuple[float, str]:
        self._thread.join()
        if self._exc is not None:
            raise self._exc
        sigma, method = self._out
        return (fallback, "SEP_RMS") if sigma is None else (sigma, method)


def measure(
    image: np.ndarray,
    *,
    saturated: np.ndarray | None = None,
    saturation: float | None = None,
    pixel_scale_arcsec: float | None = None,
    fwhm_guess_px: float | None = None,
    detect_sigma: float = 5.0,
    max_stars: int = 2000,
    psf_fit_stars: int = 100,
    psf_model: str = "moffat",
    noise: float | None = None,
    refine_background: bool = False,
    noise_window_px: int = 1024,
    detect_binning: int | None = None,
    detect_clean: str = "moffat",
) -> Measurement:
    """Detect and measure the stars of a calibrated frame.

    Parameters
    ----------
    image : float32 (H, W), or (3, H, W) measured on its luminance; NaN = no data.
    saturated : bool (H, W) mask of saturated pixels (True = saturated), or None. Default is None.
    saturation : data value at which a pixel saturates (Image.saturation); stars whose peak reaches
        0.9 of it are flagged saturated, and only stars below 0.5 of it are PSF-fitted. Default is None.
    pixel_scale_arcsec : image scale for fwhm_arcsec and the background box; None = unknown. Default is None.
    fwhm_guess_px : expected FWHM (e.g. the previous frame's) for the detection kernel; None = 3 px.
        Default is None.
    detect_sigma : detection threshold in background RMS. Default is 5.0.
    max_stars : rows kept in the star table (brightest first). Default is 2000.
    psf_fit_stars : PSF fits of the brightest clean, isolated stars. Default is 100.
    psf_model : "moffat" or "gaussian". Default is "moffat".
    noise : the frame's noise if already known (e.g. NOISE keyword from calibration); None = measure
        it (multiresolution estimate, `stats.mrs_noise`, on the central window). Default is None.
    noise_window_px : side of the central window for the noise estimate (1024^2 = 1 M pixels: ~0.1 %
        statistical precision, a quarter of the time of 2048^2). Default is 1024.
    detect_binning : 1 = background and detection at full resolution; 2 = background on the decimated
        frame and detection on 2x2 means (a third of the time at 26 MP; positions, peaks, radii and PSF
        fits stay at full resolution); None = 2 for frames of >= 4 M pixels whose expected FWHM is >= 2.5 px
        (an undersampled PSF would merge close pairs), else 1. Default is None.
    detect_clean : removal of spurious detections in bright stars' wings (§6.1): "moffat" = SExtractor's
        CLEAN rule (a detection goes when a brighter one's extrapolated Moffat wing, beta 1, accounts for
        its detection margin) applied to sep's uncleaned catalogue on a spatial grid, O(N log N) (`_clean`);
        "sep" = sep's own cleaning, the same rule pairwise, O(N^2): 2 s more CPU than "moffat" at 40 000
        stars; "none" = no cleaning (~1 % more faint detections). Measured against simulated truth by
        bench/bench_measure_register.py (case ``clean``). Default is "moffat".
    refine_background : second background pass with the detected stars masked (better map near bright
        stars and nebulae, +1 sep.Background pass: ~25 % of the measurement time). Default is False.
    """
    if psf_model not in ("moffat", "gaussian"):
        raise StackwatchError(f"unknown PSF model {psf_model!r} (expected moffat or gaussian)")
    if detect_clean not in ("moffat", "sep", "none"):
        raise StackwatchError(f"unknown detect_clean {detect_clean!r} (expected moffat, sep or none)")
    lum = luminance(image)
    h, w = lum.shape
    scale = float(pixel_scale_arcsec) if pixel_scale_arcsec and pixel_scale_arcsec > 0 else float("nan")
    if h < 8 or w < 8:
        return _empty((h, w), f"frame too small to measure ({h}x{w})", scale=scale)
    sat = None
    if saturated is not None:
        sat = np.asarray(saturated, dtype=bool)
        if sat.shape != (h, w):
            raise StackwatchError(f"saturated mask shape {sat.shape} does not match the image {(h, w)}")
    nfinite = int(_count_finite(lum))
    if nfinite < 64:
        return _empty((h, w), "no data (all NaN)", scale=scale)
    fw_guess = float(fwhm_guess_px) if fwhm_guess_px and math.isfinite(fwhm_guess_px) and fwhm_guess_px > 0 else 3.0
    box = _box_size(fwhm_guess_px, pixel_scale_arcsec)
    box = min(box, max(8, min(h, w)))
    has_nan = nfinite < lum.size
    # the finite map is only needed (and only allocated: 26 MB at 26 MP) when the frame has NaN
    finite = np.isfinite(lum) if has_nan else None
    noise_job = None if noise is not None else _NoiseJob(lum, finite, sat, max(64, int(noise_window_px)))
    if finite is not None:
        fill = float(np.median(lum[finite][:: max(1, nfinite // 1_000_000)]))
        data = np.where(finite, lum, np.float32(fill)).astype(np.float32, copy=False)
        nanmask: np.ndarray | None = ~finite
    else:
        data = np.ascontiguousarray(lum, dtype=np.float32)
        if not data.dtype.isnative:
            data = data.astype(np.float32)
        nanmask = None
    bmask = nanmask
    if sat is not None:
        bmask = sat if bmask is None else (bmask | sat)
    binning = _detect_binning(detect_binning, h, w, fw_guess)
    bkg: Any
    if binning == 2:
        # the background is smooth on the mesh scale: a quarter of the pixels measure it as well
        dec = np.ascontiguousarray(data[::2, ::2])
        dmask = None if bmask is None else np.ascontiguousarray(bmask[::2, ::2])
        dbox = max(4, box // 2)
        bkg = _DecimatedBackground(sep.Background(dec, mask=dmask, bw=dbox, bh=dbox, fw=3, fh=3), (h, w))
        sub = np.empty_like(data)
        binned = np.empty((h // 2, w // 2), dtype=np.float32)
        _subtract_and_bin(data, bkg._bkg.back(), sub, binned)
    else:
        bkg = sep.Background(data, mask=bmask, bw=box, bh=box, fw=3, fh=3)
        sub = data.copy()
        bkg.subfrom(sub)  # in place, several times faster than data - bkg.back()
    rms = float(bkg.globalrms)
    if not (rms > 0 and math.isfinite(rms)):
        if noise_job is not None:
            noise_job.result(rms)  # not reported (as before), but the thread must not outlive the call
        noise_v = float(noise) if noise is not None else float("nan")
        return _empty((h, w), "flat frame: background RMS is zero", background=float(bkg.globalback), rms=rms,
                      noise=noise_v, noise_method="GIVEN" if noise is not None else "NONE", scale=scale, box=box,
                      bkg=bkg)
    if finite is not None:
        sub[~finite] = 0.0
    minarea = max(5, math.ceil(0.5 * math.pi * (fw_guess / 2.0) ** 2))
    if binning == 2:
        # Detection on 2x2 means with the kernel at half the FWHM: the filtered noise and a star's filtered
        # peak are those of the full frame, so the same threshold keeps the same depth, for a quarter
        # of sep's work; centroids, peaks, radii and PSF fits below use the full-resolution pixels.
        bmask_b = None
        if nanmask is not None:
            m = nanmask[: 2 * binned.shape[0], : 2 * binned.shape[1]]
            bmask_b = m[0::2, 0::2] | m[1::2, 0::2] | m[0::2, 1::2] | m[1::2, 1::2]
        objs_b, _thr, note = _extract(binned, detect_sigma * rms, bmask_b, max(2, math.ceil(minarea / 4)),
                                      _gauss_kernel(fw_guess / 2.0), detect_clean)
        del binned
        objs = _to_full_resolution(objs_b, sub)
    else:
        objs, _thr, note = _extract(sub, detect_sigma * rms, nanmask, minarea, _gauss_kernel(fw_guess), detect_clean)
    n_all = len(objs)
    if refine_background and n_all:
        step = binning
        smask = np.zeros(((h + step - 1) // step, (w + step - 1) // step), dtype=bool)
        sep.mask_ellipse(smask, *(np.ascontiguousarray(objs[k] / step) for k in ("x", "y", "a", "b")),
                         np.ascontiguousarray(objs["theta"]), r=3.0)
        if bmask is not None:
            smask |= bmask[::step, ::step]
        if smask.mean() < 0.7:
            if binning == 2:
                bkg = _DecimatedBackground(sep.Background(dec, mask=smask, bw=dbox, bh=dbox, fw=3, fh=3), (h, w))
            else:
                bkg = sep.Background(data, mask=smask, bw=box, bh=box, fw=3, fh=3)
    background = float(bkg.globalback)  # sep: median of the (clipped, filtered) background mesh
    if noise_job is not None:
        noise_v, noise_method = noise_job.result(float(bkg.globalrms))
    else:
        noise_v, noise_method = float(noise or 0.0), "GIVEN"
    if n_all == 0:
        return _empty((h, w), "no stars detected" + (f"; {note}" if note else ""), background=background, rms=rms,
                      noise=noise_v, noise_method=noise_method, scale=scale, box=box, bkg=bkg)

    a = np.asarray(objs["a"], dtype=np.float64)
    b = np.asarray(objs["b"], dtype=np.float64)
    mom_fwhm = _FWHM_GAUSS * np.sqrt(np.maximum(a * b, 0.0))
    npix = np.asarray(objs["npix"], dtype=np.int64)
    hot = (mom_fwhm < 0.7) | (npix < minarea) | _single_pixel(sub, objs)
    typical = float(np.median(mom_fwhm[~hot])) if np.any(~hot) else fw_guess
    artefact = (a > 3.0 * np.maximum(b, 1e-3)) | (npix > max(2000.0, 400.0 * typical * typical))
    keep_all = ~hot
    n_stars = int(np.count_nonzero(keep_all & ~artefact))
    idx = np.nonzero(keep_all)[0]
    idx = idx[np.argsort(-np.asarray(objs["flux"])[idx], kind="stable")][:max_stars]
    o = objs[idx]
    n = len(o)
    x = np.asarray(o["x"], dtype=np.float64)
    y = np.asarray(o["y"], dtype=np.float64)
    flux = np.asarray(o["flux"], dtype=np.float64)
    peak = np.asarray(o["peak"], dtype=np.float64)
    flags = np.zeros(n, dtype=np.int32)
    flags[artefact[idx]] |= FLAG_ARTEFACT
    # saturation: the peak pixel is masked, or the raw peak reaches 0.9 of the saturation level
    xp = np.clip(np.asarray(o["xpeak"], dtype=np.int64), 0, w - 1)
    yp = np.clip(np.asarray(o["ypeak"], dtype=np.int64), 0, h - 1)
    is_sat = np.zeros(n, dtype=bool)
    if sat is not None:
        for dyy in (-1, 0, 1):
            for dxx in (-1, 0, 1):
                is_sat |= sat[np.clip(yp + dyy, 0, h - 1), np.clip(xp + dxx, 0, w - 1)]
    if saturation is not None and math.isfinite(saturation):
        is_sat |= data[yp, xp] >= 0.9 * float(saturation)
    flags[is_sat] |= FLAG_SATURATED
    margin = max(10.0, 3.0 * typical)
    edge = (x < margin) | (y < margin) | (x > w - 1 - margin) | (y > h - 1 - margin)
    if finite is not None:
        mi = math.ceil(margin)
        for k in np.nonzero(~edge)[0]:
            yi, xi = round(y[k]), round(x[k])
            if not finite[max(0, yi - mi) : yi + mi + 1, max(0, xi - mi) : xi + mi + 1].all():
                edge[k] = True
    flags[edge] |= FLAG_EDGE
    merged = (np.asarray(o["flag"]) & sep.OBJ_MERGED) != 0
    blended = merged.copy()
    if n >= 2:
        tree = cKDTree(np.column_stack([x, y]))
        dist, _ = tree.query(np.column_stack([x, y]), k=2)
        blended |= dist[:, 1] < 2.0 * typical
        iso = dist[:, 1] >= 3.0 * typical
    else:
        iso = np.ones(n, dtype=bool)
    flags[blended] |= FLAG_BLENDED
    snr = flux / (rms * np.sqrt(np.maximum(npix[idx], 1)))
    # windowed centroids (XWIN) and half-flux radii. With normflux given, the aperture only has to reach the
    # half-flux radius: 1.5x the moment FWHM (biased high by the threshold and binning) or 2 a is >= 1.8 HFR
    # on every simulated field; 6 a cost 3x the time at 26 MP for radii within 0.025 px (radial bins
    # scale with the aperture)
    # Artefacts (trails, bad columns, a wrapped gradient edge: a of hundreds of px) get an aperture no larger
    # than twice the radius of a disk of their isophotal area and keep their isophotal centroid: with 2 a and
    # a window of 4 sigma = 4 HFR, one 1000 px line cost sep 2 s (flux_radius and winpos are O(r^2) per star)
    # for a radius and a position that nothing uses.
    # Only the brightest `_WINDOWED_STARS` rows (and every PSF fit candidate) get them: registration takes
    # its ~400 stars from the top of the table, and normalisation measures at the
    # reference's positions in both images (a centring error is the same in both); the fainter rows keep
    # their isophotal centroids and no radius (NaN). Saves ~0.1 s of 0.6 at 26 MP (2000 rows).
    art = artefact[idx]
    # PSF fit candidates: the brightest clean, isolated, unsaturated, well-exposed stars
    cand = (flags == 0) & iso & (snr > 20.0)
    if saturation is not None and math.isfinite(saturation):
        cand &= data[yp, xp] < 0.5 * float(saturation)
    fit_stars = [int(i) for i in np.nonzero(cand)[0][: max(0, psf_fit_stars)]]
    nw = min(n, max(_WINDOWED_STARS, fit_stars[-1] + 1 if fit_stars else 0))
    rmax = np.maximum(1.5 * typical, 2.0 * a[idx][:nw])
    rmax = np.where(art[:nw], np.maximum(1.5 * typical, np.minimum(rmax, 2.0 * np.sqrt(npix[idx][:nw] / math.pi))),
                    rmax)
    hfr = np.full(n, np.nan)
    if nw:
        hfr_w, _fl = sep.flux_radius(sub, x[:nw], y[:nw], rmax, 0.5, normflux=np.maximum(flux[:nw], 1e-30),
                                     mask=nanmask, subpix=5)
        hfr[:nw] = np.asarray(hfr_w, dtype=np.float64)
    sig = np.where(np.isfinite(hfr) & (hfr > 0), 2.0 * hfr / _FWHM_GAUSS, typical / _FWHM_GAUSS)
    xw, yw = x.copy(), y.copy()
    wflag = np.ones(n, dtype=np.int64)
    win = np.nonzero(~art[:nw])[0]
    if win.size:
        xw[win], yw[win], wflag[win] = sep.winpos(sub, x[win], y[win], sig[win], mask=nanmask)
    good = (wflag == 0) & np.isfinite(xw) & np.isfinite(yw) & (np.hypot(xw - x, yw - y) < max(1.0, typical))
    x = np.where(good, xw, x)
    y = np.where(good, yw, y)

    # PSF fits on the candidates
    fwhm = np.full(n, np.nan)
    half = int(min(20, max(4, math.ceil(2.5 * typical))))
    fits: list[_Fit] = []
    fit_idx: list[int] = []

    def fit_one(k: int) -> _Fit | None:
        xi, yi = round(x[k]), round(y[k])
        y0c, x0c = max(0, yi - half), max(0, xi - half)
        cut = sub[y0c : yi + half + 1, x0c : xi + half + 1].astype(np.float64)
        if finite is not None:
            cut = np.where(finite[y0c : yi + half + 1, x0c : xi + half + 1], cut, np.nan)
        f = fit_psf(cut, x0=x[k] - x0c, y0=y[k] - y0c, fwhm_guess_px=typical, model=psf_model)
        if f is None or not (0.5 <= f.fwhm <= 30.0) or math.hypot(f.x + x0c - x[k], f.y + y0c - y[k]) > 1.0:
            return None
        return f

    if len(fit_stars) >= 16:
        # the Levenberg-Marquardt kernel is nogil: two threads fit on both cores (same fits, same order)
        with ThreadPoolExecutor(2, thread_name_prefix="stackwatch-psf") as pool:
            results = list(pool.map(fit_one, fit_stars))
    else:
        results = [fit_one(i) for i in fit_stars]
    for i_star, f in zip(fit_stars, results, strict=True):
        if f is None:
            continue
        fits.append(f)
        fit_idx.append(i_star)
        fwhm[i_star] = f.fwhm
    nsat = int(np.count_nonzero(is_sat))
    reason = note
    nan = float("nan")
    fwhm_px = ecc = hfr_m = beta_m = spread = nan
    if len(fits) >= 5:
        fw_arr = np.array([f.fwhm for f in fits])
        med = float(np.median(fw_arr))
        mad = 1.4826 * float(np.median(np.abs(fw_arr - med)))
        inl = np.abs(fw_arr - med) <= max(3.0 * mad, 1e-6 * med) if mad > 0 else np.ones(len(fits), dtype=bool)
        sel = [f for f, ok in zip(fits, inl, strict=True) if ok]
        fwhm_px = float(np.median([f.fwhm for f in sel]))
        sel_idx = np.array(fit_idx)[inl]
        zones = np.minimum(2, (3.0 * x[sel_idx] / w).astype(np.int64)) * 3 + np.minimum(
            2, (3.0 * y[sel_idx] / h).astype(np.int64))
        ecc = _frame_eccentricity(sel, zones)
        beta_m = float(np.median([f.beta for f in sel]))
        spread = mad
        hsel = hfr[np.array(fit_idx)[inl]]
        hsel = hsel[np.isfinite(hsel)]
        hfr_m = float(np.median(hsel)) if hsel.size else nan
    else:
        msg = f"only {len(fits)} PSF fits (need 5)"
        reason = f"{reason}; {msg}" if reason else msg
        # eccentricity still matters for a trailed frame: from the moments of the brightest stars
        usable = (flags & (FLAG_SATURATED | FLAG_EDGE)) == 0
        if np.count_nonzero(usable) >= 3:
            aa = a[idx][usable][:50]
            bb = b[idx][usable][:50]
            ecc = float(np.median(np.sqrt(np.maximum(0.0, 1.0 - (bb / np.maximum(aa, 1e-9)) ** 2))))
    fwhm_arcsec = fwhm_px * scale if math.isfinite(scale) else nan
    clean = flags == 0
    if np.any(clean) and noise_v > 0:
        psf_snr = float(flux[clean].sum() ** 2 / (noise_v**2 * npix[idx][clean].sum()))
    else:
        psf_snr = nan
    metrics = FrameMetrics(
        stars=n_stars, fwhm_px=fwhm_px, fwhm_arcsec=fwhm_arcsec, eccentricity=ecc, hfr=hfr_m,
        background=background, background_rms=float(bkg.globalrms), noise=noise_v, noise_method=noise_method,
        psf_snr=psf_snr, psf_fits=len(fits), fwhm_spread_px=spread, beta=beta_m, saturated_stars=nsat,
        pixel_scale_arcsec=scale, reason=reason,
    )
    table = StarTable(
        x=x, y=y, flux=flux, peak=peak, fwhm=fwhm, a=a[idx], b=b[idx],
        theta=np.asarray(o["theta"], dtype=np.float64), flags=flags, snr=snr, npix=npix[idx], hfr=hfr,
    )
    return Measurement(stars=table, metrics=metrics, shape=(h, w), background_box_px=box, _background=bkg)
