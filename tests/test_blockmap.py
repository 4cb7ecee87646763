"""BlockMap: sorted (index, digest) arrays, lookups, and the serialized form."""

from __future__ import annotations

import hashlib
import struct
from array import array

import pytest

from backyfs.errors import CorruptObject
from backyfs.metadata.blockmap import DIGEST_SIZE, BlockMap

BS = 64 * 1024


def digest(n: int) -> bytes:
    return hashlib.blake2b(n.to_bytes(8, "little"), digest_size=32).digest()


def sample_map(size: int = 10 * BS + 100) -> BlockMap:
    return BlockMap.from_mapping(size, BS, {7: digest(7), 0: digest(0), 10: digest(10), 3: digest(3)})


def test_from_mapping_sorts_indices_and_keeps_digests_aligned() -> None:
    bm = sample_map()
    assert list(bm.indices) == [0, 3, 7, 10]
    assert list(bm.items()) == [(i, digest(i)) for i in (0, 3, 7, 10)]
    assert len(bm) == 4
    assert bm.to_dict() == {i: digest(i) for i in (0, 3, 7, 10)}
    assert bm.digest_set() == {digest(i) for i in (0, 3, 7, 10)}


def test_lookup_finds_allocated_blocks_and_none_for_holes() -> None:
    bm = sample_map()
    for i in (0, 3, 7, 10):
        assert bm.lookup(i) == digest(i)
    for i in (1, 2, 4, 5, 6, 8, 9, 11, 1000):
        assert bm.lookup(i) is None


def test_block_count_and_partial_last_block() -> None:
    bm = sample_map(10 * BS + 100)
    assert bm.block_count == 11
    assert bm.block_length(0) == BS
    assert bm.block_length(9) == BS
    assert bm.block_length(10) == 100
    exact = BlockMap.empty(4 * BS, BS)
    assert exact.block_count == 4
    assert exact.block_length(3) == BS
    assert BlockMap.empty(0, BS).block_count == 0
    assert BlockMap.empty(1, BS).block_count == 1


def test_serialization_round_trip_is_40_bytes_per_block() -> None:
    bm = sample_map()
    data = bm.to_bytes()
    header = 8 + 3 * 8
    assert len(data) == header + len(bm) * (8 + DIGEST_SIZE)
    back = BlockMap.from_bytes(data)
    assert (back.size, back.block_size) == (bm.size, bm.block_size)
    assert list(back.items()) == list(bm.items())
    assert back.to_bytes() == data


def test_empty_map_round_trip() -> None:
    bm = BlockMap.empty(5 * BS, BS)
    back = BlockMap.from_bytes(bm.to_bytes())
    assert len(back) == 0
    assert back.size == 5 * BS
    assert back.lookup(0) is None
    assert list(back.items()) == []


def test_large_map_lookups() -> None:
    blocks = {i: digest(i) for i in range(0, 300_000, 3)}
    bm = BlockMap.from_mapping(300_000 * BS, BS, blocks)
    back = BlockMap.from_bytes(bm.to_bytes())
    for i in (0, 3, 299_997, 150_000):
        assert back.lookup(i) == digest(i)
    for i in (1, 2, 299_998, 299_999, 150_001):
        assert back.lookup(i) is None
    assert len(back) == 100_000


@pytest.mark.parametrize("cut", [0, 5, 31, 33, 40, 72, 100])
def test_truncated_map_is_corrupt(cut: int) -> None:
    data = sample_map().to_bytes()
    assert cut < len(data)
    with pytest.raises(CorruptObject):
        BlockMap.from_bytes(data[:cut])


def test_bad_magic_and_extra_bytes_are_corrupt() -> None:
    data = sample_map().to_bytes()
    with pytest.raises(CorruptObject):
        BlockMap.from_bytes(b"X" + data[1:])
    with pytest.raises(CorruptObject):
        BlockMap.from_bytes(data + b"\0")
    # A count that claims more entries than there are.
    magic, size, bs, count = struct.unpack_from("<8sQQQ", data)
    with pytest.raises(CorruptObject):
        BlockMap.from_bytes(struct.pack("<8sQQQ", magic, size, bs, count + 1) + data[32:])


def test_digests_must_match_indices() -> None:
    with pytest.raises(ValueError):
        BlockMap(BS, BS, array("Q", [0, 1]), digest(0))


def test_a_hostile_map_from_the_store_is_corrupt() -> None:
    """rebuild-db reads maps from a store others may share: unsorted or duplicate indices (lookups
    would then miss data and read zeros), indices past the end and a zero block size are refused."""
    good = BlockMap.from_mapping(8 * BS, BS, {1: b"a" * 32, 3: b"b" * 32})
    good.check()
    raw = bytearray(good.to_bytes())
    header = struct.calcsize("<8sQQQ")
    for indices in ((3, 1), (1, 1), (1, 8)):
        bad = bytearray(raw)
        struct.pack_into("<QQ", bad, header, *indices)
        with pytest.raises(CorruptObject, match="out of order or past the end"):
            BlockMap.from_bytes(bytes(bad)).check()
    zero = bytearray(raw)
    struct.pack_into("<Q", zero, 16, 0)
    with pytest.raises(CorruptObject, match="impossible block size 0"):
        BlockMap.from_bytes(bytes(zero))
