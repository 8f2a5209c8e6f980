"""The inode record (256 bytes, 16 per inode-file block).

Inode number N lives at byte (N % 16) * 256 of block N // 16 of the inode file. A free
slot has mode 0 but keeps its generation, so a reused number gets generation + 1 and an
old (ino, generation) handle can never name the new file.
"""

from __future__ import annotations

import stat
import struct

import numpy as np

from snapvol.errors import CorruptionError
from snapvol.layout.constants import INODE_DIRECT, INODE_SIZE, MAX_FILE_SIZE, MAX_HEIGHT
from snapvol.layout.pointer import PTR_DTYPE

_FMT = struct.Struct("<IIIIQQIIqqqqQQQBB6x")
_CHECKED = struct.Struct("<IIIIQQIIqqqqQQQBB30s")  # the same, and bytes 98..127 (zero)
_PTRS_AT = 128
_ZERO_AT = 98
_ZEROS = bytes(_PTRS_AT - _ZERO_AT)
INODE_VERSION = 1
INODE_FLAGS_KNOWN = 1 | 2  # holds another inode's xattrs; a fixed system inode
FILE_TYPES = frozenset({stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                        stat.S_IFIFO, stat.S_IFSOCK})
_TYPE_CODES = frozenset(t >> 12 for t in FILE_TYPES)  # mode >> 12 of a valid mode
_EMPTY = bytes(INODE_SIZE)


_PTR = struct.Struct("<QQ")
_NO_PTRS = bytes(INODE_DIRECT * _PTR.size)


class Inode:
    """One inode record, decoded.

    The eight top pointers stay as the record's bytes until something needs them as an
    array (a block tree, an encode): a lookup, a stat or the read of a one-block file
    never does, and decoding them is most of the cost of loading an inode.
    """

    __slots__ = ("_ptrs", "_raw_ptrs", "atime_ns", "blocks", "btime_ns", "ctime_ns", "flags",
                 "generation", "gid", "height", "ino", "mode", "mtime_ns", "nlink", "qtree",
                 "rdev", "size", "uid", "xattr_ino")

    def __init__(self, ino: int, mode: int = 0, nlink: int = 0, uid: int = 0, gid: int = 0,
                 size: int = 0, generation: int = 0, qtree: int = 0, flags: int = 0,
                 atime_ns: int = 0, mtime_ns: int = 0, ctime_ns: int = 0, btime_ns: int = 0,
                 rdev: int = 0, xattr_ino: int = 0, blocks: int = 0, height: int = 0,
                 ptrs: np.ndarray | None = None, raw_ptrs: bytes = _NO_PTRS) -> None:
        self.ino = ino
        self.mode = mode
        self.nlink = nlink
        self.uid = uid
        self.gid = gid
        self.size = size
        self.generation = generation
        self.qtree = qtree
        self.flags = flags
        self.atime_ns = atime_ns
        self.mtime_ns = mtime_ns
        self.ctime_ns = ctime_ns
        self.btime_ns = btime_ns
        self.rdev = rdev
        self.xattr_ino = xattr_ino
        self.blocks = blocks  # blocks held by this file's tree (data and indirect)
        self.height = height
        self._ptrs = ptrs
        self._raw_ptrs = raw_ptrs

    @property
    def ptrs(self) -> np.ndarray:
        """The top pointers as a writable array (a block tree's `top` is this array)."""
        p = self._ptrs
        if p is None:
            p = self._ptrs = np.frombuffer(self._raw_ptrs, dtype=PTR_DTYPE).copy()
        return p

    @ptrs.setter
    def ptrs(self, value: np.ndarray) -> None:
        self._ptrs = value

    def ptr(self, i: int) -> tuple[int, int]:
        """(vbn, csum) of top pointer i, without building the array."""
        p = self._ptrs
        if p is not None:
            vbn, csum = p.item(i)
            return vbn, csum
        vbn, csum = _PTR.unpack_from(self._raw_ptrs, i * _PTR.size)
        return vbn, csum

    def __repr__(self) -> str:
        return (f"Inode(ino={self.ino}, mode={self.mode:o}, nlink={self.nlink}, "
                f"size={self.size}, generation={self.generation}, height={self.height})")

    @property
    def allocated(self) -> bool:
        return self.mode != 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_lnk(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def _ptr_bytes(self) -> bytes:
        p = self._ptrs
        return self._raw_ptrs if p is None else p.tobytes()

    def encode(self) -> bytes:
        head = _FMT.pack(
            self.mode, self.nlink, self.uid, self.gid, self.size, self.generation, self.qtree,
            self.flags, self.atime_ns, self.mtime_ns, self.ctime_ns, self.btime_ns, self.rdev,
            self.xattr_ino, self.blocks, self.height, INODE_VERSION,
        )
        head += bytes(_PTRS_AT - len(head))
        return head + self._ptr_bytes()

    @classmethod
    def decode(cls, ino: int, data: bytes | memoryview) -> Inode:
        """Decode inode `ino`'s record. A slot never written is all zeros (version 0);
        anything else must be a version-1 record whose fields are in range, or it is
        refused with a CorruptionError naming the inode."""
        if len(data) < INODE_SIZE:
            raise CorruptionError(f"inode {ino}: short record ({len(data)} bytes)")
        (mode, nlink, uid, gid, size, gen, qtree, flags, at, mt, ct, bt, rdev, xino, blocks,
         height, version, zeros) = _CHECKED.unpack_from(data)
        if version != INODE_VERSION:
            if version == 0 and data[:INODE_SIZE] == _EMPTY:
                return cls(ino)
            raise CorruptionError(f"inode {ino}: record version {version} is not supported "
                                  f"(this snapvol reads version {INODE_VERSION})")
        if zeros != _ZEROS:
            raise CorruptionError(f"inode {ino}: nonzero bytes in the reserved bytes "
                                  f"{_ZERO_AT}..{_PTRS_AT - 1}")
        # mode >> 12 in _TYPE_CODES also says that no bit above the type is set
        if height > MAX_HEIGHT or flags & ~INODE_FLAGS_KNOWN or size > MAX_FILE_SIZE or (
                mode and mode >> 12 not in _TYPE_CODES):
            raise CorruptionError(f"inode {ino}: impossible fields (mode {mode:o}, flags "
                                  f"{flags:#x}, size {size}, tree height {height})")
        raw = bytes(data[_PTRS_AT:INODE_SIZE])
        return cls(ino, mode, nlink, uid, gid, size, gen, qtree, flags, at, mt, ct, bt, rdev,
                   xino, blocks, height, None, raw)

    def copy(self) -> Inode:
        return Inode(
            self.ino, self.mode, self.nlink, self.uid, self.gid, self.size, self.generation,
            self.qtree, self.flags, self.atime_ns, self.mtime_ns, self.ctime_ns, self.btime_ns,
            self.rdev, self.xattr_ino, self.blocks, self.height,
            None if self._ptrs is None else self._ptrs.copy(), self._raw_ptrs,
        )
