"""Consistency points written in the background (engine/cpwriter.py), as a mount runs them:
the file system goes on changing while the placed CP is written on a thread.

Every test checks real contents against what was written, and the state a reopen (or a
crash) finds against the last CP that reached the disk.
"""

from __future__ import annotations

import os
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


def close_and_reopen_with(dev: GatedDevice, vol: Volume, path: str, data: bytes) -> None:
    """Close `vol`; opened again from `dev`, it holds `data` at `path` and fsck is clean."""
    vol.close()
    vol = Volume.on_device(dev)
    assert FileSystem(vol).read_file(path) == data
    assert_fsck_clean(vol)
    vol.close()


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
    close_and_reopen_with(dev, vol, "/big", chunk * 20)


def _sync_on_thread(vol: Volume) -> tuple[threading.Thread, list[BaseException]]:
    """A sync as a mount's fsync runs it: the target fixed at the call, the waiting done
    with CPWriter.join outside the mutex (here on a thread of its own)."""
    errors: list[BaseException] = []
    target = vol.sync_target()

    def run() -> None:
        try:
            while (writer := vol.sync_step(target)) is not None:
                writer.join()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def test_a_sync_waits_off_the_mutex_and_ends_at_its_target() -> None:
    """While a sync waits for its CP, the file system reads and changes (the mutex is
    free); the sync then ends once the changes made before it are committed, though later
    changes keep the volume dirty (a busy writer cannot hold an fsync forever)."""
    dev, vol, fs = new_volume()
    fs.write_file("/old", b"o" * 30_000)
    vol.cp()
    committed = vol.root.cp_count
    fs.write_file("/synced", b"s" * 70_000)
    assert vol.sync_target() == committed + 1
    dev.gate.clear()
    thread, errors = _sync_on_thread(vol)
    assert dev.entered.wait(10)
    assert vol.cp_in_flight and vol.sync_target() == committed + 1  # placed, not written
    # The mutex is free: reads and writes go on while the CP is at the gate.
    got: list[bytes] = []
    worker = threading.Thread(target=lambda: (
        got.append(fs.read_file("/old")), fs.write_file("/later", b"l" * 9000)))
    worker.start()
    worker.join(10)
    assert not worker.is_alive() and got == [b"o" * 30_000]
    assert thread.is_alive()  # the sync still waits for the disk
    assert vol.sync_target() == committed + 2  # "/later" needs the next CP
    dev.gate.set()
    thread.join(10)
    assert not thread.is_alive() and not errors
    assert vol.root.cp_count == committed + 1 and vol.dirty  # "/later" is not in it
    crashed = Volume.on_device(dev.snapshot(), writable=False)
    crashed_fs = FileSystem(crashed)
    assert crashed_fs.read_file("/synced") == b"s" * 70_000
    with pytest.raises(FsError):
        crashed_fs.resolve("/later")
    crashed.close()
    # A second sync commits "/later"; with nothing dirty a sync has no step at all.
    thread, errors = _sync_on_thread(vol)
    thread.join(10)
    assert not errors and vol.root.cp_count == committed + 2 and not vol.dirty
    assert vol.sync_step(vol.sync_target()) is None
    close_and_reopen_with(dev, vol, "/later", b"l" * 9000)


def test_a_sync_joins_the_cp_in_flight_and_reports_its_failure() -> None:
    dev, vol, fs = new_volume()
    fs.write_file("/a", b"a" * 5000)
    vol.cp()
    committed = vol.root.cp_count
    fs.write_file("/b", b"b" * 5000)
    dev.gate.clear()
    vol.cp(background=True)  # a timer's CP: it holds every change so far
    assert dev.entered.wait(10)
    assert vol.sync_target() == committed + 1  # nothing dirty: that CP is the target
    dev.fail = True
    thread, errors = _sync_on_thread(vol)
    dev.gate.set()
    thread.join(10)
    assert len(errors) == 1 and isinstance(errors[0], VolumeError)
    assert "Input/output error" in str(errors[0]) and "mount again" in str(errors[0])
    assert vol.root.cp_count == committed
    vol.abandon()


def test_a_mounts_fsync_lets_other_requests_through_while_its_cp_is_written() -> None:
    """The mount's fsync handler waits for the disk on a worker thread: a read and a
    getattr sent meanwhile are answered before it returns (they used to queue behind the
    CP's writes and flushes), and it returns once its data is committed."""
    import trio

    from snapvol.fuse.inodes import to_fuse
    from snapvol.fuse.operations import SnapvolOperations

    dev, vol, fs = new_volume()
    other = fs.write_file("/other", b"x" * 20_000).ino
    target = fs.write_file("/db", b"").ino
    vol.cp()
    committed = vol.root.cp_count
    ops = SnapvolOperations(vol)
    events: list[str] = []

    async def main() -> None:
        db = await ops.open(to_fuse(0, target), os.O_RDWR, None)  # type: ignore[arg-type]
        rd = await ops.open(to_fuse(0, other), os.O_RDONLY, None)  # type: ignore[arg-type]
        await ops.write(db.fh, 0, b"committed row" * 1000)
        dev.gate.clear()

        async def fsync() -> None:
            await ops.fsync(db.fh, False)
            events.append("fsync")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fsync)
            await trio.to_thread.run_sync(dev.entered.wait, 10)
            assert await ops.read(rd.fh, 0, 5) == b"xxxxx"
            attr = await ops.getattr(to_fuse(0, other), None)  # type: ignore[arg-type]
            assert attr.st_size == 20_000
            events.append("read")
            dev.gate.set()
        await ops.release(db.fh)
        await ops.release(rd.fh)

    trio.run(main)
    assert events == ["read", "fsync"]
    assert vol.root.cp_count == committed + 1 and not vol.dirty
    crashed = Volume.on_device(dev.snapshot(), writable=False)
    assert FileSystem(crashed).read_file("/db") == b"committed row" * 1000
    crashed.close()
    vol.close()
