"""Crash tests: power loss at any block write leaves exactly the last committed CP.

A random workload (file operations, CPs, snapshots, restores, close/reopen) runs once on a
`RecordingDevice`, a FaultyDevice that watches its own writes. At many block writes it
takes `crash(rng)`: the image a power loss right after that write would leave (pending
writes kept, dropped or torn at random); the workload goes on, since a crash image depends
only on what was written and flushed so far. Each image must then open, check clean with
fsck, and equal the model as it was at the CP whose root record the image holds, which
must be the last CP whose root was flushed, or the one whose root write was still pending.
Some recovered volumes are also used (written, committed, reopened) to show that the
space the lost CP had taken is free again and consistent. Independently of the sampled
crashes, the device refuses outright any write to a block the durable image (its active
file system or any of its snapshots) still uses: invariant 1 checked at every write.

Model states are recorded per CP count while the workload runs. An operation that commits
more than one CP (snapshot create and restore commit the pending changes first) maps its
earlier CPs to the state before it and its last CP to the state after it.

`test_armed_crash_points` replays the same deterministic workload with `dev.arm(n)`, so
the engine really stops at write n with `CrashPoint`, and checks the image the same way.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from conftest import assert_fsck_clean, assert_volume_matches, read_volume
from model import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Dir,
    Form,
    Model,
    ModelError,
    ModelSnapshotError,
    Symlink,
    split,
)
from snapvol.device import CrashPoint, FaultyDevice, MemoryDevice
from snapvol.engine import snapshots
from snapvol.engine.cpwriter import CPWriter
from snapvol.engine.fsck import check
from snapvol.engine.metafile import load_plane
from snapvol.engine.volume import Volume
from snapvol.errors import SnapvolError
from snapvol.fs import FileSystem
from snapvol.layout.constants import FIRST_DATA_VBN, ROOT_SLOT_VBNS
from snapvol.layout.records import RecordError, RootRecord
from snapvol.planes import Plane, union

NBLOCKS = 2048  # 8 MiB: small, so every CP touches a large share of the metadata
TINY = 384  # 1.5 MiB: the allocator wraps around often and reuses blocks freed by recent CPs
LOW_SPACE = 130
"""Below this many free blocks (less what is dirty) the workload deletes instead of writing:
ENOSPC, and the CP the engine commits in the middle of an operation to reclaim space, are
the model test's business; here every CP must come from a commit operation."""
NAMES = [b"a", b"b", b"c", b"d", b"e"]
SNAP_NAMES = ["s0", "s1", "s2"]
BS = 4096

Forms = tuple[Form, dict[str, Form]]


@dataclass
class Crash:
    """One crash image and what it may legally hold."""

    at_write: int
    image: MemoryDevice
    allowed: frozenset[int]  # CP counts the image may show


class RecordingDevice(FaultyDevice):
    """A FaultyDevice that tracks which CP is durable, samples crash images, and refuses
    any write to a block the durable image still uses (DESIGN.md §3.1).

    `durable_cp` is the CP count of the last root record covered by a flush and
    `pending_cp` that of a root record written since (it survives a crash or not).
    `live` is the union of the durable image's active plane and its snapshots' planes,
    recomputed at every flush once `guard()` has been called.
    """

    def __init__(self, nblocks: int, seed: int, sample: Callable[[RecordingDevice], None]):
        super().__init__(nblocks, seed)
        self.sample = sample
        self.durable_cp = 0
        self.pending_cp: int | None = None
        self.cp_log: list[int] = []  # CP count of every root record written, in order
        self.live: Plane | None = None

    def allowed(self) -> frozenset[int]:
        return frozenset({self.durable_cp} | ({self.pending_cp} if self.pending_cp else set()))

    def guard(self) -> None:
        """Start refusing writes to live blocks (after the format, which has none)."""
        vol = Volume.on_device(self.durable_image(), writable=False)
        planes = [vol.active_plane]
        planes += [load_plane(vol.io, e.active_plane, vol.nblocks)
                   for e in vol.snapshots.entries()]
        self.live = union(*planes) if len(planes) > 1 else planes[0]
        vol.close()

    def _put(self, vbn: int, block: bytes) -> None:
        if self.live is not None and vbn >= FIRST_DATA_VBN and self.live.test(vbn):
            raise AssertionError(f"write {self.writes_total + 1} overwrites block {vbn}, "
                                 f"still used by the committed CP {self.durable_cp}")
        super()._put(vbn, block)
        if vbn in ROOT_SLOT_VBNS:
            try:
                cp = RootRecord.decode(block).cp_count
            except RecordError:
                cp = None  # the zeroed slots of a format
            if cp is not None:
                self.pending_cp = cp
                self.cp_log.append(cp)
        self.sample(self)

    def flush(self) -> None:
        super().flush()
        if self.pending_cp is not None:
            self.durable_cp, self.pending_cp = self.pending_cp, None
        if self.live is not None:
            self.guard()


