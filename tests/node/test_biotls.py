"""frlink.biotls.BioTLSStream over Trio memory streams: the generic stream checks, receive_into,
end of stream and truncation, handshake refusals with their alert."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator

import pytest
import trio
import trio.testing
import trustme

from frlink.biotls import HOLD_SECONDS, REFILL_POOL, SEND_PIECE, BioTLSStream

SERVER_NAME = "r1.example.com"


@pytest.fixture(scope="module")
def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts: TLS 1.3, mutual authentication, one trustme CA."""
    ca = trustme.CA()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(server)
    ca.issue_cert(SERVER_NAME).configure_cert(server)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    ca.configure_trust(client)
    ca.issue_cert("p1.example.com").configure_cert(client)
    return server, client


Pair = tuple[BioTLSStream[trio.abc.Stream], BioTLSStream[trio.abc.Stream]]


def _wrap(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> Pair:
    """(client, server) BioTLSStreams over an in-memory transport pair (no handshake yet)."""
    raw_client, raw_server = trio.testing.memory_stream_pair()
    server_ctx, client_ctx = contexts
    client: BioTLSStream[trio.abc.Stream] = BioTLSStream(
        raw_client, client_ctx, server_hostname=SERVER_NAME
    )
    server: BioTLSStream[trio.abc.Stream] = BioTLSStream(raw_server, server_ctx, server_side=True)
    return client, server


async def _handshaken(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> Pair:
    client, server = _wrap(contexts)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    return client, server


async def test_check_two_way_stream(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    async def maker() -> Pair:
        return await _handshaken(contexts)

    async def flipped() -> Pair:
        client, server = await _handshaken(contexts)
        return server, client

    await trio.testing.check_two_way_stream(maker, None)
    await trio.testing.check_two_way_stream(flipped, None)


async def test_lazy_handshake(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """Without do_handshake, the first send or receive runs it."""
    client, server = _wrap(contexts)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"hello")
        assert await server.receive_some(10) == b"hello"
    assert client.version() == "TLSv1.3"
    names = [v for k, v in server.getpeercert()["subjectAltName"] if k == "DNS"]
    assert names == ["p1.example.com"]
    await client.aclose()
    await server.aclose()


async def test_receive_into_drains_every_buffered_record(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """512 KiB sent in 32 records arrives with one receive_into (one transport read)."""
    client, server = await _handshaken(contexts)
    payload = bytes(range(256)) * 2048  # 512 KiB
    await client.send_all(payload)
    buffer = bytearray(len(payload) + 10)
    got = await server.receive_into(memoryview(buffer))
    assert got == len(payload)
    assert buffer[:got] == payload
    # A small buffer takes part of a record; the rest stays for the next call.
    await client.send_all(b"abcdef")
    small = bytearray(4)
    assert await server.receive_into(memoryview(small)) == 4
    assert small == b"abcd"
    assert await server.receive_some(100) == b"ef"
    await client.aclose()
    assert await server.receive_into(memoryview(buffer)) == 0  # close_notify: clean EOF
    assert await server.receive_some() == b""
    await server.aclose()


async def test_receive_buffered_into_hands_over_only_what_is_already_there(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """The no-wait read: before the handshake nothing; then only bytes a receive_into
    already read from the transport, never a read of its own, and never past EOF."""
    client, server = _wrap(contexts)
    assert server.receive_buffered_into(memoryview(bytearray(16))) == 0  # no handshake yet
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    await client.send_all(b"0123456789")
    # Sent but not read from the transport: nothing without waiting.
    assert server.receive_buffered_into(memoryview(bytearray(16))) == 0
    first = bytearray(4)
    assert await server.receive_into(memoryview(first)) == 4  # reads the record
    rest = bytearray(16)
    assert server.receive_buffered_into(memoryview(rest)) == 6  # the rest, no await
    assert rest[:6] == b"456789"
    assert server.receive_buffered_into(memoryview(rest)) == 0  # drained
    await client.aclose()
    assert await server.receive_into(memoryview(rest)) == 0  # close_notify: clean EOF
    assert server.receive_buffered_into(memoryview(rest)) == 0
    await server.aclose()


async def test_transport_eof_without_close_notify_is_broken(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    client, server = await _handshaken(contexts)
    await client.send_all(b"data")
    await client.transport_stream.aclose()  # truncation: no close_notify
    assert await server.receive_some(100) == b"data"
    with pytest.raises(trio.BrokenResourceError) as info:
        await server.receive_some(100)
    assert isinstance(info.value.__cause__, ssl.SSLError)
    await server.aclose()


async def test_refused_client_gets_the_alert(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """A client certificate from another CA: the server fails its handshake and sends the
    alert; the client (TLS 1.3: handshake done) reads it at its first receive."""
    server_ctx, _ = contexts
    stranger = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    stranger.minimum_version = ssl.TLSVersion.TLSv1_3
    stranger.check_hostname = False
    stranger.verify_mode = ssl.CERT_NONE
    trustme.CA().issue_cert("p1.example.com").configure_cert(stranger)
    client, server = _wrap((server_ctx, stranger))
    errors: list[BaseException] = []

    async def server_side() -> None:
        try:
            await server.do_handshake()
        except trio.BrokenResourceError as exc:
            errors.append(exc)
        await server.aclose()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_side)
            await client.do_handshake()
            with pytest.raises(trio.BrokenResourceError) as info:
                await client.receive_some(100)
    assert isinstance(errors[0].__cause__, ssl.SSLCertVerificationError)
    cause = info.value.__cause__
    assert isinstance(cause, ssl.SSLError)
    assert cause.reason == "TLSV1_ALERT_UNKNOWN_CA"
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")
    await client.aclose()


async def _tcp_pair(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> tuple[BioTLSStream[trio.SocketStream], BioTLSStream[trio.SocketStream]]:
    """(client, server) BioTLSStreams over loopback TCP, handshaken (the pooled path: a
    SocketStream is read into a borrowed buffer)."""
    server_ctx, client_ctx = contexts
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    raw_client = await trio.open_tcp_stream("127.0.0.1", port)
    raw_server = await listener.accept()
    await listener.aclose()
    client = BioTLSStream(raw_client, client_ctx, server_hostname=SERVER_NAME)
    server = BioTLSStream(raw_server, server_ctx, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    return client, server


async def test_an_idle_stream_holds_no_refill_buffer(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    lent = REFILL_POOL.lent
    client, server = await _tcp_pair(contexts)
    await trio.sleep(HOLD_SECONDS * 5)
    assert REFILL_POOL.lent == lent  # the handshake's buffers went back
    payload = os.urandom(3 * 1024 * 1024)
    received = bytearray()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, payload)
            while len(received) < len(payload):
                received += await server.receive_some(1024 * 1024)
    assert received == payload  # through 64 KiB feeds of large reads
    assert REFILL_POOL.lent == lent
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.receive_some, 100)  # waits for bytes: idle
        await trio.testing.wait_all_tasks_blocked()
        assert REFILL_POOL.lent == lent + 1  # the first HOLD_SECONDS of the wait
        await trio.sleep(HOLD_SECONDS * 5)
        assert REFILL_POOL.lent == lent
        assert server._backlog_buffer is None
        await client.send_all(b"x")
    await client.aclose()
    await server.aclose()
    assert REFILL_POOL.lent == lent


async def test_a_broken_stream_keeps_no_traceback(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    # The failure is remembered as text: an exception (its traceback's frames) would keep
    # the stream and the failed call's buffers alive in a reference cycle.
    client, server = await _tcp_pair(contexts)
    await client.transport_stream.aclose()  # truncation: no close_notify
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some(100)
    assert isinstance(server._broken, str)
    with pytest.raises(trio.BrokenResourceError, match="broken"):
        await server.receive_some(100)
    await server.aclose()


def _count_writes(client: BioTLSStream[trio.abc.Stream]) -> list[int]:
    """The sizes of the client's transport writes from now on (the list fills as it goes)."""
    writes: list[int] = []
    transport = client.transport_stream
    plain_send = transport.send_all

    async def counted(data: bytes | bytearray | memoryview) -> None:
        writes.append(len(data))
        await plain_send(data)

    transport.send_all = counted  # type: ignore[method-assign]
    return writes


async def test_send_all_pieces_is_one_transport_write(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """A chunk's header and payload go out in one transport write (not a tiny write for
    the header), in order; more than ``SEND_PIECE`` of ciphertext is flushed as it goes."""
    client, server = await _handshaken(contexts)
    writes = _count_writes(client)
    header, payload = os.urandom(60), os.urandom(64 * 1024)
    got = bytearray()

    async def read(size: int) -> None:
        while len(got) < size:
            got.extend(await server.receive_some(1 << 20))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, len(header) + len(payload))
        await client.send_all_pieces([header, memoryview(payload)])
    assert bytes(got) == header + payload
    assert len(writes) == 1
    big = os.urandom(3 * SEND_PIECE + 5)
    writes.clear()
    got.clear()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, len(header) + len(big))
        await client.send_all_pieces([header, big])
    assert bytes(got) == header + big
    assert 3 <= len(writes) <= 4
    await client.send_all_pieces([])  # nothing to send: a checkpoint, no write
    assert 3 <= len(writes) <= 4


async def test_send_grouped_writes_once_per_flush_size_in_order(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """Groups of pieces go out in order, one transport write per ``flush_bytes`` of
    ciphertext (and one for the rest), each group encrypted before the next is taken."""
    client, server = await _handshaken(contexts)
    writes = _count_writes(client)
    reused = bytearray(64 * 1024)  # the producer's one buffer, refilled for every group
    expected = bytearray()

    def groups() -> Iterator[list[bytes | bytearray | memoryview]]:
        for i in range(20):
            reused[:] = os.urandom(len(reused))
            header = i.to_bytes(4, "big")
            expected.extend(header + reused)
            yield [header, memoryview(reused)]

    got = bytearray()

    async def read(size: int) -> None:
        while len(got) < size:
            got.extend(await server.receive_some(1 << 20))

    total = 20 * (4 + len(reused))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, total)
        assert await client.send_grouped(groups(), 256 * 1024) == total
    assert bytes(got) == bytes(expected)
    # ~1.3 MiB of ciphertext in writes of at least 256 KiB: 5 or 6 writes, not 20.
    assert 5 <= len(writes) <= 6
    assert all(n >= 256 * 1024 for n in writes[:-1])
