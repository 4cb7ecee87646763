"""restore-file as root against what a guest can put in its filesystem (the guest is not trusted):
nothing is written through an existing entry, no device node or setuid file appears unasked,
hard links are not multiplied, the operator's own directories keep their metadata, and a deep
tree does not exhaust Python's stack."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from fuse_helpers import make_ext

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="device nodes and owners need root")


def _version(repo_env, tmp_path: Path, build, size: int = 16 << 20) -> str:
    src = tmp_path / "guest"
    src.mkdir()
    build(src)
    return repo_env.backup(make_ext(tmp_path / "fs.img", src, size, "ext4"), "guest")["uid"]


def _special_files(src: Path) -> None:
    (src / "data").mkdir()
    (src / "data" / "x").write_bytes(b"guest data\n")
    (src / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "suid", 0o4755)
    os.mknod(src / "disk", 0o600 | stat.S_IFBLK, os.makedev(7, 200))
    os.mknod(src / "mem", 0o600 | stat.S_IFCHR, os.makedev(1, 1))
    os.chmod(src / "mem", 0o666)
    os.mkfifo(src / "pipe", 0o644)


def test_no_device_fifo_or_setuid_file_unless_asked(repo_env, tmp_path):
    uid = _version(repo_env, tmp_path, _special_files)
    out = tmp_path / "out"
    res = repo_env.ok("restore-file", uid, "/", out)
    assert sorted(p.name for p in out.iterdir()) == ["data", "lost+found", "suid"]
    assert stat.S_IMODE((out / "suid").stat().st_mode) == 0o755
    assert "skipped" in res.err and "block device (--specials creates them, as root)" in res.err
    asked = tmp_path / "asked"
    repo_env.ok("restore-file", uid, "/", asked, "--specials", "--setuid")
    assert stat.S_IMODE((asked / "suid").stat().st_mode) == 0o4755
    disk = (asked / "disk").lstat()
    assert stat.S_ISBLK(disk.st_mode) and os.major(disk.st_rdev) == 7 and os.minor(disk.st_rdev) == 200
    assert stat.S_IMODE((asked / "mem").lstat().st_mode) == 0o666  # not narrowed by the umask
    assert stat.S_ISFIFO((asked / "pipe").lstat().st_mode)


def test_force_replaces_entries_instead_of_writing_through_them(repo_env, tmp_path):
    """An existing FIFO blocked the restore for ever; an existing device node, or a hard link to a
    host file, had the guest's bytes written into it."""
    uid = _version(repo_env, tmp_path, _special_files)
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"host file\n")
    os.link(victim, out / "x")  # a hard link inside DEST to a file outside it
    os.mkfifo(out / "y")
    res = repo_env.run("restore-file", uid, "/data/x", out, "--force", timeout=60)
    assert res.rc == 0, res.err
    assert victim.read_bytes() == b"host file\n" and (out / "x").read_bytes() == b"guest data\n"
    os.rename(out / "y", out / "fifo")
    os.rename(out / "fifo", out / "x")  # now a FIFO where the file goes
    res = repo_env.run("restore-file", uid, "/data/x", out, "--force", timeout=60)
    assert res.rc == 0, res.err
    assert stat.S_ISREG((out / "x").lstat().st_mode) and (out / "x").read_bytes() == b"guest data\n"


def test_hard_links_are_restored_as_links(repo_env, tmp_path):
    """2,000 names of one 1 MiB file in a 2 MiB image were 2 GB restored."""
    def build(src: Path) -> None:
        (src / "big").write_bytes(os.urandom(1 << 20))
        for i in range(50):
            os.link(src / "big", src / f"name-{i:02}")

    uid = _version(repo_env, tmp_path, build)
    out = tmp_path / "out"
    res = repo_env.ok("restore-file", uid, "/", out)
    assert "1 file(s)" in res.out and "50 hard link(s)" in res.out
    inodes = {(out / f"name-{i:02}").stat().st_ino for i in range(50)} | {(out / "big").stat().st_ino}
    assert len(inodes) == 1 and (out / "big").stat().st_nlink == 51


def test_the_operators_directories_keep_their_owner_mode_and_times(repo_env, tmp_path):
    """restore-file V /etc/.. DEST wrote into DEST/.. (DEST's parent) and gave it the guest root's
    owner and mode (1777); restoring / into an existing DEST did that to DEST itself."""
    def build(src: Path) -> None:
        (src / "etc").mkdir()
        (src / "etc" / "hosts").write_text("127.0.0.1 guest\n")
        os.chmod(src, 0o1777)
        os.chown(src, 1234, 1234)

    uid = _version(repo_env, tmp_path, build)
    parent = tmp_path / "parent"
    dest = parent / "dest"
    dest.mkdir(parents=True)
    os.chmod(dest, 0o711)
    before = {p: (p.stat().st_mode, p.stat().st_uid, p.stat().st_mtime_ns) for p in (parent, dest)}
    repo_env.ok("restore-file", uid, "/etc/..", dest)
    assert (dest / "etc" / "hosts").read_text() == "127.0.0.1 guest\n"
    assert not (parent / "etc").exists()
    assert {p: (p.stat().st_mode, p.stat().st_uid) for p in (parent, dest)} == \
        {p: (m, u) for p, (m, u, _t) in before.items()}
    repo_env.ok("restore-file", uid, "/", dest, "--force")
    assert dest.stat().st_mode == before[dest][0] and dest.stat().st_uid == before[dest][1]


