"""Bad input and faults against a real recovery server process: each is refused with its
error and nothing already stored is lost or changed."""

from __future__ import annotations

import errno
import random
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import frproto as fp
from frlink.certs import create_ca, issue_host_cert
from frlink.tls import TLSFailure, client_context, tls_connect
from frproto.trio_io import FramedStream
from frtesting.server import ServerProcess
from node.config import load_recovery_server_config
from node.primary.client import RecoveryClient
from node.recovery_server import RecoveryServer
from node.storage import StorageFaults

from .site import PRIMARY_HOST, SERVER_HOST, SERVER_NAME, Site
from .test_replication_e2e import make_image, scribble

MIB = 1024 * 1024


@pytest.fixture
def server(site: Site) -> Iterator[ServerProcess]:
    proc = site.start_server()
    yield proc
    proc.stop()


def _vmid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(bytes=rng.randbytes(16), version=4)


async def _connect(site: Site, server: ServerProcess, name: str) -> RecoveryClient:
    return await RecoveryClient.connect(
        SERVER_HOST,
        server.port,
        server_name=SERVER_NAME,
        ssl_context=site.client_context(name),
        local_address=PRIMARY_HOST,
    )


async def test_plaintext_client_gets_the_protocols_error(server: ServerProcess) -> None:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(SERVER_HOST, server.port)
        conn = fp.Connection(fp.Role.PRIMARY)
        await stream.send_all(conn.send(fp.NegotiateRequest()))
        raw = b""
        while chunk := await stream.receive_some():
            raw += chunk
    error = fp.codec.decode_frame(raw)
    assert isinstance(error, fp.Error)
    assert error.error_code is fp.ErrorCode.NOT_AUTHORIZED
    assert "mutual TLS" in error.text


async def test_certificate_from_another_ca_is_refused(site: Site, server: ServerProcess) -> None:
    other = site.root / "other-ca"
    create_ca(other, name="someone else")
    issue_host_cert(other, other, "p1.primary.example.com")
    ctx = client_context(
        other / "p1.primary.example.com.pem",
        other / "p1.primary.example.com-key.pem",
        site.certs / "ca.pem",  # the client trusts the server; the server does not trust it
    )
    with trio.fail_after(20), pytest.raises((TLSFailure, trio.BrokenResourceError)):
        await RecoveryClient.connect(
            SERVER_HOST, server.port, server_name=SERVER_NAME, ssl_context=ctx
        )
    assert server.wait_for_log("TLS handshake refused")
    assert not any(site.storage.glob("*-*-*"))


async def test_expired_certificate_is_refused(site: Site, server: ServerProcess) -> None:
    from datetime import UTC, datetime, timedelta

    then = datetime.now(UTC) - timedelta(days=30)
    issue_host_cert(
        site.certs,
        site.certs,
        "old.primary.example.com",
        not_before=then - timedelta(days=10),
        not_after=then,
    )
    with trio.fail_after(20), pytest.raises((TLSFailure, trio.BrokenResourceError)):
        await _connect(site, server, "old.primary.example.com")


async def test_unauthorized_primary_is_refused_in_negotiation(
    site: Site, server: ServerProcess
) -> None:
    issue_host_cert(site.certs, site.certs, "intruder.elsewhere.example.org")
    with trio.fail_after(20), pytest.raises(fp.NotAuthorized, match="refused the negotiation"):
        await _connect(site, server, "intruder.elsewhere.example.org")
    assert server.wait_for_log("is not authorized")


async def test_an_unauthorized_peers_refusal_tells_nothing_chosen(
    site: Site, server: ServerProcess
) -> None:
    # NEG-12: the refusal of a certificate matching no entry is the one every refusal has:
    # compression NONE although the request offers LZ4, which an authorized peer gets.
    issue_host_cert(site.certs, site.certs, "intruder.elsewhere.example.org")
    request = fp.NegotiateRequest()
    with trio.fail_after(20):
        stream = await tls_connect(
            SERVER_HOST,
            server.port,
            site.client_context("intruder.elsewhere.example.org"),
            server_name=SERVER_NAME,
            local_address=PRIMARY_HOST,
        )
        conn = FramedStream(stream, fp.Connection(fp.Role.PRIMARY))
        try:
            await conn.send(request)
            answer = await conn.expect(fp.NegotiateResponse)
        finally:
            await trio.aclose_forcefully(stream)
    policy = fp.ServerPolicy(fp.RecoveryType.STANDALONE, SERVER_NAME)
    assert answer == fp.refuse_negotiation(request, policy, fp.ErrorCode.NOT_AUTHORIZED)
    assert answer.compression is fp.Compression.NONE
    assert fp.answer_negotiation(request, policy).compression is fp.Compression.LZ4


async def test_vm_this_server_does_not_hold_is_unknown(site: Site, server: ServerProcess) -> None:
    client = await _connect(site, server, "p1.primary.example.com")
    try:
        with trio.fail_after(20), pytest.raises(fp.UnknownVM):
            await client.open(uuid.uuid4(), name="vm", disks=(), create=False)
    finally:
        await client.aclose()


