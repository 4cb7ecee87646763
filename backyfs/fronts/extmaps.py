"""Block maps of the ext reader (backyfs.fronts.extfs): extent trees and indirect block maps as runs
of blocks, streamed as they are consumed, every tree block visited once.

A guest writes these maps: they can name billions of runs in a few MiB of tree blocks, reuse tree
blocks, or map the same physical blocks many times over. What a sound filesystem cannot have is an
error here (ExtError), never a hang or gigabytes of memory.
"""

from __future__ import annotations

import itertools
import struct
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backyfs.fronts.extfs import Inode

EXTENT_MAGIC = 0xF30A
FL_ENCRYPT, FL_EXTENTS, FL_INLINE_DATA = 0x800, 0x80000, 0x10000000  # inode flags
_MAX_EXTENT_LEVELS = 8  # the kernel allows 5; kept at 8, as tests build deeper trees to attack
_MAX_LISTED_RUNS = 1 << 20  # runs() as a list: ranges() and iter_runs() stream any number


def _error(message: str) -> Exception:
    from backyfs.fronts.extfs import ExtError  # extfs imports this module

    return ExtError(message)


@dataclass(frozen=True)
class Run:
    """Logical blocks [lblk, lblk + count) of a file at physical blocks [pblk, pblk + count)."""
    lblk: int
    pblk: int
    count: int
    initialized: bool = True  # an unwritten (preallocated) extent reads as zeros


class BlockMaps:
    """The block-map part of ExtFS (a mixin): it reads tree blocks through ExtFS.block()."""

    block_size: int
    blocks_count: int
    block: Callable[[int], bytes]

    def runs(self, inode: Inode) -> list[Run]:
        """iter_runs() as a list, for maps known to be small; a longer one is an error."""
        runs = list(itertools.islice(self.iter_runs(inode), _MAX_LISTED_RUNS + 1))
        if len(runs) > _MAX_LISTED_RUNS:
            raise _error(f"inode {inode.ino}: more than {_MAX_LISTED_RUNS} block runs")
        return runs

    def iter_runs(self, inode: Inode) -> Iterator[Run]:
        """The file's mapped blocks in logical order, clipped to i_size; the gaps are holes. Made as
        they are consumed: a hostile map can name billions of runs in a few MiB of tree blocks."""
        if inode.flags & FL_ENCRYPT:
            raise _error(f"inode {inode.ino} is encrypted")
        nblocks = -(-inode.size // self.block_size)
        # Every tree block is visited once: a block reached twice (a damaged or hostile image) would
        # make the walk exponential, so it is an error.
        seen: set[int] = set()
        if inode.flags & FL_EXTENTS:
            found = self._extent_runs(inode.raw[0x28:0x64], None, 0, nblocks, seen)
        else:
            found = _coalesce(self._indirect_runs(inode.raw[0x28:0x64], nblocks, seen))
        end = total = 0
        for run in found:
            if run.lblk < end:  # an extent over an earlier one, or out of order: not a sound map
                raise _error(f"inode {inode.ino}: corrupt block map (block {run.lblk} mapped twice)")
            if run.lblk < nblocks and run.count:  # (the walk goes on: a reused tree block is an error)
                end = run.lblk + run.count
                # No sound ext filesystem maps a block twice (no reflinks), so no file has more blocks
                # than the filesystem: extents all naming the same blocks made GiBs from a 16 MiB image.
                total += min(end, nblocks) - run.lblk
                if total > self.blocks_count:
                    raise _error(f"inode {inode.ino}: the block map names more blocks than the "
                                 f"filesystem's {self.blocks_count} (blocks mapped many times: corrupt)")
                yield run if end <= nblocks else Run(run.lblk, run.pblk, nblocks - run.lblk, run.initialized)

    def mapped_blocks(self, inode: Inode) -> int:
        """How many blocks of data ranges() reads for INODE (its initialized runs; 0 for inline
        data), with the same checks (ExtError). Distinct inodes of a sound filesystem share no block,
        so over all the files of one restore (each inode counted once) the sum is at most
        blocks_count: a restorer can keep that total to refuse a guest's blocks mapped many times."""
        if inode.flags & FL_INLINE_DATA:
            return 0
        return sum(run.count for run in self.iter_runs(inode) if run.initialized)

    def _tree_block(self, pblk: int, seen: set[int]) -> bytes:
        if pblk in seen:
            raise _error(f"corrupt block map: block {pblk} is used twice")
        seen.add(pblk)
        return self.block(pblk)

    def _extent_runs(self, node: bytes, want: int | None, level: int, nblocks: int,
                     seen: set[int]) -> Iterator[Run]:
        """The runs of an extent (sub)tree; WANT: the depth its parent says it has."""
        magic, entries, _max, depth = struct.unpack_from("<HHHH", node, 0)
        bad_depth = depth != want if want is not None else depth > _MAX_EXTENT_LEVELS
        if magic != EXTENT_MAGIC or bad_depth or level > _MAX_EXTENT_LEVELS or 12 + 12 * entries > len(node):
            raise _error("corrupt extent tree")
        for i in range(entries):
            pos = 12 + 12 * i
            if depth == 0:
                lblk, length, hi, lo = struct.unpack_from("<IHHI", node, pos)
                initialized = length <= 32768
                yield Run(lblk, hi << 32 | lo, length if initialized else length - 32768, initialized)
            else:
                lblk, lo, hi = struct.unpack_from("<IIH", node, pos)
                if lblk >= nblocks:  # entries are sorted: the rest lies past the end of the file
                    return
                child = self._tree_block(hi << 32 | lo, seen)
                yield from self._extent_runs(child, depth - 1, level + 1, nblocks, seen)

    def _indirect_runs(self, iblock: bytes, nblocks: int, seen: set[int]) -> Iterator[Run]:
        ptrs = struct.unpack("<15I", iblock)
        for i in range(min(12, nblocks)):
            if ptrs[i]:
                yield Run(i, ptrs[i], 1)
        per = self.block_size // 4
        lblk = 12
        for level, ptr in ((1, ptrs[12]), (2, ptrs[13]), (3, ptrs[14])):
            if lblk >= nblocks:
                return
            if ptr:
                yield from self._walk_indirect(ptr, level, lblk, nblocks, seen)
            lblk += per**level

    def _walk_indirect(self, ptr: int, level: int, lblk: int, nblocks: int, seen: set[int]) -> Iterator[Run]:
        table = array("I", self._tree_block(ptr, seen))
        span = (self.block_size // 4) ** (level - 1)
        for i, child in enumerate(table):
            start = lblk + i * span
            if start >= nblocks:
                return
            if not child:
                continue
            if level == 1:
                yield Run(start, child, 1)
            else:
                yield from self._walk_indirect(child, level - 1, start, nblocks, seen)


def _coalesce(runs: Iterator[Run]) -> Iterator[Run]:
    last: Run | None = None
    for r in runs:
        if last and last.lblk + last.count == r.lblk and last.pblk + last.count == r.pblk:
            last = Run(last.lblk, last.pblk, last.count + r.count)
        else:
            if last:
                yield last
            last = r
    if last:
        yield last
