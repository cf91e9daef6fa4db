"""The embedded cluster store: one SQLite file in WAL mode, shared by processes of one host.

Layout (all in one database file):

- ``meta``: one row: the global revision, the compaction point and the host's boot id.
- ``kv``: the live keys (key as UTF-8 BLOB, so ordering is bytewise like etcd).
- ``lease``: id, TTL and deadline on the host's monotonic clock.
- ``event``: the change log watches read (AUTOINCREMENT id, so ids are never reused and a
  watcher can resume from the last id it saw); pruned beyond ``retention`` revisions.

Concurrency: every write is ``BEGIN IMMEDIATE ... COMMIT`` (the write lock is taken up front, so
a read-to-write upgrade can never fail with SQLITE_BUSY), with ``busy_timeout`` for waiting on
other processes. Reads use a deferred transaction, so a range and its revision are one
snapshot. All sqlite3 calls run in a worker thread (``trio.to_thread.run_sync``), one at a time
per connection.

Leases: a deadline on ``time.monotonic()`` (CLOCK_MONOTONIC is host-wide on Linux and never
jumps with NTP, unlike the wall clock). It restarts at boot, so the boot id is kept in ``meta``
and every lease is dropped when it changes; a deadline further away than its own TTL is also
treated as expired (a clock from another boot). Expiry is lazy but prompt: every read and
write first expires due leases, and every watch poll does too, so a watcher sees the DELETE
events within one poll interval of the deadline even when nobody else touches the store.

Watches poll the change log every ``poll_interval`` seconds (default 50 ms). A poll first asks
``PRAGMA data_version`` (which changes only when another connection commits) and reads the log
only when something changed, so an idle watch costs one cheap query per interval.

WAL needs every process on one host: never put the file on NFS or another network filesystem.
"""

from __future__ import annotations

import collections
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar

import trio

from .base import (
    ClusterStore,
    Compacted,
    Compare,
    Delete,
    EventKind,
    Get,
    KeyValue,
    LeaseExpired,
    Op,
    Put,
    StoreError,
    StoreUnavailable,
    TxnResult,
    WatchEvent,
    check_branch,
    prefix_range_end,
)

__all__ = ["DEFAULT_POLL_INTERVAL", "DEFAULT_RETENTION", "SqliteStore"]

T = TypeVar("T")

DEFAULT_POLL_INTERVAL: Final = 0.05
"""Seconds between two polls of the change log by a watch (and so the watch latency)."""

DEFAULT_RETENTION: Final = 10_000
"""Revisions of change history kept for watches; older history is compacted away."""

_COMPACT_SLACK: Final = 512  # compact in batches rather than on every write
_WATCH_BATCH: Final = 1000  # events read per poll at most
_SCHEMA_VERSION: Final = 1
_PUT, _DELETE = 0, 1

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


