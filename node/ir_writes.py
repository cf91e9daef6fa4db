"""Where the recovery server writes IR chunks: overlapped with receiving the next ones.

An IR is one long stream of chunks into a fresh sparse image. Written inline through the
page cache, each chunk cost more CPU than decrypting it (ext4 allocating under write-back
of the chunks before it), and the connection stood still meanwhile. So each chunk is
written from a worker thread with O_DIRECT (:meth:`Replica.write_ir_chunk` with
``aligned=True``), while the session goes on receiving. A chunk's payload already lies
page-aligned in its frame's buffer (``frproto.trio_io.PAYLOAD_ALIGN``): the write keeps a
view of it until done (the frame pool takes the buffer back only then) and nothing is
copied; other data (a decompressed chunk) is copied into one of a few page-aligned
buffers first (memory copies were a fifth of the server's CPU per GB of IR). At most
``depth`` writes are in flight; a full queue makes the session wait, which in turn stops
reading the socket (TCP back-pressure).

A write that fails is reported by the next :meth:`IRWriteQueue.write` or
:meth:`IRWriteQueue.drain`. Durability is unchanged: the IR cursor is only saved by a
checkpoint, and :meth:`IRWriteQueue.drain` runs before every checkpoint and before IREnd.
"""

from __future__ import annotations

import ctypes
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
        #: Aligned buffers made so far for data that had to be copied (none while every
        #: chunk comes page-aligned in its frame).
        self.copy_buffers = 0

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
        """Queue one chunk (``data`` is copied, or viewed until written when it lies
        page-aligned in writable memory: the caller may drop it once this returns).
        ``data=None`` is a zero chunk of ``length`` bytes; it goes through the queue too,
        because the replica's lock may be held by a write in flight. Writes in flight run
        in any order: a chunk that may overlap an earlier one is queued only after
        :meth:`drain` (and with ``overwrite``, so that zeros are written too)."""
        await self._slots.acquire()
        try:
            self._raise_error()  # after acquiring: a write that just failed is seen
            buf: mmap.mmap | None = None
            view: memoryview | None = None
            if data is not None:
                view = _aligned_view(data)
                if view is None:
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
        self.copy_buffers += 1
        # Private, not shared with a process forked later (see frproto.trio_io.BufferPool).
        return mmap.mmap(-1, max(size, mmap.PAGESIZE), flags=mmap.MAP_PRIVATE)

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
            if view is not None:
                view.release()
            if buf is not None:
                self._buffers.append(buf)
            self._slots.release()


def _aligned_view(data: Buffer) -> memoryview | None:
    """A view of ``data`` when it starts on a page boundary in writable memory (a chunk
    payload in its pooled frame buffer), else None (it must be copied to be aligned)."""
    if not isinstance(data, memoryview) or data.readonly or not data.c_contiguous:
        return None
    view = data.cast("B")
    if not len(view):
        return None
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    return view if address % mmap.PAGESIZE == 0 else None
