"""The checker: walks a committed root, its active file system and every snapshot.

fsck is the tool for a damaged volume, so it reports every problem it can reach and gives
up on nothing but the part a problem makes unreadable: a damaged plane, snapshot table
or inode-map block is one more line in the report, and the rest is still checked.

For each image it reads every block reachable from the root (so every checksum is
verified), checks that pointers are in range and that no block is reachable twice, link
counts against directory entries, directory structure, '..' entries, the inode map, xattr
and dump-catalog records, and the image's own active plane against the blocks actually
reachable. Then it checks that the summary plane is exactly the union of the snapshot
planes (DESIGN.md §3.5), the shadow snapshots, and both root slots (invariant 2: a slot
that fails its check is reported, saying which CP was opened instead).

The walk is bounded whatever the bytes say: every block is claimed in a plane before
anything below it is read, so a block reached a second time (a cross-link, or a crafted
cycle) is reported and not followed again, a pointer outside the volume is reported and
not followed, and heights, sizes and counts are checked before they are used as bounds.

The checker reads through its own `Target`: a committed root record and a BlockIO, never
the live structures of an open volume, so the online check (`fsck --online`) runs in a
process of its own beside the mount (`check_root`, daemon/checker.py) while requests go
on, paced to a share of the time (`Pacer`), with the root's blocks held against reuse by
the mount (`Volume.hold_committed`).
"""

from __future__ import annotations

import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from snapvol.device import Device, FileDevice
from snapvol.device.base import Buffer
from snapvol.engine import shadows
from snapvol.engine.blockio import DAMAGE_ADVICE, BlockIO
from snapvol.engine.inodefile import INODE_FLAG_SYSTEM, INODE_FLAG_XATTR, InodeFile, Node
from snapvol.engine.metafile import load_plane, tree_of
from snapvol.engine.volume import SlotState, Volume, read_root_slots, slot_problems
from snapvol.errors import CorruptionError, SnapvolError, VolumeError
from snapvol.layout.constants import (
    BLOCK_SIZE,
    DUMPS_INO,
    FIRST_DATA_VBN,
    FIRST_USER_INO,
    INODE_DIRECT,
    INODE_SIZE,
    INODES_PER_BLOCK,
    INOMAP_INO,
    MAX_HEIGHT,
    PTR_SHIFT,
    ROOT_INO,
    SNAP_ENTRIES_PER_BLOCK,
    SNAP_ENTRY_SIZE,
    SUPERBLOCK_VBN,
)
from snapvol.layout.dumps import decode_catalog
from snapvol.layout.inode import Inode
from snapvol.layout.pointer import PTR_DTYPE, decode_node
from snapvol.layout.records import RootRecord, Superblock, TreeRoot
from snapvol.layout.snaptable import SnapEntry
from snapvol.layout.xattrs import decode_xattrs
from snapvol.planes import Plane
from snapvol.planes.algebra import difference, union

Progress = Callable[[str, int, int], None]
MAX_PROBLEMS = 1000
VERIFY_RUN = 256  # data blocks verified per device read (1 MiB)
MAX_RECORD_FILE = 64 << 20
"""Largest inode map, xattr set or dump catalog the checker reads into memory; a size
past it is reported (the largest real one is far smaller)."""
ONLINE_SHARE = 0.25
"""Share of the time the online check may work (read and compute): it sleeps the rest,
so the mount's requests find the disk and the CPUs free. Lower it to disturb the mount
less, raise it to finish sooner (bench 9: a listing's p99 during checks within 2x its
idle p99 at 0.25 and, on a quiet machine, at 0.5 too)."""
PACE_QUANTUM = 0.002
"""The online check works in stretches of this many seconds between its sleeps."""
PLANE_NOTE = ("a plane is derived data, and the trees checked here are all it takes to "
              "rebuild it")


def said(err: SnapvolError) -> str:
    """What an error found, without the advice to run fsck that it gives elsewhere."""
    return err.detail if isinstance(err, CorruptionError) else str(err)