def _boot_id() -> str:
    """An id that changes at every boot (the monotonic clock restarts then)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        # Not Linux: no reliable boot id. The "deadline further away than its TTL" rule still
        # catches leases from before a reboot.
        return ""


def _kv(row: Sequence[Any]) -> KeyValue:
    """A KeyValue from ``key, value, create_rev, mod_rev, version, lease``."""
    return KeyValue(
        key=bytes(row[0]).decode("utf-8"),
        value=bytes(row[1]),
        create_revision=int(row[2]),
        mod_revision=int(row[3]),
        version=int(row[4]),
        lease=int(row[5]),
    )


def _prefix_clause(prefix: str) -> tuple[str, tuple[bytes, ...]]:
    """SQL condition (and parameters) selecting keys that start with ``prefix``."""
    start = prefix.encode("utf-8")
    end = prefix_range_end(start)
    if not start:
        return "1", ()
    if not end:
        return "key >= ?", (start,)
    return "key >= ? AND key < ?", (start, end)


class _Tx:
    """One open write transaction: allocates revisions and records events."""

    def __init__(self, conn: sqlite3.Connection, now: float) -> None:
        self.conn = conn
        self.now = now
        self._op_rev: int | None = None
        self.last_rev: int | None = None
        self.compact_rev = 0

    def bump(self) -> int:
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
        return int(self.conn.execute("SELECT rev FROM meta WHERE id = 0").fetchone()[0])

    def get(self, key: str) -> KeyValue | None:
        row = self.conn.execute(
            "SELECT key, value, create_rev, mod_rev, version, lease FROM kv WHERE key = ?",
            (key.encode("utf-8"),),
        ).fetchone()
        return None if row is None else _kv(row)

    def lease_exists(self, lease_id: int) -> bool:
        return (
            self.conn.execute("SELECT 1 FROM lease WHERE id = ?", (lease_id,)).fetchone()
            is not None
        )

    def put(self, key: str, value: bytes, lease: int) -> int:
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
        self._event(rev, _PUT, bkey, value, create_rev, version, lease)
        return rev

    def delete(self, key: str, rev: int | None = None) -> bool:
        bkey = key.encode("utf-8")
        if self.conn.execute("DELETE FROM kv WHERE key = ?", (bkey,)).rowcount == 0:
            return False
        self._event(self.op_rev() if rev is None else rev, _DELETE, bkey, b"", 0, 0, 0)
        return True

    def revoke(self, lease_id: int) -> bool:
        """Delete the lease and its keys (one revision, if it held any)."""
        keys = [
            bytes(r[0]).decode("utf-8")
            for r in self.conn.execute(
                "SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease_id,)
            ).fetchall()
        ]
        if keys:
            rev = self.bump()
            for key in keys:
                self.delete(key, rev)
        return self.conn.execute("DELETE FROM lease WHERE id = ?", (lease_id,)).rowcount > 0

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
        self.conn.execute("DELETE FROM event WHERE rev < ?", (revision,))
        self.conn.execute("UPDATE meta SET compact_rev = ? WHERE id = 0", (revision,))


class _Db:
    """Synchronous operations on one connection; always called from a worker thread."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self._conn: sqlite3.Connection | None = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._store._connect()
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def due(self) -> bool:
        """Is some lease past its deadline (or from another boot)?"""
        now = self._store.clock()
        return (
            self.conn.execute(
                "SELECT 1 FROM lease WHERE expires <= ? OR expires > ? + ttl + 1.0 LIMIT 1",
                (now, now),
            ).fetchone()
            is not None
        )

    def write(self, body: Callable[[_Tx], T]) -> T:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            tx = _Tx(conn, self._store.clock())
            for (lease_id,) in conn.execute(
                "SELECT id FROM lease WHERE expires <= ? OR expires > ? + ttl + 1.0",
                (tx.now, tx.now),
            ).fetchall():
                tx.revoke(int(lease_id))
            result = body(tx)
            retention = self._store.retention
            if (
                tx.last_rev is not None
                and tx.last_rev - tx.compact_rev > retention + _COMPACT_SLACK
            ):
                tx.compact(tx.last_rev - retention)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def read(self, body: Callable[[sqlite3.Connection], T]) -> T:
        if self.due():
            self.write(lambda tx: None)
        conn = self.conn
        conn.execute("BEGIN")  # deferred: the first SELECT takes the snapshot
        try:
            return body(conn)
        finally:
            conn.execute("COMMIT")


def _read_rev(conn: sqlite3.Connection) -> tuple[int, int]:
    row = conn.execute("SELECT rev, compact_rev FROM meta WHERE id = 0").fetchone()
    return int(row[0]), int(row[1])


