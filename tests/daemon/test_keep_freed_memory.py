"""The CLI's malloc tuning (daemon/memory.py keep_freed_memory): a freed frame-sized block is reused by the
next frame's allocation in any thread, without new page faults; glibc's defaults unmap it instead. A
peak freed below the heap's top goes back to the system with release_free_memory.

Each case runs in a fresh interpreter: mallopt changes the whole process, and must come before threads
allocate."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only"
)

# A worker thread (as the service's pipeline runs) allocates and touches a 64 MB array, frees it, and
# does it again; the second round's minor page faults tell whether the block was fresh memory (at
# least one fault per 2 MB huge page, 32, and up to one per 4 kB page, 16384) or reused (none).
_PROBE = textwrap.dedent(
    """
    import json, resource, sys, threading
    import numpy as np
    from stackwatch.daemon import cli, memory

    mode = sys.argv[1]
    applied = None
    if mode == "function":
        applied = memory.keep_freed_memory()
    elif mode == "main":
        sys.argv = ["stackwatch"]
        cli.main()  # no command: prints the usage, after the process-start tuning
    faults = []

    def frames():
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            a = np.empty(16 * 2**20, np.float32)
            a.fill(1.0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            del a

    t = threading.Thread(target=frames)
    t.start()
    t.join()
    print(json.dumps({"applied": applied, "faults": faults}))
    """
)


def _probe(mode: str, **env: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_freed_block_is_reused_without_page_faults() -> None:
    out = _probe("function")
    assert out["applied"] is True
    faults = out["faults"]
    assert isinstance(faults, list)
    assert faults[0] >= 32  # the first touch is fresh memory either way
    assert max(faults[1:]) < 8


def test_glibc_defaults_fault_every_frame() -> None:
    """The control: without the tuning every round is fresh memory (the test above could not fail)."""
    faults = _probe("none")["faults"]
    assert isinstance(faults, list)
    assert min(faults) >= 32


def test_main_tunes_the_command_process_unless_disabled() -> None:
    faults = _probe("main")["faults"]
    assert isinstance(faults, list)
    assert max(faults[1:]) < 8
    faults = _probe("main", STACKWATCH_MALLOC="system")["faults"]
    assert isinstance(faults, list)
    assert min(faults) >= 32


# Three 100 MB blocks freed below a small block allocated after them (so the heap's top cannot shrink):
# resident free memory that only release_free_memory gives back.
_RELEASE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from stackwatch.daemon import memory

    def rss():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))

    out = {"released_untuned": memory.release_free_memory(0)}
    memory.keep_freed_memory()
    peak = [np.ones(25 * 2**20, np.float32) for _ in range(3)]
    pin = np.ones(2**20 // 4, np.float32)  # 1 MB above them
    del peak
    out["before"] = rss()
    out["released_above_free"] = memory.release_free_memory(2**30)
    out["after_above_free"] = rss()
    out["released"] = memory.release_free_memory(100 * 2**20)
    out["after"] = rss()
    out["released_again"] = memory.release_free_memory(100 * 2**20)
    print(json.dumps(out))
    """
)


def test_release_free_memory_returns_a_freed_peak() -> None:
    proc = subprocess.run([sys.executable, "-c", _RELEASE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    mb = 2**20
    assert out["released_untuned"] == 0  # glibc's defaults: nothing to do
    assert out["released_above_free"] == 0  # 300 MB free is below the 1 GB asked
    assert abs(out["after_above_free"] - out["before"]) < 20 * mb
    assert out["released"] >= 280 * mb
    assert out["before"] - out["after"] >= 280 * mb
    assert out["released_again"] == 0  # what was given back is not counted as resident again
