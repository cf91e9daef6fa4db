"""The pending log: captured cycles the recovery server has not acknowledged yet.

Each cycle's changed blocks are copied here at capture time (a consistent point), so the
VM may run on while the cycle waits to be sent: when the recovery server is unreachable,
cycles pile up here (on disk, not in memory) until it returns. The log is bounded
(``max_bytes``); a cycle that would pass the bound is refused whole, and the log is
marked *overflowed* (persisted): the changes since the last acknowledged cycle are then
no longer all here, and replication must resynchronize (from the cycles' blocks plus a
surviving dirty bitmap, else by digests) rather than go on. Never a silent full IR,
never a gap.

Layout: one file per cycle in the log's directory, ``<sequence, 20 digits>.cycle``,
written as a temporary file, fsynced and renamed into place, so a cycle is in the log
whole or not at all; ``OVERFLOWED`` exists while the log is overflowed. Leftover
temporary files (a crash during an append) are removed on open.

Cycle file format (integers big-endian)::

    header   32 bytes
        magic           4s   b"FRPL"
        version         u16  2
        reserved        u16  0
        sequence        u64
        captured_at_ms  u64
        checksum        u64  XXH3-64 of the 24 bytes above
    records, one per chunk
        disk_index      u32
        length          u32  bytes of data
        offset          u64  byte offset in the disk
        digest          16s  XXH3-128 of the data, taken once at capture
        checksum        u64  XXH3-64 of the 32 bytes above, seeded with the previous
                             record's checksum (the first: the header's)
        data            length bytes
    trailer  40 bytes, at the end of the file
        magic           4s   b"FRPE"
        reserved        u32  0
        chunk_count     u64
        nbytes          u64  data bytes of all records
        last_checksum   u64  the last record's checksum (the header's if none)
        checksum        u64  XXH3-64 of the 32 bytes above, seeded with the header's

The chained checksums make a torn, truncated, reordered or foreign record detectable;
:meth:`PendingLog.read_cycle` raises :class:`PendingLogCorrupt` on any of them.

**Digest once** (format 2). A record carries the XXH3-128 digest the capture took of its
data (the capture needs it anyway, for the digest map); the chain covers the digest, and
the digest covers the data. Sending reads the records with :meth:`PendingLog.read_chunks`,
which checks the chain but does not digest the data again: the digest goes into the
chunk header as it is, and the recovery server's check of it is the one check of the data
(docs/protocol.md: a chunk's digest is verified by its receiver). A data byte damaged in
the log therefore shows as the server's DIGEST_MISMATCH;
:meth:`PendingLog.check_cycle` then tells it from damage in flight.
:meth:`PendingLog.read_cycle` (verification, resynchronization) digests each record.

There is no reader of format 1: no release wrote it. A format 1 file found on open reads
as not intact (:class:`PendingLogCorrupt`, hence a resynchronization, never a silent gap).
:meth:`PendingLog.extents` walks only the record headers (which blocks a cycle holds,
for a resynchronization from a surviving dirty bitmap), checking what needs no data.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import struct
import threading
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

import xxhash

from .durable import files, makedirs

_MAGIC: Final = b"FRPL"
_END_MAGIC: Final = b"FRPE"
_VERSION: Final = 2
_HEADER: Final = struct.Struct(">4sHHQQQ")
_RECORD: Final = struct.Struct(">IIQ16sQ")
_TRAILER: Final = struct.Struct(">4sIQQQQ")
_RECORD_FIELDS: Final = 32  # bytes of a record header covered by its checksum
_TRAILER_FIELDS: Final = 32
_NAME: Final = re.compile(r"^(\d{20})\.cycle$")
_OVERFLOW_MARK: Final = "OVERFLOWED"
#: An acknowledged cycle's file kept for the next cycle to write over (see append_cycle).
_SPARE: Final = "SPARE"
_MAX_CHUNK: Final = 0xFFFFFFFF
#: Bytes of a cycle written after which their write-back to disk is started.
_WRITEBACK_BYTES: Final = 8 * 1024 * 1024

#: Framing bytes of a cycle with no chunk (header and trailer).
CYCLE_OVERHEAD: Final = _HEADER.size + _TRAILER.size
#: Framing bytes per chunk.
RECORD_OVERHEAD: Final = _RECORD.size


def is_overflowed(directory: Path) -> bool:
    """Whether the pending log in ``directory`` is marked overflowed, read from disk
    without opening the log (what status reads, whether or not a service runs)."""
    return (Path(directory) / _OVERFLOW_MARK).exists()


#: One chunk handed to :meth:`PendingLog.append_cycle`: ``(disk_index, offset, data)``,
#: or with the XXH3-128 digest of ``data`` the caller already took as a fourth item.
LogChunk = tuple[int, int, bytes | memoryview] | tuple[int, int, bytes | memoryview, bytes]


class PendingLogError(Exception):
    """Base of the pending log's errors."""


