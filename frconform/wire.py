"""The harness's only I/O: mutual-TLS connections to the endpoint under test (Trio).

A :class:`Wire` sends frames as given (well-formed messages through
``frproto.codec.encode_frame``, hostile bytes as they are: the harness must be able to send
what a conforming ``frproto.Connection`` never would) and reads the endpoint's frames
one at a time, decoding each with ``frproto.codec.decode_frame``. No state machine runs here:
checking the endpoint's answers is the scenarios' job. Every frame in either direction
goes into the scenario's transcript, which a failed check shows.
"""

from __future__ import annotations

import contextlib
import ssl
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

import frproto as fp

_ENVELOPE = struct.Struct(">HHI")
#: The largest frame an endpoint may send (a Chunk's; recovery sides never send one).
_MAX_BODY = fp.limits.CHUNK_HEADER_SIZE + fp.limits.MAX_CHUNK_DATA


class HarnessError(Exception):
    """The harness cannot go on with this step (no answer, connection lost, ...)."""


class NoAnswer(HarnessError):
    """The endpoint sent nothing within the timeout."""


@dataclass(frozen=True)
class Closed:
    """The endpoint ended the connection (cleanly or not: ``how`` says)."""

    how: str


@dataclass(frozen=True)
class Target:
    """Where and how to reach an endpoint.

    Attributes:
        host: address (or resolvable name) to connect to.
        port: TCP port.
        server_name: the TLS SNI name and the name its certificate must hold.
        ssl_context: a client context with the harness's certificate, key and CA.
        hosts: addresses for names the endpoint answers with (a broker's node names),
            for names that DNS does not resolve (tests, a lab).
        timeout: seconds to wait for each answer.
        no_sni_context: ``ssl_context`` without the check of the endpoint's name.
    """

    host: str
    port: int
    server_name: str
    ssl_context: ssl.SSLContext
    hosts: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 10.0
    #: The same identity, not checking the endpoint's name: for a connection that sends no
    #: SNI (a primary reaching it by IP address, TLS-12). None: not checked.
    no_sni_context: ssl.SSLContext | None = None

    def elsewhere(self, server_name: str, port: int) -> Target:
        """The same harness identity pointed at another endpoint (a broker's node)."""
        host = self.hosts.get(server_name.lower().rstrip("."), server_name)
        return replace(self, host=host, port=port, server_name=server_name)

    def with_context(self, ssl_context: ssl.SSLContext) -> Target:
        """The same endpoint reached with another client identity."""
        return replace(self, ssl_context=ssl_context)

    def describe(self) -> str:
        return f"{self.server_name} ({self.host}:{self.port})"


