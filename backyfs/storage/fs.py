"""A store in a local directory: one file per key, written to a temporary file and renamed; flush fsyncs."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import stat
import threading
import time
import weakref
from collections.abc import Iterator

from backyfs.errors import CorruptObject, ObjectMissing, StoreUnavailable
from backyfs.fsutil import makedirs_private
from backyfs.storage.base import ObjectStore


def check_key(key: str) -> str:
    """Keys are relative '/'-separated names without empty, '.' or '..' parts."""
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts) or "\0" in key:
        raise ValueError(f"invalid object key {key!r}")
    return key


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_LOCKED = 0x2000  # Linux's; not in Python 3.11's mmap module
_lock_refused = False  # the memlock limit refused once (not root): map unlocked from then on


def map_readonly(fd: int, size: int) -> memoryview:
    """A read-only view of the first SIZE bytes of FD's file, mapped (MAP_POPULATE: read and mapped
    in one call, the GIL released), unmapped when the last view of it goes.

    libc's mmap, not the mmap module: an mmap.mmap keeps a duplicate of the fd for its life (until
    Python 3.13's trackfd), so a memory cache of mapped blocks held one fd per block and ran out of
    them (64 KiB blocks: 4,096 in the default 256 MiB cache, past the usual limit of 1,024).
    MAP_LOCKED where the memlock limit allows (root): the kernel may otherwise drop a cached
    block's pages under memory pressure and read them from disk again, unchecked against the
    digest that their first read was checked against."""
    global _lock_refused
    flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
    addr = None if _lock_refused else _libc.mmap(None, size, mmap.PROT_READ, flags | _MAP_LOCKED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        if not _lock_refused and ctypes.get_errno() in (errno.EAGAIN, errno.EPERM):  # the limit
            _lock_refused = True
        addr = _libc.mmap(None, size, mmap.PROT_READ, flags, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    pages = (ctypes.c_char * size).from_address(addr)
    # Views keep `pages` alive, not just the first. Not at exit: a daemon thread may still read it.
    weakref.finalize(pages, _libc.munmap, addr, size).atexit = False
    return memoryview(pages).cast("B").toreadonly()


class FilesystemStore(ObjectStore):
    def __init__(self, root: str, fsync: bool = True) -> None:
        self.root = os.path.abspath(root)
        self.url = f"file:{self.root}"
        self._versions_dir = os.path.join(self.root, "versions")
        self.fsync = fsync
        self._lock = threading.Lock()
        self._dirty_dirs: set[str] = set()
        self._dirty_files: set[str] = set()
        try:
            makedirs_private(self.root)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create store directory {self.root}: {exc.strerror}") from None

    def _path(self, key: str) -> str:
        return os.path.join(self.root, check_key(key))

    def put(self, key: str, data: bytes | memoryview) -> None:
        self._write(key, [memoryview(data)])

    def put_split(self, key: str, head: bytes, rest: bytes | memoryview) -> None:
        self._write(key, [memoryview(head), memoryview(rest)])

    def _write(self, key: str, parts: list[memoryview]) -> None:
        path = self._path(key)
        tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident():x}"
        directory = os.path.dirname(path)
        try:
            if not os.path.isdir(directory):
                makedirs_private(directory)
                self._touched(os.path.dirname(directory))  # the new directory's own entry
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, parts)
                if self.fsync:  # start the writeback now; flush() waits for it
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            self._touched(directory, path if self.fsync else None)
        except OSError as exc:
            with contextlib.suppress(OSError):  # the write's error is the one to report
                _unlink_quietly(tmp)
            reason = "store is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
            raise StoreUnavailable(f"cannot write {key} to {self.url}: {reason}") from None

    def _open_object(self, key: str) -> tuple[int, int]:
        """A read-only descriptor of key's file and its size. Something else in its place (a
        directory, a FIFO that would block the open or read for ever, a device) is a corrupt object,
        not a dead store."""
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ObjectMissing(f"object {key} is missing from {self.url}") from None
        except IsADirectoryError:
            raise CorruptObject(f"{key}: not a regular file in {self.url}") from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {key} from {self.url}: {exc.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise CorruptObject(f"{key}: not a regular file in {self.url}")
        return fd, st.st_size

    def get(self, key: str) -> bytes:
        fd, _size = self._open_object(key)
        try:
            with open(fd, "rb", closefd=True) as f:
                return f.read()
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {key} from {self.url}: {exc.strerror}") from None

    def get_split(self, key: str, head: int) -> tuple[bytes, bytes | memoryview]:
        """The object as its first `head` bytes and a read-only view of the rest, mapped rather than
        read: the pages stay the page cache's, so a memory cache of blocks grows no anonymous memory
        (whose first touch is slow on VMs) and nothing is copied. Objects are never modified in
        place (written by rename, removed by unlink), so a mapping stays valid as long as it lives."""
        fd, size = self._open_object(key)
        try:
            if size <= head:  # too short to hold a payload: the caller reports the truncation
                return os.pread(fd, head, 0), b""
            view = map_readonly(fd, size)
            return bytes(view[:head]), view[head:]
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {key} from {self.url}: {exc.strerror}") from None
        finally:
            os.close(fd)

    def will_need(self, keys: list[str]) -> None:
        # Asynchronous readahead into the page cache: the disk works on the next blocks while the
        # reading threads verify this one (a cold export read ran 7% faster).
        for key in keys:
            try:
                fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                continue  # a missing object is reported by the read that needs it
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def size(self, key: str) -> int:
        try:
            return os.stat(self._path(key)).st_size
        except FileNotFoundError:
            raise ObjectMissing(f"object {key} is missing from {self.url}") from None

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            _unlink_quietly(path)
        except OSError as exc:
            raise StoreUnavailable(f"cannot delete {key} from {self.url}: {exc.strerror}") from None
        if key.startswith("versions/"):  # a removed version's directory: every listing walks it
            with contextlib.suppress(OSError):  # not empty yet (its other objects go next)
                os.rmdir(os.path.dirname(path))

    def list(self, prefix: str = "") -> Iterator[str]:
        # Walk only the directory the prefix points into, so listing "versions/" does not visit blocks.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = os.path.join(self.root, base) if base else self.root

        def unreadable(exc: OSError) -> None:
            # A directory that vanished (no versions yet, or one rm'd meanwhile) lists nothing; one that
            # cannot be read must fail the listing: rebuild-db would leave its versions out, and gc
            # would then delete their blocks as unreferenced.
            if not isinstance(exc, FileNotFoundError):
                raise StoreUnavailable(f"cannot list {exc.filename or start} in {self.url}: "
                                       f"{exc.strerror}") from None

        for dirpath, _dirs, files in os.walk(start, onerror=unreadable):
            rel = os.path.relpath(dirpath, self.root)
            for name in files:
                if ".tmp." in name:
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    yield key

    def sweep_temporary(self, older_than_s: float) -> int:
        """Temporary files of puts killed before their rename (up to a block each). Only old ones:
        a put of another process may be writing a young one right now."""
        removed, cutoff = 0, time.time() - older_than_s
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if ".tmp." not in name:
                    continue
                path = os.path.join(dirpath, name)
                try:
                    if os.lstat(path).st_mtime < cutoff:
                        os.unlink(path)
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def _touched(self, directory: str, path: str | None = None) -> None:
        with self._lock:
            self._dirty_dirs.add(directory)
            if path is not None:
                self._dirty_files.add(path)

    def flush(self) -> None:
        """Make every put so far durable: fsync the objects written since the last flush (put only
        started their writeback, so a backup's writes overlap its hashing), then the directories
        that got new entries. An object renamed but not yet flushed may be lost in a power cut;
        that is the contract (the writer records a block only after flush). Unlike syncfs, this
        never waits for unrelated dirty data on the same filesystem, such as a restore beside it."""
        with self._lock:
            dirs, self._dirty_dirs = self._dirty_dirs, set()
            files, self._dirty_files = self._dirty_files, set()
        try:
            for path in files:
                _fsync_path(path, missing_ok=True)  # deleted since it was written: nothing to keep
            for directory in sorted(dirs, key=len, reverse=True):  # then the names of the objects
                # Gone may be only a removed version's directory (delete removes it), never a
                # block directory: that would mean objects were lost.
                _fsync_path(directory, missing_ok=os.path.dirname(directory) == self._versions_dir)
        except OSError as exc:
            with self._lock:
                self._dirty_dirs |= dirs  # try them again on the next flush
                self._dirty_files |= files
            raise StoreUnavailable(f"cannot sync {self.url}: {exc.strerror}") from None


def _fsync_path(path: str, missing_ok: bool) -> None:
    """fsync a file or directory by name."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if not missing_ok:
            raise
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, parts: list[memoryview]) -> None:
    """writev until every part is written (a write may be short)."""
    parts = [p.cast("B") for p in parts if p.nbytes]
    while parts:
        written = os.writev(fd, parts)
        while parts and written >= parts[0].nbytes:
            written -= parts[0].nbytes
            parts.pop(0)
        if parts and written:
            parts[0] = parts[0][written:]


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
