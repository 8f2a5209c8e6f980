"""Benchmark 9: a mount's listing latency while `snapvol fsck --online` checks it.

The volume (many small files in directories, plus large files, filled through the engine
before mounting) is mounted by `snapvol mount`; a 50-entry directory is listed every
2 ms while `fsck --online` runs, and while it does not: checks and idle spells of the
same length take turns, so both meet the (shared) machine in the same moods. The figure
is the p99 of a listing during the checks against its idle p99 on the same mount (the
issue's target: within 2x). The online check runs in a process of its own at its
default share of the time (engine/fsck.py, daemon/checker.py). The time one check takes
and the bytes it covered are in the note.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from bench.common import Context, Figure, GiB, MiB, at_most_ratio, with_anchor
from bench.fuse_io import snapvol_mount
from snapvol.control import protocol as control
from snapvol.control import registry
from snapvol.engine.volume import Volume
from snapvol.fs import FileSystem
from snapvol.layout.constants import ROOT_INO

NAME = "online_fsck"
TITLE = "10 online fsck"
SIZES = {"tiny": (4, 400, 2, 1.0, 2), "full": (100, 50_000, 128, 15.0, 4)}
"""Per scale: directories, small files, 8 MiB files, seconds of checks, checks at least."""


def _fill(image: Path, dirs: int, files: int, big: int) -> int:
    """Files straight through the engine (much faster than through a mount); bytes."""
    vol = Volume.create(image, max(1 * GiB, 2 * big * 8 * MiB + 512 * MiB))
    fs = FileSystem(vol)
    small = os.urandom(4096)
    total = 0
    for d in range(dirs):
        fs.mkdir(ROOT_INO, f"d{d}".encode())
        for i in range(files // dirs):
            n = 1000 + (i * 37) % 3000
            fs.write_file(f"/d{d}/f{i}", small[:n])
            total += n
    chunk = os.urandom(8 * MiB)
    for j in range(big):
        fs.write_file(f"/big{j}", chunk)
        total += len(chunk)
    vol.close()
    return total


def _listings(mnt: Path, busy: threading.Event, done: threading.Event,
              ) -> tuple[list[float], list[float]]:
    """os.listdir of a 50-entry directory every 2 ms until `done`: the latencies of the
    listings made while `busy` was set (a check running) throughout, and of the others
    (idle) throughout."""
    names = mnt / "listed"
    during: list[float] = []
    idle: list[float] = []
    while not done.is_set():
        before = busy.is_set()
        t0 = time.perf_counter()
        os.listdir(names)
        elapsed = time.perf_counter() - t0
        if busy.is_set() == before:
            (during if before else idle).append(elapsed)
        time.sleep(0.002)
    return sorted(during), sorted(idle)


def _p99(values: list[float]) -> float:
    return values[min(len(values) - 1, int(len(values) * 0.99))]


def run(ctx: Context) -> list[Figure]:
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return [Figure(TITLE, "not run: needs /dev/fuse and fusermount3 (make install)", 0.0,
                       "")]
    dirs, files, big, seconds, rounds = SIZES["tiny" if ctx.scale.name == "tiny" else "full"]
    with ctx.scratch(NAME) as tmp:
        image = tmp / "snapvol.img"
        ctx.say(f"filling a volume: {files} small files in {dirs} directories, "
                f"{big} x 8 MiB")
        nbytes = _fill(image, dirs, files, big)
        run_dir = tempfile.mkdtemp(prefix="svbench", dir="/tmp")  # short: socket paths
        with snapvol_mount(tmp, 0, run_dir) as mnt:
            (mnt / "listed").mkdir()
            for i in range(50):
                (mnt / "listed" / f"f{i}").write_bytes(b"x")
            entry = _entry(run_dir, image)
            busy, done = threading.Event(), threading.Event()
            checks: list[float] = []
            failed: list[BaseException] = []

            def checker() -> None:
                # Checks and idle spells of the same length take turns, so both see the
                # machine in the same moods (it is shared). The request is the one
                # `fsck --online` sends, without the cost of starting a client process.
                try:
                    while sum(checks) < seconds or len(checks) < rounds:
                        busy.set()
                        t0 = time.perf_counter()
                        result = control.call(entry, "fsck")
                        checks.append(time.perf_counter() - t0)
                        busy.clear()
                        if not result["clean"]:
                            raise RuntimeError(f"the online check found problems: {result}")
                        time.sleep(checks[-1])
                except BaseException as e:  # raised again below, in the benchmark
                    failed.append(e)
                finally:
                    done.set()

            ctx.say(f"listings while fsck --online runs and while it does not, taking "
                    f"turns, for {seconds:g} s of checks")
            thread = threading.Thread(target=checker)
            thread.start()
            try:
                during, idle = _listings(mnt, busy, done)
            finally:
                done.set()
                thread.join()
            if failed:
                raise failed[0]
        shutil.rmtree(run_dir, ignore_errors=True)
    note = (f"{len(during)} listings during {len(checks)} check(s) of {nbytes / MiB:,.0f} "
            f"MiB in {files + big} files ({min(checks):.1f} s each), {len(idle)} between; "
            f"p50 {during[len(during) // 2] * 1e3:.2f} ms during, "
            f"{idle[len(idle) // 2] * 1e3:.2f} ms idle")
    return [with_anchor(Figure(TITLE, "listing latency p99 during fsck --online",
                               _p99(during), "s", targets=[at_most_ratio(2.0)], note=note),
                        "idle listing p99, same mount", _p99(idle))]


def _entry(run_dir: str, image: Path) -> registry.MountEntry:
    """The registry entry of the mount of `image` registered in `run_dir`."""
    saved = os.environ.get("SNAPVOL_RUN_DIR")
    os.environ["SNAPVOL_RUN_DIR"] = run_dir
    try:
        entry = registry.find_image(str(image))
    finally:
        if saved is None:
            del os.environ["SNAPVOL_RUN_DIR"]
        else:
            os.environ["SNAPVOL_RUN_DIR"] = saved
    if entry is None:
        raise RuntimeError(f"{image} is not mounted")
    return entry
