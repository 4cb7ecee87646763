"""The SQLite schema: the truth about the data, in one function.

The database is an index of the store. Everything in it can be rebuilt from the store's
``versions/<uid>/meta.json`` and ``versions/<uid>/blockmap`` objects (the map in parts
``blockmap.<n>`` when large, see repository/mapstore.py) and its ``blocks/`` listing
(``backyfs rebuild-db``), so losing it loses no backup.
"""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 1

# Indexes added since a schema version shipped. They change no data, so the version stays (an older
# backyfs still opens the database); a database without one gains it when opened writable.
ADDED_INDEXES = {
    "versions_by_parent": "CREATE INDEX IF NOT EXISTS versions_by_parent ON versions (parent)",
}


def create_tables(conn: sqlite3.Connection) -> None:
    conn.executescript(
        """
        -- One row per backup version of a volume. A version is usable only in state 'valid':
        -- every block its map references was durable in the store before the state changed.
        CREATE TABLE IF NOT EXISTS versions (
            uid         TEXT PRIMARY KEY,           -- random, 12 hex digits; the export name
            volume      TEXT NOT NULL,              -- what was backed up, e.g. "vm1-root"
            created     REAL NOT NULL,              -- unix time the backup started
            parent      TEXT REFERENCES versions(uid) ON DELETE SET NULL,  -- differential base
            size        INTEGER NOT NULL,           -- volume size in bytes (need not be block-aligned)
            block_size  INTEGER NOT NULL,           -- bytes per block, fixed for the version
            state       TEXT NOT NULL CHECK (state IN ('pending', 'valid', 'invalid')),
            protected   INTEGER NOT NULL DEFAULT 0, -- 1: rm refuses it
            snapshot    TEXT,                       -- source snapshot name (RBD), for the next diff
            heartbeat   REAL,                       -- a running backup's last checkpoint (gc waits)
            stats       TEXT NOT NULL DEFAULT '{}'  -- JSON summary of the backup run
        );
        CREATE INDEX IF NOT EXISTS versions_by_volume ON versions (volume, created);
        -- Removing a version clears its children's parent (and the foreign key checks them): without
        -- it each removal scanned the table, 15 ms at 50,000 versions (a prune of 16,669: 38 s).
        -- (ADDED_INDEXES: older databases gain it when opened.)
        CREATE INDEX IF NOT EXISTS versions_by_parent ON versions (parent);

        -- key=value labels of a version (retention policies and people select by them).
        CREATE TABLE IF NOT EXISTS labels (
            version_uid TEXT NOT NULL REFERENCES versions(uid) ON DELETE CASCADE,
            key         TEXT NOT NULL,
            value       TEXT NOT NULL,
            PRIMARY KEY (version_uid, key)
        );

        -- The block map of a version: a compact sorted array (see metadata/blockmap.py) of
        -- (block index, digest) for allocated, non-zero blocks only, so its size grows with the
        -- data, not with the volume size. Lookups happen in memory, never one query per block.
        CREATE TABLE IF NOT EXISTS blockmaps (
            version_uid TEXT PRIMARY KEY REFERENCES versions(uid) ON DELETE CASCADE,
            data        BLOB NOT NULL
        );

        -- Objects known to be durable in the store, keyed by the blake2b-256 digest of the
        -- plaintext block. A row is added only after the object was flushed, so the dedup index
        -- never points at a block a crash could have lost.
        CREATE TABLE IF NOT EXISTS blocks (
            digest      BLOB PRIMARY KEY,           -- 32 bytes
            stored_size INTEGER NOT NULL,           -- encoded object size (header + payload); 0 for
                                                    -- a stray gc found in the store (unknown)
            added       REAL NOT NULL,              -- unix time it was recorded
            -- 'condemned': unreferenced when gc last looked; new backups no longer dedup
            -- against it, and the next gc deletes it once no backup older than that is running.
            state       TEXT NOT NULL DEFAULT 'ok'
                        CHECK (state IN ('ok', 'missing', 'corrupt', 'condemned')),
            checked     REAL,                       -- last (deep-)scrub, unix time
            condemned   REAL                        -- when gc condemned it
        ) WITHOUT ROWID;
        -- The few blocks not 'ok': gc's condemned ones, and those every backup checks its new
        -- block map against before it turns valid, without scanning millions of 'ok' rows.
        CREATE INDEX IF NOT EXISTS blocks_not_ok ON blocks (state) WHERE state != 'ok';

        -- Runs of scheduled backup jobs (systemd timers call `backyfs job run NAME`), for the
        -- job monitor (`backyfs jobs`). A 'running' row whose pid is gone died without a word.
        CREATE TABLE IF NOT EXISTS job_runs (
            id          INTEGER PRIMARY KEY,
            job         TEXT NOT NULL,
            started     REAL NOT NULL,
            finished    REAL,
            state       TEXT NOT NULL CHECK (state IN ('running', 'ok', 'failed')),
            pid         INTEGER NOT NULL,
            version_uid TEXT,                       -- the version the run made (no FK: rm may drop it)
            message     TEXT NOT NULL DEFAULT ''    -- the one-line error of a failed run
        );
        CREATE INDEX IF NOT EXISTS job_runs_by_job ON job_runs (job, started);
        """
    )
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
