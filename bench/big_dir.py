"""Benchmark 5: random lookups in a directory of a million entries.

The design promises lookups in O(log n) block reads in a directory of 1,000,000 entries.
The directory is built once through FileSystem.create (untimed apart from a progress
report), committed, and the volume reopened. Then `dir_lookups` random names are looked
up twice on the reopened volume: the first pass starts from an empty block cache (cold),
the second repeats the same names (warm). Blocks read per lookup are the volume's
`io.reads` delta divided by the lookups.

Anchor: os.stat of the same number of random files in a host directory with
`host_dir_entries` files on the same disk. The host's dentry and inode caches are warm
(dropping them needs root and touches the whole machine), so both snapvol passes are
compared with the same warm host figure.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from bench.common import Context, Figure, GiB, KiB, every, with_anchor
from snapvol.engine.volume import Volume
from snapvol.fs import FileSystem
from snapvol.layout.constants import ROOT_INO

NAME = "big_dir"
TITLE = "5 big directory"


def _name(i: int) -> bytes:
    return b"entry-%07d" % i


def _build_snapvol(ctx: Context, image: Path, n: int) -> tuple[int, float]:
    vol = Volume.create(image, max(1 * GiB, n * 4 * KiB))  # sparse; room for the estimate
    try:
        fs = FileSystem(vol)
        dino = fs.mkdir(ROOT_INO, "big").ino
        step = every(n)
        t0 = time.perf_counter()
        for i in range(n):
            fs.create(dino, _name(i))
            if i % step == step - 1:
                rate = (i + 1) / (time.perf_counter() - t0)
                ctx.say(f"snapvol: {i + 1:,} of {n:,} entries ({rate:,.0f}/s)")
        vol.cp()
        elapsed = time.perf_counter() - t0
    finally:
        vol.close()
    return dino, elapsed


def _build_host(ctx: Context, root: Path, n: int) -> tuple[bytes, float]:
    base = os.fsencode(root) + b"/"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    step = every(n)
    t0 = time.perf_counter()
    for i in range(n):
        os.close(os.open(base + _name(i), flags, 0o644))
        if i % step == step - 1:
            ctx.say(f"host: {i + 1:,} of {n:,} files")
    elapsed = time.perf_counter() - t0
    return base, elapsed


def _lookups(fs: FileSystem, vol: Volume, dino: int, names: list[bytes]) -> tuple[float, int]:
    reads0 = vol.io.reads
    t0 = time.perf_counter()
    for name in names:
        fs.lookup(dino, name)
    return time.perf_counter() - t0, vol.io.reads - reads0


def run(ctx: Context) -> list[Figure]:
    n, nhost, k = ctx.scale.dir_entries, ctx.scale.host_dir_entries, ctx.scale.dir_lookups
    rng = np.random.default_rng(11)
    names = [_name(i) for i in rng.choice(n, size=min(k, n), replace=False).tolist()]
    host_names = [_name(i) for i in rng.choice(nhost, size=len(names), replace=False).tolist()]
    with ctx.scratch(NAME) as tmp:
        ctx.say(f"building a {n:,}-entry snapvol directory through FileSystem.create")
        image = tmp / "volume.img"
        dino, build = _build_snapvol(ctx, image, n)
        ctx.say(f"built in {build:.1f} s ({n / build:,.0f} creates/s)")

        vol = Volume.open(image, writable=False)
        try:
            fs = FileSystem(vol)
            if fs.resolve("/big") != dino:
                raise AssertionError("the big directory moved")
            with ctx.profiled("big_dir lookups cold"):
                cold, cold_reads = _lookups(fs, vol, dino, names)
            with ctx.profiled("big_dir lookups warm"):
                warm, warm_reads = _lookups(fs, vol, dino, names)
            entries = len(fs.image.directory(fs.image.node(dino)))
            height = fs.image.directory(fs.image.node(dino)).height
        finally:
            vol.close()
        if entries != n:
            raise AssertionError(f"the directory holds {entries} entries, made {n}")

        ctx.say(f"building a {nhost:,}-file host directory")
        host_root = tmp / "host"
        host_root.mkdir()
        base, host_build = _build_host(ctx, host_root, nhost)
        paths = [base + name for name in host_names]
        t0 = time.perf_counter()
        for path in paths:
            os.stat(path)
        host = time.perf_counter() - t0
        ctx.say("removing the host directory")

    m = len(names)
    host_note = "" if nhost == n else f"host directory has {nhost:,} files, not {n:,}; "
    return [
        with_anchor(
            Figure(TITLE, f"random lookups, cold cache ({m:,} of {n:,} entries)", m / cold,
                   "lookups/s", note=f"{host_note}host caches warm"),
            f"os.stat in a {nhost:,}-file dir", m / host),
        with_anchor(
            Figure(TITLE, "random lookups, warm cache (same names again)", m / warm,
                   "lookups/s", note=f"{host_note}host caches warm"),
            f"os.stat in a {nhost:,}-file dir", m / host),
        Figure(TITLE, f"blocks read per lookup, cold (directory height {height})",
               cold_reads / m, "blocks"),
        Figure(TITLE, "blocks read per lookup, warm", warm_reads / m, "blocks"),
        with_anchor(
            Figure(TITLE, "directory build: FileSystem.create each entry, then a CP",
                   n / build, "creates/s", note="not a figure of the issue; for scale"),
            f"host open(O_CREAT)/close x {nhost:,}", nhost / host_build),
    ]
