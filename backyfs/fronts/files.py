"""Single files out of a backed-up filesystem: find the partition, read ext2/3/4 with ExtFS, copy a
file or a tree out with content (sparse), modes and times; ownership too when run as root.

Nothing is mounted and nothing needs privileges: the version is read through the export core.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from backyfs.errors import BackyfsError, NotFound
from backyfs.export.device import ExportDevice
from backyfs.export.partitions import detect_filesystem, find_partitions
from backyfs.export.service import ExportService
from backyfs.fronts.extfs import ExtError, ExtFS, Inode, corrupt_is_exterror

EXT_TYPES = ("ext2", "ext3", "ext4")


@dataclass
class Window:
    """A byte range of a device (a partition, or the whole disk) as a pread callable."""

    device: ExportDevice
    offset: int
    length: int

    def pread(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.length - offset))
        return self.device.pread(self.offset + offset, length) if length else b""


def open_filesystem(service: ExportService, spec: str) -> tuple[ExtFS, str]:
    """SPEC is VERSION or VERSION:partN. Returns the filesystem and a label for messages."""
    name, _, part = spec.partition(":")
    device = service.open(name, valid_only=False)  # an invalid version's intact files are restorable
    v = device.version
    parts = find_partitions(device.pread, device.size)
    if part:
        match = re.fullmatch(r"part(\d+)", part)
        found = [p for p in parts if match and p.number == int(match.group(1))]
        if not found:
            have = ", ".join(f"part{p.number}" for p in parts) or "none"
            raise NotFound(f"version {v.uid} has no partition {part!r} (partitions: {have})")
        window, file_name = Window(device, found[0].offset, found[0].length), part
    else:
        window, file_name = Window(device, 0, device.size), "disk.img"
    fs_type = detect_filesystem(window.pread, window.length)
    label = f"{v.uid}:{part}" if part else v.uid
    if not part and fs_type is None and parts:
        kinds = ", ".join(f"part{p.number} ({_fs_name(device, p.offset, p.length)})" for p in parts)
        raise BackyfsError(f"version {v.uid} has a partition table: name a partition as "
                           f"{v.uid}:partN ({kinds})")
    if fs_type not in EXT_TYPES:
        raise BackyfsError(f"{label} holds {fs_type or 'no filesystem known to backyfs'}: restore-file "
                           f"reads ext2/3/4 only; loop-mount it from the FUSE tree instead: backyfs mount "
                           f"/mnt/b; mount -o loop,ro /mnt/b/{v.volume}/{v.uid}/{file_name} /mnt/x")
    with corrupt_is_exterror():
        return ExtFS(window.pread, window.length), label


def _fs_name(device: ExportDevice, offset: int, length: int) -> str:
    try:
        return detect_filesystem(Window(device, offset, length).pread, length) or "unknown"
    except BackyfsError:
        return "unreadable"


def safe_name(name: bytes) -> str | None:
    """A directory entry as a local file name, or None if it could escape the target directory."""
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        return None
    return os.fsdecode(name)


@dataclass
class RestoreResult:
    files: int = 0
    dirs: int = 0
    links: int = 0
    hard_links: int = 0  # further names of a file already restored, linked to its first
    bytes: int = 0
    setuid_dropped: int = 0  # files whose setuid/setgid bits were not restored
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # unreadable in the backup (damaged data)
    write_errors: list[str] = field(default_factory=list)  # could not be written where asked


SETID = stat.S_ISUID | stat.S_ISGID
MAX_LINK_SOURCES = 1024  # files with more names kept open to link them; past that, copies


@dataclass
class _Task:
    """One entry to restore: NAME in the directory open as DIR_FD. A directory's entries all done,
    it comes back with own_fd set, to get its owner, mode and times."""
    inode: Inode
    dir_fd: int
    name: str
    shown: str  # the path, for messages
    own_fd: int | None = None
    created: bool = False


class Restorer:
    """Copies out of an ExtFS. Per-entry failures (a corrupt block, an unsupported file type, a
    destination that cannot be written) are recorded and the rest is still restored; a file that
    could not be copied whole is removed, never left looking complete.

    The guest wrote the filesystem and is not trusted, and this may run as root, into a directory
    other users may write to. So every entry is made relative to its directory's open descriptor
    (no path is resolved again, so a directory swapped for a symlink meanwhile redirects nothing);
    nothing is written through an existing entry (--force replaces files and symlinks, never writes
    into them); device nodes and FIFOs only with specials=True, setuid/setgid bits only with
    setuid=True; directories that existed keep their owner, mode and times; a file with several
    names is copied once and linked."""

    def __init__(self, fs: ExtFS, force: bool = False, *, specials: bool = False,
                 setuid: bool = False, progress: Callable[[int], None] | None = None) -> None:
        """progress(bytes copied so far) after each piece of file data."""
        self.fs, self.force, self.specials, self.setuid = fs, force, specials, setuid
        self.progress = progress
        self.as_root = os.geteuid() == 0
        self.result = RestoreResult()
        self.top: str | None = None
        self.dirs_seen: set[int] = set()  # ext4 has no directory hard links: a repeat is a loop
        self.link_sources: dict[int, tuple[int, int]] = {}  # inode -> (open fd, names still to come)
        self.blocks_copied = 0  # no two files share a block: more than the filesystem holds is a bomb
        self.inodes_copied: set[int] = set()

    def restore(self, inode: Inode, dest: str, into_existing: bool = False) -> RestoreResult:
        """Copy INODE to DEST; into_existing: DEST is an existing directory to fill (the root).
        Iterative, not recursive: a valid but deep tree must not exhaust Python's stack."""
        dest = os.path.abspath(dest)
        parent, name = os.path.split(dest)
        self.top = dest if into_existing else None
        _more_descriptors()  # one per directory level, and per file with several names
        top_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        stack = [_Task(inode, top_fd, name or ".", dest)]
        try:
            while stack:
                task = stack.pop()
                if task.own_fd is not None:
                    try:
                        self._guarded(task.shown, self._finish_dir, task)
                    finally:
                        os.close(task.own_fd)
                elif task.inode.is_dir:
                    self._guarded(task.shown, self._enter_dir, task, stack)
                else:
                    self._guarded(task.shown, self._dispatch, task)
        finally:
            for task in stack:
                if task.own_fd is not None:
                    os.close(task.own_fd)
            for fd, _left in self.link_sources.values():
                os.close(fd)
            os.close(top_fd)
        return self.result

    def _guarded(self, shown: str, func, *args) -> None:
        try:
            with corrupt_is_exterror():
                func(*args)
        except OSError as exc:
            self.result.write_errors.append(f"{shown}: {exc.strerror or exc}")
        except BackyfsError as exc:
            self.result.errors.append(f"{shown}: {exc}")

    def _dispatch(self, task: _Task) -> None:
        if task.inode.is_reg:
            self._file(task)
        elif task.inode.is_link:
            self._link(task)
        else:
            self._special(task)

    def _existing(self, task: _Task) -> os.stat_result | None:
        try:
            return os.stat(task.name, dir_fd=task.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _make_room(self, task: _Task) -> None:
        """With --force, remove what is at the entry's name (not a directory) to make a new one."""
        st = self._existing(task) if self.force else None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            os.unlink(task.name, dir_fd=task.dir_fd)

    def _file(self, task: _Task) -> None:
        inode = task.inode
        if inode.ino in self.link_sources:
            self._hard_link(task)
            return
        self._make_room(task)
        fd = os.open(task.name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=task.dir_fd)
        keep = False
        try:
            written = self._copy(inode, fd)
            self._owner(inode, fd=fd)
            os.fchmod(fd, self._mode(inode))
            os.utime(fd, ns=(inode.atime_ns, inode.mtime_ns))
            names = _links_count(inode)
            keep = names > 1 and len(self.link_sources) < MAX_LINK_SOURCES
            if keep:  # linked by descriptor later: the very file written, wherever its name went
                self.link_sources[inode.ino] = (fd, names - 1)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(task.name, dir_fd=task.dir_fd)  # a partial copy must not pass for the file
            raise
        finally:
            if not keep:
                os.close(fd)
        self.result.bytes += written
        self.result.files += 1

    def _hard_link(self, task: _Task) -> None:
        fd, left = self.link_sources[task.inode.ino]
        st, mine = self._existing(task), os.fstat(fd)
        if st is not None and (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            return  # the same name listed twice: it is there already
        self._make_room(task)
        os.link(f"/proc/self/fd/{fd}", task.name, dst_dir_fd=task.dir_fd)
        self.result.hard_links += 1
        if left <= 1:  # its last name: no need to keep it open
            del self.link_sources[task.inode.ino]
            os.close(fd)
        else:
            self.link_sources[task.inode.ino] = (fd, left - 1)

    def _mode(self, inode: Inode) -> int:
        mode = stat.S_IMODE(inode.mode)
        if mode & SETID and not self.setuid:
            self.result.setuid_dropped += 1
            mode &= ~SETID
        return mode

    def _copy(self, inode: Inode, fd: int) -> int:
        if inode.ino not in self.inodes_copied:  # (a copy again, of a hard link past the limit, is fine)
            self.inodes_copied.add(inode.ino)
            self.blocks_copied += self.fs.mapped_blocks(inode)
            if self.blocks_copied > self.fs.blocks_count:
                raise ExtError(f"the files restored so far map {self.blocks_copied} blocks, more than the "
                               f"filesystem's {self.fs.blocks_count}: blocks are shared (corrupt)")
        written = 0
        for offset, data in self.fs.ranges(inode):
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
            written += len(data)
            if self.progress:
                self.progress(self.result.bytes + written)
        os.ftruncate(fd, inode.size)  # the tail and holes stay sparse
        return written

    def _enter_dir(self, task: _Task, stack: list[_Task]) -> None:
        inode = task.inode
        if inode.ino in self.dirs_seen:  # a damaged or hostile image: it would recurse forever
            self.result.errors.append(f"{task.shown}: directory loop (inode {inode.ino} again)")
            return
        self.dirs_seen.add(inode.ino)
        created = True
        try:
            os.mkdir(task.name, 0o700, dir_fd=task.dir_fd)
        except FileExistsError:
            st = self._existing(task)
            if not (st and stat.S_ISDIR(st.st_mode) and (self.force or task.shown == self.top)):
                raise
            created = False  # the operator's directory: its owner, mode and times stay theirs
        fd = os.open(task.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=task.dir_fd)
        try:
            if created and os.fstat(fd).st_uid != os.geteuid():  # swapped for another's meanwhile
                raise OSError(errno.EEXIST, "replaced by another directory while restoring")
            children = self._children(task, fd)
        except BaseException:
            os.close(fd)
            raise
        self.result.dirs += 1
        stack.append(_Task(inode, task.dir_fd, task.name, task.shown, fd, created))  # after its entries
        stack.extend(reversed(children))

    def _children(self, task: _Task, fd: int) -> list[_Task]:
        children = []
        for raw, ino in sorted(self.fs.listdir(task.inode)):
            name = safe_name(raw)
            shown = f"{task.shown}/{os.fsdecode(raw)}"
            if name is None:
                self.result.skipped.append(f"{shown}: unsafe name")
                continue
            try:
                children.append(_Task(self.fs.inode(ino), fd, name, shown))
            except ExtError as exc:
                self.result.errors.append(f"{shown}: {exc}")
        return children

    def _finish_dir(self, task: _Task) -> None:
        if not task.created:
            return
        self._owner(task.inode, fd=task.own_fd)
        mode = stat.S_IMODE(task.inode.mode)
        os.fchmod(task.own_fd, mode if self.setuid else mode & ~SETID)
        os.utime(task.own_fd, ns=(task.inode.atime_ns, task.inode.mtime_ns))  # after its entries

    def _link(self, task: _Task) -> None:
        target = self.fs.readlink(task.inode)
        self._make_room(task)
        os.symlink(target, task.name, dir_fd=task.dir_fd)
        self._owner(task.inode, task=task)
        os.utime(task.name, ns=(task.inode.atime_ns, task.inode.mtime_ns), dir_fd=task.dir_fd,
                 follow_symlinks=False)
        self.result.links += 1

    def _special(self, task: _Task) -> None:
        inode = task.inode
        kind = stat.S_IFMT(inode.mode)
        if not self.specials or not self.as_root or kind == stat.S_IFSOCK:
            why = "--specials creates them, as root" if kind != stat.S_IFSOCK else "not restorable"
            self.result.skipped.append(f"{task.shown}: {_type_name(inode.mode)} ({why})")
            return
        self._make_room(task)
        device = os.makedev(*_device_numbers(inode)) if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
        umask = os.umask(0)  # the mode as the guest had it (setuid dropped), not narrowed by the umask
        try:
            os.mknod(task.name, kind | self._mode(inode), device, dir_fd=task.dir_fd)
        finally:
            os.umask(umask)
        self._owner(inode, task=task)
        os.utime(task.name, ns=(inode.atime_ns, inode.mtime_ns), dir_fd=task.dir_fd, follow_symlinks=False)

    def _owner(self, inode: Inode, *, fd: int | None = None, task: _Task | None = None) -> None:
        if not self.as_root:
            return  # an ordinary user keeps the files as their own
        if fd is not None:
            os.fchown(fd, inode.uid, inode.gid)
        elif task is not None:  # never through a symlink: lchown
            os.chown(task.name, inode.uid, inode.gid, dir_fd=task.dir_fd, follow_symlinks=False)


def _links_count(inode: Inode) -> int:
    return int.from_bytes(inode.raw[0x1A:0x1C], "little")


def _more_descriptors() -> None:
    """Raise the soft limit of open files to the hard one (up to 65536): a restore keeps one
    descriptor per directory level, and one per file whose other names are still to come."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _device_numbers(inode: Inode) -> tuple[int, int]:
    """ext2's old (i_block[0]) or new (i_block[1]) device number encoding."""
    old, new = int.from_bytes(inode.raw[0x28:0x2C], "little"), int.from_bytes(inode.raw[0x2C:0x30], "little")
    if old:
        return (old >> 8) & 0xFF, old & 0xFF
    return (new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00)


def _type_name(mode: int) -> str:
    return {stat.S_IFIFO: "fifo", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
            stat.S_IFSOCK: "socket"}.get(stat.S_IFMT(mode), "unknown file type")
