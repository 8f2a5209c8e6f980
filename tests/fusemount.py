"""Real mounts for the FUSE tests: `snapvol mount` run as its own process, and a teardown
that always leaves the mount point unmounted, even after a failed test or a killed mount
process (fusermount3 -u, then a lazy unmount, then SIGKILL). At the end the mount logs
go to `checklogs`: an ERROR line or a traceback the test did not declare fails it.

Also the tree reader the tests compare a mount against a plain directory with.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import checklogs

SNAPVOL = [sys.executable, "-m", "snapvol.cli.main"]
IMAGE_SIZE = "2G"
RECENT = 3600 * 10**9

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="needs /dev/fuse and fusermount3 (make install sets them up)")


@dataclass
class Mount:
    image: Path
    path: Path
    env: dict[str, str]

    def snapvol(self, *args: str, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*SNAPVOL, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"snapvol {' '.join(args)} exited {proc.returncode}: "
                                 f"{proc.stdout}{proc.stderr}")
        return proc

    def mount(self, *extra: str) -> None:
        self.snapvol("mount", str(self.image), str(self.path), *extra)

    def pid(self) -> int | None:
        """The live mount process of this mount point (not the dead one of a stale mount)."""
        for entry in json.loads(self.snapvol("mounts", "--json").stdout):
            if entry["mountpoint"] == str(self.path) and entry.get("state", "live") == "live":
                return int(entry["pid"])
        return None

    def unmount(self) -> None:
        self.snapvol("unmount", str(self.path))


def run_env(run_dir: str) -> dict[str, str]:
    env = dict(os.environ, SNAPVOL_RUN_DIR=run_dir)
    env.pop("SNAPVOL_DEBUG", None)
    return env


def is_mounted(path: Path) -> bool:
    want = str(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == want for line in f if len(line.split()) > 1)


def force_unmount(m: Mount) -> None:
    """Whatever state the mount is in, leave the mount point unmounted and no process."""
    pid = None
    with contextlib.suppress(Exception):
        pid = m.pid()
    if is_mounted(m.path):
        with contextlib.suppress(Exception):
            m.snapvol("unmount", "--force", str(m.path), check=False, timeout=60)
    for args in (["fusermount3", "-u", str(m.path)], ["fusermount3", "-u", "-z", str(m.path)]):
        if not is_mounted(m.path):
            break
        subprocess.run(args, capture_output=True, check=False, timeout=30)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


_active: list[Mount] = []


def _interrupted(signum: int, frame: object) -> None:
    """SIGTERM (`timeout pytest ...`) becomes KeyboardInterrupt, so fixtures tear down and
    no mount outlives the run."""
    raise KeyboardInterrupt(f"signal {signum}")


@atexit.register
def _unmount_leftovers() -> None:
    for m in list(_active):
        force_unmount(m)


@contextlib.contextmanager
def mounted_volume(tmp: Path, *mount_args: str) -> Iterator[Mount]:
    """A fresh volume mounted on tmp/mnt by a real `snapvol mount` process."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupted)
    run_dir = tempfile.mkdtemp(prefix="svrun", dir="/tmp")  # short: unix socket paths
    m = Mount(tmp / "vol.img", tmp / "mnt", run_env(run_dir))
    m.path.mkdir()
    m.snapvol("create", str(m.image), "--size", IMAGE_SIZE)
    _active.append(m)
    try:
        m.mount(*mount_args)
        yield m
    finally:
        force_unmount(m)
        _active.remove(m)
        for log in sorted(Path(run_dir).glob("*.log")):  # every image mounted meanwhile
            checklogs.check_mount_log(log)
        shutil.rmtree(run_dir, ignore_errors=True)


# ---- comparing trees -----------------------------------------------------------------------
def read_tree(root: Path, *, mtimes: bool = True) -> dict[str, tuple[object, ...]]:
    """Every entry under `root`: type, permissions, link count, owner, size, contents or
    target, xattrs, and (for non-directories older than an hour) mtime; hard links show
    as the first path of their inode."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                body: object = p.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            else:
                body = None
            try:
                xattrs = tuple(sorted((n, os.getxattr(p, n, follow_symlinks=False))
                                      for n in os.listxattr(p, follow_symlinks=False)))
            except OSError as e:
                if e.errno != errno.ENOTSUP:
                    raise
                xattrs = ()
            first = inodes.setdefault(st.st_ino, rel) if not stat.S_ISDIR(st.st_mode) else rel
            # Times set by the steps themselves differ between the two runs; compare the
            # ones carried over from the source (older than RECENT).
            old = st.st_mtime_ns < time.time_ns() - RECENT
            mtime = st.st_mtime_ns if mtimes and old and not stat.S_ISDIR(st.st_mode) else 0
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_nlink, st.st_uid, st.st_gid,
                        st.st_size if not stat.S_ISDIR(st.st_mode) else 0, body, xattrs,
                        first, mtime)
    return out


def assert_same_tree(want: Path, got: Path, *, mtimes: bool = True,
                     ignore: frozenset[str] = frozenset()) -> None:
    a, b = read_tree(want, mtimes=mtimes), read_tree(got, mtimes=mtimes)
    problems = []
    for key in sorted(set(a) | set(b)):
        if key not in ignore and a.get(key) != b.get(key):
            problems.append(f"{key}: plain {str(a.get(key))[:160]} != mount "
                            f"{str(b.get(key))[:160]}")
    assert not problems, "\n".join(problems[:20])


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # A child of this process would stay a zombie: reap it if it is ours.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still runs after {timeout} s")
