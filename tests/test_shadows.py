"""Shadow snapshots (bookmarks): planes that hold no space and lose a bit when its block
is reused.

The state machine churns a small volume (so the allocator laps it and reuses blocks)
with shadows and regular snapshots coming and going, and checks after every step:

- invariant 5: a block is free iff the active or summary plane holds it; shadows pin
  nothing, so the allocator's free count is exactly what those two planes leave;
- a shadow's plane only loses bits: it is a subset of the plane it was taken with;
- every block still in a shadow holds the bytes it held when the shadow was taken, so
  subtracting the shadow from a later snapshot (an incremental send) over-sends but never
  under-sends: a destination that holds the shadow's state plus the blocks of
  `later − shadow` holds every block of the later snapshot byte for byte;
- fsck is clean (it checks shadow regions and a shadow made from a held snapshot).
"""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import assert_fsck_clean, new_memory_volume
from snapvol.cli.main import main
from snapvol.device import FaultyDevice, MemoryDevice
from snapvol.engine import snapshots
from snapvol.engine.snapshots import plane_of
from snapvol.engine.snaptable import SnapshotError
from snapvol.engine.volume import Volume
from snapvol.errors import FsError
from snapvol.fs import FileSystem
from snapvol.layout.constants import ROOT_INO, ROOT_SLOT_VBNS
from snapvol.layout.records import RootRecord
from snapvol.planes import Plane, count_free, difference, intersection, is_subset, union

NBLOCKS = 1024  # 4 MiB: small enough that churn laps the allocator and reuses blocks
NAMES = [b"a", b"b", b"c", b"d", b"e"]


class ShadowMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dev, self.vol = new_memory_volume(NBLOCKS)
        self.vol.cp_interval = 1e9
        self.fs = FileSystem(self.vol)
        self.files: set[bytes] = set()
        # shadow name -> (the plane it was taken with, the device as it was then)
        self.shadows: dict[str, tuple[Plane, MemoryDevice]] = {}
        self.snaps: list[str] = []
        self.counter = 0

    def _name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    @rule(name=st.sampled_from(NAMES), blocks=st.integers(0, 90), seed=st.integers(1, 1 << 30))
    def write(self, name: bytes, blocks: int, seed: int) -> None:
        data = random.Random(seed).randbytes(blocks * 4096 + seed % 100)
        try:
            if name in self.files:
                self.fs.unlink(ROOT_INO, name)
            self.fs.write_file(b"/" + name, data)
        except FsError as e:
            assert e.errno == 28  # a full volume; snapshots may hold the space
        self.files = set(self.fs.listdir(b"/"))

    @rule(seed=st.integers(1, 1 << 30))
    def lap(self, seed: int) -> None:
        """Rewrite one file many times, a CP each: the allocator's cursor laps the volume,
        so blocks freed since a shadow was taken are handed out again."""
        for i in range(12):
            self.write(b"lap", 60, seed + i)
            self.vol.cp()

    @rule(name=st.sampled_from(NAMES))
    def delete(self, name: bytes) -> None:
        if name in self.files:
            self.fs.unlink(ROOT_INO, name)
            self.files.discard(name)

    @rule()
    def cp(self) -> None:
        self.vol.cp()

    @precondition(lambda self: len(self.vol.snapshots) < 12)
    @rule()
    def snapshot(self) -> None:
        name = self._name("s")
        try:
            snapshots.create(self.vol, name)
        except FsError as e:
            assert e.errno == 28
            return
        self.snaps.append(name)

    @precondition(lambda self: len(self.vol.snapshots) < 12)
    @rule(data=st.data())
    def shadow(self, data: st.DataObject) -> None:
        """A shadow of the active file system, or of an existing snapshot."""
        source = data.draw(st.sampled_from([None, *self.snaps]))
        name = self._name("x")
        self.vol.cp()
        before = self.dev.snapshot()
        if source is None:
            plane = self.vol.active_plane.copy()
        else:
            plane = plane_of(self.vol, self.vol.snapshots.get(source))
        plane.clear_range(0, 3)  # the superblock and root slots are never in a shadow
        try:
            snapshots.create(self.vol, name, shadow=True, source=source)
        except FsError as e:
            assert e.errno == 28
            return
        self.shadows[name] = (plane, before)

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data())
    def delete_snapshot(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.snaps))
        snapshots.delete(self.vol, name)
        self.snaps.remove(name)

    @precondition(lambda self: bool(self.shadows))
    @rule(data=st.data())
    def delete_shadow(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.shadows)))
        assert snapshots.delete(self.vol, name) == 0  # a shadow frees nothing but itself
        del self.shadows[name]

    @rule()
    def reopen(self) -> None:
        self.vol.close()
        self.vol = Volume.on_device(self.dev)
        self.vol.cp_interval = 1e9
        self.fs = FileSystem(self.vol)

    @invariant()
    def planes_hold_what_they_should(self) -> None:
        vol = self.vol
        vol.cp()
        assert vol.alloc is not None
        # Invariant 5: free iff in no plane; a shadow is not one of the planes that pin.
        assert vol.alloc.free == count_free(vol.active_plane, vol.summary_plane)
        later = [plane_of(vol, e) for e in vol.snapshots.regular()]
        for name, (taken, then) in self.shadows.items():
            entry = vol.snapshots.get(name)
            now = plane_of(vol, entry)
            assert is_subset(now, taken), f"shadow {name} gained blocks"
            if now != taken:
                event("a shadow lost the bits of reused blocks")
            kept = now.members().tolist()
            for vbn in kept:
                assert self.dev.read(vbn) == then.read(vbn), (
                    f"shadow {name}: block {vbn} changed but its bit is still set")
            # The incremental later − shadow, applied to the shadow's state, rebuilds
            # every block of the later snapshot (a shadow over-sends, never under-sends).
            for plane in later:
                skipped = plane.members()[now.test_many(plane.members())]
                for vbn in skipped.tolist():
                    assert then.read(vbn) == self.dev.read(vbn)

    def teardown(self) -> None:
        assert_fsck_clean(self.vol)
        self.vol.close()


