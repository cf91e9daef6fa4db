"""Where a connection is accepted: TLS handshake, then the peer's NegotiateRequest.

Shared by the recovery server (and cluster node) and the broker at the CAP. A client that
speaks frproto without TLS gets the protocol's NOT_AUTHORIZED Error in plain text, then
the connection closes: it is told why instead of seeing a TLS alert it cannot read. After
the handshake the peer's certificate names are matched by ``authorize``; a peer that
matches nothing gets a NegotiateResponse with status NOT_AUTHORIZED, built like every
other refusal by :func:`frproto.refuse_negotiation` (NEG-12).
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio

import frproto as fp
from frproto.trio_io import ERROR_SEND_TIMEOUT, LINGER_SECONDS, FramedStream, linger_and_close

from .biotls import transport_receive_into, transport_wait_readable
from .connections import ConnectionPolicy
from .tls import TLSFailure, peer_names, requested_name, tls_handshake_server

log = logging.getLogger("frrep.accept")

#: Time allowed for the TLS handshake and the NegotiateRequest, by default (TIM-1).
HANDSHAKE_TIMEOUT = ConnectionPolicy().negotiate_timeout
_TLS_HANDSHAKE_RECORD = 0x16
#: Bytes asked of the TCP socket per read when TLS refills its input (see _Replay).
TRANSPORT_RECEIVE_SIZE = 1024 * 1024

G = TypeVar("G")


class _Replay(trio.abc.Stream):
    """A stream that first returns bytes already read from ``inner`` (after a peek)."""

    def __init__(self, inner: trio.abc.Stream, head: bytes) -> None:
        self._inner = inner
        self._head = head
        self._inner_receive_into = transport_receive_into(inner)
        self._inner_wait_readable = transport_wait_readable(inner)

    @property
    def socket(self) -> Any:
        """The inner stream's socket (its peer address names the peer), if it has one."""
        return getattr(self._inner, "socket", None)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._head:
            head, self._head = self._head, b""
            return head
        # Performance: a TLS stream may refill with receive_some() (no size), which trio's
        # SocketStream serves 64 KiB at a time; reading up to TRANSPORT_RECEIVE_SIZE per
        # call cuts the socket reads and trio round trips of a bulk IR (perf-baselines,
        # "BigRecv"). Only the size of the raw read changes, never the bytes delivered.
        return await self._inner.receive_some(max_bytes or TRANSPORT_RECEIVE_SIZE)

    async def wait_readable(self) -> None:
        """Return once a read would not wait (see ``frlink.biotls.transport_wait_readable``)."""
        if self._head or self._inner_wait_readable is None:
            await trio.lowlevel.checkpoint()
            return
        await self._inner_wait_readable()

    async def receive_into(self, buffer: memoryview) -> int:
        """Read into ``buffer`` (see ``frlink.biotls.transport_receive_into``)."""
        if self._head:
            n = min(len(self._head), len(buffer))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        if self._inner_receive_into is None:
            data = await self.receive_some(len(buffer))
            buffer[: len(data)] = data
            return len(data)
        return await self._inner_receive_into(buffer)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass
class Accepted(Generic[G]):
    """A negotiated, authorized connection."""

    conn: FramedStream
    grant: G
    names: Sequence[str]  #: the peer certificate's names
    request: fp.NegotiateRequest
    requested_name: str | None = None  #: the name the client asked for (SNI)


#: Chooses, from the name the client asked for (SNI), what answers: the policy and the
#: authorization to apply (a cluster node's listener also answers for the CAP).
Router = Callable[[str | None], tuple[fp.ServerPolicy, Callable[[Sequence[str]], Any]]]


