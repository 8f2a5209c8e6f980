"""Ending a mount: `unmount` refuses while programs use the mount and names them,
`--force` detaches it after a last CP (issue 10, item 4); a mount whose process was
killed is listed as stale, cleared by `unmount`, and explained by `mount` (item 16)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from fusemount import Mount, is_mounted, mounted_volume, needs_fuse, wait_gone
from snapvol.control import mounttable

pytestmark = needs_fuse

WRITER = textwrap.dedent("""
    import os, sys, time
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    report = open(sys.argv[2], "w")
    for i in range(10**9):
        try:
            os.write(fd, b"line %d\\n" % i)
        except OSError as e:
            report.write(f"error {e.errno}\\n")
            report.flush()
            break
        report.write(f"{i}\\n")
        report.flush()
        time.sleep(0.02)
""")


def _written(report: Path) -> int:
    """How many lines the writer reports as written (all of them, if it hit an error)."""
    lines = [x for x in report.read_text().splitlines() if not x.startswith("error")]
    return len(lines)


def _wait_for(condition: object, what: str, timeout: float = 30) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_unmount_refuses_while_in_use_and_force_detaches(tmp_path: Path) -> None:
    report = tmp_path / "report"
    with mounted_volume(tmp_path) as m:
        pid = m.pid()
        assert pid is not None
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(m.path / "log"),
                                   str(report)])
        # A second program only works in a directory of the mount.
        (m.path / "dir").mkdir()
        sitter = subprocess.Popen(["sleep", "600"], cwd=m.path / "dir")
        try:
            _wait_for(lambda: report.exists() and _written(report) >= 5, "the writer")
            refused = m.snapvol("unmount", str(m.path), check=False)
            assert refused.returncode == 2, refused.stdout + refused.stderr
            err = refused.stderr
            assert err.startswith(f"snapvol: error: {m.path} is busy: ") and err.count("\n") == 1
            assert f"process {writer.pid} (python" in err and "1 open file" in err
            assert f"process {sitter.pid} (sleep) works in it" in err
            assert f"snapvol unmount --force {m.path}" in err
            # Nothing changed for the programs: the writer writes on, the mount answers.
            before = _written(report)
            _wait_for(lambda: _written(report) >= before + 10, "more writes")
            assert writer.poll() is None and "error" not in report.read_text()
            assert is_mounted(m.path) and m.pid() == pid
            assert (m.path / "log").read_bytes().startswith(b"line 0\nline 1\n")

            # Only the working directory left: still refused (the kernel says so).
            writer.kill()
            writer.wait(timeout=30)
            refused = m.snapvol("unmount", str(m.path), check=False)
            assert refused.returncode == 2 and f"process {sitter.pid} (sleep)" in refused.stderr
            assert f"process {writer.pid}" not in refused.stderr
            assert is_mounted(m.path) and m.pid() == pid

            # --force: a last CP, then the detach; the program in it is cut off.
            writer = subprocess.Popen([sys.executable, "-c", WRITER, str(m.path / "log"),
                                       str(report)])
            _wait_for(lambda: _written(report) >= 5, "the second writer")
            forced = m.snapvol("unmount", "--force", str(m.path))
            assert forced.stdout == f"unmounted {m.path}\n"
            wait_gone(pid)
            assert not is_mounted(m.path)
            _wait_for(lambda: writer.poll() is not None, "the writer to fail")
            assert "error" in report.read_text()  # ENOTCONN (or EIO) after the detach
        finally:
            for proc in (writer, sitter):
                proc.kill()
                proc.wait(timeout=30)
        # What was written before the forced unmount is in the volume.
        data = m.snapvol("cat", str(m.image), "/log").stdout
        assert data.startswith("line 0\nline 1\n") and data.count("\n") >= _written(report) - 1


def test_unmount_waits_for_files_closed_just_before(tmp_path: Path) -> None:
    """A file closed right before `unmount` is not counted as open (its release comes
    after close() returned), and a plain unmount of an idle mount unmounts at once."""
    with mounted_volume(tmp_path) as m:
        for i in range(20):
            with open(m.path / f"f{i}", "w") as f:
                f.write("x" * i)
        os.listdir(m.path)
        done = m.snapvol("unmount", str(m.path))
        assert done.stdout == f"unmounted {m.path}\n"
        assert not is_mounted(m.path)
        assert m.snapvol("cat", str(m.image), "/f19").stdout == "x" * 19


def _stale_entries(m: Mount) -> list[dict[str, object]]:
    listed = json.loads(m.snapvol("mounts", "--json").stdout)
    return [e for e in listed if e["mountpoint"] == str(m.path)]


def test_killed_mount_is_listed_as_stale_and_cleared(tmp_path: Path) -> None:
    with mounted_volume(tmp_path) as m:
        (m.path / "kept").write_bytes(b"committed before the kill")
        m.snapvol("snap", "create", str(m.image), "s1")  # a CP: "kept" is committed
        pid = m.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        assert is_mounted(m.path) and not os.path.isdir(m.path)  # ENOTCONN

        [entry] = _stale_entries(m)
        assert entry["state"] == "stale" and entry["pid"] == pid
        assert entry["image"] == str(m.image)
        table = m.snapvol("mounts").stdout
        assert str(m.path) in table and "stale" in table and f"{pid} (gone)" in table
        assert "snapvol unmount MOUNTPOINT" in table
        assert m.pid() is None  # not a live mount

        again = m.snapvol("mount", str(m.image), str(m.path), check=False)
        assert again.returncode == 2
        assert again.stderr == (
            f"snapvol: error: {m.path} is a stale snapvol mount (of {m.image}: its mount "
            f"process {pid} is gone); clear it with `snapvol unmount {m.path}`\n")

        cleared = m.snapvol("unmount", str(m.path))
        assert cleared.stdout.startswith(f"unmounted {m.path} (a stale mount: its mount "
                                         f"process {pid} was gone")
        assert not is_mounted(m.path)
        assert _stale_entries(m) == []
        assert m.snapvol("mounts").stdout == "no mounts\n"
        gone = m.snapvol("unmount", str(m.path), check=False)
        assert gone.returncode == 2 and "not a snapvol mount point" in gone.stderr

        m.mount()
        assert (m.path / "kept").read_bytes() == b"committed before the kill"
        m.unmount()


def test_stale_mount_held_by_a_program_is_detached(tmp_path: Path) -> None:
    """A program still in the dead mount keeps it busy: unmount detaches it lazily."""
    with mounted_volume(tmp_path) as m:
        (m.path / "d").mkdir()
        m.snapvol("snap", "create", str(m.image), "s1")  # a CP: "d" is committed
        sitter = subprocess.Popen(["sleep", "600"], cwd=m.path / "d")
        try:
            pid = m.pid()
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid)
            kernel = mounttable.find(str(m.path))
            assert kernel is not None and mounttable.not_connected(str(m.path))
            assert [e["state"] for e in _stale_entries(m)] == ["stale"]
            m.snapvol("unmount", str(m.path))
            assert not is_mounted(m.path)
        finally:
            sitter.kill()
            sitter.wait(timeout=30)
        m.mount()
        assert os.listdir(m.path) == ["d"]
        m.unmount()
