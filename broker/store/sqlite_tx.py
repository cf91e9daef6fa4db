"""The SQLite store's rows and its write transaction: revisions, the ``kv`` table, the change log.

A `WriteTx` is one open ``BEGIN IMMEDIATE`` transaction (`write_lock`): it allocates
the revision of the caller's operation on its first write, and records every change in the
``event`` table the watches read. The read helpers here are shared by the store's reads, the
write transaction and the watches.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

from .base import KeyValue, LeaseExpired, prefix_range_end

__all__ = [
    "DELETE_EVENT",
    "KV_COLUMNS",
    "PUT_EVENT",
    "WriteTx",
    "get_kv",
    "prefix_clause",
    "read_rev",
    "row_kv",
    "write_lock",
]

PUT_EVENT: Final = 0
DELETE_EVENT: Final = 1
"""``event.kind`` values."""

KV_COLUMNS: Final = "key, value, create_rev, mod_rev, version, lease"
"""The columns `row_kv` reads, in its order (``kv`` and ``event`` both have them)."""


def row_kv(row: Sequence[Any]) -> KeyValue:
    """A KeyValue from ``key, value, create_rev, mod_rev, version, lease``."""
    return KeyValue(
        key=bytes(row[0]).decode("utf-8"),
        value=bytes(row[1]),
        create_revision=int(row[2]),
        mod_revision=int(row[3]),
        version=int(row[4]),
        lease=int(row[5]),
    )


def get_kv(conn: sqlite3.Connection, key: str) -> KeyValue | None:
    """The key's current row, or ``None`` if it is absent."""
    row = conn.execute(
        f"SELECT {KV_COLUMNS} FROM kv WHERE key = ?", (key.encode("utf-8"),)
    ).fetchone()
    return None if row is None else row_kv(row)


def prefix_clause(prefix: str) -> tuple[str, tuple[bytes, ...]]:
    """SQL condition (and parameters) selecting keys that start with ``prefix``."""
    start = prefix.encode("utf-8")
    end = prefix_range_end(start)
    if not start:
        return "1", ()
    if not end:
        return "key >= ?", (start,)
    return "key >= ? AND key < ?", (start, end)


def read_rev(conn: sqlite3.Connection) -> tuple[int, int]:
    """The store revision and the compaction point."""
    row = conn.execute("SELECT rev, compact_rev FROM meta WHERE id = 0").fetchone()
    return int(row[0]), int(row[1])


@contextmanager
def write_lock(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE ... COMMIT``, rolled back if anything is raised.

    IMMEDIATE takes the write lock up front (waiting up to ``busy_timeout`` for other
    processes), so a read-to-write upgrade can never fail with SQLITE_BUSY.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class WriteTx:
    """One open write transaction: allocates revisions and records events."""

    def __init__(self, conn: sqlite3.Connection, now: float) -> None:
        self.conn = conn
        self.now = now
        self._op_rev: int | None = None
        self.last_rev: int | None = None
        self.compact_rev = 0

    def bump(self) -> int:
        """Allocate a new revision (for a write that is not the caller's operation)."""
        row = self.conn.execute(
            "UPDATE meta SET rev = rev + 1 WHERE id = 0 RETURNING rev, compact_rev"
        ).fetchone()
        self.last_rev, self.compact_rev = int(row[0]), int(row[1])
        return self.last_rev

    def op_rev(self) -> int:
        """The revision of the caller's operation: allocated on its first write, then shared."""
        if self._op_rev is None:
            self._op_rev = self.bump()
        return self._op_rev

    def current_rev(self) -> int:
        """The store revision, without allocating one."""
        return int(self.conn.execute("SELECT rev FROM meta WHERE id = 0").fetchone()[0])

    def get(self, key: str) -> KeyValue | None:
        """The key as this transaction sees it (its own earlier writes included)."""
        return get_kv(self.conn, key)

    def lease_exists(self, lease_id: int) -> bool:
        """Does the lease exist (due leases have been expired when the transaction began)?"""
        return (
            self.conn.execute("SELECT 1 FROM lease WHERE id = ?", (lease_id,)).fetchone()
            is not None
        )

    def put(self, key: str, value: bytes, lease: int) -> int:
        """Write ``value`` at ``key`` at the operation's revision; raises `LeaseExpired`."""
        if lease and not self.lease_exists(lease):
            raise LeaseExpired(lease)
        old = self.get(key)
        rev = self.op_rev()
        create_rev = rev if old is None else old.create_revision
        version = 1 if old is None else old.version + 1
        bkey = key.encode("utf-8")
        self.conn.execute(
            "INSERT INTO kv (key, value, create_rev, mod_rev, version, lease) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "mod_rev = excluded.mod_rev, version = excluded.version, lease = excluded.lease",
            (bkey, value, create_rev, rev, version, lease),
        )
        self._event(rev, PUT_EVENT, bkey, value, create_rev, version, lease)
        return rev

    def delete(self, key: str, rev: int | None = None) -> bool:
        """Delete ``key`` at ``rev`` (default: the operation's revision); False if absent."""
        bkey = key.encode("utf-8")
        if self.conn.execute("DELETE FROM kv WHERE key = ?", (bkey,)).rowcount == 0:
            return False
        self._event(self.op_rev() if rev is None else rev, DELETE_EVENT, bkey, b"", 0, 0, 0)
        return True

    def _event(
        self,
        rev: int,
        kind: int,
        key: bytes,
        value: bytes,
        create_rev: int,
        version: int,
        lease: int,
    ) -> None:
        self.conn.execute(
            "INSERT INTO event (rev, kind, key, value, create_rev, mod_rev, version, lease) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (rev, kind, key, value, create_rev, rev, version, lease),
        )

    def compact(self, revision: int) -> None:
        """Drop the change log older than ``revision`` and move the compaction point there."""
        self.conn.execute("DELETE FROM event WHERE rev < ?", (revision,))
        self.conn.execute("UPDATE meta SET compact_rev = ? WHERE id = 0", (revision,))
