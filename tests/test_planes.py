"""Bitplanes and their algebra, checked against Python sets of ints."""

from __future__ import annotations

import random
from contextlib import ExitStack
from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapvol.planes import (
    BITS_PER_PLANE_BLOCK,
    PLANE_BLOCK_BYTES,
    Plane,
    algebra,
    count_difference,
    count_free,
    difference,
    difference_into,
    find_free,
    intersection,
    is_subset,
    union,
    union_into,
)

# Sizes around the edges that matter: a word (64 bits) and a plane block (32768 bits).
SIZES = st.sampled_from([1, 63, 64, 65, 1000, 32767, 32768, 32769, 70000])


@st.composite
def plane_and_set(draw: st.DrawFn, nblocks: int | None = None) -> tuple[Plane, set[int]]:
    n = draw(SIZES) if nblocks is None else nblocks
    members = draw(st.sets(st.integers(0, n - 1), max_size=200))
    if draw(st.booleans()):  # some long runs as well as scattered bits
        start = draw(st.integers(0, n - 1))
        members |= set(range(start, min(n, start + draw(st.integers(0, 3000)))))
    plane = Plane.zeros(n)
    plane.set_many(np.array(sorted(members), dtype=np.int64))
    return plane, members


@st.composite
def planes_of_one_size(draw: st.DrawFn, count: int) -> list[tuple[Plane, set[int]]]:
    n = draw(SIZES)
    return [draw(plane_and_set(n)) for _ in range(count)]


def from_set(nblocks: int, members: set[int]) -> Plane:
    plane = Plane.zeros(nblocks)
    plane.set_many(np.array(sorted(members), dtype=np.int64))
    return plane


def as_set(plane: Plane) -> set[int]:
    return set(plane.members().tolist())


def changed_blocks(before: Plane, after: Plane) -> set[int]:
    return {
        pb for pb in range(before.plane_blocks) if before.block_bytes(pb) != after.block_bytes(pb)
    }


# -- single planes ---------------------------------------------------------------------


@given(SIZES, st.lists(st.tuples(st.sampled_from("sc"), st.integers(0, 10**6)), max_size=60))
def test_single_bit_operations_match_a_set(n: int, ops: list[tuple[str, int]]) -> None:
    plane = Plane.zeros(n)
    model: set[int] = set()
    for op, raw in ops:
        vbn = raw % n
        if op == "s":
            plane.set(vbn)
            model.add(vbn)
        else:
            plane.clear(vbn)
            model.discard(vbn)
        assert plane.test(vbn) == (vbn in model)
    assert as_set(plane) == model
    assert plane.count() == len(model)
    assert plane.members().dtype == np.uint64
    assert list(plane.members()) == sorted(model)


@given(plane_and_set(), st.lists(st.integers(0, 10**6), max_size=300), st.booleans())
def test_many_bit_operations_match_a_set(
    ps: tuple[Plane, set[int]], raw: list[int], setting: bool
) -> None:
    plane, model = ps
    vbns = np.array([v % plane.nblocks for v in raw], dtype=np.int64)  # duplicates included
    if setting:
        plane.set_many(vbns)
        model |= set(vbns.tolist())
    else:
        plane.clear_many(vbns.astype(np.uint64))
        model -= set(vbns.tolist())
    assert as_set(plane) == model
    probe = np.arange(plane.nblocks)
    assert plane.test_many(probe).tolist() == [v in model for v in range(plane.nblocks)]


@given(plane_and_set(), st.integers(0, 10**6), st.integers(0, 100_000), st.booleans())
def test_ranges_match_a_set(
    ps: tuple[Plane, set[int]], raw_start: int, raw_count: int, setting: bool
) -> None:
    plane, model = ps
    start = raw_start % plane.nblocks
    count = raw_count % (plane.nblocks - start + 1)
    before = plane.copy()
    plane.mark_clean()
    if setting:
        plane.set_range(start, count)
        model |= set(range(start, start + count))
    else:
        plane.clear_range(start, count)
        model -= set(range(start, start + count))
    assert as_set(plane) == model
    assert plane.count() == len(model)
    assert plane.dirty_blocks() == changed_blocks(before, plane)


