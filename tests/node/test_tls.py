"""frlink.tls: mutual TLS over real loopback TCP, and every refusal with a clear reason.

The server listens on 127.0.0.2, the client binds 127.0.0.3. TLS 1.3 trap: a client's
handshake can succeed before the server has refused the client's certificate, so each
refused case looks at the client's first read as well as the server's TLSFailure.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from frlink.certs import HostFiles, create_ca, issue_host_cert
from frlink.tls import (
    ConnectFailure,
    TLSConfigError,
    TLSFailure,
    client_context,
    describe_tls_error,
    peer_names,
    server_context,
    tls_connect,
    tls_handshake_server,
)

SERVER_ADDR = "127.0.0.2"
CLIENT_ADDR = "127.0.0.3"
SERVER_NAME = "r1.example.com"
CLIENT_NAME = "p1.example.com"
CAP_NAME = "brkr.example.com"
LONG_AGO = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
EXPIRED = dt.datetime(2020, 6, 1, tzinfo=dt.UTC)


@dataclass
class PKI:
    server: HostFiles
    client: HostFiles
    other_ca_client: HostFiles
    expired_client: HostFiles
    expired_server: HostFiles


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    root = tmp_path_factory.mktemp("pki")
    create_ca(root / "ca")
    create_ca(root / "other-ca", name="someone else's CA")
    ca = root / "ca"
    return PKI(
        server=issue_host_cert(
            ca, root / "server", SERVER_NAME, extra_names=[CAP_NAME], ip_addresses=[SERVER_ADDR]
        ),
        client=issue_host_cert(ca, root / "client", CLIENT_NAME, ip_addresses=[CLIENT_ADDR]),
        other_ca_client=issue_host_cert(root / "other-ca", root / "other", CLIENT_NAME),
        expired_client=issue_host_cert(
            ca, root / "expired-client", CLIENT_NAME, not_before=LONG_AGO, not_after=EXPIRED
        ),
        expired_server=issue_host_cert(
            ca, root / "expired-server", SERVER_NAME, not_before=LONG_AGO, not_after=EXPIRED
        ),
    )


def server_ctx(files: HostFiles) -> ssl.SSLContext:
    return server_context(files.cert, files.key, files.ca)


def client_ctx(files: HostFiles, ca: Path | None = None) -> ssl.SSLContext:
    return client_context(files.cert, files.key, ca or files.ca)


@dataclass
class Outcome:
    """What each side saw on one connection attempt."""

    server_names: tuple[str, ...] | None = None
    server_error: TLSFailure | None = None
    client_names: tuple[str, ...] | None = None
    client_error: BaseException | None = None  # TLSFailure, or the first read's error
    reply: bytes | None = None
    notes: list[str] = field(default_factory=list)


async def attempt(
    sctx: ssl.SSLContext, cctx: ssl.SSLContext, *, server_name: str = SERVER_NAME
) -> Outcome:
    """One connection: handshake both sides, then one round trip (ping, pong)."""
    out = Outcome()
    listeners = await trio.open_tcp_listeners(0, host=SERVER_ADDR)
    listener = listeners[0]
    port = listener.socket.getsockname()[1]

    async def serve() -> None:
        stream = await listener.accept()
        try:
            tls = await tls_handshake_server(stream, sctx, timeout=5)
        except TLSFailure as exc:
            out.server_error = exc
            return
        out.server_names = peer_names(tls)
        try:
            data = await tls.receive_some(100)
            await tls.send_all(b"pong:" + data)
            await tls.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            out.notes.append(f"server after handshake: {exc!r}")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            try:
                tls = await tls_connect(
                    SERVER_ADDR,
                    port,
                    cctx,
                    server_name=server_name,
                    local_address=CLIENT_ADDR,
                    timeout=5,
                )
            except TLSFailure as exc:
                out.client_error = exc
            else:
                out.client_names = peer_names(tls)
                try:
                    await tls.send_all(b"ping")
                    out.reply = bytes(await tls.receive_some(100))
                except trio.BrokenResourceError as exc:
                    out.client_error = exc  # the TLS 1.3 trap: refusal on the first read
                await trio.aclose_forcefully(tls)
    await listener.aclose()
    return out


def client_refused(out: Outcome) -> str:
    """The client's reason, whether it came from the handshake or the first read."""
    assert out.reply is None
    assert out.client_error is not None
    return describe_tls_error(out.client_error)


