"""The ext2/3/4 reader and its journal replay on images a hostile guest crafted: each must end soon,
in bounded memory, with the reader's one-line ExtError (or the journal's "cannot be replayed" note),
never a hang, a traceback or gigabytes of memory. Images are small: mke2fs, then byte patches."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
from array import array
from pathlib import Path

import pytest
from fuse_helpers import make_ext

import backyfs
from backyfs.fronts import jbd2
from backyfs.fronts.extfs import ExtError, ExtFS, Run
from backyfs.fronts.files import Restorer

JMAGIC = 0xC03B3998


def open_fs(image: Path) -> ExtFS:
    fd = os.open(image, os.O_RDONLY)
    return ExtFS(lambda offset, length: os.pread(fd, length, offset), os.fstat(fd).st_size)


def isolated(image: Path, code: str, timeout: float = 15, headroom: int = 150 << 20) -> str:
    """Run CODE (fs: the image's ExtFS; it sets `result`) in a child limited to its address space
    after imports plus HEADROOM, killed after TIMEOUT: 'OK <result>' or 'ExtError <message>'."""
    script = textwrap.dedent(f"""
        import os, resource
        from backyfs.fronts.extfs import ExtError, ExtFS
        vm = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (vm + {headroom}, vm + {headroom}))
        fd = os.open({str(image)!r}, os.O_RDONLY)
        try:
            fs = ExtFS(lambda offset, length: os.pread(fd, length, offset), os.fstat(fd).st_size)
            exec({code!r})
            print("OK", result)
        except ExtError as exc:
            print("ExtError", exc)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(backyfs.__file__).parents[1])}
    try:
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s")
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip()


def debugfs(image: Path, *commands: str) -> str:
    return subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input="\n".join(commands) + "\n",
                          text=True, capture_output=True, check=True).stdout


def inode_at(image: Path, what: str) -> int:
    """Byte offset of inode WHAT (a path, or <N>) in the image."""
    out = subprocess.run(["debugfs", "-R", f"imap {what}", str(image)], capture_output=True, text=True,
                         check=True).stdout  # "... located at block B, offset 0xO"
    words = out.split()
    block = int(words[words.index("block", 8) + 1].rstrip(","))
    bs = 1024 << struct.unpack_from("<I", read_at(image, 1024 + 24, 4))[0]
    return block * bs + int(words[-1], 16)


def read_at(image: Path, offset: int, length: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(length)


def patch(image: Path, offset: int, data: bytes) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(data)


def extents(*runs: tuple[int, int, int], depth: int = 0) -> bytes:
    """An inode's i_block holding an extent leaf (lblk, length, pblk) ..."""
    body = struct.pack("<HHHHI", 0xF30A, len(runs), 4, depth, 0)
    body += b"".join(struct.pack("<IHHI", lblk, n, 0, pblk) for lblk, n, pblk in runs)
    return body.ljust(60, b"\0")


def set_size(image: Path, ino_offset: int, size: int) -> None:
    patch(image, ino_offset + 4, struct.pack("<I", size & 0xFFFFFFFF))
    patch(image, ino_offset + 0x6C, struct.pack("<I", size >> 32))


# --- superblock ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("offset", "fmt", "value"), [
    (0xFE, "<H", 8192),  # s_desc_size over the block size: ZeroDivisionError
    (0xFE, "<H", 65535),
    (0xFE, "<H", 48),  # not a power of two
    (24, "<I", 0xFFFFFFFF),  # s_log_block_size: 1024 << 2^32
    (24, "<I", 7),  # 128 KiB blocks
    (0x58, "<H", 129),  # s_inode_size not a power of two
    (40, "<I", 0xFFFFFFFF),  # s_inodes_per_group
    (20, "<I", 0xFFFFFFF0),  # s_first_data_block past the end
    (0, "<I", 0xFFFFFFFF),  # s_inodes_count more than the groups hold
], ids=["desc8192", "desc65535", "desc48", "logbs-huge", "logbs7", "isize129", "ipg", "first", "icount"])
def test_impossible_superblock_fields_are_one_line(tmp_path, offset, fmt, value):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    image = make_ext(tmp_path / "fs.img", src, 4 << 20, "ext4", "-O", "64bit")
    patch(image, 1024 + offset, struct.pack(fmt, value))
    with pytest.raises(ExtError, match="corrupt superblock"):
        open_fs(image)


