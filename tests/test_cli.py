"""The `snapvol` command line, run as a real process: exit codes, output, JSON, and every
bad input getting one line `snapvol: error: ...`, exit 2, and a volume left as it was."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pty
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapvol.cli.sizes import human_size, parse_size
from snapvol.engine.fsck import check
from snapvol.engine.volume import Volume
from snapvol.fs import FileSystem
from snapvol.layout.constants import ROOT_INO
from test_copy import assert_same_tree, make_tree

MIB = 1 << 20
SCRIPT = Path(sys.executable).with_name("snapvol")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "snapvol.cli.main"]


# As root, "not root" is snapvol running as nobody. The interpreter may live where nobody
# cannot read (/root), so the process imports everything first and then drops privileges.
AS_NOBODY = [sys.executable, "-c", "import os, sys\n"
             "from snapvol.cli.main import main\n"
             "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
             "main(sys.argv[1:])"]


def run(*args: str | Path, cwd: Path | None = None, code: int | None = 0,
        command: list[str] = COMMAND) -> subprocess.CompletedProcess[bytes]:
    """Run snapvol; check the exit code (unless None) and that no traceback escaped."""
    proc = subprocess.run([*command, *map(str, args)], capture_output=True, cwd=cwd,
                          timeout=120)
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    if code is not None:
        assert proc.returncode == code, (
            f"snapvol {' '.join(map(str, args))}: exit {proc.returncode}\n"
            f"stdout: {proc.stdout.decode(errors='replace')}\n"
            f"stderr: {proc.stderr.decode(errors='replace')}")
    return proc


def fails(*args: str | Path, says: str, cwd: Path | None = None,
          command: list[str] = COMMAND) -> str:
    """Run a command that must fail: exit 2, one stderr line naming the problem."""
    proc = run(*args, code=2, cwd=cwd, command=command)
    err = proc.stderr.decode(errors="replace")
    assert err.startswith("snapvol: error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err!r}"
    assert says in err, f"{says!r} not in {err!r}"
    return err


def json_of(*args: str | Path) -> object:
    return json.loads(run(*args, "--json").stdout)


def image_digest(image: Path) -> str:
    return hashlib.sha256(image.read_bytes()).hexdigest()


def volume_state(image: Path) -> tuple[dict[bytes, tuple[int, int, bytes]], list[str]]:
    """The active tree (path -> mode, size, data) and the snapshot names; fsck must pass."""
    with Volume.open(image, writable=False) as vol:
        report = check(vol)
        assert report.clean, report.problems[:10]
        fs = FileSystem(vol)
        tree: dict[bytes, tuple[int, int, bytes]] = {}
        todo = [(b"", ROOT_INO)]
        while todo:
            path, ino = todo.pop()
            for name, child, _, _ in fs.iterdir(ino):
                st = fs.getattr(child)
                data = fs.read(child, 0, st.size) if stat.S_ISREG(st.mode) else b""
                tree[path + b"/" + name] = (st.mode, st.size, data)
                if st.is_dir:
                    todo.append((path + b"/" + name, child))
        return tree, [e.name for e in vol.snapshots.entries()]


def _host_files(where: Path) -> None:
    (where / "hello.txt").write_bytes(b"hello\n")
    (where / "docs").mkdir()
    (where / "docs" / "a.txt").write_bytes(b"a" * 5000)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Made once per module through the CLI; each test gets a copy (process starts cost)."""
    where = tmp_path_factory.mktemp("template")
    path = where / "vol.img"
    run("create", path, "--size", "32M")
    _host_files(where)
    run("put", path, where / "hello.txt")
    run("put", path, where / "docs", "/")
    run("snap", "create", path, "first")
    return path


@pytest.fixture
def image(template: Path, tmp_path: Path) -> Path:
    """A 32 MiB volume holding /hello.txt and /docs/a.txt, with snapshot `first`; the
    same files are on the host beside it."""
    path = tmp_path / "vol.img"
    shutil.copyfile(template, path)
    _host_files(tmp_path)
    return path


@pytest.fixture
def unchanged(image: Path) -> Iterator[None]:
    """The test's failing commands must leave the image byte for byte as it was."""
    before, state = image_digest(image), volume_state(image)
    yield
    assert image_digest(image) == before, "a failing command changed the image"
    assert volume_state(image) == state


