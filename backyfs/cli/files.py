"""`backyfs restore-file` and `backyfs ls-files`: files out of a backed-up ext2/3/4 filesystem."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import stat
import sys
import time
from collections.abc import Iterator

from backyfs.cli.commands import DataProblem, _print_json
from backyfs.config import load_config, require_repository
from backyfs.errors import BackyfsError
from backyfs.fronts.extfs import corrupt_is_exterror

SPEC_HELP = "VERSION, or VERSION:partN for a partition (as in the FUSE tree: part1, part5, ...)"
RESTORE_FILE_HELP = """\
Copy PATH (a file, a symlink, or a directory tree) out of an ext2/ext3/ext4 filesystem in a version,
without mounting anything and without privileges. Content (holes stay holes), permission bits and
times are kept; owners only when run as root. Without :partN the whole disk must be a filesystem.
If DEST is an existing directory, PATH is copied into it. A journal that needs recovery (a backup
of a running system) is replayed in memory first. Other filesystems (XFS, btrfs, ...): loop-mount
the partition file of 'backyfs mount' instead. Exit code 3 if some entries could not be read."""


@contextlib.contextmanager
def _damage_is_data_problem(spec: str) -> Iterator[None]:
    """A block of the backup that is missing or corrupt is damaged data (exit 3), said once: the
    export core's own log line of it would repeat what the error says."""
    from backyfs.export.device import BlockError

    device_log = logging.getLogger("backyfs.export.device")
    level = device_log.level
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        device_log.setLevel(logging.CRITICAL)
    try:
        yield
    except BlockError as exc:
        raise DataProblem(f"cannot read {spec}: {exc}") from None
    finally:
        device_log.setLevel(level)


def _open(args: argparse.Namespace):
    from backyfs.export.service import ExportService
    from backyfs.fronts.files import open_filesystem

    cfg = load_config(args.config)
    require_repository(cfg)
    service = ExportService(cfg)
    try:
        fs, label = open_filesystem(service, args.spec)
    except BaseException:
        service.close()
        raise
    if fs.journal_note:
        print(f"backyfs: {label}: {fs.journal_note}", file=sys.stderr)
    state = service.resolve(args.spec.partition(":")[0], valid_only=False).state
    if state != "valid":
        print(f"backyfs: warning: version {label} is {state}: files in its damaged blocks cannot be "
              "read", file=sys.stderr)
    return service, fs, label


def cmd_restore_file(args: argparse.Namespace) -> int:
    with _damage_is_data_problem(args.spec):
        return _restore_file(args)


def _restore_file(args: argparse.Namespace) -> int:
    from backyfs.fronts.files import Restorer

    service, fs, label = _open(args)
    try:
        with corrupt_is_exterror():
            inode = fs.lookup(args.path)
        dest, into_existing = args.dest, False
        if os.path.isdir(dest) and not os.path.islink(dest):
            base = os.path.basename(args.path.rstrip("/"))
            dest, into_existing = (os.path.join(dest, base), False) if base else (dest, True)
        if not into_existing and not args.force and os.path.lexists(dest):  # before writing anything
            raise BackyfsError(f"{dest} exists; use --force to overwrite it")
        result = Restorer(fs, force=args.force).restore(inode, dest, into_existing)
    finally:
        service.close()
    for line in result.skipped:
        print(f"backyfs: skipped {line}", file=sys.stderr)
    failed = result.write_errors + result.errors
    if failed and not (result.files or result.dirs or result.links):  # nothing at all: one line
        raise (DataProblem if result.errors else BackyfsError)(f"cannot restore {failed[0]}")
    for line in failed:
        print(f"backyfs: cannot restore {line}", file=sys.stderr)
    print(f"restored {args.path} from {label} to {dest}: {result.files} file(s), {result.dirs} "
          f"director{'y' if result.dirs == 1 else 'ies'}, {result.links} symlink(s), "
          f"{result.bytes / 2**20:,.1f} MiB")
    if failed:  # not writable where asked is an error; unreadable in the backup is damaged data
        what = f"{len(failed)} entr{'y' if len(failed) == 1 else 'ies'} could not be restored"
        raise (BackyfsError if result.write_errors else DataProblem)(what)
    return 0


def cmd_ls_files(args: argparse.Namespace) -> int:
    with _damage_is_data_problem(args.spec):
        service, fs, _label = _open(args)
        try:
            with corrupt_is_exterror():
                rows = _listing(fs, args.path)
        finally:
            service.close()
    if args.json:
        _print_json(rows)
        return 0
    for r in rows:
        mtime = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["mtime"]))
        target = f" -> {r['target']}" if r["target"] is not None else ""
        print(f"{stat.filemode(r['mode'])} {r['size']:>12} {mtime}  {r['name']}{target}")
    return 0


def _listing(fs, path: str) -> list[dict]:
    inode = fs.lookup(path, follow_last=True)
    if not inode.is_dir:
        return [_row(fs, os.path.basename(path), inode)]
    return [_row(fs, os.fsdecode(name), fs.inode(ino)) for name, ino in sorted(fs.listdir(inode))]


def _row(fs, name: str, inode) -> dict:
    target = os.fsdecode(fs.readlink(inode)) if inode.is_link else None
    return {"name": name, "mode": inode.mode, "size": inode.size, "mtime": inode.mtime_ns / 1e9,
            "uid": inode.uid, "gid": inode.gid, "target": target}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("restore-file", help="copy a file or folder out of a backed-up ext2/3/4 filesystem",
                       description=RESTORE_FILE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=cmd_restore_file)
    p.add_argument("spec", metavar="VERSION[:partN]", help=SPEC_HELP)
    p.add_argument("path", metavar="PATH", help="path inside the filesystem, e.g. /etc/fstab")
    p.add_argument("dest", metavar="DEST", help="where to put it (into it, if a directory)")
    p.add_argument("--force", action="store_true", help="overwrite existing files, merge into existing dirs")

    p = sub.add_parser("ls-files", help="list a folder of a backed-up ext2/3/4 filesystem",
                       description="List PATH (default /) in VERSION's filesystem: mode, size, mtime, "
                                   "name. Symlinks are followed for PATH itself.")
    p.set_defaults(func=cmd_ls_files)
    p.add_argument("spec", metavar="VERSION[:partN]", help=SPEC_HELP)
    p.add_argument("path", metavar="PATH", nargs="?", default="/", help="folder to list (default: /)")
    p.add_argument("--json", action="store_true", help="print JSON (mode as a number, mtime in seconds)")
