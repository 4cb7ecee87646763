"""The repository commands: init, backup, restore, scrub, ls, show, rm, protect, label, stats."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
import unicodedata
from collections.abc import Callable

from backyfs.cli import helptext
from backyfs.cli.progress import Progress
from backyfs.errors import BackyfsError, StateError
from backyfs.fsutil import makedirs_private

# Imported by the commands when they run, not with the parser: an RBD backup starts loading librbd and
# connecting (sources.OpeningSource) right after parsing, so what comes before that is kept short.
# config pulls in dataclasses and inspect (~15 ms with a cold page cache).


def load_config(path: str | None):
    from backyfs.config import load_config

    return load_config(path)


def open_repository(cfg, **limits: float | None):
    from backyfs.config import open_repository

    return open_repository(cfg, **limits)


class DataProblem(BackyfsError):
    """Work finished, but found damaged data (exit code 3)."""


class UsageError(BackyfsError):
    """The command line asks for something impossible; nothing was done (exit code 2)."""


def _repo(args: argparse.Namespace, create: bool = False, **limits: float | None):
    """The configured repository; one that does not exist yet is made only with create."""
    return _config_and_repo(args, create, **limits)[1]


def _config_and_repo(args: argparse.Namespace, create: bool = False, **limits: float | None):
    cfg = load_config(args.config)
    if not create:
        require_repository(cfg)
    return cfg, open_repository(cfg, **limits)


def require_repository(cfg) -> None:
    from backyfs.config import require_repository

    require_repository(cfg)


def _labels(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"bad label {pair!r}: use key=value")
        if any(unicodedata.category(c) == "Cc" for c in pair):  # a newline would forge rows of ls
            raise UsageError(f"bad label {pair!r}: control characters are not allowed")
        out[key] = value
    return out


def _print_json(data: object) -> None:
    import json

    # Not token by token (json.dump): a syscall each when stdout is unbuffered.
    write_out(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_out(text: str) -> None:
    """Print TEXT in 64 KiB pieces: one larger write to a pipe whose reader left (`| head`) was cut
    short without an error, so the command exited 0 with its output truncated."""
    for start in range(0, len(text), 1 << 16):
        sys.stdout.write(text[start : start + (1 << 16)])


def cmd_init(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    repo = open_repository(cfg)
    print(f"repository ready: data in {cfg.data_dir}, store {repo.store.url}")
    return 0


def _choose_parent(repo, args: argparse.Namespace, volume: str):
    if args.parent:
        parent = repo.resolve(args.parent, valid_only=True)
        if parent.volume != volume:
            raise BackyfsError(f"parent {parent.uid} belongs to volume {parent.volume}, not {volume}")
        return parent
    if args.full:
        if args.hints:
            raise UsageError("--hints name what changed since a parent; --full reads everything")
        return None
    parent = repo.latest_valid(volume)
    if parent is None and (args.incremental or args.hints):
        raise BackyfsError(f"volume {volume} has no valid version to diff against")
    return parent


def _open_backup(args: argparse.Namespace):
    """The repository, parent version, source and hints of a backup. An RBD source loads librbd,
    connects and takes its snapshot in a thread from the start (with --pre/--post-snapshot commands:
    once the arguments are checked) while this thread opens the repository (see
    sources.OpeningSource). If the backup cannot go on, a snapshot already taken is removed again."""
    from backyfs.sources import start_source, takes_snapshots

    if (args.pre_snapshot or args.post_snapshot) and not takes_snapshots(args.source):
        raise UsageError("--pre-snapshot/--post-snapshot need a source that snapshots (rbd:POOL/IMAGE)")
    opening = start_source(args.source, pre_cmd=args.pre_snapshot, post_cmd=args.post_snapshot)
    volume_lock = None
    try:
        opening.wait_loaded()
        from backyfs.repository.locks import check_volume_name, lock_volume

        cfg = load_config(args.config)
        volume = check_volume_name(args.volume)
        # The volume's lock before the snapshot: a run refused as concurrent must neither leave a
        # snapshot nor remove one that the running backup reads.
        makedirs_private(cfg.data_dir)
        volume_lock = lock_volume(cfg.db_path, volume)
        opening.snapshot(_snapshot_prefix(cfg, volume) if takes_snapshots(args.source) else None)
        repo = open_repository(cfg, read_mb_s=None, write_mb_s=args.write_limit)
        if re.fullmatch(r"[0-9a-f]{4,11}", volume) and not repo.db.has_volume(volume):
            raise UsageError(f"a new volume named with hex digits only ({volume!r}) would hide the "
                             f"versions whose uids start so: add another letter, e.g. {volume}-disk")
        parent = _choose_parent(repo, args, volume)
        if takes_snapshots(args.source):  # beside the snapshot being taken: see sources.rbd
            opening.drop_old_snapshots(*_old_snapshots(repo, volume, parent))
        hints = None
        if args.hints:
            from backyfs.repository.extents import load_hints

            hints = load_hints(args.hints)
        from backyfs.repository.writer import BackupWriter  # noqa: F401  (loads while the source opens)

        source = opening.result()
    except BaseException:
        opening.abandon()
        if volume_lock is not None:
            volume_lock.close()
        raise
    if hasattr(source, "changes"):  # RBD: diff against the parent's snapshot, not the user's hints
        try:
            hints = source.changes(parent)
        except BaseException:
            source.discard_snapshot()
            source.close()
            volume_lock.close()
            raise
    return cfg, volume, repo, parent, source, hints, volume_lock


def _old_snapshots(repo, volume: str, parent) -> tuple[set[str], set[str]]:
    """(owned, keep): the snapshots of the volume's versions, and those a backup may still diff
    from (the parent's and the latest valid version's), which stay."""
    latest = repo.latest_valid(volume)
    owned = {v.snapshot for v in repo.db.versions(volume=volume) if v.snapshot}
    keep = {v.snapshot for v in (parent, latest) if v is not None and v.snapshot}
    return owned, keep


def _snapshot_prefix(cfg, volume: str) -> str:
    from backyfs.sources.rbd import snapshot_prefix

    return snapshot_prefix(f"{os.path.abspath(cfg.db_path)}\0{volume}")


def run_backup(args: argparse.Namespace):
    """Back up args.source as args.volume; returns (version, parent). Shared by `backup` and `job run`."""
    cfg, volume, repo, parent, source, hints, volume_lock = _open_backup(args)
    from backyfs.repository.writer import BackupWriter

    read_limit = args.read_limit if args.read_limit is not None else cfg.read_mb_s
    writer = BackupWriter(repo, source, volume, parent=parent, hints=hints, labels=_labels(args.label),
                          block_size=cfg.block_size, threads=cfg.threads, read_limit=read_limit * 1e6,
                          snapshot=getattr(source, "snapshot", None), sample_percent=args.verify_sample,
                          volume_lock=volume_lock,
                          progress=Progress(f"backup {volume}", enabled=None if not args.json else False))
    try:
        version = writer.run()
        repo.close()
    finally:
        source.close()
    if writer.resumed:
        print(f"backyfs: resumed the pending version {writer.resumed}", file=sys.stderr)
    return version, parent


def cmd_backup(args: argparse.Namespace) -> int:
    version, parent = run_backup(args)
    if args.json:
        _print_json({"uid": version.uid, "volume": version.volume, "parent": version.parent, **version.stats})
    else:
        st = version.stats
        kind = "differential" if parent else "full"
        print(f"{version.uid}  {kind} backup of {version.volume}: {st['bytes_total'] / 2**20:,.1f} MiB, "
              f"read {st['bytes_read'] / 2**20:,.1f} MiB, stored {st['bytes_stored'] / 2**20:,.1f} MiB "
              f"in {st['seconds']:.2f} s")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from backyfs.repository.restore import RestoreFailed, restore
    from backyfs.sources import open_target

    if not args.target:  # "" would be written as a hidden file in the current directory
        raise UsageError("the restore TARGET is empty: name a file, a block device or rbd:POOL/IMAGE")
    repo = _repo(args)
    version = repo.resolve(args.version)
    if version.state == "pending":
        raise BackyfsError(f"version {version.uid} is pending (an unfinished backup): nothing to restore")
    target = open_target(args.target, version.size, force=args.force, sparse=args.sparse)
    try:
        result = restore(repo, version, target, threads=load_config(args.config).threads,
                         progress=Progress(f"restore {version.uid}"))
    except RestoreFailed as exc:  # complete but for the bad blocks, which read as zeros
        if args.json:  # what was restored, and which blocks not: a script needs it most then
            _print_json({"uid": version.uid, **exc.result.__dict__})
        if len(exc.result.errors) > 1:  # the last line names the first; list them all only if many
            for line in exc.result.errors:
                print(f"backyfs: {line}", file=sys.stderr)
        raise DataProblem(str(exc)) from None
    except (BackyfsError, OSError) as exc:  # stopped part-way: a full disk, a dead store
        reason = str(exc) if isinstance(exc, BackyfsError) else f"{exc.strerror}: {exc.filename}"
        raise BackyfsError(f"{reason}; {target.abandon()}") from None
    except KeyboardInterrupt:
        print(f"backyfs: {target.abandon()}", file=sys.stderr)
        raise
    if args.json:
        _print_json({"uid": version.uid, **result.__dict__})
    else:
        print(f"restored {version.uid} to {args.target}: {version.size / 2**20:,.1f} MiB "
              f"({result.bytes_written / 2**20:,.1f} MiB data) in {result.seconds:.2f} s")
    return 0


def _version_row(v) -> dict:
    return {"uid": v.uid, "volume": v.volume, "state": v.state, "size": v.size,
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created)),
            "parent": v.parent, "protected": v.protected, "labels": v.labels}


def cmd_ls(args: argparse.Namespace) -> int:
    repo = _repo(args)
    versions = repo.db.versions(volume=args.volume)
    rows = [_version_row(v) for v in versions]
    if args.json:
        _print_json(rows)
        return 0
    width = max([20, *(len(r["volume"]) for r in rows)])  # whole names: two may share 20 characters
    fmt = "{:<12}  {:<" + str(width) + "}  {:<19}  {:<7}  {:>10}  {:<12}  {}"
    print(fmt.format("UID", "VOLUME", "CREATED", "STATE", "SIZE", "PARENT", "LABELS"))
    for r in rows:
        labels = ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items()))
        flag = "P" if r["protected"] else ""
        print(fmt.format(r["uid"], r["volume"], r["created"], r["state"] + flag,
                         _human(r["size"]), r["parent"] or "-", labels))
    return 0


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return str(size)


def cmd_show(args: argparse.Namespace) -> int:
    repo = _repo(args)
    version = repo.resolve(args.version)
    data = version.to_json()
    try:
        data["blocks_allocated"] = repo.db.blockmap_entries(version.uid)
    except BackyfsError:
        data["blocks_allocated"] = None
    if args.json:
        _print_json(data)
        return 0
    for key, value in data.items():
        print(f"{key:>16}: {_shown(key, value)}")
    return 0


def _shown(key: str, value: object) -> str:
    """A field of `show` for people: times as dates, maps as key=value, nothing as '-'."""
    if key in ("created", "heartbeat") and isinstance(value, (int, float)):  # epoch seconds in JSON
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    if key in ("size", "block_size") and isinstance(value, int):
        return f"{value} bytes ({_human(value)})"
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def cmd_rm(args: argparse.Namespace) -> int:
    from backyfs.export.overlay import discard_overlay, overlay_names

    cfg, repo = _config_and_repo(args)
    version = repo.resolve(args.version)
    if version.uid != args.version and not args.version.startswith(version.uid[:4]):
        raise BackyfsError(f"rm needs a version uid, not a volume name ({args.version!r})")
    with repo.versions_lock():  # a writable export makes its overlay under it: not in between
        # An overlay holds writes made on top of this version: they would be left with nothing under.
        overlays = overlay_names(cfg.overlay_dir, version.uid)
        if overlays and not args.force:
            raise StateError(f"version {version.uid} has overlays ({', '.join(overlays)}): commit or "
                             "discard them first (backyfs overlay), or rm --force to discard them too")
        repo.db.check_deletable(version.uid, force=args.force)
        for name in overlays:
            discard_overlay(cfg.overlay_dir, version.uid, name)  # refused while a server uses it
            print(f"discarded overlay {name} of version {version.uid}")
        repo.delete_version(version, force=args.force)
    print(f"removed version {version.uid} of {version.volume}")
    return 0


def cmd_protect(args: argparse.Namespace) -> int:
    repo = _repo(args)
    version = repo.resolve(args.version)
    repo.update_version(version, protected=args.command == "protect")
    print(f"version {version.uid} {'protected' if args.command == 'protect' else 'unprotected'}")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    repo = _repo(args)
    version = repo.resolve(args.version)
    repo.update_version(version, labels=_labels(args.labels), remove=args.remove or [])
    import json

    write_out(json.dumps(repo.db.get_version(version.uid).labels, sort_keys=True) + "\n")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    repo = _repo(args)
    data = {**repo.db.version_stats(), **repo.db.block_stats(), "store": repo.store.url}
    if args.json:
        _print_json(data)
    else:
        for key, value in data.items():
            print(f"{key:>14}: {value}")
    return 0


def cmd_rebuild_db(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    had_db = os.path.exists(cfg.db_path)
    from backyfs.repository.locks import running_backup

    volume = running_backup(cfg.db_path)  # it would put its version in the database moved aside
    if volume is not None:
        raise BackyfsError(f"a backup of volume {volume} is running on this repository: run rebuild-db "
                           "when none is")
    repo = open_repository(cfg)
    try:
        if repo.db.version_stats()["versions"]:
            raise BackyfsError(f"{repo.db.path} is not empty; move it aside to rebuild it from the store")
        with repo.activity_lock(exclusive=True) as alone:
            if not alone:  # it writes to the database moved aside: its version would be missed
                raise BackyfsError("a backup or overlay commit is running on this repository: run "
                                   "rebuild-db when none is")
            result = repo.rebuild_db()
        if not result["versions"] and not result["damaged"]:
            # A mistyped bucket, pool or prefix: no empty repository that looks rebuilt, and no index
            # of another program's objects that gc would then delete.
            others = f" ({result['objects']} objects named like blocks)" if result["objects"] else ""
            raise BackyfsError(f"the store {repo.store.url} holds no backyfs versions{others}: check "
                               "[store] in the config; nothing was rebuilt")
    except BaseException:
        repo.close()
        if not had_db:  # refused: no new, empty database that looks like a repository
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(cfg.db_path + suffix)
        raise
    print(f"rebuilt {repo.db.path}: {result['versions']} versions, {result['objects']} objects")
    if result["damaged"]:
        raise DataProblem(f"{len(result['damaged'])} damaged version(s): " + "; ".join(result["damaged"]))
    return 0


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None


def _rate(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or more, not {text}")
    return value


def _percent(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be a percentage from 0 to 100, not {text}")
    return value


AddCommand = Callable[..., argparse.ArgumentParser]


def register(sub: argparse._SubParsersAction) -> None:
    def add(name: str, func, help_text: str, description: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=description or help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    add("init", cmd_init, "create the data directory, store and metadata database", helptext.INIT)
    _register_backup(add)
    _register_restore(add)
    _register_versions(add)
    from backyfs.cli.housekeeping import register_housekeeping

    register_housekeeping(sub)


def _register_backup(add: AddCommand) -> None:
    p = add("backup", cmd_backup, "back up a disk image, block device or RBD image", helptext.BACKUP)
    p.add_argument("source", metavar="SOURCE", help="image file, block device, or rbd:POOL/IMAGE")
    p.add_argument("volume", metavar="VOLUME", help="volume name the versions are filed under")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--parent", metavar="VERSION", help="diff against this version")
    mode.add_argument("--incremental", action="store_true",
                      help="diff against the volume's latest valid version; fail if there is none")
    mode.add_argument("--full", action="store_true", help="do not diff against any parent")
    p.add_argument("--hints", metavar="FILE", help="read only these extents (rbd diff --format json)")
    p.add_argument("--verify-sample", type=_percent, default=0.5, metavar="PERCENT",
                   help="with hints or an RBD diff, re-read this share of the unchanged blocks "
                        "(at least 1, at most 64 blocks; none when nothing changed; default 0.5)")
    p.add_argument("--pre-snapshot", metavar="CMD", help="run before the RBD snapshot (e.g. fsfreeze)")
    p.add_argument("--post-snapshot", metavar="CMD", help="run after the RBD snapshot (e.g. thaw)")
    p.add_argument("--label", metavar="KEY=VALUE", action="append", help="label the version (repeatable)")
    p.add_argument("--read-limit", type=_rate, metavar="MB/S", help="cap reads from the source (0: no limit)")
    p.add_argument("--write-limit", type=_rate, metavar="MB/S", help="cap writes to the store (0: no limit)")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of a line")


def _register_restore(add: AddCommand) -> None:
    p = add("restore", cmd_restore, "restore a version to a file, block device or RBD image",
            helptext.RESTORE)
    p.add_argument("version", metavar="VERSION", help=helptext.VERSION)
    p.add_argument("target", metavar="TARGET", help="file, block device, or rbd:POOL/IMAGE")
    p.add_argument("--force", action="store_true", help="overwrite an existing target")
    p.add_argument("--sparse", action="store_true",
                   help="a block device target already reads as zeros: skip zero blocks")
    p.add_argument("--json", action="store_true", help="print a JSON summary")



def _register_versions(add: AddCommand) -> None:
    p = add("ls", cmd_ls, "list versions", helptext.LS)
    p.add_argument("volume", metavar="VOLUME", nargs="?", help="only this volume")
    p.add_argument("--json", action="store_true", help="print JSON (one object per version)")
    p = add("show", cmd_show, "show one version's metadata", helptext.SHOW)
    p.add_argument("version", metavar="VERSION", help=helptext.VERSION)
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add("rm", cmd_rm, "remove a version (its blocks stay until garbage collection)", helptext.RM)
    p.add_argument("version", metavar="VERSION", help="uid or unique uid prefix (not a volume name)")
    p.add_argument("--force", action="store_true",
                   help="remove even a protected version, and discard the version's overlays")
    add("protect", cmd_protect, "protect a version against rm and prune",
        helptext.PROTECT).add_argument("version", metavar="VERSION", help=helptext.VERSION)
    add("unprotect", cmd_protect, "lift a version's protection against rm and prune",
        helptext.UNPROTECT).add_argument("version", metavar="VERSION", help=helptext.VERSION)
    p = add("label", cmd_label, "set or remove labels of a version", helptext.LABEL)
    p.add_argument("version", metavar="VERSION", help=helptext.VERSION)
    p.add_argument("labels", metavar="KEY=VALUE", nargs="*", help="labels to set")
    p.add_argument("--remove", metavar="KEY", action="append", help="remove this label (repeatable)")
    p = add("stats", cmd_stats, "repository totals", helptext.STATS)
    p.add_argument("--json", action="store_true", help="print JSON")
    add("rebuild-db", cmd_rebuild_db, "rebuild an empty metadata database from the store alone",
        helptext.REBUILD_DB)
