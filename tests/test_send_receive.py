"""Full and incremental image transfer between volumes: after every receive the
destination's tree and every snapshot equal the source's and fsck is clean on both;
refusals write nothing; interrupted receives resume or abort; readers never see a mix."""

from __future__ import annotations

import io
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_fsck_clean, read_tree
from model import Form
from snapvol import image
from snapvol.device import MemoryDevice
from snapvol.engine import snapshots
from snapvol.engine.volume import Volume
from snapvol.errors import SnapvolError, VolumeError
from snapvol.fs import FileSystem
from snapvol.image.receiver import ReceiveResult
from snapvol.layout.constants import ROOT_INO
from snapvol.streams.imagestream import StreamError

NBLOCKS = 8192  # 32 MiB


def new_volume(nblocks: int = NBLOCKS) -> tuple[MemoryDevice, Volume]:
    dev = MemoryDevice(nblocks)
    Volume.format(dev)
    return dev, Volume.on_device(dev)


def mutate(vol: Volume, rng: random.Random, steps: int = 12) -> None:
    """Random changes: new files and directories, rewrites, appends, deletes, renames."""
    fs = FileSystem(vol)
    for _ in range(steps):
        dirs = [ROOT_INO] + [ino for _, ino, dt, _ in fs.readdir(ROOT_INO)[2:] if dt == 4]
        parent = rng.choice(dirs)
        entries = [(n, ino, dt) for n, ino, dt, _ in fs.readdir(parent)[2:]]
        files = [(n, ino) for n, ino, dt in entries if dt == 8]
        op = rng.random()
        if op < 0.35 or not files:
            name = f"f{rng.randrange(10**6)}"
            st = fs.create(parent, name)
            fs.write(st.ino, 0, rng.randbytes(rng.choice([0, 100, 4096, 9000, 70_000])))
        elif op < 0.5:
            fs.mkdir(ROOT_INO, f"d{rng.randrange(10**6)}")
        elif op < 0.7:
            name, ino = rng.choice(files)
            fs.write(ino, rng.randrange(20_000), rng.randbytes(rng.randrange(1, 30_000)))
        elif op < 0.85:
            name, _ = rng.choice(files)
            fs.unlink(parent, name)
        else:
            name, _ = rng.choice(files)
            fs.rename(parent, name, rng.choice(dirs), f"r{rng.randrange(10**6)}")
    vol.cp()


def stream(vol: Volume, snap: str, base: str | None = None,
           resume: str | None = None) -> bytes:
    return b"".join(image.send(vol, snap, base, resume))


def snapshot_forms(vol: Volume) -> dict[str, Form]:
    return {e.name: read_tree(FileSystem(vol, e.name)) for e in vol.snapshots.regular()}


def assert_mirrors(dst: Volume, src: Volume, snap: str) -> None:
    """`dst` shows snapshot `snap` of `src` and holds exactly the source's snapshots up to
    it, each equal to the source's."""
    top = src.snapshots.get(snap)
    want = {e.name for e in src.snapshots.regular() if e.cp_count <= top.cp_count}
    got = snapshot_forms(dst)
    assert set(got) == want
    for name in want:
        assert got[name] == read_tree(FileSystem(src, name)), f"snapshot {name} differs"
    assert read_tree(FileSystem(dst)) == got[snap]
    assert {e.name: e.guid for e in dst.snapshots.entries()} == {
        e.name: e.guid for e in src.snapshots.regular() if e.name in want}
    assert_fsck_clean(dst)


def test_full_then_many_incrementals() -> None:
    rng = random.Random(1)
    _, src = new_volume()
    _, dst = new_volume()
    last = None
    for k in range(14):
        mutate(src, rng)
        name = f"s{k}"
        snapshots.create(src, name)
        if k % 4 == 3:  # an older snapshot goes on the source: the mirror drops it
            old = [e.name for e in src.snapshots.regular() if e.name not in (last, name)]
            snapshots.delete(src, rng.choice(old))
        p = image.plan(src, name, last)
        data = stream(src, name, last)
        assert p.nbytes == len(data)
        result = image.receive(dst, [data])
        assert result.snapshot == name and result.base == last
        assert result.blocks == p.nblocks
        assert_mirrors(dst, src, name)
        assert_fsck_clean(src)
        last = name


