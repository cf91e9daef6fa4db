"""The one I/O module of frproto: a framed reader/writer over any Trio stream.

Everything else in frproto is sans-I/O; this module connects a :class:`Connection` to a
``trio.abc.Stream`` (TCP, ``trio.SSLStream``, a memory stream in tests). broker/ and
node/ use it for every connection.

Reading: :class:`FramedStream` reads the 8-byte envelope first and asks the connection
to check it (:meth:`Connection.frame_size`), so a hostile length is refused before any
of the body is read. It then reads exactly one frame into a buffer (see Memory) and
hands that whole frame to the connection, which keeps it as a view: the payload of a
chunk is copied once (out of Trio's receive bytes into the frame) and never again.
Bytes read past the end of a frame stay in a view of the received object, consumed by
moving an offset; the tail is never re-sliced into a new object. A stream that has a
``receive_into(memoryview) -> int`` method (duck typed, e.g. frlink.biotls.BioTLSStream)
is read straight into the frame instead, with no intermediate object at all; if it also
has ``receive_buffered_into(memoryview) -> int``, what it already holds is taken without
an await (at most :data:`BUFFERED_BUDGET` bytes between two awaited reads). A chunk's
payload in a pooled frame starts on a page boundary (:data:`PAYLOAD_ALIGN`).

Memory: buffers of large frames (chunks, large control messages) come from
:data:`FRAME_POOL`, shared by every connection of the process, and go back to it when the
connection waits for its next frame (or closes): a connection idle between frames holds
no large buffer, whatever it received before.

Writing: one writer at a time (a ``trio.Lock``); a chunk's header and payload are never
concatenated. A stream that has a ``send_all_pieces(pieces)`` method (duck typed, e.g.
frlink.biotls.BioTLSStream) gets both in one call and sends them in one transport write;
any other stream gets two ``send_all`` calls. :meth:`FramedStream.send_chunks` sends many
chunks (a delta batch's) to a stream that has ``send_grouped(groups, flush_bytes)`` with
one hold of the lock per :data:`GROUP_LOCK_BYTES` and one transport write per
:data:`GROUP_FLUSH_BYTES` of ciphertext.

On a protocol violation by the peer, :meth:`FramedStream.next_event` sends the Error the
violation calls for (best effort, bounded in time), closes the stream and re-raises.

Deadlines (``docs/protocol.md`` section 10.2): a :class:`FramedStream` given
``idle_timeout`` and ``frame_timeout`` bounds every read by the time since the last byte
came: between frames by ``idle_timeout(state)`` (None: no limit in that state), inside a
frame by ``frame_timeout``, and both by the absolute :attr:`FramedStream.deadline` (the
negotiation's). When one passes, :meth:`FramedStream.next_event` sends an Error ``BUSY``
(between frames) or ``TRUNCATED`` (inside a frame), closes the stream and raises
:class:`PeerIdle`. :func:`keep_alive` sends a Keepalive whenever nothing was sent for an
interval.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import mmap
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator

import trio

from ._connection import NEED_DATA, Connection, Event, UnknownMessage
from ._errors import (
    Busy,
    ErrorCode,
    FrprotoError,
    LocalProtocolError,
    RemoteProtocolError,
    TruncatedFrame,
    UnexpectedMessage,
)
from ._messages import Error, Keepalive, Message, error_from_message
from ._replication import BatchEnd, IREnd
from ._state import KEEPALIVE_STATES, State
from ._wire import Bytes
from .limits import CHUNK_HEADER_SIZE, ENVELOPE_SIZE

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


#: A chunk's payload in a pooled frame buffer starts at a multiple of this (a page): the
#: recovery server writes IR chunks with O_DIRECT straight from it, with no copy.
PAYLOAD_ALIGN = mmap.PAGESIZE
#: Where a frame starts in its pooled buffer, so that a chunk's payload is aligned.
_FRAME_LEAD = -(ENVELOPE_SIZE + CHUNK_HEADER_SIZE) % PAYLOAD_ALIGN
#: Bytes a FramedStream takes from its stream's buffer without an await before it waits
#: (and lets other tasks run) once.
BUFFERED_BUDGET = 4 * 1024 * 1024
#: Ciphertext of grouped chunk frames gathered before one transport write (send_chunks).
GROUP_FLUSH_BYTES = 256 * 1024
#: Chunk frames sent under one hold of the send lock (send_chunks): what a Keepalive or
#: an Error from another task may wait behind.
GROUP_LOCK_BYTES = 4 * 1024 * 1024
#: Frames at least this big (chunks) are read into a pooled buffer (see _frame_buffer).
REUSE_FRAME_SIZE = 64 * 1024

#: Seconds allowed between frames in a state (None: no limit there).
IdleTimeout = Callable[[State], float | None]


class PeerIdle(trio.TooSlowError):
    """A read deadline passed (section 10.2): the peer sent nothing for too long.

    Raised by :meth:`FramedStream.next_event` after the Error was sent (best effort) and
    the stream closed. ``code`` is the Error's: ``BUSY`` between frames, ``TRUNCATED``
    inside a frame.
    """

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.code = code


class _Expired(Exception):
    """Internal: a read deadline passed (``inside``: within a frame)."""

    def __init__(self, inside: bool, waited: float) -> None:
        super().__init__()
        self.inside = inside
        self.waited = waited


def _unexported(buf: mmap.mmap) -> bool:
    """True when no memoryview of ``buf`` is alive: an mmap refuses to resize while it
    is exported (resizing to its own size is a no-op otherwise)."""
    try:
        buf.resize(len(buf))
    except BufferError:
        return False
    return True


class BufferPool:
    """Large buffers lent to connections while they use them, kept for the next one.

    ``take(size)`` hands out a free buffer of at least ``size`` bytes (or a new one of
    ``max(size, minimum)``); ``give`` takes one back when nothing refers to it any more
    (a buffer still exported, e.g. a Chunk event's data in use, is left to the garbage
    collector) and keeps at most ``keep`` of them. Trio runs one task at a time: no lock.

    The buffers are anonymous mmaps, not bytearrays: their pages are committed only
    when written (a frame declared 2 MiB that stalls after 1 MiB holds 1 MiB), and one
    freed goes back to the system at once (a large bytearray is zero-filled, and once
    freed it stays in the C heap: glibc raises its mmap threshold after such a free).
    """

    def __init__(self, keep: int = 4, minimum: int = 0) -> None:
        self.keep = keep
        self.minimum = minimum
        self.free: list[mmap.mmap] = []
        #: Given back while a view of them was alive; reclaimed by the next take().
        self.viewed: list[mmap.mmap] = []
        #: Buffers taken and not given back yet (what the connections hold now).
        self.lent = 0

    def take(self, size: int) -> mmap.mmap:
        """A buffer of at least ``size`` bytes (its content is whatever it held before)."""
        self.lent += 1
        self._reclaim()
        for i in range(len(self.free) - 1, -1, -1):  # the last given first: warm in cache
            if len(self.free[i]) >= size:
                return self.free.pop(i)
        # Private: an anonymous mmap is shared by default, and a process forked later (a
        # ProcessPoolExecutor's worker) would write into the same pages as its parent and
        # siblings (the simulation's workers corrupted each other's IR chunks so).
        return mmap.mmap(-1, max(size, self.minimum, mmap.PAGESIZE), flags=mmap.MAP_PRIVATE)

    def give(self, buffer: mmap.mmap) -> bool:
        """Take ``buffer`` back; False if it is still in use (it is then left to the
        garbage collector) or the pool is full (it is then unmapped)."""
        self.lent -= 1
        if not _unexported(buffer):
            # Still viewed (a frame's payload the caller holds until its next event):
            # kept aside and taken back by the next take() once the view is gone. Left
            # to the garbage collector, every frame would map a fresh buffer and fault
            # its pages in again (about 0.4 CPU s per GB of IR on the server).
            self.viewed.append(buffer)
            del self.viewed[:-64]  # (views held for good: left to the collector)
            return False
        if len(self.free) >= self.keep:
            buffer.close()
            return False
        self.free.append(buffer)
        return True

    def _reclaim(self) -> None:
        """Move the buffers given back while viewed, now free of views, to the free list."""
        if not self.viewed:
            return
        still = []
        for buffer in self.viewed:
            if not _unexported(buffer):
                still.append(buffer)
            elif len(self.free) < self.keep:
                self.free.append(buffer)
            else:
                buffer.close()
        self.viewed = still

    def clear(self) -> None:
        """Unmap the free buffers (they return to the system)."""
        self.viewed = []
        free, self.free = self.free, []
        for buffer in free:
            buffer.close()


#: The buffers of large frames, shared by every FramedStream of the process.
FRAME_POOL = BufferPool(keep=4, minimum=REUSE_FRAME_SIZE)


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # made outside Trio (a test): the first send sets it
        return 0.0


class FramedStream:
    """A :class:`Connection` driven over a Trio stream.

    Args:
        stream: the transport (already connected; TLS handshake may be lazy).
        connection: the sans-I/O state for this conversation.
        receive_size: bytes requested per ``receive_some``.
        idle_timeout: seconds a read between frames may wait for the next byte, by the
            connection's state (None from it: no limit in that state); None: no limit.
        frame_timeout: seconds a read inside a frame may wait for the next byte.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        connection: Connection,
        *,
        receive_size: int = DEFAULT_RECEIVE_SIZE,
        idle_timeout: IdleTimeout | None = None,
        frame_timeout: float | None = None,
    ) -> None:
        self.stream = stream
        self.connection = connection
        self._receive_size = receive_size
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        #: An absolute ``trio.current_time()`` by which every read must be done (the
        #: negotiation's deadline); ``inf``: none.
        self.deadline = math.inf
        #: ``trio.current_time()`` of the last send (Keepalive timing, :func:`keep_alive`).
        self.last_sent = _now()
        self._in_frame = False
        self._pending: memoryview = memoryview(b"")
        self._pending_pos = 0
        self._send_lock = trio.Lock()
        self._eof = False
        self._spare_frame: mmap.mmap | None = None
        #: A frame was handed to the connection and its event not returned yet.
        self._fed = False
        #: Bytes of chunk frames sent so far (headers and payloads, after compression).
        self.chunk_bytes_sent = 0
        # Duck typing: a stream with ``receive_into(memoryview) -> int`` (frlink.biotls's
        # BioTLSStream) decrypts straight into our frame buffers.
        self._receive_into: Callable[[memoryview], Awaitable[int]] | None = getattr(
            stream, "receive_into", None
        )
        # And one with ``receive_buffered_into(memoryview) -> int`` hands over what it
        # already holds without an await: no deadline scope and no scheduler round trip
        # per read (two per frame), the server's main cost per 64 KiB chunk after the
        # decryption. Every BUFFERED_BUDGET bytes the awaited path runs, which
        # checkpoints: other tasks get their turn while a batch streams in.
        self._receive_buffered: Callable[[memoryview], int] | None = getattr(
            stream, "receive_buffered_into", None
        )
        self._unyielded = 0
        # And a stream with ``send_all_pieces(pieces)`` sends a chunk's pieces at once.
        self._send_pieces: Callable[[list[Bytes]], Awaitable[None]] | None = getattr(
            stream, "send_all_pieces", None
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
                # The connection holds nothing unparsed unless a frame was fed since its
                # last event (one frame is fed at a time): no probe that would only say
                # NEED_DATA, once per frame on the hot path. At the end of the stream or
                # after a violation it is asked first, as it answers those itself.
                if self._fed or self._eof or self.connection.state is State.ERROR:
                    event = self.connection.next_event()
                    if event is not NEED_DATA:
                        self._fed = False
                        return event  # type: ignore[return-value]
                await self._read_frame()
                self._fed = True
        except RemoteProtocolError as exc:
            await self._report_and_close(exc)
            raise
        except _Expired as expired:
            error: FrprotoError
            if expired.inside:
                error = TruncatedFrame(f"no byte of the frame came for {expired.waited:g} s")
            else:
                error = Busy(f"nothing came for {expired.waited:g} s: closing")
            await self._report_and_close(error)
            raise PeerIdle(str(error), type(error).code) from None

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

    def _return_frame_buffer(self) -> None:
        """Give the last large frame's buffer back to the pool (the caller is done with
        its event, or the connection is over)."""
        spare, self._spare_frame = self._spare_frame, None
        if spare is not None:
            FRAME_POOL.give(spare)

    async def _read_frame(self) -> None:
        # The previous frame was handed over and its event consumed. Its buffer serves
        # the next frame when that comes at once (_frame_buffer); while we wait for it
        # (maybe for long), other connections (_fill gives it back before waiting).
        envelope = bytearray(ENVELOPE_SIZE)
        self._in_frame = False
        got = await self._fill(memoryview(envelope))
        if got < ENVELOPE_SIZE:
            # End of stream: give what we have; the connection decides clean or truncated.
            if got:
                self.connection.receive_data(envelope[:got])
            self.connection.receive_data(b"")
            return
        total = self.connection.frame_size(envelope)
        frame = self._frame_buffer(total)
        frame[:ENVELOPE_SIZE] = envelope
        got = await self._fill(frame[ENVELOPE_SIZE:])
        if got < total - ENVELOPE_SIZE:
            self.connection.receive_data(frame[: ENVELOPE_SIZE + got])
            self.connection.receive_data(b"")
            return
        self.connection.receive_data(frame)

    def _frame_buffer(self, size: int) -> memoryview:
        """A buffer of ``size`` bytes for the next frame.

        Big frames (chunks) are read into a buffer of :data:`FRAME_POOL`, given back
        before the next frame is awaited once nothing refers to it any more (a Chunk
        event's ``data`` is a view of its frame: the pool takes back only buffers whose
        views are all gone). A fresh 1 MiB buffer per frame cost the IR receiver ~0.2
        CPU s/GB in page faults; the pool hands the same few buffers out again. The
        frame starts :data:`_FRAME_LEAD` bytes in, so that a chunk's payload starts at a
        page boundary (:data:`PAYLOAD_ALIGN`).
        """
        if size < REUSE_FRAME_SIZE:
            return memoryview(bytearray(size))
        spare = self._spare_frame
        # The previous frame's buffer, kept while frames come back to back, unless a view
        # of it is still alive (a Chunk event's data held on to) or it is too small.
        if spare is None or len(spare) < _FRAME_LEAD + size or not _unexported(spare):
            self._return_frame_buffer()
            self._spare_frame = spare = FRAME_POOL.take(_FRAME_LEAD + size)
        return memoryview(spare)[_FRAME_LEAD : _FRAME_LEAD + size]

    def _read_deadline(self) -> tuple[float, float]:
        """When the read about to start must be done, and the limit it stems from."""
        limit: float | None
        if self._in_frame:
            limit = self.frame_timeout
        else:
            limit = self.idle_timeout(self.connection.state) if self.idle_timeout else None
        now = trio.current_time()
        relative = math.inf if limit is None else now + limit
        if self.deadline < relative:
            return self.deadline, max(0.0, self.deadline - now)
        return relative, math.inf if limit is None else limit

    async def _receive_some(self) -> bytes | bytearray:
        at, limit = self._read_deadline()
        with trio.move_on_at(at):
            return await self.stream.receive_some(self._receive_size)
        raise _Expired(self._in_frame, limit)

    async def _receive_into_bounded(self, target: memoryview) -> int:
        assert self._receive_into is not None
        at, limit = self._read_deadline()
        with trio.move_on_at(at):
            return await self._receive_into(target)
        raise _Expired(self._in_frame, limit)

    async def _fill(self, target: memoryview) -> int:
        """Fill ``target`` from leftover bytes, then the stream; returns bytes filled."""
        filled = 0
        want = len(target)
        while filled < want:
            available = len(self._pending) - self._pending_pos
            if not available:
                if self._eof:
                    return filled
                if self._receive_buffered is not None and self._unyielded < BUFFERED_BUDGET:
                    got = self._receive_buffered(target[filled:])
                    if got:
                        self._unyielded += got
                        filled += got
                        self._in_frame = True
                        continue
                if not self._in_frame:
                    # Waiting for the next frame (maybe for long): the last frame's
                    # buffer serves other connections meanwhile.
                    self._return_frame_buffer()
                if self._receive_into is not None:
                    # Straight into the frame: no intermediate bytes object per read.
                    self._unyielded = 0
                    got = await self._receive_into_bounded(target[filled:])
                    if not got:
                        self._eof = True
                        return filled
                    filled += got
                    self._in_frame = True
                    continue
                data = await self._receive_some()
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
            self._in_frame = True
        return filled

    async def send(self, message: Message) -> None:
        """Send a control message (or a Chunk, joined: prefer :meth:`send_chunk`)."""
        # Encoded under the lock: the frames go out in the order the connection's state
        # saw them, also with a Keepalive sent from another task (keep_alive).
        async with self._send_lock:
            data = self.connection.send(message)
            await self.stream.send_all(data)
            self.last_sent = trio.current_time()

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
        async with self._send_lock:
            pieces = self.connection.send_chunk(
                disk_index, offset, data, digest=digest, compress_data=compress_data
            )
            if self._send_pieces is not None:
                # Header and payload in one transport write (see the module's docstring).
                await self._send_pieces(pieces)
            else:
                for piece in pieces:
                    await self.stream.send_all(piece)
            self.chunk_bytes_sent += sum(len(piece) for piece in pieces)
            self.last_sent = trio.current_time()

    async def send_chunks(self, chunks: Iterable[tuple[int, int, Bytes, bytes | None]]) -> None:
        """Send chunks ``(disk_index, offset, data, digest)`` of the current IR or batch,
        each as :meth:`send_chunk` would (uncompressed data as it is, not copied).

        A stream with ``send_grouped(groups, flush_bytes)`` (duck typed, e.g.
        frlink.biotls.BioTLSStream) gets them in groups: one hold of the send lock per
        :data:`GROUP_LOCK_BYTES` and one transport write per :data:`GROUP_FLUSH_BYTES`,
        where :meth:`send_chunk` costs a lock, a write and their Trio round trips per
        chunk (for 64 KiB chunks, more CPU than their encryption). Each chunk is framed
        and written before the next is taken from ``chunks``, so its data may view a
        buffer the producer reuses.
        """
        send_grouped: Callable[[Iterable[list[Bytes]], int], Awaitable[int]] | None = getattr(
            self.stream, "send_grouped", None
        )
        if send_grouped is None:
            for disk_index, offset, data, digest in chunks:
                await self.send_chunk(disk_index, offset, data, digest=digest)
            return
        source = iter(chunks)
        more = True
        framed = 0

        def group() -> Iterator[list[Bytes]]:
            # Up to GROUP_LOCK_BYTES of frames, then back to the caller's loop (which
            # lets a Keepalive or an Error in between).
            nonlocal more, framed
            start = framed
            while framed - start < GROUP_LOCK_BYTES:
                item = next(source, None)
                if item is None:
                    more = False
                    return
                disk_index, offset, data, digest = item
                pieces = self.connection.send_chunk(disk_index, offset, data, digest=digest)
                framed += sum(len(piece) for piece in pieces)
                yield pieces

        while more:
            async with self._send_lock:
                before = framed
                await send_grouped(group(), GROUP_FLUSH_BYTES)
                self.chunk_bytes_sent += framed - before
                self.last_sent = trio.current_time()

    async def send_keepalive(self, token: int = 0) -> bool:
        """Send a Keepalive if the state allows one now (False if not: nothing sent)."""
        async with self._send_lock:
            if self.connection.state not in KEEPALIVE_STATES:
                return False
            data = self.connection.send(Keepalive(token))
            await self.stream.send_all(data)
            self.last_sent = trio.current_time()
            return True

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
        self._return_frame_buffer()

    async def aclose(self) -> None:
        """Close the stream (and give a pooled frame buffer back)."""
        self._return_frame_buffer()
        await self.stream.aclose()


async def keep_alive(
    framed: FramedStream,
    interval: float,
    *,
    states: Collection[State] = KEEPALIVE_STATES,
) -> None:
    """Send a Keepalive whenever nothing was sent on ``framed`` for ``interval`` seconds
    while its state is one of ``states`` (section 10.2), counting from the later of the
    last send and the moment the state was seen to become one of them. Run it in a task
    beside the conversation and cancel it at the end; it returns by itself when the
    connection is over (a terminal state, or the transport gone)."""
    tokens = itertools.count(1)
    eligible_since: float | None = None
    while True:
        state = framed.connection.state
        if state in (State.MUST_CLOSE, State.CLOSED, State.ERROR):
            return
        now = trio.current_time()
        if state not in states:
            eligible_since = None
            await trio.sleep(interval / 4)  # look again: the state moves on
            continue
        if eligible_since is None:
            eligible_since = now
        due = max(framed.last_sent, eligible_since) + interval
        if now < due:
            await trio.sleep(min(due - now, interval / 4))
            continue
        try:
            sent = await framed.send_keepalive(next(tokens) & 0xFFFF_FFFF_FFFF_FFFF)
        except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
            return
        if not sent:
            eligible_since = None


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
