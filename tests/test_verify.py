"""`snapvol verify`: same snapshot or not, by the checksum tree.

A match is decided by the root pointers alone (one comparison whatever the data size);
a difference is found by descending only where pointers differ and is reported by path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from snapvol.cli.main import main
from snapvol.engine import snapshots
from snapvol.engine.volume import Volume
from snapvol.fs import FileSystem


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ex:
        main(list(args))
    out = capsys.readouterr()
    return int(ex.value.code or 0), out.out, out.err


def make(path: Path, files: int, size: int) -> None:
    with Volume.create(path, 64 << 20) as vol:
        fs = FileSystem(vol)
        fs.makedirs(b"/d/e")
        for i in range(files):
            fs.write_file(f"/d/e/f{i}".encode(), bytes([i % 251]) * size)
        snapshots.create(vol, "s1")


@pytest.mark.parametrize("size", [1000, 400_000])
def test_match_costs_one_comparison(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    size: int) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make(a, 20, size)
    shutil.copyfile(a, b)
    code, out, _ = run(capsys, "verify", str(a), str(b), "--json")
    result = json.loads(out)
    assert code == 0 and result["same"]
    assert result["pointers_compared"] == 1 and result["blocks_read"] == 0
    code, out, _ = run(capsys, "verify", f"{a}@s1", str(b))
    assert code == 0 and out.startswith("same:")


def test_difference_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make(a, 30, 9000)
    shutil.copyfile(a, b)
    with Volume.open(b) as vol:
        fs = FileSystem(vol)
        fs.write(fs.resolve(b"/d/e/f7"), 5000, b"changed")
        fs.write_file(b"/d/new", b"new file")
    code, out, _ = run(capsys, "verify", str(a), str(b), "--json")
    result = json.loads(out)
    assert code == 1 and not result["same"]
    by_path = {d["path"]: d for d in result["differences"]}
    assert by_path["/d/e/f7"]["what"] == ["mtime_ns", "ctime_ns", "data"]
    assert by_path["/d/new"]["change"] == "only in destination"
    assert "/d/e/f8" not in by_path
    # The snapshot both hold is still the same (found in b by GUID).
    code, out, _ = run(capsys, "verify", f"{a}@s1", str(b))
    assert code == 0, out
    code, out, _ = run(capsys, "verify", str(a), str(b))
    assert code == 1 and "different:" in out and "/d/e/f7 (mtime_ns, ctime_ns, data)" in out


def test_snapshot_found_by_guid_not_name(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make(a, 3, 100)
    shutil.copyfile(a, b)
    with Volume.open(b) as vol:
        snapshots.rename(vol, "s1", "renamed")
        FileSystem(vol).write_file(b"/later", b"x")
        snapshots.create(vol, "s1")  # same name, different content and GUID
    code, out, _ = run(capsys, "verify", f"{a}@s1", str(b), "--json")
    assert code == 0 and json.loads(out)["destination"]["snapshot"] == "renamed"
    code, out, _ = run(capsys, "verify", f"{a}@s1", f"{b}@s1")
    assert code == 1 and "only in destination: /later" in out


def test_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = tmp_path / "a.img"
    make(a, 1, 10)
    code, _, err = run(capsys, "verify", f"{a}@nope", str(a))
    assert code == 2 and "no snapshot named 'nope'" in err
    code, _, err = run(capsys, "verify", str(a), str(tmp_path / "missing.img"))
    assert code == 2 and err.startswith("snapvol: error:")
    with Volume.open(a) as vol:
        snapshots.create(vol, "x", shadow=True)
    code, _, err = run(capsys, "verify", f"{a}@x", str(a))
    assert code == 2 and "shadow snapshot" in err


def flip_byte_of(path: Path, file: bytes, indirect: bool = False) -> int:
    """Flip one byte of the first data block of `file` (or its top indirect block) in the
    image: a block rotted on disk. Returns its VBN."""
    with Volume.open(path, writable=False) as vol:
        tree = vol.active.node(FileSystem(vol).resolve(file)).tree
        vbn = int(tree.top[0]["vbn"]) if indirect else tree.data_ptr(0)[0]
    with open(path, "r+b") as f:
        f.seek(vbn * 4096 + 10)
        byte = f.read(1)[0]
        f.seek(vbn * 4096 + 10)
        f.write(bytes([byte ^ 0x40]))
    return int(vbn)


def test_without_deep_trees_are_compared_not_media(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A flipped byte on one side: the trees still match (say so), --deep finds the
    block and the file that uses it, in text and JSON (issue 10 item 5)."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make(a, 20, 9000)
    shutil.copyfile(a, b)
    vbn = flip_byte_of(b, b"/d/e/f7")
    code, out, _ = run(capsys, "verify", str(a), str(b))
    assert code == 0
    assert "trees compared, not media" in out and "--deep reads and checks every block" in out
    code, out, _ = run(capsys, "verify", str(a), str(b), "--deep")
    assert code == 1, out
    assert f"damaged: {b} (active): block {vbn} fails its checksum" in out
    assert "(used by /d/e/f7)" in out
    assert "their trees are the same, but 1 block(s) on the media do not hold" in out
    code, out, _ = run(capsys, "verify", f"{a}@s1", str(b), "--deep", "--json")
    result = json.loads(out)
    assert code == 1 and not result["same"] and result["trees_same"] and result["deep"]
    assert result["media"]["source"]["damaged_blocks"] == 0
    damaged = result["media"]["destination"]["damaged"]
    assert [(d["vbn"], d["used_by"]) for d in damaged] == [(vbn, ["/d/e/f7"])]
    assert result["media"]["source"]["blocks_checked"] > 20 * 3


def test_deep_on_intact_replicas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make(a, 20, 9000)
    shutil.copyfile(a, b)
    code, out, _ = run(capsys, "verify", str(a), str(b), "--deep")
    assert code == 0, out
    assert out.startswith("same:") and "every block read and its digest checked" in out


def test_help_says_what_is_compared(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "verify", "--help")
    assert code == 0
    text = " ".join(out.split())
    assert "this compares trees, not media" in text and "--deep" in text


def test_deep_goes_on_past_a_damaged_indirect_block(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make(a, 5, 400_000)  # 98 blocks each: a tree with an indirect block
    shutil.copyfile(a, b)
    bad_indirect = flip_byte_of(b, b"/d/e/f1", indirect=True)
    bad_data = flip_byte_of(b, b"/d/e/f3")
    code, out, _ = run(capsys, "verify", str(a), str(b), "--deep", "--json")
    media = json.loads(out)["media"]["destination"]
    assert code == 1
    assert {d["vbn"] for d in media["damaged"]} == {bad_indirect, bad_data}
    assert media["blocks_checked"] > 4 * 98  # the other files were read all the same
