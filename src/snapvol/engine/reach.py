"""The blocks an image's trees reach, with the checksum each pointer to them carries.

A transfer chooses its blocks from planes, which say which blocks but not what they hold,
so before it can check a block (DESIGN.md §3.3: every read is verified) it needs the
pointer that leads to it. `Reach.walk` finds them: it walks a set of trees level by level,
all at once, with each level's pointers as numpy arrays, and hands every pointer it meets
to the caller in batches. Only blocks inside the plane `within` are entered (a selection
of blocks to send or received): a subtree whose top lies outside it is, for a transfer,
held whole by a snapshot the other side holds too (a block is immutable while a snapshot
holds it, so its subtree is the one that snapshot holds), and it is reported once as
`outside`, not walked.

What the walk reads (indirect blocks, inode-file blocks) goes through `BlockIO.read` and
is verified against its pointer. Levels only go down, and each block is entered once
(`entered`), so a crafted tree with shared or cyclic pointers costs at most one read per
block inside `within`. Work is done in bounded chunks, lowest level first, so memory stays
at a few chunks of pointers whatever the size of the trees.

`Ranks` numbers the members of a plane (the k-th selected block), so a transfer keeps one
checksum per selected block in an array, not a dictionary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from snapvol.engine.blockio import BlockIO
from snapvol.errors import CorruptionError, SnapvolError
from snapvol.layout.constants import FIRST_DATA_VBN, INODE_SIZE, INODES_PER_BLOCK, MAX_HEIGHT
from snapvol.layout.pointer import PTR_DTYPE
from snapvol.layout.records import TreeRoot
from snapvol.planes import Plane

U64 = npt.NDArray[np.uint64]

CHUNK = 4096
"""Pointers entered per step (a step reads up to this many blocks, 16 MiB)."""
VISIT_CHUNK = 1 << 20
"""Pointers handed to a visitor at once."""
RUN = 256
"""Blocks read per call when entered blocks are contiguous."""

INODE_VIEW = np.dtype({"names": ["mode", "height", "ptrs"],
                       "formats": ["<u4", "u1", (PTR_DTYPE, 8)],
                       "offsets": [0, 96, 128], "itemsize": INODE_SIZE})
"""The fields of an inode record (docs/FORMAT.md) that say where its tree is."""

Visit = Callable[[U64, U64, int], None]
"""Told (vbns, checksums, level) of pointers met; level 0 is a data block."""

TREE_NAMES = ("the inode file", "the active plane", "the summary plane",
              "the snapshot table")


class DamagedBlock(CorruptionError):
    """A block a walk needed fails its checksum, or a pointer leads outside the volume;
    `vbn` names the block and `why` says what is wrong with it, after "block VBN"."""

    def __init__(self, vbn: int, why: str) -> None:
        super().__init__(f"block {vbn} {why}")
        self.vbn = vbn
        self.why = why


@dataclass(frozen=True, slots=True)
class Tree:
    """A tree to walk: its root, and whether its data blocks are an inode file (whose
    inodes' trees are walked too)."""

    root: TreeRoot
    inode_file: bool = False


def image_trees(trees: Sequence[TreeRoot]) -> list[Tree]:
    """The four trees of a CP root or a snapshot entry (inode file, active plane, summary
    plane, snapshot table), as `Reach.walk` takes them."""
    return [Tree(t, i == 0) for i, t in enumerate(trees)]


class Reach:
    """Walks trees inside `within` (None: everywhere) on the blocks of `io`."""

    def __init__(self, io: BlockIO, nblocks: int, within: Plane | None = None,
                 on_damage: Callable[[DamagedBlock], None] | None = None) -> None:
        """`on_damage(error)`, when given, is told of a block that cannot be read
        (or a pointer out of range) and the walk goes on without what lies below it;
        without it the first such problem raises."""
        self.io = io
        self.nblocks = nblocks
        self.within = within
        self.on_damage = on_damage
        self.entered = Plane.zeros(nblocks)  # blocks read and descended, across walks
        self._pending: dict[tuple[int, bool], list[tuple[U64, U64]]] = {}

    def walk(self, trees: Sequence[Tree], visit: Visit, outside: Visit | None = None) -> None:
        """Hand every pointer inside `within` that `trees` reach to `visit`, and every
        one outside it (not walked further) to `outside`. Blocks entered by an earlier
        walk of this Reach are visited but not entered again."""
        for t in trees:
            ptr = t.root.ptr
            if ptr.vbn:
                self._push(t.root.height, t.inode_file,
                           np.array([ptr.vbn], dtype=np.uint64),
                           np.array([ptr.csum], dtype=np.uint64))
        while self._pending:
            key = min(self._pending)  # lowest level first: bounded memory
            vbns, csums = self._pending[key].pop()
            if not self._pending[key]:
                del self._pending[key]
            level, inode_file = key
            limit = CHUNK if level or inode_file else VISIT_CHUNK
            if len(vbns) > limit:
                self._push(level, inode_file, vbns[limit:], csums[limit:])
                vbns, csums = vbns[:limit], csums[:limit]
            self._step(level, inode_file, vbns, csums, visit, outside)

    def _push(self, level: int, inode_file: bool, vbns: U64, csums: U64) -> None:
        if len(vbns):
            self._pending.setdefault((level, inode_file), []).append((vbns, csums))

    def _damage(self, vbn: int, err: SnapvolError) -> None:
        if not isinstance(err, DamagedBlock):  # BlockIO's: a checksum mismatch
            err = DamagedBlock(vbn, "fails its checksum")
        if self.on_damage is None:
            raise err
        self.on_damage(err)

    def _step(self, level: int, inode_file: bool, vbns: U64, csums: U64, visit: Visit,
              outside: Visit | None) -> None:
        bad = (vbns < FIRST_DATA_VBN) | (vbns >= self.nblocks)
        if bad.any():
            out = int(vbns[bad][0])
            self._damage(out, DamagedBlock(out, "is outside the volume's data area (a "
                                                "block pointer leads there)"))
            vbns, csums = vbns[~bad], csums[~bad]
        if self.within is not None:
            inside = self.within.test_many(vbns)
            if outside is not None and not inside.all():
                outside(vbns[~inside], csums[~inside], level)
            vbns, csums = vbns[inside], csums[inside]
        if not len(vbns):
            return
        visit(vbns, csums, level)
        if level == 0 and not inode_file:
            return
        vbns, once = np.unique(vbns, return_index=True)
        csums = csums[once]
        fresh = ~self.entered.test_many(vbns)
        vbns, csums = vbns[fresh], csums[fresh]
        if not len(vbns):
            return
        self.entered.set_many(vbns)
        read = self._read(vbns, csums)
        if not read:
            return
        data = np.frombuffer(b"".join(block for _, block in read), dtype=np.uint8)
        if level:
            ptrs = data.view(PTR_DTYPE)
            live = ptrs["vbn"] != 0
            self._push(level - 1, inode_file, ptrs["vbn"][live], ptrs["csum"][live])
            return
        inodes = data.view(INODE_VIEW)
        allocated = inodes["mode"] != 0
        tall = allocated & (inodes["height"] > MAX_HEIGHT)
        if tall.any():
            at = int(np.flatnonzero(tall)[0])
            where = read[at // INODES_PER_BLOCK][0]
            self._damage(where, DamagedBlock(where, "of the inode file holds an inode "
                                                    f"{int(inodes['height'][at])} levels high "
                                                    f"(at most {MAX_HEIGHT})"))
            allocated &= ~tall
        inodes = inodes[allocated]
        for height in np.unique(inodes["height"]).tolist():
            ptrs = inodes["ptrs"][inodes["height"] == height].reshape(-1)
            live = ptrs["vbn"] != 0
            self._push(int(height), False, ptrs["vbn"][live], ptrs["csum"][live])

    def _read(self, vbns: U64, csums: U64) -> list[tuple[int, bytes]]:
        """(vbn, data) of the blocks `vbns` (ascending), each verified against its
        checksum, read as contiguous runs; with `on_damage`, a block that fails is
        reported and left out."""
        out: list[tuple[int, bytes]] = []
        breaks = (np.flatnonzero(np.diff(vbns.view(np.int64)) != 1) + 1).tolist()
        vlist, clist = vbns.tolist(), csums.tolist()
        for lo, hi in zip([0, *breaks], [*breaks, len(vlist)], strict=True):
            for at in range(lo, hi, RUN):
                end = min(hi, at + RUN)
                try:
                    out += zip(vlist[at:end], self.io.read_run(vlist[at], clist[at:end]),
                               strict=True)
                    continue
                except SnapvolError:
                    pass  # find the block at fault, one by one
                for v, c in zip(vlist[at:end], clist[at:end], strict=True):
                    try:
                        out.append((v, self.io.read(v, c)))
                    except SnapvolError as err:
                        self._damage(v, err)
        return out


class Ranks:
    """The rank of a VBN among the members of a plane (how many members lie below it),
    from a prefix count per 64-bit word: an index into arrays of one entry per member."""

    def __init__(self, plane: Plane) -> None:
        self.words = plane.words
        counts = np.bitwise_count(self.words).astype(np.int64)
        self.before = np.cumsum(counts) - counts
        self.total = int(counts.sum())

    def of(self, vbns: U64) -> npt.NDArray[np.int64]:
        word = (vbns >> np.uint64(6)).astype(np.intp)
        low = self.words[word] & ((np.uint64(1) << (vbns & np.uint64(63))) - np.uint64(1))
        ranks: npt.NDArray[np.int64] = self.before[word] + np.bitwise_count(low)
        return ranks

    def one(self, vbn: int) -> int:
        return int(self.of(np.array([vbn], dtype=np.uint64))[0])
