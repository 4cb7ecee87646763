"""Backups and restores through the CLI: sparse round trips, differentials (with and without hints),
dedup across volumes, rebuild-db, and version management (labels, protect, show, ls, rm)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import (
    BS,
    RepoEnv,
    allocated_bytes,
    block_files,
    files_equal,
    hints_for,
    overwrite_blocks,
    write_image,
)

from backyfs.config import load_config, open_repository
from backyfs.repository.extents import Extent
from backyfs.repository.writer import BackupWriter, HintsMismatch
from backyfs.sources.file import FileSource

# 12 blocks: holes, written zeros, random, duplicates, text, half-zero blocks; plus a partial tail.
MIXED = ["rand", "hole", "zero", "dup", "text", "hole", "half", "dup", "rand", "zero", "hole", "text"]


def restore_to(env: RepoEnv, version: str, target: Path) -> Path:
    env.ok("restore", version, target)
    return target


@pytest.mark.parametrize("block_size", [BS, 64 * 1024], ids=["4MiB", "64KiB"])
def test_mixed_sparse_image_round_trip(repo_env: RepoEnv, tmp_path: Path, block_size: int) -> None:
    if block_size != BS:
        repo_env.use_config(f'block_size = "{block_size // 1024}KiB"\n')
    tail = 12345
    kinds = MIXED * (4 if block_size != BS else 1)
    img = write_image(tmp_path / "img", kinds, block_size=block_size, tail=tail)
    st = repo_env.backup(img, "vm1")

    n = {k: kinds.count(k) for k in set(kinds)}
    data_blocks = len(kinds) - n["hole"]
    assert st["bytes_total"] == len(kinds) * block_size + tail
    assert st["bytes_read"] == data_blocks * block_size + tail, "holes must not be read"
    assert st["bytes_sparse"] == (n["hole"] + n["zero"]) * block_size
    # Everything read but the zero blocks is either new or a duplicate.
    assert st["bytes_new"] + st["bytes_dedup"] == (data_blocks - n["zero"]) * block_size + tail
    assert st["bytes_dedup"] == (n["dup"] - 1) * block_size
    unique = n["rand"] + 1 + n["text"] + n["half"] + 1  # + one dup block + the tail
    stats = repo_env.stats()
    assert stats["objects"] == unique == len(block_files(repo_env.store_dir))
    assert (stats["versions"], stats["volumes"], stats["logical_bytes"]) == (1, 1, st["bytes_total"])
    # Text compresses; random data is stored raw with a 16-byte header.
    assert st["bytes_stored"] < st["bytes_new"]

    show = repo_env.ok("show", st["uid"], "--json").json()
    assert show["state"] == "valid"
    assert show["blocks_allocated"] == data_blocks - n["zero"] + 1  # + the tail block
    assert show["stats"]["bytes_read"] == st["bytes_read"]

    out = restore_to(repo_env, st["uid"], tmp_path / "restored")
    assert files_equal(img, out)
    # Zero blocks and holes are left as holes in the restored file.
    stored_blocks = data_blocks - n["zero"]
    assert allocated_bytes(out) <= stored_blocks * block_size + tail + 65536
    assert allocated_bytes(out) < allocated_bytes(img)


@pytest.mark.parametrize(("kinds", "tail"), [([], 1000), ([], 0), (["hole"] * 3, 0), (["zero"] * 2, 7),
                                             (["rand"], 1), (["hole", "text"], 4096)],
                         ids=["tiny", "empty", "all-holes", "zeros+tail", "one-byte-tail", "hole-text-tail"])
def test_edge_sizes_round_trip(repo_env: RepoEnv, tmp_path: Path, kinds: list[str], tail: int) -> None:
    img = write_image(tmp_path / "img", kinds, tail=tail)
    st = repo_env.backup(img, "edge")
    assert st["bytes_total"] == img.stat().st_size
    out = restore_to(repo_env, st["uid"], tmp_path / "restored")
    assert files_equal(img, out)


def test_differential_without_hints_stores_only_changed_blocks(repo_env: RepoEnv, tmp_path: Path) -> None:
    img = write_image(tmp_path / "img", ["rand"] * 6 + ["hole"] * 2 + ["text"] * 2, tail=5000)
    v1 = repo_env.backup(img, "vm")
    old = shutil.copy(img, tmp_path / "v1.img")
    objects_before = repo_env.stats()["objects"]

    overwrite_blocks(img, [1, 4])
    v2 = repo_env.backup(img, "vm")
    assert v2["parent"] == v1["uid"]
    assert v2["bytes_read"] == 8 * BS + 5000  # no hints: every data block is read
    assert v2["bytes_new"] == 2 * BS
    assert v2["bytes_stored"] <= 2 * (BS + 64)
    assert v2["bytes_dedup"] == 6 * BS + 5000
    assert repo_env.stats()["objects"] == objects_before + 2

    assert files_equal(old, restore_to(repo_env, v1["uid"], tmp_path / "r1"))
    assert files_equal(img, restore_to(repo_env, v2["uid"], tmp_path / "r2"))
    assert files_equal(img, restore_to(repo_env, "vm", tmp_path / "r-latest"))


def test_differential_with_hints_reads_only_hinted_blocks(repo_env: RepoEnv, tmp_path: Path) -> None:
    img = write_image(tmp_path / "img", ["rand"] * 7 + ["hole"] + ["text"] * 2)
    v1 = repo_env.backup(img, "vm")
    overwrite_blocks(img, [2, 7])  # block 7 was a hole
    hints = hints_for(tmp_path / "diff.json", [2, 7])
    v2 = repo_env.backup(img, "vm", "--hints", hints)

    assert v2["parent"] == v1["uid"]
    assert v2["blocks_sampled"] == 1  # 0.5% of 8 unhinted blocks, at least one
    assert v2["bytes_read"] == (2 + v2["blocks_sampled"]) * BS
    assert v2["bytes_new"] == 2 * BS
    assert v2["bytes_unchanged"] == 8 * BS
    assert files_equal(img, restore_to(repo_env, v2["uid"], tmp_path / "r2"))


def test_empty_hints_neither_read_nor_list_the_source(repo_env: RepoEnv, tmp_path: Path) -> None:
    """An idle volume (an empty RBD diff) backs up from its parent's map alone: no block is read
    and the source's allocation is not even listed (a second on a fragmented 1 TiB RBD image)."""
    img = write_image(tmp_path / "img", ["rand", "hole", "text"])
    repo_env.backup(img, "vm")
    repo = open_repository(load_config())
    parent = repo.resolve("vm")

    class Watched(FileSource):
        calls: list[str] = []

        def data_extents(self):
            self.calls.append("data_extents")
            return super().data_extents()

        def pread(self, offset: int, length: int) -> bytes:
            self.calls.append("pread")
            return super().pread(offset, length)

    source = Watched(str(img))
    version = BackupWriter(repo, source, "vm", parent=parent, hints=[]).run()
    source.close()
    assert Watched.calls == []
    assert version.state == "valid" and version.stats["bytes_unchanged"] == 2 * BS
    repo.close()
    assert files_equal(img, restore_to(repo_env, version.uid, tmp_path / "r"))


