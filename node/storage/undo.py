"""Where undo data is captured before a batch touches the images, and used afterwards.

``undo/<seq>.undo`` holds what batch ``seq`` overwrote, read from the images after the
batch's journal is committed and before its first image write (step 3 of the commit in
:mod:`node.storage.batch`). It is then used three ways:

* reading an old recovery point: laid over the current bytes, newest batch first
  (:meth:`UndoFiles.lay_over`, the rule is :func:`node.storage.points.overlay`);
* a failed apply: written back over the half-applied images (the commit's roll back);
* a failover to an older point: written back for every newer batch (:meth:`UndoFiles.revert`).

The records of each undo file are read once and kept in memory: an undo file never
changes while its point is kept. Files no kept point needs go to ``spare/``
(:mod:`node.storage.spares`).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import frproto

from . import layout as lay
from .fileio import FileIO, mapped, open_flags
from .images import WINDOW, ImageSet
from .journal import FILE_HEADER, KIND_DATA, RECORD, UNDO_MAGIC, FileWriter, Record, read_undo
from .points import overlay
from .spares import SpareFiles

_ZEROS: list[bytes] = [bytes(1 << 16)]


def _zeros(n: int) -> memoryview:
    """A view of ``n`` zero bytes (``bytearray.startswith`` of it is a fast memcmp)."""
    if len(_ZEROS[0]) < n:
        _ZEROS[0] = bytes(n)
    return memoryview(_ZEROS[0])[:n]


class UndoFiles:
    """One replica's ``undo/`` directory and the records of its files. Not thread-safe:
    the replica's lock is held around every call."""

    __slots__ = ("_images", "_index", "_io", "_lay", "_spares")

    def __init__(
        self, io: FileIO, lo: lay.ReplicaLayout, images: ImageSet, spares: SpareFiles
    ) -> None:
        self._io = io
        self._lay = lo
        self._images = images
        self._spares = spares
        self._index: dict[int, list[Record]] = {}

    # -- the records of each file ---------------------------------------------------------
    def known(self, seq: int) -> list[Record]:
        """Batch ``seq``'s undo records as captured or read here (``KeyError`` if not)."""
        return self._index[seq]

    def records(self, seq: int, path: Path) -> list[Record]:
        """Batch ``seq``'s undo records, read from ``path`` if not known yet."""
        return self._records(seq, path)

    def remember(self, seq: int, records: list[Record]) -> None:
        self._index[seq] = records

    def forget(self, seq: int) -> None:
        self._index.pop(seq, None)

    def _records(self, seq: int, path: Path) -> list[Record]:
        """Batch ``seq``'s undo records (read once: an undo file never changes while its
        point is kept)."""
        records = self._index.get(seq)
        if records is None:
            records = self._index[seq] = read_undo(path)
        return records

    # -- capture --------------------------------------------------------------------------
    def capture(self, sequence: int, base: int, captured: int, records: list[Record]) -> None:
        """Capture what ``records`` will overwrite into ``undo/<sequence>.undo`` (durable,
        with its END record). The images must not have been touched by the batch."""
        path = self._lay.checked(self._lay.undo(sequence))
        need = sum(RECORD.size + r.length for r in records) + 2 * RECORD.size
        with mapped("write undo", path):
            reuse = self._spares.take(path, FILE_HEADER.size + need)
            # buffered: the ranges are read into one large window and written with one
            # writev per window instead of two small writes per range.
            undo = FileWriter(
                self._io, path, UNDO_MAGIC, sequence, base, captured, reuse=reuse, buffered=True
            )
            try:
                # Allocating the file in one go is several times faster than growing it
                # write by write; the zeros past the END record are never read. (On a
                # reused spare that is already big enough this allocates nothing.)
                self._io.reserve(undo.fd, 0, FILE_HEADER.size + need, path)
                self._read_ranges(undo, records)
                undo.end()
                undo.sync()
            finally:
                undo.close()
            self._io.fsync_dir(path.parent)
        self._index[sequence] = undo.records

    def _read_ranges(self, undo: FileWriter, records: list[Record]) -> None:
        """Append what the images hold now under each of ``records`` to ``undo`` (holes
        and all-zero ranges as ZERO records). Raises ``OSError``."""
        images = self._images
        window = bytearray(min(WINDOW, max((r.length for r in records), default=0)))
        fill = 0
        for rec in records:
            if images.is_hole(rec.disk_index, rec.offset, rec.length):
                undo.add_zero(rec.disk_index, rec.offset, rec.length)
                continue
            if fill + rec.length > len(window):
                undo.flush()  # the queued records point into the window
                fill = 0
            buf, start = window, fill
            if rec.length > len(buf):
                buf, start = bytearray(rec.length), 0  # a range above WINDOW
            else:
                fill += rec.length
            view = memoryview(buf)[start : start + rec.length]
            got = images.read_into(rec.disk_index, view, rec.offset)
            if got != rec.length:
                path_ = images.path(rec.disk_index)
                raise OSError(errno.EIO, "short read of image", str(path_))
            if buf.startswith(_zeros(rec.length), start):
                undo.add_zero(rec.disk_index, rec.offset, rec.length)
            else:
                undo.add_data(rec.disk_index, rec.offset, view)
            if buf is not window:
                undo.flush()

    # -- use ------------------------------------------------------------------------------
    def lay_over(self, seq: int, buf: bytearray, disk_index: int, offset: int) -> None:
        """Lay batch ``seq``'s undo data for ``[offset, offset + len(buf))`` of disk
        ``disk_index`` over ``buf``."""
        path = self._lay.checked(self._lay.undo(seq))
        with mapped("read undo", path):
            records = self._records(seq, path)
            fd = os.open(path, open_flags(write=False))
            try:
                overlay(buf, disk_index, offset, records, fd)
            finally:
                os.close(fd)

    def revert(self, seq: int, path: Path | None = None) -> None:
        """Write back what batch ``seq`` overwrote (its undo data) into the images; from
        ``path`` when given (an undo file a failover set aside), else ``undo/<seq>``."""
        path = self._lay.checked(self._lay.undo(seq) if path is None else path)
        with mapped("read undo", path):
            records = self._records(seq, path)
        self.write_back(path, records)

    def capture_file(self, path: Path, records: list[Record]) -> None:
        """Write what the images hold now under ``records`` into a new undo-format file
        ``path`` (durable, with its END record; the directory is not synced). A
        failover keeps the newest point's bytes so that it can be cancelled."""
        with mapped("write redo", path):
            out = FileWriter(self._io, path, UNDO_MAGIC, 0, 0, 0, buffered=True)
            try:
                self._read_ranges(out, records)
                out.end()
                out.sync()
            finally:
                out.close()

    def write_back(self, path: Path, records: list[Record]) -> None:
        """Write the data of ``records`` (of the undo-format file ``path``) into the
        images. Idempotent; not synced."""
        path = self._lay.checked(path)
        with mapped("read undo", path):
            fd = os.open(path, open_flags(write=False))
        try:
            for rec in records:
                with mapped("revert image", self._images.path(rec.disk_index)):
                    if rec.kind == KIND_DATA:
                        data = os.pread(fd, rec.length, rec.data_pos)
                        if len(data) != rec.length:
                            raise frproto.InternalError(f"short read of {path}")
                        self._images.pwrite(rec.disk_index, data, rec.offset)
                    else:
                        self._images.write_zeros(rec.disk_index, rec.offset, rec.length)
        finally:
            os.close(fd)

    def drop(self, sequences: set[int]) -> None:
        """Let the undo files of ``sequences`` go (to ``spare/``, or unlinked)."""
        for seq in sequences:
            self._index.pop(seq, None)
            path = self._lay.undo(seq)
            with mapped("remove undo", path):
                self._spares.recycle(path)