async def test_other_trust_group_cannot_write_a_bound_relationship(site: Site) -> None:
    # p1 is in trust group site-a, p2 in site-b.
    site.server_config.write_text(
        site.server_config.read_text()
        + '\n[[authorization]]\nprimary = "p2.other.example.com"\n'
        + 'storage = "replicas"\ntrust_group = "site-b"\n'
    )
    issue_host_cert(site.certs, site.certs, "p2.other.example.com")
    config = site.server_config.read_text()
    server = site.start_server()
    site.server_config.write_text(config)
    rng = random.Random(5)
    vmid = _vmid(rng)
    image = make_image(site.root / "disk0.img", MIB, rng)
    try:
        replicator = site.replicator(vmid, "vm", [image], server.port)
        with trio.fail_after(30):
            await replicator.cycle()
            before = site.replica_image(vmid, 0).read_bytes()
            intruder = await _connect(site, server, "p2.other.example.com")
            try:
                disks = (fp.DiskInfo("disk0", MIB),)
                with pytest.raises(fp.NotAuthorized, match="trust group"):
                    await intruder.open(vmid, name="vm", disks=disks, create=False)
                with pytest.raises(fp.NotAuthorized, match="trust group"):
                    await intruder.open(vmid, name="vm", disks=disks, create=True)
            finally:
                await intruder.aclose()
    finally:
        server.stop()
    assert site.replica_image(vmid, 0).read_bytes() == before


async def test_path_tricks_in_names_are_refused_and_nothing_is_created(
    site: Site, server: ServerProcess
) -> None:
    vmid = uuid.uuid4()
    body = (
        vmid.bytes
        + struct.pack(">H", 8)
        + b"../../vm"
        + struct.pack(">I", 0)
        + struct.pack(">H", 1)
        + struct.pack(">B", 11)
        + b"../../disk0"
        + struct.pack(">Q", MIB)
    )
    frame = struct.pack(">HHI", 0, fp.MessageTag.RELATIONSHIP_CREATE, len(body)) + body
    client = await _connect(site, server, "p1.primary.example.com")
    try:
        with trio.fail_after(20):
            await client.conn.stream.send_all(frame)
            reply = await client.conn.next_event()
    finally:
        await client.aclose()
    assert isinstance(reply, fp.Error)
    assert reply.error_code is fp.ErrorCode.BAD_NAME
    assert not any(site.storage.glob("*-*-*"))
    assert not (site.root.parent / "vm").exists()


async def test_chunk_corrupted_in_flight_is_refused_then_resent(
    site: Site, server: ServerProcess
) -> None:
    rng = random.Random(9)
    vmid = _vmid(rng)
    image = make_image(site.root / "disk0.img", 2 * MIB, rng)
    replicator = site.replicator(vmid, "vm", [image], server.port)
    with trio.fail_after(60):
        await replicator.cycle()
        before = site.replica_image(vmid, 0).read_bytes()
        scribble(image, rng, writes=5)

        def flip(data: bytes) -> bytes:
            out = bytearray(data)
            out[len(out) // 2] ^= 0x40
            return bytes(out)

        replicator.chunk_fault = flip
        with pytest.raises(fp.DigestMismatch):
            await replicator.cycle()
        assert site.replica_image(vmid, 0).read_bytes() == before  # nothing written
        assert len(replicator.pending.cycles()) == 1  # the cycle waits to be resent
        replicator.chunk_fault = None
        await replicator.cycle()
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
    assert server.wait_for_log("digest mismatch")


async def test_full_disk_refuses_the_batch_and_keeps_everything(site: Site) -> None:
    """The recovery server's disk fills during a batch (a fault hook: no size-limited file
    system can be mounted here): a clear NO_SPACE, the replica stays at its last point, and
    the primary keeps its pending changes and delivers them once there is room."""
    full = {"on": False}

    def before_write(path: Path, nbytes: int) -> None:
        if full["on"] and "journal" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    config = load_recovery_server_config(site.server_config)
    server = RecoveryServer(config, faults=StorageFaults(before_write=before_write))
    rng = random.Random(13)
    vmid = _vmid(rng)
    image = make_image(site.root / "disk0.img", 2 * MIB, rng)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve)
            port = listeners[0].socket.getsockname()[1]
            replicator = site.replicator(vmid, "vm", [image], port)
            await replicator.cycle()
            before = site.replica_image(vmid, 0).read_bytes()
            scribble(image, rng, writes=5)
            full["on"] = True
            with pytest.raises(fp.NoSpace, match="no space left on the storage") as refused:
                await replicator.cycle()
            # The path of the journal that could not be written stays in the server's log
            # (ERR-11): the primary is told only that the storage is full.
            assert str(site.root) not in refused.value.message
            assert "/" not in refused.value.message
            assert site.replica_image(vmid, 0).read_bytes() == before
            assert [c.sequence for c in replicator.pending.cycles()] == [1]
            full["on"] = False
            await replicator.cycle()
            assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
            assert replicator.state.sequence == 1
            nursery.cancel_scope.cancel()
