"""Reading the images ahead of an IR's send: the read overlaps the encryption.

An IR sends every byte of the disks. Read, digested and sent from the one Trio thread,
each chunk waited for its read (a copy out of the page cache or the disk) and its
digests before TLS could encrypt it. :class:`IRReadAhead` reads :data:`READ_SIZE` bytes
at a time in a worker thread (``preadv`` and XXH3 release the GIL), digests each chunk
there (its XXH3-128, which the chunk header carries, and the caller's ``on_block`` for the
digest map), and keeps up to :data:`READS_AHEAD` reads ready, so the Trio thread only
frames, encrypts and sends.

The images must not change while it runs (a paused VM or a snapshot), as for any IR.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio
import xxhash

from .disks import DiskResized

#: Bytes per read: several chunks, so that a thread hand-off is paid per read, not per chunk.
READ_SIZE: Final = 4 * 1024 * 1024
#: Reads kept ready ahead of the send (buffers in use: this plus the one being sent).
READS_AHEAD: Final = 2

#: ``on_block(disk_index, offset, data)``: sees every chunk read (called in a worker thread).
OnBlock = Callable[[int, int, memoryview], None]


@dataclass(frozen=True)
class IRPiece:
    """One chunk to send: where it goes, its bytes (a view of a read buffer, valid until
    the buffer is given back) and its XXH3-128."""

    disk_index: int
    offset: int
    data: memoryview
    digest: bytes


@dataclass
class _Read:
    buffer: bytearray
    pieces: list[IRPiece]


class IRReadAhead:
    """Reads images from ``start`` to their ends in ``chunk``-byte chunks, ahead of use.

    Run :meth:`run` in a nursery and take reads from :attr:`reads` (a channel, closed at
    the end); give each buffer back with :meth:`release` once its pieces are sent. A
    failed read (:class:`~node.primary.disks.DiskResized`, an OSError) closes the channel
    early and is kept in :attr:`error` for the consumer to raise.
    """

    def __init__(
        self,
        images: Sequence[Path],
        sizes: Sequence[int],
        start: tuple[int, int],
        *,
        chunk: int,
        on_block: OnBlock | None = None,
        read_size: int = READ_SIZE,
        ahead: int = READS_AHEAD,
    ) -> None:
        self.images = images
        self.sizes = sizes
        self.start = start
        self.chunk = chunk
        self.on_block = on_block
        self.read_size = max(1, read_size // chunk) * chunk
        self.error: Exception | None = None
        self._send, self.reads = trio.open_memory_channel[_Read](ahead)
        self._free_send, self._free = trio.open_memory_channel[bytearray](ahead + 1)
        for _ in range(ahead + 1):
            self._free_send.send_nowait(bytearray(self.read_size))

    def release(self, read: _Read) -> None:
        """Give a read's buffer back (its pieces are sent: nothing refers to them)."""
        read.pieces.clear()
        self._free_send.send_nowait(read.buffer)

    async def run(self) -> None:
        """Read every image from the start; the channel closes at the end (or failure)."""
        async with self._send:
            try:
                for disk_index, path in enumerate(self.images):
                    if disk_index < self.start[0]:
                        continue
                    offset = self.start[1] if disk_index == self.start[0] else 0
                    await self._read_disk(disk_index, path, offset)
            except Exception as exc:
                self.error = exc

    async def _read_disk(self, disk_index: int, path: Path, offset: int) -> None:
        size = self.sizes[disk_index]
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, offset, size - offset, os.POSIX_FADV_SEQUENTIAL)
            while offset < size:
                buffer = await self._free.receive()
                want = min(len(buffer), size - offset)
                pieces = await trio.to_thread.run_sync(
                    self._read_and_digest, fd, path, disk_index, offset, buffer, want
                )
                await self._send.send(_Read(buffer, pieces))
                offset += want
        finally:
            os.close(fd)

    def _read_and_digest(
        self, fd: int, path: Path, disk_index: int, offset: int, buffer: bytearray, want: int
    ) -> list[IRPiece]:
        # In a worker thread.
        view = memoryview(buffer)[:want]
        done = 0
        while done < want:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise DiskResized(
                    f"{path} ends at {offset + done}, before its disk's "
                    f"{self.sizes[disk_index]} bytes: it shrank during the IR"
                )
            done += n
        pieces = []
        digest = xxhash.xxh3_128_digest
        for at in range(0, want, self.chunk):
            data = view[at : at + self.chunk]
            if self.on_block is not None:
                self.on_block(disk_index, offset + at, data)
            pieces.append(IRPiece(disk_index, offset + at, data, digest(data)))
        return pieces
