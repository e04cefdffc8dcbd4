"""The watcher: what is ignored, stability in polling mode (fake clock), and real inotify events."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest
from stackwatch.daemon.watcher import FileFilter, StabilityTracker, Watcher, scan_folder


def test_filter_ignores_hidden_partial_state_and_other_types(tmp_path: Path) -> None:
    state = tmp_path / "state"
    f = FileFilter(root=tmp_path, exclude_dirs=(state,))
    assert f.accepts(tmp_path / "M27_L_0001.fits")
    assert f.accepts(tmp_path / "night1" / "Flat" / "flat_001.FIT")
    assert f.accepts(tmp_path / "a.fits.gz") and f.accepts(tmp_path / "a.fts")
    for bad in [".hidden.fits", "a.fits.part", "a.fits~", "a.tmp", "x.fits.crdownload", "log.txt", "a.xisf",
                ".thumbs/a.fits", "state/stacks/M27.fits", "a.fits.partial"]:
        assert not f.accepts(tmp_path / bad), bad
    assert not f.accepts(tmp_path.parent / "elsewhere.fits")
    assert not f.accepts(tmp_path)
    flat = FileFilter(root=tmp_path, recursive=False)
    assert flat.accepts(tmp_path / "a.fits") and not flat.accepts(tmp_path / "sub" / "a.fits")
    assert f.accepts_dir(tmp_path / "night1") and not f.accepts_dir(state) and not f.accepts_dir(tmp_path / ".git")


def test_scan_folder_is_recursive_and_filtered(tmp_path: Path) -> None:
    for rel in ["b.fits", "a.fits", "sub/c.fits", "sub/deeper/d.fit", ".hidden/e.fits", "sub/f.part", "state/g.fits"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    f = FileFilter(root=tmp_path, exclude_dirs=(tmp_path / "state",))
    found = [p.relative_to(tmp_path).as_posix() for p in scan_folder(f)]
    assert found == ["a.fits", "b.fits", "sub/c.fits", "sub/deeper/d.fit"]
    assert list(scan_folder(FileFilter(root=tmp_path / "gone"))) == []


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeStat:
    """A scripted file system: path -> (size, mtime_ns); missing paths raise FileNotFoundError."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[int, int]] = {}

    def __call__(self, path: str) -> os.stat_result:
        if path not in self.files:
            raise FileNotFoundError(path)
        size, mtime_ns = self.files[path]
        sec = mtime_ns // 10**9
        # fields: mode ino dev nlink uid gid size, atime mtime ctime (int), the same as floats, then in ns
        return os.stat_result((0o100644, 0, 0, 1, 0, 0, size, sec, sec, sec, sec, sec, sec, mtime_ns, mtime_ns, mtime_ns))


def test_stability_tracker_waits_for_quiet_file() -> None:
    clock, stat = FakeClock(), FakeStat()
    tr = StabilityTracker(2.0, clock=clock, stat=stat)
    stat.files["/w/a.fits"] = (100, 1)
    tr.observe("/w/a.fits")
    clock.t = 1.0
    assert tr.poll() == []
    stat.files["/w/a.fits"] = (200, 2)  # still growing: quiet period restarts
    clock.t = 2.5
    assert tr.poll() == []
    clock.t = 4.0
    assert tr.poll() == []  # 1.5 s quiet only
    clock.t = 4.6
    assert tr.poll() == [Path("/w/a.fits")]
    assert "/w/a.fits" not in tr and tr.poll() == []
    # same size but a new mtime (rewritten in place) also restarts the wait
    stat.files["/w/b.fits"] = (10, 5)
    tr.observe("/w/b.fits")
    clock.t = 6.0
    stat.files["/w/b.fits"] = (10, 6)
    clock.t = 6.7
    assert tr.poll() == []
    clock.t = 8.8
    assert tr.poll() == [Path("/w/b.fits")]


def test_stability_tracker_drops_deleted_and_re_observe_keeps_time() -> None:
    clock, stat = FakeClock(), FakeStat()
    tr = StabilityTracker(1.0, clock=clock, stat=stat)
    stat.files["/w/a.fits"] = (1, 1)
    tr.observe("/w/a.fits")
    tr.observe("/w/gone.fits")  # vanished before the event was handled
    assert len(tr) == 1
    clock.t = 0.9
    tr.observe("/w/a.fits")  # an event for an unchanged file does not restart the wait
    del stat.files["/w/a.fits"]
    clock.t = 2.0
    assert tr.poll() == [] and len(tr) == 0
    stat.files["/w/c.fits"] = (0, 1)  # zero bytes is handed over too: the service reports it
    tr.observe("/w/c.fits")
    clock.t = 3.0
    assert tr.poll() == [Path("/w/c.fits")]


async def _collect_until(got: list[Path], want: set[str], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while {p.name for p in got} < want and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("polling", [False, True])
async def test_watcher_reports_closed_moved_and_new_folder_files(tmp_path: Path, polling: bool) -> None:
    loop = asyncio.get_running_loop()
    got: list[Path] = []
    w = Watcher(FileFilter(root=tmp_path), got.append, loop=loop, polling=polling, poll_interval_s=0.2,
                stable_for_s=0.4)
    w.start()
    try:
        (tmp_path / "written.fits").write_bytes(b"x" * 1000)  # closed after writing
        (tmp_path / "moved.fits.part").write_bytes(b"y" * 10)
        os.rename(tmp_path / "moved.fits.part", tmp_path / "moved.fits")  # the .part -> final pattern
        (tmp_path / "ignored.tmp").write_bytes(b"z")
        outside = tmp_path.parent / f"{tmp_path.name}_night"
        (outside / "sub").mkdir(parents=True)
        (outside / "sub" / "innight.fits").write_bytes(b"w")
        shutil.move(str(outside), str(tmp_path / "night"))  # a whole folder moved in
        want = {"written.fits", "moved.fits", "innight.fits"}
        deadline = time.monotonic() + 10
        while {p.name for p in got} < want and time.monotonic() < deadline:
            w.tick()
            await asyncio.sleep(0.1)
        names = {p.name for p in got}
        assert names >= want
        assert "ignored.tmp" not in names and "moved.fits.part" not in names
        assert w.alive()
    finally:
        w.stop()
    assert not w.alive()


async def test_watcher_dies_with_its_folder(tmp_path: Path) -> None:
    root = tmp_path / "watch"
    root.mkdir()
    w = Watcher(FileFilter(root=root), lambda p: None, loop=asyncio.get_running_loop())
    w.start()
    try:
        assert w.alive()
        shutil.rmtree(root)
        deadline = time.monotonic() + 5
        while w.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not w.alive()
    finally:
        w.stop()
    with pytest.raises(FileNotFoundError):
        Watcher(FileFilter(root=root), lambda p: None, loop=asyncio.get_running_loop()).start()
