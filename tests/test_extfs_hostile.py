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
from pathlib import Path

import pytest
from fuse_helpers import make_ext

import backyfs
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
    """Indirect blocks, each of 1024 pointers to the same data block: the map once became one list
    of Run objects (12.3 million, 1.9 GB, for 12,000 such blocks)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"B" * 5000)
    image = make_ext(tmp_path / "fs.img", src, 16 << 20, "ext2", "-b", "4096")
    at, leaves, free = inode_at(image, "/f"), 100, 2048
    patch(image, at + 0x28, struct.pack("<15I", *[0] * 14, free))  # a triple-indirect tree only
    set_size(image, at, 1 << 40)
    patch(image, free * 4096, struct.pack("<I", free + 1))
    patch(image, (free + 1) * 4096, b"".join(struct.pack("<I", free + 2 + i) for i in range(leaves)))
    patch(image, (free + 2) * 4096, struct.pack("<I", 100) * 1024 * leaves)
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
    """The root's i_size set to 1 GiB - 1, the rest a hole: each listdir allocated 2 GB."""
    image = small_ext4(tmp_path)
    set_size(image, inode_at(image, "<2>"), (1 << 30) - 1)
    started = time.monotonic()
    out = isolated(image, "result = sorted(n.decode() for n, _ in fs.listdir(fs.inode(2))), "
                   "fs.lookup('/d/keep').size")
    assert out == "OK (['d', 'f', 'lost+found'], 5)"
    assert time.monotonic() - started < 5


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


def test_a_path_of_too_many_components_is_refused(tmp_path):
    image = small_ext4(tmp_path)
    fs = open_fs(image)
    assert fs.lookup("d/../" * 1000 + "f").size == 3
    with pytest.raises(ExtError, match="too many path components"):
        fs.lookup("d/../" * 50_000 + "f")
