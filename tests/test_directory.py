"""Tests of the on-disk directory B+tree (snapvol.engine.directory).

A dict is the model; an in-memory BlockStore counts block reads so the O(log n) lookup
promise is checked in reads, not in time. Small node limits (few children, small leaves)
make deep trees from a few hundred entries, and a patched name hash packs many names
into few hash groups to exercise the collision path.
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable, Iterator

import pytest
import xxhash
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from snapvol.engine import directory as dirmod
from snapvol.engine.directory import (
    DT_DIR,
    DT_LNK,
    DT_REG,
    DT_TYPES,
    MIN_KEY,
    SEQ_MASK,
    Directory,
    DirEntry,
)
from snapvol.errors import CorruptionError, FsError
from snapvol.layout import dirblock

ZERO = bytes(4096)


class MemStore:
    """A sparse in-memory directory file that counts reads."""

    def __init__(self) -> None:
        self.blocks: dict[int, bytes] = {}
        self._nblocks = 0
        self.reads = 0

    def read_block(self, fbn: int) -> bytes:
        assert 0 <= fbn < self._nblocks, f"read of fbn {fbn} past {self._nblocks}"
        self.reads += 1
        return self.blocks.get(fbn, ZERO)

    def write_block(self, fbn: int, data: bytes) -> None:
        assert 0 <= fbn < self._nblocks, f"write of fbn {fbn} past {self._nblocks}"
        assert len(data) == 4096
        self.blocks[fbn] = bytes(data)

    def punch_block(self, fbn: int) -> None:
        assert 0 <= fbn < self._nblocks, f"punch of fbn {fbn} past {self._nblocks}"
        self.blocks.pop(fbn, None)

    @property
    def nblocks(self) -> int:
        return self._nblocks

    def set_nblocks(self, n: int) -> None:
        if n < self._nblocks:
            for fbn in [f for f in self.blocks if f >= n]:
                del self.blocks[fbn]
        self._nblocks = n


SMALL = {"max_children": 4, "leaf_capacity": 1024, "cache_nodes": 8}
# Reopening with other limits leaves nodes fuller or emptier than the current limits
# would make them, which drives removal through its rarer paths (empty nodes whose
# siblings are too full to merge with).
TUNINGS = [SMALL, {"max_children": 6, "leaf_capacity": 2048, "cache_nodes": 8}, {}]


def name_for(i: int) -> bytes:
    """Deterministic names of varied length (up to ~100 bytes), so leaves fill unevenly."""
    return ((b"%d-" % i) * (1 + i % 23))[:255]


def few_groups(name: bytes) -> int:
    """A hash with only 4 distinct group values (one of them 0, mapped to group 1)."""
    return (xxhash.xxh3_64_intdigest(name) % 4) << 17


@pytest.fixture
def collide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dirmod, "name_hash", few_groups)


def make(**tuning: int) -> tuple[MemStore, Directory]:
    store = MemStore()
    return store, Directory.format(store, 2, **tuning)


# --------------------------------------------------------------------- basics


def test_empty_directory_round_trip() -> None:
    store, d = make()
    assert len(d) == 0
    assert list(d.readdir()) == []
    assert d.check() == []
    assert store.nblocks == 2
    d.parent_ino = 77
    d.flush()
    d = Directory(store)
    assert d.parent_ino == 77
    assert d.height == 1
    assert d.check() == []


def test_insert_lookup_replace_remove() -> None:
    _, d = make()
    e = d.insert(b"a", 10, DT_REG)
    assert e == DirEntry(b"a", 10, DT_REG, e.cookie)
    assert e.cookie >= MIN_KEY
    assert d.lookup(b"a") == e
    assert d.lookup(b"b") is None
    with pytest.raises(FsError) as exists:
        d.insert(b"a", 11, DT_REG)
    assert exists.value.errno == errno.EEXIST
    old = d.replace(b"a", 12, DT_LNK)
    assert old == e
    assert d.lookup(b"a") == DirEntry(b"a", 12, DT_LNK, e.cookie)
    assert d.replace(b"b", 13, DT_DIR) is None
    assert len(d) == 2
    assert d.remove(b"a") == DirEntry(b"a", 12, DT_LNK, e.cookie)
    with pytest.raises(FsError) as missing:
        d.remove(b"a")
    assert missing.value.errno == errno.ENOENT
    assert len(d) == 1
    assert d.check() == []


def test_largest_inode_number_and_all_types() -> None:
    store, d = make()
    for t in sorted(DT_TYPES):
        d.insert(b"t%d" % t, (1 << 64) - t, t)
    d.flush()
    d = Directory(store)
    for t in sorted(DT_TYPES):
        e = d.lookup(b"t%d" % t)
        assert e is not None and e.ino == (1 << 64) - t and e.dtype == t


@pytest.mark.parametrize(
    ("name", "err"),
    [(b"", errno.ENOENT), (b".", errno.EINVAL), (b"..", errno.EINVAL), (b"a/b", errno.EINVAL),
     (b"/", errno.EINVAL), (b"a\0b", errno.EINVAL), (b"\0", errno.EINVAL),
     (b"x" * 256, errno.ENAMETOOLONG)],
)
def test_bad_names_are_refused(name: bytes, err: int) -> None:
    """A name no entry can have is an FsError with the errno a POSIX call answers (the
    rules of snapvol.layout.names), never a built-in exception."""
    _, d = make()
    for op in (lambda: d.insert(name, 5, DT_REG), lambda: d.replace(name, 5, DT_REG),
               lambda: d.lookup(name), lambda: d.find(name), lambda: d.remove(name)):
        with pytest.raises(FsError) as info:
            op()
        assert info.value.errno == err, info.value
        assert not isinstance(info.value, ValueError)
    assert len(d) == 0


def test_name_limits_and_other_refusals() -> None:
    _, d = make()
    d.insert(b"x" * 255, 1, DT_REG)
    d.insert(b"...", 2, DT_REG)
    d.insert(bytes(range(1, 256)).replace(b"/", b""), 3, DT_REG)
    with pytest.raises(TypeError):
        d.insert("str", 1, DT_REG)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        d.insert(b"neg", -1, DT_REG)
    with pytest.raises(ValueError):
        d.insert(b"big", 1 << 64, DT_REG)
    with pytest.raises(ValueError):
        d.insert(b"type", 1, 3)
    with pytest.raises(ValueError):
        d.parent_ino = -1
    with pytest.raises(ValueError):
        list(d.readdir(-1))
    assert len(d) == 3
    assert d.check() == []


def test_format_refuses_a_used_store_and_open_refuses_garbage() -> None:
    store, _ = make()
    with pytest.raises(ValueError):
        Directory.format(store, 2)
    store.write_block(0, b"\x01" * 4096)
    with pytest.raises(CorruptionError):
        Directory(store)
    with pytest.raises(CorruptionError):
        Directory(MemStore())


def test_collision_sequence_takes_lowest_free(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dirmod, "name_hash", lambda name: 0)
    _, d = make()
    a, b, c = (d.insert(n, 1, DT_REG) for n in (b"a", b"b", b"c"))
    # A hash of 0 is moved to group 1, above the cookies kept for "." and "..".
    assert [a.cookie, b.cookie, c.cookie] == [MIN_KEY, MIN_KEY + 1, MIN_KEY + 2]
    d.remove(b"b")
    assert d.insert(b"d", 1, DT_REG).cookie == MIN_KEY + 1
    assert d.lookup(b"c") == c
    assert [e.name for e in d.readdir()] == [b"a", b"d", b"c"]
    assert d.check() == []


def test_collision_group_spanning_many_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    """A group bigger than a leaf: lookups walk leaves, inserts find the free sequence."""
    monkeypatch.setattr(dirmod, "name_hash", lambda name: 1 << 40)
    store, d = make(**SMALL)
    names = [name_for(i) for i in range(300)]
    for i, n in enumerate(names):
        d.insert(n, i, DT_REG)
    assert d.height >= 3
    for n in names[::3]:
        d.remove(n)
    assert d.insert(b"again", 9, DT_REG).cookie & SEQ_MASK == 0
    d.flush()
    d = Directory(store, **SMALL)
    for i, n in enumerate(names):
        e = d.lookup(n)
        assert (e is None) == (i % 3 == 0)
    assert d.check() == []


# --------------------------------------------------------------------- model test


class DirectoryMachine(RuleBasedStateMachine):
    """Random operations against a dict model, with reopens from the store."""

    hash_fn: Callable[[bytes], int] = staticmethod(xxhash.xxh3_64_intdigest)

    def __init__(self) -> None:
        super().__init__()
        self._saved_hash = dirmod.name_hash
        dirmod.name_hash = type(self).hash_fn
        self.store = MemStore()
        self.d = Directory.format(self.store, 2, **SMALL)
        self.model: dict[bytes, DirEntry] = {}

    def teardown(self) -> None:
        dirmod.name_hash = self._saved_hash

    names = st.integers(0, 400).map(name_for)
    inos = st.integers(0, (1 << 64) - 1)
    dtypes = st.sampled_from(sorted(DT_TYPES))

    @rule(name=names, ino=inos, dtype=dtypes)
    def insert(self, name: bytes, ino: int, dtype: int) -> None:
        if name in self.model:
            with pytest.raises(FsError, match="File exists"):
                self.d.insert(name, ino, dtype)
            return
        e = self.d.insert(name, ino, dtype)
        assert (e.name, e.ino, e.dtype) == (name, ino, dtype)
        assert e.cookie >= MIN_KEY
        assert e.cookie not in {m.cookie for m in self.model.values()}
        self.model[name] = e

    @rule(start=st.integers(0, 400), count=st.integers(1, 80))
    def insert_many(self, start: int, count: int) -> None:
        for i in range(start, start + count):
            name = name_for(i)
            if name not in self.model:
                self.model[name] = self.d.insert(name, i, DT_REG)

    @rule(name=names)
    def remove(self, name: bytes) -> None:
        if name not in self.model:
            with pytest.raises(FsError, match="No such file"):
                self.d.remove(name)
            return
        assert self.d.remove(name) == self.model.pop(name)

    @rule(start=st.integers(0, 400), count=st.integers(1, 80))
    def remove_many(self, start: int, count: int) -> None:
        for i in range(start, start + count):
            name = name_for(i)
            if name in self.model:
                assert self.d.remove(name) == self.model.pop(name)

    @rule(name=names, ino=inos, dtype=dtypes)
    def replace(self, name: bytes, ino: int, dtype: int) -> None:
        old = self.d.replace(name, ino, dtype)
        assert old == self.model.get(name)
        cookie = old.cookie if old is not None else None
        new = self.d.lookup(name)
        assert new is not None and (new.ino, new.dtype) == (ino, dtype)
        if cookie is not None:
            assert new.cookie == cookie
        self.model[name] = new

    @rule(name=names)
    def lookup(self, name: bytes) -> None:
        assert self.d.lookup(name) == self.model.get(name)

    @rule(data=st.data())
    def readdir_from(self, data: st.DataObject) -> None:
        expected = sorted(self.model.values(), key=lambda e: e.cookie)
        cut = data.draw(st.integers(0, len(expected)))
        after = expected[cut - 1].cookie if cut else data.draw(st.integers(0, MIN_KEY - 1))
        assert list(self.d.readdir(after)) == expected[cut:]

    @rule(tuning=st.sampled_from(TUNINGS))
    def flush_and_reopen(self, tuning: dict[str, int]) -> None:
        self.d.flush()
        self.d = Directory(self.store, **tuning)

    @rule()
    def drop_cache(self) -> None:
        self.d.drop_cache()

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def remove_all(self) -> None:
        for name in list(self.model):
            assert self.d.remove(name) == self.model.pop(name)
        self.d.flush()
        assert self.store.nblocks == 2
        assert set(self.store.blocks) <= {0, 1}

    @invariant()
    def consistent(self) -> None:
        event(f"height {self.d.height}")
        assert len(self.d) == len(self.model)
        assert self.d.check() == []


class CollidingDirectoryMachine(DirectoryMachine):
    """The same, with every name in one of four hash groups."""

    hash_fn = staticmethod(few_groups)


_machine_settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDirectoryModel = DirectoryMachine.TestCase
TestDirectoryModel.settings = _machine_settings
TestCollidingDirectoryModel = CollidingDirectoryMachine.TestCase
TestCollidingDirectoryModel.settings = _machine_settings


# --------------------------------------------------------------------- readdir stability


def _walk_while_changing(d: Directory, store: MemStore, seed: int, size: int) -> None:
    """Walk with readdir while inserting and removing other names between steps."""
    rng = random.Random(seed)
    stable = {name_for(i) for i in range(0, size, 2)}
    churn = [name_for(i) for i in range(1, size, 2)]
    present_churn = set(churn[: size // 4])
    for n in sorted(stable | present_churn):
        d.insert(n, 1, DT_REG)
    seen: list[DirEntry] = []
    walk: Iterator[DirEntry] = d.readdir()
    reopen_every = 97
    for step in range(10**6):
        entry = next(walk, None)
        if entry is None:
            break
        seen.append(entry)
        for _ in range(rng.randrange(4)):
            n = rng.choice(churn)
            if n in present_churn:
                d.remove(n)
                present_churn.discard(n)
            else:
                d.insert(n, 2, DT_REG)
                present_churn.add(n)
        if step % reopen_every == reopen_every - 1:
            # Resume from the cookie in a freshly opened directory, as NFS or a
            # restarted FUSE readdir would.
            d.flush()
            d = Directory(store, **SMALL)
            walk = d.readdir(entry.cookie)
    cookies = [e.cookie for e in seen]
    assert cookies == sorted(set(cookies)), "cookies must strictly increase"
    returned = [e.name for e in seen if e.name in stable]
    assert sorted(returned) == sorted(stable), "stable names must come back exactly once"
    assert d.check() == []


def test_readdir_is_stable_while_the_directory_changes() -> None:
    store, d = make(**SMALL)
    _walk_while_changing(d, store, seed=1, size=3000)


def test_readdir_is_stable_with_hash_collisions(collide: None) -> None:
    # Every insert scans its whole group here, so keep the directory smaller.
    store, d = make(**SMALL)
    _walk_while_changing(d, store, seed=2, size=1000)


def test_readdir_cookie_survives_splits_and_merges() -> None:
    _, d = make(**SMALL)
    for i in range(0, 400, 2):
        d.insert(name_for(i), i, DT_REG)
    first = list(d.readdir())[:50]
    mark = first[-1].cookie
    for i in range(1, 400, 2):  # splits everywhere
        d.insert(name_for(i), i, DT_REG)
    for i in range(0, 400, 4):  # merges and frees
        d.remove(name_for(i))
    rest = list(d.readdir(mark))
    assert all(e.cookie > mark for e in rest)
    expected = sorted((e for e in d.readdir() if e.cookie > mark), key=lambda e: e.cookie)
    assert rest == expected


# --------------------------------------------------------------------- scale


def _scale(n: int) -> dict[str, float]:
    store, d = make()
    names = [b"file-%08d.txt" % i for i in range(n)]
    t0 = time.perf_counter()
    for i, name in enumerate(names):
        d.insert(name, i + 100, DT_REG)
    t1 = time.perf_counter()
    d.flush()
    assert len(d) == n
    height = d.height
    assert height <= 3
    sample = random.Random(7).sample(names, 2000)
    t2 = time.perf_counter()
    for name in sample:
        assert d.lookup(name) is not None
    t3 = time.perf_counter()
    # Cold lookups: a fresh Directory (empty cache) reads the header, then one block
    # per level.
    for name in sample[:300]:
        before = store.reads
        cold = Directory(store)
        e = cold.lookup(name)
        assert e is not None and e.name == name
        assert store.reads - before <= height + 1
    d = Directory(store)
    t4 = time.perf_counter()
    walked = sum(1 for _ in d.readdir())
    t5 = time.perf_counter()
    assert walked == n
    assert d.check() == []
    for name in names[::2]:
        d.remove(name)
    d.flush()
    assert Directory(store).check() == []
    t6 = time.perf_counter()
    for name in names[1::2]:
        d.remove(name)
    t7 = time.perf_counter()
    d.flush()
    assert store.nblocks == 2
    assert d.check() == []
    return {
        "insert": t1 - t0,
        "lookup": (t3 - t2) / len(sample),
        "readdir": t5 - t4,
        "remove": t7 - t6,
    }


def test_hundred_thousand_entries() -> None:
    times = _scale(100_000)
    print(times)


@pytest.mark.long
def test_million_entries() -> None:
    times = _scale(1_000_000)
    print(times)


def test_emptied_leaves_between_full_siblings() -> None:
    """Leaves that empty out while their siblings are too full to merge get unlinked."""
    store, d = make(max_children=8)
    for i in range(3000):
        d.insert(name_for(i), i, DT_REG)
    d.flush()
    assert d.height >= 3
    leaves = sorted(
        (rec.keys[0], rec.names)
        for fbn, block in store.blocks.items()
        if fbn and dirblock.node_kind(block, "t") == dirblock.KIND_LEAF
        for rec in [dirblock.decode_leaf(block, "t")]
    )
    # Small limits: the 4 KiB leaves written above are now far too full to merge, so
    # leaves empty out at every position under their parents.
    d = Directory(store, **SMALL)
    for n, (_, names) in enumerate(leaves):
        if n % 3 != 2:
            for name in names:
                d.remove(name)
            assert d.check() == []
    for _, names in leaves[2::3]:
        for name in names[1:]:
            d.remove(name)
        assert d.check() == []
    assert len(d) == len(leaves[2::3])


# --------------------------------------------------------------------- space


def test_directory_shrinks_back_when_emptied() -> None:
    store, d = make()
    names = [name_for(i) for i in range(5000)]
    for n in names:
        d.insert(n, 1, DT_REG)
    d.flush()
    grown = store.nblocks
    assert grown > 20
    for n in names:
        d.remove(n)
    d.flush()
    assert store.nblocks == 2
    assert set(store.blocks) <= {0, 1}
    d = Directory(store)
    assert len(d) == 0 and d.height == 1 and list(d.readdir()) == []
    assert d.check() == []
    d.insert(b"again", 3, DT_REG)
    assert d.check() == []


def test_freed_nodes_are_holes_and_get_reused() -> None:
    store, d = make(**SMALL)
    names = [name_for(i) for i in range(6000)]
    for n in names:
        d.insert(n, 1, DT_REG)
    d.flush()
    grown = store.nblocks
    keep = set(names[::40])
    for n in names:
        if n not in keep:
            d.remove(n)
    d.flush()
    assert d.check() == []
    # Most of the file is now holes on the free list (more than one trunk's worth).
    assert len(store.blocks) < grown // 4
    assert grown - len(store.blocks) > dirblock.TRUNK_CAPACITY
    d = Directory(store, **SMALL)
    assert d.check() == []
    for n in names:
        if n not in keep:
            d.insert(n, 2, DT_REG)
    d.flush()
    assert store.nblocks < grown * 1.1  # without reuse it would be about 2 * grown
    assert d.check() == []


# --------------------------------------------------------------------- block layouts


@given(
    st.lists(
        st.tuples(
            st.binary(min_size=1, max_size=255).filter(lambda b: b"\0" not in b),
            st.integers(0, (1 << 64) - 1),
            st.sampled_from(sorted(DT_TYPES)),
        ),
        max_size=14,
    ),
)
def test_leaf_round_trip(entries: list[tuple[bytes, int, int]]) -> None:
    keys = list(range(MIN_KEY, MIN_KEY + len(entries)))
    names = [e[0] for e in entries]
    inos = [e[1] for e in entries]
    dtypes = bytearray(e[2] for e in entries)
    block = dirblock.encode_leaf(keys, inos, dtypes, names)
    assert len(block) == 4096
    rec = dirblock.decode_leaf(block, "t")
    assert (rec.keys, rec.inos, rec.dtypes, rec.names) == (keys, inos, dtypes, names)
    assert dirblock.entry_bytes(names) <= dirblock.LEAF_CAPACITY


def test_other_blocks_round_trip() -> None:
    header = dirblock.DirHeader(3, 9, 10**6, 2, 17, 600, 12000)
    assert dirblock.decode_header(dirblock.encode_header(header)) == header
    keys = list(range(MIN_KEY, MIN_KEY + dirblock.MAX_CHILDREN - 1))
    children = list(range(1, dirblock.MAX_CHILDREN + 1))
    rec = dirblock.decode_internal(dirblock.encode_internal(2, keys, children), "t")
    assert (rec.level, rec.keys, rec.children) == (2, keys, children)
    fbns = list(range(5, 5 + dirblock.TRUNK_CAPACITY))
    trunk = dirblock.decode_trunk(dirblock.encode_trunk(4, fbns), "t")
    assert (trunk.next, trunk.fbns) == (4, fbns)
    with pytest.raises(ValueError):
        dirblock.encode_internal(1, [*keys, 1 << 62], [*children, 999])
    with pytest.raises(ValueError):
        dirblock.encode_trunk(0, [*fbns, 1])
    with pytest.raises(ValueError):
        dirblock.encode_leaf([MIN_KEY] * 16, [1] * 16, bytearray(16), [b"x" * 255] * 16)


def test_damaged_leaf_names_are_refused() -> None:
    block = bytearray(
        dirblock.encode_leaf([MIN_KEY, MIN_KEY + 1], [1, 2], bytearray(b"\x08\x08"), [b"ab", b"cd"])
    )
    names_at = dirblock.NODE_HEADER_SIZE + 17 * 2
    for damage in (b"a\0\0d\0", b"abcd\0", b"ab\0cd\0x"):
        bad = bytearray(block)
        bad[names_at : names_at + len(damage)] = damage
        with pytest.raises(CorruptionError):
            dirblock.decode_leaf(bytes(bad), "leaf 7")
    with pytest.raises(CorruptionError, match="leaf 7"):
        dirblock.decode_internal(bytes(block), "leaf 7")


# --------------------------------------------------------------------- fsck


def test_check_reports_damage() -> None:
    store, d = make(**SMALL)
    for i in range(200):
        d.insert(name_for(i), i, DT_REG)
    d.flush()
    leaves = [
        fbn
        for fbn, block in store.blocks.items()
        if fbn and dirblock.node_kind(block, "t") == dirblock.KIND_LEAF
    ]
    fbn = leaves[len(leaves) // 2]
    rec = dirblock.decode_leaf(store.blocks[fbn], "t")
    # Swap two keys: order breaks and keys no longer match their names' hashes.
    rec.keys[0], rec.keys[1] = rec.keys[1], rec.keys[0]
    store.blocks[fbn] = dirblock.encode_leaf(rec.keys, rec.inos, rec.dtypes, rec.names)
    problems = Directory(store, **SMALL).check()
    assert any("ascending" in p for p in problems)
    assert any("hash" in p for p in problems)

    store.blocks[fbn] = ZERO  # a node lost to a hole
    damaged = Directory(store, **SMALL)
    assert any(f"block {fbn}" in p for p in damaged.check())
    with pytest.raises(CorruptionError):
        for i in range(200):
            damaged.lookup(name_for(i))


def test_check_reports_a_leaked_block() -> None:
    store, d = make()
    d.insert(b"a", 1, DT_REG)
    d.flush()
    store.set_nblocks(3)
    assert any("neither in the tree nor free" in p for p in Directory(store).check())
