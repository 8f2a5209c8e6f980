"""Verified block reads with a cache, and the write batch of a consistency point.

Every read is checked against the checksum in the pointer that led to it (DESIGN.md §3.3);
a mismatch raises CorruptionError naming the block. Blocks are immutable while referenced
(write-anywhere), so the cache is keyed by (VBN, checksum) and never goes stale.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import cast

import numpy as np

from snapvol.device import Device
from snapvol.errors import CorruptionError
from snapvol.layout.checksum import block_checksum, first_bad_block, xxh3_64
from snapvol.layout.constants import BLOCK_SIZE

MAX_IOV = 512
STREAM_RUN = 16  # runs longer than this are not cached
_xxh3 = xxh3_64


DAMAGE_ADVICE = "the volume is damaged there: run 'snapvol fsck'"


def _mismatch(vbn: int, csum: int) -> CorruptionError:
    return CorruptionError(f"block {vbn}: checksum mismatch (expected {csum:016x})",
                           DAMAGE_ADVICE)


def _verify(data: bytes | memoryview, vbn: int, csum: int) -> None:
    if block_checksum(data, vbn) != csum:
        raise _mismatch(vbn, csum)


@functools.lru_cache(maxsize=64)
def _block_slices(n: int) -> tuple[slice, ...]:
    """The slices of the n blocks of an n-block buffer (cached: runs repeat lengths)."""
    return tuple(slice(i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE) for i in range(n))


class BlockIO:
    def __init__(self, dev: Device, cache_bytes: int = 128 << 20) -> None:
        self.dev = dev
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._cache_max = max(16, cache_bytes // BLOCK_SIZE)
        self.reads = 0
        # The blocks of a CP being written in the background (Volume.cp), by VBN: the
        # tree already points at them, so reads must find them here until they land.
        self.pending: dict[int, bytes | memoryview] = {}

    def read(self, vbn: int, csum: int) -> bytes:
        key = (vbn, csum)
        data = self._cache.get(key)
        if data is not None:
            self._cache.move_to_end(key)
            return data
        if not 0 < vbn < self.dev.nblocks:
            raise CorruptionError(f"block pointer to VBN {vbn} is outside the volume")
        if self.pending:
            mem = self.pending.get(vbn)
            if mem is not None:
                return bytes(mem)  # checksummed from these very bytes when placed
        data = self.dev.read_block(vbn)
        self.reads += 1
        if _xxh3(data, vbn) != csum:
            _verify(data, vbn, csum)  # raises, naming the block
        cache = self._cache
        cache[key] = data
        if len(cache) > self._cache_max:
            cache.popitem(last=False)
        return data

    def read_run(self, vbn: int, csums: list[int]) -> list[bytes]:
        """Read len(csums) contiguous blocks from `vbn` in one call, each verified.
        Long runs are streaming reads and bypass the cache, so they do not evict it."""
        n = len(csums)
        if n == 1 or self._pending_in(vbn, n):
            return [self.read(vbn + i, c) for i, c in enumerate(csums)]
        if n <= STREAM_RUN:
            cached = [self._cache.get((vbn + i, c)) for i, c in enumerate(csums)]
            if all(d is not None for d in cached):
                return cast(list[bytes], cached)
        raw = self._read_checked(vbn, np.array(csums, dtype=np.uint64))
        mv = memoryview(raw)
        out = [bytes(mv[s]) for s in _block_slices(n)]
        if n <= STREAM_RUN:
            for i, (c, data) in enumerate(zip(csums, out, strict=True)):
                self._remember((vbn + i, c), data)
        return out

    def read_span(self, vbn: int, csums: np.ndarray) -> bytes:
        """The bytes of len(csums) contiguous blocks from `vbn`, read in one call and each
        verified, as one buffer: a sequential reader gets its request without a bytes
        object per block or a join (a 128 KiB read was a third slower that way). Short
        runs go through the cache like `read_run`; long ones bypass it."""
        n = len(csums)
        if n <= STREAM_RUN or self._pending_in(vbn, n):
            blocks = self.read_run(vbn, csums.tolist())
            return blocks[0] if n == 1 else b"".join(blocks)
        return self._read_checked(vbn, csums)

    def _read_checked(self, vbn: int, csums: np.ndarray) -> bytes:
        """One device read of len(csums) blocks from `vbn`, every block's checksum checked
        in one call into C (layout.checksum.first_bad_block)."""
        n = len(csums)
        if not vbn > 0 or vbn + n > self.dev.nblocks:
            raise CorruptionError(f"block run {vbn}+{n} is outside the volume")
        raw = self.dev.read(vbn, n)
        self.reads += n
        bad = first_bad_block(raw, vbn, csums)
        if bad >= 0:
            raise _mismatch(vbn + bad, int(csums[bad]))
        return raw

    def verify(self, vbn: int, csum: int) -> bool:
        """Whether block `vbn` on the device matches `csum` (read past the cache, as a
        check reads everything once; a block outside the device does not match)."""
        if not 0 < vbn < self.dev.nblocks:
            return False
        self.reads += 1
        return bool(_xxh3(self.dev.read_block(vbn), vbn) == csum)

    def bad_in_run(self, vbn: int, csums: np.ndarray) -> list[int]:
        """Verify len(csums) contiguous blocks from `vbn` (one device read, bypassing the
        cache, as a check reads everything once) and return the indexes of those whose
        checksum is not their pointer's: all of them, not only the first."""
        n = len(csums)
        if not vbn > 0 or vbn + n > self.dev.nblocks:
            raise CorruptionError(f"block run {vbn}+{n} is outside the volume")
        raw = memoryview(self.dev.read(vbn, n))
        self.reads += n
        bad: list[int] = []
        at = 0
        while at < n:
            i = first_bad_block(raw[at * BLOCK_SIZE :], vbn + at, csums[at:])
            if i < 0:
                break
            bad.append(at + i)
            at += i + 1
        return bad

    def _pending_in(self, vbn: int, n: int) -> bool:
        """Whether any of blocks vbn..vbn+n-1 is still being written by a CP."""
        pending = self.pending
        return bool(pending) and any(map(pending.__contains__, range(vbn, vbn + n)))

    def _remember(self, key: tuple[int, int], data: bytes) -> None:
        self._cache[key] = data
        if len(self._cache) > self._cache_max:
            self._cache.popitem(last=False)

    def remember_written(self, vbn: int, csum: int, data: bytes) -> None:
        """Keep a block just written (metadata mostly) so the next read costs nothing."""
        self._remember((vbn, csum), data)

    def drop_cache(self) -> None:
        self._cache.clear()


