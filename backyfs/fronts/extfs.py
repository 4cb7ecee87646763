"""A read-only ext2/ext3/ext4 reader over a pread callable, for single-file restore.

Why our own: restoring one file must read only the blocks that file needs, from a version that is
not a file (debugfs wants an image file, so it would first need the whole partition copied out), and
must work as an ordinary user (no mount, no loop device). The one maintained pure-Python library
(PyPI `ext4`) reads no ext2/ext3 block maps. This module covers what real disks use: extent trees and
indirect block maps, 32/64-bit group descriptors (incl. meta_bg), htree directories (read linearly,
which they allow), inline data, fast and slow symlinks, 64-bit sizes, nanosecond times; and it
replays a journal that needs recovery (backyfs.fronts.jbd2), as a backup of a running VM has one.
Not supported (clear error): encrypted files, compression, a journal device instead of a filesystem.
"""

from __future__ import annotations

import contextlib
import stat
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from backyfs.errors import BackyfsError
from backyfs.fronts.extmaps import FL_INLINE_DATA, BlockMaps
from backyfs.fronts.extmaps import Run as Run  # (re-exported)

Pread = Callable[[int, int], bytes]
EXT_MAGIC = 0xEF53
ROOT_INO = 2
# superblock feature bits
COMPAT_HAS_JOURNAL = 0x4
INCOMPAT_COMPRESSION, INCOMPAT_FILETYPE, INCOMPAT_RECOVER, INCOMPAT_JOURNAL_DEV = 0x1, 0x2, 0x4, 0x8
INCOMPAT_META_BG, INCOMPAT_64BIT, INCOMPAT_DIRDATA, INCOMPAT_LARGEDIR = 0x10, 0x80, 0x1000, 0x4000
RO_COMPAT_SPARSE_SUPER = 0x1
_XATTR_MAGIC = 0xEA020000
_MAX_SYMLINKS = 40
_MAX_LINK_BYTES = 4096  # PATH_MAX: what the kernel allows a symlink target
# About 2 million entries: a 12 MiB directory already costs ~1.9 GB of Python objects in ls-files --json.
_MAX_DIR_BYTES = 64 << 20
_MAX_LOG_BLOCK_SIZE = 6  # 64 KiB blocks, the kernel's largest
_MAX_COMPONENTS = (_MAX_SYMLINKS + 1) * _MAX_LINK_BYTES // 2  # the most "a/" Linux would resolve
_DIR_CACHE_DIRS, _DIR_CACHE_ENTRIES = 64, 1 << 20  # lookup's parsed directories (the last always kept)
_MAX_LOOKUP_WORK = 8_000_000  # directory entries one lookup parses (a few seconds); cache hits are free


class ExtError(BackyfsError):
    """The filesystem cannot be read: corrupt, or uses a feature this reader does not have."""


@contextlib.contextmanager
def corrupt_is_exterror() -> Iterator[None]:
    """Damaged structures can break a parse anywhere: report them as ExtError, not a traceback."""
    try:
        yield
    except (struct.error, IndexError, ValueError, OverflowError, RecursionError, MemoryError) as exc:
        raise ExtError(f"corrupt filesystem structure ({type(exc).__name__}: {exc})") from None


@dataclass
class Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    flags: int
    blocks: int  # i_blocks (512-byte units unless huge_file), for the fast-symlink test
    file_acl: int
    raw: bytes

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)


def _power_of_two(n: int) -> bool:
    return n > 0 and not n & (n - 1)


def _time_ns(raw: bytes, base: int, extra: int | None) -> int:
    (sec,) = struct.unpack_from("<i", raw, base)
    ns = 0
    if extra is not None:
        (x,) = struct.unpack_from("<I", raw, extra)
        sec += (x & 3) << 32  # epoch bits extend the signed 32-bit seconds past 2038
        ns = x >> 2
    return sec * 1_000_000_000 + ns


