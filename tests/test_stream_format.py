"""The image stream format on its own (sans-IO): records round-trip, the decoder takes any
chunking down to single bytes, and every kind of bad input is refused with a clear error
(DESIGN.md §3.7)."""

from __future__ import annotations

import io
import os
import random
import struct

import pytest
import xxhash

from snapvol.layout.pointer import HOLE, Pointer
from snapvol.layout.records import TreeRoot
from snapvol.layout.snaptable import SnapEntry
from snapvol.planes import Plane
from snapvol.streams.imagestream import (
    FRAME,
    HDR_INCREMENTAL,
    MAX_PAYLOAD,
    REC_BLOCKS,
    ROLE_BASE,
    ROLE_CARRIED,
    ROLE_TOP,
    TRAILER,
    BlocksRecord,
    Decoder,
    Encoder,
    EndRecord,
    HeaderRecord,
    PlaneRecord,
    StreamError,
    StreamHeader,
    StreamTooLarge,
    TableItem,
    TableRecord,
    decode_token,
    encode_token,
)

NBLOCKS = 70_000  # three plane blocks, the last one partial


def entry(name: str, guid: bytes, cp: int, snap_id: int) -> SnapEntry:
    """A table entry with tree roots inside the stream's volume (3 plane blocks)."""
    at = 1000 + 10 * cp
    return SnapEntry(snap_id, name, guid, cp, 1000 + cp,
                     TreeRoot(Pointer(at, 0x1234 + cp), 0, 1),
                     TreeRoot(Pointer(at + 1, 0x5678 + cp), 1, 3), TreeRoot(HOLE, 1, 3),
                     TreeRoot())


G1, G2, G3 = (bytes([i]) * 16 for i in (1, 2, 3))


def selection(vbns: list[int]) -> Plane:
    plane = Plane.zeros(NBLOCKS)
    for v in vbns:
        plane.set(v)
    return plane


def make_stream(vbns: list[int], incremental: bool = False,
                names: tuple[str, str] = ("top", "older")) -> tuple[list[bytes], dict[int, bytes]]:
    """A well-formed stream carrying `vbns` (sorted), and the block data it carries."""
    plane = selection(vbns)
    base = G3 if incremental else bytes(16)
    items = [TableItem(ROLE_TOP, entry(names[0], G1, 9, 2)),
             TableItem(ROLE_CARRIED, entry(names[1], G2, 5, 1))]
    if incremental:
        items.append(TableItem(ROLE_BASE, entry("base", G3, 3, 3)))
    header = StreamHeader(os.urandom(16), NBLOCKS, G1, base, plane.count(),
                          flags=HDR_INCREMENTAL if incremental else 0, entries=len(items))
    enc = Encoder()
    chunks = enc.header(header) + enc.table(items) + enc.plane(plane)
    data = {v: os.urandom(4096) for v in vbns}
    runs: list[list[int]] = []
    for v in vbns:
        if runs and runs[-1][-1] + 1 == v and len(runs[-1]) < 256:
            runs[-1].append(v)
        else:
            runs.append([v])
    for run in runs:
        chunks += enc.blocks(run[0], len(run), b"".join(data[v] for v in run))
    chunks += enc.end(len(vbns))
    return chunks, data


def decode_all(stream: bytes, piece: int | None = None) -> list[object]:
    dec = Decoder()
    out: list[object] = []
    step = piece or len(stream) or 1
    for at in range(0, len(stream), step):
        dec.feed(stream[at : at + step])
        out.extend(dec.records())
    dec.finish()
    return out


def decode_read(stream: bytes, piece: int | None = None) -> list[object]:
    """Decode through `Decoder.read_record`, from a reader that returns at most `piece`
    bytes per call (as a pipe does)."""
    dec = Decoder()
    src = io.BytesIO(stream)

    def readinto(view: memoryview) -> int:
        return src.readinto(view[:piece] if piece else view)

    out: list[object] = []
    while (rec := dec.read_record(readinto)) is not None:
        out.append(rec)
    return out


