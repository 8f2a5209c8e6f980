"""SIGKILL of the mount process under a write load: after a remount every fsynced byte is
there, files that were unlinked while open are gone, and fsck is clean."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from fusemount import force_unmount, is_mounted, mounted_volume, needs_fuse, wait_gone

pytestmark = needs_fuse

WRITER = textwrap.dedent("""
    import hashlib, os, random, sys
    root, log = sys.argv[1], open(sys.argv[2], "w")
    rng = random.Random(5)
    contents = {}
    # A file unlinked while open, still being written when the mount dies.
    ghost = os.open(os.path.join(root, "ghost"), os.O_RDWR | os.O_CREAT, 0o644)
    os.unlink(os.path.join(root, "ghost"))
    for step in range(10**9):
        name = f"f{rng.randrange(12)}"
        data = rng.randbytes(rng.choice([100, 4096, 50_000, 300_000]))
        path = os.path.join(root, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(fd, data)
        os.write(ghost, data)
        contents[name] = contents.get(name, b"") + data
        if step % 3 == 0:
            os.fsync(fd)
            body = contents[name]
            log.write(f"{name} {len(body)} {hashlib.sha256(body).hexdigest()}\\n")
            log.flush()
        os.close(fd)
""")


def test_sigkill_during_writes_keeps_fsynced_data(tmp_path: Path) -> None:
    log = tmp_path / "durable.log"
    with mounted_volume(tmp_path, "--cp-interval", "1") as m:
        pid = m.pid()
        assert pid is not None
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(m.path), str(log)],
                                  stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(0.5)
                lines = log.read_text().splitlines() if log.exists() else []
                if len(lines) >= 40:
                    break
            assert writer.poll() is None, "the writer stopped before the crash"
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid)
        finally:
            writer.kill()
            writer.wait(timeout=60)
        force_unmount(m)
        assert not is_mounted(m.path)
        durable: dict[str, tuple[int, str]] = {}
        for line in log.read_text().splitlines():
            name, size, digest = line.split()
            durable[name] = (int(size), digest)  # the last fsync of each file counts
        assert len(durable) >= 3
        # The crash left a stale registry entry: mount must not mistake it for a live one.
        m.mount()
        for name, (size, digest) in durable.items():
            data = (m.path / name).read_bytes()
            assert len(data) >= size, f"{name}: {len(data)} bytes, fsynced {size}"
            assert hashlib.sha256(data[:size]).hexdigest() == digest, f"{name} differs"
        assert sorted(os.listdir(m.path)) == sorted({f"f{i}" for i in range(12)} & set(
            os.listdir(m.path)))
        assert "clean" in m.snapvol("fsck", "--online", str(m.image)).stdout
        m.unmount()
        checked = m.snapvol("fsck", str(m.image))
        assert "clean" in checked.stdout
        # The ghost file's blocks went back to the free space with its hidden name.
        listing = m.snapvol("ls", str(m.image), "/").stdout
        assert ".snapvol-unlinked" not in listing and "ghost" not in listing
