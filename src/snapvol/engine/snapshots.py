"""Snapshots: the table, and create / delete / rename / restore on a volume.

Creating a snapshot commits a CP, records that CP's root in the table and ORs the active
plane into the summary plane; no block is copied (DESIGN.md §3.4). Deleting one drops its
entry and recomputes the summary plane only where the deleted plane had bits. Restoring
makes the snapshot's inode file the active one; every other snapshot stays.
"""

from __future__ import annotations

import errno
import logging
import time
import uuid as uuidlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from snapvol.engine import planefile
from snapvol.engine.image import Image
from snapvol.engine.tree import BlockTree
from snapvol.errors import FsError, SnapvolError
from snapvol.layout import names as name_rules
from snapvol.layout.constants import (
    BLOCK_SIZE,
    FIRST_DATA_VBN,
    MAX_SNAP_ID,
    MAX_SNAPSHOTS,
    SNAP_ENTRIES_PER_BLOCK,
    SNAP_ENTRY_SIZE,
    SNAP_TABLE_BLOCKS,
)
from snapvol.layout.records import TreeRoot
from snapvol.layout.snaptable import (
    NO_VOLUME,
    SNAP_IN_USE,
    SNAP_RECEIVED,
    SNAP_REPLICA,
    SNAP_SHADOW,
    SnapEntry,
)
from snapvol.planes import Plane
from snapvol.planes.algebra import union_into_blocks
from snapvol.planes.plane import (
    BITS_PER_PLANE_BLOCK,
    PLANE_BLOCK_BYTES,
    WORD,
    WORDS_PER_PLANE_BLOCK,
    bit_positions,
)

if TYPE_CHECKING:
    from snapvol.engine.volume import Volume

log = logging.getLogger("snapvol.engine")

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
    received: bool = False  # arrived in an image stream (False: taken on this volume)
    replica_for: str | None = None  # the UUID of the volume a replication snapshot serves


def snapshot_plane(vol: Volume, entry: SnapEntry) -> Plane:
    from snapvol.engine.volume import load_plane

    return load_plane(vol.io, entry.active_plane, vol.nblocks)


def create(vol: Volume, name: str, shadow: bool = False, source: str | None = None,
           replica_for: bytes | None = None) -> SnapEntry:
    """Take snapshot `name` of the active file system. With `shadow`, take a shadow
    snapshot instead (see engine/shadows.py): of the active file system, or with `source`
    of that existing snapshot, keeping its GUID and CP so a destination holding it still
    matches. `replica_for` (a volume UUID) marks a snapshot `snapvol replicate` made for
    itself, to bring that volume up to date."""
    with vol.mutex:
        check_snapshot_name(name)
        table = vol.snapshots
        if table.find(name) is not None:
            raise SnapshotExists(f"a snapshot named {name!r} already exists")
        if source is not None and not shadow:
            raise SnapshotError("only a shadow snapshot can be made from another snapshot")
        slot = table.free_slot()
        if shadow:
            entry = _create_shadow(vol, name, slot, source)
            log.info("shadow snapshot %s made at CP %d", name, entry.cp_count)
            return entry
        if vol.receive_blocks:
            # The snapshot's plane would hold the receive state's blocks, which its tree
            # roots do not reach (snapvol.image.receiver).
            raise SnapshotBusy(f"{vol.path} has a partial receive: finish it (snapvol send "
                                "... --resume) or abort it (snapvol receive --abort) first")
        snap_id = table.take_id()
        vol.cp()
        r = vol.root
        replica = replica_for is not None
        entry = SnapEntry(snap_id, name, uuidlib.uuid4().bytes, r.cp_count,
                          time.time_ns(), r.inode_file, r.active_plane, r.summary_plane,
                          r.snap_table, flags=SNAP_IN_USE | (SNAP_REPLICA if replica else 0),
                          replica_for=replica_for or NO_VOLUME)
        table.slots[slot] = entry
        # Only where either plane changed since the last snapshot can the summary lack
        # an active bit; elsewhere the last creation already ORed them (DESIGN.md §3.4).
        active, summary = vol.active_plane, vol.summary_plane
        changed = np.union1d(active.touched_array(), summary.touched_array())
        union_into_blocks(summary, active, changed)
        active.clear_touched()
        summary.clear_touched()
        vol.snaps_dirty = True
        vol.cp(force=True)
        log.info("snapshot %s taken at CP %d", name, entry.cp_count)
        return entry


