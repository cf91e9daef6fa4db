"""The SQLite store's file: opening a connection (WAL, pragmas) and creating the schema.

Layout (all in one database file):

- ``meta``: one row: the schema version, the global revision, the compaction point and the
  host's boot id.
- ``kv``: the live keys (key as UTF-8 BLOB, so ordering is bytewise like etcd).
- ``lease``: id, TTL and deadline on the host's monotonic clock (``sqlite_leases.py``).
- ``event``: the change log watches read (AUTOINCREMENT id, so ids are never reused and a
  watcher can resume from the last id it saw); pruned beyond ``retention`` revisions.

WAL needs every process on one host: never put the file on NFS or another network filesystem.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from . import sqlite_leases
from .base import StoreError
from .sqlite_tx import WriteTx, write_lock

__all__ = ["SCHEMA_VERSION", "create_schema", "open_connection"]

SCHEMA_VERSION: Final = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    schema INTEGER NOT NULL,
    rev INTEGER NOT NULL,
    compact_rev INTEGER NOT NULL,
    boot_id TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY,
    value BLOB NOT NULL,
    create_rev INTEGER NOT NULL,
    mod_rev INTEGER NOT NULL,
    version INTEGER NOT NULL,
    lease INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_by_lease ON kv (lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS lease (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl REAL NOT NULL,
    expires REAL NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS lease_by_expiry ON lease (expires);
CREATE TABLE IF NOT EXISTS event (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rev INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    create_rev INTEGER NOT NULL,
    mod_rev INTEGER NOT NULL,
    version INTEGER NOT NULL,
    lease INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS event_by_rev ON event (rev);
"""


def open_connection(path: str, *, busy_timeout: float, synchronous: str) -> sqlite3.Connection:
    """Open one connection (worker thread) in WAL mode; raises `StoreError` without WAL.

    ``isolation_level=None``: transactions are begun and ended explicitly (`write_lock`, `Db.read`).
    """
    conn = sqlite3.connect(
        path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        if mode.lower() != "wal":
            raise StoreError(f"{path}: cannot use WAL mode (journal_mode={mode})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
    except BaseException:
        conn.close()
        raise
    return conn


def create_schema(conn: sqlite3.Connection, path: str, now: float) -> None:
    """Make sure the file has the schema, and drop the leases of a previous boot.

    Raises `StoreError` for a file of another schema version.
    """
    # Several processes may create the file at once: do it under the write lock.
    with write_lock(conn):
        # Statement by statement: executescript() would COMMIT the open transaction first.
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        boot = sqlite_leases.boot_id()
        row = conn.execute("SELECT schema, boot_id FROM meta WHERE id = 0").fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO meta (id, schema, rev, compact_rev, boot_id) VALUES (0, ?, 0, 0, ?)",
                (SCHEMA_VERSION, boot),
            )
        elif int(row[0]) != SCHEMA_VERSION:
            raise StoreError(f"{path}: unknown cluster store schema {row[0]}")
        elif boot and row[1] != boot:
            # The host rebooted: lease deadlines are on the old boot's monotonic clock and
            # their holders are gone anyway. Expire them all (DELETE events for their keys).
            sqlite_leases.revoke_all(WriteTx(conn, now))
            conn.execute("UPDATE meta SET boot_id = ? WHERE id = 0", (boot,))
