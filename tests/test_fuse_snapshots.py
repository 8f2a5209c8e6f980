""".snapshot through a real mount, and the CLI reaching the mount through its control
socket: snapshot reads, EROFS, mkdir/rmdir/mv in .snapshot, snapshots of files open for
writing, stable inode numbers, mount errors, read-only mounts."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusemount import Mount, assert_same_tree, mounted_volume, needs_fuse

pytestmark = needs_fuse


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Mount]:
    with mounted_volume(tmp_path) as m:
        yield m


def fill(root: Path) -> None:
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "file").write_bytes(b"version 1\n" * 1000)
    (root / "dir" / "sub" / "x").write_text("x")
    os.symlink("dir/file", root / "link")
    os.setxattr(root / "dir" / "file", "user.k", b"v")


def expect_errno(err: int, fn: object, *args: object) -> None:
    assert callable(fn)
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == err, f"{fn.__name__}{args}: {e.value}"


def test_snapshot_dir_reads_and_is_read_only(tmp_path: Path, mnt: Mount) -> None:
    fill(mnt.path)
    ref = tmp_path / "ref"
    subprocess.run(["cp", "-a", str(mnt.path), str(ref)], check=True)
    snapdir = mnt.path / ".snapshot"
    assert ".snapshot" not in os.listdir(mnt.path), ".snapshot is hidden from listings"
    assert os.listdir(snapdir) == []
    for reserved in (".snapshot", ".snapvol-unlinked"):
        expect_errno(errno.EEXIST, os.mkdir, mnt.path / reserved)
        expect_errno(errno.EEXIST, os.open, mnt.path / reserved, os.O_CREAT | os.O_EXCL)
    expect_errno(errno.EPERM, os.rename, snapdir, mnt.path / "elsewhere")
    os.mkdir(snapdir / "first")
    # The active tree moves on; the snapshot does not.
    (mnt.path / "dir" / "file").write_bytes(b"version 2\n")
    os.unlink(mnt.path / "dir" / "sub" / "x")
    (mnt.path / "new").write_text("new")
    assert_same_tree(ref, snapdir / "first")
    assert (snapdir / "first" / "link").read_bytes() == b"version 1\n" * 1000
    s = snapdir / "first"
    expect_errno(errno.EROFS, os.open, s / "dir" / "file", os.O_WRONLY)
    expect_errno(errno.EROFS, os.open, s / "dir" / "new", os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.EROFS, os.mkdir, s / "dir" / "d2")
    expect_errno(errno.EROFS, os.unlink, s / "dir" / "file")
    expect_errno(errno.EROFS, os.rmdir, s / "dir" / "sub")
    expect_errno(errno.EROFS, os.chmod, s / "dir" / "file", 0o777)
    expect_errno(errno.EROFS, os.truncate, s / "dir" / "file", 0)
    expect_errno(errno.EROFS, os.setxattr, s / "dir" / "file", "user.k", b"w")
    expect_errno(errno.EROFS, os.symlink, "t", s / "sym")
    expect_errno(errno.EXDEV, os.link, s / "dir" / "file", mnt.path / "hard")
    expect_errno(errno.EROFS, os.rename, s / "dir" / "file", mnt.path / "moved")
    expect_errno(errno.EROFS, os.open, snapdir / "file", os.O_CREAT | os.O_WRONLY)
    assert os.getxattr(s / "dir" / "file", "user.k") == b"v"
    # Inode numbers: distinct from the active tree's, and the same after a remount.
    a, b = os.stat(mnt.path / "dir" / "sub"), os.stat(s / "dir" / "sub")
    assert a.st_ino != b.st_ino
    inos = {p: os.lstat(p).st_ino for p in (s, s / "dir", s / "dir" / "file", snapdir)}
    mnt.unmount()
    mnt.mount()
    assert {p: os.lstat(p).st_ino for p in inos} == inos


def test_mkdir_rmdir_mv_in_snapshot_dir(mnt: Mount) -> None:
    fill(mnt.path)
    snapdir = mnt.path / ".snapshot"
    for name in ("a", "b", "c"):
        os.mkdir(snapdir / name)
        (mnt.path / "dir" / "file").write_text(name)
    assert sorted(os.listdir(snapdir)) == ["a", "b", "c"]
    assert [(snapdir / n / "dir" / "file").read_text() for n in "bc"] == ["a", "b"]
    expect_errno(errno.EEXIST, os.mkdir, snapdir / "a")
    expect_errno(errno.EINVAL, os.mkdir, os.fsencode(snapdir) + b"/not-utf8-\xff")
    os.rename(snapdir / "b", snapdir / "bee")
    assert sorted(os.listdir(snapdir)) == ["a", "bee", "c"]
    listed = json.loads(mnt.snapvol("snap", "list", "--json", str(mnt.image)).stdout)
    assert [r["name"] for r in listed] == ["a", "bee", "c"]
    os.rmdir(snapdir / "a")
    expect_errno(errno.ENOENT, os.rmdir, snapdir / "a")
    assert sorted(os.listdir(snapdir)) == ["bee", "c"]
    # A snapshot with open files cannot go.
    fd = os.open(snapdir / "c" / "dir" / "file", os.O_RDONLY)
    try:
        expect_errno(errno.EBUSY, os.rmdir, snapdir / "c")
        gone = mnt.snapvol("snap", "delete", str(mnt.image), "c", check=False)
        assert gone.returncode == 2 and "open files" in gone.stderr
        assert os.pread(fd, 10, 0) == b"b"
    finally:
        os.close(fd)
    os.rmdir(snapdir / "c")
    assert os.listdir(snapdir) == ["bee"]
    assert not os.path.exists(snapdir / "c")


def test_snapshot_of_file_open_for_writing(mnt: Mount) -> None:
    p = mnt.path / "log"
    with open(p, "wb", buffering=0) as f:
        for i in range(200):
            f.write(b"%05d\n" % i)
        os.mkdir(mnt.path / ".snapshot" / "mid")
        for i in range(200, 400):
            f.write(b"%05d\n" % i)
        snap = (mnt.path / ".snapshot" / "mid" / "log").read_bytes()
        assert snap == b"".join(b"%05d\n" % i for i in range(200))
    assert p.read_bytes() == b"".join(b"%05d\n" % i for i in range(400))
    assert "clean" in mnt.snapvol("fsck", "--online", str(mnt.image)).stdout


def test_cli_reaches_the_mount(mnt: Mount) -> None:
    fill(mnt.path)
    img = str(mnt.image)
    out = mnt.snapvol("snap", "create", img, "from-cli").stdout
    assert "created snapshot from-cli" in out
    assert os.listdir(mnt.path / ".snapshot") == ["from-cli"]
    assert (mnt.path / ".snapshot" / "from-cli" / "dir" / "sub" / "x").read_text() == "x"
    dup = mnt.snapvol("snap", "create", img, "from-cli", check=False)
    assert dup.returncode == 2
    assert dup.stderr.startswith("snapvol: error: ") and "already exists" in dup.stderr
    listed = json.loads(mnt.snapvol("snap", "list", "--json", img).stdout)
    assert [r["name"] for r in listed] == ["from-cli"]
    info = json.loads(mnt.snapvol("info", "--json", img).stdout)
    assert info["snapshots"] == 1 and info["size"] == 2 << 30
    checked = json.loads(mnt.snapvol("fsck", "--online", "--json", img).stdout)
    assert checked["clean"] and checked["stats"]["snapshots"] == 1
    offline = mnt.snapvol("fsck", img, check=False)
    assert offline.returncode == 2 and "--online" in offline.stderr
    mounts = json.loads(mnt.snapvol("mounts", "--json").stdout)
    assert [(m["image"], m["mountpoint"]) for m in mounts] == [(img, str(mnt.path))]
    assert os.listdir(mnt.path / ".snapshot" / "from-cli" / "dir") == ["file", "sub"]
    out = mnt.snapvol("snap", "rename", img, "from-cli", "renamed").stdout
    assert out == "renamed snapshot from-cli to renamed\n"
    assert os.listdir(mnt.path / ".snapshot") == ["renamed"]
    assert not os.path.exists(mnt.path / ".snapshot" / "from-cli")  # cached name forgotten
    assert (mnt.path / ".snapshot" / "renamed" / "dir" / "sub" / "x").read_text() == "x"
    missing = mnt.snapvol("snap", "rename", img, "from-cli", "again", check=False)
    assert missing.returncode == 2 and "from-cli" in missing.stderr
    restore = mnt.snapvol("snap", "restore", img, "renamed", check=False)
    assert restore.returncode == 2
    assert f"is mounted on {mnt.path}" in restore.stderr and "snapvol unmount" in restore.stderr
    assert "deleted snapshot renamed" in mnt.snapvol("snap", "delete", img, "renamed").stdout
    assert os.listdir(mnt.path / ".snapshot") == []
    # Commands that need the volume itself say who holds it.
    held = mnt.snapvol("put", img, str(mnt.path / "dir" / "file"), "/f", check=False)
    assert held.returncode == 2
    assert f"is mounted on {mnt.path}" in held.stderr and "snapvol unmount" in held.stderr


def test_mount_errors_and_read_only(tmp_path: Path, mnt: Mount) -> None:
    fill(mnt.path)
    other = tmp_path / "other"
    other.mkdir()
    again = mnt.snapvol("mount", str(mnt.image), str(other), check=False)
    assert again.returncode == 2 and "already mounted" in again.stderr
    notdir = mnt.snapvol("mount", str(mnt.image), str(mnt.image), check=False)
    assert notdir.returncode == 2
    missing = mnt.snapvol("mount", str(tmp_path / "nope.img"), str(other), check=False)
    assert missing.returncode == 2 and missing.stderr.startswith("snapvol: error: ")
    bad = mnt.snapvol("unmount", str(other), check=False)
    assert bad.returncode == 2 and "not a snapvol mount point" in bad.stderr
    os.mkdir(mnt.path / ".snapshot" / "s")
    mnt.unmount()
    assert not os.path.ismount(mnt.path)
    mnt.mount("--read-only")
    assert (mnt.path / "dir" / "file").read_bytes() == b"version 1\n" * 1000
    assert os.listdir(mnt.path / ".snapshot") == ["s"]
    expect_errno(errno.EROFS, os.open, mnt.path / "new", os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.EROFS, os.mkdir, mnt.path / ".snapshot" / "t")
    ro = json.loads(mnt.snapvol("mounts", "--json").stdout)
    assert ro[0]["read_only"] is True
    mnt.unmount()
    assert mnt.snapvol("fsck", str(mnt.image)).returncode == 0
