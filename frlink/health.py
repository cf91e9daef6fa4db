"""The operations listener's application: ``/metrics`` (Prometheus), ``/livez``, ``/readyz``.

A plain ASGI callable, no framework: three fixed paths. It is served on its own
plain-HTTP listener (``[metrics] listen`` in each process's TOML) by
:func:`frlink.http.serve_asgi`, never on the replication port.

* ``/livez`` answers 200 while the process's event loop answers at all.
* ``/readyz`` answers 200 when ``ready()`` is true (a server listening, a node
  registered in the cluster store, the primary's service loop turning), else 503 with
  the reason.
* ``/metrics`` is the process's own :class:`~prometheus_client.CollectorRegistry` in
  the text format. Each process makes one registry (never the library's global default:
  several servers can then run in one test process).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .certs import CertError, describe_cert

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: ``ready()`` returns None when ready, else why not (shown by ``/readyz``).
Readiness = Callable[[], str | None]

_TEXT = [(b"content-type", b"text/plain; charset=utf-8")]
_METRICS_TYPE = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]


class HealthApp:
    """The ASGI application (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry, ready: Readiness) -> None:
        self.registry = registry
        self.ready = ready

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope.get("path", "")
        if scope.get("method") not in ("GET", "HEAD"):
            await _answer(send, 405, b"only GET\n", _TEXT)
        elif path == "/metrics":
            await _answer(send, 200, generate_latest(self.registry), _METRICS_TYPE)
        elif path == "/livez":
            await _answer(send, 200, b"ok\n", _TEXT)
        elif path == "/readyz":
            why = self.ready()
            if why is None:
                await _answer(send, 200, b"ready\n", _TEXT)
            else:
                await _answer(send, 503, f"not ready: {why}\n".encode(), _TEXT)
        else:
            await _answer(send, 404, b"/metrics, /livez or /readyz\n", _TEXT)


async def _answer(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class CertificateCollector(Collector):
    """``frrep_certificate_expiry_seconds``: seconds until the notAfter of the process's
    own certificate (negative once expired). The file is read when the collector is made,
    as the process loads it at start: a renewed file shows only once the process runs
    with it (after a restart), so an alert on it clears when the renewal took effect. A
    file that cannot be read gives no sample."""

    def __init__(self, cert: Path) -> None:
        self.cert = cert
        try:
            self.not_after: float | None = describe_cert(cert).not_after.timestamp()
        except CertError:
            self.not_after = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.not_after is None:
            return
        family = GaugeMetricFamily(
            "frrep_certificate_expiry_seconds",
            "Seconds until this process's own certificate expires (negative: expired).",
            labels=["certificate"],
        )
        family.add_metric([str(self.cert)], self.not_after - time.time())
        yield family
