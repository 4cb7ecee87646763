"""A version's block map: which digest each allocated block has.

Held as two parallel arrays, sorted block indices (uint64) and 32-byte digests, so a lookup is a
binary search in memory and the serialized form is 40 bytes per allocated block. Blocks that are
absent are holes or zeros and read as zeros.
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_left
from collections.abc import Iterator, Mapping

from backyfs.errors import CorruptObject

DIGEST_SIZE = 32
_MAGIC = b"BKYMAP01"
_HEADER = struct.Struct("<8sQQQ")  # magic, volume size, block size, entry count
_DIGEST = struct.Struct(f"{DIGEST_SIZE}s")


class BlockMap:
    def __init__(self, size: int, block_size: int, indices: array, digests: bytes) -> None:
        if len(digests) != len(indices) * DIGEST_SIZE:
            raise ValueError("digests do not match indices")
        self.size = size
        self.block_size = block_size
        self.indices = indices
        self.digests = digests

    @classmethod
    def from_mapping(cls, size: int, block_size: int, blocks: Mapping[int, bytes]) -> BlockMap:
        order = sorted(blocks)
        return cls(size, block_size, array("Q", order), b"".join(map(blocks.__getitem__, order)))

    @classmethod
    def empty(cls, size: int, block_size: int) -> BlockMap:
        return cls(size, block_size, array("Q"), b"")

    @property
    def block_count(self) -> int:
        """Blocks the volume spans, the last one possibly partial."""
        return -(-self.size // self.block_size)

    def __len__(self) -> int:
        return len(self.indices)

    def lookup(self, block_idx: int) -> bytes | None:
        pos = bisect_left(self.indices, block_idx)
        if pos < len(self.indices) and self.indices[pos] == block_idx:
            return self.digests[pos * DIGEST_SIZE : (pos + 1) * DIGEST_SIZE]
        return None

    def _digest_list(self) -> list[bytes]:
        return [digest for (digest,) in _DIGEST.iter_unpack(self.digests)]  # C-speed split

    def items(self) -> Iterator[tuple[int, bytes]]:
        return zip(self.indices, self._digest_list(), strict=True)

    def to_dict(self) -> dict[int, bytes]:
        return dict(self.items())

    def digest_set(self) -> set[bytes]:
        return set(self._digest_list())

    def block_length(self, block_idx: int) -> int:
        """Bytes of the volume in this block: block_size except for a partial last block."""
        return min(self.block_size, self.size - block_idx * self.block_size)

    def to_bytes(self) -> bytes:
        return _HEADER.pack(_MAGIC, self.size, self.block_size, len(self.indices)) + \
            self.indices.tobytes() + self.digests

    @staticmethod
    def bytes_for(entries: int) -> int:
        """The serialized size of a map of that many allocated blocks."""
        return _HEADER.size + entries * (8 + DIGEST_SIZE)

    @staticmethod
    def entries_in(data_length: int) -> int:
        """How many blocks a serialized map of data_length bytes holds, without reading it."""
        return max(0, data_length - _HEADER.size) // (8 + DIGEST_SIZE)

    @classmethod
    def from_bytes(cls, data: bytes) -> BlockMap:
        if len(data) < _HEADER.size:
            raise CorruptObject("block map is truncated")
        magic, size, block_size, count = _HEADER.unpack_from(data)
        if magic != _MAGIC or len(data) != _HEADER.size + count * (8 + DIGEST_SIZE):
            raise CorruptObject("block map is corrupt or truncated")
        if block_size < 512 or block_size & (block_size - 1):
            raise CorruptObject(f"block map has an impossible block size {block_size}")
        indices = array("Q")
        start = _HEADER.size
        indices.frombytes(data[start : start + 8 * count])
        digests = bytes(data[start + 8 * count :])
        return cls(size, block_size, indices, digests)

    def check(self) -> None:
        """For maps read back from a store (rebuild-db), which others may share: what lookups rely
        on, sorted unique indices inside the volume (an O(n) pass the local database is spared)."""
        idx = self.indices
        if len(idx) and (idx[-1] >= self.block_count
                         or any(a >= b for a, b in zip(idx, idx[1:], strict=False))):
            raise CorruptObject("block map indices are out of order or past the end of the volume")
