"""What a transfer checks before it trusts a stream or a block (issue 10 items 5, 6, 8):
a header too large for the destination is refused before anything is allocated; a send
reads every block through its pointer's checksum and stops at a damaged one, naming it;
a receive (and a restore) checks the trees it is about to install and every block they
reach before the switch, and refuses a crafted stream with the destination unchanged."""

from __future__ import annotations

import json
import random
import stat
import struct
import subprocess
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import assert_fsck_clean, read_tree
from snapvol import image
from snapvol.device import MemoryDevice
from snapvol.engine import snapshots
from snapvol.engine.snapshots import plane_of
from snapvol.engine.volume import Volume
from snapvol.errors import VolumeError
from snapvol.fs import FileSystem
from snapvol.image.sender import SendError
from snapvol.layout.checksum import block_checksum
from snapvol.layout.constants import ROOT_INO
from snapvol.planes import difference
from snapvol.streams.imagestream import StreamError
from test_cli import COMMAND, fails, run
from test_send_receive import assert_mirrors, blocks_of, mutate, new_volume, stream
from test_stream_format import seal, split_records


def resealed_header(data: bytes, **fields: int) -> bytes:
    """The stream with HEADER fields changed (by offset name) and every checksum right."""
    at = {"nblocks": 32, "selected": 80}
    records = split_records(data)
    rtype, flags, reserved, header = records[0]
    body = bytearray(header)
    for name, value in fields.items():
        struct.pack_into("<Q", body, at[name], value)
    records[0] = (rtype, flags, reserved, bytes(body))
    return seal(records)


def test_a_huge_header_is_refused_before_any_allocation() -> None:
    """A 128-byte header naming a 4 PiB volume: the receive refuses it as larger than
    the destination without building the 128 GiB selection plane it describes, and the
    destination is unchanged (item 6)."""
    _, src = new_volume()
    mutate(src, random.Random(1))
    snapshots.create(src, "s")
    data = resealed_header(stream(src, "s"), nblocks=1 << 40)
    dev, dst = new_volume()
    before = blocks_of(dev)
    tracemalloc.start()
    try:
        with pytest.raises(VolumeError, match=r"smaller than the source .* the stream needs "
                                              f"{(1 << 40) * 4096}"):
            image.receive(dst, [data])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
    assert blocks_of(dev) == before
    assert_fsck_clean(dst)