def test_test_many_keeps_shape() -> None:
    plane = from_set(100, {3, 50})
    result = plane.test_many(np.array([[3, 4], [50, 99]]))
    assert result.dtype == np.bool_
    assert result.tolist() == [[True, False], [True, False]]


@pytest.mark.parametrize("bad", [-1, 100])
def test_out_of_range_bits_refused(bad: int) -> None:
    plane = Plane.zeros(100)
    for call in (plane.set, plane.clear, plane.test):
        with pytest.raises(IndexError):
            call(bad)
    with pytest.raises(IndexError):
        plane.set_many(np.array([5, bad]))
    with pytest.raises(IndexError):
        plane.set_range(99, 2) if bad > 0 else plane.set_range(-1, 1)
    assert plane.count() == 0 and not plane.dirty_blocks()


def test_non_integer_vbns_refused() -> None:
    with pytest.raises(TypeError):
        Plane.zeros(10).set_many(np.array([1.0, 2.0]))
    Plane.zeros(10).set_many(np.array([]))  # an empty array of any dtype is nothing to do


def test_geometry() -> None:
    assert Plane.zeros(0).plane_blocks == 0
    assert Plane.zeros(1).plane_blocks == 1
    assert Plane.zeros(BITS_PER_PLANE_BLOCK).plane_blocks == 1
    plane = Plane.zeros(BITS_PER_PLANE_BLOCK + 1)
    assert plane.plane_blocks == 2
    assert plane.words.dtype == np.dtype("<u8")
    assert plane.words.size == 2 * 512


def test_constructor_checks_words() -> None:
    words = np.zeros(512, dtype=np.uint64)
    words[1] = 1  # bit 64
    assert Plane(65, words).members().tolist() == [64]
    with pytest.raises(ValueError, match="past block"):
        Plane(64, words)
    with pytest.raises(ValueError, match="words"):
        Plane(65, np.zeros(511, dtype=np.uint64))


@given(plane_and_set())
def test_equality_is_content(ps: tuple[Plane, set[int]]) -> None:
    plane, model = ps
    twin = from_set(plane.nblocks, model)
    assert plane == twin
    assert plane != Plane.zeros(plane.nblocks + 1)
    if model:
        twin.clear(min(model))
        assert plane != twin


# -- on-disk encoding ------------------------------------------------------------------


def test_bit_order_is_little_within_bytes() -> None:
    plane = Plane.zeros(3 * BITS_PER_PLANE_BLOCK)
    for vbn in (0, 9, 63, 64, BITS_PER_PLANE_BLOCK + 15, 3 * BITS_PER_PLANE_BLOCK - 1):
        plane.set(vbn)
    first = plane.block_bytes(0)
    assert len(first) == PLANE_BLOCK_BYTES
    assert first[0] == 0x01  # bit 0
    assert first[1] == 0x02  # bit 9 = byte 1, bit 1
    assert first[7] == 0x80  # bit 63
    assert first[8] == 0x01  # bit 64
    assert sum(1 for b in first if b) == 4
    second = plane.block_bytes(1)
    assert second[1] == 0x80 and sum(1 for b in second if b) == 1
    assert plane.block_bytes(2)[-1] == 0x80


