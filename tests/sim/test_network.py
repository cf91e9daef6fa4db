"""The network seam: TCP by default, the simulation's in-memory network when put in force,
and its faults (a cut link, a killed host)."""

from __future__ import annotations

import pytest
import trio

from frlink import network
from frtesting.sim.network import SimNetwork


def test_production_uses_tcp() -> None:
    assert isinstance(network.current(), network.TCPNetwork)


async def test_tcp_listeners_report_their_port() -> None:
    listeners = await network.current().listen(0, host="127.0.0.1")
    try:
        port = network.bound_port(listeners[0])
        assert port == listeners[0].socket.getsockname()[1] > 0  # type: ignore[attr-defined]
    finally:
        for listener in listeners:
            await listener.aclose()


async def _echo_pair(sim: SimNetwork) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    with network.using(sim.host("10.0.0.1")):
        listeners = await network.current().listen(7000, host=None)
    with network.using(sim.host("10.0.0.2")):
        client = await network.current().connect("10.0.0.1", 7000)
    server = await listeners[0].accept()
    return client, server


async def test_a_simulated_connection_carries_bytes_both_ways_and_knows_its_peer() -> None:
    sim = SimNetwork()
    client, server = await _echo_pair(sim)
    await client.send_all(b"ping")
    assert await server.receive_some(10) == b"ping"
    await server.send_all(b"pong")
    assert await client.receive_some(10) == b"pong"
    assert server.socket.getpeername()[0] == "10.0.0.2"  # type: ignore[attr-defined]


async def test_a_cut_link_breaks_both_ends_and_refuses_until_healed() -> None:
    sim = SimNetwork()
    client, server = await _echo_pair(sim)
    assert sim.cut("10.0.0.2", "10.0.0.1") == 2
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"x")
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some(10)
    with pytest.raises(OSError, match="No route"):
        await sim.host("10.0.0.2").connect("10.0.0.1", 7000)
    sim.heal("10.0.0.2", "10.0.0.1")
    assert await sim.host("10.0.0.2").connect("10.0.0.1", 7000) is not None


async def test_a_killed_host_breaks_a_waiting_reader_and_nobody_listens_after_close() -> None:
    sim = SimNetwork()
    client, _server = await _echo_pair(sim)
    async with trio.open_nursery() as nursery:
        failed = trio.Event()

        async def read() -> None:
            with pytest.raises(trio.BrokenResourceError):
                await client.receive_some(10)
            failed.set()

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert sim.isolate("10.0.0.1") == 2
        await failed.wait()
    with pytest.raises(ConnectionRefusedError):
        await sim.host("10.0.0.2").connect("10.0.0.1", 7001)