async def test_mutual_tls_handshake(pki: PKI) -> None:
    out = await attempt(server_ctx(pki.server), client_ctx(pki.client))
    assert out.reply == b"pong:ping", out
    assert out.server_error is None
    assert out.server_names == (CLIENT_NAME, CLIENT_ADDR)
    assert out.client_names == (SERVER_NAME, CAP_NAME, SERVER_ADDR)


async def test_cap_name_and_address_as_server_name(pki: PKI) -> None:
    """Any node holding the CAP answers for the broker's name; an IP SAN matches too."""
    for name in (CAP_NAME, SERVER_ADDR):
        out = await attempt(server_ctx(pki.server), client_ctx(pki.client), server_name=name)
        assert out.reply == b"pong:ping", (name, out)


async def test_client_cert_from_another_ca_refused(pki: PKI) -> None:
    # The client still trusts our CA (it can verify the server); its own cert is foreign.
    out = await attempt(server_ctx(pki.server), client_ctx(pki.other_ca_client, pki.server.ca))
    assert out.server_error is not None
    assert "certificate verification failed" in str(out.server_error)
    assert "issuer" in str(out.server_error)
    assert isinstance(out.server_error.__cause__, ssl.SSLError)
    assert "does not trust our certificate's CA" in client_refused(out)


async def test_server_cert_from_another_ca_refused(pki: PKI) -> None:
    cctx = client_ctx(pki.client, pki.other_ca_client.ca)
    out = await attempt(server_ctx(pki.server), cctx)
    assert isinstance(out.client_error, TLSFailure)
    # The server sends its CA with its certificate: a self-signed root the client lacks.
    assert "certificate verification failed: self-signed certificate" in str(out.client_error)
    assert out.server_error is not None


async def test_expired_client_cert_refused(pki: PKI) -> None:
    out = await attempt(server_ctx(pki.server), client_ctx(pki.expired_client))
    assert out.server_error is not None
    assert "certificate has expired" in str(out.server_error)
    assert "expired" in client_refused(out)


async def test_expired_server_cert_refused(pki: PKI) -> None:
    out = await attempt(server_ctx(pki.expired_server), client_ctx(pki.client))
    assert isinstance(out.client_error, TLSFailure)
    assert "certificate has expired" in str(out.client_error)
    assert isinstance(out.client_error.__cause__, ssl.SSLCertVerificationError)
    assert out.server_error is not None
    assert "expired" in str(out.server_error)


async def test_no_client_cert_refused(pki: PKI) -> None:
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(cafile=pki.client.ca)
    out = await attempt(server_ctx(pki.server), cctx)
    assert out.server_error is not None
    assert "sent no certificate" in str(out.server_error)
    assert "requires a client certificate" in client_refused(out)


async def test_optional_client_cert_gives_no_names(pki: PKI) -> None:
    sctx = server_context(pki.server.cert, pki.server.key, pki.server.ca, require_client_cert=False)
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(cafile=pki.client.ca)
    out = await attempt(sctx, cctx)
    assert out.reply == b"pong:ping"
    assert out.server_names == ()


async def test_server_name_mismatch_refused(pki: PKI) -> None:
    out = await attempt(
        server_ctx(pki.server), client_ctx(pki.client), server_name="r2.example.com"
    )
    assert isinstance(out.client_error, TLSFailure)
    assert "Hostname mismatch" in str(out.client_error)
    assert "r2.example.com" in str(out.client_error)
    assert out.server_error is not None


