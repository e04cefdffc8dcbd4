"""A realistic simulated night with its ground truth.

`SimulationSpec` describes the night (camera, sky, target, schedule, defects); `make_truth` draws every
random quantity once (star field, per-frame pointing, seeing, transparency, sky, trails, cosmic rays,
sensor maps) into a `Truth`; `render_frame` / `render_light` turn one frame of the truth into the
uint16 pixels a camera would write; `iter_night` yields the frames in capture order with N.I.N.A.-
style headers and file names; `simulate_night` writes the whole night and the truth to a folder.

Conventions (same as the rest of stackwatch): x = column, y = row, 0-based, pixel centres at
integers, arrays top-down (ROWORDER = 'TOP-DOWN'). A frame's ``matrix`` is the 3x3 transform mapping
(x, y) in that frame to (x, y) in the reference grid = the grid of the first light (identity for it).
Frame indices in the API are 0-based in capture order within their kind; file names count from 0001.

Physics of a light (electrons unless stated), for frame i at pixel p:

    lam(p)  = (T_i * signal_i(p) + sky_i(p) + trail_i(p)) * response(p) + dark_rate(p, temp) * t
    e(p)    = min(Poisson(lam(p)) + cosmic_i(p), full_well)
    ADU(p)  = clip(round(e(p) / gain + bias(p) + row_noise_i(y) + N(0, read_noise / gain)), 0, 65535)

signal_i = stars (Moffat PSF of frame i, optionally growing off axis) + galaxy/nebula, at transparency
1; T_i = extinction 10^(-0.4 k (X_i - 1)) times thin cloud (optionally patchy: a linear gradient); sky_i = light-pollution sky with a gradient growing with
airmass (plus extra sky from cloud reflecting it); response = vignetting * dust * PRNU, mean 1 (for
colour cameras each CFA pixel also sees only its channel's share of the light, see `FILTER_RESPONSE`).

Truth files written by `simulate_night` into ``truth/`` (maps are float32 ``.npy``, not FITS, so that a
pipeline pointed at the night folder never mistakes them for frames; ADU = 16-bit data numbers):
- ``truth.json``: spec, gain, every frame (file, kind, date, exposure, temperature, cosmic rays; for
  lights the matrix, fwhm_px (on the sky) and fwhm_sampled_px (what a fit to pixels sees),
  eccentricity, psf angle, beta, airmass, transparency (+ gradient), scale = T_ref / T_i (ref = first
  light of the same filter), sky level and gradient polynomial (electrons, and ``sky_adu``,
  ``sky_poly_adu``), expected background noise noise_e, trails), hot/warm/cold pixels, panel colour.
- ``scene_adu.npy``: the noiseless object + stars of light 1 in its grid, with light 1's PSF and
  transparency, no sky, no flat, ADU; (3, H, W) R, G, B for colour cameras (each channel as a CFA pixel
  of that colour would see it).
- ``sky_adu.npy``: the sky of light 1 in ADU (same shape rule). A perfectly calibrated light 1
  (``(raw - dark) / flat`` with the flat normalised to its mean) is scene + sky (colour: divided by the
  flat panel colour relative to its mean).
- ``bias_adu.npy``: bias level + fixed row, column and pixel pattern (ADU).
- ``dark_current_adu_per_s.npy``: dark current incl. hot/warm pixels and amp glow at ``temperature_c``.
- ``flat_response.npy``: optical response (vignetting, dust, PRNU, cold pixels), mean 1.
- ``stars.csv``: x, y (reference grid), flux_adu (as in light 1: T_0 applied, no flat; colour: R, G, B
  columns), mag, bv.
- ``trail_mask_<stem>.npy``: bool mask (frame grid) of pixels where a trail adds >= 2 electrons.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from stackwatch.engine import simulate_sky as _sky
from stackwatch.engine.errors import StackwatchError

__all__ = [
    "KINDS",
    "PRESETS",
    "FrameTruth",
    "LightComponents",
    "SimFrame",
    "SimulationSpec",
    "StarCatalog",
    "Truth",
    "frame_header",
    "header_bayer",
    "ideal_light",
    "iter_night",
    "light_components",
    "load_truth",
    "make_truth",
    "matrix_between",
    "preset",
    "render_frame",
    "render_light",
    "scene_adu",
    "simulate_night",
    "sky_model_e",
    "spec_from_dict",
    "to_file_order",
    "trail_mask",
    "write_fits",
    "write_truth",
]

KINDS = ("bias", "dark", "light", "flat", "darkflat")
_FOLDERS = {"light": "lights", "dark": "darks", "flat": "flats", "darkflat": "darkflats", "bias": "biases"}
_IMAGETYP = {"light": "LIGHT", "dark": "DARK", "flat": "FLAT", "darkflat": "DARKFLAT", "bias": "BIAS"}
_KIND_CODE = {k: i for i, k in enumerate(KINDS)}
_STYLES = ("nina", "sgp", "maxim", "ekos")
# IMAGETYP per header style (capture programs without a flat-dark type write a dark)
_STYLE_IMAGETYP = {
    "nina": _IMAGETYP,
    "sgp": {"light": "Light Frame", "dark": "Dark Frame", "flat": "Flat Frame", "darkflat": "Dark Frame",
            "bias": "Bias Frame"},
    "maxim": {"light": "Light Frame", "dark": "Dark Frame", "flat": "Flat Field", "darkflat": "Dark Frame",
              "bias": "Bias Frame"},
    "ekos": {"light": "Light Frame", "dark": "Dark Frame", "flat": "Flat Frame", "darkflat": "Dark Frame",
             "bias": "Bias Frame"},
}
_STYLE_SOFTWARE = {"nina": "N.I.N.A. 3.0.0.9001 (x64)", "sgp": "Sequence Generator Pro v4.2.0.1000",
                   "maxim": "MaxIm DL Version 6.40 200922 01MX5", "ekos": ""}
_SKY_COLOUR = np.array([0.45, 0.35, 0.20])  # light-pollution sky share in R, G, B
_GALAXY_COLOUR = np.array([0.40, 0.34, 0.26])
_NEBULA_COLOUR = np.array([0.62, 0.22, 0.16])


@dataclass(frozen=True)
class SimulationSpec:
    """Everything that defines a simulated night. All fields have defaults (the `small` preset).

    Indices (``meridian_flip_after``, ``trails``, ``aircraft``, ``clouds``, ``elongated``, ``blurred``,
    ``bright_sky``, ``moon``)
    are 0-based light indices in capture order (across filters: filter blocks follow each other).
    """

    width: int = 512
    height: int = 384
    n_lights: int = 10  # per filter
    n_darks: int = 5
    n_flats: int = 5  # per filter
    n_darkflats: int = 5
    n_biases: int = 5
    exposure_s: float = 120.0
    dark_exposure_s: float | None = None  # None: same as exposure_s
    flat_exposure_s: float = 1.5
    flat_exposure_by_filter: tuple[tuple[str, float], ...] = ()  # e.g. (("Ha", 12.0),): others use flat_exposure_s
    # camera
    camera: str = "ZWO ASI2600MM Pro"  # "MC" replaces "MM" for colour when osc and the default is kept
    osc: bool = False
    bayer: str = "RGGB"
    filters: tuple[str, ...] | None = None  # None: ("L",) mono, () colour (no FILTER keyword)
    gain_setting: int = 100
    offset_setting: int = 50
    gain_e_per_adu: float = 0.25
    read_noise_e: float = 1.5
    full_well_e: float = 20000.0
    adc_bits: int = 16  # 12 or 14: data are native counts x 2^(16 - bits), as ZWO/QHY drivers scale them
    bias_adu: float = 800.0
    bias_row_pattern_adu: float = 0.8  # fixed per-row offsets (sigma)
    bias_column_pattern_adu: float = 0.6  # fixed per-column offsets (sigma)
    bias_pixel_pattern_adu: float = 0.5  # fixed per-pixel offsets (sigma)
    row_noise_adu: float = 0.4  # temporal per-row noise (sigma, new each frame)
    dark_current_e_per_s: float = 0.02  # at temperature_c
    dark_doubling_c: float = 6.0
    hot_pixel_frac: float = 2e-4
    warm_pixel_frac: float = 2e-3
    cold_pixel_frac: float = 5e-5
    amp_glow_e_per_s: float = 0.3  # at the top-right corner, exponential fall-off
    amp_glow_scale_frac: float = 0.08  # e-folding length as a fraction of the width
    temperature_c: float = -10.0
    dark_temperature_c: float | None = None  # None: same as temperature_c
    cooled: bool = True  # False: no set point (no SET-TEMP); the sensor follows the night air, see ambient_drop_c
    ambient_drop_c: float = 6.0  # uncooled: the sensor cools this much from the first to the last light
    pixel_size_um: float = 3.76
    binning: int = 1
    # optics and site
    telescope: str = "Sky-Watcher Esprit 100ED"
    focal_length_mm: float = 530.0
    aperture_mm: float = 100.0
    latitude_deg: float = 45.0
    longitude_deg: float = 10.0
    start_utc: str = "2026-11-21T17:30:00"
    overhead_s: float = 4.0  # download and save per frame
    settle_s: float = 8.0  # after each dither
    # target
    object_name: str = "NGC 7331"
    ra_deg: float = 339.2671
    dec_deg: float = 34.4156
    target: str = "galaxy"  # galaxy, nebula, none
    target_brightness: float = 1.0  # scales the extended target
    stars_per_mpix: float = 12000.0  # down to the faint flux limit (about V 21 at 530 mm f/5.3, 120 s)
    star_flux_range_e: tuple[float, float] = (40.0, 4.0e5)  # in one light at transparency 1 (L)
    n_saturated_stars: int = 2
    lf_slope: float = 0.33  # log10 number counts per magnitude
    # pointing
    dither_px: float = 6.0
    dither_every: int = 1
    drift_px_per_frame: tuple[float, float] = (0.35, -0.2)
    rotation_deg_per_frame: float = 0.004
    meridian_flip_after: int | None = None
    flip_recentre_px: float = 15.0
    # seeing
    fwhm_px: float = 3.0
    fwhm_jitter: float = 0.08  # relative, AR(1) frame to frame
    moffat_beta: float = 4.0
    eccentricity: float = 0.15  # typical tracking eccentricity (each frame draws around it)
    elongated: tuple[tuple[int, float, float], ...] = ()  # (light index, eccentricity, angle deg)
    blurred: tuple[tuple[int, float], ...] = ()  # (light index, FWHM factor): wind gust, bad focus
    focus_drift: float = 0.0  # FWHM grows by this fraction from the first to the last light (no autofocus)
    field_psf: float = 0.0  # off-axis PSF growth (0 = perfect flattener; 0.2 = mediocre, see simulate_sky.psf_shape)
    # sky and atmosphere
    sky_e_per_s: float = 2.0  # per pixel, L band, zenith, clear
    sky_airmass_coeff: float = 0.5  # sky *= 1 + coeff * (X - 1)
    gradient_frac: float = 0.06  # fractional sky change from centre to the long-axis edge at X = 1
    extinction_mag: float = 0.2  # per airmass
    clouds: tuple[tuple[int, float], ...] = ()  # (light index, cloud transparency 0..1)
    cloud_sky_boost: float = 1.0  # sky *= 1 + boost * (1 - cloud transparency)
    cloud_gradient: float = 0.0  # patchy cloud: transparency changes by this x (1 - cloud) from centre to edge
    bright_sky: tuple[tuple[int, float], ...] = ()  # (light index, sky factor): dawn, car headlights
    moon: tuple[tuple[int, float], ...] = ()  # (light index, added sky / base sky): moonlight with a steep gradient
    # transients
    trails: tuple[int, ...] = ()  # lights with a satellite trail
    aircraft: tuple[int, ...] = ()  # lights with an aircraft (two blinking wing lights)
    cosmics: bool = True
    cosmics_per_mpix_per_min: float = 1.5
    # flats
    flat_level_frac: float = 0.45  # of full scale, at the response maximum channel
    vignetting: float = 0.3  # fractional loss at the farthest corner
    n_dust: int = 3
    prnu: float = 0.005
    sky_flats_with_stars: bool = False
    # how the capture program writes files (the truth is always top-down, in data order)
    header_style: str = "nina"  # nina, sgp, maxim, ekos
    row_order: str = "TOP-DOWN"  # TOP-DOWN, or BOTTOM-UP: rows stored bottom first, ROWORDER says so
    bayer_offset: tuple[int, int] = (0, 0)  # XBAYROFF, YBAYROFF written with the matching BAYERPAT
    seed: int = 1

    def __post_init__(self) -> None:
        if self.width < 16 or self.height < 16 or self.width % 2 or self.height % 2:
            raise StackwatchError(f"simulation size {self.width}x{self.height}: need even sizes >= 16")
        if self.n_lights < 1:
            raise StackwatchError("simulation needs at least one light")
        if self.target not in ("galaxy", "nebula", "none"):
            raise StackwatchError(f"simulation target {self.target!r}: expected galaxy, nebula or none")
        if min(self.n_darks, self.n_flats, self.n_darkflats, self.n_biases) < 0:
            raise StackwatchError("simulation frame counts must be >= 0")
        if self.gain_e_per_adu <= 0 or self.exposure_s <= 0:
            raise StackwatchError("simulation gain and exposure must be > 0")
        n = self.total_lights
        for name in ("trails", "aircraft", "clouds", "elongated", "blurred", "bright_sky", "moon"):
            for item in getattr(self, name):
                idx = item if isinstance(item, int) else item[0]
                if not 0 <= int(idx) < n:
                    raise StackwatchError(f"simulation {name}: light {idx} does not exist ({n} lights, 0-based)")
        if self.meridian_flip_after is not None and not 0 <= self.meridian_flip_after < n:
            raise StackwatchError(f"simulation meridian_flip_after {self.meridian_flip_after}: {n} lights, 0-based")
        if not 8 <= self.adc_bits <= 16:
            raise StackwatchError(f"simulation adc_bits {self.adc_bits}: expected 8..16")
        if self.header_style not in _STYLES:
            raise StackwatchError(f"simulation header_style {self.header_style!r}: expected one of {', '.join(_STYLES)}")
        if self.row_order not in ("TOP-DOWN", "BOTTOM-UP"):
            raise StackwatchError(f"simulation row_order {self.row_order!r}: expected TOP-DOWN or BOTTOM-UP")
        if self.row_order == "BOTTOM-UP" and self.header_style == "sgp":
            raise StackwatchError("simulation: the sgp header style writes no ROWORDER, so BOTTOM-UP would be ambiguous")
        for f in self.filter_list:
            if f.upper() not in _sky.FILTER_RESPONSE:
                raise StackwatchError(f"simulation filter {f!r}: expected one of L, R, G, B, Ha, OIII, SII")

    @property
    def filter_list(self) -> tuple[str, ...]:
        if self.filters is not None:
            return tuple(self.filters) if self.filters else ("",)
        return ("",) if self.osc else ("L",)

    @property
    def total_lights(self) -> int:
        return self.n_lights * len(self.filter_list)

    @property
    def camera_name(self) -> str:
        if self.osc and self.camera == "ZWO ASI2600MM Pro":
            return "ZWO ASI2600MC Pro"
        return self.camera

    @property
    def dark_exposure(self) -> float:
        return self.exposure_s if self.dark_exposure_s is None else self.dark_exposure_s

    @property
    def dark_temperature(self) -> float:
        return self.temperature_c if self.dark_temperature_c is None else self.dark_temperature_c

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)


PRESETS: dict[str, dict[str, Any]] = {
    "small": {},
    "medium": {"width": 2048, "height": 1536, "n_lights": 20, "n_darks": 10, "n_flats": 10, "n_darkflats": 10,
               "n_biases": 10, "exposure_s": 180.0},
    "full": {"width": 6248, "height": 4176, "n_lights": 10, "n_darks": 5, "n_flats": 5, "n_darkflats": 5,
             "n_biases": 5, "exposure_s": 300.0},
}


def preset(name: str, **overrides: Any) -> SimulationSpec:
    """The spec of a named preset (small 512x384, medium 2048x1536, full 6248x4176) with overrides."""
    if name not in PRESETS:
        raise StackwatchError(f"simulation preset {name!r}: expected one of {', '.join(PRESETS)}")
    kw = dict(PRESETS[name])
    kw.update(overrides)
    return SimulationSpec(**kw)


# --------------------------------------------------------------------------------------- truth


@dataclass(frozen=True)
class StarCatalog:
    """True stars in the reference grid. flux_e: (N, 3) electrons per R, G, B band in one light at
    transparency 1 with an unfiltered (L) mono pixel seeing the sum of the three."""

    x: np.ndarray
    y: np.ndarray
    flux_e: np.ndarray
    mag: np.ndarray
    bv: np.ndarray

    def __len__(self) -> int:
        return int(self.x.size)


@dataclass(frozen=True)
class FrameTruth:
    """What is true about one frame. Light-only fields are None for calibration frames."""

    kind: str
    index: int  # 0-based within its kind, capture order
    file: str  # relative path inside the night folder, e.g. "lights/LIGHT_...fits"
    date_obs: str
    exposure_s: float
    temperature_c: float  # the sensor temperature the header reports (CCD-TEMP, a reading)
    filter: str
    sensor_temp_c: float | None = None  # the physical temperature (dark current follows it); None = set point
    cosmics: tuple[tuple[float, ...], ...] = ()  # (x, y, e-, length px, angle deg)
    matrix: tuple[tuple[float, ...], ...] | None = None  # 3x3 frame -> reference
    fwhm_px: float | None = None  # of the PSF on the sky (geometric mean of major and minor axes)
    fwhm_sampled_px: float | None = None  # what a PSF fit to pixel values sees: sqrt(fwhm^2 + 2.3548^2/12)
    eccentricity: float | None = None
    psf_angle_deg: float | None = None  # major axis from +x towards +y, in the reference grid (fixed on the sky)
    beta: float | None = None
    hour_angle_h: float | None = None
    altitude_deg: float | None = None
    airmass: float | None = None
    pier_side: str | None = None
    cloud: float | None = None  # cloud transparency (1 = clear)
    transparency: float | None = None  # extinction * cloud at the frame centre, relative to zenith in clear sky
    transparency_grad: tuple[float, float] | None = None  # T(x, y) = T (1 + gx u + gy v), u, v as for the sky
    scale: float | None = None  # T_ref / T_i, ref = the first light of the same filter (light 1 for one filter)
    sky_e: float | None = None  # sky level at the frame centre, electrons: mono through its filter; colour: R+G+B
    noise_e: float | None = None  # raw background noise at the frame centre (sky x flat + dark + read), e-
    sky_poly: tuple[float, ...] | None = None  # (c00, c10, c01, c20, c11, c02) x level, in u, v
    trails: tuple[dict[str, Any], ...] = ()
    flat_star_seed: int | None = None  # sky flats with stars: seed of the star field of this flat

    @property
    def matrix_array(self) -> np.ndarray:
        return np.eye(3) if self.matrix is None else np.array(self.matrix, dtype=np.float64)


@dataclass(frozen=True)
class Truth:
    """The drawn night: spec, frames in capture order, star catalogue and sensor maps."""

    spec: SimulationSpec
    frames: tuple[FrameTruth, ...]
    stars: StarCatalog = field(repr=False)
    bias_adu: np.ndarray = field(repr=False)  # (H, W) level + fixed pattern
    dark_e_per_s: np.ndarray = field(repr=False)  # (H, W) at spec.temperature_c
    response: np.ndarray = field(repr=False)  # (H, W) mean 1
    panel_colour: tuple[float, float, float]  # relative flat-panel signal in R, G, B (max 1)
    hot_pixels: tuple[tuple[int, int], ...]
    warm_pixels: tuple[tuple[int, int], ...]
    cold_pixels: tuple[tuple[int, int], ...]
    galaxy: np.ndarray = field(repr=False)  # Sérsic component rows (see simulate_sky.render_galaxy)
    nebula: np.ndarray = field(repr=False)  # coarse field (electrons), or empty
    nebula_origin: tuple[float, float] = (0.0, 0.0)
    nebula_step_px: float = 16.0
    sky_centre: tuple[float, float, float] = (0.0, 0.0, 1.0)  # (cx, cy, R) of the u, v sky coordinates

    def lights(self) -> list[FrameTruth]:
        return [f for f in self.frames if f.kind == "light"]

    def frame(self, kind: str, index: int) -> FrameTruth:
        for f in self.frames:
            if f.kind == kind and f.index == index:
                return f
        raise StackwatchError(f"simulated night has no {kind} {index}")


def _rng(spec: SimulationSpec, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([spec.seed & 0xFFFFFFFF, *stream]))


def _similarity(theta: float, t: tuple[float, float], c: tuple[float, float]) -> np.ndarray:
    ct, st = math.cos(theta), math.sin(theta)
    m = np.eye(3)
    m[0, 0], m[0, 1], m[1, 0], m[1, 1] = ct, -st, st, ct
    m[0, 2] = c[0] + t[0] - (ct * c[0] - st * c[1])
    m[1, 2] = c[1] + t[1] - (st * c[0] + ct * c[1])
    return m


def _gmst_deg(when: _dt.datetime) -> float:
    jd = when.timestamp() / 86400.0 + 2440587.5
    d = jd - 2451545.0
    return (280.46061837 + 360.98564736629 * d) % 360.0


def _alt_airmass_pa(spec: SimulationSpec, when: _dt.datetime) -> tuple[float, float, float, float]:
    """(hour angle h, altitude deg, airmass, parallactic angle rad) of the target at ``when``."""
    lst = (_gmst_deg(when) + spec.longitude_deg) % 360.0
    ha = ((lst - spec.ra_deg + 180.0) % 360.0) - 180.0
    h, d, p = math.radians(ha), math.radians(spec.dec_deg), math.radians(spec.latitude_deg)
    sin_alt = math.sin(p) * math.sin(d) + math.cos(p) * math.cos(d) * math.cos(h)
    alt = math.degrees(math.asin(max(-1.0, min(1.0, sin_alt))))
    z = math.radians(90.0 - max(alt, 5.0))
    airmass = 1.0 / (math.cos(z) + 0.50572 * (6.07995 + 90.0 - math.degrees(z)) ** -1.6364)  # Kasten-Young
    q = math.atan2(math.sin(h), math.tan(p) * math.cos(d) - math.sin(d) * math.cos(h))
    return ha / 15.0, alt, airmass, q


def _fmt_time(t: _dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def _file_name(spec: SimulationSpec, kind: str, when: _dt.datetime, filt: str, exposure: float, number: int,
               seq: int) -> str:
    """File name as the capture program of ``spec.header_style`` writes it (number: within the filter
    block, seq: within the kind)."""
    obj = spec.object_name.replace(" ", "")
    style = spec.header_style
    folder = _FOLDERS[kind]
    if style == "sgp":
        typ = {"light": "Light", "dark": "Dark", "flat": "Flat", "darkflat": "Dark", "bias": "Bias"}[kind]
        name = obj if kind == "light" else "Calibration"
        parts = [name, typ] + ([filt] if filt and kind in ("light", "flat") else [])
        parts += [f"{exposure:g}sec", f"{spec.binning}x{spec.binning}", f"frame{number}"]
        return f"{folder}/{'_'.join(parts)}.fit"
    if style == "maxim":
        stem = obj if kind == "light" else {"dark": "dark", "darkflat": "flatdark", "flat": "flat", "bias": "bias"}[kind]
        return f"{folder}/{stem}-{seq:03d}{filt if kind in ('light', 'flat') else ''}.fit"
    if style == "ekos":
        typ = {"light": "Light", "dark": "Dark", "flat": "Flat", "darkflat": "Dark", "bias": "Bias"}[kind]
        return f"{folder}/{typ}_{seq:03d}.fits"
    stamp = when.strftime("%Y-%m-%d_%H-%M-%S")
    parts = [_IMAGETYP[kind], stamp]
    if kind == "light":
        parts.append(obj)
    if filt and kind in ("light", "flat"):
        parts.append(filt)
    parts.append(f"{exposure:.2f}s")
    parts.append(f"{number:04d}")
    return f"{folder}/{'_'.join(parts)}.fits"


def _cosmics(rng: np.random.Generator, spec: SimulationSpec, exposure: float) -> tuple[tuple[float, ...], ...]:
    if not spec.cosmics:
        return ()
    mpix = spec.width * spec.height / 1e6
    n = int(rng.poisson(spec.cosmics_per_mpix_per_min * mpix * exposure / 60.0))
    out = []
    for _ in range(n):
        x = float(rng.uniform(2, spec.width - 3))
        y = float(rng.uniform(2, spec.height - 3))
        energy = float(np.clip(rng.lognormal(math.log(3000.0), 0.8), 400.0, 40000.0))
        length = float(rng.choice([0.0, 0.0, 1.0, 2.0, 3.0, 5.0]))
        angle = float(rng.uniform(0, 360))
        out.append((round(x, 3), round(y, 3), round(energy, 1), length, round(angle, 2)))
    return tuple(out)


def _trail(rng: np.random.Generator, spec: SimulationSpec, kind: str, fwhm: float) -> dict[str, Any]:
    w, h = spec.width, spec.height
    ang = rng.uniform(0, math.pi)
    px, py = rng.uniform(0.25 * w, 0.75 * w), rng.uniform(0.25 * h, 0.75 * h)
    half = math.hypot(w, h)
    t0, t1 = -half, half
    if kind == "satellite" and rng.uniform() < 0.35:
        # enters the Earth's shadow (or the frame ends the exposure) inside the field
        t1 = float(rng.uniform(0.1, 0.6)) * half
    x0, y0 = px + t0 * math.cos(ang), py + t0 * math.sin(ang)
    x1, y1 = px + t1 * math.cos(ang), py + t1 * math.sin(ang)
    if kind == "satellite":
        return {"kind": kind, "x0": x0, "y0": y0, "x1": x1, "y1": y1, "sigma_px": fwhm / 2.3548,
                "peak_e": float(rng.uniform(300.0, 3000.0)), "period_px": 0.0, "duty": 1.0, "offset_px": 0.0}
    return {"kind": kind, "x0": x0, "y0": y0, "x1": x1, "y1": y1, "sigma_px": 0.6 * fwhm,
            "peak_e": float(rng.uniform(1500.0, 6000.0)), "period_px": float(rng.uniform(25, 60)),
            "duty": 0.25, "offset_px": float(rng.uniform(5.0, 9.0))}


def make_truth(spec: SimulationSpec) -> Truth:
    """Draw everything random about the night (deterministic for ``spec.seed``)."""
    h, w = spec.shape
    c = ((w - 1) / 2.0, (h - 1) / 2.0)
    start = _dt.datetime.fromisoformat(spec.start_utc).replace(tzinfo=_dt.UTC)
    frames: list[FrameTruth] = []
    filters = spec.filter_list

    # --- calibration library shot in the afternoon (cap on), biases then darks, ending 1 h before the lights
    lib_s = spec.n_biases * spec.overhead_s + spec.n_darks * (spec.dark_exposure + spec.overhead_s)
    t = start - _dt.timedelta(seconds=lib_s + 3600.0)
    rng_c = _rng(spec, 1)
    temp_rng = _rng(spec, 2)

    def temp_reading(target: float) -> float:
        return round(target + float(temp_rng.normal(0, 0.08)), 1)

    for kind, n, exp, temp in (("bias", spec.n_biases, 0.0, spec.dark_temperature),
                               ("dark", spec.n_darks, spec.dark_exposure, spec.dark_temperature)):
        for i in range(n):
            frames.append(FrameTruth(kind=kind, index=i, file=_file_name(spec, kind, t, "", exp, i + 1, i + 1),
                                     date_obs=_fmt_time(t), exposure_s=exp, temperature_c=temp_reading(temp),
                                     sensor_temp_c=temp,
                                     filter="", cosmics=_cosmics(rng_c, spec, exp)))
            t += _dt.timedelta(seconds=exp + spec.overhead_s)

    # --- lights
    rng_l = _rng(spec, 3)
    n_all = spec.total_lights
    clouds = dict(spec.clouds)
    elong = {i: (e, a) for i, e, a in spec.elongated}
    blur = dict(spec.blurred)
    bright = dict(spec.bright_sky)
    moon = dict(spec.moon)
    moon_dir = float(_rng(spec, 8).uniform(0, 2 * math.pi))
    z = 0.0
    theta = 0.0
    drift = np.zeros(2)
    dither = np.zeros(2)
    flip_offset = np.zeros(2)
    t = start
    first_airmass = None
    first_transparency: dict[str, float] = {}
    light_records = []
    base_pa = float(rng_l.uniform(-90, 90))

    def light_temp(i: int) -> float:
        if spec.cooled:
            return spec.temperature_c
        return spec.temperature_c - spec.ambient_drop_c * i / max(1, n_all - 1)

    for i in range(n_all):
        filt = filters[i // spec.n_lights]
        if spec.meridian_flip_after is not None and i == spec.meridian_flip_after + 1:
            t += _dt.timedelta(seconds=120)  # the flip and re-centring
        ha, alt, airmass, q = _alt_airmass_pa(spec, t + _dt.timedelta(seconds=spec.exposure_s / 2))
        if first_airmass is None:
            first_airmass = airmass
        flipped = spec.meridian_flip_after is not None and i > spec.meridian_flip_after
        if i > 0:
            drift += np.asarray(spec.drift_px_per_frame)
            theta += math.radians(spec.rotation_deg_per_frame)
            if spec.dither_every > 0 and i % spec.dither_every == 0:
                r = spec.dither_px * math.sqrt(rng_l.uniform())
                a = rng_l.uniform(0, 2 * math.pi)
                dither = np.array([r * math.cos(a), r * math.sin(a)])
            if flipped and spec.meridian_flip_after is not None and i == spec.meridian_flip_after + 1:
                a = rng_l.uniform(0, 2 * math.pi)
                flip_offset = spec.flip_recentre_px * np.array([math.cos(a), math.sin(a)])
                drift[:] = 0.0
        tvec = drift + dither + flip_offset
        matrix = np.eye(3) if i == 0 else _similarity(theta + (math.pi if flipped else 0.0), (tvec[0], tvec[1]), c)
        # seeing: AR(1) jitter on top of the airmass dependence
        z = 0.7 * z + math.sqrt(1 - 0.49) * float(rng_l.normal())
        fwhm = spec.fwhm_px * (airmass / first_airmass) ** 0.6 * math.exp(spec.fwhm_jitter * z)
        ecc = float(np.clip(spec.eccentricity * (1.0 + 0.3 * rng_l.normal()), 0.0, 0.6))
        pa = base_pa + float(rng_l.normal(0.0, 15.0))  # tracking errors lie mostly along RA
        if i in elong:
            ecc, pa = elong[i]
        fwhm *= blur.get(i, 1.0) * (1.0 + spec.focus_drift * i / max(1, n_all - 1))
        cloud = float(clouds.get(i, 1.0))
        transparency = 10 ** (-0.4 * spec.extinction_mag * (airmass - 1.0)) * cloud
        first_transparency.setdefault(filt, transparency)
        tg = spec.cloud_gradient * (1.0 - cloud)
        tphi = float(rng_l.uniform(0, 2 * math.pi)) if tg > 0 else 0.0
        sky = spec.sky_e_per_s * spec.exposure_s * (1.0 + spec.sky_airmass_coeff * (airmass - 1.0))
        if not spec.osc:  # what a mono pixel sees through the filter (L: everything)
            sky *= float(_SKY_COLOUR @ np.array(_sky.FILTER_RESPONSE[filt.upper()]))
        sky *= 1.0 + spec.cloud_sky_boost * (1.0 - cloud)
        sky *= bright.get(i, 1.0)
        # light pollution grows towards the horizon; direction = parallactic angle seen in the frame
        g = spec.gradient_frac * airmass
        phi = q + math.pi / 2 - (theta + (math.pi if flipped else 0.0))
        gx, gy = g * math.cos(phi), g * math.sin(phi)
        c2 = 0.25 * g
        poly = (1.0, gx, gy, c2 * math.cos(phi) ** 2, 2 * c2 * math.cos(phi) * math.sin(phi), c2 * math.sin(phi) ** 2)
        sky_poly = tuple(float(v) * sky for v in poly)
        if i in moon:  # scattered moonlight, brighter towards the moon (a fixed direction on the sky)
            extra = moon[i] * sky
            mphi = moon_dir - (theta + (math.pi if flipped else 0.0))
            sky_poly = tuple(a + b for a, b in zip(sky_poly, (extra, 0.3 * extra * math.cos(mphi),
                                                               0.3 * extra * math.sin(mphi), 0.0, 0.0, 0.0)))
            sky += extra
        trails = []
        if i in spec.trails:
            trails.append(_trail(rng_l, spec, "satellite", fwhm))
        if i in spec.aircraft:
            trails.append(_trail(rng_l, spec, "aircraft", fwhm))
        cos_ = _cosmics(rng_l, spec, spec.exposure_s)
        number = i % spec.n_lights + 1
        light_records.append(FrameTruth(
            kind="light", index=i, file=_file_name(spec, "light", t, filt, spec.exposure_s, number, i + 1),
            date_obs=_fmt_time(t), exposure_s=spec.exposure_s, temperature_c=temp_reading(light_temp(i)),
            sensor_temp_c=light_temp(i),
            filter=filt, cosmics=cos_, matrix=tuple(tuple(round(float(v), 12) for v in row) for row in matrix),
            fwhm_px=fwhm, fwhm_sampled_px=math.sqrt(fwhm * fwhm + 2.3548**2 / 12.0), eccentricity=ecc, psf_angle_deg=pa, beta=spec.moffat_beta, hour_angle_h=ha,
            altitude_deg=alt, airmass=airmass, pier_side="East" if flipped else "West", cloud=cloud,
            transparency=transparency, transparency_grad=(tg * math.cos(tphi), tg * math.sin(tphi)),
            scale=first_transparency[filt] / transparency, sky_e=sky,
            sky_poly=sky_poly, trails=tuple(trails)))
        dithers_next = spec.dither_every > 0 and (i + 1) % spec.dither_every == 0
        t += _dt.timedelta(seconds=spec.exposure_s + spec.overhead_s + (spec.settle_s if dithers_next else 0.0))
    frames.extend(light_records)

    # --- flats at dawn (05:30 UTC the next morning, or 40 min after the last light), then flat-darks
    dawn = (start + _dt.timedelta(days=1)).replace(hour=5, minute=30, second=0, microsecond=0)
    t = max(t + _dt.timedelta(minutes=40), dawn)
    rng_f = _rng(spec, 4)
    dawn_temp = spec.temperature_c if spec.cooled else spec.temperature_c - spec.ambient_drop_c
    flat_exp = {f: spec.flat_exposure_s for f in filters}
    flat_exp.update({f: float(e) for f, e in spec.flat_exposure_by_filter if f in flat_exp})
    for filt in filters:
        exp = flat_exp[filt]
        for i in range(spec.n_flats):
            idx = filters.index(filt) * spec.n_flats + i
            frames.append(FrameTruth(
                kind="flat", index=idx, file=_file_name(spec, "flat", t, filt, exp, i + 1, idx + 1),
                date_obs=_fmt_time(t), exposure_s=exp, temperature_c=temp_reading(dawn_temp),
                sensor_temp_c=dawn_temp, filter=filt, cosmics=_cosmics(rng_f, spec, exp),
                flat_star_seed=int(rng_f.integers(0, 2**31)) if spec.sky_flats_with_stars else None))
            t += _dt.timedelta(seconds=exp + spec.overhead_s)
    # one set of flat-darks per distinct flat exposure
    idx = 0
    for exp in dict.fromkeys(flat_exp[f] for f in filters):
        for i in range(spec.n_darkflats):
            frames.append(FrameTruth(
                kind="darkflat", index=idx, file=_file_name(spec, "darkflat", t, "", exp, i + 1, idx + 1),
                date_obs=_fmt_time(t), exposure_s=exp, temperature_c=temp_reading(dawn_temp),
                sensor_temp_c=dawn_temp, filter="", cosmics=_cosmics(rng_f, spec, exp)))
            idx += 1
            t += _dt.timedelta(seconds=exp + spec.overhead_s)

    # --- stars over the union of all light footprints
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], dtype=np.float64).T
    pts = np.concatenate([(f.matrix_array @ corners)[:2] for f in light_records], axis=1)
    margin = 20.0 + 4 * spec.fwhm_px
    x_lo, y_lo = pts.min(axis=1) - margin
    x_hi, y_hi = pts.max(axis=1) + margin
    rng_s = _rng(spec, 5)
    area = (x_hi - x_lo) * (y_hi - y_lo) / 1e6
    n_stars = int(rng_s.poisson(spec.stars_per_mpix * area))
    f_lo, f_hi = spec.star_flux_range_e
    m_lo, m_hi = -2.5 * math.log10(f_hi), -2.5 * math.log10(f_lo)  # bright .. faint instrumental mags
    a = spec.lf_slope * math.log(10.0)
    uu = rng_s.uniform(size=n_stars)
    mags = m_lo + np.log1p(uu * np.expm1(a * (m_hi - m_lo))) / a  # pdf ~ 10^(slope m)
    xs = rng_s.uniform(x_lo, x_hi, size=n_stars)
    ys = rng_s.uniform(y_lo, y_hi, size=n_stars)
    # saturated stars inside the reference frame, away from the edges
    sat_flux = spec.full_well_e * 40.0
    nsat = spec.n_saturated_stars
    xs = np.concatenate([xs, rng_s.uniform(0.15 * w, 0.85 * w, size=nsat)])
    ys = np.concatenate([ys, rng_s.uniform(0.15 * h, 0.85 * h, size=nsat)])
    mags = np.concatenate([mags, -2.5 * np.log10(sat_flux * rng_s.uniform(1.0, 3.0, size=nsat))])
    bv = np.clip(rng_s.normal(0.7, 0.35, size=mags.size), -0.3, 2.0)
    flux_l = 10 ** (-0.4 * mags)
    flux = flux_l[:, None] * _sky.star_colour_weights(bv)
    order = np.argsort(mags, kind="stable")
    stars = StarCatalog(x=xs[order], y=ys[order], flux_e=flux[order], mag=mags[order], bv=bv[order])

    # --- extended target (reference grid)
    rng_t = _rng(spec, 6)
    galaxy = np.zeros((0, 10))
    nebula = np.zeros((0, 0))
    neb_origin = (float(x_lo), float(y_lo))
    neb_step = max(8.0, min(w, h) / 48.0)
    scale_len = min(w, h)
    if spec.target == "galaxy":
        gx0 = c[0] + rng_t.uniform(-0.08, 0.08) * w
        gy0 = c[1] + rng_t.uniform(-0.08, 0.08) * h
        pa = rng_t.uniform(0, math.pi)
        q = rng_t.uniform(0.3, 0.6)
        sky_rate = spec.sky_e_per_s * spec.exposure_s
        rows = []
        for ie, re, sersic_n, qq in ((1.5, 0.03, 4.0, min(1.0, q + 0.3)), (0.6, 0.12, 1.0, q)):
            bn = 2.0 * sersic_n - 1.0 / 3.0 + 0.009876 / sersic_n
            rows.append([gx0, gy0, ie * sky_rate * spec.target_brightness, re * scale_len, sersic_n, bn, qq,
                         math.cos(pa), math.sin(pa), 0.5 * spec.fwhm_px])
        galaxy = np.array(rows)
    elif spec.target == "nebula":
        from scipy.ndimage import gaussian_filter

        nx = int((x_hi - x_lo) / neb_step) + 4
        ny = int((y_hi - y_lo) / neb_step) + 4
        raw = rng_t.normal(size=(ny, nx))
        # multi-scale (roughly power-law) structure, log-normal so that filaments stand out
        smooth = sum(s**0.8 * gaussian_filter(raw, s) for s in (1.0, 2.0, 4.0, 8.0))
        smooth = (smooth - smooth.mean()) / (smooth.std() + 1e-12)
        yy, xx = np.mgrid[0:ny, 0:nx]
        env = np.exp(-(((xx - nx / 2) / (0.35 * nx)) ** 2 + ((yy - ny / 2) / (0.35 * ny)) ** 2))
        nebula = np.exp(1.3 * smooth) * env
        nebula *= 0.8 * spec.sky_e_per_s * spec.exposure_s * spec.target_brightness / max(nebula.max(), 1e-12)

    # --- sensor maps
    rng_m = _rng(spec, 7)
    f32 = np.float32
    bias = rng_m.standard_normal(size=(h, w), dtype=f32)
    bias *= f32(spec.bias_pixel_pattern_adu)
    bias += (spec.bias_adu + rng_m.normal(0, spec.bias_row_pattern_adu, size=(h, 1))).astype(f32)
    bias += rng_m.normal(0, spec.bias_column_pattern_adu, size=(1, w)).astype(f32)
    dark = rng_m.standard_normal(size=(h, w), dtype=f32)
    dark *= f32(0.25)
    np.exp(dark, out=dark)
    dark *= f32(spec.dark_current_e_per_s)
    yy, xx = np.ogrid[0:h, 0:w]
    glow_len = max(spec.amp_glow_scale_frac * w, 1.0)
    dark += (spec.amp_glow_e_per_s * np.exp(-np.hypot((w - 1 - xx).astype(f32), yy.astype(f32)) / f32(glow_len))
             ).astype(f32)
    npx = h * w
    n_hot = round(spec.hot_pixel_frac * npx)
    n_warm = round(spec.warm_pixel_frac * npx)
    n_cold = round(spec.cold_pixel_frac * npx)
    picked = rng_m.choice(npx, size=n_hot + n_warm + n_cold, replace=False)
    hot = picked[:n_hot]
    warm = picked[n_hot:n_hot + n_warm]
    cold = picked[n_hot + n_warm:]
    dflat = dark.reshape(-1)
    dflat[hot] += np.exp(rng_m.uniform(math.log(0.5), math.log(20.0), size=hot.size)).astype(f32)
    dflat[warm] += np.exp(rng_m.uniform(math.log(0.03), math.log(0.5), size=warm.size)).astype(f32)
    dflat[cold] = 0.0
    # optics: vignetting centre slightly off the frame centre; dust donuts
    dust = []
    dscale = min(4.0, max(1.0, w / 1024.0))
    for _ in range(spec.n_dust):
        dust.append((float(rng_m.uniform(0.1 * w, 0.9 * w)), float(rng_m.uniform(0.1 * h, 0.9 * h)),
                     float(rng_m.uniform(10.0, 30.0) * dscale), float(rng_m.uniform(0.01, 0.03))))
    vc = (c[0] + rng_m.uniform(-0.04, 0.04) * w, c[1] + rng_m.uniform(-0.04, 0.04) * h)
    resp = _sky.dust_and_vignetting((h, w), vignetting=spec.vignetting, centre=vc, dust=dust)
    prnu = rng_m.standard_normal(size=(h, w), dtype=f32)
    prnu *= f32(spec.prnu)
    prnu += f32(1.0)
    resp *= prnu
    del prnu
    rflat = resp.reshape(-1)
    rflat[cold] *= rng_m.uniform(0.05, 0.5, size=cold.size).astype(f32)
    resp /= f32(resp.mean(dtype=np.float64))
    panel = (0.75, 1.0, 0.55) if spec.osc else (1.0, 1.0, 1.0)

    # expected raw background noise at the frame centre
    rc = float(np.median(resp[h // 2 - h // 20:h // 2 + h // 20 + 1, w // 2 - w // 20:w // 2 + w // 20 + 1]))
    for k, fr in enumerate(frames):
        if fr.kind == "light" and fr.sky_e is not None:
            dark_e = spec.dark_current_e_per_s * fr.exposure_s * _dark_factor(spec, _physical_temp(spec, fr))
            var = fr.sky_e * rc + dark_e + spec.read_noise_e**2
            frames[k] = dataclasses.replace(fr, noise_e=math.sqrt(var))

    def coords(idx: np.ndarray) -> tuple[tuple[int, int], ...]:
        return tuple((int(i % w), int(i // w)) for i in np.sort(idx))

    return Truth(spec=spec, frames=tuple(frames), stars=stars, bias_adu=bias, dark_e_per_s=dark, response=resp,
                 panel_colour=panel,
                 hot_pixels=coords(hot), warm_pixels=coords(warm), cold_pixels=coords(cold), galaxy=galaxy,
                 nebula=nebula, nebula_origin=neb_origin, nebula_step_px=neb_step,
                 sky_centre=(c[0], c[1], max(w, h) / 2.0))


# ------------------------------------------------------------------------------------- rendering


def _channel_setup(spec: SimulationSpec, filt: str) -> tuple[np.ndarray, np.ndarray]:
    """(cmap, band weights (C, 3)): how a pixel's channel weights the R, G, B bands of the light."""
    resp = np.array(_sky.FILTER_RESPONSE[filt.upper()], dtype=np.float64)
    if spec.osc:
        return _sky.bayer_channel_map(spec.bayer), np.diag(resp)
    return _sky.bayer_channel_map(None), resp[None, :]


