"""RBD images on the test Ceph cluster (scripts/ceph-test-cluster): snapshot-diff backups and restores.

Every test makes its own images (object-map + fast-diff, 4 MiB objects = the default block size), named
uniquely, and removes them with their snapshots at the end. The reference content of a version is the
backup's own snapshot, read back with `rbd export POOL/IMAGE@SNAP`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ceph_env
import pytest
from conftest import BACKYFS, RepoEnv, Result, first_difference

pytestmark = pytest.mark.ceph

MiB = 1 << 20
OBJ = 4 * MiB  # RBD object size, and backyfs's default block size
FEATURES = "layering,exclusive-lock,object-map,fast-diff"
SNAP_PREFIX = "backyfs-"


class RbdPool:
    """The cluster's RBD pool through the rbd CLI and librbd. Every image it names is removed by
    cleanup(), snapshots and all."""

    def __init__(self, env: dict[str, str], ioctx: Any, tmp: Path) -> None:
        import rbd

        self.rbd = rbd
        self.conf, self.pool = env["CEPH_CONF"], env["BACKYFS_TEST_RBD_POOL"]
        self.ioctx, self.tmp = ioctx, tmp
        self.names: list[str] = []
        self.allocated_at_version: dict[str, int] = {}

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["rbd", "--conf", self.conf, *args], capture_output=True,
                              text=True, timeout=300, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"rbd {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def name(self, what: str) -> str:
        """A new image name, unique to this run, removed at cleanup (the image need not exist yet)."""
        name = f"test-{what}-{uuid.uuid4().hex[:10]}"
        self.names.append(name)
        return name

    def spec(self, name: str) -> str:
        return f"rbd:{self.pool}/{name}"

    def create(self, what: str, size: int) -> str:
        name = self.name(what)
        self.cli("create", "--size", f"{size // MiB}M", "--image-feature", FEATURES, f"{self.pool}/{name}")
        return name

    @contextlib.contextmanager
    def image(self, name: str, snapshot: str | None = None) -> Iterator[Any]:
        img = self.rbd.Image(self.ioctx, name, snapshot=snapshot, read_only=snapshot is not None)
        try:
            yield img
        finally:
            img.close()

    def write(self, name: str, offset: int, data: bytes) -> None:
        with self.image(name) as img:
            assert img.write(data, offset) == len(data)

    def discard(self, name: str, offset: int, length: int) -> None:
        with self.image(name) as img:
            img.discard(offset, length)

    def snapshots(self, name: str) -> list[str]:
        with self.image(name) as img:
            return [s["name"] for s in img.list_snaps()]

    def backyfs_snapshots(self, name: str) -> list[str]:
        return [s for s in self.snapshots(name) if s.startswith(SNAP_PREFIX)]

    def export(self, name: str, snapshot: str | None = None) -> Path:
        """The image's content (at snapshot) in a new file."""
        path = self.tmp / f"export-{uuid.uuid4().hex[:8]}.img"
        self.cli("export", f"{self.pool}/{name}" + (f"@{snapshot}" if snapshot else ""), str(path))
        return path

    def allocated(self, name: str, snapshot: str | None = None) -> int:
        """Bytes in objects that exist (at snapshot), as the object map says: `rbd diff --whole-object`."""
        spec = f"{self.pool}/{name}" + (f"@{snapshot}" if snapshot else "")
        extents = json.loads(self.cli("diff", "--whole-object", "--format", "json", spec).stdout)
        return sum(e["length"] for e in extents if e["exists"] in (True, "true"))

    def remember_allocation(self, uid: str, name: str, snapshot: str) -> int:
        """Note how much of the image a version's snapshot allocates; returns it."""
        self.allocated_at_version[uid] = self.allocated(name, snapshot)
        return self.allocated_at_version[uid]

    def du_used(self, name: str) -> int:
        """`rbd du` used size of an image without snapshots."""
        images = json.loads(self.cli("du", "--format", "json", f"{self.pool}/{name}").stdout)["images"]
        return sum(i["used_size"] for i in images if "snapshot" not in i)

    def cleanup(self) -> None:
        problems = []
        for name in self.names:
            try:
                with self.image(name) as img:
                    for snap in list(img.list_snaps()):
                        img.remove_snap(snap["name"])
            except self.rbd.ImageNotFound:
                continue
            res = self.cli("rm", f"{self.pool}/{name}", check=False)
            if res.returncode != 0:
                problems.append(f"{name}: {res.stderr.strip()}")
        assert not problems, f"cannot remove test images: {problems}"


