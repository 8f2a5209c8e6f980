"""The inode record (256 bytes, 16 per inode-file block).

Inode number N lives at byte (N % 16) * 256 of block N // 16 of the inode file. A free
slot has mode 0 but keeps its generation, so a reused number gets generation + 1 and an
old (ino, generation) handle can never name the new file.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass, field

import numpy as np

from snapvol.layout.constants import INODE_DIRECT, INODE_SIZE
from snapvol.layout.pointer import PTR_DTYPE

_FMT = struct.Struct("<IIIIQQIIqqqqQQQBB6x")
_PTRS_AT = 128


def _no_ptrs() -> np.ndarray:
    return np.zeros(INODE_DIRECT, dtype=PTR_DTYPE)


@dataclass(slots=True, eq=False)
class Inode:
    ino: int
    mode: int = 0
    nlink: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    generation: int = 0
    qtree: int = 0
    flags: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    btime_ns: int = 0
    rdev: int = 0
    xattr_ino: int = 0
    blocks: int = 0  # blocks held by this file's tree (data and indirect), for st_blocks
    height: int = 0
    ptrs: np.ndarray = field(default_factory=_no_ptrs)

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

    def encode(self) -> bytes:
        head = _FMT.pack(
            self.mode, self.nlink, self.uid, self.gid, self.size, self.generation, self.qtree,
            self.flags, self.atime_ns, self.mtime_ns, self.ctime_ns, self.btime_ns, self.rdev,
            self.xattr_ino, self.blocks, self.height, 1,
        )
        head += bytes(_PTRS_AT - len(head))
        return head + self.ptrs.tobytes()

    @classmethod
    def decode(cls, ino: int, data: bytes | memoryview) -> Inode:
        if len(data) < INODE_SIZE:
            raise ValueError("short inode record")
        (mode, nlink, uid, gid, size, gen, qtree, flags, at, mt, ct, bt, rdev, xino, blocks,
         height, _version) = _FMT.unpack_from(data)
        ptrs = np.frombuffer(data, dtype=PTR_DTYPE, count=INODE_DIRECT, offset=_PTRS_AT).copy()
        return cls(ino, mode, nlink, uid, gid, size, gen, qtree, flags, at, mt, ct, bt, rdev,
                   xino, blocks, height, ptrs)

    def copy(self) -> Inode:
        return Inode(
            self.ino, self.mode, self.nlink, self.uid, self.gid, self.size, self.generation,
            self.qtree, self.flags, self.atime_ns, self.mtime_ns, self.ctime_ns, self.btime_ns,
            self.rdev, self.xattr_ino, self.blocks, self.height, self.ptrs.copy(),
        )
