"""Journal and undo files: one framed, checksummed, append-only file per delta batch.

Both kinds of file share one format (all integers unsigned, big-endian):

File header, 40 bytes (:data:`FILE_HEADER`)::

    magic          4s   b"FRJ1" (redo journal) or b"FRU1" (undo data)
    version        u16  1
    reserved       u16  0
    sequence       u64  the batch's sequence number
    base_sequence  u64  the sequence the batch applies on top of
    captured_at_ms u64  when the primary captured the batch (ms since the epoch)
    checksum       u64  XXH3-64 of the 32 bytes above

Then records, each a 24-byte header (:data:`RECORD`) and, for DATA records, ``length``
bytes of payload::

    kind        u8   1 DATA, 2 ZERO (a zero range, no payload), 3 END
    reserved    u8   0
    disk_index  u16
    length      u32  bytes of the range (DATA: also the payload size; END: 0)
    offset      u64  byte offset in the disk (END: the number of records before it)
    checksum    u64  XXH3-64 over the first 16 header bytes and the payload, seeded
                     with the previous record's checksum (the first record: the file
                     header's checksum)

The chained checksum makes each record depend on every record before it, so a record
that is torn, reordered, left over from another file or missing is detected. A file is
*complete* only when its END record is present, its count matches and every checksum
before it verifies: in a redo journal, END is the commit record; in an undo file it
marks the undo data as complete. Anything else (a torn tail, a short file, a bad
checksum) reads as incomplete, which for a journal means "not committed".
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NamedTuple

import xxhash

import frproto

from .fileio import Buffer, FileIO

FILE_HEADER: Final = struct.Struct(">4sHHQQQQ")
RECORD: Final = struct.Struct(">BBHIQQ")
#: A record header's first 16 bytes (what its checksum covers, with the payload).
_RECORD_FIELDS: Final = struct.Struct(">BBHIQ")
JOURNAL_MAGIC: Final = b"FRJ1"
UNDO_MAGIC: Final = b"FRU1"
VERSION: Final = 1
KIND_DATA: Final = 1
KIND_ZERO: Final = 2
KIND_END: Final = 3
_MASK64: Final = (1 << 64) - 1
_READ_PIECE: Final = 1 << 22
#: Parts per ``writev`` of a buffered writer (Linux's IOV_MAX is 1024).
_MAX_PARTS: Final = 1000
#: Appended bytes after which their write-back to disk is started (see FileIO.start_writeback).
WRITEBACK_BYTES: Final = 8 * 1024 * 1024


class Record(NamedTuple):
    """One range of a journal or undo file; ``data_pos`` is where its payload starts in
    the file (meaningless for ZERO records)."""

    kind: int
    disk_index: int
    offset: int
    length: int
    data_pos: int


@dataclass(slots=True)
class FileContents:
    """What :func:`read_file` found in a journal or undo file."""

    magic: bytes
    sequence: int
    base_sequence: int
    captured_at_ms: int
    records: list[Record] = field(default_factory=list)
    complete: bool = False
    problem: str = ""


def _header_bytes(magic: bytes, sequence: int, base_sequence: int, captured_at_ms: int) -> bytes:
    prefix = FILE_HEADER.pack(magic, VERSION, 0, sequence, base_sequence, captured_at_ms, 0)[:32]
    return prefix + xxhash.xxh3_64_intdigest(prefix).to_bytes(8, "big")


class FileWriter:
    """Appends records to a journal or undo file, through :class:`FileIO`.

    Raises ``OSError`` (the caller maps it). The descriptor stays open until
    :meth:`close`; :meth:`sync` makes everything appended so far durable.

    ``reuse=True`` writes over an existing file (a spare journal or undo file renamed to
    ``path``) instead of creating a new one: overwriting blocks that are already
    allocated avoids the file system's block allocation, which costs several times the
    write itself, and the file is not truncated, which would free those blocks. Whatever
    the old file held past the new records is never taken for records: the new header's
    checksum differs (it covers the sequence), so no old record continues the new chain.

    ``buffered=True`` queues records and writes them with one ``writev`` per
    :data:`_MAX_PARTS` parts, at :meth:`flush`, :meth:`end` or :meth:`sync`: the caller
    promises not to change a payload buffer until then (the undo capture reads into a
    large buffer and flushes before reusing it). Without it every record is written at
    once, so the caller may reuse its buffer as soon as :meth:`add_data` returns.
    """

    __slots__ = (
        "_buffered",
        "_chain",
        "_pending",
        "_pos",
        "_written_back",
        "fd",
        "io",
        "path",
        "records",
    )

    def __init__(
        self,
        io: FileIO,
        path: Path,
        magic: bytes,
        sequence: int,
        base_sequence: int,
        captured_at_ms: int,
        *,
        reuse: bool = False,
        buffered: bool = False,
    ) -> None:
        self.io = io
        self.path = path
        self.records: list[Record] = []
        self._buffered = buffered
        self._pending: list[Buffer] = []
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        if not reuse:
            flags |= os.O_CREAT | os.O_TRUNC
        self.fd = io.open(path, flags, 0o600)
        try:
            header = _header_bytes(magic, sequence, base_sequence, captured_at_ms)
            io.writev(self.fd, [header], path)
        except BaseException:
            os.close(self.fd)
            raise
        self._chain = int.from_bytes(header[32:], "big")
        self._pos = len(header)
        self._written_back = 0  # where the last start_writeback ended

    def _append(
        self, kind: int, disk_index: int, offset: int, length: int, data: Buffer | None
    ) -> None:
        head = _RECORD_FIELDS.pack(kind, 0, disk_index, length, offset)
        h = xxhash.xxh3_64(head, seed=self._chain)
        if data is not None:
            h.update(data)
        checksum = h.intdigest()
        header = head + checksum.to_bytes(8, "big")
        if self._buffered:
            self._pending.append(header)
            if data is not None:
                self._pending.append(data)
            if len(self._pending) >= _MAX_PARTS:
                self.flush()
        else:
            self.io.writev(self.fd, [header] if data is None else [header, data], self.path)
        self._chain = checksum
        if kind != KIND_END:
            self.records.append(Record(kind, disk_index, offset, length, self._pos + RECORD.size))
        self._pos += RECORD.size + (len(data) if data is not None else 0)
        if not self._buffered and self._pos - self._written_back >= WRITEBACK_BYTES:
            self._start_writeback()

    def _start_writeback(self) -> None:
        # The data goes to disk while the rest is appended: the sync has less to wait for.
        self.io.start_writeback(
            self.fd, self._written_back, self._pos - self._written_back, self.path
        )
        self._written_back = self._pos

    def flush(self) -> None:
        """Write the queued records (``buffered=True``); the caller may then reuse its
        buffers."""
        if self._pending:
            parts, self._pending = self._pending, []
            self.io.writev(self.fd, parts, self.path)
            if self._pos - self._written_back >= WRITEBACK_BYTES:
                self._start_writeback()

    def add_data(self, disk_index: int, offset: int, data: Buffer) -> None:
        self._append(KIND_DATA, disk_index, offset, len(data), data)

    def add_zero(self, disk_index: int, offset: int, length: int) -> None:
        self._append(KIND_ZERO, disk_index, offset, length, None)

    def end(self) -> None:
        """Append the END record (the commit record of a journal)."""
        self._append(KIND_END, 0, len(self.records), 0, None)
        self.flush()

    @property
    def size(self) -> int:
        """Bytes of header and records appended so far."""
        return self._pos

    def sync(self) -> None:
        # fdatasync: the records are data; it still writes the size and the block
        # allocation when the file grew, which is all a reader needs.
        self.flush()
        self.io.fdatasync(self.fd, self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_undo(path: Path) -> list[Record]:
    """The records of a complete undo file.

    Raises:
        frproto.InternalError: the file is damaged (torn, or a checksum fails).
    """
    contents = read_file(path, expect_magic=UNDO_MAGIC)
    if not contents.complete:
        raise frproto.InternalError(f"undo file {path} is damaged: {contents.problem}")
    return contents.records


def read_file(path: Path, *, expect_magic: bytes) -> FileContents:
    """Read and verify a journal or undo file. Raises ``OSError`` if it cannot be read;
    damage is reported as ``complete=False`` with ``problem`` set."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return _read_fd(fd, expect_magic)
    finally:
        os.close(fd)


