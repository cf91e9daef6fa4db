"""A listener's deadlines and connection limits (``docs/protocol.md`` section 10.2).

Shared by the recovery server (and cluster node) and the broker at the CAP:

* :class:`ConnectionPolicy`: the negotiation deadline, the idle deadlines by state, the
  frame deadline, the recovery side's Keepalive interval, and the bounds on connections
  (in all, per peer address, not yet negotiated, not yet through the TLS handshake).
  Read from the ``[connections]`` table of a server's or node's file
  (:func:`connection_policy`, ``docs/configuration.md``).
* :class:`Gate`: counts a listener's connections and refuses one over a bound. A refused
  connection is closed at once, before the TLS handshake, with nothing read or sent
  (TIM-12): answering it (a TLS handshake, then a negotiation refused with BUSY) would
  spend on every refused connection the handshake CPU and the time a flood is after, and a
  primary treats a closed connection as it treats BUSY: it tries again later.

Cost of a connection held (for the bounds, measured by ``bench/connections.py``): about
8 KiB before TLS, about 35 KiB with the TLS state, before and after the negotiation;
buffers of large frames and of TLS refills are taken from pools only while bytes flow
(``frproto.trio_io``, ``frlink.biotls``), so an idle connection holds none, and a stalled
frame holds what came of it (at most ``MAX_CONTROL_BODY``, ``MAX_CHUNK_DATA`` + header).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

import frproto as fp
from frproto import limits

from . import memory
from .config_keys import Table

log = logging.getLogger("frrep.connections")

#: The idle deadline that applies in each state with a relationship open, between frames.
SESSION_STATES = frozenset({fp.State.SESSION, fp.State.IR, fp.State.BATCH})
#: States in which the primary awaits the recovery side's answer (its Keepalives then).
ANSWERING_STATES = frozenset(
    {
        fp.State.QUERYING,
        fp.State.OPENING,
        fp.State.IR_ENDING,
        fp.State.BATCH_ENDING,
        fp.State.DIGESTS,
        fp.State.DELETING,
        fp.State.FAILING_OVER,
    }
)


@dataclass(frozen=True, slots=True)
class ConnectionPolicy:
    """Deadlines (seconds) and bounds of a listener; the defaults are the protocol's."""

    #: From the TCP accept to a complete NegotiateRequest (TLS handshake included).
    negotiate_timeout: float = float(limits.NEGOTIATE_TIMEOUT)
    #: Nothing received for this long in READY, between frames: Error BUSY, close.
    ready_timeout: float = float(limits.READY_TIMEOUT)
    #: Nothing received for this long with a relationship open (SESSION, IR, BATCH),
    #: between frames: Error BUSY, close.
    session_timeout: float = float(limits.SESSION_TIMEOUT)
    #: No byte for this long inside a frame: Error TRUNCATED, close.
    frame_timeout: float = float(limits.FRAME_TIMEOUT)
    #: While the primary awaits our answer, a Keepalive when nothing was sent this long.
    keepalive: float = float(limits.KEEPALIVE_INTERVAL)
    #: Connections held at once, in all.
    max_connections: int = 512
    #: Connections held at once from one peer address.
    max_per_address: int = 128
    #: Connections held at once that have not negotiated yet.
    max_negotiating: int = 128
    #: Connections held at once that have not completed the TLS handshake yet (a subset
    #: of the not negotiated ones): the cheapest state to hold many of.
    max_handshaking: int = 64

    def idle_timeout(self, state: fp.State) -> float | None:
        """The idle deadline between frames in ``state`` (None: none applies there)."""
        if state is fp.State.READY:
            return self.ready_timeout
        if state in SESSION_STATES:
            return self.session_timeout
        return None


#: The ``[connections]`` table of a recovery server's or node's file.
CONNECTIONS_TABLE = Table(
    {
        "negotiate_timeout": float,
        "ready_timeout": float,
        "session_timeout": float,
        "frame_timeout": float,
        "keepalive": float,
        "max": int,
        "max_per_address": int,
        "max_negotiating": int,
        "max_handshaking": int,
    }
)

_SECONDS = (
    ("negotiate_timeout", "negotiate_timeout"),
    ("ready_timeout", "ready_timeout"),
    ("session_timeout", "session_timeout"),
    ("frame_timeout", "frame_timeout"),
    ("keepalive", "keepalive"),
)
_COUNTS = (
    ("max", "max_connections"),
    ("max_per_address", "max_per_address"),
    ("max_negotiating", "max_negotiating"),
    ("max_handshaking", "max_handshaking"),
)


def connection_policy(data: dict[str, Any], path: Path) -> ConnectionPolicy:
    """The ``[connections]`` table of a loaded file (defaults for what it leaves out).

    Raises:
        ValueError: a value out of range (the message names the key).
    """
    table = data.get("connections", {})
    where = f"{path}: [connections]"
    values: dict[str, Any] = {}
    for key, attr in _SECONDS:
        if key in table:
            value = float(table[key])
            if not 0.05 <= value <= 86400 or math.isnan(value):
                raise ValueError(f"{where} {key} must be 0.05-86400 seconds")
            values[attr] = value
    for key, attr in _COUNTS:
        if key in table:
            count = table[key]
            if not isinstance(count, int) or not 1 <= count <= 1_000_000:
                raise ValueError(f"{where} {key} must be 1-1000000")
            values[attr] = count
    defaults = ConnectionPolicy()
    total = values.get("max_connections", defaults.max_connections)
    for key, attr in _COUNTS[1:]:
        if attr not in values:  # a default above a lower max: the max
            values[attr] = min(total, getattr(defaults, attr))
        elif values[attr] > total:
            raise ValueError(f"{where} {key} must not exceed max")
    return ConnectionPolicy(**values)


