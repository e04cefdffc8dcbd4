"""`stackwatch simulate OUTDIR`: write a realistic simulated night with its ground truth.

Writes ``lights/``, ``darks/``, ``flats/``, ``darkflats/``, ``biases/`` (16-bit FITS with N.I.N.A.-style
headers and file names) and ``truth/`` (see `stackwatch.engine.simulate`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from stackwatch.engine.errors import StackwatchError

__all__ = ["register", "run"]


def _clouds(text: str) -> tuple[tuple[int, float], ...]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            idx, frac = part.split(":")
            out.append((int(idx), float(frac)))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"bad cloud {part!r}: expected INDEX:TRANSPARENCY, e.g. 4:0.6") from exc
    return tuple(out)


def _indices(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad index list {text!r}: expected e.g. 1,5") from exc


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="write a realistic simulated night (lights, darks, flats, flat-darks, biases) with ground truth",
        description="Write a simulated night into OUTDIR as a capture program would, plus truth/ with the ground "
        "truth. Light indices in options are 0-based in capture order.",
    )
    p.add_argument("outdir", metavar="OUTDIR", help="folder to write (created; must be empty unless --force)")
    p.add_argument("--preset", choices=("small", "medium", "full"), default="small",
                   help="small 512x384 (seconds), medium 2048x1536, full 6248x4176 (26 MP). Default small")
    p.add_argument("--osc", action="store_true", help="one-shot-colour camera (RGGB mosaic)")
    p.add_argument("--seed", type=int, default=1, help="random seed (the night is identical for a seed). Default 1")
    p.add_argument("--lights", type=int, default=None, help="lights per filter (default: the preset's)")
    p.add_argument("--calibration", type=int, default=None,
                   help="number of each calibration kind: darks, flats, flat-darks, biases (default: the preset's)")
    p.add_argument("--no-calibration", action="store_true", help="write lights only")
    p.add_argument("--exposure", type=float, default=None, help="light exposure, seconds (default: the preset's)")
    p.add_argument("--dark-exposure", type=float, default=None, help="dark exposure, seconds (default: = lights)")
    p.add_argument("--filters", default=None, help="comma-separated filters for a mono camera, e.g. L,R,G,B")
    p.add_argument("--flip", action="store_true", help="meridian flip half-way through the lights")
    p.add_argument("--flip-after", type=int, default=None, metavar="I",
                   help="meridian flip after light I (0-based)")
    p.add_argument("--trails", type=_indices, default=None, metavar="I,J",
                   help="lights with a satellite trail (default: light 1 when there are >= 3 lights)")
    p.add_argument("--aircraft", type=_indices, default=(), metavar="I,J", help="lights with an aircraft trail")
    p.add_argument("--clouds", type=_clouds, default=(), metavar="I:T,...",
                   help="thin cloud: light index and its transparency, e.g. 4:0.6")
    p.add_argument("--field-psf", type=float, default=0.0, metavar="F",
                   help="off-axis PSF growth: 0 perfect optics, 0.2 mediocre flattener (wider, radially elongated "
                   "stars in the corners). Default 0")
    p.add_argument("--uncooled", action="store_true",
                   help="uncooled camera: no SET-TEMP, the sensor cools with the night air (dark current follows)")
    p.add_argument("--style", choices=("nina", "sgp", "maxim", "ekos"), default="nina",
                   help="capture program whose file names and headers to imitate. Default nina")
    p.add_argument("--bottom-up", action="store_true",
                   help="store rows bottom first with ROWORDER='BOTTOM-UP' (and the matching BAYERPAT)")
    p.add_argument("--target", choices=("galaxy", "nebula", "none"), default="galaxy", help="extended target")
    p.add_argument("--width", type=int, default=None, help="override the preset's width (even)")
    p.add_argument("--height", type=int, default=None, help="override the preset's height (even)")
    p.add_argument("--no-truth", action="store_true", help="do not write truth/")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUTDIR")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stackwatch.engine import simulate

    out = Path(args.outdir)
    if out.exists() and not out.is_dir():
        raise StackwatchError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise StackwatchError(f"{out}: folder is not empty (use --force to write into it)")
    over: dict[str, Any] = {"seed": args.seed, "osc": args.osc, "target": args.target, "field_psf": args.field_psf,
                            "header_style": args.style, "cooled": not args.uncooled, "row_order": "BOTTOM-UP" if args.bottom_up else "TOP-DOWN"}
    if args.lights is not None:
        over["n_lights"] = args.lights
    if args.calibration is not None:
        over.update(n_darks=args.calibration, n_flats=args.calibration, n_darkflats=args.calibration,
                    n_biases=args.calibration)
    if args.exposure is not None:
        over["exposure_s"] = args.exposure
    if args.dark_exposure is not None:
        over["dark_exposure_s"] = args.dark_exposure
    if args.filters:
        if args.osc:
            raise StackwatchError("--filters is for mono cameras; a colour camera has no filter wheel here")
        over["filters"] = tuple(f.strip() for f in args.filters.split(",") if f.strip())
    for key in ("width", "height"):
        if getattr(args, key) is not None:
            over[key] = getattr(args, key)
    base = simulate.preset(args.preset, **over)
    n_total = base.total_lights
    extra: dict[str, Any] = {"aircraft": args.aircraft, "clouds": args.clouds}
    extra["trails"] = args.trails if args.trails is not None else ((1,) if n_total >= 3 else ())
    if args.flip_after is not None:
        if not 0 <= args.flip_after < n_total - 1:
            raise StackwatchError(f"--flip-after {args.flip_after}: need 0 <= I < {n_total - 1} (lights are 0-based)")
        extra["meridian_flip_after"] = args.flip_after
    elif args.flip:
        extra["meridian_flip_after"] = max(0, n_total // 2 - 1)
    for name in ("trails", "aircraft"):
        bad = [i for i in extra[name] if not 0 <= i < n_total]
        if bad:
            raise StackwatchError(f"--{name} {bad[0]}: there are only {n_total} lights (0-based)")
    if any(not 0 <= i < n_total or not 0.0 < t <= 1.0 for i, t in extra["clouds"]):
        raise StackwatchError(f"--clouds: need 0 <= index < {n_total} and 0 < transparency <= 1")
    spec = simulate.SimulationSpec(**{**_spec_dict(base), **extra})
    kinds = ("light",) if args.no_calibration else simulate.KINDS
    truth = simulate.simulate_night(spec, out, truth_files=not args.no_truth, kinds=kinds)
    if not args.quiet:
        counts: dict[str, int] = {}
        for f in truth.frames:
            if f.kind in kinds:
                counts[f.kind] = counts.get(f.kind, 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in counts.items())
        print(f"{out}: {summary} ({spec.width}x{spec.height}, {'colour' if spec.osc else 'mono'}, seed {spec.seed})",
              file=sys.stdout)
    return 0


def _spec_dict(spec: Any) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
