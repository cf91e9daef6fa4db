"""The out-of-band IR file: its format, its errors, and reading its frames back
(``docs/oob-ir.md``). The primary writes it (:mod:`node.primary.oob_export`), the
recovery server reads it (:mod:`node.oob_import`); both sides share only this module.

A VM whose disks are too large for the link is exported on the primary, the file is
carried (disk, courier, another network) and imported into the relationship on the
recovery server; replication then goes on with delta batches only, no IR data on the
wire.

File format (version 1)::

    magic      8 bytes   b"FRREPIR1" ("FRREPIR" + the format version as an ASCII digit)
    frames     frproto frames, byte for byte as on the wire (docs/protocol.md):
               RelationshipCreate   vmid, VM name, disks, config blob
               IRBegin              sequence 0, start (0, 0), total_bytes = sum of sizes
               Chunk * N            every disk in order, in 1 MiB chunks from offset 0
                                    to the disk's end (the last one shorter); an all-zero
                                    chunk is a ZERO chunk (no payload); each chunk carries
                                    the XXH3-128 digest of its data
               IREnd                sequence 0, chunk count N, aggregate digest
    (end of file right after IREnd)

The frames are made with :func:`frproto.codec.encode_frame` (the IREnd's aggregate with
:class:`frproto.codec.AggregateDigest`; a ZERO chunk is framed without the whole-chunk
comparison a Connection's ``send_chunk`` makes) and read back by a recovery-role
:class:`frproto.Connection`, driven through negotiation and the relationship locally (it
answers the file's RelationshipCreate with the replica's own disks), so frproto itself
checks every chunk's digest (and ZERO flag), its bounds against the
replica's disks, the count and the aggregate digest at IREnd; a file that ends inside a
frame raises :class:`frproto.TruncatedFrame`. On top of that the importer requires the
chunks to cover every disk exactly once, in order (frproto leaves coverage to the
application) and nothing after IREnd.

Export: :func:`node.primary.oob_export.export_ir`. Import: :func:`node.oob_import.import_ir`.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import frproto as fp

#: First bytes of an export file; the last byte is the format version.
MAGIC: Final = b"FRREPIR1"
_MAGIC_STEM: Final = MAGIC[:-1]
#: Bytes per chunk of an export (as the online IR's chunks).
CHUNK: Final = 1024 * 1024
_NEGOTIATION = fp.NegotiateRequest(compression=fp.CompressionSet(0))
_POLICY = fp.ServerPolicy(fp.RecoveryType.STANDALONE, "oob.invalid", compression=())

#: ``progress(bytes_done, bytes_total)``, called after every chunk.
Progress = Callable[[int, int], None]


class OOBError(Exception):
    """An out-of-band IR cannot be exported or imported (the message says why)."""


class OOBFormatError(OOBError):
    """The file is not a well-formed export (magic, version, frame order, coverage)."""


class OOBRefused(OOBError):
    """The VM or the replica is not in a state to take this export or import."""


@dataclass(frozen=True, slots=True)
class ExportHeader:
    """What an export file is for: its RelationshipCreate."""

    vmid: uuid.UUID
    name: str
    disks: tuple[fp.DiskInfo, ...]
    config: bytes


def negotiated_pair() -> tuple[fp.Connection, fp.Connection]:
    """A primary and a recovery Connection, negotiated with each other in memory."""
    primary = fp.Connection(fp.Role.PRIMARY)
    recovery = fp.Connection(fp.Role.RECOVERY)
    recovery.receive_data(primary.send(_NEGOTIATION))
    request = recovery.next_event()
    assert isinstance(request, fp.NegotiateRequest)
    primary.receive_data(recovery.send(fp.answer_negotiation(request, _POLICY)))
    answer = primary.next_event()
    assert isinstance(answer, fp.NegotiateResponse)
    assert answer.ok
    return primary, recovery


def read_header(path: Path) -> ExportHeader:
    """The RelationshipCreate at the start of an export file (nothing else is checked).

    Raises:
        OOBFormatError: not an export file of a known version.
        frproto.FrprotoError: the first frame is malformed or truncated.
    """
    with open(path, "rb") as f:
        check_magic(f.read(len(MAGIC)))
        envelope = f.read(fp.limits.ENVELOPE_SIZE)
        recovery = negotiated_pair()[1]
        if len(envelope) < fp.limits.ENVELOPE_SIZE:
            raise fp.TruncatedFrame(f"{path}: the file ends before its first frame")
        size = recovery.frame_size(envelope)
        frame = envelope + f.read(size - fp.limits.ENVELOPE_SIZE)
    if len(frame) < size:
        raise fp.TruncatedFrame(f"{path}: the file ends inside its first frame")
    message = fp.codec.decode_frame(frame)
    if not isinstance(message, fp.RelationshipCreate):
        raise OOBFormatError(f"{path}: the first frame is not a RelationshipCreate")
    return ExportHeader(message.vmid, message.vm_name, message.disks, message.config)


def check_magic(head: bytes) -> None:
    if head == MAGIC:
        return
    if len(head) < len(MAGIC) and MAGIC.startswith(head):
        raise fp.TruncatedFrame("the file ends inside its magic")
    if head.startswith(_MAGIC_STEM):
        raise OOBFormatError(
            f"out-of-band IR file format {head[len(_MAGIC_STEM) :]!r} is not supported "
            f"(this version reads {MAGIC!r})"
        )
    raise OOBFormatError(f"not an out-of-band IR file (starts with {head!r}, not {MAGIC!r})")


class FrameReader:
    """Feeds an export file to a recovery-role Connection one whole frame at a time
    (so payloads are not copied), the envelope checked before the body is read."""

    def __init__(self, f: io.FileIO, conn: fp.Connection) -> None:
        self._f = f
        self._conn = conn
        self._buffer = bytearray(
            fp.limits.ENVELOPE_SIZE + fp.limits.CHUNK_HEADER_SIZE + fp.limits.MAX_CHUNK_DATA
        )
        self._view = memoryview(self._buffer)
        self._eof = False

    def _read_into(self, view: memoryview) -> int:
        done = 0
        while done < len(view):
            n = self._f.readinto(view[done:])
            if not n:
                break
            done += n
        return done

    def _feed_frame(self) -> None:
        """Feed one frame (or, at the end of the file, what is left and the end)."""
        if self._eof:
            return
        view = self._view
        got = self._read_into(view[: fp.limits.ENVELOPE_SIZE])
        if got < fp.limits.ENVELOPE_SIZE:
            if got:
                self._conn.receive_data(bytes(view[:got]))
            self._conn.receive_data(b"")
            self._eof = True
            return
        size = self._conn.frame_size(view[: fp.limits.ENVELOPE_SIZE])
        got = self._read_into(view[fp.limits.ENVELOPE_SIZE : size]) + fp.limits.ENVELOPE_SIZE
        self._conn.receive_data(view[:got])
        if got < size:
            self._conn.receive_data(b"")
            self._eof = True

    def next_message(self) -> fp.Message:
        """The next message; TruncatedFrame if the file ends before one."""
        while True:
            event = self._conn.next_event()
            if isinstance(event, fp.NeedData):
                self._feed_frame()
                continue
            if isinstance(event, fp.UnknownMessage):
                continue  # an ignorable tag, as on the wire
            if isinstance(event, fp.ConnectionClosed):
                raise fp.TruncatedFrame("the file ends before IREnd")
            return event

    def expect_end(self) -> None:
        """Nothing may follow IREnd."""
        self._feed_frame()
        if not self._eof:
            raise OOBFormatError("data follows IREnd")
        event = self._conn.next_event()
        if not isinstance(event, fp.ConnectionClosed):
            raise OOBFormatError("data follows IREnd")
