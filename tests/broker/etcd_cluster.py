"""The local etcd the tests start: :mod:`frtesting.etcd` (benchmarks use it too)."""

from frtesting.etcd import EtcdCluster, EtcdMember, etcd_cluster, find_etcd

__all__ = ["EtcdCluster", "EtcdMember", "etcd_cluster", "find_etcd"]
