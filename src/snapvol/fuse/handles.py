"""Open file and directory handles of a mount.

A handle remembers which image (active or a snapshot) and which inode it was opened on,
so reads and writes need no lookup, and counts how many handles each inode has: an inode
with open handles must outlive its last name (see `operations.SnapvolOperations.unlink`),
and a snapshot with open handles cannot be deleted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from snapvol.fs import FileSystem


@dataclass(slots=True, frozen=True)
class Handle:
    view: FileSystem
    snap_id: int  # 0 for the active image
    ino: int  # engine inode number
    writable: bool
    is_dir: bool = False  # opened by opendir


class HandleTable:
    def __init__(self) -> None:
        self._handles: dict[int, Handle] = {}
        self._per_inode: Counter[tuple[int, int]] = Counter()
        self._next = 1

    def add(self, handle: Handle) -> int:
        fh = self._next
        self._next += 1
        self._handles[fh] = handle
        self._per_inode[(handle.snap_id, handle.ino)] += 1
        return fh

    def get(self, fh: int) -> Handle:
        return self._handles[fh]

    def replace(self, fh: int, handle: Handle) -> None:
        """Swap a handle's view (same image and inode), as a refresh does for a file that
        changed under it."""
        old = self._handles[fh]
        assert (old.snap_id, old.ino) == (handle.snap_id, handle.ino)
        self._handles[fh] = handle

    def items(self) -> list[tuple[int, Handle]]:
        return list(self._handles.items())

    def remove(self, fh: int) -> Handle:
        handle = self._handles.pop(fh)
        key = (handle.snap_id, handle.ino)
        self._per_inode[key] -= 1
        if not self._per_inode[key]:
            del self._per_inode[key]
        return handle

    def open_count(self, snap_id: int, ino: int) -> int:
        return self._per_inode.get((snap_id, ino), 0)

    def snapshot_in_use(self, snap_id: int) -> bool:
        return any(sid == snap_id for sid, _ in self._per_inode)

    def all(self) -> list[int]:
        return list(self._handles)
