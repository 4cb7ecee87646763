"""Partition tables and filesystem signatures, read through a pread callable.

Pure functions over `pread(offset, length) -> bytes`, so they work on an export device, a window of
one, or a plain file. MBR (primary, and logical partitions in an extended chain) and GPT (primary
header, else the backup at the end) with 512-byte sectors, as Linux numbers them: MBR primaries are
1-4 and logicals 5 and up; GPT numbers are entry slots + 1. Partitions that do not fit the device
are dropped: they could not be read anyway.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

Pread = Callable[[int, int], bytes]
SECTOR = 512
_EXTENDED = {0x05, 0x0F, 0x85}
_GPT_PROTECTIVE = 0xEE
_MAX_LOGICAL = 128  # an EBR chain that loops or runs on forever is cut here
_MAX_GPT_ENTRIES = 1024


@dataclass(frozen=True)
class Partition:
    number: int
    offset: int  # bytes from the start of the device
    length: int  # bytes
    type: str  # MBR type byte as hex ("83") or GPT type GUID
    name: str = ""  # GPT partition name

    def to_json(self) -> dict:
        return asdict(self)


def find_partitions(pread: Pread, size: int) -> list[Partition]:
    """The partitions of a device of SIZE bytes; [] when it has no (readable) partition table."""
    if size < 2 * SECTOR:
        return []
    mbr = pread(0, SECTOR)
    if mbr[510:512] != b"\x55\xaa":
        return []
    entries = _mbr_entries(mbr)
    if any(ptype == _GPT_PROTECTIVE for ptype, _, _ in entries):
        return _gpt(pread, size)
    if _looks_like_boot_sector(mbr, entries):
        return []
    parts = []
    for number, (ptype, start, count) in enumerate(entries, 1):
        if ptype == 0 or count == 0:
            continue
        if ptype in _EXTENDED:  # numbered on from 5 after any earlier logical ones: unique names
            parts += _logical(pread, size, start, first=5 + sum(p.number >= 5 for p in parts))
        else:
            parts.append(Partition(number, start * SECTOR, count * SECTOR, f"{ptype:02x}"))
    return [p for p in parts if _fits(p, size)]


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int]]:
    """(type, first sector, sector count) of the four slots of an MBR or EBR."""
    out = []
    for i in range(4):
        entry = sector[446 + 16 * i : 462 + 16 * i]
        start, count = struct.unpack_from("<II", entry, 8)
        out.append((entry[4], start, count))
    return out


def _looks_like_boot_sector(mbr: bytes, entries: list[tuple[int, int, int]]) -> bool:
    """A FAT/NTFS boot sector also ends in 55AA; its 'entries' then hold garbage status bytes."""
    return any(mbr[446 + 16 * i] not in (0x00, 0x80) for i in range(4) if entries[i][0])


def _logical(pread: Pread, size: int, ext_start: int, first: int = 5) -> list[Partition]:
    """Follow the chain of extended boot records: each holds one logical partition (relative to
    itself) and a link to the next EBR (relative to the start of the extended partition)."""
    parts: list[Partition] = []
    ebr_sector, seen = ext_start, set()
    # Bounded by EBRs read, not partitions found: a chain of empty EBRs must not read the disk.
    while ebr_sector not in seen and len(seen) < _MAX_LOGICAL and (ebr_sector + 1) * SECTOR <= size:
        seen.add(ebr_sector)
        ebr = pread(ebr_sector * SECTOR, SECTOR)
        if ebr[510:512] != b"\x55\xaa":
            break
        (ptype, start, count), (ntype, nstart, _), *_ = _mbr_entries(ebr)
        if ptype and count:
            parts.append(Partition(first + len(parts), (ebr_sector + start) * SECTOR, count * SECTOR,
                                   f"{ptype:02x}"))
        if ntype not in _EXTENDED or nstart == 0:
            break
        ebr_sector = ext_start + nstart
    return parts


def _gpt(pread: Pread, size: int) -> list[Partition]:
    last_lba = size // SECTOR - 1
    for lba in (1, last_lba):  # the primary header, else the backup
        header = pread(lba * SECTOR, SECTOR)
        parsed = _gpt_header(header)
        if parsed is None:
            continue
        entries_lba, count, entry_size, entries_crc = parsed
        if (entries_lba + 1) * SECTOR + count * entry_size > size + SECTOR:
            continue
        table = pread(entries_lba * SECTOR, count * entry_size)
        if zlib.crc32(table) != entries_crc:
            continue
        return [p for p in _gpt_entries(table, count, entry_size) if _fits(p, size)]
    return []


def _gpt_header(header: bytes) -> tuple[int, int, int, int] | None:
    if header[:8] != b"EFI PART":
        return None
    (hsize,) = struct.unpack_from("<I", header, 12)
    if not 92 <= hsize <= SECTOR:
        return None
    (crc,) = struct.unpack_from("<I", header, 16)
    if zlib.crc32(header[:16] + b"\0\0\0\0" + header[20:hsize]) != crc:
        return None
    entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", header, 72)
    # Linux reads only 128-byte entries; a larger size (a damaged or hostile header) could make
    # the table as large as the disk, read into memory before its checksum is checked.
    if not 0 < count <= _MAX_GPT_ENTRIES or entry_size != 128:
        return None
    return entries_lba, count, entry_size, entries_crc


def _gpt_entries(table: bytes, count: int, entry_size: int) -> list[Partition]:
    parts = []
    for slot in range(count):
        entry = table[slot * entry_size : (slot + 1) * entry_size]
        if entry[:16] == bytes(16):
            continue  # unused slot
        first, last = struct.unpack_from("<QQ", entry, 32)
        if last < first:
            continue
        name = entry[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
        parts.append(Partition(slot + 1, first * SECTOR, (last - first + 1) * SECTOR,
                               _guid(entry[:16]), name))
    return parts


def _guid(raw: bytes) -> str:
    a, b, c = struct.unpack_from("<IHH", raw)
    return f"{a:08X}-{b:04X}-{c:04X}-{raw[8:10].hex().upper()}-{raw[10:16].hex().upper()}"


def _fits(part: Partition, size: int) -> bool:
    return part.length > 0 and part.offset + part.length <= size


# --- filesystem signatures ----------------------------------------------------------------------
# (name, offset, magic): the first match wins. Offsets from util-linux's libblkid.
_SIGNATURES: list[tuple[str, int, bytes]] = [
    ("ext", 1024 + 0x38, b"\x53\xef"),
    ("xfs", 0, b"XFSB"),
    ("btrfs", 0x10040, b"_BHRfS_M"),
    ("LUKS", 0, b"LUKS\xba\xbe"),
    ("LVM2_member", 512 + 0x18, b"LVM2 001"),
    ("ntfs", 3, b"NTFS    "),
    ("vfat", 0x52, b"FAT32   "),
    ("vfat", 0x36, b"FAT16   "),
    ("vfat", 0x36, b"FAT12   "),
    ("swap", 4096 - 10, b"SWAPSPACE2"),
    ("iso9660", 0x8001, b"CD001"),
]
_EXT_HAS_JOURNAL, _EXT_EXTENTS, _EXT_64BIT, _EXT_FLEX_BG = 0x4, 0x40, 0x80, 0x200


def detect_filesystem(pread: Pread, size: int) -> str | None:
    """'ext2', 'ext3', 'ext4', 'xfs', 'btrfs', ... from the superblock magic; None if unknown."""
    for name, offset, magic in _SIGNATURES:
        if offset + len(magic) > size:
            continue
        if pread(offset, len(magic)) == magic:
            return _ext_flavour(pread) if name == "ext" else name
    return None


def _ext_flavour(pread: Pread) -> str:
    sb = pread(1024, 0x68)
    if len(sb) < 0x64:  # a volume too small to hold the superblock's feature flags
        return "ext2"
    compat, incompat = struct.unpack_from("<II", sb, 0x5C)
    if incompat & (_EXT_EXTENTS | _EXT_64BIT | _EXT_FLEX_BG):
        return "ext4"
    return "ext3" if compat & _EXT_HAS_JOURNAL else "ext2"