@dataclass
class FsckReport:
    problems: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    _seen: set[str] = field(default_factory=set, repr=False)

    @property
    def clean(self) -> bool:
        return not self.problems

    def add(self, where: str | None, what: str) -> None:
        """One problem, once (several paths may reach the same damaged block), without
        the advice to run fsck that an error found on the way may carry."""
        text = what if where is None else f"{where}: {what}"
        text = text.replace(f"; {DAMAGE_ADVICE}", "")
        if len(self.problems) < MAX_PROBLEMS and text not in self._seen:
            self._seen.add(text)
            self.problems.append(text)

    def bump(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n


# ---- what is checked, and how fast it is read ----------------------------------------------

class Pacer:
    """Keeps a check that runs beside other work to `share` of the time: after each
    stretch of PACE_QUANTUM seconds of work it sleeps long enough that the work is that
    share. Called before every device read."""

    def __init__(self, share: float, quantum: float = PACE_QUANTUM) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"pacing share {share} must be within (0, 1]")
        self.share, self.quantum = share, quantum
        self._mark = time.perf_counter()
        self.slept = 0.0

    def __call__(self) -> None:
        busy = time.perf_counter() - self._mark
        if busy >= self.quantum and self.share < 1:
            pause = busy * (1 - self.share) / self.share
            self.slept += pause
            time.sleep(pause)
            self._mark = time.perf_counter()


class PacedDevice(Device):
    """A read-only view of a device whose reads wait for a `Pacer` first."""

    def __init__(self, dev: Device, pace: Callable[[], None]) -> None:
        self.dev, self.pace = dev, pace
        self.nblocks = dev.nblocks
        self.writable = False

    def read(self, vbn: int, count: int = 1) -> bytes:
        self.pace()
        return self.dev.read(vbn, count)

    def read_block(self, vbn: int) -> bytes:
        self.pace()
        return self.dev.read_block(vbn)

    def readv(self, vbn: int, bufs: list[bytearray] | list[memoryview]) -> None:
        self.pace()
        self.dev.readv(vbn, bufs)

    def write(self, vbn: int, data: Buffer) -> None:
        raise VolumeError("a checker's view of a volume is read-only")

    def writev(self, vbn: int, bufs: Sequence[Buffer]) -> None:
        raise VolumeError("a checker's view of a volume is read-only")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass  # the device belongs to the volume


@dataclass(frozen=True)
class Target:
    """What one check reads: a committed root of a volume, and the blocks through `io`."""

    path: str
    io: BlockIO
    nblocks: int
    root: RootRecord
    slots: tuple[SlotState, ...]


def check(vol: Volume, progress: Progress | None = None) -> FsckReport:
    """Check the committed state of `vol` (commit first if it is open with changes),
    holding its mutex: the offline check, and tests."""
    with vol.mutex:
        if vol.writable and vol.dirty:
            vol.cp()
        _, slots = read_root_slots(vol.dev, vol.sb, vol.path)
        return check_target(Target(vol.path, vol.io, vol.nblocks, vol.root, slots), progress)


def check_root(path: str, root: bytes, pacer: Pacer | None = None) -> FsckReport:
    """Check the committed root `root` (a root record's bytes) of the volume in the image
    at `path`, opened read-only on a descriptor of its own and without the volume lock:
    the online check, run in a process of its own beside the mount that owns the volume
    and holds that root's blocks against reuse (Volume.hold_committed) meanwhile."""
    dev = FileDevice(path, writable=False)
    try:
        sb = Superblock.decode(dev.read(SUPERBLOCK_VBN))
        _, slots = read_root_slots(dev, sb, path)
        rec = RootRecord.decode(root)
        if rec.uuid != sb.uuid or rec.nblocks != sb.nblocks:
            raise VolumeError(f"{path}: the root record to check is not this volume's")
        io = BlockIO(dev if pacer is None else PacedDevice(dev, pacer), cache_bytes=16 << 20)
        return check_target(Target(path, io, sb.nblocks, rec, slots))
    finally:
        dev.close()


# ---- one image: its trees, its inodes, its plane -------------------------------------------