class ExtFS(BlockMaps):
    def __init__(self, pread: Pread, size: int, replay_journal: bool = True) -> None:
        self.pread, self.size = pread, size
        sb = pread(1024, 1024)
        if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != EXT_MAGIC:
            raise ExtError("no ext2/ext3/ext4 superblock")
        self.sb = sb
        self.compat, self.incompat, self.ro_compat = struct.unpack_from("<III", sb, 0x5C)
        self._check_features()
        self._geometry(sb)
        self.overrides: Mapping[int, bytes] = {}  # blocks as the replayed journal has them
        self._tables: dict[int, int] = {}
        self._dirs: OrderedDict[int, dict[bytes, int]] = OrderedDict()  # lookup's parsed directories
        self._dirs_entries = 0
        self.journal_note = ""
        if replay_journal and self.incompat & INCOMPAT_RECOVER and self.compat & COMPAT_HAS_JOURNAL:
            from backyfs.fronts.jbd2 import replay

            self.overrides, self.journal_note = replay(self)
            self._tables.clear()

    def _geometry(self, sb: bytes) -> None:
        """Sizes from the superblock, checked as the kernel checks them: the guest wrote them, and a
        wild one would otherwise allocate (1024 << 2^32) or divide by zero."""
        (self.inodes_count, blocks_lo, _, _, _, self.first_data_block, log_bs, _, self.blocks_per_group,
         _, self.inodes_per_group) = struct.unpack_from("<11I", sb, 0)
        if log_bs > _MAX_LOG_BLOCK_SIZE:
            raise ExtError(f"corrupt superblock: block size 1024 << {log_bs} (64 KiB at most)")
        bs = self.block_size = 1024 << log_bs
        rev = struct.unpack_from("<I", sb, 0x4C)[0]
        self.inode_size = struct.unpack_from("<H", sb, 0x58)[0] if rev >= 1 else 128
        if not 128 <= self.inode_size <= bs or not _power_of_two(self.inode_size):
            raise ExtError(f"corrupt superblock: inode size {self.inode_size}")
        wide = self.incompat & INCOMPAT_64BIT
        self.desc_size = (struct.unpack_from("<H", sb, 0xFE)[0] or 32) if wide else 32
        if not 32 <= self.desc_size <= 1024 or not _power_of_two(self.desc_size):
            raise ExtError(f"corrupt superblock: group descriptor size {self.desc_size}")
        self.blocks_count = blocks_lo | (struct.unpack_from("<I", sb, 0x150)[0] << 32 if wide else 0)
        if self.blocks_count * bs > self.size:  # the kernel refuses to mount such a filesystem
            raise ExtError(f"corrupt superblock: {self.blocks_count} blocks of {bs} bytes are more than "
                           f"the {self.size} bytes of the partition (or the partition is truncated)")
        self.first_meta_bg = struct.unpack_from("<I", sb, 0x104)[0]
        if not 0 < self.inodes_per_group <= 8 * bs or not self.blocks_per_group:
            raise ExtError(f"corrupt superblock: {self.blocks_per_group} blocks and "
                           f"{self.inodes_per_group} inodes per group")
        if self.first_data_block >= self.blocks_count:
            raise ExtError(f"corrupt superblock: first data block {self.first_data_block} of "
                           f"{self.blocks_count}")
        self.groups = -(-(self.blocks_count - self.first_data_block) // self.blocks_per_group)
        if self.inodes_count > self.groups * self.inodes_per_group:
            raise ExtError(f"corrupt superblock: {self.inodes_count} inodes in {self.groups} groups")
        self.max_size = bs << 32  # logical block numbers are 32-bit

    def _check_features(self) -> None:
        if self.incompat & INCOMPAT_JOURNAL_DEV:
            raise ExtError("this is an external ext3/ext4 journal device, not a filesystem")
        for bit, what in ((INCOMPAT_COMPRESSION, "compression"), (INCOMPAT_DIRDATA, "dirdata")):
            if self.incompat & bit:
                raise ExtError(f"the filesystem uses {what}, which this reader does not support")

    # --- blocks ---------------------------------------------------------------------------
    def block(self, n: int) -> bytes:
        data = self.overrides.get(n) if 0 <= n < self.blocks_count else None  # (else an error below)
        if data is not None:
            return data
        return self.read_blocks(n, 1)

    def read_blocks(self, n: int, count: int) -> bytes:
        """COUNT blocks from N on, with journal overrides applied."""
        data = self.device_blocks(n, count)
        if not self.overrides or not any(b in self.overrides for b in range(n, n + count)):
            return data
        bs, buf = self.block_size, bytearray(data)
        for b in range(n, n + count):
            if b in self.overrides:
                buf[(b - n) * bs : (b - n + 1) * bs] = self.overrides[b]
        return bytes(buf)

    def device_blocks(self, n: int, count: int) -> bytes:
        """COUNT blocks from N on as the device has them (the journal's own reads)."""
        if n < 0 or count < 0 or n + count > self.blocks_count:
            raise ExtError(f"block {n}+{count} is beyond the end of the filesystem (corrupt)")
        bs = self.block_size
        data = self.pread(n * bs, count * bs)
        if len(data) != count * bs:
            raise ExtError(f"block {n}+{count} is beyond the end of the partition (truncated?)")
        return data

    # --- inodes ---------------------------------------------------------------------------
    def _has_super(self, group: int) -> bool:
        if group <= 1 or not self.ro_compat & RO_COMPAT_SPARSE_SUPER:
            return True
        for base in (3, 5, 7):
            n = base
            while n < group:
                n *= base
            if n == group:
                return True
        return False

    def _desc_location(self, group: int) -> int:
        per_block = self.block_size // self.desc_size
        gdt_block, index = divmod(group, per_block)
        if self.incompat & INCOMPAT_META_BG and gdt_block >= self.first_meta_bg:
            first = gdt_block * per_block  # the first group of this meta group holds its descriptors
            start = self.first_data_block + first * self.blocks_per_group + self._has_super(first)
            return start * self.block_size + index * self.desc_size
        return (self.first_data_block + 1 + gdt_block) * self.block_size + index * self.desc_size

    def _inode_table(self, group: int) -> int:
        table = self._tables.get(group)
        if table is None:
            loc = self._desc_location(group)
            blk, off = divmod(loc, self.block_size)
            desc = self.block(blk)[off : off + self.desc_size]
            table = struct.unpack_from("<I", desc, 8)[0]
            if self.desc_size >= 64:
                table |= struct.unpack_from("<I", desc, 0x28)[0] << 32
            self._tables[group] = table
        return table

    def inode(self, ino: int) -> Inode:
        if not 1 <= ino <= self.inodes_count:
            raise ExtError(f"inode {ino} is out of range (corrupt directory?)")
        group, index = divmod(ino - 1, self.inodes_per_group)
        blk, off = divmod(index * self.inode_size, self.block_size)
        raw = self.block(self._inode_table(group) + blk)[off : off + self.inode_size]
        mode, uid_lo, size_lo = struct.unpack_from("<HHI", raw, 0)
        gid_lo, _links, blocks, flags = struct.unpack_from("<HHII", raw, 0x18)
        size_hi, file_acl = struct.unpack_from("<II", raw, 0x6C)[0], struct.unpack_from("<I", raw, 0x68)[0]
        uid_hi, gid_hi = struct.unpack_from("<HH", raw, 0x78)
        extra = struct.unpack_from("<H", raw, 0x80)[0] if self.inode_size > 128 else 0
        mtime_x = 0x88 if extra >= 12 else None
        atime_x = 0x8C if extra >= 16 else None
        if not stat.S_ISDIR(mode) or self.incompat & INCOMPAT_LARGEDIR:  # else i_dir_acl in ext2
            size_lo |= size_hi << 32
        if size_lo > self.max_size:  # up to 2^64-1 on disk: no off_t holds that
            raise ExtError(f"inode {ino}: size {size_lo} is beyond the format's maximum (corrupt)")
        return Inode(ino, mode, uid_lo | uid_hi << 16, gid_lo | gid_hi << 16, size_lo,
                     _time_ns(raw, 0x8, atime_x), _time_ns(raw, 0x10, mtime_x), flags, blocks, file_acl, raw)

    # --- content --------------------------------------------------------------------------
    def inline_data(self, inode: Inode) -> bytes:
        """i_block's 60 bytes, then the system.data extended attribute in the inode body."""
        return inode.raw[0x28:0x64] + self._inode_xattr(inode, 7, b"data")

    def _inode_xattr(self, inode: Inode, index: int, name: bytes) -> bytes:
        raw = inode.raw
        if len(raw) <= 0x82:
            return b""
        start = 128 + struct.unpack_from("<H", raw, 0x80)[0]
        if start + 4 > len(raw) or struct.unpack_from("<I", raw, start)[0] != _XATTR_MAGIC:
            return b""
        base = pos = start + 4
        while pos + 16 <= len(raw):
            name_len, idx, value_offs, value_inum, value_size = struct.unpack_from("<BBHII", raw, pos)
            if not (name_len or idx or value_offs or value_inum):
                break
            if idx == index and raw[pos + 16 : pos + 16 + name_len] == name and not value_inum:
                return raw[base + value_offs : base + value_offs + value_size]
            pos += (16 + name_len + 3) & ~3
        return b""

    def ranges(self, inode: Inode, chunk: int = 4 << 20) -> Iterator[tuple[int, bytes]]:
        """(file offset, data) of the file's written parts, in order; everything else reads as
        zeros (holes, unwritten extents), so a writer can leave it sparse."""
        if inode.flags & FL_INLINE_DATA:
            yield 0, self.inline_data(inode)[: inode.size]
            return
        bs, per_chunk = self.block_size, max(1, chunk // self.block_size)
        for run in self.iter_runs(inode):
            if not run.initialized:
                continue
            for i in range(0, run.count, per_chunk):
                offset = (run.lblk + i) * bs  # runs end at i_size
                data = self.read_blocks(run.pblk + i, min(per_chunk, run.count - i))
                yield offset, data[: inode.size - offset]

    def read(self, inode: Inode) -> bytes:
        """A symlink's whole content (files go through ranges(), directories through listdir())."""
        if inode.size > _MAX_LINK_BYTES:  # a damaged size must not allocate gigabytes
            raise ExtError(f"inode {inode.ino}: size {inode.size} is impossible for its type")
        buf = bytearray(inode.size)
        for offset, data in self.ranges(inode):
            buf[offset : offset + len(data)] = data
        return bytes(buf)

    def readlink(self, inode: Inode) -> bytes:
        if inode.flags & FL_INLINE_DATA:
            return self.inline_data(inode)[: inode.size]
        ea_blocks = self.block_size // 512 if inode.file_acl else 0
        if inode.blocks - ea_blocks == 0 and inode.size < 60:  # a fast symlink: the target in i_block
            return inode.raw[0x28 : 0x28 + inode.size]
        return self.read(inode)

    # --- directories ----------------------------------------------------------------------
    def listdir(self, inode: Inode) -> list[tuple[bytes, int]]:
        """(name, inode number) of a directory's entries, without '.' and '..'."""
        return self._parse_dir(inode)[0]

    def _parse_dir(self, inode: Inode) -> tuple[list[tuple[bytes, int]], int]:
        """listdir(), and its work: the records parsed, used or not, and at least one a 64 bytes read
        (blocks without a valid record cost their reading)."""
        if not inode.is_dir:
            raise ExtError(f"inode {inode.ino} is not a directory")
        out: list[tuple[bytes, int]] = []
        if inode.flags & FL_INLINE_DATA:  # 4 bytes of parent inode, then entries
            entries = self.inline_data(inode)[4:]
            return out, _dirents(entries, len(entries), out)
        work = 0
        for data in self._dir_blocks(inode):
            work += max(_dirents(data, self.block_size, out), len(data) // 64)
        return out, work

    def _dir_blocks(self, inode: Inode, chunk: int = 64) -> Iterator[bytes]:
        """A directory's written blocks, one by one (holes and unwritten extents hold no entries): a
        damaged size must not allocate, and a block named twice would repeat its entries without
        end (no sound ext filesystem shares a block within a directory)."""
        if inode.size > _MAX_DIR_BYTES:
            raise ExtError(f"directory inode {inode.ino} is {inode.size} bytes: more than the "
                           f"{_MAX_DIR_BYTES >> 20} MiB (about 2 million entries) this reader lists")
        bs, used = self.block_size, set()
        for run in self.iter_runs(inode):
            for i in range(0, run.count, chunk):
                count = min(chunk, run.count - i)
                for pblk in range(run.pblk + i, run.pblk + i + count):
                    if pblk in used:
                        raise ExtError(f"directory inode {inode.ino}: block {pblk} is used twice (corrupt)")
                    used.add(pblk)
                if run.initialized:
                    data = self.read_blocks(run.pblk + i, count)
                    for k in range(count):
                        offset = (run.lblk + i + k) * bs
                        yield data[k * bs : k * bs + min(bs, inode.size - offset)]

    def _entries(self, inode: Inode) -> tuple[dict[bytes, int], int]:
        """listdir() as {name: inode}, from a small LRU cache: a path like x/../x/../ (which symlinks
        can repeat thousands of times) must not parse the same directory again each time. With the
        work it took (_parse_dir(); 0 from the cache)."""
        entries = self._dirs.get(inode.ino)
        if entries is not None:
            self._dirs.move_to_end(inode.ino)
            return entries, 0
        listed, work = self._parse_dir(inode)
        entries = self._dirs[inode.ino] = dict(listed)
        self._dirs_entries += len(entries)
        while len(self._dirs) > 1 and (len(self._dirs) > _DIR_CACHE_DIRS
                                       or self._dirs_entries > _DIR_CACHE_ENTRIES):
            self._dirs_entries -= len(self._dirs.popitem(last=False)[1])
        return entries, work

    def lookup(self, path: str, follow_last: bool = False) -> Inode:
        """The inode at PATH (from the filesystem's root). Symlinks on the way are followed, inside
        this filesystem; the last component only with follow_last."""
        todo = _components(path)  # reversed: the next one last
        stack: list[Inode] = [self.inode(ROOT_INO)]
        hops = steps = work = 0
        while todo:
            name = todo.pop()
            steps += 1
            if steps > _MAX_COMPONENTS:
                raise ExtError(f"{path}: too many path components (through symbolic links)")
            if name == "..":
                if len(stack) > 1:
                    stack.pop()
                continue
            entries, cost = self._entries(stack[-1])
            work += cost  # directories that evict each other from the cache were parsed again each time
            if work > _MAX_LOOKUP_WORK:
                raise ExtError(f"{path}: path resolution reads too many directory entries (more than "
                               f"{_MAX_LOOKUP_WORK:,})")
            found = entries.get(name.encode("utf-8", "surrogateescape"))
            if found is None:
                raise ExtError(f"{path}: no such file or directory")
            node = self.inode(found)
            if node.is_link and (todo or follow_last):
                hops += 1
                if hops > _MAX_SYMLINKS:
                    raise ExtError(f"{path}: too many levels of symbolic links")
                target = self.readlink(node).decode("utf-8", "surrogateescape")
                if target.startswith("/"):
                    stack = stack[:1]
                todo += _components(target)
                continue
            if todo and not node.is_dir:
                raise ExtError(f"{path}: {name} is not a directory")
            stack.append(node)
        return stack[-1]


def _components(path: str) -> list[str]:
    return [p for p in reversed(path.split("/")) if p not in ("", ".")]


def _dirents(data: bytes, block_size: int, out: list[tuple[bytes, int]]) -> int:
    """Parse linear directory blocks into OUT; returns the number of records parsed. An htree's index
    blocks look like one empty entry spanning the block, and checksum tails like an entry of inode 0,
    so both are skipped as unused entries."""
    records = 0
    for start in range(0, len(data), block_size):
        end, pos = min(start + block_size, len(data)), start
        while pos + 8 <= end:
            ino, rec_len, name_len = struct.unpack_from("<IHB", data, pos)
            if rec_len in (0, 65535) and block_size >= 65536:
                rec_len = 65536  # 64 KiB blocks store that length as 0 or 65535
            if rec_len < 8 or rec_len % 4 or pos + rec_len > end:
                break  # corrupt: skip the rest of this block
            records += 1
            name = data[pos + 8 : pos + 8 + name_len]
            if ino and name_len and name not in (b".", b"..") and 8 + name_len <= rec_len:
                out.append((name, ino))
            pos += rec_len
    return records

