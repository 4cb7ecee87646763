"""Read caches keyed by block digest, so every version and export shares them.

MemoryCache: an LRU bounded in bytes (cachetools). DiskCache: a directory of verified plaintext
blocks, bounded in bytes, least recently used evicted first; it survives restarts (the LRU order is
rebuilt from file mtimes, which hits refresh).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict

import cachetools

from backyfs.fsutil import makedirs_private

log = logging.getLogger(__name__)


class MemoryCache:
    def __init__(self, max_bytes: int) -> None:
        self.lru: cachetools.LRUCache = cachetools.LRUCache(maxsize=max(max_bytes, 1), getsizeof=len)
        self.lock = threading.Lock()
        self.enabled = max_bytes > 0

    def get(self, digest: bytes) -> bytes | memoryview | None:
        with self.lock:
            return self.lru.get(digest)

    def put(self, digest: bytes, data: bytes | memoryview) -> None:
        if not self.enabled or len(data) > self.lru.maxsize:
            return
        with self.lock:
            self.lru[digest] = data

    def __contains__(self, digest: bytes) -> bool:
        with self.lock:
            return digest in self.lru


class DiskCache:
    # Refresh a hit's mtime at most this often, so hot blocks are not re-stat'ed on every read.
    TOUCH_INTERVAL = 60.0

    def __init__(self, root: str, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self.index: OrderedDict[str, tuple[int, float]] = OrderedDict()  # hex -> (size, last touch)
        self.total = 0
        makedirs_private(root)
        self._load()

    def _load(self) -> None:
        entries = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                path = os.path.join(dirpath, name)
                if ".tmp" in name:
                    _unlink(path)  # left by a crash mid-write
                    continue
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime, name, st.st_size))
        for mtime, name, size in sorted(entries):
            self.index[name] = (size, mtime)
            self.total += size
        self._evict()

    def _path(self, hexd: str) -> str:
        return os.path.join(self.root, hexd[:2], hexd)

    def get(self, digest: bytes) -> bytes | None:
        hexd = digest.hex()
        with self.lock:
            entry = self.index.get(hexd)
            if entry is None:
                return None
            self.index.move_to_end(hexd)
        try:
            with open(self._path(hexd), "rb") as f:
                data = f.read()
        except FileNotFoundError:  # evicted by another process sharing the cache
            with self.lock:
                self._drop(hexd)
            return None
        now = time.time()
        if now - entry[1] > self.TOUCH_INTERVAL:
            with self.lock:
                if hexd not in self.index:  # evicted since (its file is gone): not back in the count
                    return data
                self.index[hexd] = (entry[0], now)
            try:
                os.utime(self._path(hexd))
            except OSError:
                pass
        return data

    def put(self, digest: bytes, data: bytes | memoryview) -> None:
        if self.max_bytes <= 0 or len(data) > self.max_bytes:
            return
        hexd = digest.hex()
        with self.lock:
            if hexd in self.index:
                return
        path = self._path(hexd)
        tmp = f"{path}.tmp{threading.get_ident()}"
        try:
            makedirs_private(os.path.dirname(path))
            with open(tmp, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(data)
            os.rename(tmp, path)
        except OSError as exc:  # a full cache disk must not fail reads
            log.warning("disk cache write failed: %s", exc.strerror)
            _unlink(tmp)
            return
        with self.lock:
            self.index[hexd] = (len(data), time.time())
            self.total += len(data)
            self._evict()

    def discard(self, digest: bytes) -> None:
        """Forget a damaged entry (e.g. a file a power cut left empty) so the next put replaces it."""
        hexd = digest.hex()
        with self.lock:
            self._drop(hexd)
        _unlink(self._path(hexd))

    def _drop(self, hexd: str) -> None:
        entry = self.index.pop(hexd, None)
        if entry:
            self.total -= entry[0]

    def _evict(self) -> None:
        while self.total > self.max_bytes and self.index:
            hexd, (size, _) = self.index.popitem(last=False)
            self.total -= size
            _unlink(self._path(hexd))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
