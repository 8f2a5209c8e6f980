"""Block checksums hashed in C (layout._blocksum) against the xxhash package, which wrote
every checksum before the C module existed: a volume must read the same either way, with
each hash kernel the module can choose on this machine."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
import xxhash

from snapvol.layout import _blocksum
from snapvol.layout.checksum import (
    block_checksum,
    checksums_of,
    first_bad_block,
    run_checksums,
)
from snapvol.layout.constants import BLOCK_SIZE as BS


def _kernels() -> list[str]:
    """The kernels this machine can run; the one chosen at import comes first."""
    chosen = _blocksum.kernel()
    out = [chosen]
    for name in ("avx2", "baseline"):
        try:
            _blocksum.kernel(name)
        except ValueError:
            continue
        if name not in out:
            out.append(name)
    _blocksum.kernel(chosen)
    return out


def test_the_fastest_kernel_is_chosen() -> None:
    with open("/proc/cpuinfo") as f:
        avx2 = " avx2" in f.read()
    assert _blocksum.kernel() == ("avx2" if avx2 else "baseline")


@pytest.fixture(params=_kernels())
def kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    chosen = _blocksum.kernel()
    _blocksum.kernel(request.param)
    yield request.param
    _blocksum.kernel(chosen)


def _reference(data: bytes, first_vbn: int) -> list[int]:
    return [xxhash.xxh3_64_intdigest(data[i * BS : (i + 1) * BS], first_vbn + i)
            for i in range(len(data) // BS)]


@pytest.mark.parametrize("first_vbn", [0, 1, 4095, 1 << 32, (1 << 63) - 300])
@pytest.mark.parametrize("nblocks", [1, 15, 16, 257])
def test_run_checksums_equal_the_xxhash_package(kernel: str, first_vbn: int,
                                                nblocks: int) -> None:
    data = random.Random(first_vbn + nblocks).randbytes(nblocks * BS)
    sums = run_checksums(data, first_vbn)
    assert sums.dtype == np.dtype("<u8")
    assert sums.tolist() == _reference(data, first_vbn)
    assert sums[0] == block_checksum(data[:BS], first_vbn)
    for kind in (bytearray, memoryview):
        assert run_checksums(kind(data), first_vbn).tolist() == sums.tolist()


def test_first_bad_block_names_the_first_mismatch(kernel: str) -> None:
    data = bytearray(random.Random(7).randbytes(40 * BS))
    sums = run_checksums(data, 1000)
    assert first_bad_block(data, 1000, sums) == -1
    assert first_bad_block(data, 1001, sums) == 0  # the same bytes at other VBNs
    data[17 * BS + 5] ^= 1
    data[30 * BS] ^= 0x80
    assert first_bad_block(data, 1000, sums) == 17
    strided = np.zeros(40, dtype=[("vbn", "<u8"), ("csum", "<u8")])
    strided["csum"] = sums
    assert first_bad_block(data, 1000, strided["csum"]) == 17  # a pointer array's field
    empty = first_bad_block(b"", 5, np.zeros(0, dtype=np.uint64))
    assert empty == -1


def test_checksums_of_separate_blocks(kernel: str) -> None:
    """A CP's data blocks: bytes and views of larger request buffers, at scattered VBNs."""
    rng = random.Random(3)
    request = rng.randbytes(64 * BS)
    view = memoryview(request)
    blocks: list[bytes | memoryview] = [view[i * BS : (i + 1) * BS] for i in range(64)]
    blocks += [rng.randbytes(BS) for _ in range(20)]
    vbns = np.array([rng.randrange(1, 1 << 40) for _ in blocks], dtype=np.uint64)
    got = checksums_of(blocks, vbns)
    assert got.tolist() == [xxhash.xxh3_64_intdigest(b, int(v)) for b, v in zip(
        blocks, vbns, strict=True)]
    assert checksums_of([], np.zeros(0, dtype=np.uint64)).tolist() == []
    with pytest.raises(ValueError, match="block 1 has 4095 bytes, not 4096"):
        checksums_of([bytes(BS), bytes(BS - 1)], vbns[:2])
    with pytest.raises(ValueError, match="2 blocks need 16 bytes of VBNs, not 24"):
        checksums_of([bytes(BS), bytes(BS)], vbns[:3])
    with pytest.raises(TypeError):
        checksums_of([bytes(BS), 5], vbns[:2])  # type: ignore[list-item]


def test_partial_blocks_and_wrong_lengths_are_refused(kernel: str) -> None:
    with pytest.raises(ValueError, match="not a whole number of 4096-byte blocks"):
        run_checksums(bytes(BS + 1), 0)
    with pytest.raises(ValueError, match="2 blocks need 16 bytes of checksums, not 8"):
        first_bad_block(bytes(2 * BS), 0, np.zeros(1, dtype=np.uint64))
