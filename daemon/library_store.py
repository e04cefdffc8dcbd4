"""The calibration library on disk: master FITS files plus an SQLite index, reused across nights.

Layout under ``root`` (the service uses ``<state>/library``)::

    index.sqlite            members (one row per calibration file) and masters (one row per master)
    masters/<id>.fits       float32 master with provenance (members, key, NCOMBINE, method, dates, stats)
    masters/<id>.defects.fits   cached defect map of a master dark (HOT/COLD/DEAD index extensions)

Incremental masters (algorithms.md §2.3, design A): the index remembers every member (path, size,
mtime) of every master; a new calibration frame marks its master dirty, and :meth:`rebuild`
re-integrates *all* members over row bands with :func:`stackwatch.engine.library.integrate_master`
(which reads them with ``fitsio.read_rows``) and replaces the master atomically. The result is the
batch master of the same members by construction, memory is bounded by the band budget whatever the
member count, and any rejection algorithm works (sufficient statistics would only be exact for the
plain mean). The cost is reading the members again; the service debounces (:meth:`due`: quiet for
``debounce_s`` or ``debounce_members`` new members). If a member file disappears the master is
frozen as it is and later frames of the same key start a new master (``<key id>-2``...).

When a bias or flat-dark master changes, the flats of the same sensor are marked dirty too (they are
calibrated with it before integration).

SQLite is used only here (the engine never imports sqlite3); one connection guarded by a lock.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from stackwatch.engine import fitsio
from stackwatch.engine.calibrate import DarkStructure, FlatScale, Overscan, dark_structure, flat_scale
from stackwatch.engine.classify import FrameInfo, classify
from stackwatch.engine.cosmetic import DefectMap, defect_map
from stackwatch.engine.errors import FrameError, StackwatchError
from stackwatch.engine.library import (
    MasterKey,
    MasterRecord,
    MasterSet,
    MatchRules,
    integrate_master,
    master_header,
    master_key,
    match,
    readout_mode_key,
)

__all__ = ["CalibrationLibrary", "record_dict"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS members (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    kind TEXT NOT NULL,
    master_id TEXT NOT NULL,
    info TEXT NOT NULL,
    added REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS members_master ON members(master_id);
CREATE TABLE IF NOT EXISTS masters (
    id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    path TEXT,
    record TEXT,
    dirty INTEGER NOT NULL DEFAULT 1,
    dirty_since REAL,
    pending INTEGER NOT NULL DEFAULT 0,
    frozen INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL DEFAULT 1
);
"""

_KIND_ORDER = {"bias": 0, "darkflat": 1, "dark": 2, "flat": 3}


def _info_to_json(info: FrameInfo) -> str:
    d = {k: getattr(info, k) for k in info.__dataclass_fields__}
    return json.dumps(d, default=list)


def _info_from_json(text: str) -> FrameInfo:
    d = json.loads(text)
    d["binning"] = tuple(d["binning"])
    d["shape"] = tuple(d["shape"])
    return FrameInfo(**d)


def record_dict(r: MasterRecord) -> dict[str, Any]:
    """A master record as plain JSON-able data (``stackwatch masters --json``, catalogue, web view)."""
    return {
        "id": Path(r.path).stem if r.path else r.key.id,
        "kind": r.kind,
        "key": r.key.as_dict(),
        "path": r.path,
        "ncombine": r.ncombine,
        "exposure_s": r.exposure_s,
        "temperature_c": r.temperature_c,
        "date_first": r.date_first,
        "date_last": r.date_last,
        "created": r.created,
        "age_days": None if r.age_days() is None else round(float(r.age_days() or 0.0), 2),
        "rejection": r.rejection,
        "median": r.median,
        "noise": r.noise,
        "members": list(r.members),
        "warnings": list(r.warnings),
        "overscan": r.overscan,
        "describe": r.describe(),
    }


