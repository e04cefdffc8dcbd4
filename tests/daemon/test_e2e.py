"""End to end: a simulated night written into the watch folder as a capture program would, the
service killed with SIGKILL twice and restarted, then compared with `stackwatch stack`.

`test_demo_with_scripted_pipeline` is the fast variant (the pipeline is scripted); the full test needs
the real pipeline (`stackwatch.daemon.pipeline`) and the `stack` command and skips until they exist.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _poll(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except Exception as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last error: {last!r})")


async def test_demo_with_scripted_pipeline(tmp_path: Path) -> None:
    """`stackwatch demo` machinery: the simulated night is written in capture order, the status endpoint
    answers while it runs, every file ends in the catalogue with the right status."""
    pytest.importorskip("stackwatch.web.app")
    sys.path.insert(0, str(HERE))
    from stackwatch.daemon.catalog import Catalog
    from stackwatch.daemon.cmd_demo import _demo
    from test_service import FakePipeline

    port = _free_port()
    args = argparse.Namespace(preset="small", osc=False, lights=4, calibration=2, seed=3, pace=0.4, duration=None,
                              host="127.0.0.1", port=port, exit_when_done=True)
    seen_status: list[dict[str, Any]] = []

    async def watch_status() -> None:
        while True:
            try:
                seen_status.append(await asyncio.to_thread(_get_json, f"http://127.0.0.1:{port}/api/status"))
            except OSError:
                pass
            await asyncio.sleep(0.3)

    poller = asyncio.create_task(watch_status())
    try:
        rc = await asyncio.wait_for(
            _demo(args, tmp_path, service_kwargs={"pipeline_factory": lambda c, s: FakePipeline(c, s)}), 120)
    finally:
        poller.cancel()
    assert rc == 0
    assert seen_status and all({"seen", "stacked", "rejected", "failed", "pending"} <= set(s["frames"])
                               for s in seen_status)
    cat = Catalog(tmp_path / "state" / "catalog.sqlite")
    _, rows = cat.list_files(limit=1000)
    cat.close()
    by_kind: dict[str, set[str]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], set()).add(r["status"])
    assert len(rows) == 4 + 4 * 2
    assert by_kind == {"light": {"stacked"}, "bias": {"library"}, "dark": {"library"}, "flat": {"library"},
                       "darkflat": {"library"}}
    assert not any(p.suffix == ".sqlite" for p in (tmp_path / "capture").rglob("*"))


# ------------------------------------------------------------------------------------------------
# The full end-to-end test with the real pipeline.


@pytest.mark.skipif(importlib.util.find_spec("stackwatch.daemon.pipeline") is None, reason="needs the pipeline")
async def test_demo_real_pipeline_flags_provisional_lights_and_waits_for_the_recalibration(tmp_path: Path) -> None:
    """The lights come before the flats (dawn): GET /api/status counts them provisional; `demo
    --exit-when-done` returns only once the flats' master is integrated and the lights recalibrated."""
    pytest.importorskip("stackwatch.web.app")
    from stackwatch.daemon.catalog import Catalog
    from stackwatch.daemon.cmd_demo import _demo

    port = _free_port()
    args = argparse.Namespace(preset="small", osc=False, lights=3, calibration=2, seed=5, pace=0.3, duration=None,
                              host="127.0.0.1", port=port, exit_when_done=True)
    provisional: list[int] = []

    async def watch_status() -> None:
        while True:
            with contextlib.suppress(OSError, ValueError):
                st = await asyncio.to_thread(_get_json, f"http://127.0.0.1:{port}/api/status")
                provisional.append(int(st["frames"]["provisional"]))
            await asyncio.sleep(0.2)

    poller = asyncio.create_task(watch_status())
    try:
        rc = await asyncio.wait_for(_demo(args, tmp_path), 300)
    finally:
        poller.cancel()
    assert rc == 0
    assert max(provisional, default=0) > 0, provisional  # seen while the flats were missing
    cat = Catalog(tmp_path / "state" / "catalog.sqlite")
    try:
        _, rows = cat.list_files(kind="light", limit=100)
        kinds = {m.get("kind") for m in cat.masters()}
    finally:
        cat.close()
    assert "flat" in kinds, kinds
    assert [r["status"] for r in rows] == ["stacked"] * 3, [(r["status"], r["reason"]) for r in rows]
    assert not any(r["provisional"] for r in rows)
    assert all(r["masters"].get("flat") and "missing" not in r["masters"] for r in rows), [r["masters"] for r in rows]