def test_a_filesystem_larger_than_its_partition_is_corrupt(tmp_path):
    """The kernel refuses it; a guest claiming more blocks than it has makes room for files that map
    its few real blocks many times."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    image = make_ext(tmp_path / "fs.img", src, 4 << 20, "ext4", "-b", "4096")
    with open(image, "r+b") as f:  # a partition larger than its filesystem is fine
        f.truncate(5 << 20)
    assert open_fs(image).lookup("/f").size == 1
    patch(image, 1024 + 4, struct.pack("<I", (5 << 20) // 4096 + 1))  # s_blocks_count_lo
    with pytest.raises(ExtError, match="corrupt superblock: 1281 blocks of 4096 bytes are more than the "
                                       "5242880 bytes of the partition"):
        open_fs(image)


# --- file sizes and block maps ------------------------------------------------------------------
def small_ext4(tmp_path: Path, *opts: str, size: int = 8 << 20) -> Path:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "f").write_text("abc")
    (src / "d" / "keep").write_text("kept\n")
    return make_ext(tmp_path / "fs.img", src, size, "ext4", "-b", "4096", *opts)


def test_a_size_of_2_63_is_corrupt_not_a_traceback(tmp_path):
    image = small_ext4(tmp_path)
    debugfs(image, "sif f size 0x8000000000000000")
    fs = open_fs(image)
    with pytest.raises(ExtError, match="beyond the format's maximum"):
        fs.lookup("/f")
    result = Restorer(fs).restore(fs.inode(2), str(tmp_path / "out"))
    assert len(result.errors) == 1 and "f: inode" in result.errors[0], result.errors
    assert (tmp_path / "out" / "d" / "keep").read_text() == "kept\n"


def test_overlapping_extents_are_corrupt_and_extents_are_clipped_to_the_size(tmp_path):
    image = small_ext4(tmp_path)
    at = inode_at(image, "/f")
    patch(image, at + 0x28, extents((0, 1000, 1000)))  # 1000 blocks for a 3-byte file
    fs = open_fs(image)
    assert fs.runs(fs.lookup("/f")) == [Run(0, 1000, 1)]
    set_size(image, at, 12 * 4096)
    patch(image, at + 0x28, extents((0, 8, 1000), (4, 8, 1100)))  # blocks 4..7 twice
    fs = open_fs(image)
    with pytest.raises(ExtError, match="mapped twice"):
        list(fs.ranges(fs.lookup("/f")))


def test_a_file_mapping_more_blocks_than_the_filesystem_is_corrupt(tmp_path):
    """A leaf of extents all mapping the same blocks: a 16 MiB image made a 5.3 GiB file (and one
    more tree level the 16 TiB maximum)."""
    image = small_ext4(tmp_path)  # 2048 blocks
    at = inode_at(image, "/f")
    fs = open_fs(image)
    assert fs.blocks_count == 2048 and fs.mapped_blocks(fs.lookup("/f")) == 1
    leaf_at, data = 1500, 1600

    def leaf(n: int) -> None:
        body = struct.pack("<HHHHI", 0xF30A, n, 340, 0, 0)
        body += b"".join(struct.pack("<IHHI", i * 32, 32, 0, data) for i in range(n))
        patch(image, leaf_at * 4096, body)
        patch(image, at + 0x28, struct.pack("<HHHHI", 0xF30A, 1, 4, 1, 0)
              + struct.pack("<IIHH", 0, leaf_at, 0, 0) + bytes(36))
        set_size(image, at, 340 * 32 * 4096)

    leaf(64)  # 2048 blocks: as many as the filesystem has
    fs = open_fs(image)
    assert fs.mapped_blocks(fs.lookup("/f")) == 2048
    assert sum(len(d) for _o, d in fs.ranges(fs.lookup("/f"))) == 2048 * 4096
    leaf(340)  # 10,880 blocks
    fs = open_fs(image)
    for count in (fs.mapped_blocks, lambda inode: sum(len(d) for _o, d in fs.ranges(inode))):
        with pytest.raises(ExtError, match="inode 14: the block map names more blocks than the "
                                           "filesystem's 2048"):
            count(fs.lookup("/f"))
    result = Restorer(fs).restore(fs.inode(2), str(tmp_path / "out"))
    assert len(result.errors) == 1 and "more blocks than the filesystem's" in result.errors[0], result.errors
    assert not (tmp_path / "out" / "f").exists()  # (a partial copy is removed)
    assert (tmp_path / "out" / "d" / "keep").read_text() == "kept\n"


def test_files_sharing_blocks_are_copied_no_further_than_the_filesystem_holds(tmp_path):
    """Each file within the limit, but many files mapping the same blocks: the restore of a small
    image still wrote without end. No two ext files share a block, so a restore's files together
    map at most the filesystem's blocks."""
    image = small_ext4(tmp_path)  # 2048 blocks
    data = 1600
    for path in ("/f", "/d/keep"):  # each maps 1,500 blocks: all at 1600..1631 again and again
        at = inode_at(image, path)
        leaf_at = 1500 if path == "/f" else 1501
        body = struct.pack("<HHHHI", 0xF30A, 47, 340, 0, 0)
        body += b"".join(struct.pack("<IHHI", i * 32, 32 if i < 46 else 28, 0, data) for i in range(47))
        patch(image, leaf_at * 4096, body)
        patch(image, at + 0x28, struct.pack("<HHHHI", 0xF30A, 1, 4, 1, 0)
              + struct.pack("<IIHH", 0, leaf_at, 0, 0) + bytes(36))
        set_size(image, at, 1500 * 4096)
    fs = open_fs(image)
    assert fs.mapped_blocks(fs.lookup("/f")) == fs.mapped_blocks(fs.lookup("/d/keep")) == 1500
    result = Restorer(fs).restore(fs.inode(2), str(tmp_path / "out"))
    assert result.files == 1 and len(result.errors) == 1, result.errors
    assert "more than the filesystem's 2048: blocks are shared" in result.errors[0]


