"""`backyfs restore-file` and `backyfs ls-files`: files out of a backed-up ext2/3/4 filesystem."""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time

from backyfs.cli.commands import DataProblem, _print_json
from backyfs.config import load_config
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


def _open(args: argparse.Namespace):
    from backyfs.export.service import ExportService
    from backyfs.fronts.files import open_filesystem

    service = ExportService(load_config(args.config))
    try:
        fs, label = open_filesystem(service, args.spec)
    except BaseException:
        service.close()
        raise
    if fs.journal_note:
        print(f"backyfs: {label}: {fs.journal_note}", file=sys.stderr)
    return service, fs, label


def cmd_restore_file(args: argparse.Namespace) -> int:
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
        restorer = Restorer(fs, force=args.force,
                            warn=lambda msg: print(f"backyfs: {msg}", file=sys.stderr))
        result = restorer.restore(inode, dest, into_existing)
    finally:
        service.close()
    for line in result.skipped:
        print(f"backyfs: skipped {line}", file=sys.stderr)
    for line in result.errors:
        print(f"backyfs: cannot restore {line}", file=sys.stderr)
    print(f"restored {args.path} from {label} to {dest}: {result.files} file(s), {result.dirs} "
          f"director{'y' if result.dirs == 1 else 'ies'}, {result.links} symlink(s), "
          f"{result.bytes / 2**20:,.1f} MiB")
    if result.errors:
        raise DataProblem(f"{len(result.errors)} entr{'y' if len(result.errors) == 1 else 'ies'} "
                          "could not be restored")
    return 0


def cmd_ls_files(args: argparse.Namespace) -> int:
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
