"""Benchmark the service: latency from "file closed" to "stack updated" and the service's memory.

A writer thread writes synthetic star-field frames (16-bit FITS, mono or RGGB colour) into a watched
folder one at a time, as a capture program would; the service (in this process, web view off) picks
each up through inotify, reads its header, hashes it, queues it in the catalogue and runs it through
the pipeline. For each frame we record the time between the writer closing the file and the
service's ``frame_processed`` event (same monotonic clock), and the process RSS (VmRSS) after it.

Pipelines:
  real   stackwatch.daemon.pipeline.Pipeline (calibrate, measure, register, normalise, integrate)
  numpy  a baseline: astropy read + float64 running mean in numpy (what the service costs around
         the cheapest possible stacking step)
The same run also times the bare pipeline call on one frame without the service, so the overhead of
the service itself shows as a ratio.

Per frame it also records the process CPU time between "closed" and "processed" (the machine is
shared: CPU time is steadier than wall time), and the stages the service reports with the event
(intake and queue, read, calibrate, noise/debayer, measure, register, resample, normalise, frame
store write and live update (overlapped), state save, catalogue); live checkpoints are timed apart
(they run between frames). The load average at start and end says how busy the machine was.

    .venv/bin/python bench/bench_service.py [--width 6248 --height 4176] [--frames 20] [--colour]
        [--pipeline real|numpy] [--delete-processed] [--reference-candidates N] [--block 100]
        [--checkpoint-frames N] [--malloc keep|system]

e.g. the night-growth run: ``--frames 300 --width 2048 --height 1536`` (3 MP); the 26 MP latency:
``--frames 10 --reference-candidates 1`` (the first frame is the reference: no rebuilds while the
reference is chosen, so every frame after it is a steady-state frame).

``--malloc keep`` (default) tunes glibc's malloc as the CLI does at start (daemon/cli.py
keep_freed_memory: freed frame-sized blocks are reused, not unmapped); ``system`` leaves its defaults
(each frame's arrays are then fresh memory, page-faulted on first touch).

Budget (design.md): file closed -> stack updated <= 1.5 s mono on 2 cores; service memory over 300
frames flat, <= 2 GB mono. Writes bench/results/service_<mono|colour>_<pipeline>_<W>x<H>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# as the CLI does (daemon/cli.py), before numpy is imported: threaded OpenBLAS on 2 busy cores took
# 3.75 s instead of 0.03 s for one of normalisation's eigendecompositions (not OMP_NUM_THREADS: numba)
for _blas in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_blas, "1")

import numpy as np  # noqa: E402 (after the BLAS setting)
from astropy.io import fits  # noqa: E402


def _rss_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MB."""
    rss = hwm = 0.0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return rss, hwm


def _star_field(h: int, w: int, rng: np.random.Generator, n_stars: int) -> np.ndarray:
    """Noiseless sky + Gaussian stars (float32 ADU), the same for every frame before shifts."""
    img = np.full((h, w), 1200.0, np.float32)
    img += (np.linspace(0, 150, w, dtype=np.float32)[None, :] + np.linspace(0, 80, h, dtype=np.float32)[:, None])
    ys = rng.uniform(20, h - 20, n_stars)
    xs = rng.uniform(20, w - 20, n_stars)
    fluxes = 10 ** rng.uniform(3.0, 5.5, n_stars)
    sigma = 1.4
    r = 7
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    for x, y, f in zip(xs, ys, fluxes, strict=True):
        ix, iy = round(x), round(y)
        g = np.exp(-(((xx + ix - x) ** 2 + (yy + iy - y) ** 2) / (2 * sigma**2)))
        img[iy - r:iy + r + 1, ix - r:ix + r + 1] += (f * g / g.sum()).astype(np.float32)
    return img


_DITHER = 8  # px; the field is drawn this much larger on each side and each frame is a shifted window


def _frame(base: np.ndarray, i: int, rng: np.random.Generator, colour: bool) -> np.ndarray:
    # a window, not np.roll: rolling wraps the sky gradient into a 150 ADU step at the border, which
    # sep detects as a 1000 px line (a trail-like artefact in every frame)
    dy, dx = int(rng.integers(-_DITHER, _DITHER + 1)), int(rng.integers(-_DITHER, _DITHER + 1))
    h, w = base.shape[0] - 2 * _DITHER, base.shape[1] - 2 * _DITHER
    img = base[_DITHER + dy : _DITHER + dy + h, _DITHER + dx : _DITHER + dx + w]
    noisy = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(12.0)
    if colour:  # RGGB: dim the R and B sites a little so the CFA is visible
        noisy[0::2, 0::2] *= 0.8
        noisy[1::2, 1::2] *= 0.7
    return np.clip(noisy, 0, 65535).astype(np.uint16)


