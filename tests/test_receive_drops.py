"""What a receive drops from the destination's table, and what it refuses to drop.

The destination's table becomes the stream's, so its snapshots the stream does not bring
go. One it received (the source deleted it since) goes and is named in the text and the
`--json`; one taken on the destination itself is never dropped without `--drop-local`:
the receive refuses, with one line naming it and the way out, before anything changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_fsck_clean, read_tree
from snapvol.cli.main import main
from snapvol.engine import snapshots
from snapvol.engine.volume import Volume
from snapvol.fs import FileSystem


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ex:
        main(list(args))
    out = capsys.readouterr()
    code = ex.value.code
    assert isinstance(code, int)
    return code, out.out, out.err


def send(capsys: pytest.CaptureFixture[str], src: Path, snap: str, out: Path,
         base: str | None = None) -> Path:
    code, _, err = cli(capsys, "send", str(src), snap, "-o", str(out),
                       *(["--base", base] if base else []))
    assert code == 0, err
    return out


@pytest.fixture
def volumes(tmp_path: Path) -> tuple[Path, Path]:
    """A source with snapshots s0, s1, s2 (one file changed before each)."""
    src = tmp_path / "src.img"
    with Volume.create(src, 32 << 20) as vol:
        fs = FileSystem(vol)
        for k in range(3):
            fs.write_file(f"/f{k}".encode(), bytes([65 + k]) * 20_000)
            snapshots.create(vol, f"s{k}")
    return src, tmp_path / "dst.img"


def test_snapshots_the_source_deleted_are_dropped_and_named(
        volumes: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
        ) -> None:
    src, dst = volumes
    code, _, err = cli(capsys, "receive", str(dst), "--create", "-i",
                       str(send(capsys, src, "s1", tmp_path / "full")))
    assert code == 0, err
    with Volume.open(src) as vol:
        snapshots.delete(vol, "s0")
    code, out, err = cli(capsys, "receive", str(dst), "--json", "-i",
                         str(send(capsys, src, "s2", tmp_path / "inc", base="s1")))
    assert code == 0, err
    assert json.loads(out)["dropped"] == ["s0"]
    with Volume.open(dst, writable=False) as vol:
        assert sorted(e.name for e in vol.snapshots.entries()) == ["s1", "s2"]
        assert_fsck_clean(vol)
    # The text names it as well.
    with Volume.open(src) as vol:
        FileSystem(vol).write_file(b"/f3", b"x" * 5000)
        snapshots.create(vol, "s3")
        snapshots.delete(vol, "s1")
    code, out, err = cli(capsys, "receive", str(dst), "-i",
                         str(send(capsys, src, "s3", tmp_path / "inc2", base="s2")))
    assert code == 0, err
    assert "dropped snapshot s1: the source does not hold it" in out
    code, out, _ = cli(capsys, "snap", "list", str(dst), "--json")
    assert code == 0 and [(r["name"], r["received"]) for r in json.loads(out)] == [
        ("s2", True), ("s3", True)]
    code, out, _ = cli(capsys, "snap", "list", "-v", str(src))  # -v: with the origin
    assert code == 0 and "here" in out and "received" not in out


def test_a_snapshot_taken_on_the_destination_is_dropped_only_when_asked(
        volumes: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
        ) -> None:
    src, dst = volumes
    code, _, err = cli(capsys, "receive", str(dst), "--create", "-i",
                       str(send(capsys, src, "s1", tmp_path / "full")))
    assert code == 0, err
    with Volume.open(dst) as vol:
        snapshots.create(vol, "mine")  # no change since s1: an increment still applies
        before = read_tree(FileSystem(vol, "mine"))
        root = vol.root
    inc = send(capsys, src, "s2", tmp_path / "inc", base="s1")
    code, out, err = cli(capsys, "receive", str(dst), "-i", str(inc))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "'mine'" in err and "--drop-local" in err
    with Volume.open(dst, writable=False) as vol:
        assert vol.root == root  # refused before anything changed
        assert read_tree(FileSystem(vol, "mine")) == before
    code, out, err = cli(capsys, "receive", str(dst), "--drop-local", "--json", "-i",
                         str(inc))
    assert code == 0, err
    assert json.loads(out)["dropped"] == ["mine"]
    with Volume.open(dst, writable=False) as vol:
        assert sorted(e.name for e in vol.snapshots.entries()) == ["s0", "s1", "s2"]
        assert all(e.received for e in vol.snapshots.entries())
        assert_fsck_clean(vol)
