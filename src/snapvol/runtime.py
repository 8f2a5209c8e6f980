"""Process-wide settings for programs that run the engine (the CLI, the mount daemon).

CPython's cyclic garbage collector runs a young-generation pass every 700 new container
objects and, as the survivors pile up, full passes over every live object. An engine
process keeps hundreds of thousands of long-lived objects (loaded inodes, decoded
directory nodes, the block cache), none of which form cycles that need collecting, and
the default thresholds walk them over and over (measured with callgrind on lookup + read
of 20,000 uncached small files: 71,000 instructions per file with the defaults, 67,200
with these). The collector stays on: cycles are still found, in fewer, larger passes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

GC_THRESHOLDS = (50_000, 20, 20)


def tune_gc() -> None:
    """Collect garbage less often, for a process that keeps large caches alive."""
    gc.set_threshold(*GC_THRESHOLDS)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MALLOC_KEEP_BYTES = 512 << 20
"""Freed heap memory kept for reuse rather than returned to the kernel."""
MALLOC_MMAP_BYTES = 4 << 20
"""Allocations from this size up get their own mapping (so 1 MiB requests do not)."""


def tune_malloc() -> None:
    """Keep freed heap memory for reuse (glibc only; elsewhere nothing changes).

    Data written through a mount waits in memory until a CP: the 1 MiB request buffers
    that pyfuse3 allocates are kept (their blocks are views of them) and freed together
    by the CP, and glibc then hands that heap back to the kernel, so the next 256 MiB of
    requests fault every page in again (256 faults per MiB, about as much CPU as the
    engine spends on the data). Kept, the memory is reused; the cost is that the process
    keeps its high-water heap, up to MALLOC_KEEP_BYTES, while idle. Setting the trim
    threshold also fixes glibc's mmap threshold, which it otherwise raises by itself: it
    is set above a FUSE request so request buffers come from the heap too.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no C library by that name, or not glibc
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_BYTES)
    mallopt(_M_TRIM_THRESHOLD, MALLOC_KEEP_BYTES)
