"""Name rules: what a directory entry and a snapshot may be called (pure, no I/O).

Every layer checks names here and maps the refusal once into its own vocabulary: the
engine's directories and the POSIX layer into `FsError` (the errno carried below), the
snapshot table into `SnapshotError`, the stream decoder into `StreamError`.

Directory entries are bytes, 1 to 255 of them, without '/' or NUL; '.' and '..' are never
stored. `.snapshot` and `.snapvol-unlinked` are reserved at the root of a volume: the
mount shows the snapshots at the first and keeps files unlinked while open in the second
(docs/ARCHITECTURE.md, "Reserved names").

Snapshot names have two rules. What a snapshot table entry (and so a stream) can hold:
valid UTF-8, 1 to 255 bytes, no '/' or NUL, not '.' or '..'. And what a *new* name may be
(`snap create`, `snap rename`, `mkdir` and `mv` in `.snapshot`): letters and digits (of
any script) and `. _ - : +`, not starting with '-', so that every name can be written on
the command line as it is: `IMAGE@SNAP` (verify), `A%B` (ranges) and options (`-x`) can
never be misread. Names made before the second rule (or received from a volume that has
them) stay usable: lookups, deletes, renames from them and receives take any name the
table can hold.
"""

from __future__ import annotations

import errno

from snapvol.errors import SnapvolError
from snapvol.layout.constants import MAX_NAME

SNAPDIR_NAME = b".snapshot"
"""The mount's snapshot directory at the root of the active file system."""
UNLINKED_NAME = b".snapvol-unlinked"
"""Where the mount keeps files unlinked while still open, until their last close."""
RESERVED_ROOT_NAMES: dict[bytes, str] = {
    SNAPDIR_NAME: "the mount shows the snapshots there",
    UNLINKED_NAME: "the mount keeps files unlinked while open there",
}
"""Names no file may take at the root of a volume, with the reason."""

SNAPSHOT_PUNCTUATION = "._-:+"
SNAPSHOT_NAME_RULE = ("letters, digits and the characters . _ - : + (not starting with '-'), "
                      f"at most {MAX_NAME} bytes")


class InvalidName(SnapvolError):
    """A name the volume cannot hold; `errno` is what a POSIX call answers for it."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


def check_entry_name(name: bytes) -> None:
    """Refuse what cannot be a directory entry name, with the reason: empty (ENOENT, as
    POSIX answers for an empty path), '/' or NUL, '.' or '..' (EINVAL), longer than 255
    bytes (ENAMETOOLONG)."""
    if not name:
        raise InvalidName(errno.ENOENT, "an empty name names no file")
    if b"/" in name or b"\0" in name:
        raise InvalidName(errno.EINVAL, f"invalid name {name[:60]!r}: names cannot contain "
                                        "'/' or NUL")
    if len(name) > MAX_NAME:
        raise InvalidName(errno.ENAMETOOLONG, f"name too long: {name[:40]!r}... is "
                                              f"{len(name)} bytes, the limit is {MAX_NAME}")
    if name == b"." or name == b"..":
        raise InvalidName(errno.EINVAL, f"invalid name {name!r}: '.' and '..' are not file "
                                        "names")


def reserved_at_root(name: bytes) -> str | None:
    """Why `name` cannot be made at the root of a volume, or None if it can."""
    return RESERVED_ROOT_NAMES.get(name)


def check_stored_snapshot_name(raw: bytes) -> str:
    """The name of a snapshot table entry (or of one in a stream), or InvalidName if a
    table could not hold it: what every existing snapshot satisfies."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidName(errno.EINVAL, f"invalid snapshot name {raw[:60]!r}: it is not "
                                        "valid UTF-8") from None
    if not raw:
        raise InvalidName(errno.EINVAL, "invalid snapshot name: it is empty")
    if len(raw) > MAX_NAME:
        raise InvalidName(errno.ENAMETOOLONG, f"invalid snapshot name {name[:40]!r}...: "
                                              f"{len(raw)} bytes, the limit is {MAX_NAME}")
    if "/" in name or "\0" in name or name in (".", ".."):
        raise InvalidName(errno.EINVAL, f"invalid snapshot name {name!r}: it cannot contain "
                                        "'/' or NUL, or be '.' or '..'")
    return name


def snapshot_name_bytes(name: str) -> bytes:
    """`name` in bytes: its UTF-8, or for a name from argv or the mount that is not
    UTF-8 (it holds surrogates) the bytes it came from."""
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogatepass")  # never valid UTF-8: refused later


def check_snapshot_name(name: str) -> None:
    """Refuse a name a new snapshot (or a renamed one) cannot take: beyond the table's
    rule, anything but letters, digits and `. _ - : +`, and a leading '-' (see the
    module doc for why)."""
    check_stored_snapshot_name(snapshot_name_bytes(name))
    bad = sorted({c for c in name if not (c.isalnum() or c in SNAPSHOT_PUNCTUATION)})
    if bad:
        shown = " ".join(repr(c) for c in bad[:8])
        raise InvalidName(errno.EINVAL, f"invalid snapshot name {name!r}: {shown} cannot be "
                                        f"used; a snapshot name has {SNAPSHOT_NAME_RULE}")
    if name.startswith("-"):
        raise InvalidName(errno.EINVAL, f"invalid snapshot name {name!r}: it cannot start "
                                        f"with '-'; a snapshot name has {SNAPSHOT_NAME_RULE}")
