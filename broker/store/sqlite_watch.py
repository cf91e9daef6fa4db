"""The SQLite store's watches: each polls the change log (``event``) on a connection of its own.

A watch polls every ``poll_interval`` seconds (default 50 ms, so that is the watch latency
across processes). A poll first asks ``PRAGMA data_version`` (which changes only when another
connection commits) and reads the log only when something changed, so an idle watch costs one
cheap query per interval. A poll also expires due leases, so watchers see their DELETE events
even when nothing else touches the store.
"""

from __future__ import annotations

import collections
from typing import Final

import trio

from .base import Compacted, EventKind, WatchEvent
from .sqlite_db import Db
from .sqlite_tx import PUT_EVENT, prefix_clause, read_rev, row_kv

__all__ = ["Watcher"]

_WATCH_BATCH: Final = 1000  # events read per poll at most


class Watcher:
    """A watch's iterator: polls the ``event`` table on its own connection ``db``."""

    def __init__(self, db: Db, prefix: str, *, poll_interval: float) -> None:
        self._db = db
        self._poll_interval = poll_interval
        self._clause, self._params = prefix_clause(prefix)
        self._buffer: collections.deque[WatchEvent] = collections.deque()
        self._next_rev = 0  # every event with rev >= this is still to be delivered
        self._min_rev = 0
        self._last_id = 0  # events up to this id have been read
        self._data_version: int | None = None
        self._closed = False

    async def start(self, start_revision: int) -> None:
        """Establish the watch from ``start_revision`` (0: after the current revision).

        Raises `Compacted` if that revision is older than the compaction point.
        """

        def body(db: Db) -> None:
            if db.due():
                db.write(lambda tx: None)
            rev, compacted = db.read(read_rev)
            if start_revision and start_revision < compacted:
                raise Compacted(start_revision, compacted)
            self._next_rev = self._min_rev = start_revision or rev + 1

        await self._db.run(body)

    def _poll(self, db: Db) -> list[WatchEvent]:
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
            rev, compacted = read_rev(conn)
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
            WatchEvent(
                EventKind.PUT if r[2] == PUT_EVENT else EventKind.DELETE, row_kv(r[3:]), int(r[1])
            )
            for r in rows
        ]
        if rows:
            self._last_id = int(rows[-1][0])
        if len(rows) < _WATCH_BATCH:
            self._next_rev = max(self._next_rev, rev + 1)  # we have seen all of this snapshot
        else:
            self._next_rev = max(self._next_rev, events[-1].revision)
        return events

    def __aiter__(self) -> Watcher:
        return self

    async def __anext__(self) -> WatchEvent:
        while not self._buffer:
            if self._closed:  # the watch's context has exited
                raise StopAsyncIteration
            self._buffer.extend(await self._db.run(self._poll))
            if not self._buffer:
                await trio.sleep(self._poll_interval)
        return self._buffer.popleft()

    async def aclose(self) -> None:
        """End the iteration and close the watch's connection."""
        self._closed = True
        await self._db.aclose()
