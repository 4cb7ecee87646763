"""Input checks found by an audit: each bad input ends with one line on stderr and a non-zero exit,
and leaves nothing behind (no hidden restore file, no stuck process)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RepoEnv, write_image
from test_bad_input import assert_one_line_error

from backyfs.errors import BackyfsError
from backyfs.sources.file import FileTarget


def _restoring(target: Path) -> list[Path]:
    return list(target.parent.glob(f".{target.name}.backyfs-restore-*"))


@pytest.fixture
def uid(repo_env: RepoEnv, tmp_path: Path) -> str:
    return repo_env.backup(write_image(tmp_path / "img", ["rand", "hole", "text"]), "vm")["uid"]


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_restore_target_that_appears_meanwhile_is_kept_and_named(repo_env: RepoEnv, uid: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Another program creating the target while the restore runs: its file stays, the error says
    so (not 'Bad file descriptor'), and no full-size hidden file is left."""
    from backyfs.repository import restore as restore_module

    out = tmp_path / "out.img"
    real_restore = restore_module.restore

    def racing(*args: object, **kwargs: object) -> object:
        out.write_text("theirs")
        return real_restore(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(restore_module, "restore", racing)
    res = repo_env.call("restore", uid, out)
    assert_one_line_error(res, rc=1, contains=f"restore target {out} appeared during the restore")
    assert "removed the restored image" in res.err
    assert out.read_text() == "theirs" and _restoring(out) == []


def test_abandon_after_a_failed_finish_closes_nothing_else(tmp_path: Path) -> None:
    """finish() closed the fd before failing: abandon() must not close that number again (another
    file may have it by then)."""
    out = tmp_path / "out.img"
    target = FileTarget(str(out), 4096)
    target.pwrite(0, b"x" * 4096)
    out.write_text("theirs")
    with pytest.raises(BackyfsError, match="appeared during the restore"):
        target.finish()
    other = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT)  # likely the number just freed
    try:
        assert target.abandon() == "removed the restored image"
        os.fstat(other)  # still open
    finally:
        os.close(other)
    assert out.read_text() == "theirs" and _restoring(out) == []


def test_restore_to_an_empty_target_is_a_usage_error(repo_env: RepoEnv, uid: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    before = set(os.listdir(tmp_path))
    res = repo_env.call("restore", uid, "")
    assert_one_line_error(res, rc=2, contains="TARGET is empty")
    assert set(os.listdir(tmp_path)) == before


def test_restore_onto_a_read_only_filesystem_names_the_target(repo_env: RepoEnv, uid: str,
                                                              read_only_dir: Path) -> None:
    out = read_only_dir / "x.img"
    res = repo_env.run("restore", uid, out)
    assert_one_line_error(res, rc=1, contains=f"cannot open restore target {out}: Read-only file system")
    assert "backyfs-restore" not in res.err