class PendingLogFull(PendingLogError):
    """The cycle would pass the log's bound (or the log is already overflowed): nothing
    of it was kept, and the log is marked overflowed. Resynchronize."""


class PendingLogCorrupt(PendingLogError):
    """A cycle file is torn or damaged: its data cannot be trusted. Resynchronize."""


@dataclass(frozen=True, slots=True)
class PendingCycle:
    """One cycle in the log.

    Attributes:
        sequence: the delta batch sequence it will be sent as.
        captured_at_ms: when it was captured (ms since the epoch).
        nbytes: data bytes of its chunks (0 when not intact).
        chunk_count: number of chunks (0 when not intact).
        intact: False when the file's header or trailer does not check (found when the
            log was opened); :meth:`PendingLog.read_cycle` raises PendingLogCorrupt.
        file_bytes: size of its file, framing included (counts against the bound).
    """

    sequence: int
    captured_at_ms: int
    nbytes: int
    chunk_count: int
    intact: bool = True
    file_bytes: int = 0


class PendingLog:
    """A bounded on-disk log of unacknowledged cycles in ``directory`` (created if needed).

    One acknowledged cycle's file is kept as ``SPARE`` for the next capture to write
    over (block allocation made writing a new file several times slower); it does not
    count against ``max_bytes`` (``docs/storage.md``, the pending log's spare).

    Args:
        directory: the log's own directory.
        max_bytes: bound on the total size of the cycle files, framing included.

    Synchronous; run :meth:`append_cycle` and :meth:`read_cycle` in a worker thread from
    Trio code. Thread-safe: the metadata is guarded by a lock that is never held during
    a cycle's data I/O, so :meth:`cycles`, :attr:`size_bytes` and :meth:`drop_through`
    stay cheap while an append runs in another thread (one append at a time).
    """

    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        makedirs(self.directory)
        self._lock = threading.Lock()
        self._cycles: dict[int, PendingCycle] = {}
        self._appending = False
        for entry in self.directory.iterdir():
            if entry.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    files().unlink(entry)
                continue
            match = _NAME.match(entry.name)
            if match:
                sequence = int(match.group(1))
                self._cycles[sequence] = _inspect(entry, sequence)
        self._overflowed = (self.directory / _OVERFLOW_MARK).exists()

    # -- state ------------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        """Total size of the cycle files (what the bound limits)."""
        with self._lock:
            return sum(c.file_bytes for c in self._cycles.values())

    @property
    def overflowed(self) -> bool:
        """True once a cycle was refused for the bound, until :meth:`clear_overflow`."""
        return self._overflowed

    def clear_overflow(self) -> None:
        """Forget the overflow (after a resynchronization); durable."""
        with self._lock:
            files().unlink(self.directory / _OVERFLOW_MARK)
            files().fsync_dir(self.directory)
            self._overflowed = False

    def clear(self) -> None:
        """Drop every cycle (e.g. after a resynchronization made them moot)."""
        with self._lock:
            self._drop(list(self._cycles))

    def cycles(self) -> list[PendingCycle]:
        """The cycles in the log, oldest (lowest sequence) first."""
        with self._lock:
            return [self._cycles[s] for s in sorted(self._cycles)]

    def path_of(self, sequence: int) -> Path:
        """The file of a cycle."""
        return self.directory / f"{sequence:020d}.cycle"

    # -- append -----------------------------------------------------------------------------

    def append_cycle(
        self,
        sequence: int,
        captured_at_ms: int,
        chunks: Iterable[LogChunk],
    ) -> int:
        """Write one cycle, durably, as a whole.

        Each chunk's data is written before the next chunk is taken from ``chunks``, so
        the chunks may be views of a buffer the producer reuses.

        Args:
            sequence: the batch sequence; larger than every cycle already in the log.
            captured_at_ms: capture time, ms since the epoch.
            chunks: ``(disk_index, offset, data)`` or ``(disk_index, offset, data,
                digest)``: with the XXH3-128 ``digest`` of ``data`` the caller took (the
                capture does, for its digest map), the log does not digest it again.

        Returns:
            The size of the cycle's file (framing included).

        Raises:
            PendingLogFull: the cycle would pass ``max_bytes``, or the log is already
                overflowed; nothing of the cycle is kept and the log is (now) marked
                overflowed, durably.
            ValueError: a sequence not above the log's last, or a bad chunk; nothing kept.
            OSError: from the file system; nothing kept.
        """
        with self._lock:
            if self._overflowed:
                raise PendingLogFull("the pending log is overflowed: resynchronize")
            if self._appending:
                raise RuntimeError("another append_cycle is in progress")
            last = max(self._cycles, default=-1)
            if sequence <= last:
                raise ValueError(f"sequence {sequence} is not above the log's last ({last})")
            if sequence < 0 or captured_at_ms < 0:
                raise ValueError("sequence and captured_at_ms must not be negative")
            budget = self.max_bytes - sum(c.file_bytes for c in self._cycles.values())
            self._appending = True
        # The long write runs without the lock, so that cycles(), size_bytes and
        # drop_through() stay quick meanwhile (a drop only frees room).
        try:
            path = self.path_of(sequence)
            tmp = path.with_name(path.name + ".tmp")
            io = files()
            # Writing over the blocks of an acknowledged cycle's file (the spare) costs a
            # fraction of writing a new file, whose blocks the file system allocates as
            # it goes (bench/delta.py: the capture's log write). The file is a ".tmp"
            # until renamed, as a new one is; what it held past the new cycle is cut off
            # before the sync (the trailer sits at the end of the file).
            reuse = False
            with contextlib.suppress(FileNotFoundError):
                io.rename(self.directory / _SPARE, tmp)
                reuse = True
            flags = os.O_WRONLY | os.O_CLOEXEC | (0 if reuse else os.O_CREAT | os.O_TRUNC)
            fd = io.open(tmp, flags, 0o600)
            try:
                try:
                    written, count, nbytes = self._write(
                        fd, tmp, sequence, captured_at_ms, chunks, budget
                    )
                    if reuse:
                        io.truncate(fd, written, tmp)
                    io.fsync(fd, tmp)
                finally:
                    os.close(fd)
                io.rename(tmp, path)
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    io.unlink(tmp)
                if isinstance(exc, PendingLogFull):
                    with self._lock:
                        self._mark_overflowed()
                raise
            io.fsync_dir(self.directory)
            with self._lock:
                self._cycles[sequence] = PendingCycle(
                    sequence, captured_at_ms, nbytes, count, True, written
                )
            return written
        finally:
            with self._lock:
                self._appending = False

    def _write(
        self,
        fd: int,
        path: Path,
        sequence: int,
        captured_at_ms: int,
        chunks: Iterable[LogChunk],
        budget: int,
    ) -> tuple[int, int, int]:
        head = _HEADER.pack(_MAGIC, _VERSION, 0, sequence, captured_at_ms, 0)[:24]
        seed = xxhash.xxh3_64_intdigest(head)
        header = head + seed.to_bytes(8, "big")
        first_seed = seed
        written = _write_all(fd, [header], path)
        written_back = 0
        count = nbytes = 0
        for chunk in chunks:
            disk_index, offset, data = chunk[0], chunk[1], chunk[2]
            length = len(data)
            if not 0 <= disk_index <= 0xFFFFFFFF or offset < 0 or length > _MAX_CHUNK:
                raise ValueError(f"bad chunk: disk {disk_index} offset {offset} len {length}")
            digest = chunk[3] if len(chunk) == 4 else xxhash.xxh3_128_digest(data)
            if len(digest) != 16:
                raise ValueError(f"bad digest for disk {disk_index} offset {offset}")
            if written + _RECORD.size + length + _TRAILER.size > budget:
                raise PendingLogFull(
                    f"cycle {sequence} would pass the pending log's bound of "
                    f"{self.max_bytes} bytes: resynchronize"
                )
            # The chain covers the digest, which covers the data: no second pass over it.
            fields = _RECORD.pack(disk_index, length, offset, digest, 0)[:_RECORD_FIELDS]
            seed = xxhash.xxh3_64_intdigest(fields, seed=seed)
            written += _write_all(fd, [fields + seed.to_bytes(8, "big"), data], path)
            count += 1
            nbytes += length
            if written - written_back >= _WRITEBACK_BYTES:
                # On its way to disk while the capture reads on: the sync at the end
                # waits for less (bench/delta.py's capture).
                files().start_writeback(fd, written_back, written - written_back, path)
                written_back = written
        if written + _TRAILER.size > budget:
            raise PendingLogFull(f"cycle {sequence} would pass the pending log's bound")
        body = _TRAILER.pack(_END_MAGIC, 0, count, nbytes, seed, 0)[:_TRAILER_FIELDS]
        check = xxhash.xxh3_64_intdigest(body, seed=first_seed)
        written += _write_all(fd, [body + check.to_bytes(8, "big")], path)
        return written, count, nbytes

    def _mark_overflowed(self) -> None:
        mark = self.directory / _OVERFLOW_MARK
        io = files()
        fd = io.open(mark, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            io.fsync(fd, mark)
        finally:
            os.close(fd)
        io.fsync_dir(self.directory)
        self._overflowed = True

    # -- read -------------------------------------------------------------------------------

    def read_cycle(self, sequence: int) -> Iterator[tuple[int, int, bytes]]:
        """The chunks of one cycle, in the order they were appended, each verified.

        The header and trailer are checked before the first chunk is yielded; each record
        is checked before it is yielded, and the chain is checked at the end.

        Raises:
            KeyError: no such cycle in the log.
            PendingLogCorrupt: torn or damaged file.
        """
        records = self._records(sequence, verify=True)  # KeyError here, not at the first next()
        # Copied: the callers keep the data (the views last until the next record).
        return ((disk_index, offset, bytes(data)) for disk_index, offset, data, _digest in records)

    def read_chunks(self, sequence: int) -> Generator[tuple[int, int, memoryview, bytes]]:
        """The chunks of one cycle with the digests the capture took, ``(disk_index,
        offset, data, digest)``, for sending: the framing and the chain are checked as by
        :meth:`read_cycle`, but the data is not digested (the receiver checks ``digest``).

        ``data`` is a read-only view of the file mapped in memory, valid until the next
        chunk is asked for: not to be kept (a read into a fresh buffer per chunk was a
        fifth of the primary's time sending a batch, bench/delta.py).

        Raises:
            KeyError: no such cycle in the log.
            PendingLogCorrupt: torn or damaged framing.
        """
        return self._records(sequence, verify=False)

    def _read(
        self, path: Path, sequence: int, verify: bool
    ) -> Generator[tuple[int, int, memoryview, bytes]]:
        """Walk a cycle file through a memory map; each data view lasts until the next."""
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed in the finally below
        except FileNotFoundError as exc:
            raise PendingLogCorrupt(f"{path.name}: the cycle file vanished") from exc
        mapped: mmap.mmap | None = None
        whole: memoryview | None = None
        try:
            file_size = os.fstat(f.fileno()).st_size
            _seq, _at, seed = _check_header(f.read(_HEADER.size), path, sequence)
            count, nbytes, last = _read_trailer(f, file_size, seed, path)
            # Populated at once: one call, not a page fault per 4 KiB as it is sent.
            mapped = mmap.mmap(
                f.fileno(),
                file_size,
                flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                prot=mmap.PROT_READ,
            )
            whole = memoryview(mapped)
            end = file_size - _TRAILER.size
            pos = _HEADER.size
            total = 0
            for index in range(count):
                if pos + _RECORD.size > end:
                    raise PendingLogCorrupt(f"{path.name}: record {index} is torn")
                raw = bytes(whole[pos : pos + _RECORD.size])
                disk_index, length, offset, digest, checksum = _RECORD.unpack(raw)
                seed = xxhash.xxh3_64_intdigest(raw[:_RECORD_FIELDS], seed=seed)
                start = pos + _RECORD.size
                pos = start + length
                if pos > end:
                    raise PendingLogCorrupt(f"{path.name}: record {index} runs past the end")
                if seed != checksum:
                    raise PendingLogCorrupt(f"{path.name}: record {index} checksum mismatch")
                total += length
                data = whole[start:pos]
                if verify and xxhash.xxh3_128_digest(data) != digest:
                    raise PendingLogCorrupt(f"{path.name}: record {index} data mismatch")
                try:
                    yield disk_index, offset, data, digest
                finally:
                    with contextlib.suppress(BufferError):  # still viewed: collected
                        data.release()
            if pos != end or seed != last or total != nbytes:
                raise PendingLogCorrupt(f"{path.name}: records do not match the trailer")
        finally:
            if whole is not None:
                with contextlib.suppress(BufferError):
                    whole.release()
            if mapped is not None:
                with contextlib.suppress(BufferError):  # a view kept: the collector unmaps
                    mapped.close()
            f.close()

    def check_cycle(self, sequence: int) -> None:
        """Read one cycle whole and check every record's data against its digest
        (:class:`PendingLogCorrupt` if one differs): after the receiver refused a digest,
        this says whether the log's copy is damaged.

        Raises:
            KeyError: no such cycle in the log.
            PendingLogCorrupt: torn or damaged file.
        """
        for _ in self._records(sequence, verify=True):
            pass

    def _records(
        self, sequence: int, *, verify: bool
    ) -> Generator[tuple[int, int, memoryview, bytes]]:
        with self._lock:
            if sequence not in self._cycles:
                raise KeyError(f"no cycle {sequence} in the pending log")
        return self._read(self.path_of(sequence), sequence, verify)

    def extents(self, sequence: int) -> Iterator[tuple[int, int, int]]:
        """Where the chunks of one cycle go, ``(disk_index, offset, length)`` in the order
        they were appended, without reading their data: one small read per record.

        For a resynchronization that needs the cycle's blocks but not their old content.
        Checked: the header (magic, version, checksum, sequence), the trailer (magic,
        checksum, file size), every record within the file, and the records against the
        trailer (count, data bytes, last checksum). Not checked: the record checksums,
        which cover the digests of the data. A record header damaged in place with its
        lengths intact can therefore go unnoticed here (:meth:`read_cycle` notices it);
        callers check the extents against what they expect.

        The whole-cycle checks run when the iterator is exhausted: trust none of a
        cycle's extents before that.

        Raises:
            KeyError: no such cycle in the log.
            PendingLogCorrupt: torn or damaged file.
            OSError: from the file system.
        """
        with self._lock:
            if sequence not in self._cycles:
                raise KeyError(f"no cycle {sequence} in the pending log")
        return self._extents(self.path_of(sequence), sequence)

    def _extents(self, path: Path, sequence: int) -> Iterator[tuple[int, int, int]]:
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed in the finally below
        except FileNotFoundError as exc:
            raise PendingLogCorrupt(f"{path.name}: the cycle file vanished") from exc
        try:
            fd = f.fileno()
            file_size = os.fstat(fd).st_size
            _seq, _at, seed = _check_header(f.read(_HEADER.size), path, sequence)
            count, nbytes, last = _read_trailer(f, file_size, seed, path)
            end = file_size - _TRAILER.size
            pos = _HEADER.size
            total = 0
            checksum = seed
            for index in range(count):
                raw = os.pread(fd, _RECORD.size, pos) if pos + _RECORD.size <= end else b""
                if len(raw) != _RECORD.size:
                    raise PendingLogCorrupt(f"{path.name}: record {index} is torn")
                disk_index, length, offset, _digest, checksum = _RECORD.unpack(raw)
                pos += _RECORD.size + length
                if pos > end:
                    raise PendingLogCorrupt(f"{path.name}: record {index} runs past the end")
                total += length
                yield disk_index, offset, length
            if pos != end or checksum != last or total != nbytes:
                raise PendingLogCorrupt(f"{path.name}: records do not match the trailer")
        finally:
            f.close()

    # -- drop -------------------------------------------------------------------------------

    def drop_through(self, sequence: int) -> None:
        """Remove every cycle up to and including ``sequence`` (it was acknowledged)."""
        with self._lock:
            self._drop([s for s in self._cycles if s <= sequence])

    def _drop(self, sequences: list[int]) -> None:
        if not sequences:
            return
        io = files()
        spare = self.directory / _SPARE
        for s in sequences:
            if not spare.exists():
                io.rename(self.path_of(s), spare)  # the next cycle writes over it
            else:
                io.unlink(self.path_of(s))
            del self._cycles[s]
        io.fsync_dir(self.directory)


def _write_all(fd: int, parts: list[bytes | memoryview], path: Path) -> int:
    """Append every byte of ``parts`` (through the file layer); returns the byte count."""
    files().writev(fd, list(parts), path)
    return sum(memoryview(p).nbytes for p in parts)


def _check_header(raw: bytes, path: Path, sequence: int) -> tuple[int, int, int]:
    if len(raw) != _HEADER.size:
        raise PendingLogCorrupt(f"{path.name}: header is torn")
    magic, version, _reserved, seq, captured_at_ms, checksum = _HEADER.unpack(raw)
    if magic != _MAGIC or version != _VERSION:
        raise PendingLogCorrupt(f"{path.name}: not a pending cycle file")
    if xxhash.xxh3_64_intdigest(raw[:24]) != checksum or seq != sequence:
        raise PendingLogCorrupt(f"{path.name}: header checksum or sequence mismatch")
    return seq, captured_at_ms, checksum


def _read_trailer(f: BinaryIO, file_size: int, seed: int, path: Path) -> tuple[int, int, int]:
    """Check the trailer; returns ``(chunk_count, nbytes, last_checksum)``."""
    if file_size < _HEADER.size + _TRAILER.size:
        raise PendingLogCorrupt(f"{path.name}: no trailer (torn)")
    f.seek(file_size - _TRAILER.size)
    raw = f.read(_TRAILER.size)
    if len(raw) != _TRAILER.size:
        raise PendingLogCorrupt(f"{path.name}: trailer is torn")
    magic, _reserved, count, nbytes, last, checksum = _TRAILER.unpack(raw)
    if magic != _END_MAGIC or xxhash.xxh3_64_intdigest(raw[:_TRAILER_FIELDS], seed=seed) != (
        checksum
    ):
        raise PendingLogCorrupt(f"{path.name}: trailer missing or damaged (torn file)")
    if count * _RECORD.size + nbytes != file_size - _HEADER.size - _TRAILER.size:
        raise PendingLogCorrupt(f"{path.name}: trailer does not match the file size")
    return count, nbytes, last


def _inspect(path: Path, sequence: int) -> PendingCycle:
    """Metadata of a cycle file found on open (not intact if header or trailer is bad)."""
    try:
        file_size = path.stat().st_size
    except OSError:
        return PendingCycle(sequence, 0, 0, 0, False, 0)
    captured_at_ms = 0
    try:
        with open(path, "rb") as f:
            _seq, captured_at_ms, seed = _check_header(f.read(_HEADER.size), path, sequence)
            count, nbytes, _last = _read_trailer(f, file_size, seed, path)
    except (OSError, PendingLogCorrupt):
        return PendingCycle(sequence, captured_at_ms, 0, 0, False, file_size)
    return PendingCycle(sequence, captured_at_ms, nbytes, count, True, file_size)
