"""The filesystem store's own edges (the contract every store meets is in test_store_contract.py):
what it does with directories it cannot read, things that are not files in an object's place, and
the modes of what it creates."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from conftest import RepoEnv, write_image

from backyfs.errors import CorruptObject, StoreUnavailable
from backyfs.fsutil import makedirs_private
from backyfs.storage.fs import FilesystemStore


def _unreadable(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """scandir of path fails as for a directory root cannot read either (EIO on a damaged disk;
    permissions stop only other users)."""
    real = os.scandir

    def scandir(target=".", *args, **kwargs):
        if os.fspath(target) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real(target, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)


def test_a_listing_fails_on_a_directory_it_cannot_read(tmp_path: Path, monkeypatch) -> None:
    store = FilesystemStore(str(tmp_path / "store"))
    store.put("versions/aaa/meta.json", b"{}")
    store.put("versions/bbb/meta.json", b"{}")
    assert sorted(store.list("versions/")) == ["versions/aaa/meta.json", "versions/bbb/meta.json"]
    _unreadable(monkeypatch, tmp_path / "store" / "versions" / "bbb")
    with pytest.raises(StoreUnavailable, match="cannot list .*bbb.*Permission denied"):
        list(store.list("versions/"))
    assert list(store.list("nothing-there/")) == []  # a directory that does not exist lists nothing


def test_rebuild_db_refuses_when_a_version_cannot_be_read(repo_env: RepoEnv, tmp_path: Path,
                                                          monkeypatch) -> None:
    """It reported success without the version, and gc then deleted that version's blocks."""
    repo_env.backup(write_image(tmp_path / "a.img", ["rand"]), "a")
    lost = repo_env.backup(write_image(tmp_path / "b.img", ["rand"]), "b")["uid"]
    repo_env.db_path.rename(tmp_path / "old.sqlite")
    with monkeypatch.context() as patch:
        _unreadable(patch, repo_env.store_dir / "versions" / lost)
        res = repo_env.call("rebuild-db")
    assert res.rc == 1 and f"cannot list {repo_env.store_dir / 'versions' / lost}" in res.err
    repo_env.ok("rebuild-db")
    assert {v["volume"] for v in repo_env.versions()} == {"a", "b"}


def test_a_directory_or_fifo_in_an_objects_place_is_a_corrupt_object(tmp_path: Path) -> None:
    """Not a dead store (which stopped a restore at the first one), and a FIFO must not block."""
    store = FilesystemStore(str(tmp_path / "store"))
    store.put("blocks/aa/dir", b"x")
    store.put("blocks/aa/fifo", b"x")
    (tmp_path / "store" / "blocks" / "aa" / "dir").unlink()
    (tmp_path / "store" / "blocks" / "aa" / "dir").mkdir()
    (tmp_path / "store" / "blocks" / "aa" / "fifo").unlink()
    os.mkfifo(tmp_path / "store" / "blocks" / "aa" / "fifo")
    outcomes: list[str] = []

    def read_all() -> None:
        for key in ("blocks/aa/dir", "blocks/aa/fifo"):
            for get in (store.get, lambda k: store.get_split(k, 16)):
                try:
                    get(key)
                except CorruptObject as exc:
                    outcomes.append(str(exc))
        store.will_need(["blocks/aa/fifo"])

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "a read blocked on the FIFO"
    assert len(outcomes) == 4 and all("not a regular file" in o for o in outcomes)


def test_every_directory_made_is_private_whatever_the_umask(tmp_path: Path) -> None:
    """os.makedirs gave the intermediate directories the umask's mode: 0777 under umask 000."""
    old = os.umask(0)
    try:
        os.mkdir(tmp_path / "shared", 0o755)
        store = FilesystemStore(str(tmp_path / "shared" / "deep" / "store"))
        store.put("blocks/ab/abcd", b"data")
        store.put("versions/0123/meta.json", b"{}")
        makedirs_private(str(tmp_path / "shared" / "x" / "y"))
    finally:
        os.umask(old)
    made = [tmp_path / "shared" / p for p in ("deep", "deep/store", "deep/store/blocks",
                                               "deep/store/blocks/ab", "deep/store/versions",
                                               "deep/store/versions/0123", "x", "x/y")]
    assert {str(p): stat.S_IMODE(p.stat().st_mode) for p in made} == {str(p): 0o700 for p in made}
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o755  # existing ones keep theirs
    assert stat.S_IMODE((tmp_path / "shared/deep/store/blocks/ab/abcd").stat().st_mode) == 0o600


def test_a_removed_versions_directory_goes_with_it(repo_env: RepoEnv, tmp_path: Path) -> None:
    """Empty versions/UID directories piled up (1,233 after a day of tests), walked by every gc."""
    repo_env.backup(write_image(tmp_path / "a.img", ["rand"]), "a")
    uid = repo_env.backup(write_image(tmp_path / "b.img", ["rand"]), "b")["uid"]
    repo_env.ok("rm", uid)
    assert not (repo_env.store_dir / "versions" / uid).exists()
    assert len(list((repo_env.store_dir / "versions").iterdir())) == 1
