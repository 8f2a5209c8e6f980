"""How engine inode numbers become the inode numbers the kernel sees.

The kernel needs one number space for the whole mount, but every snapshot is an image
with its own inode numbers (a snapshot's file keeps the number it had when the snapshot
was taken). So a FUSE inode number carries the snapshot's id in its high bits:

    fuse_ino = snap_id << SNAP_SHIFT | engine_ino      (snap_id 0 = the active image)

Snapshot ids are never reused (the table hands out increasing ids), so a number always
names the same file of the same snapshot, across mounts too. Two exceptions: the active
root (engine inode 2) is FUSE's root inode 1, and `.snapshot` itself takes engine inode
number 15, which the engine keeps reserved and never allocates.
"""

from __future__ import annotations

from snapvol.layout.constants import FIRST_USER_INO, INOMAP_INO, ROOT_INO
from snapvol.layout.names import SNAPDIR_NAME, UNLINKED_NAME

SNAP_SHIFT = 40  # 2**40 inodes per image, 2**24 snapshot ids
INO_MASK = (1 << SNAP_SHIFT) - 1
FUSE_ROOT = 1
SNAPDIR_INO = FIRST_USER_INO - 1  # reserved in the engine's numbering
__all__ = ["FUSE_ROOT", "SNAPDIR_INO", "SNAPDIR_NAME", "UNLINKED_NAME", "from_fuse", "to_fuse"]


def to_fuse(snap_id: int, ino: int) -> int:
    """The kernel's number for engine inode `ino` of image `snap_id` (0 = active)."""
    if snap_id == 0 and ino == ROOT_INO:
        return FUSE_ROOT
    return snap_id << SNAP_SHIFT | ino


def from_fuse(fino: int) -> tuple[int, int]:
    """(snap_id, engine inode) of a kernel inode number (not SNAPDIR_INO)."""
    snap_id, ino = fino >> SNAP_SHIFT, fino & INO_MASK
    if snap_id == 0 and ino == INOMAP_INO:
        return 0, ROOT_INO
    return snap_id, ino
