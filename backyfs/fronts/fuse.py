"""The FUSE front: every valid version as files (see backyfs.fronts.tree for the layout).

pyfuse3 on trio. Callbacks are thin adapters over the export core: blocking work (metadata queries,
device opens, reads that miss the memory cache, writes, flushes) runs in threads under a
CapacityLimiter; reads the memory cache can serve are answered inline on the loop
(ExportDevice.pread_cached never waits for I/O), which keeps small cached reads cheap.

Devices are opened lazily, one per version, and shared by all handles. In a --writable mount a
version's device carries its overlay only once a file of it is opened for writing (or when the
overlay already exists), so browsing a mount leaves no empty overlays behind. Errors become errno
values here and nowhere else: ENOENT for unknown paths, EIO for unreadable blocks.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from backyfs.errors import BackyfsError, NotFound, StateError
from backyfs.export.device import ExportDevice
from backyfs.export.partitions import find_partitions
from backyfs.export.service import ExportService
from backyfs.fronts.tree import DIRS, IMAGE, INFO, LINK, PART, ROOT, VDIR, VOLUME, Node, Tree
from backyfs.metadata.db import Version

log = logging.getLogger(__name__)
REFRESH_SECONDS = 1.0  # re-read the version list at most this often
MAX_IDLE_DEVICES = 8  # open devices kept with no file open: reopening loads the map again
ENTRY_TIMEOUT = 1.0  # the kernel re-validates names this often, so removed versions vanish
IMAGE_ATTR_TIMEOUT = 60.0  # a version's size and times never change
BLKSIZE = 1 << 20  # st_blksize: tools that size buffers by it (cp, cat) then read in big requests


def errno_of(exc: BaseException) -> int:
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    if isinstance(exc, NotFound):
        return errno.ENOENT
    if isinstance(exc, StateError):
        return errno.EBUSY if "in use" in str(exc) else errno.EROFS
    if isinstance(exc, BackyfsError):  # CorruptObject, StoreUnavailable, ...
        return errno.EIO
    if isinstance(exc, ValueError):
        return errno.EINVAL
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    log.exception("unexpected error in a FUSE callback", exc_info=exc)
    return errno.EIO


def fuse_errors(fn: Callable) -> Callable:
    """Turn any exception into a FUSEError: pyfuse3 ends the main loop on anything else."""

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> Any:
        try:
            return await fn(*args)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise pyfuse3.FUSEError(errno_of(exc)) from None

    return wrapper


def fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class Held:
    """A version's open device, shared by every handle of its files."""

    def __init__(self, device: ExportDevice) -> None:
        self.device = device
        self.handles = 0
        self.writes = 0  # a changed partition table is re-read when this moved


@dataclass
class Handle:
    node: Node
    held: Held | None  # None for info.json
    writable: bool


