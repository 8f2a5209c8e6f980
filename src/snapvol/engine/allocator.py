"""The block allocator over the planes (DESIGN.md §3.1 and §3.5).

A block may be handed out only when no plane holds it: not in the active image being
built, not in any snapshot (the summary plane), and not freed since the last committed CP
(the `deferred` plane: such blocks are still part of the committed image a crash would
fall back to). Frees therefore only take effect at commit.
"""

from __future__ import annotations

import numpy as np

from snapvol.errors import FsError
from snapvol.layout.constants import FIRST_DATA_VBN
from snapvol.planes import Plane, find_free
from snapvol.planes.algebra import union
from snapvol.planes.plane import FULL

SMALL_ALLOC = 8
"""Requests up to this many blocks try `_alloc_small` first."""
SMALL_SCAN_WORDS = 4
"""Words (of 64 blocks) `_alloc_small` looks at before leaving the search to numpy."""


class Allocator:
    def __init__(self, nblocks: int, active: Plane, summary: Plane) -> None:
        self.nblocks = nblocks
        self.active = active
        self.summary = summary
        self.deferred = Plane.zeros(nblocks)
        # Blocks an incoming image stream will fill (invariant 5): set by
        # snapvol.image.receiver for the life of a partial receive, so no CP hands them out.
        self.pinned = Plane.zeros(nblocks)
        self._deferred_list: list[np.ndarray] = []
        # Frees a CP has placed but not yet committed (a CP writing in the background):
        # blocks freed after its placement stay deferred until the CP after it commits.
        self._sealed: list[np.ndarray] = []
        self.cursor = FIRST_DATA_VBN
        self.busy = union(active, summary).count()
        # While shadow snapshots exist, every block handed out is recorded so the CP can
        # clear it from their planes (a shadow never pins a block; reuse clears its bit).
        self.watch_reuse = False
        self._reused: list[np.ndarray] = []
        # While a check reads a committed root beside changes (`hold`), frees stay
        # deferred past their commits, so no block that root reaches is handed out.
        self._holds = 0
        self._held: list[np.ndarray] = []

    @property
    def free(self) -> int:
        return self.nblocks - self.busy

    @property
    def frees_pending(self) -> bool:
        """Blocks were freed since the last commit (a CP would make them reusable)."""
        return bool(self._deferred_list)

    def alloc(self, n: int) -> np.ndarray:
        """n free blocks, in runs from the cursor, as an ascending-by-run uint64 array."""
        if n == 0:
            return np.zeros(0, dtype=np.uint64)
        if n <= SMALL_ALLOC:
            small = self._alloc_small(n)
            if small is not None:
                return small
        runs = find_free(self.cursor, n, self.active, self.summary, self.deferred,
                         self.pinned)
        got = sum(length for _, length in runs)
        if got < n:
            raise FsError(28, "volume is full: no free blocks left for this consistency point")
        parts = [np.arange(start, start + length, dtype=np.uint64) for start, length in runs]
        vbns = np.concatenate(parts) if len(parts) > 1 else parts[0]
        self.active.set_many(vbns)
        last_start, last_len = runs[-1]
        self.cursor = last_start + last_len
        if self.cursor >= self.nblocks:
            self.cursor = FIRST_DATA_VBN
        self.busy += n
        if self.watch_reuse:
            self._reused.append(vbns)
        return vbns

    def take_reused(self) -> np.ndarray:
        """The blocks handed out since the last call (while `watch_reuse` is on)."""
        if not self._reused:
            return np.zeros(0, dtype=np.uint64)
        out = np.concatenate(self._reused)
        self._reused.clear()
        return out

    @property
    def has_reused(self) -> bool:
        return bool(self._reused)

    def _alloc_small(self, n: int) -> np.ndarray | None:
        """The first n free blocks from the cursor, found with integer bit tricks in the
        few words at the cursor; None when they do not hold n. The same blocks `find_free`
        would give, without its ~30 numpy calls: a CP of many small files allocates once
        per file, and that overhead was most of its cost."""
        planes = (self.active.words, self.summary.words, self.deferred.words,
                  self.pinned.words)
        word = self.cursor >> 6
        end = min(word + SMALL_SCAN_WORDS, len(planes[0]))
        mask = FULL & (FULL << (self.cursor & 63))
        got: list[int] = []
        while word < end:
            free = ~(int(planes[0][word]) | int(planes[1][word]) | int(planes[2][word])
                     | int(planes[3][word]))
            free &= mask
            while free:
                low = free & -free
                vbn = (word << 6) + low.bit_length() - 1
                if vbn >= self.nblocks:
                    return None
                got.append(vbn)
                if len(got) == n:
                    for v in got:
                        self.active.set(v)
                    self.cursor = vbn + 1 if vbn + 1 < self.nblocks else FIRST_DATA_VBN
                    self.busy += n
                    out = np.array(got, dtype=np.uint64)
                    if self.watch_reuse:
                        self._reused.append(out)
                    return out
                free ^= low
            word += 1
            mask = FULL
        return None

    def free_many(self, vbns: np.ndarray) -> None:
        """Remove blocks from the active image; they become reusable after the commit."""
        if len(vbns) == 0:
            return
        vbns = vbns.astype(np.uint64, copy=False)
        self.active.clear_many(vbns)
        self.deferred.set_many(vbns)
        self._deferred_list.append(vbns)

    def seal(self) -> None:
        """A CP has placed every change: the blocks freed so far are the ones its commit
        releases. Blocks freed after this (while the CP writes in the background) are
        still referenced by the root that CP is about to commit, so they wait for the
        commit of the next one."""
        self._sealed.extend(self._deferred_list)
        self._deferred_list = []

    def commit(self) -> None:
        """The sealed CP is on disk: blocks freed before it sealed are free unless a
        snapshot holds them (or a hold keeps them for a check of an older root)."""
        if self._sealed:
            if self._holds:
                self._held.extend(self._sealed)
            else:
                self._release(self._sealed)
            self._sealed = []
        self.deferred.mark_clean()

    def _release(self, freed: list[np.ndarray]) -> None:
        vbns = np.unique(np.concatenate(freed))
        self.deferred.clear_many(vbns)
        still = (self.active.test_many(vbns) | self.summary.test_many(vbns)
                 | self.pinned.test_many(vbns))
        self.busy -= int(np.count_nonzero(~still))
        self.deferred.mark_clean()

    def hold(self) -> None:
        """Keep every block freed from now on (and every block freed earlier whose CP has
        not committed yet) unavailable until `unhold`: the committed root of this moment
        stays whole on disk while something reads it off the volume's mutex."""
        self._holds += 1

    def unhold(self) -> None:
        """End a `hold`; the last one makes the blocks it kept free (outside a CP)."""
        if self._holds <= 0:
            raise ValueError("unhold without a hold")
        self._holds -= 1
        if not self._holds and self._held:
            self._release(self._held)
            self._held = []

    def recount(self) -> None:
        """Recompute the busy count after the summary plane shrank (snapshot deletion)."""
        self.busy = union(self.active, self.summary, self.deferred, self.pinned).count()
