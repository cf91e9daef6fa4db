"""Where a replica's disk images are opened, written, synced and read: the image set.

One :class:`ImageSet` per replica holds a descriptor per image (opened once, checked to
be exactly the disk's size) and, for IR chunks, a second ``O_DIRECT`` descriptor opened on
first use. Everything else in the engine names an image by its disk index and goes
through here; every call that changes an image still goes through the replica's
:class:`~node.storage.fileio.FileIO` (``pwrite``, ``write_zeros``, ``copy_range``,
``reserve``, ``fdatasync``), so the fault hooks and crash points see the same system calls
they always did. The caller wraps a call in :func:`~node.storage.fileio.mapped` with the
operation it is part of ("apply to image", "revert image", ...), so an error names that.

Reads take no part in durability and use ``os.preadv`` directly; :meth:`ImageSet.digests`
skips holes (``SEEK_DATA``) instead of hashing zeros it would read from them.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

import frproto

from .fileio import Buffer, FileIO, mapped, open_flags, os_error

#: Offset and length multiple for an O_DIRECT IR write (the page size covers every
#: logical block size in use); other chunks go through the page cache.
DIRECT_ALIGN: Final = 4096
#: Read/write window of the undo capture and of applying a journal.
WINDOW: Final = 8 << 20
_O_DIRECT: Final = getattr(os, "O_DIRECT", 0)
_SEEK_DATA: Final = getattr(os, "SEEK_DATA", 3)
_SEEK_HOLE: Final = getattr(os, "SEEK_HOLE", 4)
#: Largest read of :meth:`Images.digests`: a run of data blocks is read in pieces of up
#: to this size and digested block by block (one read per 64 KiB block made the
#: replica's digest map, which a resynchronization waits for, slower than the primary's).
DIGEST_READ: Final = 4 << 20


class ImageSet:
    """The open images of one replica, by disk index. Not thread-safe: the replica's
    lock is held around every call."""

    def __init__(self, io: FileIO, paths: Sequence[Path], sizes: Sequence[int]) -> None:
        """Open every image (``frproto.InternalError`` if one is not exactly its size);
        on failure, nothing stays open."""
        self._io = io
        self._paths = tuple(paths)
        self._sizes = tuple(sizes)
        self._fds: list[int] = []
        self._direct_fds: dict[int, int] = {}
        self._direct_ok = True
        self._direct_used = False
        try:
            for path, want in zip(self._paths, self._sizes, strict=True):
                with mapped("open image", path):
                    self._fds.append(io.open(path, open_flags(write=True)))
                with mapped("stat image", path):
                    size = os.fstat(self._fds[-1]).st_size
                if size != want:
                    raise frproto.InternalError(f"image {path} is {size} bytes, want {want}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in [*self._fds, *self._direct_fds.values()]:
            os.close(fd)
        self._fds = []
        self._direct_fds = {}

    def close_direct(self) -> None:
        """Close the ``O_DIRECT`` descriptors (only IR chunks use them): a node holds
        every replica open, and a second descriptor per image for the replica's life
        would halve how many replicas fit under the process's descriptor limit."""
        for fd in self._direct_fds.values():
            os.close(fd)
        self._direct_fds = {}

    @property
    def count(self) -> int:
        return len(self._paths)

    @property
    def direct_io(self) -> bool | None:
        """Whether IR chunks went through ``O_DIRECT``: True once a descriptor is open,
        False where the file system refused it, None before any aligned chunk."""
        if self._direct_used:
            return True
        return None if self._direct_ok else False

    def path(self, disk_index: int) -> Path:
        return self._paths[disk_index]

    def size(self, disk_index: int) -> int:
        return self._sizes[disk_index]

    def check_range(self, disk_index: int, offset: int, length: int) -> None:
        """``frproto.ChunkOutOfRange`` unless the range lies inside the disk."""
        sizes = self._sizes
        if not 0 <= disk_index < len(sizes):
            raise frproto.ChunkOutOfRange(f"disk index {disk_index} of {len(sizes)} disks")
        if offset < 0 or length < 0 or offset + length > sizes[disk_index]:
            raise frproto.ChunkOutOfRange(
                f"range {offset}+{length} outside disk {disk_index} ({sizes[disk_index]} bytes)"
            )

    # -- writes (raise OSError: the caller maps it) -----------------------------------------
    def pwrite(self, disk_index: int, data: Buffer, offset: int, *, direct: bool = False) -> None:
        """Write ``data`` at ``offset``; ``direct=True`` through the ``O_DIRECT`` descriptor
        where the file system has one (``data`` must then lie in page-aligned memory)."""
        fd = self._fds[disk_index]
        if direct:
            fd = self._direct_fd(disk_index) or fd
        self._io.pwrite(fd, data, offset, self._paths[disk_index])

    def write_zeros(self, disk_index: int, offset: int, length: int) -> None:
        self._io.write_zeros(self._fds[disk_index], offset, length, self._paths[disk_index])

    def copy_range(
        self, src_fd: int, src_offset: int, disk_index: int, offset: int, length: int
    ) -> None:
        fd = self._fds[disk_index]
        self._io.copy_range(src_fd, src_offset, fd, offset, length, self._paths[disk_index])

    def reserve(self, disk_index: int, offset: int, length: int) -> None:
        self._io.reserve(self._fds[disk_index], offset, length, self._paths[disk_index])

    def sync(self, indices: Iterable[int]) -> None:
        """Make the images ``indices`` durable (maps errors itself)."""
        # fdatasync, not fsync: an image never changes size after create, so the only
        # metadata fsync adds is the modification time, which nothing relies on; the
        # block allocation of newly written ranges is still made durable.
        for i in sorted(indices):
            with mapped("fsync image", self._paths[i]):
                self._io.fdatasync(self._fds[i], self._paths[i])

    def sync_all(self) -> None:
        self.sync(range(len(self._fds)))

    def _direct_fd(self, disk_index: int) -> int | None:
        """The image's O_DIRECT descriptor, opened on first use; None where the file system
        refuses O_DIRECT (tmpfs, some network file systems)."""
        fd = self._direct_fds.get(disk_index)
        if fd is None and self._direct_ok:
            path = self._paths[disk_index]
            try:
                fd = self._io.open(path, open_flags(write=True) | _O_DIRECT)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise os_error(exc, "open image (O_DIRECT)", path) from exc
                self._direct_ok = False
                return None
            self._direct_fds[disk_index] = fd
            self._direct_used = True
        return fd

    # -- reads --------------------------------------------------------------------------------
    def read_into(self, disk_index: int, view: memoryview | bytearray, offset: int) -> int:
        """``os.preadv`` into ``view``; the bytes read (raises ``OSError``)."""
        return os.preadv(self._fds[disk_index], [view], offset)

    def read(self, disk_index: int, offset: int, length: int) -> bytearray:
        """``length`` bytes of the image as it is now."""
        buf = bytearray(length)
        path = self._paths[disk_index]
        with mapped("read image", path):
            got = os.preadv(self._fds[disk_index], [buf], offset) if length else 0
        if got != length:
            raise frproto.InternalError(f"short read of {path} at {offset}")
        return buf

    def is_hole(self, disk_index: int, offset: int, length: int) -> bool:
        """Whether the range is certainly all hole (raises ``OSError``)."""
        return _next_data(self._fds[disk_index], offset, offset + length) >= offset + length

    def digests(self, disk_index: int, offset: int, block_size: int, count: int) -> bytes:
        """XXH3-128 of ``count`` blocks from ``offset`` (see :meth:`Replica.digests`)."""
        size = self._sizes[disk_index]
        fd = self._fds[disk_index]
        path = self._paths[disk_index]
        out = bytearray()
        per_read = max(1, DIGEST_READ // block_size) * block_size
        buf = bytearray(min(per_read, max(size - offset, 0)))
        view = memoryview(buf)
        digest = frproto.codec.chunk_digest
        next_data = data_end = -1
        pos = offset
        remaining = count
        with mapped("read image", path):
            while remaining > 0 and pos < size:
                n = min(block_size, size - pos)
                if next_data < pos:
                    next_data = _next_data(fd, pos, size)
                if next_data >= pos + n:
                    out += frproto.codec.zero_digest(n)
                    pos += n
                    remaining -= 1
                    continue
                # This block holds data: read the run of data blocks from here at once
                # (a block the hole starts inside of is read whole; holes read as zeros).
                if data_end <= pos:
                    data_end = _next_hole(fd, pos, size)
                run = -(-(max(data_end, pos + n) - pos) // block_size)
                blocks = min(remaining, run, per_read // block_size)
                length = min(blocks * block_size, size - pos)
                got = os.preadv(fd, [view[:length]], pos)
                if got != length:
                    raise OSError(errno.EIO, "short read", str(path))
                for start in range(0, length, block_size):
                    out += digest(view[start : min(start + block_size, length)])
                pos += length
                remaining -= blocks
        return bytes(out)


def _next_hole(fd: int, pos: int, size: int) -> int:
    """The first offset >= ``pos`` that is certainly a hole (``size`` if none known)."""
    try:
        return min(os.lseek(fd, pos, _SEEK_HOLE), size)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.EINVAL, errno.EOPNOTSUPP):
            return size
        raise


def _next_data(fd: int, pos: int, size: int) -> int:
    """The first offset >= ``pos`` that may hold data (``size`` if none)."""
    try:
        return os.lseek(fd, pos, _SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return size
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return pos
        raise
