"""Garbage collection and retention, gc racing a running backup, and concurrent backups."""

from __future__ import annotations

import os
import time

import pytest

from backyfs.config import Config, open_repository
from backyfs.errors import SourceError, StateError
from backyfs.metadata.blockmap import BlockMap
from backyfs.metadata.db import Version
from backyfs.repository.gc import collect_garbage
from backyfs.repository.repo import block_digest, block_key
from backyfs.repository.restore import RestoreFailed, restore
from backyfs.repository.retention import Policy, versions_to_remove
from backyfs.repository.writer import BackupWriter
from backyfs.sources.file import FileSource, FileTarget

MiB = 1 << 20


def _repo(tmp_path):
    return open_repository(Config(data_dir=str(tmp_path / "data")))


def _image(path, blocks: list[bytes]) -> str:
    with open(path, "wb") as f:
        for b in blocks:
            f.write(b)
    return str(path)


def _backup(repo, path, volume="vol"):
    source = FileSource(path)
    try:
        return BackupWriter(repo, source, volume, parent=repo.latest_valid(volume)).run()
    finally:
        source.close()


def _interrupted_backup(repo, img, volume: str, at: int) -> None:
    """A backup of IMG whose read at offset AT fails: it stops with its version pending."""

    class Interrupted(FileSource):
        def pread(self, offset, length):
            if offset >= at:
                raise SourceError("interrupted")
            return super().pread(offset, length)

    source = Interrupted(str(img))
    try:
        with pytest.raises(SourceError):
            BackupWriter(repo, source, volume, threads=1).run()
    finally:
        source.close()


def test_gc_deletes_only_unreferenced_blocks_in_two_phases(tmp_path):
    repo = _repo(tmp_path)
    a, b, c = (os.urandom(4 * MiB) for _ in range(3))
    v1 = _backup(repo, _image(tmp_path / "img", [a, b]))
    v2 = _backup(repo, _image(tmp_path / "img", [a, c]))
    repo.delete_version(v1)
    first = collect_garbage(repo)
    assert (first.condemned, first.deleted) == (1, 0)  # b condemned, not yet deleted
    preview = collect_garbage(repo, dry_run=True)  # says what the next run does, and does nothing
    assert (preview.deleted, preview.deleted_bytes) == (1, repo.db.block_info([block_digest(b)])
                                                        [block_digest(b)][0])
    calls: list[tuple[int, int]] = []
    second = collect_garbage(repo, progress=lambda done, total: calls.append((done, total)))
    assert (second.deleted, second.deleted_bytes) == (preview.deleted, preview.deleted_bytes)
    assert calls == [(1, 1)]  # what gc's progress bar draws
    assert second.deleted == 1 and second.deleted_bytes > 4 * MiB
    assert not repo.store.exists(block_key(block_digest(b)))
    out = tmp_path / "out"
    restore(repo, v2, FileTarget(str(out), v2.size))
    assert out.read_bytes() == a + c


def test_gc_waits_for_a_backup_that_started_before_condemnation(tmp_path):
    repo = _repo(tmp_path)
    a = os.urandom(4 * MiB)
    v1 = _backup(repo, _image(tmp_path / "img", [a]))
    # A backup that is running: it started before gc condemns a, so it may count a as stored.
    running = Version(uid="0123456789ab", volume="other", created=time.time(), size=4 * MiB,
                      block_size=4 * MiB, heartbeat=time.time())
    repo.db.add_version(running)
    repo.delete_version(v1)
    assert collect_garbage(repo).condemned == 1
    waiting = collect_garbage(repo)
    assert (waiting.deleted, waiting.waiting) == (0, 1)
    assert repo.store.exists(block_key(next(iter(repo.db.all_digests()))))
    # The backup finishes with a block map that references a (it deduplicated against it):
    # gc revives the block instead of deleting it.
    repo.db.update_version(running.uid, state="valid", heartbeat=None)
    repo.db.put_blockmap(running.uid, BlockMap.from_mapping(4 * MiB, 4 * MiB, {0: block_digest(a)}))
    revived = collect_garbage(repo)
    assert revived.revived == 1 and revived.deleted == 0
    out = tmp_path / "out"
    restore(repo, repo.db.get_version(running.uid), FileTarget(str(out), 4 * MiB))
    assert out.read_bytes() == a


