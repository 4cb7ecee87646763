"""The FUSE front's bookkeeping in-process (no mount): devices opened and closed as versions come
and go. The mounted file system itself is tested in test_fuse.py."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import trio

import backyfs.fronts.fuse as fuse_front
from backyfs.config import Config
from backyfs.export.service import ExportService
from backyfs.fronts.tree import IMAGE
from backyfs.repository.writer import BackupWriter
from backyfs.sources.file import FileSource

BS = 64 * 1024


def test_partition_scan_keeps_its_device_open_while_the_version_goes(tmp_path: Path, monkeypatch) -> None:
    """A refresh that finds the version deleted must not close the device a partition scan is
    reading (a writable one would lose its overlay under the scan); the scan closes it after."""
    (tmp_path / "disk.img").write_bytes(bytes(range(256)) * (4 * BS // 256))
    svc = ExportService(Config(data_dir=str(tmp_path / "data"), block_size=BS))
    source = FileSource(str(tmp_path / "disk.img"))
    version = BackupWriter(svc.repo, source, "vol", block_size=BS).run()
    source.close()
    scanning, finish = threading.Event(), threading.Event()
    closed_during_scan: list[bool] = []
    real_find = fuse_front.find_partitions

    def slow_find(pread, size):
        scanning.set()
        assert finish.wait(10)
        closed_during_scan.append(ops.devices.held.get(version.uid) is None)
        return real_find(pread, size)

    monkeypatch.setattr(fuse_front, "find_partitions", slow_find)
    ops = fuse_front.BackyfsOperations(svc, writable=True)
    closes: list[str] = []

    async def scenario() -> None:
        await ops.refresh(force=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.ensure_partitions, version.uid)
            await trio.to_thread.run_sync(scanning.wait)
            real_close = ops.devices.held[version.uid].device.close
            ops.devices.held[version.uid].device.close = lambda: (closes.append("x"), real_close())[1]
            # Its rows only: rm itself now waits for the device (its hold), as an older rm did not.
            svc.repo.db.delete_version(version.uid, force=True)
            await ops.refresh(force=True)
            assert closes == []  # not while the scan reads it
            finish.set()
        assert closes == ["x"]  # but once the scan is done
        assert version.uid not in ops.devices.held

    trio.run(scenario)
    assert closed_during_scan == [False]
    svc.close()


def test_devices_no_file_uses_are_closed_beyond_a_few(tmp_path: Path, monkeypatch) -> None:
    """Browsing versions (each directory's partition scan opens its device) kept every device
    open for good: maps and, on a writable mount, 4 fds per overlay. Now the most recently used
    MAX_IDLE_DEVICES stay open; a device with an open file is never closed."""
    monkeypatch.setattr(fuse_front, "MAX_IDLE_DEVICES", 2)
    (tmp_path / "disk.img").write_bytes(bytes(range(256)) * (2 * BS // 256))
    svc = ExportService(Config(data_dir=str(tmp_path / "data"), block_size=BS))
    uids = []
    for volume in ("a", "b", "c", "d"):
        source = FileSource(str(tmp_path / "disk.img"))
        uids.append(BackupWriter(svc.repo, source, volume, block_size=BS).run().uid)
        source.close()
    ops = fuse_front.BackyfsOperations(svc)

    async def scenario() -> None:
        await ops.refresh(force=True)
        in_use = await ops.devices.get(uids[0])
        in_use.handles += 1  # a file of version a stays open throughout
        for uid in uids:
            await ops.ensure_partitions(uid)
        assert set(ops.devices.held) == {uids[0], uids[2], uids[3]}
        assert list(ops.devices.idle) == [uids[2], uids[3]]
        for uid in uids:  # a second visit reopens nothing (the partitions are known)
            await ops.ensure_partitions(uid)
        assert set(ops.devices.held) == {uids[0], uids[2], uids[3]}
        in_use.handles -= 1
        await ops.devices.idle_now(uids[0])
        assert set(ops.devices.held) == {uids[0], uids[3]}

    trio.run(scenario)
    ops.devices.close_all()
    svc.close()


def test_refresh_rebuilds_the_tree_only_when_versions_changed(tmp_path: Path, monkeypatch) -> None:
    """A rebuild of 50,000 versions takes seconds on the event loop: a refresh with nothing
    committed meanwhile reads no versions, one after an unrelated commit (a backup's heartbeat)
    reads but does not rebuild, and a new version in another process's commit shows."""
    from backyfs.config import open_repository

    (tmp_path / "disk.img").write_bytes(bytes(range(256)) * (2 * BS // 256))
    cfg = Config(data_dir=str(tmp_path / "data"), block_size=BS)
    svc = ExportService(cfg)
    source = FileSource(str(tmp_path / "disk.img"))
    first = BackupWriter(svc.repo, source, "a", block_size=BS).run()
    ops = fuse_front.BackyfsOperations(svc)
    loads, rebuilds = [], []
    real_versions, real_update = svc.repo.db.versions, ops.tree.update
    monkeypatch.setattr(svc.repo.db, "versions", lambda *a: (loads.append(1), real_versions(*a))[1])
    monkeypatch.setattr(ops.tree, "update", lambda vs: (rebuilds.append(len(vs)), real_update(vs))[1])
    other = open_repository(cfg)  # another process's connection

    async def scenario() -> None:
        await ops.refresh(force=True)
        assert (len(loads), rebuilds) == (1, [1])
        ops.refreshed = -10.0  # past the interval: nothing committed, nothing read
        await ops.refresh()
        assert (len(loads), rebuilds) == (1, [1])
        other.db.update_version(first.uid, heartbeat=1.0)  # commits that leave the versions as
        other.db.update_version(first.uid, heartbeat=first.heartbeat)  # they were
        ops.refreshed = -10.0
        await ops.refresh()
        assert (len(loads), rebuilds) == (2, [1])
        BackupWriter(other, FileSource(str(tmp_path / "disk.img")), "b", block_size=BS).run()
        ops.refreshed = -10.0
        await ops.refresh()
        assert (len(loads), rebuilds) == (3, [1, 2])

    trio.run(scenario)
    other.close()
    source.close()
    ops.devices.close_all()
    svc.close()


def test_an_idle_device_does_not_keep_its_version_from_rm(tmp_path: Path) -> None:
    """The mount keeps recently used devices open when no file uses them: they must not hold their
    version against rm, and one whose version went is not used again (its blocks may be gone)."""
    import pytest

    from backyfs.errors import NotFound, StateError

    (tmp_path / "disk.img").write_bytes(bytes(range(256)) * (4 * BS // 256))
    svc = ExportService(Config(data_dir=str(tmp_path / "data"), block_size=BS))
    source = FileSource(str(tmp_path / "disk.img"))
    version = BackupWriter(svc.repo, source, "vol", block_size=BS).run()
    source.close()
    ops = fuse_front.BackyfsOperations(svc)

    async def scenario() -> None:
        held = await ops.devices.get(version.uid)
        held.handles += 1  # a file is open
        with pytest.raises(StateError):
            svc.repo.delete_version(version)
        held.handles -= 1
        await ops.devices.idle_now(version.uid)
        assert version.uid in ops.devices.held  # still open, idle
        svc.repo.delete_version(version)
        with pytest.raises(NotFound):
            await ops.devices.get(version.uid)
        assert version.uid not in ops.devices.held

    trio.run(scenario)
    svc.close()


def test_a_file_opened_while_its_last_handle_closes_holds_its_version(tmp_path: Path) -> None:
    """release() of the last handle awaited the hold's drop; an open() the loop ran meanwhile got
    the device without a hold, so rm removed the version under it (found by a review)."""
    (tmp_path / "disk.img").write_bytes(os.urandom(4 * BS))
    svc = ExportService(Config(data_dir=str(tmp_path / "data"), block_size=BS))
    source = FileSource(str(tmp_path / "disk.img"))
    version = BackupWriter(svc.repo, source, "vol", block_size=BS).run()
    source.close()
    ops = fuse_front.BackyfsOperations(svc)
    result = {}

    async def scenario() -> None:
        await ops.refresh(force=True)
        inode = next(n.inode for n in ops.tree.nodes.values() if n.kind == IMAGE)
        fh1 = (await ops.open(inode, os.O_RDONLY)).fh
        async with trio.open_nursery() as n:  # two FUSE requests in flight at once
            n.start_soon(ops.release, fh1)
            async def second_open():
                await trio.sleep(0)
                result["fh2"] = (await ops.open(inode, os.O_RDONLY)).fh
            n.start_soon(second_open)
        try:
            svc.repo.delete_version(version)
            result["rm"] = "removed while fh2 is open"
        except Exception as exc:
            result["rm"] = f"refused: {exc}"
        await ops.release(result["fh2"])

    trio.run(scenario)
    ops.devices.close_all()
    svc.close()
    assert result["rm"].startswith("refused")
