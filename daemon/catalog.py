"""The catalogue: every file the service has seen, the masters and the stacks, in one SQLite file.

One ``Catalog`` object is the single writer (an internal lock serialises every statement; the
service calls it from its event-loop thread). The database runs in WAL mode with ``synchronous=FULL``
so a committed row survives power loss. Each method is one transaction.

The persistent queue is the set of files whose status is ``pending``: nothing is kept only in
memory, so a restart re-queues everything not finished (``requeue_in_flight`` turns the frame that
was being processed back into ``pending``).

File statuses:

``pending``     waiting to be processed (the queue)
``processing``  in flight
``stacked``     a light in a stack
``rejected``    a light refused by a quality gate (reason says which)
``failed``      unreadable, truncated, unknown type, or a processing error (reason says why)
``library``     a calibration frame added to the calibration library
``duplicate``   same content (SHA-1) as a file already catalogued: processed once only
``missing``     the file disappeared before it could be read
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "DONE_STATUSES",
    "STATUSES",
    "Catalog",
]

STATUSES = ("pending", "processing", "stacked", "rejected", "failed", "library", "duplicate", "missing")
DONE_STATUSES = frozenset({"stacked", "rejected", "failed", "library", "duplicate", "missing"})

_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    size INTEGER,
    mtime REAL,
    sha1 TEXT,
    kind TEXT,
    key TEXT,
    info TEXT,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    target TEXT,
    filter TEXT,
    exposure_s REAL,
    date_obs TEXT,
    metrics TEXT,
    masters TEXT,
    transform TEXT,
    scale REAL,
    weight REAL,
    stack_id TEXT,
    timings TEXT,
    record TEXT,
    excluded INTEGER NOT NULL DEFAULT 0,
    provisional INTEGER NOT NULL DEFAULT 0,
    duplicate_of INTEGER,
    seen_at REAL,
    queued_at REAL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL
);
CREATE INDEX IF NOT EXISTS files_status ON files(status);
CREATE INDEX IF NOT EXISTS files_sha1 ON files(sha1);
CREATE INDEX IF NOT EXISTS files_stack ON files(stack_id);
CREATE TABLE IF NOT EXISTS masters (
    id TEXT PRIMARY KEY,
    kind TEXT,
    record TEXT NOT NULL,
    updated_at REAL
);
CREATE TABLE IF NOT EXISTS stacks (
    id TEXT PRIMARY KEY,
    target TEXT,
    filter TEXT,
    record TEXT NOT NULL,
    updated_at REAL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT
);
"""

_JSON_COLUMNS = ("key", "info", "metrics", "masters", "transform", "timings", "record")

# Columns a processing record may set directly (record key -> column).
_RECORD_COLUMNS = {
    "status": "status",
    "reason": "reason",
    "metrics": "metrics",
    "masters": "masters",
    "transform": "transform",
    "scale": "scale",
    "weight": "weight",
    "stack_id": "stack_id",
    "timings": "timings",
}


