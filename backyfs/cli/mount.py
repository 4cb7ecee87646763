"""`backyfs mount`: every valid version as files under a FUSE mount (backyfs.fronts.fuse)."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import re
import tempfile

from backyfs.cli.commands import UsageError
from backyfs.config import load_config, require_repository
from backyfs.errors import BackyfsError
from backyfs.export.overlay import check_overlay_name

MOUNT_HELP = """\
Mount every valid version of every volume as files, read-only unless --writable:

  MOUNTPOINT/VOLUME/UID/disk.img    the version's disk image
  MOUNTPOINT/VOLUME/UID/info.json   its metadata and partition table
  MOUNTPOINT/VOLUME/UID/partN       partition N (MBR, incl. logical, or GPT) as its own file:
                                      mount -o loop,ro MOUNTPOINT/VOLUME/UID/part1 /mnt/x
  MOUNTPOINT/VOLUME/latest          symlink to the newest version's directory
  MOUNTPOINT/VOLUME/2026-11-26T13-25-43   symlink per version, by creation time (local time)

The tree follows the repository: new backups appear and removed versions vanish within a second.
With --writable, writes to disk.img or a partition land in that version's overlay (see
'backyfs overlay ls'); the backup itself never changes. The command returns once the mount is
ready and serves in the background (--foreground: stay attached; logs go to stderr). Unmount with
'fusermount3 -u MOUNTPOINT' or 'umount MOUNTPOINT', or stop the server with SIGTERM; a killed server
is unmounted automatically (auto_unmount)."""


def cmd_mount(args: argparse.Namespace) -> int:
    if args.overlay and not args.writable:
        raise UsageError("--overlay needs --writable (a read-only mount shows the backups)")
    overlay = check_overlay_name(args.overlay or "default")
    mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mountpoint):
        what = "is not a directory" if os.path.exists(mountpoint) else "does not exist (mkdir it first)"
        raise BackyfsError(f"mount point {mountpoint} {what}")
    if _backyfs_mounted(mountpoint):  # a second mount would hide the first one, still running
        raise BackyfsError(f"backyfs is already mounted on {mountpoint}; unmount it first: "
                           f"fusermount3 -u {mountpoint}")
    if os.listdir(mountpoint):  # the mount would hide what is in it
        raise BackyfsError(f"mount point {mountpoint} is not empty")
    cfg = load_config(args.config)
    require_repository(cfg)
    if args.foreground:
        _serve(cfg, mountpoint, args, overlay, ready=None)
        return 0
    return _daemon(cfg, mountpoint, args, overlay)


def _backyfs_mounted(mountpoint: str) -> bool:
    """Whether the top mount on MOUNTPOINT is a backyfs FUSE mount (type fuse.backyfs)."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return False
    # /proc/self/mounts escapes spaces and the like as octal (\040); later lines are mounted on top.
    def unescape(path: str) -> str:
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), path)

    on_it = [fields[2] for fields in mounts if len(fields) > 2 and unescape(fields[1]) == mountpoint]
    return bool(on_it) and on_it[-1] == "fuse.backyfs"


def _serve(cfg, mountpoint: str, args: argparse.Namespace, overlay: str, ready) -> None:
    from backyfs.export.service import ExportService
    from backyfs.fronts.fuse import FuseMount

    service = ExportService(cfg)
    try:
        fs = FuseMount(service, mountpoint, args.writable, overlay, args.allow_other)
        fs.mount()
        if ready is not None:
            ready()
        fs.serve()
    finally:
        service.close()


def _daemon(cfg, mountpoint: str, args: argparse.Namespace, overlay: str) -> int:
    """Fork first (a store client's threads do not survive a fork), mount in the child, and let the
    parent exit only when the child reports the mount ready, or with the child's error."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message == "ready":
            print(f"mounted on {mountpoint} (server pid {pid}); unmount: fusermount3 -u {mountpoint}")
            return 0
        os.waitpid(pid, 0)
        raise BackyfsError(message or "the mount server exited before the mount was ready")
    os.close(read_fd)
    os.setsid()
    # fusermount3 (auto_unmount) keeps the stdio it inherits until unmount: give it none of the
    # caller's, or `out=$(backyfs mount ...)` would wait for the unmount. libfuse's own messages
    # go to a scratch file, to be sent along with an error.
    scratch = tempfile.TemporaryFile()
    _redirect_stdio(scratch.fileno())
    code = 0
    detached = False

    def ready() -> None:
        nonlocal detached
        _detach(write_fd)
        detached = True  # write_fd is closed now: its number may be reused by another file

    try:
        _serve(cfg, mountpoint, args, overlay, ready=ready)
    except BaseException as exc:  # the parent still waits unless the mount was ready
        code = 1
        text = str(exc) if isinstance(exc, BackyfsError | OSError) else f"{type(exc).__name__}: {exc}"
        scratch.seek(0)
        details = scratch.read().decode(errors="replace").strip().splitlines()
        text += f" ({details[-1]})" if details else ""
        if detached:
            logging.getLogger("backyfs").error("mount server: %s", text)
        else:
            try:
                os.write(write_fd, text.encode())
            except OSError:
                logging.getLogger("backyfs").error("mount server: %s", text)
    finally:
        os._exit(code)


def _redirect_stdio(err_fd: int) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(err_fd, 2)
    os.close(null)


def _detach(write_fd: int) -> None:
    """The mount is ready: tell the parent, and send logs to syslog from now on."""
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 2)
    os.close(null)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("backyfs-mount[%(process)d]: %(levelname)s: %(message)s"))
        root.addHandler(handler)
    os.write(write_fd, b"ready")
    os.close(write_fd)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mount", help="mount every version as files (FUSE)", description=MOUNT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=cmd_mount)
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing, empty directory")
    p.add_argument("--writable", action="store_true",
                   help="allow writes to disk.img and partitions; they go to the version's overlay")
    p.add_argument("--overlay", metavar="NAME", help="the overlay writes go to (default: default)")
    p.add_argument("--foreground", action="store_true", help="stay in the foreground until unmounted")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users access the mount (as a non-root user, needs user_allow_other "
                        "in /etc/fuse.conf); files are world-readable then")
