"""Snapshots: the table, and create / delete / rename / restore on a volume.

Creating a snapshot commits a CP, records that CP's root in the table and ORs the active
plane into the summary plane; no block is copied (DESIGN.md §3.4). Deleting one drops its
entry and recomputes the summary plane only where the deleted plane had bits. Restoring
makes the snapshot's inode file the active one; every other snapshot stays.
"""

from __future__ import annotations

import errno
import time
import uuid as uuidlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from snapvol.engine.image import Image
from snapvol.engine.tree import BlockTree
from snapvol.errors import FsError, SnapvolError
from snapvol.layout import names as name_rules
from snapvol.layout.constants import (
    BLOCK_SIZE,
    FIRST_DATA_VBN,
    MAX_SNAPSHOTS,
    SNAP_ENTRIES_PER_BLOCK,
    SNAP_ENTRY_SIZE,
    SNAP_TABLE_BLOCKS,
)
from snapvol.layout.records import TreeRoot
from snapvol.layout.snaptable import SNAP_IN_USE, SNAP_REPLICA, SNAP_SHADOW, SnapEntry
from snapvol.planes import Plane
from snapvol.planes.algebra import union_into_blocks
from snapvol.planes.plane import bit_positions

if TYPE_CHECKING:
    from snapvol.engine.volume import Volume


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
        self.next_id = next_id

    @classmethod
    def load(cls, tree: BlockTree, nblocks: int) -> SnapshotTable:
        entries: dict[int, SnapEntry] = {}
        next_id = 1
        for blk in range(nblocks):
            data = memoryview(tree.read_block(blk))
            for i in range(SNAP_ENTRIES_PER_BLOCK):
                e = SnapEntry.decode(data[i * SNAP_ENTRY_SIZE : (i + 1) * SNAP_ENTRY_SIZE])
                if e is not None:
                    entries[blk * SNAP_ENTRIES_PER_BLOCK + i] = e
                    next_id = max(next_id, e.snap_id + 1)
        return cls(entries, next_id)

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


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    name: str
    guid: str
    snap_id: int
    cp_count: int
    created_ns: int
    reclaimable_blocks: int  # what deleting it alone would free
    shadow: bool = False
    replica: bool = False  # made by `snapvol replicate`


def snapshot_plane(vol: Volume, entry: SnapEntry) -> Plane:
    from snapvol.engine.volume import load_plane

    return load_plane(vol.io, entry.active_plane, vol.nblocks)


def create(vol: Volume, name: str, shadow: bool = False, source: str | None = None,
           replica: bool = False) -> SnapEntry:
    """Take snapshot `name` of the active file system. With `shadow`, take a shadow
    snapshot instead (see engine/shadows.py): of the active file system, or with `source`
    of that existing snapshot, keeping its GUID and CP so a destination holding it still
    matches. `replica` marks a snapshot `snapvol replicate` made for itself."""
    with vol.mutex:
        check_snapshot_name(name)
        table = vol.snapshots
        if table.find(name) is not None:
            raise SnapshotExists(f"a snapshot named {name!r} already exists")
        if source is not None and not shadow:
            raise SnapshotError("only a shadow snapshot can be made from another snapshot")
        slot = table.free_slot()
        if shadow:
            return _create_shadow(vol, name, slot, source)
        if vol.receive_blocks:
            # The snapshot's plane would hold the receive state's blocks, which its tree
            # roots do not reach (snapvol.image.receiver).
            raise SnapshotBusy(f"{vol.path} has a partial receive: finish it (snapvol send "
                                "... --resume) or abort it (snapvol receive --abort) first")
        vol.cp()
        r = vol.root
        entry = SnapEntry(table.next_id, name, uuidlib.uuid4().bytes, r.cp_count,
                          time.time_ns(), r.inode_file, r.active_plane, r.summary_plane,
                          r.snap_table, flags=SNAP_IN_USE | (SNAP_REPLICA if replica else 0))
        table.slots[slot] = entry
        table.next_id += 1
        # Only where either plane changed since the last snapshot can the summary lack
        # an active bit; elsewhere the last creation already ORed them (DESIGN.md §3.4).
        active, summary = vol.active_plane, vol.summary_plane
        changed = np.union1d(active.touched_array(), summary.touched_array())
        union_into_blocks(summary, active, changed)
        active.clear_touched()
        summary.clear_touched()
        vol.snaps_dirty = True
        vol.cp(force=True)
        return entry


