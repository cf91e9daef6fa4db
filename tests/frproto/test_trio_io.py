"""frproto.trio_io: the framed reader/writer over real Trio streams (memory, TCP, mTLS)."""

from __future__ import annotations

import ctypes
import mmap
import os
import ssl
import uuid
from collections.abc import Iterable, Iterator

import pytest
import trio
import trio.testing
import trustme
import xxhash

import frproto as fp
from frproto.trio_io import (
    BUFFERED_BUDGET,
    FRAME_POOL,
    GROUP_LOCK_BYTES,
    PAYLOAD_ALIGN,
    BufferPool,
    FramedStream,
)

VM = uuid.UUID("5b3a1f6e-2c4d-4e8f-9a0b-1c2d3e4f5a6b")
DISK = fp.DiskInfo("disk0", 64 * 1024 * 1024)


class TrickleStream(trio.abc.Stream):
    """Wraps a stream and delivers at most ``size`` bytes per receive (worst-case reads)."""

    def __init__(self, inner: trio.abc.Stream, size: int) -> None:
        self.inner = inner
        self.size = size

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(self.size)

    async def aclose(self) -> None:
        await self.inner.aclose()


class IntoStream(TrickleStream):
    """A stream with ``receive_into`` (like frlink.biotls.BioTLSStream), at most ``size`` bytes
    per call; FramedStream must read frames through it, not through ``receive_some``."""

    def __init__(self, inner: trio.abc.Stream, size: int) -> None:
        super().__init__(inner, size)
        self.into_calls = 0
        self.some_calls = 0

    async def receive_into(self, buffer: memoryview) -> int:
        self.into_calls += 1
        data = await self.inner.receive_some(min(self.size, len(buffer)))
        buffer[: len(data)] = data
        return len(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self.some_calls += 1  # (linger_and_close drains with receive_some)
        return await super().receive_some(max_bytes)


async def _open_session(primary: FramedStream, recovery: FramedStream) -> None:
    await primary.send(fp.NegotiateRequest())
    request = await recovery.expect(fp.NegotiateRequest)
    assert isinstance(request, fp.NegotiateRequest)
    policy = fp.ServerPolicy(fp.RecoveryType.STANDALONE, "r1.example.com")
    await recovery.send(fp.answer_negotiation(request, policy))
    await primary.expect(fp.NegotiateResponse)
    await primary.send(fp.RelationshipCreate(VM, "web01", (DISK,)))
    await recovery.expect(fp.RelationshipCreate)
    await recovery.send(fp.RelationshipAccepted(VM, (DISK,)))
    await primary.expect(fp.RelationshipAccepted)


async def _send_blocks(
    primary: FramedStream, blocks: list[bytes], *, compress: bool = False
) -> None:
    """BatchBegin, then ``blocks`` as chunks one after the other from offset 0 (no end)."""
    await primary.send(fp.BatchBegin(VM, 1, 0, len(blocks), sum(map(len, blocks))))
    offset = 0
    for block in blocks:
        await primary.send_chunk(0, offset, block, compress_data=compress)
        offset += len(block)


async def _transfer_batch(
    primary: FramedStream, recovery: FramedStream, blocks: list[bytes], *, compress: bool = False
) -> list[fp.Chunk]:
    """Send one batch of ``blocks`` and return the chunks the recovery side received."""
    received: list[fp.Chunk] = []

    async def send() -> None:
        await _send_blocks(primary, blocks, compress=compress)
        conn = primary.connection
        expected = fp.BatchEnd(VM, 1, conn.chunk_count, conn.aggregate_digest)
        assert await primary.end_batch() == expected

    async def receive() -> None:
        await recovery.expect(fp.BatchBegin)
        for _ in blocks:
            chunk = await recovery.expect(fp.Chunk)
            assert isinstance(chunk, fp.Chunk)
            # The event's data is a view; keep a copy before the next frame arrives.
            received.append(
                fp.Chunk(
                    chunk.disk_index,
                    chunk.offset,
                    chunk.length,
                    chunk.digest,
                    bytes(chunk.data),
                    chunk.flags,
                )
            )
        end = await recovery.expect(fp.BatchEnd)
        assert isinstance(end, fp.BatchEnd)
        await recovery.send(fp.Ack(VM, fp.AckKind.BATCH_APPLIED, end.sequence))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(receive)
    ack = await primary.expect(fp.Ack)
    assert isinstance(ack, fp.Ack)
    assert ack.sequence == 1
    return received


class BufferedIntoStream(IntoStream):
    """An IntoStream that, like frlink.biotls.BioTLSStream, keeps what a read brought
    beyond the first byte and hands it over through ``receive_buffered_into``, no await."""

    def __init__(self, inner: trio.abc.Stream, size: int) -> None:
        super().__init__(inner, size)
        self.held = bytearray()
        self.buffered_bytes = 0

    async def receive_into(self, buffer: memoryview) -> int:
        self.into_calls += 1
        if not self.held:
            self.held += await self.inner.receive_some(self.size)
        if not self.held:
            return 0
        buffer[0] = self.held[0]  # one byte now, the rest held
        del self.held[0]
        return 1

    def receive_buffered_into(self, buffer: memoryview) -> int:
        n = min(len(buffer), len(self.held))
        buffer[:n] = self.held[:n]
        del self.held[:n]
        self.buffered_bytes += n
        return n


def _pair(a: trio.abc.Stream, b: trio.abc.Stream) -> tuple[FramedStream, FramedStream]:
    return (
        FramedStream(a, fp.Connection(fp.Role.PRIMARY)),
        FramedStream(b, fp.Connection(fp.Role.RECOVERY)),
    )


@pytest.mark.parametrize("trickle", [None, 1, 7, 4096])
async def test_batch_over_memory_streams(trickle: int | None) -> None:
    a, b = trio.testing.memory_stream_pair()
    recv_side: trio.abc.Stream = b if trickle is None else TrickleStream(b, trickle)
    primary, recovery = _pair(a, recv_side)
    await _open_session(primary, recovery)
    blocks = [os.urandom(65536), bytes(65536), os.urandom(12345), os.urandom(1)]
    if trickle == 1:
        blocks = blocks[2:]  # byte-at-a-time is slow; the small blocks prove the point
    got = await _transfer_batch(primary, recovery, blocks)
    assert [bytes(c.data) if not c.is_zero else bytes(c.length) for c in got] == blocks
    assert [c.offset for c in got] == [sum(map(len, blocks[:i])) for i in range(len(blocks))]


class GroupedStream(TrickleStream):
    """A stream with ``send_grouped`` (like frlink.biotls.BioTLSStream): counts its calls
    and the groups, and copies each group out before taking the next."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner, 1 << 20)
        self.calls = 0
        self.groups = 0

    async def send_grouped(self, groups: Iterable[list[bytes]], flush_bytes: int) -> int:
        self.calls += 1
        out = bytearray()
        for pieces in groups:
            self.groups += 1
            for piece in pieces:
                out += piece
        await self.inner.send_all(out)
        return len(out)


@pytest.mark.parametrize("grouped", [False, True])
async def test_send_chunks_sends_what_send_chunk_would(grouped: bool) -> None:
    """send_chunks: the chunks arrive as send_chunk would send them (zero chunks as zero
    chunks, a reused producer buffer read before it is refilled), in groups of at most
    GROUP_LOCK_BYTES on a stream that has send_grouped, one by one on any other."""
    a, b = trio.testing.memory_stream_pair()
    send_side: trio.abc.Stream = GroupedStream(a) if grouped else a
    primary, recovery = _pair(send_side, b)
    await _open_session(primary, recovery)
    reused = bytearray(65536)
    blocks = [os.urandom(65536) if i % 5 else bytes(65536) for i in range(100)]

    def chunks() -> Iterator[tuple[int, int, bytes | bytearray | memoryview, bytes | None]]:
        for i, block in enumerate(blocks):
            reused[:] = block
            yield 0, i * 65536, memoryview(reused), xxhash.xxh3_128_digest(block)

    received: list[bytes] = []

    async def receive() -> None:
        await recovery.expect(fp.BatchBegin)
        for _ in blocks:
            chunk = await recovery.expect(fp.Chunk)
            assert isinstance(chunk, fp.Chunk)
            received.append(bytes(chunk.length) if chunk.is_zero else bytes(chunk.data))
        await recovery.expect(fp.BatchEnd)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await primary.send(fp.BatchBegin(VM, 1, 0, len(blocks), 65536 * len(blocks)))
        await primary.send_chunks(chunks())
        await primary.end_batch()
    assert received == blocks
    framed = 80 * (65536 + 40) + 20 * 40  # headers of 32 bytes after an 8-byte envelope
    assert primary.chunk_bytes_sent == framed
    if grouped:
        assert isinstance(send_side, GroupedStream)
        assert send_side.groups == len(blocks)
        assert send_side.calls == -(-framed // GROUP_LOCK_BYTES)


@pytest.mark.parametrize("size", [7, 4096, 1 << 20])
async def test_batch_through_receive_into(size: int) -> None:
    a, b = trio.testing.memory_stream_pair()
    recv_side = IntoStream(b, size)
    primary, recovery = _pair(a, recv_side)
    await _open_session(primary, recovery)
    blocks = [os.urandom(65536), bytes(65536), os.urandom(12345), os.urandom(1)]
    got = await _transfer_batch(primary, recovery, blocks)
    assert [bytes(c.data) if not c.is_zero else bytes(c.length) for c in got] == blocks
    assert recv_side.into_calls > 0
    assert recv_side.some_calls == 0
    # End of stream mid-frame through receive_into is a truncated frame, as with receive_some.
    frame = primary.connection.send(fp.Keepalive())
    await a.send_all(frame[:-1])
    await a.aclose()
    with pytest.raises(fp.TruncatedFrame):
        await recovery.next_event()


async def test_hostile_length_is_refused_reported_and_closed() -> None:
    a, b = trio.testing.memory_stream_pair()
    primary, recovery = _pair(a, b)
    await primary.send(fp.NegotiateRequest())
    await recovery.expect(fp.NegotiateRequest)
    # A control tag claiming a 4 GiB body: refused from the 8 envelope bytes alone.
    await a.send_all(bytes.fromhex("00000003ffffffff"))
    with pytest.raises(fp.FrameTooLarge):
        await recovery.next_event()
    # The peer is told why, then sees the end of the stream.
    raw = b""
    while chunk := await a.receive_some():
        raw += chunk
    error = fp.codec.decode_frame(raw)
    assert isinstance(error, fp.Error)
    assert error.error_code is fp.ErrorCode.FRAME_TOO_LARGE


async def test_end_of_stream_mid_frame_is_truncated() -> None:
    a, b = trio.testing.memory_stream_pair()
    primary, recovery = _pair(a, b)
    frame = primary.connection.send(fp.NegotiateRequest())
    await a.send_all(frame[:-2])
    await a.aclose()
    with pytest.raises(fp.TruncatedFrame):
        await recovery.next_event()


async def test_clean_end_of_stream_between_frames() -> None:
    a, b = trio.testing.memory_stream_pair()
    primary, recovery = _pair(a, b)
    await primary.send(fp.NegotiateRequest())
    await a.aclose()
    assert isinstance(await recovery.next_event(), fp.NegotiateRequest)
    assert isinstance(await recovery.next_event(), fp.ConnectionClosed)


async def test_expect_raises_the_error_class_of_a_refusal() -> None:
    a, b = trio.testing.memory_stream_pair()
    primary, recovery = _pair(a, b)
    await primary.send(fp.NegotiateRequest())
    await recovery.expect(fp.NegotiateRequest)
    policy = fp.ServerPolicy(fp.RecoveryType.STANDALONE, "r1.example.com")
    await recovery.send(fp.answer_negotiation(fp.NegotiateRequest(), policy))
    await primary.expect(fp.NegotiateResponse)
    await primary.send(fp.RelationshipOpen(VM))
    await recovery.expect(fp.RelationshipOpen)
    await recovery.send_error(fp.VMNotHere("moved to r2"))
    with pytest.raises(fp.VMNotHere, match="moved to r2"):
        await primary.expect(fp.RelationshipAccepted)
    assert primary.connection.state is fp.State.READY


async def test_expect_skips_keepalives_and_ignorable_tags() -> None:
    # ENV-7, SM-6: neither is an answer, and neither is a violation: what is awaited
    # still comes (the reference server used to close on an ignorable tag first).
    a, b = trio.testing.memory_stream_pair()
    primary, recovery = _pair(a, b)
    await a.send_all(bytes.fromhex("0000812300000003616263"))  # ignorable tag 0x8123
    await primary.send(fp.NegotiateRequest())
    assert isinstance(await recovery.expect(fp.NegotiateRequest), fp.NegotiateRequest)
    policy = fp.ServerPolicy(fp.RecoveryType.STANDALONE, "r1.example.com")
    await recovery.send(fp.answer_negotiation(fp.NegotiateRequest(), policy))
    await primary.expect(fp.NegotiateResponse)
    await primary.send(fp.RelationshipOpen(VM))
    await recovery.expect(fp.RelationshipOpen)
    await recovery.send(fp.Keepalive(7))
    await recovery.send_error(fp.UnknownVM("no such VM"))
    with pytest.raises(fp.UnknownVM):
        await primary.expect(fp.RelationshipAccepted)
    # Asked for, a Keepalive is returned like any message.
    await recovery.send(fp.Keepalive(8))
    got = await primary.expect(fp.Keepalive)
    assert isinstance(got, fp.Keepalive)
    assert got.token == 8


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_mutual_tls_over_loopback_tcp(ca: trustme.CA) -> None:
    """A real TCP connection on two loopback addresses, TLS 1.3, both sides certified."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(server_ctx)
    ca.issue_cert("r1.example.com").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ca.configure_trust(client_ctx)
    ca.issue_cert("primary.example.com").configure_cert(client_ctx)

    blocks = [os.urandom(1024 * 1024) for _ in range(4)] + [bytes(1024 * 1024)]
    with trio.fail_after(30):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.2")
        port = listeners[0].socket.getsockname()[1]
        accepted: list[trio.SocketStream] = []

        async def accept() -> None:
            stream = await listeners[0].accept()
            assert isinstance(stream, trio.SocketStream)
            accepted.append(stream)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            tcp = await trio.open_tcp_stream("127.0.0.2", port, local_address="127.0.0.3")
        server = trio.SSLStream(accepted[0], server_ctx, server_side=True)
        client = trio.SSLStream(tcp, client_ctx, server_hostname="r1.example.com")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)
        cert = server.getpeercert()
        assert cert is not None
        assert [v for k, v in cert["subjectAltName"] if k == "DNS"] == ["primary.example.com"]
        assert client.version() == "TLSv1.3"
        primary, recovery = _pair(client, server)
        await _open_session(primary, recovery)
        received = await _transfer_batch(primary, recovery, blocks, compress=True)
        await client.aclose()
        await server.aclose()
        await listeners[0].aclose()

    assert len(received) == len(blocks)
    for chunk, block in zip(received, blocks, strict=True):
        assert (bytes(chunk.length) if chunk.is_zero else bytes(chunk.data)) == block
    assert received[-1].is_zero  # the zero block travelled as a flag, without data


