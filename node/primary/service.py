"""The primary service: one :class:`VMReplicator` per enabled VM, started as VMs appear.

``frctl primary run`` runs this; ``frctl replication enable`` only writes a VM's state
file, which the running service picks up within ``POLL_SECONDS``. A VM whose replication
halted (``state.halted``: e.g. its replica was deleted in the recovery cluster) is not
restarted until a person clears it.

One service per state directory: it holds ``<state_dir>/.locks/service.lock`` while it
runs (``node/primary/locks.py``), and a second one is refused
(:class:`~node.primary.locks.ServiceAlreadyRunning`). While it runs it rewrites its
heartbeat, ``<state_dir>/service.json``, every few seconds: status reads it to tell a
running service from a dead one (``node/primary/heartbeat.py``).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from frlink.tls import client_context
from node.primary.config import PrimaryConfig

from .bandwidth import BandwidthLimiter, BandwidthSchedule
from .failover_ask import FailoverAskHandler
from .heartbeat import beat
from .locks import service_lock
from .metrics import PrimaryMetrics
from .replicator import VMReplicator
from .state import PrimaryStateStore
from .window import TimeWindow

log = logging.getLogger("frrep.primary")

#: How often the service looks for newly enabled (or disabled) VMs.
POLL_SECONDS = 2.0


async def run_primary(
    config: PrimaryConfig,
    *,
    metrics: PrimaryMetrics | None = None,
    failover_ask: FailoverAskHandler | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Replicate every enabled VM until cancelled; ``metrics``, if given, is told of
    every cycle and of each turn of the service loop (``/readyz``); ``failover_ask``
    carries out a planned failover asked at the recovery side (None: declined;
    ``node/primary/failover_ask.py``).

    Raises:
        ServiceAlreadyRunning: another service runs on ``config.state_dir``.
    """
    store = PrimaryStateStore(config.state_dir)
    lock = service_lock(config.state_dir)
    try:
        await _serve(config, store, metrics, task_status, failover_ask)
    finally:
        lock.release()


async def _serve(
    config: PrimaryConfig,
    store: PrimaryStateStore,
    metrics: PrimaryMetrics | None,
    task_status: Any,
    failover_ask: FailoverAskHandler | None = None,
) -> None:
    ssl_context = client_context(config.tls.cert, config.tls.key, config.tls.ca)
    running: dict[str, trio.CancelScope] = {}
    # One turn at a time for at most max_sessions VMs: a host of hundreds of VMs started
    # together (or all due at once) must not hold a connection and buffers for each.
    sessions = trio.CapacityLimiter(config.max_sessions)
    host_limit: BandwidthLimiter | None = None
    if config.bandwidth_bps or config.bandwidth_schedule:
        schedule = BandwidthSchedule(config.bandwidth_schedule, default=config.bandwidth_bps)
        host_limit = BandwidthLimiter(config.bandwidth_bps, schedule=schedule)

    async def replicate(replicator: VMReplicator, scope: trio.CancelScope) -> None:
        with scope:
            await replicator.run()
        running.pop(replicator.state.vmid, None)

    async with trio.open_nursery() as nursery:
        # Status judges the service alive by this (node/primary/heartbeat.py); a service
        # that stops removes it, a killed one leaves a heartbeat whose process is gone.
        await nursery.start(beat, config.state_dir)
        task_status.started()
        while True:
            states = {s.vmid: s for s in store.all()}
            for vmid, state in states.items():
                # A halted VM waits for a person (``frctl replication resume`` clears it,
                # disable + enable starts over); restarting it would only halt it again.
                if vmid not in running and state.halted is None:
                    log.info("replicating %s (%s)", state.name, vmid)
                    scope = trio.CancelScope()
                    running[vmid] = scope
                    replicator = VMReplicator(
                        state,
                        store,
                        ssl_context,
                        limiter=host_limit,  # one bucket shared by every VM of this host
                        local_address=config.local_address,
                        compression=config.compression,
                        hosts=config.hosts,
                        resync_window=TimeWindow(*config.resync_window)
                        if config.resync_window
                        else None,
                        metrics=metrics,
                        sessions=sessions,
                        failover_ask=failover_ask,
                    )
                    nursery.start_soon(replicate, replicator, scope)
            for vmid in [v for v in running if v not in states]:
                log.info("replication of %s disabled", vmid)
                running.pop(vmid).cancel()
            if metrics is not None:
                metrics.loop_turned()
            await trio.sleep(POLL_SECONDS)