@dataclass
class _Data:
    """The data blocks of one tree as the walk found them, in file order."""

    fbns: list[np.ndarray] = field(default_factory=list)
    vbns: list[np.ndarray] = field(default_factory=list)
    csums: list[np.ndarray] = field(default_factory=list)

    def add(self, fbns: np.ndarray, vbns: np.ndarray, csums: np.ndarray) -> None:
        self.fbns.append(fbns)
        self.vbns.append(vbns)
        self.csums.append(csums)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.fbns:
            empty = np.zeros(0, dtype=np.uint64)
            return empty.astype(np.int64), empty, empty
        fbns = np.concatenate(self.fbns).astype(np.int64)
        order = np.argsort(fbns, kind="stable")
        return (fbns[order], np.concatenate(self.vbns)[order],
                np.concatenate(self.csums)[order])


class _ImageCheck:
    def __init__(self, target: Target, label: str,
                 trees: tuple[TreeRoot, TreeRoot, TreeRoot, TreeRoot], report: FsckReport,
                 verified: Plane, bad: set[int]) -> None:
        self.t, self.label, self.report = target, label, report
        self.verified, self.bad = verified, bad
        self.trees = trees
        self.reach = Plane.zeros(target.nblocks)
        self.image = InodeFile(target.io, trees[0])
        self.table_data = _Data()

    def problem(self, what: str) -> None:
        self.report.add(self.label, what)

    # ---- block trees --------------------------------------------------------------------
    def walk(self, owner: str, top: np.ndarray, height: int,
             data: _Data | None = None) -> tuple[int, bool]:
        """Claim every block of a tree (top pointers `top`, `height`), parents first,
        reading each indirect block and verifying each data block once per volume.
        Returns the pointers found and whether the tree was whole (no problem)."""
        if height > MAX_HEIGHT:
            self.problem(f"{owner}: tree height {height}, the largest is {MAX_HEIGHT}")
            return 0, False
        held, whole = self._claim(owner, height, 0, top, data)
        stack = self._indirect(height, 0, top)
        while stack:
            level, idx, vbn, csum = stack.pop()
            try:
                node = decode_node(self.t.io.read(vbn, csum))
            except SnapvolError as e:
                self.problem(f"{owner}: {said(e)}")
                whole = False
                continue
            n, ok = self._claim(owner, level - 1, idx << PTR_SHIFT, node, data)
            held += n
            whole &= ok
            if level > 1:
                stack += self._indirect(level - 1, idx << PTR_SHIFT, node)
        self.report.bump("blocks_checked", held)
        return held, whole

    def _claim(self, owner: str, level: int, base: int, ptrs: np.ndarray,
               data: _Data | None) -> tuple[int, bool]:
        """Claim the non-hole pointers of one node (or of the top) whose children are at
        `level`: in range, reached once. Children that fail either check are dropped
        (zeroed in `ptrs`, so the walk does not follow them). Data blocks are verified."""
        if len(ptrs) <= INODE_DIRECT:
            return self._claim_few(owner, level, base, ptrs, data)
        present = np.flatnonzero(ptrs["vbn"])
        if not len(present):
            return 0, True
        whole = True
        vbns = ptrs["vbn"][present]
        inside = (vbns >= FIRST_DATA_VBN) & (vbns < self.t.nblocks)
        if not inside.all():
            out = vbns[~inside]
            self.problem(f"{owner}: {len(out)} pointer(s) to VBNs outside the data area "
                         f"{FIRST_DATA_VBN}..{self.t.nblocks - 1} (first {int(out[0])})")
            whole = False
        keep = present[inside]
        vbns = ptrs["vbn"][keep]
        twice = self.reach.test_many(vbns)
        _, first = np.unique(vbns, return_index=True)
        again = np.ones(len(vbns), dtype=bool)
        again[first] = False
        twice |= again
        if twice.any():
            self.problem(f"{owner}: block {int(vbns[twice][0])} is reachable twice "
                         "(cross-linked)")
            whole = False
        keep = keep[~twice]
        dropped = np.setdiff1d(present, keep, assume_unique=True)
        if len(dropped):
            ptrs["vbn"][dropped] = 0
        self.reach.set_many(ptrs["vbn"][keep])
        if level == 0:
            vbns, csums = ptrs["vbn"][keep].copy(), ptrs["csum"][keep].copy()
            whole &= self._verify(owner, vbns, csums)
            if data is not None:
                data.add(base + keep, vbns, csums)
        return len(present), whole

    def _claim_few(self, owner: str, level: int, base: int, ptrs: np.ndarray,
                   data: _Data | None) -> tuple[int, bool]:
        """`_claim` for an inode's few top pointers, one at a time: most files are small,
        and array set-up would cost more than the work."""
        held, whole = 0, True
        reach, nblocks, bad = self.reach, self.t.nblocks, self.bad
        kept: list[tuple[int, int, int]] = []
        for j, (vbn, csum) in enumerate(ptrs.tolist()):
            if not vbn:
                continue
            held += 1
            if not FIRST_DATA_VBN <= vbn < nblocks:
                self.problem(f"{owner}: pointer to VBN {vbn}, outside the data area "
                             f"{FIRST_DATA_VBN}..{nblocks - 1}")
            elif reach.test(vbn):
                self.problem(f"{owner}: block {vbn} is reachable twice (cross-linked)")
            else:
                reach.set(vbn)
                kept.append((base + j, vbn, csum))
                continue
            whole = False
            ptrs[j] = (0, 0)
        if level == 0 and kept:
            verified, io = self.verified, self.t.io
            for _, vbn, csum in kept:
                if vbn in bad:
                    whole = False
                elif not verified.test(vbn):
                    verified.set(vbn)
                    if not io.verify(vbn, csum):
                        bad.add(vbn)
                        whole = False
                        self.problem(f"{owner}: block {vbn}: checksum mismatch (expected "
                                     f"{csum:016x})")
            if data is not None:
                cols = np.array(kept, dtype=np.uint64).T
                data.add(cols[0].astype(np.int64), cols[1], cols[2])
        return held, whole

    @staticmethod
    def _indirect(level: int, base: int, ptrs: np.ndarray) -> list[tuple[int, int, int, int]]:
        """The indirect blocks a node at `level` points to (when level >= 1), to visit."""
        if level < 1:
            return []
        kids = np.flatnonzero(ptrs["vbn"])
        return [(level, base + j, v, c) for j, v, c in zip(
            kids.tolist(), ptrs["vbn"][kids].tolist(), ptrs["csum"][kids].tolist(),
            strict=True)][::-1]

    def _verify(self, owner: str, vbns: np.ndarray, csums: np.ndarray) -> bool:
        """Read the data blocks not verified yet (by any image), in runs; report each
        that fails its checksum. False if one did (now or before)."""
        whole = not any(v in self.bad for v in vbns.tolist()) if self.bad else True
        todo = ~self.verified.test_many(vbns)
        if not todo.any():
            return whole
        vbns, csums = vbns[todo], csums[todo]
        self.verified.set_many(vbns)
        order = np.argsort(vbns, kind="stable")
        vbns, csums = vbns[order], csums[order]
        breaks = np.flatnonzero(np.diff(vbns.astype(np.int64)) != 1) + 1
        for lo, hi in zip([0, *breaks.tolist()], [*breaks.tolist(), len(vbns)], strict=True):
            for at in range(lo, hi, VERIFY_RUN):
                stop = min(hi, at + VERIFY_RUN)
                for i in self.t.io.bad_in_run(int(vbns[at]), csums[at:stop]):
                    v = int(vbns[at + i])
                    self.bad.add(v)
                    whole = False
                    self.problem(f"{owner}: block {v}: checksum mismatch (expected "
                                 f"{int(csums[at + i]):016x})")
        return whole

    def walk_root(self, owner: str, root: TreeRoot, data: _Data | None = None) -> None:
        top = np.zeros(1, dtype=PTR_DTYPE)
        top[0] = (root.ptr.vbn, root.ptr.csum)
        self.walk(owner, top, root.height, data)

    def read_file(self, data: _Data, size: int, owner: str) -> bytes | None:
        """The first `size` bytes of a file from the data blocks its walk found (holes
        read as zeros); None when one of them is damaged (reported already)."""
        fbns, vbns, csums = data.arrays()
        out = bytearray(size)
        for fbn, vbn, csum in zip(fbns.tolist(), vbns.tolist(), csums.tolist(), strict=True):
            if fbn * BLOCK_SIZE >= size:
                break
            if vbn in self.bad:
                return None
            try:
                block = self.t.io.read(vbn, csum)
            except SnapvolError as e:
                self.problem(f"{owner}: {said(e)}")
                return None
            end = min(size, (fbn + 1) * BLOCK_SIZE)
            out[fbn * BLOCK_SIZE : end] = block[: end - fbn * BLOCK_SIZE]
        return bytes(out)

    # ---- the image ------------------------------------------------------------------------
    def run(self, progress: Progress | None) -> Plane:
        inode_data = _Data()
        for name, root in zip(RootRecord.TREE_NAMES, self.trees, strict=True):
            data = inode_data if name == "inode file" else (
                self.table_data if name == "snapshot table" else None)
            self.walk_root(name, root, data)
        inodes = self._inodes(inode_data)
        self.report.bump("inodes", len(inodes))
        self.reach.set_range(0, FIRST_DATA_VBN)
        missing = [ino for ino in (INOMAP_INO, ROOT_INO) if ino not in inodes]
        for ino in missing:
            self.problem(f"reserved inode {ino} is missing")
        if progress is not None:
            progress(self.label, 0, len(inodes))
        links: dict[int, int] = {}
        subdirs: dict[int, int] = {}
        dotdot: dict[int, int] = {}  # directory -> the parent its header names
        named_in: dict[int, int] = {}  # directory -> the directory whose entry names it
        xattr_owner: dict[int, int] = {}
        files: dict[int, _Data] = {}  # data of the record-holding inodes, read below
        for done, (ino, rec) in enumerate(inodes.items()):
            if progress is not None and done % 1024 == 0:
                progress(self.label, done, len(inodes))
            records = ino in (INOMAP_INO, DUMPS_INO) or bool(rec.flags & INODE_FLAG_XATTR)
            data = files.setdefault(ino, _Data()) if records else None
            held, whole = self.walk(f"inode {ino}", rec.ptrs, rec.height, data)
            if whole and held != rec.blocks:
                self.problem(f"inode {ino}: holds {held} blocks but records {rec.blocks}")
            if rec.xattr_ino:
                if rec.xattr_ino in xattr_owner or rec.xattr_ino not in inodes:
                    self.problem(f"inode {ino}: bad xattr inode {rec.xattr_ino}")
                xattr_owner[rec.xattr_ino] = ino
            if rec.is_dir and not missing:
                node = Node(rec, self.image.io, None)
                self.image.nodes[ino] = node
                self._check_dir(ino, node, inodes, links, subdirs, dotdot, named_in)
                self.image.nodes.pop(ino, None)
        if progress is not None:
            progress(self.label, len(inodes), len(inodes))
        if missing:
            return self.reach
        self._check_records(inodes, files, xattr_owner)
        for child, parent in named_in.items():
            if dotdot.get(child, parent) != parent:
                self.problem(f"directory {child}: '..' does not name {parent}")
        for ino, rec in inodes.items():
            if ino == INOMAP_INO or rec.flags & (INODE_FLAG_XATTR | INODE_FLAG_SYSTEM):
                if rec.flags & INODE_FLAG_XATTR and ino not in xattr_owner:
                    self.problem(f"inode {ino}: orphaned xattr inode")
                continue
            want = (2 + subdirs.get(ino, 0)) if rec.is_dir else links.get(ino, 0)
            if ino != ROOT_INO and links.get(ino, 0) == 0:
                self.problem(f"inode {ino}: allocated but not in any directory (orphan)")
            elif rec.nlink != want:
                self.problem(f"inode {ino}: link count {rec.nlink}, directory entries say {want}")
        return self.reach

    def _inodes(self, data: _Data) -> dict[int, Inode]:
        """Every allocated inode of the inode-file blocks the walk found."""
        inodes: dict[int, Inode] = {}
        nblk = self.trees[0].nblocks
        fbns, vbns, csums = data.arrays()
        past = fbns >= nblk
        if past.any():
            self.problem(f"inode file: block {int(fbns[past][0])} is past its size of "
                         f"{nblk} blocks")
        for blk, vbn, csum in zip(fbns.tolist(), vbns.tolist(), csums.tolist(), strict=True):
            if vbn in self.bad:
                self.problem(f"inode file block {blk} is damaged: inodes "
                             f"{blk * INODES_PER_BLOCK}..{(blk + 1) * INODES_PER_BLOCK - 1} "
                             "are not checked")
                continue
            try:
                raw = memoryview(self.t.io.read(vbn, csum))
            except SnapvolError as e:
                self.problem(f"inode file block {blk}: {said(e)}")
                continue
            for i in range(INODES_PER_BLOCK):
                ino = blk * INODES_PER_BLOCK + i
                try:
                    rec = Inode.decode(ino, raw[i * INODE_SIZE : (i + 1) * INODE_SIZE])
                except CorruptionError as e:
                    self.problem(said(e))
                    continue
                if rec.allocated:
                    inodes[ino] = rec
        return inodes

    def _check_records(self, inodes: dict[int, Inode], files: dict[int, _Data],
                       xattr_owner: dict[int, int]) -> None:
        """The inode map, xattr sets and the dump catalog: records in files' data."""
        for ino, data in sorted(files.items()):
            rec = inodes[ino]
            owner = f"inode {ino}"
            if rec.size > MAX_RECORD_FILE:
                self.problem(f"{owner}: size {rec.size} is past the {MAX_RECORD_FILE} bytes "
                             "such a file can reach")
                continue
            if ino == INOMAP_INO:
                self._check_inomap(inodes, data, rec.size)
                continue
            blob = self.read_file(data, rec.size, owner)
            if blob is None:
                continue
            try:
                if ino == DUMPS_INO:
                    decode_catalog(blob)
                else:
                    decode_xattrs(blob, f"xattrs of inode {xattr_owner.get(ino, '?')} "
                                        f"(in inode {ino})")
            except CorruptionError as e:
                self.problem(f"{owner}: {said(e)}")

    def _check_inomap(self, inodes: dict[int, Inode], data: _Data, size: int) -> None:
        """The map against the allocated inodes, except where a map block is damaged."""
        fbns, vbns, _ = data.arrays()
        unknown = [int(f) for f, v in zip(fbns.tolist(), vbns.tolist(), strict=True)
                   if v in self.bad]
        raw = self.read_file(_without(data, set(unknown)), size, "inode map")
        if raw is None:
            return
        for fbn in unknown:
            lo, hi = fbn * BLOCK_SIZE * 8, (fbn + 1) * BLOCK_SIZE * 8
            self.problem(f"inode map block {fbn} is damaged: the allocation of inodes "
                         f"{lo}..{hi - 1} is not checked against it")
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
        marked = set(np.flatnonzero(bits).tolist())
        present = set(inodes)
        for fbn in unknown:
            span = set(range(fbn * BLOCK_SIZE * 8, (fbn + 1) * BLOCK_SIZE * 8))
            marked -= span
            present -= span
        for ino in sorted(present - marked)[:10]:
            self.problem(f"inode {ino} is allocated but free in the inode map")
        for ino in sorted(marked - present)[:10]:
            self.problem(f"inode {ino} is marked in the inode map but not allocated")

    def _check_dir(self, ino: int, node: Node, inodes: dict[int, Inode], links: dict[int, int],
                   subdirs: dict[int, int], dotdot: dict[int, int],
                   named_in: dict[int, int]) -> None:
        try:
            d = self.image.directory(node)
            for p in d.check():
                self.problem(f"directory {ino}: {p}")
            parent = dotdot[ino] = d.parent_ino
            if parent not in inodes or not inodes[parent].is_dir:
                self.problem(f"directory {ino}: '..' names inode {parent}, not a directory")
            count = 0
            last = 0
            for e in d.readdir(0):
                if e.cookie <= last:
                    self.problem(f"directory {ino}: entries out of key order (a damaged tree)")
                    break
                last = e.cookie
                count += 1
                child = inodes.get(e.ino)
                if child is None:
                    self.problem(f"directory {ino}: entry {e.name!r} names free inode {e.ino}")
                    continue
                if e.ino < FIRST_USER_INO and e.ino != ROOT_INO:
                    self.problem(f"directory {ino}: entry {e.name!r} names reserved inode")
                if e.dtype != stat.S_IFMT(child.mode) >> 12:
                    self.problem(f"directory {ino}: entry {e.name!r} has the wrong type")
                links[e.ino] = links.get(e.ino, 0) + 1
                if child.is_dir:
                    subdirs[ino] = subdirs.get(ino, 0) + 1
                    named_in[e.ino] = ino
            if count != len(d):
                self.problem(f"directory {ino}: header counts {len(d)} entries, found {count}")
        except SnapvolError as e:
            self.problem(f"directory {ino}: {said(e)}")