def _read_fd(fd: int, expect_magic: bytes) -> FileContents:
    raw = os.pread(fd, FILE_HEADER.size, 0)
    if len(raw) < FILE_HEADER.size:
        return FileContents(b"", 0, 0, 0, problem="short file header")
    magic, version, _res, seq, base, captured, checksum = FILE_HEADER.unpack(raw)
    out = FileContents(magic, seq, base, captured)
    if magic != expect_magic or version != VERSION:
        out.problem = f"bad magic/version {magic!r}/{version}"
        return out
    if xxhash.xxh3_64_intdigest(raw[:32]) != checksum:
        out.problem = "file header checksum mismatch"
        return out
    chain = checksum
    pos = FILE_HEADER.size
    size = os.fstat(fd).st_size
    while True:
        head = os.pread(fd, RECORD.size, pos)
        if len(head) < RECORD.size:
            out.problem = f"torn record header at {pos}" if head else "no END record"
            return out
        kind, _r, disk_index, length, offset, checksum = RECORD.unpack(head)
        h = xxhash.xxh3_64(head[:16], seed=chain)
        payload = length if kind == KIND_DATA else 0
        data_pos = pos + RECORD.size
        if kind not in (KIND_DATA, KIND_ZERO, KIND_END) or data_pos + payload > size:
            out.problem = f"torn or unknown record at {pos}"
            return out
        done = 0
        while done < payload:
            piece = os.pread(fd, min(payload - done, _READ_PIECE), data_pos + done)
            if not piece:
                out.problem = f"short payload at {pos}"
                return out
            h.update(piece)
            done += len(piece)
        if h.intdigest() != checksum:
            out.problem = f"checksum mismatch at {pos}"
            return out
        chain = checksum
        if kind == KIND_END:
            if offset != len(out.records):
                out.problem = f"END record counts {offset} records, found {len(out.records)}"
                return out
            out.complete = True
            return out
        out.records.append(Record(kind, disk_index, offset, length, data_pos))
        pos = data_pos + payload
