"""A cycle sent while it is captured.

The capture writes a cycle's records into the pending log's file in a worker thread
(:meth:`PendingLog.append_cycle`); at the same time the session streams the records
already written to the recovery server as the cycle's delta batch, reading them from the
same file through a memory map. Its BatchEnd goes only once the capture is over: the
cycle durable in the log (synced, renamed, directory synced) and the digest maps and the
state that describe it saved. The recovery server applies nothing before the BatchEnd
(REP-17), so an acknowledged batch is, as before, a cycle the pending log held whole:
the crash argument of the pending log is unchanged (``docs/storage.md``, *a cycle sent
while it is captured*). A capture that fails ends the stream without a BatchEnd; the
session closes its connection and the recovery server drops what it got.

What it saves: the send no longer waits for the capture (bench/delta.py's phases).

Threads: :meth:`begin` and :meth:`record` are called from the capture's worker thread;
everything else from Trio. The thread never waits for the session: a capture's window
(the disks held still) must not depend on the network.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import trio

from .client import BatchChunk
from .pending_log import CyclePlan


class CaptureFailed(Exception):
    """The capture of the cycle being sent failed: the batch is not ended (the session
    closes its connection; the capture's own error says why)."""


class LiveCycle:
    """One cycle between its capture (the writer) and its send (the reader).

    Created in Trio (it keeps the run's token, to wake the reader from the thread);
    :meth:`close` when both are done.
    """

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._lock = threading.Lock()
        #: (disk_index, offset, position of the data in the file, length, digest)
        self._records: list[tuple[int, int, int, int, bytes]] = []
        self._over = False  # the capture ended (finished or failed)
        self._wake: trio.Event | None = None
        self._decided = trio.Event()
        self._finished = trio.Event()
        self._fd: int | None = None
        self.plan: CyclePlan | None = None
        self.error: BaseException | None = None
        #: The session had the batch acknowledged (a re-query's session sends it not again).
        self.acknowledged = False

    # -- the capture's side, in its worker thread ---------------------------------------

    def begin(self, path: Path, plan: CyclePlan) -> None:
        """The cycle's file is at ``path`` and sized: records follow."""
        # Open now, under the name it has until the capture renames it.
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.plan = plan
        self._token.run_sync_soon(self._decided.set)

    def record(
        self, disk_index: int, offset: int, position: int, length: int, digest: bytes
    ) -> None:
        """A record's data is written at ``position`` of the file."""
        with self._lock:
            self._records.append((disk_index, offset, position, length, digest))
            wake, self._wake = self._wake, None
        if wake is not None:
            self._token.run_sync_soon(wake.set)

    # -- the capture's side, in Trio ------------------------------------------------------

    def finish(self) -> None:
        """The capture is over: the cycle is durable in the log and its digest maps
        saved, or there is no cycle (nothing changed, or the pending log refused it)."""
        self._end(None)

    def fail(self, error: BaseException) -> None:
        """The capture failed: nothing of the cycle was kept."""
        self._end(error)

    def _end(self, error: BaseException | None) -> None:
        with self._lock:
            if self._over:
                return
            self._over = True
            self.error = error
            wake, self._wake = self._wake, None
        if wake is not None:
            wake.set()
        self._decided.set()
        self._finished.set()

    # -- the session's side -------------------------------------------------------------------

    async def decided(self) -> CyclePlan | None:
        """The batch this cycle will be, once the capture knows; None: no cycle to send
        (nothing changed, the log refused it, or the capture failed before writing)."""
        await self._decided.wait()
        return self.plan

    async def chunks(
        self, fault: Callable[[bytes], bytes] | None = None
    ) -> AsyncIterator[BatchChunk]:
        """The cycle's chunks as the capture writes them (views valid until the next),
        each from the file; raises :class:`CaptureFailed` if the capture fails first."""
        plan, fd = self.plan, self._fd
        assert plan is not None, "chunks() before the capture began"
        assert fd is not None, "chunks() after close()"
        mapped = mmap.mmap(fd, plan.file_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        whole = memoryview(mapped)
        try:
            sent = 0
            while sent < plan.chunk_count:
                with self._lock:
                    ready = self._records[sent:]
                    over, error = self._over, self.error
                    wait = None
                    if not ready and not over:
                        wait = self._wake = trio.Event()
                if wait is not None:
                    await wait.wait()
                    continue
                if not ready:
                    raise CaptureFailed(
                        f"the capture of cycle {plan.sequence} ended after {sent} of "
                        f"{plan.chunk_count} chunks: {error or 'no error said'}"
                    )
                for disk_index, offset, position, length, digest in ready:
                    data = whole[position : position + length]
                    sent_data = data if fault is None else fault(bytes(data))
                    try:
                        yield disk_index, offset, sent_data, digest
                    finally:
                        with contextlib.suppress(BufferError):
                            data.release()
                sent += len(ready)
        finally:
            with contextlib.suppress(BufferError):
                whole.release()
            with contextlib.suppress(BufferError):  # a view kept: the collector unmaps
                mapped.close()

    async def finished(self) -> None:
        """Wait until the capture is over: the cycle durable and described; raises
        :class:`CaptureFailed` if it failed."""
        await self._finished.wait()
        if self.error is not None:
            raise CaptureFailed(f"the capture of the cycle failed: {self.error}") from self.error

    def close(self) -> None:
        """Release the file (the capture and every reader are done)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
