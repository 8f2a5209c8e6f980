"""Host <-> volume tree copies (snapvol.fs.copy): put then get gives back the same tree.

The tree holds every kind of file the host allows (we run as root, so device nodes too),
and the comparison walks both trees looking at type, mode, owner, size, mtime, symlink
target, contents, xattrs, device numbers and the hard-link structure; sparse files must
come back sparse.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapvol.engine import snapshots
from snapvol.engine.fsck import check
from snapvol.engine.volume import Volume
from snapvol.errors import CorruptionError, FsError
from snapvol.fs import FileSystem
from snapvol.fs.copy import CHUNK, CopyStats, get_tree, put_tree

MIB = 1 << 20
DEPTH = 200  # deeper than any recursion-based walk would like, within PATH_MAX
T0 = 1_600_000_000_123_456_789  # distinctive nanosecond times


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL in the kernel's xattr form: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


_NO_ID = 0xFFFFFFFF
# user::rwx, user:1000:r--, group::r-x, mask::r-x, other::r--
ACL = _acl((0x01, 7, _NO_ID), (0x02, 4, 1000), (0x04, 5, _NO_ID), (0x10, 5, _NO_ID),
           (0x20, 4, _NO_ID))


# ---- building and comparing host trees ---------------------------------------------------
def _write_sparse(path: Path) -> None:
    """4 KiB of data, a 2 MiB hole, 4 KiB of data, then a hole to the end (6 MiB)."""
    with open(path, "wb") as f:
        f.write(b"A" * 4096)
        f.seek(2 * MIB + 4096)
        f.write(b"B" * 4096)
        f.truncate(6 * MIB)


def make_tree(root: Path, devices: bool = True) -> Path:
    """A tree with every file type, odd names, modes, owners, xattrs, links and holes."""
    root.mkdir()
    r = os.fsencode(root)
    (root / "plain.txt").write_bytes(b"hello, volume\n")
    (root / "empty").write_bytes(b"")
    big = os.urandom(3 * CHUNK + 1234)  # crosses the 1 MiB copy chunks, unaligned end
    (root / "big.bin").write_bytes(big)
    (root / "zeros.bin").write_bytes(bytes(10000))  # explicit zeros read back the same
    _write_sparse(root / "sparse.bin")
    (root / "with space").write_bytes(b"spaced out")
    with open(os.path.join(r, b"caf\xe9-\xff.bin"), "wb") as f:  # not UTF-8
        f.write(b"latin-1 name")
    os.mkdir(os.path.join(r, b"dir \xfe"))
    with open(os.path.join(r, b"dir \xfe", b"inner"), "wb") as f:
        f.write(b"inside a non-UTF-8 directory")
    # symlinks: relative, absolute, dangling, non-UTF-8 target
    os.symlink("plain.txt", root / "link-rel")
    os.symlink("/etc/hostname", root / "link-abs")
    os.symlink("does/not/exist", root / "link-dangling")
    os.symlink(b"target-\xff", os.path.join(r, b"link-bytes"))
    # hard links: a file with three names in two directories, and two linked symlinks
    (root / "links").mkdir()
    (root / "links" / "one").write_bytes(b"linked data")
    os.link(root / "links" / "one", root / "links" / "two")
    os.link(root / "links" / "one", root / "three")
    os.link(root / "link-rel", root / "links" / "link-rel-again", follow_symlinks=False)
    # special files
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "socket"))
    sock.close()
    if devices:
        os.mknod(root / "chardev", stat.S_IFCHR | 0o620, os.makedev(1, 3))
        os.mknod(root / "blockdev", stat.S_IFBLK | 0o660, os.makedev(7, 200))
    # deep nesting
    deep = root / "deep"
    for _ in range(DEPTH):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (deep / "bottom").write_bytes(b"the bottom")
    # modes and owners
    (root / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4755)
    (root / "noperm").write_bytes(b"secret")
    os.chmod(root / "noperm", 0)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    (root / "locked").mkdir()
    (root / "locked" / "f").write_bytes(b"in a read-only dir")
    os.chmod(root / "locked", 0o555)
    os.chown(root / "plain.txt", 1234, 5678)
    os.chown(root / "links", 4321, 8765)
    os.chown(root / "link-rel", 777, 888, follow_symlinks=False)
    # xattrs (user namespace; binary values; on a file, a directory and a fifo)
    os.setxattr(root / "plain.txt", "user.note", b"a note")
    os.setxattr(root / "plain.txt", "user.bin", bytes(range(256)))
    os.setxattr(root / "links", "user.dir", b"on a directory")
    os.setxattr(root / "big.bin", "user.empty", b"")
    # POSIX ACLs travel as raw system.posix_acl_* xattrs (an access ACL changes the mode)
    (root / "acl-file").write_bytes(b"acl")
    os.setxattr(root / "acl-file", "system.posix_acl_access", ACL)
    (root / "acl-dir").mkdir()
    os.setxattr(root / "acl-dir", "system.posix_acl_default", ACL)
    # times last, deepest first, so creating entries does not move them again
    paths = [p for p in _walk(r)]
    for i, p in enumerate(sorted(paths, key=len, reverse=True)):
        os.utime(p, ns=(T0 + i * 1000 + 1, T0 + i * 7919), follow_symlinks=False)
    return root


def _walk(top: bytes) -> Iterator[bytes]:
    """Every path under `top` (itself included), without recursion or following links."""
    stack = [top]
    while stack:
        path = stack.pop()
        yield path
        if stat.S_ISDIR(os.lstat(path).st_mode):
            stack.extend(os.path.join(path, name) for name in os.listdir(path))


def _xattrs(path: bytes) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def tree_form(top: Path | bytes) -> dict[bytes, tuple[object, ...]]:
    """Path (relative) -> everything a copy must keep, incl. the hard-link group."""
    t = os.fsencode(top)
    form: dict[bytes, tuple[object, ...]] = {}
    groups: dict[tuple[int, int], list[bytes]] = {}
    for path in _walk(t):
        rel = os.path.relpath(path, t)
        st = os.lstat(path)
        mode = st.st_mode
        content: object = None
        target: bytes | None = None
        if stat.S_ISREG(mode):
            with open(path, "rb") as f:
                content = hashlib.sha256(f.read()).hexdigest()
        elif stat.S_ISLNK(mode):
            target = os.readlink(path)
        size = None if stat.S_ISDIR(mode) else st.st_size  # dir sizes depend on history
        rdev = st.st_rdev if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0
        form[rel] = (stat.S_IFMT(mode), stat.S_IMODE(mode), st.st_uid, st.st_gid, size,
                     st.st_mtime_ns, target, content, _xattrs(path), rdev,
                     None if stat.S_ISDIR(mode) else st.st_nlink)
        if not stat.S_ISDIR(mode):
            groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
    for names in groups.values():
        for rel in names:
            form[rel] = (*form[rel], tuple(sorted(names)))
    return form


def assert_same_tree(want: Path | bytes, got: Path | bytes) -> None:
    a, b = tree_form(want), tree_form(got)
    assert sorted(a) == sorted(b), f"names differ: {sorted(set(a) ^ set(b))[:10]}"
    diffs = [f"{rel!r}: {a[rel]} != {b[rel]}" for rel in sorted(a) if a[rel] != b[rel]]
    assert not diffs, "\n".join(diffs[:10])


def assert_clean(vol: Volume) -> None:
    report = check(vol)
    assert report.clean, report.problems[:10]


# ---- fixtures ------------------------------------------------------------------------------
@pytest.fixture
def vol(tmp_path: Path) -> Iterator[Volume]:
    v = Volume.create(tmp_path / "vol.img", 128 * MIB)
    yield v
    if not v.closed:
        v.close()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tree")


class Recorder:
    """A Progress that remembers what it was told."""

    def __init__(self) -> None:
        self.total: tuple[int, int] | None = None
        self.files = 0
        self.nbytes = 0

    def start(self, files: int, nbytes: int) -> None:
        self.total = (files, nbytes)

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        self.files += files
        self.nbytes += nbytes


# ---- round trips -----------------------------------------------------------------------------
def test_round_trip_keeps_everything(vol: Volume, tree: Path, tmp_path: Path) -> None:
    stats = put_tree(FileSystem(vol), tree, "/")
    # tree, dir \xfe, links, deep/d.../d, sticky, locked, acl-dir
    assert stats.directories == DEPTH + 7
    assert stats.hardlinks == 3
    assert stats.symlinks == 4  # the fifth symlink name is a hard link
    assert stats.specials == 4
    path = vol.path
    vol.close()  # everything must be in the committed image, not only in memory

    with Volume.open(path, writable=False) as ro:
        assert_clean(ro)
        fs = FileSystem(ro)
        sparse = fs.stat("/tree/sparse.bin")
        assert sparse.size == 6 * MIB
        assert sparse.blocks * 512 <= 16 * 4096, "holes were filled with blocks on put"
        back = get_tree(fs, "/tree", tmp_path / "back")
    assert back == CopyStats(stats.files, stats.directories, stats.symlinks, stats.specials,
                             stats.hardlinks, back.bytes, stats.size)
    assert_same_tree(tree, tmp_path / "back")
    st = os.stat(tmp_path / "back" / "sparse.bin")
    assert st.st_size == 6 * MIB
    assert st.st_blocks * 512 <= 64 * 1024, "holes were not recreated on get"


def test_atime_is_kept(vol: Volume, tree: Path, tmp_path: Path) -> None:
    want = os.lstat(tree / "plain.txt").st_atime_ns
    fs = FileSystem(vol)
    put_tree(fs, tree / "plain.txt", "/p")
    assert fs.stat("/p").atime_ns == want
    get_tree(fs, "/p", tmp_path / "p")
    assert os.lstat(tmp_path / "p").st_atime_ns == want


def test_snapshot_gives_back_the_tree_as_it_was(vol: Volume, tree: Path, tmp_path: Path) -> None:
    fs = FileSystem(vol)
    put_tree(fs, tree, "/")
    snapshots.create(vol, "before")
    fs.remove_tree("/tree/links")
    fs.write_file("/tree/plain.txt", b"changed")
    get_tree(FileSystem(vol, "before"), "/tree", tmp_path / "old")
    assert_same_tree(tree, tmp_path / "old")
    get_tree(fs, "/tree/plain.txt", tmp_path / "new.txt")
    assert (tmp_path / "new.txt").read_bytes() == b"changed"
    assert_clean(vol)


def test_progress_reports_totals(vol: Volume, tree: Path, tmp_path: Path) -> None:
    fs = FileSystem(vol)
    rec = Recorder()
    stats = put_tree(fs, tree, "/", rec)
    assert rec.total is not None
    # The bar counts what the summary line counts: regular files, and their lengths
    # (holes included, a hard-linked file once).
    assert rec.files == rec.total[0] == stats.files < stats.entries
    assert rec.nbytes == rec.total[1] == stats.size > stats.bytes
    rec = Recorder()
    back = get_tree(fs, "/tree", tmp_path / "back", rec)
    assert rec.total is not None and rec.files == rec.total[0] and rec.nbytes == rec.total[1]
    assert (rec.files, rec.nbytes) == (back.files, back.size) == (stats.files, stats.size)


# ---- destinations, like cp -a -------------------------------------------------------------
def test_put_destinations(vol: Volume, tmp_path: Path) -> None:
    src = tmp_path / "f.txt"
    src.write_bytes(b"one")
    fs = FileSystem(vol)
    fs.mkdir(2, "dir")
    put_tree(fs, src, "/dir")  # existing directory: the copy goes inside
    assert fs.read_file("/dir/f.txt") == b"one"
    put_tree(fs, src, "/dir/renamed")  # new name: the copy takes it
    assert fs.read_file("/dir/renamed") == b"one"
    put_tree(fs, str(src) + "", "/")  # default destination: the root
    assert fs.read_file("/f.txt") == b"one"
    for dest in ("/dir", "/dir/renamed"):
        with pytest.raises(FsError) as info:
            put_tree(fs, src, dest)
        assert info.value.errno == errno.EEXIST and "already exists" in str(info.value)
    with pytest.raises(FsError) as info:
        put_tree(fs, src, "/missing/parent/x")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(FsError) as info:
        put_tree(fs, tmp_path / "nope", "/")
    assert info.value.errno == errno.ENOENT and "nope" in str(info.value)
    assert sorted(fs.listdir("/dir")) == [b"f.txt", b"renamed"]


def test_get_destinations(vol: Volume, tmp_path: Path) -> None:
    fs = FileSystem(vol)
    fs.makedirs("/a/b")
    fs.write_file("/a/b/f", b"data")
    fs.write_file("/top", b"top")
    out = tmp_path / "out"
    out.mkdir()
    get_tree(fs, "/a", out)  # existing directory: inside it
    assert (out / "a" / "b" / "f").read_bytes() == b"data"
    get_tree(fs, "/a/b/f", out / "g")  # new name
    assert (out / "g").read_bytes() == b"data"
    with pytest.raises(FsError) as info:
        get_tree(fs, "/a", out)
    assert info.value.errno == errno.EEXIST
    with pytest.raises(FsError) as info:
        get_tree(fs, "/a/b/f", out / "g")
    assert info.value.errno == errno.EEXIST
    assert (out / "g").read_bytes() == b"data"
    everything = tmp_path / "all"
    everything.mkdir()
    get_tree(fs, "/", everything)  # the root into an existing directory: its entries
    assert sorted(os.listdir(everything)) == ["a", "top"]
    get_tree(fs, "/", tmp_path / "fresh")
    assert sorted(os.listdir(tmp_path / "fresh")) == ["a", "top"]
    with pytest.raises(FsError) as info:
        get_tree(fs, "/nothing", tmp_path / "x")
    assert info.value.errno == errno.ENOENT and not (tmp_path / "x").exists()


def test_put_does_not_follow_a_symlink_source(vol: Volume, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "alias")
    fs = FileSystem(vol)
    put_tree(fs, tmp_path / "alias", "/")
    assert fs.readlink(fs.resolve("/alias", follow=False)) == b"real"


# ---- failures leave things as they were -------------------------------------------------------
def test_put_on_a_full_volume_removes_the_partial_copy(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A put that runs out of space part way (here the up-front check is switched off,
    as when metadata, not data, is what does not fit) removes what it made."""
    monkeypatch.setattr(FileSystem, "check_room", lambda *args: None)
    v = Volume.create(tmp_path / "small.img", 4 * MIB)
    fs = FileSystem(v)
    fs.write_file("/keep", b"kept")
    v.cp()
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"small")
    (src / "z-big").write_bytes(os.urandom(6 * MIB))
    free = v.usage()["free"]
    with pytest.raises(FsError) as info:
        put_tree(fs, src, "/")
    assert info.value.errno == errno.ENOSPC
    assert fs.listdir("/") == [b"keep"]
    v.cp()
    assert v.usage()["free"] >= free - 8
    assert fs.read_file("/keep") == b"kept"
    assert_clean(v)
    v.close()