TestShadowMachine = ShadowMachine.TestCase
TestShadowMachine.settings = settings(max_examples=40, stateful_step_count=50)


def _churn(fs: FileSystem, rounds: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    for i in range(rounds):
        name = f"f{i % 6}".encode()
        with contextlib.suppress(FsError):
            fs.unlink(ROOT_INO, name)
        fs.write_file(b"/" + name, rng.randbytes(rng.randrange(1, 60) * 4096))
        fs.vol.cp()


def test_reuse_clears_bits_and_a_shadow_holds_no_space() -> None:
    dev, vol = new_memory_volume(NBLOCKS)
    fs = FileSystem(vol)
    _churn(fs, 6)
    snapshots.create(vol, "x", shadow=True)
    taken = plane_of(vol, vol.snapshots.get("x")).count()
    free = vol.alloc.free if vol.alloc is not None else 0
    _churn(fs, 60, seed=8)  # laps the volume many times over
    now = plane_of(vol, vol.snapshots.get("x")).count()
    assert now < taken // 2, f"reuse left {now} of {taken} bits"
    assert vol.alloc is not None and vol.alloc.free >= free - 64  # no space pinned
    assert vol.usage()["snapshot_only"] == 0
    assert_fsck_clean(vol)
    vol.close()
    vol = Volume.on_device(dev)
    assert plane_of(vol, vol.snapshots.get("x")).count() == now
    assert_fsck_clean(vol)
    vol.close()


def test_incremental_from_shadow_rebuilds_the_later_snapshot() -> None:
    """A block-level send simulated by hand: the destination is the device as it was when
    the shadow was taken; it receives `later − shadow` and must then read the later
    snapshot's tree exactly as the source does."""
    from conftest import read_tree

    dev, vol = new_memory_volume(NBLOCKS)
    fs = FileSystem(vol)
    _churn(fs, 8)
    snapshots.create(vol, "base", shadow=True)
    dest = dev.snapshot()
    _churn(fs, 1, seed=3)  # rewrite one file of six
    fs.write_file(b"/new", b"n" * 30000)
    fs.unlink(ROOT_INO, b"f3")
    snapshots.create(vol, "later")
    entry = vol.snapshots.get("later")
    later = plane_of(vol, entry)
    delta = difference(later, plane_of(vol, vol.snapshots.get("base")))
    assert delta.count() < later.count() // 2  # most blocks are not sent at all
    delta.clear_range(0, 3)  # the superblock and root slots are never sent as blocks
    for vbn in delta.members().tolist():
        dest.write(vbn, dev.read(vbn))
    # The destination switches to the later snapshot's CP: a root record of its trees.
    root = RootRecord(entry.cp_count, entry.created_ns, vol.sb.uuid, vol.nblocks,
                      *entry.trees, next_snap_id=entry.snap_id)
    dest.write(ROOT_SLOT_VBNS[entry.cp_count % 2], root.encode())
    want = read_tree(FileSystem(vol, "later"))
    vol.close()
    got_vol = Volume.on_device(dest, writable=False)
    assert read_tree(FileSystem(got_vol)) == want
    assert_fsck_clean(got_vol)
    got_vol.close()


def test_shadow_refuses_reads_and_restore(mem_volume: Volume) -> None:
    FileSystem(mem_volume).write_file(b"/f", b"x" * 5000)
    snapshots.create(mem_volume, "x", shadow=True)
    with pytest.raises(SnapshotError, match="shadow snapshot"):
        FileSystem(mem_volume, "x")
    with pytest.raises(SnapshotError, match="shadow"):
        snapshots.restore(mem_volume, "x")
    with pytest.raises(SnapshotError, match="already exists"):
        snapshots.create(mem_volume, "x", shadow=True)
    infos = {i.name: i for i in snapshots.infos(mem_volume)}
    assert infos["x"].shadow and infos["x"].reclaimable_blocks == 0


def test_shadow_from_snapshot_keeps_identity(mem_volume: Volume) -> None:
    fs = FileSystem(mem_volume)
    fs.write_file(b"/f", b"y" * 50000)
    snap = snapshots.create(mem_volume, "s")
    shadow = snapshots.create(mem_volume, "s.shadow", shadow=True, source="s")
    assert (shadow.guid, shadow.cp_count) == (snap.guid, snap.cp_count)
    want = plane_of(mem_volume, snap)
    want.clear_range(0, 3)
    assert plane_of(mem_volume, shadow) == want
    snapshots.delete(mem_volume, "s")
    assert plane_of(mem_volume, mem_volume.snapshots.get("s.shadow")).count() > 0
    assert_fsck_clean(mem_volume)


def test_restore_keeps_shadow_planes_current() -> None:
    """Restoring replaces the inode file; the shadow planes (in the table file) must not
    roll back, or a reused block could keep its bit."""
    dev, vol = new_memory_volume(NBLOCKS)
    fs = FileSystem(vol)
    _churn(fs, 4)
    snapshots.create(vol, "old")
    snapshots.create(vol, "x", shadow=True)
    then = dev.snapshot()
    _churn(fs, 40, seed=5)
    snapshots.restore(vol, "old")
    _churn(FileSystem(vol), 10, seed=6)
    for vbn in plane_of(vol, vol.snapshots.get("x")).members().tolist():
        assert dev.read(vbn) == then.read(vbn)
    assert_fsck_clean(vol)
    vol.close()


def test_fsck_names_a_tampered_shadow(mem_volume: Volume) -> None:
    from snapvol.engine import shadows
    from snapvol.engine.fsck import check

    FileSystem(mem_volume).write_file(b"/f", b"z" * 40000)
    snapshots.create(mem_volume, "s")
    snapshots.create(mem_volume, "x", shadow=True, source="s")
    slot = mem_volume.snapshots.slot_of(mem_volume.snapshots.get("x"))
    held = plane_of(mem_volume, mem_volume.snapshots.get("s")).members()
    assert shadows.clear_reused(mem_volume.snap_tree, [slot], held[held >= 3][:1],
                                mem_volume.active_plane.plane_blocks) == 1
    mem_volume.table_changed()
    mem_volume.cp()
    report = check(mem_volume)
    assert any("shadow snapshot 'x'" in p and "differs" in p for p in report.problems)


def test_cli_shadow(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    from pathlib import Path

    img = str(Path(str(tmp_path)) / "v.img")

    def run(*args: str) -> int:
        with pytest.raises(SystemExit) as ex:
            main(list(args))
        return int(ex.value.code or 0)

    assert run("create", img, "--size", "16M") == 0
    assert run("snap", "create", img, "s") == 0
    assert run("snap", "create", img, "x", "--shadow") == 0
    assert run("snap", "create", img, "y", "--shadow", "--from", "s") == 0
    capsys.readouterr()
    assert run("snap", "list", img, "--json") == 0
    listed = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    assert listed["x"]["shadow"] and not listed["s"]["shadow"]
    assert listed["y"]["guid"] == listed["s"]["guid"]
    assert run("ls", img, "--snapshot", "x") == 2
    assert "shadow snapshot" in capsys.readouterr().err
    assert run("snap", "create", img, "z", "--from", "s") == 2
    assert "--from needs --shadow" in capsys.readouterr().err
    assert run("fsck", img) == 0


class _Recording(FaultyDevice):
    """Keeps the image a power loss would leave after every `step`-th block write."""

    def __init__(self, nblocks: int, step: int) -> None:
        super().__init__(nblocks, seed=4)
        self.step, self.armed = step, False
        self.images: list[MemoryDevice] = []

    def _put(self, vbn: int, block: bytes) -> None:
        super()._put(vbn, block)
        if self.armed and self.writes_total % self.step == 0:
            self.images.append(self.crash())


def test_crashes_never_leave_a_stale_shadow_bit() -> None:
    """A crash in the middle of a CP that reused shadow blocks: the recovered volume's
    shadow may still have the bits (the clearing CP was lost), but only for blocks that
    no committed plane holds, so an increment from it is still exact."""
    dev = _Recording(NBLOCKS, step=5)
    Volume.format(dev)
    vol = Volume.on_device(dev)
    vol.cp_interval = 1e9
    fs = FileSystem(vol)
    _churn(fs, 5)
    snapshots.create(vol, "keep")
    snapshots.create(vol, "x", shadow=True)
    then = dev.durable_image()
    dev.armed = True
    _churn(fs, 30, seed=9)
    snapshots.create(vol, "later")
    _churn(fs, 10, seed=10)
    vol.close()
    assert len(dev.images) >= 200
    at_start = Volume.on_device(then, writable=False)
    first = plane_of(at_start, at_start.snapshots.get("x")).count()
    checked = reused = 0
    for n, image in enumerate(dev.images):
        got = Volume.on_device(image, writable=False)
        if "x" not in {e.name for e in got.snapshots.entries()}:
            continue
        shadow = plane_of(got, got.snapshots.get("x"))
        reused += shadow.count() < first
        held = union(got.active_plane, got.summary_plane)
        for vbn in intersection(shadow, held).members().tolist():
            assert image.read(vbn) == then.read(vbn), f"block {vbn} changed, bit still set"
        if n % 25 == 0:
            assert_fsck_clean(got)
        checked += 1
    assert checked >= 200 and reused >= 100, (checked, reused)


def test_shadow_base_beside_its_snapshot_sends_only_the_change(mem_volume: Volume) -> None:
    """A shadow made with --from shares its snapshot's GUID; as a base it must subtract
    its own plane (not the empty region of its twin's slot)."""
    from snapvol.image import plan

    fs = FileSystem(mem_volume)
    fs.write_file(b"/big", b"b" * 400_000)
    snapshots.create(mem_volume, "s")
    snapshots.create(mem_volume, "s.bm", shadow=True, source="s")
    fs.write_file(b"/small", b"s" * 5000)
    snapshots.create(mem_volume, "t")
    full = plan(mem_volume, "t").nblocks
    from_shadow = plan(mem_volume, "t", "s.bm").nblocks
    from_snap = plan(mem_volume, "t", "s").nblocks
    assert from_snap <= from_shadow < full // 4, (from_snap, from_shadow, full)
