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

from conftest import assert_fsck_clean
from snapvol import image
from snapvol.engine import snapshots
from snapvol.errors import VolumeError
from test_cli import COMMAND
from test_send_receive import blocks_of, mutate, new_volume, stream
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
    from snapvol.engine.volume import Volume
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
