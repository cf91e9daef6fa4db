"""The loopback cluster the tests use: :mod:`frtesting.cluster` (the demo's too)."""

from frtesting.cluster import (
    CAP_ADDRESS,
    CAP_NAME,
    PRIMARY_ADDRESS,
    PRIMARY_NAME,
    ClusterSite,
    NodeProcess,
    node_address,
    node_name,
    primary_replicator,
    replica_path,
)

__all__ = [
    "CAP_ADDRESS",
    "CAP_NAME",
    "PRIMARY_ADDRESS",
    "PRIMARY_NAME",
    "ClusterSite",
    "NodeProcess",
    "node_address",
    "node_name",
    "primary_replicator",
    "replica_path",
]
