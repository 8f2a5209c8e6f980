"""One file system image: the inode file and the files, directories and xattrs in it.

The active file system is a writable `InodeFile`; every snapshot is a read-only one on
the inode file saved in its entry. Both read through the same code, so what fsck, `get` and
replication see of a snapshot is what they see of the active file system.
"""

from __future__ import annotations

import stat
from typing import TYPE_CHECKING

import numpy as np

from snapvol.engine.blockio import BlockIO, WriteBatch
from snapvol.engine.directory import Directory
from snapvol.engine.metafile import root_of, tree_of
from snapvol.engine.tree import ZERO_BLOCK, BlockSpace, BlockTree
from snapvol.errors import FsError, fs_error
from snapvol.layout.constants import (
    BLOCK_SIZE,
    FIRST_USER_INO,
    INODE_DIRECT,
    INODE_SIZE,
    INODES_PER_BLOCK,
    INOMAP_INO,
    MAX_FILE_SIZE,
    ROOT_INO,
)
from snapvol.layout.inode import Inode
from snapvol.layout.records import TreeRoot
from snapvol.layout.xattrs import XATTR_NAME_MAX as XATTR_NAME_MAX
from snapvol.layout.xattrs import XATTR_SIZE_MAX as XATTR_SIZE_MAX
from snapvol.layout.xattrs import decode_xattrs, encode_xattrs

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

ENOENT, ENOSPC, EROFS, E2BIG, ENODATA, EFBIG = 2, 28, 30, 7, 61, 27
INODE_FLAG_XATTR = 1  # the inode holds another inode's xattrs, not user data
INODE_FLAG_SYSTEM = 2  # a fixed metadata inode (the inode map)
NODE_CACHE_SIZE = 65536  # loaded inodes kept after a CP
IBLOCK_CACHE_SIZE = 8192  # inode-file blocks (131,072 inodes) found without a pointer walk
VIEW_MIN_BLOCKS = 16  # writes of this many whole blocks keep views of the caller's bytes


class Node:
    """A loaded inode, with its block tree and (for directories) its Directory.

    The tree is made on first use: looking a file up or reading a small one needs only
    the inode, and a node that never builds a tree costs two objects, not seven (which
    matters to the garbage collector when a million inodes pass through the cache).
    """

    __slots__ = ("_space", "_tree", "dir", "inode", "io", "opened")

    def __init__(self, inode: Inode, io: BlockIO, space: BlockSpace | None,
                 tree: BlockTree | None = None) -> None:
        self.inode = inode
        self.io = io
        self._space = space
        self._tree = tree
        self.dir: Directory | None = None
        self.opened = 0  # open handles (unlinked files live on until the last close)

    @property
    def tree(self) -> BlockTree:
        t = self._tree
        if t is None:
            i = self.inode
            t = self._tree = BlockTree(self.io, i.ptrs, i.height, self._space)
        return t

    @tree.setter
    def tree(self, tree: BlockTree) -> None:
        self._tree = tree

    @property
    def has_tree(self) -> bool:
        """Whether the tree was built (a node without one has no unwritten blocks)."""
        return self._tree is not None


class _DirStore:
    """The BlockStore a Directory sees: its inode's block tree."""

    def __init__(self, image: InodeFile, node: Node) -> None:
        self.image, self.node = image, node

    def read_block(self, fbn: int) -> bytes:
        return self.node.tree.read_block(fbn)

    def write_block(self, fbn: int, data: bytes) -> None:
        # The Directory writes lazily (at flush, or when its node cache evicts), for
        # changes whose space was reserved when they were made; reserving again here
        # could start a CP in the middle of the Directory's own bookkeeping.
        self.image._write_block(self.node, fbn, data, reserve=False)

    def punch_block(self, fbn: int) -> None:
        self.image._touch(self.node)
        self.node.tree.punch_block(fbn)

    @property
    def nblocks(self) -> int:
        return (self.node.inode.size + BLOCK_SIZE - 1) // BLOCK_SIZE

    def set_nblocks(self, n: int) -> None:
        node = self.node
        if n * BLOCK_SIZE < node.inode.size:
            node.tree.truncate_blocks(n)
        node.inode.size = n * BLOCK_SIZE
        self.image._touch(node)


def dtype_of(mode: int) -> int:
    return stat.S_IFMT(mode) >> 12