def peer_address(stream: trio.abc.Stream) -> str:
    """The peer's IP address of an accepted stream ("" when it has none)."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return ""
    try:
        return str(sock.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return ""


#: Refusals are logged at most once per this many seconds, with their count (a flood of
#: refused connections must not become a flood of log lines).
REFUSAL_LOG_INTERVAL = 10.0
#: Freed memory is handed back to the system (``malloc_trim``) at most this often.
TRIM_INTERVAL = 1.0


@dataclass
class Admission:
    """A connection the gate let in (see :meth:`Gate.admit`)."""

    gate: Gate
    address: str
    negotiating: bool = True
    handshaking: bool = True

    def handshaken(self) -> None:
        """The TLS handshake is done: no longer counts against ``max_handshaking``."""
        if self.handshaking:
            self.handshaking = False
            self.gate.handshaking -= 1

    def negotiated(self) -> None:
        """The connection negotiated: it no longer counts against ``max_negotiating``."""
        self.handshaken()
        if self.negotiating:
            self.negotiating = False
            self.gate.negotiating -= 1


def _trio_clock() -> float:
    """Trio's clock inside Trio (the one its sleeps use), monotonic time outside it."""
    try:
        return trio.current_time()
    except RuntimeError:
        return time.monotonic()


@dataclass
class Gate:
    """Counts a listener's connections against its :class:`ConnectionPolicy`'s bounds.

    A refused connection costs a counter and, once per :data:`REFUSAL_LOG_INTERVAL`, one
    log line that says how many were refused since the last one. When connections close,
    the memory they freed is handed back to the system (:func:`frlink.memory.trim`, at
    most once per :data:`TRIM_INTERVAL`, a close within it trimmed at its end by a
    Trio system task): otherwise the C allocator keeps it and the process stays at its
    peak size.
    """

    policy: ConnectionPolicy
    total: int = 0
    negotiating: int = 0
    handshaking: int = 0
    by_address: Counter[str] = field(default_factory=Counter)
    #: Connections refused at a bound so far (by bound: total, address, negotiating,
    #: handshaking).
    refused: Counter[str] = field(default_factory=Counter)
    #: Monotonic seconds: Trio's clock, the one ``_trim_later`` sleeps on (a simulation's
    #: MockClock drives both); a test may substitute its own.
    clock: Callable[[], float] = _trio_clock
    #: Hands freed memory back to the system (a test may count the calls).
    trim: Callable[..., object] = memory.trim
    _refusals_unlogged: int = 0
    _logged_at: float = -math.inf
    _trimmed_at: float = -math.inf
    _trim_due: bool = False

    def _over(self, address: str) -> str:
        if self.total >= self.policy.max_connections:
            return "total"
        if self.by_address[address] >= self.policy.max_per_address:
            return "address"
        if self.negotiating >= self.policy.max_negotiating:
            return "negotiating"
        if self.handshaking >= self.policy.max_handshaking:
            return "handshaking"
        return ""

    def _log_refusal(self, over: str, address: str) -> None:
        self._refusals_unlogged += 1
        now = self.clock()
        if now - self._logged_at < REFUSAL_LOG_INTERVAL:
            return
        log.warning(
            "%d connection(s) refused in the last %g s, the last from %s: %s bound reached "
            "(%d connections in all, %d from it, %d negotiating, %d handshaking)",
            self._refusals_unlogged,
            REFUSAL_LOG_INTERVAL,
            address or "?",
            over,
            self.total,
            self.by_address[address],
            self.negotiating,
            self.handshaking,
        )
        self._refusals_unlogged = 0
        self._logged_at = now

    def _closed(self) -> None:
        """A connection closed: trim now, or once the interval since the last trim is over
        (one delayed trim at a time)."""
        wait = self._trimmed_at + TRIM_INTERVAL - self.clock()
        if wait <= 0:
            self._trim_now()
        elif not self._trim_due:
            self._trim_due = True
            try:
                trio.lowlevel.spawn_system_task(self._trim_later, wait)
            except RuntimeError:  # outside Trio (a test)
                self._trim_now()

    async def _trim_later(self, wait: float) -> None:
        await trio.sleep(wait)
        self._trim_now()

    def _trim_now(self) -> None:
        self.trim(idle=self.total == 0)
        self._trimmed_at = self.clock()
        self._trim_due = False

    @contextlib.contextmanager
    def admit(self, stream: trio.abc.Stream) -> Iterator[Admission | None]:
        """Count ``stream`` while the block runs; None (nothing counted) when a bound is
        reached: the caller then closes it at once (TIM-12)."""
        address = peer_address(stream)
        over = self._over(address)
        if over:
            self.refused[over] += 1
            self._log_refusal(over, address)
            yield None
            return
        admission = Admission(self, address)
        self.total += 1
        self.negotiating += 1
        self.handshaking += 1
        self.by_address[address] += 1
        try:
            yield admission
        finally:
            admission.negotiated()
            self.total -= 1
            self.by_address[address] -= 1
            if not self.by_address[address]:
                del self.by_address[address]
            self._closed()
