"""Single files out of a backed-up filesystem: find the partition, read ext2/3/4 with ExtFS, copy a
file or a tree out with content (sparse), modes and times; ownership too when run as root.

Nothing is mounted and nothing needs privileges: the version is read through the export core.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
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


class Restorer:
    """Copies out of an ExtFS. Per-entry failures (a corrupt block, an unsupported file type, a
    destination that cannot be written) are recorded and the rest is still restored; a file that
    could not be copied whole is removed, never left looking complete.

    The guest wrote the filesystem and is not trusted, and this may run as root: nothing is written
    through an existing entry (--force replaces files and symlinks, never writes into them: one could
    be a device node or a hard link to a host file); device nodes, FIFOs and sockets are created only
    with specials=True, setuid/setgid bits are kept only with setuid=True; directories that existed
    keep their own owner, mode and times; a file with several names is copied once and linked."""

    def __init__(self, fs: ExtFS, force: bool = False, *, specials: bool = False,
                 setuid: bool = False) -> None:
        self.fs, self.force, self.specials, self.setuid = fs, force, specials, setuid
        self.as_root = os.geteuid() == 0
        self.result = RestoreResult()
        self.top: str | None = None
        self.dirs_seen: set[int] = set()  # ext4 has no directory hard links: a repeat is a loop
        self.files_done: dict[int, str] = {}  # inode -> where its first name was restored

    def restore(self, inode: Inode, dest: str, into_existing: bool = False) -> RestoreResult:
        """Copy INODE to DEST; into_existing: DEST is an existing directory to fill (the root).
        Iterative, not recursive: a valid but deep tree must not exhaust Python's stack."""
        self.top = dest if into_existing else None
        stack: list[tuple[Inode, str, bool | None]] = [(inode, dest, None)]
        while stack:
            node, path, created = stack.pop()
            if created is not None:  # every entry of this directory is done
                self._guarded(path, self._finish_dir, node, path, created)
            elif node.is_dir:
                self._guarded(path, self._enter_dir, node, path, stack)
            else:
                self._guarded(path, self._dispatch, node, path)
        return self.result

    def _guarded(self, dest: str, func, *args) -> None:
        try:
            with corrupt_is_exterror():
                func(*args)
        except OSError as exc:
            self.result.write_errors.append(f"{dest}: {exc.strerror or exc}")
        except BackyfsError as exc:
            self.result.errors.append(f"{dest}: {exc}")

    def _dispatch(self, inode: Inode, dest: str) -> None:
        if inode.is_reg:
            self._file(inode, dest)
        elif inode.is_link:
            self._link(inode, dest)
        else:
            self._special(inode, dest)

    def _make_room(self, dest: str) -> None:
        """With --force, remove what is at dest (not a directory) so a new entry is made there."""
        if self.force and os.path.lexists(dest) and not (os.path.isdir(dest) and not os.path.islink(dest)):
            os.unlink(dest)

    def _file(self, inode: Inode, dest: str) -> None:
        self._make_room(dest)
        first = self.files_done.get(inode.ino)
        if first is not None:
            os.link(first, dest)
            self.result.hard_links += 1
            return
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            written = self._copy(inode, fd)
            self._owner(dest, inode, fd)
            os.fchmod(fd, self._mode(inode))
            os.utime(fd, ns=(inode.atime_ns, inode.mtime_ns))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(dest)  # a partial copy must not pass for the file
            raise
        finally:
            os.close(fd)
        self.files_done[inode.ino] = dest
        self.result.bytes += written
        self.result.files += 1

    def _mode(self, inode: Inode) -> int:
        mode = stat.S_IMODE(inode.mode)
        if mode & SETID and not self.setuid:
            self.result.setuid_dropped += 1
            mode &= ~SETID
        return mode

    def _copy(self, inode: Inode, fd: int) -> int:
        written = 0
        for offset, data in self.fs.ranges(inode):
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
            written += len(data)
        os.ftruncate(fd, inode.size)  # the tail and holes stay sparse
        return written

    def _enter_dir(self, inode: Inode, dest: str, stack: list) -> None:
        if inode.ino in self.dirs_seen:  # a damaged or hostile image: it would recurse forever
            self.result.errors.append(f"{dest}: directory loop (inode {inode.ino} again)")
            return
        self.dirs_seen.add(inode.ino)
        created = True
        try:
            os.mkdir(dest, 0o700)
        except FileExistsError:
            if not ((self.force or dest == self.top) and os.path.isdir(dest) and not os.path.islink(dest)):
                raise
            created = False  # the operator's directory: its owner, mode and times stay theirs
        self.result.dirs += 1
        children = []
        for raw, ino in sorted(self.fs.listdir(inode)):
            name = safe_name(raw)
            if name is None:
                self.result.skipped.append(f"{dest}/{raw!r}: unsafe name")
                continue
            try:
                children.append((self.fs.inode(ino), os.path.join(dest, name), None))
            except ExtError as exc:
                self.result.errors.append(f"{dest}/{name}: {exc}")
        stack.append((inode, dest, created))  # finished after its entries (popped last)
        stack.extend(reversed(children))

    def _finish_dir(self, inode: Inode, dest: str, created: bool) -> None:
        if not created:
            return
        self._owner(dest, inode)
        mode = stat.S_IMODE(inode.mode)
        os.chmod(dest, mode if self.setuid else mode & ~SETID)
        os.utime(dest, ns=(inode.atime_ns, inode.mtime_ns))  # after its entries were written

    def _link(self, inode: Inode, dest: str) -> None:
        target = self.fs.readlink(inode)
        self._make_room(dest)
        os.symlink(target, os.fsencode(dest))
        self._owner(dest, inode)
        os.utime(dest, ns=(inode.atime_ns, inode.mtime_ns), follow_symlinks=False)
        self.result.links += 1

    def _special(self, inode: Inode, dest: str) -> None:
        kind = stat.S_IFMT(inode.mode)
        if not self.specials or not self.as_root or kind == stat.S_IFSOCK:
            why = "--specials creates them, as root" if kind != stat.S_IFSOCK else "not restorable"
            self.result.skipped.append(f"{dest}: {_type_name(inode.mode)} ({why})")
            return
        self._make_room(dest)
        is_device = kind in (stat.S_IFCHR, stat.S_IFBLK)
        os.mknod(dest, kind | 0o600, os.makedev(*_device_numbers(inode)) if is_device else 0)
        self._owner(dest, inode)
        os.chmod(dest, self._mode(inode))  # mknod's mode goes through the umask
        os.utime(dest, ns=(inode.atime_ns, inode.mtime_ns), follow_symlinks=False)

    def _owner(self, dest: str, inode: Inode, fd: int | None = None) -> None:
        if not self.as_root:
            return  # an ordinary user keeps the files as their own
        if fd is not None:
            os.fchown(fd, inode.uid, inode.gid)
        else:
            os.lchown(dest, inode.uid, inode.gid)


def _device_numbers(inode: Inode) -> tuple[int, int]:
    """ext2's old (i_block[0]) or new (i_block[1]) device number encoding."""
    old, new = int.from_bytes(inode.raw[0x28:0x2C], "little"), int.from_bytes(inode.raw[0x2C:0x30], "little")
    if old:
        return (old >> 8) & 0xFF, old & 0xFF
    return (new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00)


def _type_name(mode: int) -> str:
    return {stat.S_IFIFO: "fifo", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
            stat.S_IFSOCK: "socket"}.get(stat.S_IFMT(mode), "unknown file type")