class Devices:
    def __init__(self, service: ExportService, writable: bool, overlay_name: str, run: Callable) -> None:
        self.service, self.writable, self.overlay_name, self.run = service, writable, overlay_name, run
        self.held: dict[str, Held] = {}
        self.locks: dict[str, trio.Lock] = {}
        self.idle: dict[str, None] = {}  # held devices no handle uses, least recently idle first

    def _overlay_exists(self, uid: str) -> bool:
        return os.path.isdir(os.path.join(self.service.cfg.overlay_dir, uid, self.overlay_name))

    def _open(self, uid: str, for_write: bool) -> ExportDevice:
        writable = self.writable and (for_write or self._overlay_exists(uid))
        return self.service.open(uid, writable=writable, overlay_name=self.overlay_name)

    async def get(self, uid: str, for_write: bool = False) -> Held:
        async with self.locks.setdefault(uid, trio.Lock()):  # one open (and overlay lock) per version
            held = self.held.get(uid)
            hold = held.device.hold if held is not None else None
            if hold is not None and not hold.held:
                try:  # dropped while idle: the version may be gone
                    await self.run(hold.take)
                except NotFound:
                    await self.close_unused({uid})
                    raise
            if held is None:
                held = self.held[uid] = Held(await self.run(self._open, uid, for_write))
            elif for_write and not held.device.writable:
                # Same data before and after: the overlay is new and empty (else it was open already).
                read_only, held.device = held.device, await self.run(self._open, uid, True)
                await self.run(read_only.close)
            self.idle.pop(uid, None)
            return held

    async def idle_now(self, uid: str) -> None:
        """The version's device has no handle left: keep the MAX_IDLE_DEVICES most recently used
        such devices open, close older ones. Browsing 600 versions kept all 600 open (441 MB of
        block maps; 2,418 fds with overlays, past the usual limit of 1,024)."""
        async with self.locks.setdefault(uid, trio.Lock()):  # not beside get(), which takes the hold
            held = self.held.get(uid)
            if held is None or held.handles:  # (opened again meanwhile)
                return
            self.idle.pop(uid, None)
            self.idle[uid] = None
            hold = held.device.hold
            if hold is not None and hold.held:  # an idle device must not keep rm from removing it
                await self.run(hold.drop)
        while len(self.idle) > MAX_IDLE_DEVICES:
            oldest = next(iter(self.idle))
            del self.idle[oldest]
            async with self.locks.setdefault(oldest, trio.Lock()):  # not while get() reopens it
                await self.close_unused({oldest})

    async def close_unused(self, uids: set[str]) -> None:
        """Close the devices of these versions that no handle uses (closing flushes overlays)."""
        unused = [self.held.pop(uid) for uid in uids if uid in self.held and self.held[uid].handles == 0]
        for uid in uids:
            self.idle.pop(uid, None)
        for held in unused:
            await self.run(held.device.close)

    def close_all(self) -> None:
        for held in self.held.values():
            try:
                held.device.close()
            except Exception as exc:  # flush failures must not keep the others open
                log.error("closing version %s: %s", held.device.version.uid, exc)
        self.held.clear()


