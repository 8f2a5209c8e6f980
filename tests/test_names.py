"""Names across the layers (snapvol.layout.names): the errno every lookup and every
creation answers for a bad or too-long name, the rules of snapshot names and the kinds of
snapshot refusals, the names reserved at the root of a volume, and `put` copying what
reads return. The same through a real mount: test_fuse_names.py."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import assert_fsck_clean, new_memory_volume
from snapvol import image
from snapvol.engine import snapshots, snaptable
from snapvol.engine.volume import Volume
from snapvol.errors import FsError, SnapvolError
from snapvol.fs import FileSystem
from snapvol.fs.copy import put_tree
from snapvol.layout import names
from snapvol.layout.constants import ROOT_INO
from snapvol.streams.imagestream import StreamError, check_entry_name

MIB = 1 << 20
LONG = b"n" * 256
COMMAND = [sys.executable, "-m", "snapvol.cli.main"]


def expect(err: int, fn: Callable[..., object], *args: object, **kwargs: object) -> FsError:
    """`fn(*args)` fails with FsError `err` (never a ValueError or another built-in)."""
    with pytest.raises(FsError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, f"{getattr(fn, '__name__', fn)}{args}: {info.value!r}"
    assert not isinstance(info.value, ValueError)
    return info.value


def snapvol(*args: str | Path, code: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*COMMAND, *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, f"{args}: {proc.returncode} {proc.stdout}{proc.stderr}"
    return proc


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    err = proc.stderr
    assert err.startswith("snapvol: error: ") and err.count("\n") == 1, repr(err)
    return err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fs() -> FileSystem:
    """A fresh volume with /f (a file), /d (an empty directory) and /d2/x."""
    _, vol = new_memory_volume()
    fs = FileSystem(vol)
    fs.write_file("/f", b"data")
    fs.mkdir(ROOT_INO, "d")
    fs.makedirs("/d2")
    fs.write_file("/d2/x", b"x")
    return fs


# ---- the shared rule -----------------------------------------------------------------------
@pytest.mark.parametrize(("name", "err"), [
    (b"", errno.ENOENT), (b"a/b", errno.EINVAL), (b"a\0b", errno.EINVAL), (b"/", errno.EINVAL),
    (b".", errno.EINVAL), (b"..", errno.EINVAL), (LONG, errno.ENAMETOOLONG),
])
def test_entry_name_rule(name: bytes, err: int) -> None:
    with pytest.raises(names.InvalidName) as info:
        names.check_entry_name(name)
    assert info.value.errno == err
    names.check_entry_name(b"x" * 255)
    names.check_entry_name(b"...")


# ---- item 9: ENAMETOOLONG wherever a name is looked up ----------------------------------
def test_a_name_past_255_bytes_is_enametoolong_on_every_lookup(fs: FileSystem) -> None:
    """Not ENOENT: unlink, rmdir, the attribute calls (by path), truncate, the source of
    link and rename, path resolution in the middle of a path and at its end."""
    long = LONG.decode()
    expect(errno.ENAMETOOLONG, fs.lookup, ROOT_INO, LONG)
    expect(errno.ENAMETOOLONG, fs.unlink, ROOT_INO, LONG)
    expect(errno.ENAMETOOLONG, fs.rmdir, ROOT_INO, LONG)
    expect(errno.ENAMETOOLONG, fs.rename, ROOT_INO, LONG, ROOT_INO, b"other")
    for path in (f"/{long}", f"/d/{long}", f"/{long}/x", f"/d2/../{long}/f"):
        expect(errno.ENAMETOOLONG, fs.resolve, path)
        expect(errno.ENAMETOOLONG, fs.stat, path)  # chmod, chown, truncate resolve first
        expect(errno.ENAMETOOLONG, fs.remove_tree, path)
    expect(errno.ENAMETOOLONG, fs.write_file, f"/d/{long}", b"x")
    # The create paths, as before.
    expect(errno.ENAMETOOLONG, fs.mkdir, ROOT_INO, LONG)
    expect(errno.ENAMETOOLONG, fs.create, ROOT_INO, LONG)
    expect(errno.ENAMETOOLONG, fs.link, fs.resolve("/f"), ROOT_INO, LONG)
    expect(errno.ENAMETOOLONG, fs.rename, ROOT_INO, b"f", ROOT_INO, LONG)
    assert sorted(fs.listdir("/")) == [b"d", b"d2", b"f"]
    assert fs.read_file("/f") == b"data"


# ---- item 10: '/', NUL and empty names are errors with an errno, not ValueError ----------
@pytest.mark.parametrize(("name", "err"), [
    (b"a/b", errno.EINVAL), (b"d2/x", errno.EINVAL), (b"a\0b", errno.EINVAL),
    (b"\0", errno.EINVAL), (b"", errno.ENOENT),
])
def test_bad_names_are_fs_errors(fs: FileSystem, name: bytes, err: int) -> None:
    """EINVAL for '/' or NUL (the names cannot exist), ENOENT for an empty name (as POSIX
    answers for an empty path), from lookup, unlink, rmdir and both names of rename."""
    expect(err, fs.lookup, ROOT_INO, name)
    expect(err, fs.unlink, ROOT_INO, name)
    expect(err, fs.rmdir, ROOT_INO, name)
    expect(err, fs.rename, ROOT_INO, name, ROOT_INO, b"other")
    expect(err, fs.rename, ROOT_INO, b"f", ROOT_INO, name)
    expect(err, fs.mkdir, ROOT_INO, name)
    expect(err, fs.link, fs.resolve("/f"), ROOT_INO, name)
    assert fs.lookup(ROOT_INO, b"f").size == 4  # nothing moved


def test_dot_names(fs: FileSystem) -> None:
    """'.' and '..' answer as Linux does: they exist (EEXIST to create), are directories
    (EISDIR to unlink); rmdir and rename keep their answers."""
    for dot in (b".", b".."):
        expect(errno.EEXIST, fs.mkdir, ROOT_INO, dot)
        expect(errno.EEXIST, fs.create, ROOT_INO, dot)
        expect(errno.EEXIST, fs.link, fs.resolve("/f"), ROOT_INO, dot)
        expect(errno.EISDIR, fs.unlink, ROOT_INO, dot)
        expect(errno.EINVAL, fs.rename, ROOT_INO, dot, ROOT_INO, b"z")
        expect(errno.EINVAL, fs.rename, ROOT_INO, b"f", ROOT_INO, dot)
    expect(errno.EINVAL, fs.rmdir, ROOT_INO, b".")
    expect(errno.ENOTEMPTY, fs.rmdir, ROOT_INO, b"..")


# ---- item 11: snapshot names the command line can always express ------------------------
@pytest.mark.parametrize("bad", ["x@y", "prod@monday", "-x", "--all", "a%b", "a b", "a\nb",
                                 "tab\t", "a,b", "a#b", "a*", "$HOME", "a\\b", "q?"])
def test_new_snapshot_names_are_refused_with_the_rule(bad: str) -> None:
    _, vol = new_memory_volume()
    snapshots.create(vol, "ok")
    for make in (lambda: snapshots.create(vol, bad), lambda: snapshots.rename(vol, "ok", bad)):
        with pytest.raises(snaptable.InvalidSnapshotName) as info:
            make()
        assert info.value.errno == errno.EINVAL
        assert "letters, digits and the characters . _ - : +" in str(info.value)
    assert [e.name for e in vol.snapshots.entries()] == ["ok"]


@pytest.mark.parametrize("good", ["é", "hourly.0", "June-3", "2024-06-01T12:00:00+02:00",
                                  "a_b", "...", "x" * 255, "snap-é-日本"])
def test_snapshot_names_that_stay_allowed(good: str) -> None:
    _, vol = new_memory_volume()
    snapshots.create(vol, good)
    snapshots.rename(vol, good, good + "2" if len(good) < 255 else "renamed")


def _legacy(vol: Volume, name: str) -> None:
    """A snapshot named as an older snapvol allowed (or a receive brought): the table
    holds any name its own rule accepts."""
    snapshots.create(vol, "legacy")
    slot, entry = vol.snapshots.find("legacy") or (0, None)
    assert entry is not None
    vol.snapshots.slots[slot] = dataclasses.replace(entry, name=name)
    vol.table_changed()
    vol.cp(force=True)


def test_old_snapshot_names_can_still_be_used_renamed_and_deleted(tmp_path: Path) -> None:
    path = tmp_path / "vol.img"
    with Volume.create(path, 32 * MIB) as vol:
        FileSystem(vol).write_file("/f", b"then")
        _legacy(vol, "x@y")
        FileSystem(vol).write_file("/f", b"now")
        _legacy(vol, "-dash")
        assert FileSystem(vol, "x@y").read_file("/f") == b"then"
    # Through the command line: each takes the name as its own argument.
    assert snapvol("cat", path, "/f", "--snapshot", "x@y").stdout == "then"
    snapvol("snap", "rename", path, "x@y", "x-y")
    snapvol("snap", "delete", path, "--", "-dash")
    listed = json.loads(snapvol("snap", "list", path, "--json").stdout)
    assert [s["name"] for s in listed] == ["x-y"]
    err = one_line_error(snapvol("snap", "create", path, "a@b", code=2))
    assert "'@' cannot be used" in err and "letters, digits" in err
    err = one_line_error(snapvol("snap", "rename", path, "x-y", "a%b", code=2))
    assert "'%' cannot be used" in err
    err = one_line_error(snapvol("snap", "create", path, "--", "-x", code=2))
    assert "cannot start with '-'" in err


def test_a_received_snapshot_keeps_an_old_name() -> None:
    """A stream is what a volume held: its names follow the table's rule, not the rule for
    new names, so a mirror of an old volume (or a dump made before) still arrives whole;
    a name the table cannot hold is refused."""
    _, src = new_memory_volume()
    FileSystem(src).write_file("/f", b"1")
    _legacy(src, "old@name")
    _, dst = new_memory_volume()
    image.receive(dst, [b"".join(image.send(src, "old@name"))])
    assert [e.name for e in dst.snapshots.entries()] == ["old@name"]
    assert FileSystem(dst, "old@name").read_file("/f") == b"1"
    snapshots.rename(dst, "old@name", "old-name")
    with pytest.raises(StreamError, match="cannot contain '/'"):
        check_entry_name(b"a/b")


# ---- item 12: each snapshot refusal has its kind and errno -------------------------------
def test_snapshot_refusals_carry_their_errno() -> None:
    _, vol = new_memory_volume()
    snapshots.create(vol, "s0")
    cases: list[tuple[int, Callable[[], object]]] = [
        (errno.EEXIST, lambda: snapshots.create(vol, "s0")),
        (errno.EINVAL, lambda: snapshots.create(vol, "a@b")),
        (errno.ENAMETOOLONG, lambda: snapshots.create(vol, "x" * 256)),
        (errno.ENOENT, lambda: snapshots.delete(vol, "nope")),
        (errno.ENOENT, lambda: snapshots.rename(vol, "nope", "new")),
    ]
    for err, call in cases:
        with pytest.raises(snaptable.SnapshotError) as info:
            call()
        assert info.value.errno == err, info.value
    for i in range(1, 255):
        snapshots.create(vol, f"s{i}")
    with pytest.raises(snaptable.SnapshotLimit) as full:
        snapshots.create(vol, "one-more")
    assert full.value.errno == errno.ENOSPC and "limit is 255" in str(full.value)


# ---- item 20: .snapshot is reserved at the root -----------------------------------------
@pytest.mark.parametrize("reserved", [b".snapshot", b".snapvol-unlinked"])
def test_reserved_root_names_are_refused(fs: FileSystem, reserved: bytes,
                                         tmp_path: Path) -> None:
    """Nothing may be made under a name the mount uses at the root; below it, the name is
    an ordinary one."""
    f = fs.resolve("/f")
    for make in (lambda: fs.mkdir(ROOT_INO, reserved), lambda: fs.create(ROOT_INO, reserved),
                 lambda: fs.symlink(ROOT_INO, reserved, "f"),
                 lambda: fs.mknod(ROOT_INO, reserved, stat.S_IFIFO | 0o600),
                 lambda: fs.link(f, ROOT_INO, reserved)):
        e = expect(errno.EEXIST, make)
        assert "reserved at the root of a volume" in str(e)
    expect(errno.EPERM, fs.rename, ROOT_INO, b"d", ROOT_INO, reserved)
    # put: the name as the destination, or as the name a copy would take at the root.
    src = tmp_path / os.fsdecode(reserved)
    src.mkdir()
    (src / "inside").write_bytes(b"x")
    expect(errno.EEXIST, put_tree, fs, src, "/")
    expect(errno.EEXIST, put_tree, fs, tmp_path / os.fsdecode(reserved) / "inside",
           os.fsdecode(b"/" + reserved))
    assert sorted(fs.listdir("/")) == [b"d", b"d2", b"f"]
    put_tree(fs, src, "/d")  # not at the root: an ordinary name
    assert fs.read_file(b"/d/" + reserved + b"/inside") == b"x"
    assert_fsck_clean(fs.vol)


def make_old_snapshot_dir(fs: FileSystem) -> None:
    """A real /.snapshot, as older versions let put and mkdir make: a directory made
    under another name, then given that name in the directory itself."""
    fs.mkdir(ROOT_INO, "made-before")
    root = fs.image.directory(fs.image.node(ROOT_INO))
    e = root.remove(b"made-before")
    root.insert(names.SNAPDIR_NAME, e.ino, e.dtype)


def test_an_old_volumes_real_snapshot_directory_can_be_moved_away(fs: FileSystem) -> None:
    """A volume from before the rule may hold /.snapshot: it can be read, renamed away
    and removed (the mount hides it: test_fuse_names.py)."""
    make_old_snapshot_dir(fs)
    fs.write_file("/.snapshot/mine", b"user data")
    assert fs.read_file("/.snapshot/mine") == b"user data"
    fs.rename(ROOT_INO, names.SNAPDIR_NAME, ROOT_INO, b"my-snapshot-dir")
    assert fs.read_file("/my-snapshot-dir/mine") == b"user data"


# ---- item 21: put copies what read returns; a refusal for space is a no-op --------------
def _host_files() -> list[Path]:
    """A /proc file (st_size 0, has contents) and a sysfs file (st_size 4096, reads a
    few bytes): both kinds whose size cp does not trust."""
    proc = Path("/proc/version")
    sysfs = next(p for p in (Path("/sys/kernel/mm/transparent_hugepage/enabled"),
                             Path("/sys/devices/system/cpu/online"),
                             Path("/sys/kernel/uevent_seqnum")) if p.exists())
    assert os.stat(proc).st_size == 0 and proc.read_bytes()
    assert os.stat(sysfs).st_size == 4096 and 0 < len(sysfs.read_bytes()) < 4096
    return [proc, sysfs]


def test_put_copies_what_read_returns(fs: FileSystem, tmp_path: Path) -> None:
    for i, host in enumerate(_host_files()):
        put_tree(fs, host, f"/copy{i}")
        want = host.read_bytes()
        got = fs.read_file(f"/copy{i}")
        assert got == want, (host, got[:40], want[:40])
        assert fs.stat(f"/copy{i}").size == len(want)
    # A regular file with a hole at its end keeps its size and its hole.
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.write(b"head")
        f.truncate(3 * MIB)
    put_tree(fs, sparse, "/sparse")
    assert fs.stat("/sparse").size == 3 * MIB
    assert fs.read(fs.resolve("/sparse"), 0, 8) == b"head" + bytes(4)
    assert fs.data_extents(fs.resolve("/sparse")) == [(0, 4096)]
    assert_fsck_clean(fs.vol)


def _fill(vol: Volume, leave_blocks: int) -> None:
    """Fill the volume until about `leave_blocks` blocks stay free for data."""
    fs = FileSystem(vol)
    ino = fs.create(ROOT_INO, "filler").ino
    free = vol.usage()["free"] - vol.meta_reserve - leave_blocks
    fs.write(ino, 0, os.urandom(free * 4096 * 95 // 100))
    vol.cp()


def test_a_put_refused_for_space_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "small.img"
    with Volume.create(path, 16 * MIB) as vol:
        snapshots.create(vol, "s")
        _fill(vol, 200)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a-small").write_bytes(b"small")
    (src / "z-big").write_bytes(os.urandom(4 * MIB))
    with Volume.open(path) as vol:
        fs = FileSystem(vol)
        before = (vol.root.cp_count, vol.usage(), fs.listdir("/"))
        e = expect(errno.ENOSPC, put_tree, fs, src, "/")
        assert "needs at least 4.0 MiB" in str(e)
        assert (vol.root.cp_count, vol.usage(), fs.listdir("/")) == before
        assert not vol.dirty
    # The command: exit 2, one line, and not one byte of the image changed.
    image_before = digest(path)
    err = one_line_error(snapvol("put", path, src, "/", code=2))
    assert "no space left on volume" in err and "delete files or snapshots" in err
    assert digest(path) == image_before
    with Volume.open(path, writable=False) as vol:
        assert_fsck_clean(vol)
        assert FileSystem(vol).listdir("/") == [b"filler"]


def test_check_room_commits_earlier_frees_first(tmp_path: Path) -> None:
    """Blocks freed since the last CP count once that CP commits: a put that fits only
    in them is not refused."""
    with Volume.create(tmp_path / "v.img", 16 * MIB) as vol:
        _fill(vol, 100)
        fs = FileSystem(vol)
        fs.unlink(ROOT_INO, "filler")
        assert vol.alloc is not None and vol.alloc.frees_pending
        fs.check_room(1000, "a test")
        with pytest.raises(SnapvolError, match="a test needs at least"):
            fs.check_room(vol.nblocks, "a test")


def test_check_room_leaves_metadata_to_the_reserve(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Only data is checked up front: a put of empty files and directories is left to
    the engine's admission, which lets metadata use the reserve."""
    with Volume.create(tmp_path / "v.img", 16 * MIB) as vol:
        fs = FileSystem(vol)
        monkeypatch.setattr(Volume, "meta_reserve", property(lambda self: vol.nblocks))
        fs.check_room(0, "empty files")
        with pytest.raises(FsError, match="needs at least 4 KiB"):
            fs.check_room(1, "one block")
