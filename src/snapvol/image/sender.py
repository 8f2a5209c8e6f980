"""Sending: choose blocks by plane algebra, stream them with their VBNs.

A full stream of SNAP selects SNAP's plane plus the planes of every older snapshot the
source still holds (LS = A1 + A2 + ..., the reference's level-0 image), so every snapshot
that SNAP's CP knew arrives complete. An incremental stream subtracts BASE and every
snapshot older than BASE (LD = LS - B): by the invariant S_i ∩ S_k ⊆ S_j a block of an
older snapshot still in use is in BASE, and one that came back by a restore is in the
older snapshot, which the destination holds; so one subtraction of held planes is exact.

Only the blocks selected are read, with one positioned read per BLOCKS record (up to
1 MiB of contiguous VBNs), and every one is checked against the checksum of the pointer
that leads to it (DESIGN.md §3.3), as `zfs send` reads through the verifying read path: a
damaged block stops the send, naming the block and the files that use it, instead of
travelling to the mirror as valid data. The checksums come from the trees of the
snapshots the stream brings, walked only inside the selection (engine/reach.py): a
subtree outside it is held by BASE, so the walk reads a part of the metadata in
proportion to the stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import IO

import numpy as np
import numpy.typing as npt

from snapvol.engine import planefile
from snapvol.engine.blockio import BlockIO
from snapvol.engine.compare import users
from snapvol.engine.reach import DamagedBlock, Ranks, Reach, image_trees
from snapvol.engine.snapshots import plane_of
from snapvol.engine.snaptable import SnapshotError
from snapvol.engine.volume import Volume
from snapvol.errors import CorruptionError
from snapvol.layout.checksum import first_bad_block
from snapvol.layout.constants import BLOCK_SIZE, FIRST_DATA_VBN
from snapvol.layout.snaptable import SnapEntry
from snapvol.planes import Plane
from snapvol.planes.algebra import difference_into, runs
from snapvol.streams.imagestream import (
    END_PAYLOAD,
    HDR_INCREMENTAL,
    HDR_RESUMED,
    HDR_SHADOW_BASE,
    HEADER_PAYLOAD,
    MAX_PLANE_RUN,
    MAX_RUN,
    ROLE_BASE,
    ROLE_CARRIED,
    ROLE_HELD,
    ROLE_TOP,
    Encoder,
    StreamHeader,
    TableItem,
    blocks_record_payload,
    decode_token,
    plane_record_payload,
    record_size,
    table_payload,
)

Progress = Callable[[int, int], None]
"""Told (bytes done, bytes in all) as a transfer goes."""


class SendError(CorruptionError):
    """A block the send would carry fails its check on the source: the send stops."""

ZERO_GUID = bytes(16)


@dataclass(frozen=True, slots=True)
class SendPlan:
    """Everything a send will do, computed from planes alone: `nbytes` is the exact size
    of the stream and `nblocks` the blocks it carries."""

    header: StreamHeader
    items: tuple[TableItem, ...]
    plane: Plane  # the selection (the whole transfer, even when resuming)
    starts: npt.NDArray[np.uint64]  # first VBN of each BLOCKS record
    counts: npt.NDArray[np.int64]  # blocks in each BLOCKS record
    nblocks: int
    nbytes: int

    @property
    def snap(self) -> SnapEntry:
        return next(i.entry for i in self.items if i.role == ROLE_TOP)

    @property
    def base(self) -> SnapEntry | None:
        return next((i.entry for i in self.items if i.role == ROLE_BASE), None)


def _choose(vol: Volume, snap: str, base: str | None) -> tuple[list[TableItem], Plane, int]:
    table = vol.snapshots
    top = table.get(snap)
    if top.shadow:
        raise SnapshotError(f"snapshot {snap!r} is a shadow snapshot: it has no tree to "
                            "send; send a regular snapshot (a shadow can only be a --base)")
    flags = 0
    base_entry = None
    if base is not None:
        base_entry = table.get(base)
        if base_entry.guid == top.guid or base_entry.cp_count >= top.cp_count:
            raise SnapshotError(f"base {base!r} is not older than {snap!r}: an incremental "
                                "stream goes from an older snapshot to a newer one")
        flags |= HDR_INCREMENTAL | (HDR_SHADOW_BASE if base_entry.shadow else 0)
    items = [TableItem(ROLE_TOP, top)]
    # The planes are read one file at a time into at most three planes (selection, the
    # held union, BASE's), however many snapshots the volume holds (engine/planefile.py).
    selection = plane_of(vol, top)
    held: list[int] = []
    for e in table.regular():
        if e.cp_count >= top.cp_count or e.guid == top.guid:
            continue
        if base_entry is not None and e.guid == base_entry.guid:
            continue
        if base_entry is None or e.cp_count > base_entry.cp_count:
            items.append(TableItem(ROLE_CARRIED, e))
            planefile.or_into(selection, vol.io, e.active_plane)
        else:
            items.append(TableItem(ROLE_HELD, e))
            held.append(len(items) - 1)
    if base_entry is not None:
        items.append(TableItem(ROLE_BASE, base_entry))
        difference_into(selection, plane_of(vol, base_entry))
        held_union = Plane.zeros(vol.nblocks)
        for i in held:
            plane = items[i].entry.active_plane
            # Held snapshots' blocks are in BASE unless a restore brought them back; then
            # the destination must hold that snapshot, as the stream leaves them out.
            if planefile.overlaps(vol.io, plane, selection):
                items[i] = replace(items[i], required=True)
            planefile.or_into(held_union, vol.io, plane)
        difference_into(selection, held_union)
    # The superblock and the root slots belong to each volume; never sent.
    selection.clear_range(0, FIRST_DATA_VBN)
    return items, selection, flags


def _records(run_starts: npt.NDArray[np.uint64], run_lens: npt.NDArray[np.int64]
             ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """Split runs of VBNs into BLOCKS records of at most MAX_RUN blocks."""
    if run_starts.size == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    nrec = (run_lens + MAX_RUN - 1) // MAX_RUN
    first = np.repeat(np.cumsum(nrec) - nrec, nrec)
    k = np.arange(int(nrec.sum()), dtype=np.int64) - first
    starts = np.repeat(run_starts, nrec) + (k * MAX_RUN).astype(np.uint64)
    counts = np.minimum(MAX_RUN, np.repeat(run_lens, nrec) - k * MAX_RUN)
    return starts, counts


def plan(vol: Volume, snap: str, base: str | None = None,
         resume: str | None = None) -> SendPlan:
    """What `send` would stream, without reading a block: the selection, the records and
    the exact byte size (`snapvol send --dry-run`)."""
    with vol.mutex:
        items, selection, flags = _choose(vol, snap, base)
    top = items[0].entry
    base_guid = next((i.entry.guid for i in items if i.role == ROLE_BASE), ZERO_GUID)
    resume_from = 0
    if resume is not None:
        snap_guid, token_base, resume_from = decode_token(resume)
        if snap_guid != top.guid or token_base != base_guid:
            want = f"--base {base}" if base else "no --base"
            raise SnapshotError(f"resume token is for another transfer (not snapshot {snap!r} "
                                f"with {want}); run 'snapvol info DEST --json' for its token")
        if resume_from > vol.nblocks:
            raise SnapshotError("resume token points past the end of the volume")
        flags |= HDR_RESUMED
    # From runs of the selection, not from a VBN per selected block (8 bytes a block).
    starts, counts = _records(*runs(selection, resume_from))
    header = StreamHeader(vol.sb.uuid, vol.nblocks, top.guid, base_guid, selection.count(),
                          resume_from, flags, len(items), time.time_ns())
    nonzero = int(selection.nonzero_blocks().size)
    full, rest = divmod(nonzero, MAX_PLANE_RUN)
    plane_bytes = full * record_size(plane_record_payload(MAX_PLANE_RUN))
    plane_bytes += record_size(plane_record_payload(rest)) if rest else 0
    nblocks = int(counts.sum())
    nbytes = (record_size(HEADER_PAYLOAD) + record_size(table_payload(len(items)))
              + plane_bytes + len(starts) * record_size(blocks_record_payload(0))
              + nblocks * BLOCK_SIZE + record_size(END_PAYLOAD))
    return SendPlan(header, tuple(items), selection, starts, counts, nblocks, nbytes)


def send(vol: Volume, snap: str, base: str | None = None,
         resume: str | None = None) -> Iterator[bytes | bytearray]:
    """The image stream of `snap` (incremental from `base`, or the rest of an interrupted
    transfer given its resume token), as chunks to write out in order."""
    p = plan(vol, snap, base, resume)
    return stream_plan(vol, p)


def stream_plan(vol: Volume, p: SendPlan, io: BlockIO | None = None,
                ) -> Iterator[bytes | bytearray]:
    """The chunks of a planned stream. The snapshots read from are immutable while the
    caller holds the volume, so the blocks cannot change under the stream (R1).
    Metadata is read through `io` (the volume's own by default): a send that runs on a
    thread of its own beside other users of the volume (the owner's `send`) gives it a
    `BlockIO` of its own, whose cache no other thread touches.

    Each BLOCKS record is one new buffer: the device reads the run straight into it
    between its frame and its checksum, and the run's blocks are checked against their
    pointers' checksums there, in one call into C; so a consumer writes one chunk per
    record and nothing copies the data in user space (each chunk stays valid after the
    next one). A block that fails raises SendError before its record is handed out."""
    io = vol.io if io is None else io
    expected = expected_checksums(vol, p, io)
    at = Ranks(p.plane).of(p.starts).tolist() if len(p.starts) else []
    enc = Encoder()
    yield from enc.header(p.header)
    yield from enc.table(list(p.items))
    yield from enc.plane(p.plane)
    dev = vol.dev
    for vbn, count, rank in zip(p.starts.tolist(), p.counts.tolist(), at, strict=True):
        want = expected[rank : rank + count]

        def fill(view: memoryview, vbn: int = vbn, want: np.ndarray = want) -> None:
            dev.readv(vbn, [view])
            bad = first_bad_block(view, vbn, want)
            if bad >= 0:
                raise _damaged(vol, p, vbn + bad, f"fails its checksum (expected "
                                                  f"{int(want[bad]):016x})", io)

        yield enc.blocks_filled(vbn, count, fill)
    yield from enc.end(p.nblocks)


def _sent_entries(p: SendPlan) -> list[SnapEntry]:
    """The snapshots whose trees the stream carries: SNAP, then the older ones."""
    return [i.entry for i in p.items if i.role in (ROLE_TOP, ROLE_CARRIED)]


def expected_checksums(vol: Volume, p: SendPlan, io: BlockIO | None = None) -> np.ndarray:
    """The checksum each selected block must have, by rank in the selection: from the
    pointers of the trees of the snapshots the stream brings, walked inside the
    selection (every indirect and inode-file block on the way is read and verified).
    Every selected block must be reached, and with one checksum."""
    io = vol.io if io is None else io
    sel = p.plane
    ranks = Ranks(sel)
    expected = np.zeros(ranks.total, dtype=np.uint64)
    seen = np.zeros(ranks.total, dtype=bool)  # by rank, as `expected`

    def visit(vbns: np.ndarray, csums: np.ndarray, level: int) -> None:
        r = ranks.of(vbns)
        again = seen[r]
        if again.any():  # shared with a snapshot walked before: the same pointer
            differ = expected[r[again]] != csums[again]
            if differ.any():
                raise _damaged(vol, p, int(vbns[again][differ][0]),
                               "is named by two pointers with different checksums", io)
        expected[r] = csums
        differ = expected[r] != csums  # named twice in this batch, with two checksums
        if differ.any():
            raise _damaged(vol, p, int(vbns[differ][0]),
                           "is named by two pointers with different checksums", io)
        seen[r] = True

    reach = Reach(io, vol.nblocks, within=sel)
    try:
        for entry in _sent_entries(p):
            reach.walk(image_trees(entry.trees), visit)
    except DamagedBlock as err:
        raise _damaged(vol, p, err.vbn, err.why, io) from None
    if not seen.all():
        missing = np.flatnonzero(~seen)
        raise SendError(
            f"{vol.path}: block {int(sel.members()[missing[0]])} is in the plane of snapshot "
            f"{p.snap.name!r} (or of one it carries) but no tree of theirs reaches it, and "
            f"{len(missing)} block(s) like it: the planes are damaged, so the send stopped "
            f"before writing anything; check the volume with 'snapvol fsck {vol.path}'")
    return expected


def _damaged(vol: Volume, p: SendPlan, vbn: int, what: str, io: BlockIO) -> SendError:
    """The error that stops a send at block `vbn`, naming what uses it."""
    names: list[str] = []
    for entry in _sent_entries(p):
        names = users(io, vol.nblocks, entry.trees, [vbn]).get(vbn, [])
        if names:
            where = f"used by {', '.join(names)} in snapshot {entry.name!r}"
            break
    else:
        where = f"in snapshot {p.snap.name!r}"
    return SendError(
        f"{vol.path}: block {vbn} {what} ({where}): the source is damaged there and the send "
        "stopped, so the damage does not travel; restore or delete what uses it, and check "
        f"the volume with 'snapvol fsck {vol.path}'")


def write_plan(vol: Volume, p: SendPlan, out: IO[bytes],
               progress: Progress | None = None) -> int:
    """Write a planned stream to `out`, telling `progress`; the bytes written."""
    done = 0
    for chunk in stream_plan(vol, p):
        out.write(chunk)
        done += len(chunk)
        if progress is not None:
            progress(done, p.nbytes)
    out.flush()
    return done