def _signal_e(truth: Truth, frame: FrameTruth, *, channel: int | None = None) -> np.ndarray:
    """Noiseless stars + extended target of a light at transparency 1, in the frame grid (electrons).

    channel: for colour cameras, render every pixel as that channel (0 R, 1 G, 2 B) instead of the CFA.
    """
    spec = truth.spec
    cmap, bands = _channel_setup(spec, frame.filter)
    if channel is not None:
        cmap = np.full((2, 2), channel, dtype=np.int64)
    out = np.zeros(spec.shape, dtype=np.float32)
    m = frame.matrix_array
    inv = np.linalg.inv(m)
    st = truth.stars
    fx = inv[0, 0] * st.x + inv[0, 1] * st.y + inv[0, 2]
    fy = inv[1, 0] * st.x + inv[1, 1] * st.y + inv[1, 2]
    assert frame.fwhm_px is not None and frame.beta is not None
    reach = 40 * frame.fwhm_px + 12
    keep = (fx > -reach) & (fx < spec.width + reach) & (fy > -reach) & (fy < spec.height + reach)
    flux = st.flux_e[keep] @ bands.T  # (N, C)
    # PSF angle is fixed on the sky (tracking errors follow RA): rotate with the frame
    rot = math.degrees(math.atan2(m[1, 0], m[0, 0]))
    cx, cy, _ = truth.sky_centre
    _sky.render_stars(out, fx[keep], fy[keep], flux, fwhm_px=frame.fwhm_px, eccentricity=frame.eccentricity or 0.0,
                      angle_deg=(frame.psf_angle_deg or 0.0) - rot, beta=frame.beta, cmap=cmap,
                      field_psf=spec.field_psf, optical_centre=(cx, cy),
                      field_radius_px=math.hypot(spec.width, spec.height) / 2.0)
    if truth.galaxy.size:
        comps = truth.galaxy.copy()
        comps[:, 9] = 0.5 * frame.fwhm_px
        _sky.render_galaxy(out, m, comps, colour=_GALAXY_COLOUR @ bands.T, cmap=cmap)
    if truth.nebula.size:
        _sky.render_nebula(out, m, truth.nebula, origin=truth.nebula_origin, step_px=truth.nebula_step_px,
                           colour=_NEBULA_COLOUR @ bands.T, cmap=cmap)
    return out


