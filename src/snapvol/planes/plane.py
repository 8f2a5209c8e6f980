"""A bitplane: one bit per block of a volume, packed exactly as it is stored on disk.

On disk a plane is a file of 4096-byte plane blocks, each holding 32768 bits; bit b of the
plane is bit (b % 8) of byte (b // 8), least significant bit first. In memory the same bytes
are a numpy array of little-endian 64-bit words (bit b is bit (b % 64) of word b // 64),
so encoding a plane block is a slice and a `tobytes()`, and every set operation is one
whole-array numpy expression over words.

Bits at and past `nblocks` (the padding of the last plane block) are always zero, so whole-
array operations need no masking and two planes with the same members compare equal.

The engine writes back only the plane blocks that changed since the last consistency point,
so every mutating method records which plane blocks it actually changed (setting a bit that
was already set dirties nothing). `dirty_blocks()` returns them as a `set[int]`, which is
safe to combine with other sets; `dirty_array()` gives the same as a sorted numpy array.

Out-of-range VBNs raise IndexError; malformed buffers raise ValueError.
"""

from __future__ import annotations

import builtins
from typing import Any

import numpy as np
import numpy.typing as npt

BITS_PER_PLANE_BLOCK = 32768
PLANE_BLOCK_BYTES = 4096
WORDS_PER_PLANE_BLOCK = PLANE_BLOCK_BYTES // 8
WORD = np.dtype("<u8")
FULL = (1 << 64) - 1
ALL_ONES = np.uint64(FULL)

Words = npt.NDArray[np.uint64]
VbnArray = npt.NDArray[np.integer[Any]]


