"""Partition tables (pure functions), and `backyfs restore-file` / `ls-files` on ext2/3/4."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import BACKYFS
from fuse_helpers import (
    GPT_SCRIPT,
    MBR_SCRIPT,
    known_tree,
    make_ext,
    partitioned_image,
    put_at,
    set_ns_mtimes,
    sfdisk_partitions,
)

from backyfs.export.partitions import detect_filesystem, find_partitions
from backyfs.fronts.extfs import ExtFS


def file_pread(path: Path):
    f = open(path, "rb")  # noqa: SIM115 - lives as long as the test

    def pread(offset: int, length: int) -> bytes:
        return os.pread(f.fileno(), length, offset)

    return pread


# --- partition tables ---------------------------------------------------------------------------
@pytest.mark.parametrize("script", [MBR_SCRIPT, GPT_SCRIPT], ids=["mbr", "gpt"])
def test_find_partitions_matches_sfdisk(tmp_path, script):
    image = partitioned_image(tmp_path / "disk.img", script)
    found = find_partitions(file_pread(image), image.stat().st_size)
    assert {p.number: (p.offset, p.length) for p in found} == sfdisk_partitions(image)


def test_gpt_names_types_and_backup_header(tmp_path):
    image = partitioned_image(tmp_path / "disk.img", GPT_SCRIPT)
    parts = find_partitions(file_pread(image), image.stat().st_size)
    assert [(p.number, p.name) for p in parts] == [(1, "root"), (2, "esp"), (3, "")]
    assert parts[1].type == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    with open(image, "r+b") as f:  # destroy the primary header: the backup at the end still works
        f.seek(512)
        f.write(bytes(512))
    again = find_partitions(file_pread(image), image.stat().st_size)
    assert [(p.number, p.offset, p.length) for p in again] == [(p.number, p.offset, p.length) for p in parts]


def test_no_table_and_garbage(tmp_path):
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(1 << 20))
    assert find_partitions(file_pread(blank), 1 << 20) == []
    image = partitioned_image(tmp_path / "disk.img", MBR_SCRIPT)
    size = image.stat().st_size
    second_ebr = 34816 - 2048  # sfdisk puts each EBR 2048 sectors before its logical partition
    with open(image, "r+b") as f:  # an EBR chain that loops back to itself must end
        f.seek(second_ebr * 512 + 446 + 16)
        f.write(bytes([0, 0, 0, 0, 0x05, 0, 0, 0]) + (second_ebr - 26624).to_bytes(4, "little") +
                (2048).to_bytes(4, "little"))
    assert [p.number for p in find_partitions(file_pread(image), size)] == [1, 2, 5, 6]
    small = tmp_path / "small.img"  # partitions beyond the end are dropped
    small.write_bytes(image.read_bytes()[: 12 << 20])
    assert [p.number for p in find_partitions(file_pread(small), 12 << 20)] == [1]


def test_detect_filesystem(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for fstype in ("ext2", "ext3", "ext4"):
        image = make_ext(tmp_path / f"{fstype}.img", src, 4 << 20, fstype)
        assert detect_filesystem(file_pread(image), 4 << 20) == fstype
    xfs = tmp_path / "xfs.img"
    xfs.write_bytes(b"XFSB" + bytes(1 << 16))
    assert detect_filesystem(file_pread(xfs), xfs.stat().st_size) == "xfs"
    assert detect_filesystem(file_pread(tmp_path / "xfs.img"), 3) is None


# --- restore-file -------------------------------------------------------------------------------
@pytest.fixture
def ext4_version(repo_env, tmp_path):
    """A backed-up MBR disk whose part2 is ext4 made from known_tree(); part1 is random data."""
    tree = tmp_path / "tree"
    spec = known_tree(tree)
    fs = make_ext(tmp_path / "fs.img", tree, 8 << 20, "ext4", "-I", "256", "-b", "1024")
    set_ns_mtimes(fs, spec)
    disk = partitioned_image(tmp_path / "disk.img",
                             "label: dos\nstart=2048, size=2048, type=83\nstart=4096, size=16384, type=83\n",
                             size=12 << 20)
    put_at(disk, 4096 * 512, fs)
    uid = repo_env.backup(disk, "vm")["uid"]
    return uid, spec, tree


def check_entry(path: Path, expected: tuple) -> None:
    content, mode, mtime = expected
    st = os.lstat(path)
    if isinstance(content, str):
        assert os.readlink(path) == content
    elif stat.S_ISREG(st.st_mode):
        assert path.read_bytes() == content, path
    assert stat.S_IMODE(st.st_mode) == mode or stat.S_ISLNK(st.st_mode), (path, oct(st.st_mode))
    assert st.st_mtime_ns == mtime, path


def test_restore_single_file(repo_env, tmp_path, ext4_version):
    uid, spec, _tree = ext4_version
    dest = tmp_path / "out.txt"
    res = repo_env.ok("restore-file", f"{uid}:part2", "/home/user/notes.txt", dest)
    assert "1 file(s)" in res.out
    check_entry(dest, spec["home/user/notes.txt"])
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    repo_env.ok("restore-file", f"{uid}:part2", "/bin/tool", outdir)  # into an existing directory
    check_entry(outdir / "tool", spec["bin/tool"])
    again = repo_env.call("restore-file", f"{uid}:part2", "/bin/tool", outdir)
    # No silent overwrite, and a usage mistake is an error (1), not damaged data (3).
    assert again.rc == 1 and again.err_lines == [
        f"backyfs: error: {outdir / 'tool'} exists; use --force to overwrite it"], again.err
    repo_env.ok("restore-file", f"{uid}:part2", "/bin/tool", outdir, "--force")


def test_restore_folder_keeps_content_modes_and_times(repo_env, tmp_path, ext4_version):
    uid, spec, tree = ext4_version
    dest = tmp_path / "restored"
    repo_env.ok("restore-file", f"{uid}:part2", "/", dest, "--setuid")
    for rel, expected in spec.items():
        check_entry(dest / rel, expected)
    for i in (0, 7, 119):
        assert (dest / "many" / f"file-{i:03}").read_text() == f"{i}\n" * i
    assert subprocess.run(["diff", "-r", "--no-dereference", str(tree), str(dest)],
                          capture_output=True).stdout.decode().splitlines() == [f"Only in {dest}: lost+found"]
    sub = tmp_path / "sub"
    repo_env.ok("restore-file", f"{uid}:part2", "/home/user", sub)
    check_entry(sub, spec["home/user"])
    check_entry(sub / "link", spec["home/user/link"])


def test_ls_files(repo_env, ext4_version):
    uid, spec, _tree = ext4_version
    out = repo_env.ok("ls-files", f"{uid}:part2", "/home/user").out.splitlines()
    assert [line.split("  ")[-1] for line in out] == ["empty", "link -> notes.txt", "notes.txt", "setuid"]
    assert out[2].startswith("-rw-------") and " 25000 " in out[2]
    rows = repo_env.ok("ls-files", f"{uid}:part2", "/etc", "--json").json()
    by_name = {r["name"]: r for r in rows}
    assert by_name["shadow"]["mode"] & 0o7777 == 0o640
    assert by_name["hostname"]["size"] == len(spec["etc/hostname"][0])
    assert by_name["hostname"]["mtime"] == pytest.approx(1_600_000_000.123456789)


def test_spec_errors(repo_env, ext4_version):
    uid, _spec, _tree = ext4_version
    res = repo_env.call("ls-files", uid)
    assert res.rc == 1 and f"{uid}:partN" in res.err and "part2 (ext4)" in res.err
    res = repo_env.call("ls-files", f"{uid}:part9")
    assert res.rc == 1 and "no partition" in res.err
    res = repo_env.call("ls-files", f"{uid}:part1")  # random data: no filesystem
    assert res.rc == 1 and "mount -o loop,ro" in res.err and f"vm/{uid}/part1" in res.err
    res = repo_env.call("restore-file", f"{uid}:part2", "/nope", "/tmp/x")
    assert res.rc == 1 and "no such file" in res.err


def test_unsupported_filesystem_says_how(repo_env, tmp_path):
    disk = partitioned_image(tmp_path / "disk.img", "label: gpt\nstart=2048, size=8192\n", size=8 << 20)
    with open(disk, "r+b") as f:
        f.seek(2048 * 512 + 0x10040)
        f.write(b"_BHRfS_M")
    uid = repo_env.backup(disk, "vm")["uid"]
    res = repo_env.call("restore-file", f"{uid}:part1", "/etc/fstab", tmp_path / "x")
    assert res.rc == 1
    assert len(res.err_lines) == 1
    assert "btrfs" in res.err and f"mount -o loop,ro /mnt/b/vm/{uid}/part1" in res.err


@pytest.mark.parametrize("fstype", ["ext2", "ext3", "ext4"])
def test_block_maps_and_sparse_files(repo_env, tmp_path, fstype):
    """1 KiB blocks: a 70 MiB sparse file needs triple-indirect blocks (ext2/3) or an extent tree
    deeper than the inode (ext4: more than four extents)."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse.bin", "wb") as f:
        for i in range(10):
            f.seek(i * 7 << 20)
            f.write(hashlib.sha256(str(i).encode()).digest() * 200)
        f.seek(70 << 20)
        f.write(b"end")
    (src / "dense.bin").write_bytes(os.urandom(300_000))  # double indirect at 1 KiB
    image = make_ext(tmp_path / "fs.img", src, 48 << 20, fstype, "-b", "1024")
    uid = repo_env.backup(image, fstype)["uid"]
    out = tmp_path / "out"
    repo_env.ok("restore-file", uid, "/", out)
    for name in ("sparse.bin", "dense.bin"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert (out / "sparse.bin").stat().st_blocks * 512 < 1 << 20  # holes stayed holes


def test_htree_and_inline_data(repo_env, tmp_path):
    src = tmp_path / "src"
    (src / "big").mkdir(parents=True)
    for i in range(400):
        (src / "big" / f"entry-with-a-long-name-{i:04}").write_text(str(i))
    (src / "small").mkdir()
    (src / "small" / "tiny").write_text("inline")
    image = make_ext(tmp_path / "fs.img", src, 16 << 20, "ext4", "-b", "1024", "-O", "inline_data")
    subprocess.run(["e2fsck", "-fyD", str(image)], capture_output=True)  # index the big directory
    fs = ExtFS(file_pread(image), image.stat().st_size)
    assert fs.lookup("/big").flags & 0x1000  # really an htree
    uid = repo_env.backup(image, "inl")["uid"]
    out = tmp_path / "out"
    repo_env.ok("restore-file", uid, "/", out)
    assert sorted(os.listdir(out / "big")) == sorted(os.listdir(src / "big"))
    assert (out / "big" / "entry-with-a-long-name-0399").read_text() == "399"
    assert (out / "small" / "tiny").read_text() == "inline"


def test_journal_is_replayed(repo_env, tmp_path):
    """A backup of a mounted filesystem: the newest content of a block is only in the journal."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "file.txt").write_text("old content\n")
    image = make_ext(tmp_path / "fs.img", src, 16 << 20, "ext4", "-b", "1024")
    block = subprocess.run(["debugfs", "-R", "blocks /file.txt", str(image)], capture_output=True,
                           text=True, check=True).stdout.split()[0]
    new = tmp_path / "block"
    new.write_bytes(b"new content\n".ljust(1024, b"\0"))
    subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input=f"jo\njw -b {block} {new}\njc\n",
                   text=True, capture_output=True, check=True)
    uid = repo_env.backup(image, "j")["uid"]
    res = repo_env.ok("restore-file", uid, "/file.txt", tmp_path / "out.txt")
    assert "replayed the journal" in res.err
    assert (tmp_path / "out.txt").read_text() == "new content\n"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"), reason="needs root to switch user")
def test_restore_as_ordinary_user(repo_env, ext4_version, nobody_can_run_cli):
    """No privileges needed: a user who can read the repository restores files as their own."""
    uid, spec, _tree = ext4_version
    work = Path(tempfile.mkdtemp(prefix="backyfs-user-"))  # pytest's tmp_path is root-only
    try:
        shutil.copytree(repo_env.data_dir, work / "data")
        subprocess.run(["chown", "-R", "nobody", str(work)], check=True)
        env = {**repo_env.env, "HOME": str(work), "BACKYFS_DATA_DIR": str(work / "data")}
        dest = work / "mine"
        res = subprocess.run(["runuser", "-u", "nobody", "--", BACKYFS, "restore-file", f"{uid}:part2",
                              "/home/user", str(dest)], env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        check_entry(dest / "notes.txt", spec["home/user/notes.txt"])
        content, mode, mtime = spec["home/user/setuid"]
        check_entry(dest / "setuid", (content, mode & ~0o6000, mtime))  # not kept without --setuid
        assert "dropped the setuid/setgid bits of 1 file(s) (--setuid keeps them)" in res.stderr
        assert (dest / "notes.txt").stat().st_uid == pwd.getpwnam("nobody").pw_uid
    finally:
        shutil.rmtree(work)


def test_corrupt_filesystem_gives_a_clean_error(repo_env, tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("x")
    image = make_ext(tmp_path / "fs.img", src, 8 << 20, "ext4", "-b", "1024")
    # "Inode N is part of block group G\n\tlocated at block B, offset 0xO"
    words = subprocess.run(["debugfs", "-R", "imap /d", str(image)], capture_output=True, text=True,
                           check=True).stdout.split()
    block, offset = int(words[words.index("block", 8) + 1].rstrip(",")), int(words[-1], 16)
    with open(image, "r+b") as f:  # garbage over /d's extent header
        f.seek(block * 1024 + offset + 0x28)
        f.write(b"\xff" * 60)
    uid = repo_env.backup(image, "bad")["uid"]
    res = repo_env.call("ls-files", uid, "/d")
    assert res.rc == 1 and "corrupt" in res.err and "Traceback" not in res.err
    res = repo_env.call("restore-file", uid, "/", tmp_path / "out")
    assert res.rc == 3 and "corrupt" in res.err
    assert (tmp_path / "out" / "lost+found").is_dir()  # the rest was restored


def test_a_file_in_a_damaged_block_is_not_left_half_written(repo_env, tmp_path):
    """A file whose data meets a corrupt block: exit 3, the error said once, and no partial file
    that passes for the real one. Files in intact blocks still come out, also of the version a
    deep-scrub then marks invalid (as `restore` restores what is intact)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "small.txt").write_text("intact\n")
    big = os.urandom(10 << 20)
    (src / "big.bin").write_bytes(big)
    image = make_ext(tmp_path / "fs.img", src, 16 << 20, "ext4", "-b", "4096")
    uid = repo_env.backup(image, "fs")["uid"]
    data = image.read_bytes()
    start = data.index(big[:4096]) // (4 << 20) + 1  # a 4 MiB backup block wholly inside big.bin
    obj = repo_env.block_object(data[start * (4 << 20) : (start + 1) * (4 << 20)])
    obj.write_bytes(obj.read_bytes()[:-1] + b"X")
    res = repo_env.call("restore-file", uid, "/big.bin", tmp_path / "big.bin")
    assert res.rc == 3 and len(res.err_lines) == 1 and "big.bin" in res.err_lines[0], res.err
    assert not (tmp_path / "big.bin").exists()
    res = repo_env.call("restore-file", uid, "/", tmp_path / "all")
    assert res.rc == 3 and sum("big.bin" in line for line in res.err_lines) == 1, res.err
    assert not (tmp_path / "all" / "big.bin").exists()
    assert (tmp_path / "all" / "small.txt").read_text() == "intact\n"
    assert repo_env.call("deep-scrub", uid).rc == 3
    assert repo_env.versions("fs")[0]["state"] == "invalid"
    res = repo_env.call("restore-file", uid, "/small.txt", tmp_path / "small.txt")
    assert res.rc == 0 and "is invalid" in res.err, res.err
    assert (tmp_path / "small.txt").read_text() == "intact\n"


