"""Snapshot table entries (512 bytes, 8 per block, 255 entries at most).

An entry keeps the snapshot's identity (name, GUID, CP count, creation time) and the roots
of its image: the four trees of that CP's root record (inode file, active plane,
summary plane, snapshot table). The snapshot's
own bitplane is that plane file, read through the saved root (DESIGN.md §3.4).

Two fields say where a snapshot belongs. `SNAP_RECEIVED` marks an entry that arrived in
an image stream (the receive's switch sets it), as opposed to one taken on this volume: a
receive may drop a received snapshot the source no longer holds, but never one taken
here unless told to (DESIGN.md §9, "What stays local"). `replica_for` is the UUID of the
volume a replication snapshot (`SNAP_REPLICA`) was made for, so each destination of
`snapvol replicate` keeps its own and a run retires only that destination's older ones,
whatever the snapshots were renamed to.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from snapvol.layout.constants import MAX_NAME, SNAP_ENTRY_SIZE
from snapvol.layout.records import RecordError, TreeRoot, check_zero

SNAP_IN_USE = 1
SNAP_SHADOW = 2
SNAP_REPLICA = 4  # made by `snapvol replicate`, which may retire it (never a user's)
SNAP_RECEIVED = 8  # arrived in an image stream (not taken on this volume)
SNAP_KNOWN_FLAGS = SNAP_IN_USE | SNAP_SHADOW | SNAP_REPLICA | SNAP_RECEIVED

NO_VOLUME = bytes(16)
"""`replica_for` of an entry that is no replication snapshot, or of one made before the
field existed (it is zero there)."""

_FMT = struct.Struct("<IHH16sQqQ16s")
_TREES_AT = 64
_NAME_AT = 256
_EMPTY = bytes(SNAP_ENTRY_SIZE)


@dataclass(frozen=True, slots=True)
class SnapEntry:
    snap_id: int
    name: str
    guid: bytes
    cp_count: int
    created_ns: int
    inode_file: TreeRoot
    active_plane: TreeRoot
    summary_plane: TreeRoot
    snap_table: TreeRoot
    flags: int = SNAP_IN_USE
    replica_for: bytes = NO_VOLUME  # the destination's volume UUID, for SNAP_REPLICA

    def encode(self) -> bytes:
        raw = self.name.encode()
        if not 0 < len(raw) <= MAX_NAME:
            raise ValueError("snapshot name must be 1 to 255 bytes")
        head = _FMT.pack(self.flags, len(raw), 0, self.guid, self.cp_count, self.created_ns,
                         self.snap_id, self.replica_for)
        head += bytes(_TREES_AT - len(head))
        trees = b"".join(t.encode() for t in self.trees)
        body = head + trees
        body += bytes(_NAME_AT - len(body)) + raw
        return body + bytes(SNAP_ENTRY_SIZE - len(body))

    @classmethod
    def decode(cls, data: bytes | memoryview,
               what: str = "snapshot table entry") -> SnapEntry | None:
        """The entry, or None for a free slot (all zeros); RecordError naming `what` for
        anything else this version does not know or that cannot be."""
        if len(data) < SNAP_ENTRY_SIZE:
            raise RecordError(f"{what}: {len(data)} bytes, an entry is {SNAP_ENTRY_SIZE}")
        flags, nlen, pad, guid, cp, created, snap_id, replica_for = _FMT.unpack_from(data)
        if not flags & SNAP_IN_USE:
            if data[:SNAP_ENTRY_SIZE] != _EMPTY:
                raise RecordError(f"{what}: a free slot that is not all zeros")
            return None
        if flags & ~SNAP_KNOWN_FLAGS:
            raise RecordError(f"{what}: unknown flags {flags & ~SNAP_KNOWN_FLAGS:#x}")
        if pad or not 0 < nlen <= MAX_NAME or cp < 1 or snap_id < 1:
            raise RecordError(f"{what}: impossible fields (name length {nlen}, CP {cp}, "
                              f"id {snap_id})")
        check_zero(data, _FMT.size, _TREES_AT, what)
        ino, act, summ, snap = (
            TreeRoot.decode(data[_TREES_AT + i * TreeRoot.SIZE :], f"{what}: tree {i}")
            for i in range(4)
        )
        check_zero(data, _TREES_AT + 4 * TreeRoot.SIZE, _NAME_AT, what)
        check_zero(data, _NAME_AT + nlen, SNAP_ENTRY_SIZE, what)
        if replica_for != NO_VOLUME and not flags & SNAP_REPLICA:
            raise RecordError(f"{what}: a replication target on an entry that is no "
                              "replication snapshot")
        try:
            name = bytes(data[_NAME_AT : _NAME_AT + nlen]).decode()
        except UnicodeDecodeError:
            raise RecordError(f"{what}: the name is not UTF-8") from None
        return cls(snap_id, name, guid, cp, created, ino, act, summ, snap, flags, replica_for)

    @property
    def shadow(self) -> bool:
        """A shadow snapshot (bookmark): a plane and an identity, no readable tree."""
        return bool(self.flags & SNAP_SHADOW)

    @property
    def replica(self) -> bool:
        """Made by `snapvol replicate` for its own use."""
        return bool(self.flags & SNAP_REPLICA)

    @property
    def received(self) -> bool:
        """Arrived in an image stream; False for a snapshot taken on this volume."""
        return bool(self.flags & SNAP_RECEIVED)

    @property
    def trees(self) -> tuple[TreeRoot, TreeRoot, TreeRoot, TreeRoot]:
        """The four trees of the snapshot's CP root, in root-record order."""
        return (self.inode_file, self.active_plane, self.summary_plane, self.snap_table)
