"""Shadow snapshots (bookmarks): planes whose blocks the allocator may reuse.

A shadow snapshot keeps only an identity (name, GUID, CP count) and a plane: the blocks
of one consistent state that have not been handed out again since. It holds no space (it
is not in the summary plane), and when the allocator reuses one of its blocks the bit is
cleared in the same CP that writes the block (the reference's §3.4). So a set bit always
means "never reallocated since the shadow was taken, so its bytes are what they were", and
as the BASE of an incremental transfer a shadow may let unneeded blocks through (cleared
bits are not subtracted) but never holds back a needed one.

Where the planes live: in the snapshot table file, past the table. The shadow in table
slot s keeps plane block pb at file block `SHADOW_BASE + s * P + pb` (P = the volume's
plane blocks); all-zero plane blocks are holes, so a shadow of a sparse volume is small.
The table file is rooted in the root record and frozen in every snapshot entry, so:
restoring a snapshot does not roll shadow planes back (they are not in the inode file);
every snapshot's saved table carries the shadow planes of its CP; fsck accounts for their
blocks when it walks the table; and a block stream carries them with the table.

Clearing on reuse stays cheap: while shadows exist the allocator records the VBNs it hands
out, and at each CP `settle` reads and rewrites only the shadow plane blocks those VBNs
fall in (allocation runs from a cursor, so that is a handful of blocks per CP).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from snapvol.engine.metafile import plane_in
from snapvol.engine.tree import BlockTree
from snapvol.layout.constants import SNAP_TABLE_BLOCKS
from snapvol.planes import BITS_PER_PLANE_BLOCK, Plane
from snapvol.planes.plane import plane_blocks_for

SHADOW_BASE = SNAP_TABLE_BLOCKS
"""First file block of the snapshot table file that holds shadow planes."""


def plane_fbn(slot: int, pb: int, plane_blocks: int) -> int:
    """The table-file block holding plane block `pb` of the shadow in `slot`."""
    return SHADOW_BASE + slot * plane_blocks + pb


def load(tree: BlockTree, slot: int, nblocks: int) -> Plane:
    """The plane of the shadow in `slot`, read from a snapshot table file's tree."""
    return plane_in(tree, nblocks, plane_fbn(slot, 0, plane_blocks_for(nblocks)))


def store(tree: BlockTree, slot: int, plane: Plane) -> None:
    """Write a new shadow's plane into its (empty) region of the table file. Outside a
    CP: the next CP places the blocks."""
    for pb in plane.nonzero_blocks().tolist():
        tree.write_block(plane_fbn(slot, pb, plane.plane_blocks), plane.block_bytes(pb))


def drop(tree: BlockTree, slot: int, plane_blocks: int) -> None:
    """Punch the region of a deleted shadow (outside a CP)."""
    lo, hi = plane_fbn(slot, 0, plane_blocks), plane_fbn(slot + 1, 0, plane_blocks)
    for fbn in tree.mapped_fbns().tolist():
        if lo <= fbn < hi:
            tree.punch_block(fbn)


def region_slot(fbn: int, plane_blocks: int) -> int:
    """The table slot whose shadow region holds table-file block `fbn` (>= SHADOW_BASE)."""
    return (fbn - SHADOW_BASE) // plane_blocks


def clear_reused(tree: BlockTree, slots: Iterable[int], vbns: np.ndarray,
                 plane_blocks: int) -> int:
    """Clear `vbns` (just handed out by the allocator) in the shadows of `slots`; returns
    how many bits were cleared. Only the plane blocks the VBNs fall in are read. Called
    inside a CP between placements, so a block already given a new VBN this CP is
    rewritten rather than punched (punching it would drop the VBN it was given)."""
    if len(vbns) == 0:
        return 0
    vbns = np.unique(vbns.astype(np.uint64, copy=False))
    pbs = vbns // np.uint64(BITS_PER_PLANE_BLOCK)
    bounds = np.flatnonzero(np.diff(pbs)) + 1
    groups = [(int(pbs[g[0]]), vbns[g]) for g in np.split(np.arange(len(vbns)), bounds)]
    cleared = 0
    for slot in slots:
        for pb, members in groups:
            fbn = plane_fbn(slot, pb, plane_blocks)
            if fbn not in tree.dirty_data and not tree.data_ptr(fbn)[0]:
                continue  # a hole: no bit of this shadow in this plane block
            words = np.frombuffer(tree.read_block(fbn), dtype="<u8").copy()
            local = members - np.uint64(pb * BITS_PER_PLANE_BLOCK)
            masks = np.left_shift(np.uint64(1), local & np.uint64(63))
            index = (local >> np.uint64(6)).astype(np.intp)
            hit = (words[index] & masks) != 0
            if not hit.any():
                continue
            cleared += int(np.count_nonzero(hit))
            np.bitwise_and.at(words, index, ~masks)
            if not words.any() and (0, fbn) not in tree.placed:
                tree.punch_block(fbn)
            else:
                tree.write_block(fbn, words.tobytes())
    return cleared
