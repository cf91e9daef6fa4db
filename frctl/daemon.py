"""What ``frctl server run``, ``frctl node run`` and ``frctl primary run`` share as
long-running services: the operations listener (``[metrics] listen``: ``/metrics``,
``/livez``, ``/readyz``), systemd's readiness protocol (``READY=1`` once the service
serves, ``STOPPING=1`` on the way out), SIGTERM as a clean stop and SIGHUP as a reload.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry, ProcessCollector

from frlink.config import MetricsListen
from frlink.health import CertificateCollector, HealthApp, Readiness
from frlink.http import serve_asgi
from frlink.sd_notify import sd_notify

log = logging.getLogger("frrep.service")


async def run_daemon(
    main: Callable[..., Awaitable[Any]],
    *,
    registry: CollectorRegistry,
    ready: Readiness,
    metrics: MetricsListen | None,
    cert: Path,
    reload: Callable[[], object] | None = None,
) -> None:
    """Run ``main`` (started with ``nursery.start``: it calls ``task_status.started()``
    once it serves) until it returns, or SIGTERM/SIGINT, with the operations listener
    beside it. ``ready()`` is asked by ``/readyz`` once ``main`` started; ``reload`` is
    called on SIGHUP (without it, SIGHUP is logged and ignored)."""
    registry.register(CertificateCollector(cert))
    ProcessCollector(registry=registry)
    started = False

    def readiness() -> str | None:
        return ready() if started else "starting"

    try:
        async with trio.open_nursery() as nursery:
            if metrics is not None:
                app = HealthApp(registry, readiness)
                binds = await nursery.start(
                    partial(serve_asgi, app, host=metrics.host, port=metrics.port)
                )
                log.info("metrics listening on %s", " ".join(binds))
            await nursery.start(_signals, nursery.cancel_scope, reload)
            await nursery.start(main)
            started = True
            sd_notify("READY=1")
            log.info("ready")
    except BaseExceptionGroup as group:
        # One failure (the service refused to start, Ctrl-C) is raised as itself, so
        # that the command reports it as it always did.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        sd_notify("STOPPING=1")


async def _signals(
    scope: trio.CancelScope,
    reload: Callable[[], object] | None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                if reload is None:
                    log.info("SIGHUP: nothing to reload in this service")
                else:
                    reload()
                continue
            log.info("SIGTERM: stopping")
            sd_notify("STOPPING=1")
            scope.cancel()
            return
