"""nbdkit plugin: every valid backyfs version as an NBD export.

    nbdkit python nbd_plugin/backyfs_nbd.py [config=FILE] [writable=1] [overlay=NAME] [exports=A,B]

The export name is a version uid (or unique prefix) or a volume name, meaning that volume's latest
valid version. Read-only by default; with writable=1 writes land in a copy-on-write overlay
(OVERLAY_DIR/<uid>/<overlay>) and never touch the backup. exports= limits what clients may open.
`backyfs serve` starts nbdkit with this plugin; it runs as __main__ inside nbdkit's embedded
Python, so it finds the backyfs package through $BACKYFS_SITE (a site-packages directory).
"""

import errno
import logging
import os
import site
import sys
import threading
import traceback

if os.environ.get("BACKYFS_SITE"):  # the venv with backyfs; addsitedir runs its .pth (editable installs)
    _before = list(sys.path)
    site.addsitedir(os.environ["BACKYFS_SITE"])
    # Ahead of Debian's dist-packages, which the embedded interpreter searches first: it holds older
    # boto3/botocore/urllib3 and _cffi_backend, which would shadow the venv's.
    sys.path[:] = [p for p in sys.path if p not in _before] + _before

import nbdkit  # noqa: E402  (provided by nbdkit's python plugin)

from backyfs.config import load_config  # noqa: E402
from backyfs.errors import BackyfsError, CorruptObject, NotFound, ObjectMissing, StateError  # noqa: E402
from backyfs.export.device import ExportDevice  # noqa: E402
from backyfs.export.overlay import check_overlay_name  # noqa: E402
from backyfs.export.service import ExportService  # noqa: E402

API_VERSION = 2
HOLE = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
MAX_EXPORTS = 10_000  # nbdkit_add_export refuses more ("too many exports"), failing the whole list

_params: dict[str, str] = {"overlay": "default"}
_service: ExportService | None = None
_allowed_names: set[str] = set()  # names from exports=, empty: everything
_allowed_uids: set[str] = set()  # the versions those names resolved to at start-up
# Export name -> the version it meant when this server first resolved it. A volume name keeps
# meaning that version for the server's life: a client that reconnects (qemu does) must find the
# same disk, not the next backup's with an empty overlay and its own writes gone.
_pinned: dict[str, str] = {}
_pinned_lock = threading.Lock()


# --- errors --------------------------------------------------------------------------------
def _errno_for(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno  # e.g. ENOSPC from the overlay's disk
    if isinstance(exc, CorruptObject | ObjectMissing):
        return errno.EIO  # a damaged or missing stored block: the core logged its index
    if isinstance(exc, NotFound):
        return errno.ENOENT
    if isinstance(exc, StateError):
        return errno.EBUSY  # e.g. the overlay is locked by another server
    if isinstance(exc, ValueError):
        return errno.EINVAL
    return errno.EIO


def _fail(exc: BaseException) -> None:
    """Set the errno the client sees, then let the exception through: nbdkit logs it (one line, as
    sys.tracebacklimit is 0; our own log keeps the traceback of anything unexpected)."""
    if not isinstance(exc, BackyfsError | OSError | ValueError):
        trace = "".join(traceback.format_exception(exc, limit=64))  # an explicit limit overrides 0
        logging.getLogger("backyfs.nbd").error("unexpected error: %s", trace)
    nbdkit.set_error(_errno_for(exc))
    raise exc


# --- configuration and lifecycle -----------------------------------------------------------
def config(key: str, value: str) -> None:
    if key not in ("config", "writable", "overlay", "exports"):
        raise RuntimeError(f"unknown parameter {key!r}: use config=, writable=, overlay=, exports=")
    _params[key] = value


def config_complete() -> None:
    load_config(_params.get("config"))  # fail at start-up, not at the first connection
    check_overlay_name(_params["overlay"])
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="backyfs-nbd: %(message)s")
    sys.tracebacklimit = 0  # nbdkit prints each failed request's exception: one line, not a traceback


def thread_model() -> int:
    return nbdkit.THREAD_MODEL_PARALLEL  # ExportDevice and its caches are thread-safe


def after_fork() -> None:
    # Made after nbdkit forked (when it does): the SQLite connection and readahead threads must
    # belong to the serving process.
    global _service
    _service = ExportService(load_config(_params.get("config")))
    names = [n.strip() for n in _params.get("exports", "").split(",") if n.strip()]
    _allowed_names.update(names)
    for name in names:
        _allowed_uids.add(_pin(name))


def cleanup() -> None:
    if _service is not None:
        _service.close()


def _writable() -> bool:
    return _params.get("writable", "0").lower() in ("1", "true", "yes", "on")


# --- exports -------------------------------------------------------------------------------
def list_exports(readonly: bool, is_tls: bool) -> list[tuple[str, str]]:
    with _pinned_lock:
        pinned = dict(_pinned)
    exports = [(n, f"{n}: version {pinned[n]}, fixed while this server runs" if n in pinned else d)
               for n, d in _service.list_exports()]
    if _allowed_names:
        exports = [(n, d) for n, d in exports if n in _allowed_names or n in _allowed_uids]
    if len(exports) > MAX_EXPORTS:  # one more and nbdkit lists nothing at all
        logging.getLogger("backyfs.nbd").warning(
            "listing %d of %d exports (volumes first, then the newest versions): nbdkit lists at most "
            "%d; every version can still be opened by its uid", MAX_EXPORTS, len(exports), MAX_EXPORTS)
    return exports[:MAX_EXPORTS]


