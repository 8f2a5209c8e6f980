"""Copying whole trees between the host and a volume, with the semantics of `cp -a`.

`put_tree` copies a host path into a volume and `get_tree` copies a volume path (of the
active file system or of a snapshot) back out, keeping everything a later comparison could
notice: file type, mode, owner, atime/mtime, symlink targets (never followed), hard links
(by host (st_dev, st_ino) on the way in and by volume inode on the way out), xattrs, holes,
FIFOs, sockets and device nodes. A put followed by a get therefore gives back the tree.

Destinations follow `cp -a SRC DEST`: a DEST that does not exist becomes the copy; an
existing directory receives the copy as DEST/basename(SRC). Unlike cp, nothing that
already exists is ever overwritten (the copy stops with EEXIST before writing anything),
and a copy that fails part way removes what it made, so a failing put or get leaves the
volume and the host as they were. A put whose file data alone cannot fit is refused
before it writes anything (ENOSPC), so that refusal changes nothing at all, not even the
CP count; one that runs short part way (the data fitted, the metadata did not, or the
source grew) is undone, and the undo is what the next CP commits.

File data is copied as `read` returns it, as cp does, not as `st_size` announces it: a
sysfs file that reports 4096 bytes and reads 6 becomes a 6-byte file, a /proc file that
reports 0 gets what it reads, and a file that grows or shrinks during the copy is copied
up to where its reads end. Holes the host reports (SEEK_DATA/SEEK_HOLE) stay holes.

Directories are walked with an explicit stack, not recursion, so depth is bounded only by
the host's PATH_MAX. A directory's mode and times are set after its whole subtree is
written, because creating entries inside it changes its mtime (and a read-only mode would
stop a non-root get from filling it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import stat
from dataclasses import dataclass
from typing import Protocol

from snapvol.errors import FsError, SnapvolError, fs_error
from snapvol.fs.posix import FileSystem, Stat
from snapvol.layout import acl
from snapvol.layout.constants import BLOCK_SIZE

CHUNK = 1 << 20
"""File data moves in 1 MiB pieces: large enough for few calls, small enough for memory."""

_ZERO_BLOCK = bytes(BLOCK_SIZE)

# xattr failures that mean "this host or this caller cannot hold that name": the copy
# keeps every attribute it can and skips these (trusted.* when not root, user.* on a
# symlink, a file system without xattrs).
_XATTR_SKIP = frozenset({errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP})


@dataclass(slots=True)
class CopyStats:
    """What one copy made, by kind of entry; `size` counts the regular files' lengths
    (holes included, each inode once), `bytes` only their data."""

    files: int = 0
    directories: int = 0
    symlinks: int = 0
    specials: int = 0  # FIFOs, sockets, device nodes
    hardlinks: int = 0  # names made as another link to an inode copied earlier
    bytes: int = 0
    size: int = 0

    @property
    def entries(self) -> int:
        return (self.files + self.directories + self.symlinks + self.specials
                + self.hardlinks)


class Progress(Protocol):
    """Where a copy reports how far it got (the CLI draws a bar from it)."""

    def start(self, files: int, nbytes: int) -> None:
        """The totals, announced once before copying starts: regular files and their
        bytes (holes included), each inode once, as `CopyStats.files` and `.size` count
        them when the copy is done."""

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        """`files` more regular files done, `nbytes` more of their bytes (holes included)."""


def _host_error(err: OSError, path: bytes, hint: str = "") -> FsError:
    """A host-side failure as an FsError naming the host path (one line)."""
    code = err.errno if err.errno is not None else errno.EIO
    reason = err.strerror or os.strerror(code)
    return FsError(code, f"{os.fsdecode(path)}: {reason}{hint}")


def _count_kind(mode: int, stats: CopyStats) -> None:
    if stat.S_ISREG(mode):
        stats.files += 1
    elif stat.S_ISDIR(mode):
        stats.directories += 1
    elif stat.S_ISLNK(mode):
        stats.symlinks += 1
    else:
        stats.specials += 1


# ---- host -> volume ---------------------------------------------------------------------------
def put_tree(fs: FileSystem, src_host_path: str | bytes | os.PathLike[str],
             dest_vol_path: str | bytes = "/", progress: Progress | None = None) -> CopyStats:
    """Copy the host file or tree at `src_host_path` into the volume (see the module doc)."""
    src = os.fsencode(src_host_path)
    try:
        st = os.lstat(src)
    except OSError as err:
        raise _host_error(err, src) from None
    name = os.path.basename(os.path.normpath(os.path.abspath(src)))
    parent, leaf = _volume_target(fs, name, os.fsencode(dest_vol_path))
    files, nbytes, blocks = _host_totals(src, st)
    fs.check_room(blocks, f"copying {os.fsdecode(src)}")
    if progress is not None:
        progress.start(files, nbytes)
    putter = _Putter(fs, progress)
    try:
        putter.run(src, st, parent, leaf)
    except BaseException:
        if putter.created:
            with contextlib.suppress(SnapvolError):
                fs.remove_entry(parent, leaf)
        raise
    return putter.stats


def _volume_target(fs: FileSystem, name: bytes, dest: bytes) -> tuple[int, bytes]:
    """(parent inode, name) on the volume where a copy of `name` goes for `dest`."""
    try:
        st = fs.stat(dest)
    except FsError as err:
        if err.errno != errno.ENOENT:
            raise
        return fs.split(dest)
    shown = os.fsdecode(dest)
    if not st.is_dir:
        raise FsError(errno.EEXIST, f"{shown} already exists on the volume; remove it first "
                                    "(snapvol rm) or choose another destination")
    if not name:
        raise fs_error(errno.EINVAL, "the source has no name to copy under")
    try:
        fs.lookup(st.ino, name)
    except FsError as err:
        if err.errno != errno.ENOENT:
            raise
        return st.ino, name
    target = os.fsdecode(dest.rstrip(b"/") + b"/" + name)
    raise FsError(errno.EEXIST, f"{target} already exists on the volume; remove it first "
                                "(snapvol rm -r) or choose another destination")


def _data_blocks(st: os.stat_result) -> int:
    """The fewest volume blocks a host file's data can take: its size in blocks, or
    what the host allocated for it if less (a sparse file)."""
    return min(-(-st.st_size // BLOCK_SIZE), -(-st.st_blocks * 512 // BLOCK_SIZE))


def _host_totals(src: bytes, st: os.stat_result) -> tuple[int, int, int]:
    """(regular files, their bytes, the fewest blocks their data takes) under a host
    path, each inode once: the progress bar's totals and the space a put needs at least."""
    files, nbytes, blocks = 0, 0, 0
    if stat.S_ISREG(st.st_mode):
        files, nbytes, blocks = 1, st.st_size, _data_blocks(st)
    seen: set[tuple[int, int]] = set()  # hard links take their inode's blocks once
    todo = [src] if stat.S_ISDIR(st.st_mode) else []
    while todo:
        try:
            with os.scandir(todo.pop()) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        est = entry.stat(follow_symlinks=False)
                        key = (est.st_dev, est.st_ino)
                        if est.st_nlink > 1:
                            if key in seen:
                                continue
                            seen.add(key)
                        files += 1
                        nbytes += est.st_size
                        blocks += _data_blocks(est)
        except OSError:
            continue  # the copy itself will report it
    return files, nbytes, blocks


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """[start, end) runs of a host file that hold data; the gaps are holes."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:
                break  # nothing but a hole from `pos` to the end
            if err.errno == errno.EINVAL:
                out.append((pos, size))  # the host cannot tell: copy it all as data
                break
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end))
        pos = end
    return out


def _host_xattrs(path: bytes) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno in _XATTR_SKIP:
            return {}
        raise
    out = {}
    for name in names:
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as err:
            if err.errno not in _XATTR_SKIP and err.errno != errno.ENODATA:
                raise
    return out


class _Copier:
    """What put and get share: the volume, the progress sink, the counts."""

    def __init__(self, fs: FileSystem, progress: Progress | None) -> None:
        self.fs = fs
        self.progress = progress
        self.stats = CopyStats()
        self.current = b""  # the path being copied, for error messages

    def _advance(self, mode: int) -> None:
        """One more entry made (`mode` 0: a hard link); a regular file's bytes were
        reported as they were copied."""
        if mode:
            _count_kind(mode, self.stats)
        if self.progress is not None and stat.S_ISREG(mode):
            self.progress.advance(1, 0)


class _Putter(_Copier):
    def __init__(self, fs: FileSystem, progress: Progress | None) -> None:
        super().__init__(fs, progress)
        self.created = False
        self.links: dict[tuple[int, int], int] = {}  # host (dev, ino) -> volume inode

    def run(self, src: bytes, st: os.stat_result, parent: int, name: bytes) -> None:
        try:
            self._walk(src, st, parent, name)
        except FsError:
            raise
        except OSError as err:
            raise _host_error(err, self.current) from None

    def _walk(self, src: bytes, st: os.stat_result, parent: int, name: bytes) -> None:
        fs = self.fs
        stack = [(src, st, parent, name)]
        dirs: list[tuple[bytes, os.stat_result, int]] = []
        while stack:
            path, st, parent, name = stack.pop()
            self.current = path
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                ino = fs.mkdir(parent, name, stat.S_IMODE(mode), st.st_uid, st.st_gid).ino
                self.created = True
                dirs.append((path, st, ino))
                with os.scandir(path) as it:
                    children = sorted((e.name, e.path, e.stat(follow_symlinks=False))
                                      for e in it)
                stack.extend((cpath, cst, ino, cname) for cname, cpath, cst in reversed(children))
                self._advance(mode)
                continue
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self.links:
                fs.link(self.links[key], parent, name)
                self.stats.hardlinks += 1
                self._advance(0)
                continue
            length = None
            if stat.S_ISREG(mode):
                ino = fs.create(parent, name, stat.S_IMODE(mode), st.st_uid, st.st_gid).ino
                self.created = True
                length = self._put_data(path, ino, st.st_size)
                self.stats.size += length
            elif stat.S_ISLNK(mode):
                ino = fs.symlink(parent, name, os.readlink(path), st.st_uid, st.st_gid).ino
            else:
                ino = fs.mknod(parent, name, mode, st.st_rdev, st.st_uid, st.st_gid).ino
            self.created = True
            self._put_attrs(path, ino, st, length)
            if st.st_nlink > 1:
                self.links[key] = ino
            self._advance(mode)
        for path, st, ino in reversed(dirs):
            self.current = path
            self._put_attrs(path, ino, st)

    def _put_data(self, path: bytes, ino: int, size: int) -> int:
        """Copy a host file's data extents as read returns them (see the module doc);
        `size` is its st_size. The file's length: where its reads ended."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            done = 0
            for start, end in _data_extents(fd, size):
                self._tick(start - done)
                off = self._copy_run(fd, ino, start, end)
                if off < end:  # the reads ended early: the file is this long
                    self._tick(size - off)
                    return off
                done = end
            self._tick(size - done)
            # Past st_size, what read still returns: a /proc file, or one that grew.
            return self._copy_run(fd, ino, max(size, done), None)
        finally:
            os.close(fd)

    def _copy_run(self, fd: int, ino: int, off: int, end: int | None) -> int:
        """Copy from `off` to `end` (None: to the end of what reads return); the offset
        where the copy stopped."""
        while end is None or off < end:
            data = os.pread(fd, CHUNK if end is None else min(CHUNK, end - off), off)
            if not data:
                break
            self.fs.write(ino, off, data)
            off += len(data)
            self.stats.bytes += len(data)
            self._tick(len(data))
        return off

    def _tick(self, nbytes: int) -> None:
        if self.progress is not None and nbytes > 0:
            self.progress.advance(0, nbytes)

    def _put_attrs(self, path: bytes, ino: int, st: os.stat_result,
                   length: int | None = None) -> None:
        """The host entry's xattrs, mode, owner and times; `length` is a regular file's
        size as copied (its reads may end before or after st_size)."""
        fs = self.fs
        xattrs = _host_xattrs(path)
        for name, value in xattrs.items():
            fs.setxattr(ino, name, value)
        for raw in acl.NAMES:
            if os.fsdecode(raw) not in xattrs:  # inherited from a default ACL, as cp -a
                fs.removexattr(ino, raw)        # would leave no ACL the source lacks
        mode = st.st_mode
        fs.setattr(ino, size=length,
                   mode=None if stat.S_ISLNK(mode) else stat.S_IMODE(mode),
                   uid=st.st_uid, gid=st.st_gid, atime_ns=st.st_atime_ns,
                   mtime_ns=st.st_mtime_ns)