def plane_blocks_for(nblocks: int) -> int:
    """Plane blocks needed for a plane of `nblocks` bits."""
    return -(-nblocks // BITS_PER_PLANE_BLOCK)


class Plane:
    """A fixed-size set of VBNs held as packed bits, with per-plane-block dirty tracking."""

    __slots__ = ("_dirty", "_touched", "nblocks", "plane_blocks", "words")

    def __init__(self, nblocks: int, words: npt.NDArray[Any] | None = None) -> None:
        if nblocks < 0:
            raise ValueError(f"a plane cannot have {nblocks} blocks")
        self.nblocks = nblocks
        self.plane_blocks = plane_blocks_for(nblocks)
        nwords = self.plane_blocks * WORDS_PER_PLANE_BLOCK
        if words is None:
            self.words: Words = np.zeros(nwords, dtype=WORD)
        else:
            array = np.require(words, dtype=WORD, requirements=["C", "W"])
            if array.ndim != 1 or array.size != nwords:
                raise ValueError(
                    f"a plane of {nblocks} blocks needs {nwords} words, got shape {array.shape}"
                )
            self.words = array
            if not self._padding_is_clear():
                raise ValueError(f"bits at or past block {nblocks} are set")
        self._dirty = np.zeros(self.plane_blocks, dtype=np.bool_)
        # Changed since the last clear_touched(), across mark_clean(); a new plane's
        # relation to any other is unknown, so it starts all touched.
        self._touched = np.ones(self.plane_blocks, dtype=np.bool_)

    @classmethod
    def zeros(cls, nblocks: int) -> Plane:
        """An empty plane."""
        return cls(nblocks)

    @classmethod
    def from_bytes(cls, nblocks: int, data: bytes | bytearray | memoryview) -> Plane:
        """A plane from its whole on-disk encoding (all plane blocks, in order).

        Bits past `nblocks` in the last plane block are ignored (cleared).
        """
        plane = cls(nblocks)
        expected = plane.plane_blocks * PLANE_BLOCK_BYTES
        if len(memoryview(data).cast("B")) != expected:
            raise ValueError(f"a plane of {nblocks} blocks is {expected} bytes")
        plane.words[:] = np.frombuffer(data, dtype=WORD)
        plane._clear_padding()
        return plane

    def to_bytes(self) -> bytes:
        """The whole on-disk encoding: every plane block, in order."""
        return self.words.tobytes()

    def copy(self) -> Plane:
        """An independent plane with the same bits and the same dirty marks."""
        twin = Plane(self.nblocks, self.words.copy())
        twin._dirty[:] = self._dirty
        return twin

    def resized(self, nblocks: int) -> Plane:
        """A copy for a volume grown or shrunk to `nblocks` (bits past it are dropped).

        Plane blocks whose content differs from a clean encoding of the old plane are
        marked dirty: the new blocks past the old end and a shortened last block.
        """
        plane = Plane(nblocks)
        keep = min(self.words.size, plane.words.size)
        plane.words[:keep] = self.words[:keep]
        plane._clear_padding()
        keep_blocks = min(self.plane_blocks, plane.plane_blocks)
        plane._dirty[:keep_blocks] = self._dirty[:keep_blocks]
        plane._dirty[keep_blocks:] = True
        if nblocks < self.nblocks and plane.plane_blocks:
            plane._dirty[-1] = True
        return plane

    # -- single bits ---------------------------------------------------------------------

    def test(self, vbn: int) -> bool:
        self._check_vbn(vbn)
        return bool((int(self.words[vbn >> 6]) >> (vbn & 63)) & 1)

    def set(self, vbn: int) -> None:
        self._check_vbn(vbn)
        self._apply_word(vbn >> 6, 1 << (vbn & 63), True)

    def clear(self, vbn: int) -> None:
        self._check_vbn(vbn)
        self._apply_word(vbn >> 6, 1 << (vbn & 63), False)

    # -- many bits -----------------------------------------------------------------------

    def set_many(self, vbns: VbnArray) -> None:
        """Set every VBN in `vbns` (any order, duplicates allowed)."""
        self._apply_many(vbns, True)

    def clear_many(self, vbns: VbnArray) -> None:
        """Clear every VBN in `vbns` (any order, duplicates allowed)."""
        self._apply_many(vbns, False)

    def test_many(self, vbns: VbnArray) -> npt.NDArray[np.bool_]:
        """A bool array shaped like `vbns`: which of them are set."""
        shape = np.shape(vbns)
        v = self._checked_vbns(vbns)
        bits = (self.words[v >> np.uint64(6)] >> (v & np.uint64(63))) & np.uint64(1)
        found: npt.NDArray[np.bool_] = bits.astype(np.bool_).reshape(shape)
        return found

    def set_range(self, start: int, count: int) -> None:
        """Set the `count` blocks from `start`."""
        self._apply_range(start, count, True)

    def clear_range(self, start: int, count: int) -> None:
        """Clear the `count` blocks from `start`."""
        self._apply_range(start, count, False)

    # -- whole plane ---------------------------------------------------------------------

    def count(self) -> int:
        """The number of set bits."""
        return int(np.bitwise_count(self.words).sum(dtype=np.uint64))

    def members(self) -> npt.NDArray[np.uint64]:
        """The set VBNs, sorted.

        Two levels, so a sparse plane costs little: first the plane blocks with any bit
        (one cheap reduction), then the set bits of just those blocks' words.
        """
        blocks = self.nonzero_blocks()
        if blocks.size == self.plane_blocks:
            return bit_positions(self.words)
        held = self.words.reshape(-1, WORDS_PER_PLANE_BLOCK)[blocks].ravel()
        positions = bit_positions(held)
        shift = np.uint64(BITS_PER_PLANE_BLOCK.bit_length() - 1)
        block_base = blocks.astype(np.uint64)[positions >> shift] << shift
        offset = positions & np.uint64(BITS_PER_PLANE_BLOCK - 1)
        found: npt.NDArray[np.uint64] = block_base | offset
        return found

    def nonzero_blocks(self) -> npt.NDArray[np.intp]:
        """Indices of the plane blocks with any bit set (the blocks a sparse file stores)."""
        return np.flatnonzero(self.words.reshape(-1, WORDS_PER_PLANE_BLOCK).any(axis=1))

    # -- on-disk encoding ----------------------------------------------------------------

    def block_bytes(self, pb: int) -> bytes:
        """The 4096-byte encoding of plane block `pb`."""
        self._check_pb(pb)
        lo = pb * WORDS_PER_PLANE_BLOCK
        return self.words[lo : lo + WORDS_PER_PLANE_BLOCK].tobytes()

    def load_block(self, pb: int, data: bytes | bytearray | memoryview) -> None:
        """Replace plane block `pb` with its encoding `data`; dirty marks are untouched,
        because loading from disk makes memory agree with disk rather than differ from it.
        Bits past `nblocks` in the last block are ignored (cleared)."""
        self._check_pb(pb)
        if len(memoryview(data).cast("B")) != PLANE_BLOCK_BYTES:
            raise ValueError(f"a plane block is {PLANE_BLOCK_BYTES} bytes")
        lo = pb * WORDS_PER_PLANE_BLOCK
        self.words[lo : lo + WORDS_PER_PLANE_BLOCK] = np.frombuffer(data, dtype=WORD)
        if pb == self.plane_blocks - 1:
            self._clear_padding()

    # -- dirty tracking ------------------------------------------------------------------

    def dirty_blocks(self) -> builtins.set[int]:
        """The plane blocks changed since the last `mark_clean()`."""
        return set(np.flatnonzero(self._dirty).tolist())

    def dirty_array(self) -> npt.NDArray[np.intp]:
        """`dirty_blocks()` as a sorted array."""
        return np.flatnonzero(self._dirty)

    def mark_clean(self) -> None:
        """Forget all dirty marks (after the engine wrote the dirty plane blocks)."""
        np.logical_or(self._touched, self._dirty, out=self._touched)
        self._dirty[:] = False

    def touched_array(self) -> npt.NDArray[np.intp]:
        """The plane blocks changed since the last `clear_touched()` (all of them before
        the first), as a sorted array. Every change marks its block dirty, so this sees
        every change whatever wrote it; a plane derived from this one (the summary plane
        from the active one) need only be brought up to date in these blocks."""
        return np.flatnonzero(self._touched | self._dirty)

    def clear_touched(self) -> None:
        """Start `touched_array()` afresh (the derived plane is up to date)."""
        self._touched[:] = False

    def mark_dirty(self, pb: int) -> None:
        """Force plane block `pb` to be written at the next consistency point."""
        self._check_pb(pb)
        self._dirty[pb] = True

    def mark_dirty_where(self, changed: npt.NDArray[np.bool_], first: int = 0) -> None:
        """Mark dirty plane block `first + i` wherever `changed[i]` is true."""
        if first < 0 or first + changed.size > self.plane_blocks:
            raise IndexError(f"plane blocks {first}..{first + changed.size - 1} are outside")
        target = self._dirty[first : first + changed.size]
        np.logical_or(target, changed, out=target)

    def mark_words_changed(self, first_word: int, changed: npt.NDArray[np.bool_]) -> None:
        """Mark dirty the plane blocks holding the words `first_word + i` where `changed[i]`.

        One reduction per plane block, so a range covering the whole plane costs no
        index array per word.
        """
        if changed.size == 0:
            return
        offset = -first_word % WORDS_PER_PLANE_BLOCK
        starts = np.arange(offset, changed.size, WORDS_PER_PLANE_BLOCK)
        if offset:
            starts = np.concatenate(([0], starts))
        hit = np.logical_or.reduceat(changed, starts)
        self._dirty[(first_word + starts[hit]) // WORDS_PER_PLANE_BLOCK] = True

    # -- comparison ----------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plane):
            return NotImplemented
        return self.nblocks == other.nblocks and bool(np.array_equal(self.words, other.words))

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Plane({self.nblocks} blocks, {int(self._dirty.sum())} dirty plane blocks)"

    # -- internals -----------------------------------------------------------------------

    def _check_vbn(self, vbn: int) -> None:
        if not 0 <= vbn < self.nblocks:
            raise IndexError(f"block {vbn} is outside the plane (0..{self.nblocks - 1})")

    def _check_pb(self, pb: int) -> None:
        if not 0 <= pb < self.plane_blocks:
            raise IndexError(f"plane block {pb} is outside the plane (0..{self.plane_blocks - 1})")

    def _checked_vbns(self, vbns: VbnArray) -> npt.NDArray[np.uint64]:
        """`vbns` flattened to uint64 after checking every one is a block of the plane."""
        array = np.asarray(vbns).ravel()
        if array.size == 0:
            return np.zeros(0, dtype=np.uint64)
        if array.dtype.kind not in "iu":
            raise TypeError(f"VBNs must be integers, not {array.dtype}")
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi >= self.nblocks:
            bad = lo if lo < 0 else hi
            raise IndexError(f"block {bad} is outside the plane (0..{self.nblocks - 1})")
        return array.astype(np.uint64, copy=False)

    def _apply_word(self, index: int, mask: int, value: bool) -> None:
        old = int(self.words[index])
        new = old | mask if value else old & ~mask
        if new != old:
            self.words[index] = new
            self._dirty[index // WORDS_PER_PLANE_BLOCK] = True

    def _apply_many(self, vbns: VbnArray, value: bool) -> None:
        v = np.sort(self._checked_vbns(vbns))
        if v.size == 0:
            return
        index = v >> np.uint64(6)
        bits = np.left_shift(np.uint64(1), v & np.uint64(63))
        firsts = np.flatnonzero(np.concatenate(([True], index[1:] != index[:-1])))
        index = index[firsts]
        masks = np.bitwise_or.reduceat(bits, firsts)
        old = self.words[index]
        new = old | masks if value else old & ~masks
        self.words[index] = new
        changed = index[old != new] // np.uint64(WORDS_PER_PLANE_BLOCK)
        self._dirty[changed] = True

    def _apply_range(self, start: int, count: int, value: bool) -> None:
        if start < 0 or count < 0 or start + count > self.nblocks:
            raise IndexError(
                f"blocks {start}..{start + count - 1} are outside the plane (0..{self.nblocks - 1})"
            )
        if count == 0:
            return
        end = start + count
        first, last = start >> 6, (end - 1) >> 6
        head = (FULL << (start & 63)) & FULL
        tail = FULL >> (63 - ((end - 1) & 63))
        if first == last:
            self._apply_word(first, head & tail, value)
            return
        self._apply_word(first, head, value)
        self._apply_word(last, tail, value)
        middle = self.words[first + 1 : last]
        if middle.size:
            fill = ALL_ONES if value else np.uint64(0)
            self.mark_words_changed(first + 1, middle != fill)
            middle[:] = fill

    def _padding_is_clear(self) -> bool:
        word, bit = divmod(self.nblocks, 64)
        if bit and int(self.words[word]) >> bit:
            return False
        return not self.words[word + (1 if bit else 0) :].any()

    def _clear_padding(self) -> None:
        word, bit = divmod(self.nblocks, 64)
        if bit:
            self.words[word] &= np.uint64((1 << bit) - 1)
            word += 1
        self.words[word:] = 0


def bit_positions(words: Words) -> npt.NDArray[np.uint64]:
    """The sorted positions of the set bits of `words`.

    Only nonzero words are looked at. A word with a single bit (the common case for run
    edges and sparse planes) yields its position arithmetically, as the popcount of
    word - 1; only words with several bits are unpacked to bytes.
    """
    nonzero = np.flatnonzero(words)
    if nonzero.size == 0:
        return np.zeros(0, dtype=np.uint64)
    one = np.uint64(1)
    values = words[nonzero]
    base = nonzero.astype(np.uint64) << np.uint64(6)
    single = (values & (values - one)) == 0
    if single.all():
        found: npt.NDArray[np.uint64] = base + np.bitwise_count(values - one).astype(np.uint64)
        return found
    ends = np.cumsum(np.bitwise_count(values), dtype=np.int64)
    out = np.empty(int(ends[-1]), dtype=np.uint64)
    single_slots = ends[single] - 1
    out[single_slots] = base[single] + np.bitwise_count(values[single] - one).astype(np.uint64)
    several = ~single
    bits = np.flatnonzero(np.unpackbits(values[several].view(np.uint8), bitorder="little"))
    others = np.ones(out.size, dtype=np.bool_)
    others[single_slots] = False
    out[others] = base[several][bits >> 6] + (bits & 63).astype(np.uint64)
    return out
