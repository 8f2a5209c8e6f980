"""Shared fixtures: fresh volumes, a reader that turns a FileSystem into the model's form,
and the fsck assertion every engine test ends with.

Tests marked `long` are deselected unless `-m` is given (e.g. `pytest -m long`), so the
default run stays quick while the heavy variants live next to the quick ones.

Every test also runs under `checklogs`: an error snapvol logs that the test did not
declare (`@pytest.mark.expect_log_errors(PATTERN)`) fails it.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from model import Entry, Form
from snapvol.device import MemoryDevice
from snapvol.engine.volume import Volume
from snapvol.fs import FileSystem
from snapvol.layout.constants import ROOT_INO

pytest_plugins = ["checklogs"]

# No per-example deadline anywhere: on a loaded 2-core CI machine a slow example is not a
# failure, and a timing flake would hide the real ones.
settings.register_profile("snapvol", deadline=None)
settings.load_profile("snapvol")

MEM_BLOCKS = 4096  # 16 MiB: room for the tests' data, small enough to fill on purpose
IMAGE_BYTES = 64 << 20


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("-m"):
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("long") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def new_memory_volume(nblocks: int = MEM_BLOCKS) -> tuple[MemoryDevice, Volume]:
    """A formatted, open volume on a fresh memory device (with the device, to reopen)."""
    dev = MemoryDevice(nblocks)
    Volume.format(dev)
    return dev, Volume.on_device(dev)


@pytest.fixture
def mem_volume() -> Iterator[Volume]:
    """A fresh writable volume on a 16 MiB MemoryDevice; closed after the test."""
    _, vol = new_memory_volume()
    yield vol
    if not vol.closed:
        vol.close()


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    """Where an image-file volume lives (created by the `image_volume` fixture)."""
    return tmp_path / "vol.img"


@pytest.fixture
def image_volume(image_path: Path) -> Iterator[Volume]:
    """A fresh writable volume in a 64 MiB sparse image file; closed after the test."""
    vol = Volume.create(image_path, IMAGE_BYTES)
    yield vol
    if not vol.closed:
        vol.close()


def read_tree(fs: FileSystem) -> Form:
    """The whole tree of `fs` in the model's form, checking '..' and the entry types."""
    dirs: Form = {}
    others: dict[bytes, tuple[int, Entry]] = {}  # path -> (ino, entry without links)
    links: dict[int, list[bytes]] = {}

    def attrs(ino: int) -> tuple[tuple[bytes, bytes], ...]:
        return tuple((name, fs.getxattr(ino, name)) for name in fs.listxattr(ino))

    def visit(path: bytes, ino: int, parent: int) -> None:
        st = fs.getattr(ino)
        perm, xattrs = stat.S_IMODE(st.mode), attrs(ino)
        if st.is_dir:
            dotdot = fs.lookup(ino, b"..").ino
            assert dotdot == parent, f"{path!r}: '..' is inode {dotdot}, expected {parent}"
            dirs[path] = Entry("dir", perm, st.nlink, 0, b"", xattrs, ())
            for name, child, dtype, _ in fs.iterdir(ino):
                cst = fs.getattr(child)
                assert dtype == stat.S_IFMT(cst.mode) >> 12, f"{name!r}: dtype {dtype}"
                visit(path.rstrip(b"/") + b"/" + name, child, ino)
            return
        if stat.S_ISREG(st.mode):
            data = fs.read(ino, 0, st.size)
            assert len(data) == st.size, f"{path!r}: read {len(data)} of {st.size} bytes"
            kind = "file"
        elif stat.S_ISLNK(st.mode):
            data, kind = fs.readlink(ino), "symlink"
        else:
            raise AssertionError(f"{path!r}: unexpected file type {st.mode:o}")
        links.setdefault(ino, []).append(path)
        others[path] = (ino, Entry(kind, perm, st.nlink, st.size, data, xattrs, ()))

    visit(b"/", ROOT_INO, ROOT_INO)
    out = dict(dirs)
    for path, (ino, e) in others.items():
        out[path] = Entry(e.kind, e.perm, e.nlink, e.size, e.data, e.xattrs,
                          tuple(sorted(links[ino])))
    return out


def read_volume(vol: Volume) -> tuple[Form, dict[str, Form]]:
    """The active tree and every snapshot's tree, as `Model.forms()` gives them."""
    active = read_tree(FileSystem(vol))
    snaps = {e.name: read_tree(FileSystem(vol, e.name)) for e in vol.snapshots.entries()}
    return active, snaps


def assert_fsck_clean(vol: Volume) -> None:
    """fsck of the whole volume (active file system and every snapshot) finds nothing."""
    from snapvol.engine.fsck import check

    report = check(vol)
    assert report.clean, "fsck: " + "; ".join(report.problems[:20])


def diff_forms(want: Form, got: Form, what: str = "tree") -> str:
    """A short description of how two forms differ ('' when equal), for assertion text."""
    lines = []
    for path in sorted(set(want) | set(got)):
        a, b = want.get(path), got.get(path)
        if a == b:
            continue
        if a is None:
            lines.append(f"{what}: unexpected {path!r} ({b})")
        elif b is None:
            lines.append(f"{what}: missing {path!r}")
        else:
            fields = [f for f in Entry.__dataclass_fields__
                      if getattr(a, f) != getattr(b, f)]
            detail = ", ".join(
                f"{f}: want {_short(getattr(a, f))} got {_short(getattr(b, f))}" for f in fields)
            lines.append(f"{what}: {path!r} differs in {detail}")
    return "\n".join(lines[:20])


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def assert_volume_matches(vol: Volume, want: tuple[Form, dict[str, Form]]) -> None:
    """The active tree and every snapshot of `vol` equal the model's forms."""
    active, snaps = read_volume(vol)
    want_active, want_snaps = want
    assert sorted(snaps) == sorted(want_snaps), f"snapshots {sorted(snaps)} != {sorted(want_snaps)}"
    problems = [diff_forms(want_active, active, "active")]
    problems += [diff_forms(want_snaps[n], snaps[n], f"snapshot {n}") for n in sorted(snaps)]
    text = "\n".join(p for p in problems if p)
    assert not text, text
