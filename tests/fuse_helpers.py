"""Helpers for the FUSE and single-file tests: mounting (the way pyfuse3's test/util.py does it:
start the server, wait for the mount while checking the server is alive, unmount with fusermount3 -u,
and clean up whatever is left on failure), disk images with partition tables, ext filesystems."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MOUNT_TIMEOUT = 15.0
SECTOR = 512


def have_fuse() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


# Skipped without FUSE on a developer's machine; in CI (where setup installs fuse3) they must run.
needs_fuse = pytest.mark.skipif(not have_fuse() and not os.environ.get("CI"),
                                reason="needs /dev/fuse and fusermount3")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices)")


def is_mounted(path: Path | str) -> bool:
    target = os.path.abspath(path)
    with open("/proc/mounts") as f:
        for line in f:
            point = line.split()[1].encode().decode("unicode_escape")  # \040 etc.
            if point == target:
                return True
    return False


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains TEXT (zombies have none)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry))
    return pids


def wait_for(predicate, timeout: float = MOUNT_TIMEOUT, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def wait_for_mount(proc: subprocess.Popen, mnt: Path) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while time.monotonic() < deadline:
        if is_mounted(mnt):
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"backyfs mount exited with {proc.returncode} before mounting: {err}")
        time.sleep(0.05)
    pytest.fail(f"{mnt} was not mounted within {MOUNT_TIMEOUT}s")


def unmount(proc: subprocess.Popen | None, mnt: Path, lazy: bool = False) -> None:
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(mnt)], check=True,
                       capture_output=True)
    if proc is not None:
        proc.wait(timeout=MOUNT_TIMEOUT)


def cleanup(proc: subprocess.Popen | None, mnt: Path) -> None:
    """Whatever state a failed test left: unmount lazily, stop the server."""
    with contextlib.suppress(subprocess.CalledProcessError):
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=True, capture_output=True)
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def mounted(repo_env, mnt: Path, *args: str) -> Iterator[subprocess.Popen]:
    """`backyfs mount MNT --foreground ARGS` for the duration of the block; unmounts with fusermount3."""
    mnt.mkdir(exist_ok=True)
    proc = repo_env.popen("mount", mnt, "--foreground", *args)
    try:
        wait_for_mount(proc, mnt)
        yield proc
        unmount(proc, mnt)
    finally:
        cleanup(proc, mnt)


# --- images -------------------------------------------------------------------------------------
def sfdisk(image: Path, script: str) -> None:
    subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(image)], input=script,
                   text=True, check=True, capture_output=True)


def sfdisk_partitions(image: Path) -> dict[int, tuple[int, int]]:
    """{number: (offset, length) in bytes} as sfdisk -J reports them (extended containers excluded)."""
    table = json.loads(subprocess.run(["sfdisk", "-J", str(image)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    out = {}
    for p in table["partitions"]:
        number = int(p["node"][len(str(image)):].lstrip("p"))
        if table["label"] == "dos" and p["type"] in ("5", "f", "85"):
            continue
        out[number] = (p["start"] * SECTOR, p["size"] * SECTOR)
    return out


MBR_SCRIPT = """label: dos
start=2048, size=8192, type=83
start=10240, size=16384, type=83
start=26624, type=5
start=28672, size=4096, type=83
start=34816, size=6144, type=82
"""

GPT_SCRIPT = """label: gpt
start=2048, size=6144, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root
start=10240, size=10240, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp
start=22528, size=4096, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F
"""


def fill_random(image: Path, seed: int = 7) -> None:
    """Random bytes everywhere, so any wrong offset shows."""
    import random

    rng = random.Random(seed)
    size = image.stat().st_size
    with open(image, "r+b") as f:
        for off in range(0, size, 1 << 20):
            f.seek(off)
            f.write(rng.randbytes(min(1 << 20, size - off)))


def partitioned_image(path: Path, script: str, size: int = 24 << 20, random_fill: bool = True) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    if random_fill:
        fill_random(path)
    sfdisk(path, script)
    return path


def make_ext(image: Path, src: Path, size: int, fstype: str = "ext4", *opts: str) -> Path:
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run([f"mkfs.{fstype}", "-q", "-F", *opts, "-d", str(src), str(image)], check=True,
                   capture_output=True)
    return image


def set_ns_mtimes(image: Path, spec: dict[str, tuple[bytes | str, int, int]]) -> None:
    """mkfs -d keeps whole seconds only: write the nanoseconds of SPEC's mtimes with debugfs."""
    cmds = "".join(f"set_inode_field /{rel} mtime_extra {(mtime % 10**9) << 2}\n"
                   for rel, (_c, _m, mtime) in spec.items())
    subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input=cmds, text=True, check=True,
                   capture_output=True)


def put_at(image: Path, offset: int, payload: Path) -> None:
    """Copy PAYLOAD into IMAGE at OFFSET (a filesystem into its partition)."""
    with open(payload, "rb") as src, open(image, "r+b") as dst:
        dst.seek(offset)
        shutil.copyfileobj(src, dst, 1 << 20)


def known_tree(root: Path) -> dict[str, tuple[bytes | str, int, int]]:
    """Files of known content, modes and mtimes (ns precision); returns {relpath: (content or
    link target, mode, mtime_ns)} of every entry, directories with content b""."""
    import random

    rng = random.Random(42)
    spec: dict[str, tuple[bytes | str, int, int]] = {
        "etc/hostname": (b"backup-test\n", 0o644, 1_600_000_000_123_456_789),
        "etc/shadow": (b"root:*:19000:0:99999:7:::\n", 0o640, 1_500_000_000_000_000_001),
        "bin/tool": (rng.randbytes(300_000), 0o755, 1_700_000_000_999_999_999),
        "home/user/notes.txt": (b"line\n" * 5000, 0o600, 1_234_567_890_500_000_000),
        "home/user/empty": (b"", 0o444, 1_111_111_111_000_000_000),
        "home/user/setuid": (b"#!/bin/sh\n", 0o4755, 1_222_222_222_000_000_000),
    }
    for rel, (data, mode, mtime) in spec.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)  # type: ignore[arg-type]
        os.chmod(path, mode)
        os.utime(path, ns=(mtime, mtime))
    for i in range(120):  # a directory spanning several blocks
        (root / "many").mkdir(exist_ok=True)
        (root / "many" / f"file-{i:03}").write_text(f"{i}\n" * i)
    os.symlink("notes.txt", root / "home/user/link")
    os.utime(root / "home/user/link", ns=(1_300_000_000_000_000_000,) * 2, follow_symlinks=False)
    spec["home/user/link"] = ("notes.txt", 0o777, 1_300_000_000_000_000_000)
    for rel, mode, mtime in (("home/user", 0o750, 1_400_000_000_250_000_000),
                             ("etc", 0o755, 1_410_000_000_000_000_000)):
        os.chmod(root / rel, mode)
        os.utime(root / rel, ns=(mtime, mtime))
        spec[rel] = (b"", mode, mtime)
    return spec
