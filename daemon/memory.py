"""The process's malloc tuning: keep freed frame-sized memory for the next frame, give a one-off peak
back (glibc only; elsewhere nothing changes).

The `stackwatch` command calls `keep_freed_memory` at start (``STACKWATCH_MALLOC=system`` in the
environment leaves glibc's defaults); the pipeline calls `release_free_memory` after a peak.
"""

from __future__ import annotations

import ctypes
import platform
import sys

__all__ = ["keep_freed_memory", "release_free_memory"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# Free memory at the top of the heap beyond this goes back to the system: above the per-frame working
# set of a 26 MP frame (raw, calibrated, warped, masks, background maps: ~0.8 GB), so that steady
# per-frame work never gives back what the next frame needs (a one-off peak freed below the top, an
# exact pass or a rebuild, is returned by release_free_memory).
_TRIM_THRESHOLD_BYTES = 1 << 30
# whether keep_freed_memory is in force in this process (release_free_memory does nothing otherwise)
_kept_freed_memory = False


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def keep_freed_memory(trim_threshold_bytes: int = _TRIM_THRESHOLD_BYTES) -> bool:
    """Make glibc's malloc reuse freed frame-sized blocks within the process instead of unmapping them.

    glibc serves every block of 32 MB and more (every frame-sized array: 104 MB at 26 MP) with its own
    mmap and gives it back with munmap when freed, so each frame's arrays are fresh memory whose first
    touch is a page fault per page: on a virtual machine whose host backs guest memory lazily that was
    0.6 s of system time for a new 104 MB array, ~1.6 s a frame in the service at 26 MP. Here every
    block comes from the one main heap (``M_MMAP_MAX`` 0; worker threads' own arenas cannot hold a
    block over 64 MB and would mmap it anyway, so ``M_ARENA_MAX`` 1), and the heap's free top is kept
    up to ``trim_threshold_bytes``. Call it at process start, before any thread allocates. Linux with
    glibc only; elsewhere (musl, macOS, Windows) nothing changes. Returns whether it was applied.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt takes an int: the threshold is capped below 2 GiB
    threshold = min(int(trim_threshold_bytes), 2**31 - 1)
    global _kept_freed_memory
    _kept_freed_memory = all(mallopt(param, value) == 1 for param, value in
                             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, threshold)))
    return _kept_freed_memory


def release_free_memory(max_free_bytes: int = _TRIM_THRESHOLD_BYTES) -> int:
    """Give the heap's free pages back to the system when more than ``max_free_bytes`` of them are resident.

    Under `keep_freed_memory` only the heap's top is returned by itself; a peak freed in the middle of
    the heap (an exact pass over the frame store, a rebuild: 0.9-1.3 GB at 26 MP mono) stayed resident,
    and the service's RSS stayed at that peak all night (2.7 GB instead of 1.8 GB). Resident free memory
    is the heap mapping's RSS less the bytes in use (glibc's free total also counts pages already given
    back, which stay in the heap's free chunks). Returns the resident free bytes when it released them
    (glibc ``malloc_trim``), else 0. Nothing happens without `keep_freed_memory`.
    """
    if not _kept_freed_memory:
        return 0
    try:
        libc = ctypes.CDLL(None)
        mallinfo2, malloc_trim = libc.mallinfo2, libc.malloc_trim  # mallinfo2: glibc >= 2.33
    except (OSError, AttributeError):
        return 0
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    if int(info.fordblks) <= max_free_bytes:  # the cheap bound first: resident free <= all free
        return 0
    resident_free = _heap_rss_bytes() - int(info.uordblks)
    if resident_free <= max_free_bytes:
        return 0
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim(0)
    return resident_free


def _heap_rss_bytes() -> int:
    """Resident bytes of the process's brk heap (glibc's main arena), 0 if it has none. The heap can be
    several adjacent mappings (numpy's madvise for huge pages splits it)."""
    total = 0
    in_heap = seen_heap = False
    try:
        with open("/proc/self/smaps") as fh:
            for line in fh:
                head = line.split(" ", 1)[0]
                if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms ... [name]"
                    in_heap = line.rstrip().endswith("[heap]")
                    if seen_heap and not in_heap:
                        break
                    seen_heap = seen_heap or in_heap
                elif in_heap and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total
