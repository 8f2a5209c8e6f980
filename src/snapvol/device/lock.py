"""The advisory lock that makes one process the owner of a writable volume.

POSIX record locks (fcntl F_SETLK on byte 0) are used rather than flock because F_GETLK
reports the PID of the holder, so a refusal can say which process to stop. A writer takes
an exclusive (write) lock, a reader a shared (read) lock; the kernel drops either when the
process dies, so a crashed owner never leaves a stale lock behind.

POSIX locks belong to the process, not to the descriptor: a second open of the same image
in the same process would be granted silently, and closing any descriptor of the image
drops the process's lock. A process-wide registry keyed by (st_dev, st_ino) therefore
refuses a second open in this process unless both are shared. Even then the readers share
one kernel lock, which goes away when the first of their descriptors closes; so within a
process, close readers together or not rely on the lock to keep a writer out meanwhile.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
from dataclasses import dataclass

from snapvol.errors import LockedError

# struct flock on Linux x86_64 and aarch64: short l_type, short l_whence, (pad to 8),
# off_t l_start, off_t l_len, pid_t l_pid, (pad to 8). Native alignment supplies the
# inner padding; "4x" the tail.
FLOCK_FORMAT = "hhqqi4x"
FLOCK_SIZE = struct.calcsize(FLOCK_FORMAT)


def pack_flock(lock_type: int, start: int = 0, length: int = 1, pid: int = 0) -> bytes:
    """The bytes of a struct flock covering `length` bytes from `start` (SEEK_SET)."""
    return struct.pack(FLOCK_FORMAT, lock_type, os.SEEK_SET, start, length, pid)


def unpack_flock(data: bytes) -> tuple[int, int, int, int, int]:
    """(l_type, l_whence, l_start, l_len, l_pid) of a struct flock."""
    fields: tuple[int, int, int, int, int] = struct.unpack(FLOCK_FORMAT, data)
    return fields


@dataclass(slots=True)
class _Holding:
    """This process's hold on one image: its mode and how many VolumeLocks share it."""

    exclusive: bool
    users: int


_registry: dict[tuple[int, int], _Holding] = {}
_registry_guard = threading.Lock()


class VolumeLock:
    """A held lock on an image; `release()` gives it up (twice is harmless)."""

    def __init__(self, fd: int, path: str, key: tuple[int, int], exclusive: bool) -> None:
        self.fd = fd
        self.path = path
        self.exclusive = exclusive
        self._key = key
        self._held = True

    @classmethod
    def acquire(cls, fd: int, path: str, exclusive: bool) -> VolumeLock:
        """Lock the image open on `fd` (read-write for exclusive, readable for shared).

        Raises LockedError naming the holder when another process holds a conflicting lock,
        or when this process already has the image open (unless both opens are shared).
        """
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with _registry_guard:
            holding = _registry.get(key)
            if holding is not None:
                if holding.exclusive or exclusive:
                    raise LockedError(f"{path} is already open in this process")
                holding.users += 1
                return cls(fd, path, key, exclusive)
            _set_lock(fd, path, fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK)
            _registry[key] = _Holding(exclusive, 1)
            return cls(fd, path, key, exclusive)

    def release(self) -> None:
        """Give up this hold; the kernel lock goes when the last hold in the process does."""
        with _registry_guard:
            if not self._held:
                return
            self._held = False
            holding = _registry[self._key]
            holding.users -= 1
            if holding.users:
                return
            del _registry[self._key]
            try:
                fcntl.fcntl(self.fd, fcntl.F_SETLK, pack_flock(fcntl.F_UNLCK))
            except OSError as err:
                # Closing the descriptor already dropped the lock.
                if err.errno != errno.EBADF:
                    raise

    @property
    def held(self) -> bool:
        return self._held

    def __repr__(self) -> str:
        mode = "exclusive" if self.exclusive else "shared"
        state = "held" if self._held else "released"
        return f"VolumeLock({self.path!r}, {mode}, {state})"


def _set_lock(fd: int, path: str, lock_type: int) -> None:
    """Take the kernel lock without waiting, or raise LockedError naming the holder."""
    for _ in range(3):
        try:
            fcntl.fcntl(fd, fcntl.F_SETLK, pack_flock(lock_type))
            return
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
        holder = holder_pid(fd, lock_type)
        if holder is not None:
            raise LockedError(_in_use_message(path, holder))
        # The holder let go between our two calls; try again.
    raise LockedError(f"{path} is in use by another process")


def holder_pid(fd: int, lock_type: int = fcntl.F_WRLCK) -> int | None:
    """The PID of a process whose lock on byte 0 conflicts with `lock_type`, if any.

    0 means a holder the kernel cannot name (another PID namespace or a remote host).
    """
    answer = fcntl.fcntl(fd, fcntl.F_GETLK, pack_flock(lock_type))
    found_type, _whence, _start, _len, pid = unpack_flock(answer)
    return None if found_type == fcntl.F_UNLCK else pid


def _in_use_message(path: str, pid: int) -> str:
    if pid <= 0:
        return f"{path} is in use by another process"
    command = _command_line(pid)
    suffix = f" ({command})" if command else ""
    return f"{path} is in use by process {pid}{suffix}"


def _command_line(pid: int, limit: int = 120) -> str:
    """The process's command line, shortened, or "" when /proc does not say."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return ""
    words = [w.decode(errors="replace") for w in raw.split(b"\0") if w]
    if not words:
        return ""
    # "/venv/bin/python3 /venv/bin/snapvol mount x" reads better as "snapvol mount x".
    interpreter = os.path.basename(words[0]).startswith("python")
    if interpreter and len(words) > 1 and not words[1].startswith("-"):
        words = words[1:]
    words[0] = os.path.basename(words[0])
    text = " ".join(" ".join(words).split())  # one line, whatever the arguments hold
    return text if len(text) <= limit else text[: limit - 3] + "..."
