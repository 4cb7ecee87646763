"""Ceph benchmarks, as functions for scripts/bench (and a small CLI to run them alone).

bench_rbd(size_gib=10): an RBD image (object-map, fast-diff) with about 30% of it written (4 MiB
objects in runs of 32 MiB: 3/4 random, 1/4 compressible text). Times a full `backyfs backup
rbd:POOL/IMG` into a filesystem store, then, for each of `rounds` rounds, changes 1% of the objects
(256 KiB of new data in each, holes included), times the incremental backup, and times
`rbd export-diff --from-snap S1 POOL/IMG@S2 /dev/null` between the very same two snapshot states (a user
snapshot taken next to each backyfs snapshot stands in for the one backyfs removes). Targets: the
incremental backup takes <= 2x the export-diff and <= 5% of the full backup (medians of the rounds).
The last version is restored and compared with `rbd export` of its snapshot.

bench_s3(size_gib=1): one image file backed up to, and restored from, the filesystem store, an S3
bucket on the cluster's radosgw and a RADOS pool; MB/s of the logical size.

The cluster is the one of scripts/ceph-test-cluster named by $BACKYFS_CEPH_DIR (its env.json). Every
timed command runs with a cold page cache when run as root (sync; drop_caches), warm otherwise, and
backyfs runs with bytecode caching on (as installed; PYTHONDONTWRITEBYTECODE is dropped).
export_diff_cycle_s adds what a backup built on export-diff also pays: `rbd snap create` of the
new snapshot and `rbd snap rm` of the old one (backyfs's times include both).

    .venv/bin/python scripts/bench_ceph.py [--only rbd,s3] [--rbd-gib 10] [--s3-gib 1] [--rounds 3]
                                           [--wait-idle SECONDS] [--warm] [--no-verify]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import benchlib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import ceph_env  # noqa: E402  (tests/ceph_env.py)

TOP = Path(__file__).resolve().parent.parent
BACKYFS = str(TOP / ".venv" / "bin" / "backyfs")
OBJ = 4 << 20
RUN = 8  # objects per run of one kind
FEATURES = "layering,exclusive-lock,object-map,fast-diff"
MB = 1e6
TARGETS = {"incremental_vs_export_diff": 2.0, "incremental_vs_full": 0.05}


# --- cluster and helpers ---------------------------------------------------------------------------

def cluster_env() -> dict[str, str]:
    directory = os.environ.get("BACKYFS_CEPH_DIR")
    if not directory:
        raise SystemExit("bench_ceph: set BACKYFS_CEPH_DIR to a cluster of scripts/ceph-test-cluster")
    with open(os.path.join(directory, "env.json")) as f:
        return json.load(f)


def drop_caches() -> bool:
    return benchlib.drop_caches()


def timed(cmd: list[str], env: dict[str, str], cold: bool, discard: bool = False) -> tuple[float, str]:
    """Wall seconds and stdout of cmd (sent to /dev/null with discard); a failing command ends the
    benchmark."""
    if cold:
        drop_caches()
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL if discard else subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"bench_ceph: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return round(seconds, 3), proc.stdout


def wait_idle(limit_s: float, threshold: float = 1.0) -> float:
    """Wait (up to limit_s) until the 1-minute load average drops below threshold; returns it."""
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        time.sleep(5)
    load = os.getloadavg()[0]
    if load >= threshold:
        log(f"WARNING: load average {load:.2f} on {os.cpu_count()} CPUs: other work skews the numbers")
    return round(load, 2)


def tool_env(env: dict[str, str], data_dir: Path, config: Path | None = None) -> dict[str, str]:
    # Bytecode as an installed package has it: without it every run compiles backyfs's modules again.
    out = {k: v for k, v in os.environ.items()
           if not k.startswith("BACKYFS_") and k != "PYTHONDONTWRITEBYTECODE"}
    out["CEPH_CONF"] = env["CEPH_CONF"]
    out["BACKYFS_DATA_DIR"] = str(data_dir)
    if config:
        out["BACKYFS_CONFIG"] = str(config)
    return out


def same_files(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


class BlockMaker:
    """Unique 4 MiB blocks, fast: a slice of a random pool (random data) or of a text pool
    (compressible), each stamped with its index so no two are alike."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.noise = os.urandom(64 << 20)
        words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 10))) for _ in range(3000)]
        lines = bytearray()
        while len(lines) < 16 << 20:
            lines += b"%08x %s\n" % (rng.getrandbits(32), b" ".join(rng.choices(words, k=12)))
        self.text = bytes(lines)
        self.rng = rng

    def block(self, kind: str, idx: int) -> bytes:
        pool = self.noise if kind == "rand" else self.text
        start = self.rng.randrange(0, len(pool) - OBJ)
        return b"%016x" % idx + pool[start + 16 : start + OBJ]


