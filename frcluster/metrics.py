"""A node agent's own metrics, on top of its recovery server's (``node/metrics.py``):
whether it holds the broker's election, and whether the cluster store answers. Read
from the agent at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .agent import ClusterNode


class NodeCollector(Collector):
    """``frrep_broker_role``, ``frrep_cluster_store_up``, ``frrep_node_registered``."""

    def __init__(self, node: ClusterNode, registry: CollectorRegistry) -> None:
        self.node = node
        registry.register(self)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        node = self.node
        yield GaugeMetricFamily(
            "frrep_broker_role",
            "1 while this node holds the broker's election and serves the CAP, else 0.",
            value=1.0 if node.broker is not None else 0.0,
        )
        yield GaugeMetricFamily(
            "frrep_cluster_store_up",
            "1 when the cluster store answered this node's last request, else 0.",
            value=1.0 if node.store_reachable else 0.0,
        )
        yield GaugeMetricFamily(
            "frrep_node_registered",
            "1 while this node's record is in the cluster store under a live lease.",
            value=1.0 if node.registered else 0.0,
        )
