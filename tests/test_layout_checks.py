"""Every decoder of the on-disk format refuses what it does not know (issue 10, items 13
and 22): unknown versions and flags, nonzero bytes where the format says zero, fields out
of their range, short records. Each refusal is a CorruptionError naming the record. The
crafted records here keep valid checksums (resealed after the change), as a hostile or
buggy writer would leave them; and the feature masks decide who may open a volume."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest

from snapvol.engine.volume import Volume
from snapvol.errors import CorruptionError, VolumeError
from snapvol.fs import FileSystem
from snapvol.layout import dirblock
from snapvol.layout.constants import BLOCK_SIZE, INODE_SIZE, ROOT_SLOT_VBNS
from snapvol.layout.dumps import DumpRecord, decode_catalog, encode_catalog
from snapvol.layout.features import Features
from snapvol.layout.inode import Inode
from snapvol.layout.pointer import Pointer
from snapvol.layout.records import RootRecord, Superblock, TreeRoot, seal
from snapvol.layout.snaptable import SnapEntry
from snapvol.layout.xattrs import decode_xattrs, encode_xattrs
from test_cli import fails, run

BS = BLOCK_SIZE
UUID = bytes(range(1, 17))
NBLOCKS = 1 << 20  # 4 GiB: 32 plane blocks


def reseal(data: bytes | bytearray) -> bytes:
    """A record with its checksum recomputed: only the field checks can refuse it."""
    return seal(bytes(data[: BS - 8]))


def poke(record: bytes, offset: int, value: bytes) -> bytes:
    raw = bytearray(record)
    raw[offset : offset + len(value)] = value
    return reseal(raw)


# ---- inodes (item 13) --------------------------------------------------------------------

def inode_bytes(**fields: int) -> bytearray:
    return bytearray(Inode(17, mode=0o100644, nlink=1, size=10, generation=3, **fields)
                     .encode())


def test_inode_version_byte_is_checked() -> None:
    raw = inode_bytes()
    assert Inode.decode(17, raw).size == 10
    raw[97] = 99
    with pytest.raises(CorruptionError, match=r"inode 17: record version 99 is not supported"):
        Inode.decode(17, raw)


def test_a_never_written_inode_slot_reads_as_free() -> None:
    rec = Inode.decode(40, bytes(INODE_SIZE))
    assert not rec.allocated and rec.generation == 0
    raw = bytearray(INODE_SIZE)
    raw[24] = 5  # a generation without a version: not a record this version wrote
    with pytest.raises(CorruptionError, match="inode 40: record version 0"):
        Inode.decode(40, raw)


@pytest.mark.parametrize(("offset", "value", "says"), [
    (100, b"\x01", "reserved bytes 98..127"),
    (96, bytes([6]), "tree height 6"),
    (36, struct.pack("<I", 8), "flags 0x8"),
    (0, struct.pack("<I", 0o170644), "mode 170644"),
    (0, struct.pack("<I", 1 << 20 | 0o100644), "impossible fields"),
    (16, struct.pack("<Q", (1 << 60) + 1), f"size {(1 << 60) + 1}"),
])
def test_inode_fields_are_checked(offset: int, value: bytes, says: str) -> None:
    raw = inode_bytes()
    raw[offset : offset + len(value)] = value
    with pytest.raises(CorruptionError, match=r"inode 17: ") as err:
        Inode.decode(17, raw)
    assert says in str(err.value)


def test_a_short_inode_record_is_corruption() -> None:
    with pytest.raises(CorruptionError, match="inode 3: short record"):
        Inode.decode(3, bytes(100))


# ---- xattr sets (item 13) -----------------------------------------------------------------

def test_xattr_sets_round_trip() -> None:
    attrs = {b"user.b": b"2" * 300, b"user.a": b"", b"security.x": bytes(65536)}
    assert decode_xattrs(encode_xattrs(attrs)) == attrs


@pytest.mark.parametrize(("blob", "says"), [
    (b"", "0 bytes, too short"),
    (b"\x01\x00", "2 bytes, too short"),
    (struct.pack("<I", 1), "attribute 0 of 1 is past the end"),
    (struct.pack("<IHI", 1, 6, 10) + b"user.a" + b"x", "attribute 0 of 1 is past the end"),
    (struct.pack("<IHI", 1, 0, 0), "a name of 0 bytes"),
    (struct.pack("<IHI", 1, 6, 65537) + b"user.a" + bytes(65537), "a value of 65537"),
    (encode_xattrs({b"user.a": b"1"}) + b"\x00", "1 bytes past the last attribute"),
    (struct.pack("<I", 2) + encode_xattrs({b"user.b": b""})[4:]
     + encode_xattrs({b"user.a": b""})[4:], "out of name order"),
])
def test_xattr_sets_that_this_version_did_not_write_are_refused(blob: bytes, says: str) -> None:
    with pytest.raises(CorruptionError, match="xattrs of inode 9") as err:
        decode_xattrs(blob, "xattrs of inode 9")
    assert says in str(err.value)


def test_a_short_xattr_blob_in_a_volume_is_a_named_error(mem_volume: Volume) -> None:
    fs = FileSystem(mem_volume)
    ino = fs.create(2, b"f").ino
    fs.setxattr(ino, b"user.a", b"1")
    xnode = mem_volume.active.node(mem_volume.active.node(ino).inode.xattr_ino)
    mem_volume.active.truncate(xnode, 2)  # what a damaged xattr inode would hold
    with pytest.raises(CorruptionError, match=rf"xattrs of inode {ino} .*too short"):
        fs.getxattr(ino, b"user.a")


# ---- the superblock and the root record (item 22) ------------------------------------------

def root_record(**changes: object) -> RootRecord:
    fields: dict[str, object] = {
        "cp_count": 7, "time_ns": 1, "uuid": UUID, "nblocks": NBLOCKS,
        "inode_file": TreeRoot(Pointer(100, 5), 1, 3),
        "active_plane": TreeRoot(Pointer(101, 6), 0, 32),
        "summary_plane": TreeRoot(Pointer(), 0, 32),
        "snap_table": TreeRoot(Pointer(102, 7), 0, 1), "next_snap_id": 4}
    fields.update(changes)
    return RootRecord(**fields)  # type: ignore[arg-type]


def test_a_valid_root_record_decodes() -> None:
    rec = root_record()
    assert RootRecord.decode(rec.encode(), slot=ROOT_SLOT_VBNS[1]) == rec


TREE = RootRecord.TREES_AT
RECV = RootRecord.RECEIVE_AT


@pytest.mark.parametrize(("offset", "value", "says"), [
    (8, struct.pack("<I", 2), "root record version 2"),
    (12, struct.pack("<I", 1), "flags 0x1 at byte 12"),
    (16, struct.pack("<Q", 0), "CP count 0"),
    (48, struct.pack("<Q", 12), "volume size 12 blocks"),
    (56, struct.pack("<Q", 0), "next snapshot id 0"),
    (TREE + 16, bytes([6]), "inode file: tree height 6"),
    (TREE + 17, b"\x01", "inode file: bytes 17..23 must be zero"),
    (TREE, struct.pack("<Q", NBLOCKS + 9), f"inode file points to VBN {NBLOCKS + 9}"),
    (TREE, struct.pack("<Q", 2), "inode file points to VBN 2, outside the data area"),
    (TREE + 64, struct.pack("<QQ", 0, 99), "summary plane: a hole pointer with checksum"),
    (TREE + 32 + 24, struct.pack("<Q", 31), "active plane of 31 blocks"),
    (TREE + 96 + 24, struct.pack("<Q", 33), "snapshot table of 33 blocks"),
    (RECV + 40, struct.pack("<I", 2), "unknown receive flags 0x2"),
    (RECV + 32, struct.pack("<Q", NBLOCKS + 1), "past the volume"),
    (RECV + 32, struct.pack("<Q", 5), "receive fields set without a receive state"),
    (RECV + 24, struct.pack("<Q", 5000), "receive state of 5000 blocks"),
    (RECV + 44, b"\x01", "bytes 236..239 must be zero"),
    (252, b"\x01", "byte 252 is 0x01"),
    (3000, b"\x07", "byte 3000 is 0x07"),
])
def test_root_record_fields_are_checked(offset: int, value: bytes, says: str) -> None:
    with pytest.raises(CorruptionError, match="root record") as err:
        RootRecord.decode(poke(root_record().encode(), offset, value))
    assert says in str(err.value)


def test_a_root_record_in_the_wrong_slot_is_refused() -> None:
    with pytest.raises(CorruptionError, match="CP 7 belongs in slot 2, not in slot 1"):
        RootRecord.decode(root_record().encode(), slot=1)


@pytest.mark.parametrize(("offset", "value", "says"), [
    (16, struct.pack("<Q", 12), "volume size 12 blocks"),
    (16, struct.pack("<Q", 1 << 41), f"volume size {1 << 41} blocks"),
    (24, bytes(16), "UUID is zero"),
    (60, b"\x01", "byte 60 is 0x01"),
])
def test_superblock_fields_are_checked(offset: int, value: bytes, says: str) -> None:
    good = Superblock(NBLOCKS, UUID, 5).encode()
    assert Superblock.decode(good).nblocks == NBLOCKS
    with pytest.raises(CorruptionError) as err:
        Superblock.decode(poke(good, offset, value))
    assert says in str(err.value)


# ---- snapshot table entries, directory blocks, the dump catalog ----------------------------

def entry_bytes() -> bytearray:
    return bytearray(SnapEntry(3, "daily", UUID, 9, 1, TreeRoot(Pointer(50, 1), 1, 4),
                               TreeRoot(Pointer(51, 2), 0, 1), TreeRoot(), TreeRoot())
                     .encode())


@pytest.mark.parametrize(("offset", "value", "says"), [
    (0, struct.pack("<I", 17), "unknown flags 0x10"),
    (4, struct.pack("<H", 0), "name length 0"),
    (6, b"\x01", "impossible fields"),
    (40, struct.pack("<Q", 0), "id 0"),
    (50, b"\x01", "a replication target on an entry that is no replication snapshot"),
    (64 + 16, bytes([7]), "tree 0: tree height 7"),
    (200, b"\x01", "byte 200"),
    (256, b"\xff", "the name is not UTF-8"),
    (270, b"x", "byte 270"),
])
def test_snapshot_entries_are_checked(offset: int, value: bytes, says: str) -> None:
    raw = entry_bytes()
    assert SnapEntry.decode(raw) is not None
    raw[offset : offset + len(value)] = value
    with pytest.raises(CorruptionError, match="slot 4") as err:
        SnapEntry.decode(raw, "snapshot table slot 4")
    assert says in str(err.value)


def test_a_free_snapshot_slot_must_be_zero() -> None:
    assert SnapEntry.decode(bytes(512)) is None
    raw = bytearray(512)
    raw[300] = 1
    with pytest.raises(CorruptionError, match="a free slot that is not all zeros"):
        SnapEntry.decode(raw)


def test_directory_blocks_keep_their_zero_bytes() -> None:
    header = dirblock.encode_header(dirblock.DirHeader(1, 1, 0, 2, 0, 0, 1))
    bad = bytearray(header)
    bad[12] = 1
    with pytest.raises(CorruptionError, match="nonzero bytes where the format says zero"):
        dirblock.decode_header(bytes(bad))
    bad = bytearray(header)
    bad[10:12] = struct.pack("<H", 40)
    with pytest.raises(CorruptionError, match="tree height 40"):
        dirblock.decode_header(bytes(bad))
    leaf = bytearray(dirblock.encode_leaf([1 << 20], [17], bytearray([8]), [b"a"]))
    leaf[8] = 5  # a leaf's next-trunk field
    with pytest.raises(CorruptionError, match="fields its kind keeps zero"):
        dirblock.node_kind(bytes(leaf), "directory block 3")
    trunk = bytearray(dirblock.encode_trunk(0, [4, 5]))
    trunk[4000] = 1
    with pytest.raises(CorruptionError, match="directory block 9: nonzero bytes after"):
        dirblock.decode_trunk(bytes(trunk), "directory block 9")
    inner = bytearray(dirblock.encode_internal(1, [1 << 20], [3, 4]))
    inner[100] = 1
    with pytest.raises(CorruptionError, match="nonzero bytes after"):
        dirblock.decode_internal(bytes(inner), "directory block 2")


def test_dump_catalog_records_are_checked() -> None:
    full = DumpRecord(0, UUID, "s1", 5, 1, 100)
    incr = DumpRecord(1, UUID, "s2", 6, 2, 50, base_guid=UUID)
    data = encode_catalog([full, incr])
    assert decode_catalog(data) == [full, incr]
    for offset, value, says in [(16 + 1, b"\x01", "nonzero bytes"),
                                (16 + 64 + 2, b"x", "nonzero bytes"),
                                (16 + 320 + 24, bytes(16), "a level-1 dump without a base"),
                                (16 + 64, b"\xff", "not UTF-8")]:
        raw = bytearray(data)
        raw[offset : offset + len(value)] = value
        with pytest.raises(CorruptionError, match="dump catalog record") as err:
            decode_catalog(bytes(raw))
        assert says in str(err.value)
    with pytest.raises(CorruptionError, match="does not hold exactly its 2 records"):
        decode_catalog(data + bytes(10))


# ---- feature masks (item 13) ---------------------------------------------------------------

def set_features(image: Path, features: Features) -> None:
    """Give the newest root record of `image` these feature masks (resealed)."""
    with open(image, "r+b") as f:
        slots = {}
        for vbn in ROOT_SLOT_VBNS:
            f.seek(vbn * BS)
            slots[vbn] = RootRecord.decode(f.read(BS), slot=vbn)
        vbn = max(slots, key=lambda v: slots[v].cp_count)
        f.seek(vbn * BS)
        f.write(dataclasses.replace(slots[vbn], features=features).encode())


@pytest.fixture
def small_image(tmp_path: Path) -> Path:
    path = tmp_path / "v.img"
    vol = Volume.create(path, 8 << 20)
    FileSystem(vol).write_file("/a", b"kept")
    vol.close()
    return path


def test_unknown_incompatible_features_refuse_any_open(small_image: Path) -> None:
    set_features(small_image, Features(incompat=1 << 7))
    for writable in (False, True):
        with pytest.raises(VolumeError, match="incompatible features 0x80"):
            Volume.open(small_image, writable=writable)
    fails("ls", small_image, says="newer snapvol")
    fails("fsck", small_image, says="incompatible features 0x80")


def test_unknown_read_only_features_allow_reading_only(small_image: Path,
                                                       tmp_path: Path) -> None:
    set_features(small_image, Features(ro_compat=1 << 3))
    with Volume.open(small_image, writable=False) as vol:
        assert FileSystem(vol).read_file("/a") == b"kept"
    with pytest.raises(VolumeError, match=r"cannot be opened for writing: .*0x8.*read-only"):
        Volume.open(small_image)
    assert run("cat", small_image, "/a").stdout == b"kept"
    (tmp_path / "new").write_bytes(b"x")
    fails("put", small_image, tmp_path / "new", "/", says="open it read-only")


def test_unknown_compatible_features_are_kept_by_writers(small_image: Path) -> None:
    set_features(small_image, Features(compat=1 << 5))
    with Volume.open(small_image) as vol:
        FileSystem(vol).write_file("/b", b"more")
        vol.cp()
        assert vol.root.features == Features(compat=1 << 5)
    with Volume.open(small_image, writable=False) as vol:
        assert vol.root.features.compat == 1 << 5
        assert FileSystem(vol).read_file("/b") == b"more"


def test_the_format_document_states_the_compatibility_rule() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "FORMAT.md").read_text()
    for word in ("compat", "ro_compat", "incompat", "must be zero"):
        assert word in doc, word
