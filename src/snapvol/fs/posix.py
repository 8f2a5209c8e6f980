"""POSIX semantics over an engine InodeFile: by inode number and by path.

This is the API the CLI, the FUSE front end and the replication engines share. Every
method takes the volume's lock, so a CP timer thread and callers can run side by side.
Errors are FsError with the errno a kernel file system would return.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import numpy as np

from snapvol.engine.directory import check_name
from snapvol.engine.inodefile import XATTR_NAME_MAX, XATTR_SIZE_MAX, InodeFile, Node, dtype_of
from snapvol.errors import FsError, SnapvolError, fs_error
from snapvol.layout import acl
from snapvol.layout.constants import BLOCK_SIZE, MAX_FILE_SIZE, ROOT_INO
from snapvol.layout.names import reserved_at_root

if TYPE_CHECKING:
    from snapvol.engine.volume import Volume

P = ParamSpec("P")
R = TypeVar("R")

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2
SYMLINK_MAX = 4095
LINK_MAX = 65000
_S_IFMT = 0o170000


@dataclass(slots=True)
class Stat:
    """A file's attributes at one moment (a copy: changing it changes nothing)."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int  # 512-byte units, as st_blocks
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    btime_ns: int
    rdev: int
    generation: int
    qtree: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def _locked(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        self = args[0]
        assert isinstance(self, FileSystem)
        with self.vol.mutex:
            return fn(*args, **kwargs)

    return wrapper


def _now() -> int:
    return time.time_ns()


def _name(name: str | bytes) -> bytes:
    return os.fsencode(name)


def _kib(nblocks: int) -> str:
    """Blocks as KiB, or MiB with one decimal from 1 MiB on."""
    kib = nblocks * (BLOCK_SIZE // 1024)
    return f"{kib} KiB" if kib < 1024 else f"{kib / 1024:.1f} MiB"


def _check_new_name(parent: int, name: bytes, *, system: bool = False,
                    err: int = errno.EEXIST) -> None:
    """Refuse a name a new entry of directory `parent` cannot take: '.' and '..' exist
    already (EEXIST, as mkdir answers), a bad name (see check_name), and a name reserved
    at the root (snapvol.layout.names; answered with `err`) unless the caller is the one
    that owns it (`system`: the mount's own directory)."""
    if name == b"." or name == b"..":
        raise fs_error(errno.EEXIST, os.fsdecode(name))
    check_name(name)
    if parent == ROOT_INO and not system:
        why = reserved_at_root(name)
        if why is not None:
            raise FsError(err, f"/{os.fsdecode(name)} is reserved at the root of a volume "
                               f"({why}): choose another name")


class FileSystem:
    """POSIX operations on the active file system of `vol`, or on one of its snapshots."""

    def __init__(self, vol: Volume, snapshot: str | None = None) -> None:
        if vol.updating:
            raise SnapvolError(
                f"{vol.path} is being brought up to date by a receive from a shadow snapshot "
                "and cannot be read until it completes: finish it with `snapvol receive` "
                f"(`snapvol info {vol.path} --json` shows the resume token)")
        self.vol = vol
        self.snapshot = snapshot
        self._image = None if snapshot is None else vol.snapshot_image(snapshot)

    @property
    def image(self) -> InodeFile:
        return self._image if self._image is not None else self.vol.active

    @property
    def readonly(self) -> bool:
        return self._image is not None or not self.vol.writable

    def _rw(self) -> InodeFile:
        if self.readonly:
            what = f"snapshot {self.snapshot!r}" if self.snapshot else self.vol.path
            raise FsError(errno.EROFS, f"read-only file system: {what} cannot be changed")
        return self.vol.active

    def _changed(self) -> None:
        self.vol.maybe_cp()

    # ---- attributes -----------------------------------------------------------------------
    def _stat(self, node: Node) -> Stat:
        i = node.inode
        return Stat(i.ino, i.mode, i.nlink, i.uid, i.gid, i.size, i.blocks * (BLOCK_SIZE // 512),
                    i.atime_ns, i.mtime_ns, i.ctime_ns, i.btime_ns, i.rdev, i.generation,
                    i.qtree)

    @_locked
    def getattr(self, ino: int) -> Stat:
        st = self._stat(self.image.node(ino))
        self.image.bound_nodes()
        return st

    @_locked
    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, ctime_ns: int | None = None,
                btime_ns: int | None = None) -> Stat:
        img = self._rw()
        node = img.node(ino)
        i = node.inode
        now = _now()
        if size is not None:
            if i.is_dir:
                raise fs_error(errno.EISDIR, f"inode {ino}")
            if not i.is_reg:
                raise fs_error(errno.EINVAL, f"inode {ino}")
            if size < 0 or size > MAX_FILE_SIZE:
                raise fs_error(errno.EFBIG if size > 0 else errno.EINVAL, f"size {size}")
            img.truncate(node, size)
            i.mtime_ns = now
        if mode is not None:
            mode = stat.S_IFMT(i.mode) | stat.S_IMODE(mode)
            self._chmod_acl(img, node, mode)
            i.mode = mode
        if uid is not None and uid != -1:
            i.uid = uid
        if gid is not None and gid != -1:
            i.gid = gid
        if atime_ns is not None:
            i.atime_ns = atime_ns
        if mtime_ns is not None:
            i.mtime_ns = mtime_ns
        if btime_ns is not None:
            i.btime_ns = btime_ns
        i.ctime_ns = ctime_ns if ctime_ns is not None else now
        img.mark_dirty(node)
        self._changed()
        return self._stat(node)

    # ---- names ------------------------------------------------------------------------
    def _dirnode(self, ino: int) -> Node:
        node = self.image.node(ino)
        if not node.inode.is_dir:
            raise fs_error(errno.ENOTDIR, f"inode {ino}")
        return node

    def lookup(self, parent: int, name: str | bytes) -> Stat:
        # The hottest path (every open and stat): locked inline rather than by _locked.
        raw = name if type(name) is bytes else _name(name)
        with self.vol.mutex:
            img = self.image
            pnode = img.nodes.get(parent)
            if pnode is None or pnode.dir is None:
                pnode = self._dirnode(parent)
            if raw == b"." or raw == b"..":
                if raw == b".":
                    return self._stat(pnode)
                return self._stat(img.node(img.directory(pnode).parent_ino))
            found = img.directory(pnode).find(raw)  # a bad name: FsError naming why
            if found is None:
                raise fs_error(errno.ENOENT, os.fsdecode(raw))
            node = img.nodes.get(found[0])
            if node is not None:
                return self._stat(node)
            st = self._stat(img.node(found[0]))
            img.bound_nodes()
            return st

    @_locked
    def readdir(self, ino: int, after: int = 0) -> list[tuple[bytes, int, int, int]]:
        """(name, ino, dtype, cookie) past cookie `after`; '.' and '..' have cookies 1, 2."""
        img = self.image
        node = self._dirnode(ino)
        d = img.directory(node)
        out: list[tuple[bytes, int, int, int]] = []
        if after < 1:
            out.append((b".", ino, stat.S_IFDIR >> 12, 1))
        if after < 2:
            out.append((b"..", d.parent_ino, stat.S_IFDIR >> 12, 2))
        out.extend(img.readdir(node, max(after, 2)))
        return out

    def iterdir(self, ino: int, after: int = 0, batch: int = 1024) -> Iterator[
            tuple[bytes, int, int, int]]:
        """Entries without '.' and '..', fetched in batches (big directories)."""
        cookie = max(after, 2)
        while True:
            with self.vol.mutex:
                node = self._dirnode(ino)
                chunk = []
                for e in self.image.readdir(node, cookie):
                    chunk.append(e)
                    if len(chunk) >= batch:
                        break
            yield from chunk
            if len(chunk) < batch:
                return
            cookie = chunk[-1][3]

    def _new(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
             rdev: int = 0, umask: int = 0, system: bool = False) -> tuple[Node, Node]:
        """A new inode named `name` in `parent`. Its permissions are `mode` less `umask`,
        or, when the parent has a default ACL, `mode` limited by that ACL (umask ignored),
        as on ext4: the new inode then also gets the access ACL the default one gives, and
        a directory the default ACL itself."""
        img = self._rw()
        _check_new_name(parent, name, system=system)
        pnode = self._dirnode(parent)
        d = img.directory(pnode)
        if d.lookup(name) is not None:
            raise fs_error(errno.EEXIST, os.fsdecode(name))
        acls: dict[bytes, bytes] = {}
        if not stat.S_ISLNK(mode):
            default = img.xattrs(pnode).get(acl.DEFAULT)
            if default is None:
                mode &= ~(umask & 0o777)
            else:
                entries = acl.decode(default)
                access, mode = acl.inherit(entries, mode)
                if not acl.is_minimal(access):
                    acls[acl.ACCESS] = acl.encode(access)
                if stat.S_ISDIR(mode):
                    acls[acl.DEFAULT] = default
        now = _now()
        node = img.alloc_inode(mode, uid, gid, now, pnode.inode.qtree)
        node.inode.rdev = rdev
        node.inode.nlink = 1
        if acls:
            try:
                img.set_xattrs(node, acls, now)
            except FsError:
                img.free_inode(node)
                raise
        d.insert(name, node.inode.ino, dtype_of(mode))
        pnode.inode.mtime_ns = pnode.inode.ctime_ns = now
        img.mark_dirty(pnode)
        return pnode, node

    @_locked
    def mknod(self, parent: int, name: str | bytes, mode: int, rdev: int = 0, uid: int = 0,
              gid: int = 0, umask: int = 0) -> Stat:
        fmt = stat.S_IFMT(mode) or stat.S_IFREG
        if fmt == stat.S_IFDIR or fmt == stat.S_IFLNK:
            raise fs_error(errno.EINVAL, "mknod cannot make directories or symlinks")
        _, node = self._new(parent, _name(name), fmt | stat.S_IMODE(mode), uid, gid, rdev,
                            umask)
        self._changed()
        return self._stat(node)

    def create(self, parent: int, name: str | bytes, mode: int = 0o644, uid: int = 0,
               gid: int = 0, umask: int = 0) -> Stat:
        return self.mknod(parent, name, stat.S_IFREG | stat.S_IMODE(mode), 0, uid, gid, umask)

    @_locked
    def mkdir(self, parent: int, name: str | bytes, mode: int = 0o755, uid: int = 0,
              gid: int = 0, umask: int = 0, *, system: bool = False) -> Stat:
        """Make a directory. `system` lets the mount make its own directory under a name
        reserved at the root (snapvol.layout.names.RESERVED_ROOT_NAMES)."""
        img = self._rw()
        pnode, node = self._new(parent, _name(name), stat.S_IFDIR | stat.S_IMODE(mode), uid, gid,
                                umask=umask, system=system)
        node.inode.nlink = 2
        img.format_directory(node, parent)
        pnode.inode.nlink += 1
        img.mark_dirty(pnode)
        self._changed()
        return self._stat(node)

    @_locked
    def symlink(self, parent: int, name: str | bytes, target: str | bytes, uid: int = 0,
                gid: int = 0) -> Stat:
        raw = _name(target)
        if not raw or len(raw) > SYMLINK_MAX or b"\x00" in raw:
            raise fs_error(errno.ENAMETOOLONG if len(raw) > SYMLINK_MAX else errno.EINVAL,
                           f"symlink target {raw[:40]!r}")
        img = self._rw()
        _, node = self._new(parent, _name(name), stat.S_IFLNK | 0o777, uid, gid)
        img.write(node, 0, raw)
        self._changed()
        return self._stat(node)

    @_locked
    def readlink(self, ino: int) -> bytes:
        node = self.image.node(ino)
        if not node.inode.is_lnk:
            raise fs_error(errno.EINVAL, f"inode {ino} is not a symlink")
        return self.image.read(node, 0, node.inode.size)

    @_locked
    def link(self, ino: int, newparent: int, newname: str | bytes) -> Stat:
        img = self._rw()
        raw = _name(newname)
        _check_new_name(newparent, raw)
        node = img.node(ino)
        if node.inode.is_dir:
            raise fs_error(errno.EPERM, "hard links to directories are not allowed")
        if node.inode.nlink >= LINK_MAX:
            raise fs_error(errno.EMLINK, f"inode {ino}")
        pnode = self._dirnode(newparent)
        d = img.directory(pnode)
        if d.lookup(raw) is not None:
            raise fs_error(errno.EEXIST, os.fsdecode(raw))
        d.insert(raw, ino, dtype_of(node.inode.mode))
        now = _now()
        node.inode.nlink += 1
        node.inode.ctime_ns = now
        pnode.inode.mtime_ns = pnode.inode.ctime_ns = now
        img.mark_dirty(node)
        img.mark_dirty(pnode)
        self._changed()
        return self._stat(node)

    def _drop_link(self, img: InodeFile, node: Node, now: int) -> None:
        i = node.inode
        i.nlink = 0 if i.is_dir else i.nlink - 1  # a removed directory has no links left
        i.ctime_ns = now
        img.mark_dirty(node)
        if i.nlink <= 0 and node.opened == 0:
            img.free_inode(node)

    @_locked
    def unlink(self, parent: int, name: str | bytes) -> None:
        img = self._rw()
        raw = _name(name)
        pnode = self._dirnode(parent)
        if raw == b"." or raw == b"..":
            raise fs_error(errno.EISDIR, os.fsdecode(raw))  # as unlink(2) answers
        d = img.directory(pnode)
        e = d.lookup(raw)
        if e is None:
            raise fs_error(errno.ENOENT, os.fsdecode(raw))
        node = img.node(e.ino)
        if node.inode.is_dir:
            raise fs_error(errno.EISDIR, os.fsdecode(raw))
        d.remove(raw)
        now = _now()
        pnode.inode.mtime_ns = pnode.inode.ctime_ns = now
        img.mark_dirty(pnode)
        self._drop_link(img, node, now)
        self._changed()

    @_locked
    def rmdir(self, parent: int, name: str | bytes) -> None:
        img = self._rw()
        raw = _name(name)
        if raw == b".":
            raise fs_error(errno.EINVAL, "rmdir .")
        if raw == b"..":
            raise fs_error(errno.ENOTEMPTY, "rmdir ..")
        pnode = self._dirnode(parent)
        d = img.directory(pnode)
        e = d.lookup(raw)
        if e is None:
            raise fs_error(errno.ENOENT, os.fsdecode(raw))
        node = img.node(e.ino)
        if not node.inode.is_dir:
            raise fs_error(errno.ENOTDIR, os.fsdecode(raw))
        if len(img.directory(node)):
            raise fs_error(errno.ENOTEMPTY, os.fsdecode(raw))
        d.remove(raw)
        now = _now()
        pnode.inode.nlink -= 1
        pnode.inode.mtime_ns = pnode.inode.ctime_ns = now
        img.mark_dirty(pnode)
        self._drop_link(img, node, now)
        self._changed()

    def _is_ancestor(self, anc: int, ino: int) -> bool:
        """Is directory `anc` equal to `ino` or above it?"""
        img = self.image
        seen = 0
        while True:
            if ino == anc:
                return True
            if ino == ROOT_INO:
                return False
            ino = img.directory(img.node(ino)).parent_ino
            seen += 1
            if seen > 1 << 20:
                raise fs_error(errno.ELOOP, "directory loop")

    @_locked
    def rename(self, parent: int, name: str | bytes, newparent: int, newname: str | bytes,
               flags: int = 0) -> None:
        img = self._rw()
        src_name, dst_name = _name(name), _name(newname)
        if src_name in (b".", b"..") or dst_name in (b".", b".."):
            raise fs_error(errno.EINVAL, "cannot rename . or ..")
        # Renaming *from* a reserved name is allowed: it is how an old volume's real
        # /.snapshot directory gets out of the way.
        _check_new_name(newparent, dst_name, err=errno.EPERM)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
                RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise fs_error(errno.EINVAL, f"rename flags {flags}")
        sp, dp = self._dirnode(parent), self._dirnode(newparent)
        sd, dd = img.directory(sp), img.directory(dp)
        se = sd.lookup(src_name)
        if se is None:
            raise fs_error(errno.ENOENT, os.fsdecode(src_name))
        de = dd.lookup(dst_name)
        snode = img.node(se.ino)
        now = _now()
        if flags & RENAME_EXCHANGE:
            if de is None:
                raise fs_error(errno.ENOENT, os.fsdecode(dst_name))
            self._exchange(img, sp, sd, se, dp, dd, de, now)
            self._changed()
            return
        if de is not None:
            if flags & RENAME_NOREPLACE:
                raise fs_error(errno.EEXIST, os.fsdecode(dst_name))
            if de.ino == se.ino:
                return  # both names are links to one file: POSIX says do nothing
            dnode = img.node(de.ino)
            if snode.inode.is_dir and not dnode.inode.is_dir:
                raise fs_error(errno.ENOTDIR, os.fsdecode(dst_name))
            if not snode.inode.is_dir and dnode.inode.is_dir:
                raise fs_error(errno.EISDIR, os.fsdecode(dst_name))
            if dnode.inode.is_dir and len(img.directory(dnode)):
                raise fs_error(errno.ENOTEMPTY, os.fsdecode(dst_name))
        if snode.inode.is_dir and self._is_ancestor(se.ino, newparent):
            raise fs_error(errno.EINVAL, f"cannot move directory {os.fsdecode(src_name)!r} "
                                         "into itself")
        if de is not None:
            dnode = img.node(de.ino)
            dd.replace(dst_name, se.ino, se.dtype)
            if dnode.inode.is_dir:
                dp.inode.nlink -= 1
            self._drop_link(img, dnode, now)
        else:
            dd.insert(dst_name, se.ino, se.dtype)
        sd.remove(src_name)
        if snode.inode.is_dir and sp is not dp:
            img.directory(snode).parent_ino = newparent
            sp.inode.nlink -= 1
            dp.inode.nlink += 1
        snode.inode.ctime_ns = now
        for n in (sp, dp):
            n.inode.mtime_ns = n.inode.ctime_ns = now
            img.mark_dirty(n)
        img.mark_dirty(snode)
        self._changed()

    def _exchange(self, img: InodeFile, sp: Node, sd: object, se: object, dp: Node, dd: object,
                  de: object, now: int) -> None:
        from snapvol.engine.directory import Directory, DirEntry

        assert isinstance(sd, Directory) and isinstance(dd, Directory)
        assert isinstance(se, DirEntry) and isinstance(de, DirEntry)
        snode, dnode = img.node(se.ino), img.node(de.ino)
        for moving, target in ((snode, dp), (dnode, sp)):
            if moving.inode.is_dir and self._is_ancestor(moving.inode.ino, target.inode.ino):
                raise fs_error(errno.EINVAL, "cannot move a directory into itself")
        sd.replace(se.name, de.ino, de.dtype)
        dd.replace(de.name, se.ino, se.dtype)
        if sp is not dp:
            if snode.inode.is_dir:
                img.directory(snode).parent_ino = dp.inode.ino
                sp.inode.nlink -= 1
                dp.inode.nlink += 1
            if dnode.inode.is_dir:
                img.directory(dnode).parent_ino = sp.inode.ino
                dp.inode.nlink -= 1
                sp.inode.nlink += 1
        for n in (sp, dp, snode, dnode):
            n.inode.ctime_ns = now
            img.mark_dirty(n)
        sp.inode.mtime_ns = dp.inode.mtime_ns = now

    # ---- data -------------------------------------------------------------------------------
    def read(self, ino: int, offset: int, size: int) -> bytes:
        with self.vol.mutex:  # inline, as in lookup
            img = self.image
            node = img.nodes.get(ino)
            if node is None:
                node = img.node(ino)
            if node.inode.mode & _S_IFMT == stat.S_IFDIR:
                raise fs_error(errno.EISDIR, f"inode {ino}")
            return img.read(node, offset, size)

    @_locked
    def write(self, ino: int, offset: int, data: bytes | memoryview) -> int:
        img = self._rw()
        node = img.node(ino)
        if not node.inode.is_reg:
            raise fs_error(errno.EISDIR if node.inode.is_dir else errno.EINVAL, f"inode {ino}")
        if offset < 0:
            raise fs_error(errno.EINVAL, f"offset {offset}")
        n = img.write(node, offset, data)
        node.inode.mtime_ns = node.inode.ctime_ns = _now()
        img.mark_dirty(node)
        self._changed()
        return n

    @_locked
    def data_extents(self, ino: int) -> list[tuple[int, int]]:
        """(offset, length) of the parts of a file that are not holes, in order (what
        SEEK_DATA/SEEK_HOLE report), clipped to the file size."""
        node = self.image.node(ino)
        size = node.inode.size
        fbns = node.tree.mapped_fbns()
        out: list[tuple[int, int]] = []
        if len(fbns) == 0:
            return out
        breaks = np.flatnonzero(np.diff(fbns) != 1) + 1
        for run in np.split(fbns, breaks):
            start = int(run[0]) * BLOCK_SIZE
            end = min((int(run[-1]) + 1) * BLOCK_SIZE, size)
            if start < end:
                out.append((start, end - start))
        return out

    @_locked
    def open(self, ino: int) -> None:
        self.image.node(ino).opened += 1

    @_locked
    def release(self, ino: int) -> None:
        img = self.image
        node = img.nodes.get(ino)
        if node is None:
            return
        node.opened = max(0, node.opened - 1)
        if node.opened == 0 and node.inode.nlink <= 0 and not self.readonly:
            img.free_inode(node)

    def fsync(self, ino: int | None = None) -> None:
        """Return once everything written so far is in a committed CP."""
        if not self.readonly:
            self.vol.cp()

    # ---- xattrs -----------------------------------------------------------------------------
    def getxattr(self, ino: int, name: str | bytes) -> bytes:
        value = self.xattr(ino, name)
        if value is None:
            raise fs_error(errno.ENODATA, f"xattr {os.fsdecode(_name(name))}")
        return value

    @_locked
    def xattr(self, ino: int, name: str | bytes) -> bytes | None:
        """getxattr without the error: the kernel asks a FUSE file system for
        security.capability before every write(2), and nearly every answer is "none"."""
        return self.image.xattrs(self.image.node(ino)).get(_name(name))

    @_locked
    def listxattr(self, ino: int) -> list[bytes]:
        return sorted(self.image.xattrs(self.image.node(ino)))

    @_locked
    def setxattr(self, ino: int, name: str | bytes, value: bytes, flags: int = 0, *,
                 kill_sgid: bool = False) -> None:
        """Set an xattr. A POSIX ACL (acl.NAMES) is checked first (EINVAL if malformed)
        and kept as ext4 keeps it: an access ACL sets the mode's permission bits, and is
        dropped when the mode says it all; an empty one removes the ACL; a default ACL
        is for directories only (EACCES). `kill_sgid` clears the set-group-ID bit with an
        access ACL (the caller is not in the file's group and not privileged)."""
        img = self._rw()
        raw = _name(name)
        if not raw or len(raw) > XATTR_NAME_MAX or b"\x00" in raw:
            raise fs_error(errno.ERANGE if len(raw) > XATTR_NAME_MAX else errno.EINVAL,
                           f"xattr name {raw[:40]!r}")
        if len(value) > XATTR_SIZE_MAX:
            raise fs_error(errno.E2BIG, f"xattr {os.fsdecode(raw)} value of {len(value)} bytes")
        node = img.node(ino)
        attrs = img.xattrs(node)
        if flags & XATTR_CREATE and raw in attrs:
            raise fs_error(errno.EEXIST, f"xattr {os.fsdecode(raw)}")
        if flags & XATTR_REPLACE and raw not in attrs:
            raise fs_error(errno.ENODATA, f"xattr {os.fsdecode(raw)}")
        mode = None
        if raw in acl.NAMES:
            mode = self._set_acl(node, attrs, raw, value, kill_sgid)
        else:
            attrs[raw] = bytes(value)
        self._store_xattrs(img, node, attrs, mode)

    @staticmethod
    def _set_acl(node: Node, attrs: dict[bytes, bytes], name: bytes, value: bytes,
                 kill_sgid: bool) -> int:
        """Put ACL `value` into `attrs` (the node's xattrs); the mode it gives the node
        (see setxattr)."""
        i = node.inode
        mode = i.mode
        entries = acl.decode(value)
        if name == acl.DEFAULT:
            if entries and not i.is_dir:
                raise fs_error(errno.EACCES, f"inode {i.ino}: only directories have a "
                                             "default ACL")
        elif entries:
            mode = acl.mode_of(entries, mode)
            if kill_sgid:
                mode &= ~stat.S_ISGID
            if acl.is_minimal(entries):
                entries = ()
        if entries:
            attrs[name] = acl.encode(entries)
        else:
            attrs.pop(name, None)
        return mode

    @staticmethod
    def _chmod_acl(img: InodeFile, node: Node, mode: int) -> None:
        """Before a chmod to `mode`: the access ACL's owner, mask (or group) and other
        entries take the new permission bits, as the kernel's posix_acl_chmod does."""
        attrs = img.xattrs(node)
        value = attrs.get(acl.ACCESS)
        if value is None:
            return
        attrs[acl.ACCESS] = acl.encode(acl.chmod(acl.decode(value), mode))
        img.set_xattrs(node, attrs, _now())

    @_locked
    def removexattr(self, ino: int, name: str | bytes) -> None:
        img = self._rw()
        raw = _name(name)
        node = img.node(ino)
        attrs = img.xattrs(node)
        if raw not in attrs:
            if raw in acl.NAMES:
                return  # no ACL is left, as asked (ext4 answers 0 too)
            raise fs_error(errno.ENODATA, f"xattr {os.fsdecode(raw)}")
        del attrs[raw]
        self._store_xattrs(img, node, attrs)

    def _store_xattrs(self, img: InodeFile, node: Node, attrs: dict[bytes, bytes],
                      mode: int | None = None) -> None:
        """Write the node's xattrs, then (nothing changed if that fails) its new mode."""
        now = _now()
        img.set_xattrs(node, attrs, now)
        if mode is not None:
            node.inode.mode = mode
        node.inode.ctime_ns = now
        img.mark_dirty(node)
        self._changed()

    # ---- whole volume -------------------------------------------------------------------------
    @_locked
    def statfs(self) -> dict[str, int]:
        """Space as df shows it: free blocks less what the changes since the last CP will
        take (so a write shows at once), and available less the reserve only deletions
        may use."""
        u = self.vol.usage()
        free, avail = u["free"], u["free"]
        if self.vol.writable:
            free = max(0, free - self.vol.active.pending_blocks())
            avail = max(0, free - self.vol.meta_reserve)
        return {"bsize": BLOCK_SIZE, "blocks": u["total"], "bfree": free,
                "bavail": avail, "namemax": 255}

    @_locked
    def check_room(self, nblocks: int, what: str) -> None:
        """Refuse (ENOSPC), before anything changes, work whose file data needs at least
        `nblocks` blocks when the volume cannot hold them: the test the engine applies to
        each write (pending changes, this data, the reserve only deletions may use), made
        once up front, so that such a refusal commits no CP and uses no space."""
        self._rw()
        if nblocks <= 0:
            return  # no data: metadata may use the reserve, as the engine allows
        vol = self.vol
        alloc = vol.alloc
        assert alloc is not None  # writable

        def short() -> int:
            return vol.active.pending_blocks() + nblocks + vol.meta_reserve - alloc.free

        if short() > 0 and (alloc.frees_pending or vol.active.dirty):
            vol.cp()  # what was freed since the last CP is free once it commits
        missing = short()
        if missing > 0:
            raise FsError(errno.ENOSPC, f"no space left on volume {vol.path}: {what} needs at "
                                        f"least {_kib(nblocks)}, {_kib(missing)} more than it "
                                        "can take: delete files or snapshots to make room")

    # ---- paths --------------------------------------------------------------------------------
    @_locked
    def resolve(self, path: str | bytes, follow: bool = True) -> int:
        """The inode at an absolute path inside the volume ('/' is the root)."""
        raw = _name(path)
        ino = ROOT_INO
        parts = [p for p in raw.split(b"/") if p and p != b"."]
        depth = 0
        i = 0
        while i < len(parts):
            part = parts[i]
            node = self.image.node(ino)
            if not node.inode.is_dir:
                raise fs_error(errno.ENOTDIR, os.fsdecode(raw))
            d = self.image.directory(node)
            if part == b"..":
                ino = d.parent_ino
                i += 1
                continue
            e = d.lookup(part)
            if e is None:
                raise fs_error(errno.ENOENT, os.fsdecode(raw))
            child = self.image.node(e.ino)
            last = i == len(parts) - 1
            if child.inode.is_lnk and (follow or not last):
                depth += 1
                if depth > 40:
                    raise fs_error(errno.ELOOP, os.fsdecode(raw))
                target = self.image.read(child, 0, child.inode.size)
                rest = parts[i + 1 :]
                new = [p for p in target.split(b"/") if p and p != b"."]
                if target.startswith(b"/"):
                    ino = ROOT_INO
                parts, i = new + rest, 0
                continue
            ino = e.ino
            i += 1
        return ino

    def split(self, path: str | bytes) -> tuple[int, bytes]:
        """(parent inode, last name) of a path, for operations that create or remove."""
        raw = _name(path).rstrip(b"/")
        head, _, tail = raw.rpartition(b"/")
        if not tail:
            raise fs_error(errno.EINVAL, f"{os.fsdecode(raw) or '/'}: needs a name")
        return self.resolve(head or b"/"), tail

    def stat(self, path: str | bytes, follow: bool = True) -> Stat:
        return self.getattr(self.resolve(path, follow))

    def read_file(self, path: str | bytes) -> bytes:
        ino = self.resolve(path)
        return self.read(ino, 0, self.getattr(ino).size)

    def write_file(self, path: str | bytes, data: bytes, mode: int = 0o644) -> Stat:
        """Create or replace the contents of a regular file."""
        parent, name = self.split(path)
        try:
            ino = self.lookup(parent, name).ino
            self.setattr(ino, size=0)
        except FsError as e:
            if e.errno != errno.ENOENT:
                raise
            ino = self.create(parent, name, mode).ino
        self.write(ino, 0, data)
        return self.getattr(ino)

    def makedirs(self, path: str | bytes, mode: int = 0o755) -> int:
        ino = ROOT_INO
        for part in [p for p in _name(path).split(b"/") if p]:
            try:
                ino = self.lookup(ino, part).ino
            except FsError as e:
                if e.errno != errno.ENOENT:
                    raise
                ino = self.mkdir(ino, part, mode).ino
        return ino

    def listdir(self, path: str | bytes = b"/") -> list[bytes]:
        return [e[0] for e in self.iterdir(self.resolve(path))]

    def remove_tree(self, path: str | bytes) -> None:
        """rm -r: remove a file, or a directory and everything under it."""
        parent, name = self.split(path)
        self.remove_entry(parent, name)

    def remove_entry(self, parent: int, name: str | bytes) -> None:
        """rm -r of one directory entry, without recursion (trees may be very deep)."""
        raw = _name(name)
        top = self.lookup(parent, raw)
        if not top.is_dir:
            self.unlink(parent, raw)
            return
        stack = [(parent, raw, top.ino)]
        while stack:
            up, dname, ino = stack[-1]
            subdirs = []
            for cname, child, dtype, _ in list(self.iterdir(ino)):
                if dtype == stat.S_IFDIR >> 12:
                    subdirs.append((ino, cname, child))
                else:
                    self.unlink(ino, cname)
            if subdirs:
                stack.extend(subdirs)
                continue
            self.rmdir(up, dname)
            stack.pop()
