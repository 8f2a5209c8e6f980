"""The `.snapshot` directory: one read-only view per snapshot, found by snapshot id.

Views are opened on first use and kept until their snapshot is deleted; a view is a
`FileSystem` on the snapshot's inode file, so it reads exactly what `snapvol get` would.
Directory cookies of `.snapshot` are snapshot ids plus 2 (1 and 2 are '.' and '..'), so
a listing in progress stays valid while snapshots come and go.
"""

from __future__ import annotations

from snapvol.engine import snapshots
from snapvol.engine.volume import Volume
from snapvol.fs import FileSystem
from snapvol.layout.snaptable import SnapEntry

COOKIE_BASE = 2


class SnapshotViews:
    def __init__(self, vol: Volume) -> None:
        self.vol = vol
        self._views: dict[int, FileSystem] = {}

    def entries(self) -> list[SnapEntry]:
        """Every readable snapshot, by id (the order of `.snapshot` listings); shadow
        snapshots have no tree to show."""
        return sorted(self.vol.snapshots.regular(), key=lambda e: e.snap_id)

    def by_name(self, name: str) -> SnapEntry | None:
        found = self.vol.snapshots.find(name)
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

    def create(self, name: str) -> SnapEntry:
        return snapshots.create(self.vol, name)

    def delete(self, name: str) -> int:
        entry = self.by_name(name)
        freed = snapshots.delete(self.vol, name)
        if entry is not None:
            self._views.pop(entry.snap_id, None)
        return freed

    def rename(self, old: str, new: str) -> None:
        snapshots.rename(self.vol, old, new)
