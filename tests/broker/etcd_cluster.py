"""The local etcd the tests start: :mod:`broker.store.etcd_server` (benchmarks use it too)."""

from broker.store.etcd_server import EtcdCluster, EtcdMember, etcd_cluster, find_etcd

__all__ = ["EtcdCluster", "EtcdMember", "etcd_cluster", "find_etcd"]
