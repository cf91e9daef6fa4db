"""The recovery server's metrics (a stand-alone server's, and a cluster node's).

Counts are plain integers kept by the server and read by the registry at scrape time
(:meth:`ServerMetrics.collect`); only the batch apply time is a Histogram. Every name
has the ``frrep_`` prefix and base units (``docs/operations.md`` lists them).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import trio
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

import frproto as fp
from frproto.trio_io import PeerIdle

#: Batch apply times run from milliseconds (a few blocks) to minutes (a large batch on a
#: slow disk).
APPLY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def failure_reason(exc: BaseException) -> str:
    """A bounded label for a failure: the wire error code's name in lower case, or one of
    ``tls``, ``connection_lost``, ``idle``, ``timeout``, ``disk``, ``internal``."""
    if isinstance(exc, PeerIdle):
        return "idle"  # closed at a deadline of docs/protocol.md 10.2
    if isinstance(exc, fp.FrprotoError):
        return type(exc).code.name.lower()
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
        return "connection_lost"
    if isinstance(exc, OSError):
        return "disk"
    return "internal"


class ServerMetrics(Collector):
    """What a recovery server counts, registered in ``registry`` (the process's own)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        #: Bytes of disk data received in chunks (IR and batches; a zero chunk counts 0).
        self.received_bytes = 0
        #: Failures by reason (:func:`failure_reason`, or ``tls``/``no_tls`` at accept).
        self.failures: collections.Counter[str] = collections.Counter()
        self.batch_apply = Histogram(
            "frrep_batch_apply_duration_seconds",
            "Time to commit one delta batch to a replica (journal, undo, apply, state).",
            buckets=APPLY_BUCKETS,
            registry=registry,
        )
        registry.register(self)

    def failed(self, reason: str) -> None:
        """Count one failure (a refused connection, a refused message, a broken session)."""
        self.failures[reason] += 1

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "frrep_received_bytes",
            "Bytes of disk data received from primaries (IR and delta batches).",
            value=self.received_bytes,
        )
        failures = CounterMetricFamily(
            "frrep_failures",
            "Refused connections, refused requests and broken sessions, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(self.failures.items()):
            failures.add_metric([reason], count)
        yield failures