def test_an_extent_node_of_the_wrong_depth_is_corrupt(tmp_path):
    image = small_ext4(tmp_path)
    at = inode_at(image, "/f")
    leaf = struct.pack("<HHHHI", 0xF30A, 1, 340, 0, 0) + struct.pack("<IHHI", 0, 1, 0, 1000)
    patch(image, 1500 * 4096, leaf)  # a leaf (depth 0) where its parent says depth 2
    patch(image, at + 0x28, struct.pack("<HHHHI", 0xF30A, 1, 4, 3, 0).ljust(12, b"\0")
          + struct.pack("<IIHH", 0, 1500, 0, 0) + bytes(36))
    fs = open_fs(image)
    with pytest.raises(ExtError, match="corrupt extent tree"):
        list(fs.ranges(fs.lookup("/f")))


def test_a_map_of_millions_of_runs_is_streamed(tmp_path):
    """Indirect blocks of 1024 pointers each: the map once became one list of Run objects (12.3
    million, 1.9 GB, for 12,000 such blocks). Every other block, so that no two runs join; a sparse
    1 GiB filesystem, as a file cannot have more blocks than its filesystem."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"B" * 5000)
    image = make_ext(tmp_path / "fs.img", src, 1 << 30, "ext2", "-b", "4096", "-N", "64")
    at, leaves, free = inode_at(image, "/f"), 100, 2048
    patch(image, at + 0x28, struct.pack("<15I", *[0] * 14, free))  # a triple-indirect tree only
    set_size(image, at, 1 << 40)
    patch(image, free * 4096, struct.pack("<I", free + 1))
    patch(image, (free + 1) * 4096, b"".join(struct.pack("<I", free + 2 + i) for i in range(leaves)))
    data = free + 2 + leaves
    patch(image, (free + 2) * 4096, array("I", range(data, data + 2 * 1024 * leaves, 2)).tobytes())
    fs = open_fs(image)
    inode = fs.lookup("/f")
    tracemalloc.start()
    try:
        total = sum(len(data) for _offset, data in fs.ranges(inode))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == leaves * 1024 * 4096  # what the map says: a big file is fine, its memory is not
    assert peak < 4 << 20, peak


# --- directories and lookup ---------------------------------------------------------------------
def test_a_huge_sparse_directory_is_read_block_by_block(tmp_path):
    """The root's i_size set to 1 GiB - 1, the rest a hole: each listdir allocated 2 GB. Now 64 MiB
    at most (with 48 MiB to spare, whole it would not fit)."""
    image = small_ext4(tmp_path)
    set_size(image, inode_at(image, "<2>"), (64 << 20) - 1)
    started = time.monotonic()
    out = isolated(image, "result = sorted(n.decode() for n, _ in fs.listdir(fs.inode(2))), "
                   "fs.lookup('/d/keep').size", headroom=48 << 20)
    assert out == "OK (['d', 'f', 'lost+found'], 5)"
    assert time.monotonic() - started < 5


def test_a_directory_over_64_mib_is_refused(tmp_path):
    """Entries of 12 bytes: 1 GiB was 89 million of them (and Python objects of many GB)."""
    image = small_ext4(tmp_path)
    set_size(image, inode_at(image, "/d"), (64 << 20) + 1)
    fs = open_fs(image)
    with pytest.raises(ExtError, match=r"directory inode 12 is 67108865 bytes: more than the 64 MiB "
                                       r"\(about 2 million entries\) this reader lists"):
        fs.listdir(fs.lookup("/d"))


def test_a_directory_naming_one_block_twice_is_corrupt(tmp_path):
    """Extents that all map the same blocks full of entries made 89 million entries of 1 GiB."""
    image = small_ext4(tmp_path, "-O", "^metadata_csum,^dir_index")
    at = inode_at(image, "/d")
    block = struct.pack("<IHBB", 11, 12, 1, 1) + b"a\0\0\0"
    block = block * 340 + struct.pack("<IHBB", 11, 4096 - 340 * 12, 1, 1) + b"a" + bytes(4096 - 340 * 12 - 9)
    patch(image, 1500 * 4096, block * 4)
    patch(image, at + 0x28, extents((0, 4, 1500), (4, 4, 1500), (8, 4, 1500)))
    set_size(image, at, 12 * 4096)
    fs = open_fs(image)
    with pytest.raises(ExtError, match="block 1500 is used twice"):
        fs.listdir(fs.lookup("/d"))


def test_symlinks_full_of_dotdot_resolve_quickly(tmp_path):
    """A valid filesystem: 40 symlinks of 810 "x/../" each made lookup parse the root directory
    31,590 times (hours with 30,000 files in it)."""
    src = tmp_path / "src"
    (src / "x").mkdir(parents=True)
    (src / "real_etc").mkdir()
    (src / "real_etc" / "fstab").write_text("fstab\n")
    for i in range(3000):
        (src / f"f{i:06}").touch()
    for i in range(39):  # with /etc, 40 symlinks: as many as Linux follows
        (src / f"l{i}").symlink_to("x/../" * 810 + (f"l{i + 1}" if i < 38 else "real_etc"))
    (src / "etc").symlink_to("l0")
    image = make_ext(tmp_path / "fs.img", src, 32 << 20, "ext4", "-b", "4096", "-N", "3300")
    out = isolated(image, "result = fs.lookup('/etc/fstab').size", timeout=10)
    assert out == "OK 6"


def test_directories_evicting_each_other_from_the_cache_bound_a_lookup(tmp_path, monkeypatch):
    """/a held more names than the cache (1M entries): symlinks of "a/x/../../" made / and /a evict
    each other, and each of ~16,000 cycles parsed /a again (~2 s each: 9 hours). Here with a cache of
    1,000 entries, /a of 1,100 names, and a budget of 100,000 entries for one lookup."""
    from backyfs.fronts import extfs

    src = tmp_path / "src"
    (src / "a" / "x").mkdir(parents=True)
    (src / "real").mkdir()
    (src / "real" / "fstab").write_text("fstab\n")
    for i in range(1100):
        (src / "a" / f"f{i:05}").touch()
    for i in range(5):
        (src / f"l{i}").symlink_to("a/x/../../" * 409 + (f"l{i + 1}" if i < 4 else "real"))
    image = make_ext(tmp_path / "fs.img", src, 16 << 20, "ext4", "-b", "4096", "-N", "1300")
    monkeypatch.setattr(extfs, "_DIR_CACHE_ENTRIES", 1000)
    monkeypatch.setattr(extfs, "_MAX_LOOKUP_WORK", 100_000, raising=False)
    fs = open_fs(image)
    assert fs.lookup("/a/x/../../a/f01099").size == 0  # each directory parsed once
    assert fs.lookup("/a/x/../../" * 30 + "real/fstab").size == 6  # ~35,000 entries
    started = time.monotonic()
    with pytest.raises(ExtError, match="/l0/fstab: path resolution reads too many directory entries "
                                       "\\(more than 100,000\\)"):
        fs.lookup("/l0/fstab")  # 2,045 cycles
    assert time.monotonic() - started < 1
    assert fs.lookup("/real/fstab").size == 6  # the budget is per lookup


def test_a_path_of_too_many_components_is_refused(tmp_path):
    image = small_ext4(tmp_path)
    fs = open_fs(image)
    assert fs.lookup("d/../" * 1000 + "f").size == 3
    with pytest.raises(ExtError, match="too many path components"):
        fs.lookup("d/../" * 50_000 + "f")


# --- journal ------------------------------------------------------------------------------------
def journal_image(tmp_path: Path, log_blocks: int = 0) -> tuple[Path, int, int]:
    """An ext4 (4 KiB blocks) that needs recovery; returns it, its journal inode's offset, and the
    first of LOG_BLOCKS + 4 free blocks at its end for a hand-made journal."""
    image = tmp_path / "fs.img"
    size = (16 << 20) + log_blocks * 4096
    src = tmp_path / "src"
    src.mkdir()
    (src / "hostname").write_text("host\n")
    make_ext(image, src, size, "ext4", "-b", "4096", "-O", "^metadata_csum")
    (incompat,) = struct.unpack_from("<I", read_at(image, 1024 + 0x60, 4))
    patch(image, 1024 + 0x60, struct.pack("<I", incompat | 0x4))  # needs_recovery
    return image, inode_at(image, "<8>"), size // 4096 - (log_blocks + 4)


def jsb(maxlen: int, first: int, start: int, seq: int = 7) -> bytes:
    return struct.pack(">IIIIIIII", JMAGIC, 4, seq, 4096, maxlen, first, seq, start).ljust(4096, b"\0")


def descriptor(*blocks: int, seq: int = 7) -> bytes:
    tags = b"".join(struct.pack(">IHH", b, 0, 2 | (8 if i == len(blocks) - 1 else 0))
                    for i, b in enumerate(blocks))
    return (struct.pack(">III", JMAGIC, 1, seq) + tags).ljust(4096, b"\0")


def revoke(*blocks: int, seq: int = 7) -> bytes:
    body = b"".join(struct.pack(">I", b) for b in blocks)
    return (struct.pack(">IIII", JMAGIC, 5, seq, 16 + len(body)) + body).ljust(4096, b"\0")


def commit(seq: int = 7) -> bytes:
    return struct.pack(">III", JMAGIC, 2, seq).ljust(4096, b"\0")


@pytest.mark.parametrize("kind", ["descriptor", "revoke"])
def test_a_journal_wrapping_onto_itself_ends(tmp_path, kind):
    """s_maxlen 2^32-1, s_first = s_start = 2^32-2, that block mapped: the scan read it 4 billion
    times (a hang; with a revoke block in it, 40 MB/s more memory). Now at 2^24, the most blocks
    a replayable journal has."""
    image, at, free = journal_image(tmp_path)
    top = (1 << 24) - 2
    patch(image, at + 0x28, extents((0, 1, free), (top, 1, free + 1)))
    set_size(image, at, (top + 1) * 4096)
    patch(image, free * 4096, jsb(top + 1, top, top))
    block = descriptor(*range(5000, 5510)) if kind == "descriptor" else revoke(*range(100000, 101020))
    patch(image, (free + 1) * 4096, block)
    out = isolated(image, "result = fs.journal_note", timeout=10)
    if kind == "descriptor":
        assert out.startswith("OK the journal needs recovery but cannot be replayed (a journal "
                              "transaction is longer than the journal"), out
    else:
        assert out == "OK replayed the journal in memory: 0 transaction(s), 0 block(s)"


def test_a_journal_longer_than_its_file_is_not_replayed(tmp_path):
    image, at, free = journal_image(tmp_path)
    patch(image, at + 0x28, extents((0, 8, free)))
    set_size(image, at, 8 * 4096)
    patch(image, free * 4096, jsb(9, 1, 1))
    fs = open_fs(image)
    assert "cannot be replayed (corrupt journal superblock (log blocks 1 to 9" in fs.journal_note


def test_repeated_revoke_records_are_held_once(tmp_path, monkeypatch):
    """4,096 identical revoke blocks (the backup stores one) were 4 million list entries; a 128 MiB
    journal of them cost 1.3 GB."""
    n = 4096
    image, at, free = journal_image(tmp_path, n)
    patch(image, at + 0x28, extents((0, 1, free), (1, n, free + 1)))
    set_size(image, at, (n + 1) * 4096)
    patch(image, free * 4096, jsb(n + 1, 1, 1))
    patch(image, (free + 1) * 4096, revoke(*range(100000, 101020)) * n)
    out = isolated(image, "result = fs.journal_note", headroom=64 << 20)
    assert out == "OK replayed the journal in memory: 0 transaction(s), 0 block(s)"
    monkeypatch.setattr(jbd2, "MAX_ENTRIES", 1500)  # distinct ones are bounded
    patch(image, (free + 2) * 4096, revoke(*range(200000, 201020)))
    assert "names more than 1500 blocks" in open_fs(image).journal_note


def test_an_unmapped_journal_data_block_means_no_replay_not_no_filesystem(tmp_path):
    n = 8  # log blocks 1..8, the 9th (a descriptor's data block) not mapped; the commit wraps to 1
    image, at, free = journal_image(tmp_path, n)
    patch(image, at + 0x28, extents((0, n, free)))
    set_size(image, at, (n + 1) * 4096)
    patch(image, free * 4096, jsb(n + 1, 1, n - 1))
    patch(image, (free + n - 1) * 4096, descriptor(5000))
    patch(image, (free + 1) * 4096, commit())
    fs = open_fs(image)
    assert "cannot be replayed (journal block 8 is not mapped)" in fs.journal_note, fs.journal_note
    assert fs.lookup("/hostname").size == 5


def test_revoke_records_cancel_the_copies_before_them(tmp_path):
    """Replay keeps only each block's newest copy: it must still be the one jbd2 recovery writes."""
    image, at, free = journal_image(tmp_path, 64)
    fs = open_fs(image)
    target = fs.runs(fs.lookup("/hostname"))[0].pblk
    log = [jsb(64, 1, 1),
           descriptor(target, seq=7), b"first".ljust(4096, b"\0"), commit(7),
           revoke(target, seq=8), commit(8),  # cancels the copy of transaction 7
           descriptor(target, seq=9), b"third".ljust(4096, b"\0"), commit(9),
           descriptor(target, seq=10), b"forth".ljust(4096, b"\0"), revoke(target, seq=10), commit(10)]
    patch(image, at + 0x28, extents((0, 64, free)))
    set_size(image, at, 64 * 4096)
    # The log as far as block END: a revoke cancels copies in its own and earlier transactions.
    for end, expected in ((4, b"first"), (6, b"host\n"), (9, b"third"), (13, b"host\n")):
        patch(image, free * 4096, b"".join(log[:end]).ljust(len(log) * 4096 + 4096, b"\0"))
        fs = open_fs(image)
        assert f"{end // 3} transaction" in fs.journal_note or end == 13, fs.journal_note
        got = b"".join(d for _o, d in fs.ranges(fs.lookup("/hostname")))
        assert got == expected[:5], (end, fs.journal_note)


