"""Block pointers: a VBN and the checksum of the block it points to (16 bytes).

An indirect block is a numpy array of 256 pointers, so comparing two versions of a tree
level is one vectorised `!=` (DESIGN.md §7). VBN 0 is the superblock and never a data
block, so a zero pointer is a hole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from snapvol.layout.constants import BLOCK_SIZE, PTRS_PER_BLOCK

PTR_DTYPE = np.dtype([("vbn", "<u8"), ("csum", "<u8")])


@dataclass(frozen=True, slots=True)
class Pointer:
    vbn: int = 0
    csum: int = 0

    @property
    def is_hole(self) -> bool:
        return self.vbn == 0


HOLE = Pointer()


def empty_node() -> np.ndarray:
    """A fresh indirect block: 256 hole pointers."""
    return np.zeros(PTRS_PER_BLOCK, dtype=PTR_DTYPE)


def decode_node(data: bytes) -> np.ndarray:
    """An indirect block as a writable array of pointers."""
    if len(data) != BLOCK_SIZE:
        raise ValueError(f"indirect block is {len(data)} bytes, not {BLOCK_SIZE}")
    return np.frombuffer(data, dtype=PTR_DTYPE).copy()


def encode_node(node: np.ndarray) -> bytes:
    return node.tobytes()
