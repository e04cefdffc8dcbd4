"""Memory, wall and CPU time of the service's exact pass (`Pipeline.finalize`) at 26 MP mono.

Builds a stack of N synthetic 26 MP mono frames through the real pipeline (malloc tuned as the CLI
tunes it: daemon/memory.py keep_freed_memory), resets the process's high-water mark, then runs
`Pipeline.finalize` (exact pass with large-scale rejection, rebuilt live state, FITS products).
A sampling thread reads VmRSS and glibc's bytes in use (mallinfo2) every few ms and attributes both
peaks, and wall and CPU time, to the stage running: the batch integration, within it the
large-scale maps and the live state rebuilt from its decisions, then the products (FITS writing). RSS includes free heap memory that glibc keeps (up to 1 GiB
under keep_freed_memory); "in use" is what is really allocated.

    .venv/bin/python bench/bench_exact_pass.py [--frames 6] [--band-mb 256] [--width 6248 --height 4176]

Goal (issue #6): the service's memory <= 2 GB at 26 MP mono, the exact pass included.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

for _blas in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_blas, "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_service as service  # noqa: E402
import numpy as np  # noqa: E402
from astropy.io import fits  # noqa: E402


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


_libc = ctypes.CDLL(None)
_mallinfo2 = getattr(_libc, "mallinfo2", None)
if _mallinfo2 is not None:
    _mallinfo2.restype = _MallInfo2


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def _in_use_mb() -> float:
    if _mallinfo2 is None:
        return float("nan")
    m = _mallinfo2()
    return (m.uordblks + m.hblkhd) / 2**20


class _Sampler:
    """Peaks of RSS and malloc bytes in use, per stage (the innermost stage running)."""

    def __init__(self, period_s: float = 0.004) -> None:
        self.period_s = period_s
        self.stage = ["finalize"]
        self.peaks: dict[str, list[float]] = {}
        self.times: dict[str, list[float]] = {}  # label: [wall s, CPU s] inclusive of inner stages
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, used = _status_mb("VmRSS"), _in_use_mb()
            p = self.peaks.setdefault(self.stage[-1], [0.0, 0.0])
            p[0], p[1] = max(p[0], rss), max(p[1], used)
            time.sleep(self.period_s)

    def wrap(self, owner: object, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def staged(*a: object, **k: object) -> object:
            self.stage.append(label)
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self.stage.pop()
                tc = self.times.setdefault(label, [0.0, 0.0])
                tc[0] += time.perf_counter() - t
                tc[1] += time.process_time() - c

        setattr(owner, name, staged)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--band-mb", type=int, default=256)
    ap.add_argument("--width", type=int, default=6248)
    ap.add_argument("--height", type=int, default=4176)
    args = ap.parse_args()

    from stackwatch.daemon import memory

    memory.keep_freed_memory()
    from stackwatch.daemon.config import Config
    from stackwatch.daemon.pipeline import Pipeline, classify_paths
    from stackwatch.engine import fitsio, integrate, live

    work = Path(tempfile.mkdtemp(prefix="bench-exact-", dir="/tmp"))
    (work / "w").mkdir()
    rng = np.random.default_rng(1)
    base = service._star_field(args.height, args.width, rng, 6000)
    for i in range(args.frames):
        fits.writeto(work / "w" / f"l{i:03d}.fits", service._frame(base, i, rng, False), service._header(i, False))
    del base
    cfg = Config()
    cfg.normalization.reference_candidates = 1
    cfg.integration.band_memory_mb = args.band_mb
    pipe = Pipeline(cfg, work / "state")
    for p, info, _ in sorted(classify_paths([work / "w"]), key=lambda t: t[0].name):
        pipe.process_light(p, info)
    pipe.flush_store()
    sid = next(iter(pipe._stacks))

    sampler = _Sampler()
    sampler.wrap(integrate, "integrate", "integrate")
    sampler.wrap(integrate, "_large_scale_maps", "integrate: large-scale maps")
    sampler.wrap(live._StateFromBatch, "band", "integrate: live state from its decisions")
    sampler.wrap(fitsio, "write_image", "products: write_image")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM
    rss0, used0 = _status_mb("VmRSS"), _in_use_mb()
    load0 = os.getloadavg()
    with sampler:
        t, c = time.perf_counter(), time.process_time()
        pipe.finalize(sid)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    print(f"26 MP-class mono {args.width}x{args.height}, {args.frames} frames, band {args.band_mb} MB")
    print(f"before finalize: RSS {rss0:.0f} MB, in use {used0:.0f} MB")
    print(f"finalize: wall {wall:.2f} s, CPU {cpu:.2f} s, load {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"peak RSS (VmHWM) {_status_mb('VmHWM'):.0f} MB; after: RSS {_status_mb('VmRSS'):.0f} MB")
    print(f"{'stage':32s} {'peak RSS':>9s} {'peak in use':>12s}  (MB)  {'wall':>6s} {'CPU':>6s} (s, inclusive)")
    for stage, (rss, used) in sampler.peaks.items():
        tw, tc = sampler.times.get(stage, (wall, cpu))
        print(f"{stage:32s} {rss:9.0f} {used:12.0f}        {tw:6.2f} {tc:6.2f}")
    pipe.close()
    shutil.rmtree(work, ignore_errors=True)  # 1.4 GB per 6 frames (raw files and frame store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
