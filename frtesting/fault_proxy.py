"""A loopback TCP proxy that breaks the connections it carries, on a seeded schedule.

:class:`FaultProxy` listens on a 127.x address and forwards each connection to a real
recovery server; a primary pointed at the proxy instead of the server sees the network
fail under it. The proxy sits below TLS: it forwards the TLS records as they are, so the
handshake and the mutual authentication are the real ones, end to end.

Each new connection asks the :class:`FaultSchedule` for a :class:`Fault` (or none). A
fault starts where the primary's stream (primary to server) passes ``at_byte``, chosen
past the TLS handshake, the negotiation and the relationship's opening, so it falls inside
a delta batch (the test makes each connection carry more than that). The kinds:

* ``cut``: the primary's stream stops at ``at_byte`` and both sides are closed: the server
  sees its stream end (FIN) mid-batch; the primary's side is closed with the rest of its
  batch unread, which the kernel answers with an RST;
* ``stall``: nothing is forwarded either way for ``duration`` seconds, then the connection
  carries on (``close`` False) or is closed; from ``at_byte`` on, or (``on_answer``) from
  the server's next write after it, so that the Ack waits;
* ``truncate``: the server's next write after that point (the batch's Ack, most often)
  is forwarded only in part, then both sides are closed: the server made the batch
  durable and acknowledged it, the primary never learns it (it resends the batch);
* ``trickle``: for ``duration`` seconds both directions move ``rate`` bytes per tick
  (:data:`TICK`), then full speed again;
* ``reset``: both sockets are closed with ``SO_LINGER`` 0, which sends a TCP RST each way.

A fault whose point the connection never reaches (it carried less) is not counted:
:attr:`FaultProxy.triggered` counts only the faults that happened, and
:attr:`FaultProxy.events` says what was done to which connection (also logged, on the
``frtesting.fault_proxy`` logger). The schedule is seeded (``random.Random(seed)``); the
moments are real time, so a run is repeatable in its choices, not byte for byte.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import random
import socket
import struct
from dataclasses import dataclass
from typing import Any, Protocol

import trio

log = logging.getLogger("frtesting.fault_proxy")

#: Bytes read from a socket at once.
READ_SIZE = 65536
#: A trickle moves ``rate`` bytes every TICK seconds.
TICK = 0.01
#: How far into the primary's stream a fault may start at the earliest: past the TLS
#: handshake (client certificate included), NegotiateRequest and RelationshipOpen, which
#: take a few KiB.
FIRST_FAULT_BYTE = 16 * 1024


class FaultKind(enum.Enum):
    """What a fault does to a connection (the module's docstring)."""

    CUT = "cut"
    STALL = "stall"
    TRUNCATE = "truncate"
    TRICKLE = "trickle"
    RESET = "reset"


@dataclass(frozen=True, slots=True)
class Fault:
    """The fault of one connection."""

    kind: FaultKind
    #: Bytes of the primary's stream forwarded before the fault starts.
    at_byte: int
    #: ``stall`` and ``trickle``: how long, in seconds.
    duration: float = 0.0
    #: ``stall``: close the connection at its end (else forwarding resumes).
    close: bool = False
    #: ``trickle``: bytes per tick.
    rate: int = 0
    #: The fault starts at the server's first write after ``at_byte`` (the answer to what
    #: the primary sent, often an Ack) rather than at ``at_byte`` (``truncate``: always).
    on_answer: bool = False

    def __str__(self) -> str:
        text = f"{self.kind.value} at byte {self.at_byte}"
        if self.kind is FaultKind.STALL:
            text += f" for {self.duration:.2f} s, then {'close' if self.close else 'resume'}"
        if self.on_answer:
            text += ", at the answer"
        elif self.kind is FaultKind.TRICKLE:
            text += f", {self.rate} B per {TICK * 1000:.0f} ms for {self.duration:.2f} s"
        return text


class Schedule(Protocol):
    """What the proxy asks of a schedule (:class:`FaultSchedule`, or a test's own)."""

    def next_fault(self, triggered: collections.Counter[FaultKind]) -> Fault | None:
        """The fault of the next connection (None: none); ``triggered``: the faults of
        each kind that happened so far."""
        ...


class FaultSchedule:
    """Which connection gets which fault: seeded, each kind in turn by how often it has
    happened (the least first), ``clean`` connections without a fault between two that
    have one (so that the primary's backoff starts over), none until :attr:`enabled`.

    ``span``: the fault point falls in ``[FIRST_FAULT_BYTE, FIRST_FAULT_BYTE + span)`` of
    the primary's stream (the test makes each connection carry at least that much).
    """

    def __init__(
        self,
        seed: int,
        *,
        kinds: tuple[FaultKind, ...] = tuple(FaultKind),
        span: int = 256 * 1024,
        clean: int = 1,
    ) -> None:
        self.rng = random.Random(seed)
        self.kinds = kinds
        self.span = span
        self.clean = clean
        self.enabled = False
        self._since_fault = clean

    def next_fault(self, triggered: collections.Counter[FaultKind]) -> Fault | None:
        """The fault of the next connection (None: forward it untouched)."""
        if not self.enabled:
            return None
        if self._since_fault < self.clean:
            self._since_fault += 1
            return None
        self._since_fault = 0
        fewest = min(triggered[k] for k in self.kinds)
        kind = self.rng.choice([k for k in self.kinds if triggered[k] == fewest])
        at_byte = FIRST_FAULT_BYTE + self.rng.randrange(self.span)
        if kind is FaultKind.STALL:
            duration, close = self.rng.uniform(0.2, 2.0), self.rng.random() < 0.5
            return Fault(kind, at_byte, duration, close, on_answer=self.rng.random() < 0.5)
        if kind is FaultKind.TRICKLE:
            return Fault(
                kind, at_byte, self.rng.uniform(0.3, 1.5), rate=self.rng.choice([16, 64, 512, 4096])
            )
        return Fault(kind, at_byte)


@dataclass(frozen=True, slots=True)
class ProxyEvent:
    """One thing the proxy did: ``what`` is ``accepted``, a :class:`FaultKind` value
    (the fault happened), ``missed`` (the connection ended before its fault point) or
    ``closed``."""

    connection: int
    what: str
    detail: str


class _Close(Exception):
    """Internal: a fault ends the connection (``reset``: with an RST)."""

    def __init__(self, reset: bool) -> None:
        super().__init__("reset" if reset else "close")
        self.reset = reset


class _Connection:
    """One proxied connection: two pumps and the fault between them."""

    def __init__(
        self, proxy: FaultProxy, number: int, fault: Fault | None, downstream: trio.SocketStream
    ) -> None:
        self.proxy = proxy
        self.number = number
        self.fault = fault
        self.downstream = downstream  # the primary's side
        self.up_bytes = 0  # of the primary's stream, forwarded
        self.started = False
        self.answer_armed = False  # the fault waits for the server's next write
        self.stall_until = 0.0
        self.trickle_until = 0.0
        self.close: _Close | None = None

    def arm_at_answer(self, fault: Fault) -> None:
        """``fault`` starts at the server's next write (see
        :meth:`FaultProxy.truncate_next_answer`)."""
        self.fault, self.started, self.answer_armed = fault, True, True

    def _happened(self, detail: str) -> None:
        assert self.fault is not None
        self.proxy.triggered[self.fault.kind] += 1
        self.proxy.record(self.number, self.fault.kind.value, detail)

    async def run(self) -> None:
        try:
            upstream = await trio.open_tcp_stream(
                self.proxy.upstream_host, self.proxy.upstream_port
            )
        except OSError as exc:
            self.proxy.record(self.number, "closed", f"upstream unreachable: {exc}")
            await trio.aclose_forcefully(self.downstream)
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    self._pump, self.downstream, upstream, True, nursery.cancel_scope
                )
                nursery.start_soon(
                    self._pump, upstream, self.downstream, False, nursery.cancel_scope
                )
        finally:
            if self.close is not None and self.close.reset:
                for stream in (self.downstream, upstream):
                    with contextlib.suppress(OSError):
                        stream.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
            await trio.aclose_forcefully(self.downstream)
            await trio.aclose_forcefully(upstream)
            if self.fault is not None and (not self.started or self.answer_armed):
                self.proxy.record(
                    self.number, "missed", f"{self.fault}: ended at byte {self.up_bytes}"
                )
            self.proxy.record(self.number, "closed", f"{self.up_bytes} bytes from the primary")

    async def _pump(
        self, src: trio.SocketStream, dst: trio.SocketStream, up: bool, scope: trio.CancelScope
    ) -> None:
        """Forward ``src`` to ``dst`` until the end of ``src`` (passed on as a half-close)
        or a fault; a fault or a broken side ends both directions."""
        try:
            while True:
                data = await src.receive_some(READ_SIZE)
                if not data:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await dst.send_eof()
                    return
                await self._forward(bytes(data), dst, up)
        except _Close as close:
            self.close = close
            scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            scope.cancel()

    async def _forward(self, data: bytes, dst: trio.SocketStream, up: bool) -> None:
        fault = self.fault
        if (
            fault is not None
            and not self.started
            and up
            and self.up_bytes + len(data) > fault.at_byte
        ):
            head = fault.at_byte - self.up_bytes
            await self._send(data[:head], dst, up)
            data = data[head:]
            self.started = True
            if fault.kind is FaultKind.TRUNCATE or fault.on_answer:
                self.answer_armed = True  # it starts at the server's next write
            else:
                await self._start(fault, "")  # may raise _Close
        elif self.answer_armed and not up:
            assert fault is not None
            self.answer_armed = False
            if fault.kind is FaultKind.TRUNCATE:
                # The server's first write after the fault point: forward a part of it.
                keep = self.proxy.rng.randrange(len(data))
                await self._send(data[:keep], dst, up)
                self._happened(f"{fault}: {keep} of {len(data)} bytes from the server forwarded")
                raise _Close(reset=False)
            await self._start(fault, f", before the server's next {len(data)} bytes")
        await self._send(data, dst, up)

    async def _start(self, fault: Fault, where: str) -> None:
        self._happened(f"{fault}{where}")
        if fault.kind is FaultKind.CUT:
            raise _Close(reset=False)
        if fault.kind is FaultKind.RESET:
            raise _Close(reset=True)
        now = trio.current_time()
        if fault.kind is FaultKind.TRICKLE:
            self.trickle_until = now + fault.duration
            return
        self.stall_until = now + fault.duration
        await trio.sleep_until(self.stall_until)
        if fault.close:
            raise _Close(reset=False)

    async def _send(self, data: bytes, dst: trio.SocketStream, up: bool) -> None:
        """Send ``data`` on, after a stall, at a trickle's pace while it lasts."""
        while data:
            if trio.current_time() < self.stall_until:
                await trio.sleep_until(self.stall_until)
            piece = data
            if trio.current_time() < self.trickle_until:
                assert self.fault is not None
                piece = data[: self.fault.rate]
            await dst.send_all(piece)
            if up:
                self.up_bytes += len(piece)
            data = data[len(piece) :]
            if data:
                await trio.sleep(TICK)