@dataclass
class Workload:
    """A seeded random workload on one volume and the model, with the model state of
    every CP it commits."""

    seed: int
    rounds: int
    nblocks: int = NBLOCKS
    crashes_per_point: int = 1  # crash images taken at each block write
    rng: random.Random = field(init=False)
    crash_rng: random.Random = field(init=False)
    states: dict[int, Forms] = field(default_factory=dict)
    pending: list[Crash] = field(default_factory=list)
    sampling: bool = False
    # With `background`, some commits are background CPs whose writes are held back
    # (their writer thread never starts) and happen inside a later operation's CP: the
    # file operations in between run while that CP is placed but not on disk.
    background: bool = False
    placed: tuple[int, Forms] | None = None  # a held-back CP and the model it holds

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.crash_rng = random.Random(self.seed ^ 0x5EED)
        self.model = Model()

    # ---- the device and the volume --------------------------------------------------
    def _sample(self, dev: RecordingDevice) -> None:
        if self.sampling:
            self.take_crashes(dev)

    def take_crashes(self, dev: RecordingDevice) -> None:
        for _ in range(self.crashes_per_point):
            self.pending.append(Crash(dev.writes_total, dev.crash(self.crash_rng),
                                      dev.allowed()))

    def format(self) -> RecordingDevice:
        dev = RecordingDevice(self.nblocks, self.seed, self._sample)
        Volume.format(dev)
        dev.flush()
        dev.guard()
        self.states[1] = self.states[2] = self.model.forms()  # format writes CPs 1 and 2
        self.dev = dev
        self.open()
        return dev

    def open(self) -> None:
        self.vol = Volume.on_device(self.dev)
        self.vol.cp_interval = 1e9  # CPs only where the workload asks
        self.fs = FileSystem(self.vol)

    # ---- running ----------------------------------------------------------------------
    def run(self, after_op: Callable[[Workload], None] = lambda w: None) -> None:
        """All rounds: a few file operations, then one operation that commits."""
        for _ in range(self.rounds):
            for _ in range(self.rng.randint(1, 8)):
                self.fs_op()
            self.commit_op()
            after_op(self)

    def close(self) -> None:
        if self.placed is not None:
            self.vol.wait_cp()
            self.states[self.placed[0]] = self.placed[1]
            self.placed = None
        self.vol.close()

    def _ino(self, path: bytes) -> int:
        return self.fs.resolve(path, follow=False)

    def _pick(self, pool: list[bytes]) -> bytes | None:
        return self.rng.choice(pool) if pool else None

    def fs_op(self) -> None:
        """One random file operation, applied to the model and (if it succeeds there) to
        the engine, which must then succeed too and must not commit a CP."""
        rng, tree, fs = self.rng, self.model.active, self.fs
        dirs = tree.dirs()
        nondirs = [p for p, o in tree.walk() if not isinstance(o, Dir)]
        files = tree.files()
        parent, name = rng.choice(dirs), rng.choice(NAMES)
        kind = rng.choices(
            ["create", "mkdir", "write", "truncate", "unlink", "rmdir", "rename", "link",
             "symlink", "xattr", "chmod"],
            weights=[4, 2, 10, 3, 2, 1, 3, 1, 1, 1, 1])[0]
        low = self.low_space()
        if low:  # make room rather than run out: ENOSPC is not what this test is about
            kind = rng.choice(["unlink", "truncate"])
            if kind == "unlink" and nondirs:
                parent, name = split(rng.choice(nondirs))
        engine: Callable[[], object]
        model: Callable[[], None]
        if kind == "create":
            model = lambda: tree.create(parent, name)  # noqa: E731
            engine = lambda: fs.create(self._ino(parent), name)  # noqa: E731
        elif kind == "mkdir":
            model = lambda: tree.mkdir(parent, name)  # noqa: E731
            engine = lambda: fs.mkdir(self._ino(parent), name)  # noqa: E731
        elif kind in ("write", "truncate"):
            f = self._pick(files)
            if f is None:
                return
            if kind == "write":
                off = rng.choice([rng.randrange(3 * BS), rng.randrange(64) * BS,
                                  rng.randrange(1 << 18)])
                n = rng.choice([rng.randrange(200), rng.randrange(3 * BS), BS])
                data = rng.randbytes(n)
                model = lambda: tree.write(f, off, data)  # noqa: E731
                engine = lambda: fs.write(self._ino(f), off, data)  # noqa: E731
            else:
                size = 0 if low else rng.choice([rng.randrange(4 * BS), rng.randrange(1 << 18)])
                model = lambda: tree.truncate(f, size)  # noqa: E731
                engine = lambda: fs.setattr(self._ino(f), size=size)  # noqa: E731
        elif kind == "unlink":
            model = lambda: tree.unlink(parent, name)  # noqa: E731
            engine = lambda: fs.unlink(self._ino(parent), name)  # noqa: E731
        elif kind == "rmdir":
            model = lambda: tree.rmdir(parent, name)  # noqa: E731
            engine = lambda: fs.rmdir(self._ino(parent), name)  # noqa: E731
        elif kind == "rename":
            src = self._pick([p for p in tree.paths() if p != b"/"])
            if src is None:
                return
            sp, sn = split(src)
            flags = rng.choice([0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE])
            model = lambda: tree.rename(sp, sn, parent, name, flags)  # noqa: E731
            engine = lambda: fs.rename(  # noqa: E731
                self._ino(sp), sn, self._ino(parent), name, flags)
        elif kind == "link":
            src = self._pick(nondirs)
            if src is None:
                return
            model = lambda: tree.link(src, parent, name)  # noqa: E731
            engine = lambda: fs.link(self._ino(src), self._ino(parent), name)  # noqa: E731
        elif kind == "symlink":
            dest = rng.choice([b"x", b"../y/z", b"q" * rng.randrange(1, 4000)])
            model = lambda: tree.symlink(parent, name, dest)  # noqa: E731
            engine = lambda: fs.symlink(self._ino(parent), name, dest)  # noqa: E731
        elif kind == "xattr":
            target = self._pick([p for p, o in tree.walk() if not isinstance(o, Symlink)])
            assert target is not None
            xname = rng.choice([b"user.a", b"user.b"])
            value = rng.randbytes(rng.randrange(3000))
            model = lambda: tree.setxattr(target, xname, value)  # noqa: E731
            engine = lambda: fs.setxattr(self._ino(target), xname, value)  # noqa: E731
        else:
            target = self._pick([p for p, o in tree.walk() if not isinstance(o, Symlink)])
            assert target is not None
            perm = rng.choice([0o600, 0o644, 0o755, 0o700])
            model = lambda: tree.chmod(target, perm)  # noqa: E731
            engine = lambda: fs.setattr(self._ino(target), mode=perm)  # noqa: E731
        try:
            model()
        except ModelError:
            return  # the model test checks refusals; here only changes matter
        before = len(self.dev_log())
        engine()
        assert len(self.dev_log()) == before, f"{kind} committed a CP on its own"

    def low_space(self) -> bool:
        return self.vol.usage()["free"] - self.vol.active.pending_blocks() < LOW_SPACE

    def dev_log(self) -> list[int]:
        dev = self.dev
        assert isinstance(dev, RecordingDevice)
        return dev.cp_log

    def commit_op(self) -> None:
        """One operation that commits CPs; map each CP it wrote to a model state."""
        rng, vol, m = self.rng, self.vol, self.model
        before = m.forms()
        first = len(self.dev_log())
        kinds = ["cp", "snap", "delete", "restore", "rename", "reopen", "background"]
        kind = rng.choices(kinds, weights=[10, 3, 2, 2, 1, 2, 12 if self.background else 0])[0]
        name = rng.choice(SNAP_NAMES)
        if m.snapshots and self.low_space():
            kind, name = "delete", rng.choice(sorted(m.snapshots))
        try:
            if kind == "background" and self.placed is None:
                count = vol.root.cp_count + 1
                if vol.cp(background=True) is not None:
                    self.placed = (count, before)
                    # Everything reads back from the placed blocks, none yet written.
                    assert vol.cp_in_flight
                    assert_volume_matches(vol, before)
            elif kind in ("cp", "background"):
                vol.cp()
            elif kind == "snap":
                m.snapshot_create(name)
                snapshots.create(vol, name)
            elif kind == "delete":
                m.snapshot_delete(name)
                snapshots.delete(vol, name)
            elif kind == "restore":
                m.snapshot_restore(name)
                snapshots.restore(vol, name)
            elif kind == "rename":
                new = rng.choice(SNAP_NAMES)
                m.snapshot_rename(name, new)
                snapshots.rename(vol, name, new)
            else:
                vol.close()
                self.open()
        except ModelSnapshotError:
            vol.cp()  # the engine would refuse too (the model test checks that)
        after = m.forms()
        new = self.dev_log()[first:]
        if self.placed is not None and self.placed[0] in new:
            # Written by this operation's first CP, holding the model of when it was placed.
            self.states[self.placed[0]] = self.placed[1]
            new.remove(self.placed[0])
            self.placed = None
        for cp in new[:-1]:
            self.states[cp] = before
        if new:
            self.states[new[-1]] = after


