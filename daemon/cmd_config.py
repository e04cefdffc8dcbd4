"""`stackwatch config --defaults`: print the whole documented configuration; `--check FILE` validates one."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("config", help="print the default configuration or check a file")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--defaults", action="store_true", help="print every parameter with its default and help")
    group.add_argument("--check", metavar="FILE", help="validate a TOML configuration file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stackwatch.daemon.config import defaults_toml, load_config

    if args.defaults:
        sys.stdout.write(defaults_toml())
        return 0
    load_config(args.check)
    print(f"{args.check}: ok")
    return 0
