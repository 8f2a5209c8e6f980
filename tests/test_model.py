"""Model-based tests: random operations on the engine and on `model.Model`, compared.

A hypothesis `RuleBasedStateMachine` drives one volume on a MemoryDevice through file
and directory operations, snapshots, restores, CPs and close/reopen. After every step the
active tree and every snapshot's tree must equal the model's (names, types, contents,
sizes, modes, xattrs, link counts and hard-link groups), and every failing operation must
fail with an errno the model allows. After each example fsck must find the volume clean,
and so must a fresh open of the same device, which must still equal the model.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from conftest import assert_fsck_clean, assert_volume_matches
from model import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Dir,
    File,
    Model,
    ModelError,
    ModelSnapshotError,
    Symlink,
    join,
    split,
)
from snapvol.device import MemoryDevice
from snapvol.engine import snapshots
from snapvol.engine.snaptable import SnapshotError
from snapvol.engine.volume import Volume
from snapvol.errors import FsError
from snapvol.fs import FileSystem

NBLOCKS = 8192  # 32 MiB, sparse in memory
NAMES = [b"a", b"b", b"c", b"d", b"e", b"f"]
SNAP_NAMES = ["s0", "s1", "s2", "s3"]
XATTR_NAMES = [b"user.a", b"user.b", b"trusted.c"]
TARGETS = [b"a", b"../b", b"/abs/olute", b"t" * 300, b"long/" * 819]
BS = 4096

ix = st.integers(0, 1 << 16)
names = st.sampled_from(NAMES)
offsets = st.one_of(
    st.integers(0, 3 * BS),
    st.integers(0, 40).map(lambda b: b * BS),
    st.integers(1, 300).map(lambda b: b * BS - 1),
    st.integers(0, 1 << 20),
)
lengths = st.one_of(st.integers(0, 300), st.integers(0, 3 * BS + 10), st.sampled_from([BS, 2 * BS]),
                    st.integers(4, 48).map(lambda b: b * BS + 5))
sizes = st.one_of(st.integers(0, 4 * BS), st.integers(0, 1 << 21))
perms = st.sampled_from([0o644, 0o600, 0o755, 0o700, 0o4755, 0o1777, 0o000])


def payload(seed: int, n: int) -> bytes:
    """Bytes to write: zeros for seed 0 (zeros must not read back as holes or vice versa),
    otherwise pseudo-random."""
    return bytes(n) if seed == 0 else random.Random(seed).randbytes(n)


class VolumeMachine(RuleBasedStateMachine):
    """One volume and its model; rules apply the same operation to both."""

    nblocks = NBLOCKS
    may_fill = False  # whether ENOSPC is an expected outcome (a volume made to fill up)

    def __init__(self) -> None:
        super().__init__()
        self.dev = MemoryDevice(self.nblocks)
        Volume.format(self.dev)
        self.vol = Volume.on_device(self.dev)
        self.vol.cp_interval = 1e9  # CPs only where a rule asks: keeps examples replayable
        self.fs = FileSystem(self.vol)
        self.model = Model()

    # ---- picking paths --------------------------------------------------------------
    def _parent(self, i: int) -> bytes:
        """Usually an existing directory; one time in eight any path (ENOTDIR cases)."""
        tree = self.model.active
        pool = tree.paths() if i % 8 == 0 else tree.dirs()
        return pool[(i // 8) % len(pool)]

    def _existing(self, i: int, pool: list[bytes]) -> bytes:
        """A path from `pool` (all non-root paths when it is empty or one time in eight)."""
        if not pool or i % 8 == 0:
            pool = [p for p in self.model.active.paths() if p != b"/"] or [b"/nope"]
        return pool[(i // 8) % len(pool)]

    def _not_symlinks(self) -> list[bytes]:
        return [p for p, o in self.model.active.walk() if not isinstance(o, Symlink)]

    def _ino(self, path: bytes) -> int:
        return self.fs.resolve(path, follow=False)

    # ---- the comparison of outcomes ---------------------------------------------------
    def _both(self, engine: Callable[[], object], model: Callable[[], None], what: str,
              refused: Callable[[], None] | None = None) -> None:
        """Run one operation on both; they must agree on success or on the errno.

        On a volume made to fill up the engine may also refuse with ENOSPC: then the model
        goes back to its state before the operation, and `refused` (if given) checks and
        takes over what a refused operation may legally have done (a partial write)."""
        saved = self.model.active.copy() if self.may_fill else None
        try:
            model()
            want: frozenset[int] | None = None
        except ModelError as e:
            want = e.errnos
        try:
            engine()
            got = None
        except FsError as e:
            got = e.errno
        if got == errno.ENOSPC and saved is not None:
            event(f"ENOSPC in {what.split()[0]}")
            self.model.active = saved
            if refused is not None:
                refused()
            return
        op = what.split()[0]
        event(f"{op}: {errno.errorcode[got] if got is not None else 'ok'}"
              + (" (exchange)" if what.endswith("flags=2") else ""))
        if want is None:
            assert got is None, f"{what}: engine failed with {errno.errorcode[got]}"
        else:
            shown = {errno.errorcode[w] for w in want}
            assert got is not None, f"{what}: engine succeeded, model expects one of {shown}"
            assert got in want, f"{what}: engine gave {errno.errorcode[got]}, model {shown}"

    # ---- creating -----------------------------------------------------------------------
    @rule(p=ix, name=names, perm=perms)
    def create(self, p: int, name: bytes, perm: int) -> None:
        parent = self._parent(p)
        self._both(lambda: self.fs.create(self._ino(parent), name, perm),
                   lambda: self.model.active.create(parent, name, perm),
                   f"create {join(parent, name)!r}")

    @rule(p=ix, name=names, perm=perms)
    def mkdir(self, p: int, name: bytes, perm: int) -> None:
        parent = self._parent(p)
        self._both(lambda: self.fs.mkdir(self._ino(parent), name, perm),
                   lambda: self.model.active.mkdir(parent, name, perm),
                   f"mkdir {join(parent, name)!r}")

    @rule(p=ix, name=names, t=st.integers(0, len(TARGETS) - 1))
    def symlink(self, p: int, name: bytes, t: int) -> None:
        parent, dest = self._parent(p), TARGETS[t]
        self._both(lambda: self.fs.symlink(self._ino(parent), name, dest),
                   lambda: self.model.active.symlink(parent, name, dest),
                   f"symlink {join(parent, name)!r}")

    @rule(s=ix, p=ix, name=names)
    def link(self, s: int, p: int, name: bytes) -> None:
        tree = self.model.active
        src = self._existing(s, [p for p, o in tree.walk() if not isinstance(o, Dir)])
        parent = self._parent(p)
        self._both(lambda: self.fs.link(self._ino(src), self._ino(parent), name),
                   lambda: tree.link(src, parent, name),
                   f"link {src!r} {join(parent, name)!r}")

    # ---- data ---------------------------------------------------------------------------
    @rule(f=ix, offset=offsets, n=lengths, seed=st.integers(0, 1 << 30))
    def write(self, f: int, offset: int, n: int, seed: int) -> None:
        path = self._existing(f, self.model.active.files())
        data = payload(seed, n)
        obj = self.model.active.get(path)
        before = bytes(obj.data) if isinstance(obj, File) else b""

        def refused() -> None:
            """A refused write keeps the size; each byte it covered is old or new."""
            got = self.fs.read(self._ino(path), 0, len(before) + 1)
            assert len(got) == len(before), f"refused write {path!r} changed the size"
            for i, byte in enumerate(got):
                new = data[i - offset] if offset <= i < offset + n else before[i]
                assert byte in (before[i], new), f"refused write {path!r}: byte {i}"
            kept = self.model.active.get(path)
            assert isinstance(kept, File)
            kept.data = bytearray(got)

        self._both(lambda: self.fs.write(self._ino(path), offset, data),
                   lambda: self.model.active.write(path, offset, data),
                   f"write {path!r} {offset}+{n}", refused)

    @rule(f=ix, size=sizes)
    def truncate(self, f: int, size: int) -> None:
        path = self._existing(f, self.model.active.files())
        self._both(lambda: self.fs.setattr(self._ino(path), size=size),
                   lambda: self.model.active.truncate(path, size),
                   f"truncate {path!r} {size}")

    @rule(f=ix, offset=offsets, n=lengths)
    def read_range(self, f: int, offset: int, n: int) -> None:
        """Partial reads (the invariant reads whole files) agree with the model."""
        path = self._existing(f, self.model.active.files())
        if not isinstance(self.model.active.get(path), File):
            return
        want = self.model.active.read(path)[offset : offset + n]
        assert self.fs.read(self._ino(path), offset, n) == want

    # ---- attributes ---------------------------------------------------------------------
    @rule(f=ix, perm=perms)
    def chmod(self, f: int, perm: int) -> None:
        tree = self.model.active
        path = self._existing(f, self._not_symlinks())
        if isinstance(tree.get(path), Symlink):
            return  # Linux has no chmod of a symlink itself
        self._both(lambda: self.fs.setattr(self._ino(path), mode=perm),
                   lambda: tree.chmod(path, perm), f"chmod {path!r}")

    @rule(f=ix, name=st.sampled_from(XATTR_NAMES), n=st.integers(0, 6000),
          seed=st.integers(1, 1 << 30))
    def setxattr(self, f: int, name: bytes, n: int, seed: int) -> None:
        tree = self.model.active
        path = self._existing(f, self._not_symlinks())
        if isinstance(tree.get(path), Symlink):
            return  # user xattrs on symlinks are refused by Linux before a file system sees them
        value = payload(seed, n)
        self._both(lambda: self.fs.setxattr(self._ino(path), name, value),
                   lambda: tree.setxattr(path, name, value), f"setxattr {path!r} {name!r}")

    @rule(f=ix, name=st.sampled_from(XATTR_NAMES))
    def removexattr(self, f: int, name: bytes) -> None:
        tree = self.model.active
        path = self._existing(f, self._not_symlinks())
        if isinstance(tree.get(path), Symlink):
            return
        self._both(lambda: self.fs.removexattr(self._ino(path), name),
                   lambda: tree.removexattr(path, name), f"removexattr {path!r} {name!r}")

    # ---- removing -----------------------------------------------------------------------
    @rule(p=ix, name=names)
    def unlink(self, p: int, name: bytes) -> None:
        parent = self._parent(p)
        self._both(lambda: self.fs.unlink(self._ino(parent), name),
                   lambda: self.model.active.unlink(parent, name),
                   f"unlink {join(parent, name)!r}")

    @rule(p=ix, name=names)
    def rmdir(self, p: int, name: bytes) -> None:
        parent = self._parent(p)
        self._both(lambda: self.fs.rmdir(self._ino(parent), name),
                   lambda: self.model.active.rmdir(parent, name),
                   f"rmdir {join(parent, name)!r}")

    @rule(s=ix, p=ix, name=names,
          flags=st.sampled_from([0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, s: int, p: int, name: bytes, flags: int) -> None:
        tree = self.model.active
        if s % 8 == 0:  # a name that may not exist (ENOENT)
            sparent, sname = self._parent(s // 8), NAMES[s % len(NAMES)]
        else:
            sparent, sname = split(self._existing(s, [q for q in tree.paths() if q != b"/"]))
        dparent = self._parent(p)
        self._both(
            lambda: self.fs.rename(self._ino(sparent), sname, self._ino(dparent), name, flags),
            lambda: tree.rename(sparent, sname, dparent, name, flags),
            f"rename {join(sparent, sname)!r} {join(dparent, name)!r} flags={flags}")

    # ---- snapshots and the volume ---------------------------------------------------------
    def _snap(self, engine: Callable[[], object], model: Callable[[], None], what: str) -> None:
        saved = self.model.copy()
        try:
            model()
            refused = False
        except ModelSnapshotError:
            refused = True
        if refused:
            with pytest.raises(SnapshotError):
                engine()
            return
        try:
            engine()
        except FsError as e:
            assert e.errno == errno.ENOSPC and self.may_fill, f"{what}: {e}"
            event(f"ENOSPC in {what.split()[0]}")
            self.model = saved

    @rule(name=st.sampled_from(SNAP_NAMES))
    def snapshot_create(self, name: str) -> None:
        self._snap(lambda: snapshots.create(self.vol, name),
                   lambda: self.model.snapshot_create(name), f"snapshot {name}")

    @rule(name=st.sampled_from(SNAP_NAMES))
    def snapshot_delete(self, name: str) -> None:
        self._snap(lambda: snapshots.delete(self.vol, name),
                   lambda: self.model.snapshot_delete(name), f"delete {name}")

    @rule(old=st.sampled_from(SNAP_NAMES), new=st.sampled_from(SNAP_NAMES))
    def snapshot_rename(self, old: str, new: str) -> None:
        self._snap(lambda: snapshots.rename(self.vol, old, new),
                   lambda: self.model.snapshot_rename(old, new), f"rename {old} {new}")

    @rule(name=st.sampled_from(SNAP_NAMES))
    def snapshot_restore(self, name: str) -> None:
        self._snap(lambda: snapshots.restore(self.vol, name),
                   lambda: self.model.snapshot_restore(name), f"restore {name}")

    @rule()
    def cp(self) -> None:
        self.vol.cp()

    @rule()
    def reopen(self) -> None:
        self.vol.close()
        self.vol = Volume.on_device(self.dev)
        self.vol.cp_interval = 1e9
        self.fs = FileSystem(self.vol)

    # ---- checks -------------------------------------------------------------------------
    @invariant()
    def matches_model(self) -> None:
        assert_volume_matches(self.vol, self.model.forms())

    def teardown(self) -> None:
        """fsck, then a fresh open of the device (no cached blocks) must equal the model."""
        assert_fsck_clean(self.vol)
        self.vol.close()
        vol = Volume.on_device(self.dev)
        assert_volume_matches(vol, self.model.forms())
        assert_fsck_clean(vol)
        vol.close()


def _settings(examples: int, steps: int) -> settings:
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class FullVolumeMachine(VolumeMachine):
    """The same on a 1 MiB volume that fills up: ENOSPC paths, and the CPs the engine
    commits in the middle of an operation to reclaim freed blocks."""

    nblocks = 256
    may_fill = True

    @rule(p=ix, name=names, first=st.integers(0, 64), blocks=st.integers(8, 96),
          seed=st.integers(0, 99))
    def fill(self, p: int, name: bytes, first: int, blocks: int, seed: int) -> None:
        """Create a file (if the name is free) and write many blocks to it."""
        parent = self._parent(p)
        path = join(parent, name)
        if self.model.active.get(path) is None:
            self.create(p, name, 0o644)
        if isinstance(self.model.active.get(path), File):
            i = self.model.active.files().index(path)
            self.write(i * 8 + 1, first * BS, blocks * BS, seed)


class TestVolumeModel(VolumeMachine.TestCase):  # type: ignore[name-defined,misc]
    settings = _settings(600, 80)


class TestFullVolumeModel(FullVolumeMachine.TestCase):  # type: ignore[name-defined,misc]
    settings = _settings(150, 60)


@pytest.mark.long
class TestVolumeModelLong(VolumeMachine.TestCase):  # type: ignore[name-defined,misc]
    settings = _settings(2000, 120)


@pytest.mark.long
class TestFullVolumeModelLong(FullVolumeMachine.TestCase):  # type: ignore[name-defined,misc]
    settings = _settings(2000, 120)