def _without(data: _Data, fbns: set[int]) -> _Data:
    """`data` less the blocks `fbns` (which then read as holes)."""
    if not fbns:
        return data
    f, v, c = data.arrays()
    keep = ~np.isin(f, np.array(sorted(fbns), dtype=np.int64))
    out = _Data()
    out.add(f[keep], v[keep], c[keep])
    return out


# ---- the whole volume ---------------------------------------------------------------------

def check_target(t: Target, progress: Progress | None = None) -> FsckReport:
    """Check one committed root: both root slots, the active file system, every snapshot,
    the planes and the shadow snapshots. Reads only through `t`."""
    report = FsckReport()
    for problem in slot_problems(t.root, t.slots):
        report.add(None, problem)
    verified = Plane.zeros(t.nblocks)
    bad: set[int] = set()
    r = t.root
    entries, table_whole = _load_table(t, report)
    regular = [e for e in entries.values() if not e.shadow]
    images: list[tuple[str, tuple[TreeRoot, TreeRoot, TreeRoot, TreeRoot]]] = [
        ("active file system", r.trees)]
    images += [(f"snapshot {e.name!r}", e.trees) for e in regular]
    planes: list[Plane | None] = []
    table_data = _Data()
    used = 0
    for label, trees in images:
        chk = _ImageCheck(t, label, trees, report, verified, bad)
        reach = chk.run(progress)
        if label == "active file system":
            table_data = chk.table_data
            used = reach.count()
            if r.receive.ptr.vbn:
                chk.walk_root("receive state", r.receive)
        plane = _plane(t, trees[1], report, label, "active plane")
        planes.append(plane)
        report.bump("images")
        if plane is None:
            continue
        missing = difference(reach, plane)
        extra = difference(plane, reach)
        if missing.count():
            report.add(label, f"{missing.count()} blocks in use but free in the plane "
                              f"(first {int(missing.members()[0])})")
        if extra.count():
            report.add(label, f"{extra.count()} blocks marked in the plane but not "
                              f"reachable (leaked; first {int(extra.members()[0])})")
    summary = _plane(t, r.summary_plane, report, "summary plane", "summary plane")
    snaps = [p for p in planes[1:] if p is not None]
    if summary is not None and table_whole and len(snaps) == len(planes) - 1:
        want = union(*snaps) if snaps else Plane.zeros(t.nblocks)
        if summary != want:
            report.add("summary plane", "is not the union of the snapshot planes")
    _check_shadows(t, entries, table_data, report)
    report.stats["snapshots"] = len(images) - 1
    active = planes[0]
    report.stats["bytes_used"] = (active.count() if active is not None else used) * BLOCK_SIZE
    return report