def _have_pipeline() -> bool:
    return (importlib.util.find_spec("stackwatch.daemon.pipeline") is not None
            and importlib.util.find_spec("stackwatch.daemon.cmd_stack") is not None)


def _write_capture_order(watch: Path, rng: np.random.Generator) -> list[tuple[str, Any]]:
    """The files of the night in the order a capture program writes them, as (relative path, writer)."""
    from stackwatch.engine import simulate

    spec = simulate.preset("small", n_lights=8, n_darks=3, n_flats=3, n_darkflats=3, n_biases=3, seed=11,
                           trails=(2,))
    truth = simulate.make_truth(spec)
    frames = list(simulate.iter_night(truth))
    other_spec = simulate.preset("small", n_lights=1, n_darks=0, n_flats=0, n_darkflats=0, n_biases=0, seed=12,
                                 object_name="IC 1396", ra_deg=324.7, dec_deg=57.5, trails=())
    other = [f for f in simulate.iter_night(simulate.make_truth(other_spec)) if f.kind == "light"]
    bias = [f for f in frames if f.kind == "bias"]
    darks = [f for f in frames if f.kind == "dark"]
    lights = [f for f in frames if f.kind == "light"]
    dawn = [f for f in frames if f.kind in ("flat", "darkflat")]
    # calibration interleaved with the lights, flats last
    order = [*bias, lights[0], darks[0], lights[1], lights[2], darks[1], lights[3], darks[2], *lights[4:6],
             other[0], *lights[6:], *dawn]

    def writer(fr: Any) -> Any:
        def write() -> None:
            size = fr.data.size * 2 + 5760
            simulate.write_fits(watch / fr.filename, fr.data, fr.header, chunk_bytes=-(-size // 4),
                                chunk_delay_s=0.05)
        return write

    out: list[tuple[str, Any]] = [(fr.filename, writer(fr)) for fr in order]
    # the faults: a zero-byte file, a corrupt file, a duplicate of a light
    out.insert(4, ("lights/empty.fits", lambda: (watch / "lights").mkdir(exist_ok=True)
                   or (watch / "lights" / "empty.fits").write_bytes(b"")))
    out.insert(8, ("lights/corrupt.fits", lambda: (watch / "lights" / "corrupt.fits").write_bytes(
        rng.integers(0, 256, 20000, dtype=np.uint8).tobytes())))
    dup_src = lights[1].filename
    out.insert(12, ("lights/copy_of_light2.fits",
                    lambda: shutil.copyfile(watch / dup_src, watch / "lights" / "copy_of_light2.fits")))
    return out


def _start(watch: Path, state: Path, config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    exe = VENV_BIN / "stackwatch"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "stackwatch.daemon.cli"]
    return subprocess.Popen([*cmd, "run", "--watch", str(watch), "--state", str(state), "--config", str(config),
                             "--port", str(port)], stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
@pytest.mark.skipif(not _have_pipeline(), reason="needs stackwatch.daemon.pipeline and the stack command (lead)")
def test_night_with_two_sigkills_equals_batch(tmp_path: Path, artifacts_dir: Path) -> None:
    watch, state, log = tmp_path / "watch", tmp_path / "state", tmp_path / "service.log"
    watch.mkdir()
    config = tmp_path / "stackwatch.toml"
    config.write_text(
        "[watch]\nretry_backoff_s = 0.2\nretry_max = 4\nstable_for_s = 0.5\npoll_interval_s = 0.2\n"
        "[service]\nmin_free_space_mb = 1.0\nshutdown_timeout_s = 60.0\n"
        "[live]\ncheckpoint_frames = 2\n"
        "[library]\nmaster_debounce_s = 2.0\n"
    )
    rng = np.random.default_rng(2026)
    files = _write_capture_order(watch, rng)
    kills = sorted(int(k) for k in rng.choice(np.arange(3, len(files) - 2), size=2, replace=False))
    port = _free_port()
    status_url = f"http://127.0.0.1:{port}/api/status"
    proc = _start(watch, state, config, port, log)
    try:
        _poll(lambda: "frames" in _get_json(status_url), 120, "status endpoint")
        for i, (_name, write) in enumerate(files):
            write()
            time.sleep(float(rng.uniform(0.05, 0.6)))
            if i in kills:
                time.sleep(float(rng.uniform(0.0, 1.0)))
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                proc = _start(watch, state, config, port, log)
                _poll(lambda: "frames" in _get_json(status_url), 120, "status after restart")

        def finished() -> bool:
            f = _get_json(status_url)["frames"]
            return f["seen"] == len(files) and f["pending"] == 0

        _poll(finished, 600, "every file processed")

        def settled() -> bool:
            # the flats came last: the service integrates the waiting masters when idle and
            # recalibrates the lights stacked before them, in the background
            st = _get_json(status_url)
            return ("flat" in st["library"]["by_kind"] and not st["recalibration"]["running"]
                    and st["frames"]["provisional"] == 0 and not any(s.get("stale") for s in st["stacks"]))

        _poll(settled, 600, "masters built and lights recalibrated")
        status = _get_json(status_url)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    text = log.read_text()
    assert "Traceback" not in text, text[-4000:]

    from stackwatch.daemon.catalog import Catalog
    from stackwatch.daemon.config import load_config

    cat = Catalog(state / "catalog.sqlite")
    _, rows = cat.list_files(limit=10000)
    cat.close()
    by_name = {r["path"]: r for r in rows}
    assert len(rows) == len(files)
    for name, _ in files:
        r = by_name[str(watch / name)]
        if name.endswith("empty.fits") or name.endswith("corrupt.fits"):
            assert r["status"] == "failed" and r["reason"], r
        elif name.endswith("copy_of_light2.fits"):
            assert r["status"] == "duplicate", r
        elif r["kind"] == "light":
            assert r["status"] in ("stacked", "rejected"), (name, r["status"], r["reason"])
        else:
            assert r["status"] == "library", (name, r["status"], r["reason"])
    stacked: dict[str, int] = {}
    for r in rows:
        if r["status"] == "stacked":
            stacked[r["stack_id"]] = stacked.get(r["stack_id"], 0) + 1
    assert len(stacked) == 2, stacked  # NGC 7331 and IC 1396
    for s in status["stacks"]:
        assert s["ncombine"] == stacked.get(s["id"], 0), (s, stacked)  # nothing stacked twice

    # the batch command on the same files
    out = tmp_path / "batch" / "stack.fits"
    report = tmp_path / "batch" / "report.json"
    out.parent.mkdir()
    exe = VENV_BIN / "stackwatch"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "stackwatch.daemon.cli"]
    # "the same files": what the service was given, less the duplicate it rightly stacked once
    same_files = [r["path"] for r in rows if r["status"] != "duplicate"]
    batch = subprocess.run([*cmd, "stack", *same_files, "--out", str(out), "--report", str(report), "--config",
                            str(config), "--state", str(tmp_path / "batch_state"), "--quiet"],
                           capture_output=True, text=True, timeout=1800)
    assert batch.returncode in (0, 1), batch.stderr
    rep = json.loads(report.read_text())
    from astropy.io import fits
    from stackwatch.daemon.pipeline import Pipeline

    pipeline = Pipeline(load_config(config), state)
    live = {(s["target"], s["filter"]): s for s in pipeline.stacks()}
    figures: dict[str, Any] = {"kills_after_file": kills, "files": len(files), "stacks": {}}
    failures = []
    for bs in rep["stacks"]:
        ls = live[(bs["target"], bs["filter"])]
        pipeline.finalize(ls["id"])
        image = np.asarray(pipeline.stack_products(ls["id"])["image"], dtype=np.float64)
        ref = np.asarray(fits.getdata(bs["path"]), dtype=np.float64)
        fig: dict[str, Any] = {"ncombine_service": ls["ncombine"], "ncombine_batch": bs["ncombine"],
                               "shape_equal": image.shape == ref.shape}
        if image.shape == ref.shape:
            ok = np.isfinite(ref) & np.isfinite(image)
            rel = np.abs(image[ok] - ref[ok]) / np.maximum(np.abs(ref[ok]), 1e-3 * np.nanmax(np.abs(ref)))
            fig.update({
                "nan_pattern_equal": bool(np.array_equal(np.isnan(image), np.isnan(ref))),
                "max_rel": float(rel.max()), "p99_9_rel": float(np.percentile(rel, 99.9)),
                "pixels_over_1e-5": int((rel > 1e-5).sum()), "pixels": int(ok.sum()),
            })
            if fig["pixels_over_1e-5"] or not fig["nan_pattern_equal"]:
                failures.append(ls["id"])
        else:
            failures.append(ls["id"])
        if ls["ncombine"] != bs["ncombine"]:
            failures.append(ls["id"])
        figures["stacks"][ls["id"]] = fig
    (artifacts_dir / "e2e_service_vs_batch.json").write_text(json.dumps(figures, indent=1))
    shutil.copyfile(log, artifacts_dir / "e2e_service.log")
    assert not failures, json.dumps(figures, indent=1)
