"""`stackwatch stack PATH... --out FILE`: the whole pipeline in batch over files and folders.

Calibration frames build the library first; lights are grouped by target and filter, processed in
DATE-OBS order against a reference chosen by quality (or given with --reference), and integrated
from the frame store. The products are those `stackwatch run` reaches at the end of the night on the
same files: both drive `stackwatch.daemon.pipeline.Pipeline`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["output_paths", "register", "run"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "stack",
        help="calibrate, register, normalise and integrate FITS files in batch",
        description="Runs the whole pipeline over files and folders (lights and calibration frames mixed, "
        "classified from their headers) and writes one stack per target and filter.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="FITS files or folders (recursed)")
    parser.add_argument("--out", required=True, metavar="FILE", help="output FITS (named per target/filter when several)")
    parser.add_argument("--report", metavar="FILE.json", help="write a JSON report of every frame and stack")
    parser.add_argument("--reference", metavar="FILE", help="use this light as reference (geometry and normalisation)")
    parser.add_argument("--state", metavar="DIR", help="state folder to keep (library, frame store); default: temporary")
    parser.add_argument("--config", metavar="FILE", help="TOML configuration")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)


def output_paths(out: Path, stack_ids: list[str]) -> dict[str, Path]:
    """FILE for a single stack; FILE's stem + '_<stack id>' + suffix for several."""
    if len(stack_ids) == 1:
        return {stack_ids[0]: out}
    name = out.name
    suffix = ".fits"
    for ext in (".fits", ".fit", ".fts"):
        if name.lower().endswith(ext):
            suffix, name = name[-len(ext):], name[: -len(ext)]
            break
    return {sid: out.with_name(f"{name}_{sid}{suffix}") for sid in stack_ids}


class _Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.t0 = time.monotonic()

    def __call__(self, label: str, done: int, total: int) -> None:
        if self.quiet:
            return
        elapsed = time.monotonic() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (total - done) / rate if rate > 0 else float("nan")
        end = "\n" if done == total else "\r"
        sys.stderr.write(f"{label}: {done}/{total} frames, {rate:.2f} frames/s, ~{left:.0f} s left   {end}")
        sys.stderr.flush()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from stackwatch.daemon.config import load_config
    from stackwatch.daemon.pipeline import Pipeline, classify_paths
    from stackwatch.engine import fitsio
    from stackwatch.engine.errors import StackwatchError

    config = load_config(args.config)
    out = Path(args.out)
    if not out.parent.exists():
        raise StackwatchError(f"--out {out}: folder {out.parent} does not exist")
    progress = _Progress(args.quiet)
    files = classify_paths([Path(p) for p in args.paths])
    if not files:
        raise StackwatchError("no FITS files found in " + ", ".join(args.paths))
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if args.state:
        state = Path(args.state)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="stackwatch-")
        state = Path(tmp.name)
    try:
        pipeline = Pipeline(config, state)
        try:
            return _stack(args, pipeline, files, out, progress, fitsio)
        finally:
            pipeline.close()
    finally:
        if tmp is not None:
            tmp.cleanup()


