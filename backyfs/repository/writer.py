"""The backup writer: reads a source block by block, stores new blocks once, builds the block map.

Blocks flow through a thread pool (read, zero test, hash, compress, put) with a bounded number in
flight, so memory stays at a few blocks per thread. A version turns valid only after every block
it references was flushed to the store; until then it is pending, and a re-run resumes it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Protocol

from backyfs.errors import BackyfsError, NotFound, SourceError
from backyfs.metadata.blockmap import BlockMap
from backyfs.metadata.db import Version, parent_removed
from backyfs.repository.extents import Extent, blocks_touched
from backyfs.repository.locks import lock_volume
from backyfs.repository.repo import (
    DEFAULT_BLOCK_SIZE,
    Repository,
    block_digest,
    block_key,
    new_uid,
)
from backyfs.storage.ratelimit import TokenBucket, cancel_waits_on

log = logging.getLogger(__name__)

COMMIT_LABEL = "committed-from"  # VERSION/OVERLAY on versions made by an overlay commit

CHECKPOINT_SECONDS = 5.0


class BackupSource(Protocol):
    size: int

    def pread(self, offset: int, length: int) -> bytes: ...

    def data_extents(self) -> Iterable[Extent]:
        """Ranges that may hold data; everything else is a hole and reads as zeros."""
        ...


class HintsMismatch(BackyfsError):
    pass


@dataclass
class BackupStats:
    bytes_total: int = 0      # logical size of the volume
    bytes_read: int = 0       # read from the source
    bytes_new: int = 0        # plaintext of blocks stored by this backup
    bytes_stored: int = 0     # encoded bytes written to the store
    bytes_dedup: int = 0      # read, but already in the store
    bytes_sparse: int = 0     # holes and zero blocks: never read or never stored
    bytes_unchanged: int = 0  # taken from the parent without reading (hints)
    blocks_sampled: int = 0   # unhinted blocks re-read to check the hints
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Plan:
    to_read: list[int]                  # block indices to read, ascending
    base: dict[int, bytes]              # starting block map (parent's, minus what changes)
    sample: set[int] = field(default_factory=set)  # subset of to_read checked against base


class BackupWriter:
    def __init__(self, repo: Repository, source: BackupSource, volume: str, *,
                 parent: Version | None = None, hints: list[Extent] | None = None,
                 labels: dict[str, str] | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 threads: int = 4, read_limit: float = 0, sample_percent: float = 0.5,
                 snapshot: str | None = None, volume_lock: IO[str] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> None:
        """volume_lock: the volume's lock (lock_volume) when the caller took it already, as an
        RBD backup does before its snapshot; the writer releases it at the end of run()."""
        if hints is not None and parent is None:
            raise BackyfsError("hints need a parent version to diff against")
        self.repo, self.source, self.volume = repo, source, volume
        self.volume_lock = volume_lock
        self.parent, self.hints, self.labels = parent, hints, labels or {}
        self.block_size = parent.block_size if parent else block_size
        self.threads = max(1, threads)
        self.read_bucket = TokenBucket(read_limit) if read_limit > 0 else None
        self.sample_percent = sample_percent
        self.snapshot = snapshot
        self.progress = progress
        self.stats = BackupStats(bytes_total=source.size)
        self.lock = threading.Lock()
        # Digests known stored: this run's, and those the index named usable when looked up (see
        # _claim). The index is not loaded whole: 2.5M blocks (10 TiB) took 1.6 s and 250 MB.
        self.known: set[bytes] = set()
        self.in_flight: set[bytes] = set()
        self.since = 0.0  # when this run started: see _run and MetadataDB.stored_for
        self.unrecorded: list[tuple[bytes, int]] = []  # stored but not yet flushed + recorded
        self.zero = bytes(self.block_size)

    # --- the run --------------------------------------------------------------------------
    def run(self) -> Version:
        # The activity lock (shared) keeps gc from deleting any block while this backup may store
        # or count on it; a gc that is deleting makes us wait until it is done.
        with self._volume_lock(), self.repo.activity_lock(exclusive=False):
            return self._run()

    def _volume_lock(self) -> IO[str]:
        if self.volume_lock is not None:
            return self.volume_lock
        return lock_volume(self.repo.db.path, self.volume)

    def _run(self) -> Version:
        started = time.monotonic()
        # Blocks gc condemned since now count as stored: it deletes none while this run holds the
        # activity lock. Not the version's creation: a resumed one's is old, and a gc killed between
        # deleting objects and their rows leaves rows condemned before this run for objects gone.
        self.since = time.time()
        plan = self._plan()
        self._check_map_fits(plan)  # before a version exists: a refusal leaves nothing behind
        version = self._open_version()
        self.uid = version.uid
        self.repo.db.update_version(version.uid, heartbeat=time.time())
        log.debug("%s version %s of %s (parent %s, %d bytes in %d-byte blocks)",
                  "resuming" if self.resumed else "new", version.uid, self.volume, version.parent,
                  self.source.size, self.block_size)
        log.debug("reading %d blocks (%d of them a sample of unchanged ones to check the diff), "
                  "%d taken from the parent", len(plan.to_read), len(plan.sample),
                  len(plan.base) - sum(1 for i in plan.to_read if i in plan.base))
        try:
            blocks = self._process(plan)
        except BaseException as exc:
            if isinstance(exc, HintsMismatch):
                self.repo.set_state(version, "invalid")
            self._flush_after(exc)
            raise
        self._flush()
        self._repair_damaged(blocks)
        blockmap = BlockMap.from_mapping(self.source.size, self.block_size, blocks)
        self.stats.seconds = round(time.monotonic() - started, 3)
        self.repo.db.update_version(version.uid, stats=self.stats.as_dict())
        self.repo.save_version(version, blockmap)
        self.repo.store.flush()
        self.repo.set_state(version, "valid")
        self._drop_dead_pending(version)
        log.debug("version %s is valid after %.2f s: %s", version.uid, time.monotonic() - started,
                  " ".join(f"{name}={value}" for name, value in self.stats.as_dict().items()))
        return self.repo.db.get_version(version.uid)

    def _drop_dead_pending(self, made: Version) -> None:
        """Remove the volume's other pending versions from before this one: killed runs no later
        run can resume any more (one resumes only on the parent it started from, which is now
        older than this version). Nothing else writes them: this run holds the volume's lock."""
        for pending in self.repo.db.versions(volume=self.volume, state="pending"):
            # A killed overlay commit's is kept: it is resumed by the commit run again.
            if pending.uid != made.uid and pending.created < made.created \
                    and not pending.labels.get(COMMIT_LABEL):
                try:
                    self.repo.delete_version(pending)
                    log.debug("removed the dead pending version %s", pending.uid)
                except BackyfsError as exc:  # harmless: it only takes room in listings
                    log.warning("cannot remove the dead pending version %s: %s", pending.uid, exc)

    def _repair_damaged(self, blocks: dict[int, bytes]) -> None:
        """Blocks a scrub found missing or corrupt while this backup ran (it took unchanged blocks
        from its parent's map, and counted on what was stored when it started): read them from
        the source again and store them anew, which also repairs the object for other versions."""
        bad = self.repo.db.damaged_digests()  # a few, if any: then those this map names
        if bad:
            bad &= set(blocks.values())
        if not bad:
            return
        with self.lock:
            self.known -= bad
        for block_idx in sorted(i for i, d in blocks.items() if d in bad):
            _, digest = self._block(block_idx)
            if digest is None:
                blocks.pop(block_idx)
            else:
                blocks[block_idx] = digest
        self._flush()

    def _open_version(self) -> Version:
        """Resume a pending version of the same volume, parent and size, or start a new one."""
        parent_uid = self.parent.uid if self.parent else None
        for pending in reversed(self.repo.db.versions(volume=self.volume, state="pending")):
            # Only the same kind of run: an overlay commit (no snapshot) resuming an interrupted RBD
            # backup would become a valid version carrying a snapshot of other content; a backup
            # resuming a killed commit would take its label, and a re-run of the commit, trusting
            # that label, would then discard the overlay as committed.
            if (pending.parent, pending.size, pending.block_size, pending.snapshot is None,
                    pending.labels.get(COMMIT_LABEL)) == (
                    parent_uid, self.source.size, self.block_size, self.snapshot is None,
                    self.labels.get(COMMIT_LABEL)):
                self.resumed = pending.uid
                self.repo.db.set_labels(pending.uid, self.labels)
                if self.snapshot:  # a resumed RBD backup reads its new snapshot
                    self.repo.db.update_version(pending.uid, snapshot=self.snapshot)
                    pending.snapshot = self.snapshot
                self.repo.save_version(pending)  # (one made by an older backyfs was not in the store)
                return pending
        self.resumed = None
        version = Version(uid=new_uid(), volume=self.volume, created=time.time(), size=self.source.size,
                          block_size=self.block_size, parent=parent_uid, labels=self.labels,
                          snapshot=self.snapshot)
        self.repo.db.add_version(version)
        # In the store before any of its blocks: another host's gc sharing the store then sees a
        # version it does not know and deletes nothing (its strays would be this backup's blocks).
        self.repo.save_version(version)
        return version

    def _plan(self) -> _Plan:
        size, bs = self.source.size, self.block_size
        if self.parent is None:
            data_blocks = blocks_touched(self.source.data_extents(), bs, size)
            self.stats.bytes_sparse += size - _bytes_in(data_blocks, bs, size)
            return _Plan(sorted(data_blocks), {})
        try:
            base = self.repo.db.get_blockmap(self.parent.uid).to_dict()
        except NotFound:
            raise parent_removed(self.parent.uid) from None
        last_block = -(-size // bs) - 1
        # After a resize, blocks from the old tail on are re-read: they changed length or content.
        first_resized = min(size, self.parent.size) // bs if size != self.parent.size else last_block + 1
        if size != self.parent.size:
            base = {i: d for i, d in base.items() if i < first_resized}
        if self.hints is None:
            data_blocks = blocks_touched(self.source.data_extents(), bs, size)
            self.stats.bytes_sparse += size - _bytes_in(data_blocks, bs, size)
            return _Plan(sorted(data_blocks), {i: d for i, d in base.items() if i in data_blocks})
        changed = blocks_touched(self.hints, bs, size)
        changed |= set(range(first_resized, last_block + 1))
        sample: set[int] = set()
        # Nothing changed (an idle RBD volume): read nothing, nor list what is allocated (a second
        # on a fragmented 1 TiB image). Otherwise re-read a sample.
        if changed:
            data_blocks = blocks_touched(self.source.data_extents(), bs, size)
            changed = {i for i in changed if i in data_blocks or i in base}
            sample = self._sample(base.keys() - changed, data_blocks - changed) if changed else set()
        self.stats.blocks_sampled = len(sample)
        # Arithmetic, not a loop over a map of millions: every unchanged block is whole but the last.
        unchanged = len(base) - sum(1 for i in changed if i in base)
        tail = last_block in base and last_block not in changed
        self.stats.bytes_unchanged = unchanged * bs - (bs - _block_len(last_block, bs, size) if tail else 0)
        return _Plan(sorted(changed | sample), base, sample)

    def _sample(self, unhinted_data: set[int], unhinted_source: set[int]) -> set[int]:
        """A random sample of blocks the hints call unchanged, re-read to catch wrong diffs."""
        candidates = sorted(unhinted_data | unhinted_source)
        if not candidates or self.sample_percent <= 0:
            return set()
        count = max(1, min(64, round(len(candidates) * self.sample_percent / 100)))
        chosen = set(random.sample(candidates, min(count, len(candidates))))
        self.stats.blocks_sampled = len(chosen)
        return chosen

    def _process(self, plan: _Plan) -> dict[int, bytes]:
        blocks = plan.base  # becomes the new map (no copy: a parent map can hold millions)
        gate = threading.Semaphore(self.threads * 2)
        last_checkpoint = time.monotonic()
        work_bytes = _bytes_in(plan.to_read, self.block_size, self.source.size)
        stopping = threading.Event()  # ends the workers' rate-limit waits (the read's, the store's)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="backup", initializer=cancel_waits_on,
                                initargs=(stopping,)) as pool:
            pending: list[Future] = []
            try:
                for block_idx in plan.to_read:
                    gate.acquire()
                    fut = pool.submit(self._block, block_idx)
                    fut.add_done_callback(lambda _f: gate.release())
                    pending.append(fut)
                    pending = self._collect(pending, blocks, plan, wait=False)
                    if time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                        self._flush()
                        self.repo.db.update_version(self.uid, heartbeat=time.time())  # gc waits for us
                        last_checkpoint = time.monotonic()
                    if self.progress:
                        self.progress(self.stats.bytes_read, work_bytes)
                self._collect(pending, blocks, plan, wait=True)
            except BaseException:
                # Fail fast: blocks still queued would each meet the same error (a dead store
                # retrying and timing out), so only those already running are waited for, and
                # not through their rate-limit waits (a tiny limit's debt is hours).
                stopping.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        if self.progress:
            self.progress(work_bytes, work_bytes)
        return blocks

    def _collect(self, pending: list[Future], blocks: dict[int, bytes], plan: _Plan,
                 wait: bool) -> list[Future]:
        still = []
        for fut in pending:
            if not wait and not fut.done():
                still.append(fut)
                continue
            block_idx, digest = fut.result()  # re-raises a worker's error
            if block_idx in plan.sample and blocks.get(block_idx) != digest:
                raise HintsMismatch(
                    f"block {block_idx} (offset {block_idx * self.block_size}) changed but is not in the "
                    "diff: the diff is wrong; back up with --full (or without --hints)")
            if digest is None:
                blocks.pop(block_idx, None)
            else:
                blocks[block_idx] = digest
        return still

    def _block(self, block_idx: int) -> tuple[int, bytes | None]:
        """Worker: read one block; store it if it is new. Returns (block_idx, digest or None for zeros)."""
        offset = block_idx * self.block_size
        length = _block_len(block_idx, self.block_size, self.source.size)
        if self.read_bucket:
            self.read_bucket.consume(length)
        data = self.source.pread(offset, length)
        if len(data) != length:
            raise SourceError(f"short read at offset {offset}: {len(data)} of {length} bytes")
        if data == self.zero[:length]:
            self._count(bytes_read=length, bytes_sparse=length)
            return block_idx, None
        digest = block_digest(data)
        if not self._claim(digest):
            self._count(bytes_read=length, bytes_dedup=length)
            return block_idx, digest
        stored = self.repo.write_block(digest, data)
        with self.lock:
            self.in_flight.discard(digest)
            self.known.add(digest)
            self.unrecorded.append((digest, stored))
        self._count(bytes_read=length, bytes_new=length, bytes_stored=stored)
        return block_idx, digest

    def _check_map_fits(self, plan: _Plan) -> None:
        """Refuse before reading a volume whose block map could outgrow what the database stores
        in one value (1 GB: 25M blocks, ~95 TiB of data at 4 MiB blocks, 1.5 TiB at 64 KiB),
        instead of failing once everything was read and stored."""
        entries = len(plan.base) + len(plan.to_read)  # at most: some are in both
        if BlockMap.bytes_for(entries) > self.repo.db.max_value_bytes():
            raise BackyfsError(
                f"volume {self.volume} may have {entries:,} allocated {self.block_size}-byte blocks, "
                f"a block map larger than the metadata database stores in one value: back it up with "
                f"a larger block_size")

    def _claim(self, digest: bytes) -> bool:
        """True if this thread is to store digest: neither stored (by this run, or usable in the
        index) nor being stored by another thread. A thread that finds it in flight counts it as
        stored: the run fails if that store fails."""
        with self.lock:
            if digest in self.known or digest in self.in_flight:
                return False
            self.in_flight.add(digest)
        if not self.repo.db.stored_for(digest, self.since):
            return True
        with self.lock:
            self.in_flight.discard(digest)
            self.known.add(digest)
        return False

    def _count(self, **amounts: int) -> None:
        with self.lock:
            for name, value in amounts.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    def _flush_after(self, exc: BaseException) -> None:
        """Record whatever was stored so far, so a re-run skips it; a failure to (the database on
        the same full disk) must not hide the error that stopped the backup. gc finds what stays
        unrecorded (strays)."""
        try:
            self._flush()
        except Exception as flush_exc:
            log.debug("could not record the blocks stored so far (%s) after: %s", flush_exc, exc)

    def _flush(self) -> None:
        """Make stored blocks durable, then record them: the index never names a lost block."""
        with self.lock:
            batch, self.unrecorded = self.unrecorded, []
        if batch:
            self.repo.store.flush()
            self.repo.db.add_blocks(batch)


def _block_len(block_idx: int, block_size: int, size: int) -> int:
    return min(block_size, size - block_idx * block_size)


def _bytes_in(block_indices: Iterable[int], block_size: int, size: int) -> int:
    return sum(_block_len(i, block_size, size) for i in block_indices)


__all__ = ["BackupWriter", "BackupStats", "BackupSource", "HintsMismatch", "block_key"]