def _record_from_dict(d: dict[str, Any]) -> MasterRecord:
    return MasterRecord(
        key=MasterKey.from_dict(d["key"]),
        path=d["path"],
        ncombine=int(d["ncombine"]),
        exposure_s=d.get("exposure_s"),
        temperature_c=d.get("temperature_c"),
        date_first=d.get("date_first"),
        date_last=d.get("date_last"),
        created=d.get("created"),
        rejection=d.get("rejection") or "",
        median=d.get("median"),
        noise=d.get("noise"),
        members=tuple(d.get("members") or ()),
        warnings=tuple(d.get("warnings") or ()),
        overscan=str(d.get("overscan") or ""),
    )


class CalibrationLibrary:
    """The on-disk calibration library.

    Parameters
    ----------
    root : path
        Library folder (created). Default layout: index.sqlite and masters/.
    rules : MatchRules, optional
        Matching tolerances. Default is None (``MatchRules()``).
    band_budget_bytes : int, optional
        Memory for one band of all members during master integration. Default is 256 MiB.
    clock : callable, optional
        Time source for debouncing (tests). Default is ``time.monotonic``.
    overscan : Overscan, optional
        Overscan correction of the members (and of the lights calibrated with the masters) for the
        frames whose geometry it applies to. Masters built under another overscan setting are
        re-integrated (marked dirty here) and not matched meanwhile. Default is None.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        rules: MatchRules | None = None,
        band_budget_bytes: int = 1 << 28,
        clock: Any = time.monotonic,
        overscan: Overscan | None = None,
    ) -> None:
        self.root = Path(root)
        self.masters_dir = self.root / "masters"
        try:
            self.masters_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StackwatchError(f"library folder {self.root}: cannot create it ({exc.strerror})") from None
        self.rules = rules or MatchRules()
        self.band_budget_bytes = int(band_budget_bytes)
        self._clock = clock
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.root / "index.sqlite"), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._cache: dict[str, tuple[float, np.ndarray]] = {}
        self._derived: dict[tuple[Any, ...], Any] = {}  # flat scales and defect maps, by file versions
        self.last_errors: list[str] = []  # masters that could not be built by the last rebuild()
        self.overscan = overscan
        self._key_readout_modes()
        self._dirty_stale_overscan()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> CalibrationLibrary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- geometry -----------------------------------------------------------------------------------

    def overscan_for(self, shape: Sequence[int]) -> Overscan | None:
        """The overscan correction frames of this raw shape get (None: none)."""
        ov = self.overscan
        return ov if ov is not None and ov.applies(shape) else None

    def _overscan_text(self, key: MasterKey) -> str:
        ov = self.overscan_for(key.shape)
        return "" if ov is None else ov.describe()

    def bayer_of(self, record: MasterRecord) -> str | None:
        """CFA pattern of the master's pixels (the raw one shifted by an odd overscan crop)."""
        ov = self.overscan_for(record.key.shape)
        return record.key.bayer if ov is None else ov.pattern(record.key.bayer)

    def _dirty_stale_overscan(self) -> None:
        """Masters integrated under another overscan setting have another geometry than the lights
        now get: re-integrate them (their members are still listed)."""
        with self._lock:
            rows = self._db.execute("SELECT id, record FROM masters WHERE record IS NOT NULL AND frozen = 0").fetchall()
            for mid, text in rows:
                rec = _record_from_dict(json.loads(text))
                if rec.overscan != self._overscan_text(rec.key):
                    self._mark_dirty(str(mid), count=False)

    def _key_readout_modes(self) -> None:
        """Masters keyed before the readout mode was part of master keys get the mode their members
        were taken in, when they all share one (the members' recorded headers say it): new frames of
        that mode then join them instead of starting a new master, and matching treats them as that
        mode, not as "mode unknown". Masters whose members mix modes keep no mode."""
        with self._lock:
            rows = self._db.execute("SELECT id, key, record FROM masters").fetchall()
            for mid, key_json, record_json in rows:
                key = MasterKey.from_dict(json.loads(key_json))
                if key.readout_mode:
                    continue
                infos = self._db.execute("SELECT info FROM members WHERE master_id = ?", (mid,)).fetchall()
                modes = {readout_mode_key(_info_from_json(r[0]).readout_mode) for r in infos}
                if len(modes) != 1 or "" in modes:
                    continue
                key = dataclasses.replace(key, readout_mode=modes.pop())
                record = None
                if record_json:
                    d = json.loads(record_json)
                    d["key"] = key.as_dict()
                    record = json.dumps(d)
                self._db.execute(
                    "UPDATE masters SET key = ?, key_id = ?, record = ? WHERE id = ?",
                    (json.dumps(key.as_dict()), key.id, record, mid),
                )

    # -- members ------------------------------------------------------------------------------------

    def _master_id_for(self, key: MasterKey) -> str:
        """The open (not frozen) master of a key, created if needed."""
        rows = self._db.execute(
            "SELECT id, frozen, generation FROM masters WHERE key_id = ? ORDER BY generation DESC", (key.id,)
        ).fetchall()
        if rows and not rows[0][1]:
            return str(rows[0][0])
        gen = (int(rows[0][2]) + 1) if rows else 1
        mid = key.id if gen == 1 else f"{key.id}-{gen}"
        self._db.execute(
            "INSERT INTO masters(id, key_id, kind, key, dirty, dirty_since, pending, generation) VALUES (?,?,?,?,1,?,0,?)",
            (mid, key.id, key.kind, json.dumps(key.as_dict()), self._clock(), gen),
        )
        return mid

    def add_frames(self, paths: Iterable[str | os.PathLike[str]], *, rebuild: bool = True) -> list[MasterRecord]:
        """Register calibration frames (lights and unknown frames are ignored, unreadable files and
        masters integrated by another program raise :class:`FrameError` naming the reason) and, when
        ``rebuild``, re-integrate the masters they changed.

        Returns the masters rebuilt (empty when ``rebuild`` is False or nothing changed).
        """
        changed: set[str] = set()
        for p in paths:
            path = os.path.abspath(os.fspath(p))
            try:
                st = os.stat(path)
            except OSError as exc:
                raise FrameError(path, f"cannot stat ({exc.strerror})") from None
            info = classify(fitsio.read_header(path), path)
            if info.foreign_master:
                raise FrameError(path, _foreign_master_reason(info))
            key = master_key(info)
            if key is None:
                continue
            fitsio.read_rows(path, 0, 1)  # cheap: refuses truncated files now, not at integration
            with self._lock:
                row = self._db.execute("SELECT size, mtime_ns, master_id FROM members WHERE path = ?", (path,)).fetchone()
                if row and row[0] == st.st_size and row[1] == st.st_mtime_ns:
                    continue  # already a member, unchanged
                if row:
                    self._db.execute("DELETE FROM members WHERE path = ?", (path,))
                    self._mark_dirty(str(row[2]))
                mid = self._master_id_for(key)
                self._db.execute(
                    "INSERT INTO members(path, size, mtime_ns, kind, master_id, info, added) VALUES (?,?,?,?,?,?,?)",
                    (path, st.st_size, st.st_mtime_ns, info.kind, mid, _info_to_json(info), time.time()),
                )
                self._mark_dirty(mid)
                changed.add(mid)
        if rebuild and changed:
            return self.rebuild()
        return []

    def _mark_dirty(self, mid: str, *, count: bool = True) -> None:
        self._db.execute(
            "UPDATE masters SET dirty = 1, dirty_since = ?, pending = pending + ? WHERE id = ?",
            (self._clock(), 1 if count else 0, mid),
        )

    def due(self, *, debounce_s: float = 20.0, debounce_members: int = 10) -> list[str]:
        """Dirty masters ready to be re-integrated: quiet for ``debounce_s`` since the last new member,
        or at least ``debounce_members`` new members waiting."""
        now = self._clock()
        with self._lock:
            rows = self._db.execute("SELECT id, dirty_since, pending FROM masters WHERE dirty = 1 AND frozen = 0").fetchall()
        return [str(r[0]) for r in rows if (now - float(r[1] or 0.0)) >= debounce_s or int(r[2]) >= debounce_members]

    def pending(self) -> list[str]:
        """Ids of the masters waiting for re-integration."""
        with self._lock:
            return [str(r[0]) for r in self._db.execute("SELECT id FROM masters WHERE dirty = 1 AND frozen = 0")]

    # -- integration --------------------------------------------------------------------------------

    def rebuild(self, ids: Sequence[str] | None = None) -> list[MasterRecord]:
        """Re-integrate dirty masters (all, or ``ids``): bias and flat-darks first, then darks, then
        flats (calibrated with the fresh masters). Returns the rebuilt records."""
        out: list[MasterRecord] = []
        self.last_errors = []
        with self._lock:
            rows = self._db.execute("SELECT id, kind FROM masters WHERE dirty = 1 AND frozen = 0").fetchall()
        todo = [(str(r[0]), str(r[1])) for r in rows if ids is None or r[0] in ids]
        todo.sort(key=lambda t: (_KIND_ORDER.get(t[1], 9), t[0]))
        flats_to_dirty: set[tuple[Any, ...]] = set()
        for mid, kind in todo:
            if kind == "flat":
                continue
            rec = self._rebuild_one(mid)
            if rec is not None:
                out.append(rec)
                if kind in ("bias", "darkflat"):
                    flats_to_dirty.add(rec.key.sensor)
        with self._lock:
            if flats_to_dirty:
                for fid, key_json in self._db.execute("SELECT id, key FROM masters WHERE kind = 'flat' AND frozen = 0").fetchall():
                    if MasterKey.from_dict(json.loads(key_json)).sensor in flats_to_dirty:
                        self._db.execute("UPDATE masters SET dirty = 1 WHERE id = ?", (fid,))
            flat_ids = [
                str(r[0]) for r in self._db.execute("SELECT id FROM masters WHERE kind = 'flat' AND dirty = 1 AND frozen = 0")
            ]
        for fid in sorted(flat_ids):
            if ids is None or fid in ids or any(t[1] in ("bias", "darkflat") for t in todo):
                rec = self._rebuild_one(fid)
                if rec is not None:
                    out.append(rec)
        return out

    def _members(self, mid: str) -> list[tuple[str, int, int, FrameInfo]]:
        with self._lock:
            rows = self._db.execute("SELECT path, size, mtime_ns, info FROM members WHERE master_id = ? ORDER BY path", (mid,)).fetchall()
        return [(str(r[0]), int(r[1]), int(r[2]), _info_from_json(r[3])) for r in rows]

    def _rebuild_one(self, mid: str) -> MasterRecord | None:
        """Re-integrate one master; a master that cannot be built (e.g. no usable flat) is reported in
        ``last_errors`` and left as it was until a new member arrives."""
        try:
            return self._rebuild_one_unchecked(mid)
        except StackwatchError as exc:
            self.last_errors.append(f"master {mid}: {exc}")
            with self._lock:
                self._db.execute("UPDATE masters SET dirty = 0, pending = 0 WHERE id = ?", (mid,))
            return None

    def _rebuild_one_unchecked(self, mid: str) -> MasterRecord | None:
        members = self._members(mid)
        with self._lock:
            row = self._db.execute("SELECT key, record FROM masters WHERE id = ?", (mid,)).fetchone()
        if row is None or not members:
            return None
        key = MasterKey.from_dict(json.loads(row[0]))
        missing = [p for p, size, mtime, _ in members if not _same_file(p, size, mtime)]
        if missing:
            with self._lock:
                self._db.execute("UPDATE masters SET frozen = 1, dirty = 0 WHERE id = ?", (mid,))
            return None
        infos = [m[3] for m in members]
        paths = [m[0] for m in members]
        subtract: list[np.ndarray | None] | None = None
        notes: list[str] = []
        if key.kind == "flat":
            subtract = []
            for info in infos:
                arr, note = self._flat_calibration(info)
                subtract.append(arr)
                notes.append(note)
        ov = self.overscan_for(key.shape)
        bayer = key.bayer if ov is None else ov.pattern(key.bayer)
        result = integrate_master(
            key.kind, paths, subtract=subtract, bayer=bayer, band_budget_bytes=self.band_budget_bytes, overscan=ov
        )
        header = master_header(result, key, infos)
        used = [i for i in infos if i.path in set(result.members)]
        temps = [i.temperature_c for i in used if i.temperature_c is not None]
        exps = [i.exposure_s for i in used if i.exposure_s is not None]
        dates = sorted(i.date_obs for i in used if i.date_obs)
        median, noise = _stats(result.image, bayer)
        header["NOISE"] = (noise, "MRS noise of the master (central window)")
        out_path = self.masters_dir / f"{mid}.fits"
        distinct = sorted(set(notes))
        history = [f"stackwatch master {key.kind} {mid}", *(f"member {p}" for p in result.members), *distinct]
        fitsio.write_image(out_path, result.image, header=header, history=history)
        defects = out_path.with_name(f"{mid}.defects.fits")
        if defects.exists():
            defects.unlink()
        rec = MasterRecord(
            key=key,
            path=str(out_path),
            ncombine=result.ncombine,
            exposure_s=float(np.mean(exps)) if exps else None,
            temperature_c=round(float(np.mean(temps)), 2) if temps else None,
            date_first=dates[0] if dates else None,
            date_last=dates[-1] if dates else None,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            rejection=f"{result.rejection} " + " ".join(f"{k}={v:g}" for k, v in result.params.items()),
            median=median,
            noise=noise,
            members=result.members,
            warnings=tuple(result.warnings) + tuple(n for n in distinct if "none" in n),
            overscan=result.overscan,
        )
        with self._lock:
            self._db.execute(
                "UPDATE masters SET path = ?, record = ?, dirty = 0, pending = 0 WHERE id = ?",
                (str(out_path), json.dumps(record_dict(rec)), mid),
            )
            self._cache.pop(str(out_path), None)
        return rec

    def _flat_calibration(self, info: FrameInfo) -> tuple[np.ndarray | None, str]:
        ms = self.match(info)
        if ms.darkflat is not None:
            return self.load(ms.darkflat), f"flats calibrated with flat-dark {Path(ms.darkflat.path).stem}"
        if ms.bias is not None:
            return self.load(ms.bias), f"flats calibrated with bias {Path(ms.bias.path).stem}"
        if ms.dark is not None:
            return self.load(ms.dark), f"flats calibrated with dark {Path(ms.dark.path).stem}"
        return None, "flats calibrated with none: no flat-dark, bias or dark"

    # -- queries ------------------------------------------------------------------------------------

    def masters(self) -> list[MasterRecord]:
        """Every built master (frozen ones included), bias, flat-dark, dark, flat order."""
        with self._lock:
            rows = self._db.execute("SELECT record FROM masters WHERE record IS NOT NULL").fetchall()
        recs = [_record_from_dict(json.loads(r[0])) for r in rows]
        recs.sort(key=lambda r: (_KIND_ORDER.get(r.kind, 9), r.key.id, r.path))
        return recs

    def match(self, info: FrameInfo) -> MasterSet:
        """The masters for a light or flat, with explanations (:func:`stackwatch.engine.library.match`);
        masters integrated under another overscan setting than the current one are left out."""
        usable = [r for r in self.masters() if r.overscan == self._overscan_text(r.key)]
        ms = match(info, usable, rules=self.rules)
        if ms.optimize_dark and ms.dark is not None and ms.bias is not None:
            ms = self._check_glow(ms)
        return ms

    def _check_glow(self, ms: MasterSet) -> MasterSet:
        """§3.2: with ``optimize_darks = "auto"`` a dark with amp glow is scaled by t_L/t_D, not
        optimised (glow does not scale like warm pixels); with "always" the optimisation runs and the
        explanation warns."""
        assert ms.dark is not None and ms.bias is not None
        st = self.dark_structure(ms.dark, ms.bias)
        if not st.glow:
            return ms
        auto = self.rules.optimize_darks == "auto"
        tail = f"optimisation off: {st.reason}" if auto else f"warning: {st.reason} (optimisation forced by optimize_darks = always)"
        notes = [
            (n.replace(" (to be optimised)", "").replace(" (optimised)", "") + f"; {tail}" if auto else f"{n}; {tail}")
            if n.startswith("dark: ")
            else n
            for n in ms.explanations
        ]
        return dataclasses.replace(ms, optimize_dark=ms.optimize_dark and not auto, explanations=tuple(notes))

    def dark_structure(self, dark: MasterRecord, bias: MasterRecord) -> DarkStructure:
        """Amp-glow check of a master dark against its bias (§3.2), once per file versions."""
        key = ("glow", self._version(dark), self._version(bias))
        with self._lock:
            hit = self._derived.get(key)
        if hit is None:
            hit = dark_structure(self.load(dark), self.load(bias))
            with self._lock:
                if len(self._derived) > 32:
                    self._derived.clear()
                self._derived[key] = hit
        return hit  # type: ignore[no-any-return]

    def load(self, record: MasterRecord) -> np.ndarray:
        """The master's pixels (cached while the file is unchanged)."""
        path = record.path
        try:
            mtime = os.stat(path).st_mtime
        except OSError as exc:
            raise FrameError(path, f"master file unreadable ({exc.strerror})") from None
        with self._lock:
            hit = self._cache.get(path)
            if hit and hit[0] == mtime:
                return hit[1]
        data = fitsio.read_image(path).data
        data.setflags(write=False)
        with self._lock:
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[path] = (mtime, data)
        return data

    def _version(self, record: MasterRecord | None) -> tuple[str, float] | None:
        if record is None:
            return None
        try:
            return (record.path, os.stat(record.path).st_mtime)
        except OSError as exc:
            raise FrameError(record.path, f"master file unreadable ({exc.strerror})") from None

    def flat_scale(self, flat: MasterRecord) -> FlatScale:
        """s0 of a master flat (per CFA channel when it has a pattern); cached per file version."""
        key = ("s0", self._version(flat))
        with self._lock:
            hit = self._derived.get(key)
        if hit is None:
            hit = flat_scale(self.load(flat), self.bayer_of(flat))
            with self._lock:
                if len(self._derived) > 32:
                    self._derived.clear()
                self._derived[key] = hit
        return hit  # type: ignore[no-any-return]

    def defects(
        self,
        dark: MasterRecord | None,
        *,
        bias: MasterRecord | None = None,
        flat: MasterRecord | None = None,
        hot_sigma: float = 5.0,
    ) -> DefectMap | None:
        """The defect map of a master dark (+ flat), computed once and cached next to the dark (and
        in memory per file versions)."""
        base = dark or flat
        if base is None:
            return None
        mkey = ("defects", self._version(dark), self._version(bias), self._version(flat), hot_sigma)
        with self._lock:
            hit = self._derived.get(mkey)
        if hit is not None:
            return hit  # type: ignore[no-any-return]
        dm = self._defects_file(base, dark, bias, flat, hot_sigma)
        with self._lock:
            if len(self._derived) > 32:
                self._derived.clear()
            self._derived[mkey] = dm
        return dm

    def _defects_file(
        self,
        base: MasterRecord,
        dark: MasterRecord | None,
        bias: MasterRecord | None,
        flat: MasterRecord | None,
        hot_sigma: float,
    ) -> DefectMap:
        # the tag names the exact versions of bias and flat (a master is re-integrated in place as
        # members arrive): a defect map from an earlier flat must not outlive it
        tag = "_".join(f"{Path(r.path).stem}@{r.created or ''}#{r.ncombine}" for r in (bias, flat)
                       if r is not None) or "alone"
        cache = Path(base.path).with_name(f"{Path(base.path).stem}.defects.fits")
        bayer = self.bayer_of(base)
        ov = self.overscan_for(base.key.shape)
        out_shape = base.key.shape if ov is None else ov.output_shape(base.key.shape)
        shape = (int(out_shape[-2]), int(out_shape[-1]))
        if cache.exists() and cache.stat().st_mtime >= os.stat(base.path).st_mtime:
            try:
                from astropy.io import fits

                with fits.open(cache) as hdul:
                    if hdul[0].header.get("SWTAG") == tag and float(hdul[0].header.get("HOTSIG", -1)) == hot_sigma:
                        arrays = {h.name: np.asarray(h.data) for h in hdul[1:] if h.data is not None}
                        return DefectMap.from_arrays(shape, arrays, str(hdul[0].header.get("SWRULE", "")))
            except OSError:
                pass
        dm = defect_map(
            None if dark is None else self.load(dark),
            bias=None if bias is None else self.load(bias),
            flat=None if flat is None else self.load(flat),
            bayer=bayer,
            hot_sigma=hot_sigma,
            cold_sigma=hot_sigma,
        )
        from astropy.io import fits

        hdr = fits.Header()
        hdr["SWTAG"] = tag
        hdr["HOTSIG"] = hot_sigma
        hdr["SWRULE"] = dm.rule[:68]
        hdr["NHOT"] = int(dm.hot.size)
        hdr["NCOLD"] = int(dm.cold.size)
        hdr["NDEAD"] = int(dm.dead.size)
        extra = {k: (v if v.size else np.zeros(0, np.int32)) for k, v in dm.to_arrays().items()}
        fitsio.write_image(cache, np.zeros((1, 1), np.float32), header=hdr, extra_hdus=extra)
        return dm


