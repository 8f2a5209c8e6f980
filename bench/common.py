"""What every benchmark shares: the scale knobs, figures and targets, timing, host helpers.

Absolute times on a shared machine are noise, so a benchmark measures its anchor (the same
work done by the host's own file system or by raw numpy) in the same run, on the same disk,
and reports the ratio. A few targets are absolute (a snapshot in under 10 ms) because the
design promises absolute costs there; those rows still show an anchor for scale.
"""

from __future__ import annotations

import contextlib
import cProfile
import ctypes
import dataclasses
import io
import math
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


@dataclass(frozen=True, slots=True)
class Scale:
    """How big each benchmark runs. `full` is what the issue asks for; `tiny` proves the
    code runs (the smoke test) and its figures mean nothing."""

    name: str
    seq_bytes: int  # bench 1: bytes written and read back
    seq_chunk: int  # bench 1: bytes per write/read call
    seq_rounds: int  # bench 1: rounds (each side's best round counts)
    snap_volumes: tuple[int, int]  # bench 2: small and large volume sizes
    snap_data: int  # bench 2: bytes written before the first snapshot
    snap_count: int  # bench 2: snapshots created per volume
    plane_blocks: int  # bench 3: blocks a plane covers (a multiple of 32768)
    plane_repeats: int  # bench 3: timed runs per case
    small_files: int  # bench 4: files created and read back
    small_dirs: int  # bench 4: directories they are spread over
    dir_entries: int  # bench 5: entries of the big snapvol directory
    host_dir_entries: int  # bench 5: files in the host anchor directory
    dir_lookups: int  # bench 5: random lookups per pass


SCALES: dict[str, Scale] = {
    "full": Scale(
        name="full",
        seq_bytes=1 * GiB,
        seq_chunk=1 * MiB,
        seq_rounds=2,
        snap_volumes=(1 * GiB, 1 * TiB),
        snap_data=64 * MiB,
        snap_count=20,
        plane_blocks=268_435_456,
        plane_repeats=15,
        small_files=100_000,
        small_dirs=100,
        dir_entries=1_000_000,
        host_dir_entries=1_000_000,
        dir_lookups=5_000,
    ),
    "tiny": Scale(
        name="tiny",
        seq_bytes=4 * MiB,
        seq_chunk=1 * MiB,
        seq_rounds=1,
        snap_volumes=(64 * MiB, 1 * GiB),
        snap_data=1 * MiB,
        snap_count=3,
        plane_blocks=1 << 20,
        plane_repeats=3,
        small_files=300,
        small_dirs=4,
        dir_entries=2_000,
        host_dir_entries=2_000,
        dir_lookups=200,
    ),
}

SCALE_ENV = "SNAPVOL_BENCH_SCALE"


def scale_from_env(default: str = "full") -> Scale:
    name = os.environ.get(SCALE_ENV, default) or default
    if name not in SCALES:
        raise SystemExit(f"{SCALE_ENV}={name!r}: choose one of {', '.join(SCALES)}")
    return SCALES[name]


# ---- figures and targets ---------------------------------------------------------------

Op = Literal[">=", "<=", "<"]
Subject = Literal["value", "ratio"]


@dataclass(frozen=True, slots=True)
class Target:
    """A bound on a figure's value or on its ratio to the anchor."""

    subject: Subject
    op: Op
    bound: float
    text: str

    def met(self, value: float, ratio: float | None) -> bool:
        x = value if self.subject == "value" else ratio
        if x is None or math.isnan(x):
            return False
        if self.op == ">=":
            return x >= self.bound
        if self.op == "<=":
            return x <= self.bound
        return x < self.bound


def at_least_ratio(bound: float) -> Target:
    return Target("ratio", ">=", bound, f"ratio ≥ {bound:g}")


def at_most_ratio(bound: float) -> Target:
    return Target("ratio", "<=", bound, f"ratio ≤ {bound:g}")


def under_ms(bound: float) -> Target:
    """For figures measured in seconds."""
    return Target("value", "<", bound / 1000, f"< {bound:g} ms")


