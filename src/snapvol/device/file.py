"""Image files and raw block devices.

A volume lives in a sparse regular file or on a raw block device. Runs go to the kernel as
single positioned system calls (pread/pwrite, preadv/pwritev split at IOV_MAX), so the cost
of a run does not grow with a Python loop per block, and positioned calls need no shared
file offset, so readers on several threads do not race.

The device takes no lock itself: the owner of a volume takes a `VolumeLock` on `fd` after
opening, because only the owner knows whether it opened the volume to write or to read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import stat
from collections.abc import Sequence
from typing import cast

from snapvol.device.base import BLOCK_SIZE, Buffer, Device, blocks_in, byte_view
from snapvol.errors import VolumeError

MIN_IMAGE_BYTES = 1 << 20
"""Smaller images cannot hold the fixed metadata of a volume with room to spare."""


def _iov_max() -> int:
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError):
        value = -1
    return value if value > 0 else 1024


IOV_MAX = _iov_max()


class FileDevice(Device):
    """A volume image: a regular file or a raw block device, opened read-only or read-write."""

    def __init__(self, path: str | os.PathLike[str], writable: bool) -> None:
        self.path = os.fspath(path)
        self.writable = writable
        self._fd = _open_image(self.path, writable)
        try:
            st = os.fstat(self._fd)
            size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(self._fd, 0, os.SEEK_END)
        except OSError as err:
            os.close(self._fd)
            raise VolumeError(f"cannot size {self.path}: {err.strerror}") from err
        self.nblocks = size // BLOCK_SIZE

    @property
    def fd(self) -> int:
        """The open descriptor, for `VolumeLock.acquire`; ValueError once closed."""
        if self._fd < 0:
            raise ValueError(f"{self.path} is closed")
        return self._fd

    def read_block(self, vbn: int) -> bytes:
        if 0 <= vbn < self.nblocks:
            data = os.pread(self.fd, BLOCK_SIZE, vbn * BLOCK_SIZE)
            if len(data) == BLOCK_SIZE:
                return data
        return self.read(vbn)  # out of range (refused there) or a short read

    def read(self, vbn: int, count: int = 1) -> bytes:
        self.check_run(vbn, count)
        want = count * BLOCK_SIZE
        offset = vbn * BLOCK_SIZE
        data = os.pread(self.fd, want, offset)
        if len(data) == want:
            return data
        # A short read: the kernel split the call, or the file ends early (a sparse image
        # that another tool truncated). Keep reading; past the end reads as zeros.
        parts = [data]
        got = len(data)
        while got < want:
            more = os.pread(self.fd, want - got, offset + got)
            if not more:
                parts.append(bytes(want - got))
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def readv(self, vbn: int, bufs: list[bytearray] | list[memoryview]) -> None:
        views = [byte_view(buf) for buf in bufs]
        self.check_run(vbn, sum(blocks_in(view.nbytes) for view in views))
        fd = self.fd
        offset = vbn * BLOCK_SIZE
        while views:
            done = os.preadv(fd, views[:IOV_MAX], offset)
            if done == 0:
                for view in views:
                    view[:] = bytes(view.nbytes)
                return
            offset += done
            views = _advance(views, done)

    def write(self, vbn: int, data: Buffer) -> None:
        self.writev(vbn, [data])

    def writev(self, vbn: int, bufs: Sequence[Buffer]) -> None:
        self._check_writable()
        kinds = set(map(type, bufs))
        if kinds == {bytes} or (kinds <= {bytes, memoryview} and all(
                b.format == "B" and b.ndim == 1 and b.contiguous
                for b in bufs if isinstance(b, memoryview))):
            # The engine's case: whole-block bytes objects, or flat byte views of a large
            # write's buffer. Checked and passed to pwritev as they are, without making
            # a view per 4 KiB buffer (len() is their size in bytes).
            total = sum(map(len, bufs))
            self.check_run(vbn, blocks_in(total))
            flat = cast(list[bytes | memoryview], list(bufs))
            if self._pwritev_all(flat, vbn * BLOCK_SIZE, total):
                return
        views = [byte_view(buf) for buf in bufs]
        self.check_run(vbn, sum(blocks_in(view.nbytes) for view in views))
        fd = self.fd
        offset = vbn * BLOCK_SIZE
        views = [view for view in views if view.nbytes]
        while views:
            done = os.pwritev(fd, views[:IOV_MAX], offset)
            if done == 0:
                raise VolumeError(f"{self.path}: the device accepted no bytes at block {vbn}")
            offset += done
            views = _advance(views, done)

    def _pwritev_all(self, bufs: list[bytes | memoryview], offset: int, total: int) -> bool:
        """Write bytes buffers in IOV_MAX batches; False after a short write, with nothing
        lost: the caller rewrites the whole run the careful way (writes are idempotent)."""
        fd = self.fd
        for i in range(0, len(bufs), IOV_MAX):
            batch = bufs[i : i + IOV_MAX]
            want = sum(map(len, batch))
            if os.pwritev(fd, batch, offset) != want:
                return False
            offset += want
        return True

    def flush(self) -> None:
        # fdatasync: the data and what reading it back needs (allocation, size), without
        # a journal commit for the mtime alone (the root record's flush is only that).
        if self.writable:
            os.fdatasync(self.fd)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _check_writable(self) -> None:
        if not self.writable:
            raise VolumeError(f"{self.path} is open read-only")

    def __repr__(self) -> str:
        mode = "rw" if self.writable else "ro"
        return f"FileDevice({self.path!r}, {mode}, {self.nblocks} blocks)"


def _advance(views: list[memoryview], done: int) -> list[memoryview]:
    """Drop the first `done` bytes from a list of buffers (after a partial vectored call)."""
    index = 0
    while index < len(views) and done >= views[index].nbytes:
        done -= views[index].nbytes
        index += 1
    rest = views[index:]
    if rest and done:
        rest[0] = rest[0][done:]
    return rest


def _open_image(path: str, writable: bool) -> int:
    """Open an image, turning the usual mistakes into one-line `VolumeError`s."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VolumeError(f"no such image: {path}") from None
    except OSError as err:
        raise VolumeError(f"cannot open {path}: {err.strerror}") from err
    if stat.S_ISDIR(st.st_mode):
        raise VolumeError(f"{path} is a directory, not a volume image")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise VolumeError(f"{path} is neither a regular file nor a block device")
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        raise VolumeError(f"no such image: {path}") from None
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and writable:
            raise VolumeError(f"cannot open {path} for writing: {err.strerror}") from err
        raise VolumeError(f"cannot open {path}: {err.strerror}") from err


