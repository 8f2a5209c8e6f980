"""A read-only mount of a mirror follows receives into its image (snapvol.fuse.follow).

Real processes: `snapvol mount --read-only` of the destination, `snapvol send | snapvol
receive` for every round, while a reader thread reads every file of the mount over and
over. Every file's bytes name the version they are (a token repeated), so a read that
mixes two versions, or bytes of no version, is caught; ENOENT (a name that went between
listing and opening) and ESTALE (a file that changed while open) are the clean outcomes
of a refresh, anything else fails the test. After each receive the mount must show
exactly the source's new tree within a few seconds, and `.snapshot` the new snapshot.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusemount import SNAPVOL, Mount, force_unmount, run_env
from snapvol.engine import snapshots
from snapvol.engine.volume import Volume
from snapvol.fs import FileSystem

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="needs /dev/fuse and fusermount3 (make install sets them up)")

ROUNDS = 5
CATCH_UP = 3.0  # seconds a mount may take to show a received root


class Source:
    """The source volume and a model of its tree: path -> bytes (None for a directory).
    Every version of a file is a token repeated, and `versions` maps tokens to bytes."""

    def __init__(self, image: Path, seed: int) -> None:
        self.image = image
        self.rng = random.Random(seed)
        self.tree: dict[str, bytes | None] = {}
        self.versions: dict[bytes, bytes] = {}
        self.lock = threading.Lock()
        self._n = 0

    def _content(self) -> bytes:
        self._n += 1
        token = b"<v%06d>" % self._n
        # Sizes from one block to several read requests (the kernel reads 128 KiB).
        size = self.rng.choice([100, 5000, 70_000, 300_000])
        data = (token * (size // len(token) + 1))[:size]
        with self.lock:
            self.versions[token] = data
        return data

    def change(self, round_: int) -> None:
        """Random creates, rewrites, deletes, renames and a new directory, on the volume
        and in the model."""
        rng = self.rng
        with Volume.open(self.image) as vol:
            fs = FileSystem(vol)
            d = f"d{round_}"
            fs.makedirs(d)
            self.tree[d] = None
            for i in range(rng.randint(3, 6)):
                path = f"{rng.choice([d, *self._dirs()])}/f{round_}_{i}"
                data = self._content()
                fs.write_file(path, data)
                self.tree[path] = data
            files = sorted(p for p, v in self.tree.items()
                           if v is not None and not p.startswith("hold/"))
            for path in rng.sample(files, min(len(files), 4)):
                action = rng.choice(["rewrite", "delete", "rename"])
                if path not in self.tree:
                    continue
                if action == "rewrite":
                    data = self._content()
                    fs.write_file(path, data)
                    self.tree[path] = data
                elif action == "delete":
                    fs.remove_tree(path)
                    del self.tree[path]
                else:
                    new = f"{rng.choice(self._dirs())}/r{round_}_{os.path.basename(path)}"
                    if new in self.tree:
                        continue
                    (op, on), (np_, nn) = fs.split(path), fs.split(new)
                    fs.rename(op, on, np_, nn)
                    self.tree[new] = self.tree.pop(path)

    def snapshot(self, name: str) -> None:
        with Volume.open(self.image) as vol:
            snapshots.create(vol, name)

    def write(self, path: str) -> None:
        """Create or rewrite one file (the test's held files, which `change` leaves be)."""
        with Volume.open(self.image) as vol:
            fs = FileSystem(vol)
            fs.makedirs(os.path.dirname(path))
            self.tree[os.path.dirname(path)] = None
            data = self._content()
            fs.write_file(path, data)
            self.tree[path] = data

    def remove(self, path: str) -> None:
        with Volume.open(self.image) as vol:
            FileSystem(vol).remove_tree(path)
        del self.tree[path]

    def _dirs(self) -> list[str]:
        return sorted(p for p, v in self.tree.items() if v is None and p != "hold")


def run_snapvol(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([*SNAPVOL, *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, f"snapvol {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def send_receive(env: dict[str, str], src: Path, dst: Path, snap: str,
                 base: str | None) -> None:
    """`snapvol send | snapvol receive`; the receive asks a read-only mount of DST that it
    finds in env's run directory to refresh (without one, the mount's timer does)."""
    send = [*SNAPVOL, "send", str(src), snap, *(["--base", base] if base else [])]
    sender = subprocess.Popen(send, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert sender.stdout is not None
    recv = subprocess.run([*SNAPVOL, "receive", str(dst)], env=env, stdin=sender.stdout,
                          capture_output=True, text=True, timeout=120, check=False)
    sender.stdout.close()
    _, err = sender.communicate(timeout=120)
    assert sender.returncode == 0, err
    assert recv.returncode == 0, recv.stdout + recv.stderr


def mount_tree(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = None
        for name in filenames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = Path(
                dirpath, name).read_bytes()
    return out


class Reader(threading.Thread):
    """Reads every file of the mount again and again, each in 64 KiB reads (so a file
    spans several requests), and checks each read whole against the versions."""

    def __init__(self, root: Path, source: Source) -> None:
        super().__init__(daemon=True)
        self.root, self.source = root, source
        self.stop = threading.Event()
        self.problems: list[str] = []
        self.files_read = self.stale = self.vanished = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for dirpath, _, filenames in os.walk(self.root):
                    for name in filenames:
                        self._read(os.path.join(dirpath, name))
            except Exception as e:
                self.problems.append(f"walk: {e!r}")

    def _read(self, path: str) -> None:
        try:
            with open(path, "rb", buffering=0) as f:
                parts = []
                while chunk := f.read(65536):
                    parts.append(chunk)
        except OSError as e:
            if e.errno == errno.ESTALE:
                self.stale += 1
            elif e.errno == errno.ENOENT:
                self.vanished += 1
            else:
                self.problems.append(f"{path}: {e!r}")
            return
        data = b"".join(parts)
        with self.source.lock:
            want = self.source.versions.get(data[:9])
        if want != data:
            self.problems.append(f"{path}: {len(data)} bytes that are no version "
                                 f"(starts {data[:16]!r}, ends {data[-16:]!r})")
        self.files_read += 1


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[Source, Mount]]:
    run_dir = tempfile.mkdtemp(prefix="svrun", dir="/tmp")
    env = run_env(run_dir)
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    run_snapvol(env, "create", str(src), "--size", "256M")
    run_snapvol(env, "create", str(dst), "--size", "256M")
    m = Mount(dst, tmp_path / "mnt", env)
    m.path.mkdir()
    try:
        m.mount("--read-only")
        yield Source(src, seed=7), m
    finally:
        force_unmount(m)
        shutil.rmtree(run_dir, ignore_errors=True)


def wait_for(m: Mount, want: dict[str, bytes | None]) -> float:
    """Seconds until the mount shows exactly `want`; fails after CATCH_UP seconds."""
    t0 = time.monotonic()
    got: dict[str, bytes | None] = {}
    while time.monotonic() - t0 < CATCH_UP:
        try:
            got = mount_tree(m.path)
        except OSError:
            got = {}
        if got == want:
            return time.monotonic() - t0
        time.sleep(0.05)
    diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    raise AssertionError(f"mount differs from the source after {CATCH_UP} s: {diff[:10]}")


def test_read_only_mount_follows_receives(mirror: tuple[Source, Mount]) -> None:
    source, m = mirror
    reader = Reader(m.path, source)
    reader.start()
    lags: dict[str, list[float]] = {"asked": [], "timer": []}
    # A receive that does not find the mount in its run directory cannot ask it to
    # refresh: then the mount's timer must notice the new root by itself.
    elsewhere = run_env(tempfile.mkdtemp(prefix="svrun", dir="/tmp"))
    held: tuple[list[int], int, bytes] | None = None
    cwd = os.getcwd()
    try:
        base = None
        for r in range(1, ROUNDS + 1):
            source.change(r)
            if r == 2:
                source.write("hold/changes")
                source.write("hold/stays")
                source.write("hold/goes")
            if held is not None:
                source.write("hold/changes")  # while the mount has them open
                source.remove("hold/goes")
            source.snapshot(f"s{r}")
            how = "asked" if r % 2 else "timer"
            send_receive(m.env if how == "asked" else elsewhere, source.image, m.image,
                         f"s{r}", base)
            base = f"s{r}"
            lags[how].append(wait_for(m, source.tree))
            names = set(os.listdir(m.path / ".snapshot"))
            assert names == {f"s{i}" for i in range(1, r + 1)}, names
            assert mount_tree(m.path / ".snapshot" / f"s{r}") == source.tree
            if held is not None:
                # A file that changed or went while open reads ESTALE, never old and
                # new bytes; one that did not change reads on.
                f_stale, f_kept, kept_bytes = held
                for fd in f_stale:
                    with pytest.raises(OSError) as e:
                        os.pread(fd, 4096, 0)
                    assert e.value.errno == errno.ESTALE
                    os.close(fd)
                assert os.pread(f_kept, len(kept_bytes) + 1, 0) == kept_bytes
                os.close(f_kept)
                held = None
                # A directory that did not move keeps its cached name: a shell sitting
                # in it keeps its place.
                assert os.getcwd() == str(m.path / "hold")
                os.chdir(cwd)
            if r == 2:
                stays = source.tree["hold/stays"]
                assert stays is not None
                held = ([os.open(m.path / "hold" / name, os.O_RDONLY)
                         for name in ("changes", "goes")],
                        os.open(m.path / "hold/stays", os.O_RDONLY), stays)
                os.chdir(m.path / "hold")
    finally:
        os.chdir(cwd)
        reader.stop.set()
        reader.join(timeout=30)
        shutil.rmtree(elsewhere["SNAPVOL_RUN_DIR"], ignore_errors=True)
    logs = "".join(p.read_text() for p in Path(m.env["SNAPVOL_RUN_DIR"]).glob("*.log"))
    assert not reader.problems, (reader.problems[:10], logs[-3000:])
    assert reader.files_read > 50, reader.files_read
    print(f"catch-up after receive (s): asked {[round(x, 2) for x in lags['asked']]}, "
          f"timer {[round(x, 2) for x in lags['timer']]}; reader: {reader.files_read} "
          f"files, {reader.stale} ESTALE, {reader.vanished} ENOENT")
