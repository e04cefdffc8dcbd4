"""The page against the real service (`stackwatch demo` machinery: simulated night written into a
watched folder, the real Service, its catalogue and events) with the daemon tests' scripted pipeline.
Checks the API contract end to end in Chromium: lights appear row by row, the preview loads, no
script errors. Skips until the service and its scripted pipeline exist."""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from live_server import free_port
from test_browser import ARGS, CHROMIUM, browser  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.browser, pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no chromium")]


@pytest.mark.timeout(240)
def test_page_with_the_real_service(browser: Any, artifacts_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    pytest.importorskip("stackwatch.daemon.cmd_demo")
    sys.path.insert(0, str(REPO / "tests" / "daemon"))
    try:
        from test_service import FakePipeline
    except ImportError:
        pytest.skip("the daemon tests' scripted pipeline is not available")
    finally:
        sys.path.remove(str(REPO / "tests" / "daemon"))
    from stackwatch.daemon.cmd_demo import _demo

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = argparse.Namespace(preset="small", osc=False, lights=6, calibration=2, seed=3, pace=1.0, duration=None,
                              host="127.0.0.1", port=port, exit_when_done=True)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["rc"] = asyncio.run(_demo(args, tmp_path, service_kwargs={
                "pipeline_factory": lambda c, s: FakePipeline(c, s)}))
        except BaseException as exc:  # reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/api/status", timeout=2).read()
            break
        except OSError:
            time.sleep(0.2)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.evaluate("window.__noReload = 1")
    counts = []
    for _ in range(600):
        n = int(page.eval_on_selector_all("#frame-table tbody tr", "rows => rows.length"))
        if not counts or counts[-1] != n:
            counts.append(n)
        if n >= 6:
            break
        time.sleep(0.1)
    assert counts[-1] == 6, counts
    assert len(counts) >= 3, counts  # the table grew while the night was processed, not all at once
    page.wait_for_function("() => document.querySelector('#preview').naturalWidth > 0", timeout=20_000)
    assert page.evaluate("window.__noReload") == 1
    statuses = page.eval_on_selector_all("#frame-table tbody td.status span", "s => s.map(x => x.textContent)")
    assert statuses == ["stacked"] * 6
    page.screenshot(path=str(artifacts_dir / "web_real_service.png"), full_page=True)
    page.select_option("#frame-filter", "calibration")
    page.wait_for_function("() => document.querySelectorAll('#frame-table tbody tr').length >= 1")
    calib = page.eval_on_selector_all("#frame-table tbody td.status span", "s => s.map(x => x.textContent)")
    assert set(calib) == {"library"}, calib
    thread.join(120)
    assert result.get("rc") == 0, result
    page.wait_for_selector("#banner:not([hidden])", timeout=15_000)  # the service stopped: the page says so
    page.close()
    assert not [e for e in errors if "Failed to load resource" not in e and "WebSocket" not in e], errors
