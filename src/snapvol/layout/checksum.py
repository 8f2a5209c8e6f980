"""Block checksums: 64-bit xxh3, seeded with the block's VBN.

Seeding with the VBN makes a block written to (or read from) the wrong address fail its
check, not only a block whose bytes rotted.
"""

from __future__ import annotations

import xxhash

xxh3_64 = xxhash.xxh3_64_intdigest  # (data, seed) -> int; for hot loops that inline the check
_xxh3 = xxh3_64


def block_checksum(data: bytes | bytearray | memoryview, vbn: int) -> int:
    """The checksum stored in the pointer to block `vbn` holding `data`."""
    return int(_xxh3(data, vbn))


def record_checksum(data: bytes | bytearray | memoryview) -> int:
    """Checksum of a self-checking record (superblock, root record, stream records)."""
    return int(_xxh3(data, 0x534E4150))
