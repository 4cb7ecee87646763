"""Ceph RBD images as backup sources (snapshot + snapshot diff) and restore targets (sparse, aio).

A backup snapshots the image (name prefix "backyfs-"), reads it at that snapshot, and diffs from the
parent version's snapshot with diff_iterate(whole_object=True), which is fast with object-map and
fast-diff: an unchanged volume needs no data read at all. If the parent's snapshot is gone, the
backup reads everything (deduplicated against the parent) and says so.

A snapshot is removed only once a newer version is valid, and then by the next backup, in a thread
started beside that backup's own snapshot: creating and removing a snapshot each wait ~70 ms for
the monitors (a map change waits out paxos_min_wait), and started together they share that wait
(measured: create 67-77 ms alone, 71-77 ms with a removal beside it; a removal after it took
93-105 ms more). So an image keeps two backyfs snapshots between backups, its last version's and the
one before, which pins the data overwritten in one backup interval.

A backup removes only its own volume's snapshots (under that volume's lock): those its repository
records for the volume's versions, and those whose name carries the owner tag of this repository
and volume (snapshot_prefix), which a run killed before it recorded one leaves. Other repositories
(another host, an off-site copy) and other volumes backing up the same image keep theirs.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import TYPE_CHECKING

from backyfs.errors import BackyfsError, SourceError

# This module is imported by the thread that connects and snapshots while the main thread starts up
# (sources.OpeningSource): it imports little before librados, so that loading starts at once.
# Extent (dataclasses, json) and subprocess come when needed.
if TYPE_CHECKING:
    from backyfs.repository.extents import Extent

log = logging.getLogger(__name__)
SNAP_PREFIX = "backyfs-"
HOOK_TIMEOUT = 300.0  # seconds a --pre/--post-snapshot command may take (an fsfreeze takes far less)
_SPEC_RE = re.compile(r"^rbd:([A-Za-z0-9._-]+)/([A-Za-z0-9._-]+)$")


def snapshot_prefix(owner: str) -> str:
    """The name prefix of the snapshots of one repository's volume (owner: its database path and
    the volume name): SNAP_PREFIX and 8 hex digits."""
    import hashlib

    return f"{SNAP_PREFIX}{hashlib.blake2b(owner.encode(), digest_size=4).hexdigest()}-"


def parse_spec(spec: str) -> tuple[str, str]:
    match = _SPEC_RE.match(spec)
    if not match:
        raise BackyfsError(f"bad RBD spec {spec!r}: use rbd:POOL/IMAGE")
    return match.group(1), match.group(2)


class _Cluster:
    """A connected librados cluster handle and pool I/O context; CEPH_CONF selects the cluster."""

    def __init__(self, pool: str) -> None:
        try:
            import rados
        except ImportError:
            raise BackyfsError("RBD support needs the rados and rbd Python modules (scripts/setup)") from None
        conf = os.environ.get("CEPH_CONF", "/etc/ceph/ceph.conf")
        try:  # reads the configuration file: ObjectNotFound here is a missing file, not a pool
            self.cluster = rados.Rados(conffile=conf)
        except rados.ObjectNotFound:
            raise BackyfsError(f"cannot read the Ceph configuration {conf} (set CEPH_CONF)") from None
        except rados.Error as exc:
            raise BackyfsError(f"bad Ceph configuration {conf}: {exc}") from None
        try:
            self.cluster.conf_set("client_mount_timeout", "15")
            self.cluster.connect(timeout=15)
        except rados.Error as exc:
            self.cluster.shutdown()
            raise BackyfsError(f"cannot connect to Ceph ({conf}): {exc}") from None
        try:
            self.ioctx = self.cluster.open_ioctx(pool)
        except rados.Error as exc:
            self.cluster.shutdown()
            if isinstance(exc, rados.ObjectNotFound):
                raise BackyfsError(f"Ceph pool {pool!r} does not exist") from None
            raise BackyfsError(f"cannot open Ceph pool {pool!r}: {exc}") from None

    def close(self) -> None:
        self.ioctx.close()
        self.cluster.shutdown()


class RbdSource:
    def __init__(self, pool: str, image: str) -> None:
        try:
            import rbd
        except ImportError:
            raise BackyfsError("RBD support needs the rados and rbd Python modules (scripts/setup)") from None
        self.rbd = rbd
        self.pool, self.name = pool, image
        self.conn = _Cluster(pool)
        try:
            self.head = rbd.Image(self.conn.ioctx, image)
        except rbd.ImageNotFound:
            self.conn.close()
            raise SourceError(f"RBD image {pool}/{image} does not exist") from None
        self.size = self.head.size()
        self.snapshot: str | None = None
        self.image = self.head  # replaced by the snapshot view in take_snapshot()
        self._dropping: threading.Thread | None = None  # see drop_old_snapshots()
        self.pre_cmd: str | None = None
        self.post_cmd: str | None = None
        self.snap_prefix = SNAP_PREFIX  # snapshot_prefix(owner) for a backup: see drop_old_snapshots

    @classmethod
    def from_spec(cls, spec: str) -> RbdSource:
        return cls(*parse_spec(spec))

    def take_snapshot(self) -> None:
        """Snapshot the image between the pre- and post-snapshot commands; reads then see the snapshot.
        Needs no repository, so it can run while the caller opens one (librbd releases the GIL)."""
        self.snapshot = f"{self.snap_prefix}{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(3).hex()}"
        try:
            self._run_hook(self.pre_cmd, "pre-snapshot")
        except BaseException:  # a freeze that failed half-way must still be thawed
            self.snapshot = None
            try:
                self._run_hook(self.post_cmd, "post-snapshot")
            except Exception as exc:
                log.warning("%s", exc)
            raise
        try:
            self.head.create_snap(self.snapshot)
        except BaseException:
            self.snapshot = None  # not taken
            self._run_hook(self.post_cmd, "post-snapshot")  # thaw the guest whatever happened
            raise
        try:
            self._run_hook(self.post_cmd, "post-snapshot")
            self.image = self.rbd.Image(self.conn.ioctx, self.name, snapshot=self.snapshot, read_only=True)
            self.size = self.image.size()
            log.debug("took the snapshot %s/%s@%s (%d bytes)", self.pool, self.name, self.snapshot, self.size)
        except BaseException:  # the snapshot will not be used: it must not stay and pin data
            self.discard_snapshot()
            raise

    def changes(self, parent) -> list[Extent] | None:
        """The extents changed since the parent version's snapshot, or None (read everything) without
        a parent or when its snapshot is gone."""
        if parent is None:
            return None
        snaps = {s["name"] for s in self.head.list_snaps()}
        if not parent.snapshot or parent.snapshot not in snaps:
            log.warning("snapshot %s of the parent version %s is gone: reading the whole image",
                        parent.snapshot, parent.uid)
            return None
        return self._diff(parent.snapshot)

    def discard_snapshot(self) -> None:
        """Remove the snapshot this run took, when the backup stops before any version used it."""
        if self.snapshot is None:
            return
        if self._dropping is not None:
            self._dropping.join()
        if self.image is not self.head:
            self.image.close()
            self.image = self.head
        try:
            self.head.remove_snap(self.snapshot)
        except self.rbd.Error as exc:
            log.warning("cannot remove the unused snapshot %s: %s", self.snapshot, exc)
        self.snapshot = None

    def _diff(self, from_snapshot: str | None) -> list[Extent]:
        from backyfs.repository.extents import Extent

        extents: list[Extent] = []

        def collect(offset: int, length: int, exists: bool) -> int:
            extents.append(Extent(offset, length, exists))
            return 0

        self.image.diff_iterate(0, self.size, from_snapshot, collect, whole_object=True)
        log.debug("%s since %s: %d extents, %d bytes (%d bytes removed)",
                  "changed" if from_snapshot else "allocated", from_snapshot or "creation", len(extents),
                  sum(e.length for e in extents if e.exists), sum(e.length for e in extents if not e.exists))
        return extents

    def data_extents(self) -> list[Extent]:
        return [e for e in self._diff(None) if e.exists]

    def pread(self, offset: int, length: int) -> bytes:
        try:
            return self.image.read(offset, length)
        except self.rbd.Error as exc:
            raise SourceError(f"cannot read {self.pool}/{self.name} at offset {offset}: {exc}") from None

    def drop_old_snapshots(self, owned: set[str], keep: set[str]) -> None:
        """Start removing this volume's old snapshots of the image, in a thread: it is mostly waiting
        for the monitors, alongside take_snapshot's own wait (the same image handle; librbd is
        thread-safe) or the reading. close() waits for it. Removed are those in owned (the
        repository's records of this volume's snapshots) and those named with this run's owner tag
        (snap_prefix), but never this run's (looked up as each is removed: it may be taken meanwhile)
        or those in keep (the snapshots of valid versions a backup may still diff from). The caller
        holds the volume's lock: no run of it is using any."""
        self._dropping = threading.Thread(target=self._drop_snapshots, args=(owned, keep),
                                          name="drop-snapshots")
        self._dropping.start()

    def _drop_snapshots(self, owned: set[str], keep: set[str]) -> None:
        try:
            snaps = list(self.head.list_snaps())
        except self.rbd.Error as exc:  # harmless: the next backup tries again
            log.warning("cannot list the snapshots of %s/%s to remove old ones: %s",
                        self.pool, self.name, exc)
            return
        tagged = self.snap_prefix != SNAP_PREFIX  # untagged (a bare source): only what is owned
        for snap in snaps:
            name = snap["name"]
            ours = name in owned or (tagged and name.startswith(self.snap_prefix))
            # self.snapshot is named before it is created: a listing that holds it sees its name.
            if ours and name not in keep and name != self.snapshot:
                try:
                    self.head.remove_snap(name)
                    log.debug("removed the old snapshot %s/%s@%s", self.pool, self.name, name)
                except self.rbd.Error as exc:
                    log.warning("cannot remove old snapshot %s: %s", name, exc)

    def _run_hook(self, cmd: str | None, what: str) -> None:
        """Run a snapshot command in its own process group, killed whole if it outlives HOOK_TIMEOUT
        or backyfs is interrupted: a hung freeze must not hang the backup, nor its children stay."""
        if not cmd:
            return
        import signal
        import subprocess

        proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=HOOK_TIMEOUT)
        except BaseException as exc:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise SourceError(f"{what} command did not finish in {HOOK_TIMEOUT:.0f} s") from None
            raise
        if proc.returncode != 0:
            lines = (err or out).strip().splitlines()
            detail = f": {lines[-1].strip()}" if lines else ""
            raise SourceError(f"{what} command failed (exit status {proc.returncode}){detail}")

    def close(self) -> None:
        if self.image is not self.head:
            self.image.close()
        if self._dropping is not None:
            self._dropping.join()
        self.head.close()
        self.conn.close()