def test_a_journal_mapping_a_block_twice_is_not_replayed(tmp_path):
    """The journal's map named one region of log blocks 510 times over: replay put one block of
    entries over each of a directory's 262,000 (distinct) blocks, 89 million entries."""
    image, at, free = journal_image(tmp_path, 8)
    fs = open_fs(image)
    target = fs.runs(fs.lookup("/hostname"))[0].pblk
    patch(image, free * 4096, jsb(9, 1, 1) + descriptor(target) + b"other".ljust(4096, b"\0") + commit())
    set_size(image, at, 9 * 4096)
    patch(image, at + 0x28, extents((0, 5, free), (5, 4, free + 5)))  # sound: replayed
    fs = open_fs(image)
    assert fs.journal_note.startswith("replayed the journal in memory: 1 transaction(s), 1 block(s)")
    assert fs.read(fs.lookup("/hostname")) == b"other"
    for runs in ([(0, 5, free), (5, 4, free + 4)], [(0, 1, free), (1, 4, free + 2), (5, 4, free + 1)]):
        patch(image, at + 0x28, extents(*runs))  # free+4 twice; free+2..4 twice
        fs = open_fs(image)
        assert "cannot be replayed (the journal's block map names block" in fs.journal_note, fs.journal_note
        assert fs.read(fs.lookup("/hostname")) == b"host\n"