def _plane(t: Target, root: TreeRoot, report: FsckReport, where: str,
           what: str) -> Plane | None:
    try:
        return load_plane(t.io, root, t.nblocks)
    except SnapvolError as e:
        report.add(where, f"{what} unreadable ({said(e)}); {PLANE_NOTE}")
        return None


def _load_table(t: Target, report: FsckReport) -> tuple[dict[int, SnapEntry], bool]:
    """The snapshot table of the root, entry by entry, and whether it was read whole: a
    damaged block or entry is reported and the others are still checked."""
    root = t.root.snap_table
    tree = tree_of(t.io, root)
    entries: dict[int, SnapEntry] = {}
    whole = True
    for blk in range(root.nblocks):
        first = blk * SNAP_ENTRIES_PER_BLOCK
        try:
            data = memoryview(tree.read_block(blk))
        except SnapvolError as err:
            report.add("snapshot table", f"block {blk} unreadable ({said(err)}): the "
                       f"snapshots in slots {first}..{first + SNAP_ENTRIES_PER_BLOCK - 1} "
                       "are not checked")
            whole = False
            continue
        for i in range(SNAP_ENTRIES_PER_BLOCK):
            slot = first + i
            try:
                entry = SnapEntry.decode(data[i * SNAP_ENTRY_SIZE : (i + 1) * SNAP_ENTRY_SIZE],
                                         f"snapshot table slot {slot}")
            except CorruptionError as err:
                report.add(None, said(err))
                whole = False
                continue
            if entry is not None:
                entries[slot] = entry
    names: set[str] = set()
    ids: set[int] = set()
    for slot, e in sorted(entries.items()):
        where = f"snapshot table slot {slot} ({e.name!r})"
        if e.name in names:
            report.add(where, "the name is used twice")
        if e.snap_id in ids:
            report.add(where, f"snapshot id {e.snap_id} is used twice")
        if e.snap_id >= t.root.next_snap_id:
            report.add(where, f"snapshot id {e.snap_id} is not below the root record's "
                              f"next id {t.root.next_snap_id}")
        for name, tree_root in zip(RootRecord.TREE_NAMES, e.trees, strict=True):
            why = tree_root.problem(t.nblocks)
            if why is not None:
                report.add(where, f"{name} {why}")
        names.add(e.name)
        ids.add(e.snap_id)
    return entries, whole


