"""Races between commands on one repository, made deterministic: the first command is paused (in
process, by wrapping one of its steps) at the moment that matters while a second one runs as a
real process beside it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import RepoEnv, write_image

from backyfs.repository import mapstore


def _rm_pausing_after_the_store_copy(repo_env: RepoEnv, monkeypatch: pytest.MonkeyPatch, uid: str,
                                     *second: str):
    """rm UID in process; between deleting the version's copy in the store and its row, start
    `backyfs SECOND...` and give it a second to do its worst. Returns that process's result."""
    started = []
    real = mapstore.delete_map

    def delete_map(store, map_uid):
        real(store, map_uid)
        started.append(repo_env.popen(*second))
        time.sleep(1.0)

    monkeypatch.setattr(mapstore, "delete_map", delete_map)
    repo_env.ok("rm", uid)
    monkeypatch.undo()
    proc = started[0]
    out, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.mark.parametrize("second", [("label", "{uid}", "a=b"), ("protect", "{uid}")],
                         ids=["label", "protect"])
def test_a_metadata_change_during_rm_waits_and_finds_the_version_gone(
        repo_env: RepoEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, second) -> None:
    """A label written in rm's gap put the version's copy back in the store: gc then took it for
    another host's and deleted nothing ever after. A protect in the gap made rm fail half-way: a
    protected version without its copy in the store, which rebuild-db would lose."""
    img = write_image(tmp_path / "img", ["rand"])
    keep = repo_env.backup(img, "keep")["uid"]
    uid = repo_env.backup(write_image(tmp_path / "img2", ["rand"]), "gone")["uid"]
    with monkeypatch.context() as patch:
        rc, err = _rm_pausing_after_the_store_copy(repo_env, patch, uid, *(a.format(uid=uid) for a in second))
    assert rc == 1 and "unknown version" in err, err
    assert not (repo_env.store_dir / "versions" / uid / "meta.json").exists()
    assert [v["uid"] for v in repo_env.versions()] == [keep]
    res = repo_env.run("gc")
    assert res.rc == 0 and "does not know" not in res.err, res.err


def test_rebuild_db_waits_for_running_backups(repo_env: RepoEnv, tmp_path: Path) -> None:
    """A backup running while rebuild-db filled a new database wrote its version into the old one
    (moved aside): the rebuilt database lacked it, and gc then deferred for ever."""
    repo_env.backup(write_image(tmp_path / "a.img", ["rand"]), "a")
    repo_env.use_config("[limits]\nread_mb_s = 8\n")  # 32 MiB: ~4 s
    slow = repo_env.popen("backup", write_image(tmp_path / "b.img", ["rand"] * 8), "b")
    deadline = time.monotonic() + 30
    while not any(v["state"] == "pending" for v in repo_env.versions()) and time.monotonic() < deadline:
        time.sleep(0.05)
    repo_env.db_path.rename(tmp_path / "aside.sqlite")
    res = repo_env.run("rebuild-db")
    assert res.rc == 1 and "a backup of volume b is running" in res.err, res.err
    assert not repo_env.db_path.exists()  # refused: no new empty database left behind
    slow.communicate(timeout=60)  # (its database was moved away under it: it may well fail)
    repo_env.db_path.unlink(missing_ok=True)
    repo_env.ok("rebuild-db")  # with no backup running
    assert "a" in {v["volume"] for v in repo_env.versions()}


