"""An in-memory device for tests and for throw-away volumes.

Only written blocks are stored (a dict from VBN to 4 KiB bytes), so a nominally huge device
costs memory in proportion to what was written, and tests can model terabyte volumes.
Blocks are immutable `bytes`, which makes `snapshot()` a shallow dict copy.
"""

from __future__ import annotations

from snapvol.device.base import BLOCK_SIZE, Buffer, Device, blocks_in, byte_view
from snapvol.errors import VolumeError

ZERO_BLOCK = bytes(BLOCK_SIZE)


class MemoryDevice(Device):
    """A sparse device held in a dict; unwritten blocks read as zeros."""

    def __init__(self, nblocks: int, *, writable: bool = True) -> None:
        if nblocks < 0:
            raise ValueError(f"a device cannot have {nblocks} blocks")
        self.nblocks = nblocks
        self.writable = writable
        self._blocks: dict[int, bytes] = {}

    @staticmethod
    def from_blocks(nblocks: int, blocks: dict[int, bytes]) -> MemoryDevice:
        """A device holding `blocks` (taken over, not copied)."""
        device = MemoryDevice(nblocks)
        device._blocks = blocks
        return device

    def read(self, vbn: int, count: int = 1) -> bytes:
        self.check_run(vbn, count)
        get = self._block
        return b"".join([get(v) for v in range(vbn, vbn + count)])

    def write(self, vbn: int, data: Buffer) -> None:
        if not self.writable:
            raise VolumeError("the memory device is read-only")
        view = byte_view(data)
        count = blocks_in(view.nbytes)
        self.check_run(vbn, count)
        for i in range(count):
            self._put(vbn + i, bytes(view[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]))

    def flush(self) -> None:
        """Nothing to do: memory has no cache between the writer and the medium."""

    def close(self) -> None:
        """Nothing to release; the contents stay readable for the test that made them."""

    def snapshot(self) -> MemoryDevice:
        """An independent device with the blocks as they read now."""
        return MemoryDevice.from_blocks(self.nblocks, dict(self._blocks))

    def written_vbns(self) -> list[int]:
        """The sorted VBNs that have ever been written (to check what a test touched)."""
        return sorted(self._blocks)

    def _block(self, vbn: int) -> bytes:
        return self._blocks.get(vbn, ZERO_BLOCK)

    def _put(self, vbn: int, block: bytes) -> None:
        """Store one block; the hook the fault-injecting device intercepts."""
        self._blocks[vbn] = block

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.nblocks} blocks, {len(self._blocks)} written)"
