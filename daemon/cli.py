"""The `stackwatch` command: one parser, one module per subcommand.

Each subcommand module (``cmd_<name>.py`` beside this file) has ``register(subparsers)``, which adds
its parser and sets ``func`` to a ``run(args) -> int``. Modules import heavy dependencies inside
``run`` so that ``stackwatch --help`` stays fast.

Exit status: 0 success, 1 failure, 2 bad usage. User errors (``StackwatchError``) print one line,
never a traceback.

The command's process keeps freed memory for reuse instead of returning it to the system (see
daemon/memory.py `keep_freed_memory`); ``STACKWATCH_MALLOC=system`` in the environment leaves glibc's
defaults.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# Numba already spreads the per-pixel work over the cores; BLAS threads on top oversubscribe them
# (the normalisation's 600-sample eigendecomposition: 0.19 s CPU on one thread, 1-1.2 s with threaded
# OpenBLAS on a busy 2-core machine). Set before numpy is first imported; the user's value wins.
for _blas in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_blas, "1")

from stackwatch.daemon.memory import keep_freed_memory  # noqa: E402 (after the BLAS setting)
from stackwatch.engine.errors import StackwatchError  # noqa: E402

__all__ = ["build_parser", "main"]

# Order is the order of `stackwatch --help`.
COMMAND_MODULES = [
    "stackwatch.daemon.cmd_inspect",
    "stackwatch.daemon.cmd_config",
    "stackwatch.daemon.cmd_masters",
    "stackwatch.daemon.cmd_stack",
    "stackwatch.daemon.cmd_simulate",
    "stackwatch.daemon.cmd_run",
    "stackwatch.daemon.cmd_demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stackwatch",
        description="Live stacking for astrophotography: calibrate, register, normalise and integrate FITS frames.",
    )
    from importlib.metadata import PackageNotFoundError, version

    try:
        parser.add_argument("--version", action="version", version=f"%(prog)s {version('stackwatch')}")
    except PackageNotFoundError:  # running from a source tree without an install
        pass
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and os.environ.get("STACKWATCH_MALLOC", "").strip().lower() != "system":
        # the command's own process (a caller passing argv, e.g. a test, keeps its allocator as it is)
        keep_freed_memory()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except StackwatchError as exc:
        print(f"stackwatch {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"stackwatch {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `stackwatch inspect ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