def test_a_journal_of_more_than_2_24_blocks_is_not_replayed(tmp_path):
    """mke2fs makes at most 10,240,000; a guest's journal of up to 2^32 blocks, all aliased to one
    region of revoke blocks, made the scan read 947 million blocks (14 hours)."""
    image, at, free = journal_image(tmp_path)
    target = open_fs(image).runs(open_fs(image).lookup("/hostname"))[0].pblk
    for maxlen in (1 << 24, (1 << 24) + 1):  # a transaction in the last 3 blocks of the log
        log = maxlen - 3
        patch(image, free * 4096, b"".join((jsb(maxlen, log, log), descriptor(target),
                                            b"other".ljust(4096, b"\0"), commit())))
        patch(image, at + 0x28, extents((0, 1, free), (log, 3, free + 1)))
        set_size(image, at, maxlen * 4096)
        fs = open_fs(image)
        if maxlen == 1 << 24:  # as many as a journal may have: replayed
            assert fs.journal_note.startswith("replayed the journal in memory: 1 trans"), fs.journal_note
            assert fs.read(fs.lookup("/hostname")) == b"other"
        else:
            assert "cannot be replayed (the journal is 16777217 blocks, more than 16777216)" \
                in fs.journal_note
            assert fs.read(fs.lookup("/hostname")) == b"host\n"