def test_condemned_block_is_written_again_by_a_new_backup(tmp_path):
    repo = _repo(tmp_path)
    a = os.urandom(4 * MiB)
    v1 = _backup(repo, _image(tmp_path / "img", [a]))
    repo.delete_version(v1)
    collect_garbage(repo)  # condemns a
    v2 = _backup(repo, _image(tmp_path / "img", [a]))
    assert v2.stats["bytes_new"] == 4 * MiB  # not deduplicated against a condemned block
    assert collect_garbage(repo).deleted == 0


def test_a_backup_counts_blocks_stored_or_condemned_after_it_started(tmp_path, monkeypatch):
    """A backup looks digests up in the index as it goes (it does not load the index whole): a
    block another backup recorded while it ran, and one a gc condemned after it started (gc keeps
    those while it runs), are both counted as stored, not written again; gc then revives the
    condemned one, which the new version references."""
    repo = _repo(tmp_path)
    a, b, c = (os.urandom(4 * MiB) for _ in range(3))
    repo.delete_version(_backup(repo, _image(tmp_path / "old", [a]), volume="old"))
    real_write = type(repo).write_block
    meanwhile: list[object] = []

    def write_then_others(self, digest, data):  # after this backup stored b, before it reads a, c
        size = real_write(self, digest, data)
        if not meanwhile:
            meanwhile.append(collect_garbage(repo))  # condemns a (deletes nothing: a backup runs)
            meanwhile.append(_backup(repo, _image(tmp_path / "other", [c]), volume="other"))
        return size

    monkeypatch.setattr(type(repo), "write_block", write_then_others)
    source = FileSource(_image(tmp_path / "img", [b, a, c]))
    try:
        version = BackupWriter(repo, source, "vol", threads=1).run()
    finally:
        source.close()
    assert meanwhile[0].condemned == 1 and meanwhile[0].deleted == 0
    assert version.stats["bytes_new"] == 4 * MiB and version.stats["bytes_dedup"] == 8 * MiB
    after = collect_garbage(repo)
    assert after.revived == 1 and after.deleted == 0
    out = tmp_path / "out"
    restore(repo, version, FileTarget(str(out), version.size))
    assert out.read_bytes() == b + a + c


def test_retention_keeps_last_daily_and_protected():
    noon = time.mktime((2026, 11, 1, 12, 0, 0, 0, 0, -1))
    created = [noon + day * 86400 for day in range(6)] + [noon + 5 * 86400 + 3600]
    versions = [Version(uid=f"{i:012x}", volume="v", created=t, size=1, block_size=1, state="valid")
                for i, t in enumerate(created)]
    versions[0].protected = True
    removed = {v.uid for v in versions_to_remove(versions, Policy(last=1, daily=3))}
    kept = sorted({v.uid for v in versions} - removed)
    # newest (day 6, 13:00) is also day 6's daily; then days 5 and 4; day 1 is protected
    assert kept == [versions[i].uid for i in (0, 3, 4, 6)]
    assert versions_to_remove(versions, Policy()) == []
    assert versions_to_remove(versions, Policy(last=10)) == []


def test_a_second_backup_of_the_same_volume_is_refused_while_one_runs(tmp_path):
    repo = _repo(tmp_path)
    path = _image(tmp_path / "img", [os.urandom(4 * MiB)])
    first = BackupWriter(repo, FileSource(path), "vol")
    with first._volume_lock():
        with pytest.raises(StateError, match="already running"):
            BackupWriter(repo, FileSource(path), "vol").run()
        BackupWriter(repo, FileSource(path), "other").run()  # other volumes are not blocked
    assert BackupWriter(repo, FileSource(path), "vol").run().state == "valid"


