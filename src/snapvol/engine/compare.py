"""Whether two images (of two volumes, or of one) hold the same file system, by the
checksum tree.

Every pointer carries the checksum of the block it names, seeded with the block's VBN,
so two trees whose top pointers are equal are equal all the way down (a Merkle tree).
Volumes kept in step by block transfer hold a snapshot at the same VBNs, so when they
match the answer costs one comparison of root pointers, whatever the amount of data.

When they differ the comparison descends only where pointers differ: indirect blocks are
compared as numpy arrays of pointers (one vectorised `!=` per level), then the inode-file
blocks that differ are decoded and compared inode by inode. An inode whose record differs
only in where its blocks are is compared by content (file bytes, directory entries), so
two volumes holding the same files at different VBNs still compare equal, at the cost of
reading what differs.

That compares trees, not media: equal root pointers say the trees *record* the same
digests, not that the disks still hold those bytes. `check_media` (`verify --deep`)
reads every block an image's trees reach and compares its digest with the one its
pointer records, as DRBD's online verify compares the digests of both sides' blocks.
"""

from __future__ import annotations

import contextlib
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from snapvol.engine.blockio import BlockIO
from snapvol.engine.inodefile import InodeFile, Node
from snapvol.engine.reach import TREE_NAMES, DamagedBlock, Reach, image_trees
from snapvol.engine.tree import BlockTree
from snapvol.errors import SnapvolError
from snapvol.layout.checksum import first_bad_block
from snapvol.layout.constants import (
    BLOCK_SIZE,
    INODE_SIZE,
    INODES_PER_BLOCK,
    INOMAP_INO,
    PTR_SHIFT,
    ROOT_INO,
)
from snapvol.layout.inode import Inode
from snapvol.layout.pointer import PTR_DTYPE, decode_node, empty_node
from snapvol.layout.records import TreeRoot

SHOWN = 20  # differences kept with details (the count covers all of them)
CHUNK = 1 << 16  # file blocks compared per step when two trees have different heights
# Record fields that say what a file is; the rest (pointers, height, blocks held) only
# say where its blocks are, which is compared through the content instead.
FIELDS = ("mode", "nlink", "uid", "gid", "size", "generation", "qtree", "flags", "atime_ns",
          "mtime_ns", "ctime_ns", "btime_ns", "rdev", "xattr_ino")


@dataclass(frozen=True, slots=True)
class InodeDiff:
    ino: int
    change: str  # "only in source", "only in destination", "changed"
    what: tuple[str, ...]  # changed fields, "data", "entries"
    path: str | None = None


@dataclass
class Comparison:
    same: bool = True
    inodes_differing: int = 0
    differences: list[InodeDiff] = field(default_factory=list)
    pointers_compared: int = 0
    blocks_read: int = 0
    seconds: float = 0.0


def differing_blocks(a: BlockTree, b: BlockTree, nblocks: int,
                     out: Comparison | None = None) -> Iterator[int]:
    """File block numbers (ascending) whose data pointers differ between two trees of
    `nblocks` blocks, descending only into indirect blocks whose pointers differ."""
    if a.height == b.height and len(a.top) == len(b.top):
        yield from _descend(a, b, a.height, 0, a.top, b.top, out)
        return
    for first in range(0, nblocks, CHUNK):
        count = min(CHUNK, nblocks - first)
        va, ca = a.ptr_range(first, count)
        vb, cb = b.ptr_range(first, count)
        if out is not None:
            out.pointers_compared += count
        yield from (first + np.flatnonzero((va != vb) | (ca != cb))).tolist()


def _descend(a: BlockTree, b: BlockTree, level: int, base: int, pa: np.ndarray,
             pb: np.ndarray, out: Comparison | None) -> Iterator[int]:
    if out is not None:
        out.pointers_compared += len(pa)
    diff = np.flatnonzero((pa["vbn"] != pb["vbn"]) | (pa["csum"] != pb["csum"]))
    if level == 0:
        yield from (base + diff).tolist()
        return
    for j in diff.tolist():
        ca, cb = _child(a, pa[j]), _child(b, pb[j])
        if out is not None:
            out.blocks_read += 2
        yield from _descend(a, b, level - 1, (base + j) << PTR_SHIFT, ca, cb, out)


def _child(tree: BlockTree, ptr: np.void) -> np.ndarray:
    vbn, csum = int(ptr["vbn"]), int(ptr["csum"])
    return empty_node() if vbn == 0 else decode_node(tree.io.read(vbn, csum))


def same_root(a: TreeRoot, b: TreeRoot) -> bool:
    """Equal top pointers (VBN and checksum), height and size: the trees are equal."""
    return a == b


