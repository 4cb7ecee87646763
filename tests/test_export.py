"""The export core in-process: reads, unaligned writes, overlays across restarts, caches, errors.

The NBD and FUSE tests drive the same core through real servers; these pin its own contract.
"""

from __future__ import annotations

import mmap
import os
import random
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from backyfs.config import Config
from backyfs.errors import BackyfsError, StateError
from backyfs.export.cache import DiskCache, MemoryCache
from backyfs.export.device import BlockError, BlockFetcher, ExportDevice
from backyfs.export.overlay import CLEAN, DIRTY, TRIMMED, Overlay, list_overlays
from backyfs.export.service import ExportService, commit_overlay
from backyfs.repository.repo import block_digest, block_key
from backyfs.repository.writer import BackupWriter
from backyfs.sources.file import FileSource

BS = 64 * 1024  # small blocks keep the images small while every path is exercised


def _image(path: Path) -> bytes:
    rng = random.Random(3)
    blocks = [rng.randbytes(BS), bytes(BS), rng.randbytes(BS), rng.randbytes(BS // 2) + bytes(BS // 2)]
    data = b"".join(blocks * 3) + rng.randbytes(1000)  # duplicate blocks, a partial tail
    path.write_bytes(data)
    return data


def _service_with_version(tmp_path: Path) -> ExportService:
    """A service over a new repository holding one version of _image, volume "vol"."""
    cfg = Config(data_dir=str(tmp_path / "data"), block_size=BS, cache_memory_mb=1)
    svc = ExportService(cfg)
    _image(tmp_path / "disk.img")
    source = FileSource(str(tmp_path / "disk.img"))
    BackupWriter(svc.repo, source, "vol", block_size=BS).run()
    source.close()
    return svc


@pytest.fixture
def service(tmp_path: Path):
    svc = _service_with_version(tmp_path)
    yield svc
    svc.close()


def test_unaligned_reads_and_extents(service, tmp_path):
    image = (tmp_path / "disk.img").read_bytes()
    dev = service.open("vol")
    rng = random.Random(5)
    for _ in range(300):
        offset = rng.randrange(len(image))
        length = rng.randrange(min(3 * BS, len(image) - offset) + 1)
        assert dev.pread(offset, length) == image[offset : offset + length]
    buf = bytearray(BS + 17)
    dev.readinto(buf, BS - 9)
    assert bytes(buf) == image[BS - 9 : 2 * BS + 8]
    holes = [(o, n) for o, n, hole in dev.extents(0, dev.size) if hole]
    assert (BS, BS) in holes  # the zero block is a hole, not stored data
    assert sum(n for _o, n, _h in dev.extents(0, dev.size)) == dev.size
    with pytest.raises(ValueError):
        dev.pread(dev.size - 10, 11)
    with pytest.raises(StateError):
        dev.pwrite(b"x", 0)


def test_unaligned_writes_head_body_tail_land_in_overlay(service, tmp_path):
    image = bytearray((tmp_path / "disk.img").read_bytes())
    dev = service.open("vol", writable=True)
    payload = os.urandom(2 * BS + 300)
    offset = BS - 100  # head in block 0, block 1 whole, tail in block 3
    dev.pwrite(payload, offset)
    image[offset : offset + len(payload)] = payload
    dev.zero(5 * BS, BS)        # a whole block: trimmed
    dev.zero(6 * BS + 10, 20)   # a partial zero: written
    image[5 * BS : 6 * BS] = bytes(BS)
    image[6 * BS + 10 : 6 * BS + 30] = bytes(20)
    dev.flush()
    assert dev.pread(0, dev.size) == bytes(image)
    assert (5 * BS, BS, True) in list(dev.extents(5 * BS, BS))
    original = service.open(dev.version.uid)  # a read-only device of the same version
    assert original.pread(0, BS) == (tmp_path / "disk.img").read_bytes()[:BS]
    dev.close()


def test_overlay_survives_restart_then_commit_and_discard(tmp_path):
    cfg = Config(data_dir=str(tmp_path / "data"), block_size=BS)
    image = _image(tmp_path / "disk.img")
    svc = ExportService(cfg)
    source = FileSource(str(tmp_path / "disk.img"))
    version = BackupWriter(svc.repo, source, "vol", block_size=BS).run()
    dev = svc.open(version.uid, writable=True)
    dev.pwrite(b"persist me", 3 * BS + 5)
    dev.close()
    svc.close()
    svc = ExportService(cfg)  # a restarted server sees the overlay
    dev = svc.open(version.uid, writable=True)
    assert dev.pread(3 * BS + 5, 10) == b"persist me"
    with pytest.raises(StateError):  # one writer per overlay across processes
        Overlay(cfg.overlay_dir, version.uid, "default", version.size, BS)
    dev.close()
    assert [o.dirty_blocks for o in list_overlays(cfg.overlay_dir)] == [1]
    new = commit_overlay(svc, version.uid)
    assert new.parent == version.uid and new.stats["bytes_new"] <= BS
    expected = bytearray(image)
    expected[3 * BS + 5 : 3 * BS + 15] = b"persist me"
    assert svc.open(new.uid).pread(0, new.size) == bytes(expected)
    assert svc.open(version.uid).pread(0, version.size) == image
    assert list_overlays(cfg.overlay_dir) == []  # committed overlays are dropped
    svc.close()


def test_memory_cache_is_bounded_in_bytes():
    cache = MemoryCache(10 * BS)
    for n in range(40):
        cache.put(n.to_bytes(32, "big"), os.urandom(BS))
    assert cache.lru.currsize <= 10 * BS
    assert cache.get((39).to_bytes(32, "big")) is not None
    assert cache.get((0).to_bytes(32, "big")) is None


def test_disk_cache_lru_bounded_and_survives_restart(tmp_path):
    root = str(tmp_path / "cache")
    cache = DiskCache(root, 4 * BS)
    blocks = [os.urandom(BS) for _ in range(6)]
    digests = [block_digest(b) for b in blocks]
    for digest, data in zip(digests[:4], blocks[:4], strict=True):
        cache.put(digest, data)
        time.sleep(0.01)  # distinct mtimes: the LRU order is rebuilt from them
    assert cache.get(digests[0]) == blocks[0]  # 0 is now the most recent in memory
    for digest, data in zip(digests[4:], blocks[4:], strict=True):
        cache.put(digest, data)
    assert cache.total <= 4 * BS
    assert cache.get(digests[1]) is None and cache.get(digests[0]) == blocks[0]
    reopened = DiskCache(root, 4 * BS)
    assert reopened.total == cache.total
    assert reopened.get(digests[5]) == blocks[5]
    files = [p for p in Path(root).rglob("*") if p.is_file()]
    assert all(p.stat().st_mode & 0o077 == 0 for p in files)


def test_fetcher_verifies_disk_cache_and_store(service, tmp_path):
    repo = service.repo
    version = repo.latest_valid("vol")
    digest = repo.blockmap(version).lookup(0)
    disk = DiskCache(str(tmp_path / "dc"), 64 * BS)
    fetcher = BlockFetcher(repo, MemoryCache(0), disk)
    good = fetcher.get(digest)
    path = Path(disk._path(digest.hex()))
    path.write_bytes(b"garbage" + good[7:])  # a corrupt local cache entry is not served
    assert fetcher.get(digest) == good
    assert path.read_bytes() == good  # ... and replaced, not fetched from the store every time
    obj_path = Path(service.cfg.data_dir) / "store" / block_key(digest)
    raw = bytearray(obj_path.read_bytes())
    raw[-1] ^= 0xFF
    obj_path.write_bytes(bytes(raw))
    dev = ExportDevice(version, repo.blockmap(version), BlockFetcher(repo, MemoryCache(0), None))
    with pytest.raises(BlockError) as err:
        dev.pread(0, 10)
    assert err.value.block_idx == 0
    assert dev.pread(BS, 10) == bytes(10)  # the rest of the device stays readable


def test_sequential_reads_prefetch_and_concurrent_readers_agree(service, tmp_path):
    image = (tmp_path / "disk.img").read_bytes()
    dev = service.open("vol")
    dev.pread(0, 10)
    dev.pread(BS, 10)  # sequential: blocks ahead are fetched in the background
    ahead = dev.blockmap.lookup(2)
    deadline = time.monotonic() + 5
    while ahead not in service.fetcher.memory and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ahead in service.fetcher.memory
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(200):
            offset = rng.randrange(len(image))
            length = rng.randrange(min(2 * BS, len(image) - offset) + 1)
            if dev.pread(offset, length) != image[offset : offset + length]:
                errors.append(f"mismatch at {offset}+{length}")

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_readahead_fits_the_memory_cache(service):
    """Readahead fills the memory cache: a quarter of it at most, else prefetched blocks are evicted
    before they are read (1 MiB of cache, 64 KiB blocks: 4 blocks)."""
    assert service.open("vol").readahead_blocks == 4
    service.cfg.cache_memory_mb = 0
    assert service.open("vol").readahead_blocks == 0
    service.cfg.cache_memory_mb = 1024
    assert service.open("vol").readahead_blocks == 16


def test_reopen_while_the_last_user_closes_the_overlay(service, monkeypatch):
    """A client reconnecting while the server closes its previous connection's overlay must wait for
    that, not be refused as if another server held the overlay (its file lock is still taken until
    the close ends)."""
    dev = service.open("vol", writable=True, overlay_name="re")
    closing, proceed = threading.Event(), threading.Event()
    real_close = Overlay.close

    def slow_close(self: Overlay) -> None:
        closing.set()
        proceed.wait(5)
        real_close(self)

    monkeypatch.setattr(Overlay, "close", slow_close)
    closer = threading.Thread(target=dev.close)
    closer.start()
    assert closing.wait(5)
    opened: list[object] = []
    opener = threading.Thread(target=lambda: opened.append(_open_or_error(service)))
    opener.start()
    time.sleep(0.2)  # the open runs into the close in progress
    proceed.set()
    closer.join(5)
    opener.join(5)
    assert len(opened) == 1 and isinstance(opened[0], ExportDevice), opened
    opened[0].close()


def _open_or_error(service: ExportService) -> object:
    try:
        return service.open("vol", writable=True, overlay_name="re")
    except StateError as exc:
        return exc


def _fresh_overlay(tmp_path: Path, name: str = "o") -> Overlay:
    return Overlay(str(tmp_path / "overlays"), "feedbeef0000", name, 4 * BS, BS)


def test_overlay_state_after_a_kill_and_after_a_power_cut(tmp_path, monkeypatch):
    """An unflushed write survives the server being killed (same boot: the page cache kept it) but
    not a power cut (a new boot): then the state is the flushed one, which never names a block whose
    data might not have reached the disk."""
    import backyfs.export.overlay as overlay_mod

    ov = _fresh_overlay(tmp_path)
    ov.write_block(0, b"a" * BS)
    ov.flush()
    ov.write_block(1, b"b" * BS)  # not flushed
    ov.trim_block(3)  # not flushed either
    ov.close()  # as kill -9 leaves it: no flush
    ov = _fresh_overlay(tmp_path)
    assert [ov.block_state(i) for i in range(4)] == [DIRTY, DIRTY, CLEAN, TRIMMED]
    assert ov.read_block(1) == b"b" * BS
    ov.close()
    assert [o.dirty_blocks for o in list_overlays(str(tmp_path / "overlays"))] == [2]

    real_header = overlay_mod._boot_header()
    monkeypatch.setattr(overlay_mod, "_boot_header", lambda: b"another-boot".ljust(36) + b"\n")
    ov = _fresh_overlay(tmp_path)
    assert [ov.block_state(i) for i in range(4)] == [DIRTY, CLEAN, CLEAN, CLEAN]  # as flushed
    assert ov.read_block(0) == b"a" * BS
    ov.write_block(2, b"c" * BS)
    ov.flush()
    ov.close()
    monkeypatch.setattr(overlay_mod, "_boot_header", lambda: real_header)
    ov = _fresh_overlay(tmp_path)  # a flush makes the state durable whatever comes next
    assert [ov.block_state(i) for i in range(4)] == [DIRTY, CLEAN, DIRTY, CLEAN]
    ov.close()


def test_a_failed_overlay_open_leaves_it_unlocked(tmp_path, monkeypatch):
    import errno

    real = Overlay._write_meta

    def full_disk(self: Overlay) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Overlay, "_write_meta", full_disk)
    with pytest.raises(OSError):
        _fresh_overlay(tmp_path)
    monkeypatch.setattr(Overlay, "_write_meta", real)
    _fresh_overlay(tmp_path).close()  # not "in use" by the failed attempt


def test_discard_keeps_the_overlay_locked_until_it_is_gone(tmp_path, monkeypatch):
    """A server opening the overlay while a discard removes it must not get the doomed files: it is
    refused while the discard holds the lock, and gets a new, empty overlay after."""
    import backyfs.export.overlay as overlay_mod

    ov = _fresh_overlay(tmp_path)
    ov.write_block(0, b"x" * BS)
    ov.flush()
    ov.close()
    seen: list[object] = []
    real_rename = os.rename

    def rename_with_a_server_arriving(src: str, dst: str) -> None:
        try:
            seen.append(_fresh_overlay(tmp_path))
        except StateError as exc:
            seen.append(exc)
        real_rename(src, dst)

    monkeypatch.setattr(overlay_mod.os, "rename", rename_with_a_server_arriving)
    overlay_mod.discard_overlay(str(tmp_path / "overlays"), "feedbeef0000", "o")
    monkeypatch.setattr(overlay_mod.os, "rename", real_rename)
    assert len(seen) == 1 and isinstance(seen[0], StateError), seen
    ov = _fresh_overlay(tmp_path)
    assert ov.changed_blocks() == []
    ov.close()


def test_a_failed_flush_on_close_still_releases_the_overlay(service, monkeypatch):
    dev = service.open("vol", writable=True, overlay_name="ff")
    dev.pwrite(b"x", 0)

    def broken_flush(self: Overlay) -> None:
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(Overlay, "flush", broken_flush)
        with pytest.raises(OSError):
            dev.close()
    assert service.overlays == {}
    service.open("vol", writable=True, overlay_name="ff").close()  # not "in use" by the lost device


def test_cached_reads_leave_store_hints_to_the_pool(service, monkeypatch):
    """pread_cached runs on FUSE's event loop: the readahead it starts must not open object files
    there (the store hint does), only queue work."""
    dev = service.open("vol")
    for block_idx in range(dev.blockmap.block_count):
        dev.pread(block_idx * BS, 1)  # everything in memory
    hinted_from: list[str] = []
    monkeypatch.setattr(service.fetcher, "hint", lambda digests: hinted_from.append(
        threading.current_thread().name))
    dev.last_block, dev.ahead = -2, 0
    for block_idx in range(3):
        assert dev.pread_cached(block_idx * BS, 10) is not None
    service.fetcher.pool.submit(lambda: None).result()  # the pool has run what was queued
    assert hinted_from and all(name.startswith("readahead") for name in hinted_from), hinted_from


def test_overlay_ls_skips_stray_files(tmp_path):
    root = tmp_path / "overlays"
    ov = _fresh_overlay(tmp_path)
    ov.write_block(0, b"a" * BS)
    ov.flush()
    ov.close()
    (root / "README").write_text("notes an admin left here\n")
    assert [(o.version_uid, o.dirty_blocks) for o in list_overlays(str(root))] == [("feedbeef0000", 1)]


def test_close_waits_for_running_readahead_before_closing_the_repository(tmp_path):
    """A readahead load still reading when the service closes must finish before the repository
    (its store and database) closes under it; queued ones are dropped."""
    svc = _service_with_version(tmp_path)
    repo, events, prefetching = svc.repo, [], threading.Event()
    real_read, real_close = repo.read_block, repo.close

    def slow_read(digest: bytes):
        events.append("read started")
        prefetching.set()
        time.sleep(0.3)
        data = real_read(digest)
        events.append("read done")
        return data

    def close() -> None:
        events.append("repository closed")
        real_close()

    repo.read_block, repo.close = slow_read, close  # type: ignore[method-assign]
    svc.fetcher.prefetch(list(repo.blockmap(repo.latest_valid("vol")).digest_set()))
    assert prefetching.wait(5)
    svc.close()
    time.sleep(0.6)  # a load left running would end (or fail) by now
    assert events[-1] == "repository closed", events
    assert events.count("read started") == events.count("read done")


def test_an_overlay_without_writes_is_not_kept(service):
    """A client that only reads a writable export (or lists its exports) leaves no overlay behind."""
    version = service.repo.latest_valid("vol")
    device = service.open(version.uid, writable=True, overlay_name="reader")
    device.pread(0, 4096)
    device.close()
    assert list_overlays(service.cfg.overlay_dir) == []
    device = service.open(version.uid, writable=True, overlay_name="writer")
    device.pwrite(b"kept", 0)
    device.close()
    assert [o.name for o in list_overlays(service.cfg.overlay_dir)] == ["writer"]


def test_disk_cache_count_survives_a_read_racing_an_eviction(tmp_path, monkeypatch):
    """A get() refreshing an old entry while a put() evicts it must not put it back in the index:
    the count then said fewer bytes than the files held, and the bound no longer held."""
    from backyfs.export import cache as cache_mod

    size = 1000
    cache = DiskCache(str(tmp_path / "dc"), 3 * size)
    cache.TOUCH_INTERVAL = -1  # every hit refreshes its entry, as one idle for a minute does
    digests = [bytes([i]) * 32 for i in range(8)]
    for i in range(3):
        cache.put(digests[i], bytes([i]) * size)
    real_open = open

    def racing_open(path, *args, **kwargs):  # while get() reads block 0, puts evict it
        f = real_open(path, *args, **kwargs)
        if path.endswith(digests[0].hex()) and not racing_open.done:
            racing_open.done = True
            for i in (3, 4, 5):
                cache.put(digests[i], bytes([i]) * size)
        return f

    racing_open.done = False
    monkeypatch.setattr(cache_mod, "open", racing_open, raising=False)
    assert cache.get(digests[0]) == bytes(size)
    monkeypatch.undo()
    for i in (6, 7):
        cache.put(digests[i], bytes([i]) * size)
    on_disk = sum(p.stat().st_size for p in Path(cache.root).rglob("*") if p.is_file())
    assert cache.total == on_disk == sum(n for n, _ in cache.index.values()) <= cache.max_bytes
    assert all(os.path.exists(cache._path(hexd)) for hexd in cache.index)


def test_prefetch_of_nothing_at_the_end_of_a_writable_device(tmp_path):
    cfg = Config(data_dir=str(tmp_path / "data"), block_size=BS)
    (tmp_path / "exact.img").write_bytes(os.urandom(4 * BS))  # a whole number of blocks
    svc = ExportService(cfg)
    try:
        source = FileSource(str(tmp_path / "exact.img"))
        BackupWriter(svc.repo, source, "exact", block_size=BS).run()
        source.close()
        device = svc.open("exact", writable=True)
        device.prefetch(device.size, 0)  # was an IndexError past the overlay's last block
        device.close()
    finally:
        svc.close()


def test_a_discard_killed_while_deleting_leaves_no_overlay_behind(service):
    """A discard (or a commit's) renames the overlay away, then deletes it: killed in between, the
    renamed directory was listed by `overlay ls` as an overlay of its own. It is swept instead."""
    version = service.repo.latest_valid("vol")
    device = service.open(version.uid, writable=True)
    device.pwrite(b"x" * 10, 0)
    device.close()
    root = Path(service.cfg.overlay_dir) / version.uid
    (root / "default").rename(root / ".discarded-default-1")  # the crash: renamed, never deleted
    shutil.copytree(root / ".discarded-default-1", root / "old.discarded.2")  # an older backyfs's trash
    assert list_overlays(service.cfg.overlay_dir) == []
    assert sorted(os.listdir(root)) == []
    with pytest.raises(BackyfsError):
        service.open(version.uid, writable=True, overlay_name="old.discarded.2")
    # A discard deleting right now (its trash is young) is left to finish: sweeping its files from
    # under it made that discard, or the commit that called it, fail after its work was done.
    live = root / f".discarded-other-{time.time_ns()}"
    live.mkdir()
    assert list_overlays(service.cfg.overlay_dir) == [] and live.is_dir()


def test_extents_match_block_by_block_states(tmp_path):
    """extents() finds runs from the map's sorted indices and the overlay's state bytes, without
    visiting every block: it must agree with each block's own state (mapped and not trimmed, or
    dirty: data; else a hole), for any range, aligned or not, with a partial last block."""
    from backyfs.metadata.blockmap import BlockMap
    from backyfs.metadata.db import Version

    rng = random.Random(11)
    block_count, size = 300, 299 * BS + 777
    mapped = {i: os.urandom(32) for i in range(block_count) if rng.random() < 0.4}
    version = Version(uid="feedbeef0000", volume="v", created=0.0, size=size, block_size=BS)
    overlay = Overlay(str(tmp_path / "overlays"), version.uid, "default", size, BS)
    for i in rng.sample(range(block_count), 60):
        overlay.trim_block(i) if rng.random() < 0.5 else overlay._set_state(i, DIRTY)
    dev = ExportDevice(version, BlockMap.from_mapping(size, BS, mapped), fetcher=None, overlay=overlay)

    def is_data(i: int) -> bool:
        state = overlay.block_state(i)
        return state == DIRTY if state != CLEAN else i in mapped

    for _ in range(400):
        offset = rng.randrange(size)
        length = rng.randrange(size - offset + 1) if rng.random() < 0.5 else rng.randrange(3 * BS)
        length = min(length, size - offset)
        runs = list(dev.extents(offset, length))
        assert sum(n for _o, n, _h in runs) == length and all(n > 0 for _o, n, _h in runs)
        assert all(a[2] != b[2] for a, b in zip(runs, runs[1:], strict=False))  # merged, alternating
        pos = offset
        for run_offset, run_length, hole in runs:
            assert run_offset == pos
            blocks = range(run_offset // BS, (run_offset + run_length - 1) // BS + 1)
            assert all(is_data(i) != hole for i in blocks), (run_offset, run_length, hole)
            pos += run_length
    assert list(dev.extents(5, 0)) == []
    overlay.close()


def test_a_volume_larger_than_the_filesystems_largest_file(tmp_path):
    """ext4 holds files of at most 16 TiB: a writable export or a restore of a larger version fails
    with a sentence, and leaves no empty overlay (which would block rm) and no partial file."""
    from backyfs.errors import BackyfsError as Error
    from backyfs.metadata.blockmap import BlockMap
    from backyfs.metadata.db import Version
    from backyfs.repository.restore import restore
    from backyfs.sources.file import FileTarget

    size = 17 << 40
    probe = tmp_path / "probe"
    with open(probe, "wb") as f:
        try:
            f.truncate(size)
            pytest.skip("this filesystem holds 17 TiB files")
        except OSError:
            pass
    probe.unlink()
    svc = ExportService(Config(data_dir=str(tmp_path / "data"), block_size=BS, cache_memory_mb=1))
    try:
        version = Version(uid="feedbeef0000", volume="huge", created=time.time(), size=size,
                          block_size=4 << 20, state="valid")
        svc.repo.db.add_version(version)
        svc.repo.db.put_blockmap(version.uid, BlockMap.empty(size, 4 << 20))
        with pytest.raises(Error, match="cannot hold a file that large"):
            svc.open(version.uid, writable=True)
        assert list_overlays(svc.cfg.overlay_dir) == []
        assert not (Path(svc.cfg.overlay_dir) / version.uid).exists()
        with pytest.raises(Error, match="cannot hold a file of"):
            restore(svc.repo, version, FileTarget(str(tmp_path / "out.img"), size))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    finally:
        svc.close()


def test_devices_of_one_version_share_its_block_map(service):
    """Maps never change: every connection to a version uses one copy, freed with the last."""
    import gc

    first, second = service.open("vol"), service.open("vol", writable=True)
    assert first.blockmap is second.blockmap and len(service.maps) == 1
    first.close()
    second.close()
    del first, second
    gc.collect()
    assert len(service.maps) == 0


def test_overlay_names_are_the_overlays_list_overlays_shows(tmp_path):
    """rm and prune check one version's overlays by name alone: the same ones list_overlays shows
    (not a discard's trash, not a directory whose overlay was never made)."""
    from backyfs.export.overlay import overlay_names

    root = tmp_path / "overlays"
    def written(name: str) -> None:
        overlay = _fresh_overlay(tmp_path, name)
        overlay.write_block(0, bytes(BS))  # a clean overlay is removed when closed
        overlay.close()

    for name in ("b", "a"):
        written(name)
    (root / "feedbeef0000" / "half-made").mkdir()
    (root / "feedbeef0000" / "a").rename(root / "feedbeef0000" / ".trash-a")
    written("a")
    shown = sorted(o.name for o in list_overlays(str(root)) if o.version_uid == "feedbeef0000")
    assert overlay_names(str(root), "feedbeef0000") == shown == ["a", "b"]
    assert overlay_names(str(root), "000000000000") == []


def test_copy_into_without_the_gil_copies_exactly(tmp_path):
    from backyfs.export.memcopy import MIN_NOGIL_BYTES, copy_into

    payload = os.urandom(3 * MIN_NOGIL_BYTES)
    (tmp_path / "obj").write_bytes(payload)
    with open(tmp_path / "obj", "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)  # read-only, as store objects are
    for src in (payload, memoryview(mapped), memoryview(payload)[5 : 5 + 2 * MIN_NOGIL_BYTES], payload[:100]):
        buf = bytearray(len(src) + 20)
        copy_into(memoryview(buf)[10 : 10 + len(src)], src)
        assert buf == bytes(10) + bytes(src) + bytes(10)
    with pytest.raises(ValueError):
        copy_into(memoryview(bytearray(MIN_NOGIL_BYTES)), payload)
    del src
    mapped.close()  # BufferError if a view of it leaked


def test_cached_blocks_hold_no_file_descriptors_and_stay_resident(tmp_path):
    """Blocks of a filesystem store are mapped; the memory cache must not keep an fd per block
    (mmap.mmap did: 64 KiB blocks in a 256 MiB cache ran a server out of fds, reads failed EIO)."""
    (tmp_path / "disk.img").write_bytes(os.urandom(400 * BS))
    cfg = Config(data_dir=str(tmp_path / "data"), block_size=BS, cache_memory_mb=64)
    svc = ExportService(cfg)
    try:
        source = FileSource(str(tmp_path / "disk.img"))
        BackupWriter(svc.repo, source, "vol", block_size=BS).run()
        source.close()
        dev = svc.open("vol")
        fds_before = len(os.listdir("/proc/self/fd"))
        data = dev.pread(0, dev.size)
        assert all(svc.fetcher.memory.get(d) is not None for _i, d in dev.blockmap.items())  # all cached
        assert len(os.listdir("/proc/self/fd")) - fds_before < 20
        if os.geteuid() == 0:  # locked, so the kernel cannot drop them and read them again unchecked
            locked_kb = int(re.search(r"VmLck:\s+(\d+)", Path("/proc/self/status").read_text())[1])
            assert locked_kb * 1024 >= 400 * BS
        assert data == (tmp_path / "disk.img").read_bytes()
        dev.close()
    finally:
        svc.close()


def test_a_failed_commit_reports_its_own_error_not_the_overlays_close(service, monkeypatch):
    """On a full data dir the commit's database write fails, then closing the overlay (its flush)
    fails too: the first error is the one to report."""
    import errno

    from backyfs.errors import StoreUnavailable

    dev = service.open("vol", writable=True)
    dev.pwrite(b"x" * 100, 0)
    dev.close()
    uid = service.resolve("vol").uid

    def full(*_args):
        raise StoreUnavailable("database or disk is full")

    def flush_fails(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(BackupWriter, "run", full)
    monkeypatch.setattr(Overlay, "flush", flush_fails)
    with pytest.raises(StoreUnavailable, match="database or disk is full"):
        commit_overlay(service, uid)


def test_a_version_being_read_is_not_removed_under_its_reader(service, tmp_path, monkeypatch):
    """rm, prune and a job's keep removed versions an export or a restore was reading; gc then
    deleted their blocks and the reader got EIO. A device and a restore now hold the version."""
    from backyfs.config import open_repository
    from backyfs.repository import restore as restore_mod
    from backyfs.sources.file import FileTarget

    other = open_repository(service.cfg)  # another process's rm
    version = service.resolve("vol")
    dev = service.open("vol")
    with pytest.raises(StateError, match="being read by a running server"):
        other.delete_version(version)
    dev.close()

    refused = []
    real_read = type(other).read_block

    def read_and_try_rm(self, digest):
        if not refused:
            with pytest.raises(StateError):
                other.delete_version(version)
            refused.append(True)
        return real_read(self, digest)

    monkeypatch.setattr(type(other), "read_block", read_and_try_rm)
    out = tmp_path / "restored"
    restore_mod.restore(service.repo, version, FileTarget(str(out), version.size))
    assert refused and out.read_bytes() == (tmp_path / "disk.img").read_bytes()
    monkeypatch.undo()
    other.delete_version(version)  # nobody reads it now
    with pytest.raises(BackyfsError):
        service.open(version.uid)
    other.close()
