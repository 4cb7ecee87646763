"""The metadata database: versions, labels, block maps and the index of durable objects."""

from __future__ import annotations

import json
import os
import pathlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from backyfs.errors import BackyfsError, NotFound, StateError
from backyfs.fsutil import makedirs_private
from backyfs.metadata.blockmap import BlockMap
from backyfs.metadata.schema import ADDED_INDEXES, SCHEMA_VERSION, create_tables

STATES = ("pending", "valid", "invalid")
KEEP_JOB_RUNS = 100  # runs kept per job (beside its newest successful one): see finish_job_run


def parent_removed(uid: str) -> NotFound:
    """The error of a backup whose parent version went (rm, prune) after it was chosen."""
    return NotFound(f"the parent version {uid} was removed meanwhile: run the backup again (it diffs "
                    "against the latest valid version)")


@dataclass
class Version:
    uid: str
    volume: str
    created: float
    size: int
    block_size: int
    state: str = "pending"
    parent: str | None = None
    protected: bool = False
    snapshot: str | None = None
    heartbeat: float | None = None
    stats: dict = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Version:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


def _filesystem_trouble(path: str) -> str:
    """Why SQLite may have failed to open path, which it reports only as "disk I/O error" or "unable
    to open database file": opening even to read creates the write-ahead log's files beside it."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fs = os.statvfs(directory)
    except OSError:
        return ""
    if fs.f_flag & os.ST_RDONLY:
        return f" ({directory} is on a read-only filesystem)"
    if fs.f_bavail * fs.f_frsize < (1 << 20):
        return f" ({directory} is on a full filesystem)"
    if not os.access(directory, os.W_OK):
        return f" (this user may not write to {directory})"
    return ""


def _connect(path: str) -> tuple[sqlite3.Connection, int]:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn, conn.execute("PRAGMA user_version").fetchone()[0]


def _connect_read_only_media(path: str) -> tuple[sqlite3.Connection, int] | None:
    """A cleanly closed database on a read-only filesystem (a backup disk mounted ro): SQLite
    cannot open a WAL database there without its -shm file, which only a writer makes. Nothing can
    change it, so it is opened immutable; not when a -wal file holds changes it would not see."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        if not os.statvfs(directory).f_flag & os.ST_RDONLY or not os.path.isfile(path):
            return None
        if os.path.exists(f"{path}-wal") and os.path.getsize(f"{path}-wal") > 0:
            return None
        conn = sqlite3.connect(f"{pathlib.Path(os.path.abspath(path)).as_uri()}?immutable=1", uri=True,
                               check_same_thread=False, isolation_level=None)
        conn.row_factory = sqlite3.Row
        return conn, conn.execute("PRAGMA user_version").fetchone()[0]
    except (OSError, sqlite3.DatabaseError):
        return None


# Columns of the versions table that update_version may set (labels live in their own table).
_UPDATABLE = set(Version.__dataclass_fields__) - {"uid", "labels"}


