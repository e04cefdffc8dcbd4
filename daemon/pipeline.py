"""The per-frame driver shared by `stackwatch stack` and `stackwatch run`.

One light goes calibrate → cosmetic → noise → debayer → measure → register → gates → resample →
normalise → frame store → live integration. Both commands drive the same `Pipeline`, so the batch
product and the service's final product are the same arrays:

- a stack (one per target and filter) keeps its *members*, every light assigned to it, in DATE-OBS
  order; `rebuild` processes them in that order from the raw files with the current masters;
- the service processes each new light incrementally, which gives what `rebuild` would give as long
  as the light comes last in DATE-OBS order, the masters did not change and the reference is
  settled; otherwise the stack is rebuilt (a light out of order, a better master, a new reference);
- the reference is the best-ranked (§8.5) of the first `normalization.reference_candidates` members
  that pass the absolute sanity checks, or the one the user fixed; until enough candidates exist the
  choice is provisional and a change rebuilds the stack;
- `finalize` runs the exact pass (the batch integrator over the frame store) and writes the products.

State lives under ``state_dir``: ``library/`` (masters), ``frames/<stack>/`` (normalised registered
frames as .npy, the frame store), ``stacks/<stack>/`` (stack.json, the members log, live checkpoint,
products). Per-frame persistence costs the same on the last frame of a night as on the first:
stack.json holds only fixed-size state, rewritten atomically; the members (their records) and
the gate history go to an append-only JSON-lines log ``members-<generation>.jsonl``, one line per
changed member or new history entry, and stack.json names the log and its committed length. A
crash between the append and stack.json leaves bytes past that length, which the next start cuts
off (the frame is then redone). A rebuild writes a new generation whole (and so does a log that grew
to several times its members). Every other file is written atomically; a restart resumes from them.
The pipeline is thread-safe: one lock serialises all work (the service runs it in worker threads).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from stackwatch.daemon.config import Config
from stackwatch.daemon.library_store import CalibrationLibrary, record_dict
from stackwatch.daemon.memory import release_free_memory
from stackwatch.engine import cfa, cosmetic, fitsio, gates, normalize, register, resample, stars, stats
from stackwatch.engine.calibrate import Overscan, calibrate_light
from stackwatch.engine.classify import FrameInfo, classify, field_target
from stackwatch.engine.errors import FrameError, StackwatchError
from stackwatch.engine.integrate import NpySource
from stackwatch.engine.library import MasterSet, MatchRules
from stackwatch.engine.live import LiveStack

__all__ = ["Pipeline", "classify_paths", "json_default", "stack_id_for"]

_log = logging.getLogger("stackwatch.pipeline")

# 2: stack.json with fixed-size state + members log; 1 (members and history inline) is still read
_STACK_FORMAT = 2
# a log with more lines than this many per member (one per change) is rewritten whole at the next save
_LOG_LINES_PER_MEMBER = 4
# Absolute sanity for reference candidates: a frame a person would never pick.
_MIN_REFERENCE_STARS = 15


# the exact pass (Pipeline.finalize: batch integration, rebuild of the live state, products) per
# sample, x_LARGE_SCALE_FACTOR with large-scale rejection; measured with it at 26 MP mono
# (bench_exact_pass, winsorized): 12 frames 17.5 s (56 ns a sample), 30 frames 33.1 s (42 ns): the
# estimate (58.5 ns) errs on the long side, so a pass the service starts fits between frames
_EXACT_NS_PER_SAMPLE = 45.0
_LARGE_SCALE_FACTOR = 1.3  # its maps (0.2 s per 26 MP frame) and pass 2 over the pixels it pre-rejects
# recomputing an evicted frame from its raw file (read, calibrate, warp, normalise): ~2.5 s at 26 MP
_RECOMPUTE_NS_PER_PX = 100.0
# Free heap memory kept between frames (see Pipeline._release_free_memory): this many float32 frames of
# the stack's shape, within the bounds (26 MP mono: 597 MB; colour: 1 GiB, the most the heap's top
# keeps too, a 26 MP colour frame's own work leaving 0.86 GB free)
_KEEP_FREE_FRAMES = 6
_KEEP_FREE_MIN_BYTES = 256 << 20
_KEEP_FREE_MAX_BYTES = 1 << 30


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def stack_id_for(target: str, filter_name: str) -> str:
    """The id of the stack of a target and filter, e.g. ``ngc-7331-l``; safe as a folder name."""
    return f"{_slug(target) or 'unknown'}-{_slug(filter_name) or 'nofilter'}"


def _frame_key(path: str) -> str:
    """Stable id of a light in the frame store (its absolute path hashed)."""
    return hashlib.sha1(os.path.abspath(path).encode(), usedforsecurity=False).hexdigest()[:16]


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_save_npy(path: Path, array: np.ndarray, dtype: Any = np.float32, *, fsync: bool = True) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array, dtype=dtype))
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def _file_signature(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns)


def _timed_save_npy(path: Path, array: np.ndarray) -> float:
    # no fsync: a stored frame can always be recomputed from its raw file (`Pipeline._recompute_frame`), so
    # one lost to a power cut is found at the next start (`_check_store`) and recomputed; the fsync of
    # 104 MB (26 MP) was most of the frame's time in the store (~0.3 s on the critical path)
    t0 = time.perf_counter()
    _atomic_save_npy(path, array, fsync=False)
    return time.perf_counter() - t0


def _sort_key(member: dict[str, Any]) -> tuple[str, str]:
    return (member.get("date_obs") or "", member["path"])


def _set_status(stack: _Stack, member: dict[str, Any], status: str) -> None:
    """Set a member's status, keeping the stack's tally (the summaries read it, not the members).
    Every member of ``stack.members`` is counted in the tally under its current status."""
    old = str(member["status"])
    if old == status:
        return
    stack.tally[old] = stack.tally.get(old, 0) - 1
    stack.tally[status] = stack.tally.get(status, 0) + 1
    exposure = float(member.get("exposure_s") or 0.0)
    if old == "stacked":
        stack.stacked_exposure_s -= exposure
    if status == "stacked":
        stack.stacked_exposure_s += exposure
    member["status"] = status


def _retally(stack: _Stack) -> None:
    """Recount the index and the tally from the members (after a load or a rebuild: no drift)."""
    stack.index = {m["path"]: m for m in stack.members}
    stack.tally = {}
    for m in stack.members:
        stack.tally[str(m["status"])] = stack.tally.get(str(m["status"]), 0) + 1
    stack.stacked_exposure_s = math.fsum(float(m.get("exposure_s") or 0.0)
                                         for m in stack.members if m["status"] == "stacked")


@dataclass
class _Calibrated:
    """A light after calibration (and debayering), before measurement."""

    data: np.ndarray  # (H, W) or (3, H, W)
    saturated: np.ndarray  # (H, W) bool
    noise: tuple[float, ...]  # per channel
    masters: MasterSet
    notes: tuple[str, ...]
    dark_scale: float
    info: FrameInfo
    bayer: str | None
    timings: dict[str, float]
    cpu: dict[str, float]


@dataclass
class _Prepared:
    """A light after calibration and measurement, before registration."""

    data: np.ndarray  # (H, W) or (3, H, W), calibrated (and debayered)
    saturated: np.ndarray  # (H, W) bool
    noise: tuple[float, ...]  # per channel, pre-resampling
    measurement: stars.Measurement
    masters: MasterSet
    notes: tuple[str, ...]
    timings: dict[str, float]
    dark_scale: float = 1.0  # k actually used (optimised when the dark was scaled)
    # process CPU seconds of the same stages as ``timings`` (wall): on a shared machine the CPU time
    # says what a stage costs, the wall time how long it waited too
    cpu: dict[str, float] = field(default_factory=dict)


@dataclass
class _Reference:
    """What every frame of a stack is registered and normalised against."""

    path: str
    frame_id: str
    shape: tuple[int, ...]
    xy: np.ndarray  # star positions, brightest first
    fwhm_px: float
    noise: tuple[float, ...]
    background: float
    metrics: dict[str, float]
    catalog: register.ReferenceCatalog
    image: np.ndarray  # calibrated reference on its own grid (memmap of its store file)
    saturated: np.ndarray


@dataclass
class _Stack:
    id: str
    target: str
    filter: str
    members: list[dict[str, Any]] = field(default_factory=list)  # every light of the stack, any status
    fixed_reference: str | None = None  # path chosen by the user
    reference: _Reference | None = None
    live: LiveStack | None = None
    last_matrix: np.ndarray | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # metrics of accepted frames, in order
    version: int = 0
    processed_upto: int = 0  # members[:processed_upto] went through the current reference
    final: dict[str, Any] | None = None  # the last exact pass (products)
    dirty: bool = False  # needs a rebuild (masters changed, order changed, reference changed)
    closed: bool = False  # a newer stack of the same target and filter takes the new lights
    pointing: tuple[float, float] | None = None  # (RA, Dec) of a target named after its field: its first frame's
    last_active: float = 0.0  # wall-clock time of its last stacked frame (the frame store evicts the oldest first)
    checked_library: str = ""  # library state under which every processed member had its best masters
    # derived, kept so that per-frame work does not scan the members
    index: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> member
    tally: dict[str, int] = field(default_factory=dict)  # status -> number of members
    stacked_exposure_s: float = 0.0
    # the members log (see the module docstring)
    log_gen: int = 0
    log_bytes: int = 0
    log_lines: int = 0
    history_logged: int = 0  # history[:history_logged] is in the log
    rewrite_log: bool = True  # the next save writes a new generation (members changed wholesale)


class Pipeline:
    """The per-frame driver (see the module docstring).

    Parameters
    ----------
    config : the configuration.
    state_dir : the state folder (created).
    """

    def __init__(self, config: Config, state_dir: Path) -> None:
        self.config = config
        self.state_dir = Path(state_dir)
        self.frames_dir = self.state_dir / "frames"
        self.stacks_dir = self.state_dir / "stacks"
        for d in (self.state_dir, self.frames_dir, self.stacks_dir):
            d.mkdir(parents=True, exist_ok=True)
        lib = config.library
        self.library = CalibrationLibrary(
            self.state_dir / "library",
            rules=MatchRules(
                temperature_tolerance_c=lib.temperature_tolerance_c,
                exposure_tolerance_frac=lib.exposure_tolerance_frac,
                allow_scaled_darks=lib.allow_scaled_darks,
                optimize_darks=lib.optimize_darks,
                flat_max_age_days=lib.flat_max_age_days,
            ),
            overscan=Overscan.from_config(
                config.calibration.overscan, config.calibration.overscan_image_rect, config.calibration.overscan_frame_px
            ),
        )
        self._gates = gates.parse_rules(config.gates.rules) if config.gates.enabled else ()
        self._lock = threading.RLock()
        # stack id -> (live stack, its generation) at its last checkpoint (weak: a rebuilt stack's old
        # live state must not be kept alive)
        self._saved_live: dict[str, tuple[weakref.ref[LiveStack], int]] = {}
        self._stacks: dict[str, _Stack] = {}
        self._rebuilt: set[str] = set()  # stacks rebuilt since the last take_rebuilt()
        # writes the frame store while the live integration runs (both release the GIL)
        self._io = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stackwatch-store")
        # reads the next queued light while the current one is processed (see prefetch)
        self._reader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stackwatch-read")
        self._prefetch_lock = threading.Lock()
        self._prefetched: tuple[str, tuple[int, int], concurrent.futures.Future[fitsio.Image]] | None = None
        # stack id -> frame id -> bytes of its file in the frame store (the budget is checked per frame)
        self._store_bytes: dict[str, dict[str, int]] = {}
        # frame store writes still in flight: (stack id, member, file, future); see `_flush_store`
        self._pending_writes: list[tuple[str, dict[str, Any], Path, concurrent.futures.Future[float]]] = []
        for path in sorted(self.stacks_dir.glob("*/stack.json")):
            try:
                self._load_stack(path)
            except (OSError, ValueError, KeyError, StackwatchError) as exc:
                _log.warning("stack state %s unreadable (%s): the stack is rebuilt from its raw files", path, exc)
        for folder in sorted(p for p in self.frames_dir.iterdir() if p.is_dir()):
            self._store_bytes[folder.name] = {f.name[: -len(".npy")]: f.stat().st_size for f in folder.glob("*.npy")
                                              if not f.name.endswith(".sat.npy")}
        for stack in self._stacks.values():
            self._check_store(stack)

    def close(self) -> None:
        with self._lock:
            self.library.close()
            with contextlib.suppress(OSError):
                self._flush_store()
            self._io.shutdown(wait=True)
            self._reader.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ calibration frames

    def add_calibration(self, path: Path, info: FrameInfo | None = None) -> list[dict[str, Any]]:
        """Add a calibration frame to the library; masters due for re-integration are rebuilt (the
        library debounces bursts). Returns the masters rebuilt, JSON-ready."""
        with self._lock:
            self.library.add_frames([path], rebuild=False)
            due = self.library.due(
                debounce_s=self.config.library.master_debounce_s,
                debounce_members=self.config.library.master_debounce_members,
            )
            return [record_dict(r) for r in self.library.rebuild(due)] if due else []

    def flush_masters(self) -> list[dict[str, Any]]:
        """Re-integrate every master with members waiting (before lights use them)."""
        with self._lock:
            if not self.library.pending():
                return []
            return [record_dict(r) for r in self.library.rebuild()]

    def masters(self) -> list[dict[str, Any]]:
        with self._lock:
            return [record_dict(r) for r in self.library.masters()]

    # ------------------------------------------------------------------ lights

    def add_member(self, path: Path, info: FrameInfo) -> str:
        """Assign a light to its stack without processing it (batch: everything is known first)."""
        with self._lock:
            stack = self._stack_for(info, path)
            self._member(stack, path, info)
            stack.dirty = True
            stack.rewrite_log = True  # members added without a save: the next save writes them all
            return stack.id

    def prefetch(self, path: Path) -> None:
        """Start reading a light that is to be processed next, off the caller's thread and outside the
        pipeline lock: a backlog then overlaps each frame's read with the previous frame's compute.
        One frame is held; a read that fails or a file that changed since is simply read again."""
        apath = os.path.abspath(str(path))
        try:
            signature = _file_signature(apath)
        except OSError:
            return
        with self._prefetch_lock:
            if self._prefetched is not None:
                if self._prefetched[:2] == (apath, signature):
                    return
                self._prefetched[2].cancel()
            future = self._reader.submit(fitsio.read_image, apath, max_mpix=self.config.io.max_image_mpix)
            self._prefetched = (apath, signature, future)

    def _take_prefetched(self, path: str) -> fitsio.Image | None:
        apath = os.path.abspath(str(path))
        with self._prefetch_lock:
            entry, self._prefetched = self._prefetched, None
        if entry is None:
            return None
        if entry[0] != apath:
            entry[2].cancel()
            return None
        try:
            image = entry[2].result()
            if _file_signature(apath) != entry[1]:
                return None
        except (StackwatchError, OSError, ValueError, concurrent.futures.CancelledError):
            return None  # read again by the caller, which reports the error
        return image

    def process_light(self, path: Path, info: FrameInfo) -> dict[str, Any]:
        """Process one new light into its stack; returns its JSON-ready record."""
        with self._lock:
            # the previous frame's store write (it overlapped this frame's read and calibration); a failed
            # one (disk full) raises here, before anything of this frame changed
            self._flush_store()
            self.flush_masters()
            stack = self._stack_for(info, path)
            # a peak freed since the last frame (the service's exact pass) goes back to the system here
            self._release_free_memory(stack)
            member, is_new = self._member(stack, path, info)
            if not is_new and member.get("status") in ("stacked", "rejected", "failed") and not stack.dirty:
                return dict(member["record"])  # idempotent: the frame in flight before a restart
            position = bisect.bisect_left(stack.members, _sort_key(member), key=_sort_key)
            in_order = position == len(stack.members) - 1 and stack.processed_upto == position
            if stack.dirty or not in_order or self._masters_changed(stack):
                self._rebuild(stack)
            else:
                self._process_next(stack)
                if self._reference_choice(stack) != (stack.reference.path if stack.reference else None):
                    self._rebuild(stack)
            self._enforce_store_budget(stack)
            t_save = time.perf_counter()
            self._save_stack(stack, changed=[member])
            self._release_free_memory(stack)  # and one of this call (a rebuild)
            out = dict(member["record"])
            if isinstance(out.get("timings"), dict):
                out["timings"] = {**out["timings"], "save_state_s": round(time.perf_counter() - t_save, 4)}
            return out

    @staticmethod
    def _release_free_memory(stack: _Stack) -> None:
        """Return a freed peak to the system (daemon/memory.py release_free_memory) when the heap holds more
        free memory than a frame's own work leaves between frames: ~4.2 float32 frames at 26 MP mono
        (438 MB), 892 MB after an early exact pass, which otherwise stayed resident all night."""
        shape = stack.reference.shape if stack.reference is not None else ()
        frame_bytes = 4 * math.prod(shape) if shape else 0
        release_free_memory(min(_KEEP_FREE_MAX_BYTES, max(_KEEP_FREE_MIN_BYTES, _KEEP_FREE_FRAMES * frame_bytes)))

    def _member(self, stack: _Stack, path: Path, info: FrameInfo) -> tuple[dict[str, Any], bool]:
        apath = os.path.abspath(str(path))
        known = stack.index.get(apath)
        if known is not None:
            return known, False
        member = {
            "path": apath,
            "frame_id": _frame_key(apath),
            "date_obs": info.date_obs,
            "exposure_s": info.exposure_s,
            "status": "pending",
            "record": {"path": apath, "kind": "light", "status": "pending", "stack_id": stack.id},
        }
        # the members stay in DATE-OBS order (keys are unique: the path is part of them)
        bisect.insort(stack.members, member, key=_sort_key)
        stack.index[apath] = member
        stack.tally["pending"] = stack.tally.get("pending", 0) + 1
        return member, True

    def _stack_for(self, info: FrameInfo, path: Path | str | None = None) -> _Stack:
        """The stack a light belongs to: the one already holding it, else the open stack of its
        target and filter (created when there is none)."""
        if path is not None:
            apath = os.path.abspath(str(path))
            for stack in self._stacks.values():
                if apath in stack.index:
                    return stack
        target, pointing = info.object, None
        if not target and info.ra_deg is not None and info.dec_deg is not None:
            # no target name (OBJECT empty or a placeholder): the field it points at, so that the
            # lights of two fields do not share one stack (and fail registration) and one field's
            # dithered frames stay together (classify.field_target); one name for all filters
            fields = {s.target: s.pointing for s in self._stacks.values() if s.pointing is not None}
            target = field_target(float(info.ra_deg), float(info.dec_deg), fields)
            pointing = fields.get(target, (float(info.ra_deg), float(info.dec_deg)))
        base = stack_id_for(target, info.filter)
        family = [s for s in self._stacks.values() if s.id == base or s.id.startswith(base + "~")]
        open_ = [s for s in family if not s.closed]
        if open_:
            return max(open_, key=lambda s: len(s.id))
        sid = base if not family else f"{base}~{len(family) + 1}"
        stack = _Stack(id=sid, target=target, filter=info.filter, pointing=pointing)
        self._stacks[sid] = stack
        return stack

    def new_stack(self, target: str, filter_name: str) -> dict[str, Any]:
        """Start a new stack for a target and filter: the current one is closed (kept, finished as it
        is) and the next lights of that target and filter go to the new one."""
        with self._lock:
            base = stack_id_for(target, filter_name)
            family = [s for s in self._stacks.values() if s.id == base or s.id.startswith(base + "~")]
            for s in family:
                s.closed = True
                self._save_stack(s)
            sid = base if not family else f"{base}~{len(family) + 1}"
            pointing = next((s.pointing for s in family if s.pointing is not None), None)
            stack = _Stack(id=sid, target=target, filter=filter_name.strip().lower(), pointing=pointing)
            self._stacks[sid] = stack
            self._save_stack(stack)
            return self._stack_summary(stack)

    # ------------------------------------------------------------------ one frame

    def _prepare(self, path: str) -> _Prepared:
        """Calibrate, correct, estimate noise, debayer and measure one light."""
        c = self._calibrate(path)
        cfg = self.config
        t_deb, c_deb = time.perf_counter(), time.process_time()
        scale = c.info.pixel_scale_arcsec
        if scale is not None and cfg.calibration.debayer == "superpixel" and c.bayer:
            scale *= 2
        meas = stars.measure(
            c.data,
            saturated=c.saturated,
            pixel_scale_arcsec=scale,
            detect_sigma=cfg.stars.detect_sigma,
            max_stars=cfg.stars.max_stars,
            psf_fit_stars=cfg.stars.psf_fit_stars,
            psf_model=cfg.stars.psf_model,
            noise=float(np.mean(c.noise)),
            noise_window_px=cfg.stars.noise_window_px,
            refine_background=cfg.stars.refine_background,
        )
        t_meas, c_meas = time.perf_counter(), time.process_time()
        timings = {**c.timings, "measure_s": t_meas - t_deb}
        cpu = {**c.cpu, "measure_s": c_meas - c_deb}
        return _Prepared(c.data, c.saturated, c.noise, meas, c.masters, c.notes, timings, c.dark_scale, cpu)

    def _calibrate(self, path: str) -> _Calibrated:
        """Read, calibrate, correct, estimate the noise of and debayer one light."""
        cfg = self.config
        t0, c0 = time.perf_counter(), time.process_time()
        image = self._take_prefetched(path)
        if image is None:
            image = fitsio.read_image(path, max_mpix=cfg.io.max_image_mpix)
        info = classify(image.header, path)
        t_read, c_read = time.perf_counter(), time.process_time()
        ms = self.library.match(info)
        load = self.library.load
        bayer = image.bayer or (cfg.io.bayer_pattern or None)
        optimize = "none"
        if ms.optimize_dark and ms.bias is not None:
            optimize = cfg.calibration.dark_optimization_method
        cal = calibrate_light(
            image,
            bias=load(ms.bias) if ms.bias else None,
            dark=load(ms.dark) if ms.dark else None,
            flat=load(ms.flat) if ms.flat else None,
            bayer=bayer,
            dark_scale=ms.dark_scale,
            optimize_dark=optimize,
            flat_scale_override=self.library.flat_scale(ms.flat) if ms.flat else None,
            overscan=self.library.overscan,
            bias_applied="bias" in ms.already_applied,
        )
        bayer = cal.bayer  # an odd overscan crop shifts the pattern
        data = cal.data
        notes = list(cal.notes)
        if ms.already_applied:
            # a light calibrated by another program (MaxIm's CALSTAT, PixInsight's or Siril's HISTORY):
            # its steps are not applied twice (library.match left their masters out)
            done = ", ".join(ms.already_applied)
            notes.insert(0, f"already calibrated by another program ({info.calibrated_by}): {done} not applied again")
            _log.info("%s: already calibrated (%s): %s not applied again; applied: %s", Path(path).name,
                      info.calibrated_by, done, ", ".join(k for k in ("bias", "dark", "flat")
                                                          if getattr(ms, k) is not None and k not in ms.already_applied) or "nothing")
        if cfg.calibration.cosmetic:
            defects = self.library.defects(ms.dark, bias=ms.bias, flat=ms.flat, hot_sigma=cfg.calibration.hot_sigma)
            cc = cosmetic.correct(data, defects=defects, bayer=bayer, auto=True, sigma=cfg.calibration.auto_cosmetic_sigma)
            data = cc.data
            notes.append(f"cosmetic: {cc.replaced} replaced, {cc.nan} set to NaN, {cc.kept_in_stars} mapped kept in stars")
        t_cal, c_cal = time.perf_counter(), time.process_time()
        saturated = cal.saturated
        if bayer:
            # noise on a central window: < 1 % error, a fraction of the time at 26 MP (§1.2). The window is
            # cut from the raw frame first (even offsets keep the pattern): a sub-lattice of it is the mono
            # window's size. Passing the window to cfa_noise instead cut it from each full sub-lattice
            # copy, 4x the area: 1.0 CPU-s at 26 MP
            wpx = int(cfg.stars.noise_window_px)
            hh, ww = data.shape[-2:]
            y0 = max(0, (hh - 2 * wpx) // 2) & ~1
            x0 = max(0, (ww - 2 * wpx) // 2) & ~1
            cn = stats.cfa_noise(data[y0 : y0 + 2 * wpx, x0 : x0 + 2 * wpx], bayer, window_px=wpx)
            noise: tuple[float, ...] = (float(cn["R"]), float(cn["G"]), float(cn["B"]))
            method = cfg.calibration.debayer
            data = cfa.debayer(data, bayer, method=method)
            if method == "superpixel":
                h2, w2 = data.shape[-2:]
                saturated = np.asarray(saturated[: 2 * h2, : 2 * w2].reshape(h2, 2, w2, 2).any(axis=(1, 3)))
        else:
            noise = (float(stats.mrs_noise(data, window_px=cfg.stars.noise_window_px).sigma),)
        t_deb, c_deb = time.perf_counter(), time.process_time()
        timings = {"read_s": t_read - t0, "calibrate_s": t_cal - t_read, "noise_debayer_s": t_deb - t_cal}
        cpu = {"read_s": c_read - c0, "calibrate_s": c_cal - c_read, "noise_debayer_s": c_deb - c_cal, "start": c0}
        return _Calibrated(data, saturated, noise, ms, tuple(notes), float(cal.dark_scale), info, bayer, timings, cpu)

    def _explain_masters(self, ms: MasterSet) -> dict[str, Any]:
        """Which master of each kind was used and why: kind -> explanation (with the master's id), e.g.
        ``{"dark": "120 s, -10.0 °C (frame -10.0 °C, Δ0.0 ≤ 2), 5 frames, k=1 [dark_120s_...]",
        "flat": "none for filter Ha within 30 days", "missing": "flat"}``."""
        out: dict[str, Any] = {}
        for line in ms.explanations:
            kind, _, text = line.partition(": ")
            rec = getattr(ms, kind, None) if kind in ("bias", "dark", "flat", "darkflat") else None
            text = f"{text} [{Path(rec.path).stem}]" if rec is not None else text
            out[kind] = f"{out[kind]}; {text}" if kind in out else text
        if ms.missing:
            out["missing"] = ", ".join(ms.missing)
        return out

    def _masters_signature(self, ms: MasterSet) -> list[Any]:
        return [
            None if r is None else [r.path, r.ncombine, r.date_last, r.created]
            for r in (ms.bias, ms.dark, ms.flat)
        ]

    def _set_reference(self, stack: _Stack, member: dict[str, Any], prep: _Prepared) -> None:
        store = self.frames_dir / stack.id
        store.mkdir(parents=True, exist_ok=True)
        ref_path = store / f"{member['frame_id']}.npy"
        _atomic_save_npy(ref_path, prep.data)
        sat_path = store / f"{member['frame_id']}.sat.npy"
        _atomic_save_npy(sat_path, prep.saturated, dtype=bool)
        meas = prep.measurement
        xy = np.column_stack([meas.stars.x, meas.stars.y]) if len(meas.stars) else np.zeros((0, 2))
        fwhm = _finite(meas.metrics.fwhm_px) or 3.0
        shape2 = tuple(int(v) for v in prep.data.shape[-2:])
        stack.reference = _Reference(
            path=member["path"],
            frame_id=member["frame_id"],
            shape=tuple(prep.data.shape),
            xy=xy,
            fwhm_px=fwhm,
            noise=prep.noise,
            background=float(meas.metrics.background),
            metrics=gates.frame_metrics(meas, scale=1.0, weight=1.0),
            catalog=register.ReferenceCatalog.from_stars(meas.stars, fwhm_px=fwhm, shape=(shape2[0], shape2[1])),
            image=np.load(ref_path, mmap_mode="r"),
            saturated=np.load(sat_path),
        )
        stack.live = self._new_live(stack.id, tuple(prep.data.shape), float(meas.metrics.background))
        stack.last_matrix = None
        stack.history = []
        stack.rewrite_log = True

    def _rejections_dir(self, stack_id: str) -> Path:
        """Where a stack's live rejection lists are spilled (RAM stays flat over the night)."""
        return self.stacks_dir / stack_id / "rejections"

    def _new_live(self, stack_id: str, shape: tuple[int, ...], background: float) -> LiveStack:
        live = self.config.live
        rule, rule_params = self._rejection_rule()
        return LiveStack(
            shape, k_high=live.k_high, k_low=live.k_low, kappa_low=live.kappa_low, kappa_high=live.kappa_high,
            n_min=live.n_min, epsilon=live.noise_epsilon_frac,
            background=background if math.isfinite(background) else 0.0,
            rejections_dir=self._rejections_dir(stack_id),
            rejection=rule, rejection_params=rule_params,
        )

    def _rejection_rule(self) -> tuple[str, dict[str, float] | None]:
        """The configured batch rejection and its parameters (None: the algorithm's or §7.5's)."""
        cfg = self.config.integration
        if cfg.rejection in ("sigma", "winsorized", "averaged_sigma", "mad"):
            return cfg.rejection, {"kappa_low": cfg.sigma_low, "kappa_high": cfg.sigma_high}
        return cfg.rejection, None

    def _process_next(self, stack: _Stack, prep: _Prepared | None = None) -> None:
        """Process members[processed_upto] against the stack's reference (setting it if none)."""
        member = stack.members[stack.processed_upto]
        stack.processed_upto += 1
        t0 = time.perf_counter()
        if member.get("excluded"):
            _set_status(stack, member, "rejected")
            member["record"] = {**member.get("record", {}), "path": member["path"], "kind": "light",
                                "status": "rejected", "reason": "rejected: excluded by the user", "excluded": True,
                                "stack_id": stack.id, "target": stack.target, "filter": stack.filter}
            return
        try:
            if prep is None:
                prep = self._prepare(member["path"])
        except StackwatchError as exc:
            self._fail(stack, member, str(exc))
            return
        except (MemoryError, OSError, ValueError) as exc:  # a file that reads but cannot be processed
            self._fail(stack, member, f"{type(exc).__name__}: {exc}")
            return
        member["masters_sig"] = self._masters_signature(prep.masters)
        try:  # the frame store may evict the frame later: it is then recomputed from this very file
            member["raw"] = list(_file_signature(member["path"]))
        except OSError:
            member.pop("raw", None)
        masters = self._explain_masters(prep.masters)
        if "dark" in masters and prep.masters.dark is not None and abs(prep.dark_scale - prep.masters.dark_scale) > 1e-6:
            masters["dark"] += f", optimised k={prep.dark_scale:.3f}"
        meas = prep.measurement
        if stack.reference is None:
            if _usable_reference(meas):
                self._set_reference(stack, member, prep)
            else:
                self._finish(stack, member, meas, None, None, "rejected", "rejected: no reference yet and this "
                             f"frame cannot be one ({meas.metrics.stars} stars, FWHM {meas.metrics.fwhm_px:.2f} px)",
                             masters, prep, t0)
                return
        ref = stack.reference
        assert ref is not None
        cfg = self.config
        if member["path"] == ref.path:
            reg = register.Registration(True, np.eye(3), 0.0, len(meas.stars), 1.0, "reference", "similarity")
        else:
            reg = register.register(
                # no prediction from the previous frame: the transform is then a function of this frame and
                # the reference alone, whatever order or restarts the frames went through (the triangle
                # fallback costs milliseconds), so the service and `stackwatch stack` agree exactly
                ref.catalog, meas.stars, previous=None, model=cfg.registration.model,
                allow_mirror=cfg.registration.allow_mirror, max_rms_px=cfg.registration.max_rms_px,
                min_matched_fraction=cfg.registration.min_matched_fraction,
            )
        t_reg, c_reg = time.perf_counter(), time.process_time()
        if not reg.ok:
            self._finish(stack, member, meas, reg, None, "rejected", f"rejected: {reg.reason}", masters, prep, t0)
            return
        metrics = gates.frame_metrics(meas, reg)
        verdict = gates.evaluate(self._gates, metrics, stack.history, reference=ref.metrics)
        if not verdict.accepted and member["path"] != ref.path:
            self._finish(stack, member, meas, reg, None, "rejected", f"rejected: {verdict.reason}", masters, prep, t0)
            return
        is_ref = member["path"] == ref.path
        if is_ref:
            warped_data, footprint_sat, rho = prep.data, prep.saturated, 1.0
        else:
            warped = resample.warp(prep.data, reg.matrix, ref.shape, method=cfg.registration.interpolation,
                                   clamp=cfg.registration.lanczos_clamp,
                                   clamp_method=cfg.registration.lanczos_clamp_method,
                                   relative_clamp=cfg.registration.lanczos_relative_clamp)
            warped_data, rho = warped.data, warped.variance_factor
            footprint_sat = resample.warp_mask(prep.saturated, reg.matrix, ref.shape)
        t_warp, c_warp = time.perf_counter(), time.process_time()
        xy = np.column_stack([meas.stars.x, meas.stars.y]) if len(meas.stars) else np.zeros((0, 2))
        xy_ref = register.apply_transform(reg.matrix, xy) if len(xy) else xy
        if is_ref:
            # the reference is its own normalisation: y = x exactly, weight 1
            self._stack_frame(stack, member, prep.data, 1.0, [1.0] * len(prep.noise), prep.noise, 1.0)
            stack.history.append(gates.frame_metrics(meas, reg, scale=1.0, weight=1.0))
            stack.last_matrix = None
            prep.timings["total_s"] = time.perf_counter() - t0
            self._finish(stack, member, meas, reg, None, "stacked", "reference frame", masters, prep, t0)
            member["record"]["scale"] = 1.0
            member["record"]["weight"] = 1.0
            return
        norm = normalize.normalize(
            warped_data, ref.image, frame_stars=xy_ref, ref_stars=ref.xy, frame_noise=prep.noise,
            ref_noise=ref.noise, frame_mask=footprint_sat, ref_mask=ref.saturated, fwhm_px=ref.fwhm_px,
            frame_fwhm_px=_finite(meas.metrics.fwhm_px), method=cfg.normalization.method,
            bin_px=cfg.normalization.gradient_bin_px, min_pairs=cfg.normalization.min_star_pairs,
            min_snr=cfg.normalization.min_star_snr, max_scale_err_frac=cfg.normalization.max_scale_err_frac,
            max_samples=cfg.normalization.max_gradient_samples, star_mask_cap_px=cfg.normalization.star_mask_cap_px,
            local_cell_px=cfg.normalization.local_cell_px,
            # Moffat β of both PSFs: the photometric scale is corrected for the seeing difference
            ref_beta=_finite(ref.metrics.get("beta")), frame_beta=_finite(meas.metrics.beta),
            reference_id=ref.frame_id,
        )
        metrics = gates.frame_metrics(meas, reg, scale=norm.scale, weight=norm.weight)
        verdict = gates.evaluate(self._gates, metrics, stack.history, reference=ref.metrics)
        if not verdict.accepted and member["path"] != ref.path:
            self._finish(stack, member, meas, reg, norm, "rejected", f"rejected: {verdict.reason}", masters, prep, t0)
            return
        # in place: the warped frame is not used again (saves a full-size allocation, 313 MB in colour)
        y = normalize.apply(warped_data, norm, out=warped_data)
        t_norm, c_norm = time.perf_counter(), time.process_time()
        store_s, live_s = self._stack_frame(stack, member, y, norm.weight, [c.scale for c in norm.channels],
                                            prep.noise, rho)
        t_live, c_live = time.perf_counter(), time.process_time()
        stack.history.append(metrics)
        stack.last_matrix = reg.matrix
        prep.timings.update({"register_s": t_reg - t0 - sum(prep.timings.values()), "resample_s": t_warp - t_reg,
                             "normalize_s": t_norm - t_warp, "store_integrate_s": t_live - t_norm,
                             "store_s": store_s, "live_update_s": live_s})
        c_prep = prep.cpu.get("start", c_reg) + sum(v for k, v in prep.cpu.items() if k != "start")
        prep.cpu.update({"register_s": c_reg - c_prep, "resample_s": c_warp - c_reg, "normalize_s": c_norm - c_warp,
                         "store_integrate_s": c_live - c_norm})
        # the normalisation (with its gradient grid) beside the frame in the store, not in stack.json:
        # stack.json is rewritten after every frame and must stay small
        _atomic_write_bytes(self.frames_dir / stack.id / f"{member['frame_id']}.norm.json",
                            json.dumps(norm.to_dict(), default=json_default).encode())
        self._finish(stack, member, meas, reg, norm, "stacked", "; ".join(n for n in (norm.reason,) if n),
                     masters, prep, t0)

    def _stack_frame(self, stack: _Stack, member: dict[str, Any], y: np.ndarray, weight: float,
                     scale: list[float], noise: Sequence[float], rho: float) -> tuple[float, float]:
        """Add a normalised frame to the live integration and start writing it to the frame store. The
        write is not waited for: it overlaps this update and the next frame's read and calibration
        (313 MB in colour took longer than the update); every reader of the store waits for it first
        (`_flush_store`), and a frame whose write failed is recomputed from its raw file. Returns the
        seconds the update took and the write so far (it usually finishes later)."""
        store = self.frames_dir / stack.id
        store.mkdir(parents=True, exist_ok=True)
        path = store / f"{member['frame_id']}.npy"
        write: concurrent.futures.Future[float] | None = None
        if not (stack.reference is not None and member["frame_id"] == stack.reference.frame_id and path.exists()):
            write = self._io.submit(_timed_save_npy, path, y)
            self._pending_writes.append((stack.id, member, path, write))
        assert stack.live is not None
        t0 = time.perf_counter()
        stack.live.update(member["frame_id"], y, weight=weight, scale=scale, noise=list(noise), rho=rho)
        live_s = time.perf_counter() - t0
        # a failed write is handled (and raised) by the next `_flush_store`, not here
        store_s = write.result() if write is not None and write.done() and write.exception() is None else 0.0
        member["live"] = {"weight": weight, "scale": list(scale), "noise": list(noise), "rho": rho}
        member.pop("evicted", None)
        self._store_bytes.setdefault(stack.id, {})[member["frame_id"]] = int(y.nbytes) + 128
        stack.last_active = time.time()
        stack.version += 1
        stack.final = None
        return store_s, live_s

    def _finish(self, stack: _Stack, member: dict[str, Any], meas: stars.Measurement | None,
                reg: register.Registration | None, norm: normalize.Normalization | None, status: str,
                reason: str, masters: dict[str, Any], prep: _Prepared | None, t0: float) -> None:
        rec = gates.frame_record(member["path"], meas, reg, None, status=status,
                                 scale=None if norm is None else norm.scale,
                                 weight=None if norm is None else norm.weight)
        rec["reason"] = reason
        # the metrics also as one mapping: the catalogue stores it as a column
        rec["metrics"] = {k: rec.get(k) for k in ("stars", "fwhm_px", "fwhm_arcsec", "eccentricity", "hfr",
                                                  "background", "noise", "psf_snr", "reg_rms_px",
                                                  "matched_fraction", "n_inliers")}
        rec["stack_id"] = stack.id
        rec["target"] = stack.target
        rec["filter"] = stack.filter
        rec["date_obs"] = member.get("date_obs")
        rec["masters"] = masters
        rec["reference"] = member["path"] == (stack.reference.path if stack.reference else None)
        if norm is not None:
            rec["normalization"] = norm.method
        # calibrated with what existed while a master it needs is still missing (the flats of dawn):
        # counted as provisional until a recalibration with the master clears it
        rec["provisional"] = prep is not None and bool(prep.masters.missing)
        if prep is not None:
            rec["notes"] = list(prep.notes)
            rec["timings"] = {k: round(v, 4) for k, v in {**prep.timings, "total_s": time.perf_counter() - t0}.items()}
            if "start" in prep.cpu:
                cpu = {**prep.cpu, "total_s": time.process_time() - prep.cpu["start"]}
                rec["timings"]["cpu_s"] = {k: round(v, 4) for k, v in cpu.items() if k != "start"}
        _set_status(stack, member, status)
        member["record"] = rec
        _log.info("%s: %s%s", Path(member["path"]).name, status, f" ({reason})" if reason else "")

    def _fail(self, stack: _Stack, member: dict[str, Any], reason: str) -> None:
        _set_status(stack, member, "failed")
        member["record"] = {"path": member["path"], "kind": "light", "status": "failed", "reason": reason,
                            "stack_id": stack.id, "target": stack.target, "filter": stack.filter,
                            "date_obs": member.get("date_obs")}
        _log.warning("%s: failed (%s)", Path(member["path"]).name, reason)

    # ------------------------------------------------------------------ reference and rebuilds

    def _candidate_metrics(self, stack: _Stack) -> list[tuple[str, dict[str, float]]]:
        """Measured members usable as reference, in order, up to the candidate count."""
        out: list[tuple[str, dict[str, float]]] = []
        for m in stack.members:
            rec = m.get("record") or {}
            if m.get("status") == "failed" or "stars" not in rec:
                continue
            stars_n = rec.get("stars") or 0
            if stars_n < _MIN_REFERENCE_STARS or _finite(rec.get("fwhm_px")) is None:
                continue
            out.append((m["path"], {k: _finite(rec.get(k)) or float("nan")
                                    for k in ("fwhm_px", "stars", "background", "eccentricity")}))
            if len(out) >= self.config.normalization.reference_candidates:
                break
        return out

    def _reference_choice(self, stack: _Stack) -> str | None:
        """The reference the rules pick from what has been measured so far (None: nothing usable)."""
        if stack.fixed_reference:
            return stack.fixed_reference
        cands = self._candidate_metrics(stack)
        if not cands:
            return None
        best = normalize.rank_reference_candidates([m for _, m in cands])
        return cands[best][0]

    def _rebuild(self, stack: _Stack, progress: Callable[[int, int], None] | None = None) -> None:
        """Process every member again, in DATE-OBS order, from the raw files.

        Two passes when the reference is not fixed: measure the candidates first (calibration and
        measurement only), pick the reference by rank, then process everything against it."""
        with contextlib.suppress(OSError):  # a failed write only marks its frame; the store goes anyway
            self._flush_store()
        stack.reference = None
        stack.live = None
        stack.processed_upto = 0
        stack.final = None
        stack.dirty = False
        store = self.frames_dir / stack.id
        if store.exists():
            shutil.rmtree(store)
        self._store_bytes[stack.id] = {}
        stack.rewrite_log = True
        self._rebuilt.add(stack.id)
        for m in stack.members:
            _set_status(stack, m, "pending")
            m["record"] = {"path": m["path"], "kind": "light", "status": "pending", "stack_id": stack.id}
            for key in ("norm", "live", "masters_sig", "raw", "evicted"):
                m.pop(key, None)
        if not stack.fixed_reference:
            # measure candidates until enough usable ones exist (their records feed _reference_choice);
            # only metrics are kept: holding 8 calibrated 26 MP colour frames would cost 2.5 GB
            usable = 0
            for m in stack.members:
                if usable >= self.config.normalization.reference_candidates:
                    break
                if m.get("excluded"):
                    continue
                try:
                    prep = self._prepare(m["path"])
                except (StackwatchError, OSError, ValueError) as exc:
                    m["record"] = {"path": m["path"], "status": "failed", "reason": str(exc)}
                    continue
                m["record"] = {"path": m["path"], **gates.frame_metrics(prep.measurement)}
                if _usable_reference(prep.measurement):
                    usable += 1
                del prep
            choice = self._reference_choice(stack)
            if choice is not None:
                # the reference is set first so that every frame registers against it
                ref_member = stack.index[choice]
                self._set_reference(stack, ref_member, self._prepare(choice))
            for m in stack.members:
                m["record"] = {"path": m["path"], "kind": "light", "status": "pending", "stack_id": stack.id}
        else:
            fixed = stack.index.get(stack.fixed_reference)
            if fixed is None:
                raise StackwatchError(f"reference {stack.fixed_reference} is not a light of stack {stack.id}")
            self._set_reference(stack, fixed, self._prepare(fixed["path"]))
        total = len(stack.members)
        for i in range(total):
            self._process_next(stack)
            if progress is not None:
                progress(i + 1, total)
        stack.version += 1
        stack.checked_library = self._library_state()
        _retally(stack)

    def _library_state(self) -> str:
        """Changes whenever a master is added or re-integrated."""
        recs = self.library.masters()
        return hashlib.sha1(repr([(r.path, r.ncombine, r.created) for r in recs]).encode(),
                            usedforsecurity=False).hexdigest()

    def _masters_changed(self, stack: _Stack) -> bool:
        """True when a processed member would now get different masters (checked against every
        member only when the library changed since the last check)."""
        state = self._library_state()
        if stack.checked_library == state:
            return False
        changed = self._masters_changed_slow(stack)
        if not changed:
            stack.checked_library = state
        return changed

    def _masters_changed_slow(self, stack: _Stack) -> bool:
        for m in stack.members[: stack.processed_upto]:
            if m.get("status") == "failed" or "masters_sig" not in m:
                continue
            try:
                info = classify(fitsio.read_header(m["path"]), m["path"])
            except StackwatchError:
                continue
            if self._masters_signature(self.library.match(info)) != m["masters_sig"]:
                return True
        return False

    def frames_needing_recalibration(self) -> list[str]:
        """Paths of processed lights whose best masters changed since they were calibrated."""
        with self._lock:
            self.flush_masters()
            out: list[str] = []
            for stack in self._stacks.values():
                if self._masters_changed(stack):
                    stack.dirty = True
                    out += [m["path"] for m in stack.members]
            return out

    def recalibrate(self, paths: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Rebuild the stacks holding ``paths`` (all dirty stacks when None); returns every member's
        new record."""
        with self._lock:
            wanted = {os.path.abspath(p) for p in paths} if paths is not None else None
            out: list[dict[str, Any]] = []
            for stack in self._stacks.values():
                if wanted is not None and not any(m["path"] in wanted for m in stack.members):
                    continue
                if wanted is None and not stack.dirty:
                    continue
                self._rebuild(stack)
                self._save_stack(stack)
                out += [dict(m["record"]) for m in stack.members]
            return out

    def rebuild(self, stack_id: str, progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
        """Process every light of a stack from its raw file (batch, or after a change)."""
        with self._lock:
            self.flush_masters()
            stack = self._get(stack_id)
            self._rebuild(stack, progress)
            self._save_stack(stack)
            return [dict(m["record"]) for m in stack.members]

    def exclude_frame(self, path: Path | str, excluded: bool) -> dict[str, Any]:
        """Exclude a light from its stack (or include it again). A stacked frame leaves the live sums at
        once (its data from the frame store); the reference, or a frame included again, makes the stack
        rebuild. The next exact pass gives the batch result without it."""
        with self._lock:
            self._flush_store()
            apath = os.path.abspath(str(path))
            for stack in self._stacks.values():
                member = stack.index.get(apath)
                if member is None:
                    continue
                if bool(member.get("excluded")) == bool(excluded):
                    return {"path": apath, "excluded": bool(excluded), "stack_id": stack.id}
                member["excluded"] = bool(excluded)
                is_ref = stack.reference is not None and stack.reference.path == apath
                live = stack.live
                frame = None
                if (excluded and not is_ref and member.get("status") == "stacked" and live is not None
                        and member["frame_id"] in live.frame_ids):
                    frame = self._stored_frame(stack, member)
                if frame is not None and live is not None:
                    live.exclude(member["frame_id"], frame)
                    _set_status(stack, member, "rejected")
                    member["record"] = {**member["record"], "status": "rejected",
                                        "reason": "rejected: excluded by the user", "excluded": True}
                    stack.version += 1
                    stack.final = None
                else:
                    stack.dirty = True
                self._save_stack(stack, changed=[member])
                return {"path": apath, "excluded": bool(excluded), "stack_id": stack.id, "rebuild": stack.dirty}
            raise KeyError(apath)

    def set_reference(self, stack_id: str, path: str | None) -> None:
        """Fix the reference of a stack to a light (None: back to automatic) and rebuild."""
        with self._lock:
            stack = self._get(stack_id)
            if path is not None:
                apath = os.path.abspath(path)
                if apath not in stack.index:
                    raise StackwatchError(f"{path} is not a light of stack {stack_id}")
                stack.fixed_reference = apath
            else:
                stack.fixed_reference = None
            stack.dirty = True

    # ------------------------------------------------------------------ products

    def _get(self, stack_id: str) -> _Stack:
        try:
            return self._stacks[stack_id]
        except KeyError:
            raise KeyError(stack_id) from None

    def stacks(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._stack_summary(s) for s in sorted(self._stacks.values(), key=lambda s: s.id)]

    def _stack_summary(self, s: _Stack) -> dict[str, Any]:
        # from the tally: the service asks for every stack's summary after every frame
        return {
            "id": s.id,
            "target": s.target,
            "filter": s.filter,
            "ncombine": s.tally.get("stacked", 0),
            "exposure_s": s.stacked_exposure_s,
            "frames": len(s.members),
            "rejected": s.tally.get("rejected", 0),
            "failed": s.tally.get("failed", 0),
            "reference": s.reference.path if s.reference else None,
            "version": s.version,
            "final": s.final is not None,
            # the live image is the batch integration of its frames (an exact pass since the last frame)
            "exact": s.live is not None and s.live.is_exact,
            "stale": s.dirty,
            "closed": s.closed,
            "store_bytes": sum(self._store_bytes.get(s.id, {}).values()),
            "evicted": sum(1 for m in s.members if m.get("evicted")),
        }

    def members(self, stack_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(m["record"]) for m in self._get(stack_id).members]

    def take_rebuilt(self) -> list[str]:
        """Ids of the stacks rebuilt since the last call (their members' records may all have changed;
        between rebuilds a light changes only its own record)."""
        with self._lock:
            out = sorted(self._rebuilt)
            self._rebuilt.clear()
            return out

    def stack_products(self, stack_id: str) -> dict[str, Any] | None:
        with self._lock:
            stack = self._stacks.get(stack_id)
            if stack is None or stack.live is None or stack.live.n_frames == 0:
                return None
            live = stack.live
            r_lo, r_hi = live.rejection_counts()
            return {
                "version": stack.version,
                "image": live.image().copy(),
                "rej_low": np.asarray(r_lo).copy(),
                "rej_high": np.asarray(r_hi).copy(),
                "coverage": np.asarray(live.coverage()).copy(),
                "header": self._header_cards(stack),
            }

    def _header_cards(self, stack: _Stack) -> dict[str, Any]:
        return {
            "OBJECT": stack.target,
            "FILTER": stack.filter,
            "IMAGETYP": "MASTER LIGHT",
            "NCOMBINE": stack.tally.get("stacked", 0),
            "REFFRAME": Path(stack.reference.path).name if stack.reference else "",
            "NORMALIZ": self.config.normalization.method.upper(),
            "WEIGHTS": "NWEIGHT",
            "ROWORDER": "TOP-DOWN",
        }

    def finalize(self, stack_id: str, out_path: Path | None = None) -> dict[str, Any]:
        """Exact pass over the frame store (equal to the batch integration of the same frames);
        writes the products under the stack's folder (and to ``out_path`` when given)."""
        with self._lock:
            self._flush_store()
            self.flush_masters()
            stack = self._get(stack_id)
            if stack.dirty or self._masters_changed(stack):
                self._rebuild(stack)
            if not self._restore_evicted(stack):
                self._rebuild(stack)
            if stack.live is None or stack.live.n_frames == 0:
                raise StackwatchError(f"stack {stack_id}: no frame could be stacked")
            live = stack.live
            ids = list(live.frame_ids)
            store = self.frames_dir / stack.id
            sources = [NpySource(store / f"{fid}.npy") for fid in ids]
            cfg = self.config.integration
            rejection, params = self._rejection_rule()
            live.rejection, live.rejection_params = rejection, dict(params or {})  # a reloaded configuration
            result = live.exact_pass(sources, frame_ids=ids, rejection=rejection, params=params,
                                     large_scale=cfg.large_scale_rejection,
                                     band_budget_bytes=int(cfg.band_memory_mb) << 20)
            stack.version += 1
            # the live state's planes themselves (read-only; the lock is held), converted to float32
            # a chunk at a time as they are written: copies and float32 conversions of the five
            # products were 0.7 GB at 26 MP, the exact pass's peak
            r_lo, r_hi = live.rejection_counts(copy=False)
            image = live.image(copy=False)
            coverage = live.coverage()
            weight = live.weight_sum(copy=False)
            header = self._fits_header(stack, result.rejection, result.params)
            valid = float(coverage.sum(dtype=np.float64))
            if valid > 0:  # §7.6: global fractions of the valid samples rejected
                header["REJLOW"] = (float(np.sum(r_lo, dtype=np.float64)) / valid, "fraction of samples rejected low")
                header["REJHIGH"] = (float(np.sum(r_hi, dtype=np.float64)) / valid, "fraction of samples rejected high")
            folder = self.stacks_dir / stack.id
            folder.mkdir(parents=True, exist_ok=True)
            extras = {"REJ_LOW": r_lo, "REJ_HIGH": r_hi, "COVERAGE": coverage, "WEIGHT": weight}
            history = [f"stackwatch: {m['status']} {m['path']}" + (f" ({m['record'].get('reason')})"
                       if m["record"].get("reason") else "") for m in stack.members]
            targets = [folder / "stack.fits"] + ([Path(out_path)] if out_path is not None else [])
            for target in targets:
                fitsio.write_image(target, image, header=header, history=history, extra_hdus=extras,
                                   extra_dtype=np.float32)
            stack.final = {"path": str(targets[-1]), "rejection": result.rejection, "params": result.params,
                           "n_frames": result.n_frames}
            self._save_stack(stack)
            self._enforce_store_budget(stack)
            del image, coverage, weight, extras, r_lo, r_hi
            self._release_free_memory(stack)  # the pass's peak (batch bands, products) goes back now
            return {**self._stack_summary(stack), "path": str(targets[-1]), "rejection": result.rejection,
                    "exposure_s": self._total_exposure(stack)}

    def _total_exposure(self, stack: _Stack) -> float:
        total = 0.0
        for m in stack.members:
            if m.get("status") == "stacked":
                total += float(m.get("exposure_s") or 0.0)
        return total

    def _fits_header(self, stack: _Stack, rejection: str, params: dict[str, float]) -> Any:
        from astropy.io import fits

        header = fits.Header()
        for k, v in self._header_cards(stack).items():
            header[k] = v
        exps = {float(m["exposure_s"]) for m in stack.members
                if m.get("status") == "stacked" and m.get("exposure_s") is not None}
        if len(exps) == 1:
            header["EXPTIME"] = (next(iter(exps)), "exposure of each frame [s]")
        header["LIVETIME"] = (self._total_exposure(stack), "total exposure [s]")
        header["STACKCNT"] = header["NCOMBINE"]
        header["REJALG"] = rejection
        header["REJPAR"] = " ".join(f"{k}={v:g}" for k, v in sorted(params.items()))[:68]
        header["SWCREATE"] = "stackwatch"
        return header

    def exact_pass_estimate_s(self, stack_id: str) -> float:
        """Estimated wall time of the stack's exact pass on this machine's 2 cores: ~45 ns per sample
        (see _EXACT_NS_PER_SAMPLE; conservative), x1.3 with large-scale rejection.
        Called from the service's event loop: reads without the lock (a long rebuild may hold it)."""
        stack = self._stacks.get(stack_id)
        live = None if stack is None else stack.live
        if stack is None or live is None or live.n_frames == 0:
            return math.inf
        pixels = math.prod(live.shape)
        factor = _LARGE_SCALE_FACTOR if self.config.integration.large_scale_rejection else 1.0
        evicted = len([m for m in list(stack.members) if m.get("evicted")])  # recomputed from raw first
        return (live.n_frames * pixels * _EXACT_NS_PER_SAMPLE * factor + evicted * pixels * _RECOMPUTE_NS_PER_PX) * 1e-9

    def checkpoint(self) -> None:
        """Write every stack's state and live accumulators (atomically).

        A live stack unchanged since its last checkpoint (same object, same generation) is not written
        again: at 26 MP each is 0.8 GB, and a state folder holds every target and filter of past nights."""
        with self._lock:
            for stack in self._stacks.values():
                live = stack.live
                saved = self._saved_live.get(stack.id)
                unchanged = live is not None and saved is not None and saved[0]() is live and saved[1] == live.generation
                self._save_stack(stack, live=not unchanged)
                if live is not None and not unchanged:
                    self._saved_live[stack.id] = (weakref.ref(live), live.generation)

    # ------------------------------------------------------------------ frame store budget

    def _enforce_store_budget(self, active: _Stack) -> None:
        """Keep the frame store within ``live.frame_store_budget_gb`` (<= 0: no limit).

        Over the budget, stored frames are evicted, those of the least recently active stacks first
        and the oldest of a stack first; the active stack's own frames go last. A frame is evicted only
        when it can be recomputed exactly: its raw file unchanged since it was stacked, its transform
        and normalisation kept. The reference stays (every frame is registered against it). Nothing
        changes for the live image; an exact pass recomputes the evicted frames from their raw files
        first (`_restore_evicted`), which is what the service's exact-pass estimate counts."""
        budget = float(self.config.live.frame_store_budget_gb) * 1e9
        if budget <= 0:
            return
        total = sum(sum(d.values()) for d in self._store_bytes.values())
        if total <= budget:
            return
        self._flush_store()
        total = sum(sum(d.values()) for d in self._store_bytes.values())
        others = sorted((s for s in self._stacks.values() if s is not active), key=lambda s: s.last_active)
        for stack in [*others, active]:
            if total <= budget:
                break
            sizes = self._store_bytes.get(stack.id, {})
            store = self.frames_dir / stack.id
            ref_id = stack.reference.frame_id if stack.reference is not None else None
            evicted: list[dict[str, Any]] = []
            for m in stack.members:
                if total <= budget:
                    break
                fid = m["frame_id"]
                if fid == ref_id or fid not in sizes or not self._recomputable(stack, m):
                    continue
                (store / f"{fid}.npy").unlink(missing_ok=True)
                total -= sizes.pop(fid)
                m["evicted"] = True
                evicted.append(m)
            if evicted:
                self._save_stack(stack, changed=evicted)
                _log.warning("frame store over its budget of %.1f GB: %d frames of stack %s evicted (recomputed "
                             "from their raw files for the next exact integration)",
                             budget / 1e9, len(evicted), stack.id)

    def flush_store(self) -> None:
        """Wait until every stored frame is on disk (for readers of the frame store outside the pipeline)."""
        with self._lock:
            self._flush_store()

    def _flush_store(self) -> None:
        """Wait for the frame store writes in flight. A failed one leaves its frame marked for
        recomputation from its raw file (or its stack to be rebuilt); the first error is raised after all
        were handled (a full disk pauses the service)."""
        pending, self._pending_writes = self._pending_writes, []
        error: OSError | None = None
        for stack_id, member, path, future in pending:
            try:
                future.result()
            except OSError as exc:
                error = error or exc
                path.unlink(missing_ok=True)
                path.with_name(path.name + ".tmp").unlink(missing_ok=True)
                self._store_bytes.get(stack_id, {}).pop(member["frame_id"], None)
                stack = self._stacks.get(stack_id)
                if stack is None:
                    continue
                _log.warning("%s: frame store write failed (%s)", Path(member["path"]).name, exc)
                if stack.index.get(member["path"]) is member and self._recomputable(stack, member):
                    member["evicted"] = True
                    self._save_stack(stack, changed=[member])
                else:
                    stack.dirty = True
        if error is not None:
            raise error

    def _check_store(self, stack: _Stack) -> None:
        """After a start: a stacked frame whose store file is missing or cut short (the store is written
        without fsync; a power cut can lose the last frames) is marked evicted, to be recomputed from its
        raw file when needed, or the stack rebuilt when it cannot be."""
        ref = stack.reference
        if ref is None or stack.dirty:
            return
        store = self.frames_dir / stack.id
        bad: list[dict[str, Any]] = []
        for m in stack.members:
            if m.get("status") != "stacked" or m.get("evicted") or m["frame_id"] == ref.frame_id:
                continue
            f = store / f"{m['frame_id']}.npy"
            try:
                ok = tuple(np.load(f, mmap_mode="r").shape) == tuple(ref.shape)
            except (OSError, ValueError, EOFError):
                ok = False
            if ok:
                continue
            self._store_bytes.get(stack.id, {}).pop(m["frame_id"], None)
            f.unlink(missing_ok=True)
            if not self._recomputable(stack, m):
                _log.warning("%s: stored frame of %s lost and its raw file changed: the stack is rebuilt",
                             stack.id, m["path"])
                stack.dirty = True
                return
            m["evicted"] = True
            bad.append(m)
        if bad:
            _log.warning("%s: %d stored frames lost (power cut?): recomputed from their raw files when needed",
                         stack.id, len(bad))
            self._save_stack(stack, changed=bad)

    def _recomputable(self, stack: _Stack, m: dict[str, Any]) -> bool:
        """Whether a stacked frame can be recomputed from its raw file exactly as it was stored."""
        if m.get("status") != "stacked" or not m.get("raw") or not m.get("live"):
            return False
        rec = m.get("record") or {}
        if rec.get("transform") is None:
            return False
        if not (self.frames_dir / stack.id / f"{m['frame_id']}.norm.json").exists():
            return False
        try:
            return list(_file_signature(m["path"])) == list(m["raw"])
        except OSError:
            return False

    def _recompute_frame(self, stack: _Stack, m: dict[str, Any]) -> np.ndarray:
        """The stored frame of a member, recomputed from its raw file with its kept transform and
        normalisation (the same arrays as when it was stacked: same masters, same steps)."""
        ref = stack.reference
        if ref is None:
            raise StackwatchError(f"{m['path']}: stack {stack.id} has no reference")
        if not self._recomputable(stack, m):
            raise StackwatchError(f"{m['path']}: changed or missing since it was stacked; cannot be recomputed")
        rec = m["record"]
        if rec.get("homography") is not None:
            matrix = np.asarray(rec["homography"], np.float64)
        else:
            matrix = np.vstack([np.asarray(rec["transform"], np.float64), [0.0, 0.0, 1.0]])
        norm_file = self.frames_dir / stack.id / f"{m['frame_id']}.norm.json"
        norm = normalize.Normalization.from_dict(json.loads(norm_file.read_text()))
        c = self._calibrate(m["path"])
        cfg = self.config.registration
        warped = resample.warp(c.data, matrix, ref.shape, method=cfg.interpolation, clamp=cfg.lanczos_clamp,
                               clamp_method=cfg.lanczos_clamp_method, relative_clamp=cfg.lanczos_relative_clamp)
        return normalize.apply(warped.data, norm, out=warped.data)

    def _stored_frame(self, stack: _Stack, m: dict[str, Any]) -> np.ndarray | None:
        """A stacked member's frame from the store (recomputed and stored again when it was evicted or
        lost); None when it is neither stored nor recomputable."""
        f = self.frames_dir / stack.id / f"{m['frame_id']}.npy"
        if f.exists():
            try:
                return np.load(f)
            except (OSError, ValueError, EOFError):  # cut short by a power cut (written without fsync)
                f.unlink(missing_ok=True)
        try:
            y = self._recompute_frame(stack, m)
        except (StackwatchError, OSError, ValueError) as exc:
            _log.warning("%s", exc)
            return None
        _atomic_save_npy(f, y)
        self._store_bytes.setdefault(stack.id, {})[m["frame_id"]] = int(y.nbytes) + 128
        m.pop("evicted", None)
        return y

    def _restore_evicted(self, stack: _Stack) -> bool:
        """Recompute the evicted frames of a stack into the store (before an exact pass). False when one
        cannot be (its raw file changed or went): the stack must then be rebuilt."""
        live = stack.live
        ids = set(live.frame_ids) if live is not None else set()
        restored: list[dict[str, Any]] = []
        ok = True
        for m in stack.members:
            if not m.get("evicted"):
                continue
            if m.get("status") != "stacked" or m["frame_id"] not in ids:
                m.pop("evicted", None)  # not part of the integration any more: nothing to restore
                restored.append(m)
                continue
            if self._stored_frame(stack, m) is None:
                ok = False
                break
            restored.append(m)
        if restored:
            self._save_stack(stack, changed=restored)
        return ok

    # ------------------------------------------------------------------ persistence

    def _save_stack(self, stack: _Stack, *, live: bool = False, changed: Sequence[dict[str, Any]] = ()) -> None:
        """Persist a stack: the members in ``changed`` and the new gate history appended to the members
        log, then stack.json. Whoever changes members wholesale sets ``stack.rewrite_log`` (a rebuild)."""
        folder = self.stacks_dir / stack.id
        folder.mkdir(parents=True, exist_ok=True)
        if live and stack.live is not None:
            stack.live.save(folder / "live")
        old_gen = stack.log_gen
        if (stack.rewrite_log or len(stack.history) < stack.history_logged
                or stack.log_lines > _LOG_LINES_PER_MEMBER * len(stack.members) + 64
                or not (folder / self._log_name(stack.log_gen)).exists()):
            self._write_log(stack, folder)
        else:
            self._append_log(stack, folder, changed)
        ref = stack.reference
        state = {
            "format": _STACK_FORMAT,
            "id": stack.id,
            "target": stack.target,
            "filter": stack.filter,
            "fixed_reference": stack.fixed_reference,
            "closed": stack.closed,
            "pointing": None if stack.pointing is None else list(stack.pointing),
            "last_active": stack.last_active,
            "version": stack.version,
            "processed_upto": stack.processed_upto,
            "dirty": stack.dirty,
            "final": stack.final,
            "last_matrix": None if stack.last_matrix is None else np.asarray(stack.last_matrix).tolist(),
            "log": {"generation": stack.log_gen, "bytes": stack.log_bytes, "lines": stack.log_lines,
                    "history": stack.history_logged},
            "reference": None if ref is None else {
                "path": ref.path, "frame_id": ref.frame_id, "shape": list(ref.shape), "xy": ref.xy.tolist(),
                "fwhm_px": ref.fwhm_px, "noise": list(ref.noise), "background": ref.background,
                "metrics": ref.metrics,
                # the registration catalogue as built from the star table (its own order and selection):
                # rebuilt from `xy` after a restart, it registered the next frames a little differently
                "catalog_xy": ref.catalog.xy.tolist(), "catalog_fwhm_px": ref.catalog.fwhm_px,
            },
        }
        _atomic_write_bytes(folder / "stack.json", json.dumps(state, default=json_default).encode())
        if stack.log_gen != old_gen:
            # stack.json names the new generation now; the old one is garbage
            (folder / self._log_name(old_gen)).unlink(missing_ok=True)

    @staticmethod
    def _log_name(generation: int) -> str:
        return f"members-{generation:06d}.jsonl"

    @staticmethod
    def _log_lines(members: Iterable[dict[str, Any]], history: Iterable[dict[str, float]]) -> bytes:
        lines = [json.dumps({"member": m}, default=json_default) for m in members]
        lines += [json.dumps({"history": h}, default=json_default) for h in history]
        return "".join(line + "\n" for line in lines).encode()

    def _write_log(self, stack: _Stack, folder: Path) -> None:
        """A new generation of the members log holding every member and the whole history."""
        data = self._log_lines(stack.members, stack.history)
        gen = stack.log_gen + 1
        _atomic_write_bytes(folder / self._log_name(gen), data)
        stack.log_gen, stack.log_bytes = gen, len(data)
        stack.log_lines = len(stack.members) + len(stack.history)
        stack.history_logged = len(stack.history)
        stack.rewrite_log = False

    def _append_log(self, stack: _Stack, folder: Path, changed: Sequence[dict[str, Any]]) -> None:
        """Append the changed members and the new history at the committed end of the log (bytes a
        failed append left past it are overwritten)."""
        new_history = stack.history[stack.history_logged:]
        if not changed and not new_history:
            return
        data = self._log_lines(changed, new_history)
        with open(folder / self._log_name(stack.log_gen), "r+b") as fh:
            fh.seek(stack.log_bytes)
            fh.write(data)
            fh.truncate()
            fh.flush()
            os.fsync(fh.fileno())
        stack.log_bytes += len(data)
        stack.log_lines += len(changed) + len(new_history)
        stack.history_logged = len(stack.history)

    def _read_log(self, folder: Path, log: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, float]]]:
        """Members (last line of each path wins) and history from the committed part of the log; the
        uncommitted tail (a crash between an append and stack.json) is cut off."""
        path = folder / self._log_name(int(log["generation"]))
        committed = int(log["bytes"])
        with open(path, "r+b") as fh:
            data = fh.read()
            if len(data) < committed:
                raise ValueError(f"{path.name} holds {len(data)} bytes, stack.json committed {committed}")
            if len(data) > committed:
                fh.truncate(committed)
        members: dict[str, dict[str, Any]] = {}
        history: list[dict[str, float]] = []
        for line in data[:committed].splitlines():
            entry = json.loads(line)
            if "member" in entry:
                members[entry["member"]["path"]] = entry["member"]
            else:
                history.append(entry["history"])
        return sorted(members.values(), key=_sort_key), history

    def _load_stack(self, path: Path) -> None:
        state = json.loads(path.read_text())
        fmt = state.get("format")
        log = state.get("log") or {}
        if fmt == _STACK_FORMAT:
            members, history = self._read_log(path.parent, log)
        elif fmt == 1:  # members and history inline; the next save moves them to a log
            members, history = list(state["members"]), list(state.get("history") or [])
        else:
            raise ValueError(f"unknown format {fmt!r}")
        stack = _Stack(id=state["id"], target=state["target"], filter=state["filter"],
                       members=members, fixed_reference=state.get("fixed_reference"),
                       version=int(state.get("version", 0)), processed_upto=int(state.get("processed_upto", 0)),
                       final=state.get("final"), dirty=bool(state.get("dirty", False)),
                       closed=bool(state.get("closed", False)), history=history,
                       pointing=None if state.get("pointing") is None else tuple(state["pointing"]),
                       last_active=float(state.get("last_active", 0.0)))
        if fmt == _STACK_FORMAT:
            stack.log_gen, stack.log_bytes = int(log["generation"]), int(log["bytes"])
            stack.log_lines, stack.history_logged = int(log.get("lines", 0)), len(history)
            stack.rewrite_log = False
            current = self._log_name(stack.log_gen)
            for stale in path.parent.glob("members-*.jsonl*"):
                if stale.name != current:  # a generation written by a save that did not commit
                    stale.unlink(missing_ok=True)
        _retally(stack)
        lm = state.get("last_matrix")
        stack.last_matrix = None if lm is None else np.asarray(lm, np.float64)
        self._stacks[stack.id] = stack
        r = state.get("reference")
        store = self.frames_dir / stack.id
        if r is None:
            stack.dirty = stack.dirty or bool(stack.members)
            return
        ref_file = store / f"{r['frame_id']}.npy"
        sat_file = store / f"{r['frame_id']}.sat.npy"
        if not ref_file.exists() or not sat_file.exists():
            stack.dirty = True
            return
        xy = np.asarray(r["xy"], np.float64).reshape(-1, 2)
        shape = tuple(int(v) for v in r["shape"])
        stack.reference = _Reference(
            path=r["path"], frame_id=r["frame_id"], shape=shape, xy=xy, fwhm_px=float(r["fwhm_px"]),
            noise=tuple(float(v) for v in r["noise"]), background=float(r["background"]), metrics=r["metrics"],
            catalog=register.ReferenceCatalog.from_xy(
                np.asarray(r.get("catalog_xy", xy), np.float64).reshape(-1, 2),
                fwhm_px=float(r.get("catalog_fwhm_px", r["fwhm_px"])), shape=(shape[-2], shape[-1])),
            image=np.load(ref_file, mmap_mode="r"), saturated=np.load(sat_file),
        )
        live_dir = path.parent / "live"
        live_stack: LiveStack | None = None
        if (live_dir / "manifest.json").exists():
            try:
                live_stack = LiveStack.load(live_dir, rejections_dir=self._rejections_dir(stack.id))
                self._saved_live[stack.id] = (weakref.ref(live_stack), live_stack.generation)
            except StackwatchError as exc:
                _log.warning("%s: %s; re-applying frames from the store", stack.id, exc)
        if live_stack is None:
            live_stack = self._new_live(stack.id, shape, float(r["background"]))
        stack.live = live_stack
        # frames stacked after the last live checkpoint are re-applied from the frame store
        have = set(live_stack.frame_ids)
        for m in stack.members[: stack.processed_upto]:
            if m.get("status") != "stacked" or m["frame_id"] in have:
                continue
            lv = m.get("live")
            frame = self._stored_frame(stack, m) if lv is not None else None
            if frame is None or lv is None:
                stack.dirty = True
                continue
            live_stack.update(m["frame_id"], frame, weight=float(lv["weight"]), scale=lv["scale"],
                              noise=lv["noise"], rho=float(lv["rho"]))
        # members processed but not in stack.json's order (a crash mid-frame) are redone
        for m in stack.members[stack.processed_upto:]:
            if m.get("status") in ("stacked", "rejected"):
                stack.dirty = True


def _usable_reference(meas: stars.Measurement) -> bool:
    """Absolute sanity for a reference: enough stars and a measured PSF."""
    return meas.metrics.stars >= _MIN_REFERENCE_STARS and _finite(meas.metrics.fwhm_px) is not None


def json_default(value: Any) -> Any:
    """json.dumps ``default`` for numpy scalars and arrays (non-finite floats become null)."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def classify_paths(paths: Iterable[Path]) -> list[tuple[Path, FrameInfo | None, str]]:
    """(path, info, error) for every FITS file under ``paths`` (folders recursed, sorted)."""
    out: list[tuple[Path, FrameInfo | None, str]] = []
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and fitsio.is_fits_name(f.name)
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.exists():
            files.append(p)
        else:
            raise StackwatchError(f"{p}: no such file or folder")
    for f in files:
        try:
            out.append((f, classify(fitsio.read_header(f), str(f)), ""))
        except FrameError as exc:
            out.append((f, None, exc.reason))
    return out