def assert_fsck_clean_but_torn_root(vol: Volume, crash: Crash) -> None:
    """fsck finds nothing, except when the crash tore the root record being written:
    then the slot fails its check, the volume opened the CP before it, and both opening
    and fsck say so, naming that CP and the crash that leaves it (invariant 2 chose the
    right slot; the report must not hide that the newer one is unreadable)."""
    report = check(vol)
    cp = vol.root.cp_count
    torn = [st for st in vol.slots if not st.valid]
    if not torn:
        assert report.clean, "fsck: " + "; ".join(report.problems[:20])
        assert vol.root_warning is None
        return
    assert len(torn) == 1 and not torn[0].blank, vol.slots
    assert torn[0].cp_count == cp + 1 and cp + 1 in crash.allowed, (torn, crash.allowed)
    assert vol.root_warning is not None and f"CP {cp} was opened instead" in vol.root_warning
    assert "a crash while" in vol.root_warning
    assert report.problems == [vol.root_warning], report.problems


def check_crash(crash: Crash, states: dict[int, Forms], use: bool) -> None:
    """The image opens, holds an allowed CP, equals the model there, and fscks clean;
    with `use`, it also takes new writes, commits them and reopens clean."""
    try:
        vol = Volume.on_device(crash.image)
    except SnapvolError as e:
        raise AssertionError(f"crash after write {crash.at_write}: cannot open: {e}") from e
    cp = vol.root.cp_count
    where = f"crash after write {crash.at_write} (image at CP {cp}, allowed {set(crash.allowed)})"
    assert cp in crash.allowed, where
    try:
        assert_volume_matches(vol, states[cp])
        assert_fsck_clean_but_torn_root(vol, crash)
        if use and vol.usage()["free"] >= LOW_SPACE:
            fs = FileSystem(vol)
            ino = fs.create(2, b"after-crash").ino
            data = bytes(range(256)) * 64 * 6  # 6 blocks
            fs.write(ino, 0, data)
            vol.cp()
            vol.close()
            vol = Volume.on_device(crash.image)
            assert FileSystem(vol).read_file("/after-crash") == data
            assert_fsck_clean(vol)
    except (AssertionError, SnapvolError) as e:
        raise AssertionError(f"{where}: {type(e).__name__}: {e}") from e
    finally:
        vol.close()


