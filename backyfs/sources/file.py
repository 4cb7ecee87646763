"""Image files and block devices as backup sources and restore targets."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import time
from collections.abc import Iterator

from backyfs.errors import BackyfsError, SourceError
from backyfs.repository.extents import Extent

BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F


def _device_size(fd: int) -> int:
    buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    return struct.unpack("Q", buf)[0]


class FileSource:
    """Reads a regular file or block device; holes of sparse files are found with SEEK_DATA/SEEK_HOLE
    and never read."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below); regular
            # files and block devices ignore the flag.
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            st = os.fstat(self.fd)
        except OSError as exc:
            raise SourceError(f"cannot open source {path}: {exc.strerror}") from None
        self.is_device = stat.S_ISBLK(st.st_mode)
        if not (self.is_device or stat.S_ISREG(st.st_mode)):
            os.close(self.fd)
            raise SourceError(f"source {path} is neither a regular file nor a block device")
        self.size = _device_size(self.fd) if self.is_device else st.st_size
        # Sequential reads: tell the kernel to read ahead aggressively.
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def pread(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self.fd, length, offset)
        except OSError as exc:
            raise SourceError(f"cannot read {self.path} at offset {offset}: {exc.strerror}") from None

    def data_extents(self) -> Iterator[Extent]:
        if self.is_device:
            yield Extent(0, self.size)
            return
        offset = 0
        while offset < self.size:
            try:
                start = os.lseek(self.fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after offset
                    return
                yield Extent(offset, self.size - offset)  # no SEEK_DATA support: all data
                return
            end = os.lseek(self.fd, start, os.SEEK_HOLE)
            yield Extent(start, end - start)
            offset = end

    def close(self) -> None:
        os.close(self.fd)


STALE_PARTIAL_S = 600.0  # a live restore rewrites its partial file far more often than this


def _remove_stale_partials(directory: str, name: str) -> None:
    """Remove the partial files of killed restores to the same name (kill -9, a power cut): those
    of processes gone that nobody has written to for STALE_PARTIAL_S. The age guards a restore of
    another PID namespace (a container) sharing the directory."""
    prefix = f".{name}.backyfs-restore-"
    try:
        entries = [e for e in os.scandir(directory or ".") if e.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        pid = entry.name[len(prefix):]
        try:
            if not pid.isdigit() or not entry.is_file(follow_symlinks=False):
                continue
            if time.time() - entry.stat(follow_symlinks=False).st_mtime < STALE_PARTIAL_S:
                continue
            try:
                os.kill(int(pid), 0)
                continue  # alive
            except ProcessLookupError:
                pass
            except PermissionError:  # alive, another user's
                continue
            os.unlink(entry.path)
        except (OSError, OverflowError):
            continue


class FileTarget:
    """Writes a restore into a file (created sparse) or onto a block device."""

    def __init__(self, path: str, size: int, *, force: bool = False, sparse: bool = False) -> None:
        self.path = path
        exists = os.path.lexists(path)  # a dangling symlink too: writing through it needs --force
        is_device = os.path.exists(path) and stat.S_ISBLK(os.stat(path).st_mode)
        if exists and not force:
            raise BackyfsError(f"restore target {path} exists; use --force to overwrite it")
        # A new file is written under a hidden name and linked to its own at the end: a restore
        # killed (kill -9, a power cut) cannot leave a full-size file that looks complete.
        head, name = os.path.split(path)
        self.writing = path if exists else os.path.join(head, f".{name}.backyfs-restore-{os.getpid()}")
        if not exists:  # one by that name can only be a dead process's (the pid is ours now)
            # Any other failure (a read-only filesystem) fails the open below, which names the target.
            with contextlib.suppress(OSError):
                os.unlink(self.writing)
            _remove_stale_partials(head, name)
        self.fd = -1
        try:
            flags = os.O_WRONLY | os.O_CLOEXEC | (0 if is_device else os.O_CREAT)
            if not exists:  # a new file, really: not through a dangling symlink, not a racing one
                flags |= os.O_EXCL | os.O_NOFOLLOW
            elif is_device:  # exclusive: the kernel refuses (EBUSY) a mounted or in-use device
                flags |= os.O_EXCL
            self.fd = os.open(self.writing, flags, 0o600)
            if is_device:
                if _device_size(self.fd) < size:
                    raise BackyfsError(f"device {path} is smaller than the version ({size} bytes)")
                # --sparse on a device: the caller promises it reads as zeros already.
                self.zeroed = sparse
            else:
                os.ftruncate(self.fd, 0)  # drop old content: what we skip then reads as zeros
                os.ftruncate(self.fd, size)
                self.zeroed = True
        except BaseException as exc:
            self._undo_open(exists)
            if not isinstance(exc, OSError):
                raise
            if is_device and exc.errno == errno.EBUSY:
                raise BackyfsError(f"restore target {path} is in use (mounted, or open by another "
                                   "program): refusing to overwrite it") from None
            reason = exc.strerror
            if exc.errno == errno.EFBIG:  # ext4's largest file is 16 TiB
                reason = f"its filesystem cannot hold a file of {size} bytes"
            raise BackyfsError(f"cannot open restore target {path}: {reason}") from None
        self.is_device = is_device
        self.created = not exists
        self.written = False  # every block is written and synced
        self.linked = False  # the restored file has its own name: abandon() removes that too

    def _close(self) -> None:
        """Close the fd once: closing its number again could close another file that reused it."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def _undo_open(self, existed: bool) -> None:
        """A target that could not be set up leaves nothing: no open fd, no partial file."""
        self._close()
        if not existed:
            with contextlib.suppress(OSError):
                os.unlink(self.writing)

    def pwrite(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(self.fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:
            raise BackyfsError(f"cannot write {self.path} at offset {offset}: {exc.strerror}") from None

    def write_zeroes(self, offset: int, length: int) -> None:
        if self.is_device:
            try:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
                return
            except OSError:
                pass
        zeros = bytes(min(length, 4 << 20))  # a run of holes can be a GiB: written piece by piece
        for start in range(offset, offset + length, len(zeros)):
            self.pwrite(start, zeros[: offset + length - start])

    def finish(self) -> None:
        os.fsync(self.fd)
        self._close()
        self.written = True
        if self.writing == self.path:
            return
        try:
            os.link(self.writing, self.path)  # not rename: a file made there meanwhile stays
        except FileExistsError:
            raise BackyfsError(f"restore target {self.path} appeared during the restore and is left as "
                               "it is") from None
        except OSError as exc:
            raise BackyfsError(f"cannot create restore target {self.path}: {exc.strerror}") from None
        self.linked = True
        os.unlink(self.writing)
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def abandon(self) -> str:
        """After a failed or interrupted restore: remove the file if this restore created it (a
        full-size file would look complete), else leave it. Says which, for the user."""
        self._close()
        if not self.created:
            return f"{self.path} is incomplete"
        names = [self.writing, self.path] if self.linked else [self.writing]
        try:
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)
        except OSError as exc:
            return f"{name} is incomplete (cannot remove it: {exc.strerror})"
        if self.written:  # complete, but it could not take its name (or keep it, durably)
            return "removed the restored image"
        return f"removed the incomplete {self.path}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