@given(plane_and_set())
def test_block_encoding_round_trip(ps: tuple[Plane, set[int]]) -> None:
    plane, model = ps
    copy = Plane.zeros(plane.nblocks)
    for pb in range(plane.plane_blocks):
        data = plane.block_bytes(pb)
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
        expected = {pb * BITS_PER_PLANE_BLOCK + int(i) for i in np.flatnonzero(bits)}
        assert expected == {v for v in model if v // BITS_PER_PLANE_BLOCK == pb}
        copy.load_block(pb, data)
    assert copy == plane
    assert not copy.dirty_blocks()  # loading makes memory agree with disk
    assert Plane.from_bytes(plane.nblocks, plane.to_bytes()) == plane


def test_load_block_ignores_bits_past_the_end() -> None:
    plane = Plane.zeros(100)
    plane.load_block(0, b"\xff" * PLANE_BLOCK_BYTES)
    assert plane.count() == 100
    assert Plane.from_bytes(100, b"\xff" * PLANE_BLOCK_BYTES).count() == 100
    with pytest.raises(ValueError):
        plane.load_block(0, b"\0" * 100)
    with pytest.raises(IndexError):
        plane.block_bytes(1)


def test_nonzero_blocks() -> None:
    plane = Plane.zeros(5 * BITS_PER_PLANE_BLOCK)
    plane.set(BITS_PER_PLANE_BLOCK * 3 + 7)
    plane.set(5)
    assert plane.nonzero_blocks().tolist() == [0, 3]


# -- dirty tracking --------------------------------------------------------------------


def test_dirty_marks_only_changes() -> None:
    plane = Plane.zeros(4 * BITS_PER_PLANE_BLOCK)
    assert plane.dirty_blocks() == set()
    plane.set(5)
    plane.set(BITS_PER_PLANE_BLOCK * 2)
    assert plane.dirty_blocks() == {0, 2}
    assert plane.dirty_array().tolist() == [0, 2]
    plane.mark_clean()
    plane.set(5)  # already set
    plane.clear(BITS_PER_PLANE_BLOCK * 3)  # already clear
    plane.set_many(np.array([5, 5]))
    plane.clear_range(BITS_PER_PLANE_BLOCK, BITS_PER_PLANE_BLOCK)
    assert plane.dirty_blocks() == set()
    plane.clear_many(np.array([5, BITS_PER_PLANE_BLOCK * 3 + 1]))
    assert plane.dirty_blocks() == {0}
    plane.mark_dirty(3)
    assert plane.dirty_blocks() == {0, 3}
    copy = plane.copy()
    assert copy.dirty_blocks() == {0, 3}
    plane.mark_clean()
    assert copy.dirty_blocks() == {0, 3}  # independent
    with pytest.raises(IndexError):
        plane.mark_dirty(4)


@given(plane_and_set(), st.lists(st.integers(0, 10**6), max_size=100), st.booleans())
def test_dirty_blocks_are_exactly_the_changed_blocks(
    ps: tuple[Plane, set[int]], raw: list[int], setting: bool
) -> None:
    plane, _ = ps
    before = plane.copy()
    plane.mark_clean()
    vbns = np.array([v % plane.nblocks for v in raw], dtype=np.int64)
    if setting:
        plane.set_many(vbns)
    else:
        plane.clear_many(vbns)
    assert plane.dirty_blocks() == changed_blocks(before, plane)


def test_resized() -> None:
    plane = from_set(BITS_PER_PLANE_BLOCK + 10, {1, BITS_PER_PLANE_BLOCK + 9})
    plane.mark_clean()
    grown = plane.resized(3 * BITS_PER_PLANE_BLOCK)
    assert as_set(grown) == {1, BITS_PER_PLANE_BLOCK + 9}
    assert grown.dirty_blocks() == {2}
    shrunk = plane.resized(BITS_PER_PLANE_BLOCK + 5)
    assert as_set(shrunk) == {1}
    assert shrunk.dirty_blocks() == {1}


# -- algebra ---------------------------------------------------------------------------


@given(planes_of_one_size(3))
def test_set_algebra_matches_sets(trio: list[tuple[Plane, set[int]]]) -> None:
    (a, sa), (b, sb), (c, sc) = trio
    assert as_set(union(a, b, c)) == sa | sb | sc
    assert as_set(union(a)) == sa
    assert as_set(intersection(a, b, c)) == sa & sb & sc
    assert as_set(intersection(a, b)) == sa & sb
    assert as_set(difference(a, b)) == sa - sb
    assert count_difference(a, b) == len(sa - sb)
    assert is_subset(a, b) == (sa <= sb)
    assert is_subset(intersection(a, b), b)
    assert count_free(a, b, c) == a.nblocks - len(sa | sb | sc)
    assert union(a, b).dirty_blocks() == set()  # results are new, not yet on disk


@given(planes_of_one_size(2), st.booleans())
def test_in_place_algebra_marks_changed_blocks(
    pair: list[tuple[Plane, set[int]]], unite: bool
) -> None:
    (a, sa), (b, sb) = pair
    before = a.copy()
    a.mark_clean()
    if unite:
        union_into(a, b)
        assert as_set(a) == sa | sb
    else:
        difference_into(a, b)
        assert as_set(a) == sa - sb
    assert a.dirty_blocks() == changed_blocks(before, a)
    assert as_set(b) == sb  # the source is untouched


def test_in_place_algebra_across_chunks() -> None:
    """Planes bigger than one chunk get their dirty marks from the right chunk."""
    n = 3 * algebra.CHUNK_WORDS * 64 + 1000
    a, b = Plane.zeros(n), Plane.zeros(n)
    far = n - 10
    b.set_many(np.array([7, algebra.CHUNK_WORDS * 64 + 3, far]))
    union_into(a, b)
    blocks = {7 // BITS_PER_PLANE_BLOCK, (algebra.CHUNK_WORDS * 64 + 3) // BITS_PER_PLANE_BLOCK,
              far // BITS_PER_PLANE_BLOCK}
    assert a.dirty_blocks() == blocks
    a.mark_clean()
    c = from_set(n, {far})
    difference_into(a, c)
    assert a.dirty_blocks() == {far // BITS_PER_PLANE_BLOCK}
    assert as_set(a) == {7, algebra.CHUNK_WORDS * 64 + 3}


def test_mixed_sizes_refused() -> None:
    with pytest.raises(ValueError, match="cannot be combined"):
        union(Plane.zeros(10), Plane.zeros(11))
    with pytest.raises(ValueError, match="at least one"):
        union()


# -- free-space search -----------------------------------------------------------------


def reference_runs(
    n: int, busy: set[int], start: int, want: int, limit: int | None
) -> list[tuple[int, int]]:
    """The first `want` free blocks in scan order, grouped into maximal runs."""
    order = [v for v in [*range(start, n), *range(start)] if v not in busy][:want]
    runs: list[tuple[int, int]] = []
    for v in order:
        if runs and runs[-1][0] + runs[-1][1] == v:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((v, 1))
    return runs if limit is None else runs[:limit]


CHUNKINGS = st.sampled_from([None, (1, 2), (2, 4), (1, 1)])


@settings(max_examples=200)
@given(
    planes_of_one_size(2),
    st.integers(0, 10**6),
    st.integers(0, 5000),
    st.one_of(st.none(), st.integers(1, 5)),
    CHUNKINGS,
)
def test_find_free_matches_a_scan(
    pair: list[tuple[Plane, set[int]]],
    raw_start: int,
    want: int,
    limit: int | None,
    chunking: tuple[int, int] | None,
) -> None:
    (a, sa), (b, sb) = pair
    n = a.nblocks
    start = raw_start % n
    with ExitStack() as stack:
        if chunking is not None:  # tiny chunks to exercise runs joined across chunks
            stack.enter_context(patch.object(algebra, "SEARCH_CHUNK_WORDS", chunking[0]))
            stack.enter_context(patch.object(algebra, "CHUNK_WORDS", chunking[1]))
        runs = find_free(start, want, a, b, limit=limit)
    assert runs == reference_runs(n, sa | sb, start, want, limit)
    blocks = [v for vbn, length in runs for v in range(vbn, vbn + length)]
    assert len(blocks) == len(set(blocks))  # no overlap
    assert not set(blocks) & (sa | sb)  # only free blocks
    free = n - len(sa | sb)
    if limit is None:
        assert len(blocks) == min(want, free)


def test_find_free_wraps_around() -> None:
    busy = from_set(100, set(range(10, 95)))
    assert find_free(96, 10, busy) == [(96, 4), (0, 6)]
    assert find_free(96, 100, busy) == [(96, 4), (0, 10), (95, 1)]
    assert find_free(100, 3, busy) == [(0, 3)]  # start == nblocks is the start of a lap


def test_find_free_edge_cases() -> None:
    empty = Plane.zeros(1000)
    assert find_free(0, 0, empty) == []
    assert find_free(0, 5, empty, limit=0) == []
    assert find_free(990, 5000, empty) == [(990, 10), (0, 990)]
    full = Plane.zeros(1000)
    full.set_range(0, 1000)
    assert find_free(0, 5, full) == []
    assert count_free(full) == 0
    with pytest.raises(ValueError):
        find_free(-1, 5, empty)


def test_find_free_on_a_terabyte_plane() -> None:
    """Correct (not timed here) at the scale the allocator runs: 2**28 blocks = 1 TiB."""
    n = 1 << 28
    active, summary = Plane.zeros(n), Plane.zeros(n)
    active.set_range(0, 1 << 20)
    summary.set_many(np.arange(1 << 20, 1 << 21, 7))
    runs = find_free(1000, 262_144, active, summary)
    assert sum(length for _, length in runs) == 262_144
    assert runs[0] == ((1 << 20) + 1, 6)
    everything = union(active, summary)
    for vbn, length in runs[:100]:
        assert not everything.test_many(np.arange(vbn, vbn + length)).any()
    assert count_free(active, summary) == n - everything.count()
    assert count_difference(everything, active) == summary.count()


# -- the reference's level dumps and the snapshot invariant ------------------------------


class SimulatedVolume:
    """Files of block pointers written copy-on-write through `find_free`, with snapshots.

    A block is free iff neither the active plane nor any retained snapshot holds it, so
    a block freed in the active image is reused only once no snapshot holds it.
    """

    def __init__(self, nblocks: int, rng: random.Random) -> None:
        self.rng = rng
        self.active = Plane.zeros(nblocks)
        self.files: dict[int, list[int]] = {}
        self.snapshots: dict[str, Plane] = {}
        self.cursor = 0
        self.next_file = 0

    def summary(self) -> Plane:
        return union(self.active, *self.snapshots.values())

    def allocate(self, count: int) -> list[int]:
        runs = find_free(self.cursor, count, self.summary())
        vbns = [v for vbn, length in runs for v in range(vbn, vbn + length)]
        assert len(vbns) == count, "the simulated volume is full"
        held = [s for s in self.snapshots.values() if s.test_many(np.array(vbns)).any()]
        assert not held, "a block still held by a snapshot was reallocated"
        self.active.set_many(np.array(vbns))
        self.cursor = vbns[-1] + 1
        return vbns

    def step(self) -> None:
        """One random change: create, overwrite part of, or delete a file."""
        action = self.rng.random()
        if action < 0.4 or not self.files:
            self.files[self.next_file] = self.allocate(self.rng.randint(1, 20))
            self.next_file += 1
        elif action < 0.8:
            blocks = self.files[self.rng.choice(list(self.files))]
            picks = self.rng.sample(range(len(blocks)), self.rng.randint(1, len(blocks)))
            fresh = self.allocate(len(picks))
            for index, vbn in zip(picks, fresh, strict=True):
                self.active.clear(blocks[index])
                blocks[index] = vbn
        else:
            for vbn in self.files.pop(self.rng.choice(list(self.files))):
                self.active.clear(vbn)

    def snapshot(self, name: str) -> None:
        self.snapshots[name] = self.active.copy()


def check_snapshot_invariant(ordered: list[Plane]) -> None:
    """For retained snapshots i < j < k: S_i ∩ S_k ⊆ S_j."""
    for i in range(len(ordered)):
        for k in range(i + 2, len(ordered)):
            both = intersection(ordered[i], ordered[k])
            for j in range(i + 1, k):
                assert is_subset(both, ordered[j]), (i, j, k)


@given(st.randoms(use_true_random=False))
@settings(max_examples=30, deadline=None)
def test_june_level_dumps(rng: random.Random) -> None:
    vol = SimulatedVolume(2048, rng)
    sets: dict[str, set[int]] = {}
    for day in range(1, 6):
        for _ in range(rng.randint(1, 15)):
            vol.step()
        name = f"June{day}"
        vol.snapshot(name)
        sets[name] = as_set(vol.snapshots[name])
    j1, j2, j3, j4, j5 = (vol.snapshots[f"June{d}"] for d in range(1, 6))
    s1, s2, s3, s4, s5 = (sets[f"June{d}"] for d in range(1, 6))

    level0 = union(j3, j2, j1)  # June3.level0 = June3 + June2 + June1
    level1 = difference(union(j5, j4), j3)  # June5.level1 = June5 + June4 − June3
    assert as_set(level0) == s3 | s2 | s1
    assert as_set(level1) == (s5 | s4) - s3

    check_snapshot_invariant([j1, j2, j3, j4, j5])
    # Because S_i ∩ S_k ⊆ S_j, the level-1 dump needs nothing that June1 or June2 held:
    # a block of theirs still in June4 or June5 is in June3, so already in the level 0.
    assert intersection(level1, union(j1, j2)).count() == 0
    # Restoring level 0 then level 1 brings back every block of every snapshot.
    restored = union(level0, level1)
    for snap in (j1, j2, j3, j4, j5):
        assert is_subset(snap, restored)
    assert count_difference(union(j5, j4), level0) == level1.count()


@given(st.randoms(use_true_random=False))
@settings(max_examples=30, deadline=None)
def test_invariant_holds_with_snapshot_deletion(rng: random.Random) -> None:
    """Deleting snapshots lets their blocks be reused; the retained ones keep the invariant."""
    vol = SimulatedVolume(4096, rng)
    order: list[str] = []
    for day in range(12):
        for _ in range(rng.randint(1, 10)):
            vol.step()
        order.append(f"day{day}")
        vol.snapshot(order[-1])
        if len(order) > 4 and rng.random() < 0.5:
            del vol.snapshots[order.pop(rng.randrange(len(order) - 1))]
        check_snapshot_invariant([vol.snapshots[name] for name in order])


def _runs_of_members(plane: Plane, start: int) -> tuple[list[int], list[int]]:
    m = plane.members()
    m = m[m >= np.uint64(start)].astype(np.int64)
    if m.size == 0:
        return [], []
    brk = np.flatnonzero(np.diff(m) != 1) + 1
    heads = np.concatenate(([0], brk))
    lens = np.diff(np.concatenate((heads, [m.size])))
    return m[heads].tolist(), lens.tolist()


def test_runs_equal_the_runs_of_the_members_across_chunk_edges() -> None:
    from snapvol.planes.algebra import CHUNK_WORDS, runs

    edge = CHUNK_WORDS * 64
    nblocks = 3 * edge + 100
    rng = np.random.default_rng(4)
    plane = Plane(nblocks)
    plane.set_many(rng.choice(nblocks, 20_000, replace=False))
    for a, n in ((edge - 70, 140), (2 * edge - 1, 2), (3 * edge - 5, 105), (0, 300)):
        plane.set_range(a, n)  # runs across each chunk edge, and to the very end
    for start in (0, 1, 63, 64, edge - 3, edge, edge + 1, 2 * edge, 3 * edge + 50, nblocks):
        got_starts, got_lens = runs(plane, start)
        assert (got_starts.tolist(), got_lens.tolist()) == _runs_of_members(plane, start)
    assert [a.size for a in runs(Plane(nblocks))] == [0, 0]