class BackyfsOperations(pyfuse3.Operations):
    supports_dot_lookup = True

    def __init__(self, service: ExportService, writable: bool = False, overlay_name: str = "default",
                 threads: int = 8) -> None:
        super().__init__()
        self.service, self.writable = service, writable
        self.limiter = trio.CapacityLimiter(threads)
        self.devices = Devices(service, writable, overlay_name, self.run)
        self.tree = Tree()
        self.handles: dict[int, Handle] = {}
        self.dirs: dict[int, list[tuple[str, int]]] = {}
        self.next_fh = 1
        self.refreshed = -REFRESH_SECONDS
        self.refresh_lock = trio.Lock()
        self.shown: list[Version] = []  # the versions the tree shows
        self.db_stamp: int | None = None  # the database's data_version when they were read
        self.parts_seen: dict[str, int] = {}  # uid -> Held.writes when its partitions were read
        self.uid, self.gid = os.getuid(), os.getgid()

    async def run(self, fn: Callable, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    # --- keeping the tree current ---------------------------------------------------------
    async def refresh(self, force: bool = False) -> None:
        """Re-read the valid versions (at most once a second), and rebuild the tree only if they
        changed: at 50,000 versions a rebuild takes seconds on the event loop, and once it took
        longer than a second every lookup started another one."""
        async with self.refresh_lock:
            if not force and time.monotonic() - self.refreshed < REFRESH_SECONDS:
                return
            db = self.service.repo.db
            stamp = await self.run(db.data_version)  # first: a change after it is seen next time
            if force or stamp != self.db_stamp:  # another process committed something
                versions = await self.run(db.versions, None, "valid")
                if versions != self.shown:
                    await self.devices.close_unused(self.tree.update(versions))
                    self.shown = versions
                self.db_stamp = stamp
            self.refreshed = time.monotonic()

    async def ensure_partitions(self, uid: str) -> None:
        held = self.devices.held.get(uid)
        if uid in self.tree.partitions and uid in self.parts_seen and (
                held is None or self.parts_seen[uid] == held.writes):
            return  # read, and not written since (nothing writes through a closed device)
        try:
            held = await self.devices.get(uid)
            if self.parts_seen.get(uid) == held.writes and uid in self.tree.partitions:
                await self.devices.idle_now(uid)
                return
            seen, dev = held.writes, held.device
            held.handles += 1  # a refresh that drops the version meanwhile must not close dev under us
            try:
                parts = await self.run(find_partitions, dev.pread, dev.size)
            finally:
                held.handles -= 1
                if uid not in self.tree.versions:  # it did: close it now, as release() would
                    await self.devices.close_unused({uid})
                else:
                    await self.devices.idle_now(uid)
        except BackyfsError as exc:  # still show disk.img; the error shows when it is opened
            log.warning("cannot read the partition table of %s: %s", uid, exc)
            return
        if uid in self.tree.versions:
            self.parts_seen[uid] = seen
            self.tree.set_partitions(uid, parts)

    async def current(self, node: Node) -> None:
        if node.kind in (ROOT, VOLUME):
            await self.refresh()
        elif node.kind == VDIR and node.uid in self.tree.versions:
            await self.ensure_partitions(node.uid)

    def node(self, inode: int) -> Node:
        node = self.tree.nodes.get(inode)
        if node is None:
            raise fail(errno.ENOENT)
        return node

    def attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.entry_timeout = ENTRY_TIMEOUT
        a.attr_timeout = IMAGE_ATTR_TIMEOUT if node.kind in (IMAGE, PART) else ENTRY_TIMEOUT
        if node.kind in DIRS:
            a.st_mode, a.st_nlink = 0o40555, 2 + len(node.children)
        elif node.kind == LINK:
            a.st_mode, a.st_nlink, a.st_size = 0o120777, 1, node.length
        else:
            rw = self.writable and node.kind in (IMAGE, PART)
            a.st_mode, a.st_nlink, a.st_size = 0o100644 if rw else 0o100444, 1, node.length
            a.st_blocks = -(-node.length // 512)
        a.st_uid, a.st_gid, a.st_blksize = self.uid, self.gid, BLKSIZE
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        return a

    # --- names --------------------------------------------------------------------------------
    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx=None) -> pyfuse3.EntryAttributes:
        parent = self.node(parent_inode)
        await self.current(parent)
        child = self.tree.child(parent, os.fsdecode(name))
        if child is None:
            raise fail(errno.ENOENT)
        return self.attrs(child)

    @fuse_errors
    async def getattr(self, inode: int, ctx=None) -> pyfuse3.EntryAttributes:
        return self.attrs(self.node(inode))

    @fuse_errors
    async def readlink(self, inode: int, ctx=None) -> bytes:
        node = self.node(inode)
        if node.kind != LINK:
            raise fail(errno.EINVAL)
        return node.data

    @fuse_errors
    async def opendir(self, inode: int, ctx=None) -> int:
        node = self.node(inode)
        if node.kind not in DIRS:
            raise fail(errno.ENOTDIR)
        await self.current(node)
        fh = self._new_fh()
        self.dirs[fh] = sorted(node.children.items())  # a stable listing for this handle
        return fh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self.dirs[fh]
        for pos in range(start_id, len(entries)):
            name, inode = entries[pos]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self.attrs(self.node(inode)), pos + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    # --- files --------------------------------------------------------------------------------
    @fuse_errors
    async def open(self, inode: int, flags: int, ctx=None) -> pyfuse3.FileInfo:
        node = self.node(inode)
        for_write = flags & os.O_ACCMODE != os.O_RDONLY
        if node.kind not in (IMAGE, INFO, PART):
            raise fail(errno.EISDIR if node.kind in DIRS else errno.EINVAL)
        if for_write and not (self.writable and node.kind != INFO):
            raise fail(errno.EACCES if self.writable else errno.EROFS)
        if for_write and flags & os.O_TRUNC:  # comes here, not to setattr (atomic_o_trunc)
            raise fail(errno.EPERM)  # a version's size is fixed
        held = None if node.kind == INFO else await self.devices.get(node.uid, for_write)
        if held is not None:
            held.handles += 1
        fh = self._new_fh()
        self.handles[fh] = Handle(node, held, for_write)
        # direct_io for everything: reads skip the kernel's page cache and reach us as the reader's
        # requests (up to 1 MiB, not 128 KiB readahead pieces), served from the export's own caches;
        # a page-cache copy of a disk image would double the memory and, on a VM, pay first-touch
        # faults for every page (a cold dd ran at 0.57x NBD buffered, 0.91x direct). It also makes
        # disk.img and partN, which alias each other, coherent. The cost: no mmap of these files.
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        h = self._handle(fh)
        n = min(size, h.node.length - off)
        if n <= 0:
            return b""
        if h.held is None:
            return h.node.data[off : off + n]
        device = h.held.device
        data = device.pread_cached(h.node.offset + off, n)
        return data if data is not None else await self.run(device.pread_short, h.node.offset + off, n)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handle(fh)
        if not h.writable or h.held is None:
            raise fail(errno.EBADF)
        n = min(len(buf), h.node.length - off)
        if n <= 0:
            raise fail(errno.ENOSPC)  # the device has a fixed size, like a block device
        await self.run(h.held.device.pwrite, memoryview(buf)[:n], h.node.offset + off)
        h.held.writes += 1
        return n

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self._handle(fh)
        if h.held is not None:
            await self.run(h.held.device.flush)

    async def flush(self, fh: int) -> None:
        pass  # close(2) does not mean fsync; the overlay is flushed on fsync and unmount

    @fuse_errors
    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is not None and h.held is not None:
            h.held.handles -= 1
            if h.node.uid not in self.tree.versions:  # removed while open: close it now
                await self.devices.close_unused({h.node.uid})
            else:
                await self.devices.idle_now(h.node.uid)

    @fuse_errors
    async def setattr(self, inode: int, attr, fields, fh, ctx) -> pyfuse3.EntryAttributes:
        node = self.node(inode)
        if fields.update_size and attr.st_size != node.length:
            raise fail(errno.EPERM)  # a version's size is fixed
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise fail(errno.EPERM)
        return self.attrs(node)  # times: accepted and ignored (e.g. by tools that copy into it)

    async def statfs(self, ctx) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_files = len(self.tree.nodes)
        st.f_namemax = 255
        return st

    async def _deny(self, *args: Any) -> None:
        raise fail(errno.EPERM)

    create = mkdir = mknod = unlink = rmdir = rename = symlink = link = _deny
    setxattr = removexattr = _deny

    def _handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise fail(errno.EBADF)
        return h

    def _new_fh(self) -> int:
        self.next_fh += 1
        return self.next_fh


def mount_options(writable: bool, allow_other: bool) -> set[str]:
    """fsname/subtype name the mount in /proc/mounts; auto_unmount lets fusermount3 unmount when the
    server dies, so a killed server leaves no dead mount; permissions are checked by the kernel."""
    opts = {"fsname=backyfs", "subtype=backyfs", "default_permissions", "auto_unmount"}
    if not writable:
        opts.add("ro")
    if allow_other:
        opts.add("allow_other")
    return opts


class FuseMount:
    """mount() then serve(): separate, so a daemon can report 'ready' between the two."""

    def __init__(self, service: ExportService, mountpoint: str, writable: bool = False,
                 overlay_name: str = "default", allow_other: bool = False) -> None:
        self.service, self.mountpoint = service, os.path.abspath(mountpoint)
        self.writable, self.allow_other = writable, allow_other
        threads = max(4, 2 * service.cfg.threads)
        self.ops = BackyfsOperations(service, writable, overlay_name, threads)

    def mount(self) -> None:
        db = self.service.repo.db
        stamp = db.data_version()
        versions = db.versions(state="valid")  # fail before mounting, not after
        self.ops.tree.update(versions)
        self.ops.shown, self.ops.db_stamp, self.ops.refreshed = versions, stamp, time.monotonic()
        try:
            pyfuse3.init(self.ops, self.mountpoint, mount_options(self.writable, self.allow_other))
        except RuntimeError as exc:
            raise BackyfsError(f"cannot mount on {self.mountpoint}: {exc} (is it an empty directory, "
                               "and is /dev/fuse there?)") from None

    def serve(self) -> None:
        """Until unmounted (fusermount3 -u, umount) or SIGTERM/SIGINT/SIGHUP; then unmount, close."""
        try:
            trio.run(self._main)
        finally:
            pyfuse3.close(unmount=True)
            self.ops.devices.close_all()

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals)
            await pyfuse3.main(min_tasks=2, max_tasks=64)
            nursery.cancel_scope.cancel()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("%s: unmounting %s", signal.Signals(signum).name, self.mountpoint)
                pyfuse3.terminate()
                return
