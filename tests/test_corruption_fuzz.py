"""Image corruption fuzzing: damage a volume that has snapshots, then run what a user runs.

Each case copies one pristine image, flips random bytes or zeroes whole blocks somewhere in
it, and runs `info`, `snap list`, `ls`, `cat`, `get` (of the active tree and of a snapshot)
and `fsck` against it, in process through the CLI's own entry point (the same error policy
as the `snapvol` command, without a process start per command). Every outcome must be one
of:

- a clean error: exit 2 and one line `snapvol: error: ...` on stderr, never an internal
  error or a traceback;
- a fsck report: exit 1 with the problems listed;
- correct data: exit 0 with exactly what the undamaged image gives.

and never a hang (each command has a time limit). Two cross-checks tie the answers
together: when the damage touched a block the volume uses (the superblock, a root slot, or
a block in the newest root's active or summary plane), fsck must not call the volume
clean; and when fsck calls it clean, every read must give the undamaged answer.

The pristine volume ends with two CPs that hold the same files, so falling back to the
older root slot (when the newest is damaged) gives the same trees: only fsck's verdict
tells the fallback apart, which is what it must report.

The default run takes a few hundred cases (seconds); `-m long` runs 100,000. A handful of
cases also mount the damaged image read-only and read every file through the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest
from click.testing import CliRunner

from fusemount import Mount, force_unmount, needs_fuse, run_env
from snapvol.cli.main import main
from snapvol.engine import snapshots
from snapvol.engine.volume import Volume
from snapvol.fs import FileSystem
from snapvol.layout.constants import BLOCK_SIZE, FIRST_DATA_VBN, ROOT_INO

VOLUME_BYTES = 2 << 20  # 512 blocks: small enough to copy per case, big enough for a tree
CASES = 300
LONG_CASES = 100_000
MOUNT_CASES = 8
COMMAND_SECONDS = 20


class Hang(BaseException):
    """A command ran past its time limit (a BaseException, so no `except Exception` in the
    code under test can swallow it)."""


@dataclass(frozen=True)
class Outcome:
    code: int
    out: bytes
    err: str


COMMANDS: dict[str, list[str]] = {
    "info": ["info", "{img}", "--json"],
    "snap list": ["snap", "list", "{img}", "--json"],
    "ls /": ["ls", "{img}", "/", "--json"],
    "ls -l /docs": ["ls", "{img}", "/docs", "-l"],
    "ls s1": ["ls", "{img}", "/docs", "--snapshot", "s1", "--json"],
    "cat big": ["cat", "{img}", "/big.bin"],
    "cat s1": ["cat", "{img}", "/docs/readme.txt", "--snapshot", "s1"],
    "get /": ["get", "{img}", "/", "{out}/active"],
    "get s2": ["get", "{img}", "/", "{out}/s2", "--snapshot", "s2"],
    "fsck": ["fsck", "{img}", "--json"],
}
# Fields of `info` that may differ when the older root slot is opened instead (same files).
INFO_VOLATILE = {"image", "cp_count", "last_cp_ns", "used", "free", "root_slots", "root_warning",
                 "opened_root"}


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang()


def run_cli(args: list[str]) -> Outcome:
    """`snapvol ARGS` in process: exit code, stdout bytes and stderr text."""
    runner = CliRunner()
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(COMMAND_SECONDS)
    code = 0
    try:
        with runner.isolation() as (out, err, _mixed):
            try:
                main(args)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 2
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
            stdout, stderr = out.getvalue(), err.getvalue().decode(errors="replace")
    except Hang:
        pytest.fail(f"snapvol {' '.join(args)}: no answer within {COMMAND_SECONDS} s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return Outcome(code, stdout, stderr)


def tree_of_dir(root: Path) -> dict[str, tuple[str, int, bytes]]:
    """A host tree as path -> (type, permission bits, content or link target)."""
    out: dict[str, tuple[str, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.fsencode(os.readlink(p)))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), b"")
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


def build_pristine(path: Path) -> None:
    """A volume with files, a directory tree, a symlink, xattrs, two snapshots and
    changes after each; it ends with two CPs that hold the same files."""
    rnd = random.Random(1)
    vol = Volume.create(path, VOLUME_BYTES)
    fs = FileSystem(vol)
    fs.makedirs("/docs/deep")
    fs.write_file("/docs/readme.txt", b"first version\n" * 20)
    fs.write_file("/docs/deep/notes.md", rnd.randbytes(9000))
    fs.write_file("/big.bin", rnd.randbytes(70 * 1024))
    fs.symlink(ROOT_INO, "link", "docs/readme.txt")
    fs.setxattr(fs.resolve("/docs/readme.txt"), "user.tag", b"blue")
    snapshots.create(vol, "s1")
    fs.write_file("/docs/readme.txt", b"second version\n" * 30)
    fs.write_file("/docs/new.txt", rnd.randbytes(5000))
    fs.remove_entry(fs.resolve("/docs/deep"), "notes.md")
    snapshots.create(vol, "s2")
    fs.write_file("/big.bin", rnd.randbytes(50 * 1024))
    fs.write_file("/late.txt", b"after the snapshots\n")
    vol.close()
    with Volume.open(path) as vol:
        vol.cp(force=True)  # the second of two CPs with the same files


def used_blocks(path: Path) -> set[int]:
    """Blocks the newest root uses: the superblock and root slots, and every block in
    its active or summary plane."""
    with Volume.open(path, writable=False) as vol:
        plane = vol.active_plane.copy()
        plane.set_many(vol.summary_plane.members())
        used = {int(v) for v in plane.members()}
    return used | set(range(FIRST_DATA_VBN))


@dataclass(frozen=True)
class Pristine:
    image: Path
    used: frozenset[int]
    outcomes: dict[str, Outcome]
    trees: dict[str, dict[str, tuple[str, int, bytes]]]


def run_all(image: Path, work: Path) -> tuple[dict[str, Outcome],
                                              dict[str, dict[str, tuple[str, int, bytes]]]]:
    outcomes: dict[str, Outcome] = {}
    trees: dict[str, dict[str, tuple[str, int, bytes]]] = {}
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    for name, template in COMMANDS.items():
        args = [a.format(img=image, out=work) for a in template]
        outcomes[name] = run_cli(args)
        if name.startswith("get") and outcomes[name].code == 0:
            trees[name] = tree_of_dir(Path(args[3]))
    return outcomes, trees


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    base = tmp_path_factory.mktemp("pristine")
    image = base / "vol.img"
    build_pristine(image)
    outcomes, trees = run_all(image, base / "out")
    for name, got in outcomes.items():
        assert got.code == 0, f"pristine {name}: exit {got.code}: {got.err}"
    assert json.loads(outcomes["fsck"].out)["clean"]
    return Pristine(image, frozenset(used_blocks(image)), outcomes, trees)


def damage(image: Path, rnd: random.Random) -> tuple[str, set[int]]:
    """Damage `image` in place; a description and the blocks touched."""
    nblocks = image.stat().st_size // BLOCK_SIZE
    touched: set[int] = set()
    parts = []
    with open(image, "r+b") as f:
        for _ in range(rnd.choice((1, 1, 1, 2, 3))):
            # Half the hits go to the metadata end of the volume (low VBNs, where the first
            # CPs put the trees), the rest anywhere.
            vbn = rnd.randrange(min(nblocks, 64)) if rnd.random() < 0.5 else (
                rnd.randrange(nblocks))
            touched.add(vbn)
            if rnd.random() < 0.3:
                f.seek(vbn * BLOCK_SIZE)
                f.write(bytes(BLOCK_SIZE))
                parts.append(f"zeroed block {vbn}")
            else:
                offset = rnd.randrange(BLOCK_SIZE)
                f.seek(vbn * BLOCK_SIZE + offset)
                old = f.read(1)[0]
                f.seek(vbn * BLOCK_SIZE + offset)
                f.write(bytes([old ^ (1 << rnd.randrange(8))]))
                parts.append(f"flipped a bit of byte {offset} of block {vbn}")
    return ", ".join(parts), touched


def same_answer(name: str, got: Outcome, want: Outcome,
                got_tree: dict[str, tuple[str, int, bytes]] | None,
                want_tree: dict[str, tuple[str, int, bytes]] | None) -> bool:
    if name == "info":
        a, b = json.loads(got.out), json.loads(want.out)
        return {k: v for k, v in a.items() if k not in INFO_VOLATILE} == {
            k: v for k, v in b.items() if k not in INFO_VOLATILE}
    if name.startswith("get"):
        return got_tree == want_tree
    return got.out == want.out


def check_case(pristine: Pristine, work: Path, seed: int) -> None:
    rnd = random.Random(seed)
    image = work / "vol.img"
    shutil.copyfile(pristine.image, image)
    what, touched = damage(image, rnd)
    label = f"case {seed} ({what})"
    outcomes, trees = run_all(image, work / "out")
    for name, got in outcomes.items():
        assert "Traceback" not in got.err, f"{label}: {name}: {got.err}"
        assert "internal error" not in got.err, f"{label}: {name}: {got.err}"
        allowed = (0, 1, 2) if name == "fsck" else (0, 2)
        assert got.code in allowed, f"{label}: {name}: exit {got.code}: {got.err}"
        if got.code == 2:
            lines = got.err.splitlines()
            assert lines and lines[-1].startswith("snapvol: error: "), (
                f"{label}: {name}: {got.err!r}")
    fsck = outcomes["fsck"]
    clean = fsck.code == 0
    if touched & pristine.used:
        assert not clean, (f"{label}: the damage hit blocks in use "
                           f"{sorted(touched & pristine.used)} but fsck says clean")
    for name, got in outcomes.items():
        if name == "fsck" or got.code != 0:
            if clean and name != "fsck":
                pytest.fail(f"{label}: fsck says clean but {name} failed: {got.err}")
            continue
        want = pristine.outcomes[name]
        assert same_answer(name, got, want, trees.get(name), pristine.trees.get(name)), (
            f"{label}: {name} exited 0 with an answer that differs from the undamaged "
            "image's")


def test_damaged_images_give_errors_reports_or_correct_data(pristine: Pristine,
                                                            tmp_path: Path) -> None:
    for seed in range(CASES):
        check_case(pristine, tmp_path, seed)


@pytest.mark.long
def test_damaged_images_long(pristine: Pristine, tmp_path: Path) -> None:
    for seed in range(CASES, CASES + LONG_CASES):
        check_case(pristine, tmp_path, seed)


def test_the_fuzzer_notices_damage(pristine: Pristine, tmp_path: Path) -> None:
    """The oracle is not blind: damage to a data block of /big.bin makes `cat` fail and
    fsck report it, and both are what check_case accepts."""
    image = tmp_path / "vol.img"
    shutil.copyfile(pristine.image, image)
    with Volume.open(image, writable=False) as vol:
        fs = FileSystem(vol)
        ino = fs.resolve("/big.bin")
        vbn, _csum = vol.active.node(ino).tree.data_ptr(3)
    assert vbn
    with open(image, "r+b") as f:
        f.seek(int(vbn) * BLOCK_SIZE + 100)
        f.write(b"\xff\x00\xff")
    cat = run_cli(["cat", str(image), "/big.bin"])
    assert cat.code == 2 and "checksum" in cat.err, cat.err
    fsck = run_cli(["fsck", str(image), "--json"])
    assert fsck.code == 1, fsck.err
    assert any(str(vbn) in p for p in json.loads(fsck.out)["problems"])


def mount_read(mnt: Path) -> Iterator[tuple[str, bytes | None]]:
    """Each file of a mount with its bytes, or None where the read failed with EIO."""
    for dirpath, _dirs, files in os.walk(mnt):
        for name in files:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            try:
                yield str(p.relative_to(mnt)), p.read_bytes()
            except OSError as e:
                assert e.errno == errno.EIO, f"{p}: {e}"
                yield str(p.relative_to(mnt)), None


@needs_fuse
def test_damaged_images_through_a_read_only_mount(pristine: Pristine, tmp_path: Path) -> None:
    want = {rel: data for rel, (kind, _perm, data) in pristine.trees["get /"].items()
            if kind == "file"}
    run_dir = tempfile.mkdtemp(prefix="svrun", dir="/tmp")  # short: unix socket paths
    try:
        for seed in range(MOUNT_CASES):
            rnd = random.Random(10_000 + seed)
            image = tmp_path / f"vol{seed}.img"
            shutil.copyfile(pristine.image, image)
            what, _touched = damage(image, rnd)
            m = Mount(image, tmp_path / f"mnt{seed}", run_env(run_dir))
            m.path.mkdir()
            proc = m.snapvol("mount", str(image), str(m.path), "--read-only", check=False)
            label = f"case {seed} ({what})"
            if proc.returncode != 0:
                assert proc.returncode == 2, f"{label}: mount: {proc.stderr}"
                assert proc.stderr.startswith("snapvol: error: "), f"{label}: {proc.stderr}"
                assert "internal error" not in proc.stderr, f"{label}: {proc.stderr}"
                continue
            try:
                for rel, data in mount_read(m.path):
                    if data is not None:
                        assert data == want.get(rel), f"{label}: {rel} read wrong bytes"
            finally:
                force_unmount(m)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
