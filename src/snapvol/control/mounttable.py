"""What the kernel knows about mounts: the mount table, dead FUSE connections, which
processes use a mount (what `fuser -m` shows), and unmounting.

A mount whose process died (SIGKILL) stays in the mount table, and every request to it
fails with ENOTCONN: `os.path.ismount` and `os.path.isdir` are then false, so such a
mount is found here by its entry in /proc/self/mountinfo, never by asking the path.
Nothing here sends the mount a request except `stat` calls with a deadline, so these
functions work on a dead or hung mount too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
FSTYPE = "fuse.snapvol"
STAT_DEADLINE = 2.0
"""How long a `stat` of a mount point may take before the mount counts as not answering."""


@dataclass(frozen=True, slots=True)
class KernelMount:
    """One line of mountinfo."""

    mount_id: int
    device: tuple[int, int]  # major, minor
    mountpoint: str
    fstype: str
    options: tuple[str, ...]  # the super block's options (user_id=0, ...)

    def option(self, name: str) -> str | None:
        for option in self.options:
            key, _, value = option.partition("=")
            if key == name:
                return value
        return None


def _unescape(field: str) -> str:
    """A mountinfo path field: spaces, tabs, newlines and backslashes are octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def read(mountinfo: str = MOUNTINFO) -> list[KernelMount]:
    """Every mount in `mountinfo`, in its order (a later mount on a path covers earlier)."""
    out = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.rstrip("\n").split(" ")
            try:
                dash = fields.index("-", 6)
                major, minor = fields[2].split(":")
                out.append(KernelMount(int(fields[0]), (int(major), int(minor)),
                                       _unescape(fields[4]), fields[dash + 1],
                                       tuple(fields[dash + 3].split(","))))
            except (ValueError, IndexError):
                continue  # not a mount line this reader understands
    return out


def find(mountpoint: str, mountinfo: str = MOUNTINFO) -> KernelMount | None:
    """The mount on `mountpoint` (resolved already), the last one there; None if none."""
    found = None
    for mount in read(mountinfo):
        if mount.mountpoint == mountpoint:
            found = mount
    return found


def _stat(path: str, deadline: float) -> os.stat_result | OSError | None:
    """`os.stat(path)`, its error, or None if it did not answer within `deadline` (a hung
    mount: the thread is left to finish on its own)."""
    result: list[os.stat_result | OSError] = []

    def probe() -> None:
        try:
            result.append(os.stat(path))
        except OSError as e:
            result.append(e)

    thread = threading.Thread(target=probe, name="snapvol-stat-probe", daemon=True)
    thread.start()
    thread.join(deadline)
    return result[0] if result else None


def not_connected(mountpoint: str, deadline: float = STAT_DEADLINE) -> bool:
    """Whether the FUSE mount on `mountpoint` lost its process: `stat` fails with ENOTCONN
    (or ECONNABORTED). A mount that answers, or does not answer within `deadline`, is not
    called dead: only a closed connection is certain."""
    st = _stat(mountpoint, deadline)
    return isinstance(st, OSError) and st.errno in (errno.ENOTCONN, errno.ECONNABORTED)


def owned_by_caller(mount: KernelMount) -> bool:
    """Root may unmount any mount; a user only the FUSE mounts made as that user."""
    uid = os.geteuid()
    return uid == 0 or mount.option("user_id") == str(uid)


def unmount(mountpoint: str, lazy: bool = False) -> str | None:
    """Unmount the FUSE mount on `mountpoint` with fusermount3 (a lazy detach if `lazy`,
    else the kernel refuses while the mount is in use). None when done, else why not
    (fusermount3's own message, e.g. "Device or resource busy")."""
    try:
        done = subprocess.run(["fusermount3", "-u", *(["-z"] if lazy else []),
                               mountpoint], capture_output=True, text=True, check=False,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"fusermount3: {e}"
    if done.returncode == 0:
        return None
    text = done.stderr.strip().splitlines()
    return text[-1] if text else f"fusermount3 exited with {done.returncode}"


@dataclass(frozen=True, slots=True)
class User:
    """A process that keeps a mount busy, and how."""

    pid: int
    command: str
    uses: tuple[str, ...]

    def describe(self) -> str:
        return f"process {self.pid} ({self.command}) {' and '.join(self.uses)}"


def users(mount: KernelMount, exclude: frozenset[int] = frozenset(),
          proc: str = "/proc") -> list[User]:
    """The processes with an open file, a mapped file, the working directory or the root
    directory in `mount`, as `fuser -m` finds them (only those this user may inspect).
    Open files are matched by their mount id (fdinfo), mapped files by their device, and
    directories by path, confirmed by device."""
    inside = mount.mountpoint.rstrip("/") + "/"

    def under(path: str) -> bool:
        return path == mount.mountpoint or path.startswith(inside)

    out = []
    for name in os.listdir(proc):
        if not name.isdigit() or int(name) in exclude:
            continue
        pid, base = int(name), os.path.join(proc, name)
        uses = []
        with contextlib.suppress(OSError):
            nfiles = _open_files(base, mount.mount_id, under)
            if nfiles:
                uses.append(f"has {nfiles} open file{'s' if nfiles > 1 else ''} in it")
        with contextlib.suppress(OSError):
            if _maps_device(base, mount.device):
                uses.append("maps a file of it")
        for link, what in (("cwd", "works in it"), ("root", "has its root in it")):
            with contextlib.suppress(OSError):
                if under(os.readlink(os.path.join(base, link))) and _same_device(
                        os.path.join(base, link), mount.device):
                    uses.append(what)
        if uses:
            try:
                with open(os.path.join(base, "comm"), encoding="utf-8",
                          errors="replace") as f:
                    command = f.read().strip()
            except OSError:
                command = "?"
            out.append(User(pid, command, tuple(uses)))
    return sorted(out, key=lambda u: u.pid)


def _open_files(base: str, mount_id: int, under: Callable[[str], bool]) -> int:
    count = 0
    fds = os.path.join(base, "fd")
    for fd in os.listdir(fds):
        try:
            if not under(os.readlink(os.path.join(fds, fd))):
                continue
            with open(os.path.join(base, "fdinfo", fd), encoding="ascii",
                      errors="replace") as f:
                for line in f:
                    if line.startswith("mnt_id:") and int(line.split()[1]) == mount_id:
                        count += 1
                        break
        except (OSError, ValueError, IndexError):
            continue  # closed meanwhile
    return count


def _maps_device(base: str, device: tuple[int, int]) -> bool:
    with open(os.path.join(base, "maps"), encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[4] != "0":
                major, _, minor = fields[3].partition(":")
                with contextlib.suppress(ValueError):
                    if (int(major, 16), int(minor, 16)) == device:
                        return True
    return False


def _same_device(link: str, device: tuple[int, int]) -> bool:
    """Whether the directory `link` points at is on `device`; a directory that cannot be
    looked at (the mount does not answer) counts as on it."""
    st = _stat(link, STAT_DEADLINE)
    return not isinstance(st, os.stat_result) or (os.major(st.st_dev),
                                                  os.minor(st.st_dev)) == device
