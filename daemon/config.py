"""The configuration: one typed dataclass tree, every field with a default, a unit and one line of help.

`stackwatch config --defaults` prints the TOML generated from this tree; `load_config` reads a TOML
file over the defaults and refuses unknown keys, naming them. The engine never sees this module: the
daemon passes the values it needs as keyword arguments.

Field names carry their unit (`_s`, `_ms`, `_c`, `_px`, `_mb`, `_frac`); the help text is the
field's ``metadata["help"]``. Add a field with `_f(default, "help")`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stackwatch.engine.errors import StackwatchError
from stackwatch.engine.gates import DEFAULT_RULES

__all__ = [
    "Config",
    "ConfigError",
    "defaults_toml",
    "load_config",
]


class ConfigError(StackwatchError):
    """A configuration file that cannot be used; the message names the file, key and reason."""


def _f(default: Any, help: str) -> Any:
    """A config field with its one-line help text; lists and dicts get a fresh copy per instance."""
    if isinstance(default, list | dict):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class WatchConfig:
    """How the capture folder is watched."""

    recursive: bool = _f(True, "watch sub-folders too")
    polling: bool = _f(False, "poll instead of inotify (network shares, where inotify does not work)")
    poll_interval_s: float = _f(2.0, "polling period when polling = true")
    stable_for_s: float = _f(2.0, "a file must keep its size and mtime this long before it is read (polling mode)")
    retry_max: int = _f(6, "read attempts for a file that is incomplete or unreadable before it is reported failed")
    retry_backoff_s: float = _f(1.0, "first retry delay; doubles at each attempt")
    ignore_patterns: list[str] = _f(
        [".*", "*.part", "*~", "*.tmp", "*.partial", "*.crdownload"],
        "file-name patterns never read (hidden, temporary and partial files)",
    )
    extensions: list[str] = _f(
        [".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz", ".fz"],
        "only files whose names end with one of these (case-insensitive) are read",
    )
    rescan_interval_s: float = _f(300.0, "rescan the whole folder this often to catch missed events (0 disables)")


@dataclass
class IoConfig:
    """Reading frames."""

    max_image_mpix: float = _f(200.0, "refuse images declaring more than this many megapixels (per plane)")
    bayer_pattern: str = _f("", "CFA pattern to assume when a colour frame has no BAYERPAT keyword (e.g. RGGB); empty = detect")


@dataclass
class LibraryConfig:
    """Calibration library: masters and how they are matched to lights."""

    temperature_tolerance_c: float = _f(2.0, "largest |sensor temperature difference| between a light and its dark")
    exposure_tolerance_frac: float = _f(0.01, "darks (and flat-darks) match when |t_dark/t_light - 1| is within this")
    allow_scaled_darks: bool = _f(True, "use the nearest longer dark scaled by dark optimisation when no exposure match exists (needs a bias)")
    optimize_darks: str = _f("auto", "dark optimisation: auto (only when scaling is needed), always, never")
    flat_max_age_days: float = _f(30.0, "oldest flat accepted when none was taken the same night")
    master_debounce_s: float = _f(20.0, "wait this long after the last new member before re-integrating a master")
    master_debounce_members: int = _f(10, "re-integrate at once when this many new members are waiting")


@dataclass
class CalibrationConfig:
    """Light calibration."""

    cosmetic: bool = _f(True, "replace hot and cold pixels (from the master dark) and isolated outliers")
    hot_sigma: float = _f(5.0, "defect map: a master-dark pixel this many sigma above its channel is hot (below: cold)")
    auto_cosmetic_sigma: float = _f(6.0, "automatic detection: a pixel this many local sigma from its same-colour neighbours is an outlier")
    saturation_frac: float = _f(0.999, "raw values at or above this fraction of full scale are saturated (unless SATURATE is given)")
    debayer: str = _f("bilinear", "debayer method for one-shot-colour frames: bilinear, vng, rcd (sharper, but star fluxes 1-4 % off: not for photometry), superpixel")
    overscan: list[list[int]] = _f([], "overscan correction: [sx0, sy0, sx1, sy1, tx0, ty0, tx1, ty1] per pair, the median of source rectangle s is subtracted from target t (pixels, exclusive ends; empty: none); most CMOS have none")
    overscan_image_rect: list[int] = _f([], "after overscan correction crop to this [x0, y0, x1, y1] rectangle (empty: no crop)")
    overscan_frame_px: list[int] = _f([], "apply the overscan correction only to raw frames of this [width, height] in pixels (empty: every frame containing all the rectangles)")
    dark_optimization_method: str = _f("fast", "dark scale search when optimisation runs: fast (Huber slope on warm pixels) or golden (golden-section search)")


@dataclass
class StarsConfig:
    """Star detection and measurement."""

    detect_sigma: float = _f(5.0, "detection threshold for the star catalogue, in background sigma")
    max_stars: int = _f(2000, "keep at most this many stars per frame, brightest first")
    psf_fit_stars: int = _f(100, "fit the PSF on this many of the brightest clean stars")
    psf_model: str = _f("moffat", "PSF model for FWHM and eccentricity: moffat or gaussian")
    noise_window_px: int = _f(1024, "side of the central window on which the frame noise (multiresolution estimate) is measured")
    refine_background: bool = _f(False, "second sky-background pass with the detected stars masked (slower, better near bright stars)")


@dataclass
class GatesConfig:
    """Quality gates: each entry is a named 'reject if' expression over the frame metrics."""

    enabled: bool = _f(True, "reject frames that fail a gate (false: report only)")
    rules: dict[str, str] = _f(
        dict(DEFAULT_RULES),
        "gate name = reject-if expression (names: metrics; median/min/max over accepted frames of the night)",
    )


@dataclass
class RegistrationConfig:
    """Registration and resampling."""

    model: str = _f("similarity", "transform model: similarity, affine, homography")
    allow_mirror: bool = _f(False, "accept mirrored (det < 0) solutions")
    interpolation: str = _f("lanczos3", "resampling kernel: lanczos3 or bilinear")
    lanczos_clamp: float = _f(0.3, "Lanczos clamping against ringing: 0 disables; the threshold of the pixinsight method")
    lanczos_clamp_method: str = _f("local", "local: never below the lowest of the 4x4 nearest source pixels (keeps star flux); pixinsight: PCL's rule")
    lanczos_relative_clamp: bool = _f(False, "pixinsight method: never clamp below the kernel's own flat-data lobe ratio")
    max_rms_px: float = _f(0.5, "refuse a registration whose star residual RMS exceeds this")
    min_matched_fraction: float = _f(0.1, "refuse a registration matching less than this fraction of the smaller star list")


@dataclass
class NormalizationConfig:
    """Photometric scale and gradient (the NormalizeScaleGradient approach)."""

    method: str = _f("nsg", "nsg (scale from stars + gradient), global (location/scale), local")
    gradient_bin_px: int = _f(32, "size of the sample bins for the gradient surface")
    min_star_pairs: int = _f(10, "fewer matched stars than this falls back to global normalisation")
    reference_candidates: int = _f(8, "the reference is chosen among the first N accepted frames")
    min_star_snr: float = _f(20.0, "stars used for the photometric scale need this SNR in both frame and reference")
    max_scale_err_frac: float = _f(0.02, "a relative scale uncertainty above this falls back to global normalisation")
    max_gradient_samples: int = _f(600, "bins are block-averaged to at most this many samples for the gradient spline")
    star_mask_cap_px: float = _f(40.0, "largest radius masked around a star when sampling the gradient")
    local_cell_px: int = _f(512, "cell size of the location/scale maps when method = local")


@dataclass
class IntegrationConfig:
    """Integration and pixel rejection."""

    combination: str = _f("mean", "mean (weighted) or median")
    rejection: str = _f("auto", "auto (by frame count), none, minmax, percentile, sigma, winsorized, averaged_sigma, linear_fit, esd")
    sigma_low: float = _f(4.0, "low rejection threshold (sigma)")
    sigma_high: float = _f(3.0, "high rejection threshold (sigma)")
    large_scale_rejection: bool = _f(True, "grow high rejections into whole trails")
    band_memory_mb: int = _f(256, "memory for one row band of all frames during batch integration (the service's exact passes run beside the live state: 0.8 GB at 26 MP mono; measured 26 MP, 6 frames: 1024 MB bands peaked at 3.25 GB, 256 MB at 2.5 GB, in the same time)")


@dataclass
class LiveConfig:
    """Running integration during the night."""

    kappa_low: float = _f(4.0, "live rejection threshold below the centre (sigma)")
    kappa_high: float = _f(3.0, "live rejection threshold above the centre (sigma)")
    n_min: int = _f(5, "no live rejection before this many frames")
    k_high: int = _f(2, "largest accepted samples kept per pixel for retroactive rejection (2 = recommended; 2 high/1 low has a fast kernel)")
    k_low: int = _f(1, "smallest accepted samples kept per pixel for retroactive rejection")
    noise_epsilon_frac: float = _f(0.3, "relative scale-noise term of the noise model that floors live and batch rejection (protects star cores when seeing changes; 0.3 keeps a core 1.9x brighter than the others)")
    checkpoint_frames: int = _f(10, "checkpoint the running stack every N frames")
    checkpoint_interval_s: float = _f(600.0, "or every this many seconds")
    exact_pass_frames: int = _f(10, "run an exact re-integration after this many new frames when idle, if it is estimated to take less than half the usual gap between frames (else at the end of the night, service.exact_pass_idle_s)")
    exact_pass_early_frames: int = _f(6, "also run the exact re-integration after each new frame while a stack has at most this many frames (from k_high + k_low + 2 on: with fewer the live image is the batch result itself), if it fits half the usual gap between frames: the batch rule for 3-5 frames (percentile clipping) needs every sample (the live image computes it itself only where a pixel has at most k_high + k_low + 1 samples), and the pass at the 6th frame replaces its decisions by winsorized clipping's; 0 disables")
    exact_pass_max_s: float = _f(1.0, "when idle, run the exact re-integration after every new frame while it is estimated to take less than this many seconds (the live image then equals the batch result); 0 disables")
    exact_pass_gap_fraction: float = _f(0.2, "when idle, also run the exact re-integration after every new frame while it is estimated to take at most this fraction of the usual gap between frames (the live image then equals the batch result after every frame; 0.2 uses at most a fifth of the night's time for it); 0 disables")
    frame_store_budget_gb: float = _f(50.0, "disk budget of the frame store (the normalised frames the exact re-integration reads; 104 MB per 26 MP mono frame); over it the oldest frames of the least recently active stacks are evicted and recomputed from their raw files when an exact pass needs them; <= 0: no limit")


@dataclass
class ServiceConfig:
    """The service and its web view."""

    host: str = _f("127.0.0.1", "address the web view binds to; anything else requires a token")
    port: int = _f(8080, "port of the web view")
    token: str = _f("", "token required by state-changing requests (empty: generated at start and logged)")
    workers: int = _f(2, "threads for CPU work")
    preview_max_px: int = _f(2048, "longest side of the cached stack preview")
    continue_stacks_across_nights: bool = _f(True, "the same target and filter on a later night continues its stack")
    min_free_space_mb: float = _f(500.0, "pause processing while the state folder has less free space than this")
    disk_check_interval_s: float = _f(10.0, "while paused for disk space, check again this often")
    shutdown_timeout_s: float = _f(60.0, "on SIGTERM, wait this long for the frame in flight before exiting")
    exact_pass_idle_s: float = _f(1200.0, "run the exact integration of a stack with new frames after this long without a new frame (end of night)")


@dataclass
class Config:
    """The whole configuration."""

    watch: WatchConfig = field(default_factory=WatchConfig)
    io: IoConfig = field(default_factory=IoConfig)
    library: LibraryConfig = field(default_factory=LibraryConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    stars: StarsConfig = field(default_factory=StarsConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    normalization: NormalizationConfig = field(default_factory=NormalizationConfig)
    integration: IntegrationConfig = field(default_factory=IntegrationConfig)
    live: LiveConfig = field(default_factory=LiveConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")


def defaults_toml() -> str:
    """The full default configuration as documented TOML (what `stackwatch config --defaults` prints)."""
    lines = [
        "# stackwatch configuration. Every key is optional; shown here with its default.",
        "# Units are in the key names (_s seconds, _c degrees Celsius, _px pixels, _mb megabytes).",
    ]
    root = Config()
    for section in dataclasses.fields(root):
        sub = getattr(root, section.name)
        lines += ["", f"# {type(sub).__doc__}", f"[{section.name}]"]
        tables: list[tuple[str, str, dict[str, Any]]] = []
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if isinstance(value, dict):
                tables.append((f.name, f.metadata["help"], value))
                continue
            lines.append(f"# {f.metadata['help']}")
            lines.append(f"{f.name} = {_toml_value(value)}")
        for name, help_text, mapping in tables:
            lines += [f"# {help_text}", f"[{section.name}.{name}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in mapping.items()]
    return "\n".join(lines) + "\n"


def _check_type(where: str, expected: Any, value: Any) -> Any:
    if isinstance(expected, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
    elif isinstance(expected, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    elif isinstance(expected, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
    elif isinstance(expected, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
    elif isinstance(expected, list):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
    elif isinstance(expected, dict):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{where}: expected a table of strings, got {value!r}")
    return value


def config_from_mapping(data: dict[str, Any], *, source: str = "configuration") -> Config:
    """Build a Config from parsed TOML, refusing unknown sections and keys by name."""
    config = Config()
    sections = {f.name for f in dataclasses.fields(config)}
    for section_name, values in data.items():
        if section_name not in sections:
            raise ConfigError(f"{source}: unknown section [{section_name}] (known: {', '.join(sorted(sections))})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section_name}] must be a table")
        sub = getattr(config, section_name)
        known = {f.name: f for f in dataclasses.fields(sub)}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key {section_name}.{key}")
            default = getattr(sub, key)
            value = _check_type(f"{source}: {section_name}.{key}", default, value)
            if isinstance(default, dict):
                # Tables merge over the defaults; an empty string removes a default entry.
                value = {k: v for k, v in {**default, **value}.items() if v != ""}
            setattr(sub, key, value)
    return config


def load_config(path: str | Path | None) -> Config:
    """Read a TOML configuration over the defaults; None gives the defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_mapping(data, source=str(path))
