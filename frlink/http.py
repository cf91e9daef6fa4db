"""Serving an ASGI application on Trio: the web console and the operations listener.

:func:`serve_asgi` runs Hypercorn's Trio worker (``hypercorn.trio.serve``) on one address,
over HTTPS when given a server context (the node's own certificate: the console) or plain
HTTP (``/metrics``, ``/livez``, ``/readyz``: :mod:`frlink.health`). It is the one place
that knows Hypercorn: the applications above are plain ASGI.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

__all__ = ["serve_asgi"]

log = logging.getLogger("frrep.http")


class _Config(Config):
    """Hypercorn's configuration with a ready-made server context instead of certificate
    files (Hypercorn builds its own context from ``certfile``/``keyfile`` otherwise)."""

    def __init__(self, ssl_context: ssl.SSLContext | None) -> None:
        super().__init__()
        self._context = ssl_context

    @property
    def ssl_enabled(self) -> bool:
        return self._context is not None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._context


async def serve_asgi(
    app: Any,
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ASGI application ``app`` on ``host:port`` until cancelled.

    ``port`` 0 takes a free port; ``task_status.started(port)`` reports the port bound
    once the listener accepts connections. With ``ssl_context`` (a server context) the
    application is served over HTTPS (HTTP/2 or HTTP/1.1, by ALPN), else over plain HTTP.

    Raises:
        OSError: the address cannot be bound.
    """
    if ssl_context is not None:
        ssl_context.set_alpn_protocols(["h2", "http/1.1"])
    config = _Config(ssl_context)
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.insecure_bind = []
    # Hypercorn's own start-up lines go through our logging, at the level the node runs at.
    config.errorlog = log
    config.accesslog = None
    config.graceful_timeout = 1.0

    async with trio.open_nursery() as nursery:
        bound: list[str] = await nursery.start(serve, app, config)
        task_status.started(int(bound[0].rsplit(":", 1)[1]))