VBNS = [3, 4, 5, 100, 101, 40_000, *range(50_000, 50_600), 69_999]


def test_round_trip() -> None:
    chunks, data = make_stream(VBNS)
    recs = decode_all(b"".join(chunks))
    assert isinstance(recs[0], HeaderRecord)
    assert isinstance(recs[1], TableRecord)
    assert [i.entry.name for i in recs[1].items] == ["top", "older"]
    assert isinstance(recs[2], PlaneRecord)
    got: dict[int, bytes] = {}
    for rec in recs[3:-1]:
        assert isinstance(rec, BlocksRecord)
        for i in range(rec.count):
            got[rec.vbn + i] = rec.data[i * 4096 : (i + 1) * 4096]
    assert got == data
    assert isinstance(recs[-1], EndRecord) and recs[-1].blocks == len(VBNS)


def test_decoder_fed_byte_by_byte() -> None:
    chunks, _ = make_stream([3, 9, 10, 11])
    stream = b"".join(chunks)
    assert decode_all(stream, 1) == decode_all(stream)


@pytest.mark.parametrize("piece", [2, 7, 4095, 4096, 65537])
def test_decoder_takes_any_chunking(piece: int) -> None:
    chunks, _ = make_stream(VBNS)
    stream = b"".join(chunks)
    assert decode_all(stream, piece) == decode_all(stream)


@pytest.mark.parametrize("piece", [None, 1, 7, 4096, 65537])
def test_reading_records_from_a_file_equals_feeding(piece: int | None) -> None:
    chunks, _ = make_stream(VBNS)
    stream = b"".join(chunks)
    assert decode_read(stream, piece) == decode_all(stream)


def test_a_record_built_in_place_equals_the_chunked_one() -> None:
    """The sender's one-buffer BLOCKS record has the bytes of the chunked encoding."""
    data = os.urandom(3 * 4096)
    a, b = Encoder(), Encoder()
    a.seq = b.seq = 5

    def fill(view: memoryview) -> None:
        view[:] = data

    assert bytes(a.blocks_filled(40, 3, fill)) == b"".join(b.blocks(40, 3, data))
    assert a.seq == b.seq == 6


def refused(stream: bytes, says: str) -> None:
    with pytest.raises(StreamError, match=says):
        decode_all(stream)
    with pytest.raises(StreamError, match=says):
        decode_read(stream, 4000)


def test_every_truncation_is_refused() -> None:
    stream = b"".join(make_stream([3, 4, 200])[0])
    for cut in range(len(stream)):
        if cut % 97 and cut > 200 and cut < len(stream) - 200:
            continue  # every byte near the ends, a sample in the middle
        refused(stream[:cut], "truncated|empty")


def test_random_flips_are_refused() -> None:
    stream = b"".join(make_stream([3, 4, 200])[0])
    rng = random.Random(7)
    for _ in range(300):
        at = rng.randrange(len(stream))
        bad = bytearray(stream)
        bad[at] ^= 1 << rng.randrange(8)
        with pytest.raises(StreamError):
            decode_all(bytes(bad))
        with pytest.raises(StreamError):
            decode_read(bytes(bad))