def test_receive_create_refuses_a_huge_header(tmp_path: Path) -> None:
    """`receive --create` makes the image the stream's size, so it takes a stream of at
    most CREATE_MAX_BLOCKS (16 TiB): a larger one is refused in one line naming the way
    out, and no image is left behind."""
    _, src = new_volume()
    mutate(src, random.Random(2))
    snapshots.create(src, "s")
    crafted = tmp_path / "huge.svs"
    crafted.write_bytes(resealed_header(stream(src, "s"), nblocks=1 << 40))
    dst = tmp_path / "new.img"
    proc = subprocess.run([*COMMAND, "receive", str(dst), "--create", "-i", str(crafted)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("snapvol: error: the stream is of a 4.0 PiB volume, "
                                  "larger than the 16.0 TiB that --create makes"), proc.stderr
    assert "snapvol create IMAGE --size SIZE" in proc.stderr
    assert not dst.exists()
    # A stream of a sane size still makes its image.
    good = tmp_path / "good.svs"
    good.write_bytes(stream(src, "s"))
    proc = subprocess.run([*COMMAND, "receive", str(dst), "--create", "-i", str(good)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_restore_refuses_a_dump_larger_than_its_image(tmp_path: Path) -> None:
    from snapvol.image.dump import DumpError, restore

    _, src = new_volume()
    mutate(src, random.Random(3))
    snapshots.create(src, "s")
    dump = tmp_path / "huge.l0"
    dump.write_bytes(resealed_header(stream(src, "s"), nblocks=1 << 40))
    with pytest.raises(DumpError, match="larger than the 17592186044416 bytes --create "
                                        "makes from a dump"):
        restore(str(tmp_path / "new.img"), [str(dump)], create=True)
    assert not (tmp_path / "new.img").exists()
    small = tmp_path / "small.img"
    Volume.create(small, 16 << 20).close()
    dump.write_bytes(stream(src, "s"))  # the source is 32 MiB
    with pytest.raises(DumpError, match=f"larger than {small}"):
        restore(str(small), [str(dump)], create=False)


def test_volumes_of_several_plane_blocks_round_trip() -> None:
    """A volume of three plane blocks whose summary plane is still all holes (a tree of
    height 0 that names 3 blocks): its table entries are well formed, and a full stream
    and an increment arrive whole."""
    rng = random.Random(4)
    _, src = new_volume(70_000)
    mutate(src, rng)
    snapshots.create(src, "a")
    mutate(src, rng)
    snapshots.create(src, "b")
    assert src.snapshots.get("a").summary_plane.nblocks == 3
    _, dst = new_volume(70_000)
    image.receive(dst, [stream(src, "a")])
    image.receive(dst, [stream(src, "b", "a")])
    assert_mirrors(dst, src, "b")


# ---- item 5: a send reads every block through its pointer's checksum ---------------------
def damaged_source(level: int = 0) -> tuple[MemoryDevice, Volume, int]:
    """A source with snapshot `s` holding /docs/report.bin (300 blocks: a tree of height
    1), then one byte of that file flipped on the device: in its first data block
    (level 0) or in its indirect block (level 1). Returns the damaged VBN."""
    dev, vol = new_volume()
    fs = FileSystem(vol)
    fs.makedirs(b"/docs")
    fs.write_file(b"/docs/report.bin", random.Random(5).randbytes(300 * 4096))
    fs.write_file(b"/other.txt", b"fine" * 1000)
    snapshots.create(vol, "s")
    node = vol.snapshot_image("s").node(fs.resolve(b"/docs/report.bin"))
    assert node.tree.height == 1
    vbn = node.tree.data_ptr(0)[0] if level == 0 else int(node.tree.top[0]["vbn"])
    raw = bytearray(dev.read(vbn))
    raw[100] ^= 0x01
    dev.write(vbn, bytes(raw))
    vol.io.drop_cache()
    return dev, vol, vbn


@pytest.mark.parametrize("level", [0, 1])
def test_a_damaged_block_stops_the_send_naming_block_and_file(level: int) -> None:
    """A rotten block on the source never reaches a mirror as valid data: the send
    stops at it with SendError naming the VBN and the file that uses it (item 5)."""
    _, src, vbn = damaged_source(level)
    with pytest.raises(SendError, match=rf"block {vbn} .*used by /docs/report.bin in "
                                        r"snapshot 's'.*snapvol fsck"):
        stream(src, "s")
    _, dst = new_volume()
    before = read_tree(FileSystem(dst))
    with pytest.raises(SendError):
        image.receive(dst, image.send(src, "s"))
    assert read_tree(FileSystem(dst)) == before  # nothing of the damage arrived


def test_an_increment_is_checked_too() -> None:
    """An increment carries only changed blocks, and checks each of them."""
    dev, src, _ = damaged_source()
    fs = FileSystem(src)
    ino = fs.resolve(b"/other.txt")
    fs.write(ino, 0, b"changed" * 100)
    snapshots.create(src, "t")
    vbn = src.snapshot_image("t").node(ino).tree.data_ptr(0)[0]
    raw = bytearray(dev.read(vbn))
    raw[0] ^= 0x80
    dev.write(vbn, bytes(raw))
    with pytest.raises(SendError, match=rf"block {vbn} .*used by /other.txt in snapshot 't'"):
        stream(src, "t", "s")


def image_of(dev: MemoryDevice, path: Path) -> Path:
    """An image file holding the blocks of a memory device."""
    with open(path, "wb") as f:
        f.truncate(dev.nblocks * 4096)
        for v in dev.written_vbns():
            f.seek(v * 4096)
            f.write(dev.read(v))
    return path


def test_send_and_dump_of_a_damaged_image_fail_in_one_line(tmp_path: Path) -> None:
    """From the command line: exit 2, one line naming the block and the file, and no
    output file is left behind (item 1's rule: it appears only when complete); a dump
    that failed is not recorded as a base for the next one."""
    dev, _, vbn = damaged_source()
    img = image_of(dev, tmp_path / "src.img")
    out = tmp_path / "s.svs"
    for args in (("send", img, "s"), ("dump", img, "s", "--level", "0")):
        err = fails(*args, "-o", out, says=f"block {vbn} fails its checksum")
        assert "used by /docs/report.bin in snapshot 's'" in err
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir()] == ["src.img"]
    assert run("dump", "--list", img).stdout == b"no dumps\n"


# ---- item 8: a receive checks what it installs -----------------------------------------
TOP_ENTRY = 8 + 8  # the TABLE payload: count, then the top entry (its role, then 512 bytes)


def crafted(data: bytes, *, table: dict[int, tuple[str, int]] | None = None,
            block_byte: int | None = None) -> bytes:
    """The stream with fields of its TABLE payload changed (offset -> (format, value)) or
    one byte of its first BLOCKS record's data flipped, every record checksum recomputed:
    what a hostile peer sends. Only the checks of meaning can refuse it."""
    records = split_records(data)
    if table:
        rtype, flags, reserved, body = records[1]
        raw = bytearray(body)
        for at, (fmt, value) in table.items():
            struct.pack_into(fmt, raw, at, value)
        records[1] = (rtype, flags, reserved, bytes(raw))
    if block_byte is not None:
        i = next(i for i, r in enumerate(records) if r[0] == 4)
        rtype, flags, reserved, body = records[i]
        raw = bytearray(body)
        raw[16 + block_byte] ^= 0x01
        records[i] = (rtype, flags, reserved, bytes(raw))
    return seal(records)


def first_blocks(data: bytes) -> tuple[int, bytes]:
    """The VBN and data of the first BLOCKS record."""
    body = next(r[3] for r in split_records(data) if r[0] == 4)
    return struct.unpack_from("<Q", body)[0], body[16:]


def state(vol: Volume) -> tuple[object, list[str], int]:
    return (read_tree(FileSystem(vol)), [e.name for e in vol.snapshots.entries()],
            vol.usage()["free"])


@pytest.fixture
def pair() -> tuple[Volume, MemoryDevice, Volume]:
    """A source with snapshots s0 and s1, and a destination that received s0."""
    rng = random.Random(21)
    _, src = new_volume()
    mutate(src, rng, 15)
    snapshots.create(src, "s0")
    mutate(src, rng, 15)
    snapshots.create(src, "s1")
    dev, dst = new_volume()
    image.receive(dst, [stream(src, "s0")])
    return src, dev, dst


def forged_root_cases(data: bytes) -> dict[str, dict[int, tuple[str, int]]]:
    """TABLE changes to the top snapshot's inode-file root (vbn at entry offset 64)."""
    root = TOP_ENTRY + 64
    _, csum = struct.unpack_from("<QQ", split_records(data)[1][3], root)
    other_vbn, other = first_blocks(data)
    other_csum = block_checksum(other[:4096], other_vbn)
    return {
        "checksum": {root + 8: ("<Q", csum ^ 1)},
        "free block": {root: ("<Q", 8000)},  # free on the destination, not in the stream
        "another block": {root: ("<Q", other_vbn), root + 8: ("<Q", other_csum)},
        "height": {root + 16: ("<B", 1 + split_records(data)[1][3][root + 16])},
    }


@pytest.mark.parametrize("case", ["checksum", "free block", "another block", "height"])
@pytest.mark.parametrize("kind", ["full", "incremental"])
def test_forged_tree_roots_are_refused(pair: tuple[Volume, MemoryDevice, Volume],
                                       case: str, kind: str) -> None:
    """A stream whose top snapshot's inode-file root was changed (and every record
    checksum recomputed) is refused before the switch, and the destination is as it
    was: same tree, same snapshots, same free space, no partial receive, fsck clean."""
    src, _, dst = pair
    if kind == "full":
        _, dst = new_volume()
    data = stream(src, "s1") if kind == "full" else stream(src, "s1", "s0")
    before = state(dst)
    with pytest.raises(StreamError, match=r"the stream is refused: .*snapshot 's1' of the "
                                          r"stream.*nothing was installed.*keeps its "
                                          "previous state"):
        image.receive(dst, [crafted(data, table=forged_root_cases(data)[case])])
    assert state(dst) == before
    assert image.resume_token(dst) is None
    assert_fsck_clean(dst)
    image.receive(dst, [data])  # the genuine stream is received afterwards
    assert_mirrors(dst, src, "s1")


def test_forged_block_data_is_refused(pair: tuple[Volume, MemoryDevice, Volume]) -> None:
    """A block whose bytes changed in transit, its record checksum recomputed: it does
    not match the pointer that leads to it, so it never arrives as data."""
    src, _, dst = pair
    data = stream(src, "s1", "s0")
    vbn, _ = first_blocks(data)
    before = state(dst)
    with pytest.raises(StreamError, match=rf"block {vbn} of snapshot 's1' of the stream "
                                          "arrived with other contents than its tree says"):
        image.receive(dst, [crafted(data, block_byte=5)])
    assert state(dst) == before and image.resume_token(dst) is None
    assert_fsck_clean(dst)


def with_stray_block(data: bytes, vbn: int) -> bytes:
    """The stream with one more selected block (in plane block 0), carried in a BLOCKS
    record of its own, and the header's and END's counts to match: well formed."""
    records = split_records(data)
    rtype, flags, reserved, body = records[0]
    header = bytearray(body)
    struct.pack_into("<Q", header, 80, struct.unpack_from("<Q", header, 80)[0] + 1)
    records[0] = (rtype, flags, reserved, bytes(header))
    i = next(i for i, r in enumerate(records) if r[0] == 3)
    rtype, flags, reserved, body = records[i]
    plane = bytearray(body)
    count = struct.unpack_from("<I", plane)[0]
    assert struct.unpack_from("<I", plane, 8)[0] == 0  # the first plane block is block 0
    plane[len(plane) - count * 4096 + vbn // 8] |= 1 << (vbn % 8)
    records[i] = (rtype, flags, reserved, bytes(plane))
    blocks = [i for i, r in enumerate(records) if r[0] == 4]
    at = next((i for i in blocks if struct.unpack_from("<Q", records[i][3])[0] > vbn),
              blocks[-1] + 1)
    records.insert(at, (4, 1, 0, struct.pack("<QI4x", vbn, 1) + random.randbytes(4096)))
    rtype, flags, reserved, body = records[-1]
    nblocks, nrecords = struct.unpack_from("<QQ", body)
    records[-1] = (rtype, flags, reserved, struct.pack("<QQ16x", nblocks + 1, nrecords + 1))
    return seal(records)


def test_a_stray_block_is_refused(pair: tuple[Volume, MemoryDevice, Volume]) -> None:
    """A stream that carries a block none of its trees reach (its plane, counts and
    records forged to match) is refused, and its blocks discarded."""
    src, _, dst = pair
    data = stream(src, "s1", "s0")
    before = state(dst)
    with pytest.raises(StreamError, match=r"carries 1 block\(s\) that no tree of its "
                                          r"snapshots reaches \(the first is 8000\)"):
        image.receive(dst, [with_stray_block(data, 8000)])
    assert state(dst) == before and image.resume_token(dst) is None
    assert_fsck_clean(dst)


def test_a_tree_without_a_root_directory_is_refused() -> None:
    """Trees that check out block by block but hold no file system to open (the root
    inode is a regular file): refused, so the destination never becomes unreadable."""
    _, src = new_volume()
    mutate(src, random.Random(24), 5)
    root = src.active.node(ROOT_INO)
    root.inode.mode = stat.S_IFREG | 0o644
    src.active.mark_dirty(root)
    src.cp()
    snapshots.create(src, "broken")
    _, dst = new_volume()
    before = state(dst)
    with pytest.raises(StreamError, match="has no inode map or no root directory"):
        image.receive(dst, [stream(src, "broken")])
    assert state(dst) == before and image.resume_token(dst) is None


def test_receive_of_a_forged_stream_fails_in_one_line(tmp_path: Path) -> None:
    """`snapvol receive` of a forged stream: exit 2, one line, and the destination opens,
    checks clean and holds no partial receive."""
    _, src = new_volume()
    mutate(src, random.Random(22), 10)
    snapshots.create(src, "s0")
    data = stream(src, "s0")
    forged = tmp_path / "forged.svs"
    forged.write_bytes(crafted(data, table=forged_root_cases(data)["free block"]))
    dst = tmp_path / "dst.img"
    run("create", dst, "--size", "32M")
    fails("receive", dst, "-i", forged, says="the stream is refused: the trees of snapshot "
                                             "'s0' of the stream lead to block 8000")
    run("fsck", dst)
    info = json.loads(run("info", dst, "--json").stdout)
    assert info["resume_token"] is None and info["snapshots"] == 0


def test_restore_of_a_forged_dump_is_refused(tmp_path: Path) -> None:
    from snapvol.image.dump import restore

    _, src = new_volume()
    mutate(src, random.Random(23), 10)
    snapshots.create(src, "s0")
    data = stream(src, "s0")
    dump = tmp_path / "forged.l0"
    dump.write_bytes(crafted(data, block_byte=9))
    with pytest.raises(StreamError, match="arrived with other contents than its tree says"):
        restore(str(tmp_path / "new.img"), [str(dump)], create=True)
    assert not (tmp_path / "new.img").exists()


def test_a_resumed_receive_checks_what_the_first_run_wrote(
        pair: tuple[Volume, MemoryDevice, Volume], monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocks an interrupted run wrote are read back and checked when the receive is
    resumed: one that changed on the disk meanwhile is caught, and the resumed stream
    alone (which does not carry it) cannot hide it."""
    src, dev, dst = pair
    monkeypatch.setattr("snapvol.image.receiver.CHECKPOINT_BYTES", 4096)
    data = stream(src, "s1", "s0")
    before = state(dst)
    with pytest.raises(StreamError, match="truncated"):
        image.receive(dst, [data[: len(data) * 3 // 4]])
    token = image.resume_token(dst)
    assert token is not None and dst.receive_done > 0
    assert dst.alloc is not None
    early = [int(v) for v in dst.alloc.pinned.members() if v < dst.receive_done]
    raw = bytearray(dev.read(early[0]))
    raw[7] ^= 0x10
    dev.write(early[0], bytes(raw))
    with pytest.raises(StreamError, match=rf"block {early[0]} of snapshot 's1' of the "
                                          "stream arrived with other contents"):
        image.receive(dst, [stream(src, "s1", "s0", token)])
    assert state(dst) == before and image.resume_token(dst) is None
    image.receive(dst, [data])
    assert_mirrors(dst, src, "s1")


def forged_plane(data: bytes, item: int, vbn: int, value: bool) -> bytes:
    """The stream with bit `vbn` of the active plane of TABLE item `item` set or cleared:
    the plane block (a tree of height 0 here) changed in its BLOCKS record and the new
    checksum put in the item's root, every record checksum recomputed."""
    records = split_records(data)
    at = 8 + item * 520 + 8 + 96  # the item's active-plane TreeRoot
    table = bytearray(records[1][3])
    pvbn, _, height = struct.unpack_from("<QQB", table, at)
    assert height == 0
    for i, (rtype, flags, reserved, body) in enumerate(records):
        first, count = struct.unpack_from("<QI", body) if rtype == 4 else (0, 0)
        if rtype == 4 and first <= pvbn < first + count:
            raw = bytearray(body)
            off = 16 + (pvbn - first) * 4096
            if value:
                raw[off + vbn // 8] |= 1 << (vbn % 8)
            else:
                raw[off + vbn // 8] &= ~(1 << (vbn % 8)) & 0xFF
            records[i] = (rtype, flags, reserved, bytes(raw))
            struct.pack_into("<Q", table, at + 8,
                             block_checksum(bytes(raw[off : off + 4096]), pvbn))
    records[1] = (records[1][0], records[1][1], records[1][2], bytes(table))
    return seal(records)


def test_forged_planes_are_refused(pair: tuple[Volume, MemoryDevice, Volume]) -> None:
    """A snapshot's plane becomes the active plane or part of the summary, so it must
    hold exactly what its trees reach: a plane that claims a free block (a leak), lacks
    one of its blocks (which could be handed out under the tree), or claims a block of
    the stream only another snapshot reaches is refused."""
    src, _, dst = pair
    inc = stream(src, "s1", "s0")
    before = state(dst)
    with pytest.raises(StreamError, match="the plane of snapshot 's1' of the stream holds "
                                          "block 8000, which neither the stream nor"):
        image.receive(dst, [forged_plane(inc, 0, 8000, True)])
    assert state(dst) == before
    vbn, _ = first_blocks(inc)
    with pytest.raises(StreamError, match=f"reach block {vbn}, which its plane does not hold"):
        image.receive(dst, [forged_plane(inc, 0, vbn, False)])
    assert state(dst) == before
    # A full stream of s1 carries s0: a block only s0 holds, claimed by s1's plane.
    old_only = difference(plane_of(src, src.snapshots.get("s0")),
                          plane_of(src, src.snapshots.get("s1")))
    old_only.clear_range(0, 3)
    victim = int(old_only.members()[0])
    _, fresh = new_volume()
    with pytest.raises(StreamError, match=f"the plane of snapshot 's1' of the stream holds "
                                          f"block {victim}, which its trees do not reach"):
        image.receive(fresh, [forged_plane(stream(src, "s1"), 0, victim, True)])
    assert image.resume_token(fresh) is None
    assert_fsck_clean(fresh)


def test_a_forged_increment_from_a_shadow_base_stays_pending() -> None:
    """An increment from a shadow base overwrites blocks of the destination's current
    state, so when it is refused at the end it cannot be discarded: it stays pending
    (and unreadable) with its resume point back at block 0, and the genuine stream sent
    again whole finishes it."""
    rng = random.Random(25)
    _, src = new_volume()
    mutate(src, rng, 15)
    snapshots.create(src, "s0")
    _, dst = new_volume()
    image.receive(dst, [stream(src, "s0")])
    snapshots.create(src, "mark", shadow=True, source="s0")
    snapshots.delete(src, "s0")
    mutate(src, rng, 15)
    snapshots.create(src, "s1")
    data = stream(src, "s1", "mark")
    with pytest.raises(StreamError, match=r"the stream is refused: .*stays .*send it again "
                                          "whole from a sound source"):
        image.receive(dst, [crafted(data, block_byte=3)])
    assert dst.updating and dst.receive_done == 0
    token = image.resume_token(dst)
    assert token is not None
    image.receive(dst, [stream(src, "s1", "mark", token)])
    assert not dst.updating
    assert_mirrors(dst, src, "s1")


def forged_chain(data: bytes, src: Volume, snap: str, path: bytes,
                 change: Callable[[memoryview], None]) -> bytes:
    """The stream with the indirect block of file `path` (a tree of height 1) changed by
    `change`, and every checksum above it made right again: the inode's top pointer, the
    inode-file block, the inode file's indirect block and the TABLE root, as a hostile peer
    who knows the format would. Every block involved is in the stream (a full one)."""
    entry = src.snapshots.get(snap)
    img = src.snapshot_image(snap)
    ino = FileSystem(src, snap).resolve(path)
    node = img.node(ino)
    assert node.tree.height == 1 and img.itree.height == 1
    records = split_records(data)
    where: dict[int, tuple[int, int]] = {}  # vbn -> (record index, offset in its payload)
    for i, (rtype, _, _, body) in enumerate(records):
        if rtype == 4:
            first, count = struct.unpack_from("<QI", body)
            for k in range(count):
                where[first + k] = (i, 16 + k * 4096)
    bodies = {i: bytearray(r[3]) for i, r in enumerate(records)}

    def block(vbn: int) -> memoryview:
        i, off = where[vbn]
        return memoryview(bodies[i])[off : off + 4096]

    ind = int(node.tree.top[0]["vbn"])
    change(block(ind))
    csum = block_checksum(block(ind), ind)
    iblock = int(img.itree.node(1, 0)[ino // 16]["vbn"])
    struct.pack_into("<Q", block(iblock), (ino % 16) * 256 + 128 + 8, csum)
    csum = block_checksum(block(iblock), iblock)
    iroot = entry.inode_file.ptr.vbn
    struct.pack_into("<Q", block(iroot), (ino // 16) * 16 + 8, csum)
    struct.pack_into("<Q", bodies[1], TOP_ENTRY + 64 + 8, block_checksum(block(iroot), iroot))
    return seal([(r[0], r[1], r[2], bytes(bodies[i])) for i, r in enumerate(records)])


def test_a_block_named_twice_is_refused_whatever_the_checksums_say() -> None:
    """A forged indirect block whose second pointer repeats its first (a cross-link:
    rewriting one file block would free the other's), with every checksum above it
    recomputed: refused as a block reached twice."""
    _, src = new_volume()
    fs = FileSystem(src)
    for i in range(20):
        fs.write_file(f"/f{i}".encode(), random.Random(i).randbytes(4096 * 12))
    snapshots.create(src, "s")
    data = stream(src, "s")

    def repeat_first(raw: memoryview) -> None:
        raw[16:32] = raw[0:16]

    # Rebuilt without a change, the chain of checksums is the genuine one.
    assert forged_chain(data, src, "s", b"/f5", lambda raw: None) == data
    forged = forged_chain(data, src, "s", b"/f5", repeat_first)
    _, dst = new_volume()
    with pytest.raises(StreamError, match=r"the trees of snapshot 's' of the stream reach "
                                          r"block \d+ twice"):
        image.receive(dst, [forged])
    assert image.resume_token(dst) is None and not dst.snapshots.entries()
    assert_fsck_clean(dst)
    image.receive(dst, [data])
    assert_mirrors(dst, src, "s")


def test_a_plane_that_marks_an_unreached_block_stops_the_send() -> None:
    """A snapshot whose plane marks a block no tree reaches (a leak, which fsck reports):
    the send cannot vouch for that block and stops before writing anything."""
    _, src = new_volume()
    mutate(src, random.Random(26), 5)
    leak = 6000
    assert not src.active_plane.test(leak)
    src.active_plane.set(leak)
    src.table_changed()
    src.cp(force=True)
    snapshots.create(src, "s")
    assert src.snapshots.get("s") and plane_of(src, src.snapshots.get("s")).test(leak)
    chunks = image.send(src, "s")
    with pytest.raises(SendError, match=f"block {leak} is in the plane of snapshot 's' .*"
                                        "no tree of theirs reaches it"):
        next(iter(chunks))
