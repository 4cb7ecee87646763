"""Replay an ext3/ext4 (jbd2) journal into memory, as mounting or e2fsck would on disk.

A backup of a running VM holds a filesystem that was mounted: recent metadata changes (new files,
directory entries, inode updates) may exist only in the journal. Reading such a filesystem without
replay can miss them or see them half-done. We never write: the replayed blocks become an override
map {filesystem block: content} that ExtFS consults before the device.

The three passes of jbd2's recovery, folded into one scan: walk the log from s_start while the
sequence numbers follow on; collect each committed transaction's blocks and revoke records (an
uncommitted tail is ignored); then apply transactions in order, skipping a block when a revoke
record for it has a sequence at or after the transaction's. Checksums are not verified: an
unfinished transaction has no commit block and is dropped anyway.
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_right
from collections.abc import Iterator, Mapping
from itertools import pairwise
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backyfs.fronts.extfs import ExtFS

MAGIC = 0xC03B3998
DESCRIPTOR, COMMIT, SB_V1, SB_V2, REVOKE = 1, 2, 3, 4, 5
INCOMPAT_REVOKE, INCOMPAT_64BIT, INCOMPAT_CSUM_V2, INCOMPAT_CSUM_V3 = 0x1, 0x2, 0x8, 0x10
INCOMPAT_FAST_COMMIT = 0x20
TAG_ESCAPE, TAG_SAME_UUID, TAG_LAST = 0x1, 0x2, 0x8
# Distinct blocks a journal may revoke plus replay (and runs of its map): a 1 GiB journal holds
# 262,144 4 KiB blocks. Beyond this a guest's journal only makes us hold memory, so it is refused.
MAX_ENTRIES = 4_000_000
# Blocks a replayable journal may have: mke2fs makes at most 10,240,000. The scan may read each log
# block once; a guest's journal of 2^32 blocks (aliased to one region) took 947M reads, 14 hours.
MAX_BLOCKS = 1 << 24


def _error(message: str) -> Exception:
    from backyfs.fronts.extfs import ExtError

    return ExtError(message)


class Journal:
    def __init__(self, fs: ExtFS) -> None:
        inum = struct.unpack_from("<I", fs.sb, 0xE0)[0]
        if not inum:
            raise _error("external journal")
        self.fs, self.bs = fs, fs.block_size
        inode = fs.inode(inum)
        if inode.size // self.bs > MAX_BLOCKS:
            raise _error(f"the journal is {inode.size // self.bs} blocks, more than {MAX_BLOCKS}")
        # The map as three arrays (24 bytes a run), as long as the journal file is (see MAX_ENTRIES).
        self.starts, self.pblks, self.counts = array("Q"), array("Q"), array("Q")
        for run in fs.iter_runs(inode):
            if len(self.starts) >= MAX_ENTRIES:
                raise _error(f"the journal has more than {MAX_ENTRIES} extents")
            self.starts.append(run.lblk)
            self.pblks.append(run.pblk)
            self.counts.append(run.count)
        self._check_no_block_twice()
        sb = self.read(0)
        magic, btype = struct.unpack_from(">II", sb, 0)
        if magic != MAGIC or btype not in (SB_V1, SB_V2):
            raise _error("corrupt journal superblock")
        self.maxlen, self.first, self.sequence, self.start = struct.unpack_from(">IIII", sb, 0x10)
        # As jbd2 checks: the log lies in the journal file, after its superblock.
        if not 0 < self.first < self.maxlen <= inode.size // self.bs:
            raise _error(f"corrupt journal superblock (log blocks {self.first} to {self.maxlen} in "
                         f"a journal of {inode.size // self.bs})")
        if self.start and not self.first <= self.start < self.maxlen:
            raise _error(f"corrupt journal superblock (log start {self.start})")
        self.incompat = struct.unpack_from(">I", sb, 0x28)[0] if btype == SB_V2 else 0
        csum = self.incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3)
        self.tail = 4 if csum else 0  # descriptor and revoke blocks end in a checksum
        if self.incompat & INCOMPAT_CSUM_V3:
            self.tag_size = 16
        else:
            self.tag_size = 12 + (2 if csum else 0) - (0 if self.incompat & INCOMPAT_64BIT else 4)

    def _check_no_block_twice(self) -> None:
        """A journal whose map names a physical block twice is corrupt: its log blocks aliased onto
        one small region replayed one block of directory entries over 262,000 distinct directory
        blocks (89M entries from a 4.8 MB image). Checked over runs, not blocks: a journal may have
        millions of blocks in a few runs, usually in the order of the disk (then nothing is sorted)."""
        pblks, counts = self.pblks, self.counts
        if all(pblks[i] + counts[i] <= pblks[i + 1] for i in range(len(pblks) - 1)):
            return
        for a, b in pairwise(sorted(range(len(pblks)), key=pblks.__getitem__)):
            if pblks[a] + counts[a] > pblks[b]:
                raise _error(f"the journal's block map names block {pblks[b]} twice (corrupt)")

    def locate(self, jblock: int) -> int:
        """The filesystem block holding journal block JBLOCK."""
        i = bisect_right(self.starts, jblock) - 1
        if i < 0 or jblock >= self.starts[i] + self.counts[i]:
            raise _error(f"journal block {jblock} is not mapped")
        return self.pblks[i] + jblock - self.starts[i]

    def read(self, jblock: int) -> bytes:
        # From the device: the journal's blocks are not themselves subject to its replay.
        return self.fs.device_blocks(self.locate(jblock), 1)

    def next(self, jblock: int) -> int:
        jblock += 1
        return self.first if jblock >= self.maxlen else jblock

    def tags(self, block: bytes) -> list[tuple[int, int]]:
        """(filesystem block, flags) of a descriptor block's tags."""
        out, pos, end = [], 12, self.bs - self.tail
        wide = self.incompat & INCOMPAT_64BIT
        while pos + self.tag_size <= end:
            if self.incompat & INCOMPAT_CSUM_V3:
                lo, flags, hi = struct.unpack_from(">III", block, pos)
            else:
                lo, _csum, flags, hi = struct.unpack_from(">IHHI", block + bytes(4), pos)
            out.append((lo | (hi << 32 if wide else 0), flags))
            pos += self.tag_size + (0 if flags & TAG_SAME_UUID else 16)
            if flags & TAG_LAST:
                break
        return out

    def revoked(self, block: bytes) -> list[int]:
        (count,) = struct.unpack_from(">I", block, 12)
        size = 8 if self.incompat & INCOMPAT_64BIT else 4
        n = max(0, (min(count, self.bs) - 16) // size)
        return list(struct.unpack_from(f">{n}{'Q' if size == 8 else 'I'}", block, 16))

    def scan(self) -> tuple[dict[int, int], int]:
        """{fs block: journal block << 1 | escaped} of each block's newest committed copy that no
        revoke record cancels, and the number of committed transactions. A revoke record in
        transaction T cancels copies in transactions up to T, so only the newest copy matters."""
        latest: dict[int, int] = {}  # fs block: transaction << 33 | journal block << 1 | escaped
        revoked: dict[int, int] = {}  # fs block: the last committed transaction revoking it
        blocks: dict[int, int] = {}  # the open transaction's, as in latest
        pending: set[int] = set()  # the open transaction's revoke records
        done, seq, jblock = 0, self.sequence, self.start
        budget = self.maxlen - self.first  # each log block is read at most once: no wrapping onto itself
        while budget > 0:
            data = self.read(jblock)
            budget -= 1
            magic, btype, hseq = struct.unpack_from(">III", data, 0)
            if magic != MAGIC or hseq != seq:
                break
            if btype == DESCRIPTOR:
                for fs_block, flags in self.tags(data):
                    jblock, budget = self.next(jblock), budget - 1
                    if budget < 0:
                        raise _error("a journal transaction is longer than the journal (corrupt)")
                    blocks[fs_block] = done << 33 | jblock << 1 | bool(flags & TAG_ESCAPE)
            elif btype == REVOKE:
                pending.update(self.revoked(data))
            elif btype == COMMIT:
                latest.update(blocks)
                revoked.update(dict.fromkeys(pending, done))
                blocks, pending, seq, done = {}, set(), (seq + 1) & 0xFFFFFFFF, done + 1
            else:
                break
            if len(latest) + len(revoked) + len(blocks) + len(pending) > MAX_ENTRIES:
                raise _error(f"the journal names more than {MAX_ENTRIES} blocks")
            jblock = self.next(jblock)
        return {b: v & (1 << 33) - 1 for b, v in latest.items() if revoked.get(b, -1) < v >> 33}, done


class Replayed(Mapping[int, bytes]):
    """{filesystem block: content} of a replayed journal, read from the journal when asked: holding
    every replayed block in memory would cost as much as the journal (a guest chooses its size)."""

    def __init__(self, journal: Journal, where: dict[int, int]) -> None:
        self.journal, self.where = journal, where

    def __getitem__(self, fs_block: int) -> bytes:
        loc = self.where[fs_block]
        data = self.journal.read(loc >> 1)
        return struct.pack(">I", MAGIC) + data[4:] if loc & 1 else data

    def __contains__(self, fs_block: object) -> bool:
        return fs_block in self.where

    def __iter__(self) -> Iterator[int]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def replay(fs: ExtFS) -> tuple[Mapping[int, bytes], str]:
    """The blocks a journal recovery would write, and a note for the user ('' when clean)."""
    from backyfs.fronts.extfs import ExtError

    try:
        journal = Journal(fs)
        if journal.start == 0:
            return {}, ""
        where, done = journal.scan()
        for loc in where.values():
            journal.locate(loc >> 1)  # all mapped, so that reading them later fails only as the device can
        beyond = max(where, default=-1)
        if beyond >= fs.blocks_count:  # recovery would fail to write it; ExtFS must not read it
            raise ExtError(f"it replays block {beyond}, beyond the filesystem's {fs.blocks_count}")
    except ExtError as exc:
        return {}, f"the journal needs recovery but cannot be replayed ({exc}); recent changes may be missing"
    note = f"replayed the journal in memory: {done} transaction(s), {len(where)} block(s)"
    if journal.incompat & INCOMPAT_FAST_COMMIT:
        note += "; fast-commit records are not replayed"
    return Replayed(journal, where), note
