"""`snapvol send` and `snapvol replicate` of an image mounted read-write go through its
mount process (the owner, daemon/owner.py): the stream comes through the control socket,
equals a send of the unmounted image, and the mount goes on serving writes meanwhile."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusemount import Mount, mounted_volume, needs_fuse, read_tree
from snapvol.layout.constants import BLOCK_SIZE
from snapvol.streams.imagestream import HEADER_PAYLOAD, record_size

pytestmark = needs_fuse

DATA_MIB = 96  # enough that a send takes a while, so writes land while it runs


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Mount]:
    with mounted_volume(tmp_path) as m:
        yield m


def fill(root: Path, mib: int, tag: bytes) -> None:
    (root / "data").mkdir(exist_ok=True)
    for i in range(mib):
        block = (tag + b"%06d" % i).ljust(BLOCK_SIZE, b".")
        (root / "data" / f"f{i:03d}").write_bytes(block * 256)
    (root / "small").write_text("small file\n")
    os.symlink("small", root / "link")


class Writer(threading.Thread):
    """Writes 256 KiB at a time into the mount, noting when each write returned."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.stop = threading.Event()
        self.done: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with open(self.path, "wb", buffering=0) as f:
                n = 0
                while not self.stop.is_set():
                    f.write(bytes([n % 251]) * (256 << 10))
                    self.done.append(time.monotonic())
                    n += 1
                    if n % 64 == 0:
                        f.seek(0)  # bounded: overwrite in place
        except BaseException as e:
            self.error = e

    def during(self, start: float, end: float) -> int:
        return sum(1 for t in self.done if start <= t <= end)

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=60)
        assert self.error is None, self.error


def body(stream: bytes) -> bytes:
    """The stream after its header record (which carries the time the stream was made)."""
    return stream[record_size(HEADER_PAYLOAD):]


def test_send_of_a_mounted_volume_streams_through_its_owner(tmp_path: Path,
                                                            mnt: Mount) -> None:
    img = str(mnt.image)
    fill(mnt.path, DATA_MIB, b"one")
    mnt.snapvol("snap", "create", img, "s1")
    planned = json.loads(mnt.snapvol("send", img, "s1", "--dry-run", "--json").stdout)
    assert planned["image"] == img and planned["snapshot"] == "s1"
    assert planned["blocks"] >= DATA_MIB * 256

    writer = Writer(mnt.path / "busy")
    writer.start()
    try:
        while not writer.done:
            time.sleep(0.01)
        full = tmp_path / "full.stream"
        start = time.monotonic()
        mnt.snapvol("send", img, "s1", "-o", str(full))
        end = time.monotonic()
        # The mount served writes while the owner streamed (the send reads off its loop).
        assert writer.during(start, end) >= 3, (writer.during(start, end), end - start)
        assert full.stat().st_size == planned["bytes"]
        (mnt.path / "data" / "f000").write_bytes(b"changed" * 1000)
        mnt.snapvol("snap", "create", img, "s2")
        inc = tmp_path / "inc.stream"
        mnt.snapvol("send", img, "s2", "--base", "s1", "-o", str(inc))
    finally:
        writer.finish()
    # Refusals come back as the command's own one-line errors.
    missing = mnt.snapvol("send", img, "nope", "-o", str(tmp_path / "x"), check=False)
    assert missing.returncode == 2 and "no snapshot named 'nope'" in missing.stderr
    assert not (tmp_path / "x").exists()
    through_mount = (mnt.path / ".snapshot" / "s2")
    want_s2 = read_tree(through_mount, mtimes=False)
    assert "clean" in mnt.snapvol("fsck", "--online", img).stdout
    mnt.unmount()

    # The same stream as a send of the unmounted image (but for the header's timestamp).
    local = tmp_path / "local.stream"
    mnt.snapvol("send", img, "s1", "-o", str(local))
    assert local.stat().st_size == full.stat().st_size
    assert body(local.read_bytes()) == body(full.read_bytes())
    local_inc = tmp_path / "local-inc.stream"
    mnt.snapvol("send", img, "s2", "--base", "s1", "-o", str(local_inc))
    assert body(local_inc.read_bytes()) == body(inc.read_bytes())

    # Received elsewhere, the streams make a clean copy of both snapshots.
    copy = tmp_path / "copy.img"
    mnt.snapvol("receive", str(copy), "--create", "-i", str(full))
    mnt.snapvol("receive", str(copy), "-i", str(inc))
    assert mnt.snapvol("fsck", str(copy)).returncode == 0
    assert mnt.snapvol("fsck", img).returncode == 0
    for snap in ("s1", "s2"):
        assert mnt.snapvol("verify", f"{img}@{snap}", f"{copy}@{snap}").returncode == 0
    mnt.mount()
    assert read_tree(mnt.path / ".snapshot" / "s2", mtimes=False) == want_s2


def test_replicate_from_a_mounted_source(tmp_path: Path, mnt: Mount) -> None:
    img, dst = str(mnt.image), tmp_path / "mirror.img"
    fill(mnt.path, DATA_MIB // 2, b"two")
    writer = Writer(mnt.path / "busy")
    writer.start()
    try:
        while not writer.done:
            time.sleep(0.01)
        start = time.monotonic()
        first = json.loads(mnt.snapvol("replicate", img, str(dst), "--create",
                                       "--json").stdout)
        end = time.monotonic()
        assert first["base"] is None and first["blocks"] >= DATA_MIB // 2 * 256
        assert writer.during(start, end) >= 3, (writer.during(start, end), end - start)
        (mnt.path / "data" / "f001").write_bytes(b"second run" * 100)
        (mnt.path / "data" / "f002").unlink()
        second = json.loads(mnt.snapvol("replicate", img, str(dst), "--json").stdout)
    finally:
        writer.finish()
    assert second["base"] == first["snapshot"]
    assert 0 < second["blocks"] < first["blocks"] // 2  # the writer changed 16 MiB
    assert second["retired"] == [first["snapshot"], f"{first['snapshot']} (on {dst})"]
    listed = json.loads(mnt.snapvol("snap", "list", "--json", img).stdout)
    assert [(s["name"], s["replica"]) for s in listed] == [(second["snapshot"], True)]
    # The mirror holds what the mount showed at the snapshot (the writer's file aside,
    # which was being written: compared through the snapshot itself).
    snap_tree = read_tree(mnt.path / ".snapshot" / second["snapshot"], mtimes=False)
    assert "data/f002" not in snap_tree and "data/f001" in snap_tree
    mnt.unmount()
    assert mnt.snapvol("fsck", img).returncode == 0
    assert mnt.snapvol("fsck", str(dst)).returncode == 0
    assert mnt.snapvol("verify", f"{img}@{second['snapshot']}", str(dst)).returncode == 0
    # And a run with the source unmounted carries on from the same snapshot: it brings
    # what the writer wrote after it (at most its 16 MiB file) and little else.
    third = json.loads(mnt.snapvol("replicate", img, str(dst), "--json").stdout)
    assert third["base"] == second["snapshot"] and third["blocks"] < 4096 + 64
