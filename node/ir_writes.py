"""Where the recovery server writes IR chunks: overlapped with receiving the next ones.

An IR is one long stream of chunks into a fresh sparse image. Written inline through the
page cache, each chunk cost more CPU than decrypting it (ext4 allocating under write-back
of the chunks before it), and the connection stood still meanwhile. So each chunk is
copied (1 MiB copy: ~0.05 ms) into one of a few page-aligned buffers and written from a
worker thread with O_DIRECT (:meth:`Replica.write_ir_chunk` with ``aligned=True``), while
the session goes on receiving. At most ``depth`` writes are in flight; a full queue makes
the session wait, which in turn stops reading the socket (TCP back-pressure).

A write that fails is reported by the next :meth:`IRWriteQueue.write` or
:meth:`IRWriteQueue.drain`. Durability is unchanged: the IR cursor is only saved by a
checkpoint, and :meth:`IRWriteQueue.drain` runs before every checkpoint and before IREnd.
"""

from __future__ import annotations

import mmap
from functools import partial
from typing import Final

import trio

import frproto as fp
from node.storage import Replica
from node.storage.fileio import Buffer

#: Writes in flight per connection.
DEFAULT_DEPTH: Final = 4


class IRWriteQueue:
    """A bounded queue of IR chunk writes run in worker threads, for one connection.

    Create it inside the session's nursery; the nursery waits for writes still in
    flight when the connection ends."""

    def __init__(self, nursery: trio.Nursery, *, depth: int = DEFAULT_DEPTH) -> None:
        self._nursery = nursery
        self._depth = depth
        self._slots = trio.Semaphore(depth)
        self._buffers: list[mmap.mmap] = []
        self._error: fp.FrprotoError | None = None

    async def write(
        self,
        replica: Replica,
        disk_index: int,
        offset: int,
        data: Buffer | None,
        *,
        length: int,
        overwrite: bool = False,
    ) -> None:
        """Queue one chunk (``data`` is copied: it may be reused once this returns).
        ``data=None`` is a zero chunk of ``length`` bytes; it goes through the queue too,
        because the replica's lock may be held by a write in flight. Writes in flight run
        in any order: a chunk that may overlap an earlier one is queued only after
        :meth:`drain` (and with ``overwrite``, so that zeros are written too)."""
        await self._slots.acquire()
        try:
            self._raise_error()  # after acquiring: a write that just failed is seen
            if data is None:
                buf, view = None, None
            else:
                buf = self._buffer(len(data))
                view = memoryview(buf)[: len(data)]
                view[:] = data
        except BaseException:
            self._slots.release()
            raise
        self._nursery.start_soon(
            self._write, replica, disk_index, offset, length, buf, view, overwrite
        )

    async def drain(self) -> None:
        """Wait until every queued write is done; raise the first one's error, if any."""
        for _ in range(self._depth):
            await self._slots.acquire()
        for _ in range(self._depth):
            self._slots.release()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _buffer(self, size: int) -> mmap.mmap:
        # Anonymous mmaps are page-aligned, as O_DIRECT needs; keep the largest ones.
        while self._buffers:
            buf = self._buffers.pop()
            if len(buf) >= size:
                return buf
            buf.close()
        return mmap.mmap(-1, max(size, mmap.PAGESIZE))

    async def _write(
        self,
        replica: Replica,
        disk_index: int,
        offset: int,
        length: int,
        buf: mmap.mmap | None,
        view: memoryview | None,
        overwrite: bool,
    ) -> None:
        try:
            await trio.to_thread.run_sync(
                partial(
                    replica.write_ir_chunk,
                    disk_index,
                    offset,
                    view,
                    length=length,
                    aligned=True,
                    overwrite=overwrite,
                )
            )
        except fp.FrprotoError as exc:
            if self._error is None:
                self._error = exc
        finally:
            if view is not None and buf is not None:
                view.release()
                self._buffers.append(buf)
            self._slots.release()