class MetadataDB:
    """SQLite through the standard sqlite3 module, in autocommit mode with explicit transactions.
    One connection shared by threads under a lock: metadata calls are few and small; the hot paths
    (block lookups, dedup) run on in-memory structures. (No sqlite-utils: importing it and its plugin
    scan cost more than a whole incremental RBD backup's metadata work.)"""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            makedirs_private(os.path.dirname(os.path.abspath(path)))
            conn, version = _connect(path)
        except sqlite3.DatabaseError as exc:
            opened = _connect_read_only_media(path)
            if opened is None:
                raise BackyfsError(f"cannot open metadata database {path}: {exc}"
                                   f"{_filesystem_trouble(path)}") from None
            conn, version = opened
        if version > SCHEMA_VERSION:
            raise BackyfsError(f"{path} has schema version {version}; this backyfs knows {SCHEMA_VERSION}")
        try:
            if os.stat(path).st_mode & 0o777 != 0o600:
                os.chmod(path, 0o600)
        except OSError as exc:
            raise BackyfsError(f"cannot open metadata database {path}: {exc.strerror}"
                               f"{_filesystem_trouble(path)}") from None
        self.lock = threading.RLock()
        self.conn = conn
        with self.lock:
            if version < SCHEMA_VERSION:  # new: one that exists is read without writing to it
                create_tables(conn)
            else:
                self._add_missing_indexes()

    def _add_missing_indexes(self) -> None:
        """schema.ADDED_INDEXES a database made by an older backyfs lacks (on read-only media it is
        read without them)."""
        have = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        for name, sql in ADDED_INDEXES.items():
            if name not in have:
                try:
                    self.conn.execute(sql)
                except sqlite3.OperationalError:  # read-only, or busy: the next open adds it
                    pass

    def close(self) -> None:
        self.conn.close()

    def damage(self, table: str | None = None) -> list[str]:
        """SQLite's quick_check of every page and index (seconds for a large repository), or of one
        table and its indexes: what is wrong, or nothing. A damaged index can hide rows, so gc must
        not trust such a database."""
        pragma = f"PRAGMA quick_check({table})" if table else "PRAGMA quick_check"  # our names only
        with self.lock:
            try:
                rows = [r[0] for r in self.conn.execute(pragma)]
            except sqlite3.DatabaseError as exc:
                return [str(exc)]
        lines = [line for row in rows for line in row.splitlines() if not line.startswith("***")]
        return [] if lines == ["ok"] else lines

    def _rows(self, sql: str, params: Iterable = ()) -> list[dict]:
        with self.lock:
            return [dict(r) for r in self.conn.execute(sql, list(params))]

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock: every statement in it commits together or not at all.
        Inside transaction() it joins the outer transaction instead."""
        with self.lock:
            if self.conn.in_transaction:  # this thread's transaction(): the lock is ours
                yield self.conn
                return
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    transaction = _tx  # for a caller whose many calls must commit together (rebuild-db)

    # --- versions -------------------------------------------------------------------------
    def add_version(self, version: Version) -> None:
        row = asdict(version)
        labels = row.pop("labels")
        row["stats"] = json.dumps(row["stats"])
        row["protected"] = int(row["protected"])
        columns = ", ".join(row)  # the dataclass's field names: fixed, never user input
        with self._tx() as conn:
            if version.parent and not conn.execute("SELECT 1 FROM versions WHERE uid = ?",
                                                   (version.parent,)).fetchone():
                raise parent_removed(version.parent)
            conn.execute(f"INSERT INTO versions ({columns}) VALUES ({', '.join('?' * len(row))})",
                         list(row.values()))
            self._set_labels(conn, version.uid, labels)

    @staticmethod
    def _set_labels(conn: sqlite3.Connection, uid: str, labels: dict[str, str]) -> None:
        conn.executemany("INSERT INTO labels (version_uid, key, value) VALUES (?, ?, ?) "
                         "ON CONFLICT (version_uid, key) DO UPDATE SET value = excluded.value",
                         [(uid, k, v) for k, v in labels.items()])

    def _version(self, row: dict, labels: dict[str, str] | None = None) -> Version:
        if labels is None:
            labels = {r["key"]: r["value"] for r in self._rows(
                "SELECT key, value FROM labels WHERE version_uid = ?", [row["uid"]])}
        return Version(uid=row["uid"], volume=row["volume"], created=row["created"], size=row["size"],
                       block_size=row["block_size"], state=row["state"], parent=row["parent"],
                       protected=bool(row["protected"]), snapshot=row["snapshot"],
                       heartbeat=row["heartbeat"], stats=json.loads(row["stats"]), labels=labels)

    def get_version(self, uid: str) -> Version:
        rows = self._rows("SELECT * FROM versions WHERE uid = ?", [uid])
        if not rows:
            raise NotFound(f"unknown version {uid!r}")
        return self._version(rows[0])

    def versions(self, volume: str | None = None, state: str | None = None) -> list[Version]:
        where, params = "1", []
        if volume is not None:
            where, params = where + " AND volume = ?", params + [volume]
        if state is not None:
            where, params = where + " AND state = ?", params + [state]
        with self.lock:  # the labels in one query, not one per version (0.8 s at 50,000 versions)
            rows = self._rows(f"SELECT * FROM versions WHERE {where} ORDER BY created, uid", params)
            labels: dict[str, dict[str, str]] = {}
            for r in self._rows("SELECT version_uid, key, value FROM labels WHERE version_uid IN "
                                f"(SELECT uid FROM versions WHERE {where})", params):
                labels.setdefault(r["version_uid"], {})[r["key"]] = r["value"]
        return [self._version(r, labels.get(r["uid"], {})) for r in rows]

    def latest_version(self, volume: str, state: str = "valid") -> Version | None:
        """The volume's newest version in that state (the last of versions()), from the index."""
        rows = self._rows("SELECT * FROM versions WHERE volume = ? AND state = ? "
                          "ORDER BY created DESC, uid DESC LIMIT 1", [volume, state])
        return self._version(rows[0]) if rows else None

    def version_uids(self) -> set[str]:
        return {r["uid"] for r in self._rows("SELECT uid FROM versions")}

    def version_stats(self) -> dict[str, int]:
        """Counts for `stats`, aggregated in SQL (loading 50,000 versions for them took 0.8 s)."""
        row = self._rows("SELECT count(*) AS versions, count(DISTINCT volume) AS volumes, "
                         "coalesce(sum(size), 0) AS logical_bytes FROM versions")[0]
        return {key: int(row[key]) for key in ("versions", "volumes", "logical_bytes")}

    def has_volume(self, volume: str) -> bool:
        return bool(self._rows("SELECT 1 FROM versions WHERE volume = ? LIMIT 1", [volume]))

    def find_uids(self, prefix: str) -> list[str]:
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return [r["uid"] for r in self._rows(
            "SELECT uid FROM versions WHERE uid LIKE ? ESCAPE '\\'", [escaped + "%"])]

    def update_version(self, uid: str, **fields: object) -> None:
        if "stats" in fields:
            fields["stats"] = json.dumps(fields["stats"])
        if "protected" in fields:
            fields["protected"] = int(bool(fields["protected"]))
        if fields.get("state", "valid") not in STATES:
            raise ValueError(f"bad state {fields['state']}")
        unknown = set(fields) - _UPDATABLE
        if unknown:  # column names go into the SQL text: only the versions table's own
            raise ValueError(f"cannot update {', '.join(sorted(unknown))}")
        if not fields:
            return
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._tx() as conn:
            cur = conn.execute(f"UPDATE versions SET {assignments} WHERE uid = ?", [*fields.values(), uid])
            if cur.rowcount == 0:
                raise NotFound(f"unknown version {uid!r}")

    def set_labels(self, uid: str, labels: dict[str, str], remove: Iterable[str] = ()) -> None:
        with self._tx() as conn:
            self._set_labels(conn, uid, labels)
            conn.executemany("DELETE FROM labels WHERE version_uid = ? AND key = ?",
                             [(uid, key) for key in remove])

    def check_deletable(self, uid: str, force: bool = False) -> None:
        if self.get_version(uid).protected and not force:
            raise StateError(f"version {uid} is protected; unprotect it first (or rm --force)")

    def delete_version(self, uid: str, force: bool = False) -> None:
        self.check_deletable(uid, force)
        with self._tx() as conn:
            conn.execute("UPDATE versions SET parent = NULL WHERE parent = ?", (uid,))
            conn.execute("DELETE FROM versions WHERE uid = ?", (uid,))

    # --- block maps -----------------------------------------------------------------------
    def put_blockmap(self, uid: str, blockmap: BlockMap) -> None:
        with self._tx() as conn:
            conn.execute("INSERT INTO blockmaps (version_uid, data) VALUES (?, ?) "
                         "ON CONFLICT (version_uid) DO UPDATE SET data = excluded.data",
                         (uid, blockmap.to_bytes()))

    def data_version(self) -> int:
        """Changes whenever another connection (process) commits to the database."""
        with self.lock:
            return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def max_value_bytes(self) -> int:
        """The largest blob SQLite stores (SQLITE_LIMIT_LENGTH: 1 GB unless built otherwise)."""
        with self.lock:
            return self.conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH)

    def blockmap_entries(self, uid: str) -> int:
        """The number of allocated blocks in a version's map, from its length (a 16M-block map
        loaded just to count it took 1.4 s and 1.3 GB)."""
        rows = self._rows("SELECT length(data) AS n FROM blockmaps WHERE version_uid = ?", [uid])
        if not rows:
            raise NotFound(f"version {uid} has no block map")
        return BlockMap.entries_in(rows[0]["n"])

    def get_blockmap(self, uid: str) -> BlockMap:
        rows = self._rows("SELECT data FROM blockmaps WHERE version_uid = ?", [uid])
        if not rows:
            raise NotFound(f"version {uid} has no block map")
        return BlockMap.from_bytes(rows[0]["data"])

    # --- known objects --------------------------------------------------------------------
    def add_blocks(self, blocks: Iterable[tuple[bytes, int]]) -> None:
        """Record (digest, stored size) pairs of objects that are durable in the store."""
        now = time.time()
        with self._tx() as conn:
            conn.executemany(
                "INSERT INTO blocks (digest, stored_size, added, state) VALUES (?, ?, ?, 'ok') "
                "ON CONFLICT (digest) DO UPDATE SET stored_size = excluded.stored_size, state = 'ok'",
                [(d, s, now) for d, s in blocks])

    def damaged_digests(self) -> set[bytes]:
        """The digests a scrub found missing or corrupt."""
        with self.lock:
            return {r[0] for r in self.conn.execute(  # "state != 'ok'" lets SQLite use blocks_not_ok
                "SELECT digest FROM blocks WHERE state != 'ok' AND state IN ('missing', 'corrupt')")}

    def blocks_in_state(self, state: str) -> list[tuple[bytes, float | None]]:
        with self.lock:
            return [(r[0], r[1]) for r in self.conn.execute(
                "SELECT digest, condemned FROM blocks WHERE state = ?", (state,))]

    def all_digests(self) -> set[bytes]:
        with self.lock:
            return {r[0] for r in self.conn.execute("SELECT digest FROM blocks")}

    def condemn_blocks(self, digests: Iterable[bytes], now: float) -> None:
        with self._tx() as conn:
            conn.executemany(
                "UPDATE blocks SET state = 'condemned', condemned = ? WHERE digest = ?",
                [(now, d) for d in digests])

    def add_condemned(self, digests: Iterable[bytes], now: float) -> None:
        """Enter objects found in the store without a row (gc's strays) as condemned, size unknown;
        a row written meanwhile (a backup recording it) is left as it is."""
        with self._tx() as conn:
            conn.executemany(
                "INSERT INTO blocks (digest, stored_size, added, state, condemned) "
                "VALUES (?, 0, ?, 'condemned', ?) ON CONFLICT (digest) DO NOTHING",
                [(d, now, now) for d in digests])

    def stored_for(self, digest: bytes, since: float) -> bool:
        """Whether a backup that started at `since` (holding the activity lock) may count digest as
        stored: it is 'ok', or a gc condemned it after that, and gc deletes nothing while a backup
        holds that lock (repository/gc.py). One condemned before is written again."""
        with self.lock:
            row = self.conn.execute("SELECT state, condemned FROM blocks WHERE digest = ?",
                                    (digest,)).fetchone()
        if row is None:
            return False
        state, condemned = row
        return state == "ok" or (state == "condemned" and condemned is not None and condemned >= since)

    def block_info(self, digests: Iterable[bytes]) -> dict[bytes, tuple[int, str]]:
        out: dict[bytes, tuple[int, str]] = {}
        batch = list(digests)
        with self.lock:
            for start in range(0, len(batch), 500):
                chunk = batch[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for d, size, state in self.conn.execute(
                        f"SELECT digest, stored_size, state FROM blocks WHERE digest IN ({marks})", chunk):
                    out[d] = (size, state)
        return out

    def mark_blocks(self, digests: Iterable[bytes], state: str) -> None:
        now = time.time()
        with self._tx() as conn:
            conn.executemany("UPDATE blocks SET state = ?, checked = ? WHERE digest = ?",
                                     [(state, now, d) for d in digests])

    def delete_blocks(self, digests: Iterable[bytes]) -> None:
        with self._tx() as conn:
            conn.executemany("DELETE FROM blocks WHERE digest = ?", [(d,) for d in digests])

    def block_stats(self) -> dict:
        with self.lock:
            count, total = self.conn.execute(
                "SELECT count(*), coalesce(sum(stored_size), 0) FROM blocks").fetchone()
        return {"objects": count, "stored_bytes": total}

    # --- job runs -------------------------------------------------------------------------
    def start_job_run(self, job: str, pid: int) -> int:
        with self._tx() as conn:
            cur = conn.execute(
                "INSERT INTO job_runs (job, started, state, pid) VALUES (?, ?, 'running', ?)",
                (job, time.time(), pid))
            return int(cur.lastrowid)

    def finish_job_run(self, run_id: int, ok: bool, version_uid: str | None, message: str) -> None:
        """Record the run's end, and forget the job's runs older than its newest KEEP_JOB_RUNS but
        for its newest successful one: the monitor reads only those two, and an hourly job's table
        grew by 8,760 rows a year."""
        with self._tx() as conn:
            job = conn.execute("UPDATE job_runs SET finished = ?, state = ?, version_uid = ?, message = ? "
                               "WHERE id = ? RETURNING job", (time.time(), "ok" if ok else "failed",
                                                              version_uid, message, run_id)).fetchone()
            if job is None:
                return
            conn.execute(
                "DELETE FROM job_runs WHERE job = :job AND id < (SELECT id FROM job_runs WHERE job = :job"
                " ORDER BY id DESC LIMIT 1 OFFSET :keep - 1) AND id != coalesce((SELECT max(id) FROM"
                " job_runs WHERE job = :job AND state = 'ok'), -1)", {"job": job[0], "keep": KEEP_JOB_RUNS})

    def forget_job_run(self, run_id: int) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM job_runs WHERE id = ?", (run_id,))

    def last_job_runs(self) -> dict[str, dict]:
        """The newest run of each job, and the newest successful one's finish time. (Grouped once,
        not a subquery per row: that took 127 s for 500 jobs of 2,000 runs each, this 1.2 s.)"""
        rows = self._rows(
            "SELECT r.*, ok.last_ok FROM job_runs r"
            " JOIN (SELECT max(id) AS id FROM job_runs GROUP BY job) newest ON r.id = newest.id"
            " LEFT JOIN (SELECT job, max(finished) AS last_ok FROM job_runs WHERE state = 'ok'"
            " GROUP BY job) ok ON ok.job = r.job")
        return {r["job"]: r for r in rows}

