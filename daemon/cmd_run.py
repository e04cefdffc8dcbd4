"""`stackwatch run --watch DIR`: the service and its web view in one event loop.

Signals: SIGTERM and SIGINT stop cleanly (the frame in flight finishes or is redone at the next start,
the stacks are checkpointed, exit 0); SIGHUP re-reads ``--config``. Under systemd (Type=notify) the
service reports READY, STATUS, WATCHDOG and STOPPING.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_STATE", "register", "run", "serve", "setup_logging"]

DEFAULT_STATE = "~/.local/share/stackwatch"

_log = logging.getLogger("stackwatch.run")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the live-stacking service on a capture folder, with the web view",
        description="Watch a capture folder, build the calibration library, calibrate, register, normalise "
        "and integrate every new light; serve the web view. Stops cleanly on SIGTERM/Ctrl-C; SIGHUP "
        "reloads the configuration.",
    )
    parser.add_argument("--watch", required=True, metavar="DIR", help="the capture folder (read only, recursive)")
    parser.add_argument("--state", default=None, metavar="DIR",
                        help=f"catalogue, library, frame store and stacks (default {DEFAULT_STATE}, or "
                        "$STATE_DIRECTORY under systemd)")
    parser.add_argument("--config", default=None, metavar="FILE", help="TOML configuration (see `stackwatch config --defaults`)")
    parser.add_argument("--host", default=None, help="web view address (default service.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="web view port (default service.port, 8080; 0 = any free port)")
    parser.add_argument("--no-web", action="store_true", help="run without the web view")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.set_defaults(func=run)


def setup_logging(level: str = "INFO") -> None:
    """One line per message on stderr; no timestamps under journald (it adds its own)."""
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journal else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    if not any(getattr(h, "_stackwatch", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
        handler._stackwatch = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(getattr(logging, level))
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("numba").setLevel(logging.WARNING)


def _state_dir(arg: str | None) -> Path:
    if arg:
        return Path(os.path.expanduser(arg))
    systemd_state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(systemd_state) if systemd_state else Path(os.path.expanduser(DEFAULT_STATE))


def run(args: argparse.Namespace) -> int:
    from stackwatch.daemon.config import load_config
    from stackwatch.engine.errors import StackwatchError

    setup_logging(args.log_level)
    config = load_config(args.config)
    if args.host is not None:
        config.service.host = args.host
    if args.port is not None:
        config.service.port = args.port
    watch = Path(os.path.expanduser(args.watch))
    if not watch.is_dir():
        raise StackwatchError(f"--watch {watch}: no such folder")
    return asyncio.run(serve(config, watch_dir=watch, state_dir=_state_dir(args.state), config_path=args.config,
                             web=not args.no_web))


async def serve(
    config: Any,
    *,
    watch_dir: Path,
    state_dir: Path,
    config_path: str | None = None,
    web: bool = True,
    ready: asyncio.Event | None = None,
    service_kwargs: dict[str, Any] | None = None,
    on_service: Any = None,
) -> int:
    """Run the service (and the web view) until SIGTERM/SIGINT or ``ready``'s owner stops it."""
    from stackwatch.daemon.service import Service

    service = Service(config, watch_dir=watch_dir, state_dir=state_dir, config_path=config_path,
                      **(service_kwargs or {}))
    if on_service is not None:
        on_service(service)
    loop = asyncio.get_running_loop()
    runner = None
    token = config.service.token
    if web:
        from stackwatch.web.app import check_bind  # lazily: the daemon does not depend on the web view

        check_bind(config.service.host, token)  # beyond loopback only with a configured token
        if not token:
            token = secrets.token_urlsafe(24)
    installed: list[int] = []
    for sig, handler in ((signal.SIGTERM, service.request_stop), (signal.SIGINT, service.request_stop),
                         (signal.SIGHUP, service.reload_config)):
        try:
            loop.add_signal_handler(sig, handler)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            pass
    try:
        if web:
            runner = await _start_web(service, config, token)
        await service.startup()
        if ready is not None:
            ready.set()
        await service.run()
    finally:
        await service.shutdown()
        if runner is not None:
            await runner.cleanup()
        for signum in installed:
            loop.remove_signal_handler(signum)
    return 0


async def _start_web(service: Any, config: Any, token: str) -> Any:
    from aiohttp import web as aioweb
    from stackwatch.web.app import create_app

    app = create_app(service, token=token, preview_max_px=int(config.service.preview_max_px))
    runner = aioweb.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = aioweb.TCPSite(runner, config.service.host, int(config.service.port))
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        from stackwatch.engine.errors import StackwatchError

        raise StackwatchError(
            f"web view: cannot listen on {config.service.host}:{config.service.port} ({exc.strerror or exc})"
        ) from None
    addresses = [f"http://{h}:{p}" for h, p in (s.getsockname()[:2] for s in _sockets(site))]
    url = addresses[0] if addresses else f"http://{config.service.host}:{config.service.port}"
    service.web_url = url
    _log.info("web view on %s", url)
    if not config.service.token:
        _log.info("token for state-changing requests (generated; set service.token to fix it): %s", token)
    return runner


def _sockets(site: Any) -> list[Any]:
    server = getattr(site, "_server", None)
    return list(getattr(server, "sockets", None) or [])