def _header(i: int, colour: bool) -> fits.Header:
    h = fits.Header()
    h["IMAGETYP"] = "LIGHT"
    h["EXPTIME"] = 60.0
    h["OBJECT"] = "BENCH"
    h["FILTER"] = "" if colour else "L"
    h["INSTRUME"] = "BenchCam"
    h["GAIN"] = 100
    h["OFFSET"] = 50
    h["CCD-TEMP"] = -10.0
    h["XPIXSZ"] = 3.76
    h["FOCALLEN"] = 530.0
    h["DATE-OBS"] = f"2026-11-21T20:{i // 60 % 60:02d}:{i % 60:02d}"
    if colour:
        h["BAYERPAT"] = "RGGB"
    return h


class NumpyPipeline:
    """The baseline: astropy read + float64 running mean (no calibration, registration or rejection)."""

    def __init__(self, config: Any, state_dir: Path) -> None:
        self.sum: np.ndarray | None = None
        self.n = 0
        self.lock = threading.Lock()

    def add_calibration(self, path: Path, info: Any) -> list[dict[str, Any]]:
        return []

    def process_light(self, path: Path, info: Any) -> dict[str, Any]:
        with fits.open(path, memmap=False) as hdul:
            data = hdul[0].data.astype(np.float64) / 65535.0
        with self.lock:
            if self.sum is None:
                self.sum = np.zeros_like(data)
            self.sum += data
            self.n += 1
        return {"status": "stacked", "reason": "", "stack_id": "bench", "metrics": {}, "weight": 1.0}

    def stacks(self) -> list[dict[str, Any]]:
        return [{"id": "bench", "target": "BENCH", "filter": "", "ncombine": self.n, "version": self.n}]

    def stack_products(self, stack_id: str) -> dict[str, Any] | None:
        return None

    def finalize(self, stack_id: str) -> dict[str, Any]:
        return {}

    def checkpoint(self) -> None:
        pass