def sky_model_e(truth: Truth, frame: FrameTruth, *, channel: int | None = None) -> np.ndarray:
    """The noiseless sky of a light in its own grid (electrons, before the flat response)."""
    spec = truth.spec
    assert frame.sky_poly is not None
    cx, cy, r = truth.sky_centre
    u = (np.arange(spec.width) - cx) / r
    v = ((np.arange(spec.height) - cy) / r)[:, None]
    p = frame.sky_poly
    row = (p[0] + p[1] * u + p[3] * u * u).astype(np.float32)[None, :]  # terms in u only
    slope = (p[2] + p[4] * u).astype(np.float32)[None, :]  # coefficient of v
    sky = slope * v.astype(np.float32)
    sky += row
    sky += (p[5] * v * v).astype(np.float32)
    cmap, bands = _channel_setup(spec, frame.filter)
    # sky_poly is what a mono pixel sees through its filter; colour pixels see their band's share of it
    col = _SKY_COLOUR @ bands.T if spec.osc else np.ones(1)  # (C,)
    if channel is not None:
        sky *= np.float32(col[channel])
        return sky
    if np.all(col == col[0]) and not spec.osc:
        sky *= np.float32(col[0])
        return sky
    colour = col[cmap].astype(np.float32)  # (2, 2)
    for j in range(2):
        for i in range(2):
            sky[j::2, i::2] *= colour[j, i]
    return sky


