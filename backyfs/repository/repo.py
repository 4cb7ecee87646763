"""Repository: reads and writes verified blocks, resolves versions, mirrors metadata into the store."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator

from backyfs.errors import CorruptObject, NotFound, ObjectMissing, StateError
from backyfs.metadata.blockmap import BlockMap
from backyfs.metadata.db import MetadataDB, Version
from backyfs.repository import mapstore
from backyfs.repository.locks import UID_RE as _UID_RE
from backyfs.repository.locks import hold_reader as _hold_reader
from backyfs.repository.locks import lock_path, no_readers, open_lock_file
from backyfs.storage import codec
from backyfs.storage.base import ObjectStore

DEFAULT_BLOCK_SIZE = 4 * 1024 * 1024


def _hashlib_digest(data: bytes | memoryview) -> bytes:
    # hashlib releases the GIL for buffers over 2 KiB, so hashing threads run in parallel.
    return hashlib.blake2b(data, digest_size=32).digest()


try:
    # The same BLAKE2b-256 from libsodium (AVX2): identical digests, about 1.35x faster here. Called
    # through pynacl's cffi module because its public wrapper takes bytes only, and export reads hash
    # views of mapped store files; cffi releases the GIL, so hashing threads run in parallel.
    from nacl._sodium import ffi as _ffi
    from nacl._sodium import lib as _sodium

    if _sodium.sodium_init() < 0:  # picks the CPU's fastest compress function (AVX2), idempotent
        raise ImportError("libsodium failed to initialise")

    def block_digest(data: bytes | memoryview) -> bytes:
        view = memoryview(data)
        out = _ffi.new("unsigned char[32]")
        if _sodium.crypto_generichash_blake2b_salt_personal(
                out, 32, _ffi.from_buffer(view), view.nbytes, _ffi.NULL, 0, _ffi.NULL, _ffi.NULL) != 0:
            return _hashlib_digest(data)  # never seen: libsodium fails only on bad lengths
        return bytes(out)
except ImportError:  # pragma: no cover - pynacl is a dependency; hashlib is the reference
    block_digest = _hashlib_digest


def block_key(digest: bytes) -> str:
    hexd = digest.hex()
    return f"blocks/{hexd[:2]}/{hexd}"


def digest_from_key(key: str) -> bytes | None:
    name = key.rsplit("/", 1)[-1]
    if key.startswith("blocks/") and len(name) == 64:
        try:
            return bytes.fromhex(name)
        except ValueError:
            return None
    return None


def new_uid() -> str:
    return secrets.token_hex(6)


def stored_versions(store: ObjectStore) -> tuple[set[str], set[str]]:
    """From one listing of the store's versions/: the uids whose metadata is there, and those
    that have only a block map left (an rm killed after deleting the metadata, which it deletes
    first). One listing: a RADOS store lists every object of its pool for it."""
    with_meta, any_key = set(), set()
    for key in store.list("versions/"):
        parts = key.split("/")
        if len(parts) == 3:
            any_key.add(parts[1])
            if parts[2] == "meta.json":
                with_meta.add(parts[1])
    return with_meta, any_key - with_meta


VERSIONS_LOCK_WAIT = 300.0  # it is held for one version's metadata change: minutes means hung


def _flock_waiting(fd: int, db_path: str, timeout: float) -> None:
    """An exclusive flock, waited for up to TIMEOUT: a holder hung for good (a stopped process, a
    dead store it keeps retrying) makes every command that needs it say so, instead of hanging too."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise StateError(f"another backyfs command has held this repository's versions lock for "
                                 f"{timeout:g} s (a stopped process? fuser -v "
                                 f"{lock_path(db_path, '.versions.lock')})") from None
            time.sleep(0.05)


