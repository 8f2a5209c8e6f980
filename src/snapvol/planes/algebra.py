"""Set algebra on planes and the free-space search, without reading any block data.

Which blocks a transfer sends, which blocks are free, what a snapshot holds: all are
expressions over planes (union, difference, intersection) evaluated as bitwise numpy
operations on packed words, O(nblocks / 64). Large planes are processed in chunks of
`CHUNK_WORDS` words so the operands of one step stay in the CPU cache and no full-size
temporary is allocated beyond the result itself.

All planes of one expression must have the same `nblocks`; mixing sizes is a bug (a resized
volume resizes its planes first, see `Plane.resized`). Results are new planes with no dirty
marks; the in-place variants mark dirty exactly the plane blocks of `dst` they changed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import cast

import numpy as np
import numpy.typing as npt

from snapvol.planes.plane import (
    FULL,
    WORD,
    WORDS_PER_PLANE_BLOCK,
    Plane,
    Words,
    bit_positions,
)

CHUNK_WORDS = 1 << 16
"""Words per step of a whole-plane operation: 512 KiB per operand, a multiple of the
plane-block size (128 plane blocks) so dirty marks can be computed per chunk."""

SEARCH_CHUNK_WORDS = 1 << 13
"""Words in the first step of a free-space search (524,288 blocks): small, because most
searches are satisfied near the cursor; later steps double up to CHUNK_WORDS."""


def _common_size(planes: Sequence[Plane]) -> int:
    if not planes:
        raise ValueError("at least one plane is needed")
    nblocks = planes[0].nblocks
    for plane in planes[1:]:
        if plane.nblocks != nblocks:
            raise ValueError(f"planes of {nblocks} and {plane.nblocks} blocks cannot be combined")
    return nblocks


def _chunks(nwords: int, size: int = CHUNK_WORDS) -> Iterator[slice]:
    for lo in range(0, nwords, size):
        yield slice(lo, min(lo + size, nwords))


def _fold(planes: Sequence[Plane], op: np.ufunc) -> Plane:
    """`op`-reduce the words of `planes` into a new plane, chunk by chunk."""
    nblocks = _common_size(planes)
    out = np.empty_like(planes[0].words)
    for part in _chunks(out.size):
        chunk = out[part]
        np.copyto(chunk, planes[0].words[part])
        for plane in planes[1:]:
            op(chunk, plane.words[part], out=chunk)
    return Plane(nblocks, out)


def union(*planes: Plane) -> Plane:
    """Blocks in any of `planes`."""
    return _fold(planes, np.bitwise_or)


def intersection(*planes: Plane) -> Plane:
    """Blocks in all of `planes`."""
    return _fold(planes, np.bitwise_and)


def difference(a: Plane, b: Plane) -> Plane:
    """Blocks in `a` and not in `b` (what an incremental transfer from b to a sends)."""
    nblocks = _common_size((a, b))
    out = np.empty_like(a.words)
    for part in _chunks(out.size):
        chunk = out[part]
        np.invert(b.words[part], out=chunk)
        np.bitwise_and(chunk, a.words[part], out=chunk)
    return Plane(nblocks, out)


def _mark_chunk(dst: Plane, part: slice, delta: Words) -> bool:
    """Mark dirty the plane blocks of `dst` in `part` where `delta` has bits; any at all?"""
    per_block = cast(npt.NDArray[np.bool_], delta.reshape(-1, WORDS_PER_PLANE_BLOCK).any(axis=1))
    if not per_block.any():
        return False
    dst.mark_dirty_where(per_block, first=part.start // WORDS_PER_PLANE_BLOCK)
    return True


def union_into(dst: Plane, src: Plane) -> None:
    """dst |= src, marking dirty the plane blocks of dst that gained a bit."""
    _common_size((dst, src))
    scratch = np.empty(min(CHUNK_WORDS, dst.words.size), dtype=WORD)
    for part in _chunks(dst.words.size):
        target = dst.words[part]
        delta = scratch[: target.size]
        np.invert(target, out=delta)
        np.bitwise_and(delta, src.words[part], out=delta)  # bits new to dst
        if _mark_chunk(dst, part, delta):
            np.bitwise_or(target, delta, out=target)


def union_into_blocks(dst: Plane, src: Plane, blocks: npt.NDArray[np.intp]) -> None:
    """`union_into` restricted to the plane blocks `blocks` (sorted, unique): the caller
    knows dst already holds src everywhere else. Costs O(len(blocks)), not O(nblocks),
    which keeps snapshot creation flat on huge sparse volumes; many blocks take the
    chunked whole-plane pass instead."""
    _common_size((dst, src))
    if blocks.size * 4 > dst.plane_blocks:
        union_into(dst, src)
        return
    if blocks.size == 0:
        return
    target = dst.words.reshape(-1, WORDS_PER_PLANE_BLOCK)
    new = src.words.reshape(-1, WORDS_PER_PLANE_BLOCK)[blocks] & ~target[blocks]
    gained = new.any(axis=1)
    if gained.any():
        hit = blocks[gained]
        target[hit] |= new[gained]
        changed = np.zeros(dst.plane_blocks, dtype=np.bool_)
        changed[hit] = True
        dst.mark_dirty_where(changed)


def difference_into(dst: Plane, src: Plane) -> None:
    """dst &= ~src, marking dirty the plane blocks of dst that lost a bit."""
    _common_size((dst, src))
    scratch = np.empty(min(CHUNK_WORDS, dst.words.size), dtype=WORD)
    for part in _chunks(dst.words.size):
        target = dst.words[part]
        delta = scratch[: target.size]
        np.bitwise_and(target, src.words[part], out=delta)  # bits dst loses
        if _mark_chunk(dst, part, delta):
            np.bitwise_xor(target, delta, out=target)


def count_difference(a: Plane, b: Plane) -> int:
    """|a − b|, the blocks an incremental transfer would send, without building a − b."""
    _common_size((a, b))
    scratch = np.empty(min(CHUNK_WORDS, a.words.size), dtype=WORD)
    counts = np.empty(scratch.size, dtype=np.uint8)
    total = 0
    for part in _chunks(a.words.size):
        chunk = scratch[: part.stop - part.start]
        np.invert(b.words[part], out=chunk)
        np.bitwise_and(chunk, a.words[part], out=chunk)
        total += int(np.bitwise_count(chunk, out=counts[: chunk.size]).sum(dtype=np.uint64))
    return total


def is_subset(a: Plane, b: Plane) -> bool:
    """Whether every block of `a` is in `b`; stops at the first chunk that says no."""
    _common_size((a, b))
    scratch = np.empty(min(CHUNK_WORDS, a.words.size), dtype=WORD)
    for part in _chunks(a.words.size):
        chunk = scratch[: part.stop - part.start]
        np.invert(b.words[part], out=chunk)
        np.bitwise_and(chunk, a.words[part], out=chunk)
        if chunk.any():
            return False
    return True


def count_free(*busy: Plane) -> int:
    """Blocks clear in every one of `busy` (invariant 5: a block is free iff no plane
    holds it)."""
    nblocks = _common_size(busy)
    scratch = np.empty(min(CHUNK_WORDS, busy[0].words.size), dtype=WORD)
    counts = np.empty(scratch.size, dtype=np.uint8)
    used = 0
    for part in _chunks(busy[0].words.size):
        chunk = _busy_words(busy, part, scratch)
        used += int(np.bitwise_count(chunk, out=counts[: chunk.size]).sum(dtype=np.uint64))
    return nblocks - used


def _busy_words(busy: Sequence[Plane], part: slice, scratch: Words) -> Words:
    """The OR of the busy planes' words in `part`, written into the front of `scratch`."""
    chunk = scratch[: part.stop - part.start]
    np.copyto(chunk, busy[0].words[part])
    for plane in busy[1:]:
        np.bitwise_or(chunk, plane.words[part], out=chunk)
    return chunk


