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

from snapvol.errors import CorruptionError
from snapvol.layout.checksum import record_checksum
from snapvol.layout.constants import (
    BLOCK_SIZE,
    FIRST_DATA_VBN,
    FORMAT_VERSION,
    MAX_HEIGHT,
    MAX_VOLUME_BLOCKS,
    MIN_VOLUME_BLOCKS,
    ROOT_SLOT_VBNS,
    SNAP_TABLE_BLOCKS,
)
from snapvol.layout.features import Features
from snapvol.layout.pointer import HOLE, Pointer

SUPER_MAGIC = b"SNAPVOL\x00"
ROOT_MAGIC = b"SVROOT\x00\x00"


class RecordError(CorruptionError, ValueError):
    """A fixed record failed validation; the message names the record and the check."""


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


def check_zero(data: bytes | memoryview, start: int, end: int, what: str) -> None:
    """Refuse nonzero bytes in [start, end) of a record, where the format says zero."""
    if any(data[start:end]):
        first = next(i for i in range(start, end) if data[i])
        raise RecordError(f"{what}: byte {first} is {data[first]:#04x}, but bytes "
                          f"{start}..{end - 1} must be zero")


@dataclass(frozen=True, slots=True)
class TreeRoot:
    """Where a metadata file's block tree starts: one top pointer, height, size in blocks.

    Height 0 means the pointer addresses data block 0 directly; height h means it
    addresses an indirect block of level h covering 256**h blocks.
    """

    ptr: Pointer = HOLE
    height: int = 0
    nblocks: int = 0

    _FMT = struct.Struct("<QQB7sQ")
    SIZE = 32

    def encode(self) -> bytes:
        return self._FMT.pack(self.ptr.vbn, self.ptr.csum, self.height, bytes(7),
                              self.nblocks)

    @classmethod
    def decode(cls, data: bytes | memoryview, what: str = "tree root") -> TreeRoot:
        """Decode and check what a TreeRoot can say about itself: the zero bytes, the
        height, and that a hole has no checksum. Where the pointer may point depends on
        the volume: `problem` checks that."""
        vbn, csum, height, pad, nblocks = cls._FMT.unpack(data[: cls.SIZE])
        if any(pad):
            raise RecordError(f"{what}: bytes 17..23 must be zero")
        if height > MAX_HEIGHT:
            raise RecordError(f"{what}: tree height {height}, the largest is {MAX_HEIGHT}")
        if vbn == 0 and csum:
            raise RecordError(f"{what}: a hole pointer with checksum {csum:#x}")
        return cls(Pointer(vbn, csum), height, nblocks)

    def problem(self, nblocks: int) -> str | None:
        """Why this root cannot belong to a volume of `nblocks` blocks, or None: its
        pointer is a hole or addresses an allocatable block of the volume."""
        vbn = self.ptr.vbn
        if vbn and not FIRST_DATA_VBN <= vbn < nblocks:
            return f"points to VBN {vbn}, outside the data area {FIRST_DATA_VBN}..{nblocks - 1}"
        return None


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
        if not MIN_VOLUME_BLOCKS <= nblocks <= MAX_VOLUME_BLOCKS:
            raise RecordError(f"superblock: volume size {nblocks} blocks is outside "
                              f"{MIN_VOLUME_BLOCKS}..{MAX_VOLUME_BLOCKS}")
        if not any(uid):
            raise RecordError("superblock: the volume UUID is zero")
        check_zero(data, cls._FMT.size, BLOCK_SIZE - 8, "superblock")
        return cls(nblocks, uid, created, version, bsize)

    @property
    def uuid_str(self) -> str:
        return str(uuidlib.UUID(bytes=self.uuid))



RECEIVE_UPDATING = 1
"""RootRecord.receive_flags: the pending receive overwrites blocks of the destination's
current state (its base is a shadow snapshot), so the destination cannot be read until
that receive completes."""
RECEIVE_FLAGS_KNOWN = RECEIVE_UPDATING
MAX_RECEIVE_STATE = 256
"""Blocks of the receive-state file past its selection plane (the stream's header and
table take about 33); a record claiming more is damaged."""


