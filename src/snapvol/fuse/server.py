"""Running one mount: the volume's owner (`snapvol.daemon.owner`) with FUSE plugged in.

This module holds only what attaches FUSE to the owner (`FuseFront`): pyfuse3's init and
main loop on the owner's trio loop, the readahead window set once the kernel's INIT is
over, a read-only mount's `follow` task (a root check every FOLLOW_INTERVAL seconds, see
fuse.follow; its kernel notifications go from a worker thread that does not touch the
engine), and the control operations only a mount answers: `unmount`, `refresh`, and
`snap_delete` / `snap_rename` the way `.snapshot` does them (refused while files of the
snapshot are open; the kernel forgets the old name). The owner runs every FUSE handler
and every control request on its loop, one at a time (see daemon/owner.py for the
threads and where long work runs).

Stopping: an `unmount` request is refused while the mount is in use (open handles, or the
kernel's own refusal of a plain unmount: a working directory, a mapped file); otherwise
the kernel unmounts it, which ends the FUSE loop. SIGTERM, SIGINT, SIGHUP, `stop` and a
forced `unmount` commit a CP and end the FUSE loop whatever uses the mount; an external
`fusermount3 -u` ends it too. Then the handles the kernel left open are released, the
volume is closed with a last CP, the mount point is detached if it is still mounted
(lazily, so a busy mount point cannot keep the process alive) and the registry entry and
socket are removed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

from snapvol.control import mounttable, registry
from snapvol.control.ops import (
    REFRESH,
    SNAP_DELETE,
    SNAP_RENAME,
    UNMOUNT,
    Exchange,
    Handler,
    NoArgs,
    Op,
    SnapName,
    SnapRename,
    Unmount,
)
from snapvol.control.protocol import EBUSY, ControlError
from snapvol.daemon import owner as owner_process
from snapvol.daemon.owner import OWNER_DIRTY_LIMIT, Owner
from snapvol.engine.volume import Volume, check_cp_interval
from snapvol.errors import SnapvolError
from snapvol.fuse import follow, readahead
from snapvol.fuse.operations import SnapvolOperations

log = logging.getLogger("snapvol.fuse")

RELEASE_WAIT = 1.0
"""How long an unmount waits for the kernel's RELEASE of files closed just before it,
which come after the close() returned."""
MOUNT_DIRTY_LIMIT = OWNER_DIRTY_LIMIT
"""Data a mount collects before it starts a CP (the owner's limit, daemon/owner.py)."""
KERNEL_FLAGS = frozenset({"nosuid", "nodev", "noexec"})
"""Mount flags passed through libfuse to the kernel, which applies them to the mount point
as it does for any file system (`mount.fuse.snapvol` takes them from an fstab line)."""


class MountError(SnapvolError):
    """The mount could not be set up."""


class FuseFront:
    """The FUSE front end of an owner: `SnapvolOperations` served on the owner's loop."""

    def __init__(self, mountpoint: str, vol: Volume, ops: SnapvolOperations,
                 readahead_kib: int) -> None:
        self.mountpoint, self.vol, self.ops = mountpoint, vol, ops
        self.readahead_kib = readahead_kib
        self.owner: Owner | None = None
        self._refresh_error = ""
        self._refreshing = trio.Lock()  # one refresh (and its notifications) at a time

    # ---- the Front protocol ----------------------------------------------------------------
    def bindings(self, owner: Owner) -> list[tuple[Op[Any], Handler]]:
        self.owner = owner
        return [(UNMOUNT, self.unmount), (REFRESH, self.refresh_request),
                (SNAP_DELETE, self.snap_delete), (SNAP_RENAME, self.snap_rename)]

    async def serve(self, owner: Owner, nursery: trio.Nursery,
                    ready: Callable[[], None]) -> None:
        if not self.vol.writable:
            nursery.start_soon(self.follow)
        nursery.start_soon(self.announce, ready)
        await pyfuse3.main()

    def terminate(self) -> None:
        pyfuse3.terminate()

    def release(self) -> None:
        self.ops.close_handles()

    def detach(self) -> None:
        pyfuse3.close(unmount=True)

    # ---- the operations only a mount answers -----------------------------------------------
    async def snap_delete(self, req: SnapName, ex: Exchange) -> dict[str, Any]:
        return {"freed_blocks": self.ops.delete_snapshot(req.name)}

    async def snap_rename(self, req: SnapRename, ex: Exchange) -> dict[str, Any]:
        self.ops.rename_snapshot(req.old, req.new)
        return {"name": req.new}

    async def unmount(self, req: Unmount, ex: Exchange) -> dict[str, Any]:
        """The `unmount` request. Without `force`, refused (code EBUSY) while a file or
        directory is open in the mount, or while the kernel finds it in use (a working
        directory in it, a mapped file); otherwise the kernel unmounts it now, which ends
        the FUSE loop. With `force`, or once unmounted: a CP, then the loop ends, and the
        lazy detach after the last CP (`detach`) leaves programs that still use it
        ENOTCONN. Shielded: once the kernel has unmounted, the FUSE loop ends and the
        owner's nursery is cancelled, but the CP and the answer must still happen."""
        assert self.owner is not None
        with trio.CancelScope(shield=True):
            if not req.force and not self.owner.stopping:
                await self._unmount_now()
            self.owner.stop("unmount requested")
        return {"pid": os.getpid()}

    async def _unmount_now(self) -> None:
        deadline = trio.current_time() + RELEASE_WAIT
        while self.ops.handles.all() and trio.current_time() < deadline:
            await trio.sleep(0.01)  # a closed file's RELEASE comes after close()
        held = self.ops.handles.items()
        if held:
            dirs = sum(1 for _, h in held if h.is_dir or h.snap_id < 0)  # < 0: .snapshot
            files = len(held) - dirs
            what = ", ".join(f"{n} {word}{'s' if n > 1 else ''}" for n, word in
                             ((files, "open file"), (dirs, "open directory")) if n)
            raise ControlError(f"{self.mountpoint} is busy: {what} in it", code=EBUSY)
        why = await trio.to_thread.run_sync(mounttable.unmount, self.mountpoint)
        if why is not None:
            busy = "busy" in why.lower()
            raise ControlError(f"{self.mountpoint} is busy: {why}" if busy else
                               f"cannot unmount {self.mountpoint}: {why}",
                               code=EBUSY if busy else None)

    async def refresh_request(self, req: NoArgs, ex: Exchange) -> dict[str, Any]:
        return {"changed": await self.refresh(), "cp_count": self.vol.root.cp_count}

    async def refresh(self) -> bool:
        """Load the image's newer root, if a receive committed one, and make the kernel
        forget what it cached of the old one (fuse.follow). Whether the root changed."""
        ops = self.ops
        if self.vol.writable or ops.refs is None:
            return False  # the mount is the only writer: nothing to follow
        async with self._refreshing:
            return await self._refresh()

    async def _refresh(self) -> bool:
        ops = self.ops
        assert ops.refs is not None
        try:
            work = follow.refresh(follow.FollowState(ops.active, ops.snaps, ops.handles,
                                                     ops.refs))
        except SnapvolError as e:
            if str(e) != self._refresh_error:  # once per distinct problem, not per tick
                log.warning("cannot load the image's new root yet: %s", e)
                self._refresh_error = str(e)
            return False
        self._refresh_error = ""
        if work is None:
            return False
        log.info("following %s: now at CP %d", self.vol.path, self.vol.root.cp_count)
        ops.settling_all = work.changed is None
        ops.settling = frozenset(work.changed or ())
        try:
            # Abandoned if the mount stops meanwhile: notifications to a session that is
            # ending may wait for requests nobody will answer.
            await trio.to_thread.run_sync(work.apply, abandon_on_cancel=True)
        finally:
            ops.settling, ops.settling_all = frozenset(), False
        return True

    # ---- tasks -----------------------------------------------------------------------------
    async def follow(self) -> None:
        """A read-only mount checks for a new root every FOLLOW_INTERVAL seconds."""
        while True:
            await trio.sleep(follow.FOLLOW_INTERVAL)
            try:
                await self.refresh()
            except Exception:  # a bug here must not end the mount; the next tick retries
                log.exception("refresh failed")

    async def announce(self, ready: Callable[[], None]) -> None:
        """Call `ready` once the kernel's INIT exchange is over, after widening the
        readahead window (fuse.readahead): a file opened before that would keep the
        kernel's window. A mount that cannot widen it (not root) keeps the kernel's."""
        while not self.ops.initialized:
            await trio.sleep(0.002)
        if self.readahead_kib:
            why = readahead.set_window(self.mountpoint, self.readahead_kib)
            if why is None:
                log.info("readahead window %d KiB", self.readahead_kib)
            else:
                log.info("kept the kernel's readahead window: %s", why)
        ready()


def check_mount(image: str, mountpoint: str, cp_interval: float | None = None,
                readahead_kib: int = readahead.DEFAULT_KIB) -> tuple[str, str]:
    """Refuse a mount that cannot work, before anything is opened (`snapvol mount` asks
    before it forks the mount process, so a refusal is the user's error line and never
    the log's): the options, the mount point (a directory, not mounted, not a stale
    mount) and the image (not mounted elsewhere). The image and mount point resolved."""
    image = os.path.abspath(image)
    mountpoint = os.path.realpath(mountpoint)
    if cp_interval is not None:
        check_cp_interval(cp_interval)
    readahead.check_kib(readahead_kib)
    stale = registry.find_stale(mountpoint)
    if stale is not None:
        whose = "" if stale.image is None else f"of {stale.image}: "
        pid = "" if stale.pid is None else f" {stale.pid}"
        raise MountError(f"{mountpoint} is a stale snapvol mount ({whose}its mount process"
                         f"{pid} is gone); clear it with `snapvol unmount {mountpoint}`")
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} is not a directory: create it first")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point: unmount it first")
    other = registry.find_image(image)
    if other is not None:
        if not other.mountpoint:
            raise MountError(f"{image} is owned by process {other.pid} without a mount: "
                             f"stop it first")
        raise MountError(f"{image} is already mounted on {other.mountpoint} "
                         f"(process {other.pid})")
    return image, mountpoint