def _create_shadow(vol: Volume, name: str, slot: int, source: str | None) -> SnapEntry:
    from snapvol.engine import shadows

    table = vol.snapshots
    assert vol.alloc is not None
    snap_id = table.take_id()
    flags = SNAP_IN_USE | SNAP_SHADOW
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
        flags |= base.flags & SNAP_RECEIVED  # the same snapshot, so from the same place
    # The superblock and root slots are rewritten in place, never allocated: no bit.
    plane.clear_range(0, FIRST_DATA_VBN)
    # No trees: a shadow's blocks may be reused, so nothing may ever follow its pointers.
    entry = SnapEntry(snap_id, name, guid, cp_count, created, TreeRoot(), TreeRoot(),
                      TreeRoot(), TreeRoot(), flags=flags)
    table.slots[slot] = entry
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
        table.slots[slot] = replace(e, name=new)
        vol.snaps_dirty = True
        vol.cp(force=True)
        log.info("snapshot %s renamed to %s", old, new)


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
            freed = _delete_shadow(vol, slot)
            log.info("shadow snapshot %s deleted", name)
            return freed
        free_before = vol.alloc.free if vol.alloc is not None else 0
        gone = snapshot_plane(vol, entry).nonzero_blocks()
        del table.slots[slot]
        # The other snapshots' union where the deleted plane had bits, read one plane
        # file at a time into one scratch plane (engine/planefile.py).
        rest = Plane.zeros(vol.nblocks)
        for e in table.regular():
            planefile.or_into(rest, vol.io, e.active_plane, only=gone)
        summary = vol.summary_plane
        released: list[np.ndarray] = []
        for pb in gone.tolist():
            sl = slice(pb * WORDS_PER_PLANE_BLOCK, (pb + 1) * WORDS_PER_PLANE_BLOCK)
            words = rest.words[sl]
            if not np.array_equal(summary.words[sl], words):
                held = summary.words[sl] & ~words
                held &= ~vol.active_plane.words[sl]
                released.append(bit_positions(held) + np.uint64(pb * BITS_PER_PLANE_BLOCK))
                summary.words[sl] = words
                summary.mark_dirty(pb)
        assert vol.alloc is not None
        # The committed root still lists the snapshot until this CP lands: its blocks are
        # reusable only after the commit, like any block freed since the last CP.
        if released:
            vol.alloc.free_many(np.concatenate(released))
        vol.alloc.recount()
        vol.snaps_dirty = True
        vol.cp(force=True)
        freed = vol.alloc.free - free_before
        log.info("snapshot %s deleted: %d blocks freed", name, freed)
        return freed


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


INFO_RANGE_BYTES = 16 << 20
"""At most this many plane bytes of all snapshots together (and at most about one plane)
are held at once by `infos`: the snapshot count sets how many plane blocks each range
covers, so the memory does not grow with it."""


def infos(vol: Volume) -> list[SnapshotInfo]:
    """Every snapshot with the space deleting it alone would free: blocks held by that
    snapshot and by no other snapshot and not by the active file system.

    One pass over the planes, a range of plane blocks at a time: each snapshot's stored
    blocks in the range are read once, folded into the "seen once / seen twice" pair of
    bitmaps and kept until the range is counted, so the memory is about one plane (the
    range) plus each plane file's list of stored blocks, whatever the snapshot count."""
    with vol.mutex:
        entries = vol.snapshots.regular()
        trees = [planefile.open_plane(vol.io, e.active_plane) for e in entries]
        stored = []
        for tree in trees:  # which plane blocks each file stores: ranges of holes cost nothing
            stored.append(tree.mapped_fbns())
            tree.trim_cache(keep=0)
        uniq = [0] * len(entries)
        active = vol.active_plane.words.reshape(-1, WORDS_PER_PLANE_BLOCK)
        pbs = vol.active_plane.plane_blocks
        budget = min(INFO_RANGE_BYTES, max(1 << 20, pbs * PLANE_BLOCK_BYTES))
        fit = max(1, budget // (max(1, len(entries)) * PLANE_BLOCK_BYTES))
        step = min(planefile.RANGE_BLOCKS, 1 << (fit.bit_length() - 1))  # divides 256
        for first in range(0, pbs, step):
            count = min(step, pbs - first)
            ones = np.zeros((count, WORDS_PER_PLANE_BLOCK), dtype=WORD)
            twos = np.zeros_like(ones)
            held = []
            for i, (tree, fbns) in enumerate(zip(trees, stored, strict=True)):
                lo, hi = np.searchsorted(fbns, [first, first + count])
                if lo == hi:
                    continue
                at, words = planefile.present_rows(tree, first, count)
                twos[at] |= ones[at] & words
                ones[at] |= words
                held.append((i, at, words))
            if held:
                only_one = ones & ~twos & ~active[first : first + count]
                for i, at, words in held:
                    uniq[i] += int(np.bitwise_count(words & only_one[at]).sum())
            if (first + count) % planefile.RANGE_BLOCKS == 0:
                for tree in trees:  # done with this level-1 block's pointers
                    tree.trim_cache(keep=0)
        out = [_info(e, n) for e, n in zip(entries, uniq, strict=True)]
        out += [_info(e, 0) for e in vol.snapshots.entries() if e.shadow]
        out.sort(key=lambda i: (i.cp_count, i.snap_id))
        return out


def _info(e: SnapEntry, reclaimable: int) -> SnapshotInfo:
    target = None if e.replica_for == NO_VOLUME else str(uuidlib.UUID(bytes=e.replica_for))
    return SnapshotInfo(e.name, str(uuidlib.UUID(bytes=e.guid)), e.snap_id, e.cp_count,
                        e.created_ns, reclaimable, shadow=e.shadow, replica=e.replica,
                        received=e.received, replica_for=target)


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

