"""Bitplanes: one bit per volume block, and the set algebra that selects blocks by plane.

A plane is the packed bits of its on-disk file (see `plane`); `algebra` combines planes
(union, difference, intersection, counts, subset tests) and finds free runs for the
allocator, all as whole-array numpy operations that never read block data.
"""

from snapvol.planes.algebra import (
    count_difference,
    count_free,
    difference,
    difference_into,
    find_free,
    intersection,
    is_subset,
    union,
    union_into,
)
from snapvol.planes.plane import BITS_PER_PLANE_BLOCK, PLANE_BLOCK_BYTES, Plane

__all__ = [
    "BITS_PER_PLANE_BLOCK",
    "PLANE_BLOCK_BYTES",
    "Plane",
    "count_difference",
    "count_free",
    "difference",
    "difference_into",
    "find_free",
    "intersection",
    "is_subset",
    "union",
    "union_into",
]
