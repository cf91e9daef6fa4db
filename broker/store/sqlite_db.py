"""One connection of the SQLite store: its worker thread, and its read and write transactions.

Concurrency: every write is ``BEGIN IMMEDIATE ... COMMIT`` (the write lock is taken up front, so
a read-to-write upgrade can never fail with SQLITE_BUSY), with ``busy_timeout`` for waiting on
other processes. Reads use a deferred transaction, so a range and its revision are one
snapshot. All sqlite3 calls run in a worker thread (``trio.to_thread.run_sync``), one at a time
per connection. Both kinds of transaction first expire due leases (``sqlite_leases.py``); a
write also compacts the change log once it holds more than ``retention`` revisions (plus some
slack, so that it is pruned in batches).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Final, Protocol, TypeVar

import trio

from . import sqlite_leases
from .base import StoreError, StoreUnavailable
from .sqlite_tx import WriteTx, write_lock

__all__ = ["Db", "StoreSettings"]

T = TypeVar("T")

_COMPACT_SLACK: Final = 512  # compact in batches rather than on every write


class StoreSettings(Protocol):
    """What a connection reads from its store (`SqliteStore`), each time it needs it."""

    retention: int
    """Revisions of change history kept for watches."""
    clock: Callable[[], float]
    """The monotonic clock lease deadlines are on."""


class Db:
    """One connection, opened on first use.

    `run` and `aclose` are called from Trio; they run the other methods in a worker thread,
    one at a time.
    """

    def __init__(self, store: StoreSettings, connect: Callable[[], sqlite3.Connection]) -> None:
        self._store = store
        self._connect = connect
        self._conn: sqlite3.Connection | None = None
        # One connection, one thread at a time on it.
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, fn: Callable[[Db], T]) -> T:
        """``fn(self)`` in a worker thread, with sqlite3 errors mapped onto the store's."""
        return await trio.to_thread.run_sync(_call, fn, self, limiter=self._limiter)

    async def aclose(self) -> None:
        """Close the connection (in a worker thread, once no call is running on it)."""
        await trio.to_thread.run_sync(self.close, limiter=self._limiter)

    @property
    def conn(self) -> sqlite3.Connection:
        """The connection (worker thread), opened now if need be."""
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def close(self) -> None:
        """Close the connection (worker thread), if it is open."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def due(self) -> bool:
        """Is some lease past its deadline (or from another boot)?"""
        return sqlite_leases.any_due(self.conn, self._store.clock())

    def write(self, body: Callable[[WriteTx], T]) -> T:
        """Run ``body`` in a write transaction, after expiring due leases; commit."""
        conn = self.conn
        with write_lock(conn):
            tx = WriteTx(conn, self._store.clock())
            sqlite_leases.expire_due(tx)
            result = body(tx)
            retention = self._store.retention
            if (
                tx.last_rev is not None
                and tx.last_rev - tx.compact_rev > retention + _COMPACT_SLACK
            ):
                tx.compact(tx.last_rev - retention)
        return result

    def read(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` on one snapshot, after expiring due leases (in a write of their own)."""
        if self.due():
            self.write(lambda tx: None)
        conn = self.conn
        conn.execute("BEGIN")  # deferred: the first SELECT takes the snapshot
        try:
            return body(conn)
        finally:
            conn.execute("COMMIT")


def _call(fn: Callable[[Db], T], db: Db) -> T:
    """Run ``fn`` (worker thread), mapping sqlite3 errors onto the store's errors."""
    try:
        return fn(db)
    except sqlite3.OperationalError as exc:
        # "database is locked" after busy_timeout, I/O errors, unreadable file...
        raise StoreUnavailable(f"sqlite: {exc}") from exc
    except sqlite3.Error as exc:
        raise StoreError(f"sqlite: {exc}") from exc
