"""How commands print: JSON for scripts, plain lines and listings (cli/listing.py) for
people, and one form of time everywhere.

Times are UTC, written with their `Z` (`2025-06-01T12:00:00Z`): listings, `info`, `ls -l`,
the mount log and the names `replicate` gives its snapshots (`replica-...-20250601T120000.
123456Z`) all agree, whatever the host's time zone, so a time copied from one host's
listing means the same on another's. JSON carries the raw nanoseconds since the epoch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO

import click

from snapvol.errors import SnapvolError


def print_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2))


def show_time(ns: int) -> str:
    """UTC to the second, with its Z: `2025-06-01T12:00:00Z` (see the module doc); a time
    past what a calendar date holds (year 10000 on) as `@SECONDS`, as `date -d` reads it."""
    try:
        return datetime.fromtimestamp(ns // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):
        return f"@{ns // 10**9}"


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


NEVER_REPLACED = ("a stream or dump file may be the only copy of a snapshot, so -o never "
                  "replaces one; remove it first or name a new file")


@contextlib.contextmanager
def stream_output(path: str | None) -> Iterator[IO[bytes]]:
    """Where a stream goes (`send -o`, `dump -o`): one rule for both commands.

    - None: stdout, as it is.
    - A device, FIFO or pipe (a tape drive, `/dev/null`, a named pipe a receive reads,
      `/dev/stdout`): written as it is, never truncated, fsynced (EINVAL there) or
      removed, whatever happens.
    - A new file: written under a temporary name beside it (`.NAME.XXXXXXXX.partial`),
      fsynced, and linked to PATH only when complete, so a half-written stream never
      passes for a whole one; on a failure or Ctrl-C the temporary file goes and PATH
      never appears.
    - An existing file (or anything else at PATH): refused before anything is written,
      and also if one appears there while the stream is written (NEVER_REPLACED).
    """
    if path is None:
        yield sys.stdout.buffer
        return
    if _is_special(path):
        yield from _write_special(path)
        return
    if os.path.lexists(path):
        raise SnapvolError(f"{path} already exists: {NEVER_REPLACED}")
    yield from _write_new(path)


def _is_special(path: str) -> bool:
    """Whether PATH (symlinks followed: /dev/stdout) is a device or a FIFO."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as err:
        raise SnapvolError(f"cannot write {path}: {err.strerror}") from None
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)


def _write_special(path: str) -> Iterator[IO[bytes]]:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)  # no O_CREAT, no O_TRUNC
    except OSError as err:
        raise SnapvolError(f"cannot write {path}: {err.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        yield f
        f.flush()


def _write_new(path: str) -> Iterator[IO[bytes]]:
    where, name = os.path.split(os.path.abspath(path))
    while True:
        tmp = os.path.join(where, f".{name}.{secrets.token_hex(4)}.partial")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            break
        except FileExistsError:
            continue
        except OSError as err:
            raise SnapvolError(f"cannot write {path}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _place(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_dir(where)


def _place(tmp: str, path: str) -> None:
    """Give the complete file its name, never over a file that appeared meanwhile: a
    hard link fails if PATH exists (where links are not supported, a rename after a
    last look)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise SnapvolError(f"{path} appeared while the stream was written: "
                           f"{NEVER_REPLACED}") from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK,
                             errno.ENOSYS):
            raise SnapvolError(f"cannot write {path}: {err.strerror}") from None
        if os.path.lexists(path):
            raise SnapvolError(f"{path} appeared while the stream was written: "
                               f"{NEVER_REPLACED}") from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)


def _sync_dir(where: str) -> None:
    """Make the new name durable (best effort: some file systems refuse a directory
    fsync, and the stream itself already is)."""
    with contextlib.suppress(OSError):
        fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