async def _run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from stackwatch.daemon.config import Config
    from stackwatch.daemon.service import Service

    watch, state = root / "watch", root / "state"
    watch.mkdir()
    config = Config()
    config.service.min_free_space_mb = 100.0
    config.live.checkpoint_frames = args.checkpoint_frames
    config.live.exact_pass_frames = 10**9
    if args.reference_candidates:
        config.normalization.reference_candidates = args.reference_candidates
    factory = None
    if args.pipeline == "numpy":
        factory = NumpyPipeline
    rng = np.random.default_rng(5)
    h, w = args.height, args.width
    base = _star_field(h + 2 * _DITHER, w + 2 * _DITHER, rng, n_stars=max(200, int(h * w / 40000)))
    closed: dict[str, float] = {}
    done: dict[str, float] = {}
    rss: list[float] = []
    results: dict[str, str] = {}
    stages: dict[str, dict[str, float]] = {}
    cpu_closed: dict[str, float] = {}
    cpu: dict[str, float] = {}
    checkpoints: list[tuple[float, float]] = []  # (wall, cpu) seconds of each live checkpoint
    processed = asyncio.Event()

    service = Service(config, watch_dir=watch, state_dir=state, pipeline_factory=factory)

    def on_event(event: dict[str, Any]) -> None:
        if event["type"] == "frame_processed" and event["data"].get("name") in closed:
            name = event["data"]["name"]
            done[name] = time.monotonic()
            cpu[name] = time.process_time() - cpu_closed[name]
            results[name] = str(event["data"].get("status"))
            stages[name] = {k: float(v) for k, v in (event["data"].get("stages") or {}).items()
                            if isinstance(v, int | float)}
            rss.append(_rss_mb()[0])
            processed.set()

    service.add_listener(on_event)
    load_start = os.getloadavg()
    await service.startup()
    pipeline_checkpoint = service.pipeline.checkpoint if service.pipeline is not None else None
    if pipeline_checkpoint is not None:
        def timed_checkpoint() -> None:
            w0, c0 = time.perf_counter(), time.thread_time()
            pipeline_checkpoint()
            checkpoints.append((time.perf_counter() - w0, time.thread_time() - c0))

        service.pipeline.checkpoint = timed_checkpoint  # type: ignore[method-assign, union-attr]
    runner = asyncio.create_task(service.run())
    lags: list[float] = []

    async def loop_lag() -> None:
        """How late a 10 ms sleep wakes up, and how long status() takes when a web page polls it (twice a
        second): the web view's view of the loop."""
        i = 0
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(0.01)
            i += 1
            if i % 50 == 0:
                service.status()
            lags.append(time.monotonic() - t0 - 0.01)

    lagger = asyncio.create_task(loop_lag())
    rss_start = _rss_mb()[0]
    try:
        for i in range(args.frames):
            # rendered (off the loop) before the clock starts
            data = await asyncio.to_thread(_frame, base, i, rng, args.colour)
            path = watch / f"bench_{i:04d}.fits"
            processed.clear()

            def write(path: Path = path, data: np.ndarray = data, i: int = i) -> None:
                fits.PrimaryHDU(data, header=_header(i, args.colour)).writeto(path)
                cpu_closed[path.name] = time.process_time()
                closed[path.name] = time.monotonic()

            await asyncio.to_thread(write)
            await asyncio.wait_for(processed.wait(), timeout=600)
            if args.delete_processed and i >= 30:
                old = watch / f"bench_{i - 30:04d}.fits"  # the disk would fill over 300 x 52 MB
                old.unlink(missing_ok=True)
            one = done[path.name] - closed[path.name]
            print(f"frame {i:4d}: {results[path.name]:8s} latency {one:6.3f} s  CPU {cpu[path.name]:6.3f} s  "
                  f"RSS {rss[-1]:7.0f} MB", flush=True)
        live_memory = _live_memory(service.pipeline)
    finally:
        lagger.cancel()
        service.request_stop()
        await runner
        await service.shutdown()
    load_end = os.getloadavg()
    rss_peak_service = _rss_mb()[1]
    run_cpu = resource.getrusage(resource.RUSAGE_SELF)
    names = sorted(done)
    lat = [done[n] - closed[n] for n in names]
    # steady state: the second half (the first frames pay numba compilation and, with the real
    # pipeline, the rebuilds while the reference is chosen among the first candidates)
    steady = lat[len(lat) // 2:] if len(lat) > 3 else lat
    # the bare pipeline call on one frame, without the service (same process, warm)
    probe = root / "probe"
    probe.mkdir()
    pth = probe / "bench_probe.fits"
    fits.PrimaryHDU(_frame(base, 999, rng, args.colour), header=_header(999, args.colour)).writeto(pth)
    from stackwatch.daemon.service import default_identify

    pipe: Any = factory(config, root / "state_probe") if factory else _real_pipeline(config, root / "state_probe")
    info = default_identify(pth, config)
    pipe.process_light(pth, info)  # warm (reference frame)
    pth2 = probe / "bench_probe2.fits"
    fits.PrimaryHDU(_frame(base, 998, rng, args.colour), header=_header(998, args.colour)).writeto(pth2)
    t0 = time.monotonic()
    pipe.process_light(pth2, default_identify(pth2, config))
    bare = time.monotonic() - t0
    n_half = max(1, len(rss) // 2)
    cpu_l = [cpu[n] for n in names]
    steady_names = names[len(names) // 2:] if len(names) > 3 else names
    stage_keys = sorted({k for n in steady_names for k in stages.get(n, {})})
    stage_median = {k: round(statistics.median([stages[n][k] for n in steady_names if k in stages.get(n, {})]), 4)
                    for k in stage_keys}
    blocks = []
    for b0 in range(0, len(lat), args.block):
        blk, blk_cpu = lat[b0:b0 + args.block], cpu_l[b0:b0 + args.block]
        blocks.append({"frames": f"{b0 + 1}-{b0 + len(blk)}", "median_latency_s": round(statistics.median(blk), 3),
                       "median_cpu_s": round(statistics.median(blk_cpu), 3),
                       "rss_mb_max": round(max(rss[b0:b0 + args.block]), 1)})
    return {
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in load_end]},
        "blocks": blocks,
        "cpu_s": {"all": [round(x, 3) for x in cpu_l],
                  "median": round(statistics.median(cpu_l[len(cpu_l) // 2:]), 3) if cpu_l else None,
                  "process_user": round(run_cpu.ru_utime, 1), "process_system": round(run_cpu.ru_stime, 1)},
        "stages_median_s": stage_median,
        "live_stack_mb": live_memory,
        "checkpoints": {"n": len(checkpoints),
                        "median_wall_s": round(statistics.median([c[0] for c in checkpoints]), 3) if checkpoints else None,
                        "median_cpu_s": round(statistics.median([c[1] for c in checkpoints]), 3) if checkpoints else None},
        "shape": [h, w],
        "colour": bool(args.colour),
        "pipeline": args.pipeline,
        "frames": len(names),
        "statuses": {s: list(results.values()).count(s) for s in set(results.values())},
        "latency_s": {
            "all": [round(x, 3) for x in lat],
            "first": round(lat[0], 3) if lat else None,
            "median": round(statistics.median(steady), 3) if steady else None,
            "p90": round(float(np.percentile(steady, 90)), 3) if steady else None,
            "max_steady": round(max(steady), 3) if steady else None,
        },
        "bare_pipeline_call_s": round(bare, 3),
        "loop_lag_ms": {"median": round(1e3 * statistics.median(lags), 2) if lags else None,
                        "p99": round(1e3 * float(np.percentile(lags, 99)), 2) if lags else None,
                        "max": round(1e3 * max(lags), 2) if lags else None},
        "service_overhead_ratio": round(statistics.median(steady) / bare, 3) if steady and bare > 0 else None,
        "rss_mb": {
            "start": round(rss_start, 1),
            "after_first_frame": round(rss[0], 1) if rss else None,
            "first_half_max": round(max(rss[:n_half]), 1) if rss else None,
            "second_half_max": round(max(rss[n_half:]), 1) if len(rss) > 1 else None,
            "last": round(rss[-1], 1) if rss else None,
            "peak_hwm_service": round(rss_peak_service, 1),
            "peak_hwm_with_probe": round(_rss_mb()[1], 1),
        },
        "cpus": os.cpu_count(),
        "malloc": args.malloc,
    }


def _live_memory(pipeline: Any) -> dict[str, float]:
    """MB held by the live stacks: per-pixel state (fixed) and the per-frame rejection lists (grow with
    the night; private to engine/live.py, read here for the figure only)."""
    fixed = rejections = 0
    for stack in getattr(pipeline, "_stacks", {}).values():
        live = getattr(stack, "live", None)
        if live is None:
            continue
        fixed += live.nbytes
        rejections += sum(a.nbytes for chunks in getattr(live, "_rej", {}).values() for a in chunks)
    return {"per_pixel_state": round(fixed / 2**20, 1), "rejection_lists": round(rejections / 2**20, 1)}


def _real_pipeline(config: Any, state: Path) -> Any:
    from stackwatch.daemon.pipeline import Pipeline

    return Pipeline(config, state)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=6248)
    parser.add_argument("--height", type=int, default=4176)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--colour", action="store_true", help="RGGB one-shot-colour frames")
    have_real = importlib.util.find_spec("stackwatch.daemon.pipeline") is not None
    parser.add_argument("--pipeline", choices=("real", "numpy"), default="real" if have_real else "numpy")
    parser.add_argument("--delete-processed", action="store_true",
                        help="delete raw files 30 frames after they were processed (long runs at 26 MP fill the "
                        "disk); the pipeline rebuilds stacks from raw files while it chooses the reference, so "
                        "never for short runs")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--reference-candidates", type=int, default=0,
                        help="normalization.reference_candidates (0: the configuration's default)")
    parser.add_argument("--block", type=int, default=100, help="frames per block of the latency table")
    parser.add_argument("--checkpoint-frames", type=int, default=10**9,
                        help="live.checkpoint_frames (default: never; checkpoints are timed apart)")
    parser.add_argument("--malloc", choices=("keep", "system"), default="keep",
                        help="keep: glibc keeps freed blocks for reuse, as `stackwatch` does at start; system: "
                        "glibc's defaults")
    args = parser.parse_args()
    if args.malloc == "keep":
        from stackwatch.daemon.memory import keep_freed_memory

        keep_freed_memory()  # before the service's threads exist, as at the CLI's start
    if args.pipeline == "real" and not have_real:
        print("stackwatch.daemon.pipeline is not available; use --pipeline numpy", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        res = asyncio.run(_run(args, Path(tmp)))
    print(json.dumps(res, indent=1))
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    kind = "colour" if args.colour else "mono"
    (out / f"service_{kind}_{args.pipeline}_{args.width}x{args.height}.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
