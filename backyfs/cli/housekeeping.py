"""`backyfs scrub`, `deep-scrub`, `gc` and `prune`: checking what is stored, removing what no version
needs, and versions no policy keeps."""

from __future__ import annotations

import argparse
import sys

from backyfs.cli import helptext
from backyfs.cli.commands import (
    DataProblem,
    UsageError,
    _config_and_repo,
    _percent,
    _print_json,
    _repo,
)
from backyfs.cli.progress import Progress
from backyfs.errors import NotFound, StateError


def _scrub_versions(repo, args: argparse.Namespace) -> list:
    if args.all and args.version:  # a mistyped VERSION must not pass unseen
        raise UsageError("give a VERSION or --all, not both")
    if args.all:
        return [v for v in repo.db.versions() if v.state != "pending"]
    if not args.version:
        raise UsageError("name a VERSION or give --all")
    return [repo.resolve(args.version)]


def cmd_scrub(args: argparse.Namespace) -> int:
    from backyfs.repository.scrub import scrub

    if not 0 < args.percent <= 100:
        raise UsageError("--percent must be in (0, 100]")
    cfg, repo = _config_and_repo(args)
    versions = _scrub_versions(repo, args)
    deep = args.command == "deep-scrub"
    result = scrub(repo, versions, deep=deep, percent=args.percent, threads=cfg.threads,
                   progress=Progress(args.command, unit="objects"))
    for line in result.findings:
        print(f"backyfs: {line}", file=sys.stderr)
    for uid in result.invalidated:
        print(f"backyfs: version {uid} marked invalid", file=sys.stderr)
    for uid in result.revalidated:
        print(f"version {uid} is valid again")
    for uid in result.remirrored:
        print(f"backyfs: version {uid}: its damaged copy in the store was written again", file=sys.stderr)
    print(f"{args.command}: checked {result.checked} objects of {len(versions)} version(s), "
          f"{len(result.bad)} bad")
    damage = repo.db.damage() if deep else []
    if damage:
        raise DataProblem(f"the metadata database {repo.db.path} is damaged ({damage[0]}): move it "
                          "aside and run 'backyfs rebuild-db'")
    if result.bad or result.unmirrored:
        raise DataProblem(f"{args.command} found {len(result.bad)} bad object(s)"
                          + (f" and {len(result.unmirrored)} version(s) missing from the store"
                             if result.unmirrored else ""))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from backyfs.repository.gc import collect_garbage

    repo = _repo(args)
    result = collect_garbage(repo, dry_run=args.dry_run, progress=Progress("gc: deleting", unit="objects"))
    if args.json:
        _print_json(result.__dict__)
        return 0
    would = "would " if args.dry_run else ""
    print(f"gc: {would}{'delete' if would else 'deleted'} {result.deleted} objects "
          f"({result.deleted_bytes / 2**20:,.1f} MiB), {would}{'condemn' if would else 'condemned'} "
          f"{result.condemned} newly unreferenced, {would}{'revive' if would else 'revived'} "
          f"{result.revived}, {result.waiting} waiting for running backups")
    if result.strays:
        print(f"gc: {result.strays} objects in the store were in no index (a killed backup stored them "
              f"before recording them): {would}{'condemn' if would else 'condemned'} too")
    if result.foreign:
        print(f"gc: the store holds {len(result.foreign)} version(s) this database does not know "
              f"(another host's, or left out by rebuild-db: {', '.join(result.foreign[:3])}): "
              "nothing is deleted; run gc where one database knows every version", file=sys.stderr)
    elif result.deferred:
        print("gc: a backup is running: nothing is deleted until gc runs with none", file=sys.stderr)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from backyfs.repository.retention import Policy

    policy = Policy(args.keep_last, args.keep_daily, args.keep_weekly, args.keep_monthly)
    if policy.empty():
        raise UsageError("give at least one --keep-* rule")
    cfg, repo = _config_and_repo(args)
    volumes = [args.volume] if args.volume else sorted({v.volume for v in repo.db.versions()})
    if args.volume and not repo.db.has_volume(args.volume):
        raise NotFound(f"unknown volume {args.volume!r}")
    for volume in volumes:
        prune_volume(cfg, repo, volume, policy, dry_run=args.dry_run, prefix="")
    return 0


def prune_volume(cfg, repo, volume: str, policy, *, dry_run: bool = False, prefix: str) -> None:
    """Remove the versions of VOLUME that POLICY does not keep (prune, and a job's keep), except
    those with overlays: writes on top of them, which rm too refuses to drop unasked, and maybe
    a writable export in use. One removed meanwhile (another prune) is already gone."""
    from backyfs.export.overlay import overlay_names
    from backyfs.repository.retention import versions_to_remove

    for version in versions_to_remove(repo.db.versions(volume=volume), policy):
        with repo.versions_lock():  # a writable export makes its overlay under it: not in between
            if overlay_names(cfg.overlay_dir, version.uid):
                print(f"{prefix}kept {version.uid} of {volume}: it has overlays (commit or discard "
                      "them, backyfs overlay ls)", file=sys.stderr)
                continue
            if not dry_run:
                try:
                    repo.delete_version(version)
                except NotFound:  # removed meanwhile (another prune)
                    continue
                except StateError as exc:  # protected meanwhile: kept, and the others go on
                    print(f"{prefix}kept {version.uid} of {volume}: {exc}", file=sys.stderr)
                    continue
        print(f"{prefix}{'would remove' if dry_run else 'removed'} {version.uid} of {volume}")


def register_housekeeping(sub: argparse._SubParsersAction) -> None:
    for name, deep in (("scrub", False), ("deep-scrub", True)):
        p = sub.add_parser(name, help="read and hash every object" if deep else
                           "check that every object exists with the right size", description=helptext.SCRUB,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=cmd_scrub)
        p.add_argument("version", metavar="VERSION", nargs="?", help=helptext.VERSION)
        p.add_argument("--all", action="store_true", help="every version")
        p.add_argument("--percent", type=_percent, default=100.0, metavar="P",
                       help="check a random P%% of the objects (default 100)")
    p = sub.add_parser("gc", help="delete stored blocks no version references (safe during backups)",
                       description=helptext.GC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=cmd_gc)
    p.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("prune", help="remove versions a keep-policy does not keep",
                       description=helptext.PRUNE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=cmd_prune)
    p.add_argument("volume", metavar="VOLUME", nargs="?", help="only this volume (default: all)")
    for rule, what in (("last", "the N newest versions"), ("daily", "the newest of each of N days"),
                       ("weekly", "the newest of each of N weeks"),
                       ("monthly", "the newest of each of N months")):
        p.add_argument(f"--keep-{rule}", type=_count, default=0, metavar="N", help=f"keep {what}")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")


def _count(text: str) -> int:
    """argparse type of a --keep-* rule: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0 or more)")
    return value


