"""Mounts at boot, through the real programs: mount(8) running mount.fuse.snapvol for
`mount -t fuse.snapvol`, an fstab line (`mount -T FILE`, `mount -a`) and umount(8); the
mount's log where `snapvol mounts` says it is (a file, or the journal systemd gives); and
a `snapvol mount --foreground` that tells systemd it is ready (Type=notify) and stops
on SIGTERM with a last CP.

mount(8) runs helpers from /sbin only, so the fstab test runs in a private mount
namespace (unshare -m) where a directory holding this checkout's helper is bound over
/usr/sbin: nothing is installed on the host, and the mount is seen only in there.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import checklogs
from fusemount import SNAPVOL, is_mounted

VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def run_dir() -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="svboot", dir="/tmp"))  # short: socket paths
    yield where
    for entry in where.glob("*.json"):  # a mount process left running by a failed test
        with contextlib.suppress(ValueError, OSError):
            os.kill(json.loads(entry.read_text())["pid"], signal.SIGKILL)
    shutil.rmtree(where, ignore_errors=True)


def snapvol(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SNAPVOL, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=120, check=True)


def make_volume(tmp_path: Path, env: dict[str, str]) -> Path:
    image = tmp_path / "vol.img"
    snapvol(env, "create", image, "--size", "256M")
    (tmp_path / "hello.txt").write_text("hello from the image\n")
    snapvol(env, "put", image, tmp_path / "hello.txt")
    return image


NAMESPACE_SCRIPT = r"""
set -u
trap 'umount -l "$MNT" 2>/dev/null; true' EXIT
gone() {  # wait until the mount process has unregistered
    for _ in $(seq 300); do
        [ "$("$SNAPVOL" mounts --json | tr -d ' \n')" = "[]" ] && return 0
        sleep 0.1
    done
    echo "still registered"; return 1
}
mount --bind "$HELPERS" /usr/sbin
echo "== mount -t"
mount -t fuse.snapvol -o noexec,cp_interval=1 "$IMG" "$MNT"; echo "rc=$?"
grep " $MNT " /proc/self/mounts
cat "$MNT/hello.txt"
printf 'written through the fstab mount\n' > "$MNT/new.txt"
mkdir "$MNT/.snapshot/at-boot"
echo "== mounts"
"$SNAPVOL" mounts --json | tr -d '\n'; echo
"$SNAPVOL" mounts
echo "== umount"
umount "$MNT"; echo "rc=$?"
gone
echo "== mount -T"
mount -T "$FSTAB" "$MNT"; echo "rc=$?"
mount -a -T "$FSTAB"; echo "again rc=$?"
grep -c " $MNT " /proc/self/mounts
cat "$MNT/new.txt"
ls "$MNT/.snapshot"
echo "== bad option"
umount "$MNT"; gone
mount -t fuse.snapvol -o bogus "$IMG" "$MNT"; echo "rc=$?"
echo "== end"
"""


def sections(out: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    current = ""
    for line in out.splitlines():
        if line.startswith("== "):
            current = line[3:]
            found[current] = []
        elif current:
            found[current].append(line)
    return found


def test_fstab_line_mounts_through_mount_8(tmp_path: Path, run_dir: Path) -> None:
    env = dict(os.environ, SNAPVOL_RUN_DIR=str(run_dir))
    image = make_volume(tmp_path, env)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    helpers = tmp_path / "sbin"
    helpers.mkdir()
    (helpers / "mount.fuse.snapvol").symlink_to(VENV_BIN / "mount.fuse.snapvol")
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# a test fstab\n{image} {mnt} fuse.snapvol defaults,nofail 0 0\n")
    env.update(IMG=str(image), MNT=str(mnt), HELPERS=str(helpers), FSTAB=str(fstab),
               SNAPVOL=str(VENV_BIN / "snapvol"))
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c",
                           NAMESPACE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    out = sections(proc.stdout)
    assert "end" in out, proc.stdout + proc.stderr

    # the helper's `snapvol mount` says what it mounted (mount(8) passes it on)
    first = out["mount -t"]
    assert first[0].startswith(f"mounted {image} on {mnt} (process ")
    assert first[1] == "rc=0", proc.stdout + proc.stderr
    source, target, fstype, options = first[2].split()[:4]
    assert (source, target, fstype) == (str(image), str(mnt), "fuse.snapvol")
    assert {"noexec", "nosuid", "nodev"} <= set(options.split(","))
    assert first[3] == "hello from the image"

    [listed] = json.loads(out["mounts"][0])
    log = run_dir / Path(listed["log"]).name
    assert listed["log"] == str(log) and listed["image"] == str(image)
    table = out["mounts"][1:]
    assert table[0].split() == ["MOUNTPOINT", "IMAGE", "MODE", "PID", "STATE", "LOG"]
    assert table[1].split() == [str(mnt), str(image), "rw", str(listed["pid"]), "live",
                                str(log)]
    assert out["umount"] == ["rc=0"]

    again = out["mount -T"][1:]
    assert again[:2] == ["rc=0", "again rc=0"]  # mount -a sees the line's mount made
    assert again[2:] == ["1", "written through the fstab mount", "at-boot"]
    assert out["bad option"][-1] == "rc=1"
    assert "mount.fuse.snapvol: unknown mount option 'bogus'" in proc.stderr

    # The log names what the mount did, in UTC: its CPs, its snapshot, and no error.
    text = log.read_text()
    for what in ("INFO: mounted ", "INFO: CP ", " committed\n",
                 "INFO: snapshot at-boot taken at CP ", f"INFO: unmounted {image} from "):
        assert what in text, text
    assert all(line[:24].endswith("Z") for line in text.splitlines()), text
    checklogs.check_mount_log(log)
    assert snapvol(env, "cat", image, "/new.txt").stdout == "written through the fstab mount\n"


def test_the_mount_logs_to_the_journal_systemd_gives(tmp_path: Path, run_dir: Path) -> None:
    """systemd's journal stream stands in as a file: JOURNAL_STREAM names its device and
    inode, as systemd does for the stdout and stderr it connects to the journal."""
    env = dict(os.environ, SNAPVOL_RUN_DIR=str(run_dir))
    image = make_volume(tmp_path, env)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    journal = tmp_path / "journal"
    with open(journal, "wb") as stream:
        st = os.fstat(stream.fileno())
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([*SNAPVOL, "mount", str(image), str(mnt)], env=env, stdout=stream,
                       stderr=stream, timeout=60, check=True)
    try:
        [listed] = json.loads(snapvol(env, "mounts", "--json").stdout)
        assert listed["log"] == "journal"
        assert snapvol(env, "mounts", "-H", "-o", "mountpoint,log").stdout == \
            f"{mnt}\tjournal\n"
        (mnt / "f").write_text("x")
        snapvol(env, "snap", "create", image, "s1")
    finally:
        snapvol(env, "unmount", mnt)
    assert list(run_dir.glob("*.log")) == []  # nothing went to a file
    lines = journal.read_text().splitlines()
    assert f"<6>snapvol mount: mounted {image} on {mnt}" in lines
    assert any(re.fullmatch(r"<6>snapvol mount: snapshot s1 taken at CP \d+", line)
               for line in lines), lines
    assert any(re.fullmatch(r"<6>snapvol mount: CP \d+ committed", line) for line in lines)
    assert not any(line.startswith(("<3>", "<2>")) for line in lines), lines


def test_foreground_mount_tells_systemd_it_is_ready(tmp_path: Path, run_dir: Path) -> None:
    """What snapvol-mount@.service runs: `snapvol mount --foreground` with NOTIFY_SOCKET
    sends READY=1 once the mount answers; SIGTERM (systemctl stop) ends it after a CP."""
    env = dict(os.environ, SNAPVOL_RUN_DIR=str(run_dir))
    image = make_volume(tmp_path, env)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(run_dir / "notify"))
    notify.settimeout(60)
    env["NOTIFY_SOCKET"] = str(run_dir / "notify")
    proc = subprocess.Popen([*SNAPVOL, "mount", "--foreground", str(image), str(mnt)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert notify.recv(4096) == b"READY=1"
        assert is_mounted(mnt) and (mnt / "hello.txt").read_text() == "hello from the image\n"
        [listed] = json.loads(snapvol(env, "mounts", "--json").stdout)
        assert listed["log"] == "stderr" and listed["pid"] == proc.pid
        (mnt / "later.txt").write_text("kept by the CP at SIGTERM\n")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    assert proc.returncode == 0, err
    assert f"snapvol mount: mounted {image} on {mnt}" in err
    assert "snapvol mount: stopping: " in err and "ERROR" not in err
    assert f"snapvol mount: unmounted {image} from {mnt} at CP " in err
    deadline = time.monotonic() + 10
    while is_mounted(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_mounted(mnt)
    assert snapvol(env, "cat", image, "/later.txt").stdout == "kept by the CP at SIGTERM\n"