def run_recorded(seed: int, rounds: int, nblocks: int = NBLOCKS, crashes_per_point: int = 1,
                 use_every: int = 10, background: bool = False) -> int:
    """Run one workload, checking the crash images sampled along the way; returns how many
    crash images were checked."""
    w = Workload(seed, rounds, nblocks, crashes_per_point=crashes_per_point,
                 background=background)
    checked = 0

    def check_pending(w: Workload) -> None:
        nonlocal checked
        # a crash right after the commit returned: nothing pending, the new CP is durable
        dev = w.dev
        assert isinstance(dev, RecordingDevice)
        w.take_crashes(dev)
        for crash in w.pending:
            check_crash(crash, w.states, use=checked % use_every == 0)
            checked += 1
        w.pending.clear()

    w.format()
    w.sampling = True
    w.run(check_pending)
    w.close()
    check_pending(w)
    return checked


POINTS_PER_SEED = 150  # 40 seeds x 150 = 6,000, well over the 1,000 crash points asked


@pytest.mark.parametrize("seed", range(24))
def test_crash_points(seed: int) -> None:
    """Every block write of a 16-round workload on an 8 MiB volume is a crash point (two
    crash images each), and so is the moment after each commit returns."""
    assert run_recorded(seed, rounds=16, crashes_per_point=2) >= POINTS_PER_SEED


