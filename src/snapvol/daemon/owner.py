"""The process that owns a volume: it opens it, runs its CP timer, answers its control
socket, handles signals and stops cleanly, all on one trio loop.

A mount is this owner with the FUSE front end plugged in (`snapvol.fuse.server` builds
it: `serve(image, front=...)`); the daemon is the same owner without a front end. The
front end is a `Front`: it serves its own requests on the owner's loop (pyfuse3's main
loop), binds the control operations only it can answer, and is told when to end.

Threads and where work runs: the trio thread runs every control request (and a front
end's requests), calling the engine synchronously under `Volume.mutex` for short work;
the engine's CP timer thread (`Volume.start_cp_timer`) and the writer of a background CP
are the other threads. Work that takes long runs off the loop, so the front end's
requests go on meanwhile: the online check runs in a process of its own (daemon/checker.py,
reading only blocks the volume holds for it, `Volume.hold_committed`) started from a
worker thread; a send plans under the mutex on a worker thread, then reads and checks its
blocks on worker threads (`trio.to_thread`), a batch at a time, through a `BlockIO` of
its own, while the volume holds the committed root's blocks against reuse, and the loop
only writes the frames out.

Stopping: SIGTERM, SIGINT, SIGHUP and the `stop` request commit a CP and end the front
end's loop (or, without one, the owner's wait); then the front end releases what it
holds, the volume is closed with a last CP, the front end detaches (a mount's mount point
is unmounted) and the registry entry and socket are removed.

`python -m snapvol.daemon.owner IMAGE` runs an owner without a front end in the
foreground (until SIGTERM or `stop`): the daemon of issue 11 in its smallest form, and
what the tests run to show that the owner needs no FUSE.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import trio

from snapvol.control import registry
from snapvol.control.ops import (
    FSCK,
    HELLO,
    INFO,
    PING,
    SEND,
    SEND_PLAN,
    SNAP_CREATE,
    SNAP_DELETE,
    SNAP_LIST,
    SNAP_RENAME,
    STOP,
    Exchange,
    Fsck,
    Handler,
    NoArgs,
    Op,
    OpTable,
    SendRequest,
    SnapCreate,
    SnapName,
    SnapRename,
    volume_facts,
)
from snapvol.engine import snapshots
from snapvol.engine.blockio import BlockIO
from snapvol.engine.volume import Volume, check_cp_interval
from snapvol.errors import SnapvolError
from snapvol.image.sender import SendPlan, plan, stream_plan

log = logging.getLogger("snapvol.daemon")

OWNER_DIRTY_LIMIT = 64 << 20
"""Data an owner collects before it starts a CP. CPs are written in the background, so up
to twice this is held: one CP on its way to disk and the next one collecting. A smaller
set of request buffers is reused sooner (new memory costs a page fault per 4 KiB, which
on a virtual machine can cost more than the data's copy), and each CP is short."""
SEND_BATCH = 4 << 20
"""Stream bytes a send produces per trip to a worker thread: each trip costs some tens
of microseconds, and a batch this size takes a few milliseconds to read and check."""


class Front(Protocol):
    """A front end an owner carries: the FUSE mount (`snapvol.fuse.server.FuseFront`)."""

    @property
    def mountpoint(self) -> str: ...

    def bindings(self, owner: Owner) -> Iterable[tuple[Op[Any], Handler]]:
        """The control operations the front end answers (added to, or replacing, the
        owner's own)."""
        ...

    async def serve(self, owner: Owner, nursery: trio.Nursery,
                    ready: Callable[[], None]) -> None:
        """Serve until `terminate` (or the kernel) ends it; call `ready` once requests
        are answered. Tasks of its own go in `nursery`, which is cancelled after."""
        ...

    def terminate(self) -> None:
        """End `serve` soon (called on the loop's thread)."""
        ...

    def release(self) -> None:
        """After `serve`, before the volume closes: let go of what it holds."""
        ...

    def detach(self) -> None:
        """After the volume closed (also after a failed start)."""
        ...


class Owner:
    """One owned volume on one trio loop: the control socket, signals, stop."""

    def __init__(self, image: str, vol: Volume, sock: str, front: Front | None = None,
                 log_to: str = "") -> None:
        self.image, self.vol, self.sock, self.front = image, vol, sock, front
        self.log_to = log_to  # where this process logs, for `snapvol mounts`
        self.mountpoint = "" if front is None else front.mountpoint
        self.stopping = False
        self._stopped: trio.Event | None = None
        where = (f"the mount of {image} on {self.mountpoint}" if self.mountpoint
                 else f"the owner of {image}") + f" (process {os.getpid()})"
        self.table = OpTable(where)
        self.table.bind_all(self.bindings())
        if front is not None:
            self.table.bind_all(front.bindings(self))

    # ---- stopping ------------------------------------------------------------------------
    def stop(self, why: str) -> None:
        """Commit what is dirty, then end the front end's loop (or the owner's wait)."""
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping: %s", why)
        try:
            if self.vol.writable:
                self.vol.cp()
        except SnapvolError as e:
            # Stop anyway: closing the volume tries the CP once more and reports it.
            log.error("CP before stopping failed: %s", e)
        if self.front is not None:
            self.front.terminate()
        elif self._stopped is not None:
            self._stopped.set()

    # ---- the operations the owner answers itself -------------------------------------------
    def bindings(self) -> list[tuple[Op[Any], Handler]]:
        return [(HELLO, self.hello), (PING, self.ping), (INFO, self.info),
                (SNAP_CREATE, self.snap_create), (SNAP_DELETE, self.snap_delete),
                (SNAP_RENAME, self.snap_rename), (SNAP_LIST, self.snap_list),
                (FSCK, self.fsck), (SEND_PLAN, self.send_plan), (SEND, self.send),
                (STOP, self.stop_request)]

    async def hello(self, req: NoArgs, ex: Exchange) -> dict[str, Any]:
        return {**self.table.hello(), "pid": os.getpid(), "image": self.image,
                "mountpoint": self.mountpoint, "read_only": not self.vol.writable}

    async def ping(self, req: NoArgs, ex: Exchange) -> dict[str, Any]:
        return {"pid": os.getpid(), "mountpoint": self.mountpoint}

    async def info(self, req: NoArgs, ex: Exchange) -> dict[str, Any]:
        with self.vol.mutex:
            return volume_facts(self.vol, self.image)

    async def snap_create(self, req: SnapCreate, ex: Exchange) -> dict[str, Any]:
        target = None
        if req.replica_for is not None:
            try:
                target = bytes.fromhex(req.replica_for)
            except ValueError:
                raise SnapvolError(f"replica_for {req.replica_for!r} is not a volume "
                                   "UUID in hex") from None
        entry = snapshots.create(self.vol, req.name, shadow=req.shadow, source=req.source,
                                 replica_for=target)
        return {"name": entry.name, "cp_count": entry.cp_count}

    async def snap_delete(self, req: SnapName, ex: Exchange) -> dict[str, Any]:
        return {"freed_blocks": snapshots.delete(self.vol, req.name)}

    async def snap_rename(self, req: SnapRename, ex: Exchange) -> dict[str, Any]:
        snapshots.rename(self.vol, req.old, req.new)
        return {"name": req.new}

    async def snap_list(self, req: NoArgs, ex: Exchange) -> list[dict[str, Any]]:
        return [dataclasses.asdict(i) for i in snapshots.infos(self.vol)]

    async def stop_request(self, req: NoArgs, ex: Exchange) -> dict[str, Any]:
        self.stop("stop requested")
        return {"pid": os.getpid()}

    async def fsck(self, req: Fsck, ex: Exchange) -> dict[str, Any]:
        """The online check (`fsck --online`): commit what is dirty, waiting for the disk
        off the event loop as an fsync does, then check that committed root in a process
        of its own (daemon/checker.py) while requests go on here. Meanwhile the volume
        holds the root's blocks against reuse (`Volume.hold_committed`); the checker reads
        them on its own descriptor, `share` of the time (engine/fsck.py, ONLINE_SHARE by
        default). If the owner stops first, the checker is killed."""
        vol = self.vol
        share = req.share
        if not 0 < share <= 1:
            raise SnapvolError(f"--share {share}: must be more than 0 and at most 1")
        if vol.writable:
            target = vol.sync_target()
            while (writer := vol.sync_step(target)) is not None:
                await trio.to_thread.run_sync(writer.join)
        started = time.monotonic()
        argv = [sys.executable, "-m", "snapvol.daemon.checker", self.image, repr(share)]
        running: list[subprocess.Popen[bytes]] = []
        with vol.hold_committed() as root:
            log.info("online check of CP %d started", root.cp_count)
            try:
                # Started and waited for on a worker thread: starting a process stops
                # the thread that starts it for a moment, which must not be the loop's.
                code, out, err = await trio.to_thread.run_sync(
                    _run_checker, argv, root.encode(), running, abandon_on_cancel=True)
            finally:
                for proc in running:  # cancelled (the owner stops): before the hold ends
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

    async def send_plan(self, req: SendRequest, ex: Exchange) -> dict[str, Any]:
        """What `snapvol send --dry-run` prints: planned on a worker thread."""
        p = await trio.to_thread.run_sync(self._plan, req)
        return plan_facts(p, req)

    def _plan(self, req: SendRequest) -> SendPlan:
        with self.vol.mutex:
            return plan(self.vol, req.snap, req.base, req.resume)

    async def send(self, req: SendRequest, ex: Exchange) -> dict[str, Any]:
        """The image stream `snapvol send` writes, streamed through the socket: the plan's
        facts as the header, the stream's bytes as data frames, {bytes} in the trailer.
        The committed root's blocks are held against reuse from the plan to the end, so
        a snapshot deleted meanwhile still streams whole; the blocks are read and checked
        on worker threads, through a BlockIO of the send's own (the volume's cache is
        the loop's), so the front end's requests go on meanwhile."""
        vol = self.vol
        with contextlib.ExitStack() as held:

            def prepare() -> SendPlan:
                with vol.mutex:  # the plan and the hold see the same snapshot table
                    held.enter_context(vol.hold_committed())
                    return plan(vol, req.snap, req.base, req.resume)

            p = await trio.to_thread.run_sync(prepare)
            await ex.begin(plan_facts(p, req))
            chunks = stream_plan(vol, p, io=BlockIO(vol.dev, cache_bytes=16 << 20))
            sent = 0
            while batch := await trio.to_thread.run_sync(_next_batch, chunks):
                for chunk in batch:
                    await ex.send(chunk)
                    sent += len(chunk)
        log.info("sent snapshot %s through the control socket: %d bytes", req.snap, sent)
        return {"bytes": sent, "blocks": p.nblocks}

    # ---- the loop --------------------------------------------------------------------------
    async def _signals(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                       ) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            task_status.started()
            async for signum in sigs:
                self.stop(signal.Signals(signum).name)

    async def _control(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                       ) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)
        await sock.bind(self.sock)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(self.table.handle, [listener])

    async def run(self, ready: Callable[[], None]) -> None:
        self._stopped = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(self._signals)
            await nursery.start(self._control)
            started = registry.process_start(os.getpid())
            registry.register(registry.MountEntry(
                self.image, self.mountpoint, os.getpid(), self.sock, not self.vol.writable,
                time.time_ns(), 0 if started is None else started[1], self.log_to))
            if self.front is None:
                ready()
                await self._stopped.wait()
            else:
                await self.front.serve(self, nursery, ready)
            nursery.cancel_scope.cancel()


