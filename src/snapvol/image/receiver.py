"""Receiving: check the stream against the destination, write blocks to their VBNs,
switch the root last.

The order is what keeps the destination safe (DESIGN.md §3.5-3.7):

1. The stream's HEADER, TABLE and selection PLANE are read and checked before anything
   is written: the destination must be as large as the source, hold the base (by GUID,
   with the same trees) and have no change since it, or be empty for a full stream.
2. One CP pins the selection (invariant 5) and records the receive state in the root:
   no CP hands a pinned block out, also after the destination is closed and reopened
   and used meanwhile. The same CP moves the destination's own metadata (its planes,
   its table) out of the way of the incoming blocks.
3. Blocks go straight to their VBNs with one pwritev per record; nothing live refers to
   them, so a reader (`snapvol ls`, a read-only mount) sees the old state throughout.
   Every `CHECKPOINT_BYTES` a helper thread flushes the device and then has a CP record
   in the root how far blocks are durable: that is the resume token's VBN. The thread
   lets blocks keep arriving during the flush (the receive does not stall on it), and
   the writeback it forces overlaps the transfer instead of piling up for the end.
4. At END, before anything is installed, the trees the stream brings are checked
   (`_check_install`): walked inside the selection (engine/reach.py), every block they
   reach must have arrived with the checksum their pointers give it (each BLOCKS record
   is hashed as it is written, one call into C), every pointer must lie in the volume and
   every one leaving the selection must lead into a snapshot this destination holds and
   keeps; every tree's top is verified, each snapshot's trees stay inside its own plane,
   and no block arrives that no tree reaches. A stream that fails (a crafted one: its
   record checksums are right, its trees are not) is refused and its blocks discarded,
   so the destination is exactly as it was.
5. The device is flushed and one CP makes the received snapshot's inode file the
   active one, its table the table and the union of its planes the summary, releasing
   the pin: one root write, so a reader sees the old state or the new one, never a mix.

A stream that is damaged or cut off stops at its first bad record; the destination keeps
its previous state and a partial receive that `send --resume` completes or
`receive --abort` discards.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import struct
import threading
import time
import uuid as uuidlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import numpy as np

from snapvol.device import FileDevice
from snapvol.engine import planefile, snapshots
from snapvol.engine.inodefile import InodeFile
from snapvol.engine.reach import TREE_NAMES, DamagedBlock, Ranks, Reach, image_trees
from snapvol.engine.snapshots import plane_of
from snapvol.engine.snaptable import SnapshotTable
from snapvol.engine.volume import Volume
from snapvol.errors import LockedError, SnapvolError, VolumeError
from snapvol.image.sender import Progress
from snapvol.layout.checksum import run_checksums
from snapvol.layout.constants import BLOCK_SIZE, FIRST_DATA_VBN, INOMAP_INO, ROOT_INO
from snapvol.layout.records import RECEIVE_UPDATING, TreeRoot
from snapvol.layout.snaptable import SNAP_IN_USE, SNAP_RECEIVED, SNAP_REPLICA, SnapEntry
from snapvol.planes import Plane, difference, intersection, union
from snapvol.streams.imagestream import (
    HDR_RESUMED,
    HEADER_PAYLOAD,
    ROLE_BASE,
    ROLE_CARRIED,
    ROLE_HELD,
    ROLE_TOP,
    BlocksRecord,
    Decoder,
    EndRecord,
    HeaderRecord,
    Record,
    StreamError,
    StreamHeader,
    StreamTooLarge,
    TableItem,
    count_from,
    decode_table,
    encode_table,
    encode_token,
)

CREATE_MAX_BLOCKS = 1 << 32
"""The largest volume a stream makes `receive --create` (and `restore --create`) create:
16 TiB, whose planes take 512 MiB each. A stream's header is 128 bytes from a peer that
may be hostile, and the volume it names costs memory in proportion to its size; a larger
source is received into an image the user made with `snapvol create`."""

CHECKPOINT_BYTES = 256 << 20
"""Block bytes between flushes that advance the resume point: at most this much is sent
again after an interruption. The flushes run beside the transfer (`_Checkpointer`), so a
shorter distance costs little time; it bounds the dirty data too."""


@runtime_checkable
class Readable(Protocol):
    """A raw file or pipe (`open(fd, "rb", buffering=0)`): records are read straight
    into buffers of their own size, with no copy in between."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


Source = Iterable[bytes | bytearray | memoryview] | Readable
"""What `receive` reads: chunks of any size, or a readable raw file (the fast path)."""

