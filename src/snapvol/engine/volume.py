"""A volume: the superblock, the two root slots, the planes, consistency points.

A CP (DESIGN.md §3.2) gives every change a new place: user files and directories first,
then the inode file, then the snapshot table and the summary plane, and last the active
plane, which is iterated to a fixed point because placing its own blocks changes its bits.
All those blocks are written and flushed before the root record goes to the older slot.

`Volume` owns its state (DESIGN.md §2): its fields are read-only from outside, and the
engines that change what a volume holds (a restore, a receive) do it through the few
operations in "state transitions" below (`install_image`, `pin` / `release_pin`,
`set_receive_done`, `advance_cp_count`, `table_changed`), each of which keeps its
invariants in one place; tests/test_layering.py fails on an assignment from outside.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import stat
import threading
import time
import typing
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from types import TracebackType

import numpy as np

from snapvol.device import Device, FileDevice, create_image, remove_created
from snapvol.device.lock import VolumeLock
from snapvol.engine import shadows
from snapvol.engine.allocator import Allocator
from snapvol.engine.blockio import BlockIO, WriteBatch
from snapvol.engine.cpwriter import CPWriter
from snapvol.engine.inodefile import INODE_FLAG_SYSTEM, InodeFile
from snapvol.engine.metafile import load_plane, root_of, tree_of, tree_vbns
from snapvol.engine.snaptable import SnapshotError, SnapshotTable
from snapvol.engine.tree import ZERO_BLOCK, BlockTree
from snapvol.errors import FsError, SnapvolError, VolumeError
from snapvol.layout.constants import (
    BLOCK_SIZE,
    FIRST_DATA_VBN,
    INOMAP_INO,
    MAX_VOLUME_BLOCKS,
    MIN_VOLUME_BLOCKS,
    ROOT_INO,
    ROOT_SLOT_VBNS,
    SUPERBLOCK_VBN,
)
from snapvol.layout.records import (
    RECEIVE_UPDATING,
    RecordError,
    RootRecord,
    Superblock,
    TreeRoot,
    probe_cp_count,
    slot_of,
)
from snapvol.layout.snaptable import SnapEntry
from snapvol.planes import Plane, difference, union
from snapvol.planes.algebra import count_difference, difference_into
from snapvol.planes.plane import WORDS_PER_PLANE_BLOCK, plane_blocks_for

log = logging.getLogger("snapvol.engine")
_T = typing.TypeVar("_T")

MIN_BLOCKS = MIN_VOLUME_BLOCKS
DEFAULT_CP_INTERVAL = 10.0
MIN_CP_INTERVAL = 0.1
MAX_CP_INTERVAL = 86400.0
"""The CP timer's range in seconds: more often only adds CPs without making more data
safe than fsync does; a day already leaves a crash to lose a day of unsynced changes."""
CP_TIMER_TICK = 1.0
"""The CP timer looks at the clock at least this often (and 4 times per interval)."""
DEFAULT_DIRTY_LIMIT = 256 << 20
DIRTY_INODE_LIMIT = 100_000  # changed inodes that trigger a CP (they hold memory until one)


@dataclass(frozen=True, slots=True)
class SlotState:
    """What one root slot held when the volume was opened."""

    vbn: int
    cp_count: int | None
    """The CP of a valid record; for a damaged one the count its bytes claim (unverified,
    None when not even the magic is there)."""
    problem: str | None = None
    """Why the slot is not a valid root of this volume; None when it is (or blank)."""
    blank: bool = False
    """All zeros: never written (a volume made before format wrote both slots), or wiped."""

    @property
    def valid(self) -> bool:
        return self.problem is None and not self.blank


def read_root_slots(dev: Device, sb: Superblock, path: str,
                    ) -> tuple[RootRecord, tuple[SlotState, ...]]:
    """Read both root slots and choose the valid record with the higher CP count
    (DESIGN.md invariant 2); VolumeError when neither is valid."""
    best: RootRecord | None = None
    states = []
    for vbn in ROOT_SLOT_VBNS:
        data = dev.read(vbn)
        if not any(data):
            states.append(SlotState(vbn, None, blank=True))
            continue
        try:
            rec = RootRecord.decode(data, slot=vbn)
            if rec.uuid != sb.uuid:
                raise RecordError("root record of another volume (its UUID is not the "
                                  "superblock's)")
            if rec.nblocks != sb.nblocks:
                raise RecordError(f"root record of a volume of {rec.nblocks} blocks, the "
                                  f"superblock says {sb.nblocks}")
        except RecordError as e:
            states.append(SlotState(vbn, probe_cp_count(data), str(e)))
            continue
        states.append(SlotState(vbn, rec.cp_count))
        if best is None or rec.cp_count > best.cp_count:
            best = rec
    if best is None:
        said = "; ".join(f"slot {st.vbn}: {'all zeros' if st.blank else st.problem}"
                         for st in states)
        raise VolumeError(f"{path}: no valid root record ({said}); the image is damaged")
    return best, tuple(states)


def slot_problems(root: RootRecord, slots: tuple[SlotState, ...]) -> list[str]:
    """One line per root slot that is not as a healthy volume leaves it, saying which CP
    was opened instead and what may be lost. A slot that fails its check because a crash
    tore its write reads exactly like a damaged one, so the words cover both."""
    out = []
    c = root.cp_count
    for st in slots:
        if st.valid or (st.blank and c == 1):
            continue
        where = f"root slot {st.vbn}"
        if st.blank:
            out.append(f"{where} is all zeros: it held the older CP {c - 1} or a newer CP; "
                       f"CP {c} was opened instead (if the slot held a newer CP, its changes "
                       "are lost); the next CP rewrites the slot")
        elif st.cp_count is not None and st.cp_count > c:
            out.append(f"{where} holds CP {st.cp_count} but fails its check ({st.problem}); "
                       f"CP {c} was opened instead: a crash while CP {st.cp_count} was being "
                       "committed leaves this, and then nothing acknowledged is lost; "
                       f"otherwise the slot is damaged and the changes of CP {st.cp_count} "
                       "are lost; the next CP rewrites the slot")
        elif st.cp_count is not None and 0 < st.cp_count < c:
            out.append(f"{where} (the older CP {st.cp_count}) fails its check "
                       f"({st.problem}); the newest CP {c} was opened, nothing is lost, and "
                       "the next CP rewrites the slot")
        else:
            out.append(f"{where} fails its check ({st.problem}) and names no CP that can be "
                       f"trusted: it held the older CP {c - 1} or a newer CP; CP {c} was "
                       "opened instead (if the slot held a newer CP, a crash while writing "
                       "it or damage to the slot lost its changes); the next CP rewrites "
                       "the slot")
    return out


def _replace_words(plane: Plane, new: Plane) -> None:
    """Give `plane` the bits of `new`, marking dirty only the plane blocks that change."""
    rows = plane.words.reshape(-1, WORDS_PER_PLANE_BLOCK)
    want = new.words.reshape(-1, WORDS_PER_PLANE_BLOCK)
    changed = (rows != want).any(axis=1)
    rows[changed] = want[changed]
    plane.mark_dirty_where(changed)


@dataclass(frozen=True, slots=True)
class CPStats:
    cp_count: int
    blocks_written: int
    seconds: float


def check_size(size: int) -> None:
    """VolumeError unless `size` bytes make a volume of MIN_BLOCKS to MAX_VOLUME_BLOCKS."""
    if size < MIN_BLOCKS * BLOCK_SIZE:
        raise VolumeError(f"size {size} is too small: a volume needs at least "
                          f"{MIN_BLOCKS * BLOCK_SIZE // 1024} KiB")
    if size > MAX_VOLUME_BLOCKS * BLOCK_SIZE:
        raise VolumeError(f"size {size} is too large: a volume holds at most "
                          f"{MAX_VOLUME_BLOCKS * BLOCK_SIZE} bytes (4 PiB)")


def check_cp_interval(seconds: float) -> float:
    """`seconds` if it is a CP interval the timer can keep; VolumeError naming the range."""
    if not math.isfinite(seconds) or not MIN_CP_INTERVAL <= seconds <= MAX_CP_INTERVAL:
        raise VolumeError(f"CP interval {seconds} s is out of range: use {MIN_CP_INTERVAL:g} "
                          f"to {MAX_CP_INTERVAL:g} seconds")
    return float(seconds)


class Volume:
    """An open volume. Use `Volume.create` / `Volume.open`, or as a context manager."""

    def __init__(self, dev: Device, path: str, lock: VolumeLock | None,
                 writable: bool, fresh: Superblock | None = None,
                 for_check: bool = False) -> None:
        self._dev = dev
        self._path = path
        self._lock = lock
        self._writable = writable
        self._io = BlockIO(dev)
        self._mutex = threading.RLock()
        self.cp_interval = DEFAULT_CP_INTERVAL
        self.dirty_limit = DEFAULT_DIRTY_LIMIT
        # CPs started by the dirty limit or the timer write in the background (a mount
        # sets this): changes go on while one CP is written, up to the dirty limit again.
        self.background_cp = False
        self._timer: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self._last_cp_time = time.monotonic()
        if for_check and writable:
            raise ValueError("a volume opened for checking is read-only")
        self._load_problems: list[str] = []
        if fresh is not None:
            self._sb, self._nblocks = fresh, fresh.nblocks
            self._root = RootRecord(0, fresh.created_ns, fresh.uuid, fresh.nblocks)
            self._slots: tuple[SlotState, ...] = ()
            self._load(fresh=True)
            return
        if dev.nblocks < FIRST_DATA_VBN:  # not even a superblock and two root slots
            raise VolumeError(f"{path} is not a snapvol volume (only {dev.nblocks} blocks)")
        try:
            self._sb = Superblock.decode(dev.read(SUPERBLOCK_VBN))
        except RecordError as e:
            raise VolumeError(f"{path} is not a snapvol volume ({e})") from None
        if self._sb.nblocks > dev.nblocks:
            raise VolumeError(
                f"{path} is truncated: the volume has {self._sb.nblocks} blocks but the "
                f"image holds {dev.nblocks}"
            )
        self._nblocks = self._sb.nblocks
        self._root, self._slots = read_root_slots(dev, self._sb, path)
        refusal = self._root.features.refusal(writable)
        if refusal is not None:
            raise VolumeError(f"{path} cannot be opened{' for writing' if writable else ''}: "
                              f"{refusal}")
        for problem in slot_problems(self._root, self._slots):
            log.warning("%s: %s", path, problem)
        self._load(tolerant=for_check)

    # ---- state, read-only from outside ----------------------------------------------------
    # The settings `cp_interval`, `dirty_limit` and `background_cp` are plain attributes an
    # owner may set; everything below changes only through this class's own operations.
    @property
    def dev(self) -> Device:
        return self._dev

    @property
    def path(self) -> str:
        return self._path

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def io(self) -> BlockIO:
        """Verified block reads (and the cache) of this volume's device."""
        return self._io

    @property
    def mutex(self) -> threading.RLock:
        """Orders every user of the volume (the engine is synchronous under it)."""
        return self._mutex

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def load_problems(self) -> list[str]:
        """What could not be loaded when opened `for_check` (fsck reports it itself)."""
        return self._load_problems

    @property
    def sb(self) -> Superblock:
        return self._sb

    @property
    def nblocks(self) -> int:
        return self._nblocks

    @property
    def root(self) -> RootRecord:
        """The last committed root record (a CP placed but still being written is not)."""
        return self._root

    @property
    def slots(self) -> tuple[SlotState, ...]:
        """What each root slot holds, as opened and as the CPs since rewrote them."""
        return self._slots

    @property
    def alloc(self) -> Allocator | None:
        """The block allocator; None on a read-only volume."""
        return self._alloc

    @property
    def active(self) -> InodeFile:
        """The active file system: the writable inode file the next CP commits."""
        return self._active

    @property
    def active_plane(self) -> Plane:
        """The blocks of the active image (file system and this volume's metadata files)."""
        return self._active_plane

    @property
    def summary_plane(self) -> Plane:
        """The union of the regular snapshots' planes."""
        return self._summary_plane

    @property
    def snapshots(self) -> SnapshotTable:
        """The snapshot table; after changing an entry, call `table_changed`."""
        return self._snapshots

    @property
    def snap_tree(self) -> BlockTree:
        """The snapshot table file, which also holds the shadow planes (engine/shadows.py)."""
        return self._snap_tree

    @property
    def receive_tree(self) -> BlockTree:
        """The file of a pending receive's state: the selection plane, then `receive_state`."""
        return self._receive_tree

    @property
    def receive_blocks(self) -> int:
        """Blocks in the receive state file; 0 when no receive is pending."""
        return self._receive_blocks

    @property
    def receive_done(self) -> int:
        """The resume point of a pending receive: every selected block below it is durable."""
        return self._receive_done

    @property
    def receive_flags(self) -> int:
        """Flags of a pending receive (RECEIVE_UPDATING: it overwrites the current state)."""
        return self._receive_flags

    # ---- opening ------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int) -> Volume:
        """Make a new volume in a new sparse image file and open it for writing. On any
        failure the file is removed again (only if it is still the one made here)."""
        path = os.fspath(path)
        check_size(size)
        made = create_image(path, size)
        try:
            dev = FileDevice(path, writable=True)
            try:
                cls.format(dev)
            finally:
                dev.close()
            return cls.open(path)
        except BaseException:
            remove_created(path, made)
            raise

    @classmethod
    def format(cls, dev: Device) -> None:
        """Write an empty file system onto `dev` (superblock, root directory, CP 1)."""
        nblocks = dev.nblocks
        if nblocks < MIN_BLOCKS:
            raise VolumeError(f"device too small: {nblocks} blocks, at least {MIN_BLOCKS}")
        if nblocks > MAX_VOLUME_BLOCKS:
            raise VolumeError(f"device too large: {nblocks} blocks, at most "
                              f"{MAX_VOLUME_BLOCKS} (4 PiB)")
        now = time.time_ns()
        sb = Superblock(nblocks, uuidlib.uuid4().bytes, now)
        dev.write(SUPERBLOCK_VBN, sb.encode())
        for vbn in ROOT_SLOT_VBNS:
            dev.write(vbn, ZERO_BLOCK)
        vol = cls(dev, "<format>", None, True, fresh=sb)
        vol.empty_file_system(now)
        vol._snaps_dirty = True
        vol.cp(force=True)
        # CP 2, the same state, fills the other slot: from now on a slot that does not
        # hold a valid record is damage (or a torn write), never "not written yet".
        vol.cp(force=True)

    def empty_file_system(self, now: int) -> None:
        """Make the active image a new, empty file system (the inode map and an empty
        root directory), placed at the next CP. Used by `format`, and by a full image
        receive to move a fresh destination's few blocks away from the incoming ones."""
        self._active = InodeFile(self._io, TreeRoot(), self._alloc, self._reserve_space)
        inomap = self._active.create_reserved(INOMAP_INO, stat.S_IFREG, now)
        inomap.inode.flags = INODE_FLAG_SYSTEM
        rootdir = self._active.create_reserved(ROOT_INO, stat.S_IFDIR | 0o755, now)
        rootdir.inode.nlink = 2
        self._active.format_directory(rootdir, ROOT_INO)

    @classmethod
    def open(cls, path: str | os.PathLike[str], writable: bool = True,
             exclusive: bool | None = None, for_check: bool = False) -> Volume:
        """Open an image; a writer takes the exclusive lock unless `exclusive` is False
        (a receive, which writes only blocks no reader can reach, lets readers stay).
        `for_check` (read-only, for fsck) opens a volume whose planes, snapshot table or
        receive state cannot be loaded, with empty ones in their place and the reasons in
        `load_problems`, so the checker can report the damage and everything else."""
        path = os.fspath(path)
        dev = FileDevice(path, writable=writable)
        try:
            lock = VolumeLock.acquire(dev.fd, path,
                                      exclusive=writable if exclusive is None else exclusive)
        except BaseException:
            dev.close()
            raise
        try:
            return cls(dev, path, lock, writable, for_check=for_check)
        except BaseException:
            lock.release()
            dev.close()
            raise

    @classmethod
    def on_device(cls, dev: Device, writable: bool = True) -> Volume:
        """Open a volume on an already-open device (tests, crash simulation)."""
        return cls(dev, "<device>", None, writable)

    def _read_root(self) -> RootRecord:
        root, _ = read_root_slots(self._dev, self._sb, self._path)
        return root

    @property
    def root_warning(self) -> str | None:
        """What is wrong with the root slots (a slot that failed its check when the
        volume was opened, and that no CP has rewritten since, with the CP opened
        instead), or None."""
        return "; ".join(slot_problems(self._root, self._slots)) or None

    @property
    def updating(self) -> bool:
        """Whether a pending receive is overwriting this volume's current state (its base
        is a shadow snapshot): nothing on it can be read until that receive completes."""
        return bool(self._receive_blocks and self._receive_flags & RECEIVE_UPDATING)

    def has_newer_root(self) -> bool:
        """Whether another process committed a root after the one this volume loaded (a
        receive into an image open read-only here): two block reads, nothing loaded."""
        with self._mutex:
            return self._read_root().cp_count > self._root.cp_count

    def refresh(self) -> bool:
        """Follow commits made by another process: a read-only volume re-reads the two
        root slots and, when a newer committed root is there, loads its planes, snapshot
        table and active image. Returns whether the root changed.

        This is how a read-only mount of a mirror follows `snapvol receive` (which takes
        the shared lock readers take): the receiver switches the root in one write, so a
        newer root is complete and its blocks stay put until the receive after next frees
        them. Cheap when nothing changed (two block reads), so a timer may call it often.
        A torn root write fails its checksum and the older slot wins: nothing changes
        until the write lands. If loading fails (the new root's blocks were reused
        already), the volume keeps its previous state and the error propagates.
        Callers hold no Node across this call; `mutex` orders it against other users."""
        with self._mutex:
            if self._writable:
                raise VolumeError(f"{self._path} is open for writing: it is the only writer, "
                                  "there is nothing to refresh")
            root, slots = read_root_slots(self._dev, self._sb, self._path)
            if root.cp_count <= self._root.cp_count:
                return False
            saved = dict(self.__dict__)
            old_active = self._active
            try:
                self._root, self._slots = root, slots
                self._load()
            except BaseException:
                self.__dict__.clear()
                self.__dict__.update(saved)
                raise
            if root.inode_file == saved["_root"].inode_file:
                self._active = old_active  # same tree (a receive's pin or checkpoint CP)
            return True

    def _load(self, fresh: bool = False, tolerant: bool = False) -> None:
        n = self._nblocks
        if fresh:
            active, summary = Plane.zeros(n), Plane.zeros(n)
            active.set_range(0, FIRST_DATA_VBN)
            for pb in range(active.plane_blocks):
                active.mark_dirty(pb)
                summary.mark_dirty(pb)
        else:
            active = self._tolerate(tolerant, "active plane", lambda: load_plane(
                self._io, self._root.active_plane, n), lambda: Plane.zeros(n))
            summary = self._tolerate(tolerant, "summary plane", lambda: load_plane(
                self._io, self._root.summary_plane, n), lambda: Plane.zeros(n))
        self._alloc = Allocator(n, active, summary) if self._writable else None
        self._active_plane, self._summary_plane = active, summary
        space = self._alloc
        self._active_tree = tree_of(self._io, self._root.active_plane, space)
        self._summary_tree = tree_of(self._io, self._root.summary_plane, space)
        self._snap_tree = tree_of(self._io, self._root.snap_table, space)
        self._snapshots = self._tolerate(tolerant, "snapshot table", lambda: SnapshotTable.load(
            self._snap_tree, self._root.snap_table.nblocks, self._root.next_snap_id),
            lambda: SnapshotTable({}, self._root.next_snap_id))
        if self._alloc is not None:
            self._alloc.watch_reuse = bool(self._snapshots.shadow_slots())
        self._snaps_dirty = False
        self._active = InodeFile(self._io, self._root.inode_file, space,
                            self._reserve_space if space is not None else None)
        self._tolerate(tolerant, "receive state", lambda: self._load_receive(space),
                       lambda: None)

    def _tolerate(self, tolerant: bool, what: str, load: Callable[[], _T],
                  empty: Callable[[], _T]) -> _T:
        """`load()`; when `tolerant` (a volume opened for fsck), a damaged part is noted
        in `load_problems` and `empty()` stands in for it."""
        if not tolerant:
            return load()
        try:
            return load()
        except SnapvolError as e:
            self._load_problems.append(f"{what}: {e}")
            return empty()

    def _load_receive(self, space: Allocator | None) -> None:
        """The state of a partial image-stream receive (snapvol.image.receiver): its file
        starts with the selection plane, whose blocks stay pinned (invariant 5) until
        the receive completes or is aborted, even across close and reopen."""
        r = self._root
        self._receive_tree = tree_of(self._io, r.receive, space)
        self._receive_blocks = r.receive.nblocks
        self._receive_done = r.receive_done
        self._receive_flags = r.receive_flags
        if space is not None and r.receive.nblocks:
            space.pinned = load_plane(self._io, r.receive, self._nblocks)  # pin's selection
            space.recount()

    # ---- space --------------------------------------------------------------------------
    @property
    def meta_reserve(self) -> int:
        """Blocks kept back from file data so deletions can always commit on a full volume."""
        return max(64, min(8192, self._nblocks // 100)) + self._active_plane.plane_blocks

    def _reserve_space(self, n: int, meta: bool) -> None:
        assert self._alloc is not None
        if self._in_cp:
            # Inside a CP the estimate counts the very changes being placed; they were
            # reserved when made, and refusing here would leave the CP half done.
            return
        need = self._active.pending_blocks() + n + (0 if meta else self.meta_reserve)
        if need <= self._alloc.free:
            return
        if (self._alloc.frees_pending or self._active.dirty) and not self._in_cp:
            # Blocks freed since the last CP become free at commit, and committing turns
            # the pessimistic estimate of what is dirty into exact usage.
            self.cp()
            need = self._active.pending_blocks() + n + (0 if meta else self.meta_reserve)
            if need <= self._alloc.free:
                return
        raise FsError(28, f"no space left on volume {self._path} ({self._alloc.free} blocks "
                          "free): delete files or snapshots to make room")

    _in_cp = False

    def usage(self) -> dict[str, int]:
        """Space figures in blocks: total, used (active), snapshot-only, free."""
        used = self._active_plane.count()
        snap_only = count_difference(self._summary_plane, self._active_plane)
        free = self._alloc.free if self._alloc is not None else self._nblocks - used - snap_only
        return {"total": self._nblocks, "used": used, "snapshot_only": snap_only, "free": free}

    # ---- consistency points ----------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        return self._active.dirty or self._snaps_dirty or bool(
            self._summary_plane.dirty_blocks()) or bool(
            self._alloc is not None and self._alloc.frees_pending)

    def cp(self, force: bool = False, background: bool = False) -> CPStats | None:
        """Commit every change as one consistency point. Returns None if nothing changed.

        Returns once the CP is on disk, unless `background`: then the placement is done
        here and the writing goes on in a thread (engine/cpwriter.py) while changes
        continue, and the stats count the placement only. Either way a CP first waits for
        the one before it to be on disk."""
        with self._mutex:
            if not self._writable:
                raise FsError(30, f"{self._path} is open read-only")
            self.wait_cp()
            if not (force or self.dirty):
                return None
            t0 = time.perf_counter()
            count = self._root.cp_count + 1
            self._in_cp = True
            try:
                writer = self._place_cp(background)
            finally:
                self._in_cp = False
            self._writing = writer
            nwritten = len(writer.batch) + 1
            if background:
                writer.start()
            else:
                self._finish_cp(inline=True)
            return CPStats(count, nwritten, time.perf_counter() - t0)

    @property
    def cp_in_flight(self) -> bool:
        """Whether a CP is being written in the background."""
        return self._writing is not None

    def wait_cp(self) -> None:
        """Return once no CP is being written: the last one is committed, or failed (a
        VolumeError that every later CP repeats: what it placed is not on disk, so no
        root may point at it; remounting opens the last committed CP)."""
        with self._mutex:
            if self._failed is None and self._writing is not None:
                # a failure is reported below, in the words every later CP repeats
                with contextlib.suppress(VolumeError):
                    self._finish_cp(inline=False)
            if self._failed is not None:
                raise VolumeError(f"{self._path}: {self._failed}; changes since CP "
                                  f"{self._root.cp_count} are not on disk: unmount and "
                                  "mount again to continue from that CP")

    def sync_target(self) -> int:
        """The CP count whose commit makes every change made so far durable: the next CP
        if anything is dirty, else the one being written, else the last committed one.
        For a sync that waits off the mutex (`sync_step`)."""
        with self._mutex:
            if self.dirty:
                return self._placed_count() + 1
            return self._placed_count()

    def sync_step(self, target: int) -> CPWriter | None:
        """One step towards CP `target` (from `sync_target`) being committed, holding the
        mutex only while placing: None once it is; otherwise the writer of the CP in
        flight, which the caller waits for with `CPWriter.join` away from the mutex
        (a mount's fsync waits on a thread, so other requests go on meanwhile) before the
        next step. A step commits a written CP, then places the next background CP if the
        target is not placed yet. The failure of a CP is raised as by `wait_cp`."""
        with self._mutex:
            writer = self._writing
            if writer is not None:
                if not writer.done:
                    return writer
                self.wait_cp()  # commit it; raises its failure
            if self._root.cp_count >= target:
                return None
            if not self._writable:
                raise FsError(30, f"{self._path} is open read-only")
            self.cp(force=True, background=True)
            return self._writing

    def _placed_count(self) -> int:
        """The count of the newest CP placed: in flight, or else committed."""
        return self._placed_root.cp_count if self._placed_root is not None else (
            self._root.cp_count)

    def _finish_cp(self, inline: bool) -> None:
        writer = self._writing
        assert writer is not None
        self._writing = None
        try:
            writer.run_inline() if inline else writer.wait()
        except BaseException:
            # The placed blocks stay readable from memory (io.pending): files can still
            # be read, and copied elsewhere, though no later CP will be written.
            self._failed = writer.failure()
            raise
        self._io.pending = {}
        assert self._placed_root is not None
        self._root = self._placed_root
        self._placed_root = None
        # The slot just written holds this CP now (a damaged one is healed by it).
        written = slot_of(self._root.cp_count)
        self._slots = tuple(SlotState(st.vbn, self._root.cp_count) if st.vbn == written else st
                           for st in self._slots)
        assert self._alloc is not None
        self._alloc.commit()
        log.info("CP %d committed", self._root.cp_count)

    _writing: CPWriter | None = None
    _placed_root: RootRecord | None = None
    _failed: str | None = None

    def _place_cp(self, background: bool) -> CPWriter:
        """Give every change its place and gather the blocks and root record a CP writes;
        afterwards the in-memory state is the new CP's, and changes start a new one."""
        alloc = self._alloc
        assert alloc is not None
        batch = WriteBatch()
        inode_root = self._active.flush(batch)
        if self._receive_tree.dirty:
            self._receive_tree.prepare()
        if self._snaps_dirty:
            self._snapshots.write_into(self._snap_tree)
        summary = self._summary_plane
        active = self._active_plane
        while True:
            # Blocks handed out so far leave the shadow planes (held in the table file);
            # placing those planes hands out more, hence the loop (engine/shadows.py).
            self._settle_shadows()
            if self._snap_tree.dirty:
                self._snap_tree.prepare()
            self._prepare_plane(self._summary_tree, summary)
            self._prepare_plane(self._active_tree, active)
            if not (alloc.watch_reuse and alloc.has_reused):
                break
        self._receive_tree.encode(batch)
        self._snap_tree.encode(batch)
        self._summary_tree.encode(batch, summary.block_bytes)
        self._active_tree.encode(batch, active.block_bytes)
        root = RootRecord(
            cp_count=self._root.cp_count + 1,
            time_ns=time.time_ns(),
            uuid=self._sb.uuid,
            nblocks=self._nblocks,
            inode_file=inode_root,
            active_plane=root_of(self._active_tree, active.plane_blocks),
            summary_plane=root_of(self._summary_tree, summary.plane_blocks),
            snap_table=root_of(self._snap_tree, self._snapshots.nblocks),
            next_snap_id=self._snapshots.next_id,
            receive=root_of(self._receive_tree, self._receive_blocks),
            receive_done=self._receive_done,
            receive_flags=self._receive_flags,
            features=self._root.features,
        )
        # The plane blocks are encoded: changes from here on belong to the next CP.
        alloc.seal()
        active.mark_clean()
        summary.mark_clean()
        self._snaps_dirty = False
        self._last_cp_time = time.monotonic()
        self._placed_root = root
        if background:
            self._io.pending = batch.contents()
        return CPWriter(self._dev, batch, slot_of(root.cp_count), root.encode())

    def _settle_shadows(self) -> None:
        """Clear the blocks allocated since the last call from every shadow plane."""
        alloc = self._alloc
        assert alloc is not None
        if alloc.watch_reuse and alloc.has_reused:
            shadows.clear_reused(self._snap_tree, self._snapshots.shadow_slots(),
                                 alloc.take_reused(), self._active_plane.plane_blocks)

    def _prepare_plane(self, tree: BlockTree, plane: Plane) -> None:
        """Place the changed blocks of a plane file, to a fixed point for the active plane:
        placing them allocates and frees blocks, which changes more plane blocks.

        An all-zero plane block is kept as a hole, so a huge, mostly empty volume stores
        (and loads) only the plane blocks that hold bits."""
        rows = plane.words.reshape(-1, 512)
        while True:
            cand = np.array(sorted(pb for pb in plane.dirty_blocks()
                                   if (0, pb) not in tree.placed), dtype=np.int64)
            nonzero = rows[cand].any(axis=1) if len(cand) else np.zeros(0, dtype=bool)
            punched = False
            for pb in cand[~nonzero].tolist():
                if tree.data_ptr(pb)[0]:
                    tree.punch_block(pb)
                    punched = True
            pending_nodes = any(k not in tree.placed for k in tree.dirty_nodes)
            if not punched and not nonzero.any() and not pending_nodes:
                return
            tree.prepare(cand[nonzero].tolist())

    def maybe_cp(self) -> None:
        """A CP if the dirty data passed its limit or the timer is due. Called by the POSIX
        layer at the end of each changing operation, when no Node is held."""
        active = self._active
        # Memory held is the larger of the dirty blocks and the write buffers they view.
        held = max(active.dirty_data_blocks * BLOCK_SIZE, active.held_bytes)
        writing = self._writing
        if writing is not None and writing.done:
            self.wait_cp()  # commit it (frees become reusable) as soon as it is on disk
        if held >= self.dirty_limit or len(active.dirty_records) >= DIRTY_INODE_LIMIT or (
            time.monotonic() - self._last_cp_time >= self.cp_interval and self.dirty
        ):
            self.cp(background=self.background_cp)
            self._active.evict_clean()

    def start_cp_timer(self, interval: float | None = None) -> None:
        """Run a CP every `interval` seconds (10 by default) while anything is dirty;
        VolumeError unless the interval is a number in [MIN_CP_INTERVAL, MAX_CP_INTERVAL]."""
        self.cp_interval = check_cp_interval(self.cp_interval if interval is None
                                             else interval)
        if self._timer is not None:
            return
        self._stop.clear()

        def run() -> None:
            while not self._stop.wait(min(self.cp_interval / 4, CP_TIMER_TICK)):
                if time.monotonic() - self._last_cp_time >= self.cp_interval:
                    writer = self._writing
                    if writer is not None:
                        writer.join()  # off the mutex, which requests need meanwhile
                    with self._mutex:
                        if not self._closed and self._failed is None and self.dirty:
                            self.cp(background=self.background_cp)

        self._timer = threading.Thread(target=run, name="snapvol-cp-timer", daemon=True)
        self._timer.start()

    @contextlib.contextmanager
    def hold_committed(self) -> Iterator[RootRecord]:
        """The committed root, kept whole on disk for as long as the block lasts: blocks
        freed meanwhile (by CPs that commit, snapshot deletions, restores) are not handed
        out again until it ends. For a reader that works off the mutex while changes go
        on (the online fsck); space freed meanwhile comes back only when it ends. A
        read-only volume has no allocator: another process (a receive) frees its blocks
        only at the receive after next, so the root stays readable for that long."""
        with self._mutex:
            root = self._root
            if self._alloc is not None:
                self._alloc.hold()
        try:
            yield root
        finally:
            with self._mutex:
                if self._alloc is not None:
                    self._alloc.unhold()

    # ---- snapshots (see snapshots.py) --------------------------------------------------------
    def snapshot_image(self, name: str) -> InodeFile:
        """A read-only view of snapshot `name`."""
        entry = self._snapshots.get(name)
        if entry.shadow:
            raise SnapshotError(
                f"snapshot {name!r} is a shadow snapshot (a bookmark): it keeps a block "
                "plane for incremental transfers but no tree to read; read a regular "
                "snapshot instead")
        return InodeFile(self._io, entry.inode_file)

    # ---- state transitions (what other engines ask for; DESIGN.md §2) ------------------------
    def _writable_alloc(self) -> Allocator:
        if self._alloc is None:
            raise FsError(30, f"{self._path} is open read-only")
        return self._alloc

    def table_changed(self) -> None:
        """The snapshot table changed (an entry added, renamed or removed; a shadow plane
        stored in or dropped from the table file): the next CP writes it. While shadow
        snapshots exist, the allocator records every block it hands out, so the CP clears
        it from their planes (engine/shadows.py)."""
        self._snaps_dirty = True
        if self._alloc is not None:
            self._alloc.watch_reuse = bool(self._snapshots.shadow_slots())

    def image_plane(self, entry: SnapEntry | None) -> Plane:
        """The active plane this volume has once the file system of the regular snapshot
        `entry` is its active image (`install_image`); with None, an empty file system
        whose blocks the next CP allocates. That is the snapshot's plane without the
        snapshot's own metadata files (its saved planes and table, which this volume's
        replace), plus this volume's metadata files and the fixed blocks. Call it right
        after a CP, when the metadata files' blocks are the committed ones."""
        n = self._nblocks
        if entry is None:
            plane = Plane.zeros(n)
        else:
            if entry.shadow:
                raise SnapshotError(f"snapshot {entry.name!r} is a shadow snapshot: it has "
                                    "no file system to install")
            # The snapshot's plane (snapshots.plane_of, which this module cannot import).
            plane = load_plane(self._io, entry.active_plane, n)
            for meta in (entry.active_plane, entry.summary_plane, entry.snap_table):
                plane.clear_many(tree_vbns(self._io, meta))
        for tree in (self._active_tree, self._summary_tree, self._snap_tree,
                     self._receive_tree):
            plane.set_many(tree_vbns(self._io, root_of(tree, 0)))
        plane.set_range(0, FIRST_DATA_VBN)
        return plane

    def install_image(self, inode_file: TreeRoot, active_plane: Plane,
                      summary_plane: Plane | None = None,
                      table: SnapshotTable | None = None) -> None:
        """Make the file system at `inode_file` the active image, with `active_plane`
        (from `image_plane`) as the active plane and, when given, `summary_plane` as the
        summary and `table` as the snapshot table. The caller's next CP commits it all in
        one root write, so a crash leaves the old state or the new one (`snap restore`,
        the switch of a receive).

        Blocks that leave both planes are freed through the deferred plane: the committed
        root still names them until that CP lands. A new table starts without shadow
        snapshots, so the old table's shadow planes are dropped from the table file.
        Call it right after a CP: what is not committed would be lost."""
        alloc = self._writable_alloc()
        if self._writing is not None or self.dirty:
            raise VolumeError(f"{self._path}: an image is installed right after a CP, with "
                              "nothing uncommitted")
        if table is not None and table.shadow_slots():
            raise ValueError("an installed snapshot table holds no shadow snapshots")
        summary = self._summary_plane if summary_plane is None else summary_plane
        gone = union(self._active_plane, self._summary_plane)
        difference_into(gone, union(active_plane, summary))
        _replace_words(self._active_plane, active_plane)
        if summary_plane is not None:
            _replace_words(self._summary_plane, summary_plane)
        alloc.free_many(gone.members())
        if table is not None:
            for slot in self._snapshots.shadow_slots():
                shadows.drop(self._snap_tree, slot, self._active_plane.plane_blocks)
            self._snapshots = table
            self.table_changed()
        self._active = InodeFile(self._io, inode_file, alloc, self._reserve_space)
        alloc.recount()

    def pin(self, selection: Plane, state: bytes, flags: int = 0) -> None:
        """Pin `selection` for an incoming transfer (invariant 5: no CP hands a pinned
        block out) and keep it, with `state` (the transfer's own bytes, which
        `receive_state` gives back) and `flags`, in the receive state file that the next
        CP roots in the root record: the pin outlives a close and reopen until
        `release_pin`. The same CP rewrites this volume's planes and table elsewhere, so
        none of its metadata stays in a block the transfer will overwrite. The resume
        point (`receive_done`) starts at 0."""
        alloc = self._writable_alloc()
        if self._receive_blocks:
            raise VolumeError(f"{self._path} has a partial receive already")
        if selection.nblocks != self._nblocks:
            raise ValueError(f"a selection of {selection.nblocks} blocks for a volume of "
                             f"{self._nblocks}")
        alloc.pinned = selection.copy()
        alloc.recount()
        for plane in (self._active_plane, self._summary_plane):
            for pb in plane.nonzero_blocks().tolist():
                plane.mark_dirty(pb)
        table = self._snap_tree
        for fbn in table.mapped_fbns().tolist():
            table.write_block(fbn, table.read_block(fbn))
        tree = self._receive_tree
        for pb in selection.nonzero_blocks().tolist():
            tree.write_block(pb, selection.block_bytes(pb))
        padded = state + bytes(-len(state) % BLOCK_SIZE)
        first = selection.plane_blocks
        for i in range(len(padded) // BLOCK_SIZE):
            tree.write_block(first + i, padded[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])
        self._receive_blocks = first + len(padded) // BLOCK_SIZE
        self._receive_done = 0
        self._receive_flags = flags

    def pinned_is(self, selection: Plane) -> bool:
        """Whether exactly `selection` is pinned (a resumed receive brings the same one)."""
        return self._alloc is not None and self._alloc.pinned == selection

    def receive_state(self) -> bytes | None:
        """The `state` a pending receive was pinned with, padded with zeros to whole
        blocks; None when no receive is pending."""
        if not self._receive_blocks:
            return None
        first = plane_blocks_for(self._nblocks)
        return b"".join(self._receive_tree.read_blocks(first, self._receive_blocks - first))

    def set_receive_done(self, vbn: int) -> None:
        """The resume point of the pending receive: every selected block below `vbn` is
        on the device, flushed (0: nothing received may be trusted). The next CP records
        it in the root."""
        with self._mutex:
            if not self._receive_blocks:
                raise VolumeError(f"{self._path} has no partial receive")
            self._receive_done = vbn

    def release_pin(self) -> None:
        """End a pending receive: the pin and the receive state file go at the next CP.
        Pinned blocks that neither plane holds go through the deferred plane: the
        committed root still names them as received until that CP lands, so they must
        not be reused inside it."""
        alloc = self._writable_alloc()
        loose = difference(alloc.pinned, union(self._active_plane, self._summary_plane))
        alloc.pinned = Plane.zeros(self._nblocks)
        alloc.free_many(loose.members())
        self._receive_tree.truncate_blocks(0)
        self._receive_blocks = self._receive_done = self._receive_flags = 0
        alloc.recount()

    def advance_cp_count(self, past: int) -> None:
        """Make the next CP's count larger than `past`. CP counts order snapshots, so after
        a receive the destination's count goes past the received snapshots' (the
        source's counts), and a snapshot taken here later sorts after them. The parity is
        kept, so the next root still goes to the slot of the older root (invariant 2)."""
        with self._mutex:
            self.wait_cp()
            ahead = max(0, past - self._root.cp_count)
            self._root = replace(self._root, cp_count=self._root.cp_count + ahead + ahead % 2)

    # ---- closing ----------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._stop.set()
        if self._timer is not None:
            self._timer.join()
            self._timer = None
        try:
            if self._writable:
                self.cp()
        finally:
            self._closed = True
            if self._lock is not None:
                self._lock.release()
            self._dev.close()

    def abandon(self) -> None:
        """Drop the volume without a final CP (what a crash does); for tests and errors.
        A CP being written stops before its root record."""
        self._stop.set()
        if self._writing is not None:
            self._writing.abandon()
            self._writing = None
        self._closed = True
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
