"""kill -9 in the middle of a backup: nothing valid is left behind, and a re-run resumes the same version."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

from conftest import RepoEnv, block_files, files_equal, write_image

BS = 256 * 1024  # small blocks: the writer checkpoints while it still submits blocks
BLOCKS = 192
WRITE_LIMIT_MB_S = 4  # 48 MiB at 4 MB/s: about 12 s, and the first checkpoint comes after 5 s


def recorded_blocks(db: Path) -> int:
    """Objects the running backup has made durable and recorded (its checkpoints)."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return conn.execute("SELECT count(*) FROM blocks").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def test_kill_9_mid_backup_then_resume(repo_env: RepoEnv, tmp_path: Path) -> None:
    repo_env.use_config('block_size = "256KiB"\n')
    img = write_image(tmp_path / "img", ["rand"] * BLOCKS, block_size=BS, tail=777)
    proc = repo_env.popen("backup", img, "vm", "--write-limit", WRITE_LIMIT_MB_S)
    try:
        deadline = time.monotonic() + 30
        while recorded_blocks(repo_env.db_path) == 0 and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 30 s"
            time.sleep(0.1)
        assert proc.poll() is None, "the backup finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    recorded = recorded_blocks(repo_env.db_path)
    assert 0 < recorded < BLOCKS
    assert recorded <= len(block_files(repo_env.store_dir)) < BLOCKS

    versions = repo_env.versions()
    assert len(versions) == 1
    assert versions[0]["state"] == "pending"
    pending = versions[0]["uid"]
    # A pending version is not something to restore, and the volume has no valid version.
    res = repo_env.call("restore", pending, tmp_path / "nope")
    assert res.rc == 1 and "pending" in res.err
    assert repo_env.call("restore", "vm", tmp_path / "nope").rc == 1

    res = repo_env.run("backup", img, "vm", "--json")
    assert res.rc == 0, res.err
    assert f"resumed the pending version {pending}" in res.err
    st = res.json()
    assert st["uid"] == pending
    # What the killed run recorded is not stored again.
    assert st["bytes_dedup"] >= recorded * BS
    assert st["bytes_new"] <= BLOCKS * BS + 777 - recorded * BS

    versions = repo_env.versions()
    assert [(v["uid"], v["state"]) for v in versions] == [(pending, "valid")]
    assert repo_env.stats()["objects"] == BLOCKS + 1
    out = tmp_path / "restored"
    repo_env.ok("restore", pending, out)
    assert files_equal(img, out)
    assert repo_env.call("deep-scrub", pending).rc == 0


# --- crash points found by killing commands after each of their steps --------------------------
class Killed(BaseException):
    """Stands for SIGKILL at a chosen step: nothing after it runs, no cleanup either."""


def _repo():
    from backyfs.config import load_config, open_repository

    return open_repository(load_config(None))


def _lose_the_database(repo_env: RepoEnv) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{repo_env.db_path}{suffix}").unlink(missing_ok=True)


def test_killed_as_the_version_turns_valid_the_store_is_never_behind(repo_env: RepoEnv,
                                                                     tmp_path: Path) -> None:
    """The store's copy of a version's state is written before the database's: a backup killed
    in between once left the store saying "pending" for ever (the re-run made a new version), so
    a database rebuilt from the store had a complete version that nothing would restore."""
    from backyfs.repository.writer import BackupWriter
    from backyfs.sources.file import FileSource

    img = write_image(tmp_path / "img", ["rand", "text", "hole"])
    repo = _repo()
    real_update = repo.db.update_version

    def update(uid: str, **fields: object) -> None:
        if fields.get("state") == "valid":
            raise Killed
        real_update(uid, **fields)

    repo.db.update_version = update  # type: ignore[method-assign]
    source = FileSource(str(img))
    try:
        BackupWriter(repo, source, "vm").run()
    except Killed:
        pass
    source.close()
    repo.close()
    _lose_the_database(repo_env)
    repo_env.ok("rebuild-db")
    [version] = repo_env.versions()
    assert version["state"] == "valid"
    repo_env.ok("restore", version["uid"], tmp_path / "out.img")
    assert files_equal(img, tmp_path / "out.img")


def test_a_commit_run_again_after_a_kill_before_its_discard_makes_no_duplicate(repo_env: RepoEnv,
                                                                             tmp_path: Path) -> None:
    from backyfs.config import load_config
    from backyfs.export import service as service_mod
    from backyfs.export.service import ExportService, commit_overlay

    img = write_image(tmp_path / "img", ["rand", "text"])
    uid = repo_env.backup(img, "vm")["uid"]
    service = ExportService(load_config(None))
    try:
        device = service.open(uid, writable=True)
        device.pwrite(b"new data", 100)
        device.close()
        real_discard = service_mod.discard_overlay
        service_mod.discard_overlay = lambda *a: (_ for _ in ()).throw(Killed)  # type: ignore[assignment]
        try:
            try:
                commit_overlay(service, uid)
            except Killed:
                pass
        finally:
            service_mod.discard_overlay = real_discard
        first = [v for v in service.repo.db.versions(volume="vm") if v.parent == uid]
        again = commit_overlay(service, uid)  # what the user does next
        assert [v.uid for v in service.repo.db.versions(volume="vm") if v.parent == uid] == [again.uid]
        assert [v.uid for v in first] == [again.uid]
        assert json_overlays(repo_env) == []
    finally:
        service.close()


def json_overlays(repo_env: RepoEnv) -> list:
    return repo_env.ok("overlay", "ls", "--json").json()  # type: ignore[return-value]


def test_an_rm_killed_after_the_metadata_leaves_nothing_gc_cannot_clear(repo_env: RepoEnv,
                                                                        tmp_path: Path) -> None:
    """rm deletes the store's metadata, then the block map. Killed in between and the database
    lost: rebuild-db left the map out as damaged (exit 3), and gc took it for another host's
    version and deleted nothing for ever. The map is now known for what it is, and gc clears it."""
    img = write_image(tmp_path / "img", ["rand", "text"])
    gone = repo_env.backup(img, "vm")["uid"]
    img2 = write_image(tmp_path / "img2", ["rand", "rand"])
    kept = repo_env.backup(img2, "vm2")["uid"]
    (repo_env.store_dir / "versions" / gone / "meta.json").unlink()  # rm killed right after this
    _lose_the_database(repo_env)
    res = repo_env.ok("rebuild-db")
    assert "1 versions" in res.out
    assert [v["uid"] for v in repo_env.versions()] == [kept]
    first = repo_env.ok("gc", "--json").json()
    assert not first["foreign"] and not first["deferred"]  # type: ignore[index]
    assert not list((repo_env.store_dir / "versions").glob(f"{gone}/*"))
    repo_env.ok("gc")
    repo_env.ok("restore", kept, tmp_path / "out.img")
    assert files_equal(img2, tmp_path / "out.img")


def test_gc_sweeps_old_temporary_files_of_killed_puts(repo_env: RepoEnv, tmp_path: Path) -> None:
    import os

    img = write_image(tmp_path / "img", ["rand"])
    repo_env.backup(img, "vm")
    block_dir = next((repo_env.store_dir / "blocks").iterdir())
    old, young = block_dir / "ab.tmp.123.7f", block_dir / "cd.tmp.456.7f"
    for path in (old, young):
        path.write_bytes(b"x" * 4096)
    os.utime(old, (time.time() - 7 * 3600,) * 2)  # older than any put takes
    repo_env.ok("gc")
    assert not old.exists() and young.exists()  # a young one may be a put in flight