def client_context(cert: Path, key: Path, ca: Path, *, check_name: bool = True) -> ssl.SSLContext:
    """A TLS 1.3 client context presenting ``cert`` and trusting only ``ca``; with
    ``check_name`` False it does not check the endpoint's name (for a connection without
    SNI: the chain to ``ca`` is still checked)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = check_name
    context.load_cert_chain(str(cert), str(key))
    return context


class HalfClosingTLS(trio.abc.HalfCloseableStream):
    """TLS over TCP through :class:`ssl.SSLObject`, whose :meth:`send_eof` sends TLS's
    ``close_notify`` and goes on reading: the end of the stream inside a frame, which
    some error vectors need (``"eof": true``), while the endpoint's Error can still
    come back. (:class:`trio.SSLStream` has no half-close; TLS 1.3 allows one.)"""

    def __init__(
        self, transport: trio.SocketStream, context: ssl.SSLContext, server_name: str
    ) -> None:
        self.transport_stream = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_hostname=server_name)

    async def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            await self.transport_stream.send_all(data)

    async def _feed(self) -> None:
        data = await self.transport_stream.receive_some(65536)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()  # the next read raises SSLEOFError or ZeroReturn

    async def do_handshake(self) -> None:
        """The TLS handshake (the peer's certificate and name checked by the context)."""
        while True:
            try:
                self._ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._feed()
        await self._flush()

    def version(self) -> str | None:
        return self._ssl.version()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._ssl.write(data)
        await self._flush()

    async def send_eof(self) -> None:
        """Send ``close_notify``: the end of what we send; reading goes on."""
        with contextlib.suppress(ssl.SSLWantReadError):
            self._ssl.unwrap()  # writes close_notify, then would wait for the peer's
        await self._flush()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            try:
                return self._ssl.read(max_bytes or 65536)
            except ssl.SSLWantReadError:
                await self._flush()  # a post-handshake message may want an answer
                await self._feed()
            except ssl.SSLZeroReturnError:
                return b""  # the peer's close_notify
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS failed: {exc}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


class Wire:
    """One connection to an endpoint (see the module docstring)."""

    def __init__(
        self,
        stream: trio.SSLStream[trio.SocketStream] | HalfClosingTLS,
        target: Target,
    ) -> None:
        self._stream = stream
        self.target = target
        self.transcript: list[str] = []
        self._buffer = bytearray()
        self._eof = False

    def _note(self, line: str) -> None:
        self.transcript.append(f"[{self.target.server_name}] {line}")

    async def send(self, message: fp.Message) -> None:
        """Send one well-formed message."""
        await self._write(fp.codec.encode_frame(message), fp.jsonable.describe(message))

    async def send_raw(self, data: bytes, what: str) -> None:
        """Send bytes as they are (a hostile frame, part of one, several frames)."""
        await self._write(data, what)

    async def _write(self, data: bytes, what: str) -> None:
        shown = data.hex() if len(data) <= 64 else data[:64].hex() + f"... ({len(data)} bytes)"
        self._note(f"-> {what}: {shown}")
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._note(f"   (send failed: the connection is gone: {exc!r})")
            raise HarnessError(f"sending {what}: the connection is gone") from None

    async def send_eof(self) -> None:
        """End what we send with TLS's ``close_notify`` (a connection made with
        ``half_close=True``), and keep reading what the endpoint answers."""
        if not isinstance(self._stream, HalfClosingTLS):
            raise TypeError("send_eof needs a connection made with half_close=True")
        self._note("-> (close_notify: the end of our stream)")
        try:
            await self._stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._note(f"   (send failed: the connection is gone: {exc!r})")
            raise HarnessError("sending close_notify: the connection is gone") from None

    async def receive(self) -> fp.Message | Closed:
        """The endpoint's next frame, decoded; :class:`Closed` at the end of the stream.

        Raises:
            NoAnswer: nothing within the target's timeout.
            HarnessError: the endpoint sent bytes that are not a valid frame.
        """
        with trio.move_on_after(self.target.timeout):
            return await self._receive()
        self._note(f"<- (nothing within {self.target.timeout:g} s)")
        raise NoAnswer(f"no answer from {self.target.describe()} within {self.target.timeout:g} s")

    async def _receive(self) -> fp.Message | Closed:
        if not await self._fill(_ENVELOPE.size):
            return self._closed_between_frames()
        _reserved, _tag, length = _ENVELOPE.unpack_from(self._buffer)
        if length > _MAX_BODY:
            self._note(f"<- envelope {bytes(self._buffer[:8]).hex()} declares {length} bytes")
            raise HarnessError(f"the endpoint sent a frame of {length} bytes (over any limit)")
        size = _ENVELOPE.size + length
        if not await self._fill(size):
            self._note(f"<- {bytes(self._buffer).hex()} then the end of the stream")
            raise HarnessError("the endpoint closed the connection inside a frame")
        frame = bytes(self._buffer[:size])
        del self._buffer[:size]
        try:
            message = fp.codec.decode_frame(frame)
        except fp.FrprotoError as exc:
            self._note(f"<- undecodable frame {frame[:64].hex()}: {exc}")
            raise HarnessError(f"the endpoint sent an invalid frame: {exc}") from None
        if not isinstance(message, fp.Message):  # an ignorable tag this version lacks
            tag, _body = message
            self._note(f"<- (ignorable tag {tag:#06x}, skipped)")
            return await self._receive()
        self._note(f"<- {fp.jsonable.describe(message)}")
        return message

    def _closed_between_frames(self) -> Closed:
        how = "end of stream" if not self._buffer else f"end of stream after {self._buffer.hex()}"
        self._note(f"<- ({how})")
        return Closed(how)

    async def _fill(self, size: int) -> bool:
        """Read until the buffer holds ``size`` bytes; False at the end of the stream."""
        while len(self._buffer) < size:
            if self._eof:
                return False
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                # A reset, or a TLS alert: the connection is over all the same.
                cause = exc.__cause__ or exc
                self._note(f"<- (connection ended: {cause!r})")
                self._eof = True
                return False
            if not data:
                self._eof = True
                return False
            self._buffer += data
        return True

    async def closed_by_peer(self) -> bool:
        """Whether the endpoint closes the connection within the timeout, reading (and
        recording) whatever it still sends first."""
        with trio.move_on_after(self.target.timeout):
            while True:
                event = await self._receive()
                if isinstance(event, Closed):
                    return True
        self._note(f"   (still open after {self.target.timeout:g} s)")
        return False

    async def aclose(self) -> None:
        """Close our side (quietly: the endpoint may be gone already)."""
        with (
            trio.move_on_after(1),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
        ):
            await self._stream.aclose()


async def connect(
    target: Target,
    transcript: list[str] | None = None,
    *,
    half_close: bool = False,
    sni: bool = True,
) -> Wire:
    """Open a TCP connection to ``target`` and do the TLS handshake with SNI;
    ``half_close``: over :class:`HalfClosingTLS`, so that :meth:`Wire.send_eof` works;
    ``sni`` False: without SNI, and without checking the endpoint's name.

    Raises:
        HarnessError: cannot connect, or the handshake fails (a certificate the CA does
            not vouch for, a name it does not hold, ...).
    """
    try:
        with trio.fail_after(target.timeout):
            tcp = await trio.open_tcp_stream(target.host, target.port)
            stream: trio.SSLStream[trio.SocketStream] | HalfClosingTLS
            if not sni:
                if target.no_sni_context is None:
                    await trio.aclose_forcefully(tcp)
                    raise HarnessError("no client context for a connection without SNI")
                stream = trio.SSLStream(tcp, target.no_sni_context, server_hostname=None)
            elif half_close:
                stream = HalfClosingTLS(tcp, target.ssl_context, target.server_name)
            else:
                stream = trio.SSLStream(tcp, target.ssl_context, server_hostname=target.server_name)
            try:
                await stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(tcp)
                raise
    except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        # (ssl.SSLError is an OSError: HalfClosingTLS's handshake raises it as it is.)
        cause = exc.__cause__ or exc
        if isinstance(cause, ssl.SSLError):
            raise HarnessError(f"TLS handshake with {target.describe()} failed: {cause}") from None
        raise HarnessError(f"cannot reach {target.describe()}: {cause}") from None
    wire = Wire(stream, target)
    if transcript is not None:
        wire.transcript = transcript
    wire._note(f"connected, TLS {stream.version()}")
    return wire


async def connect_plain(target: Target) -> trio.SocketStream:
    """A TCP connection with no TLS at all (to check how the endpoint refuses it)."""
    try:
        with trio.fail_after(target.timeout):
            return await trio.open_tcp_stream(target.host, target.port)
    except (OSError, trio.TooSlowError) as exc:
        raise HarnessError(f"cannot reach {target.describe()}: {exc}") from None
