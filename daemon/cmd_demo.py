"""`stackwatch demo`: a simulated night written frame by frame, stacked live, shown in the browser.

A temporary folder gets ``capture/`` (written as a capture program would: frame after frame, each file
in chunks, biases and darks first, lights through the night, flats and flat-darks at dawn) and
``state/`` (the service's). The service runs on ``capture/`` with the web view on
http://127.0.0.1:8080. Time is compressed: one light every ``--pace`` seconds (calibration frames
five times faster), or the whole night in ``--duration`` seconds. Ctrl-C stops cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["register", "run", "write_night"]

_log = logging.getLogger("stackwatch.demo")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="simulate a night at a compressed, realistic pace and run the service on it (web view)",
        description="Write a simulated night into a temporary folder frame by frame and run the live-stacking "
        "service on it, with the web view on http://127.0.0.1:8080. Ctrl-C stops.",
    )
    p.add_argument("--preset", choices=("small", "medium", "full"), default="small",
                   help="frame size: small 512x384, medium 2048x1536, full 6248x4176 (26 MP). Default small")
    p.add_argument("--osc", action="store_true", help="one-shot-colour camera (RGGB)")
    p.add_argument("--lights", type=int, default=30, help="number of lights. Default 30")
    p.add_argument("--calibration", type=int, default=5, help="frames of each calibration kind. Default 5")
    p.add_argument("--seed", type=int, default=1, help="random seed of the night. Default 1")
    p.add_argument("--pace", type=float, default=3.0,
                   help="seconds between two lights (calibration frames: a fifth of it). Default 3")
    p.add_argument("--duration", type=float, default=None,
                   help="spread the whole night over this many seconds instead of --pace")
    p.add_argument("--host", default="127.0.0.1", help="web view address. Default 127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="web view port. Default 8080")
    p.add_argument("--dir", default=None, metavar="DIR",
                   help="use (and keep) this folder instead of a temporary one that is deleted at the end")
    p.add_argument("--exit-when-done", action="store_true",
                   help="stop once the night is written and every frame is processed (for scripts)")
    p.set_defaults(func=run)


def write_night(
    capture: Path,
    *,
    preset: str = "small",
    osc: bool = False,
    lights: int = 30,
    calibration: int = 5,
    seed: int = 1,
    pace_s: float = 3.0,
    duration_s: float | None = None,
    stop: threading.Event | None = None,
    on_frame: Callable[[str, int, int], None] | None = None,
) -> int:
    """Render and write the night into ``capture`` in capture order at the compressed pace.

    Each file is written in 8 chunks (like a slow capture program) to its final name. Returns the
    number of files written (fewer when ``stop`` is set).
    """
    import time

    from stackwatch.engine import simulate

    spec = simulate.preset(preset, osc=osc, seed=seed, n_lights=lights, n_darks=calibration,
                           n_flats=calibration, n_darkflats=calibration, n_biases=calibration,
                           trails=(1,) if lights >= 3 else ())
    truth = simulate.make_truth(spec)
    frames = truth.frames
    weights = [1.0 if f.kind == "light" else 0.2 for f in frames]
    pace = pace_s if duration_s is None else duration_s / max(1e-9, sum(weights))
    total = len(frames)
    t_next = time.monotonic()
    written = 0
    for i, fr in enumerate(simulate.iter_night(truth)):
        if stop is not None and stop.is_set():
            break
        delay = t_next - time.monotonic()
        if delay > 0:
            if stop is None:
                time.sleep(delay)
            elif stop.wait(delay):
                break
        blob_size = fr.data.size * 2 + 5760
        chunk_pause = min(0.05, 0.25 * pace * weights[i] / 8)
        simulate.write_fits(capture / fr.filename, fr.data, fr.header, chunk_bytes=-(-blob_size // 8),
                            chunk_delay_s=chunk_pause)
        written += 1
        if on_frame is not None:
            on_frame(fr.filename, written, total)
        t_next += pace * weights[i]
    return written


def run(args: argparse.Namespace) -> int:
    from stackwatch.daemon.cmd_run import setup_logging

    setup_logging("INFO")
    if args.dir:
        root = Path(args.dir)
        root.mkdir(parents=True, exist_ok=True)
        cleanup = False
    else:
        root = Path(tempfile.mkdtemp(prefix="stackwatch-demo-"))
        cleanup = True
    try:
        return asyncio.run(_demo(args, root))
    finally:
        if cleanup:
            shutil.rmtree(root, ignore_errors=True)


async def _demo(args: argparse.Namespace, root: Path, service_kwargs: dict[str, Any] | None = None) -> int:
    from stackwatch.daemon.cmd_run import serve
    from stackwatch.daemon.config import Config

    capture, state = root / "capture", root / "state"
    capture.mkdir(parents=True, exist_ok=True)
    config = Config()
    config.service.host = args.host
    config.service.port = args.port
    config.watch.stable_for_s = 1.0
    # the night is compressed, so is the wait after the last calibration frame before its masters are
    # integrated (the dawn flats, then the recalibration of the lights stacked without them)
    config.library.master_debounce_s = min(config.library.master_debounce_s, 3.0)
    ready = asyncio.Event()
    stop = threading.Event()
    services: list[Any] = []
    server = asyncio.create_task(serve(config, watch_dir=capture, state_dir=state, ready=ready,
                                       service_kwargs=service_kwargs, on_service=services.append),
                                 name="service")
    ready_wait = asyncio.create_task(ready.wait())
    await asyncio.wait([server, ready_wait], return_when=asyncio.FIRST_COMPLETED)
    if server.done():
        ready_wait.cancel()
        return int(server.result())
    print(f"\nstackwatch demo: a simulated night is being written into {capture}", flush=True)
    print(f"  open http://{args.host}:{args.port}/ to watch the stack grow (Ctrl-C stops)", flush=True)
    print(f"  state (catalogue, masters, stacks) in {state}\n", flush=True)

    def progress(name: str, k: int, n: int) -> None:
        _log.info("demo: wrote %s (%d/%d)", name, k, n)

    writer = asyncio.create_task(asyncio.to_thread(
        write_night, capture, preset=args.preset, osc=args.osc, lights=args.lights,
        calibration=args.calibration, seed=args.seed, pace_s=args.pace, duration_s=args.duration, stop=stop,
        on_frame=progress), name="night-writer")
    try:
        await asyncio.wait([server, writer], return_when=asyncio.FIRST_COMPLETED)
        if writer.done() and not server.done():
            n = writer.result()
            print(f"\nstackwatch demo: the night is complete ({n} files); the service keeps running "
                  f"(Ctrl-C stops)", flush=True)
            if args.exit_when_done:
                await _wait_settled(services[0], capture, server)
                services[0].request_stop()
        return int(await server)
    finally:
        stop.set()
        if not writer.done():
            with contextlib.suppress(Exception):
                await writer


async def _wait_settled(service: Any, capture: Path, server: asyncio.Task[Any]) -> None:
    """Until every written file is catalogued and the service has nothing left to do: the queue
    drained, the dawn masters integrated, the lights stacked before them recalibrated and their stacks
    rebuilt (``Service.settled``). Returns early when the service stops by itself."""
    from stackwatch.daemon.watcher import FileFilter, scan_folder

    n_files = await asyncio.to_thread(lambda: sum(1 for _ in scan_folder(FileFilter(root=capture))))
    while not server.done():
        await asyncio.sleep(0.5)
        if service.catalog is not None and service.catalog.counts()["seen"] >= n_files and service.settled():
            return