def _create_shadow(vol: Volume, name: str, slot: int, source: str | None) -> SnapEntry:
    from snapvol.engine import shadows

    table = vol.snapshots
    assert vol.alloc is not None
    if source is None:
        vol.cp()  # the plane in memory is now exactly the committed CP's image
        plane = vol.active_plane.copy()
        guid, cp_count, created = uuidlib.uuid4().bytes, vol.root.cp_count, time.time_ns()
    else:
        base = table.get(source)
        if base.shadow:
            plane = shadows.load(vol.snap_tree, table.slot_of(base), vol.nblocks)
        else:
            plane = snapshot_plane(vol, base)
        guid, cp_count, created = base.guid, base.cp_count, base.created_ns
    # The superblock and root slots are rewritten in place, never allocated: no bit.
    plane.clear_range(0, FIRST_DATA_VBN)
    # No trees: a shadow's blocks may be reused, so nothing may ever follow its pointers.
    entry = SnapEntry(table.next_id, name, guid, cp_count, created, TreeRoot(), TreeRoot(),
                      TreeRoot(), TreeRoot(), flags=SNAP_IN_USE | SNAP_SHADOW)
    table.slots[slot] = entry
    table.next_id += 1
    shadows.store(vol.snap_tree, slot, plane)
    vol.alloc.watch_reuse = True
    vol.snaps_dirty = True
    vol.cp(force=True)
    return entry


def shadow_plane(vol: Volume, entry: SnapEntry) -> Plane:
    """The current plane of a shadow snapshot of `vol` (bits of reused blocks cleared)."""
    from snapvol.engine import shadows

    return shadows.load(vol.snap_tree, vol.snapshots.slot_of(entry), vol.nblocks)


def plane_of(vol: Volume, entry: SnapEntry) -> Plane:
    """A snapshot's plane, regular or shadow: what an incremental transfer subtracts."""
    return shadow_plane(vol, entry) if entry.shadow else snapshot_plane(vol, entry)


def rename(vol: Volume, old: str, new: str) -> None:
    with vol.mutex:
        check_snapshot_name(new)
        table = vol.snapshots
        found = table.find(old)
        if found is None:
            table.get(old)
            return
        if table.find(new) is not None:
            raise SnapshotExists(f"a snapshot named {new!r} already exists")
        slot, e = found
        table.slots[slot] = SnapEntry(e.snap_id, new, e.guid, e.cp_count, e.created_ns,
                                      *e.trees, flags=e.flags)
        vol.snaps_dirty = True
        vol.cp(force=True)


def delete(vol: Volume, name: str) -> int:
    """Delete a snapshot; returns the number of blocks that became free."""
    with vol.mutex:
        table = vol.snapshots
        found = table.find(name)
        if found is None:
            table.get(name)
            return 0
        slot, entry = found
        if entry.shadow:
            return _delete_shadow(vol, slot)
        free_before = vol.alloc.free if vol.alloc is not None else 0
        gone = snapshot_plane(vol, entry)
        del table.slots[slot]
        others = [snapshot_plane(vol, e) for e in table.regular()]
        summary = vol.summary_plane
        released: list[np.ndarray] = []
        for pb in gone.nonzero_blocks().tolist():
            words = np.zeros(512, dtype=np.uint64)
            for p in others:
                words |= p.words[pb * 512 : (pb + 1) * 512]
            if not np.array_equal(summary.words[pb * 512 : (pb + 1) * 512], words):
                held = summary.words[pb * 512 : (pb + 1) * 512] & ~words
                held &= ~vol.active_plane.words[pb * 512 : (pb + 1) * 512]
                released.append(bit_positions(held) + np.uint64(pb * 512 * 64))
                summary.words[pb * 512 : (pb + 1) * 512] = words
                summary.mark_dirty(pb)
        assert vol.alloc is not None
        # The committed root still lists the snapshot until this CP lands: its blocks are
        # reusable only after the commit, like any block freed since the last CP.
        if released:
            vol.alloc.free_many(np.concatenate(released))
        vol.alloc.recount()
        vol.snaps_dirty = True
        vol.cp(force=True)
        return vol.alloc.free - free_before


