"""Block devices: image files, the in-memory and fault-injecting devices, and the lock."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapvol.device import (
    BLOCK_SIZE,
    CrashPoint,
    Device,
    FaultyDevice,
    FileDevice,
    MemoryDevice,
    create_image,
    open_device,
)
from snapvol.device.faulty import SECTOR_SIZE, SECTORS_PER_BLOCK
from snapvol.device.lock import FLOCK_SIZE, VolumeLock, holder_pid
from snapvol.errors import LockedError, VolumeError

MIB = 1 << 20


def block(fill: int) -> bytes:
    return bytes([fill]) * BLOCK_SIZE


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "vol.img"
    create_image(path, 4 * MIB)
    return path


@pytest.fixture(params=["image", "memory"])
def device(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Device]:
    """The same behaviour is required of every device."""
    if request.param == "image":
        path = tmp_path / "dev.img"
        create_image(path, 4 * MIB)
        dev: Device = open_device(path, writable=True)
    else:
        dev = MemoryDevice(1024)
    with dev:
        yield dev


# -- behaviour shared by all devices -------------------------------------------------------


def test_size_in_blocks(device: Device) -> None:
    assert device.nblocks == 1024
    assert device.writable


def test_unwritten_blocks_read_as_zeros(device: Device) -> None:
    assert device.read(0) == bytes(BLOCK_SIZE)
    assert device.read(1000, 24) == bytes(24 * BLOCK_SIZE)


def test_write_read_round_trip(device: Device) -> None:
    data = b"".join(block(i) for i in range(1, 9))
    device.write(100, data)
    assert device.read(100, 8) == data
    assert device.read(103) == block(4)
    assert device.read(99, 10) == bytes(BLOCK_SIZE) + data + bytes(BLOCK_SIZE)


def test_writev_readv_round_trip(device: Device) -> None:
    bufs = [block(i) for i in range(1, 6)]
    device.writev(10, [bufs[0], bytearray(bufs[1]), memoryview(bufs[2] + bufs[3]), bufs[4]])
    assert device.read(10, 5) == b"".join(bufs)
    into = [bytearray(BLOCK_SIZE), bytearray(2 * BLOCK_SIZE), bytearray(2 * BLOCK_SIZE)]
    device.readv(10, into)
    assert b"".join(into) == b"".join(bufs)
    views = [memoryview(bytearray(BLOCK_SIZE)) for _ in range(5)]
    device.readv(10, views)
    assert [bytes(v) for v in views] == bufs


def test_long_vectors_are_split(device: Device) -> None:
    """More buffers than IOV_MAX (1024 on Linux) still make one correct run."""
    bufs = [block(i % 251) for i in range(1024)]
    device.writev(0, bufs)
    into = [bytearray(BLOCK_SIZE) for _ in range(1024)]
    device.readv(0, into)
    assert into == bufs


def test_last_block_is_addressable(device: Device) -> None:
    device.write(1023, block(7))
    assert device.read(1023) == block(7)


@pytest.mark.parametrize(("vbn", "count"), [(1024, 1), (1020, 5), (-1, 1), (0, 1025)])
def test_reads_outside_refused(device: Device, vbn: int, count: int) -> None:
    with pytest.raises(ValueError, match="outside the device"):
        device.read(vbn, count)


def test_writes_outside_refused(device: Device) -> None:
    with pytest.raises(ValueError, match="outside the device"):
        device.write(1023, block(1) * 2)
    with pytest.raises(ValueError, match="outside the device"):
        device.writev(1022, [block(1), block(2), block(3)])
    assert device.read(1022, 2) == bytes(2 * BLOCK_SIZE)  # nothing written


def test_partial_blocks_refused(device: Device) -> None:
    with pytest.raises(ValueError, match="whole number"):
        device.write(0, b"x" * 100)
    with pytest.raises(ValueError, match="whole number"):
        device.readv(0, [bytearray(100)])


# -- image files -----------------------------------------------------------------------


def test_create_image_is_sparse_and_rounded(tmp_path: Path) -> None:
    path = tmp_path / "a.img"
    create_image(path, 8 * MIB + 1000)
    st = path.stat()
    assert st.st_size == 8 * MIB
    assert st.st_blocks * 512 < MIB
    with open_device(path, writable=False) as dev:
        assert dev.nblocks == 2048


def test_create_image_refuses_existing_file(image: Path) -> None:
    with pytest.raises(VolumeError, match=f"^{image} already exists$"):
        create_image(image, 4 * MIB)


def test_create_image_refuses_tiny_size(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="1 MiB"):
        create_image(tmp_path / "tiny.img", MIB - 1)
    assert not (tmp_path / "tiny.img").exists()


def test_create_image_in_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="cannot create"):
        create_image(tmp_path / "no" / "such.img", 4 * MIB)


def test_huge_sparse_image(tmp_path: Path) -> None:
    """16 TiB costs nothing but an ftruncate where the file system allows it (ext4 stops
    one block short of 16 TiB, so there a byte-for-byte 16 TiB file is skipped)."""
    path = tmp_path / "huge.img"
    size = 16 << 40
    try:
        create_image(path, size)
    except VolumeError as err:
        if "too large" not in str(err):
            raise
        assert not path.exists()
        size -= BLOCK_SIZE
        create_image(path, size)
    with open_device(path, writable=True) as dev:
        assert dev.nblocks == size // BLOCK_SIZE
        last = dev.nblocks - 1
        dev.write(last, block(9))
        assert dev.read(last) == block(9)
        assert dev.read(last // 2) == bytes(BLOCK_SIZE)


def test_missing_image_message(tmp_path: Path) -> None:
    path = tmp_path / "absent.img"
    with pytest.raises(VolumeError) as info:
        FileDevice(path, writable=False)
    assert str(info.value) == f"no such image: {path}"


def test_directory_refused(tmp_path: Path) -> None:
    with pytest.raises(VolumeError) as info:
        FileDevice(tmp_path, writable=True)
    message = str(info.value)
    assert str(tmp_path) in message and "directory" in message and "\n" not in message


def test_read_only_device_refuses_writes(image: Path) -> None:
    with open_device(image, writable=False) as dev:
        assert not dev.writable
        with pytest.raises(VolumeError, match="read-only"):
            dev.write(0, block(1))
        with pytest.raises(VolumeError, match="read-only"):
            dev.writev(0, [block(1)])
        dev.flush()  # nothing to make durable; harmless


def test_data_survives_reopen(image: Path) -> None:
    with open_device(image, writable=True) as dev:
        dev.writev(5, [block(5), block(6)])
        dev.flush()
    with open_device(image, writable=False) as dev:
        assert dev.read(5, 2) == block(5) + block(6)


def test_reads_past_end_of_truncated_file_are_zeros(image: Path) -> None:
    """Another tool shrinking the image under us must not turn into short reads."""
    with open_device(image, writable=True) as dev:
        dev.write(1022, block(3) * 2)
        os.truncate(image, 1023 * BLOCK_SIZE - 100)
        assert dev.read(1022, 2) == block(3)[:-100] + bytes(100 + BLOCK_SIZE)
        into = [bytearray(b"\xff" * BLOCK_SIZE) for _ in range(2)]
        dev.readv(1022, into)
        assert b"".join(into) == block(3)[:-100] + bytes(100 + BLOCK_SIZE)


def test_close_is_idempotent(image: Path) -> None:
    dev = open_device(image, writable=True)
    dev.close()
    dev.close()
    with pytest.raises(ValueError, match="closed"):
        dev.read(0)


# -- memory device ---------------------------------------------------------------------


def test_memory_device_stores_only_written_blocks() -> None:
    dev = MemoryDevice(1 << 40)  # 4 EiB nominal
    dev.write((1 << 40) - 1, block(1))
    dev.write(12345, block(2))
    assert dev.written_vbns() == [12345, (1 << 40) - 1]
    assert dev.read((1 << 40) - 2, 2) == bytes(BLOCK_SIZE) + block(1)


def test_memory_snapshot_is_independent() -> None:
    dev = MemoryDevice(16)
    dev.write(0, block(1))
    copy = dev.snapshot()
    dev.write(0, block(2))
    copy.write(1, block(3))
    assert copy.read(0, 2) == block(1) + block(3)
    assert dev.read(0, 2) == block(2) + bytes(BLOCK_SIZE)


def test_buffers_are_copied_on_write() -> None:
    dev = MemoryDevice(4)
    buf = bytearray(block(1))
    dev.write(0, buf)
    buf[:] = block(2)
    assert dev.read(0) == block(1)


# -- fault-injecting device ------------------------------------------------------------


def test_faulty_reads_see_pending_writes() -> None:
    dev = FaultyDevice(64)
    dev.write(3, block(1))
    dev.write(3, block(2))
    assert dev.read(3) == block(2)
    assert dev.pending_count() == 2
    assert dev.writes_total == 2


def test_flushed_blocks_survive_every_crash() -> None:
    dev = FaultyDevice(64)
    dev.writev(0, [block(1), block(2), block(3)])
    dev.flush()
    assert dev.pending_count() == 0
    dev.write(1, block(9))
    dev.write(10, block(9))
    for seed in range(50):
        crashed = dev.crash(random.Random(seed))
        assert crashed.read(0) == block(1)
        assert crashed.read(2) == block(3)
        assert crashed.read(1) in _sector_mixes(block(2), block(9))
        assert crashed.read(10) in _sector_mixes(bytes(BLOCK_SIZE), block(9))
    assert dev.read(1) == block(9)  # the device itself is unchanged by crash()
    assert dev.pending_count() == 2


def _sector_mixes(old: bytes, new: bytes) -> list[bytes]:
    """Every legal outcome of one pending write: old, new, or a prefix of new sectors."""
    return [new[: k * SECTOR_SIZE] + old[k * SECTOR_SIZE :] for k in range(SECTORS_PER_BLOCK + 1)]


def test_pending_writes_are_kept_dropped_or_torn() -> None:
    dev = FaultyDevice(4)
    dev.write(0, block(0xAA))
    dev.flush()
    dev.write(0, block(0x55))
    outcomes: dict[int, int] = {}
    for seed in range(300):
        data = dev.crash(random.Random(seed)).read(0)
        sectors = [data[i : i + SECTOR_SIZE] for i in range(0, BLOCK_SIZE, SECTOR_SIZE)]
        new = [s == bytes([0x55]) * SECTOR_SIZE for s in sectors]
        old = [s == bytes([0xAA]) * SECTOR_SIZE for s in sectors]
        assert all(a != b for a, b in zip(new, old, strict=True)), "a sector was half-written"
        landed = sum(new)
        assert new == [True] * landed + [False] * (SECTORS_PER_BLOCK - landed), "not a prefix"
        outcomes[landed] = outcomes.get(landed, 0) + 1
    assert 0 in outcomes and SECTORS_PER_BLOCK in outcomes
    assert any(0 < k < SECTORS_PER_BLOCK for k in outcomes)


def test_each_pending_write_decided_independently() -> None:
    """Later writes may survive where earlier ones are lost (the cache reorders)."""
    dev = FaultyDevice(8)
    for vbn in range(8):
        dev.write(vbn, block(vbn + 1))
    kept_patterns = set()
    for seed in range(200):
        crashed = dev.crash(random.Random(seed))
        kept_patterns.add(tuple(crashed.read(v) == block(v + 1) for v in range(8)))
    assert (False, True) in {p[:2] for p in kept_patterns}
    assert len(kept_patterns) > 20


def test_crash_of_rewritten_block_applies_writes_in_order() -> None:
    dev = FaultyDevice(2)
    dev.write(0, block(1))
    dev.write(0, block(2))
    possible = {
        mix2 for mix1 in _sector_mixes(bytes(BLOCK_SIZE), block(1))
        for mix2 in _sector_mixes(mix1, block(2))
    }
    for seed in range(100):
        assert dev.crash(random.Random(seed)).read(0) in possible


def test_durable_image_and_seeded_crash() -> None:
    dev = FaultyDevice(4, seed=7)
    dev.write(0, block(1))
    dev.flush()
    dev.write(1, block(2))
    assert dev.durable_image().read(0, 2) == block(1) + bytes(BLOCK_SIZE)
    again = FaultyDevice(4, seed=7)
    again.write(0, block(1))
    again.flush()
    again.write(1, block(2))
    assert dev.crash().read(0, 4) == again.crash().read(0, 4)


def test_arm_stops_at_an_exact_block_write() -> None:
    dev = FaultyDevice(64)
    dev.write(0, block(1))
    dev.arm(3)
    dev.write(1, block(2))
    with pytest.raises(CrashPoint):
        dev.write(2, block(3) * 4)  # blocks 2 and 3 land, block 4 is the crash point
    assert dev.crashed
    assert dev.writes_total == 4
    assert dev.pending_count() == 4
    assert dev.read(2, 3) == block(3) * 2 + bytes(BLOCK_SIZE)
    with pytest.raises(CrashPoint):
        dev.write(10, block(1))
    with pytest.raises(CrashPoint):
        dev.flush()  # cleanup after the power loss cannot make anything durable
    assert dev.durable_image().read(0, 4) == bytes(4 * BLOCK_SIZE)


def test_crash_point_escapes_ordinary_handlers() -> None:
    dev = FaultyDevice(4)
    dev.arm(0)
    with pytest.raises(CrashPoint):
        try:
            dev.write(0, block(1))
        except Exception:  # an engine's error handling must not swallow a power loss
            pytest.fail("CrashPoint was caught as an ordinary error")


def test_disarm_and_crash_after_attribute() -> None:
    dev = FaultyDevice(4)
    dev.crash_after = 1
    dev.write(0, block(1))
    with pytest.raises(CrashPoint):
        dev.write(1, block(1))
    dev.disarm()
    dev.write(1, block(2))
    dev.flush()
    assert dev.crash(random.Random(0)).read(0, 2) == block(1) + block(2)


def test_random_crash_point_in_a_workload() -> None:
    """The intended use: count the writes of a run, then replay it crashing at random."""

    def workload(dev: FaultyDevice) -> None:
        for round_ in range(5):
            dev.writev(round_ * 4, [block(round_ + 1)] * 4)
            dev.flush()

    probe = FaultyDevice(32)
    workload(probe)
    rng = random.Random(3)
    for _ in range(10):
        point = rng.randrange(probe.writes_total)
        dev = FaultyDevice(32)
        dev.arm(point)
        with pytest.raises(CrashPoint):
            workload(dev)
        image = dev.crash(rng)
        flushed_rounds = point // 4
        for r in range(flushed_rounds):
            assert image.read(r * 4, 4) == block(r + 1) * 4


# -- lock ------------------------------------------------------------------------------

HOLDER = """
import os, sys
from snapvol.device.lock import VolumeLock
path, mode = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR if mode == "x" else os.O_RDONLY)
VolumeLock.acquire(fd, path, exclusive=(mode == "x"))
print("locked", flush=True)
sys.stdin.read()
"""


def _spawn_holder(image: Path) -> subprocess.Popen[str]:
    """Another process holding an exclusive lock on the image until its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(image), "x"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def holder(image: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """Another process holding an exclusive lock on the image until the test ends."""
    proc = _spawn_holder(image)
    assert proc.stdin is not None
    yield proc, image
    proc.stdin.close()
    proc.wait(timeout=10)


def test_flock_struct_size() -> None:
    assert FLOCK_SIZE == 32  # struct flock on Linux x86_64 and aarch64


def test_lock_conflict_names_the_other_process(
    holder: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, image = holder
    with open_device(image, writable=True) as dev:
        assert holder_pid(dev.fd) == proc.pid
        with pytest.raises(LockedError) as info:
            VolumeLock.acquire(dev.fd, str(image), exclusive=True)
    message = str(info.value)
    assert message.startswith(f"{image} is in use by process {proc.pid} (")
    assert "-c" in message  # the holder's command line, as /proc shows it
    assert "\n" not in message


def test_reader_refused_while_writer_holds(holder: tuple[subprocess.Popen[str], Path]) -> None:
    proc, image = holder
    with open_device(image, writable=False) as dev, pytest.raises(LockedError, match=str(proc.pid)):
        VolumeLock.acquire(dev.fd, str(image), exclusive=False)


def test_lock_released_when_holder_exits(image: Path) -> None:
    proc = _spawn_holder(image)
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=10)
    with open_device(image, writable=True) as dev:
        lock = VolumeLock.acquire(dev.fd, str(image), exclusive=True)
        lock.release()


def test_shared_locks_across_processes(image: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(image), "s"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline().strip() == "locked"
        with open_device(image, writable=True) as dev:
            shared = VolumeLock.acquire(dev.fd, str(image), exclusive=False)
            shared.release()
            with pytest.raises(LockedError, match=f"process {proc.pid}"):
                VolumeLock.acquire(dev.fd, str(image), exclusive=True)
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


def test_same_process_double_open_refused(image: Path) -> None:
    with open_device(image, writable=True) as first, open_device(image, writable=True) as second:
        lock = VolumeLock.acquire(first.fd, str(image), exclusive=True)
        try:
            with pytest.raises(LockedError) as info:
                VolumeLock.acquire(second.fd, str(image), exclusive=True)
            assert str(info.value) == f"{image} is already open in this process"
            with pytest.raises(LockedError, match="already open in this process"):
                VolumeLock.acquire(second.fd, str(image), exclusive=False)
        finally:
            lock.release()
        again = VolumeLock.acquire(second.fd, str(image), exclusive=True)
        again.release()
        again.release()  # harmless
        assert not again.held


def test_same_process_shared_opens_allowed(image: Path) -> None:
    with open_device(image, writable=False) as first, open_device(image, writable=False) as second:
        a = VolumeLock.acquire(first.fd, str(image), exclusive=False)
        b = VolumeLock.acquire(second.fd, str(image), exclusive=False)
        with pytest.raises(LockedError, match="already open in this process"):
            VolumeLock.acquire(first.fd, str(image), exclusive=True)
        a.release()
        with pytest.raises(LockedError):
            VolumeLock.acquire(first.fd, str(image), exclusive=True)
        b.release()
        with open_device(image, writable=True) as writer:
            VolumeLock.acquire(writer.fd, str(image), exclusive=True).release()


def test_lock_identity_follows_the_file_not_the_name(image: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias.img"
    alias.symlink_to(image)
    with open_device(image, writable=True) as first, open_device(alias, writable=True) as second:
        lock = VolumeLock.acquire(first.fd, str(image), exclusive=True)
        with pytest.raises(LockedError, match=f"{alias} is already open"):
            VolumeLock.acquire(second.fd, str(alias), exclusive=True)
        lock.release()