def test_hints_with_discarded_extent(repo_env: RepoEnv, tmp_path: Path) -> None:
    img = write_image(tmp_path / "img", ["rand"] * 6)
    repo_env.backup(img, "vm")
    objects = repo_env.stats()["objects"]
    with open(img, "r+b") as f:  # the guest discarded block 3
        f.seek(3 * BS)
        f.write(bytes(BS))
    hints = tmp_path / "diff.json"
    hints.write_text(json.dumps([{"offset": 3 * BS, "length": BS, "exists": "false"}]))
    v2 = repo_env.backup(img, "vm", "--hints", hints)
    assert v2["bytes_new"] == 0
    assert repo_env.stats()["objects"] == objects
    assert repo_env.ok("show", v2["uid"], "--json").json()["blocks_allocated"] == 5
    assert files_equal(img, restore_to(repo_env, v2["uid"], tmp_path / "r2"))


def test_wrong_hints_are_caught_by_the_sample(repo_env: RepoEnv, tmp_path: Path) -> None:
    img = write_image(tmp_path / "img", ["rand"] * 10)
    v1 = repo_env.backup(img, "vm")
    old = shutil.copy(img, tmp_path / "v1.img")
    overwrite_blocks(img, range(10))  # every block changed ...
    hints = hints_for(tmp_path / "diff.json", [0])  # ... but only one is hinted: any sample hits a bad one

    res = repo_env.run("backup", img, "vm", "--hints", hints)
    assert res.rc != 0
    assert len(res.err_lines) == 1 and res.err_lines[0].startswith("backyfs:"), res.err
    assert "not in the diff" in res.err
    assert "Traceback" not in res.err

    versions = repo_env.versions("vm")
    assert [v["uid"] for v in versions if v["state"] == "valid"] == [v1["uid"]]
    assert all(v["state"] == "invalid" for v in versions if v["uid"] != v1["uid"])
    # The volume name still means the last good version.
    assert files_equal(old, restore_to(repo_env, "vm", tmp_path / "r"))