class _Compare:
    def __init__(self, a: InodeFile, b: InodeFile, out: Comparison) -> None:
        self.a, self.b, self.out = a, b, out

    def run(self) -> None:
        a, b = self.a, self.b
        n = max(a.inode_blocks, b.inode_blocks)
        for fbn in differing_blocks(a.itree, b.itree, n, self.out):
            da, db = a.itree.read_block(fbn), b.itree.read_block(fbn)
            self.out.blocks_read += 2
            for i in range(INODES_PER_BLOCK):
                lo = i * INODE_SIZE
                if da[lo : lo + INODE_SIZE] != db[lo : lo + INODE_SIZE]:
                    ino = fbn * INODES_PER_BLOCK + i
                    self._inode(ino, Inode.decode(ino, memoryview(da)[lo : lo + INODE_SIZE]),
                                Inode.decode(ino, memoryview(db)[lo : lo + INODE_SIZE]))

    def _add(self, diff: InodeDiff) -> None:
        self.out.same = False
        self.out.inodes_differing += 1
        if len(self.out.differences) < SHOWN:
            self.out.differences.append(diff)

    def _inode(self, ino: int, ra: Inode, rb: Inode) -> None:
        if ra.allocated != rb.allocated:
            self._add(InodeDiff(ino, "only in source" if ra.allocated else
                                "only in destination", ()))
            return
        if not ra.allocated:
            return
        what = [f for f in FIELDS if getattr(ra, f) != getattr(rb, f)]
        if stat.S_IFMT(ra.mode) == stat.S_IFMT(rb.mode):
            na, nb = self.a.node(ino), self.b.node(ino)
            if ra.is_dir:
                if _entries(self.a, na) != _entries(self.b, nb):
                    what.append("entries")
            elif not self._same_data(na, nb):
                what.append("data")
        if what:
            self._add(InodeDiff(ino, "changed", tuple(what)))

    def _same_data(self, na: Node, nb: Node) -> bool:
        if na.inode.size != nb.inode.size:
            return False
        nblocks = -(-na.inode.size // 4096)
        for fbn in differing_blocks(na.tree, nb.tree, nblocks, self.out):
            if fbn >= nblocks:
                continue
            self.out.blocks_read += 2
            if na.tree.read_block(fbn) != nb.tree.read_block(fbn):
                return False
        return True


def _entries(image: InodeFile, node: Node) -> set[tuple[bytes, int, int]]:
    return {(name, ino, dtype) for name, ino, dtype, _ in image.readdir(node)}


def compare(a: InodeFile, b: InodeFile) -> Comparison:
    """Compare two images; paths of the first differences are filled in afterwards."""
    t0 = time.perf_counter()
    out = Comparison()
    out.pointers_compared = 1
    if not same_root(a.root(), b.root()):
        _Compare(a, b, out).run()
        if out.differences:
            out.differences = _with_paths(out.differences, a, b)
    out.seconds = time.perf_counter() - t0
    return out


def _with_paths(diffs: list[InodeDiff], a: InodeFile, b: InodeFile) -> list[InodeDiff]:
    """Name each differing inode by a path, searching the source's tree (then the
    destination's, for what only it holds) until all are found; only run when the
    images differ, so a match never pays for it."""
    paths: dict[int, str] = {INOMAP_INO: "(inode map)"}
    for image in (a, b):
        want = {d.ino for d in diffs} - set(paths)
        if want:
            paths.update(find_paths(image, want))
    return [InodeDiff(d.ino, d.change, d.what, paths.get(d.ino)) for d in diffs]


def find_paths(image: InodeFile, want: set[int]) -> dict[int, str]:
    """A path for each inode of `want` that a directory of `image` names (a search of
    the tree, stopping once all are found; damaged directories only cost their names)."""
    found: dict[int, str] = {}
    if ROOT_INO in want:
        found[ROOT_INO] = "/"
    queue = [(ROOT_INO, "")]
    seen = {ROOT_INO}
    while queue and len(found) < len(want):
        ino, path = queue.pop()
        try:
            node = image.node(ino)
            entries = list(image.readdir(node))
        except SnapvolError:  # a damaged directory only costs the names below it
            continue
        for name, child, dtype, _ in entries:
            child_path = f"{path}/{name.decode('utf-8', 'backslashreplace')}"
            if child in want and child not in found:
                found[child] = child_path
            if dtype == stat.S_IFDIR >> 12 and child not in seen:
                seen.add(child)
                queue.append((child, child_path))
    return found



@dataclass
class MediaCheck:
    """What `check_media` found on one side: blocks read, and the damaged ones."""

    blocks: int = 0
    damaged: list[tuple[int, str]] = field(default_factory=list)  # (vbn, what failed)
    damaged_count: int = 0
    seconds: float = 0.0

    def add(self, vbn: int, what: str) -> None:
        self.damaged_count += 1
        if len(self.damaged) < SHOWN:
            self.damaged.append((vbn, what))


MEDIA_RUN = 256  # blocks per read when checking media


def check_media(io: BlockIO, nblocks: int, trees: Sequence[TreeRoot]) -> MediaCheck:
    """Read every block the trees of one image reach (a CP root's or a snapshot's four:
    every file's data and indirect blocks, the inode file, the planes, the table) and
    check each against the digest its pointer records. Damage is listed, not raised, and
    the walk goes on past it."""
    t0 = time.perf_counter()
    out = MediaCheck()

    def damaged(err: DamagedBlock) -> None:
        out.add(err.vbn, str(err))

    def visit(vbns: np.ndarray, csums: np.ndarray, level: int) -> None:
        order = np.argsort(vbns, kind="stable")
        vbns, csums = vbns[order], csums[order]
        breaks = (np.flatnonzero(np.diff(vbns.view(np.int64)) != 1) + 1).tolist()
        for lo, hi in zip([0, *breaks], [*breaks, len(vbns)], strict=True):
            for at in range(lo, hi, MEDIA_RUN):
                end = min(hi, at + MEDIA_RUN)
                v0 = int(vbns[at])
                data = memoryview(io.dev.read(v0, end - at))
                want = csums[at:end]
                first = 0
                while (bad := first_bad_block(data[first * BLOCK_SIZE :], v0 + first,
                                              want[first:])) >= 0:
                    vbn = v0 + first + bad
                    out.add(vbn, f"block {vbn} fails its checksum (expected "
                                 f"{int(want[first + bad]):016x})")
                    first += bad + 1
                out.blocks += end - at

    Reach(io, nblocks, on_damage=damaged).walk(image_trees(trees), visit)
    out.seconds = time.perf_counter() - t0
    return out


def users(io: BlockIO, nblocks: int, trees: Sequence[TreeRoot], vbns: Sequence[int],
          limit: int = 4) -> dict[int, list[str]]:
    """What uses each of `vbns` in the image of `trees` (a CP root's or a snapshot's four
    trees): files by path (or "inode N" when no directory names it), metadata files by
    name; up to `limit` each. For error messages: it walks the whole image, going on past
    damage."""
    want = set(vbns)
    found: dict[int, list[str]] = {v: [] for v in want}
    for name, root in zip(TREE_NAMES, trees, strict=False):
        for v in _hits(io, nblocks, root.ptr.vbn, root.ptr.csum, root.height, want):
            found[v].append(name)
    image = InodeFile(io, trees[0])
    by_ino: dict[int, set[int]] = {}
    for ino, rec in _inodes(image):
        for v in _hits(io, nblocks, 0, 0, rec.height, want, rec.ptrs):
            by_ino.setdefault(v, set()).add(ino)
    all_inos = set().union(*by_ino.values()) if by_ino else set()
    paths = find_paths(image, all_inos) if all_inos else {}
    for v, inos in by_ino.items():
        found[v] += [paths.get(ino, f"inode {ino}") for ino in sorted(inos)]
    return {v: names[:limit] for v, names in found.items()}


def _hits(io: BlockIO, nblocks: int, vbn: int, csum: int, height: int, want: set[int],
          top: np.ndarray | None = None) -> set[int]:
    """The blocks of `want` in one tree (a single top pointer, or `top`'s pointers)."""
    if top is None:
        top = np.array([(vbn, csum)], dtype=PTR_DTYPE)
    got: set[int] = set()

    def visit(level: int, idx: int, vbn: int, csum: int) -> None:
        if vbn in want:
            got.add(vbn)

    with contextlib.suppress(SnapvolError):
        BlockTree(io, top, height).walk(visit)
    return got


def _inodes(image: InodeFile) -> Iterator[tuple[int, Inode]]:
    """Every allocated inode of `image` that can be read."""
    for blk in range(image.inode_blocks):
        try:
            data = memoryview(image.itree.read_block(blk))
        except SnapvolError:
            continue
        for i in range(INODES_PER_BLOCK):
            ino = blk * INODES_PER_BLOCK + i
            try:
                rec = Inode.decode(ino, data[i * INODE_SIZE : (i + 1) * INODE_SIZE])
            except (SnapvolError, ValueError):
                continue
            if rec.allocated:
                yield ino, rec
