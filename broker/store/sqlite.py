"""The embedded cluster store: one SQLite file in WAL mode, shared by processes of one host.

`SqliteStore` is the async face, for Trio; the rest is in modules of their own:

- ``sqlite_schema.py``: the file's tables, opening a connection (WAL, pragmas), creating the
  schema. WAL needs every process on one host: never put the file on NFS or another network
  filesystem.
- ``sqlite_db.py``: one connection and its worker thread; reads are one snapshot, writes are
  ``BEGIN IMMEDIATE ... COMMIT``.
- ``sqlite_tx.py``: the write transaction: revisions, the ``kv`` table and the change log.
- ``sqlite_leases.py``: leases on the host's monotonic clock, dropped at reboot, expired lazily
  but promptly.
- ``sqlite_watch.py``: watches, each polling the change log on a connection of its own.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Final, TypeVar

import trio

from . import sqlite_leases
from .base import (
    ClusterStore,
    Compare,
    Delete,
    Get,
    KeyValue,
    Op,
    Put,
    StoreError,
    TxnResult,
    WatchEvent,
    check_branch,
)
from .sqlite_db import Db
from .sqlite_schema import create_schema, open_connection
from .sqlite_tx import KV_COLUMNS, WriteTx, get_kv, prefix_clause, read_rev, row_kv
from .sqlite_watch import Watcher

__all__ = ["DEFAULT_POLL_INTERVAL", "DEFAULT_RETENTION", "SqliteStore"]

T = TypeVar("T")

DEFAULT_POLL_INTERVAL: Final = 0.05
"""Seconds between two polls of the change log by a watch (and so the watch latency)."""

DEFAULT_RETENTION: Final = 10_000
"""Revisions of change history kept for watches; older history is compacted away."""


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
        self._db = Db(self, self._connect)
        self._schema_ready = False
        self._closed = False

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    # ------------------------------------------------------------------ plumbing

    def _connect(self) -> sqlite3.Connection:
        """Open one connection (worker thread) and make sure the schema exists."""
        conn = open_connection(
            self.path, busy_timeout=self.busy_timeout, synchronous=self.synchronous
        )
        try:
            if not self._schema_ready:
                create_schema(conn, self.path, self.clock())
                self._schema_ready = True
        except BaseException:
            conn.close()
            raise
        return conn

    async def _run(self, fn: Callable[[Db], T]) -> T:
        if self._closed:
            raise StoreError("the store is closed")
        return await self._db.run(fn)

    # ------------------------------------------------------------------ reads

    async def get(self, key: str) -> KeyValue | None:
        """See `ClusterStore.get`."""
        Get(key)  # validates
        return await self._run(lambda db: db.read(lambda conn: get_kv(conn, key)))

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        """See `ClusterStore.range`."""
        clause, params = prefix_clause(prefix)

        def body(conn: sqlite3.Connection) -> tuple[list[KeyValue], int]:
            rows = conn.execute(
                f"SELECT {KV_COLUMNS} FROM kv WHERE {clause} ORDER BY key", params
            ).fetchall()
            return [row_kv(r) for r in rows], read_rev(conn)[0]

        return await self._run(lambda db: db.read(body))

    async def revision(self) -> int:
        """See `ClusterStore.revision`."""
        return await self._run(lambda db: db.read(lambda conn: read_rev(conn)[0]))

    # ------------------------------------------------------------------ writes

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """See `ClusterStore.put`."""
        op = Put(key, value, lease)
        return await self._run(lambda db: db.write(lambda tx: tx.put(op.key, op.value, op.lease)))

    async def delete(self, key: str) -> int:
        """See `ClusterStore.delete`."""
        Delete(key)

        def body(tx: WriteTx) -> int:
            return tx.op_rev() if tx.delete(key) else tx.current_rev()

        return await self._run(lambda db: db.write(body))

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]
    ) -> TxnResult:
        """See `ClusterStore.txn`."""
        check_branch(success)
        check_branch(failure)
        compares, success, failure = list(compares), list(success), list(failure)

        def body(tx: WriteTx) -> TxnResult:
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

        def body(tx: WriteTx) -> None:
            current, compacted = read_rev(tx.conn)
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
        return await self._run(lambda db: db.write(lambda tx: sqlite_leases.grant(tx, ttl_s)))

    async def keepalive(self, lease_id: int) -> float:
        """See `ClusterStore.keepalive`."""
        return await self._run(
            lambda db: db.write(lambda tx: sqlite_leases.keepalive(tx, lease_id))
        )

    async def revoke(self, lease_id: int) -> None:
        """See `ClusterStore.revoke`."""
        await self._run(lambda db: db.write(lambda tx: sqlite_leases.revoke(tx, lease_id)))

    # ------------------------------------------------------------------ watch

    @asynccontextmanager
    async def watch(
        self, prefix: str, *, start_revision: int
    ) -> AsyncIterator[AsyncIterator[WatchEvent]]:
        """See `ClusterStore.watch`. Polls the change log every ``poll_interval`` seconds."""
        if start_revision < 0:
            raise ValueError("start_revision must be >= 0")
        watcher = Watcher(Db(self, self._connect), prefix, poll_interval=self.poll_interval)
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
                await self._db.aclose()