def _apply_transparency(truth: Truth, frame: FrameTruth, image: np.ndarray) -> None:
    """Multiply a signal image (electrons, frame grid; (H, W) or (C, H, W)) by the frame's transparency."""
    assert frame.transparency is not None
    image *= np.float32(frame.transparency)
    g = frame.transparency_grad
    if g is not None and (g[0] or g[1]):
        cx, cy, r = truth.sky_centre
        h, w = truth.spec.shape
        u = ((np.arange(w) - cx) / r)[None, :]
        v = ((np.arange(h) - cy) / r)[:, None]
        image *= np.maximum(1.0 + g[0] * u + g[1] * v, 0.0).astype(np.float32)


@dataclass(frozen=True)
class LightComponents:
    """Noiseless parts of one light, in its grid, electrons: ``signal`` (T applied) and ``sky`` before
    the flat ``response``; dark current ``dark`` over the exposure; ``bias`` in ADU."""

    signal: np.ndarray
    sky: np.ndarray
    response: np.ndarray
    dark: np.ndarray
    bias: np.ndarray


def _physical_temp(spec: SimulationSpec, frame: FrameTruth) -> float:
    if frame.sensor_temp_c is not None:
        return frame.sensor_temp_c
    return spec.temperature_c if frame.kind in ("light", "flat", "darkflat") else spec.dark_temperature


