"""Directories: a B+tree of entries keyed by a stable 63-bit cookie, in a file of blocks.

Why a cookie-keyed B+tree: a directory must hold a million entries, find one in
O(log n) block reads, and hand out readdir offsets that stay valid while it changes.
Keying the tree by a hash of the name gives all three: the key is the cookie, it never
changes while the entry exists, so "entries with key > cookie, in key order" resumes a
walk correctly whatever was inserted or removed in between (POSIX asks only that entries
present for the whole walk come back exactly once).

The key of a name is built from h = xxh3_64(name) >> 1 (63 bits): its top 47 bits are the
name's *group* (a group of 0 is mapped to 1, so every key is at least 65536 and cookies
0..15 stay free for the caller's "." and ".."), and its low 16 bits are a collision
sequence number, the lowest one not used by another entry of the same group. Lookup
descends to the group's first key and compares names among the group's entries; a group
almost always holds one entry. A group can hold 65536 names; the next one gets ENOSPC.

Storage: fbn 0 is the header (layout in `snapvol.layout.dirblock`). Freed nodes become
holes and their fbns go on a free list kept as a chain of trunk blocks hanging off the
header (like SQLite's freelist): each trunk lists up to 510 free fbns; when the head
trunk is full, the next freed fbn becomes the new head trunk; allocation pops a listed
fbn, or reuses an empty head trunk itself. When the last entry is removed the file is
truncated back to two blocks (header and an empty root leaf), so a directory that was
large and is now empty gives all its space back.

Decoded nodes are cached in the Directory (an LRU of `cache_nodes` nodes) and modified
nodes are encoded only at `flush()`, so an insert costs a few list operations, not a
block encode. A dirty node evicted from a full cache is written early; the store sees
a consistent directory only after `flush()`, which the engine calls before each CP.
"""

from __future__ import annotations

import errno
import os
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count, islice, pairwise
from typing import Final, Protocol

import xxhash

from snapvol.errors import CorruptionError, FsError, fs_error
from snapvol.layout.constants import MAX_NAME
from snapvol.layout.dirblock import (
    ENTRY_OVERHEAD,
    KIND_INTERNAL,
    KIND_LEAF,
    LEAF_CAPACITY,
    MAX_CHILDREN,
    TRUNK_CAPACITY,
    DirHeader,
    decode_header,
    decode_internal,
    decode_leaf,
    decode_trunk,
    encode_header,
    encode_internal,
    encode_leaf,
    encode_trunk,
    entry_bytes,
    node_kind,
)
from snapvol.layout.names import InvalidName, check_entry_name

DT_FIFO: Final = 1
DT_CHR: Final = 2
DT_DIR: Final = 4
DT_BLK: Final = 6
DT_REG: Final = 8
DT_LNK: Final = 10
DT_SOCK: Final = 12
DT_TYPES: Final = frozenset({DT_FIFO, DT_CHR, DT_DIR, DT_BLK, DT_REG, DT_LNK, DT_SOCK})

SEQ_BITS: Final = 16
SEQ_MASK: Final = (1 << SEQ_BITS) - 1
MIN_KEY: Final = 1 << SEQ_BITS  # smallest key an entry can have; cookies below are the caller's
MAX_INO: Final = (1 << 64) - 1
_U64_MASK: Final = (1 << 64) - 1

HEADER_FBN: Final = 0

name_hash: Callable[[bytes], int] = xxhash.xxh3_64_intdigest
"""The 64-bit hash of a name. A module attribute so tests can force collisions."""


