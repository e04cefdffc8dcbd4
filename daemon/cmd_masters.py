"""`stackwatch masters PATH... --library DIR [--json]`: build or update the calibration library.

Every calibration frame (bias, dark, flat-dark, flat) found under PATH (folders recursively) is
registered as a member of its master; lights and unknown frames are ignored. Masters that gained or
changed members are re-integrated from all their members (so the result equals a batch integration),
flats after the bias and flat-darks they are calibrated with. Then one record per master in the
library is printed: kind, key fields, ncombine, path (``--json``: a list of records with every field,
plus ``updated``).

Exit status: 0 success (unreadable files are reported on stderr, one line each, and skipped),
1 when a master cannot be built (the others are still built; each failure is one line on stderr)
or the library folder is unusable, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "masters",
        help="build or update the calibration library (master bias, dark, flat-dark, flat) from folders",
        description="Integrate the calibration frames under PATH into masters in the library folder DIR. "
        "Lights are ignored. Masters are updated incrementally: a new member re-integrates its master.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="FITS files or folders (searched recursively)")
    parser.add_argument("--library", required=True, metavar="DIR", help="library folder (created if needed)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of master records")
    parser.add_argument("--config", metavar="FILE", help="TOML configuration ([library], [integration])")
    parser.set_defaults(func=run)


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _table(records: list[dict[str, Any]]) -> str:
    cols = ("kind", "exposure_s", "temperature_c", "filter", "night", "gain", "offset", "binning", "shape", "bayer",
            "ncombine", "path")
    rows = []
    for r in records:
        k = r["key"]
        rows.append([
            r["kind"] + ("*" if r.get("updated") else ""),
            _fmt(k["exposure_s"]),
            _fmt(r["temperature_c"]),
            _fmt(k["filter"]),
            _fmt(k["night"]),
            _fmt(k["gain"]),
            _fmt(k["offset"]),
            "x".join(str(v) for v in k["binning"]),
            "x".join(str(v) for v in k["shape"][::-1]),
            _fmt(k["bayer"]),
            str(r["ncombine"]),
            r["path"],
        ])
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from stackwatch.daemon.cmd_inspect import collect_paths
    from stackwatch.daemon.config import load_config
    from stackwatch.daemon.library_store import CalibrationLibrary, record_dict
    from stackwatch.engine.calibrate import Overscan
    from stackwatch.engine.errors import FrameError
    from stackwatch.engine.library import MatchRules

    missing = [p for p in args.paths if not os.path.exists(p)]
    if missing:
        for p in missing:
            print(f"stackwatch masters: {p}: no such file or folder", file=sys.stderr)
        return 2
    cfg = load_config(args.config)
    rules = MatchRules(
        temperature_tolerance_c=cfg.library.temperature_tolerance_c,
        exposure_tolerance_frac=cfg.library.exposure_tolerance_frac,
        allow_scaled_darks=cfg.library.allow_scaled_darks,
        optimize_darks=cfg.library.optimize_darks,
        flat_max_age_days=cfg.library.flat_max_age_days,
    )
    budget = int(cfg.integration.band_memory_mb) << 20
    # the service calibrates lights with this overscan setting: masters built here must match it
    cal = cfg.calibration
    overscan = Overscan.from_config(cal.overscan, cal.overscan_image_rect, cal.overscan_frame_px)
    n_files = 0
    n_bad = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-standard header cards of capture programs
        with CalibrationLibrary(args.library, rules=rules, band_budget_bytes=budget, overscan=overscan) as lib:
            for path in collect_paths(list(args.paths)):
                n_files += 1
                try:
                    lib.add_frames([path], rebuild=False)
                except FrameError as exc:
                    n_bad += 1
                    print(f"stackwatch masters: {exc}", file=sys.stderr)
            updated = {r.path for r in lib.rebuild()}
            errors = list(lib.last_errors)
            records = []
            for rec in lib.masters():
                d = record_dict(rec)
                d["updated"] = rec.path in updated
                records.append(d)
    if args.json:
        json.dump(records, sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif records:
        print(_table(records))
        print(f"{len(records)} masters ({len(updated)} updated, marked *) from {n_files} files", file=sys.stderr)
    if not records:
        print(f"stackwatch masters: no calibration frames among {n_files} files", file=sys.stderr)
    for r in records:
        for w in r["warnings"] if r.get("updated") else ():
            print(f"stackwatch masters: {os.path.basename(r['path'])}: {w}", file=sys.stderr)
    for e in errors:
        print(f"stackwatch masters: {e}", file=sys.stderr)
    return 1 if errors else 0
