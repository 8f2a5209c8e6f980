"""Levelled dumps and their restore: the reference's June schedule.

One snapshot a day, June1..June9, with files added, changed, renamed and deleted between
them; dumps at level 0 (June3), 1 (June5), 2 (June7) and 1 again (June9). Every valid
chain restores into a new image that equals the source at the chain's last snapshot, with
every snapshot it brought equal too; invalid orders and missing files are refused before
anything is written, naming the file at fault.
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
from snapvol.fs import FileSystem
from snapvol.image.dump import DumpError, restore

DUMPS = [("June3", 0, "j3.l0"), ("June5", 1, "j5.l1"), ("June7", 2, "j7.l2"),
         ("June9", 1, "j9.l1")]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ex:
        main(list(args))
    out = capsys.readouterr()
    return int(ex.value.code or 0), out.out, out.err


def change(fs: FileSystem, rng: random.Random) -> None:
    """A day of work: new files, rewrites, a rename and a delete."""
    names = sorted(fs.listdir(b"/d"))
    for _ in range(3):
        fs.write_file(f"/d/n{rng.randrange(1 << 30)}".encode(),
                      rng.randbytes(rng.randrange(0, 40_000)))
    if names:
        victim = rng.choice(names)
        ino = fs.resolve(b"/d/" + victim)
        fs.write(ino, rng.randrange(0, 20_000), rng.randbytes(5000))
        fs.rename(fs.resolve(b"/d"), rng.choice(names), fs.resolve(b"/d"),
                  f"r{rng.randrange(1 << 30)}".encode())
    names = sorted(fs.listdir(b"/d"))
    if len(names) > 4:
        fs.unlink(fs.resolve(b"/d"), rng.choice(names))


@pytest.fixture
def june(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A volume with June1..June9 and the four dumps in tmp_path."""
    src = tmp_path / "src.img"
    rng = random.Random(3)
    with Volume.create(src, 64 << 20) as vol:
        fs = FileSystem(vol)
        fs.makedirs(b"/d")
        for day in range(1, 10):
            change(fs, rng)
            snapshots.create(vol, f"June{day}")
    for snap, level, name in DUMPS:
        code, _, err = run(capsys, "dump", str(src), snap, "--level", str(level),
                           "-o", str(tmp_path / name))
        assert code == 0, err
    return tmp_path


def trees(path: Path) -> dict[str, object]:
    with Volume.open(path, writable=False) as vol:
        out: dict[str, object] = {e.name: read_tree(FileSystem(vol, e.name))
                                  for e in vol.snapshots.regular()}
        out["(active)"] = read_tree(FileSystem(vol))
        assert_fsck_clean(vol)
    return out


def test_catalog_lists_dumps_with_their_bases(june: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "dump", "--list", str(june / "src.img"), "--json")
    listed = json.loads(out)
    assert code == 0
    assert [(d["snapshot"], d["level"], d["base"]) for d in listed] == [
        ("June3", 0, None), ("June5", 1, "June3"), ("June7", 2, "June5"), ("June9", 1, "June3")]
    for d in listed:
        assert d["bytes"] == (june / dict((s, n) for s, _, n in DUMPS)[d["snapshot"]]
                              ).stat().st_size


@pytest.mark.parametrize("chain", [["j3.l0"], ["j3.l0", "j5.l1"], ["j3.l0", "j5.l1", "j7.l2"],
                                   ["j3.l0", "j9.l1"]])
