"""The block-device interface every layer above talks to.

A device is an array of `nblocks` blocks of `BLOCK_SIZE` bytes, addressed by volume block
number (VBN). Runs of contiguous blocks are the unit of I/O because the engine allocates
runs and wants one system call per run, not one per 4 KiB; `readv`/`writev` take a list of
buffers so the engine can scatter a run into (or gather it from) its cache buffers without
first joining them into one bytes object.

Bounds and buffer-shape errors are programming errors and raise `ValueError`; errors a user
can cause (missing image, read-only volume) raise `snapvol.errors.VolumeError`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from types import TracebackType
from typing import Self

BLOCK_SIZE = 4096
"""Bytes per block; fixed by the design (4 KiB blocks, 64-bit VBNs)."""

Buffer = bytes | bytearray | memoryview


def byte_view(buf: Buffer) -> memoryview:
    """A flat unsigned-byte view of `buf`, so lengths are in bytes whatever its format."""
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def blocks_in(nbytes: int) -> int:
    """The number of whole blocks in `nbytes`; a partial block is a caller bug."""
    count, rest = divmod(nbytes, BLOCK_SIZE)
    if rest:
        raise ValueError(f"buffer of {nbytes} bytes is not a whole number of 4 KiB blocks")
    return count


class Device(abc.ABC):
    """A fixed-size array of 4 KiB blocks with run-granular reads and writes."""

    nblocks: int
    writable: bool

    def check_run(self, vbn: int, count: int) -> None:
        """Refuse a run that does not lie inside the device."""
        if vbn < 0 or count < 0 or vbn + count > self.nblocks:
            raise ValueError(
                f"blocks {vbn}..{vbn + count - 1} are outside the device (0..{self.nblocks - 1})"
            )

    @abc.abstractmethod
    def read(self, vbn: int, count: int = 1) -> bytes:
        """Return `count` blocks starting at `vbn`; never-written blocks read as zeros."""

    def read_block(self, vbn: int) -> bytes:
        """One block: the call the block cache makes on every miss, so devices that can
        do it in fewer steps than read() override it."""
        return self.read(vbn)

    @abc.abstractmethod
    def write(self, vbn: int, data: Buffer) -> None:
        """Write a contiguous run of whole blocks starting at `vbn`."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Durability barrier: every write issued before it survives a crash after it."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the device; closing twice is harmless."""

    def readv(self, vbn: int, bufs: list[bytearray] | list[memoryview]) -> None:
        """Fill `bufs` (each a whole number of blocks) from the run starting at `vbn`.

        The default reads the run once and copies; image devices override it with preadv.
        """
        views = [byte_view(buf) for buf in bufs]
        count = sum(blocks_in(view.nbytes) for view in views)
        data = memoryview(self.read(vbn, count))
        pos = 0
        for view in views:
            view[:] = data[pos : pos + view.nbytes]
            pos += view.nbytes

    def writev(self, vbn: int, bufs: Sequence[Buffer]) -> None:
        """Write `bufs` (each a whole number of blocks) as one run starting at `vbn`.

        The default writes buffer by buffer after checking the whole run, so a bad run
        changes nothing; image devices override it with pwritev.
        """
        views = [byte_view(buf) for buf in bufs]
        self.check_run(vbn, sum(blocks_in(view.nbytes) for view in views))
        for view in views:
            self.write(vbn, view)
            vbn += view.nbytes // BLOCK_SIZE

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