def find_free(
    start: int, want: int, *busy: Plane, limit: int | None = None
) -> list[tuple[int, int]]:
    """Runs (vbn, length) of blocks clear in every busy plane, up to `want` blocks in all.

    The scan goes forward from `start` to the end of the volume, then wraps to 0 and stops
    at `start`, so an allocator that keeps a cursor writes sequentially and revisits freed
    space only after a full lap. Runs come in scan order, each as long as the free space
    allows (the last one cut to make exactly `want`). Fewer blocks come back when the
    volume has fewer free. `limit`, if given, caps the number of runs, for a caller that
    wants to bound how fragmented one allocation may be.
    """
    nblocks = _common_size(busy)
    if start < 0:
        raise ValueError(f"cannot search from block {start}")
    if want <= 0 or nblocks == 0 or (limit is not None and limit <= 0):
        return []
    start %= nblocks
    runs: list[tuple[int, int]] = []
    remaining = want
    for lo, hi in ((start, nblocks), (0, start)):
        for starts, ends, chunk_end in _free_runs(busy, lo, hi):
            remaining = _take_runs(runs, starts, ends, remaining, limit)
            if remaining == 0:
                return runs
            # At the run limit, go on only if the next chunk may extend the last run.
            if len(runs) == limit and sum(runs[-1]) != chunk_end:
                return runs
    return runs