def split_records(stream: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, reserved, payload) of every record of a well-formed stream."""
    out = []
    at = 0
    while at < len(stream):
        rtype, flags, reserved, length = FRAME.unpack_from(stream, at)
        body = stream[at + FRAME.size : at + FRAME.size + length]
        out.append((rtype, flags, reserved, body))
        at += FRAME.size + length + TRAILER.size
    return out


def seal(records: list[tuple[int, int, int, bytes]]) -> bytes:
    """Records framed and checksummed in the order given (seeded with their position)."""
    out = []
    for seq, (rtype, flags, reserved, body) in enumerate(records):
        frame = FRAME.pack(rtype, flags, reserved, len(body))
        out.append(frame + body + TRAILER.pack(xxhash.xxh3_64_intdigest(frame + body,
                                                                       seed=seq)))
    return b"".join(out)


def resealed(chunks: list[bytes], index: int, payload: bytes, rtype: int | None = None,
             flags: int | None = None) -> bytes:
    """The stream with record `index`'s payload (and type/flags) replaced and checksums
    recomputed, so only the checks of meaning can refuse it."""
    records = split_records(b"".join(chunks))
    rt, fl, res, _ = records[index]
    records[index] = (rtype if rtype is not None else rt, fl if flags is None else flags,
                      res, payload)
    return seal(records)


def payload_of(chunks: list[bytes], index: int) -> bytes:
    stream = b"".join(chunks)
    at = 0
    for _ in range(index):
        _, _, _, length = FRAME.unpack_from(stream, at)
        at += FRAME.size + length + TRAILER.size
    _, _, _, length = FRAME.unpack_from(stream, at)
    return stream[at + FRAME.size : at + FRAME.size + length]


def test_bad_names_are_refused() -> None:
    for name, says in (("a/b", "invalid snapshot name"), ("..", "invalid snapshot name"),
                       (".", "invalid snapshot name"), ("a\x00b", "invalid snapshot name")):
        chunks, _ = make_stream([3], names=("top", name))
        refused(b"".join(chunks), says)
    chunks, _ = make_stream([3])
    table = bytearray(payload_of(chunks, 1))
    at = 8 + 520 + 8 + 256  # second entry's name
    table[at : at + 2] = b"\xff\xfe"
    refused(resealed(chunks, 1, bytes(table)), "not valid UTF-8")


def test_duplicate_names_and_missing_top_are_refused() -> None:
    chunks, _ = make_stream([3], names=("same", "same"))
    refused(b"".join(chunks), "twice")
    chunks, _ = make_stream([3])
    table = bytearray(payload_of(chunks, 1))
    table[8] = ROLE_CARRIED  # the top entry becomes an ordinary one
    refused(resealed(chunks, 1, bytes(table)), "exactly once")


def test_unknown_records() -> None:
    chunks, _ = make_stream([3])
    records = split_records(b"".join(chunks))
    # An unknown optional record is skipped (END counts every record before it)...
    rtype, flags, reserved, end = records[-1]
    blocks, count = struct.unpack_from("<QQ", end)
    records[-1] = (rtype, flags, reserved, struct.pack("<QQ16x", blocks, count + 1))
    with_optional = [records[0], (99, 0, 0, b"from the future"), *records[1:]]
    assert isinstance(decode_all(seal(with_optional))[-1], EndRecord)
    # ...and an unknown required one refused.
    with_required = [records[0], (99, 1, 0, b"from the future"), *records[1:]]
    refused(seal(with_required), "unknown required type 99")


def test_out_of_order_records_are_refused() -> None:
    chunks, _ = make_stream([3, 4])
    table_payload = payload_of(chunks, 1)
    # The table where the header should be (its checksum is right for position 0).
    refused(resealed(chunks, 0, table_payload, rtype=2), "not a snapvol image stream")
    # The table again where the plane should be.
    refused(resealed(chunks, 2, table_payload, rtype=2), "out of order")
    # Two records swapped: their checksums are seeded with their position.
    stream = b"".join(chunks)
    lens = []
    at = 0
    while at < len(stream):
        n = FRAME.size + FRAME.unpack_from(stream, at)[3] + TRAILER.size
        lens.append((at, n))
        at += n
    (a0, an), (b0, bn) = lens[1], lens[2]
    swapped = stream[:a0] + stream[b0 : b0 + bn] + stream[a0 : a0 + an] + stream[b0 + bn :]
    refused(swapped, "checksum")


def test_blocks_outside_the_plane_or_descending_are_refused() -> None:
    chunks, _ = make_stream([3, 4, 10])
    blocks = bytearray(payload_of(chunks, 3))
    struct.pack_into("<Q", blocks, 0, 5)  # VBN 5 is not selected
    refused(resealed(chunks, 3, bytes(blocks)), "selection plane does not hold")
    chunks, _ = make_stream([3, 10])
    second = bytearray(payload_of(chunks, 4))
    struct.pack_into("<Q", second, 0, 3)  # the second run goes back to VBN 3
    refused(resealed(chunks, 4, bytes(second)), "out of order")


def test_sizes_past_the_limits_are_refused() -> None:
    chunks, _ = make_stream([3])
    huge = FRAME.pack(REC_BLOCKS, 1, 0, MAX_PAYLOAD + 1)
    stream = b"".join(chunks)
    first_len = FRAME.size + FRAME.unpack_from(stream)[3] + TRAILER.size
    refused(stream[:first_len] + huge + bytes(64), "past the limit")
    header = bytearray(payload_of(chunks, 0))
    struct.pack_into("<Q", header, 32, 1 << 50)  # the volume size
    refused(resealed(chunks, 0, bytes(header)), "out of range")
    header = bytearray(payload_of(chunks, 0))
    struct.pack_into("<I", header, 8, 2)  # version
    refused(resealed(chunks, 0, bytes(header)), "version 2 is not supported")


def test_plane_counts_must_match_the_header() -> None:
    chunks, _ = make_stream([3, 4])
    header = bytearray(payload_of(chunks, 0))
    struct.pack_into("<Q", header, 80, 3)  # announces 3 selected blocks, the plane has 2
    refused(resealed(chunks, 0, bytes(header)), "header announced 3")


def test_trailing_bytes_are_refused() -> None:
    stream = b"".join(make_stream([3])[0])
    refused(stream + b"\x00", "after its END")


def test_incremental_header_needs_its_base() -> None:
    chunks, _ = make_stream([3], incremental=True)
    assert isinstance(decode_all(b"".join(chunks))[-1], EndRecord)
    table = bytearray(payload_of(chunks, 1))
    table[8 + 2 * 520] = ROLE_CARRIED  # the base entry loses its role
    refused(resealed(chunks, 1, bytes(table)), "base exactly once")


def test_resume_tokens() -> None:
    token = encode_token(G1, G2, 12345)
    assert decode_token(token) == (G1, G2, 12345)
    for bad in ("", "svr1-00", token[:-1] + ("0" if token[-1] != "0" else "1"),
                token.replace("svr1", "svr2"), token[:10] + "zz" + token[12:]):
        with pytest.raises(StreamError, match="not a valid resume token"):
            decode_token(bad)


def poked(chunks: list[bytes], index: int, at: int, value: int = 1) -> bytes:
    """The stream with byte `at` of record `index`'s payload set to `value` and every
    checksum recomputed: only the checks of meaning can refuse it."""
    payload = bytearray(payload_of(chunks, index))
    payload[at] = value
    return resealed(chunks, index, bytes(payload))


ENTRY0 = 8 + 8  # the first TABLE entry's 512 bytes (after the count and its role)


@pytest.mark.parametrize(("index", "at", "what"), [
    (0, 104, "HEADER record"), (0, 127, "HEADER record"),
    (1, 4, "TABLE record"), (1, 8 + 2, "TABLE entry 0"), (1, 8 + 7, "TABLE entry 0"),
    (1, ENTRY0 + 6, "TABLE entry 0 is malformed"), (1, ENTRY0 + 48, "TABLE entry 0"),
    (1, ENTRY0 + 63, "TABLE entry 0"), (1, ENTRY0 + 64 + 17, "TABLE entry 0"),
    (1, ENTRY0 + 64 + 3 * 32 + 23, "TABLE entry 0"), (1, ENTRY0 + 192, "TABLE entry 0"),
    (1, ENTRY0 + 255, "TABLE entry 0"), (1, ENTRY0 + 256 + 3, "TABLE entry 0"),
    (1, ENTRY0 + 511, "TABLE entry 0"),
    (2, 4, "PLANE record"), (2, 8 + 4, "PLANE record"),
    (3, 12, "BLOCKS record"), (3, 15, "BLOCKS record"),
    (4, 16, "END record"), (4, 31, "END record"),
])
def test_must_be_zero_bytes_are_checked(index: int, at: int, what: str) -> None:
    """Every byte docs/FORMAT.md says is zero is refused when it is not, checksums
    notwithstanding (issue 10 item 22)."""
    chunks, _ = make_stream([3])  # one plane block (an odd count: 4 bytes of padding)
    assert isinstance(decode_all(b"".join(chunks))[-1], EndRecord)
    refused(poked(chunks, index, at), what)


def test_unknown_record_flags_are_refused() -> None:
    chunks, _ = make_stream([3])
    refused(resealed(chunks, 1, payload_of(chunks, 1), flags=3), "unknown flags 0x3")


def _entry_field(chunks: list[bytes], entry: int, fmt: str, at: int,
                 value: int | bytes) -> bytes:
    table = bytearray(payload_of(chunks, 1))
    struct.pack_into(fmt, table, 8 + entry * 520 + 8 + at, value)
    return resealed(chunks, 1, bytes(table))


@pytest.mark.parametrize(("entry_no", "fmt", "at", "value", "says"), [
    (0, "<I", 0, 1 | 16, "malformed"),  # an unknown entry flag
    (1, "<I", 0, 1 | 2, "only the base .* is a shadow"),  # a carried shadow
    (0, "<16s", 8, bytes(16), "zero GUID"),
    (1, "<Q", 24, 99, "not older than"),  # a carried snapshot newer than the top
    (0, "<Q", 64, 70_000, "outside the volume"),  # the inode file's root past the end
    (0, "<Q", 64, 2, "outside the volume"),  # ... or on a root slot
    (0, "<B", 64 + 16, 6, "height 6"),  # a tree taller than the format allows
    (0, "<Q", 96 + 24, 4, "a plane of 4 blocks"),  # the active plane past the volume
    (0, "<Q", 64, 0, "a hole (pointer )?with (a )?checksum"),
    (0, "<Q", 64 + 24, 0, "has no inode file"),
    (0, "<Q", 160 + 24, 33, "snapshot table of 33 blocks"),
])
def test_ranged_table_fields_are_checked(entry_no: int, fmt: str, at: int,
                                         value: int | bytes, says: str) -> None:
    chunks, _ = make_stream([3])
    refused(_entry_field(chunks, entry_no, fmt, at, value), says)


@pytest.mark.parametrize(("at", "fmt", "value", "says"), [
    (12, "<I", 4, "shadow base in a full stream"),  # HDR_SHADOW_BASE without incremental
    (88, "<Q", 3, "resume VBN without the resumed flag"),
    (80, "<Q", NBLOCKS - 2, "counts exceed the volume size"),  # more than VBNs 3.. hold
    (48, "<Q", 0, "GUID is zero"),
])
def test_ranged_header_fields_are_checked(at: int, fmt: str, value: int, says: str) -> None:
    chunks, _ = make_stream([3])
    header = bytearray(payload_of(chunks, 0))
    struct.pack_into(fmt, header, at, value)
    if at == 48:
        struct.pack_into("<Q", header, 56, 0)
    refused(resealed(chunks, 0, bytes(header)), says)


def test_the_caller_limits_the_volume_size_before_the_plane_is_made() -> None:
    """A 128-byte header that claims a 4 PiB volume costs nothing: the decoder is told
    the largest volume its caller takes and refuses the header before it makes the
    selection plane (issue 10 item 6)."""
    chunks, _ = make_stream([3])
    header = bytearray(payload_of(chunks, 0))
    struct.pack_into("<Q", header, 32, 1 << 40)  # the volume size: the format's maximum
    stream = resealed(chunks, 0, bytes(header))
    dec = Decoder(max_blocks=NBLOCKS)
    dec.feed(stream[:200])
    with pytest.raises(StreamTooLarge, match=f"{1 << 40} blocks, past the limit of "
                                             f"{NBLOCKS}") as caught:
        dec.next_record()
    assert caught.value.nblocks == 1 << 40 and dec.plane is None and dec.header is None
    # The limit is the caller's: the same well-formed stream passes a decoder that takes it.
    good = Decoder(max_blocks=NBLOCKS)
    good.feed(b"".join(chunks))
    assert isinstance(list(good.records())[-1], EndRecord)