@pytest.mark.parametrize("into", [False, True])
async def test_chunk_data_held_across_frames_is_never_overwritten(into: bool) -> None:
    # Big frames are read into a reused buffer: only once no view of it is left.
    a, b = trio.testing.memory_stream_pair()
    primary, recovery = _pair(a, IntoStream(b, 1 << 20) if into else b)
    await _open_session(primary, recovery)
    blocks = [os.urandom(256 * 1024) for _ in range(6)]
    held: list[fp.Chunk] = []
    addresses: list[int] = []

    async def receive() -> None:
        await recovery.expect(fp.BatchBegin)
        for i in range(len(blocks)):
            chunk = await recovery.expect(fp.Chunk)
            assert isinstance(chunk, fp.Chunk)
            view = memoryview(chunk.data)
            addresses.append(id(view.obj))
            del view
            if i < 3:
                held.append(chunk)  # kept: its buffer must not be reused
            del chunk

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send_blocks, primary, blocks)
        nursery.start_soon(receive)
    assert [bytes(c.data) for c in held] == blocks[:3]
    # The first three frames each got a buffer of their own; once the events were
    # dropped (chunks 3, 4, 5), one buffer served them all.
    assert len(set(addresses[:3])) == 3
    assert addresses[3] == addresses[4] == addresses[5]


