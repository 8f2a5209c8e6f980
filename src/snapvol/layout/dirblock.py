"""Byte layouts of the blocks of a directory file. Pure: encode and decode, no I/O.

A directory is a B+tree stored in a file of 4096-byte blocks addressed by file block
number (fbn); `snapvol.engine.directory` drives it. Four kinds of block:

* fbn 0, the header: where the tree starts and how to find free fbns.
* leaves: directory entries sorted by key (the entry's 63-bit readdir cookie).
* internal nodes: separator keys and child fbns.
* free-list trunks: fbns of freed blocks, chained from the header.

All integers are little-endian. No block carries its own checksum: the engine checksums
every block of every file already. Unused bytes at the end of a block are zero.

Header (fbn 0)::

    0   8  magic b"SVDIRHDR"
    8   2  version (1)
    10  2  tree height (1 = the root is a leaf)
    12  4  reserved, zero
    16  8  root fbn
    24  8  entry count (not counting "." and "..")
    32  8  parent inode number (the directory's "..")
    40  8  fbn of the first free-list trunk (0 = the free list is empty)
    48  8  free fbns: trunks plus the fbns they list
    56  8  tree nodes (leaves and internal nodes) reachable from the root

Every other block starts with a 16-byte node header::

    0   4  magic b"SVDN"
    4   1  kind: 1 leaf, 2 internal, 3 free-list trunk
    5   1  level: 0 for leaves and trunks; internal: distance to the leaves (root: height-1)
    6   2  count: entries (leaf), children (internal), listed fbns (trunk)
    8   8  trunk: fbn of the next trunk (0 = last); otherwise zero

Leaf body, n = count, in columns so each decodes in one C call::

    16          8n  keys, strictly ascending
    16+8n       8n  inode numbers
    16+16n       n  file types (DT_* values)
    16+17n          names in key order, each followed by a NUL byte

Names cannot contain NUL, so the terminator gives each name's length and the whole name
column decodes with one bytes.split; this matters because a big directory's leaves are
decoded and encoded again whenever they pass through the node cache. An entry costs 18
bytes plus its name; a leaf holds up to 4080 bytes of them (14 entries of 255-byte
names, 136 of 12-byte names).

Internal body, n = count children (1..255)::

    16          8n      child fbns
    16+8n       8(n-1)  separator keys, strictly ascending

Child i holds the keys k with sep[i-1] <= k < sep[i] (no lower bound for the first child,
no upper bound for the last).

Trunk body, n = count (0..510)::

    16          8n  fbns of free blocks (holes; the trunk itself is not a hole)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from snapvol.errors import CorruptionError
from snapvol.layout.constants import BLOCK_SIZE

HEADER_MAGIC: Final = b"SVDIRHDR"
NODE_MAGIC: Final = b"SVDN"
DIR_VERSION: Final = 1

KIND_LEAF: Final = 1
KIND_INTERNAL: Final = 2
KIND_TRUNK: Final = 3

NODE_HEADER_SIZE: Final = 16
ENTRY_OVERHEAD: Final = 18  # key, ino, type, name length
LEAF_CAPACITY: Final = BLOCK_SIZE - NODE_HEADER_SIZE  # bytes of entries a leaf can hold
MAX_CHILDREN: Final = (BLOCK_SIZE - NODE_HEADER_SIZE + 8) // 16  # 255
TRUNK_CAPACITY: Final = (BLOCK_SIZE - NODE_HEADER_SIZE) // 8  # 510
MAX_DIR_HEIGHT: Final = 16  # 255-way nodes: far more than 2**63 keys need

_HEADER = struct.Struct("<8sHHIQQQQQQ")
_NODE = struct.Struct("<4sBBHQ")
_ZERO_BLOCK: Final = bytes(BLOCK_SIZE)


@dataclass(slots=True)
class DirHeader:
    """The decoded fbn-0 header; the field order is the byte order."""

    height: int
    root: int
    count: int
    parent_ino: int
    free_head: int
    free_count: int
    nodes: int


@dataclass(slots=True)
class LeafRecord:
    """A decoded leaf: parallel columns, in key order."""

    keys: list[int]
    inos: list[int]
    dtypes: bytearray
    names: list[bytes]


@dataclass(slots=True)
class InternalRecord:
    """A decoded internal node: len(children) == len(keys) + 1."""

    level: int
    keys: list[int]
    children: list[int]


@dataclass(slots=True)
class TrunkRecord:
    """A decoded free-list trunk."""

    next: int
    fbns: list[int]


def entry_bytes(names: list[bytes]) -> int:
    """Bytes that entries with these names take in a leaf (the node header not included)."""
    return ENTRY_OVERHEAD * len(names) + sum(map(len, names))


def _pad(parts: list[bytes], what: str) -> bytes:
    data = b"".join(parts)
    if len(data) > BLOCK_SIZE:
        raise ValueError(f"{what} needs {len(data)} bytes, more than a {BLOCK_SIZE}-byte block")
    return data + _ZERO_BLOCK[len(data) :]


@lru_cache(maxsize=1024)
def _u64_array(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}Q")


def _u64s(values: list[int]) -> bytes:
    return _u64_array(len(values)).pack(*values)


def _read_u64s(block: bytes, count: int, offset: int) -> list[int]:
    return list(_u64_array(count).unpack_from(block, offset))


def _check_size(block: bytes, what: str) -> None:
    if len(block) != BLOCK_SIZE:
        raise CorruptionError(f"{what}: {len(block)} bytes, expected {BLOCK_SIZE}")


def encode_header(header: DirHeader) -> bytes:
    """Encode the fbn-0 header block."""
    return _pad(
        [
            _HEADER.pack(
                HEADER_MAGIC,
                DIR_VERSION,
                header.height,
                0,
                header.root,
                header.count,
                header.parent_ino,
                header.free_head,
                header.free_count,
                header.nodes,
            )
        ],
        "directory header",
    )


def decode_header(block: bytes, what: str = "directory header") -> DirHeader:
    """Decode the fbn-0 header; `what` names the block in error messages."""
    _check_size(block, what)
    magic, version, height, reserved, root, count, parent, free_head, free_count, nodes = (
        _HEADER.unpack_from(block)
    )
    if magic != HEADER_MAGIC:
        raise CorruptionError(f"{what}: not a directory (magic {magic!r})")
    if version != DIR_VERSION:
        raise CorruptionError(
            f"{what}: directory format version {version}, this snapvol reads {DIR_VERSION}"
        )
    if not 1 <= height <= MAX_DIR_HEIGHT:
        raise CorruptionError(f"{what}: tree height {height}")
    if reserved or block[_HEADER.size :] != _ZERO_BLOCK[_HEADER.size :]:
        raise CorruptionError(f"{what}: nonzero bytes where the format says zero")
    return DirHeader(height, root, count, parent, free_head, free_count, nodes)


def node_kind(block: bytes, what: str) -> int:
    """The KIND_* of a node block; CorruptionError if it is not a directory node, or if
    its header has a field set that its kind keeps zero (a leaf's or trunk's level, a
    tree node's next-trunk field)."""
    _check_size(block, what)
    magic, kind, level, _, next_fbn = _NODE.unpack_from(block)
    if magic != NODE_MAGIC or kind not in (KIND_LEAF, KIND_INTERNAL, KIND_TRUNK):
        raise CorruptionError(f"{what}: not a directory node (magic {magic!r}, kind {kind})")
    if (kind != KIND_TRUNK and next_fbn) or (kind != KIND_INTERNAL and level):
        raise CorruptionError(f"{what}: node header fields its kind keeps zero are set "
                              f"(level {level}, next {next_fbn})")
    return int(kind)


def _check_tail(block: bytes, end: int, what: str) -> None:
    """Unused bytes at the end of a block are zero."""
    if block[end:] != _ZERO_BLOCK[end:]:
        raise CorruptionError(f"{what}: nonzero bytes after the node's contents")


def encode_leaf(keys: list[int], inos: list[int], dtypes: bytearray, names: list[bytes]) -> bytes:
    """Encode a leaf; the columns must be parallel and in key order."""
    n = len(keys)
    return _pad(
        [
            _NODE.pack(NODE_MAGIC, KIND_LEAF, 0, n, 0),
            _u64_array(2 * n).pack(*keys, *inos),
            bytes(dtypes),
            *((b"\0".join(names), b"\0") if names else ()),
        ],
        "directory leaf",
    )


def decode_leaf(block: bytes, what: str) -> LeafRecord:
    """Decode a leaf. Checks that the columns fit; ordering is left to the fsck check."""
    if node_kind(block, what) != KIND_LEAF:
        raise CorruptionError(f"{what}: expected a directory leaf")
    _, _, _, n, _ = _NODE.unpack_from(block)
    base = NODE_HEADER_SIZE + 17 * n
    if base + 2 * n > BLOCK_SIZE:
        raise CorruptionError(f"{what}: {n} entries cannot fit in a block")
    names = block[base:].split(b"\0", n)
    if len(names) != n + 1 or names.pop().strip(b"\0") or b"" in names:
        raise CorruptionError(f"{what}: the names of {n} entries are not {n} NUL-ended names")
    numbers = _read_u64s(block, 2 * n, NODE_HEADER_SIZE)
    return LeafRecord(
        keys=numbers[:n],
        inos=numbers[n:],
        dtypes=bytearray(block[NODE_HEADER_SIZE + 16 * n : base]),
        names=names,
    )


def encode_internal(level: int, keys: list[int], children: list[int]) -> bytes:
    """Encode an internal node of the given level (>= 1)."""
    if len(children) != len(keys) + 1 or not 1 <= len(children) <= MAX_CHILDREN:
        raise ValueError(f"internal node with {len(children)} children and {len(keys)} keys")
    return _pad(
        [
            _NODE.pack(NODE_MAGIC, KIND_INTERNAL, level, len(children), 0),
            _u64s(children),
            _u64s(keys),
        ],
        "directory internal node",
    )


def decode_internal(block: bytes, what: str) -> InternalRecord:
    """Decode an internal node."""
    if node_kind(block, what) != KIND_INTERNAL:
        raise CorruptionError(f"{what}: expected a directory internal node")
    _, _, level, n, _ = _NODE.unpack_from(block)
    if not 1 <= n <= MAX_CHILDREN or not 1 <= level < MAX_DIR_HEIGHT:
        raise CorruptionError(f"{what}: internal node with {n} children at level {level}")
    _check_tail(block, NODE_HEADER_SIZE + 16 * n - 8, what)
    return InternalRecord(
        level=level,
        keys=_read_u64s(block, n - 1, NODE_HEADER_SIZE + 8 * n),
        children=_read_u64s(block, n, NODE_HEADER_SIZE),
    )


def encode_trunk(next_fbn: int, fbns: list[int]) -> bytes:
    """Encode a free-list trunk listing `fbns` and chaining to `next_fbn`."""
    if len(fbns) > TRUNK_CAPACITY:
        raise ValueError(f"free-list trunk with {len(fbns)} fbns, at most {TRUNK_CAPACITY}")
    return _pad(
        [_NODE.pack(NODE_MAGIC, KIND_TRUNK, 0, len(fbns), next_fbn), _u64s(fbns)],
        "directory free-list trunk",
    )


def decode_trunk(block: bytes, what: str) -> TrunkRecord:
    """Decode a free-list trunk."""
    if node_kind(block, what) != KIND_TRUNK:
        raise CorruptionError(f"{what}: expected a directory free-list trunk")
    _, _, _, n, next_fbn = _NODE.unpack_from(block)
    if n > TRUNK_CAPACITY:
        raise CorruptionError(f"{what}: free-list trunk lists {n} fbns")
    _check_tail(block, NODE_HEADER_SIZE + 8 * n, what)
    return TrunkRecord(next=next_fbn, fbns=_read_u64s(block, n, NODE_HEADER_SIZE))