class BlockStore(Protocol):
    """The directory file, as the engine provides it. Every read_block is a block read."""

    def read_block(self, fbn: int) -> bytes:
        """4096 bytes; a hole reads as zeros."""
        ...

    def write_block(self, fbn: int, data: bytes) -> None:
        """Store 4096 bytes at fbn."""
        ...

    def punch_block(self, fbn: int) -> None:
        """Make fbn a hole, freeing its disk block."""
        ...

    @property
    def nblocks(self) -> int:
        """File size in blocks."""
        ...

    def set_nblocks(self, n: int) -> None:
        """Grow (with holes) or shrink (freeing the blocks past n) the file."""
        ...


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One directory entry; `cookie` is its readdir offset and its key in the tree."""

    name: bytes
    ino: int
    dtype: int
    cookie: int


@dataclass(slots=True, eq=False)
class _Leaf:
    fbn: int
    keys: list[int]
    inos: list[int]
    dtypes: bytearray
    names: list[bytes]
    size: int  # bytes the entries take when encoded


@dataclass(slots=True, eq=False)
class _Internal:
    fbn: int
    level: int
    keys: list[int]
    children: list[int]


@dataclass(slots=True, eq=False)
class _Trunk:
    fbn: int
    next: int
    fbns: list[int]


_Node = _Leaf | _Internal | _Trunk
_Path = list[tuple[_Internal, int]]  # (node, index of the child taken) from the root down


@dataclass(slots=True)
class _Scan:
    """Where a name is, or where its group would take a new entry."""

    path: _Path
    leaf: _Leaf
    index: int  # of the name in leaf, -1 if absent
    base: int  # group << SEQ_BITS
    used: list[int]  # sequence numbers taken by other names of the group, ascending
    spans: bool  # the group reached past the first leaf looked at


def name_group(name: bytes) -> int:
    """The high 47 bits of the name's 63-bit hash, never 0 (keys stay >= MIN_KEY)."""
    return ((name_hash(name) & _U64_MASK) >> (1 + SEQ_BITS)) or 1


def check_name(name: bytes) -> None:
    """Refuse what cannot be a directory entry name: FsError with the errno a POSIX call
    answers (snapvol.layout.names)."""
    if not isinstance(name, bytes):
        raise TypeError(f"directory entry name must be bytes, not {type(name).__name__}")
    try:
        check_entry_name(name)
    except InvalidName as err:
        raise FsError(err.errno, str(err)) from None


def _check_ino(ino: int) -> None:
    if not 0 <= ino <= MAX_INO:
        raise ValueError(f"inode number {ino} is outside 0..2**64-1")


def _check_dtype(dtype: int) -> None:
    if dtype not in DT_TYPES:
        raise ValueError(f"file type {dtype} is not one of the DT_* values {sorted(DT_TYPES)}")


