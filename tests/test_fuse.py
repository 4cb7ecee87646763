"""`backyfs mount` on a real FUSE mount: content, partitions, overlays, tree updates, unmounting."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import BACKYFS, files_equal, write_image
from fuse_helpers import (
    GPT_SCRIPT,
    MBR_SCRIPT,
    cleanup,
    is_mounted,
    known_tree,
    make_ext,
    mounted,
    needs_fuse,
    needs_root,
    partitioned_image,
    processes_mentioning,
    put_at,
    sfdisk_partitions,
    wait_for,
    wait_for_mount,
)

pytestmark = needs_fuse
SMALL_BS = 'block_size = "64KiB"\n'


def test_disk_image_matches_the_original(repo_env, tmp_path):
    src = write_image(tmp_path / "src.img", ["rand", "hole", "text", "dup", "half", "rand"], tail=12345)
    uid = repo_env.backup(src, "vm")["uid"]
    mnt = tmp_path / "mnt"
    with mounted(repo_env, mnt):
        image = mnt / "vm" / uid / "disk.img"
        assert image.stat().st_size == src.stat().st_size
        assert files_equal(image, src)
        assert os.readlink(mnt / "vm" / "latest") == uid
        assert files_equal(mnt / "vm" / "latest" / "disk.img", src)
        info = json.loads((mnt / "vm" / uid / "info.json").read_text())
        assert (info["uid"], info["volume"], info["size"]) == (uid, "vm", src.stat().st_size)
        aliases = [p.name for p in (mnt / "vm").iterdir() if p.name[:2] == "20"]
        assert aliases == [time.strftime("%Y-%m-%dT%H-%M-%S", time.localtime(info["created"]))]
        assert os.readlink(mnt / "vm" / aliases[0]) == uid
        assert (mnt / "vm" / uid / "disk.img").stat().st_mode & 0o777 == 0o444


@pytest.mark.parametrize("script", [MBR_SCRIPT, GPT_SCRIPT], ids=["mbr", "gpt"])
def test_partition_files_match_sfdisk(repo_env, tmp_path, script):
    src = partitioned_image(tmp_path / "disk.img", script)
    expected = sfdisk_partitions(src)
    assert len(expected) >= 3
    uid = repo_env.backup(src, "vm")["uid"]
    mnt = tmp_path / "mnt"
    with mounted(repo_env, mnt):
        vdir = mnt / "vm" / uid
        names = sorted(p.name for p in vdir.iterdir() if p.name.startswith("part"))
        assert names == sorted(f"part{n}" for n in expected)
        data = src.read_bytes()
        for number, (offset, length) in expected.items():
            part = (vdir / f"part{number}").read_bytes()
            assert len(part) == length, number
            assert part == data[offset : offset + length], number
        info = json.loads((vdir / "info.json").read_text())
        assert {p["number"]: (p["offset"], p["length"]) for p in info["partitions"]} == expected


@needs_root
def test_partition_loop_mounts_read_only(repo_env, tmp_path):
    tree = tmp_path / "tree"
    spec = known_tree(tree)
    fs = make_ext(tmp_path / "fs.img", tree, 8 << 20, "ext4", "-I", "256")
    src = partitioned_image(tmp_path / "disk.img", "label: dos\nstart=2048, size=16384, type=83\n",
                            size=12 << 20, random_fill=False)
    put_at(src, 2048 * 512, fs)
    uid = repo_env.backup(src, "vm")["uid"]
    mnt, target = tmp_path / "mnt", tmp_path / "x"
    target.mkdir()
    with mounted(repo_env, mnt):
        subprocess.run(["mount", "-o", "loop,ro", str(mnt / "vm" / uid / "part1"), str(target)], check=True)
        try:
            assert (target / "etc/hostname").read_bytes() == spec["etc/hostname"][0]
            assert (target / "bin/tool").read_bytes() == spec["bin/tool"][0]
        finally:
            subprocess.run(["umount", str(target)], check=True)


def test_writes_go_to_the_overlay(repo_env, tmp_path):
    repo_env.use_config(SMALL_BS)
    src = write_image(tmp_path / "src.img", ["rand"] * 8, block_size=64 << 10)
    original = src.read_bytes()
    uid = repo_env.backup(src, "vm")["uid"]
    mnt = tmp_path / "mnt"
    with mounted(repo_env, mnt, "--writable"):
        image = mnt / "vm" / uid / "disk.img"
        assert image.stat().st_mode & 0o200
        assert repo_env.ok("overlay", "ls").out.count(uid) == 0  # browsing creates no overlay
        with open(image, "r+b") as f:
            f.seek(70_000)
            f.write(b"X" * 1000)
            f.flush()
            os.fsync(f.fileno())
        with open(image, "rb") as f:
            f.seek(69_999)
            assert f.read(1002) == original[69_999:70_000] + b"X" * 1000 + original[71_000:71_001]
        assert uid in repo_env.ok("overlay", "ls").out
        with pytest.raises(OSError) as exc:
            image.write_bytes(b"")  # truncation: a version's size is fixed
        assert exc.value.errno == errno.EPERM
        with pytest.raises(OSError) as exc:
            (mnt / "vm" / "new-file").write_bytes(b"x")
        assert exc.value.errno in (errno.EPERM, errno.EACCES)
    restored = tmp_path / "restored.img"
    repo_env.ok("restore", uid, restored)
    assert restored.read_bytes() == original  # the backup itself never changes
    with mounted(repo_env, mnt):  # read-only: the backup, not the overlay
        assert (mnt / "vm" / uid / "disk.img").read_bytes() == original


def test_read_only_mount_refuses_writes(repo_env, tmp_path):
    src = write_image(tmp_path / "src.img", ["rand"])
    uid = repo_env.backup(src, "vm")["uid"]
    mnt = tmp_path / "mnt"
    with mounted(repo_env, mnt):
        for flags in (os.O_WRONLY, os.O_RDWR):
            with pytest.raises(OSError) as exc:
                os.open(mnt / "vm" / uid / "disk.img", flags)
            assert exc.value.errno in (errno.EROFS, errno.EACCES)
    assert repo_env.ok("overlay", "ls").out.count(uid) == 0


def test_concurrent_readers(repo_env, tmp_path):
    repo_env.use_config(SMALL_BS)
    src = write_image(tmp_path / "src.img", ["rand", "text", "rand", "hole", "rand"] * 20,
                      block_size=64 << 10, tail=777)
    data = src.read_bytes()
    uid = repo_env.backup(src, "vm")["uid"]
    mnt, errors = tmp_path / "mnt", []
    with mounted(repo_env, mnt):
        path = mnt / "vm" / uid / "disk.img"

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            fd = os.open(path, os.O_RDONLY)
            try:
                for _ in range(60):
                    off = rng.randrange(len(data))
                    n = rng.choice([1, 4096, 65536, 200_000, 1 << 20])
                    if os.pread(fd, n, off) != data[off : off + n]:
                        errors.append((seed, off, n))
            except OSError as exc:
                errors.append(exc)
            finally:
                os.close(fd)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_bad_paths_give_enoent(repo_env, tmp_path):
    src = write_image(tmp_path / "src.img", ["rand"])
    uid = repo_env.backup(src, "vm")["uid"]
    mnt = tmp_path / "mnt"
    with mounted(repo_env, mnt):
        for bad in ("nope", "vm/000000000000", "vm/latest/nope", f"vm/{uid}/part1", f"vm/{uid}/disk.img/x",
                    "vm/2000-01-01T00-00-00"):
            with pytest.raises(OSError) as exc:
                os.stat(mnt / bad)
            assert exc.value.errno in (errno.ENOENT, errno.ENOTDIR), bad


def test_corrupt_block_gives_eio(repo_env, tmp_path):
    repo_env.use_config(SMALL_BS + "[cache]\ndisk_mb = 0\n")
    src = write_image(tmp_path / "src.img", ["rand", "rand", "rand"], block_size=64 << 10)
    data = src.read_bytes()
    uid = repo_env.backup(src, "vm")["uid"]
    obj = repo_env.block_object(data[65536:131072])
    obj.write_bytes(obj.read_bytes()[:-8] + b"garbage!")
    mnt = tmp_path / "mnt"
    with mounted(repo_env, mnt):
        fd = os.open(mnt / "vm" / uid / "disk.img", os.O_RDONLY | os.O_DIRECT)
        try:
            with pytest.raises(OSError) as exc:
                os.preadv(fd, [bytearray(4096)], 65536)  # O_DIRECT: the page cache must not hide it
            assert exc.value.errno == errno.EIO
        finally:
            os.close(fd)
        with open(mnt / "vm" / uid / "disk.img", "rb") as f:
            assert f.read(65536) == data[:65536]  # the rest still reads


def test_tree_follows_the_repository(repo_env, tmp_path):
    src = write_image(tmp_path / "src.img", ["rand"])
    first = repo_env.backup(src, "vm")["uid"]
    mnt = tmp_path / "mnt"
    with mounted(repo_env, mnt):
        assert sorted(os.listdir(mnt)) == ["vm"]
        time.sleep(1.1)  # two backups in one second would share an alias
        write_image(src, ["text"])
        second = repo_env.backup(src, "vm")["uid"]
        other = repo_env.backup(src, "db")["uid"]
        assert wait_for(lambda: second in os.listdir(mnt / "vm"), timeout=5)
        assert wait_for(lambda: os.readlink(mnt / "vm" / "latest") == second, timeout=5)
        assert files_equal(mnt / "vm" / "latest" / "disk.img", src)
        assert sorted(os.listdir(mnt / "db" / other)) == ["disk.img", "info.json"]
        repo_env.ok("rm", first)
        assert wait_for(lambda: first not in os.listdir(mnt / "vm"), timeout=5)
        assert wait_for(lambda: not (mnt / "vm" / first).exists(), timeout=5)


def _no_leftovers(mnt: Path) -> None:
    assert wait_for(lambda: not is_mounted(mnt), timeout=10), f"{mnt} is still mounted"
    assert wait_for(lambda: processes_mentioning(str(mnt)) == [], timeout=10), \
        f"processes left: {processes_mentioning(str(mnt))}"


@pytest.mark.parametrize("how", ["fusermount", "sigterm", "sigint", "sigkill"])
def test_unmount_leaves_nothing(repo_env, tmp_path, how):
    src = write_image(tmp_path / "src.img", ["rand"])
    uid = repo_env.backup(src, "vm")["uid"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = repo_env.popen("mount", mnt, "--foreground", "--writable")
    try:
        wait_for_mount(proc, mnt)
        with open(mnt / "vm" / uid / "disk.img", "r+b") as f:  # an overlay is open
            f.write(b"dirty")
        if how == "fusermount":
            subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        else:
            proc.send_signal({"sigterm": signal.SIGTERM, "sigint": signal.SIGINT,
                              "sigkill": signal.SIGKILL}[how])
        proc.wait(timeout=15)
        if how != "sigkill":
            assert proc.returncode == 0, proc.stderr.read()
        _no_leftovers(mnt)
        overlays = repo_env.ok("overlay", "ls").out
        assert uid in overlays  # the write survived the stop
    finally:
        cleanup(proc, mnt)


def test_mount_returns_when_ready(repo_env, tmp_path):
    src = write_image(tmp_path / "src.img", ["rand"])
    uid = repo_env.backup(src, "vm")["uid"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        res = repo_env.run("mount", mnt, timeout=30)
        assert res.rc == 0, res.err
        assert is_mounted(mnt)  # no waiting: ready when the command returns
        assert files_equal(mnt / "vm" / uid / "disk.img", src)
        again = repo_env.run("mount", mnt, timeout=30)  # would hide the running mount under a second
        assert again.rc == 1 and "already mounted" in again.err, again.err
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        assert not is_mounted(mnt)  # the only mount is gone: nothing was stacked on it
        _no_leftovers(mnt)
    finally:
        cleanup(None, mnt)
    bad = repo_env.run("mount", tmp_path / "missing", timeout=30)
    assert bad.rc == 1 and "does not exist" in bad.err


def test_mount_reports_errors(tmp_path):
    """Errors of the background server before the mount is ready reach the caller's stderr."""
    data = tmp_path / "data"
    (data / "backyfs.sqlite").mkdir(parents=True)  # the metadata database cannot be opened
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BACKYFS_")},
           "BACKYFS_DATA_DIR": str(data)}
    res = subprocess.run([BACKYFS, "mount", str(mnt)], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "metadata database" in res.stderr, res.stderr
    assert not is_mounted(mnt)
    res = subprocess.run([BACKYFS, "mount", str(mnt), "--overlay", "x"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2 and "--writable" in res.stderr  # a usage error


def test_ext4_partition_through_fuse_with_loop_free_reader(repo_env, tmp_path):
    """The partition file is a plain window: the single-file reader agrees with it byte for byte."""
    tree = tmp_path / "tree"
    known_tree(tree)
    fs = make_ext(tmp_path / "fs.img", tree, 6 << 20)
    src = partitioned_image(tmp_path / "disk.img", "label: gpt\nstart=2048, size=12288\n", size=8 << 20,
                            random_fill=False)
    put_at(src, 2048 * 512, fs)
    uid = repo_env.backup(src, "vm")["uid"]
    mnt = tmp_path / "mnt"
    with mounted(repo_env, mnt):
        assert (mnt / "vm" / uid / "part1").read_bytes() == fs.read_bytes()
