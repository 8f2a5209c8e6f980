"""Running one mount: the FUSE session, the control socket and the signals, on one trio loop.

Threads: the trio thread runs every FUSE handler and every control request, one at a time,
calling the engine synchronously; the engine's CP timer thread (`Volume.start_cp_timer`)
is the only other thread, and `Volume.mutex` orders it against the trio thread. A request
that waits long does it off the loop: an fsync waits for its CP on a worker thread, and
an online fsck checks the committed root in a process of its own (fuse/checker.py,
reading only blocks that the volume holds for it), so other requests go on meanwhile. A read-only
mount also runs `follow` (a root check every FOLLOW_INTERVAL seconds, see fuse.follow);
its kernel notifications go from a worker thread that does not touch the engine.

Stopping: an `unmount` request is refused while the mount is in use (open handles, or the
kernel's own refusal of a plain unmount: a working directory, a mapped file); otherwise
the kernel unmounts it, which ends the FUSE loop. SIGTERM, SIGINT, SIGHUP and a forced
`unmount` commit a CP and end the FUSE loop whatever uses the mount; an external
`fusermount3 -u` ends it too. Then the handles the kernel left open are released, the
volume is closed with a last CP, the mount point is detached if it is still mounted
(lazily, so a busy mount point cannot keep the process alive) and the registry entry and
socket are removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

from snapvol.engine import fsck, snapshots
from snapvol.engine.volume import Volume, check_cp_interval
from snapvol.errors import SnapvolError
from snapvol.fuse import follow, mounttable, readahead, registry
from snapvol.fuse.control import (
    MAX_MESSAGE,
    ControlError,
    decode,
    encode,
    volume_facts,
)
from snapvol.fuse.operations import SnapvolOperations

log = logging.getLogger("snapvol.fuse")

REQUEST_TIMEOUT = 10.0
RELEASE_WAIT = 1.0
"""How long an unmount waits for the kernel's RELEASE of files closed just before it,
which come after the close() returned."""
MOUNT_DIRTY_LIMIT = 64 << 20
"""Data a mount collects before it starts a CP. CPs are written in the background, so up
to twice this is held: one CP on its way to disk and the next one collecting. A smaller
set of request buffers is reused sooner (new memory costs a page fault per 4 KiB, which
on a virtual machine can cost more than the data's copy), and each CP is short."""
KERNEL_FLAGS = frozenset({"nosuid", "nodev", "noexec"})
"""Mount flags passed through libfuse to the kernel, which applies them to the mount point
as it does for any file system (`mount.fuse.snapvol` takes them from an fstab line)."""


class MountError(SnapvolError):
    """The mount could not be set up."""


class _Mount:
    def __init__(self, image: str, mountpoint: str, vol: Volume, ops: SnapvolOperations,
                 sock: str, readahead_kib: int, log_to: str) -> None:
        self.image, self.mountpoint, self.vol, self.ops, self.sock = (
            image, mountpoint, vol, ops, sock)
        self.readahead_kib = readahead_kib
        self.log_to = log_to
        self.stopping = False
        self._refresh_error = ""
        self._refreshing = trio.Lock()  # one refresh (and its notifications) at a time

    def stop(self, why: str) -> None:
        """Commit what is dirty, then end the FUSE loop (the unmount follows)."""
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping: %s", why)
        try:
            if self.vol.writable:
                self.vol.cp()
        except SnapvolError as e:
            # Stop anyway: closing the volume tries the CP once more and reports it.
            log.error("CP before unmounting failed: %s", e)
        pyfuse3.terminate()

    def dispatch(self, op: str, args: dict[str, Any]) -> Any:
        vol = self.vol
        if op == "ping":
            return {"pid": os.getpid(), "mountpoint": self.mountpoint}
        if op == "info":
            with vol.mutex:
                return volume_facts(vol, self.image)
        if op == "snap_create":
            source = args.get("source")
            entry = snapshots.create(vol, str(args["name"]), shadow=bool(args.get("shadow")),
                                     source=None if source is None else str(source))
            return {"name": entry.name, "cp_count": entry.cp_count}
        if op == "snap_delete":
            return {"freed_blocks": self.ops.delete_snapshot(str(args["name"]))}
        if op == "snap_rename":
            self.ops.rename_snapshot(str(args["old"]), str(args["new"]))
            return {"name": str(args["new"])}
        if op == "snap_list":
            return [dataclasses.asdict(i) for i in snapshots.infos(vol)]
        raise SnapvolError(f"unknown control request {op!r}")

    async def unmount(self, force: bool) -> dict[str, Any]:
        """The `unmount` request. Without `force`, refused (code EBUSY) while a file or
        directory is open in the mount, or while the kernel finds it in use (a working
        directory in it, a mapped file); otherwise the kernel unmounts it now, which ends
        the FUSE loop. With `force`, or once unmounted: a CP, then the loop ends, and the
        lazy detach after the last CP (`serve`) leaves programs that still use it ENOTCONN."""
        if not force and not self.stopping:
            deadline = trio.current_time() + RELEASE_WAIT
            while self.ops.handles.all() and trio.current_time() < deadline:
                await trio.sleep(0.01)  # a closed file's RELEASE comes after close()
            held = self.ops.handles.items()
            if held:
                dirs = sum(1 for _, h in held if h.is_dir or h.snap_id < 0)  # < 0: .snapshot
                files = len(held) - dirs
                what = ", ".join(f"{n} {word}{'s' if n > 1 else ''}" for n, word in
                                 ((files, "open file"), (dirs, "open directory")) if n)
                raise ControlError(f"{self.mountpoint} is busy: {what} in it", code="EBUSY")
            why = await trio.to_thread.run_sync(mounttable.unmount, self.mountpoint)
            if why is not None:
                busy = "busy" in why.lower()
                raise ControlError(f"{self.mountpoint} is busy: {why}" if busy else
                                   f"cannot unmount {self.mountpoint}: {why}",
                                   code="EBUSY" if busy else None)
        self.stop("unmount requested")
        return {"pid": os.getpid()}

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
        log.info("following %s: now at CP %d", self.image, self.vol.root.cp_count)
        ops.settling_all = work.changed is None
        ops.settling = frozenset(work.changed or ())
        try:
            # Abandoned if the mount stops meanwhile: notifications to a session that is
            # ending may wait for requests nobody will answer.
            await trio.to_thread.run_sync(work.apply, abandon_on_cancel=True)
        finally:
            ops.settling, ops.settling_all = frozenset(), False
        return True

    async def fsck(self, args: dict[str, Any]) -> dict[str, Any]:
        """The online check (`fsck --online`): commit what is dirty, waiting for the disk
        off the event loop as an fsync does, then check that committed root in a process
        of its own (fuse/checker.py) while requests go on here. Meanwhile the volume holds
        the root's blocks against reuse (`Volume.hold_committed`); the checker reads
        them on its own descriptor, `share` of the time (engine/fsck.py, ONLINE_SHARE by
        default). If the mount stops first, the checker is killed."""
        vol = self.vol
        share = float(args.get("share", fsck.ONLINE_SHARE))
        if not 0 < share <= 1:
            raise SnapvolError(f"--share {share}: must be more than 0 and at most 1")
        if vol.writable:
            target = vol.sync_target()
            while (writer := vol.sync_step(target)) is not None:
                await trio.to_thread.run_sync(writer.join)
        started = time.monotonic()
        argv = [sys.executable, "-m", "snapvol.fuse.checker", self.image, repr(share)]
        running: list[subprocess.Popen[bytes]] = []
        with vol.hold_committed() as root:
            log.info("online check of CP %d started", root.cp_count)
            try:
                # Started and waited for on a worker thread: starting a process stops
                # the thread that starts it for a moment, which must not be the loop's.
                code, out, err = await trio.to_thread.run_sync(
                    _run_checker, argv, root.encode(), running, abandon_on_cancel=True)
            finally:
                for proc in running:  # cancelled (the mount stops): before the hold ends
                    if proc.poll() is None:
                        proc.kill()
        if code != 0:
            why = err.decode(errors="replace").strip().splitlines()
            raise SnapvolError(f"the online check of {self.image} failed: "
                               f"{why[-1] if why else f'exit {code}'}")
        result: dict[str, Any] = json.loads(out)
        log.info("online check of CP %d: %s in %.1f s", root.cp_count,
                 "clean" if result["clean"] else f"{len(result['problems'])} problem(s)",
                 time.monotonic() - started)
        return result

    async def follow(self) -> None:
        """A read-only mount checks for a new root every FOLLOW_INTERVAL seconds."""
        while True:
            await trio.sleep(follow.FOLLOW_INTERVAL)
            try:
                await self.refresh()
            except Exception:  # a bug here must not end the mount; the next tick retries
                log.exception("refresh failed")

    async def handle(self, stream: trio.SocketStream) -> None:
        data = b""
        with trio.move_on_after(REQUEST_TIMEOUT):
            while not data.endswith(b"\n") and len(data) <= MAX_MESSAGE:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
        try:
            request = decode(data)
            args = request.get("args") or {}
            if request.get("op") == "refresh":  # async: the kernel is told from a thread
                result: Any = {"changed": await self.refresh(),
                               "cp_count": self.vol.root.cp_count}
            elif request.get("op") == "unmount":  # async: releases come in meanwhile
                # Shielded: once the kernel has unmounted, the FUSE loop ends and the
                # nursery is cancelled, but the CP and the answer must still happen.
                with trio.CancelScope(shield=True):
                    result = await self.unmount(force=bool(args.get("force")))
            elif request.get("op") == "fsck":  # async: the check runs on a worker thread
                result = await self.fsck(dict(args))
            else:
                result = self.dispatch(str(request.get("op")), dict(args))
            answer = {"ok": True, "result": result}
        except ControlError as e:
            answer = {"ok": False, "error": str(e), "code": e.code}
        except SnapvolError as e:
            answer = {"ok": False, "error": str(e)}
        except (ValueError, KeyError, TypeError) as e:
            answer = {"ok": False, "error": f"bad control request: {e}"}
        except Exception as e:
            log.exception("control request failed")
            answer = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
        with trio.CancelScope(shield=True, deadline=trio.current_time() + REQUEST_TIMEOUT):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(encode(answer))
            await stream.aclose()

    async def signals(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                      ) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            task_status.started()
            async for signum in sigs:
                self.stop(signal.Signals(signum).name)

    async def control(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                      ) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)
        await sock.bind(self.sock)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(self.handle, [listener])

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

    async def run(self, ready: Callable[[], None]) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.signals)
            await nursery.start(self.control)
            if not self.vol.writable:
                nursery.start_soon(self.follow)
            started = registry.process_start(os.getpid())
            registry.register(registry.MountEntry(
                self.image, self.mountpoint, os.getpid(), self.sock, not self.vol.writable,
                time.time_ns(), 0 if started is None else started[1], self.log_to))
            nursery.start_soon(self.announce, ready)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()


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
        raise MountError(f"{image} is already mounted on {other.mountpoint} "
                         f"(process {other.pid})")
    return image, mountpoint


