"""Mutual-TLS contexts and handshakes for the node agent (Trio).

Every frrep connection is TLS 1.3 with a certificate on both ends, both chaining to the
one private CA made by :func:`frlink.certs.create_ca`; the system's trusted CAs are never
loaded. :func:`server_context` and :func:`client_context` build the
:class:`ssl.SSLContext` objects; :func:`tls_handshake_server` and :func:`tls_connect` run
the handshake on a Trio stream under a deadline and turn every failure into one
exception, :class:`TLSFailure`, whose message says what went wrong (expired certificate,
unknown CA, name mismatch, no client certificate, old TLS version, timeout) and whose
``__cause__`` is the :mod:`ssl` error. The TLS stream is :class:`frlink.biotls.BioTLSStream`
(not ``trio.SSLStream``): same interface plus ``receive_into``, which frproto's
FramedStream uses to decrypt bulk data straight into its frames (perf-baselines, BioTLS).

.. warning:: **The TLS 1.3 trap** (CPython issue #110197). A TLS 1.3 client finishes its
   handshake *before* the server has judged the client's certificate: the server's
   refusal (an alert such as ``certificate required`` or ``unknown ca``) only reaches the
   client on its first read, as :class:`trio.BrokenResourceError`. So a successful
   :func:`tls_connect` does **not** mean the server accepted us. Callers must not treat a
   connection as established (log it, reset back-off, report "connected") until the first
   protocol response has arrived; :func:`describe_tls_error` turns that first-read error
   into the same clear message a :class:`TLSFailure` carries.

What the handshake checks, on each side: the peer's chain ends at our CA (and nothing
else), the peer certificate is within its validity period, its EKU allows its role (OpenSSL
checks serverAuth for a server, clientAuth for a client), the X.509 strict rules; the client
also checks that the server certificate has a subject alternative name matching
``server_name`` (the common name is not used). The server does not check the client's name:
the caller maps :func:`peer_names` to an authorization entry.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
from pathlib import Path
from typing import Any

import trio

from . import network
from .biotls import BioTLSStream

__all__ = [
    "BioTLSStream",
    "ConnectFailure",
    "TLSConfigError",
    "TLSFailure",
    "client_context",
    "describe_tls_error",
    "peer_names",
    "server_context",
    "web_server_context",
    "tls_connect",
    "tls_handshake_server",
]


class TLSFailure(Exception):
    """A TLS connection could not be established; ``__cause__`` holds the underlying error."""


class ConnectFailure(TLSFailure, OSError):
    """The TCP connection itself failed (refused, unreachable, timed out) before any TLS.

    It is both a :class:`TLSFailure` and an :class:`OSError`, so callers that want to tell
    "cannot reach the host" from "the certificates do not match" can catch it first.
    """


class TLSConfigError(ValueError):
    """Our own certificate, key or CA file cannot be used to build a TLS context."""


# -- contexts --------------------------------------------------------------------------


def _check_key_file(key: Path) -> None:
    try:
        mode = os.stat(key).st_mode
    except OSError as exc:
        raise TLSConfigError(f"private key {key}: {exc.strerror or exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TLSConfigError(
            f"private key {key} is accessible to other users (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {key}"
        )


def _load(ctx: ssl.SSLContext, cert: Path, key: Path, ca: Path) -> None:
    _check_key_file(Path(key))
    try:
        ctx.load_verify_locations(cafile=os.fspath(ca))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"CA file {ca}: {_ssl_reason(exc)}") from exc
    try:
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"certificate {cert} with key {key}: {_ssl_reason(exc)}") from exc


def _base(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # RFC 5280 conformance checks (our certificates carry SKI/AKI, so they pass).
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def server_context(
    cert: Path, key: Path, ca: Path, *, require_client_cert: bool = True
) -> ssl.SSLContext:
    """A TLS 1.3 server context: our certificate and key, client certificates from ``ca``.

    ``require_client_cert=False`` (CERT_OPTIONAL) still verifies a certificate the client
    sends; it exists for tools, never for the replication port. Only ``ca`` is trusted;
    the system's default CAs are not loaded. No session tickets are issued (we never
    resume sessions). Raises :class:`TLSConfigError` if a file is missing or unusable,
    or if the private key is readable by group or others.
    """
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    ctx.num_tickets = 0
    ctx.sni_callback = _remember_sni
    _load(ctx, cert, key, ca)
    return ctx


def web_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for browsers (the web console): our certificate and key, TLS 1.2
    or later, no client certificate asked for (a person logs in with a password).

    Raises :class:`TLSConfigError` like :func:`server_context`.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    _check_key_file(Path(key))
    try:
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"certificate {cert} with key {key}: {_ssl_reason(exc)}") from exc
    return ctx


_SNI_ATTRIBUTE = "frrep_requested_name"


def _remember_sni(conn: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
    # The name the client asked for (SNI): a cluster node's listener tells the CAP's name
    # (the broker) from its own with it, so both may share one address and port.
    setattr(conn, _SNI_ATTRIBUTE, server_name)


def requested_name(stream: BioTLSStream[Any]) -> str | None:
    """The server name the client sent (SNI) in the handshake on ``stream``, if any."""
    name = getattr(stream.ssl_object, _SNI_ATTRIBUTE, None)
    return name.lower().rstrip(".") if isinstance(name, str) else None


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """A TLS 1.3 client context presenting our certificate, trusting only ``ca``.

    Host names are checked against the server certificate's subject alternative names
    only (``hostname_checks_common_name`` is off). Raises :class:`TLSConfigError` like
    :func:`server_context`.
    """
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.hostname_checks_common_name = False
    _load(ctx, cert, key, ca)
    return ctx


# -- peers -----------------------------------------------------------------------------


def peer_names(
    connection: BioTLSStream[Any] | trio.SSLStream[Any] | ssl.SSLObject | ssl.SSLSocket,
) -> tuple[str, ...]:
    """The verified peer certificate's DNS names, then its IP addresses (compressed form).

    Empty if the peer sent no certificate (possible only with ``require_client_cert=False``)
    or its certificate has no subject alternative names. Call after the handshake.
    """
    cert: Any = connection.getpeercert()
    if not cert:
        return ()
    dns: list[str] = []
    ips: list[str] = []
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            dns.append(str(value).lower())
        elif kind == "IP Address":
            text = str(value).strip()
            try:
                ips.append(ipaddress.ip_address(text).compressed)
            except ValueError:
                ips.append(text)
    return (*dns, *ips)


# -- errors ----------------------------------------------------------------------------

_REASONS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer sent no certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust our certificate's CA",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer says our certificate has expired",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer rejected our certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the peer rejected our certificate's purpose",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the peer refused our TLS version",
    "UNSUPPORTED_PROTOCOL": "the peer offered an unsupported TLS version (TLS 1.3 required)",
    "NO_PROTOCOLS_AVAILABLE": "no TLS version in common (TLS 1.3 required)",
    "WRONG_VERSION_NUMBER": "the peer is not speaking TLS (or an unsupported version)",
    "KEY_VALUES_MISMATCH": "the private key does not match the certificate",
    "NO_START_LINE": "not a PEM file",
}


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or exc.reason or str(exc)
        return f"certificate verification failed: {detail}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in _REASONS:
            return f"{_REASONS[reason]} ({reason})"
        return reason or str(exc)
    if isinstance(exc, OSError):
        if not exc.strerror and isinstance(exc.__cause__, BaseExceptionGroup):
            # trio's "all attempts to connect to H:P failed": the last attempt says why
            # (Connection refused, No route to host).
            last = _ssl_reason(exc.__cause__.exceptions[-1])
            return last.rsplit("): ", 1)[-1] if last.startswith("Error connecting") else last
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


def describe_tls_error(exc: BaseException) -> str:
    """A one-line explanation of a TLS error, looking through Trio's wrapping.

    Use it on the :class:`trio.BrokenResourceError` of a first read after
    :func:`tls_connect` (the TLS 1.3 trap): its ``__cause__`` is the server's alert.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ssl.SSLError, ssl.CertificateError)):
            return _ssl_reason(current)
        if isinstance(current, trio.TooSlowError):
            return "timed out"
        current = current.__cause__ or current.__context__
    if isinstance(exc, trio.BrokenResourceError):
        return "the connection was closed by the peer"
    return _ssl_reason(exc)