@dataclass(slots=True)
class Figure:
    """One row of the table. `ratio` is value / anchor_value unless a benchmark says
    otherwise in `ratio_note` (for times, lower is better)."""

    bench: str
    name: str
    value: float
    unit: str
    anchor: str = ""
    anchor_value: float | None = None
    ratio: float | None = None
    targets: list[Target] = field(default_factory=list)
    note: str = ""

    @property
    def status(self) -> str:
        if not self.targets:
            return "info"
        return "PASS" if all(t.met(self.value, self.ratio) for t in self.targets) else "MISS"

    def as_json(self) -> dict[str, object]:
        return {
            "bench": self.bench,
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "anchor": self.anchor,
            "anchor_value": self.anchor_value,
            "ratio": self.ratio,
            "targets": [dataclasses.asdict(t) for t in self.targets],
            "status": self.status,
            "note": self.note,
        }


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def with_anchor(fig: Figure, anchor: str, anchor_value: float) -> Figure:
    fig.anchor, fig.anchor_value = anchor, anchor_value
    fig.ratio = ratio(fig.value, anchor_value)
    return fig


def fmt_value(value: float | None, unit: str) -> str:
    """A figure with its unit, seconds shown as ms or µs."""
    if value is None or math.isnan(value):
        return "-"
    if unit == "s":
        if value < 1e-3:
            return f"{value * 1e6:.1f} µs"
        return f"{value * 1e3:.2f} ms"
    if value >= 1000:
        return f"{value:,.0f} {unit}"
    if value >= 10:
        return f"{value:.1f} {unit}"
    return f"{value:.3g} {unit}"


# ---- running ---------------------------------------------------------------------------


class Context:
    """What a benchmark gets: the scale, a scratch directory on the disk under test,
    progress output, and an optional profiler around the snapvol side of each figure."""

    def __init__(self, scale: Scale, workdir: Path, profile_dir: Path | None = None,
                 quiet: bool = False) -> None:
        self.scale = scale
        self.workdir = workdir
        self.profile_dir = profile_dir
        self.quiet = quiet
        self.profiles: dict[str, pstats.Stats] = {}

    def say(self, message: str) -> None:
        if not self.quiet:
            print(f"  {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def scratch(self, name: str) -> Iterator[Path]:
        """A fresh directory for one benchmark, removed afterwards whatever happens."""
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    @contextlib.contextmanager
    def profiled(self, label: str) -> Iterator[None]:
        """Profile the block under `label` when profiling is on (cProfile; it slows the
        block, so profiled runs are for the profile, not for the figures)."""
        if self.profile_dir is None:
            yield
            return
        prof = cProfile.Profile()
        prof.enable()
        try:
            yield
        finally:
            prof.disable()
            safe = "".join(c if c.isalnum() else "_" for c in label)
            prof.dump_stats(self.profile_dir / f"{safe}.prof")
            self.profiles[label] = pstats.Stats(prof)


def profile_summary(stats: pstats.Stats, top: int = 15) -> str:
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ---- the host side ---------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def sync_fs(path: Path) -> None:
    """Make everything written to the file system holding `path` durable (syncfs), the
    host's counterpart of one snapvol CP. Falls back to sync() where syncfs is missing."""
    fd = os.open(path, os.O_RDONLY)
    try:
        syncfs = getattr(_libc, "syncfs", None)
        if syncfs is None or syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def settle(path: Path) -> None:
    """Write back what earlier steps left dirty, so the next timed step is not charged
    for it."""
    sync_fs(path)


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (fsync, then POSIX_FADV_DONTNEED), so the
    next read comes from the disk. Needs no privileges and touches no other file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def every(n: int, parts: int = 10) -> int:
    """A progress step: about `parts` reports over `n` items."""
    return max(1, n // parts)


def timed_write(path: Path, total: int, chunk: int,
                piece: Callable[[int], bytes | memoryview]) -> float:
    """Seconds to write `total` bytes to a new file at `path` in `chunk`-byte writes (the
    bytes at offset off are piece(off)), then fsync it: the host side of a write figure."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t0 = time.perf_counter()
        for off in range(0, total, chunk):
            os.write(fd, piece(off))
        os.fsync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def timed_read(path: Path, total: int, chunk: int) -> float:
    """Seconds to read the file at `path` to its end in `chunk`-byte reads; it must hold
    `total` bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        got = 0
        while n := len(os.read(fd, chunk)):
            got += n
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    if got != total:
        raise AssertionError(f"{path}: read {got} of {total} bytes")
    return elapsed
