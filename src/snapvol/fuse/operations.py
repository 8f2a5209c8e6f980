"""The pyfuse3 Operations class: kernel requests turned into FileSystem calls.

Every handler runs in the trio thread and calls the engine synchronously; the engine's own
lock (`Volume.mutex`) orders those calls against the CP timer thread and the control
socket, so there is exactly one engine caller at a time and no handler awaits while it
holds engine state. Engine errors become the errno they carry; anything else is logged
and reported as EIO, so one bad request never stops the mount.

Inode numbers: see `inodes`. Files unlinked while open: see `unlink`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from snapvol.engine.volume import Volume
from snapvol.errors import CorruptionError, FsError, SnapvolError
from snapvol.fs import FileSystem
from snapvol.fs.posix import RENAME_EXCHANGE, RENAME_NOREPLACE, Stat
from snapvol.fuse.follow import KernelRefs, StaleView
from snapvol.fuse.handles import Handle, HandleTable
from snapvol.fuse.inodes import (
    SNAPDIR_INO,
    SNAPDIR_NAME,
    UNLINKED_NAME,
    from_fuse,
    to_fuse,
)
from snapvol.fuse.snapdir import COOKIE_BASE, SnapshotViews
from snapvol.layout import acl
from snapvol.layout.constants import BLOCK_SIZE, ROOT_INO

log = logging.getLogger("snapvol.fuse")

P = ParamSpec("P")
R = TypeVar("R")

ATTR_TIMEOUT = 1.0


def _errors(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn engine errors into FUSEError; never let another exception reach pyfuse3
    (it would end the main loop and leave a dead mount)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except CorruptionError as e:
            ops = args[0]
            if isinstance(ops, SnapvolOperations) and ops.behind():
                # A read-only mount that has not loaded a receive's root yet, whose old
                # blocks a later receive reused: stale, not damaged (fuse.follow).
                raise pyfuse3.FUSEError(errno.ESTALE) from None
            log.error("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except SnapvolError as e:
            log.error("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _fail(err: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(err)


def _in_group(ctx: pyfuse3.RequestContext, gid: int) -> bool:
    """Whether the caller is in group `gid`: its own gid or a supplementary group, which
    FUSE does not send, so they are read from /proc (as libfuse's fuse_req_getgroups)."""
    if ctx.gid == gid:
        return True
    try:
        with open(f"/proc/{ctx.pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return str(gid).encode() in line.split()[1:]
    except OSError:
        pass  # the caller is gone: nothing it does matters any more
    return False


class SnapvolOperations(pyfuse3.Operations):
    """One mounted volume: the active file system at the root, snapshots in .snapshot."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    # The kernel checks POSIX ACLs (FUSE_CAP_POSIX_ACL, which implies default_permissions)
    # and caches them; it stores them through setxattr, and fs.posix keeps them and the
    # mode in step and inherits default ACLs. The kernel still applies the umask to the
    # mode of a new inode (pyfuse3 cannot ask for FUSE_DONT_MASK): see docs/ARCHITECTURE.
    enable_acl = True

    def __init__(self, vol: Volume) -> None:
        super().__init__()
        self.vol = vol
        self.active = FileSystem(vol)
        self.snaps = SnapshotViews(vol)
        self.handles = HandleTable()
        self.readonly = self.active.readonly
        # Engine inodes of files whose last name went while they were open; each waits
        # in the hidden UNLINKED_NAME directory under its inode number until released.
        self.unlinked: set[int] = set()
        # A read-only mount follows receives into its image (fuse.follow), so it tracks
        # what the kernel caches in order to invalidate it; a writable one is the only
        # writer and needs none of that.
        self.refs: KernelRefs | None = KernelRefs() if self.readonly else None
        # Engine inodes that changed in a refresh whose kernel invalidations are still
        # being sent (all of them with settling_all): opening one fails with ESTALE,
        # since the kernel may still hold its old size.
        self.settling: frozenset[int] = frozenset()
        self.settling_all = False
        self.initialized = False  # the kernel's INIT exchange is over (see init)
        if not self.readonly:
            self._drop_leftovers()
        self._warn_reserved()

    def init(self) -> None:
        """The kernel's INIT request: libfuse sends the reply as this returns, and the
        kernel applies it at once, so any trio task that sees `initialized` comes after it
        (fuse.server then sets the readahead window, which the reply would have reset)."""
        self.initialized = True

    def behind(self) -> bool:
        """Whether this is a read-only mount and its image has a newer root than the one it
        shows (a receive committed one; the timer in fuse.server loads it soon)."""
        if self.refs is None:
            return False
        try:
            return self.vol.has_newer_root()
        except SnapvolError:
            return False

    # ---- inode numbers and views ---------------------------------------------------------
    def _view(self, fino: int) -> tuple[FileSystem, int, int]:
        """(view, snap_id, engine ino) of a kernel inode number (not .snapshot)."""
        if self.vol.updating:  # a receive from a shadow base is rewriting the image
            raise _fail(errno.EIO)
        snap_id, ino = from_fuse(fino)
        if snap_id == 0:
            return self.active, 0, ino
        view = self.snaps.view(snap_id)
        if view is None:
            raise _fail(errno.ESTALE)
        return view, snap_id, ino

    def _entry(self, snap_id: int, st: Stat) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = to_fuse(snap_id, st.ino)
        e.generation = st.generation
        e.entry_timeout = ATTR_TIMEOUT
        e.attr_timeout = ATTR_TIMEOUT
        e.st_mode = st.mode
        nlink = st.nlink
        if snap_id == 0 and st.ino in self.unlinked:
            nlink -= 1  # the hidden name is not a link the user made
        e.st_nlink = nlink
        e.st_uid = st.uid
        e.st_gid = st.gid
        e.st_rdev = st.rdev
        e.st_size = st.size
        e.st_blksize = BLOCK_SIZE
        e.st_blocks = st.blocks
        e.st_atime_ns = st.atime_ns
        e.st_mtime_ns = st.mtime_ns
        e.st_ctime_ns = st.ctime_ns
        e.st_birthtime_ns = st.btime_ns
        return e

    def _snapdir_entry(self) -> pyfuse3.EntryAttributes:
        root = self.active.getattr(ROOT_INO)
        e = pyfuse3.EntryAttributes()
        e.st_ino = SNAPDIR_INO
        e.generation = 0
        e.entry_timeout = ATTR_TIMEOUT
        e.attr_timeout = ATTR_TIMEOUT
        e.st_mode = stat.S_IFDIR | 0o755
        e.st_nlink = 2 + len(self.vol.snapshots)
        e.st_uid, e.st_gid = root.uid, root.gid
        e.st_blksize = BLOCK_SIZE
        last = max((s.created_ns for s in self.snaps.entries()), default=root.btime_ns)
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = last
        e.st_birthtime_ns = root.btime_ns
        return e

    @staticmethod
    def _hidden(snap_id: int, parent: int, name: bytes) -> bool:
        """Names of real entries the mount never shows: the unlinked files' directory at
        the root of every image (it is the mount's own), and a real `.snapshot` at the
        active root, which only a volume from before the name was reserved can hold
        (snapvol.layout.names): `.snapshot` there is always the snapshots, whatever was
        looked up or listed first. Inside a snapshot, such a directory is shown as it is."""
        return parent == ROOT_INO and (name == UNLINKED_NAME or (
            name == SNAPDIR_NAME and snap_id == 0))

    def _warn_reserved(self) -> None:
        """Say once, at mount time, that a real /.snapshot is hidden, and how to get at it."""
        try:
            self.active.lookup(ROOT_INO, SNAPDIR_NAME)
        except SnapvolError:
            return  # none (or damage, which reads of the root report themselves)
        log.warning("%s holds a real directory /.snapshot, made before the name was "
                    "reserved: the mount shows the snapshots there instead; copy it out "
                    "with `snapvol get %s /.snapshot DEST` and remove it with `snapvol rm "
                    "%s /.snapshot` (while unmounted)", self.vol.path, self.vol.path,
                    self.vol.path)

    @staticmethod
    def _refuse_reserved(parent: int, name: bytes) -> None:
        """The root's reserved names exist already, as far as users can tell."""
        if parent == ROOT_INO and name in (SNAPDIR_NAME, UNLINKED_NAME):
            raise _fail(errno.EEXIST)

    def _writable_dir(self, fino: int) -> tuple[FileSystem, int]:
        if fino == SNAPDIR_INO:
            raise _fail(errno.EROFS)
        view, snap_id, ino = self._view(fino)
        if snap_id or self.readonly:
            raise _fail(errno.EROFS)
        return view, ino

    # ---- names ------------------------------------------------------------------------
    @_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        attrs = self._lookup(parent_inode, name)
        if self.refs is not None:
            self.refs.add(attrs.st_ino, parent_inode, name, attrs.generation)
        return attrs

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """The kernel dropped inodes: only a read-only mount keeps count (fuse.follow)."""
        if self.refs is not None:
            for fino, n in inode_list:
                self.refs.forget(fino, n)

    def _lookup(self, parent_inode: int, name: bytes) -> pyfuse3.EntryAttributes:
        if parent_inode == SNAPDIR_INO:
            return self._lookup_snapdir(name)
        view, snap_id, parent = self._view(parent_inode)
        if parent == ROOT_INO:
            if name == SNAPDIR_NAME and snap_id == 0:
                return self._snapdir_entry()
            if name == b".." and snap_id:
                return self._snapdir_entry()
            if self._hidden(snap_id, parent, name):
                raise _fail(errno.ENOENT)
        return self._entry(snap_id, view.lookup(parent, name))

    def _lookup_snapdir(self, name: bytes) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._snapdir_entry()
        if name == b"..":
            return self._entry(0, self.active.getattr(ROOT_INO))
        entry = self.snaps.by_name(os.fsdecode(name))
        if entry is None:
            raise _fail(errno.ENOENT)
        view = self.snaps.view(entry.snap_id)
        assert view is not None
        return self._entry(entry.snap_id, view.getattr(ROOT_INO))

    @_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == SNAPDIR_INO:
            return self._snapdir_entry()
        view, snap_id, ino = self._view(inode)
        try:
            return self._entry(snap_id, view.getattr(ino))
        except FsError as e:
            if e.errno == errno.ENOENT and self.refs is not None:
                raise _fail(errno.ESTALE) from None  # a receive removed it (fuse.follow)
            raise

    @_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == SNAPDIR_INO:
            raise _fail(errno.EROFS)
        view, snap_id, ino = self._view(inode)
        st = view.setattr(
            ino,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        )
        return self._entry(snap_id, st)

    def _owner(self, view: FileSystem, parent: int, mode: int,
               ctx: pyfuse3.RequestContext) -> tuple[int, int, int]:
        """(mode, uid, gid) of a new inode: a set-group-ID directory passes on its group,
        and to subdirectories its set-group-ID bit, as on ext4."""
        pst = view.getattr(parent)
        gid = ctx.gid
        if pst.mode & stat.S_ISGID:
            gid = pst.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        return mode, ctx.uid, gid

    @_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        view, parent = self._writable_dir(parent_inode)
        self._refuse_reserved(parent, name)
        mode, uid, gid = self._owner(view, parent, mode, ctx)
        return self._entry(0, view.mknod(parent, name, mode, rdev, uid, gid, ctx.umask))

    @_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode == SNAPDIR_INO:
            return self._make_snapshot(name)
        view, parent = self._writable_dir(parent_inode)
        self._refuse_reserved(parent, name)
        mode, uid, gid = self._owner(view, parent, stat.S_IFDIR | mode, ctx)
        return self._entry(0, view.mkdir(parent, name, mode, uid, gid, ctx.umask))

    def _make_snapshot(self, raw: bytes) -> pyfuse3.EntryAttributes:
        """`mkdir .snapshot/NAME`: take snapshot NAME (it commits a CP first)."""
        if self.readonly:
            raise _fail(errno.EROFS)
        entry = self.snaps.create(raw)  # each refusal with its own errno, logged
        view = self.snaps.view(entry.snap_id)
        assert view is not None
        return self._entry(entry.snap_id, view.getattr(ROOT_INO))

    @_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if parent_inode == SNAPDIR_INO:
            self.delete_snapshot(os.fsdecode(name))
            return
        view, parent = self._writable_dir(parent_inode)
        if parent == ROOT_INO and name in (SNAPDIR_NAME, UNLINKED_NAME):
            raise _fail(errno.EBUSY if name == SNAPDIR_NAME else errno.ENOENT)
        view.rmdir(parent, name)

    def delete_snapshot(self, name: str) -> int:
        """`rmdir .snapshot/NAME` (and the control socket): refused while files of the
        snapshot are open, since their blocks are freed at once."""
        if self.readonly:
            raise FsError(errno.EROFS, f"{self.vol.path} is mounted read-only")
        entry = self.snaps.by_name(name)
        if entry is None:
            raise FsError(errno.ENOENT, f"no snapshot named {name!r}")
        if self.handles.snapshot_in_use(entry.snap_id):
            raise FsError(errno.EBUSY, f"snapshot {name!r} has open files under "
                                       ".snapshot: close them first")
        freed = self.snaps.delete(name)
        try:
            pyfuse3.invalidate_entry_async(SNAPDIR_INO, os.fsencode(name), ignore_enoent=True)
        except Exception:  # not mounted yet (tests) or the session is ending
            log.debug("could not invalidate .snapshot/%s", name)
        return freed

    @_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """Remove a name. When it is the last name of a file that is still open, the file
        moves to the hidden unlinked-files directory instead, so the open handles keep
        reading and writing it; `release` removes it when the last one closes, and the
        next writable mount removes what a crash left there. fsck stays clean throughout,
        because every inode keeps a directory entry."""
        view, parent = self._writable_dir(parent_inode)
        if parent == ROOT_INO and name in (SNAPDIR_NAME, UNLINKED_NAME):
            raise _fail(errno.EPERM if name == SNAPDIR_NAME else errno.ENOENT)
        if self._park_if_open(view, parent, name) is None:
            view.unlink(parent, name)

    def _park_if_open(self, view: FileSystem, parent: int, name: bytes) -> int | None:
        """Move `name` into the unlinked directory if removing it would drop the last
        link of an open file; the inode number if it moved (the name is then gone)."""
        try:
            st = view.lookup(parent, name)
        except FsError:
            return None
        if st.is_dir or st.nlink > 1 or not self.handles.open_count(0, st.ino):
            return None
        holder = self._unlinked_dir()
        view.rename(parent, name, holder, str(st.ino).encode(), RENAME_NOREPLACE)
        self.unlinked.add(st.ino)
        return st.ino

    def _unlinked_dir(self) -> int:
        try:
            return self.active.lookup(ROOT_INO, UNLINKED_NAME).ino
        except FsError as e:
            if e.errno != errno.ENOENT:
                raise
            return self.active.mkdir(ROOT_INO, UNLINKED_NAME, 0o700, system=True).ino

    def _drop_leftovers(self) -> None:
        """Free files a crash left unlinked-but-open (their handles died with it)."""
        try:
            self.active.lookup(ROOT_INO, UNLINKED_NAME)
        except FsError:
            return
        self.active.remove_entry(ROOT_INO, UNLINKED_NAME)

    def _forget_unlinked(self, ino: int) -> None:
        self.unlinked.discard(ino)
        holder = self.active.lookup(ROOT_INO, UNLINKED_NAME).ino
        self.active.unlink(holder, str(ino).encode())

    @_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if parent_inode_old == SNAPDIR_INO or parent_inode_new == SNAPDIR_INO:
            self._rename_snapshot(parent_inode_old, name_old, parent_inode_new, name_new,
                                  flags)
            return
        view, old = self._writable_dir(parent_inode_old)
        _, new = self._writable_dir(parent_inode_new)
        for p, n in ((old, name_old), (new, name_new)):
            if p == ROOT_INO and n in (SNAPDIR_NAME, UNLINKED_NAME):
                raise _fail(errno.EPERM if n == SNAPDIR_NAME else errno.ENOENT)
        parked = None
        if not flags & (RENAME_EXCHANGE | RENAME_NOREPLACE):
            src = view.lookup(old, name_old)
            if not src.is_dir:
                parked = self._park_if_open(view, new, name_new)
        try:
            view.rename(old, name_old, new, name_new, flags)
        except FsError:
            if parked is not None:  # put the file it would have replaced back
                holder = self.active.lookup(ROOT_INO, UNLINKED_NAME).ino
                view.rename(holder, str(parked).encode(), new, name_new, RENAME_NOREPLACE)
                self.unlinked.discard(parked)
            raise

    def _rename_snapshot(self, po: int, old: bytes, pn: int, new: bytes, flags: int) -> None:
        """`mv .snapshot/A .snapshot/B` renames a snapshot; nothing else moves in or out."""
        if po != SNAPDIR_INO or pn != SNAPDIR_INO:
            raise _fail(errno.EROFS if self.readonly else errno.EXDEV)
        if self.readonly:
            raise _fail(errno.EROFS)
        if flags & RENAME_EXCHANGE:
            raise _fail(errno.EINVAL)
        if self.snaps.by_name(old) is None:  # a shadow snapshot is not in .snapshot
            raise _fail(errno.ENOENT)
        if self.snaps.by_name(new) is not None:
            raise _fail(errno.EEXIST)
        self.snaps.rename(old, new)  # each refusal with its own errno, logged

    def rename_snapshot(self, old: str, new: str) -> None:
        """`snapvol snap rename` through the control socket: rename, then make the kernel
        forget both names in .snapshot (it may have cached either)."""
        if self.readonly:
            raise FsError(errno.EROFS, f"{self.vol.path} is mounted read-only")
        self.snaps.rename(old, new)
        for name in (old, new):
            try:
                pyfuse3.invalidate_entry_async(SNAPDIR_INO, os.fsencode(name),
                                               ignore_enoent=True)
            except Exception:  # not mounted yet (tests) or the session is ending
                log.debug("could not invalidate .snapshot/%s", name)

    @_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        view, parent = self._writable_dir(new_parent_inode)
        snap_id, ino = from_fuse(inode) if inode != SNAPDIR_INO else (1, 0)
        if snap_id:
            raise _fail(errno.EXDEV)
        self._refuse_reserved(parent, new_name)
        return self._entry(0, view.link(ino, parent, new_name))

    @_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        view, parent = self._writable_dir(parent_inode)
        self._refuse_reserved(parent, name)
        _, uid, gid = self._owner(view, parent, stat.S_IFLNK, ctx)
        return self._entry(0, view.symlink(parent, name, target, uid, gid))

    @_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        view, _, ino = self._view(inode)
        return view.readlink(ino)

    # ---- files ------------------------------------------------------------------------
    def _open(self, view: FileSystem, snap_id: int, ino: int, flags: int) -> pyfuse3.FileInfo:
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable and (snap_id or self.readonly):
            raise _fail(errno.EROFS)
        if flags & os.O_TRUNC and writable:
            # libfuse asks the kernel for atomic O_TRUNC: the truncation is ours to do.
            view.setattr(ino, size=0)
        if self.refs is not None and not snap_id and (
                self.settling_all or ino in self.settling or view.getattr(ino).is_dir):
            # A file a refresh changed, which the kernel may still know by its old
            # attributes; or a name it cached before, whose inode number is now a
            # directory (the file it named is gone).
            raise _fail(errno.ESTALE)
        view.open(ino)
        fh = self.handles.add(Handle(view, snap_id, ino, bool(writable)))
        # Every change reaches the file through this mount, so the kernel's page cache
        # stays right between opens; except on a read-only mount, where a receive may
        # change the active image under it (fuse.follow), and opening drops the cache.
        if snap_id or self.refs is None:
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        # While handles opened before a change are open (they read ESTALE), new ones
        # bypass the page cache, which the kernel shares between handles: the old ones
        # must not find the new version's pages there.
        direct = any(isinstance(o.view, StaleView) and o.snap_id == 0 and o.ino == ino
                     for _, o in self.handles.items())
        return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=direct)

    @_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode == SNAPDIR_INO:
            raise _fail(errno.EISDIR)
        view, snap_id, ino = self._view(inode)
        return self._open(view, snap_id, ino, flags)

    @_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        view, parent = self._writable_dir(parent_inode)
        self._refuse_reserved(parent, name)
        mode, uid, gid = self._owner(view, parent, mode, ctx)
        st = view.create(parent, name, mode, uid, gid, ctx.umask)
        return self._open(view, 0, st.ino, flags), self._entry(0, st)

    @_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handles.get(fh)
        if self.vol.updating:  # see _view
            raise _fail(errno.EIO)
        return h.view.read(h.ino, off, size)

    @_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handles.get(fh)
        if not h.writable:
            raise _fail(errno.EBADF)
        return h.view.write(h.ino, off, buf)

    # No flush: close(2) has nothing to do here (durability is fsync's job, as on ext4, and
    # a write's errors, ENOSPC included, come from the write itself). pyfuse3's default
    # answers ENOSYS, which the kernel takes as success and stops sending flush at all,
    # saving a round trip per close (2,450 in a tar -x of the standard library).

    @_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        """Return once everything written so far is in a committed CP."""
        if not self.handles.get(fh).view.readonly:
            await self._commit()

    async def _commit(self) -> None:
        """Commit every change made so far, as FileSystem.fsync does, but wait for the
        disk on a worker thread: other requests (reads, writes, other files' fsyncs, which
        share the CP) go on while a CP is written, instead of queueing behind its
        flushes. The CP is placed as a background CP (engine/cpwriter.py)."""
        target = self.vol.sync_target()
        while (writer := self.vol.sync_step(target)) is not None:
            await trio.to_thread.run_sync(writer.join)

    @_errors
    async def release(self, fh: int) -> None:
        h = self.handles.remove(fh)
        self._closed(h)

    def _closed(self, h: Handle) -> None:
        h.view.release(h.ino)
        if h.snap_id == 0 and h.ino in self.unlinked and not self.handles.open_count(0, h.ino):
            self._forget_unlinked(h.ino)

    # ---- directories ------------------------------------------------------------------
    @_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode == SNAPDIR_INO:
            return self.handles.add(Handle(self.active, -1, SNAPDIR_INO, False))
        view, snap_id, ino = self._view(inode)
        if not view.getattr(ino).is_dir:
            raise _fail(errno.ENOTDIR)
        return self.handles.add(Handle(view, snap_id, ino, False, is_dir=True))

    @_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        h = self.handles.get(fh)
        if h.snap_id == -1:
            entries = self._snapdir_entries(start_id)
        else:
            entries = self._dir_entries(h, start_id)
        refs = self.refs
        parent = SNAPDIR_INO if h.snap_id == -1 else to_fuse(h.snap_id, h.ino)
        for name, attrs, cookie in entries:
            if not pyfuse3.readdir_reply(token, name, attrs, cookie):
                break
            if refs is not None and name not in (b".", b".."):
                refs.add(attrs.st_ino, parent, name, attrs.generation)  # readdirplus

    def _dir_entries(self, h: Handle, start: int) -> Iterator[
            tuple[bytes, pyfuse3.EntryAttributes, int]]:
        view, snap_id, ino = h.view, h.snap_id, h.ino
        if start < 1:
            yield b".", self._entry(snap_id, view.getattr(ino)), 1
        if start < 2:
            if ino == ROOT_INO:
                up = self._snapdir_entry() if snap_id else self._entry(0, view.getattr(ino))
            else:
                up = self._entry(snap_id, view.lookup(ino, b".."))
            yield b"..", up, 2
        for name, child, _dtype, cookie in view.iterdir(ino, start, batch=256):
            if self._hidden(snap_id, ino, name):
                continue
            yield name, self._entry(snap_id, view.getattr(child)), cookie

    def _snapdir_entries(self, start: int) -> Iterator[
            tuple[bytes, pyfuse3.EntryAttributes, int]]:
        if start < 1:
            yield b".", self._snapdir_entry(), 1
        if start < 2:
            yield b"..", self._entry(0, self.active.getattr(ROOT_INO)), 2
        for e in self.snaps.entries():
            cookie = e.snap_id + COOKIE_BASE
            if cookie <= start:
                continue
            view = self.snaps.view(e.snap_id)
            if view is not None:
                yield os.fsencode(e.name), self._entry(e.snap_id, view.getattr(ROOT_INO)), cookie

    @_errors
    async def releasedir(self, fh: int) -> None:
        self.handles.remove(fh)

    @_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        if not self.readonly:
            await self._commit()

    # ---- xattrs -----------------------------------------------------------------------
    def _xview(self, inode: int) -> tuple[FileSystem, int]:
        if inode == SNAPDIR_INO:
            raise _fail(errno.ENOTSUP)
        view, _, ino = self._view(inode)
        return view, ino

    @_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        if inode == SNAPDIR_INO:
            raise _fail(errno.EROFS)
        view, ino = self._xview(inode)
        kill_sgid = False
        if name == acl.ACCESS and ctx.uid != 0:
            # As the kernel's posix_acl_update_mode: an access ACL set by someone outside
            # the file's group (the kernel checked they own it) drops set-group-ID.
            kill_sgid = not _in_group(ctx, view.getattr(ino).gid)
        view.setxattr(ino, name, value, kill_sgid=kill_sgid)

    @_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == SNAPDIR_INO:
            raise _fail(pyfuse3.ENOATTR)
        view, ino = self._xview(inode)
        value = view.xattr(ino, name)
        if value is None:
            raise _fail(pyfuse3.ENOATTR)
        return value

    @_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        if inode == SNAPDIR_INO:
            return []
        view, ino = self._xview(inode)
        return view.listxattr(ino)

    @_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if inode == SNAPDIR_INO:
            raise _fail(errno.EROFS)
        view, ino = self._xview(inode)
        view.removexattr(ino, name)

    # ---- whole volume -----------------------------------------------------------------
    @_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        figures = self.active.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = figures["bsize"]
        s.f_blocks = figures["blocks"]
        s.f_bfree = figures["bfree"]
        s.f_bavail = figures["bavail"]
        # Inodes are allocated on demand: report one per free block, like btrfs.
        s.f_files = figures["blocks"]
        s.f_ffree = s.f_favail = figures["bfree"]
        s.f_namemax = figures["namemax"]
        return s

    def close_handles(self) -> None:
        """Release what the kernel left open (a lazy unmount does not release handles),
        so files unlinked while open are freed before the last CP."""
        for fh in self.handles.all():
            try:
                self._closed(self.handles.remove(fh))
            except SnapvolError as e:
                log.error("releasing handle %d: %s", fh, e)
        if not self.readonly:
            # Absent, or something still waits in it (the next mount frees it).
            with contextlib.suppress(FsError):
                self.active.rmdir(ROOT_INO, UNLINKED_NAME)