def plane_blocks(nblocks: int) -> int:
    """Plane blocks of a volume of `nblocks` blocks (one bit per block, 32768 per block)."""
    return -(-nblocks // (BLOCK_SIZE * 8))


def slot_of(cp_count: int) -> int:
    """The root slot (VBN) that CP `cp_count` is written to: 1 for even, 2 for odd."""
    return ROOT_SLOT_VBNS[cp_count % 2]


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
    features: Features = field(default_factory=Features)

    _HEAD = struct.Struct("<8sIIQq16sQQ")
    TREES_AT = 64
    RECEIVE_AT = 192
    _RECEIVE_TAIL = struct.Struct("<QI4x")
    FEATURES_AT = 240
    _FEATURES = struct.Struct("<III4x")
    END = FEATURES_AT + _FEATURES.size  # 256: bytes from here to the checksum are zero
    TREE_NAMES = ("inode file", "active plane", "summary plane", "snapshot table")

    def encode(self) -> bytes:
        head = self._HEAD.pack(
            ROOT_MAGIC, self.version, 0, self.cp_count, self.time_ns, self.uuid,
            self.nblocks, self.next_snap_id,
        )
        head += bytes(self.TREES_AT - len(head))
        trees = b"".join(t.encode() for t in self.trees)
        tail = self.receive.encode() + self._RECEIVE_TAIL.pack(self.receive_done,
                                                                self.receive_flags)
        f = self.features
        tail += self._FEATURES.pack(f.compat, f.ro_compat, f.incompat)
        return seal(head + trees + tail)

    @property
    def trees(self) -> tuple[TreeRoot, TreeRoot, TreeRoot, TreeRoot]:
        """The four trees of the CP, in record order (as a snapshot entry keeps them)."""
        return (self.inode_file, self.active_plane, self.summary_plane, self.snap_table)

    @classmethod
    def decode(cls, data: bytes, slot: int | None = None) -> RootRecord:
        """Decode a root record and check every field the record can check alone: the
        magic, checksum and version, the zero bytes, and the ranges (CP count past 0 and,
        when `slot` is given, written to that CP's slot; every tree pointer inside the
        volume the record names; receive fields consistent with the receive tree)."""
        unseal(data, ROOT_MAGIC, "root record")
        what = "root record"
        _magic, version, flags, cp, t, uid, nblocks, next_snap = cls._HEAD.unpack_from(data)
        if version != FORMAT_VERSION:
            raise RecordError(f"root record version {version} is not supported")
        if flags:
            raise RecordError(f"{what}: flags {flags:#x} at byte 12 must be zero")
        if cp < 1:
            raise RecordError(f"{what}: CP count {cp}")
        if slot is not None and slot_of(cp) != slot:
            raise RecordError(f"{what}: CP {cp} belongs in slot {slot_of(cp)}, not in "
                              f"slot {slot}")
        if not MIN_VOLUME_BLOCKS <= nblocks <= MAX_VOLUME_BLOCKS:
            raise RecordError(f"{what}: volume size {nblocks} blocks")
        if next_snap < 1:
            raise RecordError(f"{what}: next snapshot id {next_snap}")
        at = cls.TREES_AT
        trees = []
        for i, name in enumerate(cls.TREE_NAMES):
            tree = TreeRoot.decode(data[at + i * TreeRoot.SIZE :], f"{what}: {name}")
            why = tree.problem(nblocks)
            if why is not None:
                raise RecordError(f"{what}: {name} {why}")
            trees.append(tree)
        planes = plane_blocks(nblocks)
        ino, act, summ, snap = trees
        for name, tree in (("active plane", act), ("summary plane", summ)):
            if tree.nblocks != planes:
                raise RecordError(f"{what}: {name} of {tree.nblocks} blocks, but a volume of "
                                  f"{nblocks} blocks has {planes} plane blocks")
        if snap.nblocks > SNAP_TABLE_BLOCKS:
            raise RecordError(f"{what}: snapshot table of {snap.nblocks} blocks, at most "
                              f"{SNAP_TABLE_BLOCKS}")
        recv = TreeRoot.decode(data[cls.RECEIVE_AT :], f"{what}: receive state")
        if recv.nblocks and not planes < recv.nblocks <= planes + MAX_RECEIVE_STATE:
            raise RecordError(f"{what}: receive state of {recv.nblocks} blocks")
        why = recv.problem(nblocks)
        if why is not None:
            raise RecordError(f"{what}: receive state {why}")
        done, rflags = cls._RECEIVE_TAIL.unpack_from(data, cls.RECEIVE_AT + TreeRoot.SIZE)
        check_zero(data, cls.FEATURES_AT - 4, cls.FEATURES_AT, what)
        if rflags & ~RECEIVE_FLAGS_KNOWN:
            raise RecordError(f"{what}: unknown receive flags {rflags:#x}")
        if done > nblocks:
            raise RecordError(f"{what}: receive durable below VBN {done}, past the volume")
        if not recv.nblocks and (recv.ptr.vbn or done or rflags):
            raise RecordError(f"{what}: receive fields set without a receive state")
        compat, ro_compat, incompat = cls._FEATURES.unpack_from(data, cls.FEATURES_AT)
        check_zero(data, cls.END - 4, BLOCK_SIZE - 8, what)
        return cls(cp, t, uid, nblocks, ino, act, summ, snap, next_snap, version, recv, done,
                   rflags, Features(compat, ro_compat, incompat))


def probe_cp_count(data: bytes) -> int | None:
    """The CP count a root slot claims, without trusting it: read from a record that
    fails its checksum, to tell the user which CP it was (None if not even the magic is
    there). Nothing may follow such a record's pointers."""
    if len(data) < RootRecord._HEAD.size or data[: len(ROOT_MAGIC)] != ROOT_MAGIC:
        return None
    return int(RootRecord._HEAD.unpack_from(data)[3])