# ---- sizes --------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "value"), [
    ("512M", 512 * MIB), ("4G", 4 << 30), ("2T", 2 << 40), ("16T", 16 << 40),
    ("1048576", MIB), ("4GiB", 4 << 30), ("4GB", 4 << 30), ("64k", 64 << 10),
    ("1.5G", 3 << 29), ("1P", 1 << 50), ("100B", 100), (" 8 MiB ", 8 * MIB),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "12Q", "M", "-4G", "1.5", "4iB", "4 G B", "0x10"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="bad size"):
        parse_size(text)


def test_human_size() -> None:
    assert human_size(0) == "0 B"
    assert human_size(1023) == "1023 B"
    assert human_size(1536) == "1.5 KiB"
    assert human_size(256 * MIB) == "256.0 MiB"
    assert human_size(16 << 40) == "16.0 TiB"


# ---- create and info --------------------------------------------------------------------------
def test_create_and_info(tmp_path: Path) -> None:
    path = tmp_path / "v.img"
    out = run("create", path, "--size", "256M").stdout.decode()
    assert "256.0 MiB" in out and path.stat().st_size == 256 * MIB
    facts = json_of("info", path)
    assert isinstance(facts, dict)
    assert facts["size"] == 256 * MIB and facts["format_version"] == 1
    # format writes CP 1 and CP 2 (the same state), so both root slots hold a record
    assert facts["cp_count"] == 2 and facts["snapshots"] == 0
    assert [s["state"] for s in facts["root_slots"]] == ["valid", "valid"]
    assert facts["root_warning"] is None
    assert facts["used"] + facts["free"] + facts["snapshot_only"] <= 256 * MIB
    assert len(str(facts["uuid"])) == 36 and str(facts["uuid"]) in out
    table = run("info", path).stdout.decode()
    for word in ("format version", "uuid", "256.0 MiB", "consistency points", "snapshots",
                 "held only by snapshots"):
        assert word in table


def test_create_refuses_bad_sizes_and_existing_files(tmp_path: Path) -> None:
    path = tmp_path / "v.img"
    fails("create", path, "--size", "12Q", says="'12Q'")
    fails("create", path, "--size", "lots", says="'lots'")
    fails("create", path, "--size", "100K", says="too small")
    fails("create", path, says="--size")
    assert not path.exists()
    run("create", path, "--size", "8M")
    before = image_digest(path)
    fails("create", path, "--size", "8M", says="already exists")
    assert image_digest(path) == before


def test_create_a_large_sparse_volume(tmp_path: Path) -> None:
    path = tmp_path / "big.img"
    run("create", path, "--size", "2T")
    assert path.stat().st_size == 2 << 40
    assert path.stat().st_blocks * 512 < 1 << 30  # sparse: the image costs little
    facts = json_of("info", path)
    assert isinstance(facts, dict) and facts["size"] == 2 << 40


# ---- snapshots --------------------------------------------------------------------------------
def test_snapshot_commands(image: Path, tmp_path: Path) -> None:
    snaps = json_of("snap", "list", image)
    assert isinstance(snaps, list) and [s["name"] for s in snaps] == ["first"]
    first = snaps[0]
    assert set(first) >= {"name", "guid", "cp_count", "created_ns", "reclaimable"}
    # only the snapshot's own metadata blocks: the active file system shares its data
    assert first["reclaimable"] < 64 * 1024
    run("rm", image, "/docs", "-r")
    snaps = json_of("snap", "list", image)
    assert isinstance(snaps, list) and snaps[0]["reclaimable"] >= first["reclaimable"] + 8192
    assert snaps[0]["reclaimable"] % 4096 == 0
    run("snap", "create", image, "second")
    run("snap", "rename", image, "second", "renamed")
    table = run("snap", "list", image).stdout.decode()
    assert "first" in table and "renamed" in table and "second" not in table
    assert first["guid"] not in table  # the GUID shows with -v (tests/test_listings.py)
    assert first["guid"] in run("snap", "list", "-v", image).stdout.decode()
    facts = json_of("info", image)
    assert isinstance(facts, dict) and facts["snapshots"] == 2
    assert facts["snapshot_only"] >= 8192
    out = run("snap", "delete", image, "first").stdout.decode()
    assert "freed" in out
    assert [s["name"] for s in json_of("snap", "list", image)] == ["renamed"]  # type: ignore[union-attr]
    run("snap", "restore", image, "renamed")
    assert run("ls", image).stdout.split() == [b"hello.txt"]


