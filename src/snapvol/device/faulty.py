"""A device that loses and tears writes the way a disk with a volatile cache does.

Crash tests need the worst a real disk may legally do to a file system, and no more:

* A write is *pending* until the next `flush()`: the disk has acknowledged it but it may
  still sit in a volatile cache. Reads see pending writes (the latest write of a block wins),
  exactly as a running system sees its own writes.
* `flush()` is a barrier: every write issued before it is durable and survives any crash.
* At a crash each pending block write, independently and in issue order, is *kept* (the new
  4 KiB land), *dropped* (the block keeps what it held before), or *torn*: only a prefix of
  its 512-byte sectors (1 to 7 of the 8) land, the rest keep their old contents. Sectors are
  the unit a disk writes atomically, and a write is torn from its end because a disk writes
  the sectors of a request in order. Because each write is decided independently, a later
  write may survive while an earlier one is lost: the cache may reorder freely between
  barriers, so nothing but `flush()` orders writes.
* Writes covered by an earlier flush are never touched, and nothing is ever corrupted
  except by tearing a pending write; bit rot is the checksums' business, tested elsewhere.

To stop the engine at an exact write, `arm(n)` lets n more block writes through and makes
the next one raise `CrashPoint`; from then on the device is *crashed*: every write and flush
raises `CrashPoint` too, so cleanup code cannot make pending writes durable after the
simulated power loss. A multi-block write is counted block by block, so a crash can fall
inside a run (the blocks before it stay pending). `crash(rng)` then gives the image a reboot
would find, leaving the device itself unchanged so one run can be crashed many ways.
"""

from __future__ import annotations

import random

from snapvol.device.base import BLOCK_SIZE
from snapvol.device.memory import ZERO_BLOCK, MemoryDevice

SECTOR_SIZE = 512
SECTORS_PER_BLOCK = BLOCK_SIZE // SECTOR_SIZE


class CrashPoint(BaseException):
    """The simulated power loss of an armed `FaultyDevice`.

    A BaseException, like KeyboardInterrupt, so the engine's handlers for ordinary errors
    do not swallow it and carry on as if the disk were still there.
    """


class FaultyDevice(MemoryDevice):
    """A memory device with a volatile write cache, a crash model and crash points."""

    def __init__(self, nblocks: int, seed: int | None = None) -> None:
        super().__init__(nblocks)
        self._durable: dict[int, bytes] = {}
        self._pending: list[tuple[int, bytes]] = []
        self._rng = random.Random(seed)
        self.crash_after: int | None = None
        """Block writes still allowed before `CrashPoint`; None when not armed."""
        self.crashed = False
        """True once `CrashPoint` has been raised; writes and flushes keep raising it."""
        self.writes_total = 0
        """Block writes accepted since creation, to pick a crash point in a range."""

    def arm(self, n_writes: int) -> None:
        """Let `n_writes` more block writes through, then crash on the next one."""
        if n_writes < 0:
            raise ValueError(f"cannot arm a crash {n_writes} writes from now")
        self.crash_after = n_writes

    def disarm(self) -> None:
        """Forget the crash point and the crashed state (the pending writes stay)."""
        self.crash_after = None
        self.crashed = False

    def pending_count(self) -> int:
        """Block writes since the last flush, each counted (a block written twice counts 2)."""
        return len(self._pending)

    def flush(self) -> None:
        if self.crashed:
            raise CrashPoint("flush after the crash point")
        for vbn, block in self._pending:
            self._durable[vbn] = block
        self._pending.clear()

    def durable_image(self) -> MemoryDevice:
        """The image after a crash that loses every pending write."""
        return MemoryDevice.from_blocks(self.nblocks, dict(self._durable))

    def crash(self, rng: random.Random | None = None) -> MemoryDevice:
        """The image after a crash now: durable blocks plus a random fate for each pending
        write (kept, dropped or torn, equally likely). Uses the device's seeded generator
        when `rng` is None. The device itself is unchanged."""
        rng = rng or self._rng
        image = dict(self._durable)
        for vbn, new in self._pending:
            fate = rng.randrange(3)
            if fate == 0:
                image[vbn] = new
            elif fate == 2:
                cut = rng.randint(1, SECTORS_PER_BLOCK - 1) * SECTOR_SIZE
                image[vbn] = new[:cut] + image.get(vbn, ZERO_BLOCK)[cut:]
        return MemoryDevice.from_blocks(self.nblocks, image)

    def _put(self, vbn: int, block: bytes) -> None:
        if self.crashed or self.crash_after == 0:
            self.crashed = True
            raise CrashPoint(f"crash point after {self.writes_total} block writes")
        if self.crash_after is not None:
            self.crash_after -= 1
        self._pending.append((vbn, block))
        self._blocks[vbn] = block
        self.writes_total += 1
