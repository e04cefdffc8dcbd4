"""The service with a scripted pipeline: intake, statuses, duplicates, retries, recovery, faults.

The pipeline is faked (the boundary); the watcher, catalogue, header reading (fitsio + classify) and
the service's logic are real. Files are small real FITS files written as a capture program would.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from stackwatch.daemon.config import Config
from stackwatch.daemon.service import Service, exact_pass_due
from stackwatch.engine.errors import StackwatchError

HERE = Path(__file__).resolve().parent
SID = "M27_l"  # FakePipeline's stack id: object + classify's normalised filter name
SID2 = "NGC_7000_ha"


# ------------------------------------------------------------------------------------------------
# A scripted pipeline with the agreed API; its state persists under state_dir like the real one.


class FakePipeline:
    """Stacks = running mean of frame means per (object, filter); idempotent by frame path."""

    def __init__(self, config: Config, state_dir: Path, *, delay_s: float = 0.0,
                 fail_once: dict[str, BaseException] | None = None, recal_delay_s: float = 0.0,
                 watch: Path | None = None, store_bytes: int = 0) -> None:
        self.path = state_dir / "fake_pipeline.json"
        self.store_bytes = store_bytes  # like the frame store: bytes written under state_dir per frame
        self.recal_delay_s = recal_delay_s
        self.watch = watch or state_dir.parent / "watch"
        self.delay_s = delay_s
        self.fail_once = dict(fail_once or {})
        self.lock = threading.Lock()
        self.calls: list[str] = []
        if self.path.exists():
            self.state = json.loads(self.path.read_text())
        else:
            self.state = {"stacks": {}, "masters": {}, "double": 0}

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.path)

    def add_calibration(self, path: Path, info: Any) -> list[dict[str, Any]]:
        with self.lock:
            self.calls.append(path.name)
            m = self.state["masters"].setdefault(info.kind, {"id": f"master_{info.kind}", "kind": info.kind,
                                                             "members": []})
            if path.name not in m["members"]:
                m["members"].append(path.name)
            self._save()
            return [dict(m, n=len(m["members"]))]

    def process_light(self, path: Path, info: Any) -> dict[str, Any]:
        time.sleep(self.delay_s)
        with self.lock:
            self.calls.append(path.name)
            if path.name in self.fail_once:
                raise self.fail_once.pop(path.name)
            data = fits.getdata(path).astype(np.float64)
            header = fits.getheader(path)
            sid = f"{info.object}_{info.filter or 'none'}".replace(" ", "_")
            rec = {"stack_id": sid, "metrics": {"stars": int(header.get("NSTARS", 100)), "fwhm_px": 2.5},
                   "transform": [[1, 0, 0], [0, 1, 0]], "scale": 1.0, "weight": 1.0, "masters": {},
                   "timings": {"total": self.delay_s}}
            if "flat" not in self.state["masters"]:
                rec["provisional"] = True
                rec["masters"] = {"flat": "none yet for this filter: stacked provisionally"}
                self.state.setdefault("provisional", []).append(path.name)
            if header.get("NSTARS", 100) < 15:
                return {**rec, "status": "rejected", "reason": "few_stars: stars < 15"}
            st = self.state["stacks"].setdefault(sid, {"id": sid, "target": info.object, "filter": info.filter,
                                                       "frames": {}, "version": 0})
            if self.store_bytes:
                store = self.path.parent / "frames"
                store.mkdir(exist_ok=True)
                tmp = store / (path.name + ".tmp")
                try:
                    with open(tmp, "wb") as fh:
                        fh.write(b"\0" * self.store_bytes)
                        fh.flush()
                        os.fsync(fh.fileno())
                except OSError:
                    tmp.unlink(missing_ok=True)
                    raise
                os.replace(tmp, store / (path.name + ".npy"))
            if path.name in st["frames"]:
                self.state["double"] += 1  # would be a double stacking without idempotence
            st["frames"][path.name] = float(data.mean())
            st["version"] += 1
            self._save()
            return {**rec, "status": "stacked", "reason": ""}

    def frames_needing_recalibration(self) -> list[str]:
        with self.lock:
            if "flat" not in self.state["masters"]:
                return []
            return list(self.state.get("provisional", []))

    def recalibrate(self, items: list[str]) -> list[dict[str, Any]]:
        time.sleep(self.recal_delay_s)
        with self.lock:
            out = []
            for name in items:
                for st in self.state["stacks"].values():
                    if name in st["frames"]:
                        st["version"] += 1
                        out.append({"path": str(self.watch / name), "status": "stacked", "stack_id": st["id"],
                                    "provisional": False, "masters": {"flat": "master_flat"}})
                self.state["provisional"].remove(name)
                self.state.setdefault("recalibrated", []).append(name)
            self._save()
            return out

    def stacks(self) -> list[dict[str, Any]]:
        with self.lock:
            return [{"id": s["id"], "target": s["target"], "filter": s["filter"], "ncombine": len(s["frames"]),
                     "exposure_s": 60.0 * len(s["frames"]), "reference": None, "version": s["version"]}
                    for s in self.state["stacks"].values()]

    def stack_products(self, stack_id: str) -> dict[str, Any] | None:
        with self.lock:
            s = self.state["stacks"].get(stack_id)
            if s is None:
                return None
            value = np.mean(list(s["frames"].values()))
            return {"version": s["version"], "image": np.full((8, 8), value, np.float32), "rej_low": None,
                    "rej_high": None, "coverage": None, "header": {"NCOMBINE": len(s["frames"])}}

    def finalize(self, stack_id: str) -> dict[str, Any]:
        return {"id": stack_id}

    def checkpoint(self) -> None:
        pass


def write_frame(path: Path, *, kind: str = "LIGHT", obj: str = "M27", filt: str = "L", value: int = 1000,
                nstars: int = 100, chunks: int = 1, pause_s: float = 0.0, exptime: float = 60.0) -> bytes:
    """A 40x50 uint16 FITS file, written in ``chunks`` opens/closes like a slow capture program."""
    h = fits.Header()
    h["IMAGETYP"] = kind
    h["EXPTIME"] = exptime
    h["OBJECT"] = obj
    h["FILTER"] = filt
    h["NSTARS"] = nstars
    h["INSTRUME"] = "TestCam"
    h["DATE-OBS"] = "2026-01-01T22:00:00"
    rng = np.random.default_rng(value)
    data = (value + rng.integers(0, 10, (40, 50))).astype(np.uint16)
    hdu = fits.PrimaryHDU(data, header=h)
    import io

    buf = io.BytesIO()
    hdu.writeto(buf)
    raw = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    step = -(-len(raw) // chunks)
    for i in range(chunks):
        with open(path, "ab" if i else "wb") as fh:
            fh.write(raw[i * step:(i + 1) * step])
        if pause_s and i < chunks - 1:
            time.sleep(pause_s)
    return raw


def fast_config() -> Config:
    c = Config()
    c.watch.poll_interval_s = 0.1
    c.watch.stable_for_s = 0.3
    c.watch.retry_backoff_s = 0.1
    c.watch.retry_max = 4
    c.service.disk_check_interval_s = 0.1
    c.service.min_free_space_mb = 1.0
    c.service.shutdown_timeout_s = 10.0
    return c


async def wait_for(cond: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def statuses(service: Service) -> dict[str, str]:
    return {f["name"]: f["status"] for f in service.list_frames(limit=1000)["frames"]}


class Harness:
    def __init__(self, tmp_path: Path, **pipeline_kw: Any) -> None:
        self.watch = tmp_path / "watch"
        self.state = tmp_path / "state"
        self.watch.mkdir(exist_ok=True)
        self.pipeline_kw = pipeline_kw
        self.pipelines: list[FakePipeline] = []
        self.free = 10**12
        self.events: list[dict[str, Any]] = []

    def make(self, config: Config | None = None) -> Service:
        def factory(cfg: Config, state: Path) -> FakePipeline:
            p = FakePipeline(cfg, state, **self.pipeline_kw)
            self.pipelines.append(p)
            return p

        s = Service(config or fast_config(), watch_dir=self.watch, state_dir=self.state, pipeline_factory=factory,
                    free_bytes=lambda _p: self.free)
        s.add_listener(self.events.append)
        return s


# ------------------------------------------------------------------------------------------------


async def test_a_night_with_bad_files(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    # already there at start: lights before their dark in name order, a hidden and a partial file
    write_frame(h.watch / "a_light_001.fits", value=1000)
    write_frame(h.watch / "z_dark_001.fits", kind="DARK", obj="", value=50)
    write_frame(h.watch / ".hidden.fits")
    write_frame(h.watch / "b_light.fits.part")
    service = h.make()
    await service.startup()
    runner = asyncio.create_task(service.run())
    try:
        assert service.status()["frames"]["seen"] >= 0  # answers at once
        # calibration frames are processed before lights that were waiting
        await wait_for(lambda: statuses(service).get("a_light_001.fits") == "stacked", what="first light")
        assert h.pipelines[0].calls[:2] == ["z_dark_001.fits", "a_light_001.fits"]
        # written while running: slowly in chunks, a zero-byte file, a corrupt file, a duplicate,
        # another target, a rejected frame, a subfolder
        await asyncio.to_thread(write_frame, h.watch / "a_light_002.fits", value=1010, chunks=4, pause_s=0.15)
        (h.watch / "empty.fits").write_bytes(b"")
        (h.watch / "corrupt.fits").write_bytes(b"SIMPLE  =                    T" + b"\x00garbage" * 50)
        shutil.copy(h.watch / "a_light_001.fits", h.watch / "copy_of_001.fits")
        write_frame(h.watch / "night2" / "other_target.fits", obj="NGC 7000", filt="Ha", value=2000)
        write_frame(h.watch / "a_light_003.fits", value=990, nstars=3)
        write_frame(h.watch / "flat_L.fits", kind="FLAT", obj="", value=30000, exptime=1.0)
        (h.watch / "notes.txt").write_text("not a frame")
        want = {
            "a_light_001.fits": "stacked", "a_light_002.fits": "stacked", "z_dark_001.fits": "library",
            "empty.fits": "failed", "corrupt.fits": "failed", "copy_of_001.fits": "duplicate",
            "other_target.fits": "stacked", "a_light_003.fits": "rejected", "flat_L.fits": "library",
        }
        await wait_for(lambda: statuses(service) == want, what=f"statuses {want}")
        frames = {f["name"]: f for f in service.list_frames(limit=1000)["frames"]}
        assert "0 bytes" in frames["empty.fits"]["reason"] and "after 4 attempts" in frames["empty.fits"]["reason"]
        assert frames["corrupt.fits"]["reason"]
        assert "a_light_001.fits" in frames["copy_of_001.fits"]["reason"]
        assert frames["a_light_003.fits"]["reason"].startswith("few_stars")
        assert frames["a_light_002.fits"]["stack_id"] == SID and frames["a_light_002.fits"]["fwhm_px"] == 2.5
        st = service.status()
        assert st["frames"] == {**st["frames"], "seen": 9, "stacked": 3, "rejected": 1, "failed": 2, "pending": 0}
        assert st["queue"]["pending"] == 0 and st["paused"] is False
        stacks = {s["id"]: s for s in st["stacks"]}
        assert stacks[SID]["ncombine"] == 2 and stacks[SID2]["ncombine"] == 1
        assert {m["kind"] for m in service.list_masters()} == {"dark", "flat"}
        products = service.stack_products(SID)
        assert products is not None and products["image"].shape == (8, 8)
        assert service.stack_products(SID) is products  # cached while the version is unchanged
        assert h.pipelines[0].state["double"] == 0
        assert h.pipelines[0].calls.count("a_light_001.fits") == 1
        types = {e["type"] for e in h.events}
        assert {"frame_received", "frame_processed", "stack_updated", "master_updated"} <= types
        assert json.dumps(st)  # JSON-ready
        with pytest.raises(KeyError):
            await service.reintegrate("nope")
        assert (await service.reintegrate(SID))["id"] == SID
        with pytest.raises(ValueError):
            await service.exclude_frame(frames["z_dark_001.fits"]["id"], True)
        with pytest.raises(KeyError):
            await service.exclude_frame(10**6, True)
    finally:
        service.request_stop()
        await runner
        await service.shutdown()
    assert not list((h.watch).rglob("*.sqlite")), "nothing is written into the watched folder"


async def test_restart_continues_and_reprocesses_only_the_frame_in_flight(tmp_path: Path) -> None:
    h = Harness(tmp_path, delay_s=0.3)
    for i in range(6):
        write_frame(h.watch / f"l{i}.fits", value=1000 + 10 * i)
    service = h.make()
    await service.startup()
    runner = asyncio.create_task(service.run())
    await wait_for(lambda: service.status()["frames"]["stacked"] >= 2, what="two frames stacked")
    service.request_stop()
    await runner
    await service.shutdown()
    done_before = {n for n, s in statuses_from_db(h.state).items() if s == "stacked"}
    assert 2 <= len(done_before) < 6
    # simulate a crash in the middle of the next frame: it was marked in flight
    from stackwatch.daemon.catalog import Catalog

    cat = Catalog(h.state / "catalog.sqlite")
    row = cat.pending(identified=True)[0]
    cat.set_status(row["id"], "processing")
    cat.close()
    write_frame(h.watch / "l6.fits", value=1200)  # arrived while the service was down
    service = h.make()
    await service.startup()
    runner = asyncio.create_task(service.run())
    try:
        await wait_for(lambda: service.status()["frames"]["stacked"] == 7, what="all 7 stacked")
        second = h.pipelines[-1]
        assert not (set(second.calls) & done_before), "a finished frame was processed again"
        assert second.state["double"] == 0
        assert service.list_stacks()[0]["ncombine"] == 7
    finally:
        service.request_stop()
        await runner
        await service.shutdown()


def statuses_from_db(state: Path) -> dict[str, str]:
    from stackwatch.daemon.catalog import Catalog

    cat = Catalog(state / "catalog.sqlite")
    try:
        return {r["name"]: r["status"] for r in cat.list_files(limit=10**6)[1]}
    finally:
        cat.close()


async def test_disk_full_pauses_then_resumes(tmp_path: Path) -> None:
    h = Harness(tmp_path, fail_once={"l1.fits": OSError(errno.ENOSPC, "No space left on device")})
    service = h.make()
    await service.startup()
    runner = asyncio.create_task(service.run())
    try:
        # 1. low free space reported by the file system: nothing is processed, the status says why
        h.free = 10
        write_frame(h.watch / "l0.fits")
        await wait_for(lambda: service.status()["paused"], what="pause")
        await asyncio.sleep(0.5)
        st = service.status()
        assert st["frames"]["pending"] == 1 and st["frames"]["stacked"] == 0
        assert "free" in st["activity"] and any("paused" in w for w in st["warnings"])
        h.free = 10**12
        await wait_for(lambda: statuses(service).get("l0.fits") == "stacked", what="resume")
        assert not service.status()["paused"]
        # 2. ENOSPC while processing: the frame goes back to the queue, not to failed
        write_frame(h.watch / "l1.fits", value=1100)
        await wait_for(lambda: statuses(service).get("l1.fits") == "stacked", what="retry after ENOSPC")
        assert any("full" in w for w in service.status()["warnings"])
        assert h.pipelines[0].calls.count("l1.fits") == 2
    finally:
        service.request_stop()
        await runner
        await service.shutdown()


@pytest.fixture
def small_state_disk(tmp_path: Path) -> Any:
    """A 4 MB tmpfs as the state folder (needs root and mount rights; skips otherwise)."""
    mnt = tmp_path / "state"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


async def test_real_full_disk_pauses_then_resumes(tmp_path: Path, small_state_disk: Path) -> None:
    """The state folder really fills up (ENOSPC from the file system, SQLite 'disk is full')."""
    h = Harness(tmp_path, store_bytes=400_000)
    cfg = fast_config()
    cfg.service.min_free_space_mb = 0.01  # let the writes themselves hit ENOSPC
    service = Service(cfg, watch_dir=h.watch, state_dir=small_state_disk,
                      pipeline_factory=lambda c, s: FakePipeline(c, s, store_bytes=400_000))
    await service.startup()
    runner = asyncio.create_task(service.run())
    ballast = small_state_disk / "ballast"
    try:
        free = shutil.disk_usage(small_state_disk).free
        ballast.write_bytes(b"\0" * max(0, free - 1_000_000))  # about two frames of room left
        for i in range(6):
            write_frame(h.watch / f"l{i}.fits", value=1000 + i)
        await wait_for(lambda: service.status()["paused"], what="pause on a full disk")
        st = service.status()
        assert "full" in st["activity"] and st["frames"]["stacked"] < 6
        assert st["frames"]["failed"] == 0  # nothing is given up because of the disk
        stacked_while_full = st["frames"]["stacked"]
        await asyncio.sleep(0.5)
        assert service.status()["frames"]["stacked"] == stacked_while_full
        ballast.unlink()  # the user frees space
        await wait_for(lambda: service.status()["frames"]["stacked"] == 6, timeout_s=30, what="resume")
        assert not service.status()["paused"]
        assert set(statuses(service).values()) == {"stacked"}
    finally:
        service.request_stop()
        await runner
        await service.shutdown()


async def test_file_deleted_between_event_and_read(tmp_path: Path) -> None:
    h = Harness(tmp_path, delay_s=0.5)
    service = h.make()
    await service.startup()
    runner = asyncio.create_task(service.run())
    try:
        write_frame(h.watch / "l0.fits")  # keeps the processor busy for 0.5 s
        await wait_for(lambda: statuses(service).get("l0.fits") == "processing", what="l0 in flight")
        write_frame(h.watch / "gone_early.fits", value=1)
        write_frame(h.watch / "gone_late.fits", value=2)
        await wait_for(lambda: statuses(service).get("gone_late.fits") == "pending"
                       and service.catalog.get_by_path(h.watch / "gone_late.fits")["kind"] is not None,
                       what="gone_late queued")
        (h.watch / "gone_late.fits").unlink()  # deleted after intake, before processing
        # an event for a file already deleted: a no-op
        service._on_file(h.watch / "never_there.fits")
        (h.watch / "gone_early.fits").unlink()
        await wait_for(lambda: statuses(service).get("gone_late.fits") == "missing", what="missing")
        st = statuses(service)
        assert st.get("gone_early.fits") in (None, "missing")
        assert "never_there.fits" not in st
        assert st["l0.fits"] == "stacked"
        write_frame(h.watch / "l1.fits", value=5)
        await wait_for(lambda: statuses(service).get("l1.fits") == "stacked", what="next frame still works")
    finally:
        service.request_stop()
        await runner
        await service.shutdown()


async def test_watch_folder_disappears_and_comes_back(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    service = h.make()
    await service.startup()
    runner = asyncio.create_task(service.run())
    try:
        write_frame(h.watch / "l0.fits")
        await wait_for(lambda: statuses(service).get("l0.fits") == "stacked", what="l0")
        shutil.rmtree(h.watch)
        await wait_for(lambda: any("disappeared" in w for w in service.status()["warnings"]), what="warning")
        assert "waiting for the watch folder" in service.status()["activity"]
        h.watch.mkdir()
        write_frame(h.watch / "l1.fits", value=1100)  # written before the watcher is back: found by the scan
        await wait_for(lambda: statuses(service).get("l1.fits") == "stacked", what="l1 after the folder returned")
        write_frame(h.watch / "l2.fits", value=1200)  # and events work again
        await wait_for(lambda: statuses(service).get("l2.fits") == "stacked", what="l2")
    finally:
        service.request_stop()
        await runner
        await service.shutdown()


async def test_polling_mode_and_reload(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    cfg_file = tmp_path / "sw.toml"
    cfg_file.write_text("[watch]\npolling = true\npoll_interval_s = 0.1\nstable_for_s = 0.3\n")
    from stackwatch.daemon.config import load_config

    service = Service(load_config(cfg_file), watch_dir=h.watch, state_dir=h.state, config_path=cfg_file,
                      pipeline_factory=lambda c, s: FakePipeline(c, s), free_bytes=lambda _p: 10**12)
    await service.startup()
    runner = asyncio.create_task(service.run())
    try:
        assert service.watcher is not None and service.watcher.polling
        await asyncio.to_thread(write_frame, h.watch / "l0.fits", chunks=3, pause_s=0.1)
        await wait_for(lambda: statuses(service).get("l0.fits") == "stacked", what="polling")
        cfg_file.write_text("[watch]\npolling = false\n[live]\nkappa_high = 2.5\n")
        assert service.reload_config()
        assert service.config.live.kappa_high == 2.5 and not service.watcher.polling
        write_frame(h.watch / "l1.fits", value=1100)
        await wait_for(lambda: statuses(service).get("l1.fits") == "stacked", what="inotify after reload")
        cfg_file.write_text("[live]\nkappa_hgih = 2\n")  # invalid: the old configuration stays
        assert not service.reload_config()
        assert service.config.live.kappa_high == 2.5
        assert any("kappa_hgih" in w for w in service.status()["warnings"])
    finally:
        service.request_stop()
        await runner
        await service.shutdown()


async def test_lights_before_flats_are_recalibrated_in_the_background(tmp_path: Path) -> None:
    h = Harness(tmp_path, recal_delay_s=1.0)
    service = h.make()
    await service.startup()
    runner = asyncio.create_task(service.run())
    try:
        for i in range(3):
            write_frame(h.watch / f"l{i}.fits", value=1000 + i)
        await wait_for(lambda: service.status()["frames"]["stacked"] == 3, what="3 stacked")
        frames = service.list_frames()["frames"]
        assert all(f["provisional"] for f in frames)
        assert service.status()["frames"]["provisional"] == 3
        write_frame(h.watch / "flat.fits", kind="FLAT", obj="", value=30000, exptime=1.0)
        await wait_for(lambda: service.status()["recalibration"]["running"], what="recalibration starts")
        st = service.status()
        assert "recalibrating 3 frame(s)" in st["recalibration"]["message"]
        # the service keeps processing new lights meanwhile (recalibration runs on its own thread)
        write_frame(h.watch / "l3.fits", value=1003)
        await wait_for(lambda: statuses(service).get("l3.fits") == "stacked", what="l3 during recalibration")
        assert service.status()["recalibration"]["running"]
        await wait_for(lambda: not service.status()["recalibration"]["running"], what="recalibration ends")
        st = service.status()
        assert st["frames"]["provisional"] == 0 and "3 frame(s) recalibrated" in st["recalibration"]["message"]
        assert sorted(h.pipelines[0].state["recalibrated"]) == ["l0.fits", "l1.fits", "l2.fits"]
        assert service.list_frames()["frames"][0]["masters"] == {"flat": "master_flat"}
    finally:
        service.request_stop()
        await runner
        await service.shutdown()


def test_state_inside_watch_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StackwatchError, match="inside the watched folder"):
        Service(Config(), watch_dir=tmp_path, state_dir=tmp_path / "state")


# ------------------------------------------------------------------------------------------------
# The real process: `stackwatch run` semantics with the fake pipeline, SIGKILL and SIGTERM.

_CHILD = """
import asyncio, sys
sys.path.insert(0, {here!r})
from test_service import FakePipeline, fast_config
from stackwatch.daemon.cmd_run import serve, setup_logging
setup_logging("INFO")
cfg = fast_config()
cfg.service.port = {port}
cfg.live.checkpoint_frames = 1
sys.exit(asyncio.run(serve(cfg, watch_dir={watch!r}, state_dir={state!r}, web={web},
    service_kwargs={{"pipeline_factory": lambda c, s: FakePipeline(c, s, delay_s={delay})}})))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_child(tmp_path: Path, watch: Path, state: Path, *, port: int, web: bool, delay: float,
                 log: Path) -> subprocess.Popen[bytes]:
    code = _CHILD.format(here=str(HERE), port=port, watch=str(watch), state=str(state), web=web, delay=delay)
    return subprocess.Popen([sys.executable, "-c", code], stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _poll(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_process_sigkill_twice_then_sigterm(tmp_path: Path) -> None:
    """kill -9 the service twice while frames arrive; the third run finishes every frame exactly once,
    /api/status answers, and SIGTERM exits 0."""
    pytest.importorskip("stackwatch.web.app")
    watch, state, log = tmp_path / "watch", tmp_path / "state", tmp_path / "service.log"
    watch.mkdir()
    port = _free_port()
    rng = np.random.default_rng(7)
    n = 12
    proc = _start_child(tmp_path, watch, state, port=port, web=True, delay=0.25, log=log)
    try:
        _poll(lambda: "frames" in _get_json(f"http://127.0.0.1:{port}/api/status"), 60, "status endpoint")
        for kill_after in (3, 7):
            while len(list(watch.glob("*.fits"))) < kill_after:
                i = len(list(watch.glob("*.fits")))
                write_frame(watch / f"l{i:02d}.fits", value=1000 + i, chunks=2, pause_s=0.05)
                time.sleep(float(rng.uniform(0.0, 0.3)))
            time.sleep(float(rng.uniform(0.0, 0.5)))
            proc.kill()  # SIGKILL at a random moment
            proc.wait(10)
            proc = _start_child(tmp_path, watch, state, port=port, web=True, delay=0.25, log=log)
            _poll(lambda: "frames" in _get_json(f"http://127.0.0.1:{port}/api/status"), 60, "restart")
        for i in range(7, n):
            write_frame(watch / f"l{i:02d}.fits", value=1000 + i)
        _poll(lambda: _get_json(f"http://127.0.0.1:{port}/api/status")["frames"]["stacked"] == n, 60,
              "all frames stacked")
        st = _get_json(f"http://127.0.0.1:{port}/api/status")
        assert st["frames"]["seen"] == n and st["frames"]["pending"] == 0
        assert [s["ncombine"] for s in st["stacks"]] == [n]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    fake = json.loads((state / "fake_pipeline.json").read_text())
    assert fake["double"] <= 2  # at most the frame in flight at each SIGKILL was redone
    assert sorted(fake["stacks"][SID]["frames"]) == [f"l{i:02d}.fits" for i in range(n)]
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert "stackwatch service stopped" in text


def test_long_exact_pass_waits_unless_it_fits_between_frames(tmp_path: Path) -> None:
    """After `exact_pass_frames` new frames the idle exact pass runs only while its estimate fits in
    half the usual gap between frames (else the next frame would wait minutes behind it); a quiet
    night, a request (exclusion) or a cheap pass still run it."""
    now = [1000.0]
    cfg = Config()
    cfg.live.exact_pass_frames = 3
    cfg.live.exact_pass_max_s = 1.0
    service = Service(cfg, watch_dir=tmp_path / "watch", state_dir=tmp_path / "state", clock=lambda: now[0])
    started: list[str] = []
    estimate = {"s": 100.0}

    class _Pipe:
        def exact_pass_estimate_s(self, sid: str) -> float:
            return estimate["s"]

    async def fake_finalize(sid: str) -> dict[str, Any]:
        started.append(sid)
        return {}

    service.pipeline = _Pipe()  # type: ignore[assignment]
    service._finalize = fake_finalize  # type: ignore[method-assign]

    async def scenario() -> None:
        for t in (0.0, 120.0, 240.0, 360.0):  # 2-min subs
            service._light_arrivals.append(t)
        assert service.frame_gap_s() == 120.0
        service._new_since_final["m27"] = 3
        now[0] = 400.0
        service._maybe_finalize()  # 100 s > 60 s: waits
        await asyncio.sleep(0)
        assert started == []
        estimate["s"] = 50.0  # fits in half the gap
        service._maybe_finalize()
        await asyncio.sleep(0)
        assert started == ["m27"]
        estimate["s"] = 100.0
        service._new_since_final["m27"] = 5
        now[0] = 400.0 + cfg.service.exact_pass_idle_s  # the end of the night
        service._last_processed = 400.0
        service._maybe_finalize()
        await asyncio.sleep(0)
        assert started == ["m27", "m27"]
        now[0] = 5000.0
        service._last_processed = 5000.0
        service._new_since_final["m27"] = 10**9  # an exclusion asks for one
        service._maybe_finalize()
        await asyncio.sleep(0)
        assert started == ["m27"] * 3
        # a stack's first frames: after each one, below `exact_pass_frames`, when it fits the gap
        service._stacks_cache = [{"id": "m27", "ncombine": cfg.live.exact_pass_early_frames}]
        service._new_since_final["m27"] = 1
        estimate["s"] = 100.0
        service._maybe_finalize()  # does not fit: waits
        await asyncio.sleep(0)
        assert started == ["m27"] * 3
        estimate["s"] = 50.0
        service._maybe_finalize()
        await asyncio.sleep(0)
        assert started == ["m27"] * 4
        for n in (3, cfg.live.exact_pass_early_frames + 1):
            # up to 4 frames the live image is the batch result itself; past the first frames the
            # pass waits for `exact_pass_frames`
            service._stacks_cache = [{"id": "m27", "ncombine": n}]
            service._new_since_final["m27"] = 1
            service._maybe_finalize()
            await asyncio.sleep(0)
            assert started == ["m27"] * 4

    asyncio.run(scenario())


def test_exact_pass_policy() -> None:
    """`exact_pass_due`: what the idle service decides for one stack (the live image equals the batch
    result after every frame while the pass is cheap against the gap between frames)."""
    live = Config().live
    live.exact_pass_frames, live.exact_pass_early_frames, live.exact_pass_max_s = 10, 6, 1.0
    live.exact_pass_gap_fraction = 0.2

    def due(new: int, size: int, est: float | None, gap: float | None = 120.0, quiet: bool = False) -> bool:
        return exact_pass_due(new_frames=new, stack_frames=size, estimate_s=est, gap_s=gap, quiet=quiet, live=live)

    # nothing new: never again, even during the early frames or at the end of the night (an early
    # pass used to be repeated at every idle second until the next frame came)
    assert not due(0, 5, 0.1) and not due(0, 40, 0.1, quiet=True)
    assert due(10**9, 40, 1e6)  # a request
    assert due(1, 40, 1e6, quiet=True)  # the end of the night
    assert due(1, 5, 50.0) and not due(1, 5, 70.0)  # early frames, when the pass fits half the gap
    assert not due(1, 4, 30.0)  # up to 4 frames the live image computes the batch rule itself
    assert due(10, 40, 60.0) and not due(10, 40, 61.0)  # every 10 frames, when it fits half the gap
    # after every frame while cheap: at most 1 s, or at most a fifth of the gap
    assert due(1, 40, 1.0, gap=None) and not due(1, 40, 1.1, gap=None)
    assert due(1, 40, 24.0) and not due(1, 40, 24.5)
    live.exact_pass_gap_fraction = 0.0
    assert not due(1, 40, 24.0) and due(1, 40, 0.9)
    live.exact_pass_max_s = 0.0
    assert not due(1, 40, 0.9) and not due(1, 40, None)