def _dark_factor(spec: SimulationSpec, temperature_c: float) -> float:
    return float(2.0 ** ((temperature_c - spec.temperature_c) / spec.dark_doubling_c))


def light_components(truth: Truth, index: int) -> LightComponents:
    """The noiseless model of light ``index`` (see `LightComponents`)."""
    frame = truth.frame("light", index)
    assert frame.transparency is not None
    sig = _signal_e(truth, frame)
    _apply_transparency(truth, frame, sig)
    dark = truth.dark_e_per_s * np.float32(frame.exposure_s * _dark_factor(truth.spec, _physical_temp(truth.spec, frame)))
    return LightComponents(signal=sig, sky=sky_model_e(truth, frame), response=truth.response, dark=dark,
                           bias=truth.bias_adu)


def ideal_light(truth: Truth, index: int, *, sky: bool = True) -> np.ndarray:
    """Noise-free light ``index`` as a perfect calibration would give it, full scale 1.0 (ADU / 65535).

    (T_i signal_i + sky_i) / gain / 65535 in the light's own grid: no bias, dark, flat response,
    noise, cosmic rays or trails. For colour cameras it is the CFA mosaic (each pixel its channel's
    share, divided by the true response, not by a master flat that carries the panel colour).
    """
    c = light_components(truth, index)
    out = c.signal + c.sky if sky else c.signal
    out *= np.float32(1.0 / (truth.spec.gain_e_per_adu * 65535.0))
    return out