def test_wrong_hints_caught_through_the_writer_api(repo_env: RepoEnv, tmp_path: Path) -> None:
    img = write_image(tmp_path / "img", ["rand"] * 8)
    repo_env.backup(img, "vm")
    overwrite_blocks(img, [5])  # changed, but the hints name block 0
    repo = open_repository(load_config())
    parent = repo.resolve("vm")
    source = FileSource(str(img))
    writer = BackupWriter(repo, source, "vm", parent=parent, hints=[Extent(0, BS)], sample_percent=100)
    with pytest.raises(HintsMismatch, match="block 5"):
        writer.run()
    source.close()
    states = {v.uid: v.state for v in repo.db.versions("vm")}
    assert states.pop(parent.uid) == "valid"
    assert list(states.values()) == ["invalid"]
    assert repo.latest_valid("vm").uid == parent.uid
    repo.close()


def test_dedup_across_volumes(repo_env: RepoEnv, tmp_path: Path) -> None:
    img = write_image(tmp_path / "img", ["rand", "text", "hole", "dup", "dup", "rand"], tail=999)
    a = repo_env.backup(img, "vm-a")
    before = repo_env.stats()
    files = len(block_files(repo_env.store_dir))
    b = repo_env.backup(img, "vm-b")
    assert b["parent"] is None  # another volume: a full backup ...
    assert b["bytes_stored"] == 0 and b["bytes_new"] == 0  # ... that stores nothing new
    assert b["bytes_dedup"] == a["bytes_new"] + a["bytes_dedup"]
    after = repo_env.stats()
    assert (after["objects"], after["stored_bytes"]) == (before["objects"], before["stored_bytes"])
    assert len(block_files(repo_env.store_dir)) == files
    assert after["volumes"] == 2
    assert files_equal(img, restore_to(repo_env, "vm-b", tmp_path / "rb"))


def test_rebuild_db_from_the_store(repo_env: RepoEnv, tmp_path: Path) -> None:
    img = write_image(tmp_path / "img", ["rand", "hole", "text", "dup", "zero", "rand"], tail=100)
    v1 = repo_env.backup(img, "vm", "--label", "kind=daily")
    old = shutil.copy(img, tmp_path / "v1.img")
    overwrite_blocks(img, [1])
    v2 = repo_env.backup(img, "vm")
    repo_env.ok("protect", v1["uid"])
    listing, stats = repo_env.versions(), repo_env.stats()

    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{repo_env.db_path}{suffix}").unlink(missing_ok=True)
    assert repo_env.versions() == []

    res = repo_env.run("rebuild-db")
    assert res.rc == 0, res.err
    assert "2 versions" in res.out
    assert repo_env.versions() == listing  # uids, states, parents, labels, protection
    rebuilt = repo_env.stats()
    assert (rebuilt["objects"], rebuilt["stored_bytes"]) == (stats["objects"], stats["stored_bytes"])
    assert files_equal(old, restore_to(repo_env, v1["uid"], tmp_path / "r1"))
    assert files_equal(img, restore_to(repo_env, v2["uid"], tmp_path / "r2"))
    # The dedup index is back too: the same data again stores nothing.
    assert repo_env.backup(img, "vm")["bytes_stored"] == 0
    # A second rebuild refuses to touch a filled DB.
    again = repo_env.run("rebuild-db")
    assert again.rc == 1 and again.err.startswith("backyfs:")


def test_a_rebuild_db_killed_midway_leaves_the_database_empty(repo_env: RepoEnv, tmp_path: Path) -> None:
    """rebuild-db fills the database in one transaction: stopped in the middle (here after the
    versions, before the object index) it leaves nothing, so running it again works. It used to
    leave some versions, and the rerun refused the database as not empty."""
    from backyfs.metadata.db import MetadataDB

    img = write_image(tmp_path / "img", ["rand", "text"])
    repo_env.backup(img, "vm")
    repo_env.backup(img, "vm2")
    repo_env.db_path.unlink()
    repo = open_repository(load_config(None))
    original = repo.db.add_blocks

    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    repo.db.add_blocks = killed  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        repo.rebuild_db()
    repo.db.add_blocks = original  # type: ignore[method-assign]
    repo.close()
    db = MetadataDB(str(repo_env.db_path))
    assert db.versions() == []
    db.close()
    res = repo_env.ok("rebuild-db")
    assert "2 versions" in res.out