def _peer_label(stream: trio.abc.Stream) -> str:
    if isinstance(stream, trio.SocketStream):
        try:
            address = stream.socket.getpeername()
        except OSError:
            return "peer"
        if isinstance(address, tuple) and len(address) >= 2:
            host = str(address[0])
            return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return "peer"


async def _handshake(
    ssl_stream: BioTLSStream[Any], deadline: float, what: str, timeout: float
) -> None:
    try:
        with trio.fail_at(deadline):
            await ssl_stream.do_handshake()
    except trio.TooSlowError as exc:
        await trio.aclose_forcefully(ssl_stream)
        raise TLSFailure(f"TLS handshake {what}: timed out after {timeout:g} s") from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
        # BioTLSStream has already sent the alert OpenSSL wrote (unknown ca, certificate
        # expired, certificate required, protocol version...), so the peer learns why.
        await trio.aclose_forcefully(ssl_stream)
        cause = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else exc
        raise TLSFailure(f"TLS handshake {what} failed: {describe_tls_error(exc)}") from cause


# -- handshakes ------------------------------------------------------------------------


async def tls_handshake_server(
    stream: trio.abc.Stream, ctx: ssl.SSLContext, *, timeout: float = 10.0
) -> BioTLSStream[trio.abc.Stream]:
    """Wrap an accepted stream in TLS (server side) and run the handshake.

    Returns the :class:`~frlink.biotls.BioTLSStream` once the client's certificate has been
    verified (in TLS 1.3 the server does learn the verdict during the handshake). On
    failure the alert is sent, the stream is closed and :class:`TLSFailure` is raised.
    """
    label = _peer_label(stream)
    ssl_stream = BioTLSStream(stream, ctx, server_side=True)
    await _handshake(ssl_stream, trio.current_time() + timeout, f"with {label}", timeout)
    return ssl_stream