def test_restore_brings_back_the_old_tree(image: Path) -> None:
    run("rm", image, "/hello.txt")
    run("rm", image, "-r", "/docs")
    assert run("ls", image).stdout == b""
    run("snap", "restore", image, "first")
    assert run("ls", image).stdout.split() == [b"docs", b"hello.txt"]
    assert run("cat", image, "/docs/a.txt").stdout == b"a" * 5000
    volume_state(image)


@pytest.mark.parametrize(("args", "says"), [
    (("snap", "create", "{img}", "first"), "already exists"),
    (("snap", "create", "{img}", "a/b"), "cannot contain '/'"),
    (("snap", "create", "{img}", "x" * 256), "256 bytes, the limit is 255"),
    (("snap", "create", "{img}", ""), "empty"),
    (("snap", "create", "{img}", ".."), "invalid snapshot name"),
    (("snap", "delete", "{img}", "nope"), "no snapshot named 'nope'"),
    (("snap", "restore", "{img}", "nope"), "no snapshot named 'nope'"),
    (("snap", "rename", "{img}", "nope", "other"), "no snapshot named 'nope'"),
    (("snap", "rename", "{img}", "first", "a/b"), "cannot contain '/'"),
    (("ls", "{img}", "/", "--snapshot", "nope"), "no snapshot named 'nope'"),
    (("cat", "{img}", "/hello.txt", "-s", "nope"), "no snapshot named 'nope'"),
    (("get", "{img}", "/", "{tmp}/out", "-s", "nope"), "no snapshot named 'nope'"),
])
def test_bad_snapshot_names(image: Path, unchanged: None, args: tuple[str, ...],
                            says: str) -> None:
    fails(*(a.format(img=image, tmp=image.parent) for a in args), says=says)


def test_non_utf8_snapshot_name(image: Path, unchanged: None) -> None:
    proc = subprocess.run([*COMMAND, "snap", "create", os.fsencode(image), b"bad\xff"],
                          capture_output=True, timeout=60)
    assert proc.returncode == 2 and b"not valid UTF-8" in proc.stderr


