"""`stackwatch inspect PATH... [--json]`: what stackwatch makes of each file.

One record per file (folders are searched recursively for FITS names: .fits .fit .fts, any case,
optionally .gz/.fz, and .xisf; hidden files and folders are skipped): path, kind, exposure_s, gain, offset,
temperature_c, binning, filter, object, shape, bayer, camera, date_obs, and ``error`` with the reason
when the file cannot be used. Pixels are read too (unless ``--headers-only``), so truncated files and
files without a valid pixel are reported exactly as the pipeline would refuse them.

Exit status: 0 when the paths could be inspected (even if some files are unreadable: they are
reported), 2 for bad usage (a path that does not exist).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

__all__ = ["COLUMNS", "collect_paths", "inspect_file", "register", "run"]

COLUMNS = (
    "path",
    "kind",
    "exposure_s",
    "gain",
    "offset",
    "temperature_c",
    "binning",
    "filter",
    "object",
    "shape",
    "bayer",
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show how each FITS file is classified (kind, exposure, gain, temperature, ...)",
        description="Classify FITS files and folders (recursively) and show the keys stackwatch uses.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="FITS files or folders")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument(
        "--headers-only", action="store_true", help="read headers only (faster; pixel problems go unnoticed)"
    )
    parser.add_argument("--config", metavar="FILE", help="TOML configuration (io.max_image_mpix)")
    parser.set_defaults(func=run)


def collect_paths(paths: list[str]) -> Iterator[str]:
    """Files named on the command line as given; folders walked recursively for FITS and XISF names, sorted."""
    from stackwatch.engine.fitsio import is_image_name

    for path in paths:
        if not os.path.isdir(path):
            yield path
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith(".") and is_image_name(name):
                    yield os.path.join(root, name)


def inspect_file(path: str, *, max_mpix: float = 200.0, read_pixels: bool = True) -> dict[str, Any]:
    """One record (see COLUMNS, plus camera, date_obs, kind_source, error) for one file."""
    from stackwatch.engine.classify import classify
    from stackwatch.engine.errors import StackwatchError
    from stackwatch.engine.fitsio import read_header, read_image

    record: dict[str, Any] = dict.fromkeys(COLUMNS)
    record.update(path=path, camera=None, date_obs=None, kind_source=None, error=None)
    try:
        header = read_image(path, max_mpix=max_mpix).header if read_pixels else read_header(path)
        info = classify(header, path)
    except StackwatchError as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        record.update(kind="unreadable", error=reason)
        return record
    record.update(
        kind=info.kind,
        exposure_s=info.exposure_s,
        gain=info.gain,
        offset=info.offset,
        temperature_c=info.temperature_c,
        binning=list(info.binning),
        filter=info.filter,
        object=info.object,
        shape=list(info.shape),
        bayer=info.bayer,
        camera=info.camera,
        date_obs=info.date_obs,
        kind_source=info.kind_source,
    )
    return record


def _fmt(key: str, value: Any) -> str:
    if value is None or value == "":
        return "-"
    if key in ("binning", "shape"):
        return "x".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _table(records: list[dict[str, Any]]) -> str:
    """Aligned columns; an unreadable file shows its path, "unreadable" and the reason."""
    header = list(COLUMNS)
    rows = []
    for rec in records:
        if rec["error"]:
            rows.append([rec["path"], "unreadable", f"error: {rec['error']}"])
        else:
            rows.append([_fmt(c, rec[c]) for c in COLUMNS])
    widths = [len(h) for h in header]
    for row in rows:
        cells = row if len(row) == len(header) else row[:2]
        widths = [max(w, len(cell)) for w, cell in zip(widths, cells)] + widths[len(cells) :]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    for row in rows:
        if len(row) == len(header):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        else:
            lines.append(f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    missing = [p for p in args.paths if not os.path.exists(p)]
    if missing:
        for p in missing:
            print(f"stackwatch inspect: {p}: no such file or folder", file=sys.stderr)
        return 2
    max_mpix = 200.0
    if args.config:
        from stackwatch.daemon.config import load_config

        max_mpix = load_config(args.config).io.max_image_mpix
    records: list[dict[str, Any]] = []
    with warnings.catch_warnings():
        # astropy warns about non-standard cards in many capture programs' headers; the records say
        # what matters. The CLI is single-threaded, so the global filter change is safe here.
        warnings.simplefilter("ignore")
        for path in collect_paths(list(args.paths)):
            records.append(inspect_file(path, max_mpix=max_mpix, read_pixels=not args.headers_only))
    if args.json:
        json.dump(records, sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif records:
        print(_table(records))
    if not records:
        print("stackwatch inspect: no FITS or XISF files found (.fits .fit .fts, optionally .gz/.fz; .xisf)", file=sys.stderr)
    else:
        bad = sum(1 for r in records if r["error"])
        if bad and not args.json:
            print(f"{len(records)} files, {bad} unreadable", file=sys.stderr)
    return 0
