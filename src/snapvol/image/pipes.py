"""Pipe capacity for image streams.

A pipe holds 64 KiB by default, so a 1 MiB BLOCKS record crosses it in sixteen rounds of
"writer fills, reader wakes, drains": two processes on two cores spend their time
switching instead of copying. Linux lets an unprivileged process grow a pipe up to
/proc/sys/fs/pipe-max-size (1 MiB by default), which carries a whole record per wake-up.
"""

from __future__ import annotations

import fcntl
import os
import stat

STREAM_PIPE_BYTES = 4 << 20
"""Asked for first: a few records. Capped by the system's pipe-max-size."""


def _pipe_max() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1 << 20


def widen_pipe(fd: int, size: int = STREAM_PIPE_BYTES) -> int:
    """Grow the pipe behind `fd` (either end) to `size` bytes, or as far as allowed.
    Returns the capacity it has afterwards, or 0 when `fd` is not a pipe (a file or a
    terminal: nothing to do). Never fails: a pipe that cannot grow still works."""
    setsz = getattr(fcntl, "F_SETPIPE_SZ", None)
    try:
        if setsz is None or not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return 0
    except OSError:
        return 0
    for want in (size, min(size, _pipe_max())):
        try:
            return int(fcntl.fcntl(fd, setsz, want))
        except OSError:
            continue  # EPERM past pipe-max-size (or the pipe holds more than `want`)
    return 0