class Repository:
    def __init__(self, store: ObjectStore, db: MetadataDB, compression_level: int = 1) -> None:
        self.store = store
        self.db = db
        self.compression_level = compression_level
        self._versions_lock = threading.RLock()
        self._versions_lock_fd: int | None = None

    def close(self) -> None:
        self.store.close()
        self.db.close()

    # --- blocks ---------------------------------------------------------------------------
    def write_block(self, digest: bytes, data: bytes | memoryview) -> int:
        """Store a block under its digest; return the stored object size."""
        header, payload = codec.encode_split(data, self.compression_level)
        self.store.put_split(block_key(digest), header, payload)
        return len(header) + len(payload)

    def read_block(self, digest: bytes) -> bytes | memoryview:
        """Fetch a block and check it against its digest (CorruptObject / ObjectMissing otherwise).
        From a filesystem store a raw block is a read-only view of the mapped object file."""
        key = block_key(digest)
        try:
            header, payload = self.store.get_split(key, codec.HEADER_SIZE)
            data = codec.decode_split(header, payload, key)
        except ObjectMissing:
            raise ObjectMissing(f"block {digest.hex()[:16]} is missing from the store") from None
        if block_digest(data) != digest:
            raise CorruptObject(f"block {digest.hex()[:16]} is corrupt: content does not match its digest")
        return data

    def will_need(self, digests: list[bytes]) -> None:
        """Let the store start reading these blocks in the background (a hint, see ObjectStore)."""
        self.store.will_need([block_key(d) for d in digests])

    # --- versions -------------------------------------------------------------------------
    def resolve(self, spec: str, valid_only: bool = False) -> Version:
        """A version by uid, unique uid prefix (4+ digits), or volume name (its latest valid version)."""
        spec = spec.strip()
        if not spec or len(spec) > 256:
            raise NotFound(f"unknown version {spec!r}")
        uids = [spec] if _UID_RE.match(spec) else []
        # A volume's own name wins over a uid prefix: a volume called "cafe" must never resolve to
        # another volume's version cafe0123...; a full uid (12 hex digits) is never a volume name.
        if not uids and self.db.has_volume(spec):
            latest = self.db.latest_version(spec)
            if latest is None:
                raise NotFound(f"volume {spec!r} has no valid version")
            return latest
        if not uids and len(spec) >= 4 and re.fullmatch(r"[0-9a-f]+", spec):
            uids = self.db.find_uids(spec)
            if len(uids) > 1:
                raise NotFound(f"version prefix {spec!r} is ambiguous: {', '.join(sorted(uids)[:5])}")
        if uids:
            try:
                version = self.db.get_version(uids[0])
            except NotFound:
                version = None
            if version is not None:
                if valid_only and version.state != "valid":
                    raise NotFound(f"version {version.uid} is {version.state}, not valid")
                return version
        latest = self.latest_valid(spec)
        if latest is None:
            # Only now, and only the versions table (whose damaged index can hide a version): the
            # whole database took 6 s at 50,000 versions, for each unknown export name a client sent.
            damage = self.db.damage("versions")
            hint = f" (the metadata database is damaged: {damage[0]}; move it aside and run " \
                   "'backyfs rebuild-db')" if damage else ""
            raise NotFound(f"unknown version or volume {spec!r}{hint}")
        return latest

    def latest_valid(self, volume: str) -> Version | None:
        return self.db.latest_version(volume)

    def blockmap(self, version: Version) -> BlockMap:
        return self.db.get_blockmap(version.uid)

    @contextlib.contextmanager
    def versions_lock(self) -> Iterator[None]:
        """Held (exclusive, across processes) while a version's row and its copy in the store change
        together: rm, a state change, protect, label. Without it a label landing between rm's
        deletion of the store copy and of the row wrote the copy back (a version gc then took for
        another host's, deleting nothing ever after), and a protect in that gap left a protected
        version without its copy. Re-entrant within a process."""
        with self._versions_lock:
            outer = self._versions_lock_fd is None
            if outer:
                fd = self.open_lock_file(".versions.lock")
                _flock_waiting(fd, self.db.path, VERSIONS_LOCK_WAIT)
                self._versions_lock_fd = fd
            try:
                yield
            finally:
                if outer:
                    self._versions_lock_fd = None
                    os.close(fd)

    def save_version(self, version: Version, blockmap: BlockMap | None = None) -> None:
        """Mirror a version into the store so the store alone can restore everything. Its metadata
        goes before its block map: a map without metadata in the store is then always what an
        interrupted rm left (rm deletes the metadata first), never a version being made."""
        with self.versions_lock():
            if blockmap is not None:
                self.db.put_blockmap(version.uid, blockmap)
            self._put_meta(self.db.get_version(version.uid))
            if blockmap is not None:
                mapstore.put_map(self.store, version.uid, blockmap.to_bytes())

    def _put_meta(self, version: Version) -> None:
        meta = json.dumps(version.to_json(), sort_keys=True).encode()
        self.store.put(f"versions/{version.uid}/meta.json", codec.encode(meta))

    def set_state(self, version: Version, state: str) -> None:
        """The store's copy first: killed in between, the database is behind (a pending version a
        re-run resumes), never the store, which a lost database is rebuilt from."""
        with self.versions_lock():
            self._put_meta(dataclasses.replace(self.db.get_version(version.uid), state=state))
            self.db.update_version(version.uid, state=state)
        version.state = state

    def update_version(self, version: Version, *, protected: bool | None = None,
                       labels: dict[str, str] | None = None, remove: Iterable[str] = ()) -> None:
        """Protect or unprotect, set or remove labels: in the database and the store's copy."""
        with self.versions_lock():
            self.db.get_version(version.uid)  # removed meanwhile: "unknown version", not an SQL error
            if protected is not None:
                self.db.update_version(version.uid, protected=protected)
            if labels is not None or remove:
                self.db.set_labels(version.uid, labels or {}, remove=remove)
            self._put_meta(self.db.get_version(version.uid))

    def hold_reader(self, uid: str) -> int | None:
        """Keep version UID from being removed until the returned fd is closed (locks.hold_reader);
        NotFound if it went before the lock was had."""
        fd = _hold_reader(self.db.path, uid)
        try:
            self.db.get_version(uid)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        return fd

    def delete_version(self, version: Version, force: bool = False) -> None:
        with self.versions_lock(), no_readers(self.db.path, version.uid):
            self.db.check_deletable(version.uid, force=force)
            # The store's copy first: a crash or a dead store in between must not leave metadata
            # that rebuild-db would bring back as a valid version whose blocks gc has since deleted.
            self.store.delete(f"versions/{version.uid}/meta.json")
            mapstore.delete_map(self.store, version.uid)
            self.db.delete_version(version.uid, force=force)

    def open_lock_file(self, name: str) -> int:
        return open_lock_file(self.db.path, name)

    @contextlib.contextmanager
    def activity_lock(self, exclusive: bool) -> Iterator[bool]:
        """Backups and overlay commits hold this shared while they run (waiting for a gc that is
        deleting); gc's delete phase holds it exclusive, without waiting: while a backup runs,
        that backup may be storing or counting on any block. Yields whether it was taken."""
        fd = self.open_lock_file(".activity.lock")  # a leading dot: no volume's lock is named so
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
                taken = True
            except BlockingIOError:
                taken = False
            yield taken
        finally:
            os.close(fd)

    # --- rebuild --------------------------------------------------------------------------
    def rebuild_db(self) -> dict:
        """Fill an empty DB from the store: versions, block maps, and the object index. A version
        whose metadata is missing or damaged is left out (listed under "damaged") rather than
        failing the rest: recovering from the store alone is for stores that may be hurt."""
        uids = sorted(stored_versions(self.store)[0])
        versions: list[tuple[Version, BlockMap | None]] = []
        damaged: list[str] = []
        for uid in uids:
            try:
                meta_key = f"versions/{uid}/meta.json"
                meta = json.loads(codec.decode(self.store.get(meta_key), meta_key))
                version = Version.from_json(meta)
                if version.state == "pending" and not self.store.exists(mapstore.map_key(uid)):
                    versions.append((version, None))  # an unfinished backup: its next run resumes it
                    continue
                blockmap = BlockMap.from_bytes(mapstore.get_map(self.store, uid))
                blockmap.check()
                if version.uid != uid or (blockmap.size, blockmap.block_size) != (version.size,
                                                                                  version.block_size):
                    raise CorruptObject("its metadata and block map disagree")
                versions.append((version, blockmap))
            except (ObjectMissing, CorruptObject, ValueError, TypeError, AttributeError) as exc:
                damaged.append(f"{uid} (damaged metadata, left out: {exc})")
        blocks = []
        for key, size in self.store.list_sizes("blocks/"):
            digest = digest_from_key(key)
            if digest is not None:
                blocks.append((digest, size))
        if not versions and not damaged:  # not a backyfs store (a wrong bucket, pool or prefix):
            return {"versions": 0, "objects": len(blocks), "damaged": []}  # index none of its objects
        with self.db.transaction():  # all or nothing: a killed rebuild leaves the database empty
            return self._fill_db(versions, blocks, damaged)

    def _fill_db(self, versions: list[tuple[Version, BlockMap | None]], blocks: list[tuple[bytes, int]],
                 damaged: list[str]) -> dict:
        # Parents first, so foreign keys hold.
        versions.sort(key=lambda vb: vb[0].created)
        known = {v.uid for v, _ in versions}
        for version, blockmap in versions:
            if version.parent not in known:
                version.parent = None
            self.db.add_version(version)
            if blockmap is not None:
                self.db.put_blockmap(version.uid, blockmap)
        self.db.add_blocks(blocks)
        # A valid version whose map names an object the store lacks (e.g. gc ran after a lost rm)
        # is not restorable: say so, rather than rebuild it as valid.
        stored = {d for d, _ in blocks}
        for version, blockmap in versions:
            if blockmap is None:
                continue
            missing = blockmap.digest_set() - stored
            if missing and version.state == "valid":
                self.db.update_version(version.uid, state="invalid")
                damaged.append(f"{version.uid} ({len(missing)} blocks missing: marked invalid)")
        return {"versions": len(versions), "objects": len(blocks), "damaged": damaged}


class VersionHold:
    """A reader's claim on a version: rm and prune refuse to remove a version while one is held
    (repository/locks.py), so gc cannot delete blocks a reader still needs. Restores and export
    devices hold one; a FUSE device drops it while no file is open and takes it again on reuse."""

    def __init__(self, repo: Repository, uid: str) -> None:
        self.repo, self.uid = repo, uid
        self.fd: int | None = None
        self.held = False

    def take(self) -> None:
        """NotFound if the version was removed meanwhile."""
        if not self.held:
            self.fd = self.repo.hold_reader(self.uid)  # None on read-only media: nothing removes it
            self.held = True

    def drop(self) -> None:
        fd, self.fd, self.held = self.fd, None, False
        if fd is not None:
            os.close(fd)
