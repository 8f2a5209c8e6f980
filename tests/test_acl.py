"""POSIX ACLs without a mount: the xattr codec (layout.acl) and how fs.posix keeps ACLs and
modes together (the same rules the FUSE tests check against ext4)."""

from __future__ import annotations

import errno
import stat
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapvol.engine.volume import Volume
from snapvol.errors import FsError
from snapvol.fs import FileSystem
from snapvol.fs.copy import get_tree, put_tree
from snapvol.layout import acl
from snapvol.layout.acl import GROUP, GROUP_OBJ, MASK, OTHER, USER, USER_OBJ, Entry
from snapvol.layout.constants import ROOT_INO

NO_ID = acl.UNDEFINED_ID


def raw(*entries: tuple[int, int, int], version: int = 2) -> bytes:
    return struct.pack("<I", version) + b"".join(struct.pack("<HHI", *e) for e in entries)


# user::rw-, user:1000:rwx, group::r-x, group:50:-w-, mask::rwx, other::r--
FULL = (Entry(USER_OBJ, 6), Entry(USER, 7, 1000), Entry(GROUP_OBJ, 5), Entry(GROUP, 2, 50),
        Entry(MASK, 7), Entry(OTHER, 4))


# ---- codec ----------------------------------------------------------------------------------
def test_decode_reads_the_kernel_layout() -> None:
    value = raw((USER_OBJ, 6, NO_ID), (USER, 7, 1000), (GROUP_OBJ, 5, NO_ID), (GROUP, 2, 50),
                (MASK, 7, NO_ID), (OTHER, 4, NO_ID))
    assert acl.decode(value) == FULL
    assert acl.encode(FULL) == value
    assert [str(e) for e in FULL] == ["user::rw-", "user:1000:rwx", "group::r-x",
                                      "group:50:-w-", "mask::rwx", "other::r--"]


def test_ids_of_unnamed_entries_are_normalised() -> None:
    """The kernel ignores the id of owner, group, mask and other entries and writes
    UNDEFINED_ID: so does the codec, so stored values compare equal to ext4's."""
    value = raw((USER_OBJ, 6, 0), (GROUP_OBJ, 4, 12), (OTHER, 0, 7))
    assert acl.encode(acl.decode(value)) == raw((USER_OBJ, 6, NO_ID), (GROUP_OBJ, 4, NO_ID),
                                                (OTHER, 0, NO_ID))


def test_empty_acl_is_no_acl() -> None:
    assert acl.decode(raw()) == ()


@st.composite
def valid_acls(draw: st.DrawFn) -> tuple[Entry, ...]:
    perm = st.integers(0, 7)
    users = sorted(draw(st.sets(st.integers(0, 2**32 - 2), max_size=5)))
    groups = sorted(draw(st.sets(st.integers(0, 2**32 - 2), max_size=5)))
    out = [Entry(USER_OBJ, draw(perm))]
    out += [Entry(USER, draw(perm), u) for u in users]
    out.append(Entry(GROUP_OBJ, draw(perm)))
    out += [Entry(GROUP, draw(perm), g) for g in groups]
    mask_anyway = draw(st.booleans())
    if users or groups or mask_anyway:
        out.append(Entry(MASK, draw(perm)))
    out.append(Entry(OTHER, draw(perm)))
    return tuple(out)


@given(valid_acls())
def test_round_trip(entries: tuple[Entry, ...]) -> None:
    assert acl.decode(acl.encode(entries)) == entries


@given(st.integers(0, 0o7777))
def test_mode_round_trip(mode: int) -> None:
    entries = acl.from_mode(mode)
    assert acl.is_minimal(entries)
    assert acl.mode_of(entries, stat.S_IFREG | mode) == stat.S_IFREG | mode
    assert acl.chmod(entries, mode) == entries