def default_export(readonly: bool, is_tls: bool) -> str:
    """The only allowed name, or the only volume; a client asking for "" otherwise gets ENOENT."""
    if len(_allowed_names) == 1:
        return next(iter(_allowed_names))
    volumes = {v.volume for v in _service.repo.db.versions(state="valid")}
    if not _allowed_names and len(volumes) == 1:
        return volumes.pop()
    nbdkit.set_error(errno.ENOENT)
    raise NotFound("no default export: name a version or volume")


def _pin(name: str) -> str:
    """The version uid NAME means for this server: resolved at its first use, then fixed."""
    with _pinned_lock:
        uid = _pinned.get(name)
    if uid is None:
        uid = _service.resolve(name).uid  # validates the untrusted name first
        if name != uid:
            with _pinned_lock:
                uid = _pinned.setdefault(name, uid)
    return uid


def open(readonly: bool) -> ExportDevice:
    try:
        name = nbdkit.export_name()
        uid = _pin(name)
        if _allowed_names and name not in _allowed_names and uid not in _allowed_uids:
            raise NotFound(f"export {name!r} is not served")
        try:
            return _service.open(uid, writable=_writable() and not readonly,
                                 overlay_name=_params["overlay"])
        except NotFound:
            if name == uid:
                raise
            raise NotFound(f"version {uid}, which {name!r} named when this server first opened it, is "
                           "gone or no longer valid; restart the server to serve the volume's latest "
                           "version") from None
    except Exception as exc:
        _fail(exc)


def close(h: ExportDevice) -> None:
    h.close()


def export_description(h: ExportDevice) -> str:
    return f"{h.version.volume} version {h.version.uid}"


def get_size(h: ExportDevice) -> int:
    return h.size


def is_rotational(h: ExportDevice) -> bool:
    return False


def block_size(h: ExportDevice) -> tuple[int, int, int]:
    """(minimum, preferred, maximum). Preferring whole blocks halves a sequential reader's CPU cost
    (nbdcopy then asks for 4 MiB, not 256 KiB, per request) and spares writes read-modify-write."""
    return 1, h.block_size, max(32 << 20, h.block_size)


# --- capabilities --------------------------------------------------------------------------
def can_write(h: ExportDevice) -> bool:
    return h.writable


def can_flush(h: ExportDevice) -> bool:
    return h.writable


def can_trim(h: ExportDevice) -> bool:
    return h.writable


def can_zero(h: ExportDevice) -> bool:
    return h.writable


def can_fast_zero(h: ExportDevice) -> bool:
    # Whole blocks become "trimmed" state bytes; partial ones cost no more than the write they replace.
    return h.writable


def can_fua(h: ExportDevice) -> int:
    return nbdkit.FUA_NATIVE if h.writable else nbdkit.FUA_NONE  # pwrite/zero/trim flush on FLAG_FUA


def can_extents(h: ExportDevice) -> bool:
    return True


def can_cache(h: ExportDevice) -> int:
    return nbdkit.CACHE_NATIVE  # prefetch into the memory cache


def can_multi_conn(h: ExportDevice) -> bool:
    # Read-only: trivially consistent. Writable: every connection of this process shares one Overlay
    # (ExportService refcounts it), so a completed write is visible to all connections at once, and
    # flush on any connection fsyncs the shared data and state files, covering every connection's
    # completed writes - what NBD multi-conn requires.
    return True


# --- data ----------------------------------------------------------------------------------
def pread(h: ExportDevice, buf: bytearray, offset: int, flags: int) -> None:
    try:
        h.readinto(buf, offset)
    except Exception as exc:
        _fail(exc)


def pwrite(h: ExportDevice, buf: bytes, offset: int, flags: int) -> None:
    _write(h, lambda: h.pwrite(buf, offset), flags)


def zero(h: ExportDevice, count: int, offset: int, flags: int) -> None:
    # Without FLAG_MAY_TRIM (the client's NO_HOLE) the zeros must be allocated, not a hole.
    _write(h, lambda: h.zero(offset, count, may_trim=bool(flags & nbdkit.FLAG_MAY_TRIM)), flags)


def trim(h: ExportDevice, count: int, offset: int, flags: int) -> None:
    _write(h, lambda: h.trim(offset, count), flags)


def _write(h: ExportDevice, op, flags: int) -> None:
    if not h.writable:
        nbdkit.set_error(errno.EROFS)
        raise BackyfsError("the export is read-only")
    try:
        op()
        if flags & nbdkit.FLAG_FUA:
            h.flush()
    except Exception as exc:
        _fail(exc)


def flush(h: ExportDevice, flags: int) -> None:
    try:
        h.flush()
    except Exception as exc:
        _fail(exc)


def cache(h: ExportDevice, count: int, offset: int, flags: int) -> None:
    h.prefetch(offset, count)


def extents(h: ExportDevice, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    """Unallocated blocks (never stored, or trimmed in the overlay) as holes that read as zeros."""
    out = []
    for start, length, hole in h.extents(offset, count):
        out.append((start, length, HOLE if hole else 0))
        if flags & nbdkit.FLAG_REQ_ONE:
            break
    return out