def _fsname(image: str) -> str:
    """The image's path as the mount's source (`df`, /proc/mounts), so `mount -a` and
    systemd see an fstab line's mount as made (libfuse splits options at commas: escaped);
    plain "snapvol" for a path that is not UTF-8."""
    try:
        image.encode()
    except UnicodeEncodeError:
        return "snapvol"
    return image.replace("\\", "\\\\").replace(",", "\\,")


def serve(image: str, mountpoint: str, *, read_only: bool = False,
          cp_interval: float | None = None, allow_other: bool = False,
          readahead_kib: int = readahead.DEFAULT_KIB, kernel_flags: frozenset[str] = frozenset(),
          log_to: str = "", ready: Callable[[], None] = lambda: None) -> None:
    """Mount `image` on `mountpoint` and serve it until unmounted or signalled: the
    owner of the image with FUSE plugged in. `ready` is called once the mount answers
    requests. `readahead_kib` is the kernel's readahead window for the mount's files
    (0: the kernel's default). `kernel_flags` are mount flags the kernel applies to the
    mount point (nosuid, nodev, noexec: KERNEL_FLAGS). `log_to` says where this process
    logs, for `snapvol mounts` (the caller set it up)."""
    image, mountpoint = check_mount(image, mountpoint, cp_interval, readahead_kib)

    def attach(vol: Volume) -> FuseFront:
        ops = SnapvolOperations(vol)
        options = set(pyfuse3.default_options) | {f"fsname={_fsname(image)}",
                                                   "subtype=snapvol"}
        options |= KERNEL_FLAGS.intersection(kernel_flags)
        if read_only:
            options.add("ro")
        if allow_other:
            options.add("allow_other")
        try:
            pyfuse3.init(ops, mountpoint, options)
        except RuntimeError as e:
            raise MountError(f"cannot mount on {mountpoint}: {e} (is /dev/fuse usable, and "
                             "for --allow-other, user_allow_other in /etc/fuse.conf?)") from None
        return FuseFront(mountpoint, vol, ops, readahead_kib)

    owner_process.serve(image, read_only=read_only, cp_interval=cp_interval, front=attach,
                        log_to=log_to, ready=ready)