async def accept(
    raw: trio.abc.Stream,
    ssl_context: ssl.SSLContext,
    policy: fp.ServerPolicy,
    authorize: Callable[[Sequence[str]], G],
    *,
    what: str = "this recovery server",
    route: Router | None = None,
    refused: Callable[[str], None] | None = None,
    connections: ConnectionPolicy | None = None,
    handshaken: Callable[[], None] | None = None,
) -> Accepted[G] | None:
    """Handshake and negotiate on ``raw``; None when the connection was refused (and
    answered as it should be). ``authorize`` maps certificate names to a grant or raises
    a :class:`frproto.ReplicationError` (its code becomes the negotiation's status).
    ``route``, if given, replaces ``policy`` and ``authorize`` by what it returns for the
    name the client asked for. ``refused``, if given, is told why a connection was
    refused (``no_tls``, ``tls``, or the negotiation's status code name in lower case:
    a bounded set, for a metric). ``connections`` gives the deadlines (section 10.2):
    the TLS handshake and the NegotiateRequest must be done within its
    ``negotiate_timeout`` (TIM-1, TIM-2), and the returned connection's reads are bounded
    by its idle and frame deadlines (TIM-3 to TIM-5). ``handshaken``, if given, is called
    once the TLS handshake is done (the connection leaves the gate's handshaking count).

    Raises:
        frproto.trio_io.PeerIdle: the NegotiateRequest did not come in time (the Error
            was sent and the connection closed).
    """
    tell = refused or (lambda reason: None)
    policy_of_times = connections or ConnectionPolicy()
    deadline = trio.current_time() + policy_of_times.negotiate_timeout
    with trio.move_on_at(deadline):
        head = await raw.receive_some(1)
    if trio.current_time() >= deadline:
        # Not even TLS started: close without a frame (TIM-1).
        log.info("closed a connection that sent nothing before the negotiation deadline")
        tell("negotiation_deadline")
        return None
    # The answer's send, and the Error's and the lingering close after a deadline, are
    # bounded too.
    with trio.fail_at(deadline + ERROR_SEND_TIMEOUT + LINGER_SECONDS + 1.0):
        if not head:
            return None
        if head[0] != _TLS_HANDSHAKE_RECORD:
            log.warning("refused a connection without TLS")
            tell("no_tls")
            conn = fp.Connection(fp.Role.RECOVERY)
            error = fp.NotAuthorized(f"{what} requires mutual TLS with certificates")
            await raw.send_all(conn.send_error(error))
            await linger_and_close(raw)
            return None
        try:
            tls = await tls_handshake_server(
                _Replay(raw, bytes(head)),
                ssl_context,
                timeout=max(0.0, deadline - trio.current_time()),
            )
        except TLSFailure as exc:
            log.warning("TLS handshake refused: %s", exc)
            tell("tls")
            return None
        if handshaken is not None:
            handshaken()
        names = peer_names(tls)
        sni = requested_name(tls)
        if route is not None:
            policy, authorize = route(sni)
        framed = FramedStream(
            tls,
            fp.Connection(fp.Role.RECOVERY),
            idle_timeout=policy_of_times.idle_timeout,
            frame_timeout=policy_of_times.frame_timeout,
        )
        # The NegotiateRequest must be complete by the deadline: past it, an Error BUSY
        # (TRUNCATED inside a frame) and the close (TIM-2), by FramedStream.
        framed.deadline = deadline
        request = await framed.expect(fp.NegotiateRequest)
        assert isinstance(request, fp.NegotiateRequest)
        framed.deadline = math.inf
        try:
            grant = authorize(names)
        except fp.ReplicationError as exc:
            log.warning("%s", exc)
            tell(type(exc).code.name.lower())
            # The one refusal of every kind (NEG-12): nothing the server would have chosen.
            await framed.send(fp.refuse_negotiation(request, policy, type(exc).code))
            return None
        answer = fp.answer_negotiation(request, policy)
        await framed.send(answer)
        if not answer.ok:
            tell(fp.ErrorCode(answer.status).name.lower())
            return None
    return Accepted(framed, grant, names, request, sni)
