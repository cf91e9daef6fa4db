"""The one I/O module of frproto: a framed reader/writer over any Trio stream.

Everything else in frproto is sans-I/O; this module connects a :class:`Connection` to a
``trio.abc.Stream`` (TCP, ``trio.SSLStream``, a memory stream in tests). broker/ and
node/ use it for every connection.

Reading: :class:`FramedStream` reads the 8-byte envelope first and asks the connection
to check it (:meth:`Connection.frame_size`), so a hostile length is refused before any
of the body is read. It then reads exactly one frame into a fresh ``bytearray`` and
hands that whole frame to the connection, which keeps it as a view: the payload of a
chunk is copied once (out of Trio's receive bytes into the frame) and never again.
Bytes read past the end of a frame stay in a view of the received object, consumed by
moving an offset; the tail is never re-sliced into a new object. A stream that has a
``receive_into(memoryview) -> int`` method (duck typed, e.g. frlink.biotls.BioTLSStream)
is read straight into the frame instead, with no intermediate object at all.

Writing: one writer at a time (a ``trio.Lock``); a chunk's header and payload are written
as two ``send_all`` calls so the payload buffer is never concatenated.

On a protocol violation by the peer, :meth:`FramedStream.next_event` sends the Error the
violation calls for (best effort, bounded in time), closes the stream and re-raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import trio

from ._connection import NEED_DATA, Connection, Event, UnknownMessage
from ._errors import FrprotoError, RemoteProtocolError, UnexpectedMessage
from ._messages import Error, Keepalive, Message, error_from_message
from ._replication import BatchEnd, IREnd
from ._wire import Bytes
from .limits import ENVELOPE_SIZE

#: Bytes asked of the stream per read. 64 KiB: larger reads make trio.SSLStream (and
#: CPython's SSLObject.read) allocate that much per TLS record (see perf-baselines).
DEFAULT_RECEIVE_SIZE = 64 * 1024
#: How long we try to deliver an Error before closing after a violation.
ERROR_SEND_TIMEOUT = 2.0
#: After reporting an error, how long (and how many bytes) we read and discard what the
#: peer is still sending before closing. Closing with unread bytes makes the kernel send a
#: TCP reset, and the peer would lose our Error before reading it (a "lingering close").
LINGER_SECONDS = 2.0
LINGER_BYTES = 256 * 1024 * 1024


#: Frames at least this big (chunks) are read into a reused buffer (see _frame_buffer).
REUSE_FRAME_SIZE = 64 * 1024


def _unexported(buf: bytearray) -> bool:
    """True when no memoryview of ``buf`` is alive: a bytearray refuses to change size
    while it is exported."""
    try:
        buf.append(0)
    except BufferError:
        return False
    del buf[-1]
    return True


class FramedStream:
    """A :class:`Connection` driven over a Trio stream.

    Args:
        stream: the transport (already connected; TLS handshake may be lazy).
        connection: the sans-I/O state for this conversation.
        receive_size: bytes requested per ``receive_some``.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        connection: Connection,
        *,
        receive_size: int = DEFAULT_RECEIVE_SIZE,
    ) -> None:
        self.stream = stream
        self.connection = connection
        self._receive_size = receive_size
        self._pending: memoryview = memoryview(b"")
        self._pending_pos = 0
        self._send_lock = trio.Lock()
        self._eof = False
        self._spare_frame: bytearray | None = None
        #: Bytes of chunk frames sent so far (headers and payloads, after compression).
        self.chunk_bytes_sent = 0
        # Duck typing: a stream with ``receive_into(memoryview) -> int`` (frlink.biotls's
        # BioTLSStream) decrypts straight into our frame buffers.
        self._receive_into: Callable[[memoryview], Awaitable[int]] | None = getattr(
            stream, "receive_into", None
        )

    async def next_event(self) -> Event:
        """The next event from the peer (reading as much as needed).

        Raises:
            RemoteProtocolError: the peer broke the protocol; the Error was sent (if
                possible) and the stream closed.
            trio.BrokenResourceError: the transport failed.
        """
        try:
            while True:
                event = self.connection.next_event()
                if event is not NEED_DATA:
                    return event  # type: ignore[return-value]
                await self._read_frame()
        except RemoteProtocolError as exc:
            await self._report_and_close(exc)
            raise

    async def expect(self, *kinds: type[Message]) -> Message:
        """The next event, which must be one of ``kinds``; an Error raises its exception.

        Raises:
            FrprotoError: the peer answered with an Error (mapped to its class), or sent
                something else (``UnexpectedMessage``), or broke the protocol.
        """
        event = await self.next_event()
        while isinstance(event, (UnknownMessage, Keepalive)) and not isinstance(event, kinds):
            # A Keepalive needs no answer (SM-6, MSG-22) and an unknown ignorable tag is
            # skipped (ENV-7): what is awaited is still to come.
            event = await self.next_event()
        if isinstance(event, kinds):
            return event
        if isinstance(event, Error):
            raise error_from_message(event)
        names = "/".join(k.__name__ for k in kinds)
        raise UnexpectedMessage(f"expected {names}, got {type(event).__name__}")

    async def _read_frame(self) -> None:
        envelope = bytearray(ENVELOPE_SIZE)
        got = await self._fill(memoryview(envelope))
        if got < ENVELOPE_SIZE:
            # End of stream: give what we have; the connection decides clean or truncated.
            if got:
                self.connection.receive_data(envelope[:got])
            self.connection.receive_data(b"")
            return
        total = self.connection.frame_size(envelope)
        frame = memoryview(self._frame_buffer(total))[:total]
        frame[:ENVELOPE_SIZE] = envelope
        got = await self._fill(frame[ENVELOPE_SIZE:])
        if got < total - ENVELOPE_SIZE:
            self.connection.receive_data(frame[: ENVELOPE_SIZE + got])
            self.connection.receive_data(b"")
            return
        self.connection.receive_data(frame)

    def _frame_buffer(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes for the next frame.

        Big frames (chunks) reuse the previous big frame's buffer once nothing refers to
        it any more: a Chunk event's ``data`` is a view of its frame, so the buffer is
        reused only when every such view is gone (the consumer dropped the event). A
        fresh 1 MiB buffer per frame cost the IR receiver ~0.2 CPU s/GB in page faults.
        """
        if size < REUSE_FRAME_SIZE:
            return bytearray(size)
        spare = self._spare_frame
        if spare is not None and len(spare) >= size and _unexported(spare):
            return spare
        self._spare_frame = spare = bytearray(max(size, REUSE_FRAME_SIZE))
        return spare

    async def _fill(self, target: memoryview) -> int:
        """Fill ``target`` from leftover bytes, then the stream; returns bytes filled."""
        filled = 0
        want = len(target)
        while filled < want:
            available = len(self._pending) - self._pending_pos
            if not available:
                if self._eof:
                    return filled
                if self._receive_into is not None:
                    # Straight into the frame: no intermediate bytes object per read.
                    got = await self._receive_into(target[filled:])
                    if not got:
                        self._eof = True
                        return filled
                    filled += got
                    continue
                data = await self.stream.receive_some(self._receive_size)
                if not data:
                    self._eof = True
                    return filled
                self._pending, self._pending_pos = memoryview(data), 0
                available = len(data)
            take = min(available, want - filled)
            start = self._pending_pos
            target[filled : filled + take] = self._pending[start : start + take]
            self._pending_pos += take
            filled += take
        return filled

    async def send(self, message: Message) -> None:
        """Send a control message (or a Chunk, joined: prefer :meth:`send_chunk`)."""
        data = self.connection.send(message)
        async with self._send_lock:
            await self.stream.send_all(data)

    async def send_chunk(
        self,
        disk_index: int,
        offset: int,
        data: Bytes,
        *,
        digest: bytes | None = None,
        compress_data: bool = True,
    ) -> None:
        """Send one chunk of the current IR or batch; ``data`` is written, not copied."""
        pieces = self.connection.send_chunk(
            disk_index, offset, data, digest=digest, compress_data=compress_data
        )
        async with self._send_lock:
            for piece in pieces:
                await self.stream.send_all(piece)
                self.chunk_bytes_sent += len(piece)

    async def end_ir(self) -> IREnd:
        """Send the IREnd of the IR in progress (:meth:`Connection.end_ir`) and return it."""
        end = self.connection.end_ir()
        await self.send(end)
        return end

    async def end_batch(self) -> BatchEnd:
        """Send the BatchEnd of the batch in progress (:meth:`Connection.end_batch`) and
        return it."""
        end = self.connection.end_batch()
        await self.send(end)
        return end

    async def send_error(self, error: FrprotoError | Error) -> None:
        """Report ``error`` to the peer."""
        await self.send(error if isinstance(error, Error) else Error.from_exception(error))

    async def _report_and_close(self, error: FrprotoError) -> None:
        with trio.move_on_after(ERROR_SEND_TIMEOUT):
            with contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError, FrprotoError
            ):
                await self.send_error(error)
        await linger_and_close(self.stream)

    async def aclose(self) -> None:
        """Close the stream."""
        await self.stream.aclose()


async def linger_and_close(stream: trio.abc.Stream) -> None:
    """Read and discard what the peer still sends (bounded), then close the stream.

    Used after sending a final Error: the peer may be in the middle of a batch, and
    closing with its bytes unread would reset the connection before it reads the Error.
    """
    with trio.move_on_after(LINGER_SECONDS):
        drained = 0
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while drained < LINGER_BYTES:
                data = await stream.receive_some(DEFAULT_RECEIVE_SIZE)
                if not data:
                    break
                drained += len(data)
    await trio.aclose_forcefully(stream)
