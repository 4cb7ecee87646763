"""NBD benchmarks, as functions for scripts/bench (and a small CLI for running them alone).

bench_nbd(image, data_dir): sequential read of a backed-up version with nbdcopy to null:, through
`backyfs serve` (nbdkit + the Python plugin) and through nbdkit's C `file` plugin serving the same
version restored to a raw file. Cold: page cache dropped, and for backyfs an empty read cache
(DATA/cache removed) and a new server. Warm: the same server read again. Ratios are throughput
ratios, backyfs / file plugin (>1 is faster than the file plugin).

The cold read is CPU-bound on a small machine, so the result also says why: the CPU seconds the
machine spent during each cold read (file_cold_cpu_s, backyfs_cold_cpu_s), the BLAKE2b rate of one
core, verify_cpu_s (hashing every stored block once, which a cold read must do) and
cold_ratio_bound = file seconds x CPUs / (file CPU seconds + verify CPU seconds): the best cold ratio
possible when backyfs needed no CPU at all beyond the file plugin's and the verification.
cold_ratio_ceiling measures the same limit instead of computing it: the file plugin's cold read is
run again while threads on every CPU hash as many bytes as the verification must (file_verify_cold_s),
and the ratio is file seconds / that: what the file plugin itself reaches when given only the
verification's extra work. It is an optimistic ceiling for a server that checks every block: there
the hashing must wait for the reads, while this load keeps hashing when the disk stalls.

bench_boot(data_dir): boot the test VM (tests/vmboot.py) from its raw disk and from a backup of it
served writable over NBD; ratio = NBD boot time / raw boot time (<1 is faster).

    .venv/bin/python scripts/bench_nbd.py [--image IMG | --size-gib N] [--data-dir DIR] [--no-boot]

Needs root for drop_caches.
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
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import benchlib

TOP = Path(__file__).resolve().parent.parent
BACKYFS = str(TOP / ".venv" / "bin" / "backyfs")
BS = 4 << 20
TARGETS = {"cold_ratio": 0.8, "warm_ratio": 1.0, "boot_ratio": 1.15}


def drop_caches() -> None:
    if not benchlib.drop_caches():
        raise SystemExit("bench_nbd: cannot drop the page cache: needs root")


def _env(data_dir: Path) -> dict[str, str]:
    return benchlib.backyfs_env(data_dir, data_dir / "nbdbench" / "backyfs.toml")


def write_config(data_dir: Path, memory_mb: int) -> None:
    """The default config but for the memory cache size (the warm reads' analogue of the page cache)."""
    (data_dir / "nbdbench").mkdir(parents=True, exist_ok=True)
    (data_dir / "nbdbench" / "backyfs.toml").write_text(
        f'data_dir = "{data_dir}"\n[cache]\nmemory_mb = {memory_mb}\n')


def backyfs(data_dir: Path, *args: object) -> str:
    return benchlib.run_backyfs("bench_nbd", _env(data_dir), *args)


def ensure_version(data_dir: Path, image: Path, volume: str) -> str:
    """The uid of VOLUME's version of IMAGE, backing IMAGE up first when there is none. A version is
    IMAGE's when its label names IMAGE's path, size and mtime: --image may change between runs that
    share a data directory, and a same-sized other image would measure the wrong data."""
    stat = image.resolve().stat()
    identity = f"{image.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    backyfs(data_dir, "init")  # ls refuses a data dir without a repository
    versions = json.loads(backyfs(data_dir, "ls", "--json", volume))
    mine = [v for v in versions if v["state"] == "valid" and v["labels"].get("bench-image") == identity]
    if mine:
        return mine[-1]["uid"]
    return json.loads(backyfs(data_dir, "backup", image, volume, "--json",
                              "--label", f"bench-image={identity}"))["uid"]


@contextlib.contextmanager
def backyfs_server(data_dir: Path, export: str, sock: Path, *extra: str) -> Iterator[str]:
    proc = subprocess.Popen([BACKYFS, "serve", "--foreground", "--socket", str(sock), *extra, export],
                            env=_env(data_dir), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("stop it with"):
                break
        else:
            raise SystemExit(f"bench_nbd: serve failed: {proc.communicate()[1]}")
        yield f"nbd+unix:///{export}?socket={sock}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


@contextlib.contextmanager
def file_server(raw: Path, sock: Path) -> Iterator[str]:
    proc = subprocess.Popen(["nbdkit", "--foreground", "--readonly", "-U", str(sock), "file", str(raw)],
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        sock.unlink(missing_ok=True)


def cpu_busy_s() -> float:
    """CPU seconds all CPUs have spent busy (not idle, waiting for I/O or stolen), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def read_seconds(url: str, cold: bool) -> tuple[float, float]:
    """Wall seconds of an nbdcopy of url to null:, and the CPU seconds the whole machine spent
    meanwhile (server, nbdcopy, kernel: a quiet machine's other work is noise in it)."""
    if cold:
        drop_caches()
    started, cpu = time.perf_counter(), cpu_busy_s()
    subprocess.run(["nbdcopy", url, "null:"], check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - started, cpu_busy_s() - cpu


@contextlib.contextmanager
def verification_load(hashed_bytes: int, blocks: list[bytes]) -> Iterator[None]:
    """Hash hashed_bytes (cycling through blocks) with backyfs's digest function, split over one
    thread per CPU, beside the with block; leaving it waits until everything is hashed. The CPU work
    a cold read must add to the file plugin's (libsodium releases the GIL: the threads run in parallel)."""
    from backyfs.repository.repo import block_digest

    count, cpus = -(-hashed_bytes // BS), os.cpu_count() or 1

    def hash_share(share: int) -> None:
        for i in range(share):
            block_digest(blocks[i % len(blocks)])

    threads = [threading.Thread(target=hash_share, args=(count // cpus + (i < count % cpus),))
               for i in range(cpus)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for thread in threads:
            thread.join()


def _cold_with_verification(server: contextlib.AbstractContextManager[str], hashed_bytes: int,
                            blocks: list[bytes]) -> float:
    """Seconds of a cold nbdcopy from server with the verification's hashing running beside it
    (started after the page cache is dropped, so none of it is done before the clock starts)."""
    with server as url:
        drop_caches()
        started = time.perf_counter()
        with verification_load(hashed_bytes, blocks):
            subprocess.run(["nbdcopy", url, "null:"], check=True, stdin=subprocess.DEVNULL)
        return time.perf_counter() - started


def _cold_warm(server: contextlib.AbstractContextManager[str]) -> tuple[float, float, float]:
    """(cold seconds, warm seconds, cold CPU seconds)."""
    with server as url:
        cold, cold_cpu = read_seconds(url, cold=True)
        warm = min(read_seconds(url, cold=False)[0] for _ in range(2))
    return cold, warm, cold_cpu


def blake2b_mb_s() -> float:
    """One core's BLAKE2b rate through backyfs's own digest function, on data in the CPU cache."""
    from backyfs.repository.repo import block_digest

    data = os.urandom(BS)
    block_digest(data)
    started = time.perf_counter()
    for _ in range(64):
        block_digest(data)
    return 64 * BS / 1e6 / (time.perf_counter() - started)


def _distinct_block_bytes(data_dir: Path, uid: str) -> int:
    """Plaintext bytes of the version's distinct blocks: what a cold read hashes (a block that
    occurs twice is fetched and checked once)."""
    from backyfs.config import load_config, open_repository

    repo = open_repository(load_config(str(data_dir / "nbdbench" / "backyfs.toml")))
    try:
        blockmap = repo.blockmap(repo.resolve(uid))
    finally:
        repo.close()
    lengths = {digest: blockmap.block_length(idx) for idx, digest in blockmap.items()}
    return sum(lengths.values())


def cold_cpu_bound(hashed_bytes: int, file_s: float, file_cpu_s: float) -> dict:
    """Why the cold ratio is what it is: every block read from the store is checked against its
    digest, so a cold read costs at least the file plugin's CPU (the same page-cache fills and socket
    copies) plus hashing every distinct block once. On os.cpu_count() CPUs that bounds the ratio."""
    rate = blake2b_mb_s()
    verify_cpu_s = hashed_bytes / 1e6 / rate
    cpus = os.cpu_count() or 1
    return {"cpus": cpus, "blake2b_mb_s_per_core": round(rate), "verify_cpu_s": round(verify_cpu_s, 2),
            "file_cold_cpu_s": round(file_cpu_s, 2),
            "cold_ratio_bound": round(file_s * cpus / (file_cpu_s + verify_cpu_s), 2)}


def bench_nbd(image_path: Path, data_dir: Path, *, volume: str = "nbdbench", runs: int = 1,
              memory_mb: int | None = None) -> dict:
    """Cold and warm nbdcopy reads of IMAGE's backup vs the file plugin on its restored raw copy.
    MEMORY_MB sizes the server's memory cache; default: the image's size, so a warm read is served
    from memory as the file plugin's is from the page cache (the config default is 256)."""
    image_path, data_dir = Path(image_path), Path(data_dir).resolve()
    memory_mb = memory_mb or -(-image_path.stat().st_size >> 20) + 64
    write_config(data_dir, memory_mb)
    uid = ensure_version(data_dir, image_path, volume)
    work = data_dir / "nbdbench"
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "restored.img"
    if not raw.exists() or raw.stat().st_size != image_path.stat().st_size:
        backyfs(data_dir, "restore", uid, raw, "--force")
    size = raw.stat().st_size
    hashed = _distinct_block_bytes(data_dir, uid)
    hash_pool = [os.urandom(BS) for _ in range(16)]  # 64 MiB, hashed from memory as store blocks are
    file_t, ours_t, file_verify_t = [], [], []
    for _ in range(runs):
        file_t.append(_cold_warm(file_server(raw, work / "file.sock")))
        file_verify_t.append(_cold_with_verification(file_server(raw, work / "file.sock"), hashed,
                                                     hash_pool))
        shutil.rmtree(data_dir / "cache", ignore_errors=True)  # an empty read cache for the new server
        ours_t.append(_cold_warm(backyfs_server(data_dir, uid, work / "nbd.sock")))
    f_cold, f_warm, f_cpu = (statistics.median(t[i] for t in file_t) for i in (0, 1, 2))
    o_cold, o_warm, o_cpu = (statistics.median(t[i] for t in ours_t) for i in (0, 1, 2))
    fv_cold = statistics.median(file_verify_t)
    mb = size / 1e6
    return {"size_bytes": size, "version": uid, "memory_cache_mb": memory_mb,
            "file_cold_mb_s": round(mb / f_cold), "file_warm_mb_s": round(mb / f_warm),
            "backyfs_cold_mb_s": round(mb / o_cold), "backyfs_warm_mb_s": round(mb / o_warm),
            "cold_ratio": round(f_cold / o_cold, 2), "warm_ratio": round(f_warm / o_warm, 2),
            "backyfs_cold_cpu_s": round(o_cpu, 2), **cold_cpu_bound(hashed, f_cold, f_cpu),
            "file_verify_cold_s": round(fv_cold, 2), "cold_ratio_ceiling": round(f_cold / fv_cold, 2)}


def bench_boot(data_dir: Path, artifacts: Path | None = None, runs: int = 5) -> dict:
    """Median boot time of the test VM from a raw copy of its disk and from its backup over NBD."""
    sys.path.insert(0, str(TOP / "tests"))
    import vmboot

    artifacts = artifacts or vmboot.build_artifacts()
    data_dir = Path(data_dir).resolve()
    uid = ensure_version(data_dir, artifacts / "disk.img", "nbdbench-vm")
    work = data_dir / "nbdbench"
    work.mkdir(parents=True, exist_ok=True)
    raw_t, nbd_t = [], []
    for _ in range(runs):
        disk = vmboot.copy_disk(artifacts / "disk.img", work / "boot.img")
        raw_t.append(_boot(vmboot, f"file={disk},format=raw,if=virtio", artifacts))
        with backyfs_server(data_dir, uid, work / "boot.sock", "--writable", "--overlay", "bench") as url:
            nbd_t.append(_boot(vmboot, f"file={url},format=raw,if=virtio", artifacts))
        backyfs(data_dir, "overlay", "discard", uid, "--name", "bench")
    raw_s, nbd_s = statistics.median(raw_t), statistics.median(nbd_t)
    return {"raw_boot_s": round(raw_s, 2), "nbd_boot_s": round(nbd_s, 2),
            "boot_ratio": round(nbd_s / raw_s, 2)}


def _boot(vmboot, drive: str, artifacts: Path) -> float:
    result = vmboot.boot(drive, artifacts)
    if not result.ok:
        raise SystemExit(f"bench_nbd: the VM did not boot from {drive}:\n{result.tail()}")
    return result.seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, help="image to back up and read (default: generate one)")
    parser.add_argument("--size-gib", type=float, default=4.0, help="size of a generated image")
    parser.add_argument("--data-dir", type=Path, default=TOP / ".cache" / "bench_nbd" / "data")
    parser.add_argument("--runs", type=int, default=1, help="read runs (median)")
    parser.add_argument("--memory-mb", type=int, help="server memory cache (default: the image size)")
    parser.add_argument("--no-boot", action="store_true")
    args = parser.parse_args()
    image = args.image
    if image is None:
        image = args.data_dir.parent / f"image-{args.size_gib:g}g.img"
        if not image.exists():
            image.parent.mkdir(parents=True, exist_ok=True)
            benchlib.make_image(image, args.size_gib, seed=11)
    results = {"read": bench_nbd(image, args.data_dir, runs=args.runs, memory_mb=args.memory_mb)}
    if not args.no_boot:
        results["boot"] = bench_boot(args.data_dir)
    flat = {**results["read"], **results.get("boot", {})}
    results["targets_met"] = {k: (flat[k] <= v if k == "boot_ratio" else flat[k] >= v)
                              for k, v in TARGETS.items() if k in flat}
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