# ---- files ----------------------------------------------------------------------------------
def test_put_get_ls_cat_rm(image: Path, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    out = run("put", image, tree, "/").stdout.decode()
    assert out.startswith("copied ") and "hard link" in out
    names = run("ls", image, "/tree").stdout.split(b"\n")
    assert b"caf\xe9-\xff.bin" in names and b"with space" in names
    entries = json_of("ls", image, "/tree")
    assert isinstance(entries, list)
    by_name = {os.fsencode(e["name"]): e for e in entries}
    assert by_name[b"caf\xe9-\xff.bin"]["type"] == "file"
    assert by_name[b"link-rel"]["type"] == "symlink"
    assert by_name[b"link-rel"]["target"] == "plain.txt"
    assert by_name[b"chardev"]["type"] == "char" and by_name[b"chardev"]["rdev"] == os.makedev(1, 3)
    assert by_name[b"fifo"]["type"] == "fifo" and by_name[b"socket"]["type"] == "socket"
    assert by_name[b"plain.txt"]["uid"] == 1234 and by_name[b"setuid"]["mode"] == 0o4755
    assert by_name[b"three"]["nlink"] == 3
    long = run("ls", image, "/tree", "-l").stdout
    assert b"lrwxrwxrwx" in long and b"link-rel -> plain.txt" in long
    assert b"-rwsr-xr-x" in long and b" 1, 3 " in long
    assert run("ls", image, "/tree/plain.txt").stdout == b"/tree/plain.txt\n"
    big = (tree / "big.bin").read_bytes()
    assert run("cat", image, "/tree/big.bin").stdout == big
    assert run("cat", image, "/tree/link-rel").stdout == b"hello, volume\n"
    assert run("cat", image, "/tree/empty").stdout == b""
    run("get", image, "/tree", tmp_path / "back")
    assert_same_tree(tree, tmp_path / "back")
    st = os.stat(tmp_path / "back" / "sparse.bin")
    assert st.st_blocks * 512 <= 64 * 1024
    # the snapshot taken before the put does not see the tree
    assert run("ls", image, "--snapshot", "first").stdout.split() == [b"docs", b"hello.txt"]
    run("rm", image, "/tree/plain.txt")
    run("rm", image, "/tree/link-dangling")
    run("rm", image, "/tree/fifo")
    run("rm", image, "-r", "/tree")
    assert run("ls", image).stdout.split() == [b"docs", b"hello.txt"]
    volume_state(image)


def test_put_file_to_a_new_name_and_get_from_a_snapshot(image: Path, tmp_path: Path) -> None:
    src = tmp_path / "v1.txt"
    src.write_bytes(b"version one")
    run("put", image, src, "/docs/note")
    run("snap", "create", image, "with-note")
    run("rm", image, "/docs/note")
    src.write_bytes(b"version two")
    run("put", image, src, "/docs/note")
    assert run("cat", image, "/docs/note").stdout == b"version two"
    assert run("cat", image, "/docs/note", "--snapshot", "with-note").stdout == b"version one"
    run("get", image, "/docs/note", tmp_path / "old", "--snapshot", "with-note")
    assert (tmp_path / "old").read_bytes() == b"version one"
    dest = tmp_path / "into"
    dest.mkdir()
    run("get", image, "/docs", dest)
    assert (dest / "docs" / "note").read_bytes() == b"version two"


@pytest.mark.parametrize(("args", "says"), [
    (("rm", "{img}", "/"), "root directory"),
    (("rm", "{img}", "/docs/.."), "root directory"),
    (("rm", "{img}", "-r", "/"), "root directory"),
    (("rm", "{img}", "/docs"), "use -r"),
    (("rm", "{img}", "/missing"), "missing"),
    (("rm", "{img}", "/docs/."), "refusing"),
    (("cat", "{img}", "/docs"), "is a directory"),
    (("cat", "{img}", "/missing"), "/missing: No such file"),
    (("ls", "{img}", "/missing"), "/missing: No such file"),
    (("ls", "{img}", "/hello.txt/x"), "Not a directory"),
    (("put", "{img}", "{tmp}/hello.txt"), "already exists"),
    (("put", "{img}", "{tmp}/hello.txt", "/hello.txt"), "already exists"),
    (("put", "{img}", "{tmp}/no-such-file"), "no-such-file: No such file"),
    (("put", "{img}", "{tmp}/hello.txt", "/no/such/dir/x"), "No such file"),
    (("put", "{img}", "{tmp}/hello.txt", "/" + "n" * 256), "name too long"),
    (("get", "{img}", "/missing", "{tmp}/out"), "/missing: No such file"),
    (("get", "{img}", "/hello.txt", "{tmp}/hello.txt"), "already exists"),
    (("get", "{img}", "/hello.txt", "{tmp}/no/such/dir"), "No such file"),
])
def test_bad_file_operations(image: Path, unchanged: None, args: tuple[str, ...],
                             says: str) -> None:
    fails(*(a.format(img=image, tmp=image.parent) for a in args), says=says)
    assert not (image.parent / "out").exists()


def test_get_as_a_user_who_is_not_root(image: Path) -> None:
    """Owners that cannot be set are skipped; a device node gives a clear error.

    As root the get runs as nobody; otherwise as the user running the tests."""
    root = os.geteuid() == 0
    command = AS_NOBODY if root else COMMAND
    shared = Path(tempfile.mkdtemp(prefix="snapvol-nonroot-"))
    try:
        shared.chmod(0o777)
        img = shared / "vol.img"
        shutil.copy(image, img)
        img.chmod(0o644)
        src = shared / "src"
        src.mkdir()
        (src / "owned").write_bytes(b"owned by someone")
        os.setxattr(src / "owned", "user.k", b"v")
        if root:
            os.chown(src / "owned", 1234, 5678)
        run("put", img, src, "/")
        with Volume.open(img) as vol:
            fs = FileSystem(vol)
            devs = fs.mkdir(ROOT_INO, "devs", 0o755).ino
            fs.mknod(devs, "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))

        run("get", img, "/src", shared / "out", command=command)
        out = shared / "out" / "owned"
        assert out.read_bytes() == b"owned by someone"
        assert os.getxattr(out, "user.k") == b"v"
        assert (out.stat().st_uid, out.stat().st_gid) == (
            (65534, 65534) if root else (os.geteuid(), os.getegid()))

        err = fails("get", img, "/devs", shared / "out2", says="device nodes can only be "
                    "made by root", command=command)
        assert "null" in err
        assert not (shared / "out2").exists()  # the partial copy was removed
    finally:
        shutil.rmtree(shared)


# ---- damaged, missing and locked images ----------------------------------------------------
def test_missing_and_foreign_images(tmp_path: Path) -> None:
    missing = tmp_path / "none.img"
    fails("info", missing, says=f"no such image: {missing}")
    fails("snap", "create", missing, "s", says="no such image")
    fails("put", missing, tmp_path, says="no such image")
    assert not missing.exists()
    fails("info", tmp_path, says="is a directory, not a volume image")
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(2 * MIB))
    before = image_digest(junk)
    fails("info", junk, says="not a snapvol volume")
    fails("snap", "create", junk, "s", says="not a snapvol volume")
    fails("put", junk, tmp_path / "junk.img", says="not a snapvol volume")
    assert image_digest(junk) == before
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    fails("ls", empty, says="empty.img")


def test_truncated_image(image: Path) -> None:
    with open(image, "r+b") as f:
        f.truncate(2 * MIB)
    before = image_digest(image)
    for args in (("info", image), ("ls", image), ("fsck", image),
                 ("snap", "create", image, "s"), ("rm", image, "/hello.txt")):
        fails(*args, says="is truncated")
    assert image_digest(image) == before


def test_corrupted_root_records(image: Path) -> None:
    with open(image, "r+b") as f:
        f.seek(4096)
        f.write(os.urandom(8192))
    before = image_digest(image)
    fails("info", image, says="no valid root record")
    fails("snap", "delete", image, "first", says="no valid root record")
    assert image_digest(image) == before


def test_corrupted_file_block(image: Path, tmp_path: Path) -> None:
    with Volume.open(image, writable=False) as vol:
        fs = FileSystem(vol)
        vbn, _ = fs.image.node(fs.resolve("/docs/a.txt")).tree.data_ptr(0)
    with open(image, "r+b") as f:
        f.seek(vbn * 4096)
        f.write(b"\xee" * 4096)
    before = image_digest(image)
    fails("cat", image, "/docs/a.txt", says=f"block {vbn}: checksum mismatch")
    fails("get", image, "/docs", tmp_path / "out", says="checksum mismatch")
    assert not (tmp_path / "out").exists()
    assert run("cat", image, "/hello.txt").stdout == b"hello\n"  # the rest still reads
    proc = run("fsck", image, code=1)
    assert b"checksum mismatch" in proc.stdout
    report = json_of_code("fsck", image, code=1)
    assert report["clean"] is False and len(report["problems"]) >= 1
    assert image_digest(image) == before


def json_of_code(*args: str | Path, code: int) -> dict[str, object]:
    value = json.loads(run(*args, "--json", code=code).stdout)
    assert isinstance(value, dict)
    return value


def test_fsck(image: Path) -> None:
    out = run("fsck", image).stdout.decode()
    assert "clean" in out
    report = json_of_code("fsck", image, code=0)
    assert report["clean"] is True and report["problems"] == []
    assert isinstance(report["stats"], dict)


HOLDER = """
import sys
from snapvol.engine.volume import Volume
vol = Volume.open(sys.argv[1], writable=sys.argv[2] == "rw")
print("ready", flush=True)
sys.stdin.read()
vol.close()
"""


def hold(image: Path, mode: str) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(image), mode],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    return child