class InodeFile:
    """Inodes, file data, directories and xattrs of one inode file."""

    def __init__(
        self,
        io: BlockIO,
        inode_file: TreeRoot,
        space: BlockSpace | None = None,
        reserve_space: Callable[[int, bool], None] | None = None,
    ) -> None:
        self.io = io
        self.space = space
        # Asked for (blocks, metadata?) before a change makes blocks dirty: ENOSPC when
        # the volume cannot place them at the next CP (Volume._reserve_space).
        self.reserve_space = reserve_space
        self.itree = tree_of(io, inode_file, space)
        self.inode_blocks = inode_file.nblocks
        self.nodes: dict[int, Node] = {}
        self.dirty_records: set[int] = set()
        self.dirty_trees: set[int] = set()
        self.dirty_data_blocks = 0
        # Bytes of write buffers that dirty blocks are views of (see `write`): memory a
        # CP releases, counted whole even once some of their blocks were overwritten.
        self.held_bytes = 0
        self._inomap: np.ndarray | None = None
        self._inomap_dirty: set[int] = set()
        self._ino_hint = FIRST_USER_INO
        self._freed_records: dict[int, Inode] = {}
        # Inode-file blocks by block number, as of the last CP (a flush clears it): saves
        # the pointer walk on every inode load. The bytes are the block cache's own.
        self._iblocks: dict[int, bytes] = {}

    @property
    def writable(self) -> bool:
        return self.space is not None

    @property
    def dirty(self) -> bool:
        return bool(self.dirty_records or self.dirty_trees or self._inomap_dirty) or any(
            n.dir is not None and n.dir.dirty for n in self.nodes.values())

    def root(self) -> TreeRoot:
        return root_of(self.itree, self.inode_blocks)

    def _require_writable(self) -> None:
        if self.space is None:
            raise FsError(EROFS, "read-only file system: snapshots cannot be changed")

    # ---- inodes -----------------------------------------------------------------------
    def _record(self, ino: int) -> Inode:
        freed = self._freed_records.get(ino)
        if freed is not None:
            return freed.copy()
        blk = ino // INODES_PER_BLOCK
        data = self._iblocks.get(blk)
        if data is None:
            if blk >= self.inode_blocks:
                return Inode(ino)
            data = self.itree.read_block(blk)
            if len(self._iblocks) >= IBLOCK_CACHE_SIZE:
                self._iblocks.clear()
            self._iblocks[blk] = data
        off = (ino % INODES_PER_BLOCK) * INODE_SIZE
        return Inode.decode(ino, memoryview(data)[off : off + INODE_SIZE])

    def node(self, ino: int) -> Node:
        """The loaded inode `ino`; ENOENT if it is not allocated."""
        n = self.nodes.get(ino)
        if n is None:
            if ino <= 0:
                raise fs_error(ENOENT, f"inode {ino}")
            inode = self._record(ino)
            if not inode.allocated:
                raise fs_error(ENOENT, f"inode {ino}")
            n = Node(inode, self.io, self.space)
            self.nodes[ino] = n
        return n

    def exists(self, ino: int) -> bool:
        try:
            self.node(ino)
        except FsError:
            return False
        return True

    def _touch(self, node: Node) -> None:
        self.dirty_records.add(node.inode.ino)
        self.dirty_trees.add(node.inode.ino)

    def mark_dirty(self, node: Node) -> None:
        """The inode's attributes changed (times, mode, owner, size)."""
        self._require_writable()
        self.dirty_records.add(node.inode.ino)

    def _load_inomap(self) -> np.ndarray:
        if self._inomap is None:
            node = self.node(INOMAP_INO)
            nbytes = node.inode.size
            raw = b"".join(node.tree.read_blocks(0, (nbytes + BLOCK_SIZE - 1) // BLOCK_SIZE))
            self._inomap = np.frombuffer(raw[:nbytes], dtype=np.uint8).copy()
        return self._inomap

    def alloc_inode(self, mode: int, uid: int, gid: int, now_ns: int, qtree: int = 0) -> Node:
        self._require_writable()
        if self.reserve_space is not None:
            self.reserve_space(2, False)
        bits = self._load_inomap()
        ino = self._find_free_ino(bits)
        byte = ino >> 3
        if byte >= len(bits):
            grown = np.zeros(max(BLOCK_SIZE, 2 * len(bits)), dtype=np.uint8)
            grown[: len(bits)] = bits
            self._inomap = bits = grown
            # the new tail blocks must be written even if they stay mostly zero
            self._inomap_dirty.update(range(len(bits) // BLOCK_SIZE))
        bits[byte] |= 1 << (ino & 7)
        self._inomap_dirty.add(byte // BLOCK_SIZE)
        self._ino_hint = ino + 1
        old = self._record(ino)
        self.nodes.pop(ino, None)
        inode = Inode(ino, mode=mode, nlink=0, uid=uid, gid=gid, generation=old.generation + 1,
                      qtree=qtree, atime_ns=now_ns, mtime_ns=now_ns, ctime_ns=now_ns,
                      btime_ns=now_ns)
        node = Node(inode, self.io, self.space)
        self.nodes[ino] = node
        self.dirty_records.add(ino)
        return node

    def create_reserved(self, ino: int, mode: int, now_ns: int) -> Node:
        """Make one of the fixed inodes (the inode map, the root directory) at format time."""
        inode = Inode(ino, mode=mode, nlink=1, generation=1, atime_ns=now_ns, mtime_ns=now_ns,
                      ctime_ns=now_ns, btime_ns=now_ns)
        node = Node(inode, self.io, self.space)
        self.nodes[ino] = node
        self.dirty_records.add(ino)
        bits = self._inomap if self._inomap is not None else np.zeros(BLOCK_SIZE, np.uint8)
        bits[ino >> 3] |= 1 << (ino & 7)
        self._inomap = bits
        self._inomap_dirty.add(0)
        return node

    def _find_free_ino(self, bits: np.ndarray) -> int:
        hint = self._ino_hint
        if hint >> 3 < len(bits):
            # Usually the hint's own byte has room: skip scanning the rest of the map.
            byte = int(bits[hint >> 3]) | ((1 << (hint & 7)) - 1)
            if byte != 0xFF:
                return (hint & ~7) + (~byte & (byte + 1)).bit_length() - 1
        for start in (self._ino_hint, FIRST_USER_INO):
            b0 = start >> 3
            view = bits[b0:]
            full = np.flatnonzero(view != 0xFF)
            for b in full[:2].tolist():
                byte = int(view[b])
                for bit in range(8):
                    ino = ((b0 + int(b)) << 3) + bit
                    if ino >= start and not byte & (1 << bit):
                        return ino
        return max(len(bits) * 8, FIRST_USER_INO)

    def free_inode(self, node: Node) -> None:
        """Release an inode whose last link and last handle are gone."""
        self._require_writable()
        inode = node.inode
        if inode.xattr_ino:
            self.free_inode(self.node(inode.xattr_ino))
        node.tree.truncate_blocks(0)
        node.dir = None
        gen = inode.generation
        node.inode = Inode(inode.ino, generation=gen)
        node.tree = BlockTree(self.io, node.inode.ptrs, 0, self.space)
        bits = self._load_inomap()
        bits[inode.ino >> 3] &= ~(1 << (inode.ino & 7)) & 0xFF
        self._inomap_dirty.add((inode.ino >> 3) // BLOCK_SIZE)
        self._ino_hint = min(self._ino_hint, inode.ino)
        self.dirty_records.add(inode.ino)
        self.dirty_trees.discard(inode.ino)
        self.nodes.pop(inode.ino, None)
        self._freed_records[inode.ino] = node.inode

    # ---- file data --------------------------------------------------------------------
    def _write_block(self, node: Node, fbn: int, data: bytes, meta: bool = False,
                     reserve: bool = True) -> None:
        tree = node.tree
        if fbn not in tree.dirty_data:
            if reserve and self.reserve_space is not None:
                self.reserve_space(1, meta)
            self.dirty_data_blocks += 1
        tree.write_block(fbn, data)
        self._touch(node)

    def read(self, node: Node, offset: int, size: int) -> bytes:
        inode = node.inode
        end = min(inode.size, offset + size)
        if offset >= end:
            return b""
        first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        lo = offset - first * BLOCK_SIZE
        if first == last:
            if not node.has_tree and inode.height == 0 and first < INODE_DIRECT:
                # Small files, the commonest read: the pointer is in the inode, and a
                # node without a tree has nothing unwritten.
                vbn, csum = inode.ptr(first)
                block = ZERO_BLOCK if vbn == 0 else self.io.read(vbn, csum)
            else:
                block = node.tree.read_block(first)
            return block[lo : lo + end - offset]
        data = node.tree.read_range(first, last - first + 1)
        return data[lo : lo + end - offset]

    def write(self, node: Node, offset: int, data: bytes | memoryview) -> int:
        """Write all of `data` or nothing: the space for every block it makes dirty is
        reserved up front, so a refused write (ENOSPC) changes nothing."""
        self._require_writable()
        n = len(data)
        if n == 0:
            return 0
        if offset + n > MAX_FILE_SIZE:
            raise FsError(EFBIG, f"write past the largest file size ({MAX_FILE_SIZE} bytes)")
        tree = node.tree
        first, within = divmod(offset, BLOCK_SIZE)
        last = (offset + n - 1) // BLOCK_SIZE
        dirty = tree.dirty_data
        new = last - first + 1
        if dirty:
            new -= sum(map(dirty.__contains__, range(first, last + 1)))
        if new and self.reserve_space is not None:
            self.reserve_space(new, False)  # may commit a CP first; nothing is placed yet
        tree.ensure_capacity(last)
        self.dirty_data_blocks += new
        self._touch(node)
        size = node.inode.size
        mv = memoryview(data)
        pos, fbn = 0, first
        if within:
            take = min(BLOCK_SIZE - within, n)
            old = tree.read_block(fbn) if fbn * BLOCK_SIZE < size else ZERO_BLOCK
            dirty[fbn] = old[:within] + bytes(mv[:take]) + old[within + take :]
            pos, fbn = take, fbn + 1
        whole = (n - pos) // BLOCK_SIZE
        if whole:
            # One bytes object per block (the dirty blocks' type), made in a C-level loop:
            # a 1 MiB write is 256 of them.
            cuts = map(slice, range(pos, pos + whole * BLOCK_SIZE, BLOCK_SIZE),
                       range(pos + BLOCK_SIZE, pos + (whole + 1) * BLOCK_SIZE, BLOCK_SIZE))
            blocks: Iterator[bytes | memoryview]
            if type(data) is bytes and whole >= VIEW_MIN_BLOCKS:
                # A large write of immutable bytes (a FUSE request is one): its blocks
                # stay views of it, with no copy; the buffer lives until the CP, and
                # `held_bytes` counts it whole, so memory stays within the dirty limit.
                blocks = map(mv.__getitem__, cuts)
                self.held_bytes += n
            elif isinstance(data, bytes):
                blocks = map(data.__getitem__, cuts)
            else:
                blocks = map(bytes, map(mv.__getitem__, cuts))
            dirty.update(zip(range(fbn, fbn + whole), blocks, strict=True))
            pos += whole * BLOCK_SIZE
            fbn += whole
        if pos < n:
            tail = n - pos
            old = tree.read_block(fbn) if fbn * BLOCK_SIZE < size else ZERO_BLOCK
            dirty[fbn] = bytes(mv[pos:]) + old[tail:]
        if offset + n > node.inode.size:
            node.inode.size = offset + n
        return n

    def truncate(self, node: Node, size: int) -> None:
        self._require_writable()
        if size > MAX_FILE_SIZE:
            raise FsError(EFBIG, f"size {size} is past the largest file size")
        inode = node.inode
        if size <= inode.size:  # equal too: drops what a refused write left past the end
            keep = (size + BLOCK_SIZE - 1) // BLOCK_SIZE
            within = size % BLOCK_SIZE
            if within:  # first, so an ENOSPC here leaves the file as it was
                fbn = size // BLOCK_SIZE
                old = node.tree.read_block(fbn)
                if any(old[within:]):
                    # From the reserve, like a deletion: a truncate frees space, and the
                    # clean-up of a refused write relies on it (its blocks may have been
                    # committed by a CP in the middle of the write).
                    self._write_block(node, fbn, old[:within] + bytes(BLOCK_SIZE - within),
                                      meta=True)
            node.tree.truncate_blocks(keep)
        inode.size = size
        self._touch(node)

    # ---- directories ------------------------------------------------------------------
    def directory(self, node: Node) -> Directory:
        d = node.dir
        if d is None:
            if not node.inode.is_dir:
                raise fs_error(20, f"inode {node.inode.ino}")
            d = node.dir = Directory(_DirStore(self, node))
        return d

    def format_directory(self, node: Node, parent_ino: int) -> Directory:
        node.dir = Directory.format(_DirStore(self, node), parent_ino)
        return node.dir

    def readdir(self, node: Node, after: int = 0) -> Iterator[tuple[bytes, int, int, int]]:
        """(name, ino, dtype, cookie) of each entry past `after`, in cookie order."""
        for e in self.directory(node).readdir(after):
            yield e.name, e.ino, e.dtype, e.cookie

    # ---- extended attributes ------------------------------------------------------------
    def xattrs(self, node: Node) -> dict[bytes, bytes]:
        xino = node.inode.xattr_ino
        if not xino:
            return {}
        xnode = self.node(xino)
        return decode_xattrs(self.read(xnode, 0, xnode.inode.size),
                             f"xattrs of inode {node.inode.ino} (in inode {xino})")

    def set_xattrs(self, node: Node, attrs: dict[bytes, bytes], now_ns: int) -> None:
        self._require_writable()
        inode = node.inode
        if not attrs:
            if inode.xattr_ino:
                self.free_inode(self.node(inode.xattr_ino))
                inode.xattr_ino = 0
                self.dirty_records.add(inode.ino)
            return
        blob = encode_xattrs(attrs)
        # The new set goes to a fresh xattr inode that replaces the old one only once
        # written: a write refused with ENOSPC then leaves the old set whole.
        xnode = self.alloc_inode(stat.S_IFREG, 0, 0, now_ns, inode.qtree)
        xnode.inode.flags = INODE_FLAG_XATTR
        xnode.inode.nlink = 1
        try:
            self.write(xnode, 0, blob)
        except FsError:
            self.free_inode(xnode)
            raise
        if inode.xattr_ino:
            self.free_inode(self.node(inode.xattr_ino))
        inode.xattr_ino = xnode.inode.ino
        self.dirty_records.add(inode.ino)

    # ---- consistency point ----------------------------------------------------------------
    def flush(self, batch: WriteBatch) -> TreeRoot:
        """Give every change a place on disk (new VBNs) and return the new inode-file root."""
        self._require_writable()
        # Every loaded directory with changes, whoever changed it: a CP in the middle of an
        # operation must not strand an insert made after it.
        for loaded in list(self.nodes.values()):
            if loaded.dir is not None and loaded.dir.dirty:
                loaded.dir.flush()
        if self._inomap_dirty and self._inomap is not None:
            mapnode = self.node(INOMAP_INO)
            bits = self._inomap
            for b in sorted(self._inomap_dirty):
                chunk = bits[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE].tobytes()
                mapnode.tree.write_block(b, chunk.ljust(BLOCK_SIZE, b"\x00"))
            mapnode.inode.size = max(mapnode.inode.size, len(bits))
            self._touch(mapnode)
            self._inomap_dirty.clear()
        for ino in sorted(self.dirty_trees):
            n = self.nodes.get(ino)
            if n is None:
                continue
            tree = n.tree
            if tree.dirty:
                tree.prepare()
                tree.encode(batch)
            n.inode.height = tree.height
            n.inode.blocks += tree.delta_blocks
            tree.delta_blocks = 0
            tree.trim_cache()
            self.dirty_records.add(ino)
        self.dirty_trees.clear()
        self.dirty_data_blocks = 0
        self.held_bytes = 0
        by_block: dict[int, list[Inode]] = {}
        for ino in self.dirty_records:
            n = self.nodes.get(ino)
            rec = n.inode if n is not None else self._freed_records.get(ino)
            if rec is not None:
                by_block.setdefault(ino // INODES_PER_BLOCK, []).append(rec)
        self._iblocks.clear()
        for blk, recs in sorted(by_block.items()):
            old = self.itree.read_block(blk) if blk < self.inode_blocks else ZERO_BLOCK
            buf = bytearray(old)
            for rec in recs:
                off = (rec.ino % INODES_PER_BLOCK) * INODE_SIZE
                buf[off : off + INODE_SIZE] = rec.encode()
            self.itree.write_block(blk, bytes(buf))
            self.inode_blocks = max(self.inode_blocks, blk + 1)
        self.dirty_records.clear()
        self._freed_records.clear()
        if self.itree.dirty:
            self.itree.prepare()
            self.itree.encode(batch)
        self.itree.trim_cache()
        return self.root()

    def evict_clean(self, keep: int = NODE_CACHE_SIZE) -> None:
        """Forget the longest-loaded inodes, down to `keep`, among those that hold no
        unwritten change and no open handle; they are read again (through the block
        cache) when next used. Only call between operations: a caller in the middle of
        one may hold a Node."""
        excess = len(self.nodes) - keep
        if excess <= 0:
            return
        busy = self.dirty_records | self.dirty_trees
        drop: list[int] = []
        for i, n in self.nodes.items():  # in load order, oldest first
            if (i not in busy and n.opened == 0 and i not in (INOMAP_INO, ROOT_INO)
                    and not (n.dir is not None and n.dir.dirty)):
                drop.append(i)
                if len(drop) == excess:
                    break
        for ino in drop:
            del self.nodes[ino]

    def bound_nodes(self) -> None:
        """Keep a read-only workload (which never reaches a CP) from loading inodes
        without limit: past twice the cache size, evict down to it. Between operations."""
        if len(self.nodes) > 2 * NODE_CACHE_SIZE:
            self.evict_clean()

    def pending_blocks(self) -> int:
        """Blocks the next CP needs at most for what is dirty now (an overestimate)."""
        data = self.dirty_data_blocks
        trees = len(self.dirty_trees)
        records = len(self.dirty_records)
        return data + data // 128 + 6 * trees + records // 8 + 16
