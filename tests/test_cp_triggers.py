"""CP triggers other than an explicit cp(): the timer, the dirty-data limit, fsync."""

from __future__ import annotations

import time

from conftest import assert_fsck_clean, new_memory_volume
from snapvol.device import MemoryDevice
from snapvol.engine.volume import Volume
from snapvol.fs import FileSystem


def _reopen_content(dev: MemoryDevice, vol: Volume, path: str) -> bytes:
    vol.abandon()  # what a crash does: no final CP
    again = Volume.on_device(dev)
    try:
        assert_fsck_clean(again)
        return FileSystem(again).read_file(path)
    finally:
        again.close()


def test_timer_commits_without_being_asked() -> None:
    dev, vol = new_memory_volume()
    fs = FileSystem(vol)
    fs.write_file("/timed", b"committed by the timer")
    before = vol.root.cp_count
    vol.start_cp_timer(0.2)
    deadline = time.monotonic() + 10
    while vol.root.cp_count == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vol.root.cp_count > before, "the CP timer never committed the dirty volume"
    assert _reopen_content(dev, vol, "/timed") == b"committed by the timer"


def test_timer_leaves_a_clean_volume_alone() -> None:
    _, vol = new_memory_volume()
    vol.cp()
    before = vol.root.cp_count
    vol.start_cp_timer(0.1)
    time.sleep(0.6)
    assert vol.root.cp_count == before
    vol.close()


def test_dirty_limit_starts_a_cp() -> None:
    dev, vol = new_memory_volume()
    vol.dirty_limit = 64 << 10
    fs = FileSystem(vol)
    before = vol.root.cp_count
    data = bytes(range(256)) * 1024  # 256 KiB, four times the limit
    fs.write_file("/big", data)
    assert vol.root.cp_count > before
    assert vol.active.dirty_data_blocks * 4096 < vol.dirty_limit
    # the CP the limit started holds the whole write, and survives a crash
    assert _reopen_content(dev, vol, "/big") == data


def test_fsync_returns_after_a_committed_cp() -> None:
    dev, vol = new_memory_volume()
    fs = FileSystem(vol)
    fs.write_file("/f", b"durable")
    fs.fsync(fs.resolve("/f"))
    assert not vol.dirty
    assert _reopen_content(dev, vol, "/f") == b"durable"