def test_rebuild_db_leaves_out_a_version_with_damaged_metadata(repo_env: RepoEnv, tmp_path: Path) -> None:
    """One version's metadata object truncated in the store: the others are rebuilt and restorable,
    the damaged one is named in one line, and the exit code says damaged data was found."""
    img = write_image(tmp_path / "img", ["rand", "text", "rand"])
    v1 = repo_env.backup(img, "vm")["uid"]
    overwrite_blocks(img, [1])
    v2 = repo_env.backup(img, "vm")["uid"]
    meta = repo_env.store_dir / "versions" / v1 / "meta.json"
    meta.write_bytes(meta.read_bytes()[:20])
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{repo_env.db_path}{suffix}").unlink(missing_ok=True)

    res = repo_env.run("rebuild-db")
    assert res.rc == 3, res.err
    assert "1 versions" in res.out
    assert len(res.err_lines) == 1 and v1 in res.err and "damaged metadata" in res.err, res.err
    assert [v["uid"] for v in repo_env.versions()] == [v2]
    assert files_equal(img, restore_to(repo_env, v2, tmp_path / "r2"))


def test_rebuild_db_refuses_a_block_map_swapped_or_flipped_in_the_store(repo_env: RepoEnv,
                                                                         tmp_path: Path) -> None:
    """Another version's block map copied over one (or one bit flipped in it) decoded, passed every
    check and, after rebuild-db, restored the wrong data with exit 0. Maps are sealed to their
    version now; deep-scrub seals the maps an older backyfs wrote."""
    img = write_image(tmp_path / "img", ["rand", "text", "rand"])
    v1 = repo_env.backup(img, "vm")["uid"]
    overwrite_blocks(img, [1])
    v2 = repo_env.backup(img, "vm")["uid"]
    maps = {v: repo_env.store_dir / "versions" / v / "blockmap" for v in (v1, v2)}
    maps[v1].write_bytes(maps[v2].read_bytes())
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{repo_env.db_path}{suffix}").unlink(missing_ok=True)
    res = repo_env.run("rebuild-db")
    assert res.rc == 3 and v1 in res.err and f"holds the block map of version '{v2}'" in res.err, res.err
    assert [v["uid"] for v in repo_env.versions()] == [v2]
    assert files_equal(img, restore_to(repo_env, v2, tmp_path / "r2"))

    from backyfs.storage import codec

    sealed = codec.decode(maps[v2].read_bytes())
    raw = sealed[len(b"BKYSEAL1") + 1 + len(v2) + 32 :]
    maps[v2].write_bytes(codec.encode(raw))  # as an older backyfs wrote it: read, and sealed by deep-scrub
    assert repo_env.run("deep-scrub", v2).rc == 0
    assert codec.decode(maps[v2].read_bytes()) == sealed


def test_labels_protect_show_ls_rm(repo_env: RepoEnv, tmp_path: Path) -> None:
    img = write_image(tmp_path / "img", ["rand", "text"])
    v1 = repo_env.backup(img, "vm", "--label", "a=1", "--label", "b=2")["uid"]
    v2 = repo_env.backup(img, "other")["uid"]

    rows = {r["uid"]: r for r in repo_env.versions()}
    assert set(rows) == {v1, v2}
    assert rows[v1]["labels"] == {"a": "1", "b": "2"} and rows[v1]["volume"] == "vm"
    assert rows[v1]["state"] == "valid" and rows[v1]["protected"] is False
    assert [r["uid"] for r in repo_env.versions("other")] == [v2]

    res = repo_env.ok("label", v1, "c=3", "--remove", "a")
    assert json.loads(res.out) == {"b": "2", "c": "3"}
    assert repo_env.ok("show", v1, "--json").json()["labels"] == {"b": "2", "c": "3"}
    assert repo_env.ok("show", v1[:6], "--json").json()["uid"] == v1  # unique prefix

    repo_env.ok("protect", v1)
    assert repo_env.ok("show", v1, "--json").json()["protected"] is True
    res = repo_env.call("rm", v1)
    assert res.rc == 1 and "protected" in res.err
    assert v1 in {r["uid"] for r in repo_env.versions()}

    res = repo_env.call("rm", "vm")  # a volume name is not enough for rm
    assert res.rc == 1 and v1 in {r["uid"] for r in repo_env.versions()}

    repo_env.ok("unprotect", v1)
    assert repo_env.versions("vm")[0]["protected"] is False
    repo_env.ok("rm", v1)
    assert {r["uid"] for r in repo_env.versions()} == {v2}
    assert not (repo_env.store_dir / "versions" / v1).exists() or not any(
        (repo_env.store_dir / "versions" / v1).iterdir())

    repo_env.ok("protect", v2)
    repo_env.ok("rm", v2, "--force")
    assert repo_env.versions() == []


