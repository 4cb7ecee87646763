"""Backup sources and restore targets: files, block devices, and RBD images (``rbd:POOL/IMAGE``)."""

from __future__ import annotations

import threading
from typing import Any


def takes_snapshots(spec: str) -> bool:
    """Whether the source of spec snapshots itself (and so runs --pre/--post-snapshot commands)."""
    return spec.startswith("rbd:")


def open_source(spec: str) -> Any:
    """A source from a command-line spec: a path, or rbd:POOL/IMAGE."""
    if takes_snapshots(spec):
        from backyfs.sources.rbd import RbdSource

        return RbdSource.from_spec(spec)
    from backyfs.sources.file import FileSource

    return FileSource(spec)


class OpeningSource:
    """A backup source being opened in a thread. For RBD that is loading librbd and connecting, then
    taking the snapshot: mostly waiting on the cluster with the GIL released, so it overlaps the
    caller opening the repository. The snapshot waits until the caller calls snapshot(): it has
    checked its arguments (pre/post-snapshot commands act on the VM, e.g. freeze its filesystems),
    holds the volume's lock, and names the snapshot's owner. drop_old_snapshots() starts removing
    old ones beside the snapshot's creation (the monitors take both in one round). abandon()
    removes a snapshot taken when the backup does not go on. A file source opens on result(), in
    the caller's thread."""

    def __init__(self, spec: str, pre_cmd: str | None, post_cmd: str | None) -> None:
        self.spec, self.pre_cmd, self.post_cmd = spec, pre_cmd, post_cmd
        self._source: Any = None
        self._error: BaseException | None = None
        self._go = threading.Event()  # the snapshot may be taken (or abandon() was called)
        self._prefix: str | None = None  # of the snapshot's name, set by snapshot()
        self._cancelled = False
        self._loaded = threading.Event()  # the thread has loaded librados and librbd
        self._named = threading.Event()  # the source is open and named (or will never be)
        self._opened: Any = None  # the source from then on, until the thread closes it on failure
        self._closing = threading.Lock()  # drop_old_snapshots() must not start on a closed source
        self._thread: threading.Thread | None = None
        if takes_snapshots(spec):
            self._thread = threading.Thread(target=self._open, name="open-source")
            self._thread.start()
        else:
            self._loaded.set()

    def _open(self) -> None:
        try:
            self._open_and_snapshot()
        finally:
            self._named.set()  # drop_old_snapshots() waits for it, whatever happened

    def _open_and_snapshot(self) -> None:
        try:
            import rbd  # noqa: F401  (and rados)
        except ImportError:  # open_source says so, in a sentence
            pass
        finally:
            self._loaded.set()
        try:
            source = open_source(self.spec)
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc
            return
        source.pre_cmd, source.post_cmd = self.pre_cmd, self.post_cmd
        self._go.wait()
        try:
            if self._cancelled:
                raise RuntimeError("abandoned before the snapshot")
            if self._prefix:
                source.snap_prefix = self._prefix
            self._opened = source
            self._named.set()
            source.take_snapshot()
        except BaseException as exc:
            with self._closing:
                self._opened = None
                source.close()  # joins a removal drop_old_snapshots() started
            self._error = exc
            return
        self._source = source

    def wait_loaded(self) -> None:
        """Wait until the thread has loaded its libraries (~60 ms with a cold page cache). Imports in
        the caller meanwhile would only slow that down, both needing the GIL; while the thread then
        waits on the cluster, the caller has it to itself."""
        self._loaded.wait(timeout=5)

    def snapshot(self, prefix: str | None = None) -> None:
        """The arguments are fine: the snapshot (with its commands) may be taken once the source is
        open, named with prefix (rbd.snapshot_prefix) when given."""
        self._prefix = prefix or self._prefix
        self._go.set()

    def drop_old_snapshots(self, owned: set[str], keep: set[str]) -> None:
        """Start removing the volume's old snapshots (RbdSource.drop_old_snapshots) as soon as the
        source is open, while its own snapshot is being taken; call it after snapshot()."""
        if self._thread is None:
            return
        self._named.wait()
        with self._closing:
            if self._opened is not None:
                self._opened.drop_old_snapshots(owned, keep)

    def result(self) -> Any:
        """The open source, snapshotted if it snapshots; raises what opening it raised."""
        if self._thread is None:
            return open_source(self.spec)
        self.snapshot()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._source

    def abandon(self) -> None:
        """The backup stopped before using the source: close it, removing a snapshot already taken."""
        if self._thread is None:
            return
        self._cancelled = True
        self._go.set()
        self._thread.join()
        if self._source is not None:
            try:
                self._source.discard_snapshot()
            finally:
                self._source.close()
                self._source = None


def start_source(spec: str, *, pre_cmd: str | None = None, post_cmd: str | None = None) -> OpeningSource:
    """Start opening the source of spec (see OpeningSource); pre/post_cmd run around its snapshot."""
    return OpeningSource(spec, pre_cmd, post_cmd)


def open_target(spec: str, size: int, *, force: bool, sparse: bool) -> Any:
    if takes_snapshots(spec):
        from backyfs.sources.rbd import RbdTarget

        return RbdTarget.from_spec(spec, size, force=force)
    from backyfs.sources.file import FileTarget

    return FileTarget(spec, size, force=force, sparse=sparse)
