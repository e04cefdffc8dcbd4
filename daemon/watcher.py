"""Watching the capture folder: which files to read and when they are complete.

Two ways to learn that a file is complete:

- inotify (default): watchdog's ``Observer`` reports a file closed after writing (``on_closed``) or
  renamed into the folder (``on_moved``, the usual ``.part`` -> ``.fits`` pattern of capture programs);
  those paths are handed over at once.
- size/mtime stability: every created or modified path also goes to a ``StabilityTracker``, which
  hands it over once its size and mtime have not changed for ``stable_for_s``. In polling mode
  (network shares, where inotify sees nothing) this is the only way, fed by watchdog's
  ``PollingObserver``; in inotify mode it is the fallback for files moved in from another file
  system, which arrive as a bare create.

A path can be handed over more than once (close, then stability); the service deduplicates by path,
size and mtime. The watchdog thread never touches the service: it only calls
``loop.call_soon_threadsafe``. Nothing here reads, writes, moves or renames a watched file.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

__all__ = [
    "FileFilter",
    "StabilityTracker",
    "Watcher",
    "scan_folder",
]

_log = logging.getLogger("stackwatch.watcher")

DEFAULT_EXTENSIONS = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz", ".fits.fz", ".fz")


@dataclass(frozen=True)
class FileFilter:
    """Which paths under the watched folder are candidate frames.

    Ignored: any path component starting with ``.`` (hidden files and folders), names matching
    ``ignore_patterns`` (temporary and partial files), names without one of ``extensions``, and
    anything inside ``exclude_dirs`` (the service's own state folder, if it lies inside the watch
    folder).
    """

    root: Path
    ignore_patterns: tuple[str, ...] = (".*", "*.part", "*~", "*.tmp", "*.partial", "*.crdownload")
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    exclude_dirs: tuple[Path, ...] = ()
    recursive: bool = True

    def accepts(self, path: str | os.PathLike[str]) -> bool:
        p = Path(os.path.abspath(path))
        root = Path(os.path.abspath(self.root))
        try:
            rel = p.relative_to(root)
        except ValueError:
            return False
        if not rel.parts:
            return False
        if not self.recursive and len(rel.parts) > 1:
            return False
        if any(part.startswith(".") for part in rel.parts):
            return False
        for excluded in self.exclude_dirs:
            ex = Path(os.path.abspath(excluded))
            if p == ex or ex in p.parents:
                return False
        name = rel.parts[-1]
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.ignore_patterns):
            return False
        lower = name.lower()
        return any(lower.endswith(ext.lower()) for ext in self.extensions)

    def accepts_dir(self, path: str | os.PathLike[str]) -> bool:
        """Whether files under this folder can be candidates (not hidden, not excluded)."""
        p = Path(os.path.abspath(path))
        root = Path(os.path.abspath(self.root))
        if p == root:
            return True
        try:
            rel = p.relative_to(root)
        except ValueError:
            return False
        if not self.recursive or any(part.startswith(".") for part in rel.parts):
            return False
        return not any(
            p == Path(os.path.abspath(ex)) or Path(os.path.abspath(ex)) in p.parents for ex in self.exclude_dirs
        )


def scan_folder(file_filter: FileFilter, top: Path | None = None) -> Iterator[Path]:
    """Every candidate file under ``top`` (default: the root), sorted by path within each folder.

    A folder that cannot be listed (gone, no permission) is skipped without raising.
    """
    start = Path(top) if top is not None else Path(file_filter.root)
    stack = [start]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if file_filter.accepts_dir(entry.path):
                        subdirs.append(Path(entry.path))
                elif entry.is_file() and file_filter.accepts(entry.path):
                    yield Path(entry.path)
            except OSError:
                continue
        stack.extend(reversed(subdirs))


class StabilityTracker:
    """Hands a path over once its size and mtime have stayed the same for ``stable_for_s``.

    Parameters
    ----------
    stable_for_s : float
        Quiet time required. Default is 2 s (config ``watch.stable_for_s``).
    clock : callable, optional
        Monotonic seconds. Default is ``time.monotonic``.
    stat : callable, optional
        ``os.stat``-like; a path whose stat raises ``OSError`` is dropped (deleted). Default is
        ``os.stat``.
    """

    def __init__(
        self,
        stable_for_s: float = 2.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        stat: Callable[[str], os.stat_result] = os.stat,
    ) -> None:
        self.stable_for_s = float(stable_for_s)
        self._clock = clock
        self._stat = stat
        # path -> (size, mtime_ns, since)
        self._tracked: dict[str, tuple[int, int, float]] = {}

    def __len__(self) -> int:
        return len(self._tracked)

    def __contains__(self, path: object) -> bool:
        return str(path) in self._tracked

    def observe(self, path: str | os.PathLike[str]) -> None:
        """A create/modify event (or a scan) saw this path: (re)start its quiet period if it changed."""
        key = str(path)
        try:
            st = self._stat(key)
        except OSError:
            self._tracked.pop(key, None)
            return
        now = self._clock()
        old = self._tracked.get(key)
        if old is None or (old[0], old[1]) != (st.st_size, st.st_mtime_ns):
            self._tracked[key] = (st.st_size, st.st_mtime_ns, now)

    def forget(self, path: str | os.PathLike[str]) -> None:
        self._tracked.pop(str(path), None)

    def poll(self) -> list[Path]:
        """Paths that became stable since the last poll (they stop being tracked)."""
        now = self._clock()
        ready: list[Path] = []
        for key, (size, mtime_ns, since) in list(self._tracked.items()):
            try:
                st = self._stat(key)
            except OSError:
                del self._tracked[key]
                continue
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                self._tracked[key] = (st.st_size, st.st_mtime_ns, now)
            elif now - since >= self.stable_for_s:
                del self._tracked[key]
                ready.append(Path(key))
        return ready


class _Handler(FileSystemEventHandler):
    """Runs on the watchdog thread: classifies the event and hands the path to the loop."""

    def __init__(self, watcher: Watcher) -> None:
        self._w = watcher

    def on_closed(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._w._from_thread("complete", _fs(event.src_path))

    def on_moved(self, event: FileSystemEvent) -> None:
        dest = _fs(event.dest_path)
        if event.is_directory:
            self._w._from_thread("dir", dest)
        else:
            self._w._from_thread("complete" if not self._w.polling else "changed", dest)

    def on_created(self, event: FileSystemEvent) -> None:
        self._w._from_thread("dir" if event.is_directory else "changed", _fs(event.src_path))

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._w._from_thread("changed", _fs(event.src_path))

    def on_deleted(self, event: FileSystemEvent) -> None:
        self._w._from_thread("deleted", _fs(event.src_path))


def _fs(path: str | bytes) -> str:
    return os.fsdecode(path)


class Watcher:
    """Watches ``file_filter.root`` and calls ``on_file(path)`` on the loop for each complete file.

    Lifecycle: ``start()`` (starts the observer thread; does not scan), ``tick()`` from a periodic
    task on the loop (hands over files that became stable), ``alive()`` to supervise the observer
    (False when it died, e.g. because the watched folder vanished), ``stop()``.

    Parameters
    ----------
    file_filter : FileFilter
        The folder and what to ignore.
    on_file : callable
        Called on the loop thread with a ``Path``; must not block.
    loop : asyncio.AbstractEventLoop
        The service's loop.
    polling : bool, optional
        Use watchdog's PollingObserver (network shares). Default is False (inotify).
    poll_interval_s : float, optional
        PollingObserver period. Default is 2 s.
    stable_for_s : float, optional
        Stability quiet time. Default is 2 s.
    clock : callable, optional
        Monotonic seconds for the stability tracker. Default is ``time.monotonic``.
    """

    def __init__(
        self,
        file_filter: FileFilter,
        on_file: Callable[[Path], None],
        *,
        loop: asyncio.AbstractEventLoop,
        polling: bool = False,
        poll_interval_s: float = 2.0,
        stable_for_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.filter = file_filter
        self.polling = polling
        self.poll_interval_s = poll_interval_s
        self._on_file = on_file
        self._loop = loop
        self.tracker = StabilityTracker(stable_for_s, clock=clock)
        self._observer: BaseObserver | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the observer thread on the root folder (which must exist)."""
        if self._observer is not None:
            return
        root = str(self.filter.root)
        if not os.path.isdir(root):
            raise FileNotFoundError(root)
        observer: BaseObserver = PollingObserver(timeout=self.poll_interval_s) if self.polling else Observer()
        observer.schedule(_Handler(self), root, recursive=self.filter.recursive)
        observer.daemon = True
        observer.start()
        self._observer = observer
        _log.info("watching %s (%s%s)", root, "polling" if self.polling else "inotify",
                  ", recursive" if self.filter.recursive else "")

    def stop(self, timeout_s: float = 5.0) -> None:
        observer, self._observer = self._observer, None
        if observer is None:
            return
        try:
            observer.stop()
            observer.join(timeout_s)
        except Exception:  # the emitter may already have died with its folder
            _log.debug("observer stop failed", exc_info=True)

    def alive(self) -> bool:
        """The observer thread runs and the watched folder still exists."""
        obs = self._observer
        if obs is None or not obs.is_alive():
            return False
        if not os.path.isdir(self.filter.root):
            return False
        emitters: Iterable[object] = getattr(obs, "emitters", ())
        return all(getattr(e, "is_alive", lambda: True)() for e in emitters)

    # -- events -----------------------------------------------------------------------------------

    def _from_thread(self, what: str, path: str) -> None:
        """Watchdog thread: cheap filtering, then hand over to the loop."""
        if what == "dir":
            if not self.filter.accepts_dir(path):
                return
        elif what != "deleted" and not self.filter.accepts(path):
            return
        try:
            self._loop.call_soon_threadsafe(self._on_event, what, path)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _on_event(self, what: str, path: str) -> None:
        """Loop thread."""
        if what == "complete":
            self.tracker.forget(path)
            self._on_file(Path(path))
        elif what == "changed":
            self.tracker.observe(path)
        elif what == "deleted":
            self.tracker.forget(path)
        elif what == "dir":
            # A folder created or moved in: files moved in with it raise no event of their own.
            for p in scan_folder(self.filter, Path(path)):
                self.tracker.observe(p)

    def feed(self, what: str, path: str | os.PathLike[str]) -> None:
        """Scripted events for tests and for the service's rescans (loop thread)."""
        self._on_event(what, str(path))

    def tick(self) -> list[Path]:
        """Hand over the files that became stable; returns them. Call periodically on the loop."""
        ready = self.tracker.poll()
        for p in ready:
            self._on_file(p)
        return ready

