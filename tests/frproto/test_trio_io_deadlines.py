"""frproto.trio_io's read deadlines and keep_alive (docs/protocol.md 10.2), on memory
streams with Trio's virtual clock (``autojump_clock``): what is sent at each deadline,
when, and that bytes (a Keepalive) restart it."""

from __future__ import annotations

import uuid

import pytest
import trio
import trio.testing

import frproto as fp
from frproto.trio_io import FramedStream, PeerIdle, keep_alive

DISK = fp.DiskInfo("disk0", 1 << 20)
VM = uuid.UUID("5b3a1f6e-2c4d-4e8f-9a0b-1c2d3e4f5a6b")
#: The states where the primary awaits the recovery side's answer (TIM-9).
ANSWERING = frozenset(fp.State[name] for name in ("QUERYING", "OPENING", "DIGESTS"))


def _idle(state: fp.State) -> float | None:
    """READY 5 s, SESSION 9 s, else none (as frlink.connections.ConnectionPolicy does)."""
    return {fp.State.READY: 5.0, fp.State.SESSION: 9.0}.get(state)


def _pair() -> tuple[FramedStream, FramedStream]:
    a, b = trio.testing.memory_stream_pair()
    primary = FramedStream(a, fp.Connection(fp.Role.PRIMARY))
    recovery = FramedStream(
        b,
        fp.Connection(fp.Role.RECOVERY),
        idle_timeout=_idle,
        frame_timeout=3.0,
    )
    return primary, recovery


async def _negotiate(primary: FramedStream, recovery: FramedStream) -> None:
    await primary.send(fp.NegotiateRequest())
    request = await recovery.expect(fp.NegotiateRequest)
    assert isinstance(request, fp.NegotiateRequest)
    policy = fp.ServerPolicy(fp.RecoveryType.STANDALONE, "r1.example.com")
    await recovery.send(fp.answer_negotiation(request, policy))
    await primary.expect(fp.NegotiateResponse)


async def _closed_with(
    primary: FramedStream, recovery: FramedStream, code: fp.ErrorCode
) -> tuple[float, fp.Error]:
    """Wait for the recovery side's deadline: (when it raised, the Error the primary got)."""
    started = trio.current_time()
    with pytest.raises(PeerIdle) as raised:
        await recovery.next_event()
    elapsed = trio.current_time() - started
    assert raised.value.code == code
    got = await primary.next_event()
    assert isinstance(got, fp.Error)
    assert got.code == code
    return elapsed, got


async def test_ready_idle_deadline_sends_busy(autojump_clock: trio.testing.MockClock) -> None:
    primary, recovery = _pair()
    await _negotiate(primary, recovery)
    elapsed, error = await _closed_with(primary, recovery, fp.ErrorCode.BUSY)
    # The Error at 5 s; the raise after the bounded lingering close (ERR-10).
    assert 5.0 <= elapsed <= 5.0 + 2.5
    assert "5 s" in error.text
    assert recovery.connection.state is fp.State.MUST_CLOSE


async def test_session_idle_deadline_is_the_sessions(
    autojump_clock: trio.testing.MockClock,
) -> None:
    primary, recovery = _pair()
    await _negotiate(primary, recovery)
    await primary.send(fp.RelationshipCreate(VM, "web01", (DISK,)))
    await recovery.expect(fp.RelationshipCreate)
    await recovery.send(fp.RelationshipAccepted(VM, (DISK,)))
    await primary.expect(fp.RelationshipAccepted)
    elapsed, _ = await _closed_with(primary, recovery, fp.ErrorCode.BUSY)
    assert 9.0 <= elapsed <= 9.0 + 2.5


async def test_a_frame_that_stops_gets_truncated(autojump_clock: trio.testing.MockClock) -> None:
    primary, recovery = _pair()
    await _negotiate(primary, recovery)
    await primary.stream.send_all(fp.codec.encode_frame(fp.Keepalive(1))[:4])
    elapsed, _ = await _closed_with(primary, recovery, fp.ErrorCode.TRUNCATED)
    assert 3.0 <= elapsed <= 3.0 + 2.5


async def test_the_absolute_deadline_bounds_the_negotiation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    primary, recovery = _pair()
    recovery.deadline = trio.current_time() + 2.0
    elapsed, _ = await _closed_with(primary, recovery, fp.ErrorCode.BUSY)
    assert 2.0 <= elapsed <= 2.0 + 2.5
    # Part of the NegotiateRequest, then nothing: TRUNCATED at the same deadline.
    primary, recovery = _pair()
    recovery.deadline = trio.current_time() + 2.0
    await primary.stream.send_all(fp.codec.encode_frame(fp.NegotiateRequest())[:10])
    elapsed, _ = await _closed_with(primary, recovery, fp.ErrorCode.TRUNCATED)
    assert 2.0 <= elapsed <= 2.0 + 2.5


async def test_keepalives_restart_the_idle_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    primary, recovery = _pair()
    await _negotiate(primary, recovery)
    seen = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_alive, primary, 2.0)
        with trio.move_on_after(60):
            while True:
                event = await recovery.next_event()
                assert isinstance(event, fp.Keepalive)
                seen += 1
        nursery.cancel_scope.cancel()
    # A minute in READY (deadline 5 s) kept open by one Keepalive every 2 s.
    assert 28 <= seen <= 31
    assert recovery.connection.state is fp.State.READY


async def test_keep_alive_sends_only_when_idle_and_in_its_states(
    autojump_clock: trio.testing.MockClock,
) -> None:
    primary, recovery = _pair()
    await _negotiate(primary, recovery)
    # The recovery side's pinger: only while the primary awaits an answer.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: keep_alive(recovery, 1.0, states=ANSWERING))
        await trio.sleep(4)  # READY: not an answering state, nothing sent
        await primary.send(fp.RelationshipCreate(VM, "web01", (DISK,)))
        await recovery.expect(fp.RelationshipCreate)  # OPENING: our turn to answer
        await trio.sleep(3.5)
        await recovery.send(fp.RelationshipAccepted(VM, (DISK,)))
        got = []
        while True:
            event = await primary.next_event()
            got.append(event)
            if isinstance(event, fp.RelationshipAccepted):
                break
        nursery.cancel_scope.cancel()
    assert [type(e) for e in got] == [fp.Keepalive] * 3 + [fp.RelationshipAccepted]


async def test_keep_alive_ends_with_the_conversation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    primary, recovery = _pair()
    await _negotiate(primary, recovery)
    await primary.send_error(fp.Busy("going away"))
    with trio.fail_after(10):
        await keep_alive(primary, 1.0)  # MUST_CLOSE: returns, sends nothing (ERR-7)
