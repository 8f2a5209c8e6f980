"""The image stream: VBN-tagged blocks of a storage image, as a sequence of records.

Pure encode/decode, no I/O (the sans-IO style of h11). `Encoder` turns records into byte
chunks; `Decoder` is fed byte chunks of any size (one byte at a time works) and yields
records as they complete, checking each one before anything uses it (DESIGN.md §3.7):

- every record ends in `xxh3_64(frame + payload, seed=record number)`, so a changed byte,
  a dropped record, a repeated record and two records swapped are all caught;
- records come in one order: HEADER, TABLE, PLANE..., BLOCKS..., END, nothing after;
- an unknown record type is skipped when its REQUIRED flag is clear, refused otherwise;
- sizes are bounded (`MAX_PAYLOAD`, `MAX_RUN`, and the caller's `max_blocks`, at most
  `MAX_VOLUME_BLOCKS`) before any buffer grows to hold them: a header describing a
  volume past the caller's limit is refused before its plane is made;
- every byte the format says is zero is zero, and every field with a range is inside it
  (flags, roles, counts, GUIDs, CP order, tree roots inside the volume);
- snapshot names in the table follow the volume's rules (no `/` or NUL, not `.`/`..`);
- BLOCKS runs ascend, lie inside the volume and inside the selection plane the stream
  announced, and END's totals match what came.

The byte layout of every record is in docs/FORMAT.md ("Image streams").
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import xxhash

from snapvol.errors import SnapvolError
from snapvol.layout.constants import (
    BLOCK_SIZE,
    FIRST_DATA_VBN,
    MAX_HEIGHT,
    MAX_NAME,
    MAX_SNAPSHOTS,
    SNAP_ENTRY_SIZE,
    SNAP_TABLE_BLOCKS,
)
from snapvol.layout.names import InvalidName, check_stored_snapshot_name
from snapvol.layout.records import RecordError, TreeRoot
from snapvol.layout.snaptable import (
    NO_VOLUME,
    SNAP_IN_USE,
    SNAP_KNOWN_FLAGS,
    SNAP_REPLICA,
    SnapEntry,
)
from snapvol.planes import PLANE_BLOCK_BYTES, Plane

STREAM_MAGIC = b"SVSTREAM"
STREAM_VERSION = 1

REC_HEADER = 1
REC_TABLE = 2
REC_PLANE = 3
REC_BLOCKS = 4
REC_END = 5
REC_NAMES = {REC_HEADER: "HEADER", REC_TABLE: "TABLE", REC_PLANE: "PLANE",
             REC_BLOCKS: "BLOCKS", REC_END: "END"}

FLAG_REQUIRED = 1
"""Record flag: a reader that does not know the type must refuse the stream. The other
flag bits are zero."""

HDR_INCREMENTAL = 1
HDR_RESUMED = 2
HDR_SHADOW_BASE = 4
KNOWN_HEADER_FLAGS = HDR_INCREMENTAL | HDR_RESUMED | HDR_SHADOW_BASE

ROLE_TOP = 1  # the snapshot the stream brings (SNAP)
ROLE_CARRIED = 2  # an older snapshot whose blocks the stream carries too
ROLE_BASE = 3  # the base of an incremental stream; the destination must hold it
ROLE_HELD = 4  # older than the base; its blocks are not sent, the destination holds them
ROLE_NAMES = {ROLE_TOP: "top", ROLE_CARRIED: "carried", ROLE_BASE: "base", ROLE_HELD: "held"}

ITEM_REQUIRED = 1
"""TABLE item flag on a held snapshot: some of the blocks subtracted for it are in the
snapshots the stream brings (a restore brought them back), so the destination must hold
it; a held snapshot without the flag may be missing there (it is then dropped)."""

MAX_RUN = 256
"""Blocks per BLOCKS record (1 MiB): long enough that per-record work is noise."""
MAX_PLANE_RUN = 256
"""Plane blocks per PLANE record."""
FIXED_MASK = (1 << FIRST_DATA_VBN) - 1
"""VBNs 0-2 (superblock, root slots) belong to each volume and are never in a stream."""
MAX_VOLUME_BLOCKS = 1 << 40
"""Largest volume a stream may describe (4 PiB): bounds the plane a decoder builds."""

FRAME = struct.Struct("<HHIQ")  # type, flags, reserved, payload length
TRAILER = struct.Struct("<Q")
OVERHEAD = FRAME.size + TRAILER.size
_HEADER = struct.Struct("<8sII16sQII16s16sQQQ24x")
_COUNT = struct.Struct("<I4x")
_BLOCKS = struct.Struct("<QI4x")
_END = struct.Struct("<QQ16x")
_ROLE = struct.Struct("<BB6x")  # role, item flags
TABLE_ITEM = _ROLE.size + SNAP_ENTRY_SIZE
MAX_PAYLOAD = max(_BLOCKS.size + MAX_RUN * BLOCK_SIZE,
                  _COUNT.size + MAX_PLANE_RUN * (4 + PLANE_BLOCK_BYTES) + 8,
                  _COUNT.size + (MAX_SNAPSHOTS + 1) * TABLE_ITEM)


class StreamError(SnapvolError):
    """The stream is damaged, truncated, out of order or from an unknown version."""


class StreamTooLarge(StreamError):
    """The HEADER describes a volume larger than the decoder's caller accepts (the
    destination's size): refused before the selection plane is made."""

    def __init__(self, nblocks: int, limit: int) -> None:
        super().__init__(f"image stream describes a volume of {nblocks} blocks, past the "
                         f"limit of {limit} blocks")
        self.nblocks = nblocks
        self.limit = limit


