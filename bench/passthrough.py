"""A minimal passthrough FUSE file system on pyfuse3: the anchor of the FUSE benchmarks.

    python bench/passthrough.py SOURCE_DIR MOUNTPOINT [READAHEAD_KIB]

It maps every request onto the same call on a host directory, with the same pyfuse3
and trio machinery, the same mount options (default_permissions) and the same page cache
policy as `snapvol mount`, and the same readahead window (snapvol.fuse.readahead: 1 MiB
unless READAHEAD_KIB says otherwise, 0 for the kernel's default); what it costs is FUSE's
own cost, so a ratio against it isolates what snapvol adds. Only what the benchmarks drive
is implemented (files, directories, symlinks, hard links, attributes); prints "ready" once
mounted and stops on SIGTERM or unmount.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from snapvol.fuse import readahead

P = ParamSpec("P")
R = TypeVar("R")


def _oserrors(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    wrapper.__name__ = fn.__name__
    return wrapper


class Passthrough(pyfuse3.Operations):
    def __init__(self, source: str) -> None:
        super().__init__()
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: source}
        self.fds: dict[int, int] = {}
        self.initialized = False

    def init(self) -> None:
        self.initialized = True

    def _path(self, ino: int, name: bytes | None = None) -> str:
        base = self.paths[ino]
        return base if name is None else os.path.join(base, os.fsdecode(name))

    def _attrs(self, path: str) -> pyfuse3.EntryAttributes:
        st = os.lstat(path)
        ino = st.st_ino if path != self.paths[pyfuse3.ROOT_INODE] else pyfuse3.ROOT_INODE
        self.paths[ino] = path
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.entry_timeout = e.attr_timeout = 1.0
        for key in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                    "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(e, key, getattr(st, key))
        return e

    @_oserrors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._path(parent_inode, name))

    @_oserrors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._path(inode))

    @_oserrors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        if fields.update_size:
            os.truncate(path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.chown(path, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1, follow_symlinks=False)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                               attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns),
                     follow_symlinks=False)
        return self._attrs(path)

    @_oserrors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._path(parent_inode, name)
        os.mkdir(path, mode)
        return self._attrs(path)

    @_oserrors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._path(parent_inode, name)
        os.symlink(target, path)
        return self._attrs(path)

    @_oserrors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(os.readlink(self._path(inode)))

    @_oserrors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._path(new_parent_inode, new_name)
        os.link(self._path(inode), path)
        return self._attrs(path)

    @_oserrors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.unlink(self._path(parent_inode, name))

    @_oserrors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.rmdir(self._path(parent_inode, name))

    @_oserrors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        os.rename(self._path(parent_inode_old, name_old), self._path(parent_inode_new, name_new))

    @_oserrors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fd = os.open(self._path(inode), flags & ~os.O_CREAT)
        self.fds[fd] = inode
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @_oserrors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        path = self._path(parent_inode, name)
        fd = os.open(path, flags | os.O_CREAT | os.O_TRUNC, mode)
        attrs = self._attrs(path)
        self.fds[fd] = attrs.st_ino
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), attrs

    @_oserrors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    @_oserrors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(fh, buf, off)

    @_oserrors
    async def fsync(self, fh: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(fh)

    @_oserrors
    async def release(self, fh: int) -> None:
        self.fds.pop(fh, None)
        os.close(fh)

    @_oserrors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    @_oserrors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        names = sorted(os.listdir(self._path(fh)))
        for i, name in enumerate(names[start_id:], start_id + 1):
            attrs = self._attrs(os.path.join(self._path(fh), name))
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, i):
                break

    @_oserrors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.paths[pyfuse3.ROOT_INODE])
        s = pyfuse3.StatvfsData()
        for key in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                    "f_ffree", "f_favail", "f_namemax"):
            setattr(s, key, getattr(st, key))
        return s


async def _serve(ops: Passthrough, mountpoint: str, readahead_kib: int) -> None:
    async with trio.open_nursery() as nursery:
        async def announce() -> None:  # as snapvol.fuse.server does
            while not ops.initialized:
                await trio.sleep(0.002)
            why = readahead_kib and readahead.set_window(mountpoint, readahead_kib)
            if why:
                print(f"passthrough: kept the kernel's readahead window: {why}",
                      file=sys.stderr)
            print("ready", flush=True)

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(stop_on_signal)
        nursery.start_soon(announce)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main() -> None:
    # resolved before mounting: once mounted, looking at it would ask this very process
    source, mountpoint = sys.argv[1], os.path.realpath(sys.argv[2])
    readahead_kib = int(sys.argv[3]) if len(sys.argv) > 3 else readahead.DEFAULT_KIB
    ops = Passthrough(os.path.abspath(source))
    pyfuse3.init(ops, mountpoint, set(pyfuse3.default_options) | {"fsname=passthrough"})
    try:
        trio.run(_serve, ops, mountpoint, readahead_kib)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
