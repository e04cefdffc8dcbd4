"""The running service: watch a folder, catalogue every file, process frames, keep the stacks.

Lifecycle (owned tasks, nothing fire-and-forget)::

    service = Service(config, watch_dir=..., state_dir=...)
    await service.startup()     # catalogue, pipeline, watcher, start-up scan, tasks; READY=1
    await service.run()         # until request_stop() (SIGTERM/SIGINT)
    await service.shutdown()    # stop intake, finish or abandon the frame in flight, checkpoint

Threads: the watchdog thread only hands paths to the loop; the catalogue is written from the loop
thread only (its single writer); header reading, hashing and every pipeline call run in a
``ThreadPoolExecutor`` (numba kernels release the GIL), so the web view keeps answering while a
26 MP frame is processed.

Flow of one file: watcher -> intake (stat, SHA-1, header, classify; retries with back-off for
unreadable files; duplicates by content) -> ``pending`` in the catalogue (the persistent queue) ->
processor (one frame at a time: calibration frames to the library, lights through the pipeline) ->
result in the catalogue -> events. Calibration frames waiting go before lights.

Recovery: on start, ``processing`` rows return to ``pending`` and the folder is scanned again, so a
kill -9 reprocesses at most the frame in flight (the pipeline's stack update is idempotent by frame
path) and loses nothing. A full state disk pauses processing with a clear status until space returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from stackwatch.daemon.catalog import DONE_STATUSES, Catalog
from stackwatch.daemon.config import Config, LiveConfig, load_config
from stackwatch.daemon.events import EventBus, Listener
from stackwatch.daemon.sdnotify import SdNotifier
from stackwatch.daemon.watcher import FileFilter, Watcher, scan_folder
from stackwatch.engine.errors import FrameError, StackwatchError

__all__ = [
    "Identified",
    "PipelineLike",
    "Service",
    "check_complete",
    "default_identify",
    "exact_pass_due",
    "hash_file",
]

_log = logging.getLogger("stackwatch.service")

_BACKLOG_INTAKE_S = 120.0  # at start, read the backlog's headers this long before processing begins
_PRODUCTS_WANTED_S = 600.0  # keep prefetching a stack's products this long after someone asked for them
_FORCED_EXACT_PASS = 10**9  # a stack's count of new frames that asks for an exact pass at the next idle moment

CALIBRATION_KINDS = frozenset({"bias", "dark", "flat", "darkflat"})


def exact_pass_due(*, new_frames: int, stack_frames: int, estimate_s: float | None, gap_s: float | None,
                   quiet: bool, live: LiveConfig) -> bool:
    """Whether the idle service should run a stack's exact pass now.

    new_frames: frames added since its last exact pass (`_FORCED_EXACT_PASS` when a request asks
    for one); stack_frames: frames in the stack; estimate_s: the pass's estimated duration (None:
    unknown); gap_s: the usual time between lights (None: not known yet); quiet: no light for
    `service.exact_pass_idle_s` (the end of the night).
    """
    if new_frames >= _FORCED_EXACT_PASS:
        return True
    if new_frames <= 0:  # already exact: a pass now would redo the same integration
        return False
    if quiet:
        return True
    # the pass holds the pipeline: one longer than half the usual gap between frames (100 frames of
    # 26 MP: ~2.5 min, against 2-min subs) would delay the next frame by minutes, so it waits for
    # the end of the night or a request
    fits = estimate_s is None or gap_s is None or estimate_s <= 0.5 * gap_s
    # a stack's first frames: the batch rule for so few (percentile) is one the live stack cannot
    # follow once a pixel has more samples than it retains, its one-way decisions would outlive the
    # switch to winsorized clipping at 6 frames, and an exact pass of a few frames is short
    # (measured on the test night: live − batch RMS 0.15σ at 5 frames without, 0.16σ at 6-7
    # frames with passes up to the 5th only, 0.08σ with this); up to k_high + k_low + 1 frames the
    # live image computes the batch rule itself
    early = int(live.k_high) + int(live.k_low) + 2 <= stack_frames <= int(live.exact_pass_early_frames)
    if (new_frames >= max(1, int(live.exact_pass_frames)) or early) and fits:
        return True
    if estimate_s is None:
        return False
    # after every frame while the pass is cheap, in seconds or against the usual gap: the live image
    # is then the batch result after every frame (between passes it differs by single borderline
    # decisions: RMS < 0.1σ, max 3-4σ of the stack's noise at 10-16 frames)
    limit = max(0.0, float(live.exact_pass_max_s))
    if gap_s is not None and float(live.exact_pass_gap_fraction) > 0:
        limit = max(limit, float(live.exact_pass_gap_fraction) * gap_s)
    return estimate_s <= limit


class PipelineLike(Protocol):
    """What the service needs from ``stackwatch.daemon.pipeline.Pipeline``."""

    def add_calibration(self, path: Path, info: Any) -> list[dict[str, Any]]: ...

    def process_light(self, path: Path, info: Any) -> dict[str, Any]: ...

    def stacks(self) -> list[dict[str, Any]]: ...

    def stack_products(self, stack_id: str) -> dict[str, Any] | None: ...

    def finalize(self, stack_id: str) -> dict[str, Any]: ...

    def checkpoint(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class Identified:
    """What intake learns about a file: its frame info (from the header) and content hash."""

    info: Any
    kind: str
    sha1: str
    size: int
    mtime: float


def hash_file(path: Path, *, chunk_bytes: int = 1 << 22) -> str:
    """SHA-1 of a file's bytes."""
    h = hashlib.sha1(usedforsecurity=False)
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk_bytes)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def default_identify(path: Path, config: Config) -> Any:
    """Check the file is complete, read the header and classify (fitsio + classify, imported lazily)."""
    from stackwatch.engine.classify import classify
    from stackwatch.engine.fitsio import read_header

    check_complete(path)
    return classify(read_header(path), str(path))


_BLOCK = 2880