"""Called with (stream bytes done, stream bytes expected) as a receive goes."""

_BLOB_LEN = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class ReceiveResult:
    snapshot: str  # the snapshot the destination now holds and shows
    guid: str
    base: str | None
    blocks: int  # blocks written by this run (a resumed run writes only the rest)
    nbytes: int  # stream bytes read
    resumed: bool
    dropped: tuple[str, ...]  # destination snapshots the source no longer holds


def _guid(raw: bytes) -> str:
    return str(uuidlib.UUID(bytes=raw))


# ---- the persisted receive state ------------------------------------------------------------
def _state(vol: Volume) -> tuple[StreamHeader, tuple[TableItem, ...]] | None:
    """The header and table of the pending receive (stored after its plane), or None."""
    blob = vol.receive_state()
    if blob is None:
        return None
    (size,) = _BLOB_LEN.unpack_from(blob)
    try:
        header = StreamHeader.decode(blob[8 : 8 + HEADER_PAYLOAD])
        items = decode_table(blob[8 + HEADER_PAYLOAD : 8 + size], header)
    except StreamError as err:
        raise VolumeError(f"{vol.path}: the partial receive's state is damaged ({err}); "
                          f"discard it with 'snapvol receive --abort {vol.path}'") from None
    return header, items


def _pin(vol: Volume, header: StreamHeader, items: tuple[TableItem, ...],
         selection: Plane) -> None:
    """Pin the selection, with the header and table kept after it for a resume."""
    stored = replace(header, resume_from=0, flags=header.flags & ~HDR_RESUMED)
    body = stored.encode() + encode_table(list(items))
    vol.pin(selection, _BLOB_LEN.pack(len(body)) + body,
            RECEIVE_UPDATING if header.shadow_base else 0)


def resume_token(vol: Volume) -> str | None:
    """The token that `send --resume` takes to finish this volume's partial receive."""
    state = _state(vol)
    if state is None:
        return None
    header, _ = state
    return encode_token(header.snap_guid, header.base_guid, vol.receive_done)


def pending_snapshot(vol: Volume) -> str | None:
    """The name of the snapshot a partial receive is bringing, or None."""
    state = _state(vol)
    if state is None:
        return None
    return next(i.entry.name for i in state[1] if i.role == ROLE_TOP)


# ---- opening ----------------------------------------------------------------------------------
def open_for_receive(path: str) -> Volume:
    """Open a destination so readers can go on reading it while blocks arrive.

    A receive writes only pinned blocks that no committed root refers to, and switches
    with one root write, so it takes the shared lock that readers take (writers, which
    need the exclusive one, stay out) plus an exclusive lock on byte 1 that keeps a
    second receive out."""
    vol = Volume.open(path, writable=True, exclusive=False)
    assert isinstance(vol.dev, FileDevice)
    try:
        fcntl.lockf(vol.dev.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1)
    except OSError as err:
        vol.abandon()
        vol.dev.close()
        if err.errno in (errno.EACCES, errno.EAGAIN):
            raise LockedError(f"{path} is receiving another stream; wait for it to end"
                              ) from None
        raise
    return vol


class _Prefixed:
    """A readable file with bytes already read from it put back in front."""

    def __init__(self, head: bytes, rest: Readable) -> None:
        self._head = memoryview(head)
        self._rest = rest

    def readinto(self, buffer: memoryview, /) -> int | None:
        if not self._head:
            return self._rest.readinto(buffer)
        n = min(len(buffer), len(self._head))
        buffer[:n] = self._head[:n]
        self._head = self._head[n:]
        return n


def read_header_from(source: Readable, max_blocks: int = CREATE_MAX_BLOCKS
                     ) -> tuple[StreamHeader, Readable]:
    """`read_header` for a raw readable file: the header, and a readable that serves
    the whole stream again. A header of a volume past `max_blocks` raises
    StreamTooLarge."""
    dec = Decoder(max_blocks)
    seen = bytearray()

    def keep(buffer: memoryview) -> int | None:
        n = source.readinto(buffer)
        if n:
            seen.extend(buffer[:n])
        return n

    rec = dec.read_record(keep)  # the first record is the header, or this raises
    if not isinstance(rec, HeaderRecord):
        raise StreamError("image stream is empty")
    return rec.header, _Prefixed(bytes(seen), source)