class WriteBatch:
    """Blocks a CP will write, gathered so they go out as sorted, coalesced runs."""

    def __init__(self) -> None:
        self.blocks: dict[int, bytes | memoryview] = {}
        # Files' data blocks, kept as prepare placed them (VBNs in file order, mostly
        # contiguous runs) so a GiB of data needs no dict entry or sort per block.
        self.runs: list[tuple[np.ndarray, list[bytes | memoryview]]] = []

    def add(self, vbn: int, data: bytes) -> None:
        self.blocks[vbn] = data

    def add_run(self, vbns: np.ndarray, datas: list[bytes | memoryview]) -> None:
        """Blocks `datas` to VBNs `vbns` (newly allocated, so never in the batch already)."""
        self.runs.append((vbns, datas))

    def __len__(self) -> int:
        return len(self.blocks) + sum(len(d) for _, d in self.runs)

    def contents(self) -> dict[int, bytes | memoryview]:
        """Every block of the batch by VBN: what reads must see while it is written."""
        out = dict(self.blocks)
        for vbns, datas in self.runs:
            out.update(zip(vbns.tolist(), datas, strict=True))
        return out

    def write_to(self, dev: Device) -> None:
        """Write every block, one vectored call per contiguous run (VBN order within the
        single blocks; the data runs as they are, since order before the flush is free)."""
        for vbns, datas in self.runs:
            breaks = (np.flatnonzero(np.diff(vbns.astype(np.int64)) != 1) + 1).tolist()
            starts = vbns[[0, *breaks]].tolist()
            for lo, hi, v0 in zip([0, *breaks], [*breaks, len(datas)], starts, strict=True):
                for at in range(lo, hi, MAX_IOV):
                    dev.writev(v0 + at - lo, datas[at : min(hi, at + MAX_IOV)])
        self.runs.clear()
        if not self.blocks:
            return
        vbns = np.array(sorted(self.blocks), dtype=np.int64)
        breaks = (np.flatnonzero(np.diff(vbns) != 1) + 1).tolist()
        blocks = self.blocks
        for lo, hi in zip([0, *breaks], [*breaks, len(vbns)], strict=True):
            for at in range(lo, hi, MAX_IOV):
                run = vbns[at : min(hi, at + MAX_IOV)].tolist()
                dev.writev(run[0], [blocks[v] for v in run])
        blocks.clear()