def test_get_failure_removes_the_partial_copy(tmp_path: Path) -> None:
    """A block that fails its checksum stops the get half way; the host keeps nothing."""
    image = tmp_path / "vol.img"
    with Volume.create(image, 16 * MIB) as v:
        fs = FileSystem(v)
        fs.makedirs("/t/a")
        fs.write_file("/t/a/first", b"fine")
        fs.write_file("/t/z", b"about to be damaged" * 300)
        v.cp()
        vbn, _ = fs.image.node(fs.resolve("/t/z")).tree.data_ptr(0)
    assert vbn
    fd = os.open(image, os.O_WRONLY)
    os.pwrite(fd, b"\xee" * 4096, vbn * 4096)
    os.close(fd)
    with Volume.open(image, writable=False) as ro:
        with pytest.raises(CorruptionError) as info:
            get_tree(FileSystem(ro), "/t", tmp_path / "out")
        assert f"block {vbn}" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_remove_entry_handles_deep_trees(vol: Volume) -> None:
    """The undo of a put (and rm -r) walks without recursion: 3000 levels is fine."""
    fs = FileSystem(vol)
    top = ino = fs.mkdir(2, "top").ino
    for i in range(3000):
        ino = fs.mkdir(ino, "d").ino
        if i % 500 == 0:
            fs.write(fs.create(ino, f"f{i}").ino, 0, b"x" * 5000)
            fs.symlink(ino, "l", "f")
    fs.link(fs.resolve("/top/d/f0"), top, "hard")
    fs.remove_entry(2, b"top")
    assert fs.listdir("/") == []
    vol.cp()
    assert_clean(vol)
