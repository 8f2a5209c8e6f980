"""Focused engine tests: full volumes, snapshot limits and cost, big directories, huge
sparse files, checksums, root-slot fallback, bad images and the owner lock."""

from __future__ import annotations

import errno
import itertools
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_fsck_clean, new_memory_volume, read_tree
from snapvol.device import MemoryDevice
from snapvol.engine import snapshots
from snapvol.engine.fsck import check
from snapvol.engine.snaptable import SnapshotError
from snapvol.engine.volume import Volume
from snapvol.errors import CorruptionError, FsError, LockedError, VolumeError
from snapvol.fs import FileSystem
from snapvol.layout.constants import (
    BLOCK_SIZE,
    FIRST_DATA_VBN,
    MAX_SNAPSHOTS,
    ROOT_INO,
    ROOT_SLOT_VBNS,
)
from snapvol.layout.records import RootRecord

BS = BLOCK_SIZE


def block_of(i: int) -> bytes:
    """A block whose bytes say which block it is, so misplaced data shows."""
    return (i.to_bytes(4, "little") * (BS // 4))


# ---- a full volume -----------------------------------------------------------------------

def fill(fs: FileSystem, prefix: str, file_blocks: int = 16) -> dict[str, bytes]:
    """Write files until the volume refuses with ENOSPC; return what was fully written."""
    written: dict[str, bytes] = {}
    for i in range(100_000):
        name = f"{prefix}{i}"
        try:
            ino = fs.create(ROOT_INO, name).ino
        except FsError as e:
            assert e.errno == errno.ENOSPC, e
            return written
        data = b"".join(block_of(i * 1000 + j) for j in range(file_blocks))
        try:
            for j in range(file_blocks):
                fs.write(ino, j * BS, data[j * BS : (j + 1) * BS])
        except FsError as e:
            assert e.errno == errno.ENOSPC, e
            assert "no space" in str(e)
            return written
        written[name] = data
    raise AssertionError("the volume never filled up")


def assert_files(fs: FileSystem, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert fs.read_file("/" + name) == data, name


def test_enospc_leaves_a_consistent_usable_volume() -> None:
    dev, vol = new_memory_volume(1024)
    fs = FileSystem(vol)
    files = fill(fs, "f")
    assert len(files) > 20
    assert_fsck_clean(vol)
    assert_files(fs, files)
    with pytest.raises(FsError) as info:
        ino = fs.create(ROOT_INO, "more").ino
        for j in range(64):
            fs.write(ino, j * BS, block_of(j))
    assert info.value.errno == errno.ENOSPC
    vol.close()

    vol = Volume.on_device(dev)
    fs = FileSystem(vol)
    assert_files(fs, files)
    assert_fsck_clean(vol)
    # Deleting files gives their space back and writes work again.
    names = sorted(files)
    for name in names[:8]:
        fs.unlink(ROOT_INO, name)
        del files[name]
    ino = fs.create(ROOT_INO, "after").ino
    data = b"".join(block_of(5000 + j) for j in range(64))
    fs.write(ino, 0, data)
    files["after"] = data
    assert_fsck_clean(vol)
    vol.close()
    vol = Volume.on_device(dev)
    assert_files(FileSystem(vol), files)
    assert_fsck_clean(vol)
    vol.close()


def test_enospc_deleting_a_snapshot_gives_space_back() -> None:
    dev, vol = new_memory_volume(1024)
    fs = FileSystem(vol)
    files = fill(fs, "f")
    snapshots.create(vol, "keep")
    for name in files:
        fs.unlink(ROOT_INO, name)
    vol.cp()
    assert vol.usage()["snapshot_only"] > 500
    # The snapshot still holds every block: the space is not free.
    with pytest.raises(FsError) as info:
        fill_one(fs, "x", 200)
    assert info.value.errno == errno.ENOSPC
    assert_files(FileSystem(vol, "keep"), files)
    assert_fsck_clean(vol)
    freed = snapshots.delete(vol, "keep")
    assert freed > 500
    if b"x" in fs.listdir("/"):
        fs.unlink(ROOT_INO, "x")
    fill_one(fs, "y", 200)
    assert_fsck_clean(vol)
    vol.close()
    vol = Volume.on_device(dev)
    assert FileSystem(vol).stat("/y").size == 200 * BS
    assert_fsck_clean(vol)
    vol.close()


def fill_one(fs: FileSystem, name: str, nblocks: int) -> None:
    ino = fs.create(ROOT_INO, name).ino
    for j in range(nblocks):
        fs.write(ino, j * BS, block_of(j))


def test_cp_with_many_dirty_directories_commits() -> None:
    """The space check of a new block must not refuse the directory blocks a CP writes:
    its estimate of pending work counts the very changes the CP is placing, which were
    admitted when they were made; a refusal there leaves the volume unable to commit."""
    dev, vol = new_memory_volume(256)
    vol.cp_interval = 1e9
    fs = FileSystem(vol)
    dirs = [fs.mkdir(ROOT_INO, f"d{i}").ino for i in range(40)]
    fs.mkdir(dirs[0], "moving")
    vol.cp()
    # Renames take no space when made, yet dirty every directory they pass through.
    for a, b in itertools.pairwise(dirs):
        fs.rename(a, "moving", b, "moving")
    assert vol.cp() is not None
    assert_fsck_clean(vol)
    vol.close()
    vol = Volume.on_device(dev)
    assert FileSystem(vol).listdir("/d39") == [b"moving"]
    vol.close()


@pytest.mark.parametrize("start", [0, 100, 3 * BS + 7])
def test_refused_write_leaves_nothing_past_the_end(start: int) -> None:
    """A write refused with ENOSPC part-way keeps the old size, and extending the file
    afterwards shows zeros, not the blocks the refused write had placed."""
    dev, vol = new_memory_volume(1024)
    fs = FileSystem(vol)
    ino = fs.create(ROOT_INO, "f").ino
    fs.write(ino, 0, b"\x11" * start)
    with pytest.raises(FsError) as info:
        fs.write(ino, start, b"\xaa" * (2000 * BS))
    assert info.value.errno == errno.ENOSPC
    assert fs.getattr(ino).size == start
    fs.setattr(ino, size=start + 40 * BS)
    assert fs.read(ino, 0, start + 40 * BS) == b"\x11" * start + bytes(40 * BS)
    assert_fsck_clean(vol)
    vol.close()
    vol = Volume.on_device(dev)
    assert FileSystem(vol).read(ino, 0, start + 40 * BS) == b"\x11" * start + bytes(40 * BS)
    assert_fsck_clean(vol)
    vol.close()


def test_shrinking_works_on_a_full_volume_held_by_a_snapshot() -> None:
    """Shrinking to a size inside a block rewrites that block (copy-on-write), which
    takes a block even when a snapshot holds all the space: like a deletion it may use
    the reserve, so a full volume can always be trimmed, and the file stays whole until
    the truncate succeeds."""
    dev, vol = new_memory_volume(1024)
    fs = FileSystem(vol)
    files = fill(fs, "f")
    snapshots.create(vol, "holds-everything")
    names = sorted(files)
    for name in names[:5]:
        ino = fs.resolve("/" + name)
        fs.setattr(ino, size=5 * BS + 100)
        assert fs.read_file("/" + name) == files[name][: 5 * BS + 100]
    assert_fsck_clean(vol)
    vol.close()
    vol = Volume.on_device(dev)
    fs = FileSystem(vol)
    for name in names:
        want = files[name][: 5 * BS + 100] if name in names[:5] else files[name]
        assert fs.read_file("/" + name) == want
    assert_files(FileSystem(vol, "holds-everything"), files)
    assert_fsck_clean(vol)
    vol.close()


def test_refused_setxattr_keeps_the_old_attributes() -> None:
    """Replacing a file's xattrs rewrites their blob; a rewrite refused with ENOSPC must
    leave the old attributes whole, not an emptied blob."""
    dev, vol = new_memory_volume(1024)
    fs = FileSystem(vol)
    ino = fs.create(ROOT_INO, "tagged").ino
    fs.setxattr(ino, "user.keep", b"k" * 5000)
    fill(fs, "f")
    snapshots.create(vol, "holds-everything")
    with pytest.raises(FsError) as info:
        fs.setxattr(ino, "user.big", b"b" * 60000)
    assert info.value.errno == errno.ENOSPC
    assert fs.listxattr(ino) == [b"user.keep"]
    assert fs.getxattr(ino, "user.keep") == b"k" * 5000
    assert_fsck_clean(vol)
    vol.close()
    vol = Volume.on_device(dev)
    assert FileSystem(vol).getxattr(ino, "user.keep") == b"k" * 5000
    assert_fsck_clean(vol)
    vol.close()


@pytest.mark.parametrize("kind", ["create", "mkdir", "symlink"])
def test_create_that_forces_a_cp_on_a_full_volume_keeps_its_entry(kind: str) -> None:
    """On a nearly full volume, allocating an inode may commit a CP in the middle of
    create (to turn freed blocks into free ones); the new entry must still be committed
    by the next CP, not left behind as an orphan inode."""
    dev, vol = new_memory_volume(1024)
    fs = FileSystem(vol)
    files = fill(fs, "f")
    vol.close()
    vol = Volume.on_device(dev)
    fs = FileSystem(vol)
    for name in sorted(files)[:5]:
        fs.unlink(ROOT_INO, name)
    cp_before = vol.root.cp_count
    if kind == "create":
        ino = fs.create(ROOT_INO, "new").ino
    elif kind == "mkdir":
        ino = fs.mkdir(ROOT_INO, "new").ino
    else:
        ino = fs.symlink(ROOT_INO, "new", "target").ino
    assert vol.root.cp_count > cp_before, "the test expects the new inode to force a CP"
    vol.cp()
    fresh = Volume.on_device(dev.snapshot(), writable=False)
    ffs = FileSystem(fresh)
    assert ffs.lookup(ROOT_INO, "new").ino == ino
    assert ffs.getattr(ROOT_INO).nlink == (3 if kind == "mkdir" else 2)
    report = check(fresh)
    assert report.clean, report.problems
    fresh.close()
    vol.close()


# ---- snapshots ---------------------------------------------------------------------------

def test_255_snapshots_and_the_256th_is_refused() -> None:
    dev, vol = new_memory_volume(8192)
    fs = FileSystem(vol)
    for i in range(MAX_SNAPSHOTS):
        fs.write_file("/n", str(i).encode())
        snapshots.create(vol, f"snap-{i}")
    fs.write_file("/n", b"active")
    with pytest.raises(SnapshotError, match="255"):
        snapshots.create(vol, "one-too-many")
    assert len(vol.snapshots) == MAX_SNAPSHOTS
    vol.close()
    vol = Volume.on_device(dev)
    assert len(vol.snapshots) == MAX_SNAPSHOTS
    for i in range(MAX_SNAPSHOTS):
        assert FileSystem(vol, f"snap-{i}").read_file("/n") == str(i).encode()
    assert FileSystem(vol).read_file("/n") == b"active"
    assert_fsck_clean(vol)
    # Deleting one makes room for exactly one more.
    snapshots.delete(vol, "snap-100")
    snapshots.create(vol, "replacement")
    with pytest.raises(SnapshotError):
        snapshots.create(vol, "again-too-many")
    assert FileSystem(vol, "replacement").read_file("/n") == b"active"
    assert_fsck_clean(vol)
    vol.close()


class CountingDevice(MemoryDevice):
    """A memory device that counts block writes."""

    def __init__(self, nblocks: int) -> None:
        super().__init__(nblocks)
        self.writes = 0

    def _put(self, vbn: int, block: bytes) -> None:
        self.writes += 1
        super()._put(vbn, block)


def snapshot_cost(nblocks: int, data_mib: int) -> tuple[int, int]:
    """(block writes of creating a snapshot, change in used blocks) after writing
    `data_mib` MiB of files to a fresh volume of `nblocks` blocks."""
    dev = CountingDevice(nblocks)
    Volume.format(dev)
    vol = Volume.on_device(dev)
    fs = FileSystem(vol)
    for i in range(data_mib):
        fs.write_file(f"/f{i}", bytes([i % 251 + 1]) * (1 << 20))
    vol.cp()
    before, used = dev.writes, vol.usage()["used"]
    snapshots.create(vol, "s")
    cost = dev.writes - before, vol.usage()["used"] - used
    if data_mib:
        assert FileSystem(vol, "s").read_file("/f0") == bytes([1]) * (1 << 20)
    assert_fsck_clean(vol)
    vol.close()
    return cost


@pytest.mark.parametrize("nblocks", [(1 << 30) // BS, (256 << 30) // BS],
                         ids=["1GiB", "256GiB"])
def test_snapshot_copies_no_blocks(nblocks: int) -> None:
    """Creating a snapshot writes a handful of metadata blocks, however much data the
    volume holds: the snapshot table, the summary plane and the root, never data."""
    small = snapshot_cost(nblocks, 0)
    large = snapshot_cost(nblocks, 24)
    for writes, grown in (small, large):
        assert writes <= 16, f"a snapshot took {writes} block writes"
        assert grown <= 4
    assert large[0] <= small[0] + 2, (small, large)


def test_deleting_a_snapshot_reuses_its_blocks_only_after_the_commit() -> None:
    """Until the CP that deletes a snapshot lands, the committed root still lists it, so
    that CP must not write into the blocks only the snapshot held (DESIGN.md §3.1)."""
    dev = CountingDevice(2048)
    Volume.format(dev)
    vol = Volume.on_device(dev)
    fs = FileSystem(vol)
    fs.write_file("/a", b"".join(block_of(j) for j in range(64)))
    entry = snapshots.create(vol, "s")
    fs.unlink(ROOT_INO, "a")
    vol.cp()
    held = set(snapshots.plane_of(vol, entry).members().tolist())
    only_snapshot = held - set(vol.active_plane.members().tolist())
    assert len(only_snapshot) >= 64
    fs.write_file("/b", b"".join(block_of(100 + j) for j in range(32)))  # for the delete CP
    vol.alloc.cursor = FIRST_DATA_VBN  # the next allocation searches from the first block
    written: list[int] = []
    put = dev._put

    def spy(vbn: int, block: bytes) -> None:
        written.append(vbn)
        put(vbn, block)

    dev._put = spy  # type: ignore[method-assign]
    snapshots.delete(vol, "s")
    assert written
    assert not only_snapshot & set(written), "the delete CP overwrote the snapshot's blocks"
    assert vol.usage()["free"] > 2048 - 3 - len(set(vol.active_plane.members().tolist())) - 8
    assert_fsck_clean(vol)
    vol.close()


def test_snapshot_names_are_checked(mem_volume: Volume) -> None:
    vol = mem_volume
    snapshots.create(vol, "ok")
    for bad in ["", "a/b", "x" * 256, "é" * 128, "nul\x00byte", ".", ".."]:
        with pytest.raises(SnapshotError):
            snapshots.create(vol, bad)
    with pytest.raises(SnapshotError, match="already exists"):
        snapshots.create(vol, "ok")
    snapshots.create(vol, "y" * 255)
    snapshots.create(vol, "é" * 127)
    with pytest.raises(SnapshotError, match="no snapshot"):
        snapshots.delete(vol, "missing")
    with pytest.raises(SnapshotError):
        snapshots.restore(vol, "missing")
    with pytest.raises(SnapshotError):
        snapshots.rename(vol, "missing", "other")
    with pytest.raises(SnapshotError):
        snapshots.rename(vol, "ok", "a/b")
    with pytest.raises(SnapshotError):
        snapshots.rename(vol, "ok", "y" * 255)
    vol.close()
    vol = Volume.on_device(vol.dev)
    assert sorted(e.name for e in vol.snapshots.entries()) == sorted(["ok", "y" * 255, "é" * 127])
    vol.close()


def test_restore_keeps_other_snapshots_and_rename() -> None:
    dev, vol = new_memory_volume()
    fs = FileSystem(vol)
    fs.makedirs("/d")
    fs.write_file("/d/f", b"first")
    fs.write_file("/only-first", b"1")
    a = read_tree(fs)
    snapshots.create(vol, "one")
    fs.write_file("/d/f", b"second" * 3000)
    fs.unlink(ROOT_INO, "only-first")
    fs.write_file("/only-second", b"2")
    b = read_tree(fs)
    snapshots.create(vol, "two")
    fs.remove_tree("/d")
    snapshots.restore(vol, "one")
    assert read_tree(FileSystem(vol)) == a
    assert read_tree(FileSystem(vol, "one")) == a
    assert read_tree(FileSystem(vol, "two")) == b
    assert_fsck_clean(vol)
    FileSystem(vol).write_file("/after-restore", b"x" * 10000)
    snapshots.restore(vol, "two")
    assert read_tree(FileSystem(vol)) == b
    snapshots.rename(vol, "one", "uno")
    with pytest.raises(SnapshotError):
        FileSystem(vol, "one")
    with pytest.raises(SnapshotError, match="already exists"):
        snapshots.rename(vol, "uno", "two")
    vol.close()
    vol = Volume.on_device(dev)
    assert sorted(e.name for e in vol.snapshots.entries()) == ["two", "uno"]
    assert read_tree(FileSystem(vol, "uno")) == a
    assert read_tree(FileSystem(vol)) == b
    assert_fsck_clean(vol)
    snapshots.delete(vol, "uno")
    snapshots.delete(vol, "two")
    assert vol.usage()["snapshot_only"] == 0
    assert read_tree(FileSystem(vol)) == b
    assert_fsck_clean(vol)
    vol.close()


# ---- big directories -------------------------------------------------------------------

def big_directory(n: int, churn: bool) -> None:
    dev, vol = new_memory_volume(1 << 20 if n > 100_000 else 65536)
    vol.cp_interval = 1e9
    fs = FileSystem(vol)
    d = fs.mkdir(ROOT_INO, "big").ino
    names = [f"entry-{i:07d}".encode() for i in range(n)]
    inos = {}
    for i, name in enumerate(names):
        inos[name] = fs.create(d, name).ino
        if i % 50_000 == 49_999:
            vol.cp()
    rng = random.Random(n)
    for name in rng.sample(names, 200):
        assert fs.lookup(d, name).ino == inos[name]
    with pytest.raises(FsError) as info:
        fs.lookup(d, "entry-missing")
    assert info.value.errno == errno.ENOENT
    vol.close()
    vol = Volume.on_device(dev)
    vol.cp_interval = 1e9
    fs = FileSystem(vol)
    for name in rng.sample(names, 200):
        assert fs.lookup(d, name).ino == inos[name]
    assert fs.getattr(d).size > 0

    if churn:
        # readdir in batches while entries come and go: every entry present for the
        # whole walk comes back exactly once, nothing comes back twice.
        present = set(names)
        removed: set[bytes] = set()
        added: list[bytes] = []
        seen: list[bytes] = []
        cookie = 0
        batch_no = 0
        while True:
            batch = fs.readdir(d, cookie)
            batch = [e for e in batch if e[0] not in (b".", b"..")][:500]
            if not batch:
                break
            seen.extend(e[0] for e in batch)
            cookie = batch[-1][3]
            for victim in rng.sample(sorted(present - removed), 40):
                fs.unlink(d, victim)
                removed.add(victim)
            for k in range(40):
                new = f"new-{batch_no}-{k}".encode()
                fs.create(d, new)
                added.append(new)
            batch_no += 1
        assert len(seen) == len(set(seen)), "readdir returned an entry twice"
        stable = present - removed
        assert stable <= set(seen), f"{len(stable - set(seen))} stable entries were skipped"
        assert set(seen) <= present | set(added)
        names = sorted(stable | set(added))
    assert sorted(fs.listdir("/big")) == sorted(names)
    assert_fsck_clean(vol)
    for i, name in enumerate(names):
        fs.unlink(d, name)
        if i % 50_000 == 49_999:
            vol.cp()
    assert fs.listdir("/big") == []
    fs.rmdir(ROOT_INO, "big")
    vol.cp()
    assert_fsck_clean(vol)
    vol.close()


def test_directory_20000_entries() -> None:
    big_directory(20_000, churn=True)


@pytest.mark.long
def test_directory_1000000_entries() -> None:
    big_directory(1_000_000, churn=False)


# ---- a huge sparse file ---------------------------------------------------------------------

def test_sparse_file_of_one_tib(mem_volume: Volume) -> None:
    vol = mem_volume
    fs = FileSystem(vol)
    ino = fs.create(ROOT_INO, "sparse").ino
    tib = 1 << 40
    fs.setattr(ino, size=tib)
    fs.write(ino, tib - 5, b"tail!")
    fs.write(ino, tib // 2, b"middle")
    assert fs.getattr(ino).size == tib
    vol.close()
    vol = Volume.on_device(vol.dev)
    fs = FileSystem(vol)
    st = fs.getattr(ino)
    assert st.size == tib
    assert st.blocks * 512 < 64 * BS, "holes must not take blocks"
    assert fs.read(ino, 0, 3 * BS) == bytes(3 * BS)
    assert fs.read(ino, tib // 2 - 100, 106) == bytes(100) + b"middle"
    assert fs.read(ino, tib // 3, BS) == bytes(BS)
    assert fs.read(ino, tib - BS, BS) == bytes(BS - 5) + b"tail!"
    assert fs.read(ino, tib - 2, 100) == b"l!"
    assert fs.read(ino, tib, 100) == b""
    fs.setattr(ino, size=tib // 2 + 3)
    assert fs.read(ino, tib // 2, 100) == b"mid"
    assert_fsck_clean(vol)
    vol.close()


# ---- checksums and damaged images -------------------------------------------------------

def data_vbn(vol: Volume, path: str, fbn: int) -> int:
    ino = FileSystem(vol).resolve(path)
    vbn, _ = vol.active.node(ino).tree.data_ptr(fbn)
    assert vbn
    return vbn


def corrupt(path: Path, vbn: int, offset: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(vbn * BS + offset)
        byte = f.read(1)
        f.seek(vbn * BS + offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corrupt_data_block_is_named(image_volume: Volume, image_path: Path) -> None:
    fs = FileSystem(image_volume)
    fs.write_file("/victim", b"".join(block_of(j) for j in range(3)))
    fs.write_file("/bystander", b"safe" * 5000)
    image_volume.cp()
    vbn = data_vbn(image_volume, "/victim", 1)
    image_volume.close()
    corrupt(image_path, vbn)

    with Volume.open(image_path) as vol:
        fs = FileSystem(vol)
        assert fs.read_file("/bystander") == b"safe" * 5000
        assert fs.read(fs.resolve("/victim"), 0, BS) == block_of(0)
        with pytest.raises(CorruptionError, match=rf"block {vbn}\b"):
            fs.read_file("/victim")
        report = check(vol)
        assert not report.clean
        assert any(f"block {vbn}" in p for p in report.problems), report.problems


def test_corrupt_root_slot_falls_back_to_the_other(image_volume: Volume,
                                                    image_path: Path) -> None:
    fs = FileSystem(image_volume)
    fs.write_file("/a", b"older")
    image_volume.cp()
    older = image_volume.root.cp_count
    fs.write_file("/a", b"newer")
    fs.write_file("/b", b"only in the newer CP")
    image_volume.close()
    with open(image_path, "rb") as f:
        slots = {}
        for vbn in ROOT_SLOT_VBNS:
            f.seek(vbn * BS)
            slots[vbn] = RootRecord.decode(f.read(BS)).cp_count
    newest = max(slots, key=lambda v: slots[v])
    assert slots[newest] == older + 1
    corrupt(image_path, newest, offset=40)

    with Volume.open(image_path) as vol:
        assert vol.root.cp_count == older
        fs = FileSystem(vol)
        assert fs.read_file("/a") == b"older"
        assert fs.listdir("/") == [b"a"]
        # The fallback is said, never silent (tests/test_fsck.py has the details).
        assert check(vol).problems == [vol.root_warning]
        fs.write_file("/c", b"after the fallback")
    with Volume.open(image_path) as vol:
        assert vol.root.cp_count > older
        assert FileSystem(vol).read_file("/c") == b"after the fallback"
        assert_fsck_clean(vol)


def test_both_root_slots_corrupt_is_a_clear_error(image_volume: Volume,
                                                  image_path: Path) -> None:
    image_volume.close()
    for vbn in ROOT_SLOT_VBNS:
        corrupt(image_path, vbn, offset=40)
    with pytest.raises(VolumeError, match="no valid root record"):
        Volume.open(image_path)


def test_truncated_image(image_volume: Volume, image_path: Path) -> None:
    image_volume.close()
    os.truncate(image_path, os.path.getsize(image_path) // 2)
    with pytest.raises(VolumeError, match="truncated"):
        Volume.open(image_path)


def test_not_a_volume(tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(random.Random(1).randbytes(2 << 20))
    with pytest.raises(VolumeError, match="not a snapvol volume"):
        Volume.open(junk)
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(1 << 20))
    with pytest.raises(VolumeError, match="not a snapvol volume"):
        Volume.open(zeros)
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    with pytest.raises(VolumeError):
        Volume.open(empty)


def test_missing_image(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="no such image"):
        Volume.open(tmp_path / "nope.img")
    with pytest.raises(VolumeError, match="is a directory"):
        Volume.open(tmp_path)
    with pytest.raises(VolumeError, match="already exists"):
        (tmp_path / "there.img").write_bytes(b"")
        Volume.create(tmp_path / "there.img", 16 << 20)


# ---- one owner at a time ------------------------------------------------------------------

HOLDER = """
import sys
from snapvol.engine.volume import Volume
vol = Volume.open(sys.argv[1])
print("ready", flush=True)
sys.stdin.read()
vol.close()
"""


def test_second_writer_is_refused_naming_the_holder(image_volume: Volume,
                                                    image_path: Path) -> None:
    image_volume.close()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(image_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == b"ready\n"
        with pytest.raises(LockedError, match=rf"in use by process {holder.pid}\b"):
            Volume.open(image_path)
        with pytest.raises(LockedError, match=str(holder.pid)):
            Volume.open(image_path, writable=False)
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    with Volume.open(image_path) as vol:  # the lock went with the holder
        with pytest.raises(LockedError, match="already open in this process"):
            Volume.open(image_path)
        assert_fsck_clean(vol)


# ---- sequential reads of big files ---------------------------------------------------------

class ReadCountingDevice(MemoryDevice):
    """A memory device that counts read calls (each one system call on an image)."""

    def __init__(self, nblocks: int) -> None:
        super().__init__(nblocks)
        self.read_calls = 0

    def read(self, vbn: int, count: int = 1) -> bytes:
        self.read_calls += 1
        return super().read(vbn, count)


def test_sequential_read_costs_one_device_read_per_request() -> None:
    """Reading a 72 MiB file (72 level-1 pointer blocks) in 128 KiB requests, as the
    kernel does through a mount: one device read per request, and the pointer blocks
    in a few runs rather than one seek each (which had cost ~4 ms per MiB on a disk)."""
    dev = ReadCountingDevice((160 << 20) // BS)
    Volume.format(dev)
    vol = Volume.on_device(dev)
    fs = FileSystem(vol)
    nblocks = 72 * 256
    data = b"".join(block_of(j) for j in range(nblocks))
    ino = fs.create(ROOT_INO, "big").ino
    for off in range(0, len(data), 1 << 20):
        fs.write(ino, off, data[off : off + (1 << 20)])
    vol.close()
    vol = Volume.on_device(dev)
    fs = FileSystem(vol)
    ino = fs.lookup(ROOT_INO, "big").ino
    fs.read(ino, 0, BS)  # loads the inode and the tree's top
    dev.read_calls = 0
    request = 128 << 10
    for off in range(0, len(data), request):
        assert fs.read(ino, off, request) == data[off : off + request], off
    requests = len(data) // request
    assert dev.read_calls <= requests + 4, (dev.read_calls, requests)
    # unaligned reads across run and pointer-block boundaries, and a dirty overlay
    for off, size in [(BS // 2, 5 * BS), ((1 << 20) - 100, 300 << 10), (len(data) - 777, 5000)]:
        assert fs.read(ino, off, size) == data[off : off + size]
    fs.write(ino, 3 * BS + 10, b"x" * 20)
    expect = bytearray(data[: 64 * BS])
    expect[3 * BS + 10 : 3 * BS + 30] = b"x" * 20
    assert fs.read(ino, 0, 64 * BS) == bytes(expect)
    assert_fsck_clean(vol)
    vol.close()


def test_a_damaged_block_in_a_long_read_is_named() -> None:
    """A long read checks every block of its run, not only the first."""
    dev, vol = new_memory_volume((64 << 20) // BS)
    fs = FileSystem(vol)
    data = b"".join(block_of(j) for j in range(512))
    fs.write_file("/f", data)
    vol.cp()
    ino = fs.lookup(ROOT_INO, "f").ino
    vbn, _ = vol.active.node(ino).tree.data_ptr(200)
    vol.close()
    dev.write(vbn, b"\xff" * BS)
    vol = Volume.on_device(dev)
    fs = FileSystem(vol)
    with pytest.raises(CorruptionError, match=rf"block {vbn}: checksum mismatch"):
        fs.read(ino, 128 * BS, 256 * BS)
    assert fs.read(ino, 0, 128 * BS) == data[: 128 * BS]
    vol.close()


def _aligned_reads_match(fs: FileSystem, ino: int, model: bytes | bytearray) -> int:
    """Read the file as the kernel does (aligned 128 KiB requests, one past the end),
    then at a few unaligned places; assert each equals the model. The request count."""
    request = 128 << 10
    offsets = range(0, len(model) + request, request)
    for off in offsets:
        assert fs.read(ino, off, request) == bytes(model[off : off + request]), off
    for off, size in [(BS // 2, request), (request - 7, request), (len(model) - 5000, request),
                      (255 * BS, 2 * BS)]:
        assert fs.read(ino, off, size) == bytes(model[off : off + size]), (off, size)
    return len(offsets)


def test_aligned_requests_read_what_the_pointers_say() -> None:
    """A 128 KiB request whose pointers are one on-disk run inside a loaded level-1 block
    takes a short path (BlockTree.read_range) that checks the run as plain lists. Whatever
    the layout (one run; blocks a later CP placed elsewhere; holes; the file's end inside
    a request; dirty blocks not yet committed; pointers out of order) every request equals
    the model, sequential reading still costs one device read per request, and a damaged
    block is named."""
    dev = ReadCountingDevice((64 << 20) // BS)
    Volume.format(dev)
    vol = Volume.on_device(dev)
    fs = FileSystem(vol)
    nblocks = 3 * 256 + 40
    model = bytearray(b"".join(block_of(j) for j in range(nblocks)))
    ino = fs.create(ROOT_INO, "f").ino
    fs.write(ino, 0, bytes(model))
    vol.cp()
    # a rewritten block (placed elsewhere by the next CP), a hole of 32 blocks starting
    # mid-request, and an end that is not block-aligned
    for at, data in [((256 + 40) * BS + 5, b"new"), (600 * BS, bytes(32 * BS))]:
        fs.write(ino, at, data)
        model[at : at + len(data)] = data
    tree = vol.active.node(ino).tree
    for fbn in range(600, 632):
        tree.punch_block(fbn)  # a real hole, not zeros written
    fs.setattr(ino, size=len(model) - 100)
    del model[len(model) - 100 :]
    _aligned_reads_match(fs, ino, model)  # dirty blocks overlaid (the long path)
    vol.cp()
    _aligned_reads_match(fs, ino, model)
    vol.close()

    vol = Volume.on_device(dev)
    fs = FileSystem(vol)
    fs.read(ino, 0, BS)  # the inode and the tree's top
    dev.read_calls = 0
    requests = _aligned_reads_match(fs, ino, model)
    assert dev.read_calls <= requests + 4 + 20, (dev.read_calls, requests)
    # Pointers out of order inside a request (two entries swapped in memory: the tree
    # now says blocks 33 and 34 are exchanged): first and last VBN still span the
    # request, but it is not one run, and the read must follow each pointer.
    node = vol.active.node(ino).tree.nodes[(1, 0)]
    node[[33, 34]] = node[[34, 33]]
    model[33 * BS : 35 * BS] = model[34 * BS : 35 * BS] + model[33 * BS : 34 * BS]
    assert fs.read(ino, 32 * BS, 32 * BS) == bytes(model[32 * BS : 64 * BS])
    vol.abandon()

    vbn = data_vbn_of(dev, ino, 70)
    dev.write(vbn, b"\xff" * BS)
    vol = Volume.on_device(dev, writable=False)
    fs = FileSystem(vol)
    assert fs.read(ino, 0, 32 * BS) == bytes(model[: 32 * BS])  # loads level-1 block 0
    with pytest.raises(CorruptionError, match=rf"block {vbn}: checksum mismatch"):
        fs.read(ino, 64 * BS, 32 * BS)
    vol.close()


def data_vbn_of(dev: MemoryDevice, ino: int, fbn: int) -> int:
    vol = Volume.on_device(dev, writable=False)
    try:
        vbn, _ = vol.active.node(ino).tree.data_ptr(fbn)
        return vbn
    finally:
        vol.close()


def test_large_writes_keep_views_counted_against_the_dirty_limit() -> None:
    """Blocks of a large `bytes` write stay views of it until the CP (no copy). Memory is
    bounded by counting each such buffer whole: rewriting the same 1 MiB with fresh
    buffers commits a CP at the dirty limit even though the dirty blocks do not grow.
    Mixed with small and unaligned writes, the file stays equal to a model throughout."""
    dev, vol = new_memory_volume((64 << 20) // BS)
    vol.dirty_limit = 4 << 20
    fs = FileSystem(vol)
    ino = fs.create(ROOT_INO, "f").ino
    model = bytearray()
    rng = random.Random(7)

    def write(off: int, data: bytes) -> None:
        fs.write(ino, off, data)
        if off > len(model):
            model.extend(bytes(off - len(model)))
        model[off : off + len(data)] = data

    start = vol.root.cp_count
    for i in range(6):
        write(0, bytes([i + 1]) * (1 << 20))
    assert vol.root.cp_count > start, "held write buffers never reached the dirty limit"
    for _ in range(60):
        off = rng.randrange(0, 3 << 20)
        size = rng.choice([1, 100, BS, 16 * BS, 64 * BS + 5, 1 << 20])
        write(off, rng.randbytes(size))
        if rng.random() < 0.3:
            size_now = len(model)
            assert fs.read(ino, 0, size_now) == bytes(model)
        if rng.random() < 0.1:
            vol.cp()
    assert fs.read(ino, 0, len(model)) == bytes(model)
    vol.close()
    vol = Volume.on_device(dev)
    assert FileSystem(vol).read(ino, 0, len(model) + 10) == bytes(model)
    assert_fsck_clean(vol)
    vol.close()
