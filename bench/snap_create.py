"""Benchmark 2: snapshot creation on a small and a huge (sparse) volume.

A snapshot saves the root of a CP and ORs the active plane into the summary plane, so its
cost should barely depend on the volume size (DESIGN.md §3.4): the issue asks for under
10 ms each and at most 1.5x from 1 GiB to 1 TiB. Each volume gets some data and a CP
first; before every timed creation a little more is written and committed (untimed), so
each snapshot holds a changed image. That CP is timed too and is the anchor of the small
volume's row: the snapshot's cost next to the CP it contains. Both volumes are open at
once and take turns, so a slow spell of the shared disk falls on both alike.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.common import (
    Context,
    Figure,
    GiB,
    MiB,
    TiB,
    at_most_ratio,
    median,
    settle,
    under_ms,
    with_anchor,
)
from snapvol.engine import snapshots
from snapvol.engine.volume import Volume
from snapvol.fs import FileSystem
from snapvol.layout.constants import ROOT_INO

NAME = "snap_create"
TITLE = "2 snapshot create"


def _size_label(size: int) -> str:
    if size >= TiB:
        return f"{size // TiB} TiB"
    if size >= GiB:
        return f"{size // GiB} GiB"
    return f"{size // MiB} MiB"


def _fill(ctx: Context, image: Path, size: int) -> tuple[Volume, FileSystem, int]:
    """A new volume of `size` bytes with `snap_data` bytes written and committed."""
    vol = Volume.create(image, size)
    fs = FileSystem(vol)
    ino = fs.create(ROOT_INO, "data").ino
    block = os.urandom(MiB)
    for off in range(0, ctx.scale.snap_data, MiB):
        fs.write(ino, off, block)
    vol.cp()
    return vol, fs, ino


def _measure(ctx: Context, tmp: Path, sizes: tuple[int, int]) -> dict[int, tuple[float, float]]:
    """Median (snapshot creation, CP) seconds per volume size. The volumes take turns,
    so a slow spell of the shared disk (a CP is mostly two fsyncs) hits both alike."""
    scale = ctx.scale
    opened = [(size, *_fill(ctx, tmp / f"vol-{size}.img", size)) for size in sizes]
    snaps: dict[int, list[float]] = {size: [] for size in sizes}
    cps: dict[int, list[float]] = {size: [] for size in sizes}
    chunk = os.urandom(65536)
    try:
        settle(tmp)
        with ctx.profiled("snap_create"):
            for i in range(scale.snap_count):
                for size, vol, fs, ino in opened:
                    fs.write(ino, (i * 7919 * 4096) % scale.snap_data, chunk)
                    t0 = time.perf_counter()
                    vol.cp()
                    t1 = time.perf_counter()
                    snapshots.create(vol, f"s{i}")
                    t2 = time.perf_counter()
                    cps[size].append(t1 - t0)
                    snaps[size].append(t2 - t1)
        for _, vol, _, _ in opened:
            if len(vol.snapshots) != scale.snap_count:
                raise AssertionError(f"{len(vol.snapshots)} snapshots, made {scale.snap_count}")
    finally:
        for _, vol, _, _ in opened:
            vol.close()
    return {size: (median(snaps[size]), median(cps[size])) for size in sizes}


def run(ctx: Context) -> list[Figure]:
    small, large = ctx.scale.snap_volumes
    with ctx.scratch(NAME) as tmp:
        ctx.say(f"{ctx.scale.snap_count} snapshots each on a {_size_label(small)} and a "
                f"{_size_label(large)} volume, taking turns")
        results = _measure(ctx, tmp, (small, large))
    small_snap, small_cp = results[small]
    large_snap, _ = results[large]
    data = f"{ctx.scale.snap_data // MiB} MiB written"
    return [
        with_anchor(
            Figure(TITLE, f"median, {_size_label(small)} volume ({data})", small_snap, "s",
                   targets=[under_ms(10)], note="ratio: snapshot / CP of the same change"),
            "CP after a 64 KiB write", small_cp),
        with_anchor(
            Figure(TITLE, f"median, {_size_label(large)} sparse volume ({data})", large_snap,
                   "s", targets=[under_ms(10), at_most_ratio(1.5)],
                   note=f"ratio: {_size_label(large)} / {_size_label(small)}"),
            f"snapshot on {_size_label(small)}", small_snap),
    ]