def test_gc_deletes_nothing_while_a_backup_runs(tmp_path, monkeypatch):
    """A backup that writes a condemned block again (for it, condemned means not stored) must find
    it there when it finishes: gc's delete phase waits until no backup runs, whatever the
    timestamps say. Here the backup starts after the condemnation, which the timestamps alone
    would have let gc delete under it."""
    import threading

    repo = _repo(tmp_path)
    a, b = os.urandom(4 * MiB), os.urandom(4 * MiB)
    v1 = _backup(repo, _image(tmp_path / "img1", [a, b]))
    repo.delete_version(v1)
    assert collect_garbage(repo).condemned == 2  # a and b condemned

    stored, finish = threading.Event(), threading.Event()
    real_write = type(repo).write_block

    def write_then_wait(self, digest, data):  # the backup has stored b again, then gc runs
        size = real_write(self, digest, data)
        stored.set()
        assert finish.wait(30)
        return size

    monkeypatch.setattr(type(repo), "write_block", write_then_wait)
    backup_repo = _repo(tmp_path)  # a second process's view of the same repository
    done: list[object] = []
    img2 = _image(tmp_path / "img2", [b])
    thread = threading.Thread(target=lambda: done.append(_backup(backup_repo, img2)))
    thread.start()
    assert stored.wait(30)
    during = collect_garbage(repo)
    assert during.deferred and during.deleted == 0
    assert repo.store.exists(block_key(block_digest(b)))
    finish.set()
    thread.join(30)
    v2 = done[0]
    after = collect_garbage(repo)
    assert not after.deferred and after.deleted == 1  # a only: b is referenced again
    assert repo.store.exists(block_key(block_digest(b)))
    out = tmp_path / "out"
    restore(repo, v2, FileTarget(str(out), v2.size))
    assert out.read_bytes() == b


def test_rm_with_a_dead_store_keeps_the_version(tmp_path, monkeypatch):
    """The store's copy of a version's metadata goes first: if it cannot, the version stays listed
    (and rm can be retried), instead of a database without it and a store that rebuild-db would
    bring it back from after gc deleted its blocks."""
    from backyfs.errors import StoreUnavailable

    repo = _repo(tmp_path)
    v1 = _backup(repo, _image(tmp_path / "img", [os.urandom(MiB)]))

    def dead(key):
        raise StoreUnavailable("cannot reach the store")

    monkeypatch.setattr(repo.store, "delete", dead)
    with pytest.raises(StoreUnavailable):
        repo.delete_version(v1)
    assert [v.uid for v in repo.db.versions()] == [v1.uid]


def test_an_overlay_commit_does_not_resume_an_interrupted_rbd_backup(tmp_path):
    """A pending version from an RBD backup (it has a snapshot) is resumed by the next RBD backup
    only; a run without a snapshot (file backup, overlay commit) starts its own version."""
    repo = _repo(tmp_path)
    path = _image(tmp_path / "img", [os.urandom(MiB)])
    v1 = _backup(repo, path)
    pending = Version(uid="0123456789ab", volume="vol", created=time.time(), size=v1.size,
                      block_size=v1.block_size, parent=v1.uid, snapshot="backyfs-interrupted")
    repo.db.add_version(pending)
    v2 = _backup(repo, path)
    assert v2.uid != pending.uid and v2.snapshot is None
    # And then that pending version is dead (no run resumes a version whose parent is not the
    # latest valid one any more): v2 removed it.
    assert [v.uid for v in repo.db.versions(volume="vol")] == [v1.uid, v2.uid]


def test_gc_deletes_nothing_in_a_store_shared_with_another_database(tmp_path):
    """Two hosts (two databases) sharing one store share blocks too: host A's gc must not delete a
    block only host B's versions still use. A knows B exists from B's version metadata in the store."""
    store = {"type": "fs", "path": str(tmp_path / "shared-store")}
    host_a = open_repository(Config(data_dir=str(tmp_path / "a"), store=store))
    host_b = open_repository(Config(data_dir=str(tmp_path / "b"), store=store))
    shared = os.urandom(MiB)
    va = _backup(host_a, _image(tmp_path / "img-a", [shared]))
    vb = _backup(host_b, _image(tmp_path / "img-b", [shared]))
    host_a.delete_version(va)
    for _ in range(2):
        result = collect_garbage(host_a)
        assert result.foreign == [vb.uid] and result.deleted == 0
        assert result.strays == 0  # B's blocks are not in A's index, and no strays of A's either
    out = tmp_path / "out"
    restore(host_b, vb, FileTarget(str(out), vb.size))
    assert out.read_bytes() == shared