async def tls_connect(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    *,
    server_name: str,
    local_address: str | None = None,
    timeout: float = 10.0,
) -> BioTLSStream[trio.abc.Stream]:
    """Connect to ``host:port`` over TCP (the network in force: ``frlink.network``) and
    run the TLS handshake as a client.

    ``server_name`` is sent as SNI and checked against the server certificate's subject
    alternative names (it may differ from ``host``, e.g. the CAP name while ``host`` is an
    address). An IP literal (``127.0.0.2``, ``2001:db8::1`` or ``[2001:db8::1]``) is not
    sent (SNI cannot carry one) and must be an IP address subjectAltName of the
    certificate (TLS-11); a certificate without it fails with a message that says so.
    ``local_address`` binds the local end (one address per host on loopback).
    ``timeout`` covers the TCP connect and the handshake together.

    Raises :class:`ConnectFailure` (also an :class:`OSError`) if TCP fails and
    :class:`TLSFailure` if the handshake fails; the socket is closed either way.

    **A return does not mean the server accepted our certificate** (TLS 1.3; see the module
    docstring): wait for the first protocol response before treating the connection as up.
    """
    deadline = trio.current_time() + timeout
    target = f"{server_name} at {host}:{port}"
    try:
        with trio.fail_at(deadline):
            tcp = await network.current().connect(host, port, local_address=local_address)
    except trio.TooSlowError as exc:
        raise ConnectFailure(f"connecting to {target}: timed out after {timeout:g} s") from exc
    except OSError as exc:
        raise ConnectFailure(f"connecting to {target}: {_ssl_reason(exc)}") from exc
    # An IP literal (TLS-11): Python's ssl sends no SNI for it (RFC 6066) and checks it
    # against the certificate's iPAddress names; a bracketed IPv6 one would be taken for a
    # host name.
    name = _unbracket(server_name)
    try:
        ssl_stream = BioTLSStream(tcp, ctx, server_hostname=name)
    except (ValueError, ssl.SSLError) as exc:
        await trio.aclose_forcefully(tcp)
        raise TLSFailure(f"TLS to {target}: {exc}") from exc
    try:
        await _handshake(ssl_stream, deadline, f"with {target}", timeout)
    except TLSFailure as exc:
        if _address_mismatch(name, exc.__cause__):
            raise TLSFailure(
                f"{exc}; {name} is an IP address, so no SNI is sent and the server's "
                f"certificate must hold it as an IP address subjectAltName "
                f"(frctl cert issue HOSTNAME --ip {name}), or connect by a name it holds"
            ) from exc.__cause__
        raise
    return ssl_stream


#: OpenSSL's X509_V_ERR_IP_ADDRESS_MISMATCH.
_IP_ADDRESS_MISMATCH = 64


def _unbracket(name: str) -> str:
    """``name`` without the brackets of a bracketed IPv6 literal (``[2001:db8::1]``)."""
    if name.startswith("[") and name.endswith("]") and _is_address(name[1:-1]):
        return name[1:-1]
    return name


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _address_mismatch(name: str, cause: BaseException | None) -> bool:
    """True when the handshake failed because the certificate does not hold the address
    ``name`` (an IP literal) as an iPAddress subjectAltName."""
    return (
        _is_address(name)
        and isinstance(cause, ssl.SSLCertVerificationError)
        and cause.verify_code == _IP_ADDRESS_MISMATCH
    )
