"""The page in a real headless Chromium (Debian's), driven by Playwright, against the fake service.

While a small simulated night is processed: the preview changes without reload, the table grows
row by row, a rejected frame shows its reason, the charts have points, the phone viewport has no
horizontal scroll, and the page reconnects after the server restarts. Screenshots go to
tests/artifacts/ (the `artifacts_dir` fixture).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_service import FakeService
from live_server import LiveServer

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed"),
]


@pytest.fixture
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def server() -> Iterator[LiveServer]:
    srv = LiveServer(FakeService(seed=11, shape=(300, 450), reject_every=4), token="tok", preview_max_px=1024)
    srv.start()
    try:
        yield srv
    finally:
        srv.close()


def _collect_errors(page: Any) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return errors


def _rows(page: Any) -> int:
    return int(page.eval_on_selector_all("#frame-table tbody tr", "rows => rows.length"))


def test_live_night_in_the_browser(browser: Any, server: LiveServer, artifacts_dir: Path) -> None:
    svc: FakeService = server.service  # type: ignore[assignment]
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    errors = _collect_errors(page)
    page.goto(server.url + "/#token=tok")  # the link the service prints stores the token
    page.wait_for_function("() => document.body.dataset.online === '1'", timeout=10_000)
    assert page.evaluate("location.hash") == ""  # and leaves the address bar
    page.evaluate("window.__noReload = 42")
    assert _rows(page) == 0

    # The table grows row by row as frames are processed.
    versions = []
    for i in range(1, 9):
        server.call(svc.add_frame)
        page.wait_for_function(f"() => document.querySelectorAll('#frame-table tbody tr').length === {i}", timeout=10_000)
        stack_version = svc.stacks["s1"]["version"]
        if stack_version:
            page.wait_for_function(
                f"() => document.querySelector('#preview').dataset.version === '{stack_version}'", timeout=10_000
            )
            versions.append(page.get_attribute("#preview", "src"))
    assert len(set(versions)) == svc.stacks["s1"]["version"] >= 5  # a new preview at every stack update
    assert page.evaluate("window.__noReload") == 42  # never reloaded

    # The rejected frame shows its reason, highlighted.
    rejected = page.locator("#frame-table tbody tr.rejected")
    assert rejected.count() == 2
    assert "few_stars" in rejected.first.inner_text()

    # Charts have points: stacked and rejected series.
    page.wait_for_function("() => window.stackwatch.charts.fwhm_px && window.stackwatch.charts.fwhm_px.data[0].length === 8")
    for metric in ("fwhm_px", "eccentricity", "background", "stars", "scale"):
        n = page.evaluate(f"window.stackwatch.charts['{metric}'].data[0].length")
        assert n == 8, metric
    assert page.evaluate("window.stackwatch.charts.stars.data[2].filter(v => v !== null).length") == 2
    page.wait_for_function("() => document.querySelector('#histogram canvas') !== null")
    page.screenshot(path=str(artifacts_dir / "web_desktop.png"), full_page=True)

    # Sorting by FWHM; details of a rejected frame.
    page.click("#frame-table th[data-key='fwhm_px']")
    fwhm = page.eval_on_selector_all("#frame-table tbody td[data-k='fwhm_px']", "tds => tds.map(t => +t.textContent)")
    assert fwhm == sorted(fwhm)
    rejected.first.click()
    page.wait_for_selector("#frame-dialog[open]")
    assert "few_stars" in page.inner_text("#frame-dialog")
    assert "dark_300s" in page.inner_text("#frame-dialog")
    page.screenshot(path=str(artifacts_dir / "web_frame_details.png"))
    page.click("#fd-exclude")  # a POST with the token, from the page
    page.wait_for_selector("#toast:has-text('excluded')", timeout=10_000)
    assert ("exclude", (8, True)) in svc.actions or ("exclude", (4, True)) in svc.actions, svc.actions
    page.click("#fd-close")

    # Click in the preview: a 1:1 crop appears.
    page.click("#viewer", position={"x": 300, "y": 200})
    page.wait_for_selector("#crop-box:not([hidden])", timeout=10_000)
    assert page.evaluate("document.querySelector('#crop').naturalWidth") == 256

    # Rejection map layer and composite-free stack list render.
    page.select_option("#layer", "rejection")
    page.wait_for_function("() => document.querySelector('#preview').src.includes('layer=rejection')")

    # Restart the server: the banner shows, then the page reconnects and catches up by itself.
    server.stop()
    page.wait_for_selector("#banner:not([hidden])", timeout=10_000)
    page.screenshot(path=str(artifacts_dir / "web_offline.png"))
    server.call(svc.add_frame)  # processed while the view was down: caught up from /api/status and lists
    server.start()
    page.wait_for_selector("#banner", state="hidden", timeout=15_000)
    page.wait_for_function("() => document.querySelectorAll('#frame-table tbody tr').length === 9", timeout=10_000)
    server.call(svc.add_frame)
    page.wait_for_function("() => document.querySelectorAll('#frame-table tbody tr').length === 10", timeout=10_000)
    assert page.evaluate("window.__noReload") == 42
    assert not [e for e in errors if "Failed to load resource" not in e and "WebSocket" not in e], errors
    ctx.close()


def test_phone_viewport_has_no_horizontal_scroll(browser: Any, server: LiveServer, artifacts_dir: Path) -> None:
    svc: FakeService = server.service  # type: ignore[assignment]
    for _ in range(6):
        server.call(svc.add_frame)
    ctx = browser.new_context(viewport={"width": 375, "height": 812}, device_scale_factor=2, is_mobile=True,
                              has_touch=True)
    page = ctx.new_page()
    errors = _collect_errors(page)
    page.goto(server.url + "/")
    page.wait_for_function("() => document.querySelectorAll('#frame-table tbody tr').length === 6", timeout=10_000)
    page.wait_for_function("() => document.querySelector('#preview').dataset.version === '5'", timeout=10_000)
    page.wait_for_function("() => window.stackwatch.charts.weight !== undefined")
    widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth,"
                           " document.body.scrollWidth]")
    assert widths[0] <= widths[1] == 375 and widths[2] <= 375, widths
    page.screenshot(path=str(artifacts_dir / "web_phone.png"), full_page=True)
    page.screenshot(path=str(artifacts_dir / "web_phone_top.png"))
    assert not errors, errors
    ctx.close()


def test_colour_composite_in_the_browser(browser: Any, artifacts_dir: Path) -> None:
    svc = FakeService(seed=12, shape=(200, 300), target="M42", filter="R", reject_every=0)
    srv = LiveServer(svc, token="tok")
    srv.start()
    try:
        g = svc.add_stack("M42", "G")
        b = svc.add_stack("M42", "B")
        for sid in (svc.default_stack, g, b):
            srv.call(lambda sid=sid: svc.add_frame(stack_id=sid))
        page = browser.new_page(viewport={"width": 1024, "height": 800})
        errors = _collect_errors(page)
        page.goto(srv.url + "/")
        page.click("#stack-list button.composite")
        page.wait_for_function("() => document.querySelector('#preview').src.includes('/api/composites/')"
                               " && document.querySelector('#preview').naturalWidth === 300", timeout=10_000)
        page.wait_for_function("() => window.stackwatch.state.previewInfo"
                               " && window.stackwatch.state.previewInfo.histogram.length === 3", timeout=10_000)
        assert "RGB" in page.inner_text("#stack-list button.composite")
        page.screenshot(path=str(artifacts_dir / "web_composite.png"))
        assert not errors, errors
        page.close()
    finally:
        srv.close()