def _foreign_master_reason(info: FrameInfo) -> str:
    """Why a master integrated by another program is left out of the library.

    Averaged in as one more raw frame it would count as one member among raw frames of another
    noise and be clipped like one. Used as a master of its own, it would silently carry the other
    program's conventions, which its header does not state: MaxIm DL subtracts the bias from its master
    darks when it has a bias (ours contain the bias: every light would keep its bias), PixInsight's
    and Siril's keep it; flats may be normalised or not, calibrated with flat-darks or bias, in ADU
    or in [0, 1]. A wrong guess biases every light of the night without a visible error; the raw
    frames give a master that is known to be right."""
    label = {"darkflat": "flat-dark"}.get(info.kind, info.kind)
    return (f"ignored: a master {label} integrated by another program ({info.foreign_master}); stackwatch builds "
            f"its masters from raw frames: put the raw {label} frames in the folder")


def _same_file(path: str, size: int, mtime_ns: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_size == size and st.st_mtime_ns == mtime_ns


def _stats(image: np.ndarray, bayer: str | None) -> tuple[float | None, float | None]:
    from stackwatch.engine import stats

    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return None, None
    median = float(np.median(finite[:: max(1, finite.size // 1_000_000)]))
    try:
        if bayer:
            noise = float(stats.cfa_noise(image, bayer, window_px=1024, valid_range=(-np.inf, np.inf))["G"])
        else:
            noise = float(stats.mrs_noise(image, window_px=1024, valid_range=(-np.inf, np.inf)).sigma)
    except (ValueError, StackwatchError):
        noise = float("nan")
    return median, (noise if np.isfinite(noise) else None)