async def test_a_chunk_payload_in_a_pooled_frame_starts_on_a_page() -> None:
    # The recovery server writes IR chunks with O_DIRECT straight from the frame buffer.
    a, b = trio.testing.memory_stream_pair()
    primary, recovery = _pair(a, IntoStream(b, 1 << 20))
    await _open_session(primary, recovery)
    block = os.urandom(1 << 20)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send_blocks, primary, [block])
        await recovery.expect(fp.BatchBegin)
        chunk = await recovery.expect(fp.Chunk)
    assert isinstance(chunk, fp.Chunk)
    view = memoryview(chunk.data)
    assert bytes(view) == block
    assert not view.readonly
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    assert address % PAYLOAD_ALIGN == 0
    assert PAYLOAD_ALIGN % 4096 == 0


async def test_buffered_bytes_are_taken_without_waiting_but_not_for_ever() -> None:
    # What the stream already holds is read with no await; every BUFFERED_BUDGET bytes
    # the awaited read runs all the same, so that other tasks get their turn.
    a, b = trio.testing.memory_stream_pair()
    stream = BufferedIntoStream(b, 64 << 20)  # one read takes all that was sent
    primary, recovery = _pair(a, stream)
    await _open_session(primary, recovery)
    blocks = [os.urandom(256 * 1024) for _ in range(48)]  # 12 MiB
    got: list[bytes] = []

    async def receive() -> None:
        await recovery.expect(fp.BatchBegin)
        for _ in blocks:
            chunk = await recovery.expect(fp.Chunk)
            assert isinstance(chunk, fp.Chunk)
            got.append(bytes(chunk.data))

    await _send_blocks(primary, blocks)  # all of it waits in the transport: one read brings it
    calls_before = stream.into_calls
    await receive()
    assert got == blocks
    total = sum(map(len, blocks))
    assert stream.buffered_bytes > total // 2  # most came without an await
    assert stream.into_calls - calls_before >= total // BUFFERED_BUDGET