class FaultProxy:
    """Forwards connections made to ``listen_host`` to ``upstream_host:upstream_port``,
    with the faults ``schedule`` gives (the module's docstring)."""

    def __init__(
        self,
        listen_host: str,
        upstream_host: str,
        upstream_port: int,
        schedule: Schedule,
        *,
        seed: int = 0,
    ) -> None:
        self.listen_host = listen_host
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.schedule = schedule
        #: For the parts of a fault chosen as it happens (how much of a write to keep).
        self.rng = random.Random(seed)
        self.port = 0
        self.triggered: collections.Counter[FaultKind] = collections.Counter()
        self.events: list[ProxyEvent] = []
        self._connections = 0
        self._live: set[_Connection] = set()

    def record(self, connection: int, what: str, detail: str) -> None:
        self.events.append(ProxyEvent(connection, what, detail))
        log.info("connection %d: %s: %s", connection, what, detail)

    def counts(self) -> dict[str, Any]:
        """What happened: connections, and the faults of each kind and those missed."""
        return {
            "connections": self._connections,
            **{k.value: self.triggered[k] for k in FaultKind},
            "missed": sum(1 for e in self.events if e.what == "missed"),
        }

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen (on any free port of ``listen_host``: :attr:`port`, also given to
        ``task_status``) and proxy until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host=self.listen_host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)

    async def _handle(self, downstream: trio.SocketStream) -> None:
        self._connections += 1
        number = self._connections
        fault = self.schedule.next_fault(self.triggered)
        self.record(number, "accepted", str(fault) if fault else "no fault")
        connection = _Connection(self, number, fault, downstream)
        self._live.add(connection)
        try:
            await connection.run()
        finally:
            self._live.discard(connection)

    def truncate_next_answer(self) -> int:
        """Arm every connection carried now: the server's next write on it is forwarded
        only in part and the connection closed (a ``truncate`` fault from here), so that
        the answer to what the primary sends next is lost after the server sent it. For a
        test that knows, in-process, when that moment comes (a schedule picks its fault
        point in bytes, blind to the messages). Returns how many connections were armed."""
        for connection in self._live:
            connection.arm_at_answer(Fault(FaultKind.TRUNCATE, connection.up_bytes))
        return len(self._live)