@pytest.fixture
def rbd_pool(repo_env: RepoEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RbdPool]:
    env = ceph_env.cluster()
    ceph_env.import_module("rbd")
    # backyfs finds the cluster through CEPH_CONF, in a subprocess (run) and in-process (call) alike.
    repo_env.env["CEPH_CONF"] = env["CEPH_CONF"]
    monkeypatch.setenv("CEPH_CONF", env["CEPH_CONF"])
    with ceph_env.rados_ioctx(env, env["BACKYFS_TEST_RBD_POOL"]) as ioctx:
        pool = RbdPool(env, ioctx, tmp_path)
        try:
            yield pool
        finally:
            pool.cleanup()


def backup(repo_env: RepoEnv, spec: str, volume: str, *args: object) -> tuple[dict, Result]:
    """`backyfs backup --json` in a subprocess; its stats and the result (stderr has warnings)."""
    res = repo_env.run("backup", spec, volume, "--json", *args, timeout=300)
    assert res.rc == 0, f"backup exited {res.rc}: {res.err}"
    return res.json(), res  # type: ignore[return-value]


def show(repo_env: RepoEnv, uid: str) -> dict:
    return repo_env.ok("show", uid, "--json").json()  # type: ignore[return-value]


def assert_same(a: Path, b: Path) -> None:
    diff = first_difference(a, b)
    assert diff is None, f"{a.name} and {b.name} differ at byte {diff}"


def restore_and_compare(repo_env: RepoEnv, rbd: RbdPool, uid: str, expected: Path) -> None:
    """Restore uid to a new file and to a new RBD image; both must equal expected byte for byte."""
    out = rbd.tmp / f"restore-{uid}.img"
    repo_env.ok("restore", uid, out, subprocess_=True)
    assert_same(out, expected)
    out.unlink()
    target = rbd.name("restored")
    repo_env.ok("restore", uid, rbd.spec(target), subprocess_=True)
    exported = rbd.export(target)
    assert_same(exported, expected)
    exported.unlink()
    # A fresh image reads as zeros: the restore writes only data, so zero objects stay unallocated.
    assert rbd.du_used(target) <= rbd.allocated_at_version[uid]


def test_full_then_incremental_reads_only_changed_objects(repo_env: RepoEnv, rbd_pool: RbdPool) -> None:
    rbd = rbd_pool
    rng = random.Random(1)
    image = rbd.create("src", 128 * MiB)  # 32 objects
    rbd.write(image, 0, rng.randbytes(10 * MiB))  # objects 0, 1 and half of 2
    rbd.write(image, 8 * OBJ, rng.randbytes(OBJ))  # object 8
    rbd.write(image, 20 * OBJ + 12345, b"a few bytes of text in object 20")
    rbd.write(image, 30 * OBJ, rng.randbytes(OBJ))  # object 30, to be discarded
    allocated = rbd.du_used(image)
    assert allocated == 6 * OBJ  # objects 0, 1, 2, 8, 20, 30

    full, _ = backup(repo_env, rbd.spec(image), "vm")
    # Only the allocated objects are read; the rest is known to be a hole without reading it.
    assert full["bytes_read"] == allocated
    assert full["bytes_sparse"] == 128 * MiB - allocated
    v1 = show(repo_env, full["uid"])
    assert v1["state"] == "valid" and v1["snapshot"].startswith(SNAP_PREFIX)
    assert rbd.backyfs_snapshots(image) == [v1["snapshot"]]
    rbd.remember_allocation(v1["uid"], image, v1["snapshot"])
    snap1 = rbd.export(image, v1["snapshot"])

    # A user's own snapshot is none of backyfs's business: it must survive.
    with rbd.image(image) as img:
        img.create_snap("user-snapshot")
    # Changes in 5 objects: a few bytes into a full one, new data in a never-written one, part of an
    # object discarded, a whole object discarded, and zeros written over a range.
    rbd.write(image, 8 * OBJ + 777, b"XYZ")  # object 8
    rbd.write(image, 25 * OBJ + MiB, rng.randbytes(MiB))  # object 25: new
    rbd.discard(image, 1 * OBJ + 64 * 1024, MiB)  # object 1, 64 KiB-aligned: really zeroed
    rbd.discard(image, 30 * OBJ, OBJ)  # object 30: gone
    with rbd.image(image) as img:
        img.write_zeroes(2 * OBJ, 8192)  # object 2
    changed = 5

    inc, _ = backup(repo_env, rbd.spec(image), "vm")
    assert inc["parent"] == full["uid"]
    # Read: the changed objects, plus the re-read sample of unchanged ones (0.5%: one block).
    assert inc["blocks_sampled"] == 1
    assert inc["bytes_read"] == (changed + inc["blocks_sampled"]) * OBJ
    assert inc["bytes_unchanged"] == 2 * OBJ  # objects 0 and 20: data the parent has, not re-read
    v2 = show(repo_env, inc["uid"])
    assert v2["snapshot"] != v1["snapshot"]
    # The parent's snapshot stays until the next backup (see test_old_snapshots_go_with_the_next_backup);
    # the user's stays for good.
    assert rbd.backyfs_snapshots(image) == [v1["snapshot"], v2["snapshot"]]
    assert "user-snapshot" in rbd.snapshots(image)
    rbd.remember_allocation(v2["uid"], image, v2["snapshot"])
    snap2 = rbd.export(image, v2["snapshot"])
    assert first_difference(snap1, snap2) is not None

    # Writes after the snapshot are not in the version.
    rbd.write(image, 3 * OBJ, b"after the backup")
    restore_and_compare(repo_env, rbd, v2["uid"], snap2)
    restore_and_compare(repo_env, rbd, v1["uid"], snap1)