class Directory:
    """A directory stored in a BlockStore: lookup, insert, remove, replace, readdir."""

    def __init__(
        self,
        store: BlockStore,
        *,
        cache_nodes: int = 4096,
        max_children: int = MAX_CHILDREN,
        leaf_capacity: int = LEAF_CAPACITY,
    ) -> None:
        """Open the directory in `store`, reading its header.

        `cache_nodes` bounds the decoded nodes kept (about 12 KiB each, 145 bytes per
        entry: the default holds ~300,000 entries in ~45 MiB, and a small directory
        uses one node). `max_children` and `leaf_capacity` may be set below the
        format's maxima to build deep trees from few entries (tests do); the blocks
        stay in the same format, so a directory may be reopened with other limits.
        """
        if not 3 <= max_children <= MAX_CHILDREN:
            raise ValueError(f"max_children {max_children} must be within 3..{MAX_CHILDREN}")
        if not 1024 <= leaf_capacity <= LEAF_CAPACITY:
            raise ValueError(f"leaf_capacity {leaf_capacity} must be within 1024..{LEAF_CAPACITY}")
        if cache_nodes < 8:
            raise ValueError(f"cache_nodes {cache_nodes} must be at least 8")
        self._store = store
        self._cache_nodes = cache_nodes
        self._max_children = max_children
        self._leaf_capacity = leaf_capacity
        self._cache: OrderedDict[int, _Node] = OrderedDict()
        self._dirty: set[int] = set()
        if store.nblocks < 2:
            raise CorruptionError(f"directory of {store.nblocks} blocks: not formatted")
        header = decode_header(store.read_block(HEADER_FBN))
        if not 1 <= header.root < store.nblocks:
            raise CorruptionError(f"directory header: root fbn {header.root} past the file")
        self._height = header.height
        self._root = header.root
        self._count = header.count
        self._parent_ino = header.parent_ino
        self._free_head = header.free_head
        self._free_count = header.free_count
        self._nodes = header.nodes
        self._header_dirty = False

    @classmethod
    def format(
        cls,
        store: BlockStore,
        parent_ino: int,
        *,
        cache_nodes: int = 4096,
        max_children: int = MAX_CHILDREN,
        leaf_capacity: int = LEAF_CAPACITY,
    ) -> Directory:
        """Write an empty directory (header and empty root leaf) into an empty store."""
        _check_ino(parent_ino)
        if store.nblocks != 0:
            raise ValueError(f"cannot format a directory over {store.nblocks} existing blocks")
        store.set_nblocks(2)
        store.write_block(HEADER_FBN, encode_header(DirHeader(1, 1, 0, parent_ino, 0, 0, 1)))
        store.write_block(1, encode_leaf([], [], bytearray(), []))
        return cls(
            store,
            cache_nodes=cache_nodes,
            max_children=max_children,
            leaf_capacity=leaf_capacity,
        )

    # ----------------------------------------------------------------- properties

    @property
    def parent_ino(self) -> int:
        """The inode number of "..", kept in the header."""
        return self._parent_ino

    @parent_ino.setter
    def parent_ino(self, ino: int) -> None:
        _check_ino(ino)
        self._parent_ino = ino
        self._header_dirty = True

    @property
    def height(self) -> int:
        """Levels of the tree; a lookup reads at most this many node blocks."""
        return self._height

    def __len__(self) -> int:
        return self._count

    # ----------------------------------------------------------------- operations

    def lookup(self, name: bytes) -> DirEntry | None:
        """The entry called `name`, or None."""
        check_name(name)
        scan = self._scan(name)
        self._trim_cache()
        if scan.index < 0:
            return None
        return self._entry(scan.leaf, scan.index)

    def find(self, name: bytes) -> tuple[int, int] | None:
        """(ino, dtype) of the entry called `name`, or None.

        The path lookups take on every open: the same answer as lookup(), without the
        descent path, scan record and entry object that insert and remove need. A
        collision group that runs past its leaf takes the general path.
        """
        if not 0 < len(name) <= MAX_NAME or b"/" in name or b"\0" in name or (
                name[0] == 46 and (name == b"." or name == b"..")):
            check_name(name)  # raises, naming the reason
        base = name_group(name) << SEQ_BITS
        top = base | SEQ_MASK
        cache = self._cache
        before = len(cache)
        fbn = self._root
        upper: int | None = None
        for _ in range(self._height - 1):
            inner = cache.get(fbn)
            if inner is None:
                inner = self._internal(fbn)
            else:
                cache.move_to_end(fbn)
                if not isinstance(inner, _Internal):
                    inner = self._internal(fbn)  # raises, naming the block
            keys = inner.keys
            i = bisect_right(keys, base)
            if i < len(keys):
                upper = keys[i]
            fbn = inner.children[i]
        leaf = cache.get(fbn)
        if leaf is None or not isinstance(leaf, _Leaf):
            leaf = self._leaf(fbn)
        else:
            cache.move_to_end(fbn)
        if len(cache) != before:
            self._trim_cache()
        keys, names = leaf.keys, leaf.names
        n = len(keys)
        i = bisect_left(keys, base)
        while i < n and keys[i] <= top:
            if names[i] == name:
                return leaf.inos[i], leaf.dtypes[i]
            i += 1
        if i < n or upper is None or upper > top:
            return None
        e = self.lookup(name)  # the group continues in the next leaf
        return None if e is None else (e.ino, e.dtype)

    def insert(self, name: bytes, ino: int, dtype: int) -> DirEntry:
        """Add an entry; FsError(EEXIST) if the name is taken."""
        check_name(name)
        _check_ino(ino)
        _check_dtype(dtype)
        scan = self._scan(name)
        if scan.index >= 0:
            raise fs_error(errno.EEXIST, os.fsdecode(name))
        entry = self._add(scan, name, ino, dtype)
        self._trim_cache()
        return entry

    def replace(self, name: bytes, ino: int, dtype: int) -> DirEntry | None:
        """Point `name` at (ino, dtype); return the entry it replaced, keeping its cookie."""
        check_name(name)
        _check_ino(ino)
        _check_dtype(dtype)
        scan = self._scan(name)
        if scan.index < 0:
            self._add(scan, name, ino, dtype)
            self._trim_cache()
            return None
        leaf, i = scan.leaf, scan.index
        old = self._entry(leaf, i)
        leaf.inos[i] = ino
        leaf.dtypes[i] = dtype
        self._dirty.add(leaf.fbn)
        self._trim_cache()
        return old

    def remove(self, name: bytes) -> DirEntry:
        """Remove the entry called `name` and return it; FsError(ENOENT) if absent."""
        check_name(name)
        scan = self._scan(name)
        if scan.index < 0:
            raise fs_error(errno.ENOENT, os.fsdecode(name))
        leaf, i = scan.leaf, scan.index
        entry = self._entry(leaf, i)
        del leaf.keys[i], leaf.inos[i], leaf.dtypes[i], leaf.names[i]
        leaf.size -= ENTRY_OVERHEAD + len(name)
        self._dirty.add(leaf.fbn)
        self._count -= 1
        self._header_dirty = True
        if self._count == 0:
            self._reset()
        else:
            self._rebalance(scan.path, leaf)
        self._trim_cache()
        return entry

    def readdir(self, after: int = 0) -> Iterator[DirEntry]:
        """Entries with cookie > `after`, ascending; the directory may change meanwhile.

        Each step copies the rest of one leaf and then resumes from the key space past
        it, so it never holds a position inside a node that could split or vanish.
        Entries present for the whole walk come back exactly once; one removed after
        its leaf was copied may still come back, one added behind the walk does not
        (both allowed by POSIX). Not thread-safe: the engine serialises access.
        """
        if after < 0:
            raise ValueError(f"readdir cookie {after} is negative")
        last = after
        while True:
            _, leaf, upper = self._descend(last + 1)
            keys = leaf.keys
            batch = [self._entry(leaf, i) for i in range(bisect_right(keys, last), len(keys))]
            self._trim_cache()
            yield from batch
            if upper is None:
                return
            # Every entry below `upper` that existed when the leaf was read is in batch.
            last = upper - 1

    def flush(self) -> None:
        """Encode every modified node and the header, and write them to the store."""
        for fbn in sorted(self._dirty):
            self._write(self._cache[fbn])
        self._dirty.clear()
        if self._header_dirty:
            self._store.write_block(HEADER_FBN, encode_header(self._header()))
            self._header_dirty = False

    @property
    def dirty(self) -> bool:
        """Changes not yet written to the store (flush() writes them)."""
        return bool(self._dirty) or self._header_dirty

    def drop_cache(self) -> None:
        """Flush, then forget every decoded node (to give memory back)."""
        self.flush()
        self._cache.clear()

    # ----------------------------------------------------------------- tree walking

    def _entry(self, leaf: _Leaf, i: int) -> DirEntry:
        return DirEntry(leaf.names[i], leaf.inos[i], leaf.dtypes[i], leaf.keys[i])

    def _descend(self, key: int) -> tuple[_Path, _Leaf, int | None]:
        """The path to the leaf whose range holds `key`, and that range's upper bound."""
        path: _Path = []
        upper: int | None = None
        fbn = self._root
        for _ in range(self._height - 1):
            node = self._internal(fbn)
            i = bisect_right(node.keys, key)
            if i < len(node.keys):
                upper = node.keys[i]
            path.append((node, i))
            fbn = node.children[i]
        return path, self._leaf(fbn), upper

    def _scan(self, name: bytes) -> _Scan:
        """Find `name` among its group's entries, collecting the sequence numbers in use."""
        base = name_group(name) << SEQ_BITS
        top = base | SEQ_MASK
        path, leaf, upper = self._descend(base)
        used: list[int] = []
        spans = False
        while True:
            keys, names = leaf.keys, leaf.names
            i = bisect_left(keys, base)
            n = len(keys)
            while i < n and keys[i] <= top:
                if names[i] == name:
                    return _Scan(path, leaf, i, base, used, spans)
                used.append(keys[i] & SEQ_MASK)
                i += 1
            if i < n or upper is None or upper > top:
                return _Scan(path, leaf, -1, base, used, spans)
            path, leaf, upper = self._descend(upper)
            spans = True

    # ----------------------------------------------------------------- node cache

    def _get(self, fbn: int) -> _Node:
        node = self._cache.get(fbn)
        if node is None:
            node = self._read(fbn)
            self._cache[fbn] = node
        else:
            self._cache.move_to_end(fbn)
        return node

    def _read(self, fbn: int) -> _Node:
        """Decode the node at fbn from the store, bypassing the cache."""
        if not 0 < fbn < self._store.nblocks:
            raise CorruptionError(f"directory block {fbn}: outside the file")
        block = self._store.read_block(fbn)
        what = f"directory block {fbn}"
        kind = node_kind(block, what)
        if kind == KIND_LEAF:
            rec = decode_leaf(block, what)
            size = entry_bytes(rec.names)
            return _Leaf(fbn, rec.keys, rec.inos, rec.dtypes, rec.names, size)
        if kind == KIND_INTERNAL:
            irec = decode_internal(block, what)
            return _Internal(fbn, irec.level, irec.keys, irec.children)
        trec = decode_trunk(block, what)
        return _Trunk(fbn, trec.next, trec.fbns)

    def _leaf(self, fbn: int) -> _Leaf:
        node = self._get(fbn)
        if not isinstance(node, _Leaf):
            raise CorruptionError(f"directory block {fbn}: expected a leaf")
        return node

    def _internal(self, fbn: int) -> _Internal:
        node = self._get(fbn)
        if not isinstance(node, _Internal):
            raise CorruptionError(f"directory block {fbn}: expected an internal node")
        return node

    def _trunk(self, fbn: int) -> _Trunk:
        node = self._get(fbn)
        if not isinstance(node, _Trunk):
            raise CorruptionError(f"directory block {fbn}: expected a free-list trunk")
        return node

    def _adopt(self, node: _Node) -> None:
        """Put a node built in memory into the cache, dirty."""
        self._cache[node.fbn] = node
        self._dirty.add(node.fbn)

    def _write(self, node: _Node) -> None:
        if isinstance(node, _Leaf):
            data = encode_leaf(node.keys, node.inos, node.dtypes, node.names)
        elif isinstance(node, _Internal):
            data = encode_internal(node.level, node.keys, node.children)
        else:
            data = encode_trunk(node.next, node.fbns)
        self._store.write_block(node.fbn, data)

    def _trim_cache(self) -> None:
        """Evict least recently used nodes past the limit, writing dirty ones first.

        Called only between operations, never while an operation holds node objects.
        """
        while len(self._cache) > self._cache_nodes:
            fbn, node = self._cache.popitem(last=False)
            if fbn in self._dirty:
                self._write(node)
                self._dirty.discard(fbn)

    def _header(self) -> DirHeader:
        return DirHeader(
            height=self._height,
            root=self._root,
            count=self._count,
            parent_ino=self._parent_ino,
            free_head=self._free_head,
            free_count=self._free_count,
            nodes=self._nodes,
        )

    # ----------------------------------------------------------------- fbn allocation

    def _alloc(self) -> int:
        """A free fbn for a new node: from the free list, else past the end of the file."""
        if self._free_head:
            trunk = self._trunk(self._free_head)
            self._free_count -= 1
            self._header_dirty = True
            if trunk.fbns:
                self._dirty.add(trunk.fbn)
                return trunk.fbns.pop()
            self._free_head = trunk.next
            self._forget(trunk.fbn)
            return trunk.fbn
        fbn = self._store.nblocks
        self._store.set_nblocks(fbn + 1)
        return fbn

    def _release(self, fbn: int) -> None:
        """Put a node's fbn on the free list: punch it, or make it the new head trunk."""
        self._forget(fbn)
        self._free_count += 1
        self._header_dirty = True
        if self._free_head:
            trunk = self._trunk(self._free_head)
            if len(trunk.fbns) < TRUNK_CAPACITY:
                trunk.fbns.append(fbn)
                self._dirty.add(trunk.fbn)
                self._store.punch_block(fbn)
                return
        self._adopt(_Trunk(fbn, self._free_head, []))
        self._free_head = fbn

    def _forget(self, fbn: int) -> None:
        self._cache.pop(fbn, None)
        self._dirty.discard(fbn)

    def _reset(self) -> None:
        """Shrink an empty directory back to a header and one empty root leaf."""
        if self._height == 1 and self._root == 1 and self._store.nblocks == 2:
            return  # already minimal; truncating would only churn the engine
        self._cache.clear()
        self._dirty.clear()
        self._store.set_nblocks(1)
        self._free_head = 0
        self._free_count = 0
        self._height = 1
        self._nodes = 1
        self._root = self._alloc()
        self._adopt(_Leaf(self._root, [], [], bytearray(), [], 0))
        self._header_dirty = True

    # ----------------------------------------------------------------- insertion

    def _add(self, scan: _Scan, name: bytes, ino: int, dtype: int) -> DirEntry:
        """Insert a name known to be absent, with the group's lowest free sequence number."""
        seq = len(scan.used)
        for i, s in enumerate(scan.used):
            if s != i:
                seq = i
                break
        if seq > SEQ_MASK:
            raise fs_error(
                errno.ENOSPC,
                f"name {name!r}: {SEQ_MASK + 1} names in this directory share its hash",
            )
        key = scan.base | seq
        if scan.spans:
            path, leaf, _ = self._descend(key)
        else:  # the leaf's range holds the whole group, so it holds key
            path, leaf = scan.path, scan.leaf
        i = bisect_left(leaf.keys, key)
        leaf.keys.insert(i, key)
        leaf.inos.insert(i, ino)
        leaf.dtypes.insert(i, dtype)
        leaf.names.insert(i, name)
        leaf.size += ENTRY_OVERHEAD + len(name)
        self._dirty.add(leaf.fbn)
        self._count += 1
        self._header_dirty = True
        if leaf.size > self._leaf_capacity:
            self._split_leaf(path, leaf)
        return DirEntry(name, ino, dtype, key)

    def _split_leaf(self, path: _Path, leaf: _Leaf) -> None:
        """Move the upper half (by bytes) of an overfull leaf to a new right sibling."""
        half = leaf.size // 2
        acc = 0
        m = 0
        while acc < half:
            acc += ENTRY_OVERHEAD + len(leaf.names[m])
            m += 1
        m = min(max(m, 1), len(leaf.keys) - 1)
        right = _Leaf(
            self._alloc(),
            leaf.keys[m:],
            leaf.inos[m:],
            leaf.dtypes[m:],
            leaf.names[m:],
            0,
        )
        right.size = entry_bytes(right.names)
        del leaf.keys[m:], leaf.inos[m:], leaf.dtypes[m:], leaf.names[m:]
        leaf.size -= right.size
        self._adopt(right)
        self._nodes += 1
        self._push_up(path, right.keys[0], right.fbn)

    def _push_up(self, path: _Path, sep: int, new_fbn: int) -> None:
        """Hang a new right sibling (keys >= sep) beside the node at the end of path."""
        while path:
            parent, i = path.pop()
            parent.keys.insert(i, sep)
            parent.children.insert(i + 1, new_fbn)
            self._dirty.add(parent.fbn)
            n = len(parent.children)
            if n <= self._max_children:
                return
            mid = n // 2
            right = _Internal(self._alloc(), parent.level, parent.keys[mid:], parent.children[mid:])
            sep = parent.keys[mid - 1]
            del parent.keys[mid - 1 :], parent.children[mid:]
            self._adopt(right)
            self._nodes += 1
            new_fbn = right.fbn
        root = _Internal(self._alloc(), self._height, [sep], [self._root, new_fbn])
        self._adopt(root)
        self._nodes += 1
        self._root = root.fbn
        self._height += 1
        self._header_dirty = True

    # ----------------------------------------------------------------- removal

    def _rebalance(self, path: _Path, node: _Leaf | _Internal) -> None:
        """After a removal from `node`: free it if empty, merge it if small, up the path."""
        while path:
            parent, i = path.pop()
            if not (node.keys if isinstance(node, _Leaf) else node.children):
                del parent.children[i]
                if parent.keys:
                    del parent.keys[i - 1 if i else 0]
                self._dirty.add(parent.fbn)
                self._release(node.fbn)
                self._nodes -= 1
            elif not (self._underfull(node) and self._merge(parent, i, node)):
                break
            node = parent
        while self._height > 1:
            root = self._internal(self._root)
            if len(root.children) != 1:
                break
            self._release(root.fbn)
            self._nodes -= 1
            self._root = root.children[0]
            self._height -= 1
            self._header_dirty = True

    def _underfull(self, node: _Leaf | _Internal) -> bool:
        if isinstance(node, _Leaf):
            return node.size <= self._leaf_capacity // 4
        return len(node.children) <= self._max_children // 4

    def _merge(self, parent: _Internal, i: int, node: _Leaf | _Internal) -> bool:
        """Fold `node` (child i of parent) and a sibling into one node if they fit in 3/4."""
        if i > 0:
            li = i - 1
        elif len(parent.children) > 1:
            li = 0
        else:
            return False
        left = self._get(parent.children[li])
        right = self._get(parent.children[li + 1])
        if isinstance(left, _Leaf) and isinstance(right, _Leaf):
            if left.size + right.size > self._leaf_capacity * 3 // 4:
                return False
            left.keys += right.keys
            left.inos += right.inos
            left.dtypes += right.dtypes
            left.names += right.names
            left.size += right.size
        elif isinstance(left, _Internal) and isinstance(right, _Internal):
            if len(left.children) + len(right.children) > self._max_children * 3 // 4:
                return False
            left.keys += [parent.keys[li], *right.keys]
            left.children += right.children
        else:
            raise CorruptionError(
                f"directory blocks {left.fbn} and {right.fbn}: siblings of different kinds"
            )
        del parent.keys[li], parent.children[li + 1]
        self._dirty.add(left.fbn)
        self._dirty.add(parent.fbn)
        self._release(right.fbn)
        self._nodes -= 1
        return True

    # ----------------------------------------------------------------- fsck

    def check(self) -> list[str]:
        """Check the structure (as it stands, unflushed changes included); list problems.

        Verifies levels, key order, keys within their separators, each key's group
        against its name's hash, names and types, the entry and node counts, and that
        every fbn of the file is exactly one of: header, tree node, free-list member.
        """
        problems: list[str] = []
        nblocks = self._store.nblocks
        owner: dict[int, str] = {HEADER_FBN: "header"}
        entries = 0
        nodes = 0
        prev_key = 0
        group_names: set[bytes] = set()

        def claim(fbn: int, what: str) -> bool:
            if not 0 < fbn < nblocks:
                problems.append(f"{what} fbn {fbn}: outside the file of {nblocks} blocks")
                return False
            if fbn in owner:
                problems.append(f"{what} fbn {fbn}: already used as {owner[fbn]}")
                return False
            owner[fbn] = what
            return True

        stack: list[tuple[int, int, int, int | None]] = [(self._root, self._height - 1, 0, None)]
        while stack:
            fbn, level, lower, upper = stack.pop()
            if not claim(fbn, "tree node"):
                continue
            nodes += 1
            try:
                node = self._peek(fbn)
            except CorruptionError as err:
                problems.append(str(err))
                continue
            where = f"directory block {fbn}"
            is_root = fbn == self._root
            if isinstance(node, _Trunk):
                problems.append(f"{where}: a free-list trunk inside the tree")
                continue
            keys = node.keys
            if any(a >= b for a, b in pairwise(keys)):
                problems.append(f"{where}: keys not strictly ascending")
            if keys and (keys[0] < lower or (upper is not None and keys[-1] >= upper)):
                problems.append(f"{where}: keys outside the range [{lower}, {upper}) of the parent")
            if isinstance(node, _Internal):
                if node.level != level:
                    problems.append(f"{where}: level {node.level}, expected {level}")
                if len(node.children) != len(keys) + 1:
                    problems.append(f"{where}: {len(node.children)} children, {len(keys)} keys")
                    continue
                if is_root and len(node.children) < 2:
                    problems.append(f"{where}: root with a single child")
                bounds = [lower, *keys, upper]
                for j in range(len(node.children) - 1, -1, -1):
                    stack.append((node.children[j], level - 1, bounds[j] or 0, bounds[j + 1]))
                continue
            if level != 0:
                problems.append(f"{where}: a leaf at level {level}")
            if not keys and not is_root:
                problems.append(f"{where}: an empty leaf")
            if entry_bytes(node.names) != node.size or node.size > LEAF_CAPACITY:
                problems.append(f"{where}: entries take {node.size} bytes")
            entries += len(keys)
            for key, name, ino, dtype in zip(keys, node.names, node.inos, node.dtypes, strict=True):
                label = f"{where}: entry {name[:60]!r}"
                try:
                    check_name(name)
                except FsError as err:
                    problems.append(f"{where}: {err}")
                    continue
                if dtype not in DT_TYPES:
                    problems.append(f"{label}: file type {dtype}")
                if not 0 <= ino <= MAX_INO:
                    problems.append(f"{label}: inode number {ino}")
                if key >> SEQ_BITS != name_group(name):
                    problems.append(f"{label}: key {key:#x} does not match the name's hash")
                if key <= prev_key:
                    problems.append(f"{label}: key {key:#x} out of order across leaves")
                if key >> SEQ_BITS != prev_key >> SEQ_BITS:
                    group_names.clear()
                if name in group_names:
                    problems.append(f"{label}: name appears twice")
                group_names.add(name)
                prev_key = key
        if entries != self._count:
            problems.append(f"directory header: {self._count} entries, the tree holds {entries}")
        if nodes != self._nodes:
            problems.append(f"directory header: {self._nodes} nodes, the tree has {nodes}")
        problems += self._check_free_list(claim)
        unowned = nblocks - len(owner)  # claim() keeps owner to distinct fbns < nblocks
        if unowned:
            # Examples from the start: at most len(owner) + 8 steps, however large the
            # file's size says it is.
            examples = list(islice((fbn for fbn in count() if fbn not in owner), 8))
            problems.append(
                f"directory: {unowned} fbns neither in the tree nor free, e.g. {examples}"
            )
        return problems

    def _check_free_list(self, claim: Callable[[int, str], bool]) -> list[str]:
        problems: list[str] = []
        free = 0
        fbn = self._free_head
        while fbn:
            if not claim(fbn, "free-list trunk"):
                break
            free += 1
            try:
                trunk = self._peek(fbn)
            except CorruptionError as err:
                problems.append(str(err))
                break
            if not isinstance(trunk, _Trunk):
                problems.append(f"directory block {fbn}: on the free list but not a trunk")
                break
            for listed in trunk.fbns:
                free += claim(listed, "free fbn")
            fbn = trunk.next
        if free != self._free_count:
            problems.append(f"directory header: {self._free_count} free fbns, the list has {free}")
        return problems

    def _peek(self, fbn: int) -> _Node:
        """A node from the cache, or decoded from the store without caching it (fsck)."""
        node = self._cache.get(fbn)
        return node if node is not None else self._read(fbn)
