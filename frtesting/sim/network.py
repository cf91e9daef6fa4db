"""The simulation's network: in-memory streams between simulated hosts, with faults.

:class:`SimNetwork` is the world's one network; each simulated host sees it through a
:class:`HostNetwork` (its own source address), the :class:`frlink.network.Network` put in
force with :func:`frlink.network.using` around that host's tasks. A connection is a pair
of Trio memory streams (``trio.testing.memory_stream_pair``); TLS runs over it exactly as
over TCP (the same certificates, handshakes and checks). Faults are per link (an
unordered pair of hosts): :meth:`SimNetwork.cut` breaks every open stream of the link (both
ends see a broken stream, as after a reset) and refuses new ones until :meth:`heal`;
:meth:`slow` delays every send on the link.
"""

from __future__ import annotations

import errno
import math
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

__all__ = ["HostNetwork", "SimListener", "SimNetwork", "SimStream"]


@dataclass
class _Link:
    cut: bool = False
    delay: float = 0.0
    streams: list[SimStream] = field(default_factory=list)


class _Peer:
    """What ``stream.socket`` offers for a simulated stream: the peer's address (the
    recovery server's per-address connection bounds read it)."""

    def __init__(self, peer: tuple[str, int], local: tuple[str, int]) -> None:
        self._peer, self._local = peer, local

    def getpeername(self) -> tuple[str, int]:
        return self._peer

    def getsockname(self) -> tuple[str, int]:
        return self._local


class SimStream(trio.abc.Stream):
    """One end of a simulated connection."""

    def __init__(
        self, inner: trio.StapledStream[Any, Any], link: _Link, socket: _Peer, latency: float
    ) -> None:
        self._inner = inner
        self._latency = latency
        self._link = link
        self.socket = socket
        self.broken = False

    def _check(self) -> None:
        if self.broken:
            raise trio.BrokenResourceError("the simulated link was cut")

    def break_(self) -> None:
        """The link was cut: this end fails from now on, and the peer sees the end."""
        self.broken = True
        self._inner.send_stream.close()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check()
        delay = self._link.delay + self._latency
        if delay:
            await trio.sleep(delay)
            self._check()
        try:
            await self._inner.send_all(data)
        except trio.ClosedResourceError:
            self._check()
            raise

    async def wait_send_all_might_not_block(self) -> None:
        self._check()
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self._check()
        try:
            data = await self._inner.receive_some(max_bytes)
        except trio.ClosedResourceError:
            self._check()
            raise
        self._check()
        return data

    async def aclose(self) -> None:
        if self in self._link.streams:
            self._link.streams.remove(self)
        self._inner.send_stream.close()
        self._inner.receive_stream.close()
        await trio.lowlevel.checkpoint()


class SimListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener of the simulated network (``port``: where it listens)."""

    def __init__(self, network: SimNetwork, host: str, port: int) -> None:
        self._network = network
        self.host, self.port = host, port
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](math.inf)
        self.closed = False

    def deliver(self, stream: trio.abc.Stream) -> None:
        self._send.send_nowait(stream)

    async def accept(self) -> trio.abc.Stream:
        return await self._receive.receive()

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self._network.unlisten(self)
            self._receive.close()
        await trio.lowlevel.checkpoint()


class SimNetwork:
    """Every simulated host's links and listeners."""

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self._listeners: dict[tuple[str, int], SimListener] = {}
        self._links: dict[frozenset[str], _Link] = {}
        self._next_port = 40000

    def host(self, address: str) -> HostNetwork:
        """The network as seen from the host at ``address``."""
        return HostNetwork(self, address)

    def link(self, a: str, b: str) -> _Link:
        key = frozenset((a, b))
        found = self._links.get(key)
        if found is None:
            found = self._links[key] = _Link()
        return found

    def cut(self, a: str, b: str) -> int:
        """Break the link between hosts ``a`` and ``b``: its open streams fail, new
        connections are refused until :meth:`heal`. How many streams were broken."""
        link = self.link(a, b)
        link.cut = True
        broken = list(link.streams)
        link.streams.clear()
        for stream in broken:
            stream.break_()
        return len(broken)

    def isolate(self, address: str) -> int:
        """Break every open stream of the host at ``address`` (it was killed: its peers
        see its connections end at once). How many stream ends were broken."""
        broken = 0
        for key, link in self._links.items():
            if address in key:
                streams, link.streams = link.streams, []
                for stream in streams:
                    stream.break_()
                broken += len(streams)
        return broken

    def slow(self, a: str, b: str, delay: float) -> None:
        """Delay every send on the link by ``delay`` seconds (0: at full speed)."""
        self.link(a, b).delay = delay

    def heal(self, a: str, b: str) -> None:
        """Let the link carry connections again, at full speed."""
        link = self.link(a, b)
        link.cut, link.delay = False, 0.0

    def heal_all(self) -> None:
        for link in self._links.values():
            link.cut, link.delay = False, 0.0

    def listen(self, host: str, port: int) -> SimListener:
        if port == 0:
            self._next_port += 1
            port = self._next_port
        if (host, port) in self._listeners:
            raise OSError(errno.EADDRINUSE, f"cannot listen on {host}:{port}: in use")
        listener = self._listeners[(host, port)] = SimListener(self, host, port)
        return listener

    def unlisten(self, listener: SimListener) -> None:
        if self._listeners.get((listener.host, listener.port)) is listener:
            del self._listeners[(listener.host, listener.port)]

    async def connect(self, source: str, host: str, port: int) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        link = self.link(source, host)
        if link.cut:
            raise OSError(errno.EHOSTUNREACH, f"No route to host {host} (simulated cut)")
        listener = self._listeners.get((host, port)) or self._listeners.get(("0.0.0.0", port))
        if listener is None or listener.closed:
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"Connection refused ({host}:{port})")
        self._next_port += 1
        ephemeral = self._next_port
        near, far = trio.testing.memory_stream_pair()
        client = SimStream(near, link, _Peer((host, port), (source, ephemeral)), self.latency)
        server = SimStream(far, link, _Peer((source, ephemeral), (host, port)), self.latency)
        link.streams += [client, server]
        listener.deliver(server)
        return client


class HostNetwork:
    """One host's view of the :class:`SimNetwork` (a :class:`frlink.network.Network`)."""

    def __init__(self, network: SimNetwork, address: str) -> None:
        self.network, self.address = network, address

    async def connect(
        self, host: str, port: int, *, local_address: str | None = None
    ) -> trio.abc.Stream:
        return await self.network.connect(local_address or self.address, host, port)

    async def listen(
        self, port: int, *, host: str | None
    ) -> list[trio.abc.Listener[trio.abc.Stream]]:
        await trio.lowlevel.checkpoint()
        return [self.network.listen(host or self.address, port)]
