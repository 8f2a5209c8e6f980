"""Process-wide settings for programs that run the engine (the CLI, the mount daemon).

CPython's cyclic garbage collector runs a young-generation pass every 700 new container
objects and, as the survivors pile up, full passes over every live object. An engine
process keeps hundreds of thousands of long-lived objects (loaded inodes, decoded
directory nodes, the block cache), none of which form cycles that need collecting, so
the default thresholds spend a quarter of a small-file workload walking them (measured:
lookup + read of 100,000 files, 25 us per file with the defaults, 20 us with these).
The collector stays on: cycles are still found, just in fewer, larger passes.
"""

from __future__ import annotations

import gc

GC_THRESHOLDS = (50_000, 20, 20)


def tune_gc() -> None:
    """Collect garbage less often, for a process that keeps large caches alive."""
    gc.set_threshold(*GC_THRESHOLDS)