def test_a_destination_that_cannot_be_written_is_an_error_not_damage(repo_env, tmp_path, ext4_version):
    uid, _spec, _tree = ext4_version
    res = repo_env.call("restore-file", f"{uid}:part2", "/bin/tool", tmp_path / "no" / "such" / "dir")
    assert res.rc == 1 and len(res.err_lines) == 1 and "No such file or directory" in res.err, res.err
    assert "restored" not in res.out


# --- hostile images -----------------------------------------------------------------------------
def _debugfs(image: Path, *commands: str) -> None:
    subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input="\n".join(commands) + "\n",
                   text=True, capture_output=True, check=True)


def test_a_directory_loop_is_reported_not_followed(repo_env, tmp_path):
    """Two hard links to a directory inside itself (impossible in a sound ext4; easy to craft) once
    made restore-file create directories until the disk was full."""
    src = tmp_path / "src"
    (src / "loop").mkdir(parents=True)
    (src / "loop" / "f.txt").write_text("inside\n")
    image = make_ext(tmp_path / "fs.img", src, 8 << 20, "ext4")
    _debugfs(image, "ln loop loop/a", "ln loop loop/b")
    uid = repo_env.backup(image, "hostile")["uid"]
    res = repo_env.run("restore-file", uid, "/loop", tmp_path / "out", timeout=60)
    assert res.rc == 3 and "directory loop" in res.err, res.err
    assert (tmp_path / "out" / "f.txt").read_text() == "inside\n"
    assert sum(1 for _ in (tmp_path / "out").rglob("*")) < 10


