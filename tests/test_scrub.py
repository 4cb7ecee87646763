"""Scrub and deep-scrub: damaged objects are named, versions turn invalid, and a new backup heals them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import BS, RepoEnv, files_equal, first_difference, read_block, write_image

from backyfs.storage.codec import HEADER_SIZE

KINDS = ["rand", "text", "hole", "rand", "dup", "rand", "dup", "text"]


@pytest.fixture
def backed_up(repo_env: RepoEnv, tmp_path: Path) -> tuple[Path, str]:
    img = write_image(tmp_path / "img", KINDS, tail=3000)
    return img, repo_env.backup(img, "vm")["uid"]


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


def state(env: RepoEnv, uid: str) -> str:
    return env.ok("show", uid, "--json").json()["state"]


@pytest.mark.parametrize("block_idx", [3, 1], ids=["raw-object", "zstd-object"])
def test_flipped_byte_found_by_deep_scrub_and_restore_then_healed(
        repo_env: RepoEnv, tmp_path: Path, backed_up: tuple[Path, str], block_idx: int) -> None:
    img, uid = backed_up
    obj = repo_env.block_object(read_block(img, block_idx))
    assert obj.exists()
    size = obj.stat().st_size
    flip_byte(obj, HEADER_SIZE + (size - HEADER_SIZE) // 2)

    # A shallow scrub only checks sizes: it cannot see a flipped byte.
    assert repo_env.call("scrub", uid).rc == 0
    assert state(repo_env, uid) == "valid"

    res = repo_env.run("deep-scrub", uid)
    assert res.rc == 3, res.err
    assert f"block {block_idx} at offset {block_idx * BS}" in res.err
    assert f"version {uid} marked invalid" in res.err
    assert all(line.startswith("backyfs:") for line in res.err_lines)
    assert "Traceback" not in res.err
    assert state(repo_env, uid) == "invalid"
    assert repo_env.versions("vm")[0]["state"] == "invalid"

    # Restore names the block and its byte offset, restores everything else, and exits 3.
    out = tmp_path / "restored"
    res = repo_env.run("restore", uid, out)
    assert res.rc == 3
    assert f"block {block_idx} at offset {block_idx * BS}" in res.err
    assert "Traceback" not in res.err
    assert first_difference(img, out) is not None
    with open(img, "rb") as a, open(out, "rb") as b:
        whole_a, whole_b = a.read(), b.read()
    lo, hi = block_idx * BS, (block_idx + 1) * BS
    assert whole_b[:lo] == whole_a[:lo] and whole_b[hi:] == whole_a[hi:]
    assert whole_b[lo:hi] == bytes(BS)  # the bad block is left as zeros

    # A new backup of the same data writes a good copy; a full deep-scrub makes the old version valid.
    heal = repo_env.backup(img, "vm")
    assert heal["bytes_new"] == len(read_block(img, block_idx))
    assert state(repo_env, heal["uid"]) == "valid"
    res = repo_env.run("deep-scrub", "--all")
    assert res.rc == 0, res.err
    assert f"version {uid} is valid again" in res.out
    assert state(repo_env, uid) == "valid"
    out.unlink()
    repo_env.ok("restore", uid, out)
    assert files_equal(img, out)


def test_damaged_shared_object_invalidates_every_version_using_it(
        repo_env: RepoEnv, tmp_path: Path, backed_up: tuple[Path, str]) -> None:
    img, uid = backed_up
    other = repo_env.backup(img, "vm-copy")["uid"]
    obj = repo_env.block_object(read_block(img, 4))  # the dup block: blocks 4 and 6 of both versions
    flip_byte(obj, obj.stat().st_size - 1)
    res = repo_env.run("deep-scrub", "--all")
    assert res.rc == 3
    for v in (uid, other):
        assert f"version {v} block 4 at offset {4 * BS}" in res.err
        assert f"version {v} block 6 at offset {6 * BS}" in res.err
        assert state(repo_env, v) == "invalid"
    assert "1 bad" in res.out


def test_shallow_scrub_detects_deleted_and_truncated_objects(
        repo_env: RepoEnv, backed_up: tuple[Path, str]) -> None:
    img, uid = backed_up
    deleted = repo_env.block_object(read_block(img, 0))
    truncated = repo_env.block_object(read_block(img, 5))
    deleted.unlink()
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size - 100)

    res = repo_env.run("scrub", uid)
    assert res.rc == 3
    assert "block 0 at offset 0: missing" in res.err
    assert f"block 5 at offset {5 * BS}: size" in res.err
    assert "2 bad" in res.out
    assert state(repo_env, uid) == "invalid"

    # The same data backed up again rewrites both objects; a full scrub then revalidates.
    heal = repo_env.backup(img, "vm")
    assert heal["bytes_new"] == 2 * BS
    assert deleted.exists()
    res = repo_env.run("scrub", "--all")
    assert res.rc == 0, res.err
    assert state(repo_env, uid) == "valid"


def test_partial_scrub_does_not_revalidate(repo_env: RepoEnv, backed_up: tuple[Path, str]) -> None:
    img, uid = backed_up
    obj = repo_env.block_object(read_block(img, 0))
    os.unlink(obj)
    assert repo_env.call("scrub", uid).rc == 3
    repo_env.backup(img, "vm")
    res = repo_env.call("scrub", uid, "--percent", "50")
    assert res.rc == 0
    assert state(repo_env, uid) == "invalid"  # only a full scrub proves every block good
    assert repo_env.call("scrub", uid).rc == 0
    assert state(repo_env, uid) == "valid"


def test_clean_repository_scrubs_clean(repo_env: RepoEnv, backed_up: tuple[Path, str]) -> None:
    _img, uid = backed_up
    for cmd in ("scrub", "deep-scrub"):
        res = repo_env.call(cmd, "--all")
        assert res.rc == 0, res.err
        assert "0 bad" in res.out
    objects = repo_env.stats()["objects"]
    assert f"checked {objects} objects" in repo_env.call("deep-scrub", uid).out
    assert state(repo_env, uid) == "valid"


def test_deep_scrub_checks_each_versions_copy_in_the_store(repo_env, tmp_path):
    """rebuild-db recovers from the store's copies: deep-scrub writes a damaged one again and reports
    a missing one (exit 3) without writing it (rm deletes it first: it may be an interrupted rm's)."""
    from conftest import write_image

    kept = repo_env.backup(write_image(tmp_path / "a.img", ["rand", "text"]), "a")["uid"]
    lost = repo_env.backup(write_image(tmp_path / "b.img", ["rand"]), "b")["uid"]
    versions = repo_env.store_dir / "versions"
    (versions / kept / "meta.json").write_bytes(b"garbage")
    map_file = next(p for p in (versions / kept).iterdir() if p.name != "meta.json")
    map_file.write_bytes(map_file.read_bytes()[:-8])
    (versions / lost / "meta.json").unlink()
    res = repo_env.run("deep-scrub", "--all")
    assert res.rc == 3, res.err
    assert f"version {kept}: its damaged copy in the store was written again" in res.err
    assert f"version {lost} has no metadata in the store" in res.err
    assert not (versions / lost / "meta.json").exists()
    repo_env.db_path.rename(tmp_path / "old.sqlite")
    res = repo_env.run("rebuild-db")  # the repaired copy is recovered, the missing one is not
    assert [v["uid"] for v in repo_env.versions()] == [kept], res.err
    repo_env.ok("restore", kept, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == (tmp_path / "a.img").read_bytes()


def test_scrub_refuses_a_store_that_is_not_this_repositorys(repo_env, tmp_path) -> None:
    """A mistyped store path or bucket: scrub marked every version invalid and wrote their metadata
    into the other store. Now it refuses and changes nothing."""
    img = write_image(tmp_path / "img", ["rand", "text"])
    uid = repo_env.backup(img, "vm")["uid"]
    other = tmp_path / "other-store"
    repo_env.use_config(f'[store]\ntype = "fs"\npath = "{other}"\n')
    res = repo_env.run("scrub", "--all")
    assert res.rc == 1 and "is it the right bucket, pool or path" in res.err, res.err
    assert not (other / "versions").exists()
    repo_env.use_config("")
    assert [v["state"] for v in repo_env.versions()] == ["valid"] and repo_env.run("scrub", uid).rc == 0