# ---- volume -> host ---------------------------------------------------------------------------
def get_tree(fs: FileSystem, src_vol_path: str | bytes,
             dest_host_path: str | bytes | os.PathLike[str],
             progress: Progress | None = None) -> CopyStats:
    """Copy the volume file or tree at `src_vol_path` to the host (see the module doc).

    Copying the volume root into an existing directory copies the root's entries into it.
    """
    src = os.fsencode(src_vol_path)
    ino = fs.resolve(src, follow=False)
    st = fs.getattr(ino)
    name = posixpath.basename(posixpath.normpath(b"/" + src.strip(b"/")))
    dest = os.fsencode(dest_host_path)
    work: list[tuple[int, Stat, bytes]]
    if os.path.isdir(dest):
        if name:
            work = [(ino, st, _fresh_host_path(os.path.join(dest, name)))]
        else:
            work = [(child, fs.getattr(child), _fresh_host_path(os.path.join(dest, cname)))
                    for cname, child, _, _ in fs.iterdir(ino)]
    else:
        work = [(ino, st, _fresh_host_path(dest))]
    if progress is not None:
        progress.start(*_volume_totals(fs, [w[1] for w in work]))
    getter = _Getter(fs, progress)
    try:
        for item in reversed(work):
            getter.run(*item)
    except BaseException:
        for path in getter.created:
            _remove_host(path)
        raise
    return getter.stats