def test_valid_chains_restore_the_source(june: Path, chain: list[str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    dst = june / "dst.img"
    code, out, err = run(capsys, "restore", str(dst), *[str(june / f) for f in chain],
                         "--create", "--json")
    assert code == 0, err
    last = {n: s for s, _, n in DUMPS}[chain[-1]]
    assert json.loads(out)["snapshot"] == last
    want, got = trees(june / "src.img"), trees(dst)
    day = int(last[4:])
    # The destination holds every snapshot up to the last one, each equal to the source's,
    # and its active file system is the last snapshot.
    assert sorted(k for k in got if k != "(active)") == sorted(f"June{d}" for d in
                                                              range(1, day + 1))
    for name, tree in got.items():
        assert tree == want[last if name == "(active)" else name], name
    code, out, _ = run(capsys, "verify", f"{june / 'src.img'}@{last}", str(dst))
    assert code == 0, out


def test_restore_onto_a_partial_chain(june: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A destination that already holds June5 takes the level-2 dump alone."""
    dst = june / "dst.img"
    assert run(capsys, "restore", str(dst), str(june / "j3.l0"), str(june / "j5.l1"),
               "--create")[0] == 0
    code, _, err = run(capsys, "restore", str(dst), str(june / "j7.l2"))
    assert code == 0, err
    assert trees(dst)["(active)"] == trees(june / "src.img")["June7"]


@pytest.mark.parametrize(("chain", "message"), [
    (["j5.l1", "j3.l0"], "j5.l1 (increment from 'June3' to 'June5') comes first, but "
                         "{d}/j3.l0 brings 'June3': put {d}/j3.l0 before it"),
    (["j3.l0", "j7.l2"], "missing the dump of snapshot 'June5'"),
    (["j3.l0", "j7.l2", "j5.l1"], "j7.l2 (increment from 'June5' to 'June7') comes before "
                                  "{d}/j5.l1, which brings 'June5'"),
    (["j3.l0", "j5.l1", "j9.l1"], "leave out {d}/j5.l1 or {d}/j9.l1"),
    (["j7.l2"], "missing the dump of snapshot 'June5'"),
    (["j3.l0", "j3.l0"], "both bring snapshot 'June3'"),
    (["j3.l0", "j5.l1", "j3.l0"], "both bring snapshot 'June3'"),
])
def test_invalid_chains_are_refused_before_writing(
        june: Path, chain: list[str], message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    dst = june / "dst.img"
    code, _, err = run(capsys, "restore", str(dst), *[str(june / f) for f in chain], "--create")
    assert code == 2
    assert err.startswith("snapvol: error: ")
    assert message.format(d=june) in err, err
    assert not dst.exists()  # nothing was made, let alone written


def test_damaged_dump_is_named_and_nothing_written(june: Path) -> None:
    bad = june / "bad.l1"
    data = bytearray((june / "j5.l1").read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    dst = june / "dst.img"
    assert restore(str(dst), [str(june / "j3.l0")], create=True)
    before = dst.read_bytes()
    with pytest.raises(DumpError, match=f"{bad} is not a usable dump"):
        restore(str(dst), [str(bad)], create=False)
    assert dst.read_bytes() == before
    with pytest.raises(DumpError, match="full dump: it restores into an empty volume"):
        restore(str(dst), [str(june / "j3.l0")], create=False)


def test_dump_errors(june: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = str(june / "src.img")
    code, _, err = run(capsys, "dump", src, "June9", "--level", "1", "-o", str(june / "j3.l0"))
    assert code == 2 and "already exists" in err
    code, _, err = run(capsys, "dump", src, "June9", "--level", "0", "-o", str(june / "x"),
                       "--list")
    assert code == 2 and "--list takes only IMAGE" in err
    with Volume.open(june / "src.img") as vol:
        snapshots.delete(vol, "June3")
    code, _, err = run(capsys, "dump", src, "June9", "--level", "1", "-o", str(june / "y"))
    assert code == 2 and "made of snapshot 'June3'" in err and "no longer holds" in err
    assert not (june / "y").exists()


def test_shadow_keeps_a_dump_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Deleting a dumped snapshot after keeping a shadow of it: the next level-1 dump is
    still an increment (a little larger), and the chain restores the source."""
    src = tmp_path / "src.img"
    rng = random.Random(5)
    with Volume.create(src, 64 << 20) as vol:
        fs = FileSystem(vol)
        fs.makedirs(b"/d")
        change(fs, rng)
        snapshots.create(vol, "a")
    assert run(capsys, "dump", str(src), "a", "--level", "0", "-o", str(tmp_path / "a.l0"))[0] == 0
    with Volume.open(src) as vol:
        snapshots.create(vol, "a.shadow", shadow=True, source="a")
        snapshots.delete(vol, "a")
        change(FileSystem(vol), rng)
        snapshots.create(vol, "b")
    code, out, err = run(capsys, "dump", str(src), "b", "--level", "1", "-o",
                         str(tmp_path / "b.l1"), "--json")
    assert code == 0, err
    assert json.loads(out)["base"] == "a"
    dst = tmp_path / "dst.img"
    code, _, err = run(capsys, "restore", str(dst), str(tmp_path / "a.l0"),
                       str(tmp_path / "b.l1"), "--create")
    assert code == 0, err
    assert trees(dst)["(active)"] == trees(src)["b"]