async def test_name_only_in_common_name_refused(pki: PKI, tmp_path: Path) -> None:
    """The server's CN is r1.example.com, but only SANs count: the CN alone never matches."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_dir = pki.server.ca.parent.parent / "ca"
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca-key.pem").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cn-only.example.com")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("other.example.com")]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(tmp_path / "k.pem", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(
        fd,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    os.close(fd)
    sctx = server_context(tmp_path / "c.pem", tmp_path / "k.pem", pki.server.ca)
    out = await attempt(sctx, client_ctx(pki.client), server_name="cn-only.example.com")
    assert isinstance(out.client_error, TLSFailure)
    assert "Hostname mismatch" in str(out.client_error)


async def test_tls12_only_client_refused(pki: PKI) -> None:
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cctx.maximum_version = ssl.TLSVersion.TLSv1_2
    cctx.load_verify_locations(cafile=pki.client.ca)
    cctx.load_cert_chain(pki.client.cert, pki.client.key)
    out = await attempt(server_ctx(pki.server), cctx)
    assert out.server_error is not None
    assert "TLS 1.3 required" in str(out.server_error)
    assert isinstance(out.client_error, TLSFailure)
    assert "TLS version" in str(out.client_error)


async def test_handshake_timeout_closes_the_stream(pki: PKI) -> None:
    """A client that connects and says nothing is dropped when the deadline passes."""
    listeners = await trio.open_tcp_listeners(0, host=SERVER_ADDR)
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(10):
        silent = await trio.open_tcp_stream(SERVER_ADDR, port, local_address=CLIENT_ADDR)
        accepted = await listeners[0].accept()
        with pytest.raises(TLSFailure, match=r"timed out after 0\.2 s"):
            await tls_handshake_server(accepted, server_ctx(pki.server), timeout=0.2)
        assert await silent.receive_some(10) == b""  # the server closed the socket
    await silent.aclose()
    await listeners[0].aclose()


async def test_connect_refused_is_connect_failure(pki: PKI) -> None:
    listeners = await trio.open_tcp_listeners(0, host=SERVER_ADDR)
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # nothing listens on that port now
    with trio.fail_after(10), pytest.raises(ConnectFailure, match="connecting to") as info:
        await tls_connect(SERVER_ADDR, port, client_ctx(pki.client), server_name=SERVER_NAME)
    assert isinstance(info.value, OSError)
    assert isinstance(info.value, TLSFailure)


@pytest.mark.parametrize("make", [server_context, client_context])
def test_context_settings(pki: PKI, make: Callable[..., ssl.SSLContext]) -> None:
    ctx = make(pki.server.cert, pki.server.key, pki.server.ca)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.verify_flags & ssl.VERIFY_X509_STRICT
    assert [c["subject"] for c in ctx.get_ca_certs()] == [
        ((("commonName", "frrep CA"),),)
    ]  # our CA only: no system CAs
    if make is client_context:
        assert ctx.check_hostname
        assert not ctx.hostname_checks_common_name


def test_context_config_errors(pki: PKI, tmp_path: Path) -> None:
    loose = tmp_path / "loose-key.pem"
    loose.write_bytes(pki.server.key.read_bytes())
    loose.chmod(0o644)
    with pytest.raises(TLSConfigError, match="chmod 600"):
        server_context(pki.server.cert, loose, pki.server.ca)
    with pytest.raises(TLSConfigError, match="does not match"):
        client_context(pki.server.cert, pki.client.key, pki.server.ca)
    with pytest.raises(TLSConfigError, match="CA file"):
        client_context(pki.server.cert, pki.server.key, tmp_path / "missing.pem")
    with pytest.raises(TLSConfigError, match="private key"):
        server_context(pki.server.cert, tmp_path / "missing-key.pem", pki.server.ca)
