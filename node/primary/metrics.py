"""The primary service's metrics.

Per-VM figures (lag, pending bytes, last acknowledged time, paused) are read from the
VMs' state files at scrape time (:meth:`PrimaryMetrics.collect`), so they are what
``frctl replication status`` reads, even for a VM whose replicator is stuck. What only
the running service knows (cycle durations, bytes sent, failures by reason) is counted
as it happens. ``docs/operations.md`` lists every name.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator

import trio
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

import frproto as fp
from frlink.tls import ConnectFailure, TLSFailure

from .disks import DiskProblem
from .errors import ReplicationHalted
from .state import PrimaryStateStore

#: A cycle takes from well under a second (nothing changed) to hours (a first IR).
CYCLE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: The service loop looks for VMs every POLL_SECONDS; not turning for this long means it
#: is stuck (``/readyz`` says so).
LOOP_STALE_SECONDS = 30.0


def cycle_failure_reason(exc: BaseException) -> str:
    """A bounded label for a failed cycle: ``unreachable``, ``tls``, ``disk``, ``halted``,
    or the wire error code's name in lower case (``not_authorized``, ``busy``...)."""
    if isinstance(exc, ConnectFailure):
        return "unreachable"  # no TCP connection: not a certificate problem
    if isinstance(exc, TLSFailure):
        return "tls"
    if isinstance(exc, DiskProblem):
        return "disk"
    if isinstance(exc, ReplicationHalted):
        return "halted"
    if isinstance(exc, fp.FrprotoError):
        return type(exc).code.name.lower()
    if isinstance(exc, (OSError, trio.BrokenResourceError, trio.TooSlowError)):
        return "unreachable"
    return "internal"


class PrimaryMetrics(Collector):
    """What the primary service shows, registered in ``registry`` (the process's own)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        store: PrimaryStateStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.clock = clock
        #: Bytes of chunk frames sent (headers and payloads, after compression).
        self.sent_bytes = 0
        self.cycles = 0
        self.failures: collections.Counter[str] = collections.Counter()
        #: When (``time.monotonic()``) the service loop last turned.
        self.loop_at: float | None = None
        self.cycle_duration = Histogram(
            "frrep_cycle_duration_seconds",
            "Duration of successful replication cycles (capture, connect, send, ack).",
            buckets=CYCLE_BUCKETS,
            registry=registry,
        )
        registry.register(self)

    # -- what the service and its replicators tell -------------------------------------

    def loop_turned(self) -> None:
        """The service loop looked for VMs (``/readyz``)."""
        self.loop_at = time.monotonic()

    def cycle_done(self, seconds: float) -> None:
        self.cycles += 1
        self.cycle_duration.observe(seconds)

    def cycle_failed(self, exc: BaseException) -> None:
        self.failures[cycle_failure_reason(exc)] += 1

    def sent(self, count: int) -> None:
        self.sent_bytes += count

    def ready(self) -> str | None:
        """None when the service loop turned lately, else why not ready."""
        if self.loop_at is None:
            return "the service loop has not started"
        idle = time.monotonic() - self.loop_at
        if idle > LOOP_STALE_SECONDS:
            return f"the service loop has not turned for {idle:.0f} s"
        return None

    # -- read at scrape time ------------------------------------------------------------

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        labels = ["vmid", "vm"]
        lag = GaugeMetricFamily(
            "frrep_vm_lag_seconds",
            "Seconds since the recovery side acknowledged this VM's last batch or IR.",
            labels=labels,
        )
        acked = GaugeMetricFamily(
            "frrep_vm_last_acknowledged_timestamp_seconds",
            "Unix time of this VM's last acknowledged batch or IR.",
            labels=labels,
        )
        pending = GaugeMetricFamily(
            "frrep_vm_pending_bytes",
            "Bytes captured for this VM and not yet acknowledged (its pending log).",
            labels=labels,
        )
        paused = GaugeMetricFamily(
            "frrep_vm_paused",
            "1 while an administrator paused this VM's replication.",
            labels=labels,
        )
        now = self.clock()
        for state in self.store.all():
            names = [state.vmid, state.name]
            pending.add_metric(names, state.pending_bytes)
            paused.add_metric(names, 1.0 if state.paused else 0.0)
            if state.last_replicated_at is not None:
                acked.add_metric(names, state.last_replicated_at)
                lag.add_metric(names, max(0.0, now - state.last_replicated_at))
        yield from (lag, acked, pending, paused)
        yield CounterMetricFamily(
            "frrep_sent_bytes",
            "Bytes of chunk frames sent to recovery servers (after compression).",
            value=self.sent_bytes,
        )
        yield CounterMetricFamily(
            "frrep_cycles", "Successful replication cycles.", value=self.cycles
        )
        failures = CounterMetricFamily(
            "frrep_failures", "Failed replication cycles, by reason.", labels=["reason"]
        )
        for reason, count in sorted(self.failures.items()):
            failures.add_metric([reason], count)
        yield failures
