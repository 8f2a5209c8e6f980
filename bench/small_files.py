"""Benchmark 4: many small files (1-4 KiB, spread over directories), created and read back.

snapvol: FileSystem.create + write for each file, then one CP (timed with the creates);
then lookup + read of every file, in a shuffled order, on the same Volume object.
Anchor: the same through Python's os functions on the host file system, on the same disk:
open(O_CREAT|O_EXCL) / write / close, then one syncfs (the host's counterpart of the CP);
then open / read / close in the same shuffled order. Directories are made untimed on
both sides. Figures are files per second; the ratio is snapvol rate / host rate.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from bench.common import Context, Figure, GiB, KiB, at_least_ratio, every, settle, with_anchor
from snapvol.engine.volume import Volume
from snapvol.fs import FileSystem
from snapvol.layout.constants import ROOT_INO

NAME = "small_files"
TITLE = "4 small files"
READ_SIZE = 8 * KiB  # more than any file holds: one read call gets the whole file


class _Plan:
    """Which file goes where and holds how many bytes; the same for both sides."""

    def __init__(self, nfiles: int, ndirs: int, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        self.ndirs = ndirs
        self.dirs = [f"d{d:03d}".encode() for d in range(ndirs)]
        self.names = [f"f{i:06d}".encode() for i in range(nfiles)]
        self.where = [i % ndirs for i in range(nfiles)]
        self.sizes = rng.integers(1 * KiB, 4 * KiB + 1, size=nfiles).tolist()
        self.read_order = rng.permutation(nfiles).tolist()
        self.payload = os.urandom(4 * KiB)

    def data(self, i: int) -> bytes:
        return self.payload[: self.sizes[i]]


def _host(ctx: Context, root: Path, plan: _Plan) -> tuple[float, float]:
    base = os.fsencode(root)
    for d in plan.dirs:
        os.mkdir(base + b"/" + d)
    paths = [base + b"/" + plan.dirs[w] + b"/" + n
             for w, n in zip(plan.where, plan.names, strict=True)]
    datas = [plan.data(i) for i in range(len(paths))]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    settle(root)
    t0 = time.perf_counter()
    for path, data in zip(paths, datas, strict=True):
        fd = os.open(path, flags, 0o644)
        os.write(fd, data)
        os.close(fd)
    settle(root)
    create = time.perf_counter() - t0
    order = [paths[i] for i in plan.read_order]
    got = 0
    t0 = time.perf_counter()
    for path in order:
        fd = os.open(path, os.O_RDONLY)
        got += len(os.read(fd, READ_SIZE))
        os.close(fd)
    read = time.perf_counter() - t0
    if got != sum(plan.sizes):
        raise AssertionError(f"host read back {got} bytes, wrote {sum(plan.sizes)}")
    return create, read


def _snapvol(ctx: Context, image: Path, plan: _Plan) -> tuple[float, float]:
    n = len(plan.names)
    # Sparse, so size costs nothing; generous because the engine admits a change against
    # a pessimistic estimate of what the next CP needs (several blocks per dirty file).
    vol = Volume.create(image, max(1 * GiB, n * 64 * KiB))
    try:
        fs = FileSystem(vol)
        dinos = [fs.mkdir(ROOT_INO, d).ino for d in plan.dirs]
        vol.cp()
        parents = [dinos[w] for w in plan.where]
        datas = [plan.data(i) for i in range(n)]
        step = every(n)
        settle(image.parent)
        with ctx.profiled("small_files create"):
            t0 = time.perf_counter()
            for i, (parent, name, data) in enumerate(
                    zip(parents, plan.names, datas, strict=True)):
                ino = fs.create(parent, name).ino
                fs.write(ino, 0, data)
                if i % step == step - 1:
                    ctx.say(f"snapvol: {i + 1:,} files created")
            vol.cp()
            create = time.perf_counter() - t0
        order = [(parents[i], plan.names[i]) for i in plan.read_order]
        got = 0
        with ctx.profiled("small_files read"):
            t0 = time.perf_counter()
            for parent, name in order:
                st = fs.lookup(parent, name)
                got += len(fs.read(st.ino, 0, READ_SIZE))
            read = time.perf_counter() - t0
        if got != sum(plan.sizes):
            raise AssertionError(f"snapvol read back {got} bytes, wrote {sum(plan.sizes)}")
        sample = plan.read_order[0]
        st = fs.lookup(parents[sample], plan.names[sample])
        if fs.read(st.ino, 0, READ_SIZE) != plan.data(sample):
            raise AssertionError("snapvol read back different bytes")
    finally:
        vol.close()
    return create, read


def run(ctx: Context) -> list[Figure]:
    n, ndirs = ctx.scale.small_files, ctx.scale.small_dirs
    plan = _Plan(n, ndirs)
    with ctx.scratch(NAME) as tmp:
        ctx.say(f"host: {n:,} files in {ndirs} directories")
        host_root = tmp / "host"
        host_root.mkdir()
        host_c, host_r = _host(ctx, host_root, plan)
        ctx.say(f"snapvol: {n:,} files in {ndirs} directories")
        snap_c, snap_r = _snapvol(ctx, tmp / "volume.img", plan)
    what = f"{n:,} files of 1-4 KiB in {ndirs} dirs"
    return [
        with_anchor(
            Figure(TITLE, f"create + write + CP, {what}", n / snap_c, "files/s",
                   targets=[at_least_ratio(0.5)]),
            "os open/write/close + syncfs", n / host_c),
        with_anchor(
            Figure(TITLE, "lookup + read, shuffled order", n / snap_r, "files/s",
                   targets=[at_least_ratio(0.5)]),
            "os open/read/close", n / host_r),
    ]
