"""The SQLite catalogue: statuses, the persistent queue, duplicates, recovery, durability."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
from pathlib import Path

import pytest
from stackwatch.daemon.catalog import Catalog


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def test_see_new_unchanged_changed(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite", clock=_Clock())
    fid, state = cat.see("/w/a.fits", size=10, mtime=1.0)
    assert state == "new"
    assert cat.see("/w/a.fits", size=10, mtime=1.0) == (fid, "unchanged")
    # still pending: the new size is recorded at once
    assert cat.see("/w/a.fits", size=20, mtime=2.0) == (fid, "changed")
    assert cat.get(fid)["size"] == 20
    cat.set_identity(fid, sha1="aa", kind="light", info={"object": "M27"}, target="M27", filter="L")
    cat.record_result(fid, {"status": "stacked", "reason": "", "metrics": {"fwhm_px": 2.5}, "stack_id": "M27_L",
                            "transform": [[1, 0, 0], [0, 1, 0]], "weight": 0.9, "scale": 1.1})
    # finished and touched: content decides
    assert cat.see("/w/a.fits", size=20, mtime=3.0) == (fid, "changed")
    assert cat.get(fid)["status"] == "stacked"
    assert cat.rewritten(fid, size=20, mtime=3.0, sha1="aa") is False
    assert cat.get(fid)["status"] == "stacked" and cat.get(fid)["mtime"] == 3.0
    assert cat.rewritten(fid, size=21, mtime=4.0, sha1="bb") is True
    row = cat.get(fid)
    assert row["status"] == "pending" and row["sha1"] is None and row["kind"] is None


def test_record_result_and_listing(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite", clock=_Clock())
    ids = []
    for i in range(5):
        fid, _ = cat.see(f"/w/l{i}.fits", size=1, mtime=float(i))
        cat.set_identity(fid, sha1=f"h{i}", kind="light", target="M27", filter="L", exposure_s=60.0,
                         date_obs=f"2026-01-01T00:0{i}:00")
        ids.append(fid)
    cat.record_result(ids[0], {"status": "stacked", "stack_id": "s1", "metrics": {"stars": 50}, "weight": 1.0})
    cat.record_result(ids[1], {"status": "rejected", "reason": "blurred", "stack_id": "s1"})
    cat.record_result(ids[2], {"status": "stacked", "stack_id": "s1", "provisional": True})
    with pytest.raises(ValueError):
        cat.record_result(ids[3], {"status": "processing"})
    total, rows = cat.list_files(stack_id="s1")
    assert total == 3 and [r["id"] for r in rows] == ids[:3]
    assert rows[0]["metrics"] == {"stars": 50} and rows[1]["reason"] == "blurred" and rows[2]["provisional"]
    total, rows = cat.list_files(status="pending", offset=1, limit=1)
    assert total == 2 and rows[0]["id"] == ids[4]
    c = cat.counts()
    assert (c["seen"], c["stacked"], c["rejected"], c["pending"]) == (5, 2, 1, 2)
    assert cat.stacked_counts() == {"s1": 2}
    cat.set_excluded(ids[0], True)
    assert cat.get(ids[0])["excluded"] is True and cat.stacked_counts() == {"s1": 1}


def test_queue_order_and_recovery(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    cat = Catalog(path, clock=_Clock())
    kinds = ["light", "dark", "light", "flat", None]
    ids = []
    for i, kind in enumerate(kinds):
        fid, _ = cat.see(f"/w/{i}.fits", size=1, mtime=0.0)
        if kind:
            cat.set_identity(fid, sha1=str(i), kind=kind)
        ids.append(fid)
    assert [r["id"] for r in cat.pending(identified=True)] == [ids[1], ids[3], ids[0], ids[2]]
    assert [r["id"] for r in cat.pending(identified=False)] == [ids[4]]
    cat.set_status(ids[1], "processing")
    assert cat.get(ids[1])["started_at"] is not None
    cat.close()
    # a restart: the frame in flight is queued again, nothing is lost
    cat = Catalog(path)
    assert cat.requeue_in_flight() == 1
    assert len(cat.pending()) == 5
    assert cat.oldest_pending_since() is not None


def test_same_content_is_found_once(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite")
    a, _ = cat.see("/w/a.fits", size=1, mtime=0.0)
    b, _ = cat.see("/w/copy/a.fits", size=1, mtime=0.0)
    cat.set_identity(a, sha1="same", kind="light")
    cat.set_identity(b, sha1="same", kind="light")
    assert cat.find_same_content("same", other_than=b)["id"] == a
    assert cat.find_same_content("same", other_than=a)["id"] == b
    cat.set_status(b, "duplicate", "same content", duplicate_of=a)
    assert cat.find_same_content("same", other_than=a) is None
    cat.set_status(a, "failed", "unreadable")
    assert cat.find_same_content("same", other_than=b) is None  # a failed copy does not shadow a good one
    with pytest.raises(ValueError):
        cat.set_status(a, "bogus")
    with pytest.raises(ValueError):
        cat.set_status(a, "failed", reason="x", path="/etc")


def test_masters_stacks_meta(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite")
    cat.upsert_master({"id": "MD_300", "kind": "dark", "members": 10})
    cat.upsert_master({"id": "MD_300", "kind": "dark", "members": 12})
    cat.upsert_master({"path": "/s/lib/MF_L.fits", "kind": "flat"})
    assert [m.get("members") for m in cat.masters()] == [12, None]
    cat.upsert_stacks([{"id": "M27_L", "target": "M27", "filter": "L", "ncombine": 3}])
    cat.upsert_stacks([{"id": "M27_L", "target": "M27", "filter": "L", "ncombine": 4}])
    assert cat.stacks() == [{"id": "M27_L", "target": "M27", "filter": "L", "ncombine": 4}]
    cat.set_meta("k", "v")
    assert cat.get_meta("k") == "v" and cat.get_meta("nope") is None


def _writer(path: str, start: int, ready: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    cat = Catalog(path)
    i = start
    while True:
        fid, _ = cat.see(f"/w/{i}.fits", size=i, mtime=0.0)
        cat.set_identity(fid, sha1=str(i), kind="light")
        cat.record_result(fid, {"status": "stacked", "stack_id": "s", "metrics": {"i": i}})
        if i == start + 20:
            ready.set()
        i += 1


def test_kill9_during_writes_leaves_a_consistent_catalogue(tmp_path: Path) -> None:
    """SIGKILL a process writing the catalogue: every committed row is whole, the file opens."""
    path = str(tmp_path / "c.sqlite")
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_writer, args=(path, 0, ready))
    proc.start()
    assert ready.wait(60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    cat = Catalog(path)
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    total, rows = cat.list_files(limit=100000)
    assert total >= 21
    # rows are whole transactions: identity and result came in separate commits, in order
    for r in rows[:-1]:
        assert r["status"] == "stacked" and r["metrics"] == {"i": r["size"]}, r
    cat.requeue_in_flight()
