"""The FUSE front end's parts that need no mount: inode numbering, the registry, the
control protocol's client side."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from snapvol.control import mounttable, registry
from snapvol.control.protocol import ControlError, call, decode_line, encode_line
from snapvol.fuse import readahead
from snapvol.fuse.inodes import FUSE_ROOT, SNAPDIR_INO, from_fuse, to_fuse
from snapvol.layout.constants import FIRST_USER_INO, ROOT_INO


def test_inode_numbers_are_distinct_and_round_trip() -> None:
    seen = set()
    for snap_id in (0, 1, 2, 255, 70_000):
        for ino in (ROOT_INO, FIRST_USER_INO, 12345, (1 << 40) - 1):
            fino = to_fuse(snap_id, ino)
            assert fino not in seen and fino != SNAPDIR_INO
            seen.add(fino)
            assert from_fuse(fino) == (snap_id, ino)
    assert to_fuse(0, ROOT_INO) == FUSE_ROOT
    assert SNAPDIR_INO < FIRST_USER_INO  # never allocated by the engine


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SNAPVOL_RUN_DIR", str(tmp_path / "run"))
    return tmp_path / "run"


def test_registry_drops_entries_of_dead_processes(tmp_path: Path, run_dir: Path) -> None:
    image = tmp_path / "vol.img"
    image.write_bytes(b"")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    entry = registry.MountEntry(str(image), str(tmp_path), int(dead.stdout), "/nonexistent",
                                False, 0)
    registry.register(entry)
    assert registry.find_image(image) is None
    assert registry.mounts() == []
    assert list(run_dir.glob("*.json")) == []
    live = registry.MountEntry(str(image), str(tmp_path), os.getpid(), "/nonexistent", True, 1)
    registry.register(live)
    assert registry.find_image(image) == live
    assert registry.find_mountpoint(tmp_path) == live
    registry.unregister(image, os.getpid())
    assert registry.find_image(image) is None


def test_control_client_errors(tmp_path: Path, run_dir: Path) -> None:
    image = tmp_path / "vol.img"
    image.write_bytes(b"")
    sock_path = registry.socket_path(image)
    entry = registry.MountEntry(str(image), str(tmp_path), os.getpid(), sock_path, False, 0)
    with pytest.raises(ControlError, match="cannot reach the mount"):
        call(entry, "ping", timeout=5)

    answers = [encode_line({"ok": False, "error": "no snapshot named 'x'"}), b"not json\n"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(sock_path)
        server.listen(4)

        def serve() -> None:
            for answer in answers:
                conn, _ = server.accept()
                with conn:
                    request = decode_line(conn.recv(65536))
                    assert request == {"v": 1, "op": "snap_delete", "args": {"name": "x"}}
                    conn.sendall(answer)

        t = threading.Thread(target=serve)
        t.start()
        with pytest.raises(ControlError, match=r"^no snapshot named 'x'$"):
            call(entry, "snap_delete", timeout=5, name="x")
        with pytest.raises(ControlError, match="without an answer"):
            call(entry, "snap_delete", timeout=5, name="x")
        t.join(timeout=10)
    assert json.loads(encode_line({"a": 1})) == {"a": 1}


def test_readahead_finds_the_mount_in_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "40 22 0:41 / /mnt/my\\040vol rw,nosuid - fuse.snapvol snapvol rw\n"
        "41 22 0:42 / /mnt/other rw - fuse passthrough rw\n"
        "42 40 0:43 / /mnt/my\\040vol rw - fuse.snapvol snapvol rw\n")  # mounted over
    assert readahead.device_of("/mnt/my vol", str(info)) == "0:43"
    assert readahead.device_of("/mnt/other", str(info)) == "0:42"
    assert readahead.device_of("/mnt", str(info)) is None


def test_readahead_writes_the_window_or_says_why_not(tmp_path: Path) -> None:
    here = os.stat("/proc/self")  # any mount point will do: /proc is one
    device = f"{os.major(here.st_dev)}:{os.minor(here.st_dev)}"
    sysfs = tmp_path / "bdi"
    (sysfs / device).mkdir(parents=True)
    assert readahead.set_window("/proc", 1024, str(sysfs)) is None
    assert (sysfs / device / "read_ahead_kb").read_text() == "1024\n"
    why = readahead.set_window("/proc", 512, str(tmp_path / "nowhere"))
    assert why is not None and why.startswith("cannot write ") and "No such file" in why
    assert readahead.set_window(str(tmp_path), 512, str(sysfs)) == \
        f"nothing is mounted on {tmp_path}"


def test_mount_users_are_found_as_fuser_does(tmp_path: Path) -> None:
    """Open files by mount id, mapped files by device, working directories by path: a
    process that only has a path that looks inside (another mount there) is no user."""
    mnt = "/mnt/my vol"
    mount = mounttable.KernelMount(40, (0, 41), mnt, "fuse.snapvol", ("user_id=0",))
    proc = tmp_path / "proc"

    def process(pid: int, comm: str, fds: dict[int, tuple[str, int]] | None = None,
                cwd: str = "/", maps: str = "") -> None:
        base = proc / str(pid)
        (base / "fd").mkdir(parents=True)
        (base / "fdinfo").mkdir()
        (base / "comm").write_text(comm + "\n")
        (base / "maps").write_text(maps)
        (base / "cwd").symlink_to(cwd)
        (base / "root").symlink_to("/")
        for fd, (target, mnt_id) in (fds or {}).items():
            (base / "fd" / str(fd)).symlink_to(target)
            (base / "fdinfo" / str(fd)).write_text(f"pos:\t0\nflags:\t02\nmnt_id:\t{mnt_id}\n")

    process(100, "writer", {3: (f"{mnt}/log", 40), 4: (f"{mnt}/b", 40), 5: ("/etc/x", 22)})
    process(101, "shadowed", {3: (f"{mnt}/log", 39)})  # the mount below ours
    process(102, "bash", cwd=f"{mnt}/sub")  # the directory cannot be looked at: counted
    process(103, "viewer", maps="7f00-7f10 r--p 00000000 00:29 12 /other\n"
                                 "7f10-7f20 r--p 00000000 00:29 13 " + mnt + "/lib.so\n")
    process(104, "idle", {3: ("/dev/null", 22)}, cwd="/tmp", maps=(
        "7f00-7f10 r--p 00000000 fe:00 12 /usr/lib/x.so\n"))
    (proc / "self").mkdir()
    found = mounttable.users(mount, exclude=frozenset({999}), proc=str(proc))
    assert [(u.pid, u.command, u.uses) for u in found] == [
        (100, "writer", ("has 2 open files in it",)),
        (102, "bash", ("works in it",)),
        (103, "viewer", ("maps a file of it",)),
    ]
    assert found[0].describe() == "process 100 (writer) has 2 open files in it"
    assert mounttable.users(mount, exclude=frozenset({100, 102, 103}), proc=str(proc)) == []