async def test_a_large_frames_buffer_goes_back_to_the_pool_when_idle_and_at_close() -> None:
    a, b = trio.testing.memory_stream_pair()
    primary, recovery = _pair(a, b)
    await _open_session(primary, recovery)
    lent = FRAME_POOL.lent
    await primary.send(fp.BatchBegin(VM, 1, 0, 2, 2 * 256 * 1024))
    await primary.send_chunk(0, 0, os.urandom(256 * 1024))
    await recovery.expect(fp.BatchBegin)
    chunk = await recovery.expect(fp.Chunk)
    assert isinstance(chunk, fp.Chunk)
    frame = memoryview(chunk.data).obj
    assert isinstance(frame, mmap.mmap)
    assert FRAME_POOL.lent == lent + 1  # held while its event is in use
    del chunk

    async with trio.open_nursery() as nursery:
        # Waiting for the next frame (an idle connection): the buffer is back in the pool.
        nursery.start_soon(recovery.next_event)
        await trio.testing.wait_all_tasks_blocked()
        assert FRAME_POOL.lent == lent
        assert any(buffer is frame for buffer in FRAME_POOL.free)
        # The next large frame borrows it again, and closing gives it back.
        await primary.send_chunk(0, 256 * 1024, os.urandom(256 * 1024))
    assert FRAME_POOL.lent == lent + 1
    assert not any(buffer is frame for buffer in FRAME_POOL.free)
    await recovery.aclose()
    assert FRAME_POOL.lent == lent
    assert any(buffer is frame for buffer in FRAME_POOL.free)


