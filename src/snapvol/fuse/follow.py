"""Following a mirror: a read-only mount picks up the roots that `snapvol receive` commits.

A receive into an image that is mounted read-only runs in another process (it takes the
shared lock the mount holds, see `image.receiver.open_for_receive`) and ends with one root
write. The mount checks the root slots on a timer (`Volume.refresh`, two block reads) and
when a newer root is there:

1. reloads it, and finds the engine inodes whose records differ between the old and the
   new inode file (pointer arrays compared level by level, as `engine.compare` does), so
   the work grows with the change, not with the tree;
2. turns open handles of files that changed or went into stale handles: their reads fail
   with ESTALE, so a reader gets a whole old version or a clean error, never old bytes
   followed by new ones (reopening reads the new version);
3. drops the `.snapshot` views of snapshots that went or changed;
4. tells the kernel to forget what it cached about those inodes (attributes and pages)
   and the names it cached in changed directories. The kernel's lookups are tracked in
   `KernelRefs` (lookup and readdirplus add, `forget` removes), so only what the kernel
   holds is invalidated. The notifications are sent from a worker thread: one for a
   name blocks while a request on its directory is pending, and the trio thread is the
   one that answers requests.

If the old inode file can no longer be read (the mount fell more than one receive behind
and its blocks were reused), every inode and name the kernel holds is invalidated and
every open file handle goes stale. Until a refresh, readers see the previous root, which
stays intact until the receive after the switch reuses its blocks.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field

import pyfuse3

from snapvol.engine.compare import differing_blocks
from snapvol.engine.inodefile import InodeFile
from snapvol.errors import FsError, SnapvolError
from snapvol.fs import FileSystem
from snapvol.fs.posix import Stat
from snapvol.fuse.handles import Handle, HandleTable
from snapvol.fuse.inodes import FUSE_ROOT, SNAPDIR_INO, SNAPDIR_NAME, from_fuse, to_fuse
from snapvol.fuse.snapdir import SnapshotViews
from snapvol.layout.constants import INODE_SIZE, INODES_PER_BLOCK
from snapvol.layout.snaptable import SnapEntry

log = logging.getLogger("snapvol.fuse")

FOLLOW_INTERVAL = 0.5
"""Seconds between root checks of a read-only mount."""


class KernelRefs:
    """The kernel inodes the kernel holds (lookup counts) and the (parent, name) pairs it
    looked each up by, so a refresh invalidates only what can be cached."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.names: dict[int, tuple[tuple[int, bytes], ...]] = {}
        self.generations: dict[int, int] = {}  # the generation the kernel was told

    def add(self, fino: int, parent: int, name: bytes, generation: int) -> None:
        self.counts[fino] = self.counts.get(fino, 0) + 1
        self.generations[fino] = generation
        if name in (b".", b".."):
            return
        pair = (parent, name)
        known = self.names.get(fino, ())
        if pair not in known:
            self.names[fino] = (*known, pair)

    def forget(self, fino: int, n: int) -> None:
        left = self.counts.get(fino, 0) - n
        if left > 0:
            self.counts[fino] = left
        else:
            self.counts.pop(fino, None)
            self.names.pop(fino, None)
            self.generations.pop(fino, None)


class StaleView(FileSystem):
    """The view of a handle whose file changed or went in a refresh: reads fail with
    ESTALE (the kernel's page cache of it is dropped too, so nothing mixes versions)."""

    def read(self, ino: int, offset: int, size: int) -> bytes:
        raise FsError(errno.ESTALE, f"inode {ino} changed since it was opened: reopen it")

    def getattr(self, ino: int) -> Stat:
        raise FsError(errno.ESTALE, f"inode {ino} changed since it was opened: reopen it")

    def release(self, ino: int) -> None:
        """Nothing to do: the image it was opened on is gone."""


def changed_inodes(old: InodeFile, new: InodeFile) -> set[int] | None:
    """Engine inode numbers whose records differ between two inode files, or None when
    the old one cannot be read any more (its blocks were reused)."""
    if old is new:
        return set()
    out: set[int] = set()
    try:
        n = max(old.inode_blocks, new.inode_blocks)
        for fbn in differing_blocks(old.itree, new.itree, n):
            a = old.itree.read_block(fbn) if fbn < old.inode_blocks else None
            b = new.itree.read_block(fbn) if fbn < new.inode_blocks else None
            for i in range(INODES_PER_BLOCK):
                lo = i * INODE_SIZE
                if a is None or b is None or a[lo : lo + INODE_SIZE] != b[lo : lo + INODE_SIZE]:
                    out.add(fbn * INODES_PER_BLOCK + i)
    except SnapvolError as e:
        log.warning("refresh: the previous inode file is unreadable (%s); invalidating "
                    "everything the kernel holds", e)
        return None
    return out


