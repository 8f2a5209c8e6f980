"""Data and directory behaviour through a real mount: random I/O against reference files,
readdir offsets while the directory changes, files unlinked while open, fsync, statfs,
and the stop paths (SIGTERM commits)."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusemount import Mount, mounted_volume, needs_fuse, wait_gone

pytestmark = needs_fuse


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Mount]:
    with mounted_volume(tmp_path, "--cp-interval", "1") as m:
        yield m


def _same_around(ref: int, got: int, lo: int, hi: int, where: object) -> None:
    """The bytes [lo - 1, hi + 1) of both files are equal (reads stop at either end)."""
    lo = max(0, lo - 1)
    assert os.pread(got, hi + 1 - lo, lo) == os.pread(ref, hi + 1 - lo, lo), where


@pytest.mark.parametrize("steps", [1500, pytest.param(20_000, marks=pytest.mark.long)])
def test_random_io_matches_reference_files(tmp_path: Path, mnt: Mount, steps: int) -> None:
    """Random writes, truncates, fsyncs and reads on four files through the mount and on
    reference files beside it: after every step the size and the bytes around what the
    step touched are equal, every 250 steps the whole files, and at the end also after a
    remount (nothing cached by the kernel or the mount process)."""
    rng = random.Random(1234)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    names = [f"f{i}" for i in range(4)]
    fds = {}
    for n in names:
        fds[n] = (os.open(ref_dir / n, os.O_RDWR | os.O_CREAT, 0o644),
                  os.open(mnt.path / n, os.O_RDWR | os.O_CREAT, 0o644))
    try:
        for step in range(steps):
            n = rng.choice(names)
            ref, got = fds[n]
            op = rng.random()
            size = os.fstat(ref).st_size
            if op < 0.45:
                off = rng.choice([0, size, rng.randrange(0, size + 1) if size else 0,
                                  rng.randrange(0, 4 << 20)])
                length = rng.choice([1, 7, 4096, 4097, rng.randrange(1, 300_000), 1 << 20])
                data = rng.randbytes(length)
                assert os.pwrite(ref, data, off) == os.pwrite(got, data, off) == length
                _same_around(ref, got, off, off + length, (step, n, "write", off, length))
            elif op < 0.6:
                new = rng.choice([0, rng.randrange(0, size + 1) if size else 0,
                                  rng.randrange(0, 6 << 20), size + 1])
                os.ftruncate(ref, new)
                os.ftruncate(got, new)
                _same_around(ref, got, max(0, min(size, new) - 8192), max(size, new) + 8192,
                             (step, n, "truncate", size, new))
            elif op < 0.65:
                os.fsync(got)
            else:
                off = rng.randrange(0, size + 10) if size else 0
                length = rng.choice([1, 4096, 65536, rng.randrange(1, 2 << 20)])
                assert os.pread(got, length, off) == os.pread(ref, length, off), (step, n)
            assert os.fstat(got).st_size == os.fstat(ref).st_size, (step, n)
            if step % 250 == 0 or step == steps - 1:
                for m in names:
                    r, g = fds[m]
                    total = os.fstat(r).st_size
                    assert os.pread(g, total + 1, 0) == os.pread(r, total + 1, 0), (step, m)
    finally:
        for ref, got in fds.values():
            os.close(ref)
            os.close(got)
    # Closed and read again by path, then after a remount: what the engine stored.
    for n in names:
        assert (mnt.path / n).read_bytes() == (ref_dir / n).read_bytes()
    online = mnt.snapvol("fsck", "--online", str(mnt.image))
    assert "clean" in online.stdout
    mnt.unmount()
    mnt.mount()
    for n in names:
        assert (mnt.path / n).read_bytes() == (ref_dir / n).read_bytes(), n


def test_readdir_offsets_survive_changes(mnt: Mount) -> None:
    d = mnt.path / "big"
    d.mkdir()
    originals = {f"entry-{i:05d}" for i in range(3000)}
    for name in originals:
        (d / name).touch()
    seen: list[str] = []
    rng = random.Random(7)
    with os.scandir(d) as it:
        for i, e in enumerate(it):
            seen.append(e.name)
            if i % 10 == 0:  # change the directory while the listing is in progress
                (d / f"new-{i}").touch()
                victim = rng.choice(sorted(originals - set(seen)) or ["none"])
                if victim != "none":
                    os.unlink(d / victim)
                    originals.discard(victim)
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    assert originals <= set(seen), f"{len(originals - set(seen))} entries were skipped"


def test_unlinked_open_file_lives_until_closed(mnt: Mount) -> None:
    p = mnt.path / "doomed"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"before " * 1000)
        os.unlink(p)
        assert not p.exists()
        assert "doomed" not in os.listdir(mnt.path)
        assert os.listdir(mnt.path) == [], "the unlinked files' directory must stay hidden"
        assert os.fstat(fd).st_nlink == 0
        os.write(fd, b"after")
        os.fsync(fd)  # a CP with the file still open: it must stay consistent
        assert os.pread(fd, 20, 7000) == b"after"
        assert "clean" in mnt.snapvol("fsck", "--online", str(mnt.image)).stdout
        # Replacing an open file by rename keeps the old one readable too.
        q = mnt.path / "target"
        q.write_bytes(b"old contents")
        fd2 = os.open(q, os.O_RDONLY)
        try:
            (mnt.path / "new").write_bytes(b"new contents")
            os.rename(mnt.path / "new", q)
            assert os.pread(fd2, 100, 0) == b"old contents"
            assert q.read_bytes() == b"new contents"
        finally:
            os.close(fd2)
    finally:
        os.close(fd)
    assert os.listdir(mnt.path) == ["target"]
    info = json.loads(mnt.snapvol("info", "--json", str(mnt.image)).stdout)
    assert info["used"] < 1 << 20  # the 7 KB file's blocks were freed
    mnt.unmount()
    assert mnt.snapvol("fsck", str(mnt.image)).returncode == 0


def test_statfs_errors_and_big_writes(mnt: Mount) -> None:
    st = os.statvfs(mnt.path)
    assert st.f_bsize == 4096 and st.f_namemax == 255
    assert 0 < st.f_bfree <= st.f_blocks == (2 << 30) // 4096
    with pytest.raises(FileNotFoundError):
        os.stat(mnt.path / "missing")
    (mnt.path / "d").mkdir()
    (mnt.path / "d" / "x").touch()
    with pytest.raises(OSError) as e:
        os.rmdir(mnt.path / "d")
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as e:
        os.mkdir(mnt.path / ("n" * 256))
    assert e.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as e:
        os.rename(mnt.path / "d", mnt.path / "d" / "inside")
    assert e.value.errno == errno.EINVAL
    data = os.urandom(8 << 20)
    (mnt.path / "big").write_bytes(data)
    assert (mnt.path / "big").read_bytes() == data
    before = os.statvfs(mnt.path).f_bfree
    assert before <= st.f_bfree - (8 << 20) // 4096


def test_writes_past_the_dirty_limit_while_reading_back(mnt: Mount) -> None:
    """200 MiB through the mount start three background CPs (64 MiB each) that are written
    while more data comes in; every region reads back right away (some of it from a CP
    still on its way to disk) and after a remount, and the image checks clean."""
    rng = random.Random(7)
    pieces = [rng.randbytes(1 << 20) for _ in range(16)]
    order = [rng.randrange(16) for _ in range(200)]
    path = mnt.path / "stream"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for i, k in enumerate(order):
            os.pwrite(fd, pieces[k], i << 20)
            j = rng.randrange(i + 1)  # any region written so far
            assert os.pread(fd, 1 << 20, j << 20) == pieces[order[j]], f"MiB {j} after {i}"
        # Overwrite parts of regions a background CP may still be writing.
        for j in range(0, 200, 7):
            os.pwrite(fd, b"\xee" * 5000, (j << 20) + 3000)
        os.fsync(fd)
    finally:
        os.close(fd)
    want = bytearray(b"".join(pieces[k] for k in order))
    for j in range(0, 200, 7):
        want[(j << 20) + 3000 : (j << 20) + 8000] = b"\xee" * 5000
    assert path.read_bytes() == want
    info = json.loads(mnt.snapvol("info", "--json", str(mnt.image)).stdout)
    assert info["cp_count"] >= 4
    mnt.unmount()
    mnt.mount()
    assert path.read_bytes() == want
    assert "clean" in mnt.snapvol("fsck", "--online", str(mnt.image)).stdout


def _window(path: Path) -> int:
    dev = os.stat(path).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    return int(bdi.read_text())


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may set a readahead window")
def test_readahead_window_and_long_sequential_reads(mnt: Mount) -> None:
    """A mount widens its readahead window to 1 MiB before it reports ready (the kernel's
    requests then come 1 MiB at a time), or keeps the kernel's with --readahead 0; both
    read a file written in many CPs back in order, and bad windows are refused."""
    assert _window(mnt.path) == 1024
    data = random.Random(5).randbytes(24 << 20)
    (mnt.path / "seq").write_bytes(data[: 10 << 20])
    os.sync()  # a CP in the middle: the file's blocks are in two runs
    with open(mnt.path / "seq", "ab") as f:
        f.write(data[10 << 20 :])
    mnt.unmount()
    mnt.mount()
    with open(mnt.path / "seq", "rb", buffering=0) as f:
        got = b"".join(iter(lambda: f.read(1 << 20), b""))
    assert got == data
    mnt.unmount()
    mnt.mount("--readahead", "0")
    assert _window(mnt.path) == 128  # the kernel's default
    assert (mnt.path / "seq").read_bytes() == data
    for bad in ("-1", "70000"):
        proc = mnt.snapvol("mount", str(mnt.image), str(mnt.path.parent), "--readahead", bad,
                           check=False)
        assert proc.returncode == 2
        assert f"--readahead {bad}: must be 0 (the kernel's default) to 65536 KiB" in (
            proc.stderr)


def test_sigterm_commits_and_unmounts(mnt: Mount) -> None:
    (mnt.path / "unsynced").write_bytes(b"written without fsync")
    pid = mnt.pid()
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
    assert not os.path.ismount(mnt.path)
    assert mnt.snapvol("mounts", "--json").stdout.strip() == "[]"
    got = mnt.snapvol("cat", str(mnt.image), "/unsynced").stdout
    assert got == "written without fsync"
    assert mnt.snapvol("fsck", str(mnt.image)).returncode == 0
