"""A primary that reaches its recovery server by IP address (TLS-11 to TLS-13): no SNI
is sent, the server serves the connection as its host identity, and the server's
certificate must hold the address as an IP address subjectAltName; on loopback."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import frproto as fp
from frlink.certs import create_ca, issue_host_cert
from frlink.tls import (
    TLSFailure,
    client_context,
    requested_name,
    server_context,
    tls_connect,
    tls_handshake_server,
)
from frtesting.server import ServerProcess
from node.primary.client import RecoveryClient
from node.primary.operations import Refused, _target

from .site import PRIMARY_HOST, SERVER_HOST, SERVER_NAME, Site


@pytest.fixture
def server(site: Site) -> Iterator[ServerProcess]:
    proc = site.start_server()
    yield proc
    proc.stop()


async def test_a_primary_reaches_a_server_by_its_ip_address(
    site: Site, server: ServerProcess
) -> None:
    # The site's server certificate holds 127.0.0.2 as an IP address SAN.
    with trio.fail_after(20):
        client = await RecoveryClient.connect(
            SERVER_HOST,
            server.port,
            server_name=SERVER_HOST,
            ssl_context=site.client_context(),
            local_address=PRIMARY_HOST,
        )
    try:
        assert client.negotiated.ok
        assert client.negotiated.recovery_type is fp.RecoveryType.STANDALONE
        assert client.negotiated.server_name == SERVER_NAME  # its FQDN (NEG-6)
    finally:
        await client.aclose()


async def test_a_certificate_without_the_address_fails_with_a_clear_message(
    site: Site,
) -> None:
    # Re-issue the server's certificate with its DNS name only.
    issue_host_cert(site.certs, site.certs, SERVER_NAME, overwrite=True)
    server = site.start_server()
    try:
        with trio.fail_after(20), pytest.raises(TLSFailure) as caught:
            await RecoveryClient.connect(
                SERVER_HOST,
                server.port,
                server_name=SERVER_HOST,
                ssl_context=site.client_context(),
                local_address=PRIMARY_HOST,
            )
        message = str(caught.value)
        assert "IP address mismatch" in message
        assert "127.0.0.2 is an IP address" in message
        assert "frctl cert issue HOSTNAME --ip 127.0.0.2" in message
        # By its name the same server is reached (the certificate holds it).
        with trio.fail_after(20):
            client = await RecoveryClient.connect(
                SERVER_HOST,
                server.port,
                server_name=SERVER_NAME,
                ssl_context=site.client_context(),
                local_address=PRIMARY_HOST,
            )
        await client.aclose()
    finally:
        server.stop()


@pytest.mark.parametrize("literal", ["127.0.0.2", "::1", "[::1]"])
async def test_no_sni_is_sent_for_an_ip_literal(tmp_path: Path, literal: str) -> None:
    certs = tmp_path / "certs"
    create_ca(certs)
    issue_host_cert(certs, certs, "r1.example.com", ip_addresses=["127.0.0.2", "::1"])
    issue_host_cert(certs, certs, "p1.example.com")
    server_ctx = server_context(
        certs / "r1.example.com.pem", certs / "r1.example.com-key.pem", certs / "ca.pem"
    )
    client_ctx = client_context(
        certs / "p1.example.com.pem", certs / "p1.example.com-key.pem", certs / "ca.pem"
    )
    host = "::1" if ":" in literal else "127.0.0.2"
    seen: list[str | None] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host=host)
            port = listeners[0].socket.getsockname()[1]

            async def serve_one() -> None:
                raw = await listeners[0].accept()
                tls = await tls_handshake_server(raw, server_ctx)
                seen.append(requested_name(tls))
                await trio.aclose_forcefully(tls)

            nursery.start_soon(serve_one)
            stream = await tls_connect(host, port, client_ctx, server_name=literal)
            with pytest.raises(trio.BrokenResourceError):  # the server closes, nothing sent
                await stream.receive_some(1)
            await trio.aclose_forcefully(stream)
    assert seen == [None]  # no SNI (RFC 6066)


def test_enable_takes_an_ip_literal_with_or_without_brackets() -> None:
    vmid = uuid.UUID("5b3a1f6e-2c4d-4e8f-9a0b-1c2d3e4f5a6b")
    assert _target("127.0.0.2:7443", None, vmid) == ("127.0.0.2", 7443, "127.0.0.2")
    assert _target("[2001:db8::1]:7443", None, vmid) == ("2001:db8::1", 7443, "2001:db8::1")
    assert _target("10.0.0.5:7443", "10.0.0.5", vmid)[2] == "10.0.0.5"
    with pytest.raises(Refused):
        _target("[r1.example.com]:7443", None, vmid)
