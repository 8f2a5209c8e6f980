"""How far the kernel reads ahead in a mount's files.

The kernel reads a FUSE file sequentially in requests as large as the mount's readahead
window, and gives a new mount the default window of 128 KiB (it only lets the FUSE INIT
reply shrink it). Each request costs a round trip through /dev/fuse and the handler's fixed
work, so for large sequential reads that window, not the disk, sets the pace: through a
snapvol mount, 1 GiB read in 1 MiB calls (the image in the page cache) went from 550-730
to 1,450-1,700 MiB/s on the development machine with a 1 MiB window. The window is the
backing device's `read_ahead_kb` in sysfs, which root may raise once the INIT exchange is
over; elsewhere it stays as the kernel set it.
"""

from __future__ import annotations

import os

from snapvol.control import mounttable
from snapvol.errors import SnapvolError

DEFAULT_KIB = 1024
"""The window a mount asks for: one request of the largest size FUSE sends (max_pages)."""
MAX_KIB = 64 << 10
"""A larger window only holds more memory in flight per reader."""


def check_kib(kib: int) -> int:
    """`kib` if it is a window a mount may ask for; SnapvolError naming the range."""
    if not 0 <= kib <= MAX_KIB:
        raise SnapvolError(f"--readahead {kib}: must be 0 (the kernel's default) to "
                           f"{MAX_KIB} KiB")
    return kib


def device_of(mountpoint: str, mountinfo: str = mounttable.MOUNTINFO) -> str | None:
    """The `major:minor` of the file system mounted on `mountpoint` (read from mountinfo,
    so nothing is asked of the mount itself, whose own process may be the caller); the
    last mount there wins. None if nothing is mounted there."""
    found = mounttable.find(mountpoint, mountinfo)
    return None if found is None else f"{found.device[0]}:{found.device[1]}"


def set_window(mountpoint: str, kib: int, sysfs: str = "/sys/class/bdi") -> str | None:
    """Set the readahead window of the mount on `mountpoint` to `kib` KiB. None once done;
    otherwise why not (no permission, no such mount), for the log: the mount works either
    way, with smaller read requests. `mountpoint` must be resolved already (realpath before
    mounting): resolving it now could ask the mount, whose own process may be the caller."""
    device = device_of(mountpoint)
    if device is None:
        return f"nothing is mounted on {mountpoint}"
    path = os.path.join(sysfs, device, "read_ahead_kb")
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(f"{kib}\n")
    except OSError as e:
        return f"cannot write {path}: {e.strerror}"
    return None
