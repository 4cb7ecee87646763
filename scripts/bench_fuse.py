"""FUSE benchmark, as a function for scripts/bench (and a small CLI for running it alone).

bench_fuse(data_dir, version): cold sequential read of VERSION's disk.img through `backyfs mount`
(dd with 16 MiB requests, through the page cache as users read, and with O_DIRECT), against the NBD
path (`backyfs serve` + nbdcopy to null:) when nbdkit, nbdcopy and the backyfs plugin are there.
Cold: page cache dropped, an empty read cache (DATA/cache removed) and a new server for every run.
ratio = FUSE throughput / NBD throughput (target >= 0.8).

    .venv/bin/python scripts/bench_fuse.py [--data-dir DIR] [--version V | --size-gib N] [--runs N]

Needs root (drop_caches, and FUSE mounts here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import benchlib

TOP = Path(__file__).resolve().parent.parent
BACKYFS = str(TOP / ".venv" / "bin" / "backyfs")
PLUGIN = TOP / "nbd_plugin" / "backyfs_nbd.py"
TARGET_RATIO = 0.8
BS = 4 << 20


def _env(data_dir: Path) -> dict[str, str]:
    return benchlib.backyfs_env(data_dir)


def backyfs(data_dir: Path, *args: object) -> str:
    return benchlib.run_backyfs("bench_fuse", _env(data_dir), *args)


def cold(data_dir: Path) -> None:
    """An empty backyfs read cache and an empty page cache."""
    shutil.rmtree(data_dir / "cache", ignore_errors=True)
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


@contextlib.contextmanager
def fuse_mount(data_dir: Path) -> Iterator[Path]:
    mnt = Path(tempfile.mkdtemp(prefix="backyfs-bench-"))
    try:
        backyfs(data_dir, "mount", mnt)  # returns once the mount is ready
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        deadline = time.monotonic() + 30
        while _mounted(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        mnt.rmdir()


def _mounted(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in open("/proc/mounts"))


def dd_seconds(path: Path, direct: bool) -> float:
    started = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M", *(["iflag=direct"] if direct else [])],
                   check=True, capture_output=True)
    return time.perf_counter() - started


def fuse_seconds(data_dir: Path, volume: str, uid: str, direct: bool) -> float:
    cold(data_dir)
    with fuse_mount(data_dir) as mnt:
        return dd_seconds(mnt / volume / uid / "disk.img", direct)


def nbd_available() -> bool:
    return bool(shutil.which("nbdkit") and shutil.which("nbdcopy") and PLUGIN.is_file())


def nbd_seconds(data_dir: Path, uid: str) -> float:
    sock = Path(tempfile.mkdtemp(prefix="backyfs-bench-")) / "nbd.sock"
    cold(data_dir)
    proc = subprocess.Popen([BACKYFS, "serve", "--foreground", "--socket", str(sock), uid],
                            env=_env(data_dir), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench_fuse: backyfs serve failed: {proc.communicate()[1]}")
            time.sleep(0.02)
        started = time.perf_counter()
        subprocess.run(["nbdcopy", f"nbd+unix:///{uid}?socket={sock}", "null:"], check=True)
        return time.perf_counter() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        shutil.rmtree(sock.parent, ignore_errors=True)


def bench_fuse(data_dir: Path, version: str, *, runs: int = 3, nbd: bool = True) -> dict:
    """Cold sequential reads of VERSION through FUSE (buffered and O_DIRECT) and, if possible, NBD."""
    data_dir = Path(data_dir)
    info = json.loads(backyfs(data_dir, "show", "--json", version))
    uid, volume, size = info["uid"], info["volume"], info["size"]
    mb = size / 1e6
    out: dict = {"version": uid, "size_bytes": size, "runs": runs}
    with_nbd = nbd and nbd_available()
    times: dict[str, list[float]] = {"fuse": [], "fuse_direct": [], "nbd": []}
    for _ in range(runs):  # interleaved, so a drifting machine shifts all three alike
        times["fuse"].append(fuse_seconds(data_dir, volume, uid, direct=False))
        times["fuse_direct"].append(fuse_seconds(data_dir, volume, uid, direct=True))
        if with_nbd:
            times["nbd"].append(nbd_seconds(data_dir, uid))
    for name, ts in times.items():
        if ts:
            out[f"{name}_cold_mb_s"] = round(mb / statistics.median(ts))
    if with_nbd:
        out["ratio"] = round(out["fuse_cold_mb_s"] / out["nbd_cold_mb_s"], 2)
        out["ratio_direct"] = round(out["fuse_direct_cold_mb_s"] / out["nbd_cold_mb_s"], 2)
        out["target"] = f"ratio >= {TARGET_RATIO}"
        out["met"] = out["ratio"] >= TARGET_RATIO
    else:
        out["nbd"] = "not measured: nbdkit, nbdcopy or nbd_plugin/backyfs_nbd.py missing"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=TOP / ".cache" / "bench-fuse")
    parser.add_argument("--version", help="an existing version (uid or volume) in --data-dir")
    parser.add_argument("--size-gib", type=float, default=2.0, help="else back up a new image this big")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-nbd", action="store_true")
    args = parser.parse_args()
    version = args.version
    if version is None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        image = args.data_dir / "bench.img"
        if not image.exists() or image.stat().st_size != int(args.size_gib * (1 << 30)) // BS * BS:
            benchlib.make_image(image, args.size_gib, seed=5)
        backyfs(args.data_dir, "init")  # ls refuses a data dir without a repository
        versions = json.loads(backyfs(args.data_dir, "ls", "--json", "fusebench"))
        if versions and versions[-1]["size"] == image.stat().st_size:
            version = versions[-1]["uid"]
        else:
            version = json.loads(backyfs(args.data_dir, "backup", image, "fusebench", "--json"))["uid"]
    print(json.dumps(bench_fuse(args.data_dir, version, runs=args.runs, nbd=not args.no_nbd), indent=2))


if __name__ == "__main__":
    main()