def _delete_shadow(vol: Volume, slot: int) -> int:
    """A shadow holds no space: dropping it frees only its plane's own blocks."""
    from snapvol.engine import shadows

    assert vol.alloc is not None
    del vol.snapshots.slots[slot]
    shadows.drop(vol.snap_tree, slot, vol.active_plane.plane_blocks)
    vol.alloc.watch_reuse = bool(vol.snapshots.shadow_slots())
    vol.snaps_dirty = True
    vol.cp(force=True)
    return 0


def infos(vol: Volume) -> list[SnapshotInfo]:
    """Every snapshot with the space deleting it alone would free: blocks held by that
    snapshot and by no other snapshot and not by the active file system."""
    with vol.mutex:
        entries = vol.snapshots.regular()
        planes = [snapshot_plane(vol, e) for e in entries]
        ones = np.zeros_like(vol.active_plane.words)
        twos = np.zeros_like(ones)
        for p in planes:
            twos |= ones & p.words
            ones |= p.words
        only_one = ones & ~twos & ~vol.active_plane.words
        out = []
        for e, p in zip(entries, planes, strict=True):
            uniq = int(np.bitwise_count(p.words & only_one).sum())
            out.append(SnapshotInfo(e.name, str(uuidlib.UUID(bytes=e.guid)), e.snap_id,
                                    e.cp_count, e.created_ns, uniq, replica=e.replica))
        for e in vol.snapshots.entries():
            if e.shadow:
                out.append(SnapshotInfo(e.name, str(uuidlib.UUID(bytes=e.guid)), e.snap_id,
                                        e.cp_count, e.created_ns, 0, shadow=True))
        out.sort(key=lambda i: (i.cp_count, i.snap_id))
        return out


def restore(vol: Volume, name: str) -> None:
    """Roll the active file system back to snapshot `name`. Other snapshots are kept."""
    from snapvol.engine.volume import root_of, tree_vbns

    with vol.mutex:
        entry = vol.snapshots.get(name)
        if entry.shadow:
            raise SnapshotError(f"cannot restore shadow snapshot {name!r}: it keeps a block "
                                "plane but no tree; restore a regular snapshot")
        if vol.alloc is None:
            raise FsError(30, f"{vol.path} is open read-only")
        # Commit first so the blocks of the current image are exactly the active plane.
        vol.cp()
        old = vol.active_plane
        new = snapshot_plane(vol, entry)
        # The snapshot's plane names its own metadata files; the active image keeps the
        # current ones (planes, summary, table), which the next CP rewrites copy-on-write.
        for tree_root in (entry.active_plane, entry.summary_plane, entry.snap_table):
            new.clear_many(tree_vbns(vol.io, tree_root))
        for tree in (vol.active_tree, vol.summary_tree, vol.snap_tree, vol.receive_tree):
            new.set_many(tree_vbns(vol.io, root_of(tree, 0)))
        new.set_range(0, 3)
        dropped = old.words & ~new.words
        old_members = Plane(vol.nblocks, dropped).members()
        for pb in range(old.plane_blocks):
            sl = slice(pb * 512, (pb + 1) * 512)
            if not np.array_equal(old.words[sl], new.words[sl]):
                old.words[sl] = new.words[sl]
                old.mark_dirty(pb)
        vol.alloc.free_many(old_members)  # reusable once the next CP commits
        vol.active = Image(vol.io, entry.inode_file, vol.alloc, vol._admit)
        vol.alloc.recount()
        vol.cp(force=True)

