"""Master calibration frames: keys, matching rules with explanations, and master integration
(algorithms.md §2). Pure: the on-disk library (SQLite index + FITS) is
:mod:`stackwatch.daemon.library_store`.

Keys (:func:`master_key`): every master shares with its members the camera, gain, offset, binning,
geometry and CFA layout; darks and flat-darks also the exposure (to the millisecond) and the sensor
temperature rounded to the nearest multiple of 5 °C (set points; matching then uses the members'
mean temperature and the tolerance); flats the normalised filter name and the night (UTC date
of DATE-OBS - 12 h, i.e. noon to noon for European and American longitudes).

Integration (:func:`integrate_master`) always goes through :func:`stackwatch.engine.integrate.integrate`
over row bands read from the member files (``fitsio.read_rows``): memory is bounded by the band
budget, not by the member count, and re-running it over the same members gives the same master (the
incremental update of the library is a re-integration, design A of §2.3). Bias, dark and flat-dark:
mean, no normalisation, winsorized sigma clipping kappa 3/3 (percentile 0.2/0.1 below 6 frames, none
for 1-2). Flats: each member minus its calibration array (master flat-dark, else bias), multiplied by
m0/m_i per CFA channel (m = median; output normalisation = rejection normalisation = equalize fluxes,
so stars on sky flats are high outliers), then the same combination. Darks are never pre-calibrated.

Matching (:func:`match`) returns a :class:`MasterSet` whose explanations read like
``dark: 300 s, -10.0 °C (light -9.6 °C, Δ0.4 ≤ 2.0), 40 frames, k=1`` and
``flat: none for filter Ha within 30 days``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from astropy.io import fits
from stackwatch.engine import fitsio
from stackwatch.engine.calibrate import FlatScale, Overscan, flat_scale
from stackwatch.engine.cfa import channel_map
from stackwatch.engine.classify import FrameInfo
from stackwatch.engine.errors import FrameError, StackwatchError

__all__ = [
    "MASTER_KINDS",
    "MasterKey",
    "MasterRecord",
    "MasterResult",
    "MasterSet",
    "MatchRules",
    "flat_level_problem",
    "integrate_master",
    "master_header",
    "master_key",
    "master_rejection",
    "match",
    "night_of",
    "readout_mode_key",
]

MASTER_KINDS = ("bias", "dark", "darkflat", "flat")
_IMAGETYP = {"bias": "Master Bias", "dark": "Master Dark", "darkflat": "Master Flat Dark", "flat": "Master Flat"}


# --------------------------------------------------------------------------------------------------
# Keys


def _parse_iso(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def night_of(date_obs: str | None) -> str:
    """The observing night of a UTC ISO date: the date of DATE-OBS - 12 h ("" if unknown)."""
    dt = _parse_iso(date_obs)
    return (dt - timedelta(hours=12)).date().isoformat() if dt else ""


def _temp_bucket(t: float | None) -> float | None:
    """Nearest multiple of 5 °C: cooler set points are usually multiples of 5, and readings jitter
    around them (a 1 °C bucket would split -9.5 and -10.4 readings of one set point)."""
    return None if t is None else float(5.0 * math.floor(t / 5.0 + 0.5))


@dataclass(frozen=True)
class MasterKey:
    """What every member of one master shares. ``exposure_s`` and ``temperature_c`` (5 °C bucket) are
    None for kinds that do not key on them; ``filter`` and ``night`` are "" except for flats."""

    kind: str
    camera: str
    gain: float | None
    offset: float | None
    binning: tuple[int, int]
    shape: tuple[int, ...]
    bayer: str | None
    exposure_s: float | None = None
    temperature_c: float | None = None
    filter: str = ""
    night: str = ""
    rotator_deg: float | None = None  # flats with ROTATANG: the angle to the nearest degree
    readout_mode: str = ""  # READOUTM as :func:`readout_mode_key` gives it; "" when the header has none

    @property
    def sensor(self) -> tuple[Any, ...]:
        return (self.camera, self.gain, self.offset, self.binning, self.shape, self.bayer)

    @property
    def id(self) -> str:
        """A stable, readable identifier, e.g. ``dark_300s_g100_o50_-10C_6248x4176_RGGB_1a2b3c4d``."""
        parts = [self.kind]
        if self.exposure_s is not None:
            parts.append(f"{self.exposure_s:g}s")
        if self.filter:
            parts.append(self.filter)
        if self.night:
            parts.append(self.night)
        if self.rotator_deg is not None:
            parts.append(f"rot{self.rotator_deg:g}")
        if self.gain is not None:
            parts.append(f"g{self.gain:g}")
        if self.offset is not None:
            parts.append(f"o{self.offset:g}")
        if self.temperature_c is not None:
            parts.append(f"{self.temperature_c:g}C")
        parts.append("x".join(str(v) for v in self.shape[::-1]))
        if self.binning != (1, 1):
            parts.append(f"bin{self.binning[0]}x{self.binning[1]}")
        if self.bayer:
            parts.append(self.bayer)
        if self.readout_mode:
            parts.append(self.readout_mode.replace(" ", "-"))
        digest = hashlib.sha1(repr(self.as_dict()).encode()).hexdigest()[:8]
        safe = "".join(ch if ch.isalnum() or ch in "-._" else "-" for ch in "_".join(parts))
        return f"{safe}_{digest}"

    def as_dict(self) -> dict[str, Any]:
        # rotator_deg and readout_mode only when present: the ids (digests) of masters without them
        # stay what they were, so libraries written before either existed keep their masters
        extra: dict[str, Any] = {} if self.rotator_deg is None else {"rotator_deg": self.rotator_deg}
        if self.readout_mode:
            extra["readout_mode"] = self.readout_mode
        return {
            **extra,
            "kind": self.kind,
            "camera": self.camera,
            "gain": self.gain,
            "offset": self.offset,
            "binning": list(self.binning),
            "shape": list(self.shape),
            "bayer": self.bayer,
            "exposure_s": self.exposure_s,
            "temperature_c": self.temperature_c,
            "filter": self.filter,
            "night": self.night,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MasterKey:
        return cls(
            kind=str(d["kind"]),
            camera=str(d["camera"]),
            gain=None if d.get("gain") is None else float(d["gain"]),
            offset=None if d.get("offset") is None else float(d["offset"]),
            binning=(int(d["binning"][0]), int(d["binning"][1])),
            shape=tuple(int(v) for v in d["shape"]),
            bayer=d.get("bayer") or None,
            exposure_s=None if d.get("exposure_s") is None else float(d["exposure_s"]),
            temperature_c=None if d.get("temperature_c") is None else float(d["temperature_c"]),
            filter=str(d.get("filter") or ""),
            night=str(d.get("night") or ""),
            rotator_deg=None if d.get("rotator_deg") is None else float(d["rotator_deg"]),
            readout_mode=readout_mode_key(str(d.get("readout_mode") or "")),
        )


def readout_mode_key(mode: str) -> str:
    """A readout mode as masters are keyed and matched on it: case-folded, whitespace collapsed
    ('PhotoGraphic DSO ' and 'photographic dso' are one mode); "" for none."""
    return " ".join(mode.split()).casefold()


def master_key(info: FrameInfo) -> MasterKey | None:
    """The key of the master a calibration frame belongs to; None for lights and unknown frames.
    :class:`FrameError` naming the file for a dark or flat-dark without exposure time and for a
    3-plane (debayered) calibration frame."""
    if info.kind not in MASTER_KINDS:
        return None
    if len(info.shape) != 2:
        # calibration subtracts and divides raw sensor values pixel by pixel: a debayered frame has
        # interpolated values and 3 planes, and the lights it would calibrate are raw CFA frames
        raise FrameError(
            info.path,
            f"{info.kind} frame with {info.shape[0]} colour planes (debayered by the capture program): "
            "calibration frames must be raw (mono or CFA); save them un-debayered",
        )
    exposure = None
    temperature = None
    filt = ""
    night = ""
    if info.kind in ("dark", "darkflat"):
        if info.exposure_s is None:
            raise FrameError(info.path, f"{info.kind} without exposure time (EXPTIME/EXPOSURE)")
        exposure = round(float(info.exposure_s), 3)
        temperature = _temp_bucket(info.temperature_c)
    rotator = None
    if info.kind == "flat":
        filt = info.filter
        night = night_of(info.date_obs)
        if info.rotator_deg is not None:
            # dust shadows turn with the camera: flats at another angle are another master
            rotator = float(round(info.rotator_deg) % 360)
    return MasterKey(
        kind=info.kind,
        camera=info.camera,
        gain=info.gain,
        offset=info.offset,
        binning=tuple(info.binning),  # type: ignore[arg-type]
        shape=tuple(info.shape),
        bayer=info.bayer,
        exposure_s=exposure,
        temperature_c=temperature,
        filter=filt,
        night=night,
        rotator_deg=rotator,
        readout_mode=readout_mode_key(info.readout_mode),
    )


@dataclass(frozen=True)
class MasterRecord:
    """A master in the library: its key, file and provenance (what matching and reports need)."""

    key: MasterKey
    path: str
    ncombine: int
    exposure_s: float | None = None
    temperature_c: float | None = None  # mean of the members
    date_first: str | None = None
    date_last: str | None = None
    created: str | None = None
    rejection: str = ""
    median: float | None = None
    noise: float | None = None
    members: tuple[str, ...] = field(default=(), repr=False)
    warnings: tuple[str, ...] = ()
    overscan: str = ""  # how the members were overscan-corrected (Overscan.describe()), "" if not

    @property
    def kind(self) -> str:
        return self.key.kind

    def age_days(self, when: str | datetime | None = None) -> float | None:
        """Days between the newest member and ``when`` (a light's DATE-OBS; default now)."""
        last = _parse_iso(self.date_last)
        if last is None:
            return None
        ref = _parse_iso(when) if isinstance(when, str) else (when or datetime.now(UTC))
        if ref is None:
            return None
        return (ref - last).total_seconds() / 86400.0

    def describe(self) -> str:
        """e.g. ``dark 300 s -10.0 °C 40 frames``."""
        bits = [self.kind]
        if self.exposure_s is not None and self.kind != "bias":
            bits.append(f"{self.exposure_s:g} s")
        if self.key.filter:
            bits.append(f"filter {self.key.filter}")
        if self.temperature_c is not None:
            bits.append(f"{self.temperature_c:.1f} °C")
        bits.append(f"{self.ncombine} frames")
        return " ".join(bits)


# --------------------------------------------------------------------------------------------------
# Matching


@dataclass(frozen=True)
class MatchRules:
    """§2.4 tolerances (the daemon fills them from [library] in the configuration)."""

    temperature_tolerance_c: float = 2.0
    exposure_tolerance_frac: float = 0.01
    allow_scaled_darks: bool = True
    optimize_darks: str = "auto"  # auto (when scaling), always, never
    flat_max_age_days: float = 30.0


@dataclass(frozen=True)
class MasterSet:
    """The masters chosen for one frame and why. ``dark_scale`` is the nominal k (t_frame / t_dark,
    1 for an exposure-matched dark); ``optimize_dark`` whether §3.2 should refine it."""

    bias: MasterRecord | None = None
    dark: MasterRecord | None = None
    flat: MasterRecord | None = None
    darkflat: MasterRecord | None = None
    dark_scale: float = 1.0
    optimize_dark: bool = False
    explanations: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    # steps another program already applied to the light (FrameInfo.calibrated): never applied again;
    # with "bias" here, ``bias`` (if any) only takes the bias out of ``dark``
    already_applied: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        def rec(r: MasterRecord | None) -> dict[str, Any] | None:
            return None if r is None else {"id": r.key.id, "path": r.path, "ncombine": r.ncombine}

        return {
            "bias": rec(self.bias),
            "dark": rec(self.dark),
            "flat": rec(self.flat),
            "darkflat": rec(self.darkflat),
            "dark_scale": self.dark_scale,
            "optimize_dark": self.optimize_dark,
            "explanations": list(self.explanations),
            "missing": list(self.missing),
            "already_applied": list(self.already_applied),
        }


def _sensor(info: FrameInfo) -> tuple[Any, ...]:
    return (info.camera, info.gain, info.offset, tuple(info.binning), tuple(info.shape), info.bayer)


def _tie(r: MasterRecord) -> tuple[int, str]:
    return (r.ncombine, r.date_last or "")


def _temp_text(r: MasterRecord, t_frame: float | None, tol: float) -> str:
    if r.temperature_c is None and t_frame is None:
        return "temperature unknown"
    if r.temperature_c is None:
        return f"master temperature unknown (frame {t_frame:.1f} °C)"
    if t_frame is None:
        return f"{r.temperature_c:.1f} °C (frame temperature unknown)"
    d = abs(r.temperature_c - t_frame)
    return f"{r.temperature_c:.1f} °C (frame {t_frame:.1f} °C, Δ{d:.1f} ≤ {tol:g})"


def _temp_ok(r: MasterRecord, t: float | None, tol: float) -> bool:
    return r.temperature_c is None or t is None or abs(r.temperature_c - t) <= tol


def _temp_dist(r: MasterRecord, t: float | None) -> float:
    return 0.0 if r.temperature_c is None or t is None else abs(r.temperature_c - t)


def _best(cands: list[MasterRecord], t: float | None) -> MasterRecord:
    """Closest temperature, then more members, then newer."""
    return sorted(cands, key=lambda r: (_temp_dist(r, t), -r.ncombine, _neg_date(r.date_last)))[0]


def _neg_date(text: str | None) -> float:
    dt = _parse_iso(text)
    return -dt.timestamp() if dt else 0.0


def match(
    info: FrameInfo,
    masters: Sequence[MasterRecord],
    *,
    rules: MatchRules = MatchRules(),
) -> MasterSet:
    """Choose the masters for a light (bias, dark, flat) or a flat (flat-dark, else bias, else scaled
    dark), following §2.4; every choice and every absence is explained.

    Parameters
    ----------
    info : FrameInfo
        The frame to calibrate.
    masters : sequence of MasterRecord
        Everything in the library.
    rules : MatchRules, optional
        Tolerances. Default is ``MatchRules()`` (2 °C, 1 %, scaled darks allowed, auto, 30 days).
    """
    sensor = _sensor(info)
    mode = readout_mode_key(info.readout_mode)
    same, other_modes = _same_readout_mode([m for m in masters if m.key.sensor == sensor], mode)
    t = info.temperature_c
    tol = rules.temperature_tolerance_c
    notes: list[str] = []
    missing: list[str] = []

    biases = [m for m in same if m.kind == "bias"]
    bias = _best(biases, t) if biases else None
    if bias is not None:
        notes.append(f"bias: {bias.ncombine} frames, {_temp_text(bias, t, tol)}".replace(f" ≤ {tol:g}", ""))

    t_frame = info.exposure_s
    if info.kind == "flat":
        out = _match_flat_calibration(info, same, bias, rules, notes)
        return dataclasses.replace(out, explanations=out.explanations + _mode_notes(out, mode, other_modes))

    # dark
    darks = [m for m in same if m.kind == "dark" and m.exposure_s is not None]
    dark: MasterRecord | None = None
    k = 1.0
    optimize = False
    warm = [m for m in darks if _temp_ok(m, t, tol)]
    if t_frame is None or t_frame <= 0:
        missing.append("dark")
        notes.append("dark: none (the frame has no exposure time)")
    else:
        exact = [m for m in warm if abs(float(m.exposure_s) / t_frame - 1.0) <= rules.exposure_tolerance_frac]  # type: ignore[arg-type]
        if exact:
            dark = _best(exact, t)
            k = 1.0
            optimize = rules.optimize_darks == "always" and bias is not None
            notes.append(
                f"dark: {dark.exposure_s:g} s, {_temp_text(dark, t, tol)}, {dark.ncombine} frames, k=1"
                + (" (optimised)" if optimize else "")
            )
        elif warm and rules.allow_scaled_darks and bias is not None:
            longer = [m for m in warm if float(m.exposure_s) > t_frame]  # type: ignore[arg-type]
            shorter = [m for m in warm if float(m.exposure_s) < t_frame]  # type: ignore[arg-type]
            if longer:
                e = min(float(m.exposure_s) for m in longer)  # type: ignore[arg-type]
                dark = _best([m for m in longer if m.exposure_s == e], t)
                warn = ""
            else:
                e = max(float(m.exposure_s) for m in shorter)  # type: ignore[arg-type]
                dark = _best([m for m in shorter if m.exposure_s == e], t)
                warn = "; warning: shorter dark scaled up"
            k = t_frame / float(dark.exposure_s)  # type: ignore[arg-type]
            optimize = rules.optimize_darks in ("auto", "always")
            notes.append(
                f"dark: {dark.exposure_s:g} s for {t_frame:g} s, {_temp_text(dark, t, tol)}, {dark.ncombine} frames, "
                f"scaled k={k:.3g}{' (to be optimised)' if optimize else ''}{warn}"
            )
        else:
            missing.append("dark")
            if not darks:
                notes.append("dark: none for this camera, gain, offset, binning and geometry")
            elif not warm:
                temps = sorted({m.temperature_c for m in darks if m.temperature_c is not None})
                notes.append(
                    f"dark: none within {tol:g} °C of {t:.1f} °C (library has "
                    + ", ".join(f"{v:.1f}" for v in temps)
                    + " °C)"
                )
            elif bias is None:
                exps = sorted({float(m.exposure_s) for m in warm})  # type: ignore[arg-type]
                notes.append(
                    f"dark: none for {t_frame:g} s and no bias to scale the "
                    + ", ".join(f"{v:g}" for v in exps)
                    + " s dark"
                )
            else:
                notes.append(f"dark: none for {t_frame:g} s (scaled darks are disabled)")
    if bias is None and (dark is None or abs(k - 1.0) > 1e-12):
        missing.append("bias")
        notes.append("bias: none")

    # flat
    flat = _match_flat(info, same, rules, notes, missing)
    if info.kind == "light" and info.calibrated:
        return _skip_applied(info, bias, dark, flat, k, optimize, notes, missing, mode, other_modes)
    out = MasterSet(
        bias=bias,
        dark=dark,
        flat=flat,
        dark_scale=k if dark is not None else 0.0,
        optimize_dark=optimize,
        explanations=tuple(notes),
        missing=tuple(missing),
    )
    return dataclasses.replace(out, explanations=out.explanations + _mode_notes(out, mode, other_modes))


def _skip_applied(
    info: FrameInfo,
    bias: MasterRecord | None,
    dark: MasterRecord | None,
    flat: MasterRecord | None,
    k: float,
    optimize: bool,
    notes: list[str],
    missing: list[str],
    mode: str,
    other_modes: dict[str, set[str]],
) -> MasterSet:
    """A light another program already calibrated in part (``info.calibrated``): the steps it applied
    are never applied again and are not missing; the others are applied when their masters exist.

    - dark applied (bias implied: a raw dark contains it): only the flat is left;
    - bias applied, dark not: the light is L - B, so the dark must lose its bias too, C = L' - k(D - B):
      that needs the master bias even for an exposure-matched dark; without one the dark is missing;
    - flat applied before bias or dark (CALSTAT 'F', 'BF'): subtracting after a flat division is not the
      same as before it ((L - B)/F != L/F - B), and the division cannot be undone: nothing more is
      applied.
    """
    done = set(info.calibrated)
    by = f" by another program ({info.calibrated_by})" if info.calibrated_by else " by another program"
    kept = [n for n in notes if not n.startswith(("bias: ", "dark: ", "flat: "))]
    explained = {kind: [n for n in notes if n.startswith(f"{kind}: ")] for kind in ("bias", "dark", "flat")}
    missing = [m for m in missing if m not in done]
    out_notes: list[str] = []
    if "flat" in done and not {"bias", "dark"} <= done:
        left = [s for s in ("bias", "dark") if s not in done]
        text = (f"not applied: the flat was divided{by} before {' and '.join(left)} subtraction, which cannot be"
                " done after it")
        out_notes += [f"{s}: already applied{by}" if s in done else f"{s}: {text}" for s in ("bias", "dark", "flat")]
        return MasterSet(explanations=tuple(kept + out_notes), missing=tuple(m for m in missing if m not in ("bias", "dark")),
                         already_applied=tuple(info.calibrated))
    use_bias: MasterRecord | None = None
    use_dark: MasterRecord | None = None
    if "dark" in done:
        out_notes += [f"bias: already applied{by}", f"dark: already applied{by}"]
        missing = [m for m in missing if m not in ("bias", "dark")]
    elif "bias" in done:
        out_notes.append(f"bias: already applied{by}")
        missing = [m for m in missing if m != "bias"]
        if dark is not None and bias is not None:
            use_bias, use_dark = bias, dark
            out_notes += explained["dark"]
            out_notes.append(f"bias: master used only to take the bias out of the dark ({bias.ncombine} frames)")
        elif dark is not None:
            missing.append("dark")
            out_notes.append(f"dark: {dark.describe()} not applied: the light is bias-subtracted and there is no "
                             "master bias to take the bias out of the dark")
        else:
            out_notes += explained["dark"]
    else:  # neither bias nor dark applied (a flat alone returned above): both as matched
        use_bias, use_dark = bias, dark
        out_notes += explained["bias"] + explained["dark"]
    use_flat = None if "flat" in done else flat
    out_notes += [f"flat: already applied{by}"] if "flat" in done else explained["flat"]
    out = MasterSet(
        bias=use_bias,
        dark=use_dark,
        flat=use_flat,
        dark_scale=k if use_dark is not None else 0.0,
        optimize_dark=optimize and use_dark is not None,
        explanations=tuple(kept + out_notes),
        missing=tuple(dict.fromkeys(missing)),
        already_applied=tuple(info.calibrated),
    )
    return dataclasses.replace(out, explanations=out.explanations + _mode_notes(out, mode, other_modes))


def _same_readout_mode(
    masters: list[MasterRecord], mode: str
) -> tuple[list[MasterRecord], dict[str, set[str]]]:
    """The masters a frame of readout mode ``mode`` may use, and per kind the other modes left out.

    Two known modes that differ never match: another mode changes read noise, bias level, amp glow
    and often the gain (QHY's 'High Gain Mode' and 'PhotoGraphic DSO' are different sensors for
    calibration). A master or frame whose header says no mode is taken only when no master of the
    frame's own mode exists for that kind, with a note: mixed known/unknown modes come from
    calibration frames shot with a program that does not write READOUTM (or from masters keyed
    before stackwatch keyed on the mode), and for the cameras that have a single mode refusing them
    would leave the light uncalibrated.
    """
    kept: list[MasterRecord] = []
    other: dict[str, set[str]] = {}
    for kind in MASTER_KINDS:
        of_kind = [m for m in masters if m.kind == kind]
        exact = [m for m in of_kind if m.key.readout_mode == mode]
        loose = [m for m in of_kind if (m.key.readout_mode == "") != (mode == "")]
        kept.extend(exact or loose)
        others = {m.key.readout_mode for m in of_kind if m.key.readout_mode and mode and m.key.readout_mode != mode}
        if others:
            other[kind] = others
    return kept, other


def _mode_notes(ms: MasterSet, mode: str, other_modes: dict[str, set[str]]) -> tuple[str, ...]:
    notes = []
    for kind, rec in (("bias", ms.bias), ("flat-dark", ms.darkflat), ("dark", ms.dark), ("flat", ms.flat)):
        if rec is None or rec.key.readout_mode == mode:
            continue
        if mode:
            notes.append(f"{kind}: warning: master readout mode unknown, frame '{mode}'")
        else:
            notes.append(f"{kind}: warning: frame readout mode unknown, master '{rec.key.readout_mode}'")
    for kind in MASTER_KINDS:
        if kind in other_modes and kind in ms.missing:
            label = "flat-dark" if kind == "darkflat" else kind
            modes = ", ".join(f"'{m}'" for m in sorted(other_modes[kind]))
            notes.append(f"{label}: masters of readout mode {modes} not used for a '{mode}' frame")
    return tuple(notes)


def _match_flat(
    info: FrameInfo, same: list[MasterRecord], rules: MatchRules, notes: list[str], missing: list[str]
) -> MasterRecord | None:
    filt = info.filter
    label = f"filter {filt}" if filt else "no filter"
    flats = [m for m in same if m.kind == "flat" and m.key.filter == filt]
    # §2.4: same ROTATANG within 1° when both say; a flat at another angle only when there is no
    # other, with a warning (dust shadows and vignetting turn with the camera)
    rot = info.rotator_deg
    turned = [m for m in flats if rot is not None and m.key.rotator_deg is not None and _angle(rot, m.key.rotator_deg) > 1.0]
    if turned and len(turned) < len(flats):
        flats = [m for m in flats if m not in turned]
    chosen = _match_flat_by_date(info, flats, rules, notes, missing, label)
    if chosen is not None and chosen in turned:
        notes[-1] += (
            f"; warning: flat rotator angle {chosen.key.rotator_deg:g}° vs light {rot:.1f}° (dust shadows will not match)"
        )
    return chosen


def _angle(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def _match_flat_by_date(
    info: FrameInfo, flats: list[MasterRecord], rules: MatchRules, notes: list[str], missing: list[str], label: str
) -> MasterRecord | None:
    night = night_of(info.date_obs)
    tonight = [m for m in flats if night and m.key.night == night]
    if tonight:
        flat = sorted(tonight, key=lambda r: (-r.ncombine, _neg_date(r.date_last)))[0]
        notes.append(f"flat: {label}, same night {night}, {flat.ncombine} frames")
        return flat
    aged = []
    for m in flats:
        age = m.age_days(info.date_obs) if info.date_obs else None
        aged.append((abs(age) if age is not None else math.inf, m))
    ok = [(a, m) for a, m in aged if a <= rules.flat_max_age_days]
    if ok:
        a, flat = sorted(ok, key=lambda p: (p[0], -p[1].ncombine))[0]
        notes.append(f"flat: {label}, {a:.1f} days from the frame, {flat.ncombine} frames")
        return flat
    missing.append("flat")
    if aged and any(math.isfinite(a) for a, _ in aged):
        newest = min(a for a, _ in aged)
        notes.append(f"flat: none for {label} within {rules.flat_max_age_days:g} days (nearest {newest:.0f} days)")
    else:
        notes.append(f"flat: none for {label} within {rules.flat_max_age_days:g} days")
    return None


def _match_flat_calibration(
    info: FrameInfo, same: list[MasterRecord], bias: MasterRecord | None, rules: MatchRules, notes: list[str]
) -> MasterSet:
    """Flats: flat-dark matched to the flat exposure (1 %) and temperature, else bias, else a dark
    scaled with the bias; nothing -> missing."""
    t = info.temperature_c
    tol = rules.temperature_tolerance_c
    e = info.exposure_s
    fds = [
        m
        for m in same
        if m.kind == "darkflat"
        and e
        and m.exposure_s is not None
        and abs(m.exposure_s / e - 1.0) <= rules.exposure_tolerance_frac
        and _temp_ok(m, t, tol)
    ]
    if fds:
        fd = _best(fds, t)
        notes.append(f"flat-dark: {fd.exposure_s:g} s, {_temp_text(fd, t, tol)}, {fd.ncombine} frames")
        return MasterSet(bias=bias, darkflat=fd, explanations=tuple(notes))
    if bias is not None:
        notes.append(f"flat-dark: none for {e:g} s, bias used" if e else "flat-dark: none, bias used")
        return MasterSet(bias=bias, explanations=tuple(notes), missing=("darkflat",))
    darks = [m for m in same if m.kind == "dark" and e and m.exposure_s is not None and _temp_ok(m, t, tol)]
    exact = [m for m in darks if abs(float(m.exposure_s) / float(e) - 1.0) <= rules.exposure_tolerance_frac]  # type: ignore[arg-type]
    if exact:
        d = _best(exact, t)
        notes.append(f"flat-dark: none, bias: none; dark {d.exposure_s:g} s used, k=1")
        return MasterSet(dark=d, dark_scale=1.0, explanations=tuple(notes), missing=("darkflat", "bias"))
    notes.append(f"flat-dark: none for {e:g} s and no bias" if e else "flat-dark: none and no bias")
    return MasterSet(explanations=tuple(notes), missing=("darkflat", "bias"))


# --------------------------------------------------------------------------------------------------
# Integration


def master_rejection(n: int) -> tuple[str, dict[str, float]]:
    """§2.1: winsorized kappa 3/3 (cutoff 5) from 6 frames, percentile 0.2/0.1 for 3-5, none for 1-2."""
    if n <= 2:
        return "none", {}
    if n < 6:
        return "percentile", {"p_low": 0.2, "p_high": 0.1}
    return "winsorized", {"kappa_low": 3.0, "kappa_high": 3.0, "cutoff": 5.0}


def _overscan_levels(path: str, overscan: Overscan) -> np.ndarray:
    """Median of each overscan source of a member, reading only the rows the sources span."""
    ys = [r[0][1] for r in overscan.regions] + [r[0][3] for r in overscan.regions]
    y0, y1 = min(ys), max(ys)
    rows = fitsio.read_rows(path, y0, y1)
    shifted = Overscan(tuple(((sx0, sy0 - y0, sx1, sy1 - y0), t) for (sx0, sy0, sx1, sy1), t in overscan.regions))
    return shifted.levels(rows)


_BITPIX_DTYPE = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


class _OpenMember:
    """One member file held open for the whole integration: rows exactly as
    :func:`stackwatch.engine.fitsio.read_rows` gives them, without re-opening the file and re-parsing
    its header for every band. The steps are read_rows' own, with fitsio's helpers (fitsio has no
    public row reader that stays open).

    Uncompressed files are read with ``os.pread`` at the data offset, not through a memory map: a
    map kept open for the whole integration would hold every page read so far resident in this
    process (50 x 26 MP members: 2.6 GB of RSS); pread leaves them to the page cache, as re-opening
    did. Tile-compressed files keep their HDU open and decompress only the tiles of the band."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        hdul = fitsio._open(path)
        try:
            index = fitsio._find_image_hdu(path, hdul)
            hdu = hdul[index]
            self._shape = fitsio._validate_shape(path, hdu.header, float("inf"))
            fitsio._check_truncated(path, hdul, index, self._shape)
            self._flip = fitsio._bottom_up(hdu.header)
            self._scaling = fitsio._scaling(hdu.header, hdu.data.reshape(self._shape))
            compressed = isinstance(hdu, fits.CompImageHDU) and fitsio._header_int(hdu.header, "NAXIS") == len(
                self._shape
            )
            dtype = _BITPIX_DTYPE.get(fitsio._header_int(hdu.header, "BITPIX"))
            if compressed or dtype is None:
                self._hdul: fits.HDUList | None = hdul
                self._hdu = hdu
            else:
                self._dtype = np.dtype(dtype)
                self._offset = int(hdul.fileinfo(index)["datLoc"])
                self._fd = os.open(path, os.O_RDONLY)
                self._hdul = None
                hdul.close()
        except BaseException:
            hdul.close()
            raise

    def _pread(self, y0: int, y1: int) -> np.ndarray:
        w = self._shape[-1]
        row = w * self._dtype.itemsize
        plane = self._shape[-2] * row
        planes = []
        for c in range(int(np.prod(self._shape[:-2], dtype=np.int64))):
            want = (y1 - y0) * row
            start = self._offset + c * plane + y0 * row
            buf = os.pread(self._fd, want, start)
            while len(buf) < want:  # short reads are legal; rare for regular files
                chunk = os.pread(self._fd, want - len(buf), start + len(buf))
                if not chunk:
                    raise FrameError(self.path, "file truncated while reading")
                buf += chunk
            planes.append(np.frombuffer(buf, dtype=self._dtype).reshape(y1 - y0, w))
        return planes[0] if len(self._shape) == 2 else np.stack(planes).reshape((*self._shape[:-2], y1 - y0, w))

    def rows(self, y0: int, y1: int) -> np.ndarray:
        height = self._shape[-2]
        if not (0 <= y0 <= y1 <= height):
            raise FrameError(self.path, f"rows [{y0}, {y1}) outside the image height {height}")
        fy0, fy1 = (height - y1, height - y0) if self._flip else (y0, y1)
        try:
            if self._hdul is None:
                band = self._pread(fy0, fy1)
            else:
                lead = (slice(None),) * (len(self._shape) - 2)
                band = np.asarray(self._hdu.section[(*lead, slice(fy0, fy1), slice(None))])
                band = band.reshape((*self._shape[:-2], fy1 - fy0, self._shape[-1]))
            return fitsio._convert(np.ascontiguousarray(band), self._scaling, self._flip)
        except (OSError, ValueError, EOFError, TypeError, MemoryError) as exc:
            raise FrameError(self.path, fitsio._data_problem(self.path, exc)) from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._hdul is not None:
            self._hdul.close()
            self._hdul = None


class _MemberFiles:
    """The member files of one integration, kept open up to ``capacity`` (file descriptors are
    finite; members beyond it are opened per band as before). Not an LRU: the integrator reads every
    member in the same order for each band, which would make an LRU smaller than the member count
    miss every time. Close at the end (:meth:`close`)."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = int(capacity)
        self._open: dict[str, _OpenMember] = {}

    def rows(self, path: str, y0: int, y1: int) -> np.ndarray:
        member = self._open.get(path)
        if member is None:
            if len(self._open) >= self.capacity or path.lower().endswith((".gz", ".xisf")):
                return fitsio.read_rows(path, y0, y1)
            member = _OpenMember(path)
            self._open[path] = member
        return member.rows(y0, y1)

    def close(self) -> None:
        for member in self._open.values():
            member.close()
        self._open.clear()


class _FileSource:
    """BandSource over a FITS member: rows via fitsio.read_rows, overscan-corrected and cropped when
    ``overscan`` is given (``shape`` is then the cropped shape), minus ``subtract`` rows, times the
    per-CFA-position factor ``q`` (2x2). Values are float32 like fitsio's."""

    def __init__(
        self,
        path: str,
        shape: tuple[int, ...],
        subtract: np.ndarray | None = None,
        q: np.ndarray | None = None,
        overscan: Overscan | None = None,
        levels: np.ndarray | None = None,
        files: _MemberFiles | None = None,
    ) -> None:
        self.path = path
        self._files = files
        self.shape = shape
        self._sub = subtract
        self._q = None if q is None else np.asarray(q, dtype=np.float32)
        self._ov = overscan
        self._levels = levels if overscan is None or levels is not None else _overscan_levels(path, overscan)

    def _read(self, y0: int, y1: int) -> np.ndarray:
        return fitsio.read_rows(self.path, y0, y1) if self._files is None else self._files.rows(self.path, y0, y1)

    def _rows(self, y0: int, y1: int) -> np.ndarray:
        if self._ov is None:
            rows = self._read(y0, y1)
        else:
            oy = self._ov.origin[1]
            raw = self._read(y0 + oy, y1 + oy)
            rows = self._ov.correct_rows(raw, y0 + oy, self._levels)  # type: ignore[arg-type]
        if rows.shape[-2:] != (y1 - y0, self.shape[-1]):
            raise StackwatchError(f"{self.path}: {rows.shape[-1]} columns, the master expects {self.shape[-1]}")
        return rows

    def read_band(self, y0: int, y1: int) -> np.ndarray:
        rows = self._rows(y0, y1)
        if self._sub is not None:
            rows = rows - self._sub[..., y0:y1, :]
        if self._q is not None:
            w = rows.shape[-1]
            qrow = np.empty((2, w), dtype=np.float32)
            qrow[:, 0::2] = self._q[:, 0:1]
            qrow[:, 1::2] = self._q[:, 1:2]
            par = y0 % 2
            fac = np.empty((y1 - y0, w), dtype=np.float32)
            fac[0::2] = qrow[par]
            fac[1::2] = qrow[1 - par]
            rows = rows * fac
        return np.ascontiguousarray(rows, dtype=np.float32)


@dataclass(frozen=True, eq=False)
class MasterResult:
    """An integrated master: image float32 and what the header and index need."""

    kind: str
    image: np.ndarray
    ncombine: int
    members: tuple[str, ...]
    rejection: str
    params: dict[str, float]
    rej_low_frac: float
    rej_high_frac: float
    flat_scale: FlatScale | None
    member_levels: tuple[tuple[float, ...], ...]
    warnings: tuple[str, ...]
    overscan: str = ""  # Overscan.describe() when the members were overscan-corrected, else ""


def _levels(data: np.ndarray, bayer: str | None) -> tuple[float, ...]:
    """Median per CFA position (RGGB order of data[0:2, 0:2] positions) or one value (mono), on a
    subsample of every other 2x2 tile row (exact enough for a normalisation factor)."""
    if bayer is None:
        sub = data[::2, ::2]
        v = sub[np.isfinite(sub)]
        return (float(np.median(v)) if v.size else float("nan"),)
    out = []
    for dy in range(2):
        for dx in range(2):
            sub = data[dy::4, dx::2]
            v = sub[np.isfinite(sub)]
            out.append(float(np.median(v)) if v.size else float("nan"))
    return tuple(out)


def flat_level_problem(raw: np.ndarray, *, saturation: float, bayer: str | None) -> str | None:
    """§2.2 level checks on a raw flat: a reason to refuse it, or None. > 0.1 % pixels saturated,
    median > 0.8 of full scale (non-linear) or < 0.05 (too dark), in any channel.

    Full scale is the apparent bit depth: 12- and 14-bit cameras that write unshifted ADU into
    16-bit files (data never above 4095 or 16383) are judged against 4095 or 16383, not 65535 —
    otherwise every flat of such a camera would look too dark. ``saturation`` (from the file) is
    lowered to 0.999 of that depth in the same case.
    """
    finite = raw[np.isfinite(raw)]
    if finite.size == 0:
        return "no finite pixel"
    top = float(finite.max())
    full = 1.0
    for depth in (4095.0, 16383.0):
        if top <= depth / 65535.0 + 1e-9:
            full = depth / 65535.0
            break
    sat_level = min(saturation, 0.999 * full) if full < 1.0 else saturation
    sat_frac = float(np.count_nonzero(finite >= sat_level)) / finite.size
    if sat_frac > 1e-3:
        return f"{sat_frac * 100:.2f} % of the pixels saturated"
    for level in _levels(raw, bayer):
        if level > 0.8 * full:
            return f"median {level / full:.2f} of full scale (> 0.8: non-linear)"
        if level < 0.05 * full:
            return f"median {level / full:.3f} of full scale (< 0.05: too dark)"
    return None


_Kept = tuple[str, np.ndarray | None, tuple[float, ...], np.ndarray | None]  # path, subtract, levels, overscan
_PANEL_DEVIATION = 0.30  # §2.2: a flat whose level is > 30 % off the group median is refused


def _drop_level_outliers(kept: list[_Kept], warnings: list[str]) -> list[_Kept]:
    """§2.2 group check: flats whose calibrated level (mean of the channel medians) deviates more
    than 30 % from the median of the group are not used (a panel changed brightness, a light leak, a
    cover not fully on). Needs 3 flats for a group median."""
    if len(kept) < 3:
        return kept
    level = np.array([float(np.mean(k[2])) for k in kept])
    group = float(np.median(level))
    out = []
    for k, lv in zip(kept, level, strict=True):
        dev = lv / group - 1.0
        if abs(dev) > _PANEL_DEVIATION:
            warnings.append(
                f"{os.path.basename(k[0])} not used: level {dev * 100:+.0f} % from the group median "
                f"(flats of one master should agree within {_PANEL_DEVIATION * 100:.0f} %)"
            )
        else:
            out.append(k)
    return out


def integrate_master(
    kind: str,
    paths: Sequence[str | os.PathLike[str]],
    *,
    subtract: Sequence[np.ndarray | None] | np.ndarray | None = None,
    bayer: str | None = None,
    band_budget_bytes: int = 1 << 28,
    check_levels: bool = True,
    rejection: str | None = None,
    params: Mapping[str, float] | None = None,
    overscan: Overscan | None = None,
) -> MasterResult:
    """Integrate the members of one master (§2.1, §2.2) over row bands.

    Parameters
    ----------
    kind : str
        "bias", "dark", "darkflat" or "flat".
    paths : sequence of path
        Member files (same geometry). Sorted here, so the result does not depend on arrival order.
    subtract : array or sequence of arrays, optional
        Flats only: the calibration subtracted from each member (master flat-dark, else bias), one
        array for all or one per member (in the order of ``paths``). Default is None.
    bayer : str, optional
        CFA pattern: flats are normalised per CFA channel (each of the 4 positions). Default is None.
    band_budget_bytes : int, optional
        Memory for one band of all members. Default is 256 MiB.
    check_levels : bool, optional
        Flats: refuse members failing :func:`flat_level_problem` (with a warning). Default is True.
    rejection, params : optional
        Override the §2.1 choice (:func:`master_rejection`) with any
        :data:`stackwatch.engine.reject.REJECTIONS` name and its parameters. Default is None.
    overscan : Overscan, optional
        Overscan correction and crop applied to every member before anything else when the members'
        geometry matches it (``bayer`` and ``subtract`` then describe the cropped frame, as for the
        lights calibrated with the master). Default is None.
    """
    from stackwatch.engine.integrate import integrate  # H3's band integrator

    files = _MemberFiles(_open_file_budget())
    try:
        return _integrate_master(
            kind, paths, subtract, bayer, band_budget_bytes, check_levels, rejection, params, overscan, files, integrate
        )
    finally:
        files.close()


def _open_file_budget() -> int:
    """How many member files one integration keeps open: a quarter of the descriptor limit, at most 512."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 64
    if soft == resource.RLIM_INFINITY:
        return 512
    return max(0, min(512, int(soft) // 4))


def _integrate_master(
    kind: str,
    paths: Sequence[str | os.PathLike[str]],
    subtract: Sequence[np.ndarray | None] | np.ndarray | None,
    bayer: str | None,
    band_budget_bytes: int,
    check_levels: bool,
    rejection: str | None,
    params: Mapping[str, float] | None,
    overscan: Overscan | None,
    files: _MemberFiles,
    integrate: Any,
) -> MasterResult:

    if kind not in MASTER_KINDS:
        raise StackwatchError(f"master kind {kind!r}: not one of {', '.join(MASTER_KINDS)}")
    if not paths:
        raise StackwatchError(f"no frames to integrate into a master {kind}")
    spaths = [os.fspath(p) for p in paths]
    if subtract is None or isinstance(subtract, np.ndarray):
        subs: list[np.ndarray | None] = [subtract] * len(spaths)  # type: ignore[list-item]
    else:
        subs = list(subtract)
        if len(subs) != len(spaths):
            raise StackwatchError("integrate_master: one subtract array per member is needed")
    order = sorted(range(len(spaths)), key=lambda i: spaths[i])
    spaths = [spaths[i] for i in order]
    subs = [subs[i] for i in order]
    raw_shape = tuple(int(v) for v in fitsio.image_shape(fitsio.read_header(spaths[0])))
    for p in spaths:
        planes = fitsio.image_shape(fitsio.read_header(p))
        if len(planes) != 2:
            raise FrameError(p, f"shape {tuple(planes)}: a master {kind} integrates raw 2-D frames (mono or CFA), not colour planes")
    if overscan is not None and not overscan.applies(raw_shape):
        overscan = None
    shape = raw_shape if overscan is None else overscan.output_shape(raw_shape)
    warnings: list[str] = []
    levels: list[tuple[float, ...]] = []
    sources: list[_FileSource] = []
    if kind == "flat":
        if bayer is not None:
            channel_map(bayer)
        kept: list[_Kept] = []
        for p, sub in zip(spaths, subs, strict=True):
            img = fitsio.read_image(p)
            if img.data.shape != raw_shape:
                raise StackwatchError(f"{p}: shape {img.data.shape}, the other flats {raw_shape}")
            data = img.data
            levels_ov = None
            if overscan is not None:
                levels_ov = overscan.levels(data)
                if overscan.image_rect is not None:
                    x0, y0, x1, y1 = overscan.image_rect
                    raw_in = data[..., y0:y1, x0:x1]
                else:
                    raw_in = data
                data = overscan.correct(data, levels_ov)
            else:
                raw_in = data
            if check_levels:
                problem = flat_level_problem(raw_in, saturation=img.saturation, bayer=bayer)
                if problem:
                    warnings.append(f"{os.path.basename(p)} not used: {problem}")
                    continue
            cal = data if sub is None else data - sub
            lv = _levels(cal, bayer)
            if not all(np.isfinite(lv)) or min(lv) <= 0:
                warnings.append(f"{os.path.basename(p)} not used: non-positive level after calibration")
                continue
            kept.append((p, sub, lv, levels_ov))
        kept = _drop_level_outliers(kept, warnings)
        if not kept:
            raise StackwatchError(f"no usable flat among {len(spaths)} (" + "; ".join(warnings) + ")")
        m0 = np.array(kept[0][2], dtype=np.float64)
        for p, sub, lv, lov in kept:
            ratio = m0 / np.array(lv, dtype=np.float64)
            q = np.full((2, 2), ratio[0]) if len(ratio) == 1 else ratio.reshape(2, 2)
            sources.append(_FileSource(p, shape, sub, q, overscan, lov, files))
            levels.append(lv)
    else:
        for p in spaths:
            hdr_shape = tuple(int(v) for v in fitsio.image_shape(fitsio.read_header(p)))
            if hdr_shape != raw_shape:
                raise StackwatchError(f"{p}: shape {hdr_shape}, the other {kind} frames {raw_shape}")
            sources.append(_FileSource(p, shape, overscan=overscan, files=files))
    if rejection is None:
        name, params = master_rejection(len(sources))
    else:
        name, params = rejection, dict(params or {})
    if name == "none":
        warnings.append(f"only {len(sources)} frame(s): too few frames to reject")
    result = integrate(
        sources,
        combination="mean",
        rejection=name,
        params=params,
        large_scale=False,
        band_budget_bytes=band_budget_bytes,
    )
    image = np.asarray(result.image, dtype=np.float32)
    n_valid = float(np.sum(result.coverage, dtype=np.float64)) or 1.0
    rej_low = float(np.sum(result.rej_low, dtype=np.float64)) / n_valid
    rej_high = float(np.sum(result.rej_high, dtype=np.float64)) / n_valid
    fs = None
    if kind == "flat":
        fs = flat_scale(image, bayer)
        if rej_high > 0.02:
            warnings.append(f"{rej_high * 100:.1f} % high rejections: flats not dithered, or stars in sky flats")
    return MasterResult(
        kind=kind,
        image=image,
        ncombine=len(sources),
        members=tuple(s.path for s in sources),
        rejection=name,
        params=dict(params),
        rej_low_frac=rej_low,
        rej_high_frac=rej_high,
        flat_scale=fs,
        member_levels=tuple(levels),
        warnings=tuple(warnings),
        overscan="" if overscan is None else overscan.describe(),
    )


def master_header(result: MasterResult, key: MasterKey, infos: Sequence[FrameInfo]) -> fits.Header:
    """Provenance header of a master: IMAGETYP, NCOMBINE, key fields, date range, temperatures,
    rejection, statistics, flat scale, and a HISTORY line per member is added by the writer."""
    h = fits.Header()
    h["IMAGETYP"] = (_IMAGETYP[result.kind], "stackwatch master")
    h["SWKIND"] = (result.kind, "master kind")
    # with the readout mode a key is often too long for a comment beside it (astropy would cut it, warning)
    h["SWKEY"] = (key.id, "stackwatch library key" if len(key.id) <= 43 else "")
    h["NCOMBINE"] = (result.ncombine, "frames integrated")
    if key.camera:
        h["INSTRUME"] = key.camera
    if key.gain is not None:
        h["GAIN"] = key.gain
    if key.offset is not None:
        h["OFFSET"] = key.offset
    h["XBINNING"] = key.binning[0]
    h["YBINNING"] = key.binning[1]
    if key.bayer:
        h["BAYERPAT"] = key.bayer
    if key.filter:
        h["FILTER"] = key.filter
    used = [i for i in infos if i.path in set(result.members)] or list(infos)
    exps = [i.exposure_s for i in used if i.exposure_s is not None]
    if exps:
        h["EXPTIME"] = (float(np.mean(exps)), "[s] mean member exposure")
    temps = [i.temperature_c for i in used if i.temperature_c is not None]
    if temps:
        h["CCD-TEMP"] = (round(float(np.mean(temps)), 2), "[C] mean member temperature")
        h["TEMPMIN"] = (min(temps), "[C]")
        h["TEMPMAX"] = (max(temps), "[C]")
    dates = sorted(i.date_obs for i in used if i.date_obs)
    if dates:
        h["DATE-OBS"] = (dates[0], "first member")
        h["DATE-END"] = (dates[-1], "last member")
    h["REJALG"] = result.rejection
    h["REJPAR"] = " ".join(f"{k}={v:g}" for k, v in result.params.items()) or "none"
    h["REJLOW"] = (round(result.rej_low_frac, 6), "fraction of samples rejected low")
    h["REJHIGH"] = (round(result.rej_high_frac, 6), "fraction of samples rejected high")
    h["NORMALIZ"] = "MULTIPLICATIVE" if result.kind == "flat" else "NONE"
    if result.overscan:
        # the rectangle list can exceed a card: the keyword says it was done, HISTORY says how
        h["OVERSCAN"] = (True, "members overscan-corrected and cropped")
        h.add_history(f"members corrected: {result.overscan}")
    finite = result.image[np.isfinite(result.image)]
    if finite.size:
        h["MEDIAN"] = (float(np.median(finite[:: max(1, finite.size // 1_000_000)])), "median (subsampled)")
    if result.flat_scale is not None:
        h["FLATS0"] = (result.flat_scale.s0, "mean of the master flat")
        for c, v in result.flat_scale.channels.items():
            if c in "RGB":
                h[f"FLATS0{c}"] = (v, f"mean of the {c} pixels")
    return h