def matrix_between(truth: Truth, index: int, reference: int) -> np.ndarray:
    """3x3 transform mapping (x, y) in light ``index`` to (x, y) in light ``reference`` (0-based)."""
    m_i = truth.frame("light", index).matrix_array
    m_r = truth.frame("light", reference).matrix_array
    return np.linalg.inv(m_r) @ m_i


def _digitise(truth: Truth, lam: np.ndarray, rng: np.random.Generator, cosmics: tuple[tuple[float, ...], ...],
              *, band_rows: int = 512) -> np.ndarray:
    """Poisson + cosmics + full well + gain + bias + read noise + 16-bit clip; lam in electrons."""
    spec = truth.spec
    h, w = lam.shape
    if cosmics:
        cr = np.zeros((h, w), dtype=np.float32)
        _sky.add_cosmic_rays(cr, cosmics)
    else:
        cr = None
    out = np.empty((h, w), dtype=np.uint16)
    row_noise = rng.normal(0.0, spec.row_noise_adu, size=(h, 1))
    step = 1 << (16 - spec.adc_bits)
    for y0 in range(0, h, band_rows):
        y1 = min(h, y0 + band_rows)
        e = rng.poisson(np.maximum(lam[y0:y1], 0.0)).astype(np.float64)
        if cr is not None:
            e += cr[y0:y1]
        np.minimum(e, spec.full_well_e, out=e)
        adu = e / spec.gain_e_per_adu + truth.bias_adu[y0:y1] + row_noise[y0:y1]
        adu += rng.normal(0.0, spec.read_noise_e / spec.gain_e_per_adu, size=adu.shape)
        if step > 1:
            adu /= step
            np.rint(adu, out=adu)
            np.clip(adu, 0, (1 << spec.adc_bits) - 1, out=adu)
            adu *= step
        else:
            np.rint(adu, out=adu)
            np.clip(adu, 0, 65535, out=adu)
        out[y0:y1] = adu.astype(np.uint16)
    return out


def _noise_rng(truth: Truth, frame: FrameTruth) -> np.random.Generator:
    return _rng(truth.spec, 100, _KIND_CODE[frame.kind], frame.index)


