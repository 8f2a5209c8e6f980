"""`snapvol replicate SRC DST`: one command that keeps a mirror current.

Each run (the reference's §5.4, with the destination's newest master matched by GUID):

1. finishes a partial receive DST holds, from the resume token (if SRC no longer holds
   what it was bringing, the partial receive is discarded);
2. takes a new snapshot on SRC, marked as a replication snapshot *for DST*: its entry
   records DST's volume UUID (`SnapEntry.replica_for`) and its name carries the UUID's
   first 8 hex digits (`replica-1a2b3c4d-<UTC time>`);
3. finds the newest snapshot both hold, by GUID (the one the last run left), and sends the
   increment from it, or a full stream when there is none (DST new or empty);
4. retires, on both sides, the older replication snapshots made for DST: each side keeps
   the one the next run starts from. Replication snapshots made for other destinations
   are not touched, so one source can keep any number of mirrors current; neither are
   user snapshots (DST drops the received ones SRC no longer holds, as every receive does,
   and refuses to drop its own unless told to with `drop_local`).

A replication snapshot is recognised by the UUID in its entry, not by its name, so a
renamed one still counts. A run also retires the replication snapshots DST made for SRC
(taken on DST, for a replicate the other way, as in a failback): a later run that way
starts from this run's snapshot, the newest both hold. One made before the UUID was
recorded (all zero) is retired by the first run that starts from it.

SRC may be mounted read-write (or held by another owner): the run then goes through its
owner's control socket (`OwnedSource`): the owner takes the replication snapshot, streams
the increment (daemon/owner.py: read off its loop, so the mount goes on serving) and
retires the old replication snapshots, while this process receives into DST as always.

A run that stops anywhere leaves both volumes consistent: before the switch DST keeps its
previous state and a partial receive the next run finishes; after it, at worst an older
replication snapshot is retired one run late.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid as uuidlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from snapvol.control import protocol, registry
from snapvol.control.registry import MountEntry
from snapvol.engine import snapshots
from snapvol.engine.volume import Volume
from snapvol.errors import SnapvolError
from snapvol.image.receiver import (
    ReceiveResult,
    abort,
    leaving,
    open_for_receive,
    pending_snapshot,
    receive,
    refuse_local_drops,
    resume_token,
)
from snapvol.image.sender import Progress, plan, stream_plan
from snapvol.layout.constants import BLOCK_SIZE, ROOT_INO
from snapvol.layout.snaptable import NO_VOLUME
from snapvol.streams.imagestream import decode_token

PREFIX = "replica-"


class ReplicateError(SnapvolError):
    """The two volumes cannot be brought into step by this run; the message says why."""


@dataclass
class ReplicateResult:
    snapshot: str  # the snapshot both now hold, DST's new state
    base: str | None  # the common snapshot the increment came from (None: full)
    blocks: int = 0  # blocks moved by this run, resumed part included
    nbytes: int = 0  # stream bytes moved
    seconds: float = 0.0
    resumed: str | None = None  # the snapshot whose partial receive this run finished
    discarded: str | None = None  # a partial receive that could not be finished
    retired: list[str] = field(default_factory=list)  # replication snapshots deleted
    dropped: list[str] = field(default_factory=list)  # DST snapshots SRC does not hold


Chunks = Iterable[bytes | bytearray | memoryview]


class SnapFacts(Protocol):
    """What a run needs to know of a snapshot (a `SnapEntry` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def guid(self) -> bytes: ...
    @property
    def cp_count(self) -> int: ...
    @property
    def shadow(self) -> bool: ...
    @property
    def replica(self) -> bool: ...
    @property
    def received(self) -> bool: ...
    @property
    def replica_for(self) -> bytes: ...


class SourceVolume(Protocol):
    """The volume a run reads from and keeps its replication snapshots on: opened here
    (`LocalSource`), or reached through the owner that holds it (`OwnedSource`)."""

    @property
    def path(self) -> str: ...
    @property
    def uuid(self) -> bytes: ...
    @property
    def nblocks(self) -> int: ...

    def entries(self) -> Sequence[SnapFacts]:
        """Every snapshot, shadows included, oldest first."""
        ...

    def create_replica(self, name: str, target: bytes) -> None: ...

    def delete(self, name: str) -> None: ...

    def stream(self, snap: str, base: str | None, token: str | None,
               ) -> AbstractContextManager[Chunks]:
        """The image stream of `snap` (the plan's refusals come on entering)."""
        ...


class LocalSource:
    """A volume this process opened."""

    def __init__(self, vol: Volume) -> None:
        self.vol = vol
        self.path, self.uuid, self.nblocks = vol.path, vol.sb.uuid, vol.nblocks

    def entries(self) -> Sequence[SnapFacts]:
        return self.vol.snapshots.entries()

    def create_replica(self, name: str, target: bytes) -> None:
        snapshots.create(self.vol, name, replica_for=target)

    def delete(self, name: str) -> None:
        snapshots.delete(self.vol, name)

    def stream(self, snap: str, base: str | None, token: str | None,
               ) -> AbstractContextManager[Chunks]:
        return contextlib.nullcontext(stream_plan(self.vol, plan(self.vol, snap, base, token)))


@dataclass(frozen=True, slots=True)
class OwnedSnap:
    """A snapshot as the owner's `snap_list` describes it."""

    name: str
    guid: bytes
    cp_count: int
    shadow: bool
    replica: bool
    received: bool
    replica_for: bytes


class OwnedSource:
    """A volume another process owns (a read-write mount), reached through its control
    socket: each method is one request."""

    def __init__(self, entry: MountEntry, path: str) -> None:
        self.entry, self.path = entry, path
        facts = protocol.call(entry, "info")
        self.uuid = uuidlib.UUID(str(facts["uuid"])).bytes
        self.nblocks = int(facts["size"]) // BLOCK_SIZE

    def entries(self) -> Sequence[SnapFacts]:
        return [OwnedSnap(str(r["name"]), uuidlib.UUID(str(r["guid"])).bytes,
                          int(r["cp_count"]), bool(r["shadow"]), bool(r["replica"]),
                          bool(r["received"]),
                          NO_VOLUME if r["replica_for"] is None
                          else uuidlib.UUID(str(r["replica_for"])).bytes)
                for r in protocol.call(self.entry, "snap_list")]

    def create_replica(self, name: str, target: bytes) -> None:
        protocol.call(self.entry, "snap_create", name=name, replica_for=target.hex())

    def delete(self, name: str) -> None:
        protocol.call(self.entry, "snap_delete", name=name)

    @contextlib.contextmanager
    def stream(self, snap: str, base: str | None, token: str | None) -> Iterator[Chunks]:
        with protocol.stream(self.entry, "send", snap=snap, base=base, resume=token) as answer:
            yield answer


@contextlib.contextmanager
def open_source(path: str) -> Iterator[SourceVolume]:
    """SRC for a run: through its owner when another process holds it read-write (a
    mount), else opened here, exclusively, for the whole run."""
    live = registry.find_image(path)
    if live is not None and not live.read_only:
        yield OwnedSource(live, path)
        return
    with Volume.open(path) as vol:
        yield LocalSource(vol)


def _by_guid(src: SourceVolume, guid: bytes) -> SnapFacts | None:
    found = sorted((e for e in src.entries() if e.guid == guid), key=lambda e: e.shadow)
    return found[0] if found else None


def _new_name(src: SourceVolume, target: bytes) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    taken = {e.name for e in src.entries()}
    name, n = f"{PREFIX}{target.hex()[:8]}-{stamp}", 1
    while name in taken:
        n += 1
        name = f"{PREFIX}{target.hex()[:8]}-{stamp}-{n}"
    return name


def _transfer(src: SourceVolume, dst_path: str, snap: str, base: str | None,
              token: str | None, progress: Progress | None, drop_local: bool,
              ) -> ReceiveResult:
    with src.stream(snap, base, token) as chunks:
        dst = open_for_receive(dst_path)
        try:
            return receive(dst, chunks, progress, drop_local)
        finally:
            dst.close()


def _resume(src: SourceVolume, dst_path: str, out: ReplicateResult,
            progress: Progress | None, drop_local: bool) -> None:
    """Finish (or, when it cannot be finished, discard) DST's partial receive."""
    dst = open_for_receive(dst_path)
    try:
        token = resume_token(dst)
        if token is None:
            return
        snap_guid, base_guid, _done = decode_token(token)
        snap = _by_guid(src, snap_guid)
        base = _by_guid(src, base_guid) if any(base_guid) else None
        if snap is None or snap.shadow or (any(base_guid) and base is None):
            out.discarded = pending_snapshot(dst)
            abort(dst)
            return
    finally:
        dst.close()
    got = _transfer(src, dst_path, snap.name, base.name if base else None, token, progress,
                    drop_local)
    out.resumed = got.snapshot
    out.blocks += got.blocks
    out.nbytes += got.nbytes
    out.dropped += got.dropped


def _common(src: SourceVolume, dst: Volume) -> SnapFacts | None:
    """The newest snapshot of SRC that DST holds as a regular snapshot, by GUID."""
    held = {e.guid for e in dst.snapshots.regular()}
    both = [e for e in src.entries() if e.guid in held]
    both.sort(key=lambda e: (e.cp_count, not e.shadow))
    return both[-1] if both else None


def _retire(vol: SourceVolume, target: bytes, keep: bytes, also: set[bytes]) -> list[str]:
    """Delete `vol`'s replication snapshots made for volume `target`, except `keep` (the
    one the next run starts from), and those with GUIDs in `also` (see `_run`)."""
    gone = []
    for e in vol.entries():
        if not e.replica or e.guid == keep:
            continue
        if e.replica_for == target or e.guid in also:
            vol.delete(e.name)
            gone.append(e.name)
    return gone


def replicate(src_path: str, dst_path: str, create: bool = False,
              progress: Progress | None = None, drop_local: bool = False) -> ReplicateResult:
    """Bring DST up to a new snapshot of SRC (see the module docstring). DST's own
    snapshots (taken there, not received) that SRC does not hold are dropped only with
    `drop_local`; otherwise the run refuses before it changes anything."""
    t0 = time.monotonic()
    if os.path.realpath(src_path) == os.path.realpath(dst_path):
        raise ReplicateError(f"{src_path} and {dst_path} are the same image")
    made = False
    with open_source(src_path) as src:
        if not os.path.lexists(dst_path):
            if not create:
                raise ReplicateError(f"{dst_path} does not exist: add --create to make it")
            Volume.create(dst_path, src.nblocks * BLOCK_SIZE).close()
            made = True
        try:
            out, target, also = _run(src, dst_path, progress, drop_local)
        except BaseException:
            if made:
                _remove_if_untouched(dst_path)
            raise
        out.retired += _retire(src, target, _guid_of(src, out.snapshot), also)
    # As a receive does: readers (a read-only mount of the mirror) may go on reading, since
    # deleting a snapshot is one more CP that writes free blocks and switches the root.
    with open_for_receive(dst_path) as dst:
        mirror = LocalSource(dst)
        out.retired += [f"{name} (on {dst_path})"
                        for name in _retire(mirror, target, _guid_of(mirror, out.snapshot),
                                            also)]
    out.seconds = time.monotonic() - t0
    return out


def _guid_of(vol: SourceVolume, name: str) -> bytes:
    found = next((e for e in vol.entries() if e.name == name), None)
    if found is None:
        raise ReplicateError(f"{vol.path} no longer holds snapshot {name!r}: it was "
                             "deleted during the run; run it again")
    return found.guid


def _run(src: SourceVolume, dst_path: str, progress: Progress | None, drop_local: bool
         ) -> tuple[ReplicateResult, bytes, set[bytes]]:
    """The transfer; returns its result, DST's volume UUID and the GUIDs of the other
    replication snapshots this run makes obsolete: those DST made for SRC (a replicate
    the other way, as in a failback: the next one that way starts from this run's
    snapshot, the newest both hold) and a legacy one (no destination recorded) that this
    run started from."""
    out = ReplicateResult("", None)
    _resume(src, dst_path, out, progress, drop_local)
    with Volume.open(dst_path, writable=False) as dst:
        target = dst.sb.uuid
        also = {e.guid for e in dst.snapshots.entries()
                if e.replica and e.replica_for == src.uuid and not e.received}
        common = _common(src, dst)
        if common is None and not _is_empty(dst):
            raise ReplicateError(
                f"{dst_path} holds no snapshot of {src.path} but is not empty: it is not a "
                "mirror of it; replicate into a new image with --create")
        if not drop_local:
            # What the receive would refuse, found before the new snapshot is taken: the
            # stream will carry every regular snapshot SRC holds.
            refuse_local_drops(dst, leaving(dst, {e.guid for e in src.entries()
                                                  if not e.shadow}), src.path)
    name = _new_name(src, target)
    src.create_replica(name, target)
    got = _transfer(src, dst_path, name, common.name if common else None, None, progress,
                    drop_local)
    out.snapshot, out.base = got.snapshot, got.base
    out.blocks += got.blocks
    out.nbytes += got.nbytes
    out.dropped += got.dropped
    if common is not None and common.replica and common.replica_for == NO_VOLUME:
        also.add(common.guid)
    return out, target, also


def _is_empty(vol: Volume) -> bool:
    """No snapshots and no files: a full stream may go there."""
    img = vol.active
    return not len(vol.snapshots) and not any(True for _ in img.readdir(img.node(ROOT_INO)))


def _remove_if_untouched(path: str) -> None:
    try:
        with Volume.open(path, writable=False) as vol:
            untouched = not vol.receive_blocks and not len(vol.snapshots)
    except SnapvolError:
        return
    if untouched:
        with contextlib.suppress(OSError):
            os.unlink(path)