def test_an_impossible_symlink_size_is_one_line(repo_env, tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "big").symlink_to("x" * 100)  # a slow symlink: its target in a data block
    image = make_ext(tmp_path / "fs.img", src, 8 << 20, "ext4")
    _debugfs(image, "sif d/big size 0x10000000000")
    uid = repo_env.backup(image, "hostile")["uid"]
    res = repo_env.run("restore-file", uid, "/d/big", tmp_path / "out", timeout=60)
    assert res.rc in (1, 3) and "impossible" in res.err and "Traceback" not in res.err, res.err


def test_an_extent_tree_reusing_its_blocks_fails_fast(tmp_path):
    """Index blocks that point at the same child many times (84^7 leaves from 8 blocks) once kept
    a walk of a 3-byte file's extents going for ever, growing without bound."""
    import struct
    import time

    from backyfs.fronts.extfs import ExtError

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("abc")
    image = make_ext(tmp_path / "fs.img", src, 16 << 20, "ext4", "-b", "1024")
    fs = ExtFS(file_pread(image), image.stat().st_size)
    ino = dict(fs.listdir(fs.inode(2)))[b"f"]
    group, index = divmod(ino - 1, fs.inodes_per_group)
    block, offset = divmod(index * fs.inode_size, fs.block_size)
    inode_at = (fs._inode_table(group) + block) * fs.block_size + offset
    per, base, bs = (fs.block_size - 12) // 12, 12000, fs.block_size

    def header(entries: int, depth: int) -> bytes:
        return struct.pack("<HHHHI", 0xF30A, entries, entries, depth, 0)

    with open(image, "r+b") as f:
        f.seek((base + 7) * bs)  # one leaf
        f.write((header(per, 0) + b"".join(struct.pack("<IHHI", i, 1, 0, 100) for i in range(per)))
                .ljust(bs, b"\0"))
        for level in range(7):  # each index block points at the next one, per times
            f.seek((base + level) * bs)
            f.write((header(per, 7 - level) + b"".join(struct.pack("<IIHH", 0, base + level + 1, 0, 0)
                                                       for _ in range(per))).ljust(bs, b"\0"))
        f.seek(inode_at + 0x28)
        f.write(header(1, 8) + struct.pack("<IIHH", 0, base, 0, 0))
    fs = ExtFS(file_pread(image), image.stat().st_size)
    started = time.monotonic()
    with pytest.raises(ExtError, match="used twice"):
        fs.runs(fs.inode(ino))
    assert time.monotonic() - started < 5


