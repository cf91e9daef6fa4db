"""The loopback fault proxy (``frtesting.fault_proxy``) does to a connection what each
fault kind says, between a plain TCP client and a sink server on loopback."""

from __future__ import annotations

import collections
import contextlib
import functools
import random
from dataclasses import dataclass, field

import pytest
import trio

from frtesting.fault_proxy import FIRST_FAULT_BYTE, Fault, FaultKind, FaultProxy, FaultSchedule

SERVER_HOST = "127.0.0.5"
PROXY_HOST = "127.0.0.6"
#: The sink answers this many bytes once it has received ANSWER_AFTER bytes.
ANSWER = 100
ANSWER_AFTER = 30000
SENT = 200_000


class _Fixed:
    """Every connection gets ``fault``."""

    def __init__(self, fault: Fault) -> None:
        self.fault = fault

    def next_fault(self, triggered: collections.Counter[FaultKind]) -> Fault | None:
        return self.fault


@dataclass
class _Sink:
    """A server that takes everything, answers once (if ``answer``), and notes how its
    stream ended."""

    answer: bool
    received: bytearray = field(default_factory=bytearray)
    ended: str = ""
    done: trio.Event = field(default_factory=trio.Event)

    async def handle(self, stream: trio.SocketStream) -> None:
        answered = not self.answer
        try:
            while data := await stream.receive_some(65536):
                self.received += data
                if not answered and len(self.received) >= ANSWER_AFTER:
                    answered = True
                    await stream.send_all(b"a" * ANSWER)
            self.ended = "eof"
        except trio.BrokenResourceError:
            self.ended = "reset"
        finally:
            self.done.set()
            await trio.aclose_forcefully(stream)


async def _through(
    fault: Fault, *, answer: bool = True
) -> tuple[_Sink, bytes, bytes, str, FaultProxy]:
    """Send SENT bytes through a proxy with ``fault``, then the end of the stream; the
    sink, what was sent, what came back, how the client's side ended, and the proxy."""
    sink = _Sink(answer)
    payload = random.Random(7).randbytes(SENT)
    back = bytearray()
    ended = "eof"
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(
            functools.partial(trio.serve_tcp, sink.handle, 0, host=SERVER_HOST)
        )
        proxy = FaultProxy(PROXY_HOST, SERVER_HOST, listener.socket.getsockname()[1], _Fixed(fault))
        port = await nursery.start(proxy.serve)
        client = await trio.open_tcp_stream(PROXY_HOST, port)

        async def send() -> None:
            with contextlib.suppress(trio.BrokenResourceError):
                await client.send_all(payload)
                await client.send_eof()

        with trio.fail_after(30):
            async with trio.open_nursery() as inner:
                inner.start_soon(send)
                try:
                    while data := await client.receive_some(65536):
                        back.extend(data)
                except trio.BrokenResourceError:
                    ended = "reset"
            await sink.done.wait()
            while not any(e.what == "closed" for e in proxy.events):
                await trio.sleep(0.01)  # the proxy's side ends too
        await trio.aclose_forcefully(client)
        nursery.cancel_scope.cancel()
    return sink, payload, bytes(back), ended, proxy


async def test_a_cut_delivers_exactly_the_bytes_before_its_point_then_the_end() -> None:
    sink, payload, back, _, proxy = await _through(Fault(FaultKind.CUT, 50000), answer=False)
    assert bytes(sink.received) == payload[:50000]
    assert sink.ended == "eof"
    assert proxy.triggered == {FaultKind.CUT: 1}
    assert back == b""


async def test_a_reset_sends_an_rst_each_way() -> None:
    sink, payload, _, ended, proxy = await _through(Fault(FaultKind.RESET, 50000), answer=False)
    assert sink.ended == "reset"
    assert ended == "reset"
    assert bytes(sink.received) == payload[: len(sink.received)]
    assert proxy.triggered == {FaultKind.RESET: 1}


async def test_a_truncation_forwards_part_of_the_servers_next_write() -> None:
    sink, payload, back, _, proxy = await _through(Fault(FaultKind.TRUNCATE, 20000))
    assert len(back) < ANSWER  # the answer came after the point: cut short
    assert len(sink.received) < SENT
    assert bytes(sink.received) == payload[: len(sink.received)]
    assert proxy.triggered == {FaultKind.TRUNCATE: 1}


@pytest.mark.parametrize(
    "fault",
    [
        Fault(FaultKind.STALL, 40000, duration=0.3),
        Fault(FaultKind.TRICKLE, 40000, duration=0.2, rate=512),
    ],
    ids=["stall", "trickle"],
)
async def test_a_stall_or_a_trickle_then_everything_arrives_intact(fault: Fault) -> None:
    sink, payload, back, _, proxy = await _through(fault)
    assert bytes(sink.received) == payload
    assert back == b"a" * ANSWER
    assert proxy.triggered == {fault.kind: 1}


async def test_a_stall_that_closes_ends_the_stream_at_its_point() -> None:
    sink, payload, _, _, proxy = await _through(
        Fault(FaultKind.STALL, 50000, duration=0.1, close=True), answer=False
    )
    assert bytes(sink.received) == payload[:50000]
    assert proxy.triggered == {FaultKind.STALL: 1}


async def test_a_fault_past_the_end_of_a_connection_is_missed_not_counted() -> None:
    sink, payload, _, _, proxy = await _through(Fault(FaultKind.CUT, SENT + 1))
    assert bytes(sink.received) == payload
    assert proxy.triggered == {}
    assert [e.what for e in proxy.events].count("missed") == 1


def test_the_schedule_is_seeded_takes_turns_and_leaves_clean_connections() -> None:
    def plan(seed: int) -> list[Fault | None]:
        schedule = FaultSchedule(seed)
        schedule.enabled = True
        triggered: collections.Counter[FaultKind] = collections.Counter()
        faults = []
        for _ in range(20):
            fault = schedule.next_fault(triggered)
            if fault is not None:
                triggered[fault.kind] += 1
            faults.append(fault)
        return faults

    faults = plan(3)
    assert faults == plan(3)
    assert faults != plan(4)
    assert faults[1::2] == [None] * 10  # a clean connection between two faulty ones
    kinds = [f.kind for f in faults[::2] if f is not None]
    assert sorted(kinds[:5], key=lambda k: k.value) == sorted(FaultKind, key=lambda k: k.value)
    assert all(FIRST_FAULT_BYTE <= f.at_byte < FIRST_FAULT_BYTE + 256 * 1024 for f in faults if f)