class RbdTarget:
    """Restore into an RBD image with parallel aio writes. A new image reads as zeros, so zero
    blocks are skipped; an overwritten one (--force) gets them discarded."""

    MAX_IN_FLIGHT = 16

    def __init__(self, pool: str, name: str, size: int, *, force: bool) -> None:
        import rbd

        self.rbd, self.spec, self.name = rbd, f"{pool}/{name}", name
        self.conn = _Cluster(pool)
        try:
            rbd.RBD().create(self.conn.ioctx, name, size, old_format=False,
                             features=rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
                             | rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF)
            self.zeroed = True
        except rbd.ImageExists:
            if not force:
                self.conn.close()
                raise BackyfsError(f"RBD image {self.spec} exists; use --force to overwrite it") from None
            self.zeroed = False
        try:
            self.image = rbd.Image(self.conn.ioctx, name)
            if self.image.size() != size:
                self.image.resize(size)
        except BaseException:
            self._close_after_failed_open(created=self.zeroed)
            raise
        self.gate = threading.Semaphore(self.MAX_IN_FLIGHT)
        self.errors: list[str] = []
        self.closed = False

    @classmethod
    def from_spec(cls, spec: str, size: int, *, force: bool) -> RbdTarget:
        return cls(*parse_spec(spec), size, force=force)

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        data = bytes(data)  # librbd's binding takes bytes; the sparse writer passes views
        self.gate.acquire()

        def done(completion) -> None:
            if completion.get_return_value() < 0:
                self.errors.append(f"write at offset {offset} failed ({completion.get_return_value()})")
            self.gate.release()

        try:
            self.image.aio_write(data, offset, done)
        except BaseException:  # not submitted: done() will never give the permit back
            self.gate.release()
            raise

    def _close_after_failed_open(self, created: bool) -> None:
        image = getattr(self, "image", None)
        try:
            if image is not None:
                image.close()
            if created:  # an image this restore made and could not use is not left behind
                self.rbd.RBD().remove(self.conn.ioctx, self.name)
        except self.rbd.Error:
            pass  # the original error is the one to report
        finally:
            self.conn.close()

    def write_zeroes(self, offset: int, length: int) -> None:
        self.image.write_zeroes(offset, length)

    def _drain(self, timeout: float | None = None) -> None:
        """Wait until no aio write is in flight (taking every permit, then giving them back)."""
        taken = sum(self.gate.acquire(timeout=timeout) for _ in range(self.MAX_IN_FLIGHT))
        for _ in range(taken):
            self.gate.release()

    def finish(self) -> None:
        self._drain()
        if self.errors:  # left open for abandon(), which removes an image this restore created
            raise BackyfsError(f"restore to {self.spec}: {self.errors[0]}")
        self.image.flush()
        self.image.close()
        self.conn.close()
        self.closed = True

    def abandon(self) -> str:
        """After a failed or interrupted restore: remove the image if this restore created it."""
        if self.closed:
            return f"RBD image {self.spec} is complete"
        self._drain(timeout=60)  # no aio write may outlive the image
        self.closed = True
        try:
            self.image.close()
            if not self.zeroed:  # an existing image (--force) is left as it is
                return f"RBD image {self.spec} is incomplete"
            self.rbd.RBD().remove(self.conn.ioctx, self.name)
            return f"removed the incomplete RBD image {self.spec}"
        except self.rbd.Error as exc:
            return f"RBD image {self.spec} is incomplete (cannot remove it: {exc})"
        finally:
            self.conn.close()