def _dumps(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(value, default=_json_default, allow_nan=True)


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays, Paths and tuples from the pipeline's records
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _row(row: sqlite3.Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    out = dict(row)
    for col in _JSON_COLUMNS:
        if out.get(col) is not None:
            out[col] = json.loads(out[col])
    out["excluded"] = bool(out.get("excluded"))
    out["provisional"] = bool(out.get("provisional"))
    return out


class Catalog:
    """The SQLite catalogue under the state folder; the single writer of ``catalog.sqlite``.

    Parameters
    ----------
    path : Path
        The database file (created with its folder when absent).
    clock : callable, optional
        Wall-clock seconds for the timestamps. Default is ``time.time``.
    """

    def __init__(self, path: str | Path, *, clock: Any = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._db.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(_SCHEMA_VERSION),)
        )

    # -- plumbing ---------------------------------------------------------------------------------

    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self._lock)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- files ------------------------------------------------------------------------------------

    def get(self, file_id: int) -> dict[str, Any] | None:
        with self._lock:
            return _row(self._db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone())

    def get_by_path(self, path: str | Path) -> dict[str, Any] | None:
        with self._lock:
            return _row(self._db.execute("SELECT * FROM files WHERE path = ?", (str(path),)).fetchone())

    def see(self, path: str | Path, *, size: int, mtime: float) -> tuple[int, str]:
        """Record that ``path`` exists with this size and mtime; returns (id, state).

        state is ``"new"`` for a path never seen, ``"unchanged"`` when size and mtime equal the
        catalogue's, ``"changed"`` otherwise. A changed file that is still queued gets the new size
        and mtime; a changed finished file is left as it is until ``rewritten`` decides, from its
        content hash, whether it must be processed again.
        """
        now = self._clock()
        p = str(path)
        with self._tx():
            row = self._db.execute("SELECT id, size, mtime, status FROM files WHERE path = ?", (p,)).fetchone()
            if row is None:
                cur = self._db.execute(
                    "INSERT INTO files(path, name, size, mtime, status, seen_at, queued_at, updated_at)"
                    " VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
                    (p, Path(p).name, size, mtime, now, now, now),
                )
                return int(cur.lastrowid or 0), "new"
            if row["size"] == size and row["mtime"] == mtime:
                return int(row["id"]), "unchanged"
            if row["status"] in ("pending", "processing"):
                self._db.execute(
                    "UPDATE files SET size = ?, mtime = ?, updated_at = ? WHERE id = ?", (size, mtime, now, row["id"])
                )
            return int(row["id"]), "changed"

    def rewritten(self, file_id: int, *, size: int, mtime: float, sha1: str) -> bool:
        """A finished file changed on disk: same content (only touched) keeps its result, new content
        goes back to ``pending`` (returns True)."""
        now = self._clock()
        with self._tx():
            row = self._db.execute("SELECT sha1 FROM files WHERE id = ?", (file_id,)).fetchone()
            if row is not None and row["sha1"] == sha1:
                self._db.execute(
                    "UPDATE files SET size = ?, mtime = ?, updated_at = ? WHERE id = ?", (size, mtime, now, file_id)
                )
                return False
            self._db.execute(
                "UPDATE files SET size = ?, mtime = ?, sha1 = NULL, kind = NULL, status = 'pending', reason = '',"
                " attempts = 0, queued_at = ?, updated_at = ? WHERE id = ?",
                (size, mtime, now, now, file_id),
            )
            return True

    def set_identity(
        self,
        file_id: int,
        *,
        sha1: str,
        kind: str,
        key: Any = None,
        info: dict[str, Any] | None = None,
        target: str | None = None,
        filter: str | None = None,
        exposure_s: float | None = None,
        date_obs: str | None = None,
    ) -> None:
        """Store what intake learned from the header and content of a file (it stays ``pending``)."""
        with self._tx():
            self._db.execute(
                "UPDATE files SET sha1 = ?, kind = ?, key = ?, info = ?, target = ?, filter = ?, exposure_s = ?,"
                " date_obs = ?, updated_at = ? WHERE id = ?",
                (sha1, kind, _dumps(key), _dumps(info), target, filter, exposure_s, date_obs, self._clock(), file_id),
            )

    def find_same_content(self, sha1: str, *, other_than: int) -> dict[str, Any] | None:
        """The first catalogued file with this content that was (or will be) processed, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM files WHERE sha1 = ? AND id != ? AND status NOT IN ('failed', 'duplicate', 'missing')"
                " ORDER BY id LIMIT 1",
                (sha1, other_than),
            ).fetchone()
            return _row(row)

    def set_status(self, file_id: int, status: str, reason: str = "", **columns: Any) -> None:
        """Set a file's status and reason (and optional plain columns such as ``duplicate_of``)."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        now = self._clock()
        sets = ["status = ?", "reason = ?", "updated_at = ?"]
        values: list[Any] = [status, reason, now]
        if status == "processing":
            sets.append("started_at = ?")
            values.append(now)
        elif status in DONE_STATUSES:
            sets.append("finished_at = ?")
            values.append(now)
        elif status == "pending":
            sets.append("queued_at = COALESCE(queued_at, ?)")
            values.append(now)
        for col, value in columns.items():
            if col not in ("attempts", "duplicate_of", "provisional", "excluded", "stack_id"):
                raise ValueError(f"column {col!r} cannot be set here")
            sets.append(f"{col} = ?")
            values.append(value)
        with self._tx():
            self._db.execute(f"UPDATE files SET {', '.join(sets)} WHERE id = ?", (*values, file_id))

    def record_result(self, file_id: int, record: dict[str, Any]) -> None:
        """Store a pipeline's frame record (status, reason, metrics, transform, scale, weight, ...)."""
        status = str(record.get("status", "failed"))
        if status not in DONE_STATUSES:
            raise ValueError(f"a finished frame cannot have status {status!r}")
        now = self._clock()
        sets = ["finished_at = ?", "updated_at = ?", "record = ?", "provisional = ?"]
        values: list[Any] = [now, now, _dumps(record), int(bool(record.get("provisional", False)))]
        for key, col in _RECORD_COLUMNS.items():
            if key in record:
                value = record[key]
                sets.append(f"{col} = ?")
                values.append(_dumps(value) if col in _JSON_COLUMNS else value)
        with self._tx():
            self._db.execute(f"UPDATE files SET {', '.join(sets)} WHERE id = ?", (*values, file_id))

    def requeue_in_flight(self) -> int:
        """Turn ``processing`` rows (interrupted by a crash) back into ``pending``; returns how many."""
        with self._tx():
            cur = self._db.execute(
                "UPDATE files SET status = 'pending', updated_at = ? WHERE status = 'processing'", (self._clock(),)
            )
            return int(cur.rowcount)

    def pending(self, *, identified: bool | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Queued files, calibration frames before lights, then in arrival order.

        ``identified``: True only files whose header was read (ready to process), False only those
        still to be read, None both.
        """
        cond = {None: "", True: " AND kind IS NOT NULL", False: " AND kind IS NULL"}[identified]
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM files WHERE status = 'pending'{cond}"
                " ORDER BY CASE WHEN kind IS NULL THEN 0 WHEN kind = 'light' THEN 2 ELSE 1 END, id LIMIT ?",
                (limit,),
            ).fetchall()
        return [r for r in (_row(x) for x in rows) if r is not None]

    def counts(self) -> dict[str, int]:
        """Number of files per status, plus ``seen`` (all of them)."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM files GROUP BY status").fetchall()
        out = dict.fromkeys(STATUSES, 0)
        for status, n in rows:
            out[status] = int(n)
        out["seen"] = sum(int(n) for _, n in rows)
        return out

    def oldest_pending_since(self) -> float | None:
        """Wall-clock time the oldest queued file was queued (for the lag), or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(queued_at) FROM files WHERE status IN ('pending', 'processing')"
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def list_files(
        self,
        *,
        stack_id: str | None = None,
        status: str | None = None,
        kind: str | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> tuple[int, list[dict[str, Any]]]:
        """(total matching, one page of rows) ordered by id."""
        where: list[str] = []
        args: list[Any] = []
        if stack_id is not None:
            where.append("stack_id = ?")
            args.append(stack_id)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        with self._lock:
            total = int(self._db.execute(f"SELECT COUNT(*) FROM files{clause}", args).fetchone()[0])
            rows = self._db.execute(
                f"SELECT * FROM files{clause} ORDER BY id LIMIT ? OFFSET ?", (*args, max(0, limit), max(0, offset))
            ).fetchall()
        return total, [r for r in (_row(x) for x in rows) if r is not None]

    def all_paths(self) -> dict[str, tuple[int | None, float | None]]:
        """path -> (size, mtime) of every catalogued file (for the start-up scan)."""
        with self._lock:
            rows = self._db.execute("SELECT path, size, mtime FROM files").fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def set_excluded(self, file_id: int, excluded: bool) -> None:
        with self._tx():
            self._db.execute(
                "UPDATE files SET excluded = ?, updated_at = ? WHERE id = ?", (int(excluded), self._clock(), file_id)
            )

    # -- masters and stacks -----------------------------------------------------------------------

    def upsert_master(self, record: dict[str, Any]) -> None:
        """Store a master record from the library (keyed by its ``id``, else ``path``)."""
        master_id = str(record.get("id") or record.get("path") or record.get("name"))
        with self._tx():
            self._db.execute(
                "INSERT INTO masters(id, kind, record, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET kind = excluded.kind, record = excluded.record,"
                " updated_at = excluded.updated_at",
                (master_id, record.get("kind"), _dumps(record), self._clock()),
            )

    def masters(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM masters ORDER BY kind, id").fetchall()
        return [json.loads(r[0]) for r in rows]

    def upsert_stacks(self, records: Iterable[dict[str, Any]]) -> None:
        """Store the pipeline's stack records (keyed by ``id``)."""
        now = self._clock()
        with self._tx():
            for rec in records:
                self._db.execute(
                    "INSERT INTO stacks(id, target, filter, record, updated_at) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT(id) DO UPDATE SET target = excluded.target, filter = excluded.filter,"
                    " record = excluded.record, updated_at = excluded.updated_at",
                    (str(rec["id"]), rec.get("target"), rec.get("filter"), _dumps(rec), now),
                )

    def stacks(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM stacks ORDER BY id").fetchall()
        return [json.loads(r[0]) for r in rows]

    def provisional_count(self) -> int:
        """Stacked lights calibrated without their final masters (waiting for recalibration)."""
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM files WHERE status = 'stacked' AND provisional = 1").fetchone()
        return int(row[0])

    def stacked_counts(self) -> dict[str, int]:
        """stack id -> number of catalogued files with status ``stacked`` in it (not excluded)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT stack_id, COUNT(*) FROM files WHERE status = 'stacked' AND excluded = 0 GROUP BY stack_id"
            ).fetchall()
        return {str(r[0]): int(r[1]) for r in rows if r[0] is not None}

    # -- meta -------------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._tx():
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )


class _Transaction:
    """``with`` block holding the catalogue lock around BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock) -> None:
        self._db = db
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                try:
                    self._db.execute("COMMIT")
                except sqlite3.Error:
                    # e.g. SQLITE_FULL: leave no half-open transaction behind
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            elif self._db.in_transaction:
                self._db.execute("ROLLBACK")
        finally:
            self._lock.release()
