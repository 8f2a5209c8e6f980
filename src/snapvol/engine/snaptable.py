"""The snapshot table in memory, and the refusals of snapshot operations.

The table file holds up to MAX_SNAPSHOTS entries (layout/snaptable.py: the 256-byte
record) and, past them, the shadow snapshots' planes (engine/shadows.py). `Volume` loads it
at open and writes it back at a CP when it changed (`Volume.table_changed`); the operations
on it are in engine/snapshots.py. The error classes live here, beside the table that
raises most of them, so the volume and every layer above can name them without importing
the operations.
"""

from __future__ import annotations

import errno

from snapvol.engine.tree import BlockTree
from snapvol.errors import SnapvolError
from snapvol.layout import names as name_rules
from snapvol.layout.constants import (
    BLOCK_SIZE,
    MAX_SNAP_ID,
    MAX_SNAPSHOTS,
    SNAP_ENTRIES_PER_BLOCK,
    SNAP_ENTRY_SIZE,
    SNAP_TABLE_BLOCKS,
)
from snapvol.layout.snaptable import SnapEntry


class SnapshotError(SnapvolError):
    """A snapshot operation refused. Each kind of refusal is a subclass whose `errno` is
    what the mount answers for it (`mkdir .snapshot/NAME` and friends); the CLI prints the
    message and exits 2 for all of them."""

    errno: int = errno.EINVAL

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        if err is not None:
            self.errno = err


class SnapshotNotFound(SnapshotError):
    """No snapshot has that name."""

    errno = errno.ENOENT


class SnapshotExists(SnapshotError):
    """A snapshot of that name exists already."""

    errno = errno.EEXIST


class SnapshotLimit(SnapshotError):
    """The table is full (MAX_SNAPSHOTS)."""

    errno = errno.ENOSPC


class SnapshotBusy(SnapshotError):
    """The volume is in a state that forbids it now (a partial receive is pending)."""

    errno = errno.EBUSY


class InvalidSnapshotName(SnapshotError):
    """A name a new snapshot cannot take (snapvol.layout.names); EINVAL, or ENAMETOOLONG."""


def check_snapshot_name(name: str) -> None:
    """Refuse a name a new or renamed snapshot cannot take (snapvol.layout.names)."""
    try:
        name_rules.check_snapshot_name(name)
    except name_rules.InvalidName as err:
        raise InvalidSnapshotName(str(err), err.errno) from None


class SnapshotTable:
    """The in-memory snapshot table, written back into its file at a CP."""

    def __init__(self, entries: dict[int, SnapEntry], next_id: int) -> None:
        self.slots = entries  # slot -> entry
        # The id the next snapshot gets. Ids only grow (the root record keeps this one),
        # so a deleted snapshot's id, and the FUSE inode numbers made from it
        # (`snap_id << 40 | ino`, which the kernel may still cache), never come back.
        self.next_id = max([next_id, 1, *(e.snap_id + 1 for e in entries.values())])

    @classmethod
    def load(cls, tree: BlockTree, nblocks: int, next_id: int) -> SnapshotTable:
        """The table in `tree`; `next_id` is the root record's next snapshot id (the
        entries' ids are below it, unless the record predates it being kept)."""
        entries: dict[int, SnapEntry] = {}
        for blk in range(nblocks):
            data = memoryview(tree.read_block(blk))
            for i in range(SNAP_ENTRIES_PER_BLOCK):
                e = SnapEntry.decode(data[i * SNAP_ENTRY_SIZE : (i + 1) * SNAP_ENTRY_SIZE])
                if e is not None:
                    entries[blk * SNAP_ENTRIES_PER_BLOCK + i] = e
        return cls(entries, next_id)

    def take_id(self) -> int:
        """A new snapshot id, never handed out before on this volume."""
        snap_id = self.next_id
        if snap_id > MAX_SNAP_ID:
            raise SnapshotLimit(f"this volume has used all {MAX_SNAP_ID} snapshot ids; "
                                "copy its files to a new volume (snapvol get / put)")
        self.next_id += 1
        return snap_id

    @property
    def nblocks(self) -> int:
        if not self.slots:
            return 0
        return max(self.slots) // SNAP_ENTRIES_PER_BLOCK + 1

    def write_into(self, tree: BlockTree) -> None:
        for blk in range(self.nblocks):
            buf = bytearray(BLOCK_SIZE)
            for i in range(SNAP_ENTRIES_PER_BLOCK):
                e = self.slots.get(blk * SNAP_ENTRIES_PER_BLOCK + i)
                if e is not None:
                    buf[i * SNAP_ENTRY_SIZE : (i + 1) * SNAP_ENTRY_SIZE] = e.encode()
            if bytes(buf) != tree.read_block(blk):
                tree.write_block(blk, bytes(buf))
        if not self.shadow_slots():
            tree.truncate_blocks(self.nblocks)
            return
        # Shadow planes sit past the table (engine/shadows.py): drop only table blocks.
        for blk in range(self.nblocks, SNAP_TABLE_BLOCKS):
            if blk in tree.dirty_data or tree.data_ptr(blk)[0]:
                tree.punch_block(blk)

    def entries(self) -> list[SnapEntry]:
        """Every entry, shadows included, oldest first (by CP count, then id)."""
        return sorted(self.slots.values(), key=lambda e: (e.cp_count, e.snap_id))

    def regular(self) -> list[SnapEntry]:
        """The snapshots that hold their blocks and can be read (no shadows), oldest first."""
        return [e for e in self.entries() if not e.shadow]

    def shadow_slots(self) -> list[int]:
        """Table slots of the shadow snapshots (their planes live past the table)."""
        return sorted(slot for slot, e in self.slots.items() if e.shadow)

    def slot_of(self, entry: SnapEntry) -> int:
        """The slot of `entry` (ids are never reused in a volume)."""
        for slot, e in self.slots.items():
            if e.snap_id == entry.snap_id:
                return slot
        raise SnapshotError(f"snapshot {entry.name!r} is not in this volume's table")

    def find(self, name: str) -> tuple[int, SnapEntry] | None:
        for slot, e in self.slots.items():
            if e.name == name:
                return slot, e
        return None

    def get(self, name: str) -> SnapEntry:
        found = self.find(name)
        if found is None:
            names = ", ".join(e.name for e in self.entries()) or "none"
            raise SnapshotNotFound(f"no snapshot named {name!r} (snapshots: {names})")
        return found[1]

    def __len__(self) -> int:
        return len(self.slots)

    def free_slot(self) -> int:
        for slot in range(MAX_SNAPSHOTS):
            if slot not in self.slots:
                return slot
        raise SnapshotLimit(f"too many snapshots: the limit is {MAX_SNAPSHOTS}; delete one first")