def test_incremental_carries_only_the_changes() -> None:
    _, src = new_volume()
    _, dst = new_volume()
    fs = FileSystem(src)
    big = fs.create(ROOT_INO, "big")
    fs.write(big.ino, 0, bytes(range(256)) * 16 * 1000)  # 1000 blocks
    snapshots.create(src, "a")
    image.receive(dst, [stream(src, "a")])
    fs.write(big.ino, 4096 * 500, b"x" * 4096 * 10)  # 10 blocks change
    snapshots.create(src, "b")
    p = image.plan(src, "b", "a")
    # The 10 blocks, the path of indirect blocks above them, the inode file and the
    # metadata trees: a handful, not the whole file.
    assert 10 <= p.nblocks <= 30, p.nblocks
    image.receive(dst, [stream(src, "b", "a")])
    assert_mirrors(dst, src, "b")


def test_a_stream_carries_older_snapshots_and_base_may_be_older() -> None:
    rng = random.Random(2)
    _, src = new_volume()
    for k in range(4):
        mutate(src, rng)
        snapshots.create(src, f"s{k}")
    _, dst = new_volume()
    image.receive(dst, [stream(src, "s1")])  # s0 arrives with it
    assert_mirrors(dst, src, "s1")
    image.receive(dst, [stream(src, "s3", "s1")])  # s2 arrives with it
    assert_mirrors(dst, src, "s3")


def blocks_of(dev: MemoryDevice) -> dict[int, bytes]:
    return {v: dev.read(v) for v in dev.written_vbns()}


@pytest.fixture
def mirrored() -> Iterator[tuple[Volume, MemoryDevice, Volume]]:
    """A source with snapshots s0..s2 and a destination that received s0."""
    rng = random.Random(3)
    _, src = new_volume()
    for k in range(3):
        mutate(src, rng)
        snapshots.create(src, f"s{k}")
    dev, dst = new_volume()
    image.receive(dst, [stream(src, "s0")])
    yield src, dev, dst


def test_missing_base_is_refused_and_nothing_written(
        mirrored: tuple[Volume, MemoryDevice, Volume]) -> None:
    src, dev, dst = mirrored
    before = blocks_of(dev)
    with pytest.raises(VolumeError, match="does not hold the base snapshot 's1'"):
        image.receive(dst, [stream(src, "s2", "s1")])
    assert blocks_of(dev) == before
    with pytest.raises(VolumeError, match="already holds snapshot 's0'"):
        image.receive(dst, [stream(src, "s0")])
    with pytest.raises(VolumeError, match="not empty"):
        image.receive(dst, [stream(src, "s1")])
    assert blocks_of(dev) == before


def test_changed_destination_is_refused(
        mirrored: tuple[Volume, MemoryDevice, Volume]) -> None:
    src, dev, dst = mirrored
    fs = FileSystem(dst)
    fs.create(ROOT_INO, "local")
    dst.cp()
    before = blocks_of(dev)
    with pytest.raises(VolumeError, match=r"has changed since snapshot 's0'.*snap restore"):
        image.receive(dst, [stream(src, "s1", "s0")])
    assert blocks_of(dev) == before
    snapshots.restore(dst, "s0")
    image.receive(dst, [stream(src, "s1", "s0")])
    assert_mirrors(dst, src, "s1")


