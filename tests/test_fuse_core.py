"""The FUSE front's bookkeeping in-process (no mount): devices opened and closed as versions come
and go. The mounted file system itself is tested in test_fuse.py."""

from __future__ import annotations

import threading
from pathlib import Path

import trio

import backyfs.fronts.fuse as fuse_front
from backyfs.config import Config
from backyfs.export.service import ExportService
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
            svc.repo.delete_version(version, force=True)
            await ops.refresh(force=True)
            assert closes == []  # not while the scan reads it
            finish.set()
        assert closes == ["x"]  # but once the scan is done
        assert version.uid not in ops.devices.held

    trio.run(scenario)
    assert closed_during_scan == [False]
    svc.close()