def release(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    child.stdin.close()
    assert child.wait(timeout=60) == 0


def test_locked_by_a_writer(image: Path, tmp_path: Path) -> None:
    before, state = image_digest(image), volume_state(image)
    child = hold(image, "rw")
    try:
        says = f"in use by process {child.pid}"
        fails("snap", "create", image, "x", says=says)
        fails("put", image, tmp_path / "hello.txt", "/again", says=says)
        fails("rm", image, "/hello.txt", says=says)
        fails("info", image, says=says)
        fails("ls", image, says=says)
        fails("fsck", image, says=says)
    finally:
        release(child)
    assert volume_state(image) == state
    assert image_digest(image) == before


def test_readers_run_beside_each_other(image: Path, tmp_path: Path) -> None:
    child = hold(image, "ro")
    try:
        assert run("cat", image, "/hello.txt").stdout == b"hello\n"
        run("info", image)
        run("snap", "list", image)
        run("fsck", image)
        run("get", image, "/docs", tmp_path / "copy")
        before = image_digest(image)
        fails("snap", "create", image, "x", says=f"in use by process {child.pid}")
        assert image_digest(image) == before
    finally:
        release(child)


# ---- a full volume ----------------------------------------------------------------------------
def test_full_volume_fails_cleanly_and_snapshot_delete_frees_space(tmp_path: Path) -> None:
    img = tmp_path / "small.img"
    run("create", img, "--size", "4M")
    (tmp_path / "keep.txt").write_bytes(b"keep me")
    (tmp_path / "held.bin").write_bytes(os.urandom(1536 * 1024))
    run("put", img, tmp_path / "keep.txt")
    run("put", img, tmp_path / "held.bin")
    run("snap", "create", img, "s0")
    run("rm", img, "/held.bin")  # its blocks now live only in s0
    state = volume_state(img)
    facts = json_of("info", img)
    assert isinstance(facts, dict) and facts["snapshot_only"] >= 1536 * 1024
    free_before = facts["free"]

    (tmp_path / "huge.bin").write_bytes(os.urandom(6 * MIB))  # bigger than the volume
    fails("put", img, tmp_path / "huge.bin", says="no space left")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a").write_bytes(b"fits")
    (tmp_path / "dir" / "b.bin").write_bytes(os.urandom(3 * MIB))  # fits only without s0
    fails("put", img, tmp_path / "dir", says="no space left")
    assert volume_state(img) == state
    facts = json_of("info", img)
    assert isinstance(facts, dict) and facts["free"] >= free_before - 16 * 4096

    out = run("snap", "delete", img, "s0").stdout.decode()
    assert "freed" in out
    facts = json_of("info", img)
    assert isinstance(facts, dict) and facts["snapshot_only"] == 0
    assert facts["free"] >= free_before + 1536 * 1024
    run("put", img, tmp_path / "dir")
    assert run("cat", img, "/dir/b.bin").stdout == (tmp_path / "dir" / "b.bin").read_bytes()
    assert run("cat", img, "/keep.txt").stdout == b"keep me"
    volume_state(img)


# ---- the command line itself -------------------------------------------------------------------
@pytest.mark.parametrize(("args", "says"), [
    (("frobnicate",), "No such command"),
    (("info",), "Missing argument"),
    (("snap", "create", "x.img"), "Missing argument"),
    (("ls", "x.img", "--bogus"), "No such option"),
    (("put",), "Missing argument"),
])
def test_usage_errors(tmp_path: Path, args: tuple[str, ...], says: str) -> None:
    fails(*args, says=says, cwd=tmp_path)


def test_help_and_python_m(tmp_path: Path) -> None:
    out = run("--help").stdout.decode()
    for command in ("create", "info", "snap", "put", "get", "ls", "cat", "rm", "fsck"):
        assert command in out
    assert b"list" in run("snap", "--help").stdout
    proc = subprocess.run([sys.executable, "-m", "snapvol.cli.main", "info", "missing.img"],
                          capture_output=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == b"snapvol: error: no such image: missing.img\n"


def test_cat_streams_into_a_closed_pipe(image: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(8 * MIB))
    run("put", image, big)
    cat = subprocess.Popen([*COMMAND, "cat", str(image), "/big.bin"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    assert cat.stdout is not None and cat.stderr is not None
    assert len(cat.stdout.read(1000)) == 1000
    cat.stdout.close()
    cat.wait(timeout=60)
    assert b"Traceback" not in cat.stderr.read()
    volume_state(image)


def test_progress_only_on_a_terminal(image: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "f.bin").write_bytes(os.urandom(3 * MIB))
    proc = run("put", image, data)
    assert proc.stderr == b""  # no bar in a pipe
    main, sub = pty.openpty()
    child = subprocess.Popen([*COMMAND, "get", str(image), "/data", str(tmp_path / "out")],
                             stdout=sub, stderr=sub, close_fds=True)
    os.close(sub)
    seen = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError as err:
            assert err.errno == errno.EIO  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    assert child.wait(timeout=60) == 0
    assert b"files" in seen and b"copied 1 file" in seen
    assert (tmp_path / "out" / "f.bin").read_bytes() == (data / "f.bin").read_bytes()