def _stack(args: argparse.Namespace, pipeline: Any, files: list[Any], out: Path, progress: _Progress,
           fitsio: Any) -> int:
    from stackwatch.engine.errors import StackwatchError

    frames: list[dict[str, Any]] = []
    calibration: list[dict[str, Any]] = []
    lights = []
    for path, info, error in files:
        if info is None:
            frames.append({"path": str(path), "kind": "unknown", "status": "failed", "reason": error})
        elif info.is_calibration:
            calibration.append({"path": str(path), "kind": info.kind})
        elif info.kind == "light":
            lights.append((path, info))
        else:
            frames.append({"path": str(path), "kind": info.kind, "status": "failed",
                           "reason": "not a light or calibration frame (no frame type in header or name)"})
    if calibration:
        progress.say(f"calibration library: {len(calibration)} frames")
        try:
            pipeline.library.add_frames([c["path"] for c in calibration], rebuild=False)
        except StackwatchError as exc:
            # one bad calibration frame must not stop the rest: add them one by one
            progress.say(f"warning: {exc}")
            for c in calibration:
                try:
                    pipeline.library.add_frames([c["path"]], rebuild=False)
                except StackwatchError as one:
                    c["status"], c["reason"] = "failed", str(one)
        pipeline.flush_masters()
    # the same content twice (a copied or re-saved file) is stacked once, as the service does
    unique: list[tuple[Path, Any]] = []
    seen: dict[str, str] = {}
    for path, info in lights:
        digest = _sha1(path)
        if digest in seen:
            frames.append({"path": str(path), "kind": "light", "status": "rejected",
                           "reason": f"rejected: duplicate of {seen[digest]}"})
            continue
        seen[digest] = str(path)
        unique.append((path, info))
    lights = unique
    stack_ids: list[str] = []
    for path, info in lights:
        sid = pipeline.add_member(path, info)
        if sid not in stack_ids:
            stack_ids.append(sid)
    if args.reference:
        ref = Path(args.reference).resolve()
        owner = next((pipeline.add_member(p, i) for p, i in lights if Path(p).resolve() == ref), None)
        if owner is None:
            raise StackwatchError(f"--reference {args.reference}: not one of the lights being stacked")
        pipeline.set_reference(owner, str(ref))
    if not stack_ids:
        raise StackwatchError("nothing to stack: no light frames among the inputs")
    outputs = output_paths(out, sorted(stack_ids))
    stacks: list[dict[str, Any]] = []
    for sid in sorted(stack_ids):
        records = pipeline.rebuild(sid, progress=lambda d, t, sid=sid: progress(sid, d, t))
        frames += records
        summary = next(s for s in pipeline.stacks() if s["id"] == sid)
        if summary["ncombine"] == 0:
            progress.say(f"{sid}: no frame could be stacked")
            continue
        result = pipeline.finalize(sid, out_path=outputs[sid])
        _write_maps(pipeline, sid, outputs[sid], fitsio)
        stacks.append({
            "id": sid,
            "target": summary["target"],
            "filter": summary["filter"],
            "path": str(outputs[sid]),
            "ncombine": result["ncombine"],
            "exposure_s": result["exposure_s"],
            "reference": result["reference"],
            "rejection": result["rejection"],
        })
        progress.say(f"{sid}: {result['ncombine']} frames -> {outputs[sid]}")
    if args.report:
        report = {"frames": frames, "stacks": stacks, "calibration": calibration,
                  "masters": pipeline.masters()}
        from stackwatch.daemon.pipeline import json_default

        text = json.dumps(_clean(report), indent=1, default=json_default, allow_nan=False)
        Path(args.report).write_text(text, encoding="utf-8")
    if not stacks:
        reasons = sorted({f.get("reason", "") for f in frames if f.get("status") != "stacked"})
        raise StackwatchError("nothing could be stacked: " + "; ".join(r for r in reasons if r)[:500])
    return 0


def _sha1(path: Path) -> str:
    import hashlib

    h = hashlib.sha1(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_maps(pipeline: Any, sid: str, out: Path, fitsio: Any) -> None:
    """The rejection maps and coverage beside the stack, as their own files."""
    import numpy as np

    products = pipeline.stack_products(sid)
    if products is None:
        return
    stem = out.name
    for ext in (".fits", ".fit", ".fts"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    for key, suffix in (("rej_low", "rejlow"), ("rej_high", "rejhigh"), ("coverage", "coverage")):
        arr = products.get(key)
        if arr is not None:
            fitsio.write_image(out.with_name(f"{stem}_{suffix}.fits"), np.asarray(arr, np.float32),
                               history=[f"stackwatch: {key} of {out.name}"])


def _clean(value: Any) -> Any:
    """NaN and infinities become null (the report is strict JSON)."""
    import math

    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
