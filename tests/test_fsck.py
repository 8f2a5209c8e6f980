"""fsck on damaged volumes (issue 10): it reports every problem it can reach and never
stops at the first (item 18), its walk is bounded whatever the pointers say (item 8), a
damaged root slot is said by opening, `info` and fsck (item 7), and the online check runs
beside the mount's requests on a committed root it holds (item 15)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_fsck_clean, new_memory_volume
from fusemount import mounted_volume, needs_fuse
from snapvol.engine import snapshots
from snapvol.engine.blockio import BlockIO
from snapvol.engine.fsck import Pacer, Target, check, check_root, check_target
from snapvol.engine.metafile import load_plane
from snapvol.engine.volume import Volume, read_root_slots
from snapvol.errors import VolumeError
from snapvol.fs import FileSystem
from snapvol.layout.constants import (
    BLOCK_SIZE,
    FIRST_DATA_VBN,
    INOMAP_INO,
    ROOT_INO,
    ROOT_SLOT_VBNS,
)
from snapvol.layout.pointer import PTR_DTYPE
from snapvol.layout.records import RootRecord
from test_cli import COMMAND, run

BS = BLOCK_SIZE


def flip(image: Path, vbn: int, offset: int = 100) -> None:
    with open(image, "r+b") as f:
        f.seek(vbn * BS + offset)
        byte = f.read(1)
        f.seek(vbn * BS + offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def slot_counts(image: Path) -> dict[int, int]:
    with open(image, "rb") as f:
        out = {}
        for vbn in ROOT_SLOT_VBNS:
            f.seek(vbn * BS)
            out[vbn] = RootRecord.decode(f.read(BS)).cp_count
    return out


def fsck_cli(image: Path, timeout: float = 60) -> tuple[int, str, list[str]]:
    """Run `snapvol fsck --json`; (exit code, stdout+stderr, problems). A walk that does
    not end is a failure (timeout), never a hang of the test run."""
    proc = subprocess.run([*COMMAND, "fsck", "--json", str(image)], capture_output=True,
                          text=True, timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr
    problems = json.loads(proc.stdout)["problems"] if proc.stdout.startswith("{") else []
    return proc.returncode, proc.stdout + proc.stderr, problems


def assert_reported(image: Path, *words: str) -> list[str]:
    """fsck exits 1, lists problems containing `words`, and never says to run fsck."""
    code, out, problems = fsck_cli(image)
    assert code == 1, out
    assert problems, out
    for word in words:
        assert any(word in p for p in problems), (word, problems)
    assert "snapvol fsck" not in out and "run fsck" not in out, out
    return problems


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    """An image with 20 files in two directories, a snapshot and a later change."""
    path = tmp_path / "v.img"
    vol = Volume.create(path, 32 << 20)
    fs = FileSystem(vol)
    for d in ("a", "b"):
        fs.mkdir(ROOT_INO, d.encode())
        for i in range(10):
            fs.write_file(f"/{d}/f{i}", bytes([i]) * (3000 + i * 700))
    fs.setxattr(fs.resolve("/a/f1"), b"user.tag", b"v" * 100)
    snapshots.create(vol, "s1")
    fs.write_file("/late", b"written after the snapshot")
    vol.close()
    return path


def metadata_vbns(image: Path) -> dict[str, int]:
    with Volume.open(image, writable=False) as vol:
        r = vol.root
        fs = FileSystem(vol)
        return {
            "inode map": vol.active.node(INOMAP_INO).tree.data_ptr(0)[0],
            "active plane": r.active_plane.ptr.vbn,
            "summary plane": r.summary_plane.ptr.vbn,
            "snapshot table": r.snap_table.ptr.vbn,
            "inode file": vol.active.itree.data_ptr(1)[0],
            "directory": vol.active.node(fs.resolve("/a")).tree.data_ptr(1)[0],
            "xattrs": vol.active.node(vol.active.node(fs.resolve("/a/f1"))
                                      .inode.xattr_ino).tree.data_ptr(0)[0],
        }


# ---- item 18: fsck reports instead of giving up -------------------------------------------

@pytest.mark.parametrize(("part", "says"), [
    ("inode map", "inode map block 0 is damaged"),
    ("active plane", "active plane unreadable"),
    ("summary plane", "summary plane unreadable"),
    ("snapshot table", "the snapshots in slots 0..7 are not checked"),
    ("inode file", "inode file block 1 is damaged"),
    ("directory", "directory"),
    ("xattrs", "checksum mismatch"),
])
def test_fsck_reports_a_damaged_metadata_block(volume: Path, part: str, says: str) -> None:
    vbn = metadata_vbns(volume)[part]
    flip(volume, vbn)
    problems = assert_reported(volume, says, f"block {vbn}: checksum mismatch")
    if part in ("active plane", "summary plane"):
        assert any("rebuild" in p for p in problems), problems
    # Everything else is still checked: the other directory's files, the snapshot.
    assert not any("/b" in p for p in problems)


def test_fsck_goes_on_past_many_problems(volume: Path) -> None:
    """Damage in several places at once: each is listed."""
    vbns = metadata_vbns(volume)
    for part in ("inode map", "active plane", "directory"):
        flip(volume, vbns[part])
    problems = assert_reported(volume, "inode map block 0", "active plane unreadable",
                               f"block {vbns['directory']}")
    assert len(problems) >= 3


def test_other_commands_point_at_fsck_and_fsck_opens_anyway(volume: Path) -> None:
    flip(volume, metadata_vbns(volume)["active plane"])
    proc = run("ls", volume, code=2)
    assert b"run 'snapvol fsck'" in proc.stderr
    assert_reported(volume, "active plane")


# ---- item 8: the walk is bounded ----------------------------------------------------------

def test_a_pointer_dag_that_would_take_forever_is_reported(tmp_path: Path) -> None:
    """An inode of height 4 whose 8 top pointers lead to one level-4 block whose 256
    pointers all lead to one level-3 block, and so on down: 8 * 256**4 paths to one data
    block, all checksums right. Each block is claimed once; the rest is reported as
    cross-links and not followed again, so the check ends at once."""
    image = tmp_path / "dag.img"
    vol = Volume.create(image, 16 << 20)
    fs = FileSystem(vol)
    ino = fs.create(ROOT_INO, b"d").ino
    fs.write(ino, 0, b"x" * BS)
    vol.cp()
    vbn, csum = vol.active.node(ino).tree.data_ptr(0)
    for level in range(1, 5):
        node = np.zeros(256, dtype=PTR_DTYPE)
        node[:] = (vbn, csum)
        ino = fs.create(ROOT_INO, f"level{level}".encode()).ino
        fs.write(ino, 0, node.tobytes())
        vol.cp()
        vbn, csum = vol.active.node(ino).tree.data_ptr(0)
    victim = vol.active.node(fs.create(ROOT_INO, b"victim").ino)
    victim.inode.height = 4
    victim.inode.ptrs[:] = (vbn, csum)
    victim.inode.size = 1 << 45
    vol.active.mark_dirty(victim)
    vol.close()
    problems = assert_reported(image, "reachable twice")
    assert any(f"inode {victim.inode.ino}" in p for p in problems), problems


def test_a_directory_whose_size_is_huge_is_reported(tmp_path: Path) -> None:
    image = tmp_path / "dir.img"
    vol = Volume.create(image, 16 << 20)
    fs = FileSystem(vol)
    d = vol.active.node(fs.mkdir(ROOT_INO, b"d").ino)
    fs.write_file("/d/x", b"1")
    vol.cp()
    d.inode.size = 1 << 50  # 2**38 fbns that are neither tree nor free
    vol.active.mark_dirty(d)
    vol.close()
    assert_reported(image, f"directory {d.inode.ino}: directory: {(1 << 38) - 2} fbns "
                           "neither in the tree nor free")


def test_out_of_range_pointers_are_reported_and_not_followed(tmp_path: Path) -> None:
    image = tmp_path / "range.img"
    vol = Volume.create(image, 16 << 20)
    fs = FileSystem(vol)
    node = vol.active.node(fs.create(ROOT_INO, b"f").ino)
    fs.write(node.inode.ino, 0, b"y" * (3 * BS))
    vol.cp()
    node.inode.ptrs[1] = (vol.nblocks + 100, 1)
    node.inode.ptrs[2] = (1, 1)  # a root slot
    vol.active.mark_dirty(node)
    vol.close()
    assert_reported(image, f"pointer to VBN {4096 + 100}, outside the data area",
                    "pointer to VBN 1, outside")


# ---- item 7: a damaged root slot is said -------------------------------------------------

def test_a_damaged_newest_root_slot_is_said_and_healed(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    image = tmp_path / "v.img"
    vol = Volume.create(image, 16 << 20)
    fs = FileSystem(vol)
    fs.write_file("/a", b"older")
    vol.cp()
    older = vol.root.cp_count
    fs.write_file("/a", b"newer")
    vol.close()
    counts = slot_counts(image)
    newest = max(counts, key=lambda v: counts[v])
    assert counts[newest] == older + 1
    flip(image, newest, offset=40)
    with caplog.at_level(logging.WARNING, logger="snapvol.engine"), \
            Volume.open(image) as vol:
        assert vol.root.cp_count == older  # invariant 2: the valid slot with the higher CP
        assert FileSystem(vol).read_file("/a") == b"older"
        warning = vol.root_warning
        assert warning is not None
        for words in (f"root slot {newest} holds CP {older + 1} but fails its check",
                      f"CP {older} was opened instead", "a crash while",
                      f"the changes of CP {older + 1} are lost"):
            assert words in warning, warning
        assert check(vol).problems == [warning]
        FileSystem(vol).write_file("/c", b"after")
        vol.cp()  # written to the damaged slot: healed, and no longer said
        assert vol.root_warning is None
        assert check(vol).clean
    assert any(warning in r.getMessage() for r in caplog.records)
    with Volume.open(image) as vol:  # the next CP rewrote the slot
        assert vol.root_warning is None
        assert_fsck_clean(vol)


def test_damage_to_the_older_root_slot_is_an_fsck_problem(tmp_path: Path) -> None:
    image = tmp_path / "v.img"
    vol = Volume.create(image, 16 << 20)
    FileSystem(vol).write_file("/a", b"1")
    vol.close()
    counts = slot_counts(image)
    oldest = min(counts, key=lambda v: counts[v])
    flip(image, oldest, offset=3000)
    problems = assert_reported(image, f"root slot {oldest} (the older CP {counts[oldest]}) "
                                      "fails its check", "nothing is lost")
    assert len(problems) == 1


def test_a_wiped_newest_root_slot_is_said(tmp_path: Path) -> None:
    image = tmp_path / "v.img"
    vol = Volume.create(image, 16 << 20)
    FileSystem(vol).write_file("/a", b"1")
    vol.close()
    counts = slot_counts(image)
    newest = max(counts, key=lambda v: counts[v])
    with open(image, "r+b") as f:
        f.seek(newest * BS)
        f.write(bytes(BS))
    assert_reported(image, f"root slot {newest} is all zeros",
                    f"CP {counts[newest] - 1} was opened instead")


def test_the_cli_says_which_cp_it_opened(tmp_path: Path) -> None:
    image = tmp_path / "v.img"
    run("create", image, "--size", "16M")
    (tmp_path / "f").write_bytes(b"data")
    run("put", image, tmp_path / "f", "/")
    counts = slot_counts(image)
    newest = max(counts, key=lambda v: counts[v])
    flip(image, newest, offset=40)
    proc = run("ls", image)  # a read works, and says what it read
    err = proc.stderr.decode()
    assert err.startswith("snapvol: warning: ") and err.count("\n") == 1, err
    assert f"CP {counts[newest] - 1} was opened instead" in err
    facts = json.loads(run("info", image, "--json").stdout)
    assert f"CP {counts[newest] - 1} was opened instead" in facts["root_warning"]
    assert [s["state"] for s in facts["root_slots"]].count("damaged") == 1
    assert "root record" in run("info", image).stdout.decode()
    assert_reported(image, f"root slot {newest} holds CP {counts[newest]}")


# ---- item 15: the online check ------------------------------------------------------------

def test_a_held_committed_root_survives_changes_that_reuse_blocks() -> None:
    """The online check reads a committed root off the mutex while the volume goes on:
    the hold keeps every block of that root from being handed out again, so the check
    finds it whole though CPs free its blocks meanwhile. Without the hold the same
    changes reuse them (the allocator is sent back to the lowest free blocks after each
    CP, the worst case for a reader of an older root)."""
    def churn(vol: Volume, rounds: int) -> None:
        fs = FileSystem(vol)
        for rnd in range(rounds):
            for i in range(6):
                fs.write_file(f"/f{i}", bytes([rnd]) * (5 * BS))
            vol.cp()
            assert vol.alloc is not None
            vol.alloc.cursor = FIRST_DATA_VBN

    for held in (True, False):
        _, vol = new_memory_volume(384)
        churn(vol, 7)
        old = load_plane(vol.io, vol.root.active_plane, vol.nblocks)
        assert vol.alloc is not None
        handed: list[np.ndarray] = []
        alloc = vol.alloc.alloc

        def recording(n: int, alloc: Callable[[int], np.ndarray] = alloc,
                      handed: list[np.ndarray] = handed) -> np.ndarray:
            vbns = alloc(n)
            handed.append(vbns.copy())
            return vbns

        vol.alloc.alloc = recording  # type: ignore[method-assign]
        if held:
            with vol.hold_committed() as root:
                _, slots = read_root_slots(vol.dev, vol.sb, vol.path)
                view = Target(vol.path, BlockIO(vol.dev), vol.nblocks, root, slots)
                churn(vol, 3)
                assert check_target(view).clean
            assert not old.test_many(np.concatenate(handed)).any()
            churn(vol, 7)  # the space the hold kept is free again
            assert_fsck_clean(vol)
        else:
            churn(vol, 3)
            assert old.test_many(np.concatenate(handed)).any()
        vol.close()


def test_check_root_checks_a_given_root_on_its_own_descriptor(volume: Path) -> None:
    """The online checker's entry: the root record it is given, read without the lock a
    mount holds; a record of another volume is refused."""
    with Volume.open(volume) as vol:  # holds the exclusive lock, as a mount does
        report = check_root(str(volume), vol.root.encode(), Pacer(1.0))
        assert report.clean, report.problems
        assert report.stats["snapshots"] == 1
        other = RootRecord(vol.root.cp_count, 0, bytes(16), vol.nblocks,
                           *vol.root.trees[:4])
        with pytest.raises(VolumeError, match="not this volume's"):
            check_root(str(volume), other.encode())


def test_the_pacer_keeps_work_to_its_share() -> None:
    pacer = Pacer(0.5, quantum=0.0)
    for _ in range(3):
        pacer()
    assert pacer.slept > 0
    full = Pacer(1.0, quantum=0.0)
    full()
    assert full.slept == 0
    with pytest.raises(ValueError):
        Pacer(0)


@needs_fuse
def test_a_mount_answers_while_its_online_check_runs(tmp_path: Path) -> None:
    """`fsck --online` checks in a process of its own: a listing in the mount is answered
    while the check still runs (slowed to 2 % of the time here, so it surely does)."""
    with mounted_volume(tmp_path) as m:
        for d in range(4):
            (m.path / f"d{d}").mkdir()
            for i in range(300):
                (m.path / f"d{d}" / f"f{i}").write_bytes(os.urandom(100 + i))
        logs = list(Path(m.env["SNAPVOL_RUN_DIR"]).glob("*.log"))
        assert len(logs) == 1
        proc = subprocess.Popen([*COMMAND, "fsck", "--online", "--share", "0.02",
                                 str(m.image)], env=m.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while "online check of CP" not in logs[0].read_text():
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
            listed = sorted(os.listdir(m.path / "d2"))
            assert len(listed) == 300
            assert (m.path / "d3" / "f7").read_bytes()
            during = ": clean in" not in logs[0].read_text()  # the check has not ended
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0 and "clean" in out, out + err
        assert during, "the check ended before the listing was answered"
        facts = json.loads(m.snapvol("info", "--json", str(m.image)).stdout)
        assert facts["root_warning"] is None
