"""The errors snapvol raises.

Every error a user can cause is a `SnapvolError` whose message is one line naming the
problem and, where there is one, the way out. The CLI prints it and exits with code 2.
`FsError` carries an errno so the POSIX layer and the FUSE front end can pass it on.
"""

from __future__ import annotations

import os


class SnapvolError(Exception):
    """A problem the user can act on; `str(err)` is the one-line message."""


class VolumeError(SnapvolError):
    """The image is missing, not a volume, damaged, or of an unknown version."""


class LockedError(SnapvolError):
    """Another process (or this one) holds the volume."""


class CorruptionError(SnapvolError):
    """A block failed its checksum or a record failed validation. Names the block.

    `detail` is the finding alone; the message adds `advice` (what to do about it), which
    the checker leaves out of its report: it is the tool the advice points to."""

    def __init__(self, detail: str, advice: str = "") -> None:
        super().__init__(f"{detail}; {advice}" if advice else detail)
        self.detail = detail


class FsError(SnapvolError, OSError):
    """A POSIX-level failure with an errno (ENOENT, EEXIST, ENOSPC, EROFS, ...)."""

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)
        self.errno = err
        self.message = message

    def __str__(self) -> str:
        return self.message


def fs_error(err: int, what: str) -> FsError:
    """An `FsError` whose message is `what: strerror` (e.g. "/a/b: No such file")."""
    return FsError(err, f"{what}: {os.strerror(err)}")

