"""ReceiveBuffer: view mode, accumulate mode, many frames, and no quadratic work."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import frproto as fp
from frproto import Role, State
from frproto._buffer import ReceiveBuffer
from frproto.codec import ENVELOPE

from . import strategies as fs
from .pair import DEFAULT_VMID, ConnectionPair, drain

_BIG = (fp.DiskInfo("big", 1 << 40),)


def _frame(tag: int, body: bytes) -> bytes:
    return ENVELOPE.pack(0, tag, len(body)) + body


# -- the buffer on its own -----------------------------------------------------------------


def test_empty_buffer() -> None:
    buffer = ReceiveBuffer()
    assert len(buffer) == 0
    assert buffer.peek_envelope() is None
    buffer.feed(b"")
    assert len(buffer) == 0


def test_view_mode_keeps_the_callers_object() -> None:
    buffer = ReceiveBuffer()
    data = bytearray(_frame(7, b"abcd") + _frame(8, b"xy"))
    buffer.feed(data)
    assert buffer.peek_envelope() == (0, 7, 4)
    view = buffer.take_view(12)
    assert view.obj is data
    assert bytes(view) == _frame(7, b"abcd")
    assert buffer.peek_envelope() == (0, 8, 2)
    assert buffer.take_bytes(10) == _frame(8, b"xy")
    assert len(buffer) == 0


def test_accumulate_mode_across_pieces() -> None:
    buffer = ReceiveBuffer()
    frame = _frame(5, bytes(range(100)))
    buffer.feed(frame[:3])
    assert buffer.peek_envelope() is None
    buffer.feed(frame[3:50])
    assert buffer.peek_envelope() == (0, 5, 100)
    assert len(buffer) == 50
    buffer.feed(memoryview(frame)[50:])
    assert len(buffer) == len(frame)
    view = buffer.take_view(len(frame))
    assert bytes(view) == frame
    # The assembled frame is handed out as is; later pieces start afresh.
    buffer.feed(b"12345678")
    assert bytes(view) == frame
    assert buffer.take_all() == b"12345678"


def test_non_byte_formats_are_cast() -> None:
    import array

    buffer = ReceiveBuffer()
    words = array.array("H", [1, 2, 3, 4])
    buffer.feed(memoryview(words))  # format 'H': the buffer casts it to bytes
    assert len(buffer) == 8
    assert buffer.take_all() == words.tobytes()


@settings(max_examples=100)
@given(
    st.lists(st.binary(max_size=300), max_size=30),
    st.lists(st.integers(1, 97), min_size=1, max_size=20),
)
def test_any_pieces_give_the_same_frames(bodies: list[bytes], sizes: list[int]) -> None:
    stream = b"".join(_frame(1, body) for body in bodies)
    buffer = ReceiveBuffer()
    out: list[bytes] = []
    pos = i = 0
    while pos < len(stream) or len(buffer):
        if pos < len(stream):
            size = sizes[i % len(sizes)]
            buffer.feed(stream[pos : pos + size])
            pos += size
            i += 1
        while (envelope := buffer.peek_envelope()) is not None and len(buffer) >= 8 + envelope[2]:
            take = buffer.take_view if len(out) % 2 else buffer.take_bytes
            out.append(bytes(take(8 + envelope[2])))
        if pos >= len(stream):
            break
    assert out == [_frame(1, body) for body in bodies]
    assert len(buffer) == 0


# -- through a connection ------------------------------------------------------------------


def _ir_pair() -> ConnectionPair:
    pair = ConnectionPair().walk_to(State.SESSION, disks=_BIG)
    pair.send(Role.PRIMARY, fp.IRBegin(DEFAULT_VMID))
    return pair


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_chunk_data_is_a_view_of_the_fed_object(kind: type[bytes] | type[bytearray]) -> None:
    pair = _ir_pair()
    payload = bytes(range(256)) * 64
    frame = kind(b"".join(pair.primary.send_chunk(0, 0, payload)))
    pair.recovery.receive_data(frame)
    chunk = pair.recovery.next_event()
    assert isinstance(chunk, fp.Chunk)
    assert isinstance(chunk.data, memoryview)
    assert chunk.data.obj is frame
    assert bytes(chunk.data) == payload
    assert pair.recovery.next_event() is fp.NEED_DATA


def test_chunk_from_pieces_is_a_view_of_one_assembled_buffer() -> None:
    pair = _ir_pair()
    payload = b"\x01\x02" * 5000
    frame = b"".join(pair.primary.send_chunk(0, 0, payload))
    pieces = [frame[i : i + 999] for i in range(0, len(frame), 999)]
    events: list[fp.Event] = []
    for piece in pieces:
        pair.recovery.receive_data(piece)
        events.extend(drain(pair.recovery))
    assert len(events) == 1
    chunk = events[0]
    assert isinstance(chunk, fp.Chunk)
    assert isinstance(chunk.data, memoryview)
    assert isinstance(chunk.data.obj, bytearray)
    assert bytes(chunk.data) == payload
    # The next chunk's assembly does not disturb the first one's data.
    frame2 = b"".join(pair.primary.send_chunk(0, 1 << 20, b"\x07" * 3000))
    for i in range(0, len(frame2), 500):
        pair.recovery.receive_data(frame2[i : i + 500])
        drain(pair.recovery)
    assert bytes(chunk.data) == payload


def test_large_multi_frame_feed() -> None:
    pair = _ir_pair()
    payloads = [bytes([i % 250 + 1]) * (65536 + i) for i in range(40)]
    stream = bytearray()
    for i, payload in enumerate(payloads):
        for piece in pair.primary.send_chunk(0, i << 20, payload, compress_data=False):
            stream += piece
        stream += pair.primary.send(fp.Keepalive(i))
    pair.recovery.receive_data(stream)
    events = drain(pair.recovery)
    assert len(events) == 80
    got = [bytes(e.data) for e in events if isinstance(e, fp.Chunk)]
    assert got == payloads
    assert [e for e in events if isinstance(e, fp.Keepalive)] == [
        fp.Keepalive(i) for i in range(40)
    ]
    assert pair.recovery.chunk_count == 40


@pytest.mark.parametrize("mode", ["one call", "odd pieces"])
def test_many_small_frames_drain_in_linear_time(mode: str) -> None:
    pair = ConnectionPair().walk_to(State.READY)
    frames = b"".join(pair.primary.send(fp.Keepalive(i)) for i in range(2000))
    small = time.perf_counter()
    pair.recovery.receive_data(frames[: 200 * 16])
    assert len(drain(pair.recovery)) == 200
    small = time.perf_counter() - small

    pair2 = ConnectionPair().walk_to(State.READY)
    for i in range(2000):
        pair2.primary.send(fp.Keepalive(i))
    start = time.perf_counter()
    if mode == "one call":
        pair2.recovery.receive_data(frames)
        events = drain(pair2.recovery)
    else:
        events = []
        for i in range(0, len(frames), 4093):
            pair2.recovery.receive_data(frames[i : i + 4093])
            events.extend(drain(pair2.recovery))
    elapsed = time.perf_counter() - start
    assert events == [fp.Keepalive(i) for i in range(2000)]
    # 10x the frames must not take anywhere near 100x the time.
    assert elapsed < max(30 * small, 0.5)


def test_large_accumulation_byte_pieces_is_linear() -> None:
    pair = ConnectionPair().walk_to(State.READY)
    frames = b"".join(pair.primary.send(fp.Keepalive(i)) for i in range(3000))
    start = time.perf_counter()
    events: list[fp.Event] = []
    # Pieces that never end on a frame boundary keep the accumulator non-empty.
    for i in range(0, len(frames), 23):
        pair.recovery.receive_data(frames[i : i + 23])
        events.extend(drain(pair.recovery))
    assert len(events) == 3000
    assert time.perf_counter() - start < 5


@settings(max_examples=30)
@given(st.lists(fs.chunk_data(), min_size=1, max_size=4))
def test_byte_at_a_time_equals_whole(payloads: list[bytes]) -> None:
    sender = _ir_pair()
    stream = b"".join(
        bytes(piece)
        for i, payload in enumerate(payloads)
        for piece in sender.primary.send_chunk(0, i << 16, payload)
    )
    whole = _ir_pair()
    whole.recovery.receive_data(stream)
    expected = drain(whole.recovery)
    one = _ir_pair()
    got: list[fp.Event] = []
    for i in range(len(stream)):
        one.recovery.receive_data(stream[i : i + 1])
        got.extend(drain(one.recovery))
    assert got == expected
    assert len(got) == len(payloads)
    assert one.recovery.aggregate_digest == whole.recovery.aggregate_digest


@pytest.mark.parametrize("piece", [None, 13, 4099])
def test_buffer_alone_is_linear_on_many_frames(piece: int | None) -> None:
    # 100 000 frames: any per-frame copy of the rest of the stream would take minutes.
    count = 100_000
    stream = _frame(6, b"") * count
    buffer = ReceiveBuffer()
    taken = 0
    start = time.perf_counter()
    pieces = (
        [stream] if piece is None else [stream[i : i + piece] for i in range(0, len(stream), piece)]
    )
    for data in pieces:
        buffer.feed(data)
        while (envelope := buffer.peek_envelope()) is not None:
            assert envelope == (0, 6, 0)
            buffer.take_bytes(8)
            taken += 1
    assert taken == count
    assert len(buffer) == 0
    assert time.perf_counter() - start < 10
