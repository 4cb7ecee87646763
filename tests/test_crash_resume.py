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
