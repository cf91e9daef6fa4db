"""A cluster node's configuration file.

Example::

    [node]
    name = "n1.example.com"       # the node's FQDN: its certificate names it
    listen = "127.0.0.11"         # its own address (a distinct 127.x per node on one host)
    port = 7443
    storage = "storage"           # replica storage root, relative to this file
    shared_storage = false        # true: every node sees the same storage root
    capacity = "100G"             # bytes offered to replicas (0: not limited)
    # failover_start = "virsh create $FRREP_CONFIG"  # starts a VM failed over here
    # failover_stop = "virsh destroy ..."   # stops it again (a cancelled failover)

    [cluster]
    store = "sqlite:///var/lib/frrep/cluster.db"   # or etcd://10.0.0.1:2379,10.0.0.2:2379
    cap_name = "cap.example.com"  # the broker's name: every node's certificate names it too
    cap_address = "127.0.0.10"    # the broker's own address, taken by the elected node;
                                  # "" = none: cap_name resolves (DNS) to the broker's node,
                                  # whose listener answers for it by SNI (cap_up updates DNS)
    cap_port = 7443
    lease_ttl = 2.0               # seconds: how fast a dead node is noticed
    # cap_up = "ip addr add 10.0.0.10/24 dev eth0"    # run when this node becomes broker
    # cap_down = "ip addr del 10.0.0.10/24 dev eth0"  # run when it stops being broker

    [metrics]                     # optional: /metrics, /livez, /readyz (plain HTTP)
    listen = "127.0.0.1:9464"
    [console]                     # the web console (absent: none)
    port = 8443                   # HTTPS, with the node's certificate
    # listen = "127.0.0.11"       # default: the node's own address

    [tls]
    cert = "certs/n1.example.com.pem"
    key = "certs/n1.example.com-key.pem"
    ca = "certs/ca.pem"

A ``sqlite://`` store path may be relative to the file (``sqlite://cluster.db``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.store import MissingBackend, etcd_store_class
from frlink.config import (
    METRICS_TABLE,
    TLS_TABLE,
    ConfigError,
    MetricsListen,
    Schema,
    Table,
    TLSFiles,
    metrics_listen,
    parse_rate,
    read_checked,
    string,
    table,
    tls_files,
)
from frlink.connections import CONNECTIONS_TABLE, ConnectionPolicy, connection_policy

#: Every table and key of a cluster node's file (anything else is refused).
CLUSTER_NODE_SCHEMA: Schema = {
    "node": Table(
        {
            "name": str,
            "listen": str,
            "port": int,
            "storage": str,
            "shared_storage": bool,
            "capacity": (str, int),
            "failover_start": str,
            "failover_stop": str,
        }
    ),
    "cluster": Table(
        {
            "store": str,
            "prefix": str,
            "cap_name": str,
            "cap_address": str,
            "cap_port": int,
            "lease_ttl": float,
            "cap_up": str,
            "cap_down": str,
        }
    ),
    "tls": TLS_TABLE,
    "metrics": METRICS_TABLE,
    "console": Table({"port": int, "listen": str}),
    "connections": CONNECTIONS_TABLE,
}


@dataclass(frozen=True, slots=True)
class ClusterNodeConfig:
    """Everything a cluster node needs to start."""

    name: str
    listen: str
    port: int
    storage: Path
    shared_storage: bool
    capacity_bytes: int
    store_url: str
    prefix: str
    cap_name: str
    cap_address: str
    cap_port: int
    lease_ttl: float
    tls: TLSFiles
    cap_up: str = ""
    cap_down: str = ""
    #: Run after a failover to a replica here (``frctl cluster failover``): starts the VM
    #: from the replica's disks (environment: ``node/failover/test.py``'s CommandHook).
    failover_start: str = ""
    #: Run before a failover here is cancelled (``frctl cluster failover-cancel``):
    #: stops the VM (the same environment).
    failover_stop: str = ""
    #: The operations listener (``[metrics]``); None: none.
    metrics: MetricsListen | None = None
    #: The web console's port (HTTPS); ``None``: no console on this node.
    console_port: int | None = None
    #: The web console's address (the node's own by default).
    console_listen: str = ""
    #: Deadlines and connection bounds of its listener and the CAP's (``[connections]``).
    connections: ConnectionPolicy = field(default_factory=ConnectionPolicy)


def _port(table: dict[str, Any], key: str, where: str, default: int) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 65536:
        raise ConfigError(f"{where}: '{key}' must be 0-65535")
    return value


def _store_url(raw: str, base: Path, where: str) -> str:
    if raw.startswith("sqlite://"):
        path = raw.removeprefix("sqlite://")
        query = ""
        if "?" in path:
            path, query = path.split("?", 1)
            query = "?" + query
        if not path:
            raise ConfigError(f"{where}: 'store' names no SQLite file")
        return f"sqlite://{(base / path).resolve()}{query}"
    if raw.startswith(("etcd://", "etcd+https://")):
        try:
            etcd_store_class()  # refused now, not when the node first opens its store
        except MissingBackend as exc:
            raise ConfigError(f"{where}: 'store': {exc}") from None
        return raw
    raise ConfigError(f"{where}: 'store' must be a sqlite:// or etcd:// URL")


def load_cluster_node_config(path: Path) -> ClusterNodeConfig:
    """Read and check a cluster node's configuration file.

    Raises:
        ConfigError: with the file and the key that is wrong.
    """
    data = read_checked(path, CLUSTER_NODE_SCHEMA)
    base = path.parent
    node = table(data, "node", path)
    cluster = table(data, "cluster", path)
    wn, wc = f"{path} [node]", f"{path} [cluster]"
    ttl = cluster.get("lease_ttl", 2.0)
    if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not 0.2 <= ttl <= 60:
        raise ConfigError(f"{wc}: 'lease_ttl' must be 0.2-60 seconds")
    shared = node.get("shared_storage", False)
    if not isinstance(shared, bool):
        raise ConfigError(f"{wn}: 'shared_storage' must be true or false")
    raw_capacity = node.get("capacity", 0)
    try:
        capacity = 0 if raw_capacity in (0, "0") else int(parse_rate(raw_capacity))
    except ValueError as exc:
        raise ConfigError(f"{wn}: 'capacity': {exc}") from None
    prefix = cluster.get("prefix", "/frrep/")
    if not isinstance(prefix, str) or not prefix.startswith("/") or not prefix.endswith("/"):
        raise ConfigError(f"{wc}: 'prefix' must start and end with '/'")
    try:
        connections = connection_policy(data, path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    console_port: int | None = None
    console_listen = ""
    if "console" in data:
        console = table(data, "console", path)
        where = f"{path} [console]"
        console_port = _port(console, "port", where, 8443)
        console_listen = str(console.get("listen", ""))
    return ClusterNodeConfig(
        name=string(node, "name", wn),
        listen=string(node, "listen", wn),
        port=_port(node, "port", wn, 7443),
        storage=base / string(node, "storage", wn),
        shared_storage=shared,
        capacity_bytes=capacity,
        store_url=_store_url(string(cluster, "store", wc), base, wc),
        prefix=prefix,
        cap_name=string(cluster, "cap_name", wc),
        cap_address=str(cluster.get("cap_address", "")),
        cap_port=_port(cluster, "cap_port", wc, 7443),
        lease_ttl=float(ttl),
        tls=tls_files(data, path),
        cap_up=str(cluster.get("cap_up", "")),
        cap_down=str(cluster.get("cap_down", "")),
        failover_start=str(node.get("failover_start", "")),
        failover_stop=str(node.get("failover_stop", "")),
        metrics=metrics_listen(data, path),
        console_port=console_port,
        console_listen=console_listen,
        connections=connections,
    )
