"""A listener's deadlines and connection limits (``docs/protocol.md`` section 10.2).

Shared by the recovery server (and cluster node) and the broker at the CAP:

* :class:`ConnectionPolicy`: the negotiation deadline, the idle deadlines by state, the
  frame deadline, the recovery side's Keepalive interval, and the bounds on connections
  (in all, per peer address, not yet negotiated). Read from the ``[connections]`` table of
  a server's or node's file (:func:`connection_policy`, ``docs/configuration.md``).
* :class:`Gate`: counts a listener's connections and refuses one over a bound. A refused
  connection is closed at once, before the TLS handshake, with nothing read or sent
  (TIM-12): answering it (a TLS handshake, then a negotiation refused with BUSY) would
  spend on every refused connection the handshake CPU and the time a flood is after, and a
  primary treats a closed connection as it treats BUSY: it tries again later.

Cost of a connection held (for the bounds): one file descriptor; before negotiation the
TLS state (tens of KiB); after it a ``FramedStream`` (its receive buffers, at most one
frame: ``MAX_CHUNK_DATA`` + header while a chunk is read).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

import frproto as fp
from frproto import limits

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


@dataclass
class Admission:
    """A connection the gate let in (see :meth:`Gate.admit`)."""

    gate: Gate
    address: str
    negotiating: bool = True

    def negotiated(self) -> None:
        """The connection negotiated: it no longer counts against ``max_negotiating``."""
        if self.negotiating:
            self.negotiating = False
            self.gate.negotiating -= 1


@dataclass
class Gate:
    """Counts a listener's connections against its :class:`ConnectionPolicy`'s bounds."""

    policy: ConnectionPolicy
    total: int = 0
    negotiating: int = 0
    by_address: Counter[str] = field(default_factory=Counter)
    #: Connections refused at a bound so far (by bound: total, address, negotiating).
    refused: Counter[str] = field(default_factory=Counter)

    def _over(self, address: str) -> str:
        if self.total >= self.policy.max_connections:
            return "total"
        if self.by_address[address] >= self.policy.max_per_address:
            return "address"
        if self.negotiating >= self.policy.max_negotiating:
            return "negotiating"
        return ""

    @contextlib.contextmanager
    def admit(self, stream: trio.abc.Stream) -> Iterator[Admission | None]:
        """Count ``stream`` while the block runs; None (nothing counted) when a bound is
        reached: the caller then closes it at once (TIM-12)."""
        address = peer_address(stream)
        over = self._over(address)
        if over:
            self.refused[over] += 1
            log.warning(
                "connection from %s refused: %s connections held (%d in all, %d from it, "
                "%d negotiating)",
                address or "?",
                over,
                self.total,
                self.by_address[address],
                self.negotiating,
            )
            yield None
            return
        admission = Admission(self, address)
        self.total += 1
        self.negotiating += 1
        self.by_address[address] += 1
        try:
            yield admission
        finally:
            admission.negotiated()
            self.total -= 1
            self.by_address[address] -= 1
            if not self.by_address[address]:
                del self.by_address[address]