def read_header(chunks: Iterable[bytes], max_blocks: int = CREATE_MAX_BLOCKS
                ) -> tuple[StreamHeader, Iterator[bytes]]:
    """The header of a stream and the whole stream again (for `receive --create`, which
    needs the source's size before it can make the image)."""
    dec = Decoder(max_blocks)
    seen: list[bytes] = []
    it = iter(chunks)
    for chunk in it:
        seen.append(chunk)
        dec.feed(chunk)
        for rec in dec.records():
            if isinstance(rec, HeaderRecord):
                return rec.header, itertools.chain(seen, it)
    dec.finish()
    raise StreamError("image stream is empty")


# ---- receiving ---------------------------------------------------------------------------------
def _records(dec: Decoder, chunks: Iterator[bytes | bytearray | memoryview]
             ) -> Iterator[Record]:
    """Checked records, pulling chunks as needed; at the end, refuse trailing bytes and
    a stream cut short."""
    while True:
        rec = dec.next_record()
        if rec is not None:
            yield rec
            continue
        chunk = next(chunks, None)
        if chunk is None:
            dec.finish()
            return
        dec.feed(chunk)


def _read_records(dec: Decoder, source: Readable) -> Iterator[Record]:
    """Checked records read from a raw file, each into a buffer of its own."""
    while (rec := dec.read_record(source.readinto)) is not None:
        yield rec