def _zero(data: bytes | memoryview, lo: int, hi: int, what: str) -> None:
    """Refuse a record whose bytes lo..hi-1, which the format says are zero, are not."""
    if any(bytes(data[lo:hi])):
        raise StreamError(f"{what}: bytes {lo}..{hi - 1} must be zero (damaged stream, or "
                          "written by a newer snapvol)")


@dataclass(frozen=True, slots=True)
class StreamHeader:
    """What a stream is: whose blocks, which snapshot, relative to which base."""

    source_uuid: bytes
    nblocks: int
    snap_guid: bytes
    base_guid: bytes  # 16 zero bytes for a full stream
    selected: int  # blocks in the selection plane (the whole transfer, resumed or not)
    resume_from: int = 0  # the stream carries only selected blocks at or past this VBN
    flags: int = 0
    entries: int = 0  # snapshot table entries that follow
    time_ns: int = 0
    version: int = STREAM_VERSION
    block_size: int = BLOCK_SIZE

    @property
    def incremental(self) -> bool:
        return bool(self.flags & HDR_INCREMENTAL)

    @property
    def shadow_base(self) -> bool:
        return bool(self.flags & HDR_SHADOW_BASE)

    def encode(self) -> bytes:
        return _HEADER.pack(STREAM_MAGIC, self.version, self.flags, self.source_uuid,
                            self.nblocks, self.block_size, self.entries, self.snap_guid,
                            self.base_guid, self.selected, self.resume_from, self.time_ns)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> StreamHeader:
        if len(data) != _HEADER.size:
            raise StreamError(f"HEADER record is {len(data)} bytes, expected {_HEADER.size}")
        (magic, version, flags, uuid, nblocks, bsize, entries, snap, base, selected,
         resume_from, time_ns) = _HEADER.unpack(data)
        _zero(data, _HEADER.size - 24, _HEADER.size, "HEADER record")
        if magic != STREAM_MAGIC:
            raise StreamError("not a snapvol image stream (bad magic)")
        if version != STREAM_VERSION:
            raise StreamError(f"image stream version {version} is not supported "
                              f"(this snapvol reads version {STREAM_VERSION})")
        if flags & ~KNOWN_HEADER_FLAGS:
            raise StreamError(f"image stream uses unknown features (flags {flags:#x})")
        if bsize != BLOCK_SIZE:
            raise StreamError(f"image stream block size {bsize} is not supported")
        if not 0 < nblocks <= MAX_VOLUME_BLOCKS:
            raise StreamError(f"image stream volume size of {nblocks} blocks is out of range")
        if not 0 < entries <= MAX_SNAPSHOTS + 1:
            raise StreamError(f"image stream announces {entries} snapshots (limit "
                              f"{MAX_SNAPSHOTS + 1})")
        if selected > nblocks - min(nblocks, FIRST_DATA_VBN) or resume_from > nblocks:
            raise StreamError("image stream header counts exceed the volume size")
        if bool(flags & HDR_INCREMENTAL) != any(base):
            raise StreamError("image stream header: base GUID and incremental flag disagree")
        if not any(snap) or snap == base:
            raise StreamError("image stream header: the snapshot's GUID is zero or the base's")
        if flags & HDR_SHADOW_BASE and not flags & HDR_INCREMENTAL:
            raise StreamError("image stream header: a shadow base in a full stream")
        if resume_from and not flags & HDR_RESUMED:
            raise StreamError("image stream header: a resume VBN without the resumed flag")
        return cls(uuid, nblocks, snap, base, selected, resume_from, flags, entries,
                   time_ns, version, bsize)