def test_a_pooled_buffer_is_not_shared_with_a_forked_process() -> None:
    # A worker forked later (the simulation's ProcessPoolExecutor) must not write into the
    # pages its parent or siblings read frames into: anonymous mmaps are shared by default.
    pool = BufferPool()
    buffer = pool.take(1 << 20)
    buffer[:6] = b"parent"
    pid = os.fork()
    if pid == 0:  # the child: write, leave at once
        buffer[:6] = b"child!"
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert buffer[:6] == b"parent"
    pool.give(buffer)


def test_the_pool_keeps_no_buffer_still_in_use_and_at_most_keep() -> None:
    pool = BufferPool(keep=1, minimum=2 * mmap.PAGESIZE)
    first, second = pool.take(10), pool.take(3 * mmap.PAGESIZE)
    assert (len(first), len(second), pool.lent) == (2 * mmap.PAGESIZE, 3 * mmap.PAGESIZE, 2)
    view = memoryview(first)
    assert not pool.give(first)  # a view of it is alive: left to the garbage collector
    assert not first.closed
    view.release()
    assert pool.give(second)
    third = pool.take(4 * mmap.PAGESIZE)
    assert third is not second  # too small for it
    pool.give(pool.take(1))  # second again
    assert not pool.give(third)  # full: unmapped at once
    assert third.closed
    assert pool.take(2 * mmap.PAGESIZE) is second
    pool.clear()
    assert pool.free == []


def test_a_buffer_given_back_while_viewed_is_taken_back_once_the_view_is_gone() -> None:
    """A frame's payload view outlives the give() (the caller holds it until its next
    event): the buffer must come back at the next take(), not be dropped for a fresh
    mapping whose pages fault in again on every frame."""
    from frproto.trio_io import BufferPool

    pool = BufferPool(keep=2, minimum=1 << 20)
    first = pool.take(1 << 20)
    view = memoryview(first)[:10]
    assert pool.give(first) is False  # viewed: not free yet
    assert pool.free == []
    again = pool.take(1 << 20)
    assert again is not first  # still viewed: a new one
    view.release()
    pool.give(again)
    third = pool.take(1 << 20)
    assert third is first or third is again
    reclaimed = {id(b) for b in pool.free} | {id(third)}
    assert id(first) in reclaimed  # the once-viewed buffer came back