def _check_shadows(t: Target, entries: dict[int, SnapEntry], table_data: _Data,
                   report: FsckReport) -> None:
    """Shadow snapshots: no trees, planes only in their own slots' regions, and a shadow
    made from a snapshot still held equals that snapshot's plane (its blocks
    were never reusable, so no bit can have been cleared)."""
    slots = {s for s, e in entries.items() if e.shadow}
    pbs = Plane.zeros(t.nblocks).plane_blocks
    mapped, _, _ = table_data.arrays()
    for fbn in mapped[mapped >= shadows.SHADOW_BASE].tolist():
        slot = shadows.region_slot(fbn, pbs)
        if slot not in slots:
            report.add("snapshot table", f"block {fbn} holds a shadow plane for slot {slot}, "
                                         "which is not a shadow snapshot")
            break
    tree = tree_of(t.io, t.root.snap_table)
    regular = {e.guid: e for e in entries.values() if not e.shadow}
    for slot in sorted(slots):
        e = entries[slot]
        label = f"shadow snapshot {e.name!r}"
        report.bump("shadows")
        if any(tr != TreeRoot() for tr in e.trees):
            report.add(label, "has tree roots (a shadow's blocks may be reused)")
        try:
            plane = shadows.load(tree, slot, t.nblocks)
        except (SnapvolError, ValueError) as err:
            why = said(err) if isinstance(err, SnapvolError) else str(err)
            report.add(label, f"plane unreadable: {why}")
            continue
        twin = regular.get(e.guid)
        if twin is None or twin.cp_count != e.cp_count:
            continue
        try:
            want = load_plane(t.io, twin.active_plane, t.nblocks)
        except SnapvolError:
            continue  # reported with that snapshot
        want.clear_range(0, FIRST_DATA_VBN)  # fixed blocks are never in a shadow
        if plane != want:
            report.add(label, f"differs from the plane of snapshot {twin.name!r}, which it "
                              "was made from and which still holds its blocks")