def test_a_block_found_damaged_during_a_backup_is_stored_again(tmp_path, monkeypatch):
    """A differential takes unchanged blocks from its parent's map without reading them. If a
    deep-scrub finds one of those corrupt while the backup runs, the new version must not become
    valid on the damaged object: the backup reads the block again and stores it anew."""
    from backyfs.repository.extents import Extent
    from backyfs.repository.scrub import scrub

    repo = _repo(tmp_path)
    a, b, c = (os.urandom(4 * MiB) for _ in range(3))
    v1 = _backup(repo, _image(tmp_path / "img", [a, b, c]))
    path = _image(tmp_path / "img", [a, b, os.urandom(4 * MiB)])  # block 2 changed
    obj = tmp_path / "data" / "store" / block_key(block_digest(a))
    real_process = BackupWriter._process

    def scrub_finds_a_corrupt_while_we_run(self, plan):
        raw = bytearray(obj.read_bytes())
        raw[-1] ^= 0xFF
        obj.write_bytes(bytes(raw))
        assert scrub(repo, [v1], deep=True).invalidated == [v1.uid]
        return real_process(self, plan)

    monkeypatch.setattr(BackupWriter, "_process", scrub_finds_a_corrupt_while_we_run)
    source = FileSource(path)
    v2 = BackupWriter(repo, source, "vol", parent=v1, hints=[Extent(8 * MiB, 4 * MiB)],
                      sample_percent=0).run()
    source.close()
    assert v2.state == "valid"
    assert scrub(repo, [v1, v2], deep=True).bad == {}  # a's object was stored anew: both are fine
    out = tmp_path / "out"
    restore(repo, v2, FileTarget(str(out), v2.size))
    assert out.read_bytes() == (tmp_path / "img").read_bytes()


def test_a_hex_volume_name_is_the_volume_not_a_uid_prefix(tmp_path):
    """`backyfs restore cafe` (or an NBD export named cafe) means volume cafe, even when another
    volume has a version whose uid starts with cafe."""
    repo = _repo(tmp_path)
    mine = _backup(repo, _image(tmp_path / "img", [os.urandom(MiB)]), volume="cafe")
    other = Version(uid="cafe00000001", volume="secret", created=time.time(), size=MiB,
                    block_size=mine.block_size, state="valid")
    repo.db.add_version(other)
    assert repo.resolve("cafe").uid == mine.uid
    assert repo.resolve("cafe0000").uid == other.uid  # a prefix that is no volume's name
    assert repo.resolve("cafe00000001").uid == other.uid


