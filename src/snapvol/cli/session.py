"""Opening a volume for one command, and leaving it as it was when the command fails.

A command that changes the volume opens it writable (the exclusive lock); one that only
reads opens it read-only (a shared lock), so several readers can run side by side.

On success the volume is closed with a final CP. On failure nothing half-done may reach the
image: if the command committed no CP of its own, its changes are dropped (`abandon`, the
last committed CP stays); if it had to commit part way (a long copy passes the dirty-data
limit or the CP timer), it has already undone its work (put removes what it made) and the
undo is committed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from snapvol.control import registry
from snapvol.engine.volume import Volume
from snapvol.errors import LockedError, SnapvolError


@contextlib.contextmanager
def open_volume(image: str, *, writable: bool, for_check: bool = False) -> Iterator[Volume]:
    """`for_check`: fsck's read-only open, which a damaged plane or table does not stop."""
    try:
        vol = Volume.open(image, writable=writable, for_check=for_check)
    except LockedError:
        live = registry.find_image(image)
        if live is None:
            raise
        if not live.mountpoint:
            raise LockedError(f"{image} is owned by process {live.pid} (a snapvol owner "
                              "without a mount): stop it first") from None
        raise LockedError(f"{image} is mounted on {live.mountpoint} (process {live.pid}): "
                          f"work in the mount, or run `snapvol unmount {live.mountpoint}` "
                          "first") from None
    first_cp = vol.root.cp_count
    try:
        yield vol
    except BaseException:
        _after_failure(vol, first_cp)
        raise
    vol.close()


def _after_failure(vol: Volume, first_cp: int) -> None:
    if not vol.writable:
        vol.close()
        return
    if vol.root.cp_count != first_cp:
        try:
            vol.close()
            return
        except SnapvolError:
            pass  # the original error is the one to report; the last CP stands
    vol.abandon()
    vol.dev.close()
