"""sd_notify over a real datagram socket, and the unit file through `systemd-analyze verify`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from stackwatch.daemon.sdnotify import SdNotifier

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "stackwatch.service"


def _socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    return sock, path


def test_notify_messages_reach_the_socket(tmp_path: Path) -> None:
    sock, path = _socket(tmp_path)
    n = SdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
    try:
        assert n.enabled and n.watchdog_interval_s == 15.0
        assert n.ready("3 stacked")
        assert sock.recv(4096) == b"READY=1\nSTATUS=3 stacked"
        assert n.status("line one\nline two")
        assert sock.recv(4096) == b"STATUS=line one line two"
        assert n.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert n.stopping()
        assert sock.recv(4096) == b"STOPPING=1"
    finally:
        n.close()
        sock.close()


def test_abstract_socket_and_absent_systemd(tmp_path: Path) -> None:
    name = f"stackwatch-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        n = SdNotifier({"NOTIFY_SOCKET": "@" + name})
        assert n.watchdog_interval_s is None
        assert n.notify(STATUS="x")
        assert sock.recv(100) == b"STATUS=x"
    finally:
        sock.close()
    off = SdNotifier({})
    assert not off.enabled and not off.ready() and off.watchdog_interval_s is None
    # the watchdog belongs to another process: not ours to feed
    other = SdNotifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval_s is None
    assert not other.notify(STATUS="socket gone")  # a vanished socket is not an error


def test_unit_file_has_the_required_settings() -> None:
    text = UNIT.read_text()
    settings = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            k, v = line.split("=", 1)
            settings.setdefault(k.strip(), []).append(v.strip())
    assert settings["Type"] == ["notify"]
    assert settings["Restart"] == ["on-failure"]
    assert "WatchdogSec" in settings and "User" in settings
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["NoNewPrivileges"] == ["yes"] and settings["PrivateTmp"] == ["yes"]
    assert any("/var/lib/stackwatch" in v for v in settings["ReadWritePaths"])
    assert "ReadOnlyPaths" in settings
    assert any("stackwatch run" in v for v in settings["ExecStart"])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify needs ExecStart to exist: point it at an executable the test creates
    exe = tmp_path / "stackwatch"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    text = UNIT.read_text().replace("/usr/local/bin/stackwatch", str(exe))
    assert str(exe) in text
    unit = tmp_path / "stackwatch.service"
    unit.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    # verify exits 0 even for settings it ignores ("Failed to parse ..., ignoring"): any message that
    # names our unit file is a problem.
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if str(unit) in line]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not problems, problems


async def test_service_reports_ready_status_watchdog_stopping(tmp_path: Path) -> None:
    """The service's own notifications, over a real socket: READY after start-up, STATUS per frame,
    WATCHDOG at half the interval, STOPPING on the way out."""
    import asyncio
    import sys
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from stackwatch.daemon.service import Service
    from test_service import FakePipeline, fast_config, write_frame

    sock, path = _socket(tmp_path)
    sock.setblocking(False)
    watch = tmp_path / "watch"
    watch.mkdir()
    notifier = SdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    service = Service(fast_config(), watch_dir=watch, state_dir=tmp_path / "state", notifier=notifier,
                      pipeline_factory=lambda c, s: FakePipeline(c, s), free_bytes=lambda _p: 10**12)
    messages: list[str] = []

    def drain() -> None:
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                return

    await service.startup()
    runner = asyncio.create_task(service.run())
    try:
        write_frame(watch / "l0.fits")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any("1 stacked" in m for m in messages):
            await asyncio.sleep(0.05)
            drain()
        await asyncio.sleep(0.5)
        drain()
    finally:
        service.request_stop()
        await runner
        await service.shutdown()
        drain()
        sock.close()
    # the watchdog is fed during start-up too (loading the pipeline can take a while)
    assert next(m for m in messages if m != "WATCHDOG=1").startswith("READY=1")
    assert any(m.startswith("STATUS=1 stacked, 0 rejected, 0 failed, 0 pending") for m in messages), messages
    assert sum(m == "WATCHDOG=1" for m in messages) >= 2
    assert any(m.startswith("STOPPING=1") for m in messages)
    assert messages.index(next(m for m in messages if m.startswith("STOPPING=1"))) > 0
