"""Garbage collection of blocks no version references, safe while backups run.

A running backup counts a block as "already stored" when the index names it 'ok', or condemned
after the backup started (MetadataDB.stored_for), so a block must not vanish between that moment
and the backup's end. gc therefore works in two phases:
1. condemn: blocks no block map references are marked 'condemned'. Backups that start later no
   longer count them as stored (they write them again, which revives them).
2. delete, on a later run: a condemned block still unreferenced is deleted only while no backup
   runs on this repository (backups hold its activity lock shared, the delete phase takes it
   exclusive or deletes nothing), and only if no live backup (a pending version with a recent
   heartbeat) started before it was condemned. A backup that did reference it has finished by
   then, its block map names it, and gc revives it instead; one that wrote it again as new data
   (it was condemned, so not "stored" for that backup) has recorded it by then.
What may be deleted is read before the block maps are: a backup finishing during the scan of the
maps is then seen as live, not missed on both sides.
Strays: a backup records the blocks it stored at checkpoints, so one killed outright (or whose
database write failed on a full disk) leaves objects in the store that no index row names. gc
lists the store's blocks and enters those that are backyfs blocks as condemned, so they take the
same two phases: a running backup that stored one records it (its row turns 'ok'), or references
it and revives it. Not while the store holds foreign versions: another host's blocks are no strays.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from backyfs.errors import BackyfsError, CorruptObject, NotFound, ObjectMissing
from backyfs.repository import mapstore
from backyfs.repository.repo import Repository, block_key, digest_from_key, stored_versions

log = logging.getLogger(__name__)

STALE_AFTER = 900.0  # a pending backup silent this long (no checkpoint) is considered dead
TEMPORARY_MAX_AGE = 6 * 3600.0  # a put's temporary file this old belongs to a killed process


@dataclass
class GcResult:
    condemned: int = 0
    strays: int = 0  # objects in the store no index row named (a killed backup's): condemned now
    deleted: int = 0
    deleted_bytes: int = 0
    revived: int = 0
    waiting: int = 0  # condemned, but an older backup is still running
    deferred: bool = False  # a backup was running, or versions are foreign: nothing was deleted
    foreign: list[str] = field(default_factory=list)  # see _unknown_versions()


def referenced_digests(repo: Repository) -> set[bytes]:
    out: set[bytes] = set()
    for uid in repo.db.version_uids():
        try:
            out |= repo.db.get_blockmap(uid).digest_set()
        except NotFound:  # a pending or failed version without a map references nothing yet
            pass
    return out


def collect_garbage(repo: Repository, dry_run: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> GcResult:
    """progress(objects deleted, objects to delete) during the delete phase."""
    damage = repo.db.damage()
    if damage:  # a damaged index can hide the versions that reference a block
        raise BackyfsError(f"the metadata database {repo.db.path} is damaged ({damage[0]}): gc deletes "
                           "nothing; move it aside and run 'backyfs rebuild-db'")
    with repo.activity_lock(exclusive=True) as alone:
        return _collect(repo, dry_run, alone, progress)


def _unknown_versions(repo: Repository) -> tuple[set[str], set[str]]:
    """Of the store's versions this database does not know: those with metadata (foreign: another
    host's sharing the store, since blocks are content-addressed, or ones rebuild-db left out),
    and block maps an interrupted rm left without their metadata (remnants: no version has them)."""
    known = repo.db.version_uids()
    with_meta, maps_only = stored_versions(repo.store)
    return with_meta - known, maps_only - known


def _collect(repo: Repository, dry_run: bool, alone: bool,
             progress: Callable[[int, int], None] | None) -> GcResult:
    now = time.time()
    foreign, remnants = _unknown_versions(repo)
    alone = alone and not foreign  # their block maps may name any block: delete nothing
    result = GcResult(deferred=not alone, foreign=sorted(foreign))
    live = [v for v in repo.db.versions(state="pending") if v.heartbeat and v.heartbeat > now - STALE_AFTER]
    oldest_live = min((v.created for v in live), default=float("inf"))
    condemned = repo.db.blocks_in_state("condemned")
    known = repo.db.all_digests()
    strays = [] if foreign else _strays(repo, known)
    result.strays = len(strays)
    referenced = referenced_digests(repo)  # after the reads above: see the module's docstring
    revive = [d for d, _ in condemned if d in referenced]
    doomed = [d for d, t in condemned if d not in referenced and (t or now) < oldest_live] if alone else []
    result.revived, result.waiting = len(revive), len(condemned) - len(revive) - len(doomed)
    fresh = known - referenced - {d for d, _ in condemned}
    result.condemned = len(fresh)
    log.debug("gc: %d blocks stored, %d referenced, %d condemned by earlier runs; %s; live backups: %s; "
              "foreign versions: %s; rm remnants: %s", len(known), len(referenced), len(condemned),
              "may delete" if alone else "deletes nothing (a backup runs, or foreign versions)",
              ", ".join(v.uid for v in live) or "none", ", ".join(sorted(foreign)) or "none",
              ", ".join(sorted(remnants)) or "none")
    sizes = repo.db.block_info(doomed)
    if dry_run:  # what this run would do, counted the same way
        result.deleted = len(doomed)
        result.deleted_bytes = sum(sizes.get(d, (0, ""))[0] for d in doomed)
        return result
    repo.db.mark_blocks(revive, "ok")
    if alone:
        for uid in remnants:
            mapstore.delete_map(repo.store, uid)
        repo.store.sweep_temporary(TEMPORARY_MAX_AGE)
    for digest in doomed:
        repo.store.delete(block_key(digest))
        result.deleted += 1
        result.deleted_bytes += sizes.get(digest, (0, ""))[0]
        if progress:
            progress(result.deleted, len(doomed))
    repo.db.delete_blocks(doomed)
    # Stamped now, not at the start: a backup that started before this commit may count them stored.
    repo.db.condemn_blocks(fresh, time.time())
    repo.db.add_condemned(strays, time.time())
    return result


def _strays(repo: Repository, known: set[bytes]) -> list[bytes]:
    """Blocks in the store that the index does not name (see the module's docstring). Each is read
    and checked against its name first: an object that is not a backyfs block (a bucket shared
    with another program) is never ours to delete. A killed backup leaves only a few."""
    out = []
    for key in repo.store.list("blocks/"):
        digest = digest_from_key(key)
        if digest is None or digest in known:
            continue
        try:
            repo.read_block(digest)
        except (CorruptObject, ObjectMissing) as exc:
            log.debug("gc: %s is in no index and no block of ours: left alone (%s)", key, exc)
            continue
        out.append(digest)
    return out
