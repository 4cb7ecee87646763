"""`backyfs restore-file` and `backyfs ls-files`: files out of a backed-up ext2/3/4 filesystem."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import posixpath
import stat
import sys
import time
from collections.abc import Iterator

from backyfs.cli.commands import DataProblem, _print_json
from backyfs.cli.progress import Progress
from backyfs.config import load_config, require_repository
from backyfs.errors import BackyfsError
from backyfs.fronts.extfs import ExtError, corrupt_is_exterror

SPEC_HELP = "VERSION, or VERSION:partN for a partition (as in the FUSE tree: part1, part5, ...)"
RESTORE_FILE_HELP = """\
Copy PATH (a file, a symlink, or a directory tree) out of an ext2/ext3/ext4 filesystem in a version,
without mounting anything and without privileges. Content (holes stay holes), permission bits and
times are kept; owners only when run as root. Without :partN the whole disk must be a filesystem.
If DEST is an existing directory, PATH is copied into it. A journal that needs recovery (a backup
of a running system) is replayed in memory first. Other filesystems (XFS, btrfs, ...): loop-mount
the partition file of 'backyfs mount' instead. Exit code 3 if some entries could not be read.

The guest wrote that filesystem: what it holds is not trusted, even when you run this as root.
Names that could leave DEST are skipped; setuid and setgid bits are dropped (--setuid keeps them);
device nodes and FIFOs are skipped (--specials creates them, as root); a file with several names
(hard links) is copied once and linked; --force replaces existing files and symlinks instead of
writing into them, and directories that existed keep their own owner, mode and times."""


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
            # Named after PATH's last part as written, "." and ".." resolved: /etc/.. is the root,
            # copied into DEST, never DEST/.. (DEST's parent).
            base = os.path.basename(posixpath.normpath("/" + args.path))
            dest, into_existing = (os.path.join(dest, base), False) if base else (dest, True)
        if not into_existing and not args.force and os.path.lexists(dest):  # before writing anything
            raise BackyfsError(f"{dest} exists; use --force to overwrite it")
        bar = Progress(f"restore-file {args.path}") if inode.is_reg else None  # a tree: no total
        result = Restorer(fs, force=args.force, specials=args.specials, setuid=args.setuid,
                          progress=bar and (lambda done: bar(min(done, inode.size), inode.size))).restore(
            inode, dest, into_existing)
        if bar:
            bar(inode.size, inode.size)
    finally:
        service.close()
    for line in result.skipped:  # names the guest chose: escaped, like ls-files does
        print(f"backyfs: skipped {_printable(line)}", file=sys.stderr)
    failed = [_printable(line) for line in result.write_errors + result.errors]
    if failed and not (result.files or result.dirs or result.links):  # nothing at all: one line
        raise (DataProblem if result.errors else BackyfsError)(f"cannot restore {failed[0]}")
    for line in failed:
        print(f"backyfs: cannot restore {line}", file=sys.stderr)
    if result.setuid_dropped:
        print(f"backyfs: dropped the setuid/setgid bits of {result.setuid_dropped} file(s) (--setuid "
              "keeps them)", file=sys.stderr)
    hard = f", {result.hard_links} hard link(s)" if result.hard_links else ""
    print(f"restored {args.path} from {label} to {dest}: {result.files} file(s), {result.dirs} "
          f"director{'y' if result.dirs == 1 else 'ies'}, {result.links} symlink(s){hard}, "
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
        name = _printable(r["name"])
        if "error" in r:
            print(f"{'?' * 10} {'?':>12} {'?':19}  {name} (unreadable: {r['error']})")
            continue
        mtime = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["mtime"]))
        target = f" -> {_printable(r['target'])}" if r["target"] is not None else ""
        print(f"{stat.filemode(r['mode'])} {r['size']:>12} {mtime}  {name}{target}")
    return 0


def _printable(text: str) -> str:
    """A name as the guest wrote it, with control characters escaped (as `ls -b` does): they
    could move the cursor or fake lines on the operator's terminal."""
    return "".join(c if c.isprintable() and c != "\\" else
                   "\\\\" if c == "\\" else
                   "".join(f"\\x{b:02x}" for b in os.fsencode(c)) for c in text)


def _listing(fs, path: str) -> list[dict]:
    inode = fs.lookup(path, follow_last=True)
    if not inode.is_dir:
        return [_row(fs, os.path.basename(path), inode)]
    return [_row(fs, os.fsdecode(name), ino) for name, ino in sorted(fs.listdir(inode))]


def _row(fs, name: str, inode_or_ino) -> dict:
    """One entry; one that cannot be read (a bad inode number, a damaged symlink) is listed as such
    instead of failing the whole listing."""
    try:
        inode = fs.inode(inode_or_ino) if isinstance(inode_or_ino, int) else inode_or_ino
        target = os.fsdecode(fs.readlink(inode)) if inode.is_link else None
    except ExtError as exc:
        return {"name": name, "error": str(exc)}
    return {"name": name, "mode": inode.mode, "size": inode.size, "mtime": inode.mtime_ns / 1e9,
            "uid": inode.uid, "gid": inode.gid, "target": target}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("restore-file", help="copy a file or folder out of a backed-up ext2/3/4 filesystem",
                       description=RESTORE_FILE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=cmd_restore_file)
    p.add_argument("spec", metavar="VERSION[:partN]", help=SPEC_HELP)
    p.add_argument("path", metavar="PATH", help="path inside the filesystem, e.g. /etc/fstab")
    p.add_argument("dest", metavar="DEST", help="where to put it (into it, if a directory)")
    p.add_argument("--force", action="store_true", help="replace existing files, merge into existing dirs")
    p.add_argument("--setuid", action="store_true", help="keep setuid and setgid bits (dropped by default)")
    p.add_argument("--specials", action="store_true",
                   help="create device nodes and FIFOs (as root; skipped by default): with the "
                        "guest's device numbers, owners and modes, e.g. a world-writable 8:0")

    p = sub.add_parser("ls-files", help="list a folder of a backed-up ext2/3/4 filesystem",
                       description="List PATH (default /) in VERSION's filesystem: mode, size, mtime, "
                                   "name. Symlinks are followed for PATH itself.")
    p.set_defaults(func=cmd_ls_files)
    p.add_argument("spec", metavar="VERSION[:partN]", help=SPEC_HELP)
    p.add_argument("path", metavar="PATH", nargs="?", default="/", help="folder to list (default: /)")
    p.add_argument("--json", action="store_true", help="print JSON (mode as a number, mtime in seconds)")