@pytest.mark.parametrize("value, why", [
    (b"", "header"),
    (b"\x02\x00\x00", "header"),
    (raw((USER_OBJ, 6, 0), (GROUP_OBJ, 4, 0), (OTHER, 4, 0)) + b"\x00", "8-byte entries"),
    (raw((USER_OBJ, 6, 0), (GROUP_OBJ, 4, 0), (OTHER, 4, 0), version=1), "version 1"),
    (raw((USER_OBJ, 6, 0), (GROUP_OBJ, 4, 0), (0x40, 4, 0), (OTHER, 4, 0)), "unknown tag"),
    (raw((USER_OBJ, 8, 0), (GROUP_OBJ, 4, 0), (OTHER, 4, 0)), "not within rwx"),
    (raw((GROUP_OBJ, 4, 0), (USER_OBJ, 6, 0), (OTHER, 4, 0)), "out of order"),
    (raw((USER_OBJ, 6, 0), (USER_OBJ, 6, 0), (GROUP_OBJ, 4, 0), (OTHER, 4, 0)), "2 user::"),
    (raw((USER_OBJ, 6, 0), (OTHER, 4, 0)), "0 group::"),
    (raw((USER_OBJ, 6, 0), (GROUP_OBJ, 4, 0)), "0 other::"),
    (raw((USER_OBJ, 6, 0), (USER, 4, 5), (GROUP_OBJ, 4, 0), (OTHER, 4, 0)), "mask entry"),
    (raw((USER_OBJ, 6, 0), (GROUP_OBJ, 4, 0), (MASK, 4, 0), (MASK, 4, 0), (OTHER, 4, 0)),
     "mask entry"),
    (raw((USER_OBJ, 6, 0), (USER, 4, 5), (USER, 6, 5), (GROUP_OBJ, 4, 0), (MASK, 6, 0),
         (OTHER, 4, 0)), "twice"),
])
def test_malformed_acls_are_refused(value: bytes, why: str) -> None:
    with pytest.raises(FsError, match=why) as e:
        acl.decode(value)
    assert e.value.errno == errno.EINVAL


def test_mode_of_takes_the_mask_as_group_bits() -> None:
    assert acl.mode_of(FULL, stat.S_IFREG | stat.S_ISGID | 0o000) == (
        stat.S_IFREG | stat.S_ISGID | 0o674)
    assert not acl.is_minimal(FULL)
    # a mask alone says more than the mode can (ext4 keeps such an ACL)
    assert not acl.is_minimal((Entry(USER_OBJ, 6), Entry(GROUP_OBJ, 4), Entry(MASK, 4),
                               Entry(OTHER, 0)))


def test_chmod_sets_owner_mask_and_other() -> None:
    assert acl.chmod(FULL, 0o640) == (
        Entry(USER_OBJ, 6), Entry(USER, 7, 1000), Entry(GROUP_OBJ, 5), Entry(GROUP, 2, 50),
        Entry(MASK, 4), Entry(OTHER, 0))
    assert acl.chmod(acl.from_mode(0o777), 0o751) == acl.from_mode(0o751)


def test_inherit_limits_the_default_acl_by_the_mode() -> None:
    # default: user::rwx, user:1000:rwx, group::r-x, mask::rwx, other::---; create 0640
    default = (Entry(USER_OBJ, 7), Entry(USER, 7, 1000), Entry(GROUP_OBJ, 5), Entry(MASK, 7),
               Entry(OTHER, 0))
    access, mode = acl.inherit(default, stat.S_IFREG | 0o640)
    assert access == (Entry(USER_OBJ, 6), Entry(USER, 7, 1000), Entry(GROUP_OBJ, 5),
                      Entry(MASK, 4), Entry(OTHER, 0))
    assert mode == stat.S_IFREG | 0o640
    # without a mask the owning group entry is the group class; the mode is limited too
    access, mode = acl.inherit(acl.from_mode(0o750), stat.S_IFDIR | stat.S_ISGID | 0o777)
    assert access == acl.from_mode(0o750)
    assert mode == stat.S_IFDIR | stat.S_ISGID | 0o750


# ---- fs.posix -------------------------------------------------------------------------------
def _mode(fs: FileSystem, ino: int) -> int:
    return stat.S_IMODE(fs.getattr(ino).mode)


def test_access_acl_sets_the_mode_and_chmod_sets_the_acl(mem_volume: Volume) -> None:
    fs = FileSystem(mem_volume)
    ino = fs.create(ROOT_INO, "f", 0o600).ino
    fs.setxattr(ino, acl.ACCESS, acl.encode(FULL))
    assert _mode(fs, ino) == 0o674
    assert fs.listxattr(ino) == [acl.ACCESS]
    fs.setattr(ino, mode=0o640)
    assert acl.decode(fs.getxattr(ino, acl.ACCESS)) == acl.chmod(FULL, 0o640)
    # an ACL the mode says in full is kept as the mode alone, as on ext4
    fs.setxattr(ino, acl.ACCESS, acl.encode(acl.from_mode(0o751)))
    assert _mode(fs, ino) == 0o751
    assert fs.listxattr(ino) == []
    # removing an ACL that is not there is not an error (ext4 answers 0 too)
    fs.removexattr(ino, acl.ACCESS)
    fs.removexattr(ino, acl.DEFAULT)