def open_device(path: str | os.PathLike[str], writable: bool) -> FileDevice:
    """Open the image or raw device at `path`."""
    return FileDevice(path, writable)


def create_image(path: str | os.PathLike[str], size_bytes: int) -> tuple[int, int]:
    """Create a sparse image of `size_bytes` rounded down to whole blocks; the (device,
    inode) of the new file, so a caller that fails later removes it (`remove_created`)
    and never a file someone else put at the same path meanwhile.

    Only ftruncate, so a 16 TiB image costs nothing until blocks are written (where the
    file system allows files that large: ext4 stops at 16 TiB minus one block). A size
    past the process's file-size limit or the file system's is refused, and the empty
    file made to try it is removed.
    """
    name = os.fspath(path)
    if size_bytes < MIN_IMAGE_BYTES:
        raise VolumeError(f"cannot create {name}: {size_bytes} bytes is below the 1 MiB minimum")
    size = size_bytes // BLOCK_SIZE * BLOCK_SIZE
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and size > limit:
        raise VolumeError(f"cannot create {name} of {size} bytes: this process may not "
                          f"write files past {limit} bytes (`ulimit -f`); choose a smaller "
                          "size or raise the limit")
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except FileExistsError:
        raise VolumeError(f"{name} already exists") from None
    except OSError as err:
        raise VolumeError(f"cannot create {name}: {err.strerror}") from err
    st = os.fstat(fd)
    made = (st.st_dev, st.st_ino)
    try:
        os.ftruncate(fd, size)
    except BaseException as err:
        os.close(fd)
        remove_created(name, made)
        if isinstance(err, OSError) and err.errno == errno.EFBIG:
            raise VolumeError(f"cannot create {name} of {size} bytes: too large for the file "
                              "system holding it; choose a smaller size or another file "
                              "system") from None
        if isinstance(err, (OSError, OverflowError)):
            raise VolumeError(f"cannot create {name} of {size} bytes: "
                              f"{getattr(err, 'strerror', None) or err}") from None
        raise
    os.close(fd)
    return made


def remove_created(path: str | os.PathLike[str], made: tuple[int, int]) -> None:
    """Remove the file `create_image` made at `path`, if `path` is still that file."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if (st.st_dev, st.st_ino) == made:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