@pytest.mark.parametrize("seed", range(1000, 1016))
def test_crash_points_tiny_volume(seed: int) -> None:
    """The same on a 1.5 MiB volume, where the allocator keeps coming back to blocks that
    recent CPs freed: the case where overwriting live data would show."""
    assert run_recorded(seed, rounds=24, nblocks=TINY, crashes_per_point=2) >= POINTS_PER_SEED


@pytest.mark.parametrize("seed", range(3000, 3006))
def test_crash_points_with_background_cps(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Background CPs (a mount's): file operations change the volume between a CP's
    placement and its writes, which come later, inside the next commit. Reads in between
    see the placed blocks; blocks freed in between stay unused until the CP after it
    commits (the device refuses any write to a block the durable image holds)."""
    monkeypatch.setattr(CPWriter, "start", lambda self: None)  # written when waited for
    assert run_recorded(seed, rounds=24, crashes_per_point=2,
                        background=True) >= POINTS_PER_SEED
    assert run_recorded(seed, rounds=24, nblocks=TINY, crashes_per_point=2,
                        background=True) >= POINTS_PER_SEED


@pytest.mark.long
@pytest.mark.parametrize("seed", range(100, 140))
def test_crash_points_long(seed: int) -> None:
    """100,000 crash points with the next two: 40 long workloads, three images a write."""
    assert run_recorded(seed, rounds=60, crashes_per_point=3, use_every=25) >= 1800


@pytest.mark.long
@pytest.mark.parametrize("seed", range(2000, 2020))
def test_crash_points_long_tiny_volume(seed: int) -> None:
    assert run_recorded(seed, rounds=60, nblocks=TINY, crashes_per_point=3,
                        use_every=25) >= 1800


# ---- crashes at an armed write: the engine is really stopped there ----------------------

def _replay(seed: int, rounds: int, arm_at: int | None) -> tuple[Workload, int]:
    """Run the workload of `seed`, crashing `arm_at` writes after the format if given;
    returns it and the number of writes the format took."""
    w = Workload(seed, rounds)
    dev = w.format()
    format_writes = dev.writes_total
    if arm_at is not None:
        dev.arm(arm_at)
    try:
        w.run()
        w.vol.close()
    except CrashPoint:
        w.vol.abandon()
    return w, format_writes


@pytest.mark.parametrize("seed", [3, 7])
def test_armed_crash_points(seed: int) -> None:
    """Stop the engine with CrashPoint at chosen writes of a replayed workload (the
    workload is deterministic, so the full run's CP states apply to every replay)."""
    rounds = 8
    full, format_writes = _replay(seed, rounds, None)
    total = full.dev.writes_total - format_writes
    rng = random.Random(seed)
    for n in sorted(rng.sample(range(total), 25)):
        w, _ = _replay(seed, rounds, n)
        dev = w.dev
        assert isinstance(dev, RecordingDevice)
        assert dev.crashed, f"armed at {n} of {total} writes but never crashed"
        assert dev.writes_total == format_writes + n
        for _ in range(3):
            crash = Crash(dev.writes_total, dev.crash(rng), dev.allowed())
            check_crash(crash, full.states, use=False)


def test_crash_right_after_cp_loses_nothing() -> None:
    """The simplest case spelled out: once cp() returns, a power loss keeps its changes
    and loses everything after it."""
    dev = FaultyDevice(NBLOCKS, seed=1)
    Volume.format(dev)
    vol = Volume.on_device(dev)
    fs = FileSystem(vol)
    fs.write_file("/kept", b"k" * 10000)
    vol.cp()
    fs.write_file("/lost", b"l" * 10000)
    fs.unlink(2, "kept")
    vol.abandon()
    for i in range(20):
        rec = Volume.on_device(dev.crash(random.Random(i)))
        active, _ = read_volume(rec)
        assert set(active) == {b"/", b"/kept"}
        assert active[b"/kept"].data == b"k" * 10000
        assert_fsck_clean(rec)
        rec.close()
