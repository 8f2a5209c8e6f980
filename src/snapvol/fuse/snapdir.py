"""The `.snapshot` directory: one read-only view per snapshot, found by snapshot id.

Views are opened on first use and kept until their snapshot is deleted; a view is a
`FileSystem` on the snapshot's inode file, so it reads exactly what `snapvol get` would.
Directory cookies of `.snapshot` are snapshot ids plus 2 (1 and 2 are '.' and '..'), so
a listing in progress stays valid while snapshots come and go.
"""

from __future__ import annotations

import errno
import logging
import os

from snapvol.engine import snapshots
from snapvol.engine.snaptable import SnapshotError
from snapvol.engine.volume import Volume
from snapvol.errors import FsError
from snapvol.fs import FileSystem
from snapvol.layout.constants import MAX_NAME
from snapvol.layout.snaptable import SnapEntry

COOKIE_BASE = 2

log = logging.getLogger("snapvol.fuse")


def _refused(what: str, err: SnapshotError) -> FsError:
    """A snapshot refusal as the errno of its kind (SnapshotError.errno: EEXIST, EINVAL,
    ENAMETOOLONG, ENOSPC for the table's limit, EBUSY for a pending partial receive),
    logged with its reason, which an errno alone cannot tell the user."""
    log.warning("%s refused: %s", what, err)
    return FsError(err.errno, str(err))


class SnapshotViews:
    def __init__(self, vol: Volume) -> None:
        self.vol = vol
        self._views: dict[int, FileSystem] = {}

    def entries(self) -> list[SnapEntry]:
        """Every readable snapshot, by id (the order of `.snapshot` listings); shadow
        snapshots have no tree to show."""
        return sorted(self.vol.snapshots.regular(), key=lambda e: e.snap_id)

    def by_name(self, name: str | bytes) -> SnapEntry | None:
        """The readable snapshot called `name` (any name the table holds, old ones that
        new names may no longer take included); ENAMETOOLONG for a name no snapshot can
        have, as a directory answers for a name past NAME_MAX."""
        raw = os.fsencode(name)
        if len(raw) > MAX_NAME:
            raise FsError(errno.ENAMETOOLONG, f".snapshot/{os.fsdecode(raw[:40])}...: a "
                                              f"snapshot name is at most {MAX_NAME} bytes")
        found = self.vol.snapshots.find(os.fsdecode(raw))
        return None if found is None or found[1].shadow else found[1]

    def view(self, snap_id: int) -> FileSystem | None:
        """The read-only view of snapshot `snap_id`, or None if it no longer exists."""
        fs = self._views.get(snap_id)
        if fs is not None:
            return fs
        for e in self.vol.snapshots.regular():
            if e.snap_id == snap_id:
                fs = self._views[snap_id] = FileSystem(self.vol, e.name)
                return fs
        return None

    def drop(self, snap_ids: set[int]) -> None:
        """Forget the views of snapshots that went or changed (a refresh of a read-only
        mount after a receive); a later `view` opens the current one."""
        for snap_id in snap_ids:
            self._views.pop(snap_id, None)

    def create(self, name: str | bytes) -> SnapEntry:
        """`mkdir .snapshot/NAME`: take snapshot NAME, or FsError with the refusal's errno."""
        shown = os.fsdecode(name)
        try:
            return snapshots.create(self.vol, shown)
        except SnapshotError as e:
            raise _refused(f"mkdir .snapshot/{shown}", e) from None

    def delete(self, name: str) -> int:
        entry = self.by_name(name)
        try:
            freed = snapshots.delete(self.vol, name)
        except SnapshotError as e:
            raise _refused(f"rmdir .snapshot/{name}", e) from None
        if entry is not None:
            self._views.pop(entry.snap_id, None)
        return freed

    def rename(self, old: str | bytes, new: str | bytes) -> None:
        """`mv .snapshot/OLD .snapshot/NEW`; FsError with the refusal's errno."""
        a, b = os.fsdecode(old), os.fsdecode(new)
        try:
            snapshots.rename(self.vol, a, b)
        except SnapshotError as e:
            raise _refused(f"rename of .snapshot/{a} to {b}", e) from None