def plan_facts(p: SendPlan, req: SendRequest) -> dict[str, Any]:
    """What `snapvol send --dry-run --json` prints of a plan (the image aside)."""
    return {"snapshot": req.snap, "base": req.base, "bytes": p.nbytes, "blocks": p.nblocks,
            "resumed_from_vbn": p.header.resume_from}


def _next_batch(chunks: Iterator[bytes | bytearray]) -> list[bytes | bytearray]:
    """The next SEND_BATCH bytes or so of a stream (on a worker thread); [] at its end."""
    batch: list[bytes | bytearray] = []
    size = 0
    for chunk in chunks:
        batch.append(chunk)
        size += len(chunk)
        if size >= SEND_BATCH:
            break
    return batch


def _run_checker(argv: list[str], root: bytes, running: list[subprocess.Popen[bytes]],
                 ) -> tuple[int, bytes, bytes]:
    """Run the online checker (daemon/checker.py) with `root` on stdin; (exit code,
    stdout, stderr). The process is put in `running` so that a cancelled check can kill it."""
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        running.append(proc)
        out, err = proc.communicate(root)
    return proc.returncode, out, err


def serve(image: str, *, read_only: bool = False, cp_interval: float | None = None,
          front: Callable[[Volume], Front] | None = None, log_to: str = "",
          ready: Callable[[], None] = lambda: None) -> None:
    """Own `image` until stopped: open it, plug in the front end `front(vol)` makes (if
    any), and serve. `ready` is called once requests are answered. `log_to` says where
    this process logs, for `snapvol mounts` (the caller set it up)."""
    image = os.path.abspath(image)
    if cp_interval is not None:
        check_cp_interval(cp_interval)
    sock = registry.socket_path(image)
    vol = Volume.open(image, writable=not read_only)
    attached: Front | None = None
    try:
        attached = None if front is None else front(vol)
    except BaseException:
        vol.abandon()
        vol.dev.close()
        raise
    if vol.writable:
        vol.background_cp = True  # requests go on while a CP is written
        vol.dirty_limit = OWNER_DIRTY_LIMIT
        vol.start_cp_timer(cp_interval)
    owner = Owner(image, vol, sock, attached, log_to)
    try:
        trio.run(owner.run, ready)
    finally:
        try:
            if attached is not None:
                attached.release()
            vol.close()
            where = f" from {owner.mountpoint}" if owner.mountpoint else ""
            log.info("%s %s%s at CP %d", "unmounted" if owner.mountpoint else "released",
                     image, where, vol.root.cp_count)
        finally:
            if attached is not None:
                attached.detach()
            registry.unregister(image, os.getpid())


def main(argv: list[str] | None = None) -> int:
    """`python -m snapvol.daemon.owner IMAGE`: own IMAGE in the foreground, no front end."""
    parser = argparse.ArgumentParser(prog="python -m snapvol.daemon.owner",
                                     description="Own a volume without mounting it.")
    parser.add_argument("image")
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--cp-interval", type=float, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s snapvol owner[%(process)d] %(levelname)s: "
                               "%(message)s")
    try:
        serve(args.image, read_only=args.read_only, cp_interval=args.cp_interval,
              ready=lambda: print(f"owning {os.path.abspath(args.image)} (process "
                                  f"{os.getpid()})", flush=True))
    except SnapvolError as e:
        print(f"snapvol owner: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