def test_destination_size() -> None:
    rng = random.Random(4)
    _, src = new_volume()
    mutate(src, rng)
    snapshots.create(src, "s")
    dev, small = new_volume(NBLOCKS // 2)
    before = blocks_of(dev)
    with pytest.raises(VolumeError, match="smaller than the source"):
        image.receive(small, [stream(src, "s")])
    assert blocks_of(dev) == before
    _, large = new_volume(NBLOCKS * 2)
    image.receive(large, [stream(src, "s")])
    assert_mirrors(large, src, "s")
    assert large.usage()["total"] == NBLOCKS * 2


def test_send_refuses_bad_requests(mirrored: tuple[Volume, MemoryDevice, Volume]) -> None:
    src, _, _ = mirrored
    with pytest.raises(SnapvolError, match="no snapshot named 'nope'"):
        image.plan(src, "nope")
    with pytest.raises(SnapvolError, match="not older"):
        image.plan(src, "s0", "s2")
    with pytest.raises(SnapvolError, match="not a valid resume token"):
        image.plan(src, "s1", "s0", "garbage")


def cut_receive(dst: Volume, data: bytes, at: int) -> None:
    with pytest.raises(StreamError, match="truncated"):
        image.receive(dst, [data[:at]])


def test_resume_after_a_cut(mirrored: tuple[Volume, MemoryDevice, Volume],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    src, _, dst = mirrored
    monkeypatch.setattr("snapvol.image.receiver.CHECKPOINT_BYTES", 4096)
    data = stream(src, "s2", "s0")
    cut_receive(dst, data, len(data) * 2 // 3)
    token = image.resume_token(dst)
    assert token is not None
    assert read_tree(FileSystem(dst)) == read_tree(FileSystem(src, "s0"))
    rest = stream(src, "s2", "s0", token)
    assert len(rest) < len(data)
    result = image.receive(dst, [rest])
    assert result.resumed and image.resume_token(dst) is None
    assert_mirrors(dst, src, "s2")


def test_a_failed_checkpoint_stops_the_receive(mirrored: tuple[Volume, MemoryDevice, Volume],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints run in a thread beside the transfer; a flush that fails there stops
    the receive with that error, and the destination keeps its previous state. A CP that
    failed to write leaves the open volume refusing further CPs (what it placed is not on
    disk); opened again, the destination resumes the receive."""
    src, dev, dst = mirrored
    monkeypatch.setattr("snapvol.image.receiver.CHECKPOINT_BYTES", 4096)
    before = read_tree(FileSystem(dst))
    flushes = 0
    real_flush = dst.dev.flush

    def failing_flush() -> None:
        nonlocal flushes
        if threading.current_thread().name == "snapvol-receive-checkpoint":
            flushes += 1
            if flushes == 2:
                raise OSError(5, "Input/output error")
        real_flush()

    monkeypatch.setattr(dst.dev, "flush", failing_flush)
    with pytest.raises(OSError, match="Input/output"):
        image.receive(dst, io.BytesIO(stream(src, "s2", "s0")))
    assert flushes == 2
    assert read_tree(FileSystem(dst)) == before
    with pytest.raises(VolumeError, match=r"writing a consistency point failed: Input/output"
                       r".*mount again"):
        dst.cp(force=True)
    dst.abandon()
    monkeypatch.setattr(dst.dev, "flush", real_flush)
    dst = Volume.on_device(dev)
    assert read_tree(FileSystem(dst)) == before
    image.receive(dst, [stream(src, "s2", "s0", image.resume_token(dst))])
    assert_mirrors(dst, src, "s2")


def test_a_second_stream_is_refused_while_one_is_partial(
        mirrored: tuple[Volume, MemoryDevice, Volume]) -> None:
    src, _, dst = mirrored
    data = stream(src, "s1", "s0")
    cut_receive(dst, data, len(data) - 10)
    with pytest.raises(VolumeError, match=r"partial receive of snapshot 's1'.*--abort"):
        image.receive(dst, [stream(src, "s2", "s0")])


def test_normal_use_during_a_partial_receive_keeps_the_pinned_blocks(
        mirrored: tuple[Volume, MemoryDevice, Volume]) -> None:
    src, dev, dst = mirrored
    data = stream(src, "s2", "s0")
    cut_receive(dst, data, len(data) - 100)
    pinned = dst.alloc.pinned.members() if dst.alloc else np.zeros(0)
    assert pinned.size
    written = {int(v): dev.read(int(v)) for v in pinned[:2000]}
    dst.close()
    dst = Volume.on_device(dev)  # reopened: the pin comes back from the root record
    with pytest.raises(SnapvolError, match="has a partial receive"):
        snapshots.create(dst, "x")  # its plane would hold the receive state's blocks
    fs = FileSystem(dst)
    for i in range(30):  # enough writes to wrap the allocator if pins were ignored
        st = fs.create(ROOT_INO, f"local{i}")
        fs.write(st.ino, 0, bytes([i]) * 40_000)
        dst.cp()
    assert {v: dev.read(v) for v in written} == written
    assert_fsck_clean(dst)
    token = image.resume_token(dst)
    assert token is not None
    with pytest.raises(VolumeError, match="has changed since snapshot 's0'"):
        image.receive(dst, [stream(src, "s2", "s0", token)])
    snapshots.restore(dst, "s0")
    assert_fsck_clean(dst)  # the receive state survives the restore
    token = image.resume_token(dst)
    assert token is not None
    image.receive(dst, [stream(src, "s2", "s0", token)])
    assert_mirrors(dst, src, "s2")


def test_abort_frees_the_pinned_blocks(mirrored: tuple[Volume, MemoryDevice, Volume]) -> None:
    src, _, dst = mirrored
    free = dst.usage()["free"]
    state = read_tree(FileSystem(dst))
    data = stream(src, "s2", "s0")
    cut_receive(dst, data, len(data) // 2)
    assert dst.usage()["free"] < free
    image.abort(dst)
    assert image.resume_token(dst) is None
    assert dst.usage()["free"] == free
    assert read_tree(FileSystem(dst)) == state
    assert_fsck_clean(dst)
    with pytest.raises(VolumeError, match="no partial receive"):
        image.abort(dst)
    image.receive(dst, [data])
    assert_mirrors(dst, src, "s2")


def test_readers_see_the_old_state_or_the_new_one(tmp_path: Path) -> None:
    """Readers open the destination image (shared lock) while a receive runs in the
    same process; each sees the old snapshot or the new one, whole."""
    rng = random.Random(5)
    src_path, dst_path = tmp_path / "src.img", tmp_path / "dst.img"
    src = Volume.create(src_path, NBLOCKS * 4096)
    mutate(src, rng, 30)
    snapshots.create(src, "a")
    mutate(src, rng, 30)
    snapshots.create(src, "b")
    old, new = read_tree(FileSystem(src, "a")), read_tree(FileSystem(src, "b"))
    Volume.create(dst_path, NBLOCKS * 4096).close()
    dst = image.open_for_receive(str(dst_path))
    image.receive(dst, [stream(src, "a")])
    seen: list[str] = []

    def look(done: int, total: int) -> None:
        reader = Volume.open(dst_path, writable=False)
        try:
            tree = read_tree(FileSystem(reader))
        finally:
            reader.close()
        assert tree in (old, new)
        seen.append("old" if tree == old else "new")

    import snapvol.image.receiver as receiver

    saved = receiver.CHECKPOINT_BYTES
    receiver.CHECKPOINT_BYTES = 8192
    try:
        data = stream(src, "b", "a")
        image.receive(dst, (data[i : i + 20_000] for i in range(0, len(data), 20_000)), look)
    finally:
        receiver.CHECKPOINT_BYTES = saved
    look(0, 0)
    assert seen[0] == "old" and seen[-1] == "new" and len(seen) > 3
    dst.close()
    src.close()


# ---- interrupted and damaged streams: every one refused, then resumed or aborted ----------
class Case:
    """One source with snapshots and a destination device that holds `s0`, shared by the
    damaged-stream cases (each works on its own copy of the destination)."""

    def __init__(self) -> None:
        rng = random.Random(6)
        _, self.src = new_volume()
        for k in range(3):
            mutate(self.src, rng, 20)
            snapshots.create(self.src, f"s{k}")
        self.dev, dst = new_volume()
        image.receive(dst, [stream(self.src, "s0")])
        dst.close()
        self.streams = {"full": stream(self.src, "s2"),
                        "incremental": stream(self.src, "s2", "s0")}
        self.before = self.forms(Volume.on_device(self.dev.snapshot()))
        self.after = {n: f for n, f in snapshot_forms(self.src).items()}

    @staticmethod
    def forms(vol: Volume) -> tuple[Form, dict[str, Form]]:
        return read_tree(FileSystem(vol)), snapshot_forms(vol)


@pytest.fixture(scope="module")
def case() -> Case:
    return Case()


def _target(case: Case, kind: str) -> tuple[Volume, tuple[Form, dict[str, Form]]]:
    if kind == "full":
        _, vol = new_volume()
        return vol, Case.forms(vol)
    return Volume.on_device(case.dev.snapshot()), case.before


@pytest.mark.parametrize("seed", range(220))
def test_damaged_streams_are_refused_then_resumed_or_aborted(case: Case, seed: int) -> None:
    rng = random.Random(seed)
    kind = "incremental" if seed % 3 else "full"
    base = "s0" if kind == "incremental" else None
    data = case.streams[kind]
    dst, before = _target(case, kind)
    free = dst.usage()["free"]
    if seed % 2:
        bad = data[: rng.randrange(len(data))]
    else:
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        bad = bytes(flipped)
    # Half the cases read the stream as a raw file (records read into their own
    # buffers), half as chunks fed to the decoder.
    source = (io.BytesIO(bad) if (seed // 2) % 2
              else (bad[i : i + 50_000] for i in range(0, len(bad), 50_000)))
    with pytest.raises(StreamError):
        image.receive(dst, source)
    assert Case.forms(dst) == before  # refused: the previous state, whole
    token = image.resume_token(dst)
    if token is not None and rng.random() < 0.3:
        image.abort(dst)
        assert Case.forms(dst) == before and dst.usage()["free"] == free
        token = None
    rest = stream(case.src, "s2", base, token)
    result: ReceiveResult = image.receive(dst, [rest])
    assert result.resumed == (token is not None)
    active, snaps = Case.forms(dst)
    assert active == case.after["s2"]
    assert snaps == case.after
    if seed % 20 == 0:
        assert_fsck_clean(dst)


def test_receive_takes_any_chunking() -> None:
    """The receive engine fed the stream a byte at a time, then in random pieces."""
    rng = random.Random(8)
    _, src = new_volume()
    mutate(src, rng, 6)
    snapshots.create(src, "a")
    mutate(src, rng, 6)
    snapshots.create(src, "b")
    full, inc = stream(src, "a"), stream(src, "b", "a")
    _, dst = new_volume()
    image.receive(dst, (full[i : i + 1] for i in range(len(full))))
    assert_mirrors(dst, src, "a")
    cuts = sorted(rng.sample(range(1, len(inc)), 200))
    pieces = [inc[a:b] for a, b in zip([0, *cuts], [*cuts, len(inc)], strict=True)]
    image.receive(dst, pieces)
    assert_mirrors(dst, src, "b")


def test_restored_blocks_need_the_held_snapshot() -> None:
    """After a restore to s0 on the source, s2's blocks come back from s0, not from the
    base s1: the increment leaves them out, so the destination must hold s0."""
    rng = random.Random(9)
    _, src = new_volume()
    mutate(src, rng, 10)
    snapshots.create(src, "s0")
    mutate(src, rng, 10)
    snapshots.create(src, "s1")
    snapshots.restore(src, "s0")
    mutate(src, rng, 3)
    snapshots.create(src, "s2")
    p = image.plan(src, "s2", "s1")
    assert [i.required for i in p.items if i.entry.name == "s0"] == [True]
    _, dst = new_volume()
    image.receive(dst, [stream(src, "s1")])
    image.receive(dst, [stream(src, "s2", "s1")])
    assert_mirrors(dst, src, "s2")
    _, lacking = new_volume()
    image.receive(lacking, [stream(src, "s1")])
    snapshots.delete(lacking, "s0")
    with pytest.raises(VolumeError, match="lacks snapshot 's0'"):
        image.receive(lacking, [stream(src, "s2", "s1")])


def test_a_held_snapshot_the_destination_deleted_stays_away() -> None:
    """A held snapshot the destination deleted is not brought back, and is not reported
    as dropped: `dropped` names only snapshots the destination held."""
    rng = random.Random(10)
    _, src = new_volume()
    for k in range(3):
        mutate(src, rng, 8)
        snapshots.create(src, f"s{k}")
    _, dst = new_volume()
    image.receive(dst, [stream(src, "s1")])
    snapshots.delete(dst, "s0")
    result = image.receive(dst, [stream(src, "s2", "s1")])
    assert result.dropped == ()
    assert {e.name for e in dst.snapshots.entries()} == {"s1", "s2"}
    assert read_tree(FileSystem(dst)) == read_tree(FileSystem(src, "s2"))
    assert_fsck_clean(dst)


def test_a_shadow_base_over_sends_and_marks_the_destination_updating() -> None:
    """A shadow snapshot (its blocks reusable) as BASE: the increment may carry blocks the
    destination has (never fewer than needed); the receive is flagged as updating the
    current state (R6) and the destination ends equal to the source."""
    rng = random.Random(11)
    _, src = new_volume()
    mutate(src, rng, 15)
    snapshots.create(src, "s0")
    _, dst = new_volume()
    image.receive(dst, [stream(src, "s0")])
    snapshots.create(src, "mark", shadow=True, source="s0")
    snapshots.delete(src, "s0")  # its blocks may now be reused
    for _ in range(3):
        mutate(src, rng, 15)
    snapshots.create(src, "s1")
    p = image.plan(src, "s1", "mark")
    assert p.header.shadow_base
    data = stream(src, "s1", "mark")
    cut_receive(dst, data, len(data) - 50)
    with pytest.raises(VolumeError, match="cannot be aborted, only finished"):
        image.abort(dst)
    assert dst.updating
    for snap in (None, *[e.name for e in dst.snapshots.entries() if not e.shadow]):
        with pytest.raises(SnapvolError, match="cannot be read until it completes"):
            FileSystem(dst, snap)  # not readable until the transfer completes
    token = image.resume_token(dst)
    flags: list[bool] = []
    result = image.receive(dst, [stream(src, "s1", "mark", token)],
                           lambda done, total: flags.append(dst.updating))
    assert flags and all(flags[:-1]) and not dst.updating
    assert result.dropped == ("s0",)  # the destination's copy of the shadowed base
    assert_mirrors(dst, src, "s1")


def test_the_mirror_sends_onward() -> None:
    """A destination takes snapshots after the received ones in CP order and serves as
    the source of a further mirror."""
    rng = random.Random(12)
    _, src = new_volume()
    for _ in range(30):  # the source's CP count runs well ahead of the mirror's
        mutate(src, rng, 2)
    snapshots.create(src, "a")
    _, mid = new_volume()
    image.receive(mid, [stream(src, "a")])
    mutate(mid, rng, 5)
    snapshots.create(mid, "local")
    assert [e.name for e in mid.snapshots.entries()] == ["a", "local"]
    _, far = new_volume()
    image.receive(far, [stream(mid, "a")])
    image.receive(far, [stream(mid, "local", "a")])
    assert read_tree(FileSystem(far)) == read_tree(FileSystem(mid, "local"))
    assert_fsck_clean(far)
    assert_fsck_clean(mid)


def test_crashes_during_a_receive() -> None:
    """Power lost at many points of an incremental receive (pending writes kept, dropped
    or torn): the image always opens clean and shows the old snapshot, and the transfer
    resumes (or restarts) from there to an identical mirror. (The switch's root is the
    last write, so an armed crash always falls before it.)"""
    from snapvol.device import CrashPoint, FaultyDevice

    rng = random.Random(13)
    _, src = new_volume()
    mutate(src, rng, 20)
    snapshots.create(src, "old")
    mutate(src, rng, 20)
    snapshots.create(src, "new")
    full, inc = stream(src, "old"), stream(src, "new", "old")
    old_tree = read_tree(FileSystem(src, "old"))
    base = MemoryDevice(NBLOCKS)
    Volume.format(base)
    image.receive(Volume.on_device(base), [full])

    def fresh() -> FaultyDevice:
        dev = FaultyDevice(NBLOCKS, seed=len(seen))
        for v in base.written_vbns():
            dev.write(v, base.read(v))
        dev.flush()
        dev.writes_total = 0
        return dev

    seen: list[str] = []
    probe = fresh()
    image.receive(Volume.on_device(probe), [inc])
    total = probe.writes_total
    for n in sorted({*range(0, total, max(1, total // 40)), total - 1}):
        dev = fresh()
        dev.arm(n)
        with pytest.raises(CrashPoint):
            image.receive(Volume.on_device(dev), [inc])
        vol = Volume.on_device(dev.crash())
        assert_fsck_clean(vol)
        assert read_tree(FileSystem(vol)) == old_tree
        token = image.resume_token(vol)
        seen.append("resumed" if token else "restarted")
        image.receive(vol, [stream(src, "new", "old", token)])
        assert_mirrors(vol, src, "new")
    assert {"resumed", "restarted"} <= set(seen), seen  # after and before the pin's CP
