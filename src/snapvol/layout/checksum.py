"""Block checksums: 64-bit xxh3, seeded with the block's VBN.

Seeding with the VBN makes a block written to (or read from) the wrong address fail its
check, not only a block whose bytes rotted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

from snapvol.layout._blocksum import checksums_of as _checksums_of
from snapvol.layout._blocksum import first_mismatch as _first_mismatch
from snapvol.layout._blocksum import run_checksums as _run_checksums

xxh3_64 = xxhash.xxh3_64_intdigest  # (data, seed) -> int; for hot loops that inline the check
_xxh3 = xxh3_64


def block_checksum(data: bytes | bytearray | memoryview, vbn: int) -> int:
    """The checksum stored in the pointer to block `vbn` holding `data`."""
    return int(_xxh3(data, vbn))


def record_checksum(data: bytes | bytearray | memoryview) -> int:
    """Checksum of a self-checking record (superblock, root record, stream records)."""
    return int(_xxh3(data, 0x534E4150))


def run_checksums(data: bytes | bytearray | memoryview, first_vbn: int) -> np.ndarray:
    """The checksums of a run of whole blocks as if it lay at VBN `first_vbn` onward (one
    call into C: block_checksum of each block, as little-endian u64 values)."""
    return np.frombuffer(_run_checksums(data, first_vbn), dtype="<u8")


def first_bad_block(data: bytes | bytearray | memoryview, first_vbn: int,
                    csums: np.ndarray) -> int:
    """The index of the first block of a run read from `first_vbn` on whose checksum is
    not its pointer's (`csums`, one per block), or -1 when all match (one call into C)."""
    return _first_mismatch(data, first_vbn, np.ascontiguousarray(csums, dtype="<u8").data)


def checksums_of(blocks: Sequence[bytes | memoryview], vbns: np.ndarray) -> np.ndarray:
    """block_checksum of each block of `blocks` at its VBN in `vbns` (one call into C)."""
    return np.frombuffer(_checksums_of(blocks, np.ascontiguousarray(vbns, dtype="<u8").data),
                         dtype="<u8")
