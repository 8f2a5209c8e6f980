"""The fixed records: superblock, CP root record and tree descriptors.

Block 0 holds the superblock, written once at creation. Blocks 1 and 2 are the two root
slots; each CP writes its root record into the slot holding the older CP, and mount takes
the valid slot with the higher CP count (DESIGN.md §3.2). Both records end in a checksum
so a torn or stale write is recognised, never trusted.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from dataclasses import dataclass, field

from snapvol.layout.checksum import record_checksum
from snapvol.layout.constants import BLOCK_SIZE, FORMAT_VERSION
from snapvol.layout.pointer import HOLE, Pointer

SUPER_MAGIC = b"SNAPVOL\x00"
ROOT_MAGIC = b"SVROOT\x00\x00"


class RecordError(ValueError):
    """A fixed record failed validation; the message says which check."""


def seal(body: bytes) -> bytes:
    """Pad a record to a block and end it with the checksum of everything before."""
    body += bytes(BLOCK_SIZE - len(body) - 8)
    return body + struct.pack("<Q", record_checksum(body))


def unseal(data: bytes, magic: bytes, what: str) -> None:
    """Check a sealed record's magic and checksum; RecordError names what failed."""
    if len(data) < BLOCK_SIZE or data[: len(magic)] != magic:
        raise RecordError(f"no {what} (bad magic)")
    body, (csum,) = data[: BLOCK_SIZE - 8], struct.unpack("<Q", data[BLOCK_SIZE - 8 : BLOCK_SIZE])
    if record_checksum(body) != csum:
        raise RecordError(f"{what} checksum mismatch")


@dataclass(frozen=True, slots=True)
class TreeRoot:
    """Where a metadata file's block tree starts: one top pointer, height, size in blocks.

    Height 0 means the pointer addresses data block 0 directly; height h means it
    addresses an indirect block of level h covering 256**h blocks.
    """

    ptr: Pointer = HOLE
    height: int = 0
    nblocks: int = 0

    _FMT = struct.Struct("<QQB7xQ")
    SIZE = 32

    def encode(self) -> bytes:
        return self._FMT.pack(self.ptr.vbn, self.ptr.csum, self.height, self.nblocks)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> TreeRoot:
        vbn, csum, height, nblocks = cls._FMT.unpack(data[: cls.SIZE])
        return cls(Pointer(vbn, csum), height, nblocks)


@dataclass(frozen=True, slots=True)
class Superblock:
    nblocks: int
    uuid: bytes
    created_ns: int
    version: int = FORMAT_VERSION
    block_size: int = BLOCK_SIZE

    _FMT = struct.Struct("<8sIIQ16sq")

    def encode(self) -> bytes:
        return seal(self._FMT.pack(
            SUPER_MAGIC, self.version, self.block_size, self.nblocks, self.uuid, self.created_ns
        ))

    @classmethod
    def decode(cls, data: bytes) -> Superblock:
        unseal(data, SUPER_MAGIC, "snapvol superblock")
        _magic, version, bsize, nblocks, uid, created = cls._FMT.unpack_from(data)
        if version != FORMAT_VERSION:
            raise RecordError(
                f"format version {version} is not supported (this is {FORMAT_VERSION})"
            )
        if bsize != BLOCK_SIZE:
            raise RecordError(f"block size {bsize} is not supported")
        return cls(nblocks, uid, created, version, bsize)

    @property
    def uuid_str(self) -> str:
        return str(uuidlib.UUID(bytes=self.uuid))



RECEIVE_UPDATING = 1
"""RootRecord.receive_flags: the pending receive overwrites blocks of the destination's
current state (its base is a shadow snapshot), so the destination cannot be read until
that receive completes."""

@dataclass(frozen=True, slots=True)
class RootRecord:
    """The root of one consistency point: everything else is reachable from here."""

    cp_count: int
    time_ns: int
    uuid: bytes
    nblocks: int
    inode_file: TreeRoot = field(default_factory=TreeRoot)
    active_plane: TreeRoot = field(default_factory=TreeRoot)
    summary_plane: TreeRoot = field(default_factory=TreeRoot)
    snap_table: TreeRoot = field(default_factory=TreeRoot)
    next_snap_id: int = 1
    version: int = FORMAT_VERSION
    # A partial image-stream receive (snapvol.image): the receive-state file (the pinned
    # selection plane, then the stream's header and table), how far the blocks are
    # durable, and the state's flags. All zero when no receive is pending; older records
    # have zeros there, so they read as "none".
    receive: TreeRoot = field(default_factory=TreeRoot)
    receive_done: int = 0
    receive_flags: int = 0

    _HEAD = struct.Struct("<8sIIQq16sQQ")
    TREES_AT = 64
    RECEIVE_AT = 192
    _RECEIVE_TAIL = struct.Struct("<QI4x")

    def encode(self) -> bytes:
        head = self._HEAD.pack(
            ROOT_MAGIC, self.version, 0, self.cp_count, self.time_ns, self.uuid,
            self.nblocks, self.next_snap_id,
        )
        head += bytes(self.TREES_AT - len(head))
        trees = b"".join(
            t.encode()
            for t in (self.inode_file, self.active_plane, self.summary_plane, self.snap_table)
        )
        tail = self.receive.encode() + self._RECEIVE_TAIL.pack(self.receive_done,
                                                                self.receive_flags)
        return seal(head + trees + tail)

    @classmethod
    def decode(cls, data: bytes) -> RootRecord:
        unseal(data, ROOT_MAGIC, "root record")
        _magic, version, _flags, cp, t, uid, nblocks, next_snap = cls._HEAD.unpack_from(data)
        if version != FORMAT_VERSION:
            raise RecordError(f"root record version {version} is not supported")
        at = cls.TREES_AT
        ino, act, summ, snap = (TreeRoot.decode(data[at + i * TreeRoot.SIZE :]) for i in range(4))
        recv = TreeRoot.decode(data[cls.RECEIVE_AT :])
        done, rflags = cls._RECEIVE_TAIL.unpack_from(data, cls.RECEIVE_AT + TreeRoot.SIZE)
        return cls(cp, t, uid, nblocks, ino, act, summ, snap, next_snap, version, recv, done,
                   rflags)