def test_a_journal_replaying_a_block_beyond_the_filesystem_is_not_replayed(tmp_path):
    """ExtFS.block() returned the journal's copy of any block number the journal named."""
    image, at, free = journal_image(tmp_path, 8)
    fs = open_fs(image)
    beyond = fs.blocks_count + 10
    patch(image, free * 4096, jsb(9, 1, 1) + descriptor(beyond) + b"other".ljust(4096, b"\0") + commit())
    patch(image, at + 0x28, extents((0, 9, free)))
    set_size(image, at, 9 * 4096)
    fs = open_fs(image)
    assert f"cannot be replayed (it replays block {beyond}, beyond the filesystem's {fs.blocks_count})" \
        in fs.journal_note, fs.journal_note
    fs.overrides = {beyond: b"other".ljust(4096, b"\0")}  # ExtFS itself reads no block beyond its end
    with pytest.raises(ExtError, match=f"block {beyond}\\+1 is beyond the end of the filesystem"):
        fs.block(beyond)


def test_restore_reports_progress_in_bytes(tmp_path):
    """restore-file draws a progress bar for a large file from these calls (nothing showed before)."""
    image = small_ext4(tmp_path)
    fs = open_fs(image)
    seen: list[int] = []
    result = Restorer(fs, progress=seen.append).restore(fs.inode(2), str(tmp_path / "out"))
    assert seen and seen == sorted(seen) and seen[-1] == result.bytes == len("abc") + len("kept\n")