def _run_checker(argv: list[str], root: bytes, running: list[subprocess.Popen[bytes]],
                 ) -> tuple[int, bytes, bytes]:
    """Run the online checker (fuse/checker.py) with `root` on stdin; (exit code, stdout,
    stderr). The process is put in `running` so that a cancelled check can kill it."""
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        running.append(proc)
        out, err = proc.communicate(root)
    return proc.returncode, out, err


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
    """Mount `image` on `mountpoint` and serve it until unmounted or signalled. `ready` is
    called once the mount answers requests. `readahead_kib` is the kernel's readahead
    window for the mount's files (0: the kernel's default). `kernel_flags` are mount
    flags the kernel applies to the mount point (nosuid, nodev, noexec: KERNEL_FLAGS).
    `log_to` says where this process logs, for `snapvol mounts` (the caller set it up)."""
    image, mountpoint = check_mount(image, mountpoint, cp_interval, readahead_kib)
    sock = registry.socket_path(image)
    vol = Volume.open(image, writable=not read_only)
    try:
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
    except BaseException:
        vol.abandon()
        vol.dev.close()
        raise
    if vol.writable:
        vol.background_cp = True  # requests go on while a CP is written
        vol.dirty_limit = MOUNT_DIRTY_LIMIT
        vol.start_cp_timer(cp_interval)
    mount = _Mount(image, mountpoint, vol, ops, sock, readahead_kib, log_to)
    try:
        trio.run(mount.run, ready)
    finally:
        try:
            ops.close_handles()
            vol.close()
            log.info("unmounted %s from %s at CP %d", image, mountpoint, vol.root.cp_count)
        finally:
            pyfuse3.close(unmount=True)
            registry.unregister(image, os.getpid())