def check_complete(path: Path) -> None:
    """Raise ``FrameError`` unless the file holds whole FITS HDUs (header and data) to its end.

    A capture program that writes a frame in several chunks closes and reopens the file; each close
    raises an event. This reads only the headers (80-character cards up to END) and checks that each
    HDU's data (``|BITPIX|/8 * GCOUNT * (PCOUNT + NAXIS1*...*NAXISn)`` bytes) is present, so a
    half-written file is retried instead of failed. Compressed files (``.gz``) are decompressed to
    check their length and CRC.
    """
    size = path.stat().st_size
    if size == 0:
        raise FrameError(path, "empty file (0 bytes)")
    if path.name.lower().endswith(".gz"):
        import gzip
        import zlib

        try:
            with gzip.open(path, "rb") as fh:
                while fh.read(1 << 22):
                    pass
        except (EOFError, OSError, zlib.error) as exc:
            raise FrameError(path, f"truncated or corrupt gzip file ({exc})") from None
        return
    with open(path, "rb") as fh:
        offset = 0
        hdus = 0
        while offset < size:
            cards: dict[str, str] = {}
            fh.seek(offset)
            ended = False
            while not ended:
                block = fh.read(_BLOCK)
                if len(block) < _BLOCK:
                    if hdus > 0 and not block.strip(b"\0 "):
                        return  # trailing padding after the last HDU
                    raise FrameError(path, f"truncated file: header {hdus + 1} ends at byte {size} "
                                           "(still being written?)")
                offset += _BLOCK
                for i in range(0, _BLOCK, 80):
                    card = block[i:i + 80].decode("ascii", "replace")
                    keyword = card[:8].strip()
                    if keyword == "END":
                        ended = True
                        break
                    if (card[8:10] == "= " and keyword in ("BITPIX", "PCOUNT", "GCOUNT", "XTENSION", "SIMPLE")) or (
                            keyword.startswith("NAXIS") and card[8:10] == "= "):
                        cards[keyword] = card[10:].split("/")[0].strip()
            if hdus == 0 and "SIMPLE" not in cards:
                raise FrameError(path, "not a FITS file (no SIMPLE keyword in the first header)")
            try:
                naxis = int(cards.get("NAXIS", "0"))
                bitpix = abs(int(cards.get("BITPIX", "0")))
                pcount = int(cards.get("PCOUNT", "0"))
                gcount = int(cards.get("GCOUNT", "1"))
                axes = [int(cards.get(f"NAXIS{k}", "0")) for k in range(1, naxis + 1)]
            except ValueError:
                raise FrameError(path, f"corrupt FITS header {hdus + 1} (bad NAXIS/BITPIX)") from None
            count = 0
            if naxis > 0:
                count = 1
                for n in axes:
                    count *= n
            data = bitpix // 8 * gcount * (pcount + count)
            hdus += 1
            if offset + data > size:
                raise FrameError(path, f"truncated file: {size} bytes, the header needs {offset + data} "
                                       "(still being written?)")
            offset += -(-data // _BLOCK) * _BLOCK


def _info_dict(info: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(info) and not isinstance(info, type):
        out = dataclasses.asdict(info)
    elif isinstance(info, dict):
        out = dict(info)
    else:
        out = {k: v for k, v in vars(info).items() if not k.startswith("_")}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def _info_key(info: Any) -> Any:
    key = getattr(info, "calibration_key", None)
    if callable(key):
        key = key()
    if key is None:
        return None
    if dataclasses.is_dataclass(key) and not isinstance(key, type):
        return dataclasses.asdict(key)
    if isinstance(key, tuple):
        return list(key)
    return key if isinstance(key, str | int | float | list | dict) else str(key)


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower():
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and _is_disk_full(cause)


@functools.cache
def _package_version() -> str:
    # read once: importlib.metadata searches sys.path and parses the metadata on every call, which
    # cost more than the rest of status() (polled by the web view while frames are processed)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stackwatch")
    except PackageNotFoundError:
        return "0+unknown"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Service:
    """The live-stacking service; also the object the web app talks to (``status()``, ``list_frames()``...).

    Parameters
    ----------
    config : Config
        The configuration (``service``, ``watch`` and ``live`` sections are read here; the rest goes
        to the pipeline).
    watch_dir : Path
        The capture folder (read only).
    state_dir : Path
        Catalogue, library, frame store and stacks. Must not lie inside ``watch_dir``.
    config_path : Path, optional
        The TOML file to re-read on SIGHUP (``reload_config``). Default is None (defaults only).
    pipeline_factory : callable, optional
        ``(config, state_dir) -> Pipeline``. Default is ``stackwatch.daemon.pipeline.Pipeline``.
    identify : callable, optional
        ``(path, config) -> FrameInfo``; raises ``FrameError`` for an unreadable file. Default is
        ``default_identify`` (read_header + classify).
    free_bytes : callable, optional
        ``(state_dir) -> int`` free bytes; injected by the disk-full tests. Default is
        ``shutil.disk_usage(...).free``.
    notifier : SdNotifier, optional
        systemd notifications. Default reads ``NOTIFY_SOCKET`` from the environment.
    clock : callable, optional
        Monotonic seconds. Default is ``time.monotonic``.
    """

    def __init__(
        self,
        config: Config,
        *,
        watch_dir: str | Path,
        state_dir: str | Path,
        config_path: str | Path | None = None,
        pipeline_factory: Callable[[Config, Path], PipelineLike] | None = None,
        identify: Callable[[Path, Config], Any] | None = None,
        free_bytes: Callable[[Path], int] | None = None,
        notifier: SdNotifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.watch_dir = Path(os.path.abspath(os.path.expanduser(watch_dir)))
        self.state_dir = Path(os.path.abspath(os.path.expanduser(state_dir)))
        self.config_path = Path(config_path) if config_path is not None else None
        if self.state_dir == self.watch_dir or self.watch_dir in self.state_dir.parents:
            raise StackwatchError(
                f"state folder {self.state_dir} is inside the watched folder {self.watch_dir}: "
                "the service never writes into the watched folder; choose another --state"
            )
        self._pipeline_factory = pipeline_factory
        self._identify = identify or default_identify
        self._free_bytes = free_bytes or (lambda p: shutil.disk_usage(p).free)
        self.notifier = notifier if notifier is not None else SdNotifier()
        self._clock = clock
        self.events = EventBus()

        self.catalog: Catalog | None = None
        self.pipeline: PipelineLike | None = None
        self.watcher: Watcher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self._work = asyncio.Event()
        self._intake_q: asyncio.Queue[Path] = asyncio.Queue()
        self._intake_waiting: set[str] = set()
        self._retry_handles: dict[str, asyncio.TimerHandle] = {}
        self._attempts: dict[str, int] = {}
        self._arrived: dict[str, float] = {}
        # when the last lights arrived: the usual gap between frames says how long an exact pass may take
        # without holding the next frame back
        self._light_arrivals: deque[float] = deque(maxlen=12)
        self._infos: dict[str, Any] = {}
        self._products_cache: dict[str, dict[str, Any] | None] = {}
        self._products_wanted: dict[str, float] = {}
        self._stacks_cache: list[dict[str, Any]] = []
        self._warnings: deque[str] = deque(maxlen=50)
        self._activity = "starting"
        self._paused_reason = ""
        self._pause_episode = False
        self._pause_logged_resume = False
        self._resume_free_bytes = 0.0
        self._paused_at = 0.0
        self._watch_missing = False
        self._in_flight: str | None = None
        self._since_checkpoint = 0
        self._last_checkpoint = clock()
        self._last_processed = clock()
        self._new_since_final: dict[str, int] = {}
        self._finalizing: asyncio.Task[Any] | None = None
        self._recal_task: asyncio.Task[None] | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._calibration_added_at: float | None = None
        self._recal_again = False
        self.recalibration: dict[str, Any] = {"running": False, "frames": 0, "message": ""}
        self._bg_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._last_frame: dict[str, Any] | None = None
        self.started_at = _now_iso()
        self.web_url: str | None = None
        self._started = False

    # ------------------------------------------------------------------------------------------
    # lifecycle

    async def startup(self) -> None:
        """Open the catalogue and the pipeline, start the watcher, scan the folder, start the tasks."""
        self._loop = asyncio.get_running_loop()
        self.events.bind(self._loop)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(self.state_dir / "catalog.sqlite")
        requeued = self.catalog.requeue_in_flight()
        if requeued:
            _log.info("recovery: %d frame(s) interrupted in flight are queued again", requeued)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(2, int(self.config.service.workers)), thread_name_prefix="stackwatch-work"
        )
        self._bg_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stackwatch-bg")
        self._activity = "loading the pipeline"
        self.pipeline = await self._run_in_executor(self._make_pipeline)
        await self._refresh_stacks()
        masters = getattr(self.pipeline, "masters", None)
        if callable(masters):
            for m in await self._run_in_executor(masters):
                self.catalog.upsert_master(m)
        self._tasks = [
            asyncio.create_task(self._intake_loop(), name="intake"),
            asyncio.create_task(self._supervise_loop(), name="supervise"),
        ]
        self._start_watcher()
        await self._initial_scan()
        for row in self.catalog.pending(identified=False):
            self._submit(Path(row["path"]))
        self._tasks.append(asyncio.create_task(self._process_loop(), name="process"))
        self._work.set()
        self._schedule_recalibration()  # a run interrupted by a restart is picked up again
        self._started = True
        self._activity = "idle"
        counts = self.catalog.counts()
        _log.info(
            "stackwatch service started: watching %s, state in %s; %d file(s) catalogued, %d pending",
            self.watch_dir, self.state_dir, counts["seen"], counts["pending"],
        )
        self.notifier.ready(self._status_line())

    def _make_pipeline(self) -> PipelineLike:
        if self._pipeline_factory is not None:
            return self._pipeline_factory(self.config, self.state_dir)
        try:
            from stackwatch.daemon.pipeline import Pipeline
        except ImportError as exc:
            raise StackwatchError(f"the processing pipeline cannot be loaded ({exc})") from None
        return Pipeline(self.config, self.state_dir)  # type: ignore[return-value]

    async def run(self) -> None:
        """Wait until ``request_stop`` (a task that died unexpectedly also stops the service)."""
        stop_wait = asyncio.create_task(self._stop.wait(), name="stop-wait")
        try:
            done, _ = await asyncio.wait([stop_wait, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop_wait and not task.cancelled() and task.exception() is not None:
                    exc = task.exception()
                    _log.error("service task %s died: %r", task.get_name(), exc, exc_info=exc)
                    raise StackwatchError(f"internal error in {task.get_name()}: {exc!r}")
        finally:
            stop_wait.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stop_wait

    def request_stop(self) -> None:
        """Ask the service to stop (SIGTERM, SIGINT)."""
        if not self._stop.is_set():
            _log.info("stopping: finishing the frame in flight")
            self._activity = "stopping"
            self.notifier.stopping(f"stopping; {self._status_line()}")
        self._stop.set()
        self._work.set()

    async def shutdown(self, timeout_s: float | None = None) -> None:
        """Stop intake, let the frame in flight finish (up to ``timeout_s``), checkpoint, close."""
        timeout = float(self.config.service.shutdown_timeout_s if timeout_s is None else timeout_s)
        self._stop.set()
        self._work.set()
        if self.watcher is not None:
            self.watcher.stop()
        for handle in self._retry_handles.values():
            handle.cancel()
        self._retry_handles.clear()
        # The processor stops between frames; give the frame in flight its time.
        process = [t for t in self._tasks if t.get_name() == "process"]
        others = [t for t in self._tasks if t.get_name() != "process"]
        for task in others:
            task.cancel()
        if process:
            _done, pending = await asyncio.wait(process, timeout=timeout)
            if pending:
                _log.warning("frame in flight %s did not finish within %.0f s; it will be redone at restart",
                             self._in_flight, timeout)
                for task in pending:
                    task.cancel()
        everything = [*self._tasks, *self._background]
        for task in everything:
            if not task.done():
                task.cancel()
        if everything:
            await asyncio.wait(everything, timeout=max(1.0, timeout))
        self._tasks = []
        if self.pipeline is not None and self._started:
            try:
                await asyncio.wait_for(self._run_in_executor(self.pipeline.checkpoint), timeout=timeout)
            except Exception as exc:  # a failed final checkpoint is reported, the stop goes on
                _log.warning("final checkpoint failed: %s", exc)
        if self.pipeline is not None:
            close = getattr(self.pipeline, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()
        for executor in (self._executor, self._bg_executor):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        if self.catalog is not None:
            self.catalog.close()
            self.catalog = None
        self.notifier.close()
        _log.info("stackwatch service stopped")

    def reload_config(self) -> bool:
        """Re-read the configuration file (SIGHUP); keeps the old one when the new one is invalid."""
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except StackwatchError as exc:
            self._warn(f"configuration not reloaded: {exc}")
            self.notifier.status(self._status_line())
            return False
        old = self.config
        self.config = new
        reload = getattr(self.pipeline, "reload", None)
        if callable(reload):
            reload(new)
        if dataclasses.asdict(old.watch) != dataclasses.asdict(new.watch) and self._loop is not None:
            self._restart_watcher()
        _log.info("configuration reloaded from %s", self.config_path or "defaults")
        self.notifier.ready(self._status_line())
        self.events.emit("status", self.status())
        return True

    # ------------------------------------------------------------------------------------------
    # watching

    def _file_filter(self) -> FileFilter:
        w = self.config.watch
        return FileFilter(
            root=self.watch_dir,
            ignore_patterns=tuple(w.ignore_patterns),
            extensions=tuple(w.extensions),
            exclude_dirs=(self.state_dir,),
            recursive=w.recursive,
        )

    def _start_watcher(self) -> None:
        assert self._loop is not None
        w = self.config.watch
        self.watcher = Watcher(
            self._file_filter(), self._on_file, loop=self._loop, polling=w.polling,
            poll_interval_s=w.poll_interval_s, stable_for_s=w.stable_for_s, clock=self._clock,
        )
        try:
            self.watcher.start()
            self._watch_missing = False
        except OSError as exc:
            self._watch_missing = True
            self._warn(f"watch folder {self.watch_dir} is not available ({exc.strerror or exc}); waiting for it")

    def _restart_watcher(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self._start_watcher()

    async def _initial_scan(self) -> None:
        """Everything in the folder not yet catalogued, or changed since, goes to intake."""
        assert self.catalog is not None
        known = self.catalog.all_paths()
        flt = self._file_filter()

        def scan() -> list[tuple[Path, int, float]]:
            out = []
            for p in scan_folder(flt):
                try:
                    st = p.stat()
                except OSError:
                    continue
                out.append((p, st.st_size, st.st_mtime))
            return out

        found = await self._run_in_executor(scan)
        n = 0
        for path, size, mtime in found:
            if known.get(str(path)) != (size, mtime):
                self._submit(path)
                n += 1
        if n:
            _log.info("scan of %s: %d new or changed file(s)", self.watch_dir, n)

    def _on_file(self, path: Path) -> None:
        """Loop thread: the watcher reports a complete file."""
        key = str(path)
        self._arrived.setdefault(key, self._clock())
        handle = self._retry_handles.pop(key, None)
        if handle is not None:  # a new event beats the back-off: try now, with a fresh count (the
            handle.cancel()  # file was written again, it is not failing)
            self._attempts.pop(key, None)
        self._submit(path)

    def _submit(self, path: Path) -> None:
        key = str(path)
        if key in self._intake_waiting:
            return
        self._intake_waiting.add(key)
        self._intake_q.put_nowait(path)

    # ------------------------------------------------------------------------------------------
    # intake

    async def _intake_loop(self) -> None:
        while not self._stop.is_set():
            path = await self._intake_q.get()
            self._intake_waiting.discard(str(path))
            try:
                await self._intake(path)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _is_disk_full(exc):
                    self._pause(f"state folder {self.state_dir} is full ({exc})")
                    self._schedule_retry(path, float(self.config.service.disk_check_interval_s))
                else:
                    _log.exception("intake of %s failed", path)
                    self._warn(f"{path.name}: intake failed: {exc!r}")
            finally:
                self._intake_q.task_done()

    async def _intake(self, path: Path) -> None:
        assert self.catalog is not None
        key = str(path)
        try:
            st = path.stat()
        except FileNotFoundError:
            row = self.catalog.get_by_path(path)
            if row is not None and row["status"] == "pending":
                self.catalog.set_status(row["id"], "missing", "deleted before it could be read")
                _log.warning("%s: deleted before it could be read", path.name)
            self._forget(key)
            return
        except OSError as exc:
            self._warn(f"{path}: cannot stat: {exc.strerror or exc}")
            return
        file_id, state = self.catalog.see(path, size=st.st_size, mtime=st.st_mtime)
        row = self.catalog.get(file_id)
        assert row is not None
        if state == "unchanged" and (row["status"] != "pending" or row["kind"] is not None):
            self._forget(key)
            return
        if state == "new":
            self.events.emit("frame_received", {"id": file_id, "path": key, "name": path.name})
        try:
            ident = await self._run_in_executor(self._identify_file, path)
        except FileNotFoundError:
            self.catalog.set_status(file_id, "missing", "deleted before it could be read")
            _log.warning("%s: deleted before it could be read", path.name)
            self._forget(key)
            return
        except (StackwatchError, OSError, ValueError, EOFError) as exc:
            self._read_failed(file_id, path, exc)
            return
        self._attempts.pop(key, None)
        if row["status"] not in ("pending", "processing"):
            # a finished file was rewritten: reprocess only if its content changed
            if not self.catalog.rewritten(file_id, size=ident.size, mtime=ident.mtime, sha1=ident.sha1):
                self._forget(key)
                return
        self._identified(file_id, path, ident)

    def _identify_file(self, path: Path) -> Identified:
        """Worker thread: hash and classify; a file that changes meanwhile is not ready yet."""
        st0 = path.stat()
        if st0.st_size == 0:
            raise FrameError(path, "empty file (0 bytes)")
        sha1 = hash_file(path)
        info = self._identify(path, self.config)
        st1 = path.stat()
        if (st1.st_size, st1.st_mtime_ns) != (st0.st_size, st0.st_mtime_ns):
            raise FrameError(path, "still being written (size changed while reading)")
        kind = str(getattr(info, "kind", None) or (info.get("kind") if isinstance(info, dict) else "unknown"))
        return Identified(info=info, kind=kind, sha1=sha1, size=st1.st_size, mtime=st1.st_mtime)

    def _read_failed(self, file_id: int, path: Path, exc: BaseException) -> None:
        assert self.catalog is not None
        key = str(path)
        reason = exc.reason if isinstance(exc, FrameError) else (
            f"{exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)
        )
        attempts = self._attempts.get(key, 0) + 1
        self._attempts[key] = attempts
        retry_max = max(1, int(self.config.watch.retry_max))
        if attempts < retry_max:
            delay = float(self.config.watch.retry_backoff_s) * 2 ** (attempts - 1)
            self.catalog.set_status(file_id, "pending", f"retrying ({attempts}/{retry_max}): {reason}",
                                    attempts=attempts)
            _log.info("%s: not readable yet (%s); retry %d/%d in %.1f s", path.name, reason, attempts,
                      retry_max - 1, delay)
            self._schedule_retry(path, delay)
            return
        self.catalog.set_status(file_id, "failed", f"unreadable after {attempts} attempts: {reason}",
                                attempts=attempts)
        self._forget(key)
        msg = f"{path.name}: failed: unreadable after {attempts} attempts: {reason}"
        _log.warning(msg)
        self.events.emit("frame_processed", {"id": file_id, "path": key, "name": path.name, "status": "failed",
                                             "reason": reason})

    def _schedule_retry(self, path: Path, delay_s: float) -> None:
        assert self._loop is not None
        key = str(path)
        old = self._retry_handles.pop(key, None)
        if old is not None:
            old.cancel()

        def fire() -> None:
            self._retry_handles.pop(key, None)
            if not self._stop.is_set():
                self._submit(path)

        self._retry_handles[key] = self._loop.call_later(delay_s, fire)

    def _forget(self, key: str) -> None:
        self._attempts.pop(key, None)
        self._arrived.pop(key, None)
        handle = self._retry_handles.pop(key, None)
        if handle is not None:
            handle.cancel()

    def _identified(self, file_id: int, path: Path, ident: Identified) -> None:
        assert self.catalog is not None
        info = ident.info
        info_d = _info_dict(info)
        target = str(info_d.get("object") or "") or None
        self.catalog.set_identity(
            file_id, sha1=ident.sha1, kind=ident.kind, key=_info_key(info), info=info_d, target=target,
            filter=str(info_d.get("filter") or ""), exposure_s=info_d.get("exposure_s"),
            date_obs=info_d.get("date_obs"),
        )
        same = self.catalog.find_same_content(ident.sha1, other_than=file_id)
        if same is not None:
            reason = f"same content as {same['name']} (file {same['id']}): processed once"
            self.catalog.set_status(file_id, "duplicate", reason, duplicate_of=same["id"])
            _log.info("%s: duplicate: %s", path.name, reason)
            self.events.emit("frame_processed", {"id": file_id, "path": str(path), "name": path.name,
                                                 "status": "duplicate", "reason": reason})
            self._arrived.pop(str(path), None)
            return
        if ident.kind not in CALIBRATION_KINDS and ident.kind != "light":
            reason = f"unknown frame type ({ident.kind}): no IMAGETYP/FRAME keyword or folder/name hint"
            self.catalog.set_status(file_id, "failed", reason)
            _log.warning("%s: failed: %s", path.name, reason)
            self.events.emit("frame_processed", {"id": file_id, "path": str(path), "name": path.name,
                                                 "status": "failed", "reason": reason})
            return
        self.catalog.set_status(file_id, "pending", "")
        self._infos[str(path)] = info
        self._work.set()

    # ------------------------------------------------------------------------------------------
    # processing

    async def _process_loop(self) -> None:
        assert self.catalog is not None
        # Read every header of the start-up backlog first, so that waiting calibration frames go
        # before the lights that need them (bounded: a huge backlog starts after a while anyway).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._intake_q.join(), timeout=_BACKLOG_INTAKE_S)
        while not self._stop.is_set():
            if self._paused_reason:
                await self._wait_work(float(self.config.service.disk_check_interval_s))
                self._check_disk()
                continue
            self._check_disk()
            if self._paused_reason:
                continue
            rows = self.catalog.pending(identified=True, limit=1)
            if not rows:
                self._activity = "idle" if not self._watch_missing else self._activity
                self._maybe_finalize()
                self._maybe_flush_masters()
                await self._wait_work(1.0)
                await self._maybe_checkpoint(idle=True)
                continue
            await self._process_row(rows[0])
            await self._maybe_checkpoint(idle=False)

    async def _wait_work(self, timeout_s: float) -> None:
        self._work.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._work.wait(), timeout=timeout_s)

    async def _process_row(self, row: dict[str, Any]) -> None:
        assert self.catalog is not None and self.pipeline is not None
        path = Path(row["path"])
        kind = str(row["kind"])
        info = self._infos.pop(str(path), None)
        file_id = int(row["id"])
        self._in_flight = path.name
        self._activity = f"processing {path.name} ({kind})"
        self.catalog.set_status(file_id, "processing")
        t0 = self._clock()
        prefetch = getattr(self.pipeline, "prefetch", None)
        if kind == "light" and callable(prefetch):
            # a backlog: the next light is read while this one is processed
            nxt = self.catalog.pending(identified=True, limit=1)
            if nxt and nxt[0]["kind"] == "light":
                prefetch(Path(nxt[0]["path"]))
        try:
            if kind == "light":
                record = await self._run_in_executor(self._light_job, path, info, row)
            else:
                masters = await self._run_in_executor(self._calibration_job, path, info, row)
                record = {"status": "library", "reason": "", "masters_updated": masters}
        except Exception as exc:
            if _is_disk_full(exc):
                self.catalog.set_status(file_id, "pending", "waiting: state folder full")
                self._pause(f"state folder {self.state_dir} is full ({exc})")
                self._in_flight = None
                return
            if isinstance(exc, FileNotFoundError) and not path.exists():
                record = {"status": "missing", "reason": "deleted before it could be processed"}
            elif isinstance(exc, StackwatchError):
                record = {"status": "failed", "reason": exc.reason if isinstance(exc, FrameError) else str(exc)}
            else:  # a bug: log the traceback once, keep going with the next frame
                _log.exception("%s: internal error", path.name)
                record = {"status": "failed", "reason": f"internal error: {type(exc).__name__}: {exc}"}
        finally:
            self._in_flight = None
        elapsed = self._clock() - t0
        self._last_processed = self._clock()
        self._pause_episode = False
        # what the worker fetched for the service, not part of the frame's record (stored in the
        # catalogue: with every member's record in it, each row grew with the night)
        stacks = record.pop("_stacks", None)
        members = record.pop("_members", None)
        masters_now = record.pop("_masters", None)
        status = str(record.get("status"))
        if status not in DONE_STATUSES:
            record = {**record, "status": "failed", "reason": f"pipeline returned status {status!r}"}
            status = "failed"
        try:
            self.catalog.record_result(file_id, record)
        except Exception as exc:
            if _is_disk_full(exc):
                self.catalog.set_status(file_id, "pending", "waiting: state folder full")
                self._pause(f"state folder {self.state_dir} is full ({exc})")
                return
            raise
        arrived = self._arrived.pop(str(path), None)
        latency = None if arrived is None else self._clock() - arrived
        if status == "library":
            self._calibration_added_at = self._clock()
            await self._after_calibration(record.get("masters_updated") or [])
        elif status in ("stacked", "rejected"):
            if arrived is not None:
                self._light_arrivals.append(arrived)
            self._since_checkpoint += 1
            sid = str(record.get("stack_id"))
            self._new_since_final[sid] = self._new_since_final.get(sid, 0) + 1
            if stacks is not None:
                self._stacks_cache = list(stacks)
            self.catalog.upsert_stacks(self._stacks_cache)
        self._sync_members(members, skip=str(path))
        self._sync_masters(masters_now)
        self._log_frame(path, kind, record, elapsed, latency)
        event = {
            "id": file_id, "path": str(path), "name": path.name, "kind": kind, "status": status,
            "reason": record.get("reason", ""), "stack_id": record.get("stack_id"), "elapsed_s": elapsed,
            "latency_s": latency,
            # where the time went: closed -> processing started (intake: hash, header; queue), the
            # pipeline's stages, and the service's bookkeeping after it (catalogue, stacks, events)
            "stages": {
                "intake_queue_s": None if arrived is None else t0 - arrived,
                **{k: v for k, v in (record.get("timings") or {}).items() if isinstance(v, int | float)},
                **{f"cpu_{k}": v for k, v in ((record.get("timings") or {}).get("cpu_s") or {}).items()},
                "job_s": elapsed,
                "catalog_s": self._clock() - t0 - elapsed,
            },
        }
        self._last_frame = event
        self.events.emit("frame_processed", event)
        if status == "stacked":
            stack = next((s for s in self._stacks_cache if str(s.get("id")) == str(record.get("stack_id"))), None)
            self.events.emit("stack_updated", dict(stack) if stack else {"id": record.get("stack_id")})
        self.notifier.status(self._status_line())

    def _light_job(self, path: Path, info: Any, row: dict[str, Any]) -> dict[str, Any]:
        """Worker thread: the light through the pipeline, then the stacks' records (same thread)."""
        assert self.pipeline is not None
        if info is None:
            info = self._info_from_row(row)
        record = dict(self.pipeline.process_light(path, info))
        members = getattr(self.pipeline, "members", None)
        take_rebuilt = getattr(self.pipeline, "take_rebuilt", None)
        if callable(members) and record.get("stack_id"):
            # a light can make the pipeline rebuild its stack (out of order, new reference, better
            # master): the other members' verdicts may change with it. Only rebuilt stacks are read
            # back (when the pipeline says which): reading every member after every frame made the
            # per-frame cost grow with the night
            rebuilt = list(take_rebuilt()) if callable(take_rebuilt) else [str(record["stack_id"])]
            record["_members"] = []
            for sid in rebuilt:
                with contextlib.suppress(KeyError):
                    record["_members"] += list(members(sid))
        if record.get("status") in ("stacked", "rejected"):
            record["_stacks"] = self.pipeline.stacks()
        masters = getattr(self.pipeline, "masters", None)
        if callable(masters):  # the pipeline integrates waiting masters before a light uses them
            record["_masters"] = list(masters())
            sid = str(record.get("stack_id"))
            if self._clock() - self._products_wanted.get(sid, -1e18) < _PRODUCTS_WANTED_S:
                # someone is looking at this stack: fetch its products here, off the loop
                self._products_cache[sid] = self.pipeline.stack_products(sid)
        return record

    async def _sync_rebuilt(self) -> None:
        """Catalogue verdicts of the stacks the pipeline rebuilt outside a light's processing."""
        take = getattr(self.pipeline, "take_rebuilt", None)
        members = getattr(self.pipeline, "members", None)
        if not callable(take) or not callable(members):
            return

        def fetch() -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            for sid in take():
                with contextlib.suppress(KeyError):
                    out += list(members(sid))
            return out

        self._sync_members(await self._run_in_background(fetch))

    def _sync_members(self, members: list[dict[str, Any]] | None, *, skip: str = "") -> int:
        """Bring the catalogue in line with the pipeline's records of a stack's lights (after a rebuild
        their verdicts can change); returns how many rows changed."""
        if not members or self.catalog is None:
            return 0
        changed = 0
        for rec in members:
            p = str(rec.get("path") or "")
            status = rec.get("status")
            if not p or p == skip or status not in ("stacked", "rejected", "failed"):
                continue
            row = self.catalog.get_by_path(p)
            if row is None or row["status"] not in ("stacked", "rejected", "failed"):
                continue
            if (row["status"], row.get("reason") or "", row.get("weight"), row["provisional"]) != (
                    status, rec.get("reason") or "", rec.get("weight"), bool(rec.get("provisional", False))):
                self.catalog.record_result(row["id"], rec)
                changed += 1
        return changed

    def _sync_masters(self, masters: list[dict[str, Any]] | None) -> None:
        if not masters or self.catalog is None:
            return
        def ident(m: dict[str, Any]) -> str:  # what identifies a master version (not its age)
            return json.dumps({k: v for k, v in m.items() if k != "age_days"}, sort_keys=True, default=str)

        known = {ident(m) for m in self.catalog.masters()}
        for m in masters:
            if ident(m) not in known:
                self.catalog.upsert_master(m)
                self.events.emit("master_updated", m)

    def _calibration_job(self, path: Path, info: Any, row: dict[str, Any]) -> list[dict[str, Any]]:
        assert self.pipeline is not None
        if info is None:
            info = self._info_from_row(row)
        return list(self.pipeline.add_calibration(path, info) or [])

    def _info_from_row(self, row: dict[str, Any]) -> Any:
        """Worker thread: the FrameInfo of a file queued before a restart, read again from its header
        (cheap) so the pipeline gets the real object."""
        return self._identify(Path(row["path"]), self.config)

    def _maybe_flush_masters(self) -> None:
        """When idle and no calibration frame came for ``library.master_debounce_s``, re-integrate the
        masters that still have members waiting (the flats of dawn, with no light after them)."""
        if self._calibration_added_at is None or not callable(getattr(self.pipeline, "flush_masters", None)):
            return
        if self._clock() - self._calibration_added_at < float(self.config.library.master_debounce_s):
            return
        if self._flush_task is not None and not self._flush_task.done():
            return
        self._calibration_added_at = None
        self._flush_task = asyncio.create_task(self._flush_masters(), name="flush-masters")
        self._background.add(self._flush_task)
        self._flush_task.add_done_callback(self._background.discard)

    async def _flush_masters(self) -> None:
        assert self.pipeline is not None
        try:
            masters = await self._run_in_background(self.pipeline.flush_masters)  # type: ignore[attr-defined]
        except Exception as exc:
            if _is_disk_full(exc):
                self._pause(f"state folder {self.state_dir} is full (masters: {exc})")
            else:
                _log.exception("building the masters failed")
                self._warn(f"building the masters failed: {exc}")
            return
        if masters:
            await self._after_calibration(list(masters))
        await self._sync_pipeline_masters()

    async def _sync_pipeline_masters(self) -> None:
        """Bring the catalogue's masters up to the pipeline's. A rebuild (recalibration) matches lights to
        masters, which integrates calibration frames still waiting for their debounce: such a master is
        never returned by `flush_masters` and reached the catalogue only with the next light, so a night
        whose flats came last could end without its master flat in the catalogue."""
        fn = getattr(self.pipeline, "masters", None)
        if not callable(fn):
            return
        try:
            masters = await self._run_in_background(fn)
        except Exception as exc:  # reporting only; the next light syncs them again
            _log.warning("reading the masters failed: %s", exc)
            return
        self._sync_masters(list(masters or []))

    async def _after_calibration(self, masters: list[dict[str, Any]]) -> None:
        assert self.catalog is not None and self.pipeline is not None
        for m in masters:
            self.catalog.upsert_master(m)
            self.events.emit("master_updated", m)
        if not masters:
            return
        self._schedule_recalibration()

    def _schedule_recalibration(self) -> None:
        """Lights stacked before a better master existed are recalibrated in the background (one run at
        a time; a master arriving meanwhile triggers one more round)."""
        if not callable(getattr(self.pipeline, "frames_needing_recalibration", None)):
            return
        if self._recal_task is not None and not self._recal_task.done():
            self._recal_again = True
            return
        self._recal_task = asyncio.create_task(self._recalibration_loop(), name="recalibrate")
        self._background.add(self._recal_task)
        self._recal_task.add_done_callback(self._background.discard)

    async def _recalibration_loop(self) -> None:
        assert self.catalog is not None and self.pipeline is not None
        needing = self.pipeline.frames_needing_recalibration  # type: ignore[attr-defined]
        recalibrate = self.pipeline.recalibrate  # type: ignore[attr-defined]
        total = 0
        while not self._stop.is_set():
            self._recal_again = False
            try:
                items = list(await self._run_in_background(needing) or [])
                if not items:
                    break
                self.recalibration = {"running": True, "frames": len(items),
                                      "message": f"recalibrating {len(items)} frame(s) with the new master(s); "
                                                 "their stacks are rebuilt in the background"}
                _log.info(self.recalibration["message"])
                self.events.emit("status", {"recalibration": dict(self.recalibration)})
                result = await self._run_in_background(recalibrate, items)
            except Exception as exc:
                if _is_disk_full(exc):
                    self._pause(f"state folder {self.state_dir} is full (recalibration: {exc})")
                else:
                    _log.exception("recalibration failed")
                    self._warn(f"recalibration with the new master failed: {exc}")
                self.recalibration = {"running": False, "frames": 0, "message": f"recalibration failed: {exc}"}
                return
            total += len(items)
            for rec in result or []:
                if isinstance(rec, dict) and rec.get("path") and rec.get("status") in DONE_STATUSES:
                    row = self.catalog.get_by_path(str(rec["path"]))
                    if row is not None and row["status"] in ("stacked", "rejected", "failed"):
                        self.catalog.record_result(row["id"], rec)
            await self._refresh_stacks()
            await self._sync_pipeline_masters()
            for st in self._stacks_cache:
                self.events.emit("stack_updated", dict(st))
            if not self._recal_again:
                break
        if total:
            self.recalibration = {"running": False, "frames": total,
                                  "message": f"{total} frame(s) recalibrated with the new master(s) at {_now_iso()}"}
            _log.info(self.recalibration["message"])
            self.events.emit("status", {"recalibration": dict(self.recalibration)})

    async def _maybe_checkpoint(self, *, idle: bool) -> None:
        if self.pipeline is None or self._since_checkpoint == 0:
            return
        live = self.config.live
        due = self._since_checkpoint >= max(1, int(live.checkpoint_frames))
        due = due or (self._clock() - self._last_checkpoint >= float(live.checkpoint_interval_s))
        if not due:
            return
        try:
            await self._run_in_executor(self.pipeline.checkpoint)
        except Exception as exc:
            if _is_disk_full(exc):
                self._pause(f"state folder {self.state_dir} is full (checkpoint: {exc})")
            else:
                _log.exception("checkpoint failed")
                self._warn(f"checkpoint failed: {exc}")
            return
        self._since_checkpoint = 0
        self._last_checkpoint = self._clock()

    def _maybe_finalize(self) -> None:
        """When idle, run the exact pass of a stack that `exact_pass_due` says is due (in the background)."""
        if self._finalizing is not None and not self._finalizing.done():
            return
        if self.pipeline is None:
            return
        quiet = self._clock() - self._last_processed >= float(self.config.service.exact_pass_idle_s)
        estimate = getattr(self.pipeline, "exact_pass_estimate_s", None)
        gap = self.frame_gap_s()
        sizes = {str(s.get("id")): int(s.get("ncombine") or 0) for s in self._stacks_cache}
        due = [sid for sid, n in self._new_since_final.items()
               if exact_pass_due(new_frames=n, stack_frames=sizes.get(sid, 0),
                                 estimate_s=None if estimate is None or n <= 0 else float(estimate(sid)),
                                 gap_s=gap, quiet=quiet, live=self.config.live)]
        if not due:
            return
        sid = due[0]
        self._new_since_final[sid] = 0
        self._finalizing = asyncio.create_task(self._finalize(sid), name=f"finalize-{sid}")
        self._background.add(self._finalizing)
        self._finalizing.add_done_callback(self._background.discard)

    def frame_gap_s(self) -> float | None:
        """The median time between the last lights' arrivals (None before three have arrived)."""
        times = sorted(self._light_arrivals)
        if len(times) < 3:
            return None
        gaps = sorted(b - a for a, b in itertools.pairwise(times))
        return gaps[len(gaps) // 2]

    async def _finalize(self, stack_id: str) -> dict[str, Any]:
        assert self.pipeline is not None
        self._activity = f"exact integration of stack {stack_id}"
        t0 = self._clock()
        try:
            result = await self._run_in_background(self.pipeline.finalize, stack_id)
        except Exception as exc:
            if _is_disk_full(exc):
                self._pause(f"state folder {self.state_dir} is full (exact pass: {exc})")
            else:
                self._warn(f"exact integration of stack {stack_id} failed: {exc}")
            raise
        _log.info("stack %s: exact integration in %.1f s", stack_id, self._clock() - t0)
        await self._sync_rebuilt()  # a stale stack is rebuilt before its exact pass
        await self._refresh_stacks()
        stack = next((s for s in self._stacks_cache if str(s.get("id")) == stack_id), {"id": stack_id})
        self.events.emit("stack_updated", dict(stack))
        return dict(result or {})

    async def _refresh_stacks(self) -> None:
        if self.pipeline is None:
            return
        self._stacks_cache = list(await self._run_in_executor(self.pipeline.stacks))
        if self.catalog is not None:
            self.catalog.upsert_stacks(self._stacks_cache)

    def _log_frame(self, path: Path, kind: str, record: dict[str, Any], elapsed: float,
                   latency: float | None) -> None:
        status = record.get("status")
        parts = [f"{path.name}: {status}"]
        if record.get("reason"):
            parts.append(f"({record['reason']})")
        if kind == "light":
            m = record.get("metrics") or {}
            bits = []
            if record.get("stack_id"):
                bits.append(f"stack {record['stack_id']}")
            for key, fmt in (("stars", "{} stars"), ("fwhm_px", "FWHM {:.2f} px"), ("eccentricity", "e {:.2f}")):
                v = m.get(key)
                if isinstance(v, int | float):
                    bits.append(fmt.format(v))
            if isinstance(record.get("weight"), int | float):
                bits.append(f"w {record['weight']:.3f}")
            if bits:
                parts.append("; ".join(bits))
        else:
            n = len(record.get("masters_updated") or [])
            parts.append(f"{kind} added to the calibration library ({n} master(s) updated)")
        t = f"{elapsed:.2f} s"
        if latency is not None:
            t += f", {latency:.2f} s since closed"
        timings = record.get("timings")
        if isinstance(timings, dict) and timings:
            t += " [" + ", ".join(
                f"{k} {v:.2f}" for k, v in timings.items() if isinstance(v, int | float)) + "]"
        parts.append(t)
        level = logging.WARNING if status == "failed" else logging.INFO
        _log.log(level, " ".join(parts))

    # ------------------------------------------------------------------------------------------
    # supervision: systemd watchdog, stability polling, the watch folder, disk space, rescans

    async def _supervise_loop(self) -> None:
        last_ping = -1e18
        last_rescan = self._clock()
        while not self._stop.is_set():
            now = self._clock()
            interval = self.notifier.watchdog_interval_s
            if interval is not None and now - last_ping >= interval:
                self.notifier.watchdog()
                last_ping = now
            if self.watcher is not None:
                self.watcher.tick()
            await self._check_watch_folder()
            rescan = float(self.config.watch.rescan_interval_s)
            if rescan > 0 and now - last_rescan >= rescan and not self._watch_missing:
                last_rescan = now
                await self._initial_scan()
            tick = min(float(self.config.watch.poll_interval_s), 1.0)
            if interval is not None:
                tick = min(tick, interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=max(0.05, tick))

    async def _check_watch_folder(self) -> None:
        present = self.watch_dir.is_dir()
        if not present:
            if not self._watch_missing:
                self._watch_missing = True
                if self.watcher is not None:
                    self.watcher.stop()
                self._warn(f"watch folder {self.watch_dir} disappeared; waiting for it to come back")
                self._activity = f"waiting for the watch folder {self.watch_dir}"
            return
        if self._watch_missing or (self.watcher is not None and not self.watcher.alive()):
            was_missing = self._watch_missing
            self._restart_watcher()
            if not self._watch_missing:
                if was_missing:
                    _log.info("watch folder %s is back; scanning it", self.watch_dir)
                    self._activity = "idle"
                await self._initial_scan()

    def _check_disk(self) -> None:
        """Pause when the state folder has less free space than configured; resume when it is back.

        After a write failed with ENOSPC, resuming also needs clearly more room than there was at the
        failure (twice as much plus 1 MB), so a too-small gap does not make the service flap; or, for
        failures that free space does not explain (a quota), a retry every 6 check intervals.
        """
        need = float(self.config.service.min_free_space_mb) * 1024 * 1024
        try:
            free = float(self._free_bytes(self.state_dir))
        except OSError:
            return
        if free < need:
            self._pause(f"state folder {self.state_dir} has {free / 2**20:.0f} MB free, "
                        f"less than service.min_free_space_mb = {self.config.service.min_free_space_mb:g}")
        elif self._paused_reason and (
            free >= self._resume_free_bytes
            or self._clock() - self._paused_at >= 6 * float(self.config.service.disk_check_interval_s)
        ):
            if free < self._resume_free_bytes:
                _log.debug("retrying after a failed write on %s (%.0f MB free)", self.state_dir, free / 2**20)
            elif not self._pause_logged_resume:
                _log.info("free space is back on %s (%.0f MB): processing resumes", self.state_dir, free / 2**20)
                self._pause_logged_resume = True
            self._paused_reason = ""
            self._resume_free_bytes = 0.0
            self._activity = "idle"
            self.events.emit("status", self.status())
            self.notifier.status(self._status_line())

    def _pause(self, reason: str, *, failed_write: bool = True) -> None:
        """Stop taking frames until ``_check_disk`` sees enough room. One warning per episode: the
        episode ends when a frame is processed again."""
        if failed_write and "MB free, less than" not in reason:
            try:
                free = float(self._free_bytes(self.state_dir))
            except OSError:
                free = 0.0
            self._resume_free_bytes = max(self._resume_free_bytes, 2 * free + 2**20)
        if self._paused_reason == reason:
            return
        self._paused_reason = reason
        self._paused_at = self._clock()
        self._activity = f"paused: {reason}; resumes when space is freed"
        if not self._pause_episode:
            self._pause_episode = True
            self._pause_logged_resume = False
            self._warn(f"processing paused: {reason}; frames keep queueing and resume when space is freed")
        self.notifier.status(self._activity)

    def _warn(self, message: str) -> None:
        _log.warning(message)
        self._warnings.append(f"{_now_iso()} {message}")
        if self._loop is not None:
            self.events.emit("warning", {"message": message})

    # ------------------------------------------------------------------------------------------
    # helpers

    async def _run_in_executor(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def _run_in_background(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Long jobs (recalibration, exact passes) on their own thread, so they never hold up intake."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._bg_executor, fn, *args)

    def _status_line(self) -> str:
        if self.catalog is None:
            return self._activity
        c = self.catalog.counts()
        line = f"{c['stacked']} stacked, {c['rejected']} rejected, {c['failed']} failed, {c['pending']} pending"
        if self._paused_reason:
            line = f"PAUSED ({self._paused_reason}); " + line
        return line

    # ------------------------------------------------------------------------------------------
    # the interface used by the web app

    @property
    def paused(self) -> bool:
        return bool(self._paused_reason)

    def settled(self) -> bool:
        """True when nothing is left to do: no file queued, read or in flight, no master waiting to be
        integrated, no recalibration, rebuild or exact pass running, no stack waiting for a rebuild.
        (An exact pass that only the end-of-night idle timer would start does not count.)"""
        if self.catalog is None or self._in_flight is not None or self._paused_reason:
            return False
        if not self._intake_q.empty() or self._intake_waiting or self._retry_handles:
            return False
        counts = self.catalog.counts()
        if counts["pending"] or counts["processing"]:
            return False
        if self._calibration_added_at is not None and callable(getattr(self.pipeline, "flush_masters", None)):
            return False  # the masters of the last calibration frames are integrated after the debounce
        if self._recal_again or any(not t.done() for t in self._background):
            return False
        return not any(s.get("stale") for s in self._stacks_cache)

    def status(self) -> dict[str, Any]:
        """JSON-ready status: frame counts, queue and lag, activity, library, warnings, stacks."""
        counts = self.catalog.counts() if self.catalog is not None else {}
        oldest = self.catalog.oldest_pending_since() if self.catalog is not None else None
        pending = counts.get("pending", 0) + counts.get("processing", 0)
        masters = self.catalog.masters() if self.catalog is not None else []
        kinds: dict[str, int] = {}
        for m in masters:
            kinds[str(m.get("kind"))] = kinds.get(str(m.get("kind")), 0) + 1
        return {
            "frames": {
                "seen": counts.get("seen", 0),
                "stacked": counts.get("stacked", 0),
                "rejected": counts.get("rejected", 0),
                "failed": counts.get("failed", 0),
                "pending": pending,
                "processing": counts.get("processing", 0),
                "calibration": counts.get("library", 0),
                "duplicate": counts.get("duplicate", 0),
                "missing": counts.get("missing", 0),
                "provisional": self.catalog.provisional_count() if self.catalog is not None else 0,
            },
            "queue": {"pending": pending, "lag_s": 0.0 if oldest is None else max(0.0, time.time() - oldest)},
            "activity": self._activity,
            "paused": self.paused,
            "library": {"masters": len(masters), "by_kind": kinds},
            "recalibration": dict(self.recalibration),
            "warnings": list(self._warnings)[-20:],
            "stacks": self.list_stacks(),
            "last_frame": self._last_frame,
            "watch": str(self.watch_dir),
            "state": str(self.state_dir),
            "web_url": self.web_url,
            "version": _package_version(),
            "started_at": self.started_at,
        }

    def list_frames(self, *, stack_id: str | None = None, status: str | None = None, offset: int = 0,
                    limit: int = 100) -> dict[str, Any]:
        """One page of catalogued files (lights and calibration frames), oldest first."""
        if self.catalog is None:
            return {"total": 0, "frames": []}
        total, rows = self.catalog.list_files(stack_id=stack_id, status=status, offset=offset, limit=limit)
        return {"total": total, "frames": [self._frame_record(r) for r in rows]}

    @staticmethod
    def _frame_record(row: dict[str, Any]) -> dict[str, Any]:
        m = row.get("metrics") or {}
        return {
            "id": row["id"], "path": row["path"], "name": row["name"], "kind": row.get("kind"),
            "time": row.get("date_obs"), "target": row.get("target"), "filter": row.get("filter"),
            "exposure_s": row.get("exposure_s"),
            "fwhm_px": m.get("fwhm_px"), "fwhm_arcsec": m.get("fwhm_arcsec"),
            "eccentricity": m.get("eccentricity"), "stars": m.get("stars"), "background": m.get("background"),
            "noise": m.get("noise"), "weight": row.get("weight"), "scale": row.get("scale"),
            "status": row["status"], "reason": row.get("reason") or "", "masters": row.get("masters"),
            "transform": row.get("transform"), "stack_id": row.get("stack_id"), "excluded": row["excluded"],
            "provisional": row["provisional"],
        }

    def list_stacks(self) -> list[dict[str, Any]]:
        counts = self.catalog.stacked_counts() if self.catalog is not None else {}
        out = []
        for s in self._stacks_cache:
            rec = dict(s)
            rec.setdefault("ncombine", counts.get(str(rec.get("id")), 0))
            out.append(rec)
        return out

    def stack_products(self, stack_id: str) -> dict[str, Any] | None:
        """The current products of a stack. Served from a cache refreshed by the worker thread after
        each frame while the stack is being looked at, so the loop rarely waits on the pipeline."""
        if self.pipeline is None:
            return None
        sid = str(stack_id)
        self._products_wanted[sid] = self._clock()
        version = next((s.get("version") for s in self._stacks_cache if str(s.get("id")) == sid), None)
        cached = self._products_cache.get(sid)
        if cached is not None and version is not None and cached.get("version") == version:
            return cached
        products = self.pipeline.stack_products(sid)
        if products is not None:
            self._products_cache[sid] = products
        return products

    def list_masters(self) -> list[dict[str, Any]]:
        return self.catalog.masters() if self.catalog is not None else []

    def add_listener(self, callback: Listener) -> None:
        self.events.add_listener(callback)

    def remove_listener(self, callback: Listener) -> None:
        self.events.remove_listener(callback)

    def _light_row(self, frame_id: int) -> dict[str, Any]:
        row = self.catalog.get(int(frame_id)) if self.catalog is not None else None
        if row is None:
            raise KeyError(f"no frame {frame_id}")
        if row.get("kind") != "light":
            raise ValueError(f"file {frame_id} ({row['name']}) is a {row.get('kind')} frame, not a light")
        return row

    def _stack_known(self, stack_id: str) -> None:
        if not any(str(s.get("id")) == str(stack_id) for s in self._stacks_cache):
            raise KeyError(f"no stack {stack_id}")

    async def exclude_frame(self, frame_id: int, excluded: bool) -> dict[str, Any]:
        """Exclude (or include again) a stacked light; the pipeline removes it from its stack."""
        assert self.catalog is not None
        row = self._light_row(frame_id)
        if row["status"] not in ("stacked", "rejected"):
            raise ValueError(f"frame {frame_id} ({row['name']}) is {row['status']}: only processed lights can be excluded")
        fn = getattr(self.pipeline, "exclude_frame", None)
        if not callable(fn):
            raise ValueError("excluding frames is not supported by this pipeline yet")
        result = await self._run_in_executor(fn, Path(row["path"]), bool(excluded))
        self.catalog.set_excluded(row["id"], bool(excluded))
        await self._refresh_stacks()
        if row.get("stack_id"):
            self._new_since_final[str(row["stack_id"])] = _FORCED_EXACT_PASS  # exact pass at the next idle moment
        self.events.emit("frame_processed", {"id": row["id"], "name": row["name"], "excluded": bool(excluded),
                                             "status": row["status"], "stack_id": row.get("stack_id")})
        return {"id": row["id"], "excluded": bool(excluded), **(result if isinstance(result, dict) else {})}

    async def set_reference(self, stack_id: str, frame_id: int) -> dict[str, Any]:
        self._stack_known(stack_id)
        row = self._light_row(frame_id)
        if row["status"] != "stacked" or str(row.get("stack_id")) != str(stack_id):
            raise ValueError(f"frame {frame_id} ({row['name']}) is not stacked in {stack_id}")
        fn = getattr(self.pipeline, "set_reference", None)
        if not callable(fn):
            raise ValueError("changing the reference is not supported by this pipeline yet")
        result = await self._run_in_executor(fn, stack_id, str(row["path"]))
        rebuild = getattr(self.pipeline, "rebuild", None)
        if callable(rebuild):
            task = asyncio.create_task(self._rebuild_stack(rebuild, stack_id), name=f"rebuild-{stack_id}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        await self._refresh_stacks()
        return dict(result) if isinstance(result, dict) else {"id": stack_id, "reference": row["path"],
                                                              "rebuilding": callable(rebuild)}

    async def _rebuild_stack(self, rebuild: Callable[[str], Any], stack_id: str) -> None:
        """A stack rebuilt from its raw files (a new reference): in the background, then its records."""
        self.recalibration = {"running": True, "frames": 0, "message": f"rebuilding stack {stack_id}"}
        try:
            records = await self._run_in_background(rebuild, stack_id)
        except Exception as exc:
            self._warn(f"rebuilding stack {stack_id} failed: {exc}")
            self.recalibration = {"running": False, "frames": 0, "message": f"rebuilding {stack_id} failed"}
            return
        self._sync_members(list(records or []))
        await self._refresh_stacks()
        self.recalibration = {"running": False, "frames": len(records or []),
                              "message": f"stack {stack_id} rebuilt at {_now_iso()}"}
        stack = next((s for s in self._stacks_cache if str(s.get("id")) == stack_id), {"id": stack_id})
        self.events.emit("stack_updated", dict(stack))

    async def new_stack(self, target: str, filter: str) -> dict[str, Any]:
        if not str(target).strip():
            raise ValueError("a new stack needs a target name")
        fn = getattr(self.pipeline, "new_stack", None)
        if not callable(fn):
            raise ValueError("starting a new stack by hand is not supported by this pipeline yet")
        result = await self._run_in_executor(fn, str(target), str(filter))
        await self._refresh_stacks()
        return dict(result) if isinstance(result, dict) else {"target": target, "filter": filter}

    async def reintegrate(self, stack_id: str) -> dict[str, Any]:
        """The exact pass of a stack now (on demand)."""
        self._stack_known(stack_id)
        self._new_since_final[str(stack_id)] = 0
        return await self._finalize(str(stack_id))
