"""Block trees: the pointers of one file, of uniform height (WAFL style).

A tree has K top pointers (8 in an inode, 1 in a root-record TreeRoot) and a height h:
with h = 0 the top pointers address data blocks directly; otherwise each addresses an
indirect block of level h, and a level-L block holds 256 pointers to level L-1 blocks
(level 0 is data). Node (L, i) covers file blocks [i * 256**L, (i + 1) * 256**L).

Changes collect in memory (dirty data blocks, dirty indirect blocks). A consistency point
calls `prepare` (give every changed block and its ancestors a new VBN, free the old ones)
and then `encode` (checksum bottom-up, write the new pointers, hand blocks to the batch).
The two are split because the active-plane file must reach a fixed point between them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import numpy as np

from snapvol.engine.blockio import BlockIO, WriteBatch
from snapvol.errors import FsError
from snapvol.layout.checksum import block_checksum, checksums_of
from snapvol.layout.constants import BLOCK_SIZE, MAX_HEIGHT, PTR_SHIFT, PTRS_PER_BLOCK
from snapvol.layout.pointer import PTR_DTYPE, decode_node, empty_node

ZERO_BLOCK = bytes(BLOCK_SIZE)
SMALL_READ = 4  # reads of this many blocks or fewer go block by block
PREFETCH_MIN_READ = 32  # reads this long (128 KiB, the kernel's read-ahead) load ...
PREFETCH_NODES = 256  # ... up to this many level-1 blocks at once (256 MiB of data): each
# load is a seek away from the data (a CP places them after its data run), ~4 ms on a
# busy disk, and it breaks the kernel's read-ahead of the data stream
BATCH_RUN_MIN = 64  # a tree's data blocks go to the CP batch as one run from this many
_MASK = PTRS_PER_BLOCK - 1

NodeKey = tuple[int, int]
DirtyBlock = bytes | memoryview
"""A dirty data block: its own bytes, or a read-only view of a whole-block slice of a
large write's (immutable) bytes, which saves a copy per block (`InodeFile.write`)."""


class BlockSpace(Protocol):
    """What a tree needs from the allocator during a CP."""

    def alloc(self, n: int) -> np.ndarray: ...

    def free_many(self, vbns: np.ndarray) -> None: ...