def test_set_group_id_is_cleared_when_asked(mem_volume: Volume) -> None:
    fs = FileSystem(mem_volume)
    ino = fs.create(ROOT_INO, "f", 0o2775).ino
    fs.setxattr(ino, acl.ACCESS, acl.encode(FULL))
    assert _mode(fs, ino) == 0o2674
    fs.setxattr(ino, acl.ACCESS, acl.encode(FULL), kill_sgid=True)
    assert _mode(fs, ino) == 0o674


def test_bad_acls_change_nothing(mem_volume: Volume) -> None:
    fs = FileSystem(mem_volume)
    ino = fs.create(ROOT_INO, "f", 0o640).ino
    with pytest.raises(FsError) as e:
        fs.setxattr(ino, acl.ACCESS, raw((USER_OBJ, 6, 0), (OTHER, 4, 0)))
    assert e.value.errno == errno.EINVAL
    with pytest.raises(FsError) as e:
        fs.setxattr(ino, acl.DEFAULT, acl.encode(FULL))
    assert e.value.errno == errno.EACCES  # default ACLs are for directories
    fs.setxattr(ino, acl.DEFAULT, raw())  # ... but an empty one is no ACL: fine
    assert _mode(fs, ino) == 0o640 and fs.listxattr(ino) == []


def test_new_inodes_inherit_the_default_acl(mem_volume: Volume) -> None:
    fs = FileSystem(mem_volume)
    top = fs.mkdir(ROOT_INO, "top", 0o755).ino
    # no default ACL: the umask applies
    assert _mode(fs, fs.create(top, "plain", 0o666, umask=0o027).ino) == 0o640
    default = (Entry(USER_OBJ, 7), Entry(USER, 7, 1000), Entry(GROUP_OBJ, 5), Entry(MASK, 7),
               Entry(OTHER, 0))
    fs.setxattr(top, acl.DEFAULT, acl.encode(default))
    # a default ACL: the umask does not, the ACL limits the mode and the mode the ACL
    f = fs.create(top, "f", 0o664, umask=0o077).ino
    assert _mode(fs, f) == 0o660
    assert acl.decode(fs.getxattr(f, acl.ACCESS)) == acl.inherit(default, 0o664)[0]
    assert fs.listxattr(f) == [acl.ACCESS]
    d = fs.mkdir(top, "d", 0o777, umask=0o077).ino
    assert _mode(fs, d) == 0o770
    assert fs.getxattr(d, acl.DEFAULT) == acl.encode(default)  # and it passes on
    sub = fs.mknod(fs.lookup(top, "d").ino, "fifo", stat.S_IFIFO | 0o600).ino
    assert _mode(fs, sub) == 0o600 and acl.ACCESS in fs.listxattr(sub)
    link = fs.symlink(top, "link", "f").ino
    assert fs.listxattr(link) == []  # symlinks have no ACLs
    # a minimal default ACL gives a mode and no access ACL
    fs.setxattr(top, acl.DEFAULT, acl.encode(acl.from_mode(0o750)))
    g = fs.create(top, "g", 0o666).ino
    assert _mode(fs, g) == 0o640 and fs.listxattr(g) == []


def test_put_leaves_no_acl_the_source_lacks(mem_volume: Volume, tmp_path: Path) -> None:
    """A tree put into a directory with a default ACL comes back as it was (cp -a keeps
    no inherited ACL either)."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"x")
    (src / "sub" / "f").chmod(0o640)
    fs = FileSystem(mem_volume)
    top = fs.mkdir(ROOT_INO, "top", 0o755).ino
    fs.setxattr(top, acl.DEFAULT, acl.encode(FULL))
    put_tree(fs, src, "/top/src")
    for path in ("/top/src", "/top/src/sub", "/top/src/sub/f"):
        assert fs.listxattr(fs.resolve(path)) == [], path
    assert _mode(fs, fs.resolve("/top/src/sub/f")) == 0o640
    get_tree(fs, "/top/src", tmp_path / "back")
    assert (tmp_path / "back" / "sub" / "f").stat().st_mode & 0o777 == 0o640
