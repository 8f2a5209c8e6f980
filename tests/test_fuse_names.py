"""Names through a real mount, with os calls from this process: ENAMETOOLONG for a name
past 255 bytes wherever the kernel looks one up, the errno of each `mkdir .snapshot/NAME`
refusal (with its reason in the mount's log), and a real /.snapshot directory left by an
older volume. The rules themselves: test_names.py."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fusemount import Mount, mounted_volume, needs_fuse
from snapvol import image
from snapvol.engine import snapshots
from snapvol.engine.volume import Volume
from snapvol.fs import FileSystem
from snapvol.fuse.inodes import SNAPDIR_INO
from snapvol.layout.constants import MAX_SNAPSHOTS, ROOT_INO
from snapvol.streams.imagestream import StreamError
from test_names import make_old_snapshot_dir

pytestmark = needs_fuse

LONG = "n" * 256


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Mount]:
    with mounted_volume(tmp_path) as m:
        yield m


def expect_errno(err: int, fn: Callable[..., object], *args: object) -> None:
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == err, f"{getattr(fn, '__name__', fn)}{args}: {e.value}"


def mount_log(m: Mount) -> str:
    return "".join(p.read_text() for p in Path(m.env["SNAPVOL_RUN_DIR"]).glob("*.log"))


def test_a_name_past_255_bytes_is_enametoolong(mnt: Mount) -> None:
    """What the POSIX conformance suite checks: every call that looks a name up answers
    ENAMETOOLONG for it, not ENOENT (the kernel passes names up to 1024 bytes on)."""
    root = mnt.path
    (root / "f").write_bytes(b"data")
    (root / "d").mkdir()
    long = root / LONG
    for call, args in [(os.stat, ()), (os.lstat, ()), (os.unlink, ()), (os.rmdir, ()),
                       (os.chmod, (0o600,)), (os.chown, (0, 0)), (os.truncate, (0,)),
                       (os.link, (root / "x",)), (os.rename, (root / "x",)),
                       (os.open, (os.O_RDONLY,)), (os.readlink, ()), (os.listdir, ())]:
        expect_errno(errno.ENAMETOOLONG, call, long, *args)
    expect_errno(errno.ENAMETOOLONG, os.stat, root / "d" / LONG / "x")  # mid-path
    expect_errno(errno.ENAMETOOLONG, os.open, root / LONG / "x", os.O_CREAT | os.O_WRONLY)
    # The create paths, as before; and names in .snapshot.
    expect_errno(errno.ENAMETOOLONG, os.mkdir, long)
    expect_errno(errno.ENAMETOOLONG, os.open, long, os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.ENAMETOOLONG, os.link, root / "f", long)
    expect_errno(errno.ENAMETOOLONG, os.rename, root / "f", long)
    snapdir = root / ".snapshot"
    for call in (os.stat, os.rmdir, os.mkdir, os.listdir):
        expect_errno(errno.ENAMETOOLONG, call, snapdir / LONG)
    os.mkdir(snapdir / "s")
    expect_errno(errno.ENAMETOOLONG, os.rename, snapdir / "s", snapdir / LONG)
    expect_errno(errno.ENAMETOOLONG, os.rename, snapdir / LONG, snapdir / "t")
    assert sorted(os.listdir(root)) == ["d", "f"]
    assert os.listdir(snapdir) == ["s"]
    assert "Traceback" not in mount_log(mnt)


def test_mkdir_in_snapshot_dir_answers_each_refusal_with_its_errno(
        mnt: Mount, monkeypatch: pytest.MonkeyPatch) -> None:
    snapdir = mnt.path / ".snapshot"
    os.mkdir(snapdir / "first")
    expect_errno(errno.EEXIST, os.mkdir, snapdir / "first")
    for bad in ("x@y", "-x", "a%b", "a b"):
        expect_errno(errno.EINVAL, os.mkdir, snapdir / bad)
    expect_errno(errno.EINVAL, os.rename, snapdir / "first", snapdir / "x@y")
    os.mkdir(snapdir / "second")
    expect_errno(errno.EEXIST, os.rename, snapdir / "first", snapdir / "second")

    # A partial receive pending: EBUSY (the snapshot's plane would hold its blocks).
    mnt.unmount()
    _, src = _source()
    monkeypatch.setattr("snapvol.image.receiver.CHECKPOINT_BYTES", 4096)  # a resumable cut
    with Volume.open(mnt.image) as vol:
        for name in ("first", "second"):
            snapshots.delete(vol, name)
        data = b"".join(image.send(src, "s"))
        with pytest.raises(StreamError, match="truncated"):
            image.receive(vol, [data[: len(data) - 50_000]])
        assert image.resume_token(vol) is not None
    mnt.mount()
    expect_errno(errno.EBUSY, os.mkdir, snapdir / "third")
    mnt.unmount()

    # The table full: ENOSPC.
    with Volume.open(mnt.image) as vol:
        image.abort(vol)
        for i in range(MAX_SNAPSHOTS):
            snapshots.create(vol, f"s{i}")
    mnt.mount()
    expect_errno(errno.ENOSPC, os.mkdir, snapdir / "one-too-many")
    assert len(os.listdir(snapdir)) == MAX_SNAPSHOTS
    mnt.unmount()
    log = mount_log(mnt)
    assert "mkdir .snapshot/x@y refused: invalid snapshot name 'x@y'" in log
    assert "mkdir .snapshot/third refused:" in log and "has a partial receive" in log
    assert "mkdir .snapshot/one-too-many refused: too many snapshots" in log
    assert "Traceback" not in log


def _source() -> tuple[object, Volume]:
    from snapvol.device import MemoryDevice

    dev = MemoryDevice(4096)
    Volume.format(dev)
    src = Volume.on_device(dev)
    fs = FileSystem(src)
    for i in range(6):  # runs of blocks with gaps between them: several BLOCKS records
        fs.write_file(f"/a{i}", os.urandom(100_000))
        src.cp()
    for i in (1, 3):
        fs.unlink(ROOT_INO, f"a{i}")
    snapshots.create(src, "s")
    return dev, src


def test_a_real_snapshot_directory_is_hidden_whatever_comes_first(mnt: Mount) -> None:
    """An older volume may hold a real /.snapshot (put accepted the name then). The mount
    always shows the snapshots there, whether the root was listed first (readdirplus
    would have handed the kernel the real one) or the name looked up; the real directory
    is still in the snapshots taken with it, and the log says how to get it out."""
    mnt.unmount()
    with Volume.open(mnt.image) as vol:
        fs = FileSystem(vol)
        make_old_snapshot_dir(fs)
        fs.write_file("/.snapshot/mine", b"user data")
        fs.write_file("/other", b"o")
        snapshots.create(vol, "s1")
    mnt.mount()
    root = mnt.path
    assert sorted(os.listdir(root)) == ["other"]  # listed first
    assert os.stat(root / ".snapshot").st_ino == SNAPDIR_INO
    assert os.listdir(root / ".snapshot") == ["s1"]
    assert sorted(os.listdir(root / ".snapshot" / "s1")) == [".snapshot", "other"]
    assert (root / ".snapshot" / "s1" / ".snapshot" / "mine").read_bytes() == b"user data"
    expect_errno(errno.EEXIST, os.mkdir, root / ".snapshot")
    log = mount_log(mnt)
    assert "holds a real directory /.snapshot" in log and "snapvol get" in log