class BlockTree:
    def __init__(self, io: BlockIO, top: np.ndarray, height: int,
                 space: BlockSpace | None = None) -> None:
        self.io = io
        self.space = space  # None for a read-only tree (a snapshot, a committed image)
        self.top = top  # K pointers; for an inode this is inode.ptrs itself
        self.height = height
        self.nodes: dict[NodeKey, np.ndarray] = {}
        self.dirty_nodes: set[NodeKey] = set()
        self.dirty_data: dict[int, DirtyBlock] = {}
        # The blocks `prepare` gave a new VBN this CP, by node (0, fbn for data): `encode`
        # writes them; a second `prepare` in the same CP leaves them where they are.
        self.placed: dict[NodeKey, int] = {}
        # The data blocks of `placed`, as prepare placed them: (fbns, vbns) array pairs.
        self._placed_data: list[tuple[np.ndarray, np.ndarray]] = []
        self.delta_blocks = 0  # change in blocks held, since the owner last looked

    # ---- geometry -------------------------------------------------------------------
    @property
    def fanout_top(self) -> int:
        return len(self.top)

    def capacity(self, height: int | None = None) -> int:
        h = self.height if height is None else height
        return self.fanout_top << (PTR_SHIFT * h)

    @property
    def dirty(self) -> bool:
        return bool(self.dirty_data or self.dirty_nodes)

    # ---- reading ----------------------------------------------------------------------
    def _ptr_of(self, level: int, idx: int) -> tuple[int, int]:
        if level == self.height:
            if idx >= len(self.top):
                return 0, 0
            vbn, csum = self.top.item(idx)
        else:
            vbn, csum = self.node(level + 1, idx >> PTR_SHIFT).item(idx & _MASK)
        return vbn, csum

    def node(self, level: int, idx: int) -> np.ndarray:
        key = (level, idx)
        n = self.nodes.get(key)
        if n is None:
            vbn, csum = self._ptr_of(level, idx)
            n = empty_node() if vbn == 0 else decode_node(self.io.read(vbn, csum))
            self.nodes[key] = n
        return n

    def data_ptr(self, fbn: int) -> tuple[int, int]:
        if fbn >= len(self.top) << (PTR_SHIFT * self.height):
            return 0, 0
        return self._ptr_of(0, fbn)

    def read_block(self, fbn: int) -> bytes:
        d = self.dirty_data.get(fbn)
        if d is not None:
            return d if type(d) is bytes else bytes(d)
        vbn, csum = self.data_ptr(fbn)
        return ZERO_BLOCK if vbn == 0 else self.io.read(vbn, csum)

    def ptr_range(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(vbns, csums) of data blocks [first, first+count) as arrays, one level-1 block
        at a time rather than one pointer walk per block."""
        vbns = np.zeros(count, dtype=np.uint64)
        csums = np.zeros(count, dtype=np.uint64)
        end = min(first + count, self.capacity())
        if first >= end:
            return vbns, csums
        if self.height == 0:
            vbns[: end - first] = self.top["vbn"][first:end]
            csums[: end - first] = self.top["csum"][first:end]
            return vbns, csums
        pos = first
        while pos < end:
            idx = pos >> PTR_SHIFT
            stop = min(end, (idx + 1) << PTR_SHIFT)
            if count >= PREFETCH_MIN_READ and (1, idx) not in self.nodes:
                self._prefetch_level1(idx)
            node = self.node(1, idx)
            lo, hi = pos & _MASK, ((stop - 1) & _MASK) + 1
            vbns[pos - first : stop - first] = node["vbn"][lo:hi]
            csums[pos - first : stop - first] = node["csum"][lo:hi]
            pos = stop
        return vbns, csums

    def _prefetch_level1(self, idx: int) -> None:
        """Load level-1 blocks idx, idx+1, ... (up to PREFETCH_NODES under one parent) in
        as few reads as their on-disk runs allow. A CP places a file's level-1 blocks
        together, so a long sequential read otherwise pays one random read per MiB of data
        for its pointers (measured: 2 s of a 3.7 s cold read of 1 GiB)."""
        if self.height < 2:
            return
        parent = self.node(2, idx >> PTR_SHIFT)
        lo = idx & _MASK
        hi = min(PTRS_PER_BLOCK, lo + PREFETCH_NODES)
        wanted = sorted((int(v), int(c), idx + i)
                        for i, (v, c) in enumerate(parent[lo:hi].tolist())
                        if v and (1, idx + i) not in self.nodes)
        start = 0
        while start < len(wanted):
            stop = start + 1
            while stop < len(wanted) and wanted[stop][0] == wanted[stop - 1][0] + 1:
                stop += 1
            run = wanted[start:stop]
            blocks = self.io.read_run(run[0][0], [c for _, c, _ in run])
            for (_, _, j), data in zip(run, blocks, strict=True):
                self.nodes[(1, j)] = decode_node(data)
            start = stop

    def read_blocks(self, first: int, count: int) -> list[bytes]:
        """Blocks [first, first+count), reading contiguous on-disk runs in one call."""
        if count <= SMALL_READ:  # small files: plain lookups beat array set-up
            return [self.read_block(f) for f in range(first, first + count)]
        vbns, csums = self.ptr_range(first, count)
        out: list[bytes] = [ZERO_BLOCK] * count
        dirty = self.dirty_data
        if dirty:
            for i in range(count):
                d = dirty.get(first + i)
                if d is not None:
                    out[i] = d if type(d) is bytes else bytes(d)
                    vbns[i] = 0
        for at, vbn, run in _runs(vbns, csums):
            out[at : at + len(run)] = self.io.read_run(vbn, run.tolist())
        return out

    def read_range(self, first: int, count: int) -> bytes:
        """Blocks [first, first+count) as one bytes object. A range that is one on-disk
        run (a sequentially written file, read in order) is the buffer the device read,
        verified block by block in place; anything else is assembled in one buffer."""
        if count <= SMALL_READ:
            if count == 1:
                return self.read_block(first)
            return b"".join([self.read_block(f) for f in range(first, first + count)])
        lo = first & _MASK
        if self.height and lo + count <= PTRS_PER_BLOCK and not self.dirty_data:
            # The sequential reader's request (the kernel's 128 KiB, aligned): its pointers
            # are one slice of a loaded level-1 block. Checked as plain lists, which for a
            # few dozen pointers costs a fraction of the general path's array set-up.
            node = self.nodes.get((1, first >> PTR_SHIFT))
            if node is not None:
                seg = node[lo : lo + count]
                vbns_l: list[int] = seg["vbn"].tolist()
                v0 = vbns_l[0]
                if v0 and vbns_l[-1] - v0 == count - 1 and vbns_l == list(
                        range(v0, v0 + count)):
                    return self.io.read_span(v0, seg["csum"])
        vbns, csums = self.ptr_range(first, count)
        dirty = self.dirty_data
        overlay: list[tuple[int, DirtyBlock]] = []
        if dirty:
            for i in range(count):
                d = dirty.get(first + i)
                if d is not None:
                    overlay.append((i, d))
                    vbns[i] = 0
        if not overlay:
            v0 = int(vbns[0])
            if v0 and int(vbns[-1]) - v0 == count - 1 and bool(
                    (np.diff(vbns.view(np.int64)) == 1).all()):
                return self.io.read_span(v0, csums)
        out = bytearray(count * BLOCK_SIZE)  # holes stay zero
        for at, vbn, run in _runs(vbns, csums):
            out[at * BLOCK_SIZE : (at + len(run)) * BLOCK_SIZE] = self.io.read_span(vbn, run)
        for i, d in overlay:
            out[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] = d
        return bytes(out)

    # ---- changing -----------------------------------------------------------------
    def _grow_to(self, fbn: int) -> None:
        while fbn >= self.capacity():
            if self.height >= MAX_HEIGHT:
                raise FsError(27, "file too large: past the largest size a tree can address")
            h = self.height + 1
            node = empty_node()
            node[: self.fanout_top] = self.top
            self.top[:] = np.zeros(self.fanout_top, dtype=PTR_DTYPE)
            self.nodes[(h, 0)] = node
            self.dirty_nodes.add((h, 0))
            self.height = h

    def ensure_capacity(self, fbn: int) -> None:
        """Grow the tree so block `fbn` is addressable (callers then fill dirty_data)."""
        if fbn >= self.capacity():
            self._grow_to(fbn)

    def write_block(self, fbn: int, data: bytes) -> None:
        if len(data) != BLOCK_SIZE:
            raise ValueError("write_block takes whole blocks")
        self._grow_to(fbn)
        self.dirty_data[fbn] = data

    def punch_block(self, fbn: int) -> None:
        self.dirty_data.pop(fbn, None)
        if fbn >= self.capacity():
            return
        vbn, _ = self._ptr_of(0, fbn)
        if vbn:
            self._set_ptr(0, fbn, 0, 0)
            self._release([vbn])

    def truncate_blocks(self, nblocks: int) -> None:
        """Drop every block at or past `nblocks`, freeing what they held."""
        for fbn in [f for f in self.dirty_data if f >= nblocks]:
            del self.dirty_data[fbn]
        self._pending_free: list[int] = []
        for i in range(self.fanout_top):
            lo = i << (PTR_SHIFT * self.height)
            self._trim(self.height, i, lo, nblocks)
        self._release(self._pending_free)
        for key in [k for k in self.nodes if (k[1] << (PTR_SHIFT * k[0])) >= nblocks]:
            self.nodes.pop(key)
            self.dirty_nodes.discard(key)

    def _trim(self, level: int, idx: int, lo: int, keep: int) -> None:
        span = 1 << (PTR_SHIFT * level)
        if lo + span <= keep:
            return
        vbn, _ = self._ptr_of(level, idx)
        if lo >= keep:
            if vbn == 0 and (level == 0 or (level, idx) not in self.nodes):
                return
            if level > 0:
                self._collect(level, idx)
            elif vbn:
                self._pending_free.append(vbn)
            self._set_ptr(level, idx, 0, 0)
            return
        # partially kept: recurse into the node
        if vbn == 0 and (level, idx) not in self.nodes:
            return
        child_span = span >> PTR_SHIFT
        for j in range(PTRS_PER_BLOCK):
            c_lo = lo + j * child_span
            if c_lo + child_span > keep:
                self._trim(level - 1, (idx << PTR_SHIFT) + j, c_lo, keep)

    def _collect(self, level: int, idx: int) -> None:
        """Queue a whole subtree (node and everything under it) for freeing."""
        vbn, _ = self._ptr_of(level, idx)
        node = self.node(level, idx)
        if vbn:
            self._pending_free.append(vbn)
        children = node["vbn"]
        if level == 1:
            self._pending_free.extend(int(v) for v in children[children != 0])
        else:
            for j in np.flatnonzero(children != 0):
                self._collect(level - 1, (idx << PTR_SHIFT) + int(j))
        self.nodes.pop((level, idx), None)
        self.dirty_nodes.discard((level, idx))

    def _set_ptr(self, level: int, idx: int, vbn: int, csum: int) -> None:
        if level == self.height:
            self.top[idx] = (vbn, csum)
        else:
            parent = (level + 1, idx >> PTR_SHIFT)
            self.node(*parent)[idx & _MASK] = (vbn, csum)
            self.dirty_nodes.add(parent)
            self._dirty_ancestors(parent)

    def _dirty_ancestors(self, key: NodeKey) -> None:
        level, idx = key
        while level < self.height:
            level, idx = level + 1, idx >> PTR_SHIFT
            if (level, idx) in self.dirty_nodes:
                break
            self.node(level, idx)
            self.dirty_nodes.add((level, idx))

    def _release(self, vbns: list[int]) -> None:
        if not vbns:
            return
        if self.space is None:
            raise FsError(30, "read-only: this tree belongs to a snapshot or a read-only volume")
        self.space.free_many(np.array(vbns, dtype=np.uint64))
        self.delta_blocks -= len(vbns)

    # ---- consistency point --------------------------------------------------------------
    def prepare(self, fbns: Iterable[int] | None = None) -> None:
        """Give new VBNs to the changed data blocks `fbns` (default: the dirty ones) and
        to every indirect block above them; free the VBNs they replace."""
        space = self.space
        assert space is not None, "prepare on a read-only tree"
        freed: list[np.ndarray] = []
        want = self.dirty_data.keys() if fbns is None else fbns
        placed = self.placed
        if placed:
            todo = np.array(sorted(f for f in want if (0, f) not in placed), dtype=np.int64)
        else:  # the usual first call: no filter, and a numpy sort (a GiB is 262,144 blocks)
            todo = np.fromiter(want, dtype=np.int64)
            todo.sort()
        if len(todo):
            self._grow_to(int(todo[-1]))
            new = space.alloc(len(todo))
            self.delta_blocks += len(todo)
            if self.height == 0:
                old = self.top["vbn"][todo]
                freed.append(old[old != 0])
            else:
                parents = todo >> PTR_SHIFT
                bounds = np.flatnonzero(np.diff(parents)) + 1
                for group in np.split(np.arange(len(todo)), bounds):
                    p = int(parents[group[0]])
                    node = self.node(1, p)
                    old = node["vbn"][todo[group] & _MASK]
                    freed.append(old[old != 0])
                    key = (1, p)
                    if key not in self.dirty_nodes:
                        self.dirty_nodes.add(key)
                        self._dirty_ancestors(key)
            keys = zip(itertools.repeat(0, len(todo)), todo.tolist(), strict=True)
            placed.update(zip(keys, new.tolist(), strict=True))
            self._placed_data.append((todo, new.astype(np.uint64)))
        nodes = sorted((k for k in self.dirty_nodes if k not in self.placed), reverse=True)
        if nodes:
            new = space.alloc(len(nodes))
            self.delta_blocks += len(nodes)
            olds = []
            for key, v in zip(nodes, new.tolist(), strict=True):
                old_vbn, _ = self._ptr_of(*key)
                if old_vbn:
                    olds.append(old_vbn)
                self.placed[key] = v
            freed.append(np.array(olds, dtype=np.uint64))
        freed = [a for a in freed if len(a)]
        if freed:
            allfree = np.concatenate(freed).astype(np.uint64)
            self.delta_blocks -= len(allfree)
            space.free_many(allfree)

    def encode(self, batch: WriteBatch,
               data_of: Callable[[int], DirtyBlock] | None = None) -> None:
        """Checksum and place every block `prepare` gave a VBN, bottom-up."""
        get = self.dirty_data.__getitem__ if data_of is None else data_of
        if self._placed_data:
            # prepare's (fbns, vbns) arrays: no walk over `placed` and no tuple per block
            if len(self._placed_data) == 1:
                fbns, vbns = self._placed_data[0]  # prepare sorted them
            else:
                fbns = np.concatenate([f for f, _ in self._placed_data])
                vbns = np.concatenate([v for _, v in self._placed_data])
                order = np.argsort(fbns, kind="stable")
                fbns, vbns = fbns[order], vbns[order]
            datas = list(map(get, fbns.tolist()))
            csums = checksums_of(datas, vbns)
            if len(datas) >= BATCH_RUN_MIN:
                batch.add_run(vbns, datas)
            else:  # small files' blocks coalesce with their neighbours' in the batch
                batch.blocks.update(zip(vbns.tolist(), datas, strict=True))
            self._place(0, fbns, vbns, csums)
            self._placed_data.clear()
        for level in range(1, self.height + 1):
            keys = sorted(i for (lvl, i) in self.dirty_nodes if lvl == level)
            if not keys:
                continue
            vbns = np.array([self.placed[(level, i)] for i in keys], dtype=np.uint64)
            csums = np.empty(len(keys), dtype=np.uint64)
            for j, (i, v) in enumerate(zip(keys, vbns.tolist(), strict=True)):
                d = self.nodes[(level, i)].tobytes()
                c = block_checksum(d, v)
                csums[j] = c
                batch.add(v, d)
                self.io.remember_written(v, c, d)
            self._place(level, np.array(keys, dtype=np.int64), vbns, csums)
        self.dirty_nodes.clear()
        self.dirty_data.clear()
        self.placed.clear()
        self._placed_data.clear()

    def _place(self, level: int, idxs: np.ndarray, vbns: np.ndarray, csums: np.ndarray) -> None:
        if level == self.height:
            self.top["vbn"][idxs] = vbns
            self.top["csum"][idxs] = csums
            return
        parents = idxs >> PTR_SHIFT
        bounds = np.flatnonzero(np.diff(parents)) + 1
        for group in np.split(np.arange(len(idxs)), bounds):
            node = self.nodes[(level + 1, int(parents[group[0]]))]
            slots = idxs[group] & _MASK
            node["vbn"][slots] = vbns[group]
            node["csum"][slots] = csums[group]

    def trim_cache(self, keep: int = 4096) -> None:
        """Forget clean decoded indirect blocks when many are loaded (outside a CP)."""
        if len(self.nodes) > keep and not self.dirty_nodes:
            self.nodes.clear()

    def mapped_fbns(self) -> np.ndarray:
        """Sorted file block numbers that hold data (not holes), dirty blocks included,
        found without reading any data block and skipping hole subtrees whole."""
        found: list[np.ndarray] = [np.array(sorted(self.dirty_data), dtype=np.int64)]

        def present(level: int, idx: int, vbn: int) -> bool:
            return vbn != 0 or (level, idx) in self.nodes

        def visit(level: int, idx: int) -> None:
            node = self.node(level, idx)
            base = idx << PTR_SHIFT
            if level == 1:
                found.append(base + np.flatnonzero(node["vbn"] != 0))
                return
            for j in range(PTRS_PER_BLOCK):
                if present(level - 1, base + j, int(node[j]["vbn"])):
                    visit(level - 1, base + j)

        for i in range(self.fanout_top):
            vbn = int(self.top[i]["vbn"])
            if self.height == 0:
                if vbn:
                    found.append(np.array([i], dtype=np.int64))
            elif present(self.height, i, vbn):
                visit(self.height, i)
        return np.unique(np.concatenate(found))

    # ---- walking (fsck, space accounting) -------------------------------------------------
    def walk(self, visit: Callable[[int, int, int, int], None]) -> None:
        """Call visit(level, idx, vbn, csum) for every non-hole pointer of the committed
        tree, parents before children. Reads (and so verifies) every indirect block."""
        for i in range(self.fanout_top):
            vbn, csum = int(self.top[i]["vbn"]), int(self.top[i]["csum"])
            if vbn:
                self._walk(self.height, i, vbn, csum, visit)

    def _walk(self, level: int, idx: int, vbn: int, csum: int,
              visit: Callable[[int, int, int, int], None]) -> None:
        visit(level, idx, vbn, csum)
        if level == 0:
            return
        node = decode_node(self.io.read(vbn, csum))
        for j in np.flatnonzero(node["vbn"] != 0).tolist():
            self._walk(level - 1, (idx << PTR_SHIFT) + j, int(node[j]["vbn"]),
                       int(node[j]["csum"]), visit)


def _runs(vbns: np.ndarray, csums: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
    """(first index, first VBN, checksums) of each run of mapped blocks whose indexes and
    VBNs are both consecutive: what one device read can fetch. Holes (VBN 0) are skipped."""
    present = np.flatnonzero(vbns)
    if len(present) == 0:
        return
    pv = vbns[present].astype(np.int64)
    breaks = np.flatnonzero((np.diff(present) != 1) | (np.diff(pv) != 1)) + 1
    starts = np.concatenate(([0], breaks)).tolist()
    stops = [*breaks.tolist(), len(present)]
    idxs = present.tolist()
    vlist = pv.tolist()
    pc = csums[present]
    for a, b in zip(starts, stops, strict=True):
        yield idxs[a], vlist[a], pc[a:b]
