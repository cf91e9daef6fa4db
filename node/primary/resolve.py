"""Name resolution for the primary: a static ``[hosts]`` table first, then DNS.

A clustering broker names recovery nodes by FQDN (``QueryRecoveryServerResponse``). The
primary connects to the address the name resolves to and sends the *name* as TLS SNI and
checks it against the node's certificate, so the address itself is never trusted.

The ``[hosts]`` table of the primary's configuration (``node.primary.config.PrimaryConfig.hosts``)
plays the part of ``/etc/hosts``: sites without DNS for their recovery cluster, and the
tests on loopback (whose names such as ``n1.example.com`` must never reach real DNS).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping

import trio

from node.primary.config import normalize_host_name


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address rather than a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def resolve_host(host: str, port: int, hosts: Mapping[str, str]) -> str:
    """The IP address to connect to for ``host``.

    An IP literal is returned as it is; a name in ``hosts`` gets its entry; any other
    name goes to DNS (``trio.socket.getaddrinfo``, first stream address).

    Raises:
        OSError: DNS could not resolve the name (``socket.gaierror``), with the name in
            the message; the replicator treats it as retryable like any connect failure.
    """
    if is_ip_literal(host):
        return host
    found = hosts.get(normalize_host_name(host))
    if found is not None:
        return found
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError(exc.errno, f"cannot resolve {host}: {exc.strerror}") from exc
    if not infos:
        raise OSError(f"cannot resolve {host}: no address")
    return str(infos[0][4][0])
