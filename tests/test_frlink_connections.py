"""frlink.connections: the ``[connections]`` table and the gate that bounds a listener's
connections (TIM-10 to TIM-12)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

import frproto as fp
from frlink.connections import TRIM_INTERVAL, ConnectionPolicy, Gate, connection_policy


class _Socket:
    def __init__(self, address: str) -> None:
        self.address = address

    def getpeername(self) -> tuple[str, int]:
        return (self.address, 40000)


class _Peer:
    """A stand-in for an accepted SocketStream: only its peer address matters."""

    def __init__(self, address: str) -> None:
        self.socket = _Socket(address)

    @classmethod
    def at(cls, address: str) -> trio.abc.Stream:
        return cls(address)  # type: ignore[return-value]


def test_the_defaults_are_the_protocols() -> None:
    policy = ConnectionPolicy()
    assert policy.negotiate_timeout == fp.limits.NEGOTIATE_TIMEOUT
    assert policy.idle_timeout(fp.State.READY) == fp.limits.READY_TIMEOUT
    for state in (fp.State.SESSION, fp.State.IR, fp.State.BATCH):
        assert policy.idle_timeout(state) == fp.limits.SESSION_TIMEOUT
    for state in (fp.State.OPENING, fp.State.IR_ENDING, fp.State.BATCH_ENDING):
        assert policy.idle_timeout(state) is None  # our turn to answer
    assert policy.frame_timeout == fp.limits.FRAME_TIMEOUT
    assert policy.keepalive == fp.limits.KEEPALIVE_INTERVAL
    # The idle deadlines leave a primary that keeps TIM-8 room (TIM-7).
    assert policy.ready_timeout >= 2 * fp.limits.KEEPALIVE_INTERVAL


def test_the_table_is_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    table = {"ready_timeout": 2, "frame_timeout": 0.5, "max": 10, "max_per_address": 3}
    policy = connection_policy({"connections": table}, path)
    assert policy.ready_timeout == 2.0
    assert policy.frame_timeout == 0.5
    assert (policy.max_connections, policy.max_per_address) == (10, 3)
    assert policy.session_timeout == fp.limits.SESSION_TIMEOUT
    assert connection_policy({}, path) == ConnectionPolicy()
    for bad in ({"ready_timeout": 0}, {"max": 0}, {"max": 5, "max_per_address": 6}):
        with pytest.raises(ValueError, match=r"\[connections\]"):
            connection_policy({"connections": bad}, path)


def test_the_gate_counts_and_refuses_over_each_bound() -> None:
    gate = Gate(ConnectionPolicy(max_connections=5, max_per_address=3, max_negotiating=4))
    with (
        gate.admit(_Peer.at("10.0.0.1")) as a1,
        gate.admit(_Peer.at("10.0.0.1")) as a2,
        gate.admit(_Peer.at("10.0.0.1")) as a3,
    ):
        assert None not in (a1, a2, a3)
        with gate.admit(_Peer.at("10.0.0.1")) as a4:
            assert a4 is None  # the address's bound
        assert gate.refused["address"] == 1
        with gate.admit(_Peer.at("10.0.0.2")) as b1:
            assert b1 is not None
            with gate.admit(_Peer.at("10.0.0.3")) as c1:
                assert c1 is None  # four negotiating
                assert gate.refused["negotiating"] == 1
            b1.negotiated()
            with gate.admit(_Peer.at("10.0.0.3")) as c1:
                assert c1 is not None
                with gate.admit(_Peer.at("10.0.0.4")) as d1:
                    assert d1 is None  # five in all
                    assert gate.refused["total"] == 1
        assert (gate.total, gate.negotiating) == (3, 3)
    assert (gate.total, gate.negotiating, dict(gate.by_address)) == (0, 0, {})


async def test_a_listener_over_its_bound_closes_at_once_with_nothing_sent() -> None:
    gate = Gate(ConnectionPolicy(max_per_address=2, max_negotiating=2))
    held = trio.Event()

    async def handle(stream: trio.SocketStream) -> None:
        with gate.admit(stream) as admission:
            if admission is None:
                await trio.aclose_forcefully(stream)
                return
            await held.wait()
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        port = listeners[0].socket.getsockname()[1]
        streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
        with trio.fail_after(5):
            assert await streams[2].receive_some(100) == b""  # the third: closed at once
        with trio.move_on_after(0.2) as scope:
            await streams[0].receive_some(100)
        assert scope.cancelled_caught  # the first two held
        held.set()
        for stream in streams:
            await stream.aclose()
        nursery.cancel_scope.cancel()
    assert gate.refused["address"] == 1


def test_max_handshaking_is_read_checked_and_defaults_within_max(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    assert ConnectionPolicy().max_handshaking == 64
    policy = connection_policy({"connections": {"max_handshaking": 7}}, path)
    assert policy.max_handshaking == 7
    assert connection_policy({"connections": {"max": 10}}, path).max_handshaking == 10
    for bad in ({"max_handshaking": 0}, {"max": 5, "max_handshaking": 6}):
        with pytest.raises(ValueError, match=r"\[connections\] max_handshaking"):
            connection_policy({"connections": bad}, path)


def test_the_gate_refuses_past_max_handshaking_and_admits_below_it() -> None:
    gate = Gate(ConnectionPolicy(max_handshaking=2), trim=lambda **_: None)
    with gate.admit(_Peer.at("10.0.0.1")) as a1, gate.admit(_Peer.at("10.0.0.2")) as a2:
        assert a1 is not None
        assert a2 is not None
        assert gate.handshaking == 2
        with gate.admit(_Peer.at("10.0.0.3")) as refused:
            assert refused is None  # two still in the TLS handshake
        assert gate.refused["handshaking"] == 1
        a1.handshaken()
        assert (gate.handshaking, gate.negotiating) == (1, 2)
        with gate.admit(_Peer.at("10.0.0.3")) as a3:
            assert a3 is not None  # below the bound again
            a3.negotiated()  # negotiated implies handshaken
            assert (gate.handshaking, gate.negotiating) == (1, 2)
    assert (gate.total, gate.handshaking, gate.negotiating) == (0, 0, 0)


def test_refusals_are_logged_once_per_interval_with_their_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    gate = Gate(ConnectionPolicy(max_connections=1), clock=lambda: now[0], trim=lambda **_: None)
    caplog.set_level(logging.WARNING, logger="frrep.connections")
    with gate.admit(_Peer.at("10.0.0.1")) as held:
        assert held is not None
        for step in range(6):  # 0, 2, 4, 6, 8, 10 s: only the first one logged at once
            now[0] = 1000.0 + 2 * step
            with gate.admit(_Peer.at("10.0.0.2")) as refused:
                assert refused is None
            lines = [r.getMessage() for r in caplog.records]
            assert len(lines) == (1 if step < 5 else 2), lines
    assert gate.refused["total"] == 6
    assert lines[0].startswith("1 connection(s) refused in the last 10 s")
    assert lines[1].startswith("5 connection(s) refused in the last 10 s, the last from 10.0.0.2")
    assert "total bound reached" in lines[1]


async def test_memory_is_trimmed_after_closes_at_most_once_per_interval() -> None:
    calls: list[bool] = []
    gate = Gate(ConnectionPolicy(), trim=lambda *, idle: calls.append(idle))
    with gate.admit(_Peer.at("10.0.0.1")) as holder:
        assert holder is not None
        for _ in range(3):
            with gate.admit(_Peer.at("10.0.0.2")):
                pass
        assert calls == [False]  # the first close trimmed; the next two wait their turn
        await trio.sleep(TRIM_INTERVAL + 0.3)
        assert calls == [False, False]  # one trim for both, once the interval was over
    await trio.sleep(TRIM_INTERVAL + 0.3)
    # The last connection closed: the pools go too (idle).
    assert calls == [False, False, True]
