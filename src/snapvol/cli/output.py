"""How commands print: JSON for scripts, plain lines and rich tables for people.

Rich markup is off: a file or snapshot name with brackets in it must print as it is.
Tables get a wide console when stdout is not a terminal, so a pipe never sees a table
wrapped at 80 columns.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import IO

import click
from rich.console import Console

from snapvol.errors import SnapvolError


def console() -> Console:
    wide = None if sys.stdout.isatty() else 200
    return Console(markup=False, highlight=False, emoji=False, width=wide)


def print_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2))


def show_time(ns: int) -> str:
    """Local time to the second, for tables (JSON carries the raw nanoseconds)."""
    return datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def shown_name(raw: bytes) -> str:
    """A name for a table: bytes that are not UTF-8 appear as \\xNN escapes."""
    return raw.decode("utf-8", "backslashreplace")


def json_name(raw: bytes) -> str:
    """A name for JSON: os.fsencode() of the string gives the original bytes back."""
    return os.fsdecode(raw)


_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
}


def type_name(mode: int) -> str:
    return _TYPES.get(stat.S_IFMT(mode), "unknown")


@contextlib.contextmanager
def stream_output(path: str | None, refuse_existing: str | None = None) -> Iterator[IO[bytes]]:
    """Where a stream goes: stdout, or a new file that is fsynced once complete and
    removed if the command fails part way, so a half-written stream never passes for a
    whole one. `refuse_existing`, when given, is the reason an existing file is refused."""
    if path is None:
        yield sys.stdout.buffer
        return
    if refuse_existing is not None and os.path.lexists(path):
        raise SnapvolError(f"{path} already exists: {refuse_existing}; name a new file")
    try:
        f = open(path, "wb")  # noqa: SIM115 - closed below, removed when the command fails
    except OSError as err:
        raise SnapvolError(f"cannot write {path}: {err.strerror}") from None
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
