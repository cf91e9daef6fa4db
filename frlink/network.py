"""The network seam: listen and connect by address (or host name) and port.

Every connection the node agent, the recovery server, the primary and the broker open or
accept goes through the :class:`Network` in force, read by :func:`current`. Production
uses :class:`TCPNetwork` (Trio's TCP: what the code always did); the deterministic
simulation (``frtesting/sim``, ``docs/simulation.md``) swaps in an in-memory network
for a block of code with :func:`using`. TLS stays above the seam: the same handshake and
certificate checks run over either network.

It is a context variable, like the primary's durable-write seam (``node/primary/
durable.py``): tasks started from a block inherit it, so one process can hold several
simulated hosts, each with its own view of the network (its own source address).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, Protocol

import trio

__all__ = ["Network", "TCPNetwork", "bound_port", "current", "using"]


class Network(Protocol):
    """Where streams come from. Failures raise ``OSError`` (refused, unreachable)."""

    async def connect(
        self, host: str, port: int, *, local_address: str | None = None
    ) -> trio.abc.Stream:
        """A stream to ``host:port`` (from ``local_address``, if given)."""
        ...

    async def listen(
        self, port: int, *, host: str | None
    ) -> list[trio.abc.Listener[trio.abc.Stream]]:
        """Listeners on ``host:port`` (port 0: any free one), ready for
        :func:`trio.serve_listeners`."""
        ...


class TCPNetwork:
    """The real network: Trio's TCP streams and listeners."""

    async def connect(
        self, host: str, port: int, *, local_address: str | None = None
    ) -> trio.abc.Stream:
        """``trio.open_tcp_stream``."""
        return await trio.open_tcp_stream(host, port, local_address=local_address)

    async def listen(
        self, port: int, *, host: str | None
    ) -> list[trio.abc.Listener[trio.abc.Stream]]:
        """``trio.open_tcp_listeners``."""
        return list(await trio.open_tcp_listeners(port, host=host))


_TCP = TCPNetwork()
_current: ContextVar[Network | None] = ContextVar("frrep_network", default=None)


def current() -> Network:
    """The network in force for this task (TCP unless a simulation set another)."""
    return _current.get() or _TCP


@contextlib.contextmanager
def using(network: Network) -> Iterator[None]:
    """Use ``network`` for every connect and listen in this block (and the tasks it
    starts)."""
    token = _current.set(network)
    try:
        yield
    finally:
        _current.reset(token)


def bound_port(listener: trio.abc.Listener[Any]) -> int:
    """The port a listener is bound to (a TCP socket's, or a simulated listener's
    ``port``)."""
    socket = getattr(listener, "socket", None)
    if socket is not None:
        return int(socket.getsockname()[1])
    return int(listener.port)  # type: ignore[attr-defined]