def _take_runs(
    runs: list[tuple[int, int]],
    starts: npt.NDArray[np.uint64],
    ends: npt.NDArray[np.uint64],
    remaining: int,
    limit: int | None,
) -> int:
    """Append runs [starts, ends) to `runs` until `remaining` blocks or `limit` runs are
    taken; a run continuing the previous chunk's last run extends it. Returns what is
    still wanted."""
    lengths = (ends - starts).astype(np.int64)
    skip = 0
    if runs and runs[-1][0] + runs[-1][1] == int(starts[0]):
        take = min(int(lengths[0]), remaining)
        runs[-1] = (runs[-1][0], runs[-1][1] + take)
        remaining -= take
        skip = 1
    if remaining == 0 or skip == lengths.size or len(runs) == limit:
        return remaining
    totals = np.cumsum(lengths[skip:])
    count = min(int(np.searchsorted(totals, remaining)) + 1, totals.size)
    if limit is not None:
        count = min(count, limit - len(runs))
    picked_starts: list[int] = starts[skip : skip + count].tolist()
    picked_lengths: list[int] = lengths[skip : skip + count].tolist()
    excess = int(totals[count - 1]) - remaining
    if excess > 0:
        picked_lengths[-1] -= excess
    runs.extend(zip(picked_starts, picked_lengths, strict=True))
    return remaining - sum(picked_lengths)


def _free_runs(
    busy: Sequence[Plane], lo: int, hi: int
) -> Iterator[tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], int]]:
    """Per chunk, the free runs in blocks [lo, hi) as arrays of starts and exclusive ends,
    and the block where the chunk ends.

    Runs are cut at chunk edges (the caller joins them). A run starts at a free bit whose
    predecessor is busy and ends at a free bit whose successor is busy; both are found for
    a whole chunk with shifts on words, so only the few words holding a run edge are ever
    unpacked to bits, and a chunk with no free bit costs one OR and one test.
    """
    if lo >= hi:
        return
    first_word, end_word = lo >> 6, (hi + 63) >> 6
    size = SEARCH_CHUNK_WORDS
    scratch = np.empty(min(CHUNK_WORDS, end_word - first_word), dtype=WORD)
    word = first_word
    while word < end_word:
        part = slice(word, min(word + size, end_word))
        free = _busy_words(busy, part, scratch)
        np.invert(free, out=free)
        if part.start == first_word and lo & 63:
            free[0] &= np.uint64(FULL ^ ((1 << (lo & 63)) - 1))
        if part.stop == end_word and hi & 63:
            free[-1] &= np.uint64((1 << (hi & 63)) - 1)
        if free.any():
            base = np.uint64(part.start * 64)
            heads = bit_positions(_run_heads(free)) + base
            tails = bit_positions(_run_tails(free)) + base
            yield heads, tails + np.uint64(1), min(part.stop * 64, hi)
        word = part.stop
        size = min(size * 2, CHUNK_WORDS)


def runs(plane: Plane, start: int = 0) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """The runs of set bits at or past `start`, in order: (first VBNs, lengths).

    Found a chunk at a time with shifts on words (as the free-space search finds free
    runs), so no array per set bit is made: choosing a send's records for a full volume of
    2^29 blocks costs the runs, not 4 GiB of VBNs. Each chunk is read with one word of
    its neighbours on either side, so a run crossing a chunk edge has one head and one
    tail in all."""
    words = plane.words
    first = start >> 6
    heads: list[npt.NDArray[np.uint64]] = []
    tails: list[npt.NDArray[np.uint64]] = []
    for lo in range(first, words.size, CHUNK_WORDS):
        hi = min(lo + CHUNK_WORDS, words.size)
        a, b = max(lo - 1, first), min(hi + 1, words.size)
        ext = words[a:b].copy()
        if a == first and start & 63:  # bits below `start` are not wanted
            ext[0] &= np.uint64(FULL ^ ((1 << (start & 63)) - 1))
        keep = slice(lo - a, lo - a + hi - lo)
        h, t = _run_heads(ext)[keep], _run_tails(ext)[keep]
        base = np.uint64(lo * 64)
        if h.any():
            heads.append(bit_positions(h) + base)
        if t.any():
            tails.append(bit_positions(t) + base)
    if not heads:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    starts, ends = np.concatenate(heads), np.concatenate(tails)
    return starts, (ends - starts).astype(np.int64) + 1


def _run_heads(free: Words) -> Words:
    """Bits of `free` whose lower neighbour (across words too) is not free."""
    below = np.left_shift(free, np.uint64(1))
    below[1:] |= free[:-1] >> np.uint64(63)
    return free & ~below


def _run_tails(free: Words) -> Words:
    """Bits of `free` whose upper neighbour (across words too) is not free."""
    above = np.right_shift(free, np.uint64(1))
    above[:-1] |= free[1:] << np.uint64(63)
    return free & ~above
