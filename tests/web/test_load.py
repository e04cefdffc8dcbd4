"""Load: 20 WebSocket clients (one never reads) while frames are processed, loopback only.

"Processing" is a fixed CPU task per frame (~0.1 s of FFTs) run in a worker thread, as the service
runs its pipeline, with a 20 ms gap before the next frame (real frames arrive seconds apart);
after each, the fake service emits the frame's events (plus a 20 kB status event, so the stalled
client's socket really fills) and the viewed preview is re-rendered. The per-frame task time with
the clients connected is compared with the time without clients (measured before and after, so
machine load drifts cancel). The clients run in a separate process at nice 19, standing in for
browsers on other machines. The figure is printed and written to tests/artifacts/load_test.json; the
assertion is deliberately generous (shared 2-core machine) while the fan-out is checked exactly.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fake_service import FakeService
from live_server import LiveServer
from stackwatch.web.app import HUB_KEY

HERE = Path(__file__).resolve().parent
N_CLIENTS = 20
FRAMES = 24


def _cpu_task(a: np.ndarray) -> float:
    t0 = time.perf_counter()
    for _ in range(2):
        b = np.fft.irfft2(np.fft.rfft2(a))
        a = (b * 0.5 + a * 0.5).astype(np.float32)
    return time.perf_counter() - t0


def _night(server: LiveServer, svc: FakeService, pool: ThreadPoolExecutor, n: int) -> list[float]:
    a = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    big = {"stacks": [{"id": f"s{i}", "target": "x" * 100, "filter": "L", "ncombine": i} for i in range(100)]}
    times = []
    for _ in range(n):
        times.append(pool.submit(_cpu_task, a).result())
        server.call(svc.add_frame)
        server.call(lambda: svc.emit("status", big))
        time.sleep(0.02)  # real frames arrive seconds apart; the next one is not already waiting
    return times


@pytest.mark.timeout(300)
def test_twenty_clients_one_stalled_do_not_slow_processing(artifacts_dir: Path) -> None:
    svc = FakeService(seed=5, shape=(200, 300), reject_every=5)
    server = LiveServer(svc, token="tok", ws_queue_size=64)
    server.start()
    pool = ThreadPoolExecutor(max_workers=1)
    proc = None
    try:
        svc.add_frame(rejected=False)  # a stack exists before the viewer asks for its preview
        _night(server, svc, pool, 4)  # warm-up
        before = _night(server, svc, pool, FRAMES)
        proc = subprocess.Popen([sys.executable, str(HERE / "ws_clients.py"), server.url, str(N_CLIENTS)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        assert server.app is not None
        hub = server.app[HUB_KEY]
        deadline = time.time() + 10
        while len(hub.clients) < N_CLIENTS and time.time() < deadline:
            time.sleep(0.05)
        assert len(hub.clients) == N_CLIENTS
        published0 = hub.published
        during = _night(server, svc, pool, FRAMES)
        server.call(lambda: svc.emit("warning", {"message": "load-test-done"}))
        out, _ = proc.communicate(timeout=120)
        result = json.loads(out.strip().splitlines()[-1])
        after = _night(server, svc, pool, FRAMES)

        baseline = statistics.median(before + after)
        ratio = statistics.median(during) / baseline
        stalled = [c for c in hub.clients if c.dropped > 0 or c.sent < hub.published - published0 - 5]
        figures = {
            "clients": N_CLIENTS, "frames_per_phase": FRAMES,
            "task_median_without_s": baseline, "task_median_with_s": statistics.median(during),
            "ratio": ratio, "publish_time_max_ms": hub.publish_time_max_s * 1000,
            "events_during": hub.published - published0,
            "reader_frame_processed": sorted({c.get("frame_processed", 0) for c in result["counts"]}),
        }
        print("load test:", json.dumps(figures))
        (artifacts_dir / "load_test.json").write_text(json.dumps(figures, indent=1))
        # Every reading client got every frame event; the silent one did not hold anyone up.
        assert result["finished"] == N_CLIENTS - 1
        assert figures["reader_frame_processed"] == [FRAMES]
        # publish only enqueues (a blocking send to the stalled client would take its whole send
        # timeout, seconds); the bound is loose because a loaded 2-core machine once took 0.19 s
        assert hub.publish_time_max_s < 0.5
        assert stalled or len(hub.clients) < N_CLIENTS  # the silent client is stalled (or was closed)
        assert ratio < 1.5, figures  # generous: shared machine; the measured figure is in the report
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        pool.shutdown()
        server.close()
