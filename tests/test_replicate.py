"""`snapvol replicate`: a mirror kept current by repeated runs.

Between runs the source changes at random (files written, rewritten, renamed, deleted;
user snapshots taken and deleted). After every run the destination's active tree and
every snapshot equal the source's (matched by GUID), fsck is clean on both, both hold
exactly one replication snapshot (the same one), and no user snapshot was touched.
Interrupted transfers (streams cut at random offsets) are finished by the next run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import assert_fsck_clean, read_tree
from snapvol.cli.main import main
from snapvol.engine import snapshots
from snapvol.engine.volume import Volume
from snapvol.errors import FsError
from snapvol.fs import FileSystem
from snapvol.image.receiver import open_for_receive, receive, resume_token
from snapvol.image.replicate import ReplicateError, replicate
from snapvol.image.sender import plan, stream_plan
from snapvol.streams.imagestream import StreamError

SIZE = 32 << 20


def change(path: Path, rng: random.Random, user_snaps: list[str]) -> None:
    with Volume.open(path) as vol:
        fs = FileSystem(vol)
        if not fs.listdir(b"/"):
            fs.makedirs(b"/d")
        if b"e" not in fs.listdir(b"/d"):
            fs.mkdir(fs.resolve(b"/d"), b"e")
        for _ in range(rng.randrange(1, 6)):
            d = rng.choice([b"/d", b"/d/e"] if b"e" in fs.listdir(b"/d") else [b"/d"])
            names = sorted(fs.listdir(d))
            op = rng.random()
            try:
                if op < 0.4 or not names:
                    fs.write_file(d + f"/f{rng.randrange(1000)}".encode(),
                                  rng.randbytes(rng.randrange(0, 60_000)))
                elif op < 0.6:
                    ino = fs.resolve(d + b"/" + rng.choice(names))
                    if not fs.getattr(ino).is_dir:
                        fs.write(ino, rng.randrange(0, 30_000), rng.randbytes(3000))
                elif op < 0.8:
                    fs.rename(fs.resolve(d), rng.choice(names), fs.resolve(b"/d"),
                              f"r{rng.randrange(1000)}".encode())
                else:
                    name = rng.choice(names)
                    if not fs.getattr(fs.resolve(d + b"/" + name)).is_dir:
                        fs.unlink(fs.resolve(d), name)
            except FsError as err:
                assert err.errno in (17, 21, 22, 39), err  # exists, is a dir, ...
        if rng.random() < 0.3:
            name = f"user{rng.randrange(1 << 20)}"
            snapshots.create(vol, name)
            user_snaps.append(name)
        if user_snaps and rng.random() < 0.2:
            snapshots.delete(vol, user_snaps.pop(rng.randrange(len(user_snaps))))


def assert_mirror(src: Path, dst: Path, user_snaps: list[str]) -> None:
    with Volume.open(src, writable=False) as a, Volume.open(dst, writable=False) as b:
        assert read_tree(FileSystem(a)) == read_tree(FileSystem(b))
        sa = {e.guid: e for e in a.snapshots.regular()}
        sb = {e.guid: e for e in b.snapshots.regular()}
        assert sorted(e.name for e in sa.values()) == sorted(e.name for e in sb.values())
        for guid, e in sa.items():
            assert read_tree(FileSystem(a, e.name)) == read_tree(FileSystem(b, sb[guid].name))
        for vol in (a, b):
            replicas = [e.name for e in vol.snapshots.entries() if e.replica]
            assert len(replicas) == 1, replicas
        assert sorted(e.name for e in a.snapshots.regular() if not e.replica) == sorted(
            user_snaps)
        assert_fsck_clean(a)
        assert_fsck_clean(b)


def test_many_runs_keep_the_mirror_equal(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    Volume.create(src, SIZE).close()
    rng = random.Random(11)
    user: list[str] = []
    change(src, rng, user)
    first = replicate(str(src), str(dst), create=True)
    assert first.base is None and first.blocks > 0
    assert_mirror(src, dst, user)
    for _ in range(8):
        change(src, rng, user)
        r = replicate(str(src), str(dst))
        assert r.base is not None and len(r.retired) == 2  # one old replica on each side
        assert_mirror(src, dst, user)
    # An unchanged source moves almost nothing.
    r = replicate(str(src), str(dst))
    assert r.blocks < 20, r
    assert_mirror(src, dst, user)


def _interrupt(src: Path, dst: Path, cut: float) -> tuple[str, bool]:
    """What a replicate run stopped mid-transfer leaves: a replication snapshot on SRC
    and a partial receive of it on DST (the stream cut at fraction `cut`). A cut before
    the stream's selection plane ended is refused outright: then there is no partial
    receive (the second value)."""
    with Volume.open(dst, writable=False) as d:
        target = d.sb.uuid
    with Volume.open(src) as vol:
        base = next(e.name for e in vol.snapshots.entries() if e.replica)
        name = f"replica-cut-{cut}"
        snapshots.create(vol, name, replica_for=target)
        data = b"".join(stream_plan(vol, plan(vol, name, base)))
    d = open_for_receive(str(dst))
    try:
        with pytest.raises(StreamError):
            receive(d, [data[: int(len(data) * cut)]])
        partial = resume_token(d) is not None
    finally:
        d.close()
    return name, partial


@pytest.mark.parametrize("seed", range(8))
def test_interrupted_runs_resume(tmp_path: Path, seed: int) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    Volume.create(src, SIZE).close()
    rng = random.Random(seed)
    user: list[str] = []
    change(src, rng, user)
    replicate(str(src), str(dst), create=True)
    for _ in range(2):
        for _ in range(3):
            change(src, rng, user)
        name, partial = _interrupt(src, dst, rng.uniform(0.0, 1.0))
        change(src, rng, user)
        r = replicate(str(src), str(dst))
        assert r.resumed == (name if partial else None) and r.discarded is None
        assert_mirror(src, dst, user)


def test_unfinishable_partial_receive_is_discarded(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    Volume.create(src, SIZE).close()
    rng = random.Random(2)
    user: list[str] = []
    change(src, rng, user)
    replicate(str(src), str(dst), create=True)
    change(src, rng, user)
    name, partial = _interrupt(src, dst, 0.9)
    assert partial
    with Volume.open(src) as vol:
        snapshots.delete(vol, name)
    r = replicate(str(src), str(dst))
    assert r.discarded == name and r.resumed is None
    assert_mirror(src, dst, user)


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, other = tmp_path / "src.img", tmp_path / "other.img"
    Volume.create(src, SIZE).close()
    with pytest.raises(ReplicateError, match="does not exist: add --create"):
        replicate(str(src), str(tmp_path / "new.img"))
    with pytest.raises(ReplicateError, match="same image"):
        replicate(str(src), str(src))
    with Volume.create(other, SIZE) as vol:
        FileSystem(vol).write_file(b"/mine", b"not a mirror")
    with pytest.raises(ReplicateError, match="not a mirror"):
        replicate(str(src), str(other))
    with pytest.raises(SystemExit) as ex:
        main(["replicate", str(src), str(tmp_path / "m.img"), "--create", "--json"])
    assert ex.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["base"] is None and out["snapshot"].startswith("replica-")
    with pytest.raises(SystemExit) as ex:
        main(["replicate", str(src), str(other)])
    assert ex.value.code == 2
    assert "not a mirror" in capsys.readouterr().err


def _replicas(path: Path) -> dict[str, str | None]:
    with Volume.open(path, writable=False) as vol:
        return {i.name: i.replica_for for i in snapshots.infos(vol) if i.replica}


def _uuid(path: Path) -> str:
    with Volume.open(path, writable=False) as vol:
        return vol.sb.uuid_str


def test_failback_keeps_a_snapshot_taken_only_on_the_old_primary(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 10 item 2: prod diverged from its mirror; the user keeps the divergent writes
    in a snapshot, rolls prod back to the common snapshot and fails back from the mirror.
    The receive refuses to drop that snapshot (it was taken on prod and never came from
    the mirror) and changes nothing; with --drop-local it goes, and is reported."""
    prod, mirror = tmp_path / "prod.img", tmp_path / "mirror.img"
    with Volume.create(prod, SIZE) as vol:
        FileSystem(vol).write_file(b"/data", b"common" * 1000)
    replicate(str(prod), str(mirror), create=True)
    with Volume.open(mirror) as vol:  # failover: the mirror takes writes
        FileSystem(vol).write_file(b"/data", b"mirror" * 1000)
    with Volume.open(prod) as vol:  # prod took writes too before it went down
        common = next(e.name for e in vol.snapshots.entries() if e.replica)
        FileSystem(vol).write_file(b"/data", b"unreplicated" * 1000)
        snapshots.create(vol, "keep-my-writes")
        snapshots.restore(vol, common)
    with Volume.open(mirror, writable=False) as vol:
        mirror_snaps = sorted(e.name for e in vol.snapshots.entries())
    with pytest.raises(SystemExit) as ex:
        main(["replicate", str(mirror), str(prod)])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'keep-my-writes'" in err and "--drop-local" in err
    with Volume.open(prod, writable=False) as vol:  # nothing changed on either side
        assert FileSystem(vol, "keep-my-writes").read_file(b"/data") == b"unreplicated" * 1000
        assert not vol.snapshots.get("keep-my-writes").received
    with Volume.open(mirror, writable=False) as vol:
        assert sorted(e.name for e in vol.snapshots.entries()) == mirror_snaps
    # The user copies out what they need, then asks for the drop explicitly.
    with pytest.raises(SystemExit) as ex:
        main(["replicate", str(mirror), str(prod), "--drop-local", "--json"])
    assert ex.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dropped"] == ["keep-my-writes"] and out["base"] == common
    with Volume.open(prod, writable=False) as vol:
        assert FileSystem(vol).read_file(b"/data") == b"mirror" * 1000
        assert vol.snapshots.find("keep-my-writes") is None
        assert_fsck_clean(vol)
    # Back to prod -> mirror: it starts from the failback's snapshot, which the mirror
    # made for prod; that one is retired too, so each side keeps one replication snapshot.
    failback = out["snapshot"]
    with Volume.open(prod) as vol:
        FileSystem(vol).write_file(b"/data", b"prod again" * 1000)
    r = replicate(str(prod), str(mirror))
    assert r.base == failback and failback in r.retired and not r.dropped
    for path in (prod, mirror):
        assert list(_replicas(path).values()) == [_uuid(mirror)]
    r = replicate(str(prod), str(mirror))
    assert r.base is not None and not r.dropped
    with Volume.open(mirror, writable=False) as vol:
        assert FileSystem(vol).read_file(b"/data") == b"prod again" * 1000
        assert_fsck_clean(vol)


