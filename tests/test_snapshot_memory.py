"""Snapshot operations hold a few planes in memory, whatever the snapshot count.

Listing the space each snapshot holds, deleting one and choosing a send's blocks used to
load every snapshot's plane at once (on a full 2 TiB volume with 255 snapshots, 16 GiB).
Here a 64 GiB sparse volume (a 2 MiB plane) with 40 snapshots: the peak of what Python
and numpy allocate (tracemalloc sees numpy's buffers) during each operation stays within a
few planes, and the listing's figures equal the ones computed from all planes at once.
Benchmark 9 (bench/snap_memory.py) measures the resident memory of `snapvol snap list`
with 255 snapshots on a 1 TiB volume.
"""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from conftest import assert_fsck_clean
from snapvol import image
from snapvol.engine import snapshots
from snapvol.engine.volume import Volume
from snapvol.fs import FileSystem
from snapvol.layout.constants import ROOT_INO

SIZE = 64 << 30
SNAPSHOTS = 40
T = TypeVar("T")


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Volume]:
    """40 snapshots, each after a 64 KiB write that often rewrites what older snapshots
    hold (so each holds some blocks alone) and a file spread over the volume's range."""
    path = tmp_path / "big.img"
    Volume.create(path, SIZE).close()
    with Volume.open(path) as vol:
        fs = FileSystem(vol)
        ino = fs.create(ROOT_INO, "data").ino
        chunk = os.urandom(65536)
        for i in range(SNAPSHOTS):
            fs.write(ino, (i * 7 % 13) * 65536, chunk)
            fs.write(ino, (1 << 30) * (i % 5) + i * 65536, chunk)
            snapshots.create(vol, f"s{i}")
        yield vol


def peak_of(fn: Callable[[], T]) -> tuple[T, int]:
    tracemalloc.start()
    try:
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, peak


def test_listing_holds_a_few_planes_and_counts_right(volume: Volume) -> None:
    plane = volume.active_plane.words.nbytes
    assert plane == 2 << 20
    infos, peak = peak_of(lambda: snapshots.infos(volume))
    assert peak < 3 * plane, f"snap list peaked at {peak / plane:.1f} planes"
    # The same figures from every plane at once (what the listing used to hold).
    entries = volume.snapshots.regular()
    words = [snapshots.plane_of(volume, e).words for e in entries]
    alone = []
    for i, w in enumerate(words):
        others = np.zeros_like(w)
        for j, o in enumerate(words):
            if j != i:
                others |= o
        alone.append(int(np.bitwise_count(w & ~others & ~volume.active_plane.words).sum()))
    assert [i.reclaimable_blocks for i in infos] == alone
    assert sum(alone) > SNAPSHOTS  # most snapshots hold blocks of their own


def test_send_planning_and_delete_hold_a_few_planes(volume: Volume) -> None:
    plane = volume.active_plane.words.nbytes
    p, peak = peak_of(lambda: image.plan(volume, "s39", "s20"))
    assert peak < 5 * plane, f"planning a send peaked at {peak / plane:.1f} planes"
    assert [i.entry.name for i in p.items if i.role == 4] == [f"s{i}" for i in range(20)]
    full, peak = peak_of(lambda: image.plan(volume, "s39"))
    assert peak < 5 * plane, f"planning a full send peaked at {peak / plane:.1f} planes"
    assert full.nblocks > p.nblocks
    freed, peak = peak_of(lambda: snapshots.delete(volume, "s20"))
    assert peak < 4 * plane, f"deleting a snapshot peaked at {peak / plane:.1f} planes"
    assert freed > 0
    assert_fsck_clean(volume)


def test_a_full_send_is_planned_from_runs_not_from_a_vbn_per_block(tmp_path: Path) -> None:
    """A send's records come from the selection's runs: a VBN per selected block is 64
    times the plane's size on a full volume (4 GiB for 2 TiB). 256 MiB in a 4 GiB volume
    (a 128 KiB plane): 65,536 selected blocks would be 512 KiB of VBNs alone."""
    path = tmp_path / "v.img"
    Volume.create(path, 4 << 30).close()
    with Volume.open(path) as vol:
        fs = FileSystem(vol)
        ino = fs.create(ROOT_INO, "data").ino
        block = os.urandom(1 << 20)
        for off in range(0, 256 << 20, 1 << 20):
            fs.write(ino, off, block)
        snapshots.create(vol, "s")
        plane = vol.active_plane.words.nbytes
        p, peak = peak_of(lambda: image.plan(vol, "s"))
        assert peak < 12 * plane, f"planning peaked at {peak / plane:.1f} planes"
        assert p.nblocks > 65_536 and int(p.counts.sum()) == p.nblocks
        assert p.nblocks == snapshots.plane_of(vol, vol.snapshots.get("s")).count() - 3