def test_unchanged_volume_reads_no_data(repo_env: RepoEnv, rbd_pool: RbdPool) -> None:
    rbd = rbd_pool
    data = rbd.tmp / "data.bin"
    data.write_bytes(random.Random(2).randbytes(9 * MiB))  # 3 objects, the last one 1 MiB long
    image = rbd.name("imported")
    rbd.cli("import", "--image-feature", FEATURES, str(data), f"{rbd.pool}/{image}")

    first, _ = backup(repo_env, rbd.spec(image), "idle")
    assert first["bytes_total"] == first["bytes_read"] == 9 * MiB
    second, _ = backup(repo_env, rbd.spec(image), "idle")
    assert second["parent"] == first["uid"]
    assert second["bytes_read"] == 0
    assert second["blocks_sampled"] == 0
    assert second["bytes_stored"] == 0
    assert second["bytes_unchanged"] == 9 * MiB
    v2 = show(repo_env, second["uid"])
    assert rbd.backyfs_snapshots(image) == [show(repo_env, first["uid"])["snapshot"], v2["snapshot"]]
    rbd.remember_allocation(v2["uid"], image, v2["snapshot"])
    restore_and_compare(repo_env, rbd, v2["uid"], data)


def test_old_snapshots_go_with_the_next_backup(repo_env: RepoEnv, rbd_pool: RbdPool) -> None:
    """A snapshot is removed only when a newer version is valid, by the backup after that one: an
    image keeps its last version's snapshot and the one before. A backup stopped part-way keeps the
    parent's, so the next run still diffs from it; stale snapshots of failed runs go too."""
    import signal
    import time

    rbd = rbd_pool
    rng = random.Random(8)
    image = rbd.create("keep", 32 * MiB)
    rbd.write(image, 0, rng.randbytes(2 * OBJ))
    snaps, uids = [], []
    for round_no in range(3):
        rbd.write(image, round_no * OBJ + 100, b"round %d" % round_no)
        stats, _ = backup(repo_env, rbd.spec(image), "vm")
        uids.append(stats["uid"])
        snaps.append(show(repo_env, stats["uid"])["snapshot"])
        assert rbd.backyfs_snapshots(image) == snaps[-2:]

    mine = _tagged(repo_env, "vm") + "stale-from-a-crashed-run"  # a run killed before it recorded it
    others = [_tagged(repo_env, "other-volume") + "x", SNAP_PREFIX + "another-repository"]
    with rbd.image(image) as img:
        for name in (mine, *others):
            img.create_snap(name)
    rbd.write(image, 4 * OBJ, rng.randbytes(4 * OBJ))  # 16 MiB to read at 2 MB/s: ~8 s
    repo_env.use_config("[limits]\nread_mb_s = 2\n")
    before = set(rbd.backyfs_snapshots(image))
    proc = repo_env.popen("backup", rbd.spec(image), "vm")
    deadline = time.monotonic() + 30
    while not set(rbd.backyfs_snapshots(image)) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    # Interrupted once it is reading, which is when it has removed what it removes.
    while {snaps[-2], mine} & set(rbd.backyfs_snapshots(image)) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "the backup ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    # The interrupted run removed what no valid version needs, and kept the parent's snapshot.
    left = rbd.backyfs_snapshots(image)
    assert snaps[-1] in left and snaps[-2] not in left, left
    assert mine not in left and set(others) <= set(left)  # only this volume's own snapshots go

    repo_env.use_config("")
    stats, _ = backup(repo_env, rbd.spec(image), "vm")
    latest = show(repo_env, stats["uid"])
    assert stats["parent"] == uids[-1]
    assert stats["bytes_read"] == (4 + stats["blocks_sampled"]) * OBJ  # a diff, not a full read
    assert sorted(rbd.backyfs_snapshots(image)) == sorted([snaps[-1], latest["snapshot"], *others])
    rbd.remember_allocation(latest["uid"], image, latest["snapshot"])
    restore_and_compare(repo_env, rbd, latest["uid"], rbd.export(image, latest["snapshot"]))