def render_frame(truth: Truth, frame: FrameTruth) -> np.ndarray:
    """The uint16 (H, W) pixels of one frame of the night, as the camera writes them (top-down)."""
    spec = truth.spec
    rng = _noise_rng(truth, frame)
    temp = _physical_temp(spec, frame)
    dark_rate = truth.dark_e_per_s * np.float32(_dark_factor(spec, temp) * frame.exposure_s)
    if frame.kind in ("bias", "dark", "darkflat"):
        lam = dark_rate if frame.kind != "bias" else np.zeros(spec.shape, dtype=np.float32)
        return _digitise(truth, lam, rng, frame.cosmics)
    cmap, _ = _channel_setup(spec, frame.filter)
    if frame.kind == "flat":
        # the user sets the flat exposure so that the brightest channel averages flat_level_frac
        panel = np.array(truth.panel_colour) if spec.osc else np.ones(1)
        level_e = spec.flat_level_frac * 65535.0 * spec.gain_e_per_adu
        pcol = (panel / panel.max())[cmap]
        illum = level_e * np.tile(pcol, (spec.height // 2, spec.width // 2)).astype(np.float32)
        if frame.flat_star_seed is not None:
            srng = np.random.default_rng(frame.flat_star_seed)
            n = max(3, int(spec.width * spec.height / 1e6 * 200))
            sx = srng.uniform(0, spec.width, n)
            sy = srng.uniform(0, spec.height, n)
            sf = 10 ** srng.uniform(3.5, 5.0, n) * (level_e / 2e4)
            fl = np.repeat(sf[:, None], 3, axis=1)
            _sky.render_stars(illum, sx, sy, fl, fwhm_px=spec.fwhm_px * 1.2, beta=spec.moffat_beta,
                              cmap=cmap if spec.osc else None)
        lam = illum * truth.response + dark_rate
        return _digitise(truth, lam, rng, frame.cosmics)
    # light
    assert frame.transparency is not None
    scene = _signal_e(truth, frame)
    _apply_transparency(truth, frame, scene)
    scene += sky_model_e(truth, frame)
    if frame.trails:
        _, bands = _channel_setup(spec, frame.filter)
        col = bands @ np.full(3, 1.0 / 3.0)  # reflected sunlight: grey, a third per band
        for tr in frame.trails:
            _add_trail(scene, np.zeros(spec.shape, dtype=bool), tr, col, cmap)
    scene *= truth.response
    scene += dark_rate
    return _digitise(truth, scene, rng, frame.cosmics)


def _add_trail(out: np.ndarray, mask: np.ndarray, tr: dict[str, Any], col: np.ndarray, cmap: np.ndarray) -> None:
    if tr["kind"] == "aircraft":
        dx, dy = tr["x1"] - tr["x0"], tr["y1"] - tr["y0"]
        ln = math.hypot(dx, dy)
        nx, ny = -dy / ln, dx / ln
        for sgn in (-1.0, 1.0):
            o = sgn * tr["offset_px"]
            _sky.render_trail(out, mask, x0=tr["x0"] + o * nx, y0=tr["y0"] + o * ny, x1=tr["x1"] + o * nx,
                              y1=tr["y1"] + o * ny, sigma_px=tr["sigma_px"], peak_e=tr["peak_e"],
                              period_px=tr["period_px"], duty=tr["duty"], colour=col, cmap=cmap)
        _sky.render_trail(out, mask, x0=tr["x0"], y0=tr["y0"], x1=tr["x1"], y1=tr["y1"],
                          sigma_px=1.5 * tr["sigma_px"], peak_e=0.08 * tr["peak_e"], colour=col, cmap=cmap)
    else:
        _sky.render_trail(out, mask, x0=tr["x0"], y0=tr["y0"], x1=tr["x1"], y1=tr["y1"],
                          sigma_px=tr["sigma_px"], peak_e=tr["peak_e"], colour=col, cmap=cmap)


def trail_mask(truth: Truth, frame: FrameTruth) -> np.ndarray:
    """Bool (H, W) mask of the pixels where the frame's trails add >= 2 electrons (before the flat, as a
    mono unfiltered pixel would see them; colour pixels and R/G/B filters see a third of that)."""
    spec = truth.spec
    mask = np.zeros(spec.shape, dtype=bool)
    scratch = np.zeros(spec.shape, dtype=np.float32)
    for tr in frame.trails:
        _add_trail(scratch, mask, tr, np.ones(1), np.zeros((2, 2), dtype=np.int64))
    return mask


def render_light(truth: Truth, index: int) -> np.ndarray:
    """uint16 pixels of light ``index`` (0-based, capture order)."""
    return render_frame(truth, truth.frame("light", index))


def scene_adu(truth: Truth) -> tuple[np.ndarray, np.ndarray]:
    """(scene, sky) of light 1 in ADU, float32: (H, W) mono or (3, H, W) colour (see module doc)."""
    spec = truth.spec
    f0 = truth.lights()[0]
    assert f0.transparency is not None
    g = np.float32(1.0 / spec.gain_e_per_adu)
    if not spec.osc:
        scene = _signal_e(truth, f0)
        _apply_transparency(truth, f0, scene)
        return scene * g, sky_model_e(truth, f0) * g
    scene = np.stack([_signal_e(truth, f0, channel=ch) for ch in range(3)])
    _apply_transparency(truth, f0, scene)
    scene *= g
    sky = np.stack([sky_model_e(truth, f0, channel=ch) for ch in range(3)]) * g
    return scene.astype(np.float32), sky.astype(np.float32)


# --------------------------------------------------------------------------------- headers, files


def _sexagesimal(value: float, *, hours: bool) -> str:
    v = value / 15.0 if hours else value
    sign = "-" if v < 0 else ("" if hours else "+")
    v = abs(v)
    d = int(v)
    m = int((v - d) * 60)
    s = (v - d - m / 60) * 3600
    return f"{sign}{d:02d} {m:02d} {s:04.1f}" if hours else f"{sign}{d:02d} {m:02d} {s:02.0f}"


def _vflip_pattern(pattern: str) -> str:
    return pattern[2:] + pattern[:2]


def header_bayer(spec: SimulationSpec) -> tuple[str, int, int]:
    """(BAYERPAT, XBAYROFF, YBAYROFF) written for a colour camera: with them, the colour of a stored pixel
    (x, y) is BAYERPAT[((y + YBAYROFF) % 2) * 2 + (x + XBAYROFF) % 2] (file order), and after the
    ROWORDER rule the data have the CFA ``spec.bayer`` at [0:2, 0:2]."""
    eff = spec.bayer.upper() if spec.row_order == "TOP-DOWN" else _vflip_pattern(spec.bayer.upper())
    ox, oy = spec.bayer_offset
    pat = "".join(eff[((j - oy) % 2) * 2 + (i - ox) % 2] for j in range(2) for i in range(2))
    return pat, ox, oy


def to_file_order(spec: SimulationSpec, data: np.ndarray) -> np.ndarray:
    """The rows as stored in the file (BOTTOM-UP: last row first); `render_frame` gives top-down rows."""
    return np.ascontiguousarray(data[::-1]) if spec.row_order == "BOTTOM-UP" else data


def frame_header(truth: Truth, frame: FrameTruth) -> fits.Header:
    """The header a capture program (``spec.header_style``) writes for a frame; BITPIX/BZERO come on writing."""
    spec = truth.spec
    style = spec.header_style
    hdr = fits.Header()
    if style == "ekos":
        hdr["FRAME"] = ({"darkflat": "Dark"}.get(frame.kind, frame.kind.capitalize()), "Frame Type")
    hdr["IMAGETYP"] = (_STYLE_IMAGETYP[style][frame.kind], "Type of exposure")
    if style != "ekos":
        hdr["EXPOSURE"] = (float(frame.exposure_s), "[s] Exposure duration")
    hdr["EXPTIME"] = (float(frame.exposure_s), "[s] Exposure duration")
    utc = _dt.datetime.fromisoformat(frame.date_obs)
    if style in ("nina", "maxim"):
        hdr["DATE-LOC"] = (_fmt_time(utc + _dt.timedelta(hours=round(spec.longitude_deg / 15.0))),
                           "Time of observation (local)")
    hdr["DATE-OBS"] = (frame.date_obs, "Time of observation (UTC)")
    hdr["XBINNING"] = (spec.binning, "X axis binning factor")
    hdr["YBINNING"] = (spec.binning, "Y axis binning factor")
    hdr["GAIN"] = (spec.gain_setting, "Sensor gain")
    hdr["OFFSET"] = (spec.offset_setting, "Sensor gain offset")
    hdr["EGAIN"] = (spec.gain_e_per_adu, "[e-/ADU] Electrons per A/D unit")
    hdr["XPIXSZ"] = (spec.pixel_size_um * spec.binning, "[um] Pixel X axis size")
    hdr["YPIXSZ"] = (spec.pixel_size_um * spec.binning, "[um] Pixel Y axis size")
    hdr["INSTRUME"] = (spec.camera_name, "Imaging instrument name")
    if spec.cooled:
        hdr["SET-TEMP"] = (spec.temperature_c if frame.kind in ("light", "flat", "darkflat") else spec.dark_temperature,
                           "[degC] CCD temperature setpoint")
    hdr["CCD-TEMP"] = (frame.temperature_c, "[degC] CCD temperature")
    if spec.osc:
        pat, ox, oy = header_bayer(spec)
        hdr["BAYERPAT"] = (pat, "Sensor Bayer pattern")
        hdr["XBAYROFF"] = (ox, "Bayer pattern X axis offset")
        hdr["YBAYROFF"] = (oy, "Bayer pattern Y axis offset")
    hdr["TELESCOP"] = (spec.telescope, "Name of telescope")
    hdr["FOCALLEN"] = (spec.focal_length_mm, "[mm] Focal length")
    if style == "nina":
        hdr["READOUTM"] = ("Normal", "Sensor readout mode")
        hdr["USBLIMIT"] = (40, "Camera-specific USB setting")
        hdr["FOCRATIO"] = (round(spec.focal_length_mm / spec.aperture_mm, 2), "Focal ratio")
    hdr["SITELAT"] = (spec.latitude_deg, "[deg] Observation site latitude")
    hdr["SITELONG"] = (spec.longitude_deg, "[deg] Observation site longitude")
    if frame.kind == "light":
        hdr["RA"] = (spec.ra_deg, "[deg] RA of telescope")
        hdr["DEC"] = (spec.dec_deg, "[deg] Declination of telescope")
        hdr["CENTALT"] = (round(frame.altitude_deg or 0.0, 3), "[deg] Altitude of telescope")
        hdr["AIRMASS"] = (round(frame.airmass or 0.0, 4), "Airmass at frame center (Gueymard 1993)")
        hdr["PIERSIDE"] = (frame.pier_side, "Telescope pointing state")
        hdr["OBJECT"] = (spec.object_name, "Name of the object of interest")
        hdr["OBJCTRA"] = (_sexagesimal(spec.ra_deg, hours=True), "[H M S] RA of imaged object")
        hdr["OBJCTDEC"] = (_sexagesimal(spec.dec_deg, hours=False), "[D M S] Declination of imaged object")
        if style == "nina":
            hdr["OBJCTROT"] = (0.0, "[deg] planned rotation of imaged object")
    if frame.filter and frame.kind in ("light", "flat"):
        hdr["FILTER"] = (frame.filter, "Active filter name")
    if style != "sgp":
        hdr["ROWORDER"] = (spec.row_order, "FITS Image Orientation")
    hdr["EQUINOX"] = (2000.0, "Equinox of celestial coordinate system")
    if _STYLE_SOFTWARE[style]:
        hdr["SWCREATE"] = (_STYLE_SOFTWARE[style], "Software that created this file")
    return hdr


def _fits_bytes(data: np.ndarray, header: fits.Header) -> bytes:
    hdu = fits.PrimaryHDU(data=data, header=header)
    buf = io.BytesIO()
    hdu.writeto(buf)
    return buf.getvalue()


def write_fits(path: str | os.PathLike[str], data: np.ndarray, header: fits.Header, *,
               chunk_bytes: int = 0, chunk_delay_s: float = 0.0) -> None:
    """Write a 16-bit FITS file the way a capture program does: straight to its final name.

    With ``chunk_bytes`` > 0 the file is written in chunks with ``chunk_delay_s`` between them (a
    slow writer, for the demo and for watcher tests). Default is one write.
    """
    blob = _fits_bytes(np.asarray(data, dtype=np.uint16), header)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "wb") as fh:
        if chunk_bytes <= 0:
            fh.write(blob)
        else:
            for k in range(0, len(blob), chunk_bytes):
                fh.write(blob[k:k + chunk_bytes])
                fh.flush()
                if chunk_delay_s > 0 and k + chunk_bytes < len(blob):
                    time.sleep(chunk_delay_s)


@dataclass(frozen=True)
class SimFrame:
    """One frame in capture order: where it goes, its pixels in file order (`to_file_order`) and header,
    and when it is taken (``offset_s``: seconds after the first frame of the night started, end of
    exposure)."""

    kind: str
    filename: str
    data: np.ndarray
    header: fits.Header
    offset_s: float
    truth: FrameTruth


def iter_night(truth: Truth, *, kinds: tuple[str, ...] = KINDS) -> Iterator[SimFrame]:
    """Render the frames of the night lazily in capture order (biases and darks first, flats at dawn).

    ``kinds`` limits the kinds yielded. Default is all (`KINDS`).
    """
    first = _dt.datetime.fromisoformat(truth.frames[0].date_obs) if truth.frames else None
    for f in truth.frames:
        if f.kind not in kinds:
            continue
        t = _dt.datetime.fromisoformat(f.date_obs)
        off = (t - first).total_seconds() + f.exposure_s if first else 0.0
        yield SimFrame(kind=f.kind, filename=f.file, data=to_file_order(truth.spec, render_frame(truth, f)),
                       header=frame_header(truth, f), offset_s=off, truth=f)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _write_f32(path: Path, data: np.ndarray) -> None:
    np.save(path, np.asarray(data, dtype=np.float32))


def write_truth(truth: Truth, outdir: str | os.PathLike[str]) -> Path:
    """Write ``truth/`` (see the module doc) under ``outdir``; returns the truth folder."""
    spec = truth.spec
    tdir = Path(outdir) / "truth"
    tdir.mkdir(parents=True, exist_ok=True)
    g = 1.0 / spec.gain_e_per_adu
    frames = []
    for f in truth.frames:
        rec = _jsonable(f)
        if f.kind == "light":
            assert f.sky_e is not None and f.sky_poly is not None
            rec["sky_adu"] = f.sky_e * g
            rec["sky_poly_adu"] = [v * g for v in f.sky_poly]
            if f.trails:
                stem = Path(f.file).stem
                np.save(tdir / f"trail_mask_{stem}.npy", trail_mask(truth, f))
                rec["trail_mask"] = f"trail_mask_{stem}.npy"
        frames.append(rec)
    cx, cy, r = truth.sky_centre
    doc = {
        "format": "stackwatch-simulation-truth/1",
        "units": {
            "coordinates": "x = column, y = row, 0-based, pixel centres at integers, top-down",
            "matrix": "3x3, maps (x, y, 1) in the frame to the reference grid = light 1 (index 0)",
            "electrons": "sky_e, sky_poly, noise_e, cosmics energy, trail peak_e (gain_e_per_adu converts)",
            "adu": "16-bit data numbers; full scale 1.0 = 65535 ADU in stackwatch",
            "maps": "scene_adu, sky_adu (light 1), bias_adu, dark_current_adu_per_s, flat_response: float32 .npy",
            "indices": "0-based within each kind, capture order; file names count from 0001",
        },
        "spec": _jsonable(spec),
        "gain_e_per_adu": spec.gain_e_per_adu,
        "reference": truth.lights()[0].file,
        "sky_coordinates": {"cx": cx, "cy": cy, "r": r,
                            "doc": "sky = c00 + c10 u + c01 v + c20 u^2 + c11 u v + c02 v^2, u = (x - cx) / r, "
                                   "v = (y - cy) / r; mono/L sum; colour pixels see sky_colour times this"},
        "sky_colour": _SKY_COLOUR.tolist(),
        "flat_panel_colour": list(truth.panel_colour),
        "hot_pixels": [list(p) for p in truth.hot_pixels],
        "warm_pixels": [list(p) for p in truth.warm_pixels],
        "cold_pixels": [list(p) for p in truth.cold_pixels],
        "frames": frames,
    }
    (tdir / "truth.json").write_text(json.dumps(doc, indent=1))
    scene, sky = scene_adu(truth)
    _write_f32(tdir / "scene_adu.npy", scene)
    _write_f32(tdir / "sky_adu.npy", sky)
    _write_f32(tdir / "bias_adu.npy", truth.bias_adu)
    _write_f32(tdir / "dark_current_adu_per_s.npy", truth.dark_e_per_s * g)
    _write_f32(tdir / "flat_response.npy", truth.response)
    st = truth.stars
    f0 = truth.lights()[0]
    assert f0.transparency is not None
    _, bands = _channel_setup(spec, f0.filter)
    fl = st.flux_e * f0.transparency * g
    total = (st.flux_e @ bands.T).sum(axis=1) * f0.transparency * g if not spec.osc else fl.sum(axis=1)
    table = np.column_stack([st.x, st.y, total, fl, st.mag, st.bv])
    np.savetxt(tdir / "stars.csv", table, delimiter=",", fmt=["%.4f", "%.4f", "%.3f", "%.3f", "%.3f", "%.3f", "%.4f", "%.3f"],
               header="x,y,flux_adu,flux_r_adu,flux_g_adu,flux_b_adu,mag,bv", comments="")
    return tdir


def spec_from_dict(data: dict[str, Any]) -> SimulationSpec:
    """The `SimulationSpec` stored in a truth.json ``spec`` (lists back to tuples; unknown keys refused)."""
    names = {f.name for f in dataclasses.fields(SimulationSpec)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise StackwatchError(f"simulation spec: unknown field {unknown[0]!r}")

    def tup(v: Any) -> Any:
        return tuple(tup(x) for x in v) if isinstance(v, list) else v

    return SimulationSpec(**{k: tup(v) for k, v in data.items()})


def load_truth(outdir: str | os.PathLike[str]) -> Truth:
    """Rebuild the in-memory `Truth` of a night written by `simulate_night` (from truth/truth.json: the
    night is deterministic for its spec, so this is `make_truth` of the stored spec)."""
    path = Path(outdir) / "truth" / "truth.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StackwatchError(f"{path}: cannot read the simulation truth ({exc})") from exc
    truth = make_truth(spec_from_dict(doc["spec"]))
    if [f.file for f in truth.frames] != [f["file"] for f in doc["frames"]]:
        raise StackwatchError(f"{path}: written by another version of the simulator (frames differ)")
    return truth


def simulate_night(spec: SimulationSpec, outdir: str | os.PathLike[str], *, truth_files: bool = True,
                   kinds: tuple[str, ...] = KINDS) -> Truth:
    """Write the night (lights/, darks/, flats/, darkflats/, biases/) and truth/ into ``outdir``.

    Parameters
    ----------
    spec : the night.
    outdir : folder (created).
    truth_files : write truth/ too. Default is True.
    kinds : which kinds of frame to write. Default is all (`KINDS`).

    Returns the `Truth` (the same as ``make_truth(spec)``).
    """
    truth = make_truth(spec)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    for fr in iter_night(truth, kinds=kinds):
        write_fits(out / fr.filename, fr.data, fr.header)
    if truth_files:
        write_truth(truth, out)
    return truth