class SqliteStore(ClusterStore):
    """`ClusterStore` on a SQLite file shared by the processes of one host.

    Opening does no I/O; the file and its schema are created on first use. Parameters:
    ``poll_interval`` (watch latency, seconds), ``retention`` (revisions of change history kept
    for watches), ``synchronous`` (SQLite's FULL by default: a committed write survives a power
    loss; NORMAL is faster and can lose the last commits, never corrupt the file) and
    ``busy_timeout`` (seconds to wait for another process's write lock before
    `StoreUnavailable`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        retention: int = DEFAULT_RETENTION,
        synchronous: str = "FULL",
        busy_timeout: float = 10.0,
    ) -> None:
        if synchronous.upper() not in {"FULL", "NORMAL", "EXTRA"}:
            raise ValueError("synchronous must be FULL, NORMAL or EXTRA")
        if poll_interval <= 0 or retention < 1 or busy_timeout < 0:
            raise ValueError("poll_interval and retention must be positive")
        self.path = os.fspath(path)
        self.poll_interval = poll_interval
        self.retention = retention
        self.synchronous = synchronous.upper()
        self.busy_timeout = busy_timeout
        self.clock: Callable[[], float] = time.monotonic
        self._db = _Db(self)
        # One connection, one thread at a time on it.
        self._limiter = trio.CapacityLimiter(1)
        self._schema_ready = False
        self._closed = False

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    # ------------------------------------------------------------------ plumbing

    def _connect(self) -> sqlite3.Connection:
        """Open one connection (worker thread) and make sure the schema exists."""
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: cannot use WAL mode (journal_mode={mode})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            if not self._schema_ready:
                self._init_schema(conn)
                self._schema_ready = True
        except BaseException:
            conn.close()
            raise
        return conn

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        # Several processes may create the file at once: do it under the write lock.
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._init_schema_locked(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _init_schema_locked(self, conn: sqlite3.Connection) -> None:
        # Statement by statement: executescript() would COMMIT the open transaction first.
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        boot = _boot_id()
        row = conn.execute("SELECT schema, boot_id FROM meta WHERE id = 0").fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO meta (id, schema, rev, compact_rev, boot_id) VALUES (0, ?, 0, 0, ?)",
                (_SCHEMA_VERSION, boot),
            )
        elif int(row[0]) != _SCHEMA_VERSION:
            raise StoreError(f"{self.path}: unknown cluster store schema {row[0]}")
        elif boot and row[1] != boot:
            # The host rebooted: lease deadlines are on the old boot's monotonic clock and
            # their holders are gone anyway. Expire them all (DELETE events for their keys).
            tx = _Tx(conn, self.clock())
            for (lease_id,) in conn.execute("SELECT id FROM lease").fetchall():
                tx.revoke(int(lease_id))
            conn.execute("UPDATE meta SET boot_id = ? WHERE id = 0", (boot,))

    async def _run(self, fn: Callable[[_Db], T], db: _Db | None = None) -> T:
        if self._closed:
            raise StoreError("the store is closed")
        return await trio.to_thread.run_sync(_call, fn, db or self._db, limiter=self._limiter)

    # ------------------------------------------------------------------ reads

    async def get(self, key: str) -> KeyValue | None:
        """See `ClusterStore.get`."""
        Get(key)  # validates
        bkey = key.encode("utf-8")

        def body(conn: sqlite3.Connection) -> KeyValue | None:
            row = conn.execute(
                "SELECT key, value, create_rev, mod_rev, version, lease FROM kv WHERE key = ?",
                (bkey,),
            ).fetchone()
            return None if row is None else _kv(row)

        return await self._run(lambda db: db.read(body))

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        """See `ClusterStore.range`."""
        clause, params = _prefix_clause(prefix)

        def body(conn: sqlite3.Connection) -> tuple[list[KeyValue], int]:
            rows = conn.execute(
                "SELECT key, value, create_rev, mod_rev, version, lease FROM kv "
                f"WHERE {clause} ORDER BY key",
                params,
            ).fetchall()
            return [_kv(r) for r in rows], _read_rev(conn)[0]

        return await self._run(lambda db: db.read(body))

    async def revision(self) -> int:
        """See `ClusterStore.revision`."""
        return await self._run(lambda db: db.read(lambda conn: _read_rev(conn)[0]))

    # ------------------------------------------------------------------ writes

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """See `ClusterStore.put`."""
        op = Put(key, value, lease)
        return await self._run(lambda db: db.write(lambda tx: tx.put(op.key, op.value, op.lease)))

    async def delete(self, key: str) -> int:
        """See `ClusterStore.delete`."""
        Delete(key)

        def body(tx: _Tx) -> int:
            return tx.op_rev() if tx.delete(key) else tx.current_rev()

        return await self._run(lambda db: db.write(body))

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]
    ) -> TxnResult:
        """See `ClusterStore.txn`."""
        check_branch(success)
        check_branch(failure)
        compares, success, failure = list(compares), list(success), list(failure)

        def body(tx: _Tx) -> TxnResult:
            ok = all(c.evaluate(tx.get(c.key)) for c in compares)
            responses: list[KeyValue | None] = []
            for op in success if ok else failure:
                if isinstance(op, Put):
                    tx.put(op.key, op.value, op.lease)
                elif isinstance(op, Delete):
                    tx.delete(op.key)
                else:
                    responses.append(tx.get(op.key))
            return TxnResult(ok, tx.last_rev or tx.current_rev(), responses)

        return await self._run(lambda db: db.write(body))

    async def compact(self, revision: int) -> None:
        """See `ClusterStore.compact`."""

        def body(tx: _Tx) -> None:
            current, compacted = _read_rev(tx.conn)
            if revision > current:
                raise ValueError(f"cannot compact to future revision {revision} (now {current})")
            if revision > compacted:
                tx.compact(revision)

        await self._run(lambda db: db.write(body))

    # ------------------------------------------------------------------ leases

    async def grant_lease(self, ttl_s: float) -> int:
        """See `ClusterStore.grant_lease`."""
        if not ttl_s > 0:
            raise ValueError("a lease TTL must be positive")

        def body(tx: _Tx) -> int:
            row = tx.conn.execute(
                "INSERT INTO lease (ttl, expires) VALUES (?, ?) RETURNING id",
                (float(ttl_s), tx.now + ttl_s),
            ).fetchone()
            return int(row[0])

        return await self._run(lambda db: db.write(body))

    async def keepalive(self, lease_id: int) -> float:
        """See `ClusterStore.keepalive`."""

        def body(tx: _Tx) -> float:
            row = tx.conn.execute(
                "UPDATE lease SET expires = ? + ttl WHERE id = ? RETURNING ttl",
                (tx.now, lease_id),
            ).fetchone()
            if row is None:
                raise LeaseExpired(lease_id)
            return float(row[0])

        return await self._run(lambda db: db.write(body))

    async def revoke(self, lease_id: int) -> None:
        """See `ClusterStore.revoke`."""
        await self._run(lambda db: db.write(lambda tx: tx.revoke(lease_id)))

    # ------------------------------------------------------------------ watch

    @asynccontextmanager
    async def watch(
        self, prefix: str, *, start_revision: int
    ) -> AsyncIterator[AsyncIterator[WatchEvent]]:
        """See `ClusterStore.watch`. Polls the change log every ``poll_interval`` seconds."""
        if start_revision < 0:
            raise ValueError("start_revision must be >= 0")
        watcher = _Watcher(self, prefix)
        try:
            await watcher.start(start_revision)
            yield watcher
        finally:
            with trio.CancelScope(shield=True):
                await watcher.aclose()

    async def aclose(self) -> None:
        """See `ClusterStore.aclose`."""
        if not self._closed:
            self._closed = True
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._db.close, limiter=self._limiter)


def _call(fn: Callable[[_Db], T], db: _Db) -> T:
    """Run ``fn`` (worker thread), mapping sqlite3 errors onto the store's errors."""
    try:
        return fn(db)
    except sqlite3.OperationalError as exc:
        # "database is locked" after busy_timeout, I/O errors, unreadable file...
        raise StoreUnavailable(f"sqlite: {exc}") from exc
    except sqlite3.Error as exc:
        raise StoreError(f"sqlite: {exc}") from exc


