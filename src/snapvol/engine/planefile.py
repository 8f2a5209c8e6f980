"""Plane files read a range at a time, so work over many snapshots' planes holds a few
planes in memory whatever the snapshot count.

A snapshot's plane is its active-plane file read through the saved root (DESIGN.md
§3.4). Loading it whole costs a plane of memory (64 MiB on a 2 TiB volume), and an
operation that loaded every snapshot's plane at once (listing the space each holds,
deleting one, choosing a send's blocks) needed 255 of them. The functions here read a
plane file `RANGE_BLOCKS` plane blocks at a time, skip its holes (all-zero plane blocks
are stored as holes, so a sparse volume's planes are mostly holes), and fold each range
into an accumulator the caller owns: the memory is the accumulator, one range and the
file's indirect blocks.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from snapvol.engine.blockio import BlockIO
from snapvol.engine.metafile import tree_of
from snapvol.engine.tree import ZERO_BLOCK, BlockTree
from snapvol.layout.constants import PTRS_PER_BLOCK
from snapvol.layout.records import TreeRoot
from snapvol.planes import Plane
from snapvol.planes.plane import WORD, WORDS_PER_PLANE_BLOCK

RANGE_BLOCKS = PTRS_PER_BLOCK
"""Plane blocks read per step: the blocks one level-1 indirect block maps (1 MiB of plane,
8 GiB of volume), so a step costs one pointer block and reads its runs in few calls."""

Rows = npt.NDArray[np.uint64]
"""Plane blocks as rows of `WORDS_PER_PLANE_BLOCK` words."""


def present_rows(tree: BlockTree, first: int, count: int) -> tuple[npt.NDArray[np.intp], Rows]:
    """The plane blocks of [first, first+count) that are stored (not holes) in the plane
    file `tree` (`metafile.tree_of`; it keeps the indirect blocks it loads, 1/256 of the
    file, until dropped): their indexes relative to `first`, and their words as rows (a
    new array, one row per block)."""
    datas = tree.read_blocks(first, count)
    at = [i for i, d in enumerate(datas) if d is not ZERO_BLOCK]
    if not at:
        return np.zeros(0, dtype=np.intp), np.zeros((0, WORDS_PER_PLANE_BLOCK), dtype=WORD)
    rows = np.frombuffer(b"".join(datas[i] for i in at), dtype=WORD)
    return np.array(at, dtype=np.intp), rows.reshape(len(at), WORDS_PER_PLANE_BLOCK)


def _ranges(plane_blocks: int, only: npt.NDArray[np.intp] | None) -> list[tuple[int, int]]:
    """(first, count) steps over a plane's blocks; with `only`, the steps holding any."""
    steps = [(f, min(RANGE_BLOCKS, plane_blocks - f)) for f in range(0, plane_blocks,
                                                                      RANGE_BLOCKS)]
    if only is None:
        return steps
    wanted = set((only // RANGE_BLOCKS).tolist())
    return [s for s in steps if s[0] // RANGE_BLOCKS in wanted]


def or_into(acc: Plane, io: BlockIO, root: TreeRoot,
            only: npt.NDArray[np.intp] | None = None) -> None:
    """OR the plane file at `root` into `acc` (in the steps holding plane blocks `only`,
    when given). `acc`'s dirty marks are left alone: it is a scratch plane."""
    rows = acc.words.reshape(-1, WORDS_PER_PLANE_BLOCK)
    tree = tree_of(io, root)
    last = acc.plane_blocks - 1
    for first, count in _ranges(acc.plane_blocks, only):
        at, words = present_rows(tree, first, count)
        if at.size:
            rows[first + at] |= words
            if first + int(at[-1]) == last:  # bits past the volume's end stay clear
                acc.load_block(last, rows[last].tobytes())


def union_of(io: BlockIO, roots: list[TreeRoot], nblocks: int) -> Plane:
    """The union of the plane files at `roots`, read one range at a time."""
    acc = Plane.zeros(nblocks)
    for root in roots:
        or_into(acc, io, root)
    return acc


def overlaps(io: BlockIO, root: TreeRoot, plane: Plane) -> bool:
    """Whether the plane file at `root` shares a block with `plane`."""
    rows = plane.words.reshape(-1, WORDS_PER_PLANE_BLOCK)
    tree = tree_of(io, root)
    for first, count in _ranges(plane.plane_blocks, plane.nonzero_blocks()):
        at, words = present_rows(tree, first, count)
        if at.size and (rows[first + at] & words).any():
            return True
    return False