def _tagged(repo_env: RepoEnv, volume: str) -> str:
    from backyfs.sources.rbd import snapshot_prefix

    return snapshot_prefix(f"{os.path.abspath(repo_env.db_path)}\0{volume}")


def test_old_snapshots_removed_beside_the_new_one_never_include_it(rbd_pool: RbdPool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The old snapshots' removal starts while the new snapshot is being taken: a listing that
    already holds the new one (forced here) must not remove it; a stale one of the volume goes."""
    import time

    from backyfs.sources import rbd as rbd_mod
    from backyfs.sources import start_source

    monkeypatch.setenv("CEPH_CONF", rbd_pool.conf)
    image = rbd_pool.create("beside", 8 * MiB)
    prefix = rbd_mod.snapshot_prefix("test-db\0vm")
    stale = prefix + "stale"
    with rbd_pool.image(image) as img:
        img.create_snap(stale)
    drop = rbd_mod.RbdSource._drop_snapshots

    def drop_once_taken(self: Any, owned: set[str], keep: set[str]) -> None:
        deadline = time.monotonic() + 30
        while self.snapshot not in {s["name"] for s in self.head.list_snaps()}:
            assert time.monotonic() < deadline, "the snapshot was never taken"
            time.sleep(0.01)
        drop(self, owned, keep)

    monkeypatch.setattr(rbd_mod.RbdSource, "_drop_snapshots", drop_once_taken)
    opening = start_source(rbd_pool.spec(image))
    opening.snapshot(prefix)
    opening.drop_old_snapshots(set(), set())
    source = opening.result()
    try:
        source._dropping.join(timeout=60)
        assert rbd_pool.backyfs_snapshots(image) == [source.snapshot]
    finally:
        source.discard_snapshot()
        source.close()


def test_two_repositories_backing_up_one_image_keep_their_own_snapshots(repo_env: RepoEnv,
                                                                         rbd_pool: RbdPool,
                                                                         tmp_path: Path) -> None:
    """A local and an off-site repository (or two volumes) backing up the same image: each once
    removed the other's snapshots, so every backup read the whole image, and a backup running
    while the other started had its snapshot removed under it and became valid with zeros."""
    rbd = rbd_pool
    image = rbd.create("shared", 32 * MiB)
    rbd.write(image, 0, random.Random(3).randbytes(4 * OBJ))
    first, _ = backup(repo_env, rbd.spec(image), "vm")
    other_env = {**repo_env.env, "BACKYFS_DATA_DIR": str(tmp_path / "offsite")}
    subprocess.run([BACKYFS, "backup", rbd.spec(image), "vm", "--json"], env=other_env, check=True,
                   capture_output=True, timeout=120)
    rbd.write(image, OBJ + 100, b"changed")
    second, _ = backup(repo_env, rbd.spec(image), "vm")
    assert second["parent"] == first["uid"]
    assert second["bytes_read"] == (1 + second["blocks_sampled"]) * OBJ  # a diff, not a full read
    assert len(rbd.backyfs_snapshots(image)) == 3  # vm's two, and the off-site repository's one


def test_a_refused_concurrent_backup_neither_takes_nor_removes_a_snapshot(repo_env: RepoEnv,
                                                                          rbd_pool: RbdPool) -> None:
    import time

    rbd = rbd_pool
    image = rbd.create("busy", 32 * MiB)
    rbd.write(image, 0, random.Random(4).randbytes(6 * OBJ))
    backup(repo_env, rbd.spec(image), "vm")
    rbd.write(image, 0, random.Random(5).randbytes(6 * OBJ))
    repo_env.use_config("[limits]\nread_mb_s = 4\n")  # 24 MiB changed: ~6 s
    proc = repo_env.popen("backup", rbd.spec(image), "vm", "--json")
    deadline = time.monotonic() + 30
    while len(rbd.backyfs_snapshots(image)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    snaps = rbd.backyfs_snapshots(image)
    refused = repo_env.run("backup", rbd.spec(image), "vm")
    assert refused.rc == 1 and "already running" in refused.err
    assert rbd.backyfs_snapshots(image) == snaps  # none taken, none removed
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stats = json.loads(out)
    snapshot = show(repo_env, stats["uid"])["snapshot"]
    rbd.remember_allocation(stats["uid"], image, snapshot)
    restore_and_compare(repo_env, rbd, stats["uid"], rbd.export(image, snapshot))


def test_a_backup_that_cannot_start_leaves_no_snapshot(repo_env: RepoEnv, rbd_pool: RbdPool) -> None:
    """The snapshot is taken in a thread while the repository opens; when the backup then fails (here:
    an unknown parent), the fresh snapshot is removed again and no version is made."""
    rbd = rbd_pool
    data = rbd.tmp / "data.bin"
    data.write_bytes(random.Random(4).randbytes(5 * MiB))
    image = rbd.name("nostart")
    rbd.cli("import", "--image-feature", FEATURES, str(data), f"{rbd.pool}/{image}")

    for args in (["--parent", "feedbeef0000"], ["--incremental"]):
        res = repo_env.run("backup", rbd.spec(image), "never", *args)
        assert res.rc == 1 and len(res.err_lines) == 1, res.err
        assert rbd.backyfs_snapshots(image) == []
    assert repo_env.versions() == []
    # A bad volume name is refused before any snapshot too; a good run then works as usual.
    assert repo_env.run("backup", rbd.spec(image), "bad/name").rc == 1
    assert rbd.backyfs_snapshots(image) == []
    stats, _ = backup(repo_env, rbd.spec(image), "never")
    assert rbd.backyfs_snapshots(image) == [show(repo_env, stats["uid"])["snapshot"]]


def test_a_wrong_ceph_setup_is_one_clear_line(repo_env: RepoEnv, rbd_pool: RbdPool, tmp_path: Path) -> None:
    """A missing ceph.conf, pool or image each get their own one-line error (librados reports a
    missing configuration file as ObjectNotFound, which once read as "pool does not exist")."""
    rbd = rbd_pool
    absent = rbd.spec(rbd.name("absent"))
    conf = tmp_path / "none.conf"
    cases = [({"CEPH_CONF": str(conf)}, absent, f"cannot read the Ceph configuration {conf} (set CEPH_CONF)"),
             ({}, "rbd:no-such-pool/img", "Ceph pool 'no-such-pool' does not exist"),
             ({}, absent, f"RBD image {absent[4:]} does not exist")]
    for env, spec, message in cases:
        saved = dict(repo_env.env)
        repo_env.env.update(env)
        try:
            res = repo_env.run("backup", spec, "never")
        finally:
            repo_env.env.clear()
            repo_env.env.update(saved)
        assert res.rc == 1 and res.err_lines == [f"backyfs: error: {message}"], res.err
    assert repo_env.versions() == []


def test_interrupted_restore_removes_the_image_it_created(repo_env: RepoEnv, rbd_pool: RbdPool,
                                                          tmp_path: Path) -> None:
    """Ctrl-C during a restore into a new RBD image: exit 130 and no half-written image left."""
    import signal
    import time

    rbd = rbd_pool
    src = tmp_path / "src.img"
    src.write_bytes(random.Random(6).randbytes(32 * MiB))
    repo_env.use_config("[limits]\nread_mb_s = 16\n")  # 32 MiB of blocks take ~2 s to read
    uid = repo_env.backup(src, "vm")["uid"]
    target = rbd.name("interrupted")
    proc = repo_env.popen("restore", uid, rbd.spec(target))
    deadline = time.monotonic() + 30
    while target not in rbd.cli("ls", rbd.pool).stdout.split() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"removed the incomplete RBD image {rbd.pool}/{target}" in err
    assert target not in rbd.cli("ls", rbd.pool).stdout.split()


def test_restore_onto_an_existing_image(repo_env: RepoEnv, rbd_pool: RbdPool) -> None:
    rbd = rbd_pool
    rng = random.Random(3)
    image = rbd.create("src", 64 * MiB)
    rbd.write(image, OBJ, rng.randbytes(OBJ))
    rbd.write(image, 10 * OBJ + 5, b"tail")
    stats, _ = backup(repo_env, rbd.spec(image), "vm")
    snapshot = show(repo_env, stats["uid"])["snapshot"]
    expected = rbd.export(image, snapshot)

    # An existing, larger image full of other data.
    target = rbd.create("target", 96 * MiB)
    junk = rng.randbytes(OBJ)
    for idx in range(24):
        rbd.write(target, idx * OBJ, junk)
    before = rbd.export(target)

    res = repo_env.run("restore", stats["uid"], rbd.spec(target))
    assert res.rc == 1
    assert len(res.err_lines) == 1, res.err
    assert res.err_lines[0].startswith("backyfs: error: ") and "exists" in res.err and "--force" in res.err
    assert_same(rbd.export(target), before)  # untouched

    repo_env.ok("restore", stats["uid"], rbd.spec(target), "--force", subprocess_=True)
    with rbd.image(target) as img:
        assert img.size() == 64 * MiB
    # Exactly the version: blocks that are zeros in it were cleared, not left with the old data.
    assert_same(rbd.export(target), expected)


def test_deleted_parent_snapshot_means_a_full_read(repo_env: RepoEnv, rbd_pool: RbdPool) -> None:
    rbd = rbd_pool
    rng = random.Random(4)
    image = rbd.create("src", 64 * MiB)
    rbd.write(image, 0, rng.randbytes(3 * OBJ))
    rbd.write(image, 9 * OBJ, rng.randbytes(OBJ))
    first, _ = backup(repo_env, rbd.spec(image), "vm")
    parent_snap = show(repo_env, first["uid"])["snapshot"]
    rbd.cli("snap", "rm", f"{rbd.pool}/{image}@{parent_snap}")
    rbd.write(image, 5 * OBJ + 100, b"new")

    second, res = backup(repo_env, rbd.spec(image), "vm")
    assert second["parent"] == first["uid"]
    warnings = [line for line in res.err_lines if "WARNING" in line]
    assert len(warnings) == 1 and parent_snap in warnings[0] and "whole image" in warnings[0], res.err
    v2 = show(repo_env, second["uid"])
    allocated = rbd.remember_allocation(v2["uid"], image, v2["snapshot"])
    assert allocated == 5 * OBJ
    assert second["bytes_read"] == allocated  # everything, not a diff
    assert second["bytes_dedup"] == 4 * OBJ  # ... but the unchanged objects are not stored again
    assert rbd.backyfs_snapshots(image) == [v2["snapshot"]]
    restore_and_compare(repo_env, rbd, v2["uid"], rbd.export(image, v2["snapshot"]))

    # The chain goes on as diffs from the new snapshot.
    third, _ = backup(repo_env, rbd.spec(image), "vm")
    assert third["bytes_read"] == 0


HOOK = """\
import os, sys
import rados, rbd
cluster = rados.Rados(conffile=os.environ["CEPH_CONF"])
cluster.connect(timeout=15)
ioctx = cluster.open_ioctx(sys.argv[1])
with rbd.Image(ioctx, sys.argv[2]) as image:
    image.write(sys.argv[3].encode(), int(sys.argv[4]))
open(sys.argv[5], "w").close()
ioctx.close()
cluster.shutdown()
"""


def test_pre_and_post_snapshot_commands(repo_env: RepoEnv, rbd_pool: RbdPool) -> None:
    rbd = rbd_pool
    image = rbd.create("hooks", 64 * MiB)
    rbd.write(image, 0, b"before")
    hook = rbd.tmp / "hook.py"
    hook.write_text(HOOK)
    pre_marker, post_marker = rbd.tmp / "pre.done", rbd.tmp / "post.done"

    def command(text: str, marker: Path) -> str:
        return f"{sys.executable} {hook} {rbd.pool} {image} {text} {OBJ + 10} {marker}"

    # The pre-command's write is in the snapshot, the post-command's (made after it) is not.
    stats, _ = backup(repo_env, rbd.spec(image), "vm", "--pre-snapshot", command("PRE-SNAP", pre_marker),
                      "--post-snapshot", command("POST-SNAP", post_marker))
    assert pre_marker.exists() and post_marker.exists()
    snapshot = show(repo_env, stats["uid"])["snapshot"]
    with rbd.image(image, snapshot) as snap:
        assert snap.read(OBJ + 10, 8) == b"PRE-SNAP"
    with rbd.image(image) as head:
        assert head.read(OBJ + 10, 9) == b"POST-SNAP"
    out = rbd.tmp / "restored.img"
    repo_env.ok("restore", stats["uid"], out)
    with open(out, "rb") as f:
        assert f.read(6) == b"before"
        f.seek(OBJ + 10)
        assert f.read(9) == b"PRE-SNAP\0"

    # A failing pre-command fails the backup, on one line, before any snapshot or version is made;
    # the post-command still runs (a freeze that failed half-way must be thawed).
    post_marker.unlink()
    res = repo_env.run("backup", rbd.spec(image), "vm", "--pre-snapshot",
                       "echo some noise; echo cannot freeze the filesystem >&2; exit 7",
                       "--post-snapshot", f"touch {post_marker}")
    assert res.rc == 1
    assert res.err_lines == ["backyfs: error: pre-snapshot command failed (exit status 7): "
                             "cannot freeze the filesystem"]
    assert post_marker.exists()
    assert rbd.backyfs_snapshots(image) == [snapshot]
    assert [v["uid"] for v in repo_env.versions()] == [stats["uid"]]

    # A failing post-command (the guest could not be thawed) fails it too, after the snapshot:
    # that snapshot is removed again, not left to pin data.
    res = repo_env.run("backup", rbd.spec(image), "vm", "--post-snapshot", "echo cannot thaw >&2; exit 5")
    assert res.rc == 1
    assert res.err_lines == ["backyfs: error: post-snapshot command failed (exit status 5): cannot thaw"]
    assert rbd.backyfs_snapshots(image) == [snapshot]
    assert [v["uid"] for v in repo_env.versions()] == [stats["uid"]]


def test_a_hung_snapshot_command_is_killed_with_its_children(rbd_pool: RbdPool, monkeypatch) -> None:
    import time

    from backyfs.errors import SourceError
    from backyfs.sources import rbd as rbd_mod

    monkeypatch.setenv("CEPH_CONF", rbd_pool.conf)
    monkeypatch.setattr(rbd_mod, "HOOK_TIMEOUT", 1.0)
    image = rbd_pool.create("hook", 8 * MiB)
    source = rbd_mod.RbdSource.from_spec(rbd_pool.spec(image))
    marker = f"backyfs-hook-test-{os.getpid()}"
    try:
        started = time.monotonic()
        with pytest.raises(SourceError, match="did not finish in 1 s"):
            source._run_hook(f"sh -c 'sleep 60; echo {marker}' & sleep 60", "pre-snapshot")
        assert time.monotonic() - started < 10
        time.sleep(0.2)
        left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
        assert left == "", "the command's children outlived it"
    finally:
        source.close()


def test_a_wrong_diff_is_caught_by_the_sample(repo_env: RepoEnv, rbd_pool: RbdPool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from backyfs.sources.rbd import RbdSource

    rbd = rbd_pool
    rng = random.Random(5)
    image = rbd.create("lossy", 64 * MiB)
    for idx in (0, 3, 7):
        rbd.write(image, idx * OBJ, rng.randbytes(OBJ))
    first = repo_env.ok("backup", rbd.spec(image), "vm", "--json").json()
    rbd.write(image, 3 * OBJ + 4096, b"changed, and the diff will not say so")
    rbd.write(image, 12 * OBJ, b"changed, and the diff says so")

    real_diff = RbdSource._diff

    def lossy_diff(self: RbdSource, from_snapshot: str | None) -> list:
        extents = real_diff(self, from_snapshot)
        if from_snapshot is None:
            return extents
        return [e for e in extents if not e.offset <= 3 * OBJ < e.offset + e.length]

    with monkeypatch.context() as patch:
        patch.setattr(RbdSource, "_diff", lossy_diff)
        # Sample every unchanged block (at most 64 are), so the one the diff hides is re-read.
        res = repo_env.call("backup", rbd.spec(image), "vm", "--verify-sample", "100")
    assert res.rc == 1
    assert len(res.err_lines) == 1 and "diff is wrong" in res.err and f"offset {3 * OBJ}" in res.err, res.err
    states = {v["uid"]: v["state"] for v in repo_env.versions()}
    assert states.pop(first["uid"]) == "valid"
    assert list(states.values()) == ["invalid"]

    # With the real diff, the next backup (still on the valid parent and its snapshot) is right.
    stats, _ = backup(repo_env, rbd.spec(image), "vm")
    assert stats["parent"] == first["uid"]
    assert stats["bytes_read"] == (2 + stats["blocks_sampled"]) * OBJ
    snapshot = show(repo_env, stats["uid"])["snapshot"]
    # The invalid version's snapshot is gone; the parent's stays until the next backup.
    assert rbd.backyfs_snapshots(image) == [show(repo_env, first["uid"])["snapshot"], snapshot]
    out = rbd.tmp / "restored.img"
    repo_env.ok("restore", stats["uid"], out)
    assert_same(out, rbd.export(image, snapshot))


def _target_writing_with(rbd: RbdPool, monkeypatch, name: str, aio_write: Any) -> tuple[Any, Any]:
    """An RbdTarget making a new image NAME whose aio writes go to aio_write instead of librbd;
    returns it and its real librbd image."""
    from backyfs.sources.rbd import RbdTarget

    monkeypatch.setenv("CEPH_CONF", rbd.conf)
    target = RbdTarget(rbd.pool, name, 8 * MiB, force=False)
    real_image = target.image

    class Writes:
        def __getattr__(self, attr: str) -> Any:
            return getattr(real_image, attr)

    fake = Writes()
    fake.aio_write = aio_write  # type: ignore[attr-defined]
    target.image = fake  # type: ignore[assignment]
    return target, real_image


def test_a_failed_rbd_restore_write_is_reported_and_cleaned_up_at_once(rbd_pool: RbdPool,
                                                                        monkeypatch) -> None:
    """An aio write that fails (an OSD error) makes finish() raise, and abandon() then removes the
    image this restore created, at once: it once waited 60 s for each of the 16 write slots that
    finish() had already taken, then used closed handles."""
    import time

    from backyfs.errors import BackyfsError

    rbd = rbd_pool
    name = rbd.name("failedwrite")

    def failing(data: bytes, offset: int, callback: Any) -> None:
        callback(type("Completion", (), {"get_return_value": lambda self: -5})())

    target, _real_image = _target_writing_with(rbd, monkeypatch, name, failing)
    target.pwrite(0, b"x" * 4096)
    with pytest.raises(BackyfsError, match="write at offset 0 failed"):
        target.finish()
    started = time.monotonic()
    assert target.abandon() == f"removed the incomplete RBD image {rbd.pool}/{name}"
    assert time.monotonic() - started < 10
    assert name not in rbd.cli("ls", rbd.pool).stdout.split()


def test_an_rbd_restore_write_refused_at_submission_gives_its_slot_back(rbd_pool: RbdPool,
                                                                         monkeypatch) -> None:
    """An aio write that librbd refuses outright (it raises instead of calling back) frees its
    in-flight slot: 16 such writes used to leave none, and the next write or finish() hung."""
    from backyfs.sources.rbd import RbdTarget

    rbd = rbd_pool
    name = rbd.name("refusedwrite")

    def refusing(data: bytes, offset: int, callback: Any) -> None:
        raise target.rbd.InvalidArgument("refused")

    target, real_image = _target_writing_with(rbd, monkeypatch, name, refusing)
    refused = []

    def write_then_finish() -> None:
        for _ in range(RbdTarget.MAX_IN_FLIGHT + 1):
            try:
                target.pwrite(0, b"x" * 4096)
            except target.rbd.InvalidArgument:
                refused.append(1)
        target.image = real_image
        target.finish()

    worker = threading.Thread(target=write_then_finish, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), f"hung after {len(refused)} refused writes"
    assert len(refused) == RbdTarget.MAX_IN_FLIGHT + 1 and target.closed
    rbd.cli("rm", "--no-progress", f"{rbd.pool}/{name}")


def test_a_librbd_error_is_one_line(repo_env: RepoEnv, rbd_pool: RbdPool) -> None:
    """librbd's own exceptions reach the user as one line: here the image's snapshot limit (set
    with `rbd snap limit set`) is reached, so the backup's snapshot is refused."""
    image = rbd_pool.create("limit", 8 * MiB)
    spec = f"{rbd_pool.pool}/{image}"
    rbd_pool.cli("snap", "create", f"{spec}@user-snapshot")
    rbd_pool.cli("snap", "limit", "set", "--limit", "1", spec)
    res = repo_env.run("backup", rbd_pool.spec(image), "vm")
    assert res.rc == 1 and len(res.err_lines) == 1, res.err
    assert res.err_lines[0].startswith("backyfs: error: Ceph RBD: "), res.err
    assert rbd_pool.backyfs_snapshots(image) == [] and repo_env.versions() == []
