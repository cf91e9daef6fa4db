"""Deadlines and connection bounds against a real server process (docs/protocol.md 10.2):
a few hundred idle connections from one address (plain TCP, TLS only, negotiated) do not
keep a legitimate primary out (its IR and a batch complete meanwhile), the ones over the
per-address bound are closed at once, and the others at their deadline with the Error
the protocol says. Then a primary that waits longer than the session deadline keeps its
connection by its Keepalives (TIM-8)."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

import pytest
import trio

import frproto as fp
from frlink.tls import tls_connect
from frproto.trio_io import FramedStream
from node.config import load_recovery_server_config
from node.primary import client as client_module
from node.primary.client import RecoveryClient
from node.recovery_server import RecoveryServer

from .site import PRIMARY_HOST, SERVER_HOST, SERVER_NAME, Site

IDLE_HOST = "127.0.0.5"
NEGOTIATE = 10.0
READY = 8.0
PER_KIND = 100
PER_ADDRESS = 250
CONNECTIONS = f"""
negotiate_timeout = {NEGOTIATE}
ready_timeout = {READY}
session_timeout = {READY}
frame_timeout = {READY}
max = 400
max_per_address = {PER_ADDRESS}
max_negotiating = {PER_ADDRESS}
max_handshaking = {PER_ADDRESS}
"""


@dataclass
class Idle:
    """One idle connection and how it ended."""

    kind: str  # "tcp", "tls", "negotiated"
    started: float = 0.0  #: when its deadline started (connect, or the negotiation)
    ended: float | None = None
    data: bytes = b""
    refused: bool = False  #: closed before (or during) the TLS handshake, within 1 s


async def _read_to_end(stream: trio.abc.Stream, idle: Idle) -> None:
    data = bytearray()
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # a reset, or TLS torn down: ended all the same
    idle.ended = trio.current_time()
    idle.data = bytes(data)
    await trio.aclose_forcefully(stream)


async def _hold(site: Site, port: int, idle: Idle, limiter: trio.CapacityLimiter) -> None:
    async with limiter:
        idle.started = trio.current_time()
        if idle.kind == "tcp":
            stream: trio.abc.Stream = await trio.open_tcp_stream(
                SERVER_HOST, port, local_address=IDLE_HOST
            )
        else:
            try:
                tls = await tls_connect(
                    SERVER_HOST,
                    port,
                    site.client_context(),
                    server_name=SERVER_NAME,
                    local_address=IDLE_HOST,
                    timeout=5,
                )
            except Exception:
                idle.refused = True
                idle.ended = trio.current_time()
                return
            stream = tls
            if idle.kind == "negotiated":
                framed = FramedStream(tls, fp.Connection(fp.Role.PRIMARY))
                await framed.send(fp.NegotiateRequest())
                assert isinstance(await framed.expect(fp.NegotiateResponse), fp.NegotiateResponse)
                idle.started = trio.current_time()
    await _read_to_end(stream, idle)


def _error_code(data: bytes) -> int | None:
    """The code of the Error frame ``data`` starts with (None: not one)."""
    if len(data) < 8:
        return None
    size = 8 + int.from_bytes(data[4:8], "big")
    message = fp.codec.decode_frame(data[:size])
    return message.code if isinstance(message, fp.Error) else None


async def test_idle_connections_do_not_keep_a_primary_out(site: Site) -> None:
    site.write_server_config(connections=CONNECTIONS)
    server = site.start_server()
    try:
        rng = random.Random(3)
        image = site.root / "disk0.img"
        image.write_bytes(rng.randbytes(4 << 20))
        vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
        replicator = site.replicator(vmid, "vm-limits", [image], server.port)
        idles = [Idle(kind) for kind in ("negotiated", "tls", "tcp") for _ in range(PER_KIND)]
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                limiter = trio.CapacityLimiter(25)
                # Negotiated first, then TLS only, then plain TCP: the last 50 of these are
                # over the bound of 250 from the idle address.
                for kind in ("negotiated", "tls", "tcp"):
                    mine = [i for i in idles if i.kind == kind]
                    for idle in mine:
                        nursery.start_soon(_hold, site, server.port, idle, limiter)
                    while any(i.started == 0.0 for i in mine):
                        await trio.sleep(0.05)
                    await trio.sleep(0.2)
                # Meanwhile a primary from another address: its IR, then a batch.
                await replicator.cycle()
                with image.open("r+b") as f:
                    f.seek(1 << 20)
                    f.write(rng.randbytes(300_000))
                await replicator.cycle()
                assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
                assert replicator.state.sequence == 1
                served_at = trio.current_time()
    finally:
        server.stop()
    # Every idle connection ended, none before its primary was served.
    assert all(i.ended is not None for i in idles)
    tcp = [i for i in idles if i.kind == "tcp"]
    over = [i for i in tcp if i.ended is not None and i.ended - i.started < 2.0]
    assert len(over) == 3 * PER_KIND - PER_ADDRESS  # closed at once (TIM-12)...
    assert all(i.data == b"" for i in tcp)  # ... and at the deadline, both without a byte
    for idle in idles:
        if idle in over:
            continue
        assert not idle.refused, idle
        assert idle.ended is not None
        elapsed = idle.ended - idle.started
        deadline = READY if idle.kind == "negotiated" else NEGOTIATE
        # The deadline, then (after an Error) the bounded lingering close of ERR-10.
        assert deadline * 0.9 <= elapsed <= deadline + 6.0, (idle, elapsed)
        if idle.kind != "tcp":
            assert _error_code(idle.data) == fp.ErrorCode.BUSY, idle
    assert served_at > 0


async def test_a_primary_keeps_its_connection_by_keepalives(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    site.write_server_config(connections="session_timeout = 1.5\nready_timeout = 1.5\n")
    server = site.start_server()
    try:
        disks = (fp.DiskInfo("disk0", 1 << 20),)

        async def idle_in_session(keepalive: float) -> RecoveryClient:
            monkeypatch.setattr(client_module, "KEEPALIVE_SECONDS", keepalive)
            client = await RecoveryClient.connect(
                SERVER_HOST,
                server.port,
                server_name=SERVER_NAME,
                ssl_context=site.client_context(),
                local_address=PRIMARY_HOST,
            )
            await client.open(vmid, name="vm-keep", disks=disks)
            await trio.sleep(2.5)  # a long local step (a capture, a digest scan)
            return client

        vmid = uuid.uuid4()
        with trio.fail_after(60):
            client = await idle_in_session(0.4)
            answer = await client.digest_map(vmid, 0, 65536, 0, 4)  # still served
            assert len(answer.digests) == 4 * 16
            await client.aclose()
            # Without Keepalives the server closes it at its deadline: Error BUSY.
            client = await idle_in_session(3600.0)
            with pytest.raises((fp.Busy, trio.BrokenResourceError)):
                await client.digest_map(vmid, 0, 65536, 0, 4)
            await client.aclose()
    finally:
        server.stop()


async def test_the_server_sends_keepalives_while_an_answer_takes_long(site: Site) -> None:
    # TIM-9: a RelationshipDelete whose cluster part (on_deleted) takes 2 s, with the
    # recovery side's keepalive interval at 0.3 s: Keepalives come before the Ack.
    site.write_server_config(connections="keepalive = 0.3\n")
    config = load_recovery_server_config(site.server_config)

    async def slow(vmid: uuid.UUID) -> None:
        await trio.sleep(2.0)

    server = RecoveryServer(config, on_deleted=slow)
    vmid = uuid.uuid4()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve)
            port = listeners[0].socket.getsockname()[1]
            client = await RecoveryClient.connect(
                SERVER_HOST,
                port,
                server_name=SERVER_NAME,
                ssl_context=site.client_context(),
                local_address=PRIMARY_HOST,
            )
            await client.open(vmid, name="vm-slow", disks=(fp.DiskInfo("disk0", 1 << 20),))
            await client.conn.send(fp.RelationshipDelete(vmid))
            seen: list[object] = []
            while not seen or not isinstance(seen[-1], fp.Ack):
                seen.append(await client.conn.next_event())
            await client.aclose()
            nursery.cancel_scope.cancel()
    keepalives = [e for e in seen if isinstance(e, fp.Keepalive)]
    assert 4 <= len(keepalives) <= 8, seen
    assert isinstance(seen[-1], fp.Ack)
