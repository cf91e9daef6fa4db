"""A TLS stream for Trio built on ``ssl.SSLObject`` and two ``ssl.MemoryBIO`` (bulk-friendly).

:class:`BioTLSStream` is a :class:`trio.abc.Stream` like :class:`trio.SSLStream`, plus
:meth:`BioTLSStream.receive_into`, which decrypts straight into the caller's buffer.

Why not ``trio.SSLStream``: OpenSSL returns at most one TLS record (16 KiB) per
``SSL_read``, and ``SSLStream.receive_some`` pays a full ``await``, a conflict check and a
fresh ``bytes`` object for each record; it also refills from its transport 64 KiB at a
time. perf-baselines ("BioTLS") measured about 2x the receive throughput for a wrapper
that refills the incoming BIO with large transport reads and drains *every* record
already buffered into the caller's buffer before awaiting again. This is that wrapper.

Behaviour, as ``SSLStream`` with ``https_compatible=False``:

* one sender and one receiver at a time (:class:`trio.BusyResourceError` otherwise);
  sending and receiving may run concurrently; bytes for the transport (records, alerts,
  post-handshake replies) are flushed under one lock, in the order OpenSSL made them;
* the handshake runs on the first send or receive if :meth:`do_handshake` was not called;
  if it fails, the alert OpenSSL wrote (``unknown ca``, ``certificate required``...) is
  sent to the peer, best effort and bounded in time, before the error is raised;
* TLS failures raise :class:`trio.BrokenResourceError` whose ``__cause__`` is the
  :class:`ssl.SSLError`; the peer's ``close_notify`` is end of stream (``b""`` / 0), a
  transport EOF without it is a :class:`trio.BrokenResourceError` (truncation);
* :meth:`aclose` sends ``close_notify`` (best effort, not waiting for the reply), then
  closes the transport.

Memory (issue 21, ``bench/connections.py``): an idle connection holds only OpenSSL's own
state (about 30 KiB). The refill buffer is taken from a pool shared by every stream once
the transport is readable, and given back when its bytes went to OpenSSL; the incoming
BIO is fed at most :data:`FEED_SIZE` at a time (it keeps the capacity of its largest
write for the life of the connection); a failure is remembered as its text, not as the
exception, whose traceback would keep the failed call's frames and buffers alive.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import operator
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar, cast

import trio

from frproto.trio_io import BufferPool

__all__ = ["BioTLSStream"]

T_Stream = TypeVar("T_Stream", bound=trio.abc.Stream)

#: Bytes asked of the transport per refill of the incoming BIO: large reads mean few
#: socket reads and Trio round trips per MiB (perf-baselines, "BigRecv").
TRANSPORT_RECEIVE_SIZE = 1024 * 1024
#: Plaintext encrypted per flush of ``send_all``: bounds the ciphertext held in memory.
SEND_PIECE = 1024 * 1024
#: Ciphertext written to the incoming BIO at a time (see the module's docstring).
FEED_SIZE = 64 * 1024
#: How long a read may wait holding a pooled refill buffer before it gives it back.
HOLD_SECONDS = 0.01
#: Free refill buffers the pool keeps for later refills (more are freed).
POOL_KEEP = 4
#: ``receive_some()`` without ``max_bytes`` returns at most this much.
DEFAULT_MAX_BYTES = 64 * 1024
#: How long we try to deliver the alert of a failed handshake.
ALERT_TIMEOUT = 0.5


ReceiveInto = Callable[[memoryview], Awaitable[int]]
WaitReadable = Callable[[], Awaitable[None]]


#: The refill buffers of every BioTLSStream.
REFILL_POOL = BufferPool(keep=POOL_KEEP)


def transport_wait_readable(stream: trio.abc.Stream) -> WaitReadable | None:
    """An ``await wait_readable()`` that returns once ``stream`` has bytes (or its end,
    or an error) to read, or None when ``stream`` offers no such wait."""
    own = getattr(stream, "wait_readable", None)
    if own is not None:
        return cast("WaitReadable", own)
    if not isinstance(stream, trio.SocketStream):
        return None
    sock = stream.socket

    async def wait_readable() -> None:
        await trio.lowlevel.wait_readable(sock)

    return wait_readable


def transport_receive_into(stream: trio.abc.Stream) -> ReceiveInto | None:
    """A ``receive_into(buffer) -> count`` for ``stream`` (0 at end of stream), or None.

    A stream may offer its own ``receive_into`` method; a ``trio.SocketStream`` gets one
    over its socket's ``recv_into``, with the socket errors that ``receive_some`` would
    raise as stream errors."""
    own = getattr(stream, "receive_into", None)
    if own is not None:
        return cast("ReceiveInto", own)
    if not isinstance(stream, trio.SocketStream):
        return None
    sock = stream.socket

    async def receive_into(buffer: memoryview) -> int:
        try:
            return await sock.recv_into(buffer)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise trio.ClosedResourceError("the socket was closed") from exc
            raise trio.BrokenResourceError(f"socket receive failed: {exc}") from exc

    return receive_into


class BioTLSStream(trio.abc.Stream, Generic[T_Stream]):
    """TLS over ``transport_stream`` with an ``ssl.SSLObject`` on two memory BIOs.

    Args:
        transport_stream: the connected byte stream (TCP, a memory stream in tests).
        ssl_context: the context; a server context with ``server_side=True``.
        server_side: run the server side of the handshake.
        server_hostname: the name sent as SNI and checked (client side).
        receive_size: bytes asked of the transport per refill.

    Raises:
        ValueError, ssl.SSLError: from ``SSLContext.wrap_bio`` (e.g. a client context
            that checks host names, without ``server_hostname``).
    """

    def __init__(
        self,
        transport_stream: T_Stream,
        ssl_context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        receive_size: int = TRANSPORT_RECEIVE_SIZE,
    ) -> None:
        self.transport_stream: T_Stream = transport_stream
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = ssl_context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
        )
        # SSLObject.read(n, buffer) fills buffer and returns a count (typeshed says bytes).
        self._read_into = cast("Callable[[int, memoryview], int]", self._ssl.read)
        self._receive_size = receive_size
        # A transport that reads into our buffer spares a fresh 1 MiB bytes object per
        # refill (CPython's socket.recv allocates, then shrinks it: mmap/mremap and page
        # faults that cost the IR receiver ~0.3 CPU s/GB here).
        self._transport_receive_into = transport_receive_into(transport_stream)
        # The refill buffer is borrowed from REFILL_POOL once the transport is readable:
        # an idle connection holds none.
        self._transport_wait_readable = transport_wait_readable(transport_stream)
        #: Ciphertext read but not yet fed to OpenSSL, and the pooled buffer it lives in.
        self._backlog: memoryview | None = None
        self._backlog_buffer: mmap.mmap | None = None
        #: Bytes flow (a refill filled its buffer, and no read waited HOLD_SECONDS since):
        #: refills read up to ``receive_size``, not FEED_SIZE (see _receive_pooled).
        self._bulk = False
        self._flush_lock = trio.Lock()  # one task writes to the transport at a time
        self._handshake_lock = trio.Lock()
        self._handshake_done = False
        self._sending = False
        self._receiving = False
        self._closed = False
        #: Why the stream is unusable (the failure's text; see the module's docstring).
        self._broken: str | None = None
        self._eof = False

    # -- information -------------------------------------------------------------------

    @property
    def ssl_object(self) -> ssl.SSLObject:
        """The underlying :class:`ssl.SSLObject` (for inspection only)."""
        return self._ssl

    def getpeercert(self, binary_form: bool = False) -> Any:
        """The peer's certificate, as :meth:`ssl.SSLObject.getpeercert` (after the handshake)."""
        return self._ssl.getpeercert(binary_form)

    def version(self) -> str | None:
        """The negotiated protocol version, e.g. ``"TLSv1.3"``."""
        return self._ssl.version()

    def cipher(self) -> tuple[str, str, int] | None:
        """The negotiated cipher suite, as :meth:`ssl.SSLObject.cipher`."""
        return self._ssl.cipher()

    # -- state -------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this TLS stream is closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(f"this TLS stream is broken: {self._broken}")

    def _transport_failed(
        self, exc: BaseException
    ) -> trio.BrokenResourceError | trio.ClosedResourceError:
        """The error to raise after the transport raised ``exc`` (marks the stream broken,
        unless we closed it ourselves meanwhile)."""
        if self._closed:
            return trio.ClosedResourceError("this TLS stream was closed")
        self._broken = repr(exc)
        return trio.BrokenResourceError(f"TLS transport failed: {exc!r}")

    def _tls_failed(self, exc: ssl.SSLError) -> trio.BrokenResourceError:
        self._broken = str(exc)
        return trio.BrokenResourceError(f"TLS failed: {exc}")

    # -- transport ---------------------------------------------------------------------

    async def _flush(self) -> None:
        """Send everything OpenSSL has written to the outgoing BIO (in order)."""
        async with self._flush_lock:
            data = self._outgoing.read()
            if not data:
                return
            try:
                await self.transport_stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise self._transport_failed(exc) from exc
            except trio.Cancelled as exc:
                # Part of a record may have gone out: the stream cannot be used again.
                self._broken = "cancelled while sending"
                raise exc from None

    def _feed(self) -> bool:
        """Feed OpenSSL the next piece of the backlog; False when there is none."""
        backlog = self._backlog
        if backlog is None:
            return False
        self._incoming.write(backlog[:FEED_SIZE])  # MemoryBIO copies
        if len(backlog) > FEED_SIZE:
            self._backlog = backlog[FEED_SIZE:]
        else:
            self._release_backlog()
        return True

    def _release_backlog(self) -> None:
        if self._backlog is not None:
            self._backlog.release()
            self._backlog = None
        if self._backlog_buffer is not None:
            REFILL_POOL.give(self._backlog_buffer)
            self._backlog_buffer = None

    async def _receive_pooled(self, receive_into: ReceiveInto) -> tuple[mmap.mmap, int, bool]:
        """Read into a buffer borrowed from REFILL_POOL: the buffer, the count (0: end of
        stream, the buffer already given back) and whether the read filled it.

        Reads are small (:data:`FEED_SIZE`) until one fills its buffer, then big
        (``receive_size``) until the stream idles: concurrent handshakes and small
        messages borrow 64 KiB each, not 1 MiB (a burst of large transient buffers leaves
        the C heap fragmented at its peak size). While bytes flow (``_bulk``), the read
        is tried at once, holding the buffer for at most :data:`HOLD_SECONDS` (the bytes
        are usually there: no wait per refill); otherwise, and after that, the buffer is
        borrowed only once the transport is readable: an idle stream holds none."""
        wait_readable = self._transport_wait_readable
        if wait_readable is not None and self._bulk:
            size = self._receive_size
            buffer = REFILL_POOL.take(size)
            try:
                with trio.move_on_after(HOLD_SECONDS):
                    got = await receive_into(memoryview(buffer)[:size])
                    return self._keep(buffer, got), got, got == size
            except BaseException:
                REFILL_POOL.give(buffer)
                raise
            REFILL_POOL.give(buffer)
            self._bulk = False  # idle: small reads again until bytes flow
        if wait_readable is not None:
            await wait_readable()
        size = self._receive_size if self._bulk else min(FEED_SIZE, self._receive_size)
        buffer = REFILL_POOL.take(size)
        try:
            got = await receive_into(memoryview(buffer)[:size])
        except BaseException:
            REFILL_POOL.give(buffer)
            raise
        return self._keep(buffer, got), got, got == size

    @staticmethod
    def _keep(buffer: mmap.mmap, got: int) -> mmap.mmap:
        if not got:
            REFILL_POOL.give(buffer)  # end of stream: nothing to keep
        return buffer

    async def _refill(self) -> None:
        """Read once from the transport and feed OpenSSL its first piece (the rest waits
        in the backlog: :meth:`_feed`); EOF is written as EOF."""
        if self._feed():
            await trio.lowlevel.checkpoint()
            return
        receive_into = self._transport_receive_into
        try:
            if receive_into is not None:
                buffer, got, full = await self._receive_pooled(receive_into)
                if not got:
                    self._incoming.write_eof()
                    return
                if full:
                    self._bulk = True  # bytes flow: read big until the stream idles
                self._backlog_buffer = buffer
                self._backlog = memoryview(buffer)[:got]
                self._feed()
                return
            data = await self.transport_stream.receive_some(self._receive_size)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._transport_failed(exc) from exc
        for start in range(0, len(data), FEED_SIZE):
            self._incoming.write(data[start : start + FEED_SIZE])
        if not data:
            self._incoming.write_eof()

    # -- handshake ---------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the TLS handshake (once; later calls return at once).

        Raises:
            trio.BrokenResourceError: the handshake failed; ``__cause__`` is the
                :class:`ssl.SSLError` (the alert was sent to the peer, best effort) or the
                transport's error.
            trio.ClosedResourceError: the stream was closed.
        """
        self._check_usable()
        async with self._handshake_lock:
            self._check_usable()
            if self._handshake_done:
                return
            while True:
                try:
                    self._ssl.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
                except ssl.SSLError as exc:
                    await self._send_alert()
                    raise self._tls_failed(exc) from exc
                await self._flush()
                if done:
                    self._handshake_done = True
                    return
                await self._refill()

    async def _send_alert(self) -> None:
        """Deliver the alert OpenSSL wrote for a failed handshake: shielded, bounded."""
        data = self._outgoing.read()
        if not data:
            return
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(ALERT_TIMEOUT),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
        ):
            await self.transport_stream.send_all(data)

    async def _ensure_handshake(self) -> None:
        if not self._handshake_done:
            await self.do_handshake()

    # -- sending -----------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and send it (in pieces of at most ``SEND_PIECE``)."""
        await self.send_all_pieces((data,))

    async def send_all_pieces(self, pieces: Sequence[bytes | bytearray | memoryview]) -> None:
        """Encrypt ``pieces`` in order and send them with one transport write (more only
        past ``SEND_PIECE`` of ciphertext): a chunk's small header and its payload go out
        together, not as a tiny write of their own. Nothing is joined in plaintext: each
        piece is handed to OpenSSL as it is (:meth:`send_all` semantics otherwise)."""
        await self.send_grouped((pieces,), SEND_PIECE)

    async def send_grouped(
        self, groups: Iterable[Sequence[bytes | bytearray | memoryview]], flush_bytes: int
    ) -> int:
        """Encrypt each group of pieces as :meth:`send_all_pieces` does, sending the
        ciphertext whenever at least ``flush_bytes`` of it waits (and at the end): many
        small messages (a batch's 64 KiB chunk frames) cost one transport write and one
        Trio round trip per ``flush_bytes``, not one each (the primary's send of a batch
        spent more CPU in those round trips than in the encryption, bench/delta.py).

        Each group is encrypted before the next is taken from ``groups``, so a group may
        view a buffer the producer reuses. Returns the plaintext bytes sent."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_usable()
            await self._ensure_handshake()
            write = self._ssl.write
            outgoing = self._outgoing
            sent = 0
            for pieces in groups:
                for piece in pieces:
                    view = memoryview(piece).cast("B")
                    for start in range(0, len(view), SEND_PIECE):
                        try:
                            sent += write(view[start : start + SEND_PIECE])
                        except ssl.SSLError as exc:
                            raise self._tls_failed(exc) from exc
                        if outgoing.pending >= flush_bytes:
                            await self._flush()
            if outgoing.pending:
                await self._flush()
            else:
                await trio.lowlevel.checkpoint()
            return sent
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the transport might accept data (see :class:`trio.abc.SendStream`)."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_usable()
            try:
                await self.transport_stream.wait_send_all_might_not_block()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise self._transport_failed(exc) from exc
        finally:
            self._sending = False

    # -- receiving ---------------------------------------------------------------------

    async def receive_into(self, buffer: memoryview) -> int:
        """Decrypt into ``buffer``; returns the bytes written, 0 at end of stream.

        Waits for the transport only when nothing is decrypted yet, and then drains every
        record already received (up to ``len(buffer)``) before returning: one call can fill
        a 1 MiB frame with no ``await`` per 16 KiB record. ``buffer`` must be writable and
        non-empty.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this TLS stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_usable()
            await self._ensure_handshake()
            want = len(buffer)
            if want <= 0:
                raise ValueError("receive_into needs a non-empty buffer")
            read = self._read_into
            filled = 0
            waited = False
            while True:
                try:
                    while filled < want:
                        got = read(want - filled, buffer[filled:])
                        if not got:  # the peer's close_notify
                            self._eof = True
                            break
                        filled += got
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    self._eof = True  # close_notify: end of stream
                except ssl.SSLError as exc:
                    raise self._tls_failed(exc) from exc
                if self._outgoing.pending:
                    await self._flush()  # a post-handshake reply (e.g. to a KeyUpdate)
                    waited = True
                if self._eof or filled == want:
                    break
                # Ciphertext already read goes on being fed, FEED_SIZE at a time, until
                # the buffer is full: no await and no return to the caller per 64 KiB
                # (returning after each piece cost the IR server about a third more CPU
                # per GB, issue 21).
                if self._feed():
                    continue
                if filled:
                    break
                await self._refill()
                waited = True
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return filled
        finally:
            self._receiving = False

    def receive_buffered_into(self, buffer: memoryview) -> int:
        """Decrypt into ``buffer`` what was already read from the transport, without
        waiting and without a checkpoint; the bytes written, 0 when nothing can be had so
        (nothing there, the handshake not done, a reply to send, the end of the stream or
        an error: :meth:`receive_into` then does what is needed). For a caller that
        awaits :meth:`receive_into` now and then (``frproto.trio_io.FramedStream``)."""
        if (
            self._receiving
            or not self._handshake_done
            or self._broken is not None
            or self._closed
            or self._eof
            or self._outgoing.pending
        ):
            return 0
        read = self._read_into
        want = len(buffer)
        filled = 0
        while filled < want:
            try:
                got = read(want - filled, buffer[filled:])
            except ssl.SSLWantReadError:
                if self._feed():
                    continue
                break
            except ssl.SSLError:
                break  # receive_into meets it again and reports it
            if not got:
                break
            filled += got
        return filled

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Up to ``max_bytes`` (default 64 KiB) of plaintext; ``b""`` at end of stream."""
        if max_bytes is None:
            size = DEFAULT_MAX_BYTES
        else:
            size = operator.index(max_bytes)
            if size < 1:
                raise ValueError("max_bytes must be >= 1")
        buffer = bytearray(size)
        got = await self.receive_into(memoryview(buffer))
        del buffer[got:]
        return buffer

    # -- closing -----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Send ``close_notify`` (best effort, if nothing else is sending), close the transport."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._release_backlog()
        try:
            if self._handshake_done and self._broken is None and not self._flush_lock.locked():
                with contextlib.suppress(ssl.SSLError):
                    self._ssl.unwrap()  # writes close_notify; raises WantRead (no reply yet)
                data = self._outgoing.read()
                if data:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self.transport_stream.send_all(data)
        finally:
            await self.transport_stream.aclose()
