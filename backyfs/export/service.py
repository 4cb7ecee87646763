"""Opening exports by name, listing them, and committing overlays as new versions.

One ExportService per process: its BlockFetcher (memory cache, disk cache, readahead) is shared by
every device it opens. Export names come from clients and are untrusted: they must look like a
version uid or a volume name, and only valid versions are exported.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections.abc import Callable

from backyfs.config import Config, open_repository
from backyfs.errors import BackyfsError, NotFound
from backyfs.export.cache import DiskCache, MemoryCache
from backyfs.export.device import READAHEAD_BLOCKS, BlockFetcher, ExportDevice
from backyfs.export.overlay import Overlay, discard_overlay, list_overlays
from backyfs.metadata.blockmap import BlockMap
from backyfs.metadata.db import Version
from backyfs.repository.extents import Extent
from backyfs.repository.repo import VersionHold
from backyfs.repository.writer import COMMIT_LABEL, BackupWriter

log = logging.getLogger(__name__)
_EXPORT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ExportService:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.repo = open_repository(cfg)
        memory = MemoryCache(cfg.cache_memory_mb << 20)
        # A local fs store is already a disk copy: caching it again would double every cold read's
        # I/O (a 4 MiB write per block) and save nothing, as cache hits are re-hashed like store reads.
        local_store = cfg.store.get("type", "fs") == "fs"
        disk = None
        if cfg.cache_disk_mb > 0 and not local_store:
            disk = DiskCache(cfg.cache_dir, cfg.cache_disk_mb << 20)
        self.fetcher = BlockFetcher(self.repo, memory, disk, readahead_threads=max(2, cfg.threads))
        self.lock = threading.Lock()
        # One Overlay per (version, name) shared by every device of the process: its file lock is
        # exclusive, so a second Overlay object would lock out the second NBD connection.
        self.overlays: dict[tuple[str, str], tuple[Overlay, int]] = {}
        # Block maps never change: the devices of one version (NBD connections, FUSE files) share
        # one. Four connections to a 16M-block version held four copies, 2.9 GB.
        self.maps: weakref.WeakValueDictionary[str, BlockMap] = weakref.WeakValueDictionary()

    def resolve(self, name: str, valid_only: bool = True) -> Version:
        if not _EXPORT_NAME_RE.fullmatch(name or ""):  # fullmatch: "$" would let a trailing \n in
            raise NotFound(f"invalid export name {name[:64]!r}")
        version = self.repo.resolve(name, valid_only=valid_only)
        if version.state == "pending":  # no block map yet: nothing to read
            raise NotFound(f"version {version.uid} is pending (an unfinished backup)")
        return version

    def list_exports(self) -> list[tuple[str, str]]:
        """(name, description): each volume by name (its latest valid version), then every valid
        version by uid, newest first: a front that can list only so many keeps the likeliest."""
        versions = self.repo.db.versions(state="valid")
        latest = {v.volume: v for v in versions}
        out = [(vol, f"latest valid version of {vol}: {v.uid}") for vol, v in sorted(latest.items())]
        out += [(v.uid, f"{v.volume} version {v.uid} ({v.size} bytes)") for v in reversed(versions)]
        return out

    def open(self, name: str, writable: bool = False, overlay_name: str = "default",
             valid_only: bool = True) -> ExportDevice:
        """A device over a version; valid_only=False also opens an invalid one (blocks that are
        missing or corrupt fail their reads), for copying out what is intact."""
        with self.lock:  # the metadata connection is shared; keep opens serial
            version = self.resolve(name, valid_only)
        hold = VersionHold(self.repo, version.uid)
        hold.take()  # not under the lock: it waits while an rm removes this version, and other opens,
        # and every writable close, need the lock (the database has its own)
        try:
            return self._open(version, hold, writable, overlay_name)
        except BaseException:
            hold.drop()
            raise

    def _open(self, version: Version, hold: VersionHold, writable: bool, overlay_name: str) -> ExportDevice:
        with self.lock:
            blockmap = self.maps.get(version.uid)
        if blockmap is None:  # loaded outside the lock: a big map takes a second, other opens go on
            loaded = self.repo.blockmap(version)
            with self.lock:
                blockmap = self.maps.setdefault(version.uid, loaded)
        # Readahead lands in the memory cache: at most a quarter of it, or blocks go before they are read.
        readahead = min(READAHEAD_BLOCKS, (self.cfg.cache_memory_mb << 20) // (4 * version.block_size))
        if not writable:
            return ExportDevice(version, blockmap, self.fetcher, readahead_blocks=readahead, hold=hold)
        overlay = self._acquire_overlay(version, overlay_name)
        return ExportDevice(version, blockmap, self.fetcher, overlay, readahead_blocks=readahead,
                            release=self._release_overlay, hold=hold)

    def _acquire_overlay(self, version: Version, name: str) -> Overlay:
        with self.lock:
            overlay, users = self.overlays.get((version.uid, name), (None, 0))
            if overlay is None:
                # Under the repository's versions lock, with the version checked again: rm and prune
                # check for overlays under it, so the version cannot go while its overlay is made.
                with self.repo.versions_lock():
                    self.repo.db.get_version(version.uid)
                    overlay = Overlay(self.cfg.overlay_dir, version.uid, name, version.size,
                                      version.block_size)
            self.overlays[(version.uid, name)] = (overlay, users + 1)
            return overlay

    def _release_overlay(self, overlay: Overlay) -> None:
        with self.lock:
            key = (overlay.version_uid, overlay.name)
            _, users = self.overlays[key]
            if users > 1:
                self.overlays[key] = (overlay, users - 1)
                return
            del self.overlays[key]
            # Under the lock: until close() drops the file lock, an open of the same overlay (a
            # client reconnecting) would make a second Overlay and be refused as "in use".
            overlay.close()

    def close(self) -> None:
        with self.lock:
            overlays, self.overlays = list(self.overlays.values()), {}
        for overlay, _users in overlays:  # devices never closed (a server killed mid-connection)
            overlay.flush()
            overlay.close()
        self.fetcher.close()
        self.repo.close()


class _DeviceSource:
    """An export device seen as a backup source, so commit reuses the backup writer."""

    def __init__(self, device: ExportDevice) -> None:
        self.device = device
        self.size = device.size

    def pread(self, offset: int, length: int) -> bytes:
        return self.device.pread(offset, length)

    def data_extents(self) -> list[Extent]:
        return [Extent(o, n) for o, n, hole in self.device.extents(0, self.size) if not hole]


def commit_overlay(service: ExportService, version_uid: str, overlay_name: str = "default",
                   labels: dict[str, str] | None = None, keep: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> Version:
    """Store an overlay's changed blocks as a new version whose parent is the exported one."""
    repo = service.repo
    version = repo.resolve(version_uid, valid_only=True)
    if version.uid != version_uid:
        raise BackyfsError(f"commit needs the overlay's version uid, not {version_uid!r}")
    origin = f"{version.uid}/{overlay_name}"
    done = _committed_already(service, version, overlay_name, origin)
    if done is not None:  # a commit killed before it could discard the overlay, run again
        if not keep:
            discard_overlay(service.cfg.overlay_dir, version.uid, overlay_name)
        return done
    device = service.open(version.uid, writable=True, overlay_name=overlay_name)
    try:
        changed = device.overlay.changed_blocks()
        if not changed:
            raise BackyfsError(f"overlay {overlay_name} of {version.uid} has no changes to commit")
        bs = version.block_size
        hints = [Extent(i * bs, min(bs, version.size - i * bs)) for i in changed]
        writer = BackupWriter(repo, _DeviceSource(device), version.volume, parent=version, hints=hints,
                              labels={**(labels or {}), COMMIT_LABEL: origin},
                              threads=service.cfg.threads, sample_percent=0, progress=progress)
        new_version = writer.run()
    except BaseException as exc:
        try:  # its flush fails too on a full disk: the error to report is the first one
            device.close()
        except Exception as close_exc:
            log.debug("closing overlay %s of %s failed (%s) after: %s", overlay_name, version.uid,
                        close_exc, exc)
        raise
    device.close()
    if not keep:
        discard_overlay(service.cfg.overlay_dir, version.uid, overlay_name)
    return new_version


def _committed_already(service: ExportService, version: Version, overlay_name: str,
                       origin: str) -> Version | None:
    """The valid version a commit of this overlay made after the overlay's last write, if any."""
    infos = [o for o in list_overlays(service.cfg.overlay_dir)
             if o.version_uid == version.uid and o.name == overlay_name]
    if not infos:
        return None
    for made in reversed(service.repo.db.versions(volume=version.volume, state="valid")):
        if made.labels.get(COMMIT_LABEL) == origin and made.created >= infos[0].modified:
            return made
    return None
