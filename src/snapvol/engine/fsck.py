"""The checker: walks the committed active file system and every snapshot.

For each image it reads every block reachable from the root (so every checksum is
verified), checks pointers are in range and no block is reachable twice, link counts
against directory entries, directory structure, '..' entries, the inode map, and the
image's own active plane against the blocks actually reachable. Then it checks that the
summary plane is exactly the union of the snapshot planes (DESIGN.md §3.5).
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from snapvol.engine import shadows
from snapvol.engine.image import INODE_FLAG_SYSTEM, INODE_FLAG_XATTR, Image, Node
from snapvol.engine.tree import BlockTree
from snapvol.engine.volume import Volume, load_plane, tree_of
from snapvol.errors import SnapvolError
from snapvol.layout.constants import (
    BLOCK_SIZE,
    FIRST_DATA_VBN,
    FIRST_USER_INO,
    INODE_SIZE,
    INODES_PER_BLOCK,
    INOMAP_INO,
    ROOT_INO,
)
from snapvol.layout.inode import Inode
from snapvol.layout.records import TreeRoot
from snapvol.planes import Plane
from snapvol.planes.algebra import difference, union

Progress = Callable[[str, int, int], None]
MAX_PROBLEMS = 1000


@dataclass
class FsckReport:
    problems: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.problems

    def add(self, where: str, what: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(f"{where}: {what}")

    def bump(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n


class _ImageCheck:
    def __init__(self, vol: Volume, label: str, trees: tuple[TreeRoot, TreeRoot, TreeRoot,
                 TreeRoot], report: FsckReport, verified: Plane) -> None:
        self.vol, self.label, self.report, self.verified = vol, label, report, verified
        self.trees = trees
        self.reach = Plane.zeros(vol.nblocks)
        self.image = Image(vol.io, trees[0])

    def problem(self, what: str) -> None:
        self.report.add(self.label, what)

    def _claim(self, owner: str, vbns: list[int], csums: list[int], data: list[bool]) -> None:
        """Record blocks as reachable; read data blocks once per volume to verify them."""
        if not vbns:
            return
        arr = np.array(vbns, dtype=np.uint64)
        bad = (arr < FIRST_DATA_VBN) | (arr >= self.vol.nblocks)
        if bad.any():
            self.problem(f"{owner}: pointer to VBN {int(arr[bad][0])} outside the data area")
            arr = arr[~bad]
        if len(np.unique(arr)) != len(arr) or self.reach.test_many(arr).any():
            dup = [int(v) for v in arr if self.reach.test(int(v))][:1] or [int(arr[0])]
            self.problem(f"{owner}: block {dup[0]} is reachable twice (cross-linked)")
        self.reach.set_many(arr)
        for v, c, is_data in zip(vbns, csums, data, strict=True):
            if is_data and 0 < v < self.vol.nblocks and not self.verified.test(v):
                try:
                    self.vol.io.read(v, c)
                except SnapvolError as e:
                    self.problem(f"{owner}: {e}")
                self.verified.set(v)
        self.report.bump("blocks_checked", len(vbns))

    def walk_tree(self, owner: str, tree: BlockTree) -> int:
        vbns: list[int] = []
        csums: list[int] = []
        data: list[bool] = []

        def visit(level: int, idx: int, vbn: int, csum: int) -> None:
            vbns.append(vbn)
            csums.append(csum)
            data.append(level == 0)

        try:
            tree.walk(visit)
        except SnapvolError as e:
            self.problem(f"{owner}: {e}")
        self._claim(owner, vbns, csums, data)
        return len(vbns)

    def run(self, progress: Progress | None) -> Plane:
        img = self.image
        for name, root in zip(("inode file", "active plane", "summary plane", "snapshot table"),
                              self.trees, strict=True):
            self.walk_tree(name, tree_of(self.vol.io, root))
        inodes: dict[int, Inode] = {}
        nblk = img.inode_blocks
        for blk in range(nblk):
            try:
                data = img.itree.read_block(blk)
            except SnapvolError as e:
                self.problem(f"inode file block {blk}: {e}")
                continue
            for i in range(INODES_PER_BLOCK):
                ino = blk * INODES_PER_BLOCK + i
                rec = Inode.decode(ino, memoryview(data)[i * INODE_SIZE : (i + 1) * INODE_SIZE])
                if rec.allocated:
                    inodes[ino] = rec
        self.report.bump("inodes", len(inodes))
        for ino in (INOMAP_INO, ROOT_INO):
            if ino not in inodes:
                self.problem(f"reserved inode {ino} is missing")
                return self.reach
        self._check_inomap(inodes)
        if progress is not None:
            progress(self.label, 0, len(inodes))
        links: dict[int, int] = {}
        subdirs: dict[int, int] = {}
        dotdot: dict[int, int] = {}  # directory -> the parent its header names
        named_in: dict[int, int] = {}  # directory -> the directory whose entry names it
        xattr_owner: dict[int, int] = {}
        for done, (ino, rec) in enumerate(inodes.items()):
            if progress is not None and done % 1024 == 0:
                progress(self.label, done, len(inodes))
            node = Node(rec, img.io, None)
            img.nodes[ino] = node
            held = self.walk_tree(f"inode {ino}", node.tree)
            if held != rec.blocks:
                self.problem(f"inode {ino}: holds {held} blocks but records {rec.blocks}")
            if rec.xattr_ino:
                if rec.xattr_ino in xattr_owner or rec.xattr_ino not in inodes:
                    self.problem(f"inode {ino}: bad xattr inode {rec.xattr_ino}")
                xattr_owner[rec.xattr_ino] = ino
            if rec.is_dir:
                self._check_dir(ino, node, inodes, links, subdirs, dotdot, named_in)
            img.nodes.pop(ino, None)
        if progress is not None:
            progress(self.label, len(inodes), len(inodes))
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
        self.reach.set_range(0, FIRST_DATA_VBN)
        return self.reach

    def _check_inomap(self, inodes: dict[int, Inode]) -> None:
        node = Node(inodes[INOMAP_INO], self.image.io, None)
        raw = self.image.read(node, 0, node.inode.size)
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
        marked = set(np.flatnonzero(bits).tolist())
        present = set(inodes)
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
            for e in d.readdir(0):
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
            self.problem(f"directory {ino}: {e}")


def check(vol: Volume, progress: Progress | None = None) -> FsckReport:
    """Check the committed state of `vol` (commit first if it is open with changes)."""
    report = FsckReport()
    with vol.mutex:
        if vol.writable and vol.dirty:
            vol.cp()
        verified = Plane.zeros(vol.nblocks)
        r = vol.root
        images = [("active file system", (r.inode_file, r.active_plane, r.summary_plane,
                                          r.snap_table))]
        for e in vol.snapshots.regular():
            images.append((f"snapshot {e.name!r}", e.trees))
        planes = []
        for label, trees in images:
            chk = _ImageCheck(vol, label, trees, report, verified)
            reach = chk.run(progress)
            if label == "active file system" and r.receive.ptr.vbn:
                chk.walk_tree("receive state", tree_of(vol.io, r.receive))
            try:
                plane = load_plane(vol.io, trees[1], vol.nblocks)
            except SnapvolError as e:
                report.add(label, f"active plane unreadable: {e}")
                continue
            planes.append(plane)
            missing = difference(reach, plane)
            extra = difference(plane, reach)
            if missing.count():
                report.add(label, f"{missing.count()} blocks in use but free in the plane "
                                  f"(first {int(missing.members()[0])})")
            if extra.count():
                report.add(label, f"{extra.count()} blocks marked in the plane but not "
                                  f"reachable (leaked; first {int(extra.members()[0])})")
            report.bump("images")
        summary = load_plane(vol.io, r.summary_plane, vol.nblocks)
        want = union(*planes[1:]) if len(planes) > 1 else Plane.zeros(vol.nblocks)
        if summary != want:
            report.add("summary plane", "is not the union of the snapshot planes")
        _check_shadows(vol, report)
        report.stats["snapshots"] = len(images) - 1
        report.stats["bytes_used"] = planes[0].count() * BLOCK_SIZE if planes else 0
    return report


def _check_shadows(vol: Volume, report: FsckReport) -> None:
    """Shadow snapshots: no trees, planes only in their own slots' regions, and a shadow
    made from a snapshot still held equals that snapshot's plane (its blocks
    were never reusable, so no bit can have been cleared)."""
    from snapvol.engine.snapshots import snapshot_plane

    table = vol.snapshots
    slots = set(table.shadow_slots())
    pbs = vol.active_plane.plane_blocks
    tree = tree_of(vol.io, vol.root.snap_table)
    try:
        mapped = tree.mapped_fbns()
    except SnapvolError as err:
        report.add("snapshot table", f"unreadable: {err}")
        return
    for fbn in mapped[mapped >= shadows.SHADOW_BASE].tolist():
        slot = shadows.region_slot(fbn, pbs)
        if slot not in slots:
            report.add("snapshot table", f"block {fbn} holds a shadow plane for slot {slot}, "
                                         "which is not a shadow snapshot")
            break
    regular = {r.guid: r for r in table.regular()}
    for slot in sorted(slots):
        e = table.slots[slot]
        label = f"shadow snapshot {e.name!r}"
        report.bump("shadows")
        if any(t != TreeRoot() for t in e.trees):
            report.add(label, "has tree roots (a shadow's blocks may be reused)")
        try:
            plane = shadows.load(tree, slot, vol.nblocks)
        except (SnapvolError, ValueError) as err:
            report.add(label, f"plane unreadable: {err}")
            continue
        twin = regular.get(e.guid)
        if twin is None or twin.cp_count != e.cp_count:
            continue
        want = snapshot_plane(vol, twin)
        want.clear_range(0, FIRST_DATA_VBN)  # fixed blocks are never in a shadow
        if plane != want:
            report.add(label, f"differs from the plane of snapshot {twin.name!r}, which it "
                              "was made from and which still holds its blocks")