def test_a_sparse_restore_counts_its_holes_and_ends_its_progress(tmp_path):
    """Into a new (zeroed) file only stored blocks are visited: the holes must still count as zero
    bytes, and the progress must end at the full size (it stopped at the stored bytes)."""
    repo = _repo(tmp_path)
    data = os.urandom(4 * MiB)
    version = _backup(repo, _image(tmp_path / "img", [bytes(4 * MiB), data, bytes(4 * MiB)]))
    calls: list[tuple[int, int]] = []
    out = tmp_path / "out"
    result = restore(repo, version, FileTarget(str(out), version.size),
                     progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (version.size, version.size)
    assert result.bytes_zero == 8 * MiB and result.bytes_written == 4 * MiB
    assert out.read_bytes() == bytes(4 * MiB) + data + bytes(4 * MiB)


class _OverwrittenTarget:
    """A target that does not read as zeros (an RBD image or a device restored with --force)."""
    zeroed = False

    def __init__(self, size: int) -> None:
        self.image = bytearray(os.urandom(size))

    def pwrite(self, offset: int, data: bytes) -> None:
        self.image[offset:offset + len(data)] = data

    def write_zeroes(self, offset: int, length: int) -> None:
        self.image[offset:offset + length] = bytes(length)

    def finish(self) -> None:
        pass

    def abandon(self) -> str:
        return ""


def test_a_restore_over_old_content_counts_zero_blocks_as_zeros_not_data(tmp_path):
    """Onto a target with old content zero blocks are written as zeros: they are zero bytes in the
    summary, not data (an RBD restore with --force reported the whole size as data)."""
    repo = _repo(tmp_path)
    data = os.urandom(4 * MiB)
    version = _backup(repo, _image(tmp_path / "img", [bytes(4 * MiB), data, bytes(4 * MiB)]))
    target = _OverwrittenTarget(version.size)
    result = restore(repo, version, target)
    assert result.bytes_zero == 8 * MiB and result.bytes_written == 4 * MiB
    assert bytes(target.image) == bytes(4 * MiB) + data + bytes(4 * MiB)


def test_gc_and_deep_scrub_refuse_a_damaged_database(repo_env, tmp_path):
    """A damaged index can hide versions and so the blocks they reference: gc ran on such a
    database (exit 0) and deep-scrub called it clean."""
    import sqlite3

    from conftest import write_image

    for name in ("a", "b", "c"):
        repo_env.backup(write_image(tmp_path / f"{name}.img", ["rand"]), name)
    objects = sorted((repo_env.store_dir / "blocks").rglob("*"))
    conn = sqlite3.connect(repo_env.db_path)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'versions_by_volume'").fetchone()[0]
    conn.close()
    with open(repo_env.db_path, "r+b") as f:  # scramble the cells at the end of the index's page
        f.seek(root * page_size - 1000)
        cells = f.read(1000)
        f.seek(root * page_size - 1000)
        f.write(bytes(b ^ 0x5A for b in cells))
    for _ in range(2):  # gc deletes on its second run
        res = repo_env.run("gc")
        assert res.rc == 1 and "is damaged" in res.err and "rebuild-db" in res.err, res.err
    assert sorted((repo_env.store_dir / "blocks").rglob("*")) == objects
    # Looking a version up through the damaged index fails, naming the way out (rebuild-db).
    failed = [res.err for res in (repo_env.run("show", name) for name in "abc") if res.rc != 0]
    assert failed and all("rebuild-db" in err and err.count("\n") == 1 for err in failed), failed
    res = repo_env.run("deep-scrub", "--all")
    assert res.rc == 3 and "metadata database" in res.err and "is damaged" in res.err


def test_a_block_map_too_large_for_the_database_is_refused_before_reading(tmp_path, monkeypatch):
    """SQLite stores at most 1 GB in one value (a map of 25M blocks): a volume that may need more is
    refused with a sentence before anything is read, stored or recorded."""
    from backyfs.errors import BackyfsError
    from backyfs.metadata.blockmap import BlockMap

    repo = _repo(tmp_path)
    path = _image(tmp_path / "img", [os.urandom(4 * MiB) for _ in range(4)])
    monkeypatch.setattr(type(repo.db), "max_value_bytes", lambda self: BlockMap.bytes_for(3))
    with pytest.raises(BackyfsError, match="larger block_size"):
        _backup(repo, path)
    assert repo.db.versions() == [] and list(repo.store.list("blocks/")) == []
    monkeypatch.setattr(type(repo.db), "max_value_bytes", lambda self: BlockMap.bytes_for(4))
    assert _backup(repo, path).state == "valid"


def test_an_older_database_gains_the_parent_index_and_prunes_fast(tmp_path):
    """Databases made before 2026-12-06 have no index on versions.parent: each removal scanned
    the table. Opening one adds it, and leaves the schema version as it was (an older backyfs still
    opens the database); removing a version still clears its children's parent."""
    import sqlite3

    from backyfs.metadata.db import MetadataDB
    from backyfs.metadata.schema import SCHEMA_VERSION

    repo = _repo(tmp_path)
    path = _image(tmp_path / "img", [os.urandom(4 * MiB)])
    first = _backup(repo, path)
    child = _backup(repo, path)
    db_path = repo.db.path
    repo.close()
    conn = sqlite3.connect(db_path)
    conn.execute("DROP INDEX versions_by_parent")
    conn.commit()
    conn.close()
    db = MetadataDB(db_path)
    plan = " ".join(r[3] for r in db.conn.execute(
        "EXPLAIN QUERY PLAN UPDATE versions SET parent = NULL WHERE parent = ?", (first.uid,)))
    assert "versions_by_parent" in plan, plan
    assert db.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 1
    db.delete_version(first.uid)
    assert db.get_version(child.uid).parent is None
    db.close()


def test_a_restore_over_old_content_zeroes_runs_of_holes_in_few_calls(tmp_path, monkeypatch):
    """Holes are zeroed a run at a time (at most HOLE_RUN_BLOCKS per call), not block by block:
    a 64 TiB device took 16M calls. The content and the summary stay exact."""
    import backyfs.repository.restore as restore_module

    monkeypatch.setattr(restore_module, "HOLE_RUN_BLOCKS", 3)
    repo = _repo(tmp_path)
    data = os.urandom(4 * MiB)
    blocks = [bytes(4 * MiB)] * 7 + [data] + [bytes(4 * MiB)] * 2
    version = _backup(repo, _image(tmp_path / "img", blocks))
    target = _OverwrittenTarget(version.size)
    calls = []
    zero = target.write_zeroes
    monkeypatch.setattr(target, "write_zeroes", lambda offset, length: (calls.append(length),
                                                                      zero(offset, length))[1])
    result = restore(repo, version, target)
    assert bytes(target.image) == b"".join(blocks)
    assert sorted(calls) == sorted([3 * 4 * MiB, 3 * 4 * MiB, 4 * MiB, 2 * 4 * MiB])  # runs: 3+3+1, 2
    assert result.bytes_zero == 9 * 4 * MiB and result.bytes_written == 4 * MiB


def test_a_resumed_backup_does_not_count_a_block_a_killed_gc_deleted(tmp_path, monkeypatch):
    """gc deletes objects, then their rows: one killed in between leaves rows 'condemned' for
    objects that are gone. A backup resuming an old pending version counted such a block as stored
    (condemned after the version's creation) and became valid without it."""
    repo = _repo(tmp_path)
    x = os.urandom(4 * MiB)
    path = _image(tmp_path / "img", [x])
    old = time.time() - 3600
    pending = Version(uid="0123456789ab", volume="vol", created=old, size=4 * MiB, block_size=4 * MiB,
                      heartbeat=old)  # a backup killed an hour ago: not live for gc
    repo.db.add_version(pending)
    repo.delete_version(_backup(repo, path, volume="other"))
    assert collect_garbage(repo).condemned == 1  # x, stamped after the pending version's creation
    monkeypatch.setattr(type(repo.db), "delete_blocks", lambda self, digests: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # killed after deleting the object, before its row
        collect_garbage(repo)
    monkeypatch.undo()
    assert not repo.store.exists(block_key(block_digest(x)))
    version = _backup(repo, path)
    assert version.uid == pending.uid and version.stats["bytes_new"] == 4 * MiB  # stored again
    out = tmp_path / "out"
    restore(repo, version, FileTarget(str(out), version.size))
    assert out.read_bytes() == x


def test_gc_deletes_blocks_a_killed_backup_stored_but_never_recorded(tmp_path):
    """A backup records what it stored at checkpoints: killed outright before one, it leaves objects
    no index row names. gc finds them in the store and deletes them in its two phases; one that a
    later backup needs again is written again and kept."""
    repo = _repo(tmp_path)
    a, lost, needed = (os.urandom(4 * MiB) for _ in range(3))
    v1 = _backup(repo, _image(tmp_path / "img1", [a]))
    for data in (lost, needed):  # what the killed backup stored, never recorded
        repo.write_block(block_digest(data), data)
    first = collect_garbage(repo)
    assert (first.strays, first.condemned, first.deleted) == (2, 0, 0)
    assert repo.store.exists(block_key(block_digest(lost)))
    v2 = _backup(repo, _image(tmp_path / "img2", [needed]))  # condemned: stored again, "ok" again
    second = collect_garbage(repo)
    assert (second.strays, second.deleted) == (0, 1)
    assert not repo.store.exists(block_key(block_digest(lost)))
    for version, content in ((v1, a), (v2, needed)):
        out = tmp_path / f"out-{version.uid}"
        restore(repo, version, FileTarget(str(out), version.size))
        assert out.read_bytes() == content


def test_gc_keeps_what_a_running_backup_stored_before_recording_it(tmp_path, monkeypatch):
    """A running backup's stored but not yet recorded block looks like a stray to gc: condemned, it
    must survive until the backup records it (its row turns 'ok') and references it."""
    import threading

    repo = _repo(tmp_path)
    new = os.urandom(4 * MiB)
    stored, finish = threading.Event(), threading.Event()
    real_write = type(repo).write_block

    def write_then_wait(self, digest, data):
        size = real_write(self, digest, data)
        stored.set()
        assert finish.wait(30)
        return size

    monkeypatch.setattr(type(repo), "write_block", write_then_wait)
    backup_repo = _repo(tmp_path)
    done: list[object] = []
    img = _image(tmp_path / "img", [new])
    thread = threading.Thread(target=lambda: done.append(_backup(backup_repo, img)))
    thread.start()
    try:
        assert stored.wait(30)
        during = collect_garbage(repo)
        assert during.strays == 1 and during.deferred and during.deleted == 0
    finally:
        finish.set()
        thread.join(30)
    for _ in range(2):
        after = collect_garbage(repo)
        assert after.deleted == 0 and after.strays == 0
    assert repo.store.exists(block_key(block_digest(new)))
    out = tmp_path / "out"
    restore(repo, done[0], FileTarget(str(out), done[0].size))
    assert out.read_bytes() == new


def test_the_error_that_stopped_a_backup_is_the_one_reported(tmp_path, monkeypatch):
    """On a full disk the store fails first, then recording what was stored fails too (the database
    shares the disk): the backup must report the store's error, not the database's."""
    import sqlite3

    from backyfs.errors import StoreUnavailable

    repo = _repo(tmp_path)
    writes = []

    def full_after_one(self, digest, data):
        if writes:
            raise StoreUnavailable("store is full")
        writes.append(digest)
        return real_write(self, digest, data)

    def db_full(self, blocks):
        raise sqlite3.OperationalError("database or disk is full")

    real_write = type(repo).write_block
    monkeypatch.setattr(type(repo), "write_block", full_after_one)
    monkeypatch.setattr(type(repo.db), "add_blocks", db_full)
    with pytest.raises(StoreUnavailable, match="store is full"):
        _backup(repo, _image(tmp_path / "img", [os.urandom(4 * MiB) for _ in range(4)]))


def test_another_hosts_interrupted_first_backup_keeps_its_blocks(tmp_path):
    """Host B's first backup is stopped after a checkpoint; host A's gc, sharing the store, saw B's
    blocks as strays and deleted them two runs later, and B's resumed backup turned valid without
    them (found by a review). A pending version is in the store from its start now: foreign to A."""
    store = {"type": "fs", "path": str(tmp_path / "shared-store")}
    host_a = open_repository(Config(data_dir=str(tmp_path / "a"), store=store))
    host_b = open_repository(Config(data_dir=str(tmp_path / "b"), store=store))
    (tmp_path / "a.img").write_bytes(os.urandom(4 * MiB))
    src = FileSource(str(tmp_path / "a.img"))
    BackupWriter(host_a, src, "vm-a").run()
    src.close()

    img = tmp_path / "b.img"
    img.write_bytes(os.urandom(16 * MiB))

    _interrupted_backup(host_b, img, "vm-b", at=2 * 4 * MiB)  # as on a start timeout

    for _day in range(2):
        result = collect_garbage(host_a)
        assert result.deleted == 0 and result.strays == 0 and len(result.foreign) == 1

    src = FileSource(str(img))
    vb = BackupWriter(host_b, src, "vm-b").run()  # resumes its pending version
    src.close()
    out = tmp_path / "out-b"
    try:
        restore(host_b, vb, FileTarget(str(out), vb.size))
    except RestoreFailed as exc:
        pytest.fail(f"host B's valid version lost blocks to host A's gc: {exc.result.errors[:2]}")
    assert out.read_bytes() == img.read_bytes()


def test_rebuild_db_brings_back_a_pending_version_to_resume(tmp_path):
    """A pending version is in the store now: rebuild-db brings it back pending (no map), and the
    next backup resumes it."""
    repo = _repo(tmp_path)
    img = tmp_path / "img"
    img.write_bytes(os.urandom(12 * MiB))

    _interrupted_backup(repo, img, "vol", at=4 * MiB)
    pending = repo.db.versions(state="pending")[0]
    repo.db.close()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / "data" / f"backyfs.sqlite{suffix}").unlink(missing_ok=True)
    repo = _repo(tmp_path)
    result = repo.rebuild_db()
    assert result["damaged"] == [] and [v.uid for v in repo.db.versions(state="pending")] == [pending.uid]
    version = _backup(repo, str(img))
    assert version.uid == pending.uid and version.state == "valid"
    out = tmp_path / "out"
    restore(repo, version, FileTarget(str(out), version.size))
    assert out.read_bytes() == img.read_bytes()