def test_rebuild_db_marks_a_version_with_missing_blocks_invalid(repo_env: RepoEnv, tmp_path: Path) -> None:
    """A version whose metadata is intact but one of whose objects is gone from the store (gc ran
    after an rm that removed only the database row) is rebuilt invalid, and named, not valid."""
    img = write_image(tmp_path / "img", ["rand", "rand"])
    v1 = repo_env.backup(img, "vm")["uid"]
    blocks = sorted((repo_env.store_dir / "blocks").rglob("*"))
    victim = next(p for p in blocks if p.is_file())
    victim.unlink()
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{repo_env.db_path}{suffix}").unlink(missing_ok=True)
    res = repo_env.run("rebuild-db")
    assert res.rc == 3, res.err
    assert len(res.err_lines) == 1 and v1 in res.err, res.err
    assert "1 blocks missing: marked invalid" in res.err, res.err
    assert [(v["uid"], v["state"]) for v in repo_env.versions()] == [(v1, "invalid")]


def test_rm_refuses_a_version_with_overlays_unless_forced(repo_env: RepoEnv, tmp_path: Path) -> None:
    """Writes made on top of a version (an overlay) would be orphaned by rm: refused, or with
    --force discarded too. An overlay orphaned anyway (by an older backyfs) is still discarded by a
    uid prefix."""
    from backyfs.export.overlay import list_overlays
    from backyfs.export.service import ExportService

    img = write_image(tmp_path / "disk.img", ["rand", "hole", "text"])
    first, second = (repo_env.backup(img, "vm")["uid"] for _ in range(2))
    cfg = load_config(None)
    service = ExportService(cfg)
    try:
        for uid in (first, second):
            device = service.open(uid, writable=True, overlay_name="scratch")
            device.pwrite(b"written by a test VM", 4096)
            device.close()
    finally:
        service.close()
    res = repo_env.call("rm", first)
    assert res.rc == 1 and "has overlays (scratch)" in res.err, res.err
    assert first in {v["uid"] for v in repo_env.versions()}
    res = repo_env.ok("rm", first, "--force")
    assert f"discarded overlay scratch of version {first}" in res.out
    assert [o.version_uid for o in list_overlays(cfg.overlay_dir)] == [second]

    repo = open_repository(cfg)  # the version goes without rm's check, as before this was one
    repo.delete_version(repo.resolve(second), force=True)
    repo.close()
    repo_env.ok("overlay", "discard", second[:6], "--name", "scratch")
    assert list_overlays(cfg.overlay_dir) == []


def test_verbose_says_what_a_backup_and_a_restore_do(repo_env: RepoEnv, tmp_path: Path) -> None:
    """-v logs the configuration in use and each step's plan (it used to print nothing of backyfs's);
    without it, none of that."""
    img = write_image(tmp_path / "img", ["rand"] * 3 + ["hole"] + ["text"])
    repo_env.backup(img, "vm")
    overwrite_blocks(img, [1])
    hints = hints_for(tmp_path / "diff.json", [1])
    res = repo_env.run("-v", "backup", img, "vm", "--hints", hints)
    assert res.rc == 0, res.err
    assert f"store: file:{repo_env.store_dir}" in res.err
    assert ("reading 2 blocks (1 of them a sample of unchanged ones to check the diff), "
            "2 taken from the parent") in res.err
    assert "bytes_new=4194304" in res.err
    res = repo_env.run("-v", "restore", "vm", tmp_path / "out")
    assert res.rc == 0 and "onto a target that reads as zeros" in res.err
    quiet = repo_env.run("restore", "vm", tmp_path / "out2")
    assert quiet.rc == 0 and "DEBUG" not in quiet.err


def test_parallel_work_stops_at_the_first_failure() -> None:
    """Restore and scrub stop soon after a block fails with a store error (a hung gateway), not
    after trying every remaining block at its timeout."""
    import threading
    import time as time_mod

    from backyfs.errors import StoreUnavailable
    from backyfs.repository.restore import _run_parallel

    calls = []
    lock = threading.Lock()

    def work(i: int) -> None:
        with lock:
            calls.append(i)
        time_mod.sleep(0.005)
        if i == 5:
            raise StoreUnavailable("the store hangs")

    with pytest.raises(StoreUnavailable):
        _run_parallel(work, ((i,) for i in range(2000)), threads=4)
    assert len(calls) < 30, len(calls)