@dataclass(frozen=True, slots=True)
class TableItem:
    role: int
    entry: SnapEntry
    required: bool = False  # HELD only: the increment relies on the destination holding it


@dataclass(frozen=True, slots=True)
class HeaderRecord:
    header: StreamHeader


@dataclass(frozen=True, slots=True)
class TableRecord:
    items: tuple[TableItem, ...]


@dataclass(frozen=True, slots=True)
class PlaneRecord:
    indexes: tuple[int, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class BlocksRecord:
    vbn: int
    count: int
    data: bytes | memoryview  # count blocks; a view of the record's own buffer (no copy)


@dataclass(frozen=True, slots=True)
class EndRecord:
    blocks: int
    records: int


Record = HeaderRecord | TableRecord | PlaneRecord | BlocksRecord | EndRecord


def record_size(payload: int) -> int:
    """Bytes a record with `payload` bytes of payload takes in the stream."""
    return OVERHEAD + payload


def plane_record_payload(count: int) -> int:
    return _COUNT.size + (4 * count + 7) // 8 * 8 + count * PLANE_BLOCK_BYTES


def blocks_record_payload(count: int) -> int:
    return _BLOCKS.size + count * BLOCK_SIZE


HEADER_PAYLOAD = _HEADER.size
END_PAYLOAD = _END.size


def table_payload(count: int) -> int:
    return _COUNT.size + count * TABLE_ITEM


class Encoder:
    """Records to bytes. Each method returns the chunks of one or more records; block
    data is passed through as given (no copy), so a 1 MiB run costs one hash."""

    def __init__(self) -> None:
        self.seq = 0

    def _record(self, rtype: int, *parts: bytes) -> list[bytes]:
        length = sum(len(p) for p in parts)
        frame = FRAME.pack(rtype, FLAG_REQUIRED, 0, length)
        h = xxhash.xxh3_64(frame, seed=self.seq)
        for p in parts:
            h.update(p)
        self.seq += 1
        return [frame, *parts, TRAILER.pack(h.intdigest())]

    def header(self, header: StreamHeader) -> list[bytes]:
        return self._record(REC_HEADER, header.encode())

    def table(self, items: list[TableItem]) -> list[bytes]:
        return self._record(REC_TABLE, encode_table(items))

    def plane(self, plane: Plane) -> list[bytes]:
        """PLANE records for the nonzero plane blocks of `plane` (none when it is empty)."""
        out: list[bytes] = []
        nonzero = plane.nonzero_blocks()
        rows = plane.words.reshape(-1, PLANE_BLOCK_BYTES // 8)
        for at in range(0, len(nonzero), MAX_PLANE_RUN):
            idx = nonzero[at : at + MAX_PLANE_RUN]
            head = _COUNT.pack(len(idx)) + np.asarray(idx, dtype="<u4").tobytes()
            head += bytes(-len(head) % 8)
            out += self._record(REC_PLANE, head, rows[idx].tobytes())
        return out

    def blocks(self, vbn: int, count: int, data: bytes) -> list[bytes]:
        return self._record(REC_BLOCKS, _BLOCKS.pack(vbn, count), data)

    def blocks_filled(self, vbn: int, count: int,
                      fill: Callable[[memoryview], None]) -> bytearray:
        """One whole BLOCKS record in one new buffer, its data put in place by `fill`
        (a positioned read straight into it): the sender's bulk path, with no copy of the
        data between the device and the output and one write per record."""
        n = blocks_record_payload(count)
        buf = bytearray(FRAME.size + n + TRAILER.size)
        FRAME.pack_into(buf, 0, REC_BLOCKS, FLAG_REQUIRED, 0, n)
        _BLOCKS.pack_into(buf, FRAME.size, vbn, count)
        end = FRAME.size + n
        with memoryview(buf) as mv:
            fill(mv[FRAME.size + _BLOCKS.size : end])
            TRAILER.pack_into(buf, end, xxhash.xxh3_64_intdigest(mv[:end], seed=self.seq))
        self.seq += 1
        return buf

    def end(self, blocks: int) -> list[bytes]:
        return self._record(REC_END, _END.pack(blocks, self.seq))


def encode_table(items: list[TableItem]) -> bytes:
    """The TABLE payload: a count, then per entry its role and its 512-byte table entry."""
    body = [_COUNT.pack(len(items))]
    body += [_ROLE.pack(i.role, ITEM_REQUIRED if i.required else 0) + i.entry.encode()
             for i in items]
    return b"".join(body)


def check_entry_name(raw: bytes) -> str:
    """The name of a table entry, or StreamError if the volume could not hold it. The
    table's rule, not the stricter one for new names (snapvol.layout.names): a stream
    from a volume that has older names still arrives whole."""
    try:
        return check_stored_snapshot_name(raw)
    except InvalidName as err:
        raise StreamError(f"image stream: {err}") from None


_TREE_NAMES = ("inode file", "active plane", "summary plane", "snapshot table")
_ENTRY_TREES_AT = 64  # offsets in a snapshot table entry (docs/FORMAT.md, layout.snaptable)
_ENTRY_NAME_AT = 256


def _check_tree(root: TreeRoot, what: str, nblocks: int) -> None:
    """A tree root of a table entry: its top pointer a hole or inside the data area of a
    volume of `nblocks`, and its height inside the format's. (Its size may pass what the
    height addresses: blocks past the last written one are holes.)"""
    vbn = root.ptr.vbn
    if vbn and not FIRST_DATA_VBN <= vbn < nblocks:
        raise StreamError(f"{what}: its root points to VBN {vbn}, outside the volume")
    if root.height > MAX_HEIGHT:
        raise StreamError(f"{what}: height {root.height} is out of range (at most "
                          f"{MAX_HEIGHT})")
    if not vbn and root.ptr.csum:
        raise StreamError(f"{what}: a hole with a checksum")


def _check_entry(raw: bytes, role: int, header: StreamHeader, where: str) -> SnapEntry:
    """One 512-byte table entry, every field checked (docs/FORMAT.md "Snapshot table")."""
    flags, nlen, pad = struct.unpack_from("<IHH", raw)
    if flags & ~SNAP_KNOWN_FLAGS or not flags & SNAP_IN_USE or pad:
        raise StreamError(f"{where} is malformed (flags {flags:#x})")
    if not 0 < nlen <= MAX_NAME:
        raise StreamError(f"{where} has a name of {nlen} bytes")
    check_entry_name(raw[_ENTRY_NAME_AT : _ENTRY_NAME_AT + nlen])
    _zero(raw, _ENTRY_TREES_AT + 4 * TreeRoot.SIZE, _ENTRY_NAME_AT, where)
    _zero(raw, _ENTRY_NAME_AT + nlen, SNAP_ENTRY_SIZE, where)
    for i in range(4):
        at = _ENTRY_TREES_AT + i * TreeRoot.SIZE
        _zero(raw, at + 17, at + 24, where)  # the TreeRoot's 7 bytes after its height
    try:
        entry = SnapEntry.decode(raw, where)
    except RecordError as err:
        raise StreamError(str(err)) from None
    assert entry is not None
    if not any(entry.guid):
        raise StreamError(f"{where} has a zero GUID")
    if entry.replica_for != NO_VOLUME and not entry.flags & SNAP_REPLICA:
        raise StreamError(f"{where} names a replication target but is no replication "
                          "snapshot")
    shadow = role == ROLE_BASE and header.shadow_base
    if entry.shadow != shadow:
        raise StreamError(f"{where}: only the base of a stream from a shadow base is a "
                          "shadow snapshot")
    if entry.shadow and any(t != TreeRoot() for t in entry.trees):
        raise StreamError(f"{where}: a shadow snapshot with tree roots")
    if not entry.shadow:
        plane_blocks = -(-header.nblocks // (PLANE_BLOCK_BYTES * 8))
        for name, root in zip(_TREE_NAMES, entry.trees, strict=True):
            _check_tree(root, f"{where}, {name}", header.nblocks)
        if not entry.inode_file.ptr.vbn or not entry.inode_file.nblocks:
            raise StreamError(f"{where} has no inode file")
        if not entry.active_plane.ptr.vbn:
            raise StreamError(f"{where} has no active plane")
        # A snapshot received from a smaller volume keeps that volume's plane size.
        for root in (entry.active_plane, entry.summary_plane):
            if not 0 < root.nblocks <= plane_blocks:
                raise StreamError(f"{where}: a plane of {root.nblocks} blocks, past the "
                                  f"{plane_blocks} of the volume")
        if entry.snap_table.nblocks > SNAP_TABLE_BLOCKS:
            raise StreamError(f"{where}: a snapshot table of {entry.snap_table.nblocks} "
                              "blocks")
    return entry


def decode_table(data: bytes | memoryview, header: StreamHeader) -> tuple[TableItem, ...]:
    """The TABLE payload, checked against the header (roles, GUIDs, names, trees)."""
    if len(data) < _COUNT.size:
        raise StreamError("TABLE record is too short")
    (count,) = _COUNT.unpack_from(data)
    if count != header.entries or len(data) != table_payload(count):
        raise StreamError(f"TABLE record holds {count} entries in {len(data)} bytes; the "
                          f"header announced {header.entries}")
    _zero(data, 4, _COUNT.size, "TABLE record")
    items: list[TableItem] = []
    guids: set[bytes] = set()
    names: set[str] = set()
    for i in range(count):
        at = _COUNT.size + i * TABLE_ITEM
        role, item_flags = _ROLE.unpack_from(data, at)
        raw = bytes(data[at + _ROLE.size : at + TABLE_ITEM])
        if role not in ROLE_NAMES or (
                item_flags & ~ITEM_REQUIRED or (item_flags and role != ROLE_HELD)):
            raise StreamError(f"TABLE entry {i} is malformed (role {role}, item flags "
                              f"{item_flags})")
        _zero(data, at + 2, at + _ROLE.size, f"TABLE entry {i}")
        entry = _check_entry(raw, role, header, f"TABLE entry {i}")
        if entry.guid in guids or entry.name in names:
            raise StreamError(f"TABLE lists snapshot {entry.name!r} twice")
        guids.add(entry.guid)
        names.add(entry.name)
        items.append(TableItem(role, entry, bool(item_flags & ITEM_REQUIRED)))
    tops = [t for t in items if t.role == ROLE_TOP]
    bases = [t for t in items if t.role == ROLE_BASE]
    if len(tops) != 1 or tops[0].entry.guid != header.snap_guid:
        raise StreamError("TABLE does not name the header's snapshot exactly once")
    if header.incremental and (len(bases) != 1 or bases[0].entry.guid != header.base_guid):
        raise StreamError("TABLE does not name the header's base exactly once")
    if not header.incremental and (bases or any(t.role == ROLE_HELD for t in items)):
        raise StreamError("TABLE of a full stream names a base")
    top_cp = tops[0].entry.cp_count
    older = [t.entry.name for t in items if t.role != ROLE_TOP and t.entry.cp_count >= top_cp]
    if older:
        raise StreamError(f"TABLE: snapshot {older[0]!r} is not older than the snapshot the "
                          "stream brings")
    return tuple(items)


def _past_end(plane: Plane) -> bool:
    """Whether any bit at or past `plane.nblocks` is set (only a damaged stream does)."""
    word, bit = divmod(plane.nblocks, 64)
    if bit and int(plane.words[word]) >> bit:
        return True
    return bool(plane.words[word + (1 if bit else 0) :].any())


def count_from(plane: Plane, vbn: int) -> int:
    """Blocks of `plane` at or past `vbn`."""
    word, bit = divmod(vbn, 64)
    words = plane.words
    total = int(np.bitwise_count(words[word + 1 :]).sum(dtype=np.uint64)) if word + 1 < len(
        words) else 0
    if word < len(words):
        total += (int(words[word]) >> bit).bit_count()
    return total


class Decoder:
    """Bytes in, checked records out. `feed` chunks, take `records()`, then `finish()`.

    Nothing a record says is used before its checksum and its place in the order are
    checked; the first problem raises StreamError and the decoder stays failed.
    """

    _HEADER, _TABLE, _PLANE, _BLOCKS, _DONE = range(5)

    def __init__(self, max_blocks: int = MAX_VOLUME_BLOCKS) -> None:
        """`max_blocks` is the largest volume the caller takes (a receive: the
        destination's size): a HEADER past it raises StreamTooLarge before the selection
        plane, which costs a bit per block, is made."""
        self.max_blocks = min(max_blocks, MAX_VOLUME_BLOCKS)
        self._buf = bytearray()
        self._pos = 0
        self.seq = 0
        self.offset = 0  # stream bytes consumed by complete records
        self._state = self._HEADER
        self.header: StreamHeader | None = None
        self.table: tuple[TableItem, ...] = ()
        self.plane: Plane | None = None
        self._last_index = -1
        self._next_vbn = 0
        self.blocks = 0
        self._failed: StreamError | None = None

    @property
    def ended(self) -> bool:
        return self._state == self._DONE

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def records(self) -> Iterator[Record]:
        """Every record complete in what was fed so far, in order."""
        while True:
            rec = self.next_record()
            if rec is None:
                return
            yield rec

    def next_record(self) -> Record | None:
        if self._failed is not None:
            raise self._failed
        try:
            return self._next()
        except StreamError as err:
            self._failed = err
            raise

    def _next(self) -> Record | None:
        while True:
            buf, pos = self._buf, self._pos
            avail = len(buf) - pos
            if avail < FRAME.size:
                if avail and self._state == self._DONE:
                    raise StreamError("image stream has bytes after its END record")
                return None
            length = self._frame(buf, pos)
            if avail < FRAME.size + length + TRAILER.size:
                return None
            end = pos + FRAME.size + length
            with memoryview(buf) as mv:
                self._check_sum(mv[pos:end], TRAILER.unpack_from(buf, end)[0])
                # One copy out of the shared buffer (which the next feed may move);
                # the record's parts are views of it.
                record = bytes(mv[pos : end + TRAILER.size])
            self._pos = end + TRAILER.size
            rec = self._take(memoryview(record))
            if rec is not None:
                return rec

    def read_record(self, readinto: Callable[[memoryview], int | None]) -> Record | None:
        """The next record read straight from a file by `readinto` (a raw file's or a
        pipe's), or None at the end of the input after END. Each record is read into a
        buffer of its own size with no copy in between; the checks are those of `feed`
        (a truncated stream raises as `finish` does). Do not mix with `feed`."""
        if self._failed is not None:
            raise self._failed
        try:
            while True:
                frame = bytearray(FRAME.size)
                got = _read_full(readinto, memoryview(frame))
                if got < FRAME.size:
                    if got and self._state == self._DONE:
                        raise StreamError("image stream has bytes after its END record")
                    self.finish()
                    return None
                length = self._frame(frame, 0)
                record = bytearray(FRAME.size + length + TRAILER.size)
                record[: FRAME.size] = frame
                mv = memoryview(record)
                if _read_full(readinto, mv[FRAME.size :]) < len(record) - FRAME.size:
                    self.finish()
                end = FRAME.size + length
                self._check_sum(mv[:end], TRAILER.unpack_from(record, end)[0])
                rec = self._take(mv)
                if rec is not None:
                    return rec
        except StreamError as err:
            self._failed = err
            raise

    def _frame(self, buf: bytes | bytearray, pos: int) -> int:
        """Check a record's frame before its payload is waited for: the payload length."""
        rtype, flags, _, length = FRAME.unpack_from(buf, pos)
        if self._state == self._DONE:
            raise StreamError("image stream has bytes after its END record")
        if self.seq == 0 and (rtype, flags, length) != (REC_HEADER, FLAG_REQUIRED,
                                                        _HEADER.size):
            raise StreamError("not a snapvol image stream (it does not start with a "
                              "stream header)")
        if length > MAX_PAYLOAD:
            raise StreamError(f"record {self.seq} claims {length} bytes, past the limit "
                              f"of {MAX_PAYLOAD} (damaged stream)")
        return int(length)

    def _check_sum(self, body: memoryview, csum: int) -> None:
        if xxhash.xxh3_64_intdigest(body, seed=self.seq) != csum:
            raise StreamError(f"record {self.seq} at byte {self.offset} fails its "
                              "checksum (damaged, reordered or spliced stream)")

    def _take(self, record: memoryview) -> Record | None:
        """A whole, checksummed record (frame, payload, trailer): accept it, or None
        for an unknown optional type (skipped)."""
        rtype, flags, reserved, length = FRAME.unpack_from(record)
        if reserved:
            raise StreamError(f"record {self.seq}: reserved frame bytes are not zero")
        if flags & ~FLAG_REQUIRED:
            raise StreamError(f"record {self.seq} has unknown flags {flags:#x}: a newer "
                              "snapvol wrote this stream")
        self.offset += len(record)
        self.seq += 1
        if rtype not in REC_NAMES:
            if flags & FLAG_REQUIRED:
                raise StreamError(f"record {self.seq - 1} has unknown required type "
                                  f"{rtype}: a newer snapvol wrote this stream")
            return None
        return self._accept(rtype, record[FRAME.size : FRAME.size + length])

    def _accept(self, rtype: int, payload: memoryview) -> Record:
        name = REC_NAMES[rtype]
        expected = {self._HEADER: (REC_HEADER,), self._TABLE: (REC_TABLE,),
                    self._PLANE: (REC_PLANE, REC_BLOCKS, REC_END),
                    self._BLOCKS: (REC_BLOCKS, REC_END)}[self._state]
        if rtype not in expected:
            want = " or ".join(REC_NAMES[t] for t in expected)
            raise StreamError(f"record {self.seq - 1} is {name} where {want} was expected "
                              "(records out of order)")
        if rtype == REC_HEADER:
            new = StreamHeader.decode(payload)
            if new.nblocks > self.max_blocks:
                raise StreamTooLarge(new.nblocks, self.max_blocks)
            self.header = new
            self.plane = Plane.zeros(new.nblocks)
            self._next_vbn = new.resume_from
            self._state = self._TABLE
            return HeaderRecord(self.header)
        header, plane = self.header, self.plane
        assert header is not None and plane is not None
        if rtype == REC_TABLE:
            self.table = decode_table(payload, header)
            self._state = self._PLANE
            return TableRecord(self.table)
        if rtype == REC_PLANE:
            return self._plane_record(payload, plane)
        if self._state == self._PLANE:
            if plane.count() != header.selected:
                raise StreamError(f"the selection plane holds {plane.count()} blocks; the "
                                  f"header announced {header.selected}")
            self._state = self._BLOCKS
        if rtype == REC_BLOCKS:
            return self._blocks_record(payload, header, plane)
        if len(payload) != _END.size:
            raise StreamError("END record has the wrong size")
        _zero(payload, 16, _END.size, "END record")
        blocks, records = _END.unpack(payload)
        expect = count_from(plane, header.resume_from)
        if blocks != self.blocks or blocks != expect or records != self.seq - 1:
            raise StreamError(f"END record counts {blocks} blocks in {records} records; "
                              f"the stream held {self.blocks} of {expect}")
        self._state = self._DONE
        return EndRecord(blocks, records)

    def _plane_record(self, payload: memoryview, plane: Plane) -> PlaneRecord:
        if len(payload) < _COUNT.size:
            raise StreamError("PLANE record is too short")
        (count,) = _COUNT.unpack_from(payload)
        if not 0 < count <= MAX_PLANE_RUN or len(payload) != plane_record_payload(count):
            raise StreamError(f"PLANE record of {count} plane blocks has the wrong size")
        idx = np.frombuffer(payload, dtype="<u4", count=count, offset=_COUNT.size)
        at = len(payload) - count * PLANE_BLOCK_BYTES
        _zero(payload, 4, _COUNT.size, "PLANE record")
        _zero(payload, _COUNT.size + 4 * count, at, "PLANE record")
        if int(idx[0]) <= self._last_index or (count > 1 and bool((np.diff(idx) <= 0).any())) \
                or int(idx[-1]) >= plane.plane_blocks:
            raise StreamError("PLANE record: plane blocks out of order or outside the volume")
        data = bytes(payload[at:])
        words = np.frombuffer(data, dtype="<u8").reshape(count, -1)
        if not words.any(axis=1).all():
            raise StreamError("PLANE record holds an empty plane block")
        rows = plane.words.reshape(-1, PLANE_BLOCK_BYTES // 8)
        rows[idx.astype(np.intp)] = words
        if int(idx[-1]) == plane.plane_blocks - 1 and _past_end(plane):
            raise StreamError("PLANE record selects blocks past the end of the volume")
        if int(plane.words[0]) & FIXED_MASK:
            raise StreamError("PLANE record selects the superblock or a root slot")
        self._last_index = int(idx[-1])
        return PlaneRecord(tuple(int(i) for i in idx), data)

    def _blocks_record(self, payload: memoryview, header: StreamHeader,
                       plane: Plane) -> BlocksRecord:
        if len(payload) < _BLOCKS.size:
            raise StreamError("BLOCKS record is too short")
        vbn, count = _BLOCKS.unpack_from(payload)
        _zero(payload, 12, _BLOCKS.size, "BLOCKS record")
        if not 0 < count <= MAX_RUN or len(payload) != blocks_record_payload(count):
            raise StreamError(f"BLOCKS record of {count} blocks has the wrong size")
        if vbn < self._next_vbn or vbn + count > header.nblocks:
            raise StreamError(f"BLOCKS record at VBN {vbn} is out of order or outside the "
                              "volume")
        if not _all_set(plane, vbn, count):
            raise StreamError(f"BLOCKS record at VBN {vbn} carries blocks the selection "
                              "plane does not hold")
        self._next_vbn = vbn + count
        self.blocks += count
        return BlocksRecord(vbn, count, payload[_BLOCKS.size :])

    def finish(self) -> None:
        """The input ended: refuse a stream that stopped before its END record."""
        if self._failed is not None:
            raise self._failed
        if self._state != self._DONE:
            what = REC_NAMES.get(
                {self._HEADER: REC_HEADER, self._TABLE: REC_TABLE}.get(self._state, 0),
                "BLOCKS or END")
            raise StreamError(f"image stream is truncated after {self.offset} bytes "
                              f"(expected {what} next)")


def _all_set(plane: Plane, vbn: int, count: int) -> bool:
    """Whether every bit of `vbn .. vbn+count-1` is set in `plane` (a few words, no
    array of VBNs: this runs once per BLOCKS record)."""
    first, last = vbn >> 6, (vbn + count - 1) >> 6
    bits = int.from_bytes(plane.words[first : last + 1].tobytes(), "little") >> (vbn & 63)
    mask = (1 << count) - 1
    return bits & mask == mask


def _read_full(readinto: Callable[[memoryview], int | None], view: memoryview) -> int:
    """Fill `view` from `readinto` (which may return less, as pipes do); the bytes read,
    fewer only at the end of the input."""
    done, want = 0, len(view)
    while done < want:
        n = readinto(view[done:])
        if n is None:
            raise StreamError("the stream's input is non-blocking and had no data")
        if n == 0:
            break
        done += n
    return done


_TOKEN = struct.Struct("<B16s16sQ")
TOKEN_PREFIX = "svr1-"


def encode_token(snap_guid: bytes, base_guid: bytes, done: int) -> str:
    """A resume token: which transfer (SNAP and BASE GUIDs) and the VBN below which every
    selected block is durable at the destination, with a checksum against typos."""
    body = _TOKEN.pack(1, snap_guid, base_guid, done)
    return TOKEN_PREFIX + body.hex() + f"{xxhash.xxh3_64_intdigest(body) & 0xFFFFFFFF:08x}"


def decode_token(token: str) -> tuple[bytes, bytes, int]:
    """(snap GUID, base GUID, resume VBN) of a token; StreamError if it is not one."""
    bad = StreamError(f"{token[:60]!r} is not a valid resume token (copy it from "
                      "'snapvol info DEST --json')")
    text = token.strip()
    if not text.startswith(TOKEN_PREFIX) or len(text) != len(TOKEN_PREFIX) + 2 * _TOKEN.size + 8:
        raise bad
    try:
        body = bytes.fromhex(text[len(TOKEN_PREFIX) : -8])
        check = int(text[-8:], 16)
    except ValueError:
        raise bad from None
    version, snap, base, done = _TOKEN.unpack(body)
    if version != 1 or xxhash.xxh3_64_intdigest(body) & 0xFFFFFFFF != check:
        raise bad
    return snap, base, done