class _Checkpointer:
    """Advances the resume point in a thread of its own: a flush of the device, then a
    CP recording the VBN below which every selected block was written before the flush.

    Received blocks are pinned and referenced by nothing committed, so the CP (which
    writes only free, unpinned metadata blocks and the root) and the writes of further
    blocks do not touch the same blocks. One checkpoint runs at a time; while one runs,
    the receive goes on and the next starts once it is done."""

    def __init__(self, vol: Volume) -> None:
        self._vol = vol
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, written_to: int) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(written_to,),
                                        name="snapvol-receive-checkpoint", daemon=True)
        self._thread.start()

    def _run(self, written_to: int) -> None:
        try:
            _checkpoint(self._vol, written_to)
        except BaseException as err:  # handed to the receiving thread by wait()
            self._error = err

    def wait(self) -> None:
        """Let the running checkpoint finish; raise what it raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def receive(vol: Volume, chunks: Source, progress: Progress | None = None,
            drop_local: bool = False) -> ReceiveResult:
    """Apply an image stream to `vol` (open writable, e.g. by `open_for_receive`).
    `chunks` is the stream as chunks of any size, or a raw readable file (faster: each
    record is read into its own buffer and nothing is copied on the way to the device).

    The destination's table becomes the stream's: its snapshots the stream does not
    bring go. Those it received may go (the source deleted them); one taken on the
    destination itself is dropped only with `drop_local`, and otherwise the receive is
    refused before anything changes (DESIGN.md §9). Every dropped snapshot is named in
    the result."""
    if not vol.writable or vol.alloc is None:
        raise VolumeError(f"{vol.path} is open read-only; a receive writes to it")
    # The destination's size is the decoder's limit: a header naming a larger volume is
    # refused before the selection plane (a bit per block of it) is made.
    dec = Decoder(max_blocks=vol.nblocks)
    records = (_read_records(dec, chunks) if isinstance(chunks, Readable)
               else _records(dec, iter(chunks)))
    first: Record | None = None
    try:
        for rec in records:
            if isinstance(rec, (BlocksRecord, EndRecord)):
                first = rec
                break
    except StreamTooLarge as err:
        raise VolumeError(
            f"{vol.path} is smaller than the source ({vol.nblocks * BLOCK_SIZE} bytes, the "
            f"stream needs {err.nblocks * BLOCK_SIZE}); receive into a larger image, or a "
            "new one with --create") from None
    header, items, selection = dec.header, dec.table, dec.plane
    assert first is not None and header is not None and selection is not None
    if selection.nblocks != vol.nblocks:
        selection = selection.resized(vol.nblocks)
    with vol.mutex:
        resumed, dropped = _check_and_pin(vol, header, items, selection, drop_local)
    done_before = vol.receive_done if resumed else 0
    total = dec.offset + count_from(selection, header.resume_from) * (BLOCK_SIZE + 1)
    written_to, pending, nblocks = done_before, 0, 0
    write = vol.dev.writev
    checkpoints = _Checkpointer(vol)
    # The checksum of every block as it arrived, by rank in the selection, for the check
    # against the trees at the end (the pointers to a block mostly come after it).
    got = Arrived(selection)
    try:
        rec = first
        while not isinstance(rec, EndRecord):
            assert isinstance(rec, BlocksRecord)
            end = rec.vbn + rec.count
            if end > done_before:
                write(rec.vbn, [rec.data])
                got.add(rec.vbn, rec.count, rec.data)
                nblocks += rec.count
                pending += rec.count * BLOCK_SIZE
            written_to = max(written_to, end)
            if pending >= CHECKPOINT_BYTES and not checkpoints.busy():
                checkpoints.start(written_to)
                pending = 0
            if progress is not None:
                progress(dec.offset, total)
            rec = next(records)
        for _ in records:  # only the end of input (or trailing bytes, refused) is left
            pass
        checkpoints.wait()
    except BaseException as err:
        with contextlib.suppress(BaseException):
            checkpoints.wait()
        with contextlib.suppress(Exception):
            _checkpoint(vol, written_to)
        if isinstance(err, (StreamError, StopIteration)):
            name = next(i.entry.name for i in items if i.role == ROLE_TOP)
            token = resume_token(vol)
            raise StreamError(
                f"{err}; {vol.path} keeps its previous state and a partial receive of "
                f"{name!r}: finish it with 'snapvol send SOURCE {name} [--base BASE] --resume "
                f"{token}' or discard it with 'snapvol receive --abort {vol.path}'") from None
        raise
    vol.dev.flush()
    with vol.mutex:
        try:
            _check_install(vol, items, selection, got)
        except Refused as err:
            raise _refuse(vol, items, str(err)) from None
        top, base, more = _switch(vol, items)
    if progress is not None:
        progress(dec.offset, dec.offset)
    return ReceiveResult(top.name, _guid(top.guid), base, nblocks, dec.offset, resumed,
                         tuple(dropped + more))


class Arrived:
    """The checksums of the selected blocks as they arrived (one C call per record),
    by rank in the selection.

    The records a run writes are the stream's from the first one past what an earlier
    run made durable, and (the decoder checks) they are ascending runs of the selection
    that END finds complete: so record k's first block has the rank of the first one
    plus the blocks before it, and what this run did not hash is the selection below
    the first block it wrote."""

    def __init__(self, selection: Plane) -> None:
        self.ranks = Ranks(selection)
        self.csums = np.zeros(self.ranks.total, dtype=np.uint64)
        self.selection = selection
        self._next = -1  # the rank of the next block to arrive (-1: none has yet)
        self._first_vbn = selection.nblocks

    def add(self, vbn: int, count: int, data: bytes | memoryview) -> None:
        at = self._next
        if at < 0:
            at, self._first_vbn = self.ranks.one(vbn), vbn
        self.csums[at : at + count] = run_checksums(data, vbn)
        self._next = at + count

    def read_back(self, vol: Volume) -> None:
        """Hash from the device the selected blocks that an earlier run of a resumed
        receive wrote (this run skipped them)."""
        below = self.selection.copy()
        below.clear_range(self._first_vbn, self.selection.nblocks - self._first_vbn)
        missing = below.members()
        if not len(missing):
            return
        breaks = (np.flatnonzero(np.diff(missing.view(np.int64)) != 1) + 1).tolist()
        heads = missing[[0, *breaks]].tolist()
        rank = 0  # members below the first hashed block are the first ranks
        for lo, hi, v0 in zip([0, *breaks], [*breaks, len(missing)], heads, strict=True):
            for at in range(0, hi - lo, 256):
                n = min(256, hi - lo - at)
                self.csums[rank : rank + n] = run_checksums(vol.dev.read(v0 + at, n), v0 + at)
                rank += n


class Refused(SnapvolError):
    """What the stream would install fails a check (`_check_install`)."""


def _check_install(vol: Volume, items: tuple[TableItem, ...], selection: Plane,
                   got: Arrived) -> None:
    """Before the switch: check what the stream would install (its snapshots' trees) and
    every block they reach. Raises Refused, naming the snapshot and the block.

    - every pointer lies in the volume's data area (engine/reach.py);
    - inside the selection, every block a tree reaches arrived with the checksum its
      pointer gives (the indirect and inode-file blocks on the way are read and verified
      while walking); a block no tree reaches did not belong in the stream;
    - outside the selection, a pointer leads into a snapshot this destination holds and
      keeps (BASE and the held ones), whose blocks are not sent again; a tree's top there
      is read and verified;
    - a snapshot's trees reach each block once, and only blocks of its own plane (which
      becomes the active plane or joins the summary: a block outside it could be handed
      out again under the tree); its plane holds no block that neither the stream nor a
      kept snapshot holds, and SNAP's (walked first, so it reaches all its own blocks
      itself) no block of the stream its trees do not reach."""
    got.read_back(vol)
    by_guid = {e.guid: e for e in vol.snapshots.slots.values()}
    held = [by_guid[i.entry.guid] for i in items
            if i.role in (ROLE_BASE, ROLE_HELD) and i.entry.guid in by_guid]
    kept = union(*(plane_of(vol, e) for e in held)) if held else Plane.zeros(vol.nblocks)
    reach = Reach(vol.io, vol.nblocks, within=selection)
    reached = np.zeros(got.ranks.total, dtype=bool)  # by rank in the selection
    brought = sorted((i for i in items if i.role in (ROLE_TOP, ROLE_CARRIED)),
                     key=lambda i: i.role != ROLE_TOP)
    for item in brought:
        check = _EntryCheck(vol, item.entry, selection, kept, got)
        check.run(reach, whole=item.role == ROLE_TOP)
        reached |= check.seen
    if not reached.all():
        stray = np.flatnonzero(~reached)
        raise Refused(f"the stream carries {len(stray)} block(s) that no tree of its "
                      f"snapshots reaches (the first is "
                      f"{int(selection.members()[stray[0]])})")


class _EntryCheck:
    """`_check_install` for the trees of one snapshot the stream brings. What its trees
    reach is kept by rank in the selection (`seen`, a byte per block: no sort of the
    pointers on the way) and, outside it, in a plane (`seen_outside`, few blocks)."""

    def __init__(self, vol: Volume, entry: SnapEntry, selection: Plane, kept: Plane,
                 got: Arrived) -> None:
        self.vol, self.entry, self.selection, self.kept, self.got = (
            vol, entry, selection, kept, got)
        self.what = f"snapshot {entry.name!r} of the stream"
        try:
            self.plane = plane_of(vol, entry)
        except SnapvolError as err:
            raise Refused(f"the plane of {self.what} cannot be read: {err}") from None
        self.seen = np.zeros(got.ranks.total, dtype=bool)
        self.seen_outside = Plane.zeros(vol.nblocks)

    def run(self, reach: Reach, whole: bool) -> None:
        """Walk this snapshot's trees; `whole` when no other walk entered any of its
        blocks before, so `seen` ends as all it reaches in the selection."""
        vol = self.vol
        extra = difference(difference(self.plane, self.selection), self.kept)
        extra.clear_range(0, min(FIRST_DATA_VBN, vol.nblocks))
        if extra.count():
            raise Refused(f"the plane of {self.what} holds block {int(extra.members()[0])}, "
                          "which neither the stream nor a snapshot this destination keeps "
                          "holds")
        for name, root in zip(TREE_NAMES, self.entry.trees, strict=True):
            vbn = root.ptr.vbn
            if not vbn or self.selection.test(vbn):
                continue  # a hole, or read and verified by the walk
            self._foreign(np.array([vbn], dtype=np.uint64))
            try:
                vol.io.read(vbn, root.ptr.csum)
            except SnapvolError:
                raise Refused(f"the root of {name} of {self.what} names block {vbn} with "
                              "a checksum the block does not have") from None
        try:
            reach.walk(image_trees(self.entry.trees), self.inside, self.outside)
        except DamagedBlock as err:
            raise Refused(f"the trees of {self.what} are damaged: {err}") from None
        mine = intersection(self.plane, self.selection)
        if whole and int(np.count_nonzero(self.seen)) != mine.count():
            ranks = self.got.ranks.of(mine.members())
            unreached = mine.members()[~self.seen[ranks]]
            raise Refused(f"the plane of {self.what} holds block {int(unreached[0])}, "
                          "which its trees do not reach")
        # The file system must open: the inode map and a root directory.
        image = InodeFile(vol.io, self.entry.inode_file)
        try:
            ok = image.exists(INOMAP_INO) and image.node(ROOT_INO).inode.is_dir
        except (SnapvolError, ValueError):
            ok = False
        if not ok:
            raise Refused(f"the inode file of {self.what} has no inode map or no root "
                          "directory")

    def _twice(self, vbn: int) -> Refused:
        return Refused(f"the trees of {self.what} reach block {vbn} twice")

    def _in_plane(self, vbns: np.ndarray) -> None:
        alien = ~self.plane.test_many(vbns)
        if alien.any():
            raise Refused(f"the trees of {self.what} reach block {int(vbns[alien][0])}, "
                          "which its plane does not hold")

    def inside(self, vbns: np.ndarray, csums: np.ndarray, level: int) -> None:
        got = self.got
        ranks = got.ranks.of(vbns)
        wrong = got.csums[ranks] != csums
        if wrong.any():
            raise Refused(f"block {int(vbns[wrong][0])} of {self.what} arrived with other "
                          "contents than its tree says (damaged or forged data)")
        seen = self.seen
        again = seen[ranks]
        if again.any():
            raise self._twice(int(vbns[again][0]))
        lo, hi = int(ranks.min()), int(ranks.max()) + 1
        if hi - lo <= 4 * len(ranks) + 4096:
            # The usual case, runs of blocks: count what the batch set in its span, so a
            # block named twice in it costs no sort to find.
            before = int(np.count_nonzero(seen[lo:hi]))
            seen[ranks] = True
            if int(np.count_nonzero(seen[lo:hi])) - before != len(ranks):
                once, count = np.unique(ranks, return_counts=True)
                raise self._twice(int(vbns[ranks == once[count > 1][0]][0]))
        else:
            once, count = np.unique(ranks, return_counts=True)
            if (count > 1).any():
                raise self._twice(int(vbns[ranks == once[count > 1][0]][0]))
            seen[ranks] = True
        self._in_plane(vbns)

    def _foreign(self, vbns: np.ndarray) -> None:
        foreign = ~self.kept.test_many(vbns)
        if foreign.any():
            raise Refused(f"the trees of {self.what} lead to block {int(vbns[foreign][0])}, "
                          "which neither the stream nor a snapshot this destination keeps "
                          "holds")

    def outside(self, vbns: np.ndarray, csums: np.ndarray, level: int) -> None:
        self._foreign(vbns)
        vbns = np.sort(vbns)
        again = vbns[1:][vbns[1:] == vbns[:-1]]
        if len(again) or self.seen_outside.test_many(vbns).any():
            raise self._twice(int(again[0]) if len(again) else
                              int(vbns[self.seen_outside.test_many(vbns)][0]))
        self.seen_outside.set_many(vbns)
        self._in_plane(vbns)


def _refuse(vol: Volume, items: tuple[TableItem, ...], why: str) -> StreamError:
    """Refuse a stream whose trees failed `_check_install`, leaving the destination as it
    was: the blocks it brought are discarded (its pin released), unless the receive
    overwrote blocks of the current state (a shadow base): then it stays pending, to be
    finished from a sound source."""
    name = next(i.entry.name for i in items if i.role == ROLE_TOP)
    if vol.receive_flags & RECEIVE_UPDATING:
        # Nothing received is trusted: the next try rewrites every block.
        vol.set_receive_done(0)
        vol.cp(force=True)
        return StreamError(
            f"{vol.path}: the stream is refused: {why}; nothing was installed, and the "
            f"partial receive of {name!r} stays (it overwrote blocks of the previous "
            f"state, so it cannot be discarded): send it again whole from a sound source "
            f"with 'snapvol send SOURCE {name} --base BASE --resume {resume_token(vol)}'")
    vol.cp()
    _release(vol)
    return StreamError(f"{vol.path}: the stream is refused: {why}; nothing was installed "
                       f"and the blocks it brought were discarded: {vol.path} keeps its "
                       "previous state")


def _checkpoint(vol: Volume, written_to: int) -> None:
    """Make every block below `written_to` durable, then record that in the root."""
    vol.dev.flush()
    if written_to > vol.receive_done:
        vol.set_receive_done(written_to)
        vol.cp(force=True)


def leaving(vol: Volume, kept: set[bytes]) -> list[SnapEntry]:
    """The snapshots of `vol` that a receive bringing the regular snapshots with GUIDs
    `kept` drops: every other one, and every shadow (see `_switch`)."""
    return [e for e in vol.snapshots.entries() if e.shadow or e.guid not in kept]


def refuse_local_drops(vol: Volume, going: list[SnapEntry], source: str = "the source"
                       ) -> None:
    """Refuse (naming them) to drop snapshots taken on `vol` itself: their data may exist
    nowhere else (a failback after the volume diverged, say)."""
    local = [e.name for e in going if not e.received]
    if local:
        names = ", ".join(repr(n) for n in local)
        raise VolumeError(
            f"{vol.path} holds snapshot(s) {names} taken there, which {source} does not hold "
            "and this receive would drop; copy out what you need (snapvol get "
            f"{vol.path} PATH DEST --snapshot NAME), then run again with --drop-local")


def _stream_kept(items: tuple[TableItem, ...]) -> set[bytes]:
    return {i.entry.guid for i in items if not i.entry.shadow}


def _check_and_pin(vol: Volume, header: StreamHeader, items: tuple[TableItem, ...],
                   selection: Plane, drop_local: bool) -> tuple[bool, list[str]]:
    """Check the stream against the destination and, for a new receive, pin its blocks.
    Returns (resuming?, destination snapshots dropped). Raises before writing anything."""
    path = vol.path
    top = next(i.entry for i in items if i.role == ROLE_TOP)
    state = _state(vol)
    if state is not None:
        old, old_items = state
        token = resume_token(vol)
        if (old.snap_guid, old.base_guid) != (header.snap_guid, header.base_guid):
            name = next(i.entry.name for i in old_items if i.role == ROLE_TOP)
            raise VolumeError(
                f"{path} has a partial receive of snapshot {name!r}; finish it with "
                f"'snapvol send SOURCE {name} [--base BASE] --resume {token}' or discard it "
                f"with 'snapvol receive --abort {path}'")
        if encode_table(list(old_items)) != encode_table(list(items)) or (
                not vol.pinned_is(selection)):
            raise StreamError(f"the stream differs from the partial receive on {path} (the "
                              "source's snapshots changed since); discard it with "
                              f"'snapvol receive --abort {path}' and send again")
        if header.incremental:
            _check_base(vol, items, {e.guid: e for e in vol.snapshots.slots.values()})
        if header.resume_from > vol.receive_done:
            raise StreamError(f"the stream resumes at block {header.resume_from} but {path} "
                              f"holds the blocks below {vol.receive_done} only; send with "
                              f"--resume {token}")
        if not drop_local:
            refuse_local_drops(vol, leaving(vol, _stream_kept(items)))
        return True, []
    if header.resume_from:
        raise StreamError(f"the stream finishes an interrupted receive, but {path} has none "
                          "pending (it completed or was aborted); send the whole stream")
    table = vol.snapshots
    by_guid = {e.guid: e for e in table.slots.values()}
    if top.guid in by_guid:
        raise VolumeError(f"{path} already holds snapshot {by_guid[top.guid].name!r} "
                          f"(GUID {_guid(top.guid)}); nothing to receive")
    vol.cp()
    if header.incremental:
        _check_base(vol, items, by_guid)
    elif len(table) or any(True for _ in vol.active.readdir(vol.active.node(ROOT_INO))):
        raise VolumeError(f"{path} is not empty: a full stream goes to an empty volume (no "
                          "files, no snapshots); receive into a new image with --create, "
                          "or send an increment from a snapshot both hold")
    going = leaving(vol, _stream_kept(items))
    if not drop_local:
        refuse_local_drops(vol, going)
    dropped = []
    for e in going:
        # The source does not hold it, so it may have reused its blocks: it must go
        # before they are overwritten (it goes at the switch anyway).
        if e.shadow or planefile.overlaps(vol.io, e.active_plane, selection):
            snapshots.delete(vol, e.name)
            dropped.append(e.name)
    if not header.incremental:
        # The destination's few blocks (an empty file system) go, so none of them sits
        # where the stream's land; a new empty file system is placed by the next CP.
        vol.install_image(TreeRoot(), vol.image_plane(None))
        vol.empty_file_system(time.time_ns())
    _pin(vol, header, items, selection)
    vol.cp(force=True)
    if not header.shadow_base and intersection(
            union(vol.active_plane, vol.summary_plane), selection).count():
        _release(vol)
        raise VolumeError(f"{path}: blocks in use collide with the stream's blocks; the "
                          "destination is not a mirror of this source (nothing was written)")
    return False, dropped


def _check_base(vol: Volume, items: tuple[TableItem, ...], by_guid: dict[bytes, SnapEntry]
                ) -> None:
    path = vol.path
    base = next(i.entry for i in items if i.role == ROLE_BASE)
    mine = by_guid.get(base.guid)
    if mine is None:
        names = ", ".join(e.name for e in vol.snapshots.entries()) or "none"
        raise VolumeError(
            f"{path} does not hold the base snapshot {base.name!r} (GUID {_guid(base.guid)}); "
            f"send an increment from a snapshot it holds ({names}) or a full stream")
    if mine.shadow:
        raise VolumeError(f"{path} holds the base {mine.name!r} only as a shadow snapshot; "
                          "an increment needs it as a regular snapshot")
    if not base.shadow and mine.trees != base.trees:
        raise VolumeError(f"snapshot {mine.name!r} on {path} has the base's GUID but other "
                          "contents: the destination is not a mirror of this source")
    if vol.root.inode_file != mine.inode_file:
        raise VolumeError(f"{path} has changed since snapshot {mine.name!r}; roll it back with "
                          f"'snapvol snap restore {path} {mine.name}' and receive again")
    for item in items:
        if item.role != ROLE_HELD:
            continue
        held = by_guid.get(item.entry.guid)
        if held is None and item.required:
            raise VolumeError(
                f"{path} lacks snapshot {item.entry.name!r} (GUID {_guid(item.entry.guid)}), "
                "which this increment relies on (the source restored it since); send a full "
                "stream into a new image")
        if held is not None and held.trees != item.entry.trees:
            raise VolumeError(f"snapshot {held.name!r} on {path} differs from the source's "
                              "snapshot of the same GUID")


def _release(vol: Volume) -> None:
    """Drop the pin and the receive state in one CP."""
    vol.release_pin()
    vol.cp(force=True)


def abort(vol: Volume) -> None:
    """Discard a partial receive: free its pinned blocks; the volume keeps its state."""
    with vol.mutex:
        if not vol.receive_blocks:
            raise VolumeError(f"{vol.path} has no partial receive to abort")
        if not vol.writable or vol.alloc is None:
            raise VolumeError(f"{vol.path} is open read-only")
        if vol.receive_flags & RECEIVE_UPDATING:
            raise VolumeError(
                f"the partial receive on {vol.path} is incremental from a shadow snapshot, "
                "so it has overwritten blocks of the previous state: it cannot be aborted, "
                f"only finished (the token is {resume_token(vol)})")
        vol.cp()
        _release(vol)


def _switch(vol: Volume, items: tuple[TableItem, ...]) -> tuple[SnapEntry, str | None,
                                                                list[str]]:
    """The one CP that makes the received snapshot the destination's state. Returns the
    received snapshot's entry, the base's name and the destination snapshots dropped.

    The new table is the stream's: a snapshot the destination already holds (by GUID,
    regular on both sides) keeps its own entry (its id and flags) under the source's
    name; every other entry arrives with the received flag and a new id of this volume,
    since the source's ids may be ids this volume used before (FUSE inode numbers are
    made from them). The destination's other snapshots are dropped."""
    vol.cp()
    table = vol.snapshots
    by_guid = {e.guid: e for e in table.slots.values() if not e.shadow}
    top_guid = next(i.entry.guid for i in items if i.role == ROLE_TOP)
    base_name = None
    entries: list[SnapEntry] = []
    arrived: list[SnapEntry] = []
    for item in items:
        e = item.entry
        mine = by_guid.get(e.guid)
        if item.role in (ROLE_BASE, ROLE_HELD) and (mine is None or e.shadow):
            # Never received here, so its blocks are not all here; or a shadow base,
            # whose blocks the increment may have overwritten (R6).
            continue
        if mine is not None and not e.shadow:
            e = replace(mine, name=e.name)
            if item.role == ROLE_BASE:
                base_name = e.name
            entries.append(e)
        else:
            arrived.append(e)
    # New ids in CP order, so ids keep sorting the way the snapshots were taken.
    arrived.sort(key=lambda e: e.cp_count)
    for e in arrived:
        flags = (e.flags & (SNAP_IN_USE | SNAP_REPLICA)) | SNAP_RECEIVED
        entries.append(replace(e, snap_id=table.take_id(), flags=flags))
    entries.sort(key=lambda e: (e.cp_count, e.snap_id))
    kept = {e.guid for e in entries}
    dropped = [e.name for e in table.entries() if e.shadow or e.guid not in kept]
    top = next(e for e in entries if e.guid == top_guid)
    new_summary = planefile.union_of(vol.io, [e.active_plane for e in entries], vol.nblocks)
    vol.install_image(top.inode_file, vol.image_plane(top), new_summary,
                      SnapshotTable(dict(enumerate(entries)), table.next_id))
    del new_summary
    vol.release_pin()
    # CP counts order snapshots: the destination's goes past the received ones, so a
    # snapshot taken here later sorts after them (and this volume can send onward).
    vol.advance_cp_count(max(e.cp_count for e in entries))
    vol.cp(force=True)
    return top, base_name, dropped


def remove_failed_image(path: str) -> None:
    """Delete an image `receive --create` made when the stream was refused before any
    block arrived (there is nothing in it worth keeping)."""
    with contextlib.suppress(OSError):
        os.unlink(path)