def test_a_backup_does_not_resume_a_killed_commit(repo_env: RepoEnv, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit killed while storing left a pending version labelled committed-from; the nightly
    backup of the unchanged image resumed it (label and all), and the commit run again took that
    for its own work: it discarded the overlay and named a version without its writes."""
    from backyfs.config import load_config
    from backyfs.export.service import ExportService, commit_overlay
    from backyfs.repository.writer import BackupWriter

    img = write_image(tmp_path / "img", ["rand"] * 2)
    uid = repo_env.backup(img, "vm")["uid"]
    service = ExportService(load_config())
    device = service.open(uid, writable=True)
    device.pwrite(b"x" * 65536, 0)
    device.close()

    def killed(self, plan):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(BackupWriter, "_process", killed)
        with pytest.raises(KeyboardInterrupt):
            commit_overlay(service, uid)
    service.close()
    nightly = repo_env.backup(img, "vm")
    assert "committed-from" not in repo_env.ok("show", nightly["uid"], "--json").json()["labels"]
    res = repo_env.ok("overlay", "commit", uid)
    made = res.out.split()[0]
    repo_env.ok("restore", made, tmp_path / "out")
    assert (tmp_path / "out").read_bytes()[:65536] == b"x" * 65536


def test_prune_keeps_versions_with_overlays(repo_env: RepoEnv, tmp_path: Path) -> None:
    """rm refuses a version with overlays; prune (and a job's keep) removed it, orphaning the
    writes, and two gc runs later a writable export of it read EIO."""
    from backyfs.config import load_config
    from backyfs.export.service import ExportService

    img = write_image(tmp_path / "img", ["rand"])
    old = repo_env.backup(img, "vm")["uid"]
    newer = [repo_env.backup(img, "vm", "--full")["uid"] for _ in range(2)]
    service = ExportService(load_config())
    device = service.open(old, writable=True)
    device.pwrite(b"x" * 512, 0)
    device.close()
    service.close()
    res = repo_env.ok("prune", "--keep-last", "1")
    assert f"kept {old} of vm: it has overlays" in res.err
    assert f"removed {newer[0]} of vm" in res.out
    assert [v["uid"] for v in repo_env.versions()] == [old, newer[1]]


def test_a_parent_removed_as_the_backup_starts_is_a_clear_error(repo_env: RepoEnv, tmp_path: Path) -> None:
    """The parent chosen, then removed (rm, prune) before the new version's row: it failed with
    "metadata database: FOREIGN KEY constraint failed"."""
    from backyfs.config import load_config, open_repository
    from backyfs.errors import NotFound
    from backyfs.repository.writer import BackupWriter
    from backyfs.sources.file import FileSource

    img = write_image(tmp_path / "img", ["rand"])
    repo_env.backup(img, "vm")
    repo = open_repository(load_config())
    parent = repo.resolve("vm")
    repo.delete_version(parent)
    source = FileSource(str(img))
    with pytest.raises(NotFound, match=f"parent version {parent.uid} was removed meanwhile"):
        BackupWriter(repo, source, "vm", parent=parent).run()
    source.close()
    repo.close()


def test_deep_scrub_of_a_version_removed_meanwhile(repo_env: RepoEnv, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A version removed (and its blocks gc'd) while deep-scrub checked it: scrub failed with
    "unknown version" before recording the others, or reported the gc'd blocks as missing."""
    import backyfs.repository.scrub as scrub

    keep = repo_env.backup(write_image(tmp_path / "a.img", ["rand"]), "a")["uid"]
    gone = repo_env.backup(write_image(tmp_path / "b.img", ["rand", "text"]), "b")["uid"]
    real, done = scrub._check_one, []

    def check_one(repo, digest, size, deep):
        if not done:  # the first object: meanwhile another admin removes b and collects garbage
            done.append(True)
            for args in (("rm", gone), ("gc",), ("gc",)):
                assert repo_env.run(*args).rc == 0
        return real(repo, digest, size, deep)

    monkeypatch.setattr(scrub, "_check_one", check_one)
    res = repo_env.call("deep-scrub", "--all")
    assert res.rc == 0, res.err
    assert [v["uid"] for v in repo_env.versions()] == [keep]


def test_a_valid_backup_removes_the_volumes_dead_pending_versions(repo_env: RepoEnv, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A killed backup that later runs can no longer resume (its parent is not the latest any more)
    stayed pending for ever."""
    from backyfs.repository.writer import BackupWriter

    img = write_image(tmp_path / "img", ["rand"] * 2)
    repo_env.backup(img, "vm")
    repo_env.backup(write_image(tmp_path / "other", ["rand"]), "other")

    def killed(self, plan):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(BackupWriter, "_process", killed)
        assert repo_env.call("backup", img, "vm", "--full").rc == 130
        assert repo_env.call("backup", tmp_path / "other", "other", "--full").rc == 130
    states = [(v["volume"], v["state"]) for v in repo_env.versions()]
    assert states.count(("vm", "pending")) == 1
    repo_env.backup(img, "vm")  # not --full: it cannot resume the --full run's version
    states = [(v["volume"], v["state"]) for v in repo_env.versions()]
    assert ("vm", "pending") not in states and ("other", "pending") in states  # only its own volume


def test_a_writable_export_made_while_prune_runs_orphans_nothing(repo_env: RepoEnv, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """prune checked for overlays once, then removed versions: a VM connecting meanwhile made an
    overlay on a version prune then removed (and after gc its reads failed)."""
    import subprocess
    import sys

    import backyfs.export.overlay as overlay_module

    img = write_image(tmp_path / "img", ["rand"])
    old = repo_env.backup(img, "vm")["uid"]
    repo_env.backup(img, "vm", "--full")
    opener = ("import sys; from backyfs.config import load_config; from backyfs.export.service import "
              "ExportService; s = ExportService(load_config()); d = s.open(sys.argv[1], writable=True); "
              "d.pwrite(b'x', 0); d.close(); s.close()")
    real, started = overlay_module.overlay_names, []

    def overlay_names(root, version_uid):
        listing = real(root, version_uid)
        if not started:  # a client connects right after prune looked
            started.append(subprocess.Popen([sys.executable, "-c", opener, old], env=repo_env.env,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            time.sleep(1.0)
        return listing

    with monkeypatch.context() as patch:
        patch.setattr(overlay_module, "overlay_names", overlay_names)
        repo_env.ok("prune", "--keep-last", "1")
    _, err = started[0].communicate(timeout=60)
    remaining = [v["uid"] for v in repo_env.versions()]
    overlays = repo_env.ok("overlay", "ls").out
    if old in remaining:
        assert started[0].returncode == 0
    else:  # the export waited for the prune and found its version gone: no orphaned overlay
        assert started[0].returncode != 0 and "unknown version" in err, err
        assert old not in overlays


def test_rebuild_db_waits_for_a_backup_still_taking_its_snapshot(repo_env: RepoEnv, tmp_path: Path) -> None:
    """A backup holds only its volume's lock while it snapshots (and runs its hooks); rebuild-db
    missed it, and a refused rebuild-db left an empty database that looked like the repository."""
    from backyfs.repository.locks import lock_volume

    repo_env.backup(write_image(tmp_path / "a.img", ["rand"]), "vm")
    held = lock_volume(str(repo_env.db_path), "vm")
    try:
        repo_env.db_path.rename(tmp_path / "aside.sqlite")
        res = repo_env.run("rebuild-db")
        assert res.rc == 1 and "a backup of volume vm is running" in res.err, res.err
        assert not repo_env.db_path.exists()
    finally:
        held.close()
    repo_env.ok("rebuild-db")
    assert [v["volume"] for v in repo_env.versions()] == ["vm"]


def test_a_hung_holder_of_the_versions_lock_is_named_not_waited_for_ever(
        repo_env: RepoEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl
    import os

    import backyfs.repository.repo as repo_module

    uid = repo_env.backup(write_image(tmp_path / "img", ["rand"]), "vm")["uid"]
    lock = repo_env.data_dir / "locks" / ".versions.lock"
    held = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)  # a process stopped while it held it (kill -STOP)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(repo_module, "VERSIONS_LOCK_WAIT", 0.5)
            res = repo_env.call("label", uid, "a=b")
    finally:
        os.close(held)
    assert res.rc == 1 and f"versions lock for 0.5 s (a stopped process? fuser -v {lock})" in res.err, res.err
    repo_env.ok("label", uid, "a=b")  # released: it goes through