class Rbd:
    """librbd on the cluster's RBD pool, for writing test data fast (aio, many in flight)."""

    def __init__(self, env: dict[str, str]) -> None:
        import rados
        import rbd

        self.rbd, self.conf, self.pool = rbd, env["CEPH_CONF"], env["BACKYFS_TEST_RBD_POOL"]
        self.cluster = rados.Rados(conffile=self.conf)
        self.cluster.connect(timeout=15)
        self.ioctx = self.cluster.open_ioctx(self.pool)

    def cli(self, *args: str) -> str:
        proc = subprocess.run(["rbd", "--conf", self.conf, *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise SystemExit(f"bench_ceph: rbd {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def create(self, name: str, size: int) -> None:
        self.cli("create", "--size", f"{size >> 20}M", "--image-feature", FEATURES, f"{self.pool}/{name}")

    def write_many(self, name: str, writes: Iterator[tuple[int, bytes]], in_flight: int = 16) -> int:
        """aio writes (offset, data); returns the bytes written."""
        gate = threading.Semaphore(in_flight)
        errors: list[int] = []
        total = 0
        with self.rbd.Image(self.ioctx, name) as image:
            def done(completion: Any) -> None:
                if completion.get_return_value() < 0:
                    errors.append(completion.get_return_value())
                gate.release()

            for offset, data in writes:
                gate.acquire()
                image.aio_write(data, offset, done)
                total += len(data)
            for _ in range(in_flight):
                gate.acquire()
            image.flush()
        if errors:
            raise SystemExit(f"bench_ceph: writing {name} failed: {errors[0]}")
        return total

    def remove(self, name: str) -> None:
        with contextlib.suppress(self.rbd.ImageNotFound):
            with self.rbd.Image(self.ioctx, name) as image:
                for s in list(image.list_snaps()):
                    image.remove_snap(s["name"])
            self.rbd.RBD().remove(self.ioctx, name)

    def close(self) -> None:
        self.ioctx.close()
        self.cluster.shutdown()


def layout(nobjects: int, seed: int) -> list[str]:
    """Object kinds in runs of RUN: 70% holes, 22.5% random, 7.5% text (about 30% written)."""
    rng = random.Random(seed)
    kinds: list[str] = []
    for _ in range(-(-nobjects // RUN)):
        r = rng.random()
        kinds += [("hole" if r < 0.7 else "rand" if r < 0.925 else "text")] * RUN
    return kinds[:nobjects]


@contextlib.contextmanager
def work_dir(work: Path | None, name: str) -> Iterator[Path]:
    if work is not None:
        path = work / name
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    base = TOP / ".cache" / "bench_ceph"
    base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def log(msg: str) -> None:
    print(f"bench_ceph: {msg}", file=sys.stderr, flush=True)


# --- RBD: full, incremental, export-diff -----------------------------------------------------------

def bench_rbd(size_gib: float = 10, *, rounds: int = 3, work: Path | None = None, verify: bool = True,
              seed: int = 5, idle_wait_s: float = 0, warm: bool = False) -> dict:
    """A full RBD backup, then ROUNDS incrementals of 1% changed objects, each against export-diff
    of the same two snapshots and against snapshot create + rm, in the same run."""
    env = cluster_env()
    cold = os.geteuid() == 0 and not warm
    rbd = Rbd(env)
    name = f"bench-{uuid.uuid4().hex[:8]}"
    size = int(size_gib * (1 << 30)) // OBJ * OBJ
    result: dict[str, Any] = {"image_bytes": size, "cold_cache": cold, "rounds": []}
    try:
        with work_dir(work, "rbd") as wd:
            written = _fill_image(rbd, name, size, seed)
            result["written_bytes"] = written
            bench = _RbdRun(rbd, name, env, tool_env(env, wd / "data"), cold)
            # Compile the bytecode before the clock runs.
            subprocess.run([BACKYFS, "--version"], env=bench.benv, capture_output=True, check=True)
            result["load_before"] = wait_idle(idle_wait_s)
            full_s, full = bench.full_backup(written)
            result["full"] = {"seconds": full_s, "mb_s_read": round(written / MB / full_s, 1),
                              "mb_s_logical": round(size / MB / full_s, 1), "stats": full}
            # A user snapshot of the state of the backup's own one, which the next backup removes.
            rbd.cli("snap", "create", f"{rbd.pool}/{name}@bench-prev")
            rng = random.Random(seed + 1)
            for rnd in range(rounds):
                changed = sorted(rng.sample(range(size // OBJ), max(1, size // OBJ // 100)))
                result["rounds"].append(bench.incremental_round(rnd, changed, rng))
            result.update(_rbd_summary(result["rounds"], full_s))
            if verify:
                result["restore_identical"] = bench.verify_restore(wd)
    finally:
        rbd.remove(name)
        rbd.close()
    return result


def _fill_image(rbd: Rbd, name: str, size: int, seed: int) -> int:
    """Create the image and write its non-hole objects; the bytes written."""
    started = time.monotonic()
    rbd.create(name, size)
    maker = BlockMaker(seed)
    written = rbd.write_many(name, ((i * OBJ, maker.block(k, i))
                                    for i, k in enumerate(layout(size // OBJ, seed)) if k != "hole"))
    log(f"{name}: {size / 2**30:.1f} GiB image, {written / 2**30:.2f} GiB written "
        f"in {time.monotonic() - started:.0f} s")
    return written


class _RbdRun:
    """The timed commands of one RBD benchmark: backyfs backups, export-diff, snapshot create/rm."""

    def __init__(self, rbd: Rbd, name: str, env: dict[str, str], benv: dict[str, str], cold: bool) -> None:
        self.rbd, self.name, self.benv, self.cold = rbd, name, benv, cold
        self.spec = f"rbd:{rbd.pool}/{name}"
        self.rbd_cli = ["rbd", "--conf", env["CEPH_CONF"]]
        self.last_uid, self.last_snap = "", ""

    def full_backup(self, written: int) -> tuple[float, dict]:
        full_s, out = timed([BACKYFS, "backup", self.spec, "bench", "--json"], self.benv, self.cold)
        full = json.loads(out)
        if full["bytes_read"] != written:
            raise SystemExit(f"bench_ceph: the full backup read {full['bytes_read']}, not {written}")
        self.last_uid = full["uid"]
        log(f"full backup: {full_s:.2f} s ({written / MB / full_s:,.0f} MB/s of data)")
        return full_s, full

    def incremental_round(self, rnd: int, changed: list[int], rng: random.Random) -> dict:
        """Write 256 KiB into each changed object, back up, and time the baselines on the same snapshots."""
        rbd, pool, cold = self.rbd, self.rbd.pool, self.cold
        rbd.write_many(self.name, ((i * OBJ + rng.randrange(0, OBJ - (256 << 10) + 1, 4096),
                                    rng.randbytes(256 << 10)) for i in changed))
        inc_s, out = timed([BACKYFS, "backup", self.spec, "bench", "--json"], self.benv, cold)
        inc = json.loads(out)
        expected_read = (len(changed) + inc["blocks_sampled"]) * OBJ
        if inc["bytes_read"] != expected_read:
            raise SystemExit(f"bench_ceph: incremental read {inc['bytes_read']}, not {expected_read}")
        show = json.loads(subprocess.run([BACKYFS, "show", inc["uid"], "--json"], env=self.benv,
                                         capture_output=True, text=True, check=True).stdout)
        self.last_uid, self.last_snap = inc["uid"], show["snapshot"]
        image_at = f"{pool}/{self.name}@{self.last_snap}"
        diff_s, _ = timed([*self.rbd_cli, "export-diff", "--no-progress", "--from-snap", "bench-prev",
                           image_at, "-"], self.benv, cold, discard=True)
        whole_s, _ = timed([*self.rbd_cli, "export-diff", "--no-progress", "--whole-object",
                            "--from-snap", "bench-prev", image_at, "-"], self.benv, cold, discard=True)
        # What a backup made of export-diff also does: take a snapshot, drop the old one.
        prev = f"{pool}/{self.name}@bench-prev"
        rm_s, _ = timed([*self.rbd_cli, "snap", "rm", "--no-progress", prev], self.benv, cold)
        create_s, _ = timed([*self.rbd_cli, "snap", "create", "--no-progress", prev], self.benv, cold)
        log(f"round {rnd + 1}: {len(changed)} objects changed; incremental {inc_s:.2f} s "
            f"(writer {inc['seconds']:.2f} s), export-diff {diff_s:.2f} s, "
            f"--whole-object {whole_s:.2f} s; snap create {create_s:.2f} s, rm {rm_s:.2f} s")
        return {"changed_objects": len(changed), "incremental_s": inc_s, "export_diff_s": diff_s,
                "export_diff_whole_object_s": whole_s, "snap_create_s": create_s, "snap_rm_s": rm_s,
                "bytes_read": inc["bytes_read"], "writer_seconds": inc["seconds"]}

    def verify_restore(self, wd: Path) -> bool:
        """Restore the last version and compare it with an rbd export of its snapshot."""
        started = time.monotonic()
        restored, exported = wd / "restored.img", wd / "exported.img"
        subprocess.run([BACKYFS, "restore", self.last_uid, str(restored)], env=self.benv, check=True,
                       capture_output=True)
        snapshot = f"{self.rbd.pool}/{self.name}@{self.last_snap}"
        self.rbd.cli("export", "--no-progress", snapshot, str(exported))
        identical = same_files(restored, exported)
        log(f"restore of {self.last_uid} identical to its snapshot: {identical} "
            f"({time.monotonic() - started:.0f} s)")
        if not identical:
            raise SystemExit("bench_ceph: the restored image differs from its snapshot")
        return identical


def _rbd_summary(rounds: list[dict], full_s: float) -> dict:
    """Medians over the rounds and their ratios to the baselines and the full backup."""
    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    inc_med, diff_med = median("incremental_s"), median("export_diff_s")
    cycle = statistics.median(r["snap_create_s"] + r["export_diff_s"] + r["snap_rm_s"] for r in rounds)
    summary = {"incremental_s": inc_med, "export_diff_s": diff_med, "export_diff_cycle_s": round(cycle, 3),
               "incremental_vs_export_diff": round(inc_med / diff_med, 2),
               "incremental_vs_export_diff_cycle": round(inc_med / cycle, 2),
               "incremental_vs_full": round(inc_med / full_s, 4),
               "load_after": round(os.getloadavg()[0], 2)}
    summary["targets_met"] = {k: summary[k] <= v for k, v in TARGETS.items()}
    return summary


# --- stores: fs, S3 (radosgw), RADOS ---------------------------------------------------------------

def make_file_image(path: Path, size_gib: float, seed: int = 9) -> int:
    """Every block written: 3/4 random, 1/4 compressible text, in runs of 8."""
    nobjects = int(size_gib * (1 << 30)) // OBJ
    rng = random.Random(seed)
    maker = BlockMaker(seed)
    with open(path, "wb") as f:
        for run in range(0, nobjects, RUN):
            kind = "rand" if rng.random() < 0.75 else "text"
            for idx in range(run, min(run + RUN, nobjects)):
                f.write(maker.block(kind, idx))
    return nobjects * OBJ


def bench_s3(size_gib: float = 1, *, work: Path | None = None, idle_wait_s: float = 0,
             warm: bool = False) -> dict:
    env = cluster_env()
    cold = os.geteuid() == 0 and not warm
    bucket = f"backyfs-bench-{uuid.uuid4().hex[:8]}"
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    stores = {
        "fs": "",
        "s3": (f'[store]\ntype = "s3"\nbucket = "{bucket}"\n'
               f'endpoint_url = "{env["BACKYFS_TEST_S3_ENDPOINT"]}"\nregion = "us-east-1"\n'
               f'access_key = "{env["BACKYFS_TEST_S3_ACCESS_KEY"]}"\n'
               f'secret_key = "{env["BACKYFS_TEST_S3_SECRET_KEY"]}"\npath_style = true\n'
               'create_bucket = true\n'),
        "rados": (f'[store]\ntype = "rados"\npool = "{env["BACKYFS_TEST_RADOS_POOL"]}"\n'
                  f'conffile = "{env["CEPH_CONF"]}"\nprefix = "{prefix}"\n'),
    }
    result: dict[str, Any] = {"cold_cache": cold}
    try:
        with work_dir(work, "s3") as wd:
            image = wd / "image.img"
            size = make_file_image(image, size_gib)
            result["image_bytes"] = size
            subprocess.run([BACKYFS, "--version"], env=tool_env(env, wd), capture_output=True, check=True)
            result["load_before"] = wait_idle(idle_wait_s)
            for kind, store in stores.items():
                data = wd / f"data-{kind}"
                data.mkdir()
                config = wd / f"{kind}.toml"
                config.write_text(f'data_dir = "{data}"\n{store}')
                benv = tool_env(env, data, config)
                backup_s, out = timed([BACKYFS, "backup", str(image), "bench", "--json"], benv, cold)
                stats = json.loads(out)
                target = wd / f"restored-{kind}.img"
                restore_s, _ = timed([BACKYFS, "restore", stats["uid"], str(target)], benv, cold)
                identical = same_files(image, target)
                target.unlink()
                if not identical:
                    raise SystemExit(f"bench_ceph: the restore from the {kind} store differs")
                result[kind] = {"backup_s": backup_s, "backup_mb_s": round(size / MB / backup_s, 1),
                                "restore_s": restore_s, "restore_mb_s": round(size / MB / restore_s, 1),
                                "stored_bytes": stats["bytes_stored"]}
                log(f"{kind}: backup {size / MB / backup_s:,.0f} MB/s, "
                    f"restore {size / MB / restore_s:,.0f} MB/s")
            for kind in ("s3", "rados"):
                result[f"{kind}_vs_fs"] = {
                    op: round(result[kind][f"{op}_mb_s"] / result["fs"][f"{op}_mb_s"], 2)
                    for op in ("backup", "restore")}
    finally:
        ceph_env.drop_s3_bucket(env, bucket)
        _drop_rados_prefix(env, prefix)
    return result


def _drop_rados_prefix(env: dict[str, str], prefix: str) -> None:
    import rados

    cluster = rados.Rados(conffile=env["CEPH_CONF"])
    cluster.connect(timeout=15)
    try:
        with cluster.open_ioctx(env["BACKYFS_TEST_RADOS_POOL"]) as ioctx:
            for obj in list(ioctx.list_objects()):
                if obj.key.startswith(prefix + "/"):
                    ioctx.remove_object(obj.key)
    finally:
        cluster.shutdown()


# --- scripts/bench sections: function(args, work_dir) -> dict ---------------------------------------

def section_rbd(args: argparse.Namespace, work: Path) -> dict:
    return bench_rbd(getattr(args, "rbd_gib", 10), rounds=getattr(args, "rounds", 3), work=work,
                     idle_wait_s=getattr(args, "wait_idle", 0), warm=getattr(args, "warm", False),
                     verify=not getattr(args, "no_verify", False))


def section_s3(args: argparse.Namespace, work: Path) -> dict:
    return bench_s3(getattr(args, "s3_gib", 1), work=work, idle_wait_s=getattr(args, "wait_idle", 0),
                    warm=getattr(args, "warm", False))


SECTIONS = {"rbd": section_rbd, "s3": section_s3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="rbd,s3", help="comma-separated: rbd, s3")
    parser.add_argument("--rbd-gib", type=float, default=10)
    parser.add_argument("--s3-gib", type=float, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="incremental rounds (median)")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="wait up to this long for a load average below 1 before timing")
    parser.add_argument("--warm", action="store_true", help="keep the page cache between steps")
    parser.add_argument("--no-verify", action="store_true", help="skip the RBD restore comparison")
    args = parser.parse_args()
    results = {}
    for name in args.only.split(","):
        if name not in SECTIONS:
            parser.error(f"unknown section {name}")
        started = time.monotonic()
        with work_dir(None, name) as wd:
            results[name] = SECTIONS[name](args, wd)
        results[name]["section_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