def _fresh_host_path(path: bytes) -> bytes:
    if os.path.lexists(path):
        raise FsError(errno.EEXIST, f"{os.fsdecode(path)} already exists; remove it first or "
                                    "choose another destination")
    return path


def _remove_host(path: bytes) -> None:
    """Undo a failed get: remove a top-level entry it created (best effort)."""
    with contextlib.suppress(OSError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


def _volume_totals(fs: FileSystem, tops: list[Stat]) -> tuple[int, int]:
    """(regular files, their bytes) under volume inodes, each inode once, for the
    progress bar."""
    files, nbytes = 0, 0
    todo = list(tops)
    seen: set[int] = set()
    while todo:
        st = todo.pop()
        if stat.S_ISREG(st.mode):
            if st.nlink > 1:
                if st.ino in seen:
                    continue
                seen.add(st.ino)
            files += 1
            nbytes += st.size
        elif st.is_dir:
            todo.extend(fs.getattr(child) for _, child, _, _ in fs.iterdir(st.ino))
    return files, nbytes


class _Getter(_Copier):
    def __init__(self, fs: FileSystem, progress: Progress | None) -> None:
        super().__init__(fs, progress)
        self.created: list[bytes] = []  # top-level host paths made, for undoing a failure
        self.links: dict[int, bytes] = {}  # volume inode -> host path of its first link
        self.root = os.geteuid() == 0

    def run(self, ino: int, st: Stat, dest: bytes) -> None:
        try:
            self._walk(ino, st, dest)
        except FsError:
            raise
        except OSError as err:
            raise _host_error(err, self.current) from None

    def _walk(self, top: int, top_st: Stat, dest: bytes) -> None:
        fs = self.fs
        stack = [(top, top_st, dest)]
        dirs: list[tuple[bytes, Stat]] = []
        while stack:
            ino, st, path = stack.pop()
            self.current = path
            mode = st.mode
            if st.is_dir:
                os.mkdir(path, 0o700)
                self._made(path, dest)
                dirs.append((path, st))
                children = sorted(fs.iterdir(ino), reverse=True)
                stack.extend((child, fs.getattr(child), os.path.join(path, name))
                             for name, child, _, _ in children)
                self._advance(mode)
                continue
            if st.nlink > 1 and ino in self.links:
                os.link(self.links[ino], path, follow_symlinks=False)
                self._made(path, dest)
                self.stats.hardlinks += 1
                self._advance(0)
                continue
            self._make(ino, st, path)
            self._made(path, dest)
            self._get_attrs(ino, st, path)
            if st.nlink > 1:
                self.links[ino] = path
            self._advance(mode)
        for path, st in reversed(dirs):
            self.current = path
            self._get_attrs(st.ino, st, path)

    def _make(self, ino: int, st: Stat, path: bytes) -> None:
        mode = st.mode
        if stat.S_ISREG(mode):
            self._get_data(ino, st.size, path)
            self.stats.size += st.size
        elif stat.S_ISLNK(mode):
            os.symlink(self.fs.readlink(ino), path)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(path, 0o600)
        else:
            try:
                os.mknod(path, stat.S_IFMT(mode) | 0o600, st.rdev)
            except PermissionError as err:
                hint = "" if self.root else " (device nodes can only be made by root)"
                raise _host_error(err, path, hint) from None

    def _made(self, path: bytes, top: bytes) -> None:
        if path == top:
            self.created.append(path)

    def _get_data(self, ino: int, size: int, path: bytes) -> None:
        """Write the file's data extents, then set the size: holes stay holes, and a
        huge sparse file costs only what it holds."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            covered = 0
            for start, length in self.fs.data_extents(ino):
                off, end = start, start + length
                covered += length
                while off < end:
                    data = self.fs.read(ino, off, min(CHUNK, end - off))
                    if not data:
                        break
                    self.stats.bytes += _write_nonzero(fd, off, data)
                    off += len(data)
                    if self.progress is not None:
                        self.progress.advance(0, len(data))
            if self.progress is not None and size > covered:
                self.progress.advance(0, size - covered)  # the holes count as copied
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def _get_attrs(self, ino: int, st: Stat, path: bytes) -> None:
        try:
            os.chown(path, st.uid, st.gid, follow_symlinks=False)
        except PermissionError:
            if self.root:
                raise  # a non-root get keeps the caller as owner, as cp -a does
        for name, value in self._xattrs(ino).items():
            try:
                os.setxattr(path, name, value, follow_symlinks=False)
            except OSError as err:
                if err.errno not in _XATTR_SKIP:
                    raise
        if not stat.S_ISLNK(st.mode):
            os.chmod(path, stat.S_IMODE(st.mode))
        os.utime(path, ns=(st.atime_ns, st.mtime_ns), follow_symlinks=False)

    def _xattrs(self, ino: int) -> dict[bytes, bytes]:
        return {name: self.fs.getxattr(ino, name) for name in self.fs.listxattr(ino)}


def _write_nonzero(fd: int, offset: int, data: bytes) -> int:
    """pwrite the runs of non-zero 4 KiB blocks of `data` at `offset`; returns bytes written."""
    written = 0
    start: int | None = None
    n = len(data)
    for pos in range(0, n, BLOCK_SIZE):
        end = min(pos + BLOCK_SIZE, n)
        if data[pos:end] == _ZERO_BLOCK[: end - pos]:
            if start is not None:
                _pwrite_all(fd, memoryview(data)[start:pos], offset + start)
                written += pos - start
                start = None
        elif start is None:
            start = pos
    if start is not None:
        _pwrite_all(fd, memoryview(data)[start:], offset + start)
        written += n - start
    return written


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done
