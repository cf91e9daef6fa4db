"""Serving an ASGI application on Trio: Hypercorn's Trio worker, one listener.

The operations listener (``/metrics``, ``/livez``, ``/readyz``: :mod:`frlink.health`)
runs on it in plain HTTP; given an SSL context it serves HTTPS.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import Framework


class _Config(Config):
    """Hypercorn's configuration with an SSL context made by the caller (Hypercorn
    otherwise builds its own from certificate and key file names)."""

    def __init__(self, ssl_context: ssl.SSLContext | None) -> None:
        super().__init__()
        self._ssl_context = ssl_context

    @property
    def ssl_enabled(self) -> bool:
        return self._ssl_context is not None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._ssl_context


async def serve_asgi(
    app: Any,
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled; ``task_status.started(binds)``
    once it listens (Hypercorn's list of URLs, e.g. ``["http://127.0.0.1:9464"]``: the
    real port when ``port`` is 0).

    Raises:
        OSError: the address cannot be bound.
    """
    config = _Config(ssl_context)
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None  # a scrape every 15 s is not worth a log line
    # A logger, not "-": its lines go through the process's logging setup, once.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0
    framework: Framework = app
    await serve(framework, config, task_status=task_status)
