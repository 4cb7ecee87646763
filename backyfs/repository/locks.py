"""The repository's flock files and volume names: light (no SQLite, zstd or libsodium), so that a
backup takes its volume's lock, and with it its RBD snapshot, before the repository modules load."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import time
from collections.abc import Iterator
from typing import IO

from backyfs.errors import AlreadyRunning, BackyfsError, StateError
from backyfs.fsutil import makedirs_private

_VOLUME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
UID_RE = re.compile(r"^[0-9a-f]{12}$")


def check_volume_name(volume: str) -> str:
    if not _VOLUME_RE.match(volume) or UID_RE.match(volume):
        raise BackyfsError(f"invalid volume name {volume!r}: use letters, digits, '.', '_' and '-', "
                           "starting with a letter or digit (up to 128, not 12 hex digits, which look "
                           "like a version uid)")
    return volume


def lock_path(db_path: str, name: str = "") -> str:
    """DB_DIR/locks/NAME, where the repository's flock files live (the directory without NAME)."""
    return os.path.join(os.path.dirname(os.path.abspath(db_path)), "locks", name)


def open_lock_file(db_path: str, name: str) -> int:
    """An fd of DB_DIR/locks/NAME for flock: the locks die with the process, kill -9 included."""
    makedirs_private(lock_path(db_path))
    return os.open(lock_path(db_path, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def lock_volume(db_path: str, volume: str) -> IO[str]:
    """One backup per volume at a time on a repository: a second one would resume the first's
    pending version under its feet (and an RBD one remove its snapshot). Closing the returned
    file releases the lock; so does the process's death, kill -9 included."""
    fd = open_lock_file(db_path, f"{volume}.lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"a backup of volume {volume} is already running") from None
    return os.fdopen(fd)


def running_backup(db_path: str) -> str | None:
    """The volume of a backup running on the repository, if any: it holds its volume's lock from
    before its snapshot on (the activity lock only once it writes)."""
    try:
        names = sorted(n for n in os.listdir(lock_path(db_path)) if n.endswith(".lock") and n[0] != ".")
    except FileNotFoundError:
        return None
    for name in names:
        fd = os.open(lock_path(db_path, name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return name[: -len(".lock")]
        finally:
            os.close(fd)
    return None


# --- readers of a version -----------------------------------------------------------------
# Servers (serve, mount, restore-file) hold a shared lock per version they read; rm and prune take
# it exclusively while they remove one, so a version being read is never removed under its reader
# (gc would then delete its blocks, and reads fail with EIO).
READER_WAIT = 30.0  # an rm holds it for one version's removal: longer means a stopped process


def _reader_lock_name(uid: str) -> str:
    return f".reader-{uid}.lock"  # a leading dot: never a volume's lock (running_backup skips them)


def hold_reader(db_path: str, uid: str) -> int | None:
    """A shared lock on version UID for as long as the returned fd is open. None when its file
    cannot be made (read-only media, where nothing can remove a version either)."""
    try:
        fd = open_lock_file(db_path, _reader_lock_name(uid))
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return None
        raise BackyfsError(f"cannot hold version {uid} for reading: {exc.strerror}") from None  # EMFILE
    deadline = time.monotonic() + READER_WAIT
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    path = lock_path(db_path, _reader_lock_name(uid))
                    raise StateError(f"version {uid} has been being removed for {READER_WAIT:g} s (a "
                                     f"stopped rm or prune? fuser -v {path})") from None
                time.sleep(0.05)
    except BaseException:  # also Ctrl-C while waiting: no fd left behind
        os.close(fd)
        raise


@contextlib.contextmanager
def no_readers(db_path: str, uid: str) -> Iterator[None]:
    """Held while version UID is removed; StateError at once if a server is reading it."""
    path = lock_path(db_path, _reader_lock_name(uid))
    fd = open_lock_file(db_path, _reader_lock_name(uid))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateError(f"version {uid} is being read by a running server (backyfs serve, mount or "
                             f"restore-file): stop it first (fuser -v {path})") from None
        yield
        with contextlib.suppress(OSError):  # removed: its lock file is of no more use
            os.unlink(path)
    finally:
        os.close(fd)