def test_hostile_partition_tables_are_bounded(tmp_path):
    """A guest writes its partition table: a GPT header asking for huge entries must not make us
    read the disk into memory, a chain of empty EBRs must not be followed for ever, two extended
    partitions must not give two part5, and a tiny volume with an ext signature is no traceback."""
    import struct
    import zlib

    img = partitioned_image(tmp_path / "gpt.img", GPT_SCRIPT, random_fill=False)
    with open(img, "r+b") as f:
        f.seek(512)
        header = bytearray(f.read(512))
        struct.pack_into("<I", header, 84, 128 << 10)  # entry size 128 KiB: a 16 MiB table
        struct.pack_into("<I", header, 16, 0)
        struct.pack_into("<I", header, 16, zlib.crc32(bytes(header[:92])))
        f.seek(512)
        f.write(header)
    asked: list[int] = []
    base = file_pread(img)

    def pread(offset: int, length: int) -> bytes:
        asked.append(length)
        return base(offset, length)

    find_partitions(pread, img.stat().st_size)  # the backup header may still be used: fine
    assert max(asked) <= 128 * 1024

    mbr = bytearray(512)
    mbr[510:512] = b"\x55\xaa"
    for slot, start in enumerate((2048, 8192)):  # two extended partitions, one logical in each
        struct.pack_into("<BxxxBxxxII", mbr, 446 + 16 * slot, 0, 0x05, start, 4096)
    disk = bytearray(16 << 20)
    disk[:512] = mbr
    for start in (2048, 8192):
        ebr = bytearray(512)
        ebr[510:512] = b"\x55\xaa"
        struct.pack_into("<BxxxBxxxII", ebr, 446, 0, 0x83, 63, 1000)
        disk[start * 512 : start * 512 + 512] = ebr
    parts = find_partitions(lambda o, n: bytes(disk[o : o + n]), len(disk))
    assert sorted(p.number for p in parts) == [5, 6]

    chain = bytearray(64 << 20)  # 0x05 at slot 0, then EBRs linking on and on, holding nothing
    chain[:512] = mbr[:446] + struct.pack("<BxxxBxxxII", 0, 0x05, 1, 130000) + bytes(48) + b"\x55\xaa"
    reads: list[int] = []
    for sector in range(1, 130000):
        ebr = bytearray(512)
        ebr[510:512] = b"\x55\xaa"
        struct.pack_into("<BxxxBxxxII", ebr, 462, 0, 0x05, sector, 1)  # the link: the next sector
        chain[sector * 512 : sector * 512 + 512] = ebr
    find_partitions(lambda o, n: (reads.append(o), bytes(chain[o : o + n]))[1], len(chain))
    assert len(reads) < 200

    tiny = bytearray(1100)
    tiny[1080:1082] = b"\x53\xef"  # the ext superblock magic, and nothing after it
    assert detect_filesystem(lambda o, n: bytes(tiny[o : o + n]), len(tiny)) == "ext2"
