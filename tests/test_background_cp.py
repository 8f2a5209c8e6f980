"""Consistency points written in the background (engine/cpwriter.py), as a mount runs them:
the file system goes on changing while the placed CP is written on a thread.

Every test checks real contents against what was written, and the state a reopen (or a
crash) finds against the last CP that reached the disk.
"""

from __future__ import annotations

import random
import threading

import pytest

from conftest import assert_fsck_clean
from snapvol.device import MemoryDevice
from snapvol.device.base import Buffer
from snapvol.engine.cpwriter import CPWriter
from snapvol.engine.volume import Volume
from snapvol.errors import FsError, VolumeError
from snapvol.fs import FileSystem
from snapvol.layout.constants import BLOCK_SIZE

NBLOCKS = 8192  # 32 MiB


class GatedDevice(MemoryDevice):
    """A memory device whose writes wait while `gate` is closed (a slow disk), and that
    can be told to fail them (a dying disk)."""

    def __init__(self, nblocks: int) -> None:
        super().__init__(nblocks)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # a write is waiting at the gate
        self.fail = False

    def write(self, vbn: int, data: Buffer) -> None:
        if not self.gate.is_set():
            self.entered.set()
            assert self.gate.wait(30), "the test never opened the gate"
        if self.fail:
            raise OSError(5, "Input/output error")
        super().write(vbn, data)


def new_volume() -> tuple[GatedDevice, Volume, FileSystem]:
    dev = GatedDevice(NBLOCKS)
    Volume.format(dev)
    vol = Volume.on_device(dev)
    vol.cp_interval = 1e9
    return dev, vol, FileSystem(vol)


def files_of(fs: FileSystem, names: list[str]) -> dict[str, bytes]:
    return {n: fs.read_file(n) for n in names}


def test_reads_and_writes_go_on_while_a_cp_is_written() -> None:
    rng = random.Random(1)
    dev, vol, fs = new_volume()
    model: dict[str, bytes] = {}
    for i in range(40):
        model[f"/f{i}"] = rng.randbytes(rng.choice([100, 5000, 3 * BLOCK_SIZE, 300_000]))
        fs.write_file(f"/f{i}", model[f"/f{i}"])
    vol.cp()
    for i in range(0, 40, 3):  # changes the background CP will carry
        model[f"/f{i}"] = rng.randbytes(70_000)
        fs.write_file(f"/f{i}", model[f"/f{i}"])
    placed = dict(model)
    committed = vol.root.cp_count
    dev.gate.clear()
    stats = vol.cp(background=True)
    assert stats is not None and stats.cp_count == committed + 1
    assert dev.entered.wait(10)
    assert vol.cp_in_flight and vol.root.cp_count == committed  # not on disk yet
    # Every file reads back, the placed ones from blocks not yet written.
    assert files_of(fs, sorted(model)) == model
    # Changes go on: overwrite, truncate, delete, create.
    for i in range(1, 40, 4):
        model[f"/f{i}"] = rng.randbytes(20_000)
        fs.write_file(f"/f{i}", model[f"/f{i}"])
    fs.setattr(fs.resolve("/f2"), size=10)
    model["/f2"] = model["/f2"][:10]
    fs.unlink(fs.resolve(b"/"), b"f5")
    del model["/f5"]
    fs.write_file("/new", b"n" * 9000)
    model["/new"] = b"n" * 9000
    assert files_of(fs, sorted(model)) == model
    # A crash now finds the last committed CP.
    crashed = Volume.on_device(dev.snapshot(), writable=False)
    assert crashed.root.cp_count == committed
    crashed.close()
    dev.gate.set()
    vol.wait_cp()
    assert not vol.cp_in_flight and vol.root.cp_count == committed + 1
    # What the background CP committed is the state when it was placed.
    at_placement = Volume.on_device(dev.snapshot(), writable=False)
    assert files_of(FileSystem(at_placement), sorted(placed)) == placed
    assert_fsck_clean(at_placement)
    at_placement.close()
    vol.close()
    vol = Volume.on_device(dev)
    assert files_of(FileSystem(vol), sorted(model)) == model
    assert_fsck_clean(vol)
    vol.close()


