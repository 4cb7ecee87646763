"""The ext2/3/4 reader and its journal replay on images a hostile guest crafted: each must end soon,
in bounded memory, with the reader's one-line ExtError (or the journal's "cannot be replayed" note),
never a hang, a traceback or gigabytes of memory. Images are small: mke2fs, then byte patches."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fuse_helpers import make_ext

import backyfs
from backyfs.fronts.extfs import ExtError, ExtFS
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
