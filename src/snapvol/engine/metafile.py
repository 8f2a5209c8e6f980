"""Metadata files: the trees a root record or a snapshot entry names by a `TreeRoot`.

The inode file, the active and summary planes, the snapshot table and the receive state
are files like any other (DESIGN.md §4), each rooted in one pointer with a height and a
length in blocks. These helpers turn such a root into a `BlockTree` and back, list the
blocks a tree occupies, and read a plane stored in a file; every module that follows a
root (the volume, the inode file, the plane files, snapshots, shadows, fsck, transfers)
uses them, so none of them needs the others to do it.
"""

from __future__ import annotations

import numpy as np

from snapvol.engine.blockio import BlockIO
from snapvol.engine.tree import ZERO_BLOCK, BlockSpace, BlockTree
from snapvol.layout.pointer import PTR_DTYPE, Pointer
from snapvol.layout.records import TreeRoot
from snapvol.planes import Plane
from snapvol.planes.plane import plane_blocks_for

READ_STEP = 256
"""Plane blocks read per call when a whole plane is loaded (1 MiB)."""


def tree_of(io: BlockIO, root: TreeRoot, space: BlockSpace | None = None) -> BlockTree:
    """The tree of the file at `root`; writable when given the allocator (`space`)."""
    top = np.zeros(1, dtype=PTR_DTYPE)
    top[0] = (root.ptr.vbn, root.ptr.csum)
    return BlockTree(io, top, root.height, space)


def root_of(tree: BlockTree, nblocks: int) -> TreeRoot:
    """The root of a one-pointer tree (as `tree_of` makes) holding `nblocks` blocks."""
    p = tree.top[0]
    return TreeRoot(Pointer(int(p["vbn"]), int(p["csum"])), tree.height, nblocks)


def tree_vbns(io: BlockIO, root: TreeRoot) -> np.ndarray:
    """Every VBN a tree occupies (indirect and data blocks), verifying each indirect."""
    out: list[int] = []
    tree_of(io, root).walk(lambda level, idx, vbn, csum: out.append(vbn))
    return np.array(out, dtype=np.uint64)


def plane_in(tree: BlockTree, nblocks: int, first: int = 0) -> Plane:
    """The plane of a volume of `nblocks` blocks stored in file blocks from `first` of
    `tree` (holes are all-zero plane blocks): a plane file, or one of the shadow planes
    kept past the snapshot table (engine/shadows.py)."""
    plane = Plane.zeros(nblocks)
    count_all = plane_blocks_for(nblocks)
    for lo in range(0, count_all, READ_STEP):
        count = min(READ_STEP, count_all - lo)
        for i, data in enumerate(tree.read_blocks(first + lo, count)):
            if data is not ZERO_BLOCK:
                plane.load_block(lo + i, data)
    plane.mark_clean()
    return plane


def load_plane(io: BlockIO, root: TreeRoot, nblocks: int) -> Plane:
    """The plane in the plane file at `root` (an active or summary plane, a snapshot's
    saved active plane, the selection at the head of a receive's state file)."""
    return plane_in(tree_of(io, root), nblocks)