def test_blocks_freed_while_a_cp_is_written_wait_for_the_commit_after_it() -> None:
    """A file truncated while a CP is written still has its blocks in that CP: the CP
    after it must not hand them out, though the allocator is pointed right at them."""
    dev, vol, fs = new_volume()
    data = bytes(range(256)) * 16 * 4  # 4 blocks, pointers in the inode
    ino = fs.write_file("/a", data).ino
    vol.cp()
    node = vol.active.node(ino)
    old = [node.inode.ptr(i)[0] for i in range(4)]
    assert all(old)
    fs.write_file("/b", b"b" * 100)
    dev.gate.clear()
    vol.cp(background=True)
    assert dev.entered.wait(10)
    fs.setattr(ino, size=0)  # frees `old`, which the CP being written still holds
    dev.gate.set()
    vol.wait_cp()
    assert vol.alloc is not None
    vol.alloc.cursor = min(old)
    fs.write_file("/c", b"c" * 8 * BLOCK_SIZE)
    vol.cp(background=True)  # placed: its blocks are chosen now
    assert not any(vol.active_plane.test(v) for v in old), "reused a block the disk holds"
    vol.wait_cp()
    vol.cp()  # and now they are free again
    vol.alloc.cursor = min(old)
    fs.write_file("/d", b"d" * 4 * BLOCK_SIZE)
    vol.cp()
    assert any(vol.active_plane.test(v) for v in old)
    assert fs.read_file("/c") == b"c" * 8 * BLOCK_SIZE
    assert_fsck_clean(vol)
    vol.close()


def test_a_failed_background_write_refuses_every_later_cp() -> None:
    dev, vol, fs = new_volume()
    fs.write_file("/kept", b"k" * 50_000)
    vol.cp()
    committed = vol.root.cp_count
    fs.write_file("/lost", b"l" * 50_000)
    dev.fail = True
    vol.cp(background=True)
    with pytest.raises(VolumeError, match=r"writing a consistency point failed: "
                       r"Input/output error.*since CP .* mount again"):
        vol.wait_cp()
    dev.fail = False
    fs.write_file("/later", b"x")
    with pytest.raises(VolumeError, match="mount again"):
        vol.cp()
    with pytest.raises(VolumeError, match="mount again"):
        vol.close()
    vol = Volume.on_device(dev)
    assert vol.root.cp_count == committed
    fs = FileSystem(vol)
    assert fs.read_file("/kept") == b"k" * 50_000
    with pytest.raises(FsError):
        fs.resolve("/lost")
    assert_fsck_clean(vol)
    vol.close()


def test_abandon_stops_a_background_cp_before_its_root(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    dev, vol, fs = new_volume()
    fs.write_file("/kept", b"k" * 5000)
    vol.cp()
    committed = vol.root.cp_count
    fs.write_file("/lost", b"l" * 5000)
    dev.gate.clear()
    vol.cp(background=True)
    assert dev.entered.wait(10)
    threading.Timer(0.2, dev.gate.set).start()
    vol.abandon()  # returns once the writer stopped
    vol = Volume.on_device(dev)
    assert vol.root.cp_count == committed
    with pytest.raises(FsError):
        FileSystem(vol).resolve("/lost")
    assert_fsck_clean(vol)
    vol.close()


def test_the_dirty_limit_starts_background_cps_and_the_next_waits() -> None:
    """With `background_cp`, maybe_cp (after each change) starts a CP at the dirty limit
    and returns; at the limit again it first waits for the one being written."""
    dev, vol, fs = new_volume()
    vol.background_cp = True
    vol.dirty_limit = 64 * BLOCK_SIZE
    started: list[int] = []
    real_start = CPWriter.start

    def start(writer: CPWriter) -> None:
        started.append(vol.root.cp_count)
        real_start(writer)

    CPWriter.start = start  # type: ignore[method-assign]
    try:
        ino = fs.create(fs.resolve(b"/"), b"big").ino
        chunk = bytes(range(256)) * 16 * 32  # 32 blocks
        for i in range(20):
            fs.write(ino, i * len(chunk), chunk)
    finally:
        CPWriter.start = real_start  # type: ignore[method-assign]
    assert len(started) >= 8
    vol.close()
    vol = Volume.on_device(dev)
    assert FileSystem(vol).read_file("/big") == chunk * 20
    assert_fsck_clean(vol)
    vol.close()