def test_a_second_destination_does_not_break_the_first(tmp_path: Path) -> None:
    """Issue 10 item 3: each destination has its own replication snapshot (its volume
    UUID in the entry, its short form in the name), so a -> b, a -> c, a -> b, a -> c are
    all incremental after the first of each, and both mirrors equal the source."""
    a, b, c = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "c.img"
    Volume.create(a, SIZE).close()
    rng = random.Random(5)
    user: list[str] = []
    change(a, rng, user)
    assert replicate(str(a), str(b), create=True).base is None
    change(a, rng, user)
    assert replicate(str(a), str(c), create=True).base is None
    for dst in (b, c, b, c):
        change(a, rng, user)
        r = replicate(str(a), str(dst))
        assert r.base is not None and r.base.startswith(f"replica-{_uuid(dst)[:8]}-"), r
        with Volume.open(a, writable=False) as va, Volume.open(dst, writable=False) as vd:
            assert read_tree(FileSystem(va, r.snapshot)) == read_tree(FileSystem(vd))
        assert_fsck_clean_path(dst)
    # The source keeps exactly one replication snapshot per destination.
    assert sorted(_replicas(a).values()) == sorted([_uuid(b), _uuid(c)])
    # Renamed, a replication snapshot is still recognised by the UUID in its entry.
    old = next(n for n, t in _replicas(a).items() if t == _uuid(b))
    with Volume.open(a) as vol:
        snapshots.rename(vol, old, "renamed-mirror-point")
    change(a, rng, user)
    r = replicate(str(a), str(b))
    assert r.base == "renamed-mirror-point" and "renamed-mirror-point" in r.retired
    assert sorted(_replicas(a).values()) == sorted([_uuid(b), _uuid(c)])
    for dst in (b, c):
        with pytest.raises(SystemExit) as ex:
            main(["verify", str(a) + "@" + next(
                n for n, t in _replicas(a).items() if t == _uuid(dst)), str(dst)])
        assert ex.value.code == 0


def assert_fsck_clean_path(path: Path) -> None:
    with Volume.open(path, writable=False) as vol:
        assert_fsck_clean(vol)
