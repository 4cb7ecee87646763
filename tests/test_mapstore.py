"""Block maps in the store (repository.mapstore): one object while small, parts once large.

The RADOS test writes a real map past Ceph's own single-write limit (osd_max_write_size, 90 MiB),
which failed the end of every backup of a volume with over 2.3 million allocated blocks.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path

import ceph_env
import pytest

from backyfs.errors import CorruptObject, ObjectMissing
from backyfs.metadata.blockmap import BlockMap
from backyfs.metadata.db import MetadataDB, Version
from backyfs.repository import mapstore
from backyfs.repository.repo import Repository, new_uid
from backyfs.storage import codec
from backyfs.storage.base import ObjectStore
from backyfs.storage.fs import FilesystemStore

BS = 4 << 20


def big_map(count: int, seed: int = 0) -> BlockMap:
    """A map of `count` allocated blocks with distinct digests (every other block a hole)."""
    digests = b"".join(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=32).digest() for i in range(count))
    blocks = {2 * i: digests[32 * i : 32 * i + 32] for i in range(count)}
    return BlockMap.from_mapping(2 * count * BS, BS, blocks)


def stored_keys(store: ObjectStore, uid: str) -> set[str]:
    return {k for k in store.list(f"versions/{uid}/")}


def save_and_rebuild(tmp_path: Path, store: ObjectStore, blockmap: BlockMap) -> tuple[str, Repository]:
    """Save a valid version with this map through one database, rebuild a second from the store
    alone; returns the uid and the rebuilt repository (same store)."""
    uid = new_uid()
    repo = Repository(store, MetadataDB(str(tmp_path / f"{uid}-a.sqlite")))
    version = Version(uid=uid, volume="big", created=time.time(), size=blockmap.size,
                      block_size=blockmap.block_size, state="valid")
    repo.db.add_version(version)
    repo.save_version(version, blockmap)
    repo.db.close()
    rebuilt = Repository(store, MetadataDB(str(tmp_path / f"{uid}-b.sqlite")))
    rebuilt.rebuild_db()
    return uid, rebuilt


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(mapstore, "PART_BYTES", 4000)
    return 4000


def test_a_small_map_stays_one_object(tmp_path: Path) -> None:
    store = FilesystemStore(str(tmp_path / "store"), fsync=False)
    bm = big_map(10)
    mapstore.put_map(store, "u1", bm.to_bytes())
    assert stored_keys(store, "u1") == {"versions/u1/blockmap"}
    assert codec.decode(store.get("versions/u1/blockmap")).endswith(bm.to_bytes())  # sealed, one object
    assert mapstore.get_map(store, "u1") == bm.to_bytes()


def test_a_map_is_sealed_to_its_version(tmp_path: Path, small_parts: int) -> None:
    """A flipped bit or another version's map (a whole object copied over) decoded and restored the
    wrong data after rebuild-db; a map of a store written before sealing is still read."""
    store = FilesystemStore(str(tmp_path / "store"), fsync=False)
    for uid, count in (("small", 10), ("large", 300)):  # one object; parts and their index
        data = big_map(count).to_bytes()
        mapstore.put_map(store, uid, data)
        obj = bytearray(codec.decode(store.get(f"versions/{uid}/blockmap")))
        obj[-1] ^= 4
        store.put(f"versions/{uid}/blockmap", codec.encode(bytes(obj)))
        with pytest.raises(CorruptObject, match="does not match its digest"):
            mapstore.get_map(store, uid)
    mapstore.put_map(store, "other", big_map(10, seed=1).to_bytes())
    store.put("versions/small/blockmap", store.get("versions/other/blockmap"))
    with pytest.raises(CorruptObject, match="holds the block map of version 'other'"):
        mapstore.get_map(store, "small")
    old = big_map(10).to_bytes()
    store.put("versions/old/blockmap", codec.encode(old))  # as an older backyfs wrote it
    assert mapstore.read_map(store, "old") == (old, False)


def test_a_large_map_goes_in_parts_and_back(tmp_path: Path, small_parts: int) -> None:
    store = FilesystemStore(str(tmp_path / "store"), fsync=False)
    data = big_map(300).to_bytes()  # 12 KiB: 4 parts of 4000 bytes
    mapstore.put_map(store, "u1", data)
    parts = -(-len(data) // small_parts)
    assert stored_keys(store, "u1") == {"versions/u1/blockmap"} | {f"versions/u1/blockmap.{n}"
                                                                   for n in range(1, parts + 1)}
    assert mapstore.get_map(store, "u1") == data

    # Saved again shorter (a resumed backup): the parts past the new end go.
    shorter = big_map(150, seed=1).to_bytes()
    mapstore.put_map(store, "u1", shorter)
    assert mapstore.get_map(store, "u1") == shorter
    assert len(stored_keys(store, "u1")) == 1 + -(-len(shorter) // small_parts)
    mapstore.put_map(store, "u1", big_map(5).to_bytes())  # small again: one object, no parts
    assert stored_keys(store, "u1") == {"versions/u1/blockmap"}

    mapstore.put_map(store, "u1", data)
    mapstore.delete_map(store, "u1")
    assert stored_keys(store, "u1") == set()


def test_a_damaged_or_missing_part_is_an_error(tmp_path: Path, small_parts: int) -> None:
    root = tmp_path / "store"
    store = FilesystemStore(str(root), fsync=False)
    data = big_map(300).to_bytes()
    mapstore.put_map(store, "u1", data)
    part = root / "versions/u1/blockmap.2"
    original = part.read_bytes()
    part.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(CorruptObject, match="blockmap.2"):
        mapstore.get_map(store, "u1")
    part.unlink()
    with pytest.raises(ObjectMissing):
        mapstore.get_map(store, "u1")
    # A map whose index never made it (a crash between parts and index): rm still finds its parts.
    part.write_bytes(original)
    (root / "versions/u1/blockmap").unlink()
    mapstore.delete_map(store, "u1")
    assert stored_keys(store, "u1") == set()


def test_rebuild_db_and_rm_of_a_version_with_a_map_in_parts(tmp_path: Path, small_parts: int) -> None:
    store = FilesystemStore(str(tmp_path / "store"), fsync=False)
    bm = big_map(300)
    uid, rebuilt = save_and_rebuild(tmp_path, store, bm)
    try:
        assert rebuilt.blockmap(rebuilt.resolve(uid)).to_bytes() == bm.to_bytes()
        rebuilt.delete_version(rebuilt.resolve(uid), force=True)
        assert stored_keys(store, uid) == set()
    finally:
        rebuilt.db.close()


@pytest.mark.ceph
def test_rados_store_takes_a_map_past_the_osd_write_limit(tmp_path: Path) -> None:
    """2.4 million blocks: a 96 MB map, past osd_max_write_size (90 MiB), which one write_full refused."""
    from backyfs.storage.rados import RadosStore

    env = ceph_env.cluster()
    store = RadosStore(env["BACKYFS_TEST_RADOS_POOL"], env["CEPH_CONF"], prefix=f"test-{uuid.uuid4().hex}")
    bm = big_map(2_400_000)
    assert len(bm.to_bytes()) > 90 << 20
    uid, rebuilt = save_and_rebuild(tmp_path, store, bm)
    try:
        assert rebuilt.blockmap(rebuilt.resolve(uid)).to_bytes() == bm.to_bytes()
        rebuilt.delete_version(rebuilt.resolve(uid), force=True)
        assert list(store.list()) == []
    finally:
        for key in list(store.list()):
            store.delete(key)
        rebuilt.db.close()
        store.close()
