"""Copy-on-write overlays: writes to an exported version land here and never touch the backup.

An overlay lives in OVERLAY_DIR/<version uid>/<name>/ as
- data:  a sparse file the size of the volume; only dirty blocks are written,
- state: one byte per block: 0 clean (read the backup), 1 dirty (read data), 2 trimmed (zeros),
- meta.json: the version uid, name, size and block size, for `backyfs overlay ls`.
Both survive a restart of the server; flush() makes them durable. An exclusive lock on the
directory keeps two servers from writing one overlay.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass

from backyfs.errors import BackyfsError, NotFound, StateError

CLEAN, DIRTY, TRIMMED = 0, 1, 2
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_overlay_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise BackyfsError(f"invalid overlay name {name!r}")
    return name


@dataclass
class OverlayInfo:
    version_uid: str
    name: str
    path: str
    dirty_blocks: int
    trimmed_blocks: int
    modified: float


class Overlay:
    def __init__(self, root: str, version_uid: str, name: str, size: int, block_size: int) -> None:
        self.path = os.path.join(root, version_uid, check_overlay_name(name))
        self.version_uid, self.name = version_uid, name
        self.size, self.block_size = size, block_size
        self.block_count = -(-size // block_size)
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.path, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StateError(f"overlay {name} of {version_uid} is in use by another server") from None
        self._write_meta()
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        self.data_fd = os.open(os.path.join(self.path, "data"), flags, 0o600)
        self.state_fd = os.open(os.path.join(self.path, "state"), flags, 0o600)
        os.ftruncate(self.data_fd, size)
        raw = os.pread(self.state_fd, self.block_count, 0)
        self.state = bytearray(raw.ljust(self.block_count, b"\0"))
        os.ftruncate(self.state_fd, self.block_count)
        self.lock = threading.Lock()
        # Striped locks for read-modify-write of partial blocks by every device using this overlay.
        self.block_locks = [threading.Lock() for _ in range(64)]

    def _write_meta(self) -> None:
        meta = {"version_uid": self.version_uid, "name": self.name, "size": self.size,
                "block_size": self.block_size}
        tmp = os.path.join(self.path, "meta.json.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.rename(tmp, os.path.join(self.path, "meta.json"))

    def block_state(self, block_idx: int) -> int:
        return self.state[block_idx]

    def read_block(self, block_idx: int) -> bytes:
        offset = block_idx * self.block_size
        return os.pread(self.data_fd, min(self.block_size, self.size - offset), offset)

    def read_into(self, block_idx: int, start: int, view: memoryview) -> None:
        """Read part of a dirty block straight into a caller's buffer."""
        offset = block_idx * self.block_size + start
        while view:
            n = os.preadv(self.data_fd, [view], offset)
            if n <= 0:  # past the end of the file: cannot happen, it is truncated to the size
                raise OSError(errno.EIO, f"short read of overlay {self.path} at {offset}")
            view, offset = view[n:], offset + n

    def write_block(self, block_idx: int, data: bytes | memoryview) -> None:
        """Write a whole block (the caller merges partial writes) and mark it dirty."""
        self.write_at(block_idx, 0, data)
        self._set_state(block_idx, DIRTY)

    def write_at(self, block_idx: int, start: int, data: bytes | memoryview) -> None:
        """Write into a block that is already dirty (its other bytes are in the overlay already)."""
        offset = block_idx * self.block_size + start
        view = memoryview(data)
        while view:
            n = os.pwrite(self.data_fd, view, offset)
            view, offset = view[n:], offset + n

    def trim_block(self, block_idx: int) -> None:
        offset = block_idx * self.block_size
        length = min(self.block_size, self.size - offset)
        fallocate_punch(self.data_fd, offset, length)
        self._set_state(block_idx, TRIMMED)

    def _set_state(self, block_idx: int, value: int) -> None:
        with self.lock:
            if self.state[block_idx] != value:
                self.state[block_idx] = value
                os.pwrite(self.state_fd, bytes([value]), block_idx)

    def changed_blocks(self) -> list[int]:
        with self.lock:
            return [i for i, s in enumerate(self.state) if s != CLEAN]

    def flush(self) -> None:
        # Data before state: a state byte never claims data that a crash could lose.
        os.fsync(self.data_fd)
        os.fsync(self.state_fd)

    def close(self) -> None:
        for fd in (self.data_fd, self.state_fd, self._lock_fd):
            os.close(fd)


def fallocate_punch(fd: int, offset: int, length: int) -> None:
    """Free a range of a sparse file (it then reads as zeros); fall back to writing zeros."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    punch_hole, keep_size = 0x02, 0x01
    if libc.fallocate(fd, punch_hole | keep_size, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        os.pwrite(fd, bytes(length), offset)


def list_overlays(root: str) -> list[OverlayInfo]:
    out = []
    if not os.path.isdir(root):
        return out
    for uid in sorted(os.listdir(root)):
        for name in sorted(os.listdir(os.path.join(root, uid))):
            path = os.path.join(root, uid, name)
            try:
                state = open(os.path.join(path, "state"), "rb").read()
                modified = os.stat(os.path.join(path, "state")).st_mtime
            except OSError:
                continue
            out.append(OverlayInfo(uid, name, path, state.count(DIRTY), state.count(TRIMMED), modified))
    return out


def discard_overlay(root: str, version_uid: str, name: str) -> None:
    path = os.path.join(root, version_uid, check_overlay_name(name))
    if not os.path.isdir(path):
        raise NotFound(f"no overlay {name!r} for version {version_uid}")
    fd = os.open(os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StateError(f"overlay {name} of {version_uid} is in use by a running server") from None
    finally:
        os.close(fd)
    trash = f"{path}.discarded.{time.time_ns()}"
    os.rename(path, trash)  # atomic: a crash mid-delete leaves no half overlay
    shutil.rmtree(trash)
    parent = os.path.dirname(path)
    if not os.listdir(parent):
        os.rmdir(parent)