def _snapshot_key(e: SnapEntry) -> tuple[object, ...]:
    return (e.name, e.guid, e.inode_file)


@dataclass
class Invalidations:
    """What the kernel must forget after a refresh; `apply` runs in a worker thread."""

    changed: set[int] | None = None  # engine inodes of the active image; None: all
    inodes: list[int] = field(default_factory=list)
    attrs_only: list[int] = field(default_factory=list)
    entries: list[tuple[int, bytes]] = field(default_factory=list)

    def apply(self) -> None:
        for parent, name in self.entries:
            _quiet(pyfuse3.invalidate_entry, parent, name)
        for fino in self.attrs_only:
            _quiet(pyfuse3.invalidate_inode, fino, True)
        for fino in self.inodes:
            _quiet(pyfuse3.invalidate_inode, fino, False)


def _quiet(fn: object, *args: object) -> None:
    """A notification about something the kernel has already dropped fails with ENOENT;
    that is fine, and so is any other failure (the timeouts still expire)."""
    assert callable(fn)
    try:
        fn(*args)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.debug("invalidate %r: %s", args, e)


@dataclass
class FollowState:
    """The parts of a mount that a refresh touches."""

    active: FileSystem
    snaps: SnapshotViews
    handles: HandleTable
    refs: KernelRefs


def refresh(s: FollowState) -> Invalidations | None:
    """Reload a newer root if there is one (see the module docstring); None if the root is
    unchanged. Runs in the trio thread; the returned notifications go from a worker."""
    vol = s.active.vol
    with vol.mutex:
        old_active = vol.active
        old_snaps = {e.snap_id: _snapshot_key(e) for e in s.snaps.entries()}
        if not vol.refresh():
            return None
        changed = changed_inodes(old_active, vol.active)
        new_snaps = {e.snap_id: _snapshot_key(e) for e in s.snaps.entries()}
        gone = {sid for sid, key in old_snaps.items() if new_snaps.get(sid) != key}
        s.snaps.drop(gone)
        _stale_handles(s, changed, gone)
        work = Invalidations(changed)
        if changed is None or gone or old_snaps != new_snaps:
            work.attrs_only.append(SNAPDIR_INO)

        def hit(fino: int) -> bool:
            if fino == SNAPDIR_INO:
                return False
            snap_id, ino = from_fuse(fino)
            if snap_id == 0:
                return changed is None or ino in changed
            return snap_id in gone

        refs = s.refs
        work.inodes = [fino for fino in refs.counts if hit(fino)]
        for fino, pairs in refs.names.items():
            for parent, name in pairs:
                if parent == SNAPDIR_INO:
                    if from_fuse(fino)[0] in gone:
                        work.entries.append((parent, name))
                elif hit(parent) and (from_fuse(parent)[0] or
                                      not _still_names(s, parent, name, fino)):
                    work.entries.append((parent, name))
    return work


def _still_names(s: FollowState, parent: int, name: bytes, fino: int) -> bool:
    """Whether `name` in the (changed) active directory `parent` still names the file the
    kernel knows by it: then its cached name stays, so a shell sitting in a directory
    that did not move keeps its place."""
    if parent == FUSE_ROOT and name == SNAPDIR_NAME:
        return True
    try:
        st = s.active.lookup(from_fuse(parent)[1], name)
    except SnapvolError:
        return False
    return to_fuse(0, st.ino) == fino and st.generation == s.refs.generations.get(fino)


def _stale_handles(s: FollowState, changed: set[int] | None, gone: set[int]) -> None:
    """Open files that changed or went read ESTALE from now on; the others go on (their
    bytes are the same in the new root)."""
    stale = StaleView(s.active.vol)
    for fh, h in s.handles.items():
        if h.snap_id < 0:
            continue  # .snapshot listing
        if h.snap_id:
            if h.snap_id in gone:
                s.handles.replace(fh, Handle(stale, h.snap_id, h.ino, h.writable))
            continue
        if changed is not None and h.ino not in changed:
            continue
        if h.is_dir:
            try:
                if s.active.getattr(h.ino).is_dir:
                    continue  # it lists the new directory from its cookie
            except SnapvolError:
                pass  # gone from the new root
        s.handles.replace(fh, Handle(stale, 0, h.ino, h.writable, h.is_dir))
