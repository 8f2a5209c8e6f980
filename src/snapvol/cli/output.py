"""How commands print: JSON for scripts, plain lines and rich tables for people.

Rich markup is off: a file or snapshot name with brackets in it must print as it is.
Tables get a wide console when stdout is not a terminal, so a pipe never sees a table
wrapped at 80 columns.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from datetime import datetime

import click
from rich.console import Console


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