class _Watcher:
    """A watch's iterator: polls the ``event`` table on its own connection."""

    def __init__(self, store: SqliteStore, prefix: str) -> None:
        self._store = store
        self._db = _Db(store)
        self._limiter = trio.CapacityLimiter(1)
        self._clause, self._params = _prefix_clause(prefix)
        self._buffer: collections.deque[WatchEvent] = collections.deque()
        self._next_rev = 0  # every event with rev >= this is still to be delivered
        self._min_rev = 0
        self._last_id = 0  # events up to this id have been read
        self._data_version: int | None = None
        self._closed = False

    async def _run(self, fn: Callable[[_Db], T]) -> T:
        return await trio.to_thread.run_sync(_call, fn, self._db, limiter=self._limiter)

    async def start(self, start_revision: int) -> None:
        def body(db: _Db) -> None:
            if db.due():
                db.write(lambda tx: None)
            rev, compacted = db.read(_read_rev)
            if start_revision and start_revision < compacted:
                raise Compacted(start_revision, compacted)
            self._next_rev = self._min_rev = start_revision or rev + 1

        await self._run(body)

    def _poll(self, db: _Db) -> list[WatchEvent]:
        conn = db.conn
        changed = conn.execute("PRAGMA data_version").fetchone()[0]
        expired = db.due()
        if expired:
            # Nobody else may be touching the store: expire here so watchers see the DELETEs.
            # Our own commit does not move data_version, hence ``expired`` forces a read.
            db.write(lambda tx: None)
        if not expired and changed == self._data_version:
            return []
        self._data_version = changed
        conn.execute("BEGIN")
        try:
            rev, compacted = _read_rev(conn)
            if self._next_rev < compacted:
                raise Compacted(self._next_rev, compacted)
            rows = conn.execute(
                "SELECT id, rev, kind, key, value, create_rev, mod_rev, version, lease "
                f"FROM event WHERE id > ? AND rev >= ? AND {self._clause} ORDER BY id LIMIT ?",
                (self._last_id, self._min_rev, *self._params, _WATCH_BATCH),
            ).fetchall()
        finally:
            conn.execute("COMMIT")
        events = [
            WatchEvent(EventKind.PUT if r[2] == _PUT else EventKind.DELETE, _kv(r[3:]), int(r[1]))
            for r in rows
        ]
        if rows:
            self._last_id = int(rows[-1][0])
        if len(rows) < _WATCH_BATCH:
            self._next_rev = max(self._next_rev, rev + 1)  # we have seen all of this snapshot
        else:
            self._next_rev = max(self._next_rev, events[-1].revision)
        return events

    def __aiter__(self) -> _Watcher:
        return self

    async def __anext__(self) -> WatchEvent:
        while not self._buffer:
            if self._closed:  # the watch's context has exited
                raise StopAsyncIteration
            self._buffer.extend(await self._run(self._poll))
            if not self._buffer:
                await trio.sleep(self._store.poll_interval)
        return self._buffer.popleft()

    async def aclose(self) -> None:
        self._closed = True
        await trio.to_thread.run_sync(self._db.close, limiter=self._limiter)
