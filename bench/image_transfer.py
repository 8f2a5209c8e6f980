"""Benchmark 6: image streams, full and incremental, sender and receiver in two processes
joined by a pipe (as `snapvol send SRC S | snapvol receive DST`, minus interpreter start).

- Full: a 4 GiB volume, 85% full of file data, sent and received into a new image,
  against `cat SRC | cat > COPY` followed by an fsync of COPY (the receive is durable at
  its end, so the anchor is too). Both read the source with its page cache dropped.
  Throughput is the volume size over the time, for both. A second row, without target,
  compares with `cat | cat > COPY` left in the page cache.
- Incremental: 1% of the volume (1 MiB pieces of existing files at random offsets) is
  rewritten and snapshotted; the increment is sent and received. Bytes sent are compared
  with the bytes changed, and the time with the full transfer's.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

from bench.common import Context, Figure, GiB, MiB, Target, evict, settle, with_anchor
from snapvol import image
from snapvol.engine import snapshots
from snapvol.engine.volume import Volume
from snapvol.fs import FileSystem
from snapvol.layout.constants import ROOT_INO

NAME = "image_transfer"
TITLE = "6 image transfer"

SIZES = {"full": 4 * GiB, "tiny": 64 * MiB}
FILE_BYTES = {"full": 64 * MiB, "tiny": 4 * MiB}
FILL = 0.85
CHANGED = 0.01
PIECE = 1 * MiB


def _fill(path: Path, size: int, file_bytes: int, ctx: Context) -> list[tuple[int, int]]:
    """Make the source: files of `file_bytes` up to FILL of the volume, snapshot `full`.
    Returns (inode, size) of every file."""
    pattern = memoryview(os.urandom(16 * MiB))
    files = []
    with Volume.create(path, size) as vol:
        fs = FileSystem(vol)
        nfiles = int(size * FILL) // file_bytes
        for i in range(nfiles):
            st = fs.create(ROOT_INO, f"file{i:05d}")
            for off in range(0, file_bytes, PIECE):
                at = (off + i * PIECE) % len(pattern)
                at -= at % PIECE
                fs.write(st.ino, off, pattern[at : at + PIECE])
            files.append((st.ino, file_bytes))
            if i % 8 == 7:
                ctx.say(f"filled {(i + 1) * file_bytes // MiB} MiB")
        vol.cp()
        snapshots.create(vol, "full")
    return files


def _change(path: Path, files: list[tuple[int, int]], nbytes: int, seed: int) -> int:
    """Rewrite `nbytes` of existing files in PIECE pieces; snapshot `inc`. Returns bytes
    changed (distinct pieces only)."""
    rng = random.Random(seed)
    done: set[tuple[int, int]] = set()
    with Volume.open(path) as vol:
        fs = FileSystem(vol)
        while len(done) * PIECE < nbytes:
            ino, fsize = rng.choice(files)
            off = rng.randrange(fsize // PIECE) * PIECE
            if (ino, off) in done:
                continue
            done.add((ino, off))
            fs.write(ino, off, rng.randbytes(PIECE))
        vol.cp()
        snapshots.create(vol, "inc")
    return len(done) * PIECE


def _transfer(src: Path, dst: Path, snap: str, base: str | None, create: int) -> tuple[
        float, int]:
    """Send in a forked child into a pipe, receive here; (seconds, stream bytes)."""
    r, w = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the sender
        code = 0
        try:
            os.close(r)
            with Volume.open(src, writable=False) as vol, open(w, "wb") as out:
                for chunk in image.send(vol, snap, base):
                    out.write(chunk)
        except BaseException:
            code = 1
        os._exit(code)
    os.close(w)
    if create:
        Volume.create(dst, create).close()
    vol = image.open_for_receive(str(dst))
    try:
        with open(r, "rb", buffering=0) as inp:
            result = image.receive(vol, iter(lambda: inp.read(1 << 20), b""))
    finally:
        vol.close()
    _, status = os.waitpid(pid, 0)
    seconds = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError("the sender failed")
    return seconds, result.nbytes


def _cat(src: Path, copy: Path, durable: bool = True) -> float:
    t0 = time.perf_counter()
    subprocess.run(f"cat '{src}' | cat > '{copy}'", shell=True, check=True)
    if durable:
        fd = os.open(copy, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def _same(src: Path, dst: Path, files: list[tuple[int, int]]) -> None:
    """The destination shows the source's `inc` snapshot (a sample of files, whole)."""
    with Volume.open(src, writable=False) as a, Volume.open(dst, writable=False) as b:
        fa, fb = FileSystem(a, "inc"), FileSystem(b)
        for ino, size in files[:: max(1, len(files) // 8)]:
            if fa.read(ino, 0, size) != fb.read(ino, 0, size):
                raise AssertionError(f"inode {ino} differs after the transfer")
        if [e.name for e in b.snapshots.entries()] != ["full", "inc"]:
            raise AssertionError("the destination lacks a snapshot")


def run(ctx: Context) -> list[Figure]:
    size, fbytes = SIZES[ctx.scale.name], FILE_BYTES[ctx.scale.name]
    label = f"{size // GiB} GiB" if size >= GiB else f"{size // MiB} MiB"
    with ctx.scratch(NAME) as tmp:
        src, dst, copy = tmp / "src.img", tmp / "dst.img", tmp / "copy.img"
        files = _fill(src, size, fbytes, ctx)
        settle(tmp)
        evict(src)
        ctx.say("cat | cat > file")
        t_cat = _cat(src, copy)
        copy.unlink()
        settle(tmp)
        evict(src)
        t_cat_cached = _cat(src, copy, durable=False)  # left in the page cache
        copy.unlink()
        settle(tmp)
        evict(src)
        ctx.say("full send | receive")
        with ctx.profiled("full send | receive"):
            t_full, full_bytes = _transfer(src, dst, "full", None, size)
        changed = _change(src, files, int(size * CHANGED), seed=1)
        settle(tmp)
        evict(src)
        ctx.say("incremental send | receive")
        with ctx.profiled("incremental send | receive"):
            t_inc, inc_bytes = _transfer(src, dst, "inc", "full", 0)
        _same(src, dst, files)
    mib = size / MiB
    return [
        with_anchor(
            Figure(TITLE, f"full send | receive, {label} volume", mib / t_full, "MiB/s",
                   targets=[Target("ratio", ">=", 0.7, "ratio ≥ 0.7")],
                   note=f"stream {full_bytes / MiB:.0f} MiB in {t_full:.2f}s"),
            "cat | cat > file, fsync", mib / t_cat),
        with_anchor(
            Figure(TITLE, "full send | receive, against cat without fsync", mib / t_full,
                   "MiB/s", note="no target: the anchor leaves its copy in the page cache"),
            "cat | cat > file", mib / t_cat_cached),
        Figure(TITLE, f"incremental bytes sent / changed ({CHANGED:.0%})",
               inc_bytes / changed, "x",
               targets=[Target("value", "<=", 1.05, "≤ 1.05")],
               note=f"{inc_bytes / MiB:.1f} MiB sent for {changed / MiB:.0f} MiB changed"),
        Figure(TITLE, "incremental time / full transfer time", t_inc / t_full, "x",
               targets=[Target("value", "<=", 0.05, "≤ 0.05")],
               note=f"{t_inc:.3f}s vs {t_full:.2f}s"),
    ]
