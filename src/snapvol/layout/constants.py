"""Fixed numbers of the format (DESIGN.md §4)."""

from __future__ import annotations

BLOCK_SIZE = 4096
FORMAT_VERSION = 1

SUPERBLOCK_VBN = 0
ROOT_SLOT_VBNS = (1, 2)
FIRST_DATA_VBN = 3  # blocks below this are fixed records and never allocated
MIN_VOLUME_BLOCKS = 256  # 1 MiB: the smallest volume `format` makes
MAX_VOLUME_BLOCKS = 1 << 40
"""The largest volume, in blocks (4 PiB; its planes alone would take 256 GiB of memory):
the limit an image stream's header states for the source volume's size (FORMAT.md), so
every volume can be sent. `create` refuses more."""

POINTER_SIZE = 16
PTRS_PER_BLOCK = BLOCK_SIZE // POINTER_SIZE  # 256
PTR_SHIFT = 8  # log2(PTRS_PER_BLOCK)

INODE_SIZE = 256
INODES_PER_BLOCK = BLOCK_SIZE // INODE_SIZE  # 16
INODE_DIRECT = 8  # top-level pointers held in an inode

MAX_NAME = 255
MAX_SNAPSHOTS = 255
MAX_SNAP_ID = (1 << 24) - 1  # snapshot ids are never reused; FUSE keeps them in 24 bits
SNAP_ENTRY_SIZE = 512
SNAP_ENTRIES_PER_BLOCK = BLOCK_SIZE // SNAP_ENTRY_SIZE
SNAP_TABLE_BLOCKS = (MAX_SNAPSHOTS + SNAP_ENTRIES_PER_BLOCK) // SNAP_ENTRIES_PER_BLOCK

# Reserved inode numbers. User inodes start at FIRST_USER_INO.
INOMAP_INO = 1  # allocation bitmap of the inode file
ROOT_INO = 2  # the root directory
DUMPS_INO = 3  # the dump catalog (levelled dumps made of this volume), made on first dump
FIRST_USER_INO = 16

# Largest file size: 8 * 256**5 blocks would overflow what anyone needs; we cap the tree
# height so a file addresses up to 8 * 256**4 blocks = 32 PiB, and the logical size at 2**60.
MAX_HEIGHT = 5
MAX_FILE_SIZE = 1 << 60
