"""`backyfs overlay ls|discard|commit`: the copy-on-write overlays of writable exports."""

from __future__ import annotations

import argparse
import json
import os
import re
import time

from backyfs.cli.commands import _labels, _print_json
from backyfs.cli.progress import Progress
from backyfs.config import Config, load_config, require_repository
from backyfs.errors import NotFound


def _overlay_version(cfg: Config, spec: str) -> str:
    """A version uid for an overlay: the exact uid if such an overlay exists (even for a version that
    is gone or invalid), else what SPEC resolves to."""
    from backyfs.config import open_repository, require_repository

    if re.fullmatch(r"[0-9a-f]{12}", spec) and os.path.isdir(os.path.join(cfg.overlay_dir, spec)):
        return spec
    if re.fullmatch(r"[0-9a-f]{4,11}", spec) and os.path.isdir(cfg.overlay_dir):  # a uid prefix
        found = [uid for uid in os.listdir(cfg.overlay_dir) if uid.startswith(spec)]
        if len(found) == 1 and re.fullmatch(r"[0-9a-f]{12}", found[0]):
            return found[0]
    require_repository(cfg)
    repo = open_repository(cfg)
    try:
        return repo.resolve(spec).uid
    finally:
        repo.close()


def cmd_overlay_ls(args: argparse.Namespace) -> int:
    from backyfs.export.overlay import list_overlays

    cfg = load_config(args.config)
    require_repository(cfg)  # an empty list for a mistyped data dir would look like lost overlays
    rows = []
    for info in list_overlays(cfg.overlay_dir):
        meta = _read_meta(info.path)
        rows.append({"version": info.version_uid, "name": info.name, "path": info.path,
                     "dirty_blocks": info.dirty_blocks, "trimmed_blocks": info.trimmed_blocks,
                     "dirty_bytes": info.dirty_blocks * meta.get("block_size", 0),
                     "modified": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.modified))})
    if args.json:
        _print_json(rows)
        return 0
    fmt = "{:<12}  {:<16}  {:>8}  {:>8}  {:>11}  {}"
    print(fmt.format("VERSION", "NAME", "DIRTY", "TRIMMED", "DIRTY MIB", "MODIFIED"))
    for r in rows:
        print(fmt.format(r["version"], r["name"], r["dirty_blocks"], r["trimmed_blocks"],
                         f"{r['dirty_bytes'] / 2**20:.1f}", r["modified"]))
    return 0


def _read_meta(path: str) -> dict:
    try:
        with open(os.path.join(path, "meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def cmd_overlay_discard(args: argparse.Namespace) -> int:
    from backyfs.export.overlay import discard_overlay

    cfg = load_config(args.config)
    uid = _overlay_version(cfg, args.version)
    discard_overlay(cfg.overlay_dir, uid, args.name)
    print(f"discarded overlay {args.name} of version {uid}")
    return 0


def cmd_overlay_commit(args: argparse.Namespace) -> int:
    from backyfs.export.service import ExportService, commit_overlay

    cfg = load_config(args.config)
    uid = _overlay_version(cfg, args.version)
    if not os.path.isdir(os.path.join(cfg.overlay_dir, uid, args.name)):
        raise NotFound(f"no overlay {args.name!r} for version {uid}")
    service = ExportService(cfg)
    try:
        version = commit_overlay(service, uid, args.name, labels=_labels(args.label), keep=args.keep,
                                 progress=Progress(f"commit {args.name} of {uid}"))
    finally:
        service.close()
    if args.json:
        _print_json({"uid": version.uid, "parent": uid, "volume": version.volume, **version.stats})
    else:
        print(f"{version.uid}  committed overlay {args.name} of {uid} as a new version of "
              f"{version.volume}" + ("; overlay kept" if args.keep else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("overlay", help="list, discard or commit the overlays of writable exports",
                       description=OVERLAY_HELP, formatter_class=fmt)
    osub = p.add_subparsers(dest="overlay_command", metavar="ACTION", required=True)
    q = osub.add_parser("ls", help="list overlays and how much they changed", formatter_class=fmt,
                        description="List the overlays in DATA/overlays: version, name, changed blocks.")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_overlay_ls)
    q = osub.add_parser("discard", help="delete an overlay, dropping its writes", formatter_class=fmt,
                        description="Delete an overlay and the writes in it. Refused while a client of a "
                        "server has it open.")
    q.add_argument("version", metavar="VERSION", help="the exported version (uid or volume name)")
    q.add_argument("--name", default="default", help="overlay name (default 'default')")
    q.set_defaults(func=cmd_overlay_discard)
    q = osub.add_parser("commit", help="store an overlay as a new version", description=COMMIT_HELP,
                        formatter_class=fmt)
    q.add_argument("version", metavar="VERSION", help="the exported version (uid or volume name)")
    q.add_argument("--name", default="default", help="overlay name (default 'default')")
    q.add_argument("--label", metavar="KEY=VALUE", action="append", help="label the new version (repeatable)")
    q.add_argument("--keep", action="store_true", help="keep the overlay after committing it")
    q.add_argument("--json", action="store_true", help="print a JSON summary")
    q.set_defaults(func=cmd_overlay_commit)


OVERLAY_HELP = """\
Writes to a --writable export land in an overlay (DATA/overlays/VERSION/NAME); the backup itself
never changes. 'ls' lists them, 'discard' drops one, 'commit' turns one into a new version.
Commit and discard refuse an overlay while a server has it open for a connected client; once it
is committed or discarded, that server's next writable connection starts a new, empty one."""

COMMIT_HELP = """\
Store the blocks an overlay changed as a new version of the same volume, whose parent is the
exported version, and print the new version's uid. Unchanged blocks are shared with the parent,
so this costs only the changed data. The overlay is deleted afterwards unless --keep is given."""
