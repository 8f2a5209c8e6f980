"""Benchmark 9: the resident memory of `snapvol snap list` with 255 snapshots.

Listing the space each snapshot holds reads every snapshot's plane. It used to hold them
all at once (a plane is 32 MiB on a 1 TiB volume, 64 MiB on 2 TiB); it now folds them in a
range of plane blocks at a time, so its memory should not depend on the snapshot count.
The figure is the peak RSS (its VmHWM, read as it exits) of a separate `snapvol snap
list --json` process on a 1 TiB sparse volume with 255 snapshots; the anchor is the same
listing of a 1 TiB volume with one snapshot, measured in the same run (target: at most
1.5x). A second row sets it beside `python -c 'import numpy'`, the floor of any process
that loads snapvol (target: at most 3x, about 75 MiB here: room for the interpreter,
the libraries and two 32 MiB planes). Each volume gets two 64 KiB writes before every
snapshot, one of them rewriting blocks older snapshots hold.

On a sparse volume most of each plane is never written in memory, and pages never
written are not resident, so holding every plane shows in the second row (the dense
"seen once / seen twice" bitmaps and temporaries of the old listing: 175 MiB, 7x) more
than in the first (168 MiB with one snapshot); on a full volume each held plane would
be resident. tests/test_snapshot_memory.py checks the allocation peak itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import Context, Figure, GiB, MiB, TiB, at_most_ratio, with_anchor
from snapvol.engine import snapshots
from snapvol.engine.volume import Volume
from snapvol.fs import FileSystem
from snapvol.layout.constants import ROOT_INO

NAME = "snap_memory"
TITLE = "9 snapshot memory"
SIZES = {"full": 1 * TiB, "tiny": 1 * GiB}
COUNTS = {"full": 255, "tiny": 8}


def _make(path: Path, size: int, count: int) -> None:
    chunk = os.urandom(65536)
    with Volume.create(path, size) as vol:
        fs = FileSystem(vol)
        ino = fs.create(ROOT_INO, "data").ino
        for i in range(count):
            fs.write(ino, (i * 7 % 13) * 65536, chunk)
            fs.write(ino, (size // 4) + i * 65536, chunk)
            snapshots.create(vol, f"s{i}")


PROBE = """
import atexit, sys
def report():
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM:"))
    sys.stderr.write("peak-rss-kib " + hwm.split()[1] + "\\n")
atexit.register(report)
what = sys.argv.pop(1)
if what == "snapvol":
    from snapvol.cli.main import main
    main(sys.argv[1:])
else:
    import numpy
"""
"""Runs in the measured process and prints its VmHWM at exit. Not `ru_maxrss` from
`wait4`: a child forked from this (large) process keeps the fork's high-water mark across
exec, so every figure would read as this process's size."""


def _peak_rss(args: list[str]) -> tuple[int, bytes]:
    """Peak resident bytes of a Python process running PROBE with `args`, and its output."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True,
                          check=False, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{args} exited {proc.returncode}: {proc.stderr.decode()}")
    line = proc.stderr.decode().strip().splitlines()[-1]
    return int(line.split()[1]) * 1024, proc.stdout


def _listing(image: Path, count: int) -> int:
    rss, out = _peak_rss(["snapvol", "snap", "list", str(image), "--json"])
    rows = json.loads(out)
    if len(rows) != count or not all(r["reclaimable"] >= 0 for r in rows):
        raise AssertionError(f"{image}: listed {len(rows)} snapshots, made {count}")
    return rss


def run(ctx: Context) -> list[Figure]:
    size, count = SIZES[ctx.scale.name], COUNTS[ctx.scale.name]
    label = f"{size // TiB} TiB" if size >= TiB else f"{size // GiB} GiB"
    with ctx.scratch(NAME) as tmp:
        ctx.say(f"{count} snapshots on a {label} sparse volume, and one on another")
        many, one = tmp / "many.img", tmp / "one.img"
        _make(many, size, count)
        _make(one, size, 1)
        with ctx.profiled("snap_memory"):
            rss_many = _listing(many, count)
        rss_one = _listing(one, 1)
        rss_numpy, _ = _peak_rss(["numpy"])
    name = f"snap list peak RSS, {count} snapshots, {label} sparse"
    return [
        with_anchor(Figure(TITLE, name, rss_many / MiB, "MiB", targets=[at_most_ratio(1.5)],
                           note="ratio: 255 snapshots / 1 (memory must not grow with "
                                "the count)" if count == 255 else "ratio: many / 1"),
                    "1 snapshot", rss_one / MiB),
        with_anchor(Figure(TITLE, name, rss_many / MiB, "MiB", targets=[at_most_ratio(3)],
                           note="ratio: snap list / a Python that imports numpy"),
                    "python -c 'import numpy'", rss_numpy / MiB),
    ]