def test_a_deep_tree_is_restored_whole(repo_env, tmp_path):
    """Python recursion stopped a valid 1,500-level tree at ~330 levels ("RecursionError")."""
    depth = 700

    def build(src: Path) -> None:
        path = src
        for _ in range(depth):
            path = path / "d"
        path.mkdir(parents=True)
        (path / "leaf").write_text("deep\n")

    uid = _version(repo_env, tmp_path, build, size=32 << 20)
    out = tmp_path / "out"
    res = repo_env.ok("restore-file", uid, "/d", out)
    assert f"{depth} directories" in res.out
    assert (out.joinpath(*["d"] * (depth - 1)) / "leaf").read_text() == "deep\n"


def test_ls_files_escapes_names_and_lists_around_a_bad_entry(repo_env, tmp_path):
    """A name with a newline or an escape sequence reached the operator's terminal raw (it can fake
    lines); one entry with an impossible inode number failed the whole listing."""
    src = tmp_path / "guest"
    (src / "d").mkdir(parents=True)
    for name in ("fake\nline", "\x1b[2Jclear", "badino", "good"):
        (src / "d" / name).write_text("x")
    image = make_ext(tmp_path / "fs.img", src, 8 << 20, "ext4", "-O", "^metadata_csum,^dir_index")
    data = bytearray(image.read_bytes())
    at = data.find(b"badino")
    while data[at - 2] != len(b"badino"):  # the dirent: inode u32, rec_len u16, name_len u8, type u8
        at = data.find(b"badino", at + 1)
    data[at - 8:at - 4] = (0x7FFFFFFF).to_bytes(4, "little")
    image.write_bytes(bytes(data))
    uid = repo_env.backup(image, "guest")["uid"]
    res = repo_env.run("ls-files", uid, "/d")
    assert res.rc == 0, res.err
    lines = res.out.splitlines()
    assert len(lines) == 4 and "\x1b" not in res.out
    assert any(line.endswith("  fake\\x0aline") for line in lines)
    assert any(line.endswith("  \\x1b[2Jclear") for line in lines)
    assert any(line.endswith("  good") for line in lines)
    assert any("badino (unreadable:" in line for line in lines)
    rows = repo_env.ok("ls-files", uid, "/d", "--json").json()
    assert {r["name"] for r in rows} == {"fake\nline", "\x1b[2Jclear", "badino", "good"}


def test_a_directory_swapped_for_a_symlink_redirects_nothing(repo_env, tmp_path, monkeypatch):
    """As root into a directory another user may write to: that user renamed the restore's new
    directory away and put a symlink to a host directory in its place, and the restore created the
    rest of the entries there and chmod'ed it to the guest's mode."""
    from backyfs.fronts.files import Restorer

    def build(src: Path) -> None:
        (src / "etc").mkdir()
        for name in ("cron", "passwd"):
            (src / "etc" / name).write_text(f"guest {name}\n")
        os.chmod(src / "etc", 0o777)

    uid = _version(repo_env, tmp_path, build)
    victim = tmp_path / "host-etc"
    victim.mkdir(mode=0o755)
    (victim / "passwd").write_text("host passwd\n")
    dest = tmp_path / "dest"
    dest.mkdir()
    real = Restorer._children

    def swap_then_list(self, task, fd):  # the attacker wins the race right after the mkdir
        if task.name == "etc":
            os.rename(dest / "etc", dest / "moved")
            os.symlink(victim, dest / "etc")
        return real(self, task, fd)

    monkeypatch.setattr(Restorer, "_children", swap_then_list)
    repo_env.call("restore-file", uid, "/etc", dest, "--force")
    assert sorted(p.name for p in victim.iterdir()) == ["passwd"]
    assert (victim / "passwd").read_text() == "host passwd\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o755
    assert (dest / "moved" / "passwd").read_text() == "guest passwd\n"  # where it was made


def test_a_name_listed_twice_for_one_file_keeps_the_file(repo_env, tmp_path):
    """With --force, the second entry of the same name and inode unlinked the file the first had
    just restored, then failed to link it: the summary said 1 file, the directory was empty."""
    def build(src: Path) -> None:
        (src / "d").mkdir()
        (src / "d" / "x").write_text("content\n")
        os.link(src / "d" / "x", src / "d" / "y")

    src_img = tmp_path / "fs.img"
    src = tmp_path / "guest"
    src.mkdir()
    build(src)
    make_ext(src_img, src, 8 << 20, "ext4", "-O", "^metadata_csum,^dir_index")
    data = bytearray(src_img.read_bytes())
    at = data.find(b"y\x00\x00\x00")  # the entry "y" (name_len 1, padded): rename it to "x"
    while not (data[at - 2] == 1 and data[at - 1] == 1):  # name_len 1, file type 1 (regular)
        at = data.find(b"y\x00\x00\x00", at + 1)
    data[at] = ord("x")
    src_img.write_bytes(bytes(data))
    uid = repo_env.backup(src_img, "guest")["uid"]
    out = tmp_path / "out"
    out.mkdir()
    for force in ((), ("--force",)):
        repo_env.run("restore-file", uid, "/d", out, *force)
        assert (out / "d" / "x").read_text() == "content\n"


def test_restore_file_messages_escape_the_guests_names(repo_env, tmp_path):
    """A skipped FIFO named with an escape sequence reached the terminal raw on stderr."""
    def build(src: Path) -> None:
        os.mkfifo(src / "\x1b]2;owned\x07pipe")

    uid = _version(repo_env, tmp_path, build)
    res = repo_env.run("restore-file", uid, "/", tmp_path / "out")
    assert res.rc == 0, res.err
    assert "\x1b" not in res.err and "\\x1b]2;owned\\x07pipe: fifo" in res.err
