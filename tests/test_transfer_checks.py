"""What a transfer checks before it trusts a stream or a block (issue 10 items 5, 6, 8):
a header too large for the destination is refused before anything is allocated; a send
reads every block through its pointer's checksum and stops at a damaged one, naming it;
a receive (and a restore) checks the trees it is about to install and every block they
reach before the switch, and refuses a crafted stream with the destination unchanged."""

from __future__ import annotations

import random
import struct
import subprocess
import tracemalloc
from pathlib import Path

import pytest

from conftest import assert_fsck_clean, read_tree
from snapvol import image
from snapvol.device import MemoryDevice
from snapvol.engine import snapshots
from snapvol.engine.volume import Volume
from snapvol.errors import VolumeError
from snapvol.fs import FileSystem
from snapvol.image.sender import SendError
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
