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
from bisect import bisect_right
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backyfs.fronts.extfs import ExtFS

MAGIC = 0xC03B3998
DESCRIPTOR, COMMIT, SB_V1, SB_V2, REVOKE = 1, 2, 3, 4, 5
INCOMPAT_REVOKE, INCOMPAT_64BIT, INCOMPAT_CSUM_V2, INCOMPAT_CSUM_V3 = 0x1, 0x2, 0x8, 0x10
INCOMPAT_FAST_COMMIT = 0x20
TAG_ESCAPE, TAG_SAME_UUID, TAG_LAST = 0x1, 0x2, 0x8


class Journal:
    def __init__(self, fs: ExtFS) -> None:
        from backyfs.fronts.extfs import ExtError

        inum = struct.unpack_from("<I", fs.sb, 0xE0)[0]
        if not inum:
            raise ExtError("external journal")
        self.fs, self.bs = fs, fs.block_size
        runs = fs.runs(fs.inode(inum))
        self.starts = [r.lblk for r in runs]
        self.runs = runs
        sb = self.read(0)
        magic, btype = struct.unpack_from(">II", sb, 0)
        if magic != MAGIC or btype not in (SB_V1, SB_V2):
            raise ExtError("corrupt journal superblock")
        self.maxlen, self.first, self.sequence, self.start = struct.unpack_from(">IIII", sb, 0x10)
        self.incompat = struct.unpack_from(">I", sb, 0x28)[0] if btype == SB_V2 else 0
        csum = self.incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3)
        self.tail = 4 if csum else 0  # descriptor and revoke blocks end in a checksum
        if self.incompat & INCOMPAT_CSUM_V3:
            self.tag_size = 16
        else:
            self.tag_size = 12 + (2 if csum else 0) - (0 if self.incompat & INCOMPAT_64BIT else 4)

    def read(self, jblock: int) -> bytes:
        from backyfs.fronts.extfs import ExtError

        i = bisect_right(self.starts, jblock) - 1
        run = self.runs[i] if i >= 0 else None
        if run is None or jblock >= run.lblk + run.count:
            raise ExtError(f"journal block {jblock} is not mapped")
        return self.fs.read_blocks(run.pblk + jblock - run.lblk, 1)

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
        fmt = ">Q" if size == 8 else ">I"
        return [struct.unpack_from(fmt, block, p)[0] for p in range(16, min(count, self.bs) - size + 1, size)]

    def scan(self) -> tuple[list[tuple[int, dict[int, tuple[int, bool]]]], dict[int, int]]:
        """Committed transactions [(seq, {fs block: (journal block, escaped)})], and revokes
        {fs block: latest seq}."""
        done: list[tuple[int, dict[int, tuple[int, bool]]]] = []
        revokes: dict[int, int] = {}
        blocks: dict[int, tuple[int, bool]] = {}
        pending_revokes: list[int] = []
        seq, jblock = self.sequence, self.start
        for _ in range(self.maxlen):
            data = self.read(jblock)
            magic, btype, hseq = struct.unpack_from(">III", data, 0)
            if magic != MAGIC or hseq != seq:
                break
            if btype == DESCRIPTOR:
                for fs_block, flags in self.tags(data):
                    jblock = self.next(jblock)
                    blocks[fs_block] = (jblock, bool(flags & TAG_ESCAPE))
            elif btype == REVOKE:
                pending_revokes += self.revoked(data)
            elif btype == COMMIT:
                done.append((seq, blocks))
                for b in pending_revokes:
                    revokes[b] = seq
                blocks, pending_revokes, seq = {}, [], (seq + 1) & 0xFFFFFFFF
            else:
                break
            jblock = self.next(jblock)
        return done, revokes


def replay(fs: ExtFS) -> tuple[dict[int, bytes], str]:
    """The blocks a journal recovery would write, and a note for the user ('' when clean)."""
    from backyfs.fronts.extfs import ExtError

    try:
        journal = Journal(fs)
        if journal.start == 0:
            return {}, ""
        done, revokes = journal.scan()
    except ExtError as exc:
        return {}, f"the journal needs recovery but cannot be replayed ({exc}); recent changes may be missing"
    overrides: dict[int, bytes] = {}
    order = {seq: i for i, (seq, _) in enumerate(done)}  # sequence numbers may wrap
    for seq, blocks in done:
        for fs_block, (jblock, escaped) in blocks.items():
            if fs_block in revokes and order.get(revokes[fs_block], -1) >= order[seq]:
                continue
            data = journal.read(jblock)
            overrides[fs_block] = struct.pack(">I", MAGIC) + data[4:] if escaped else data
    note = f"replayed the journal in memory: {len(done)} transaction(s), {len(overrides)} block(s)"
    if journal.incompat & INCOMPAT_FAST_COMMIT:
        note += "; fast-commit records are not replayed"
    return overrides, note
