"""One disk of a QEMU point in time, read over NBD with libnbd (Debian ``python3-libnbd``).

libnbd is a maintained client of the whole protocol, block status and meta contexts
included: nothing here speaks NBD by hand. A handle is thread-safe; reads of up to
:data:`MAX_REQUEST` bytes go in one request.

* :meth:`NbdDiskView.pread` reads only what ``base:allocation`` says holds data:
  unallocated and zero extents come back as zeros without being read, so zero space
  never travels (the IR then sends them as ZERO chunks).
* :meth:`NbdDiskView.dirty_blocks` reads the frozen dirty bitmap
  (``qemu:dirty-bitmap:NAME``) as block status, turned into the replication's blocks.
"""

from __future__ import annotations

import bisect
import contextlib
from typing import Any, Final

from ..disks import DiskUnavailable

try:
    import nbd  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - said when a QEMU VM is replicated
    nbd = None

#: One NBD request's largest payload (QEMU's server takes 32 MiB).
MAX_REQUEST: Final = 32 * 1024 * 1024
#: Largest range one block-status request asks about.
_STATUS_SPAN: Final = 1 << 30
_ALLOCATION: Final = "base:allocation"
#: base:allocation's flag of a range that reads as zeros (NBD_STATE_ZERO).
_STATE_ZERO: Final = 2
#: A dirty bitmap context's flag of a dirty range.
_DIRTY: Final = 1


def require_libnbd() -> Any:
    """The ``nbd`` module, or an error naming the package that brings it."""
    if nbd is None:
        raise DiskUnavailable(
            "replicating a QEMU VM needs libnbd's Python binding: install Debian's "
            "python3-libnbd (scripts/bootstrap links it into the virtualenv)"
        )
    return nbd


def dirty_context(bitmap: str) -> str:
    """The NBD meta context of QEMU's dirty bitmap ``bitmap``."""
    return f"qemu:dirty-bitmap:{bitmap}"


class NbdDiskView:
    """A read-only NBD export of one disk (an :class:`~node.primary.image_view.ImageView`).

    Args:
        socket_path: the NBD server's UNIX socket.
        export: the export's name.
        bitmap: the dirty bitmap exported with it, if any.
    """

    def __init__(self, socket_path: str, export: str, bitmap: str | None = None) -> None:
        lib = self._lib = require_libnbd()
        self.export, self.bitmap = export, bitmap
        self._h = lib.NBD()
        self._h.add_meta_context(_ALLOCATION)
        if bitmap is not None:
            self._h.add_meta_context(dirty_context(bitmap))
        self._h.set_export_name(export)
        try:
            self._h.connect_unix(socket_path)
        except lib.Error as exc:
            raise DiskUnavailable(f"the NBD export {export} at {socket_path}: {exc}") from None
        self._size: int = self._h.get_size()
        #: Bytes read from the export so far (zero extents are never read).
        self.bytes_read = 0
        #: (start, end) of every range base:allocation says reads as zeros.
        self._zero_starts: list[int] = []
        self._zero_ends: list[int] = []
        for offset, length, flags in self.extents(_ALLOCATION):
            if flags & _STATE_ZERO:
                if self._zero_ends and self._zero_ends[-1] == offset:
                    self._zero_ends[-1] = offset + length
                else:
                    self._zero_starts.append(offset)
                    self._zero_ends.append(offset + length)

    @property
    def size(self) -> int:
        """The disk's size (virtual size for qcow2)."""
        return self._size

    def allocated_bytes(self) -> int:
        """Bytes of the disk that hold data (not zero or unallocated)."""
        zero = sum(e - s for s, e in zip(self._zero_starts, self._zero_ends, strict=True))
        return self._size - zero

    def extents(self, context: str) -> list[tuple[int, int, int]]:
        """``(offset, length, flags)`` of the whole disk in meta context ``context``."""
        found: list[tuple[int, int, int]] = []
        offset = 0
        while offset < self._size:
            span = min(_STATUS_SPAN, self._size - offset)
            got: list[tuple[int, int, int]] = []

            def on_status(
                meta: str, start: int, entries: list[int], _err: Any, got: Any = got
            ) -> int:
                if meta == context:
                    at = start
                    for i in range(0, len(entries) - 1, 2):
                        got.append((at, entries[i], entries[i + 1]))
                        at += entries[i]
                return 0

            try:
                self._h.block_status(span, offset, on_status)
            except self._lib.Error as exc:
                raise DiskUnavailable(f"the NBD export {self.export}: {exc}") from None
            if not got:
                raise DiskUnavailable(f"the NBD export {self.export} gave no {context} status")
            for start, length, flags in got:
                if (cut := min(length, self._size - start)) > 0:
                    found.append((start, cut, flags))
            offset = got[-1][0] + got[-1][1]
        return found

    def dirty_blocks(self, block_size: int) -> list[int]:
        """The blocks of ``block_size`` the exported dirty bitmap marks, ascending."""
        if self.bitmap is None:
            raise ValueError("this export has no dirty bitmap")
        blocks: list[int] = []
        for offset, length, flags in self.extents(dirty_context(self.bitmap)):
            if flags & _DIRTY:
                first, end = offset // block_size, -(-(offset + length) // block_size)
                if blocks and blocks[-1] >= first:
                    first = blocks[-1] + 1
                blocks.extend(range(first, end))
        return blocks

    def pread(self, length: int, offset: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer at the end); zero extents unread."""
        length = max(0, min(length, self._size - offset))
        out = bytearray(length)
        at, end = offset, offset + length
        index = bisect.bisect_right(self._zero_ends, at)
        while at < end:
            if index < len(self._zero_starts) and self._zero_starts[index] <= at:
                at = min(end, self._zero_ends[index])  # zeros: already in ``out``
                index += 1
                continue
            stop = end if index >= len(self._zero_starts) else min(end, self._zero_starts[index])
            while at < stop:
                n = min(MAX_REQUEST, stop - at)
                try:
                    out[at - offset : at - offset + n] = self._h.pread(n, at)
                except self._lib.Error as exc:
                    raise DiskUnavailable(f"the NBD export {self.export}: {exc}") from None
                self.bytes_read += n
                at += n
        return bytes(out)

    def close(self) -> None:
        """Disconnect (the export may be deleted afterwards)."""
        with contextlib.suppress(Exception):  # the server may be gone already
            self._h.shutdown()
