"""Restore a version to a target in parallel, verifying every block against its digest.

A missing or corrupt block does not stop the restore: it is named (block index and byte offset),
its range is left as zeros, the rest is restored, and the caller gets a non-zero result.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from backyfs.errors import BackyfsError, CorruptObject, ObjectMissing
from backyfs.metadata.blockmap import BlockMap
from backyfs.metadata.db import Version
from backyfs.repository.repo import Repository, VersionHold
from backyfs.storage.ratelimit import cancel_waits_on


class RestoreTarget(Protocol):
    #: True when unwritten ranges already read as zeros (a new or truncated file, a fresh RBD image)
    zeroed: bool

    def pwrite(self, offset: int, data: bytes) -> None: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...

    def finish(self) -> None:
        """Flush and close; called once after every block was written."""
        ...

    def abandon(self) -> str:
        """Close after a failed or interrupted restore, removing what the restore created; returns
        a note for the user (what was removed, or what is left incomplete)."""
        ...


@dataclass
class RestoreResult:
    bytes_written: int = 0
    bytes_zero: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class RestoreFailed(BackyfsError):
    def __init__(self, result: RestoreResult) -> None:
        first = result.errors[0]
        more = f" (and {len(result.errors) - 1} more)" if len(result.errors) > 1 else ""
        super().__init__(f"restore incomplete: {first}{more}")
        self.result = result


def restore(repo: Repository, version: Version, target: RestoreTarget, *, threads: int = 4,
            progress: Callable[[int, int], None] | None = None) -> RestoreResult:
    hold = VersionHold(repo, version.uid)  # no rm (and gc) of it while it is read
    hold.take()
    try:
        return _restore(repo, version, target, threads=threads, progress=progress)
    finally:
        hold.drop()


def _restore(repo: Repository, version: Version, target: RestoreTarget, *, threads: int,
             progress: Callable[[int, int], None] | None) -> RestoreResult:
    import time

    started = time.monotonic()
    blockmap = repo.blockmap(version)
    logging.getLogger(__name__).debug(
        "restoring %s: %d bytes, %d stored blocks, %d threads, onto a target that %s", version.uid,
        blockmap.size, len(blockmap), threads, "reads as zeros" if target.zeroed else "has old content")
    result = RestoreResult()
    lock = threading.Lock()
    done = [0]

    def one(block_idx: int, digest: bytes | None, count: int) -> None:
        offset = block_idx * blockmap.block_size
        span = length = min(count * blockmap.block_size, blockmap.size - offset)  # count > 1: holes
        if digest is None:
            if not target.zeroed:
                target.write_zeroes(offset, length)
        else:
            try:
                data = repo.read_block(digest)
                if len(data) != length:
                    raise CorruptObject(f"block {digest.hex()[:16]} has {len(data)} bytes, expected {length}")
                if target.zeroed:
                    _write_sparse(target, offset, data)
                else:
                    target.pwrite(offset, data)
            except (ObjectMissing, CorruptObject) as exc:
                with lock:
                    result.errors.append(f"block {block_idx} at offset {offset}: {exc}")
                if not target.zeroed:
                    target.write_zeroes(offset, length)
                length = 0
        with lock:
            if digest is None:
                result.bytes_zero += length
            else:
                result.bytes_written += length
            done[0] += span
            if progress:
                progress(done[0], blockmap.size)

    _run_parallel(one, _all_blocks(blockmap, target.zeroed), threads)
    if target.zeroed:  # the holes were never visited: they are zeros already
        result.bytes_zero += blockmap.size - done[0]
        if progress:
            progress(blockmap.size, blockmap.size)
    target.finish()
    result.seconds = round(time.monotonic() - started, 3)
    if result.errors:
        raise RestoreFailed(result)
    return result


_SPARSE_CHUNK = 64 * 1024
_ZERO_CHUNK = bytes(_SPARSE_CHUNK)


def _write_sparse(target: RestoreTarget, offset: int, data: bytes | memoryview) -> None:
    """Write only the non-zero 64 KiB runs of a block, so partly-zero blocks stay sparse."""
    if type(data) is not bytes:
        data = bytes(data)  # a mapped block: bytes has the fast zero test below
    view = memoryview(data)
    run_start = None
    for pos in range(0, len(data), _SPARSE_CHUNK):
        # bytes.startswith compares with memcmp; memoryview == bytes goes byte by byte (55x slower).
        if data.startswith(_ZERO_CHUNK[: len(data) - pos], pos):
            if run_start is not None:
                target.pwrite(offset + run_start, view[run_start:pos])
                run_start = None
        elif run_start is None:
            run_start = pos
    if run_start is not None:
        target.pwrite(offset + run_start, view[run_start:])


HOLE_RUN_BLOCKS = 256  # holes zeroed per call on a target with old content (1 GiB of 4 MiB blocks)


def _all_blocks(blockmap: BlockMap, zeroed: bool):
    """(block_idx, digest, 1) for stored blocks, and when the target needs its holes zeroed,
    (block_idx, None, count) for runs of them: one call per run, not per block (a 64 TiB device
    took 16M calls and minutes of CPU)."""
    next_idx = 0
    for block_idx, digest in blockmap.items():
        if not zeroed:
            yield from _hole_runs(next_idx, block_idx)
        yield block_idx, digest, 1
        next_idx = block_idx + 1
    if not zeroed:
        yield from _hole_runs(next_idx, blockmap.block_count)


def _hole_runs(first: int, end: int):
    for start in range(first, end, HOLE_RUN_BLOCKS):
        yield start, None, min(HOLE_RUN_BLOCKS, end - start)


def _run_parallel(func, items, threads: int) -> None:
    """Run func(*item) on a pool with a bounded number of items in flight (bounded memory). The
    first exception stops it at once: the queued items are dropped, the running ones finish (a
    store that hangs made a restore or scrub try every remaining block, an hour at the timeouts)."""
    gate = threading.Semaphore(threads * 2)
    failed: list[BaseException] = []
    stopping = threading.Event()  # ends the running items' rate-limit waits (a read limit)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="restore", initializer=cancel_waits_on,
                              initargs=(stopping,))

    def done(fut: Future) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            failed.append(fut.exception())
            stopping.set()
            pool.shutdown(wait=False, cancel_futures=True)  # the queued items go now
        gate.release()

    try:
        for item in items:
            gate.acquire()
            if failed:
                break
            try:
                pool.submit(func, *item).add_done_callback(done)
            except RuntimeError:  # shut down by a failure since the check above
                break
        pool.shutdown(wait=True)
    except BaseException:  # Ctrl-C, also while the last items run: the others are dropped or cut short
        stopping.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    if failed:
        raise failed[0]
