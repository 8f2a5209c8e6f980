"""The I/O half of a consistency point, run on a thread of its own.

A CP has two halves (DESIGN.md §3.2). Placing every change (new VBNs, checksums, the
encoded indirect, inode and plane blocks, the new root record) works on the engine's
structures and runs under the volume's mutex. Writing the result (every block, a flush,
the root record to the older slot, a flush) touches nothing but the device and the
immutable buffers the placement gathered, so it can run while the file system takes
new changes, as WAFL does: the next CP collects in memory while this one goes to disk.

The writes keep the same order as a CP written in line: the blocks and a flush before
the root record, so a crash at any moment leaves the last committed root (or this one)
whole. What the engine must do while the writer runs:
- reads of the blocks being written find them in `BlockIO.pending` (the tree already
  points at their new VBNs);
- no block is handed out: allocation happens only in a CP, and the next CP waits;
- blocks freed meanwhile stay deferred past this commit (`Allocator.seal`).
"""

from __future__ import annotations

import threading

from snapvol.device import Device
from snapvol.engine.blockio import WriteBatch
from snapvol.errors import VolumeError


class CPWriter:
    """Writes one sealed CP (its batch, then its root record) on a thread."""

    def __init__(self, dev: Device, batch: WriteBatch, slot: int, root: bytes) -> None:
        self.dev = dev
        self.batch, self.slot, self.root = batch, slot, root
        self.error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="snapvol-cp-writer",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def run_inline(self) -> None:
        """Write on the caller's thread (a CP that the caller waits for anyway); what
        goes wrong propagates as it is."""
        self._run()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            self.batch.write_to(self.dev)
            if self._stop:
                return
            self.dev.flush()
            if self._stop:
                return
            self.dev.write(self.slot, self.root)
            self.dev.flush()
        except BaseException as e:  # handed to whoever waits for this CP
            self.error = e

    @property
    def done(self) -> bool:
        """Whether the thread has written everything (or failed)."""
        return self._thread.ident is not None and not self._thread.is_alive()

    def join(self) -> None:
        """Block until the thread has written everything or failed, without raising: for
        a waiter off the volume's mutex, who then commits with `Volume.wait_cp`."""
        if self._thread.ident is not None:
            self._thread.join()

    def wait(self) -> None:
        """Block until the CP is on disk; raise what went wrong if it is not. A writer
        whose thread never started (tests hold writes back this way) writes here."""
        if self._thread.ident is None:
            self._run()
        else:
            self._thread.join()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise VolumeError(self.failure()) from self.error

    def failure(self) -> str:
        """What went wrong, in one line."""
        err = self.error
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        return f"writing a consistency point failed: {reason}"

    def abandon(self) -> None:
        """Stop at the next step without writing the root (what a crash would do)."""
        self._stop = True
        if self._thread.ident is not None:
            self._thread.join()
