"""The primary server's configuration file (TOML): see :class:`PrimaryConfig`."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from frlink.config import (
    METRICS_TABLE,
    NO_COMPRESSION,
    TLS_TABLE,
    ConfigError,
    MetricsListen,
    Schema,
    Table,
    TLSFiles,
    metrics_listen,
    parse_compression,
    parse_rate,
    read_checked,
    string,
    table,
    tls_files,
)
from frproto import CompressionSet

from .window import TimeWindow

__all__ = [
    "DEFAULT_MAX_SESSIONS",
    "PRIMARY_SCHEMA",
    "ConfigError",
    "PrimaryConfig",
    "load_primary_config",
    "normalize_host_name",
    "parse_hosts",
]


#: Default of ``[primary] max_sessions``. A delta cycle of a small change takes well under
#: a second, so 16 at once serve thousands of VMs at a 30 s frequency, while 16 frame
#: buffers and 16 connections stay far below a node's bounds (``[connections]``
#: ``max_per_address`` 128); ``bench/scale.py`` measures it.
DEFAULT_MAX_SESSIONS = 16


@dataclass(frozen=True, slots=True)
class PrimaryConfig:
    """A primary server: its name, where replication state lives, its TLS files.

    Example::

        [primary]
        name = "p1.example.com"
        state_dir = "state"          # relative to this file
        # local_address = "127.0.0.3"  # source address for connections (tests)
        # compression = "zstd"         # offer "zstd", "lz4", "zstd,lz4" or "none" (default)
        # resync_window = ["22:00", "06:00"]  # automatic resyncs only then (default: any time)
        # max_sessions = 16            # cycles (and connections) of this host's VMs at once

        [bandwidth]                  # optional: for all VMs of this host together
        host = "200M"                # bytes per second; K, M, G = 10^3, 10^6, 10^9
        schedule = [["08:00", "18:00", "50M"]]   # office hours: less

        [metrics]                    # optional: /metrics, /livez, /readyz (plain HTTP)
        listen = "127.0.0.1:9465"

        [tls]
        cert = "certs/p1.example.com.pem"
        key = "certs/p1.example.com-key.pem"
        ca = "certs/ca.pem"

        [hosts]                      # optional: like /etc/hosts, looked up before DNS
        "n1.example.com" = "10.0.0.11"
        "cap.example.com" = "10.0.0.10"

        [failover]                   # optional: act on a planned failover asked at the
        stop_command = "virsh shutdown --domain $FRREP_VMID"   # recovery side (FailoverAsk)
        server_config = "server.toml"  # this host's recovery server: reverse replication
        reverse_port = 7443            # its port (default: the server_config's)

    ``[hosts]`` maps host names to IP addresses for every name this primary connects to:
    the configured recovery server or CAP, and the recovery nodes a clustering broker
    names (``docs/primary-and-broker.md``). A name that is not in the table is resolved
    through DNS.
    """

    name: str
    state_dir: Path
    tls: TLSFiles
    local_address: str | None = None
    #: Host-wide bandwidth limit in bytes per second (None: none), shared by all VMs.
    bandwidth_bps: float | None = None
    #: Time-of-day rules ``(start "HH:MM", end "HH:MM", bytes_per_s or None)``; outside
    #: them ``bandwidth_bps`` applies.
    bandwidth_schedule: tuple[tuple[str, str, float | None], ...] = ()
    #: ``(start "HH:MM", end "HH:MM")``: automatic resynchronizations only inside it.
    resync_window: tuple[str, str] | None = None
    #: Compression methods offered to recovery servers (none by default).
    compression: CompressionSet = NO_COMPRESSION
    #: Static name -> IP address table (``[hosts]``), consulted before DNS. Names are
    #: lower case without a trailing dot (see :func:`normalize_host_name`).
    hosts: Mapping[str, str] = field(default_factory=dict)
    #: The operations listener (``[metrics]``); None: none.
    metrics: MetricsListen | None = None
    #: How many of this host's VMs run a cycle (scan, connection, batch or IR) at once;
    #: the others wait their turn. Bounds this process's connections and read buffers,
    #: and what it asks of the recovery side at once (each session holds a frame buffer
    #: there): a host of 500 VMs starting together must not open 500 connections.
    max_sessions: int = DEFAULT_MAX_SESSIONS
    #: ``[failover] stop_command``: the shell command that stops a VM's writes when a
    #: planned failover is asked at the recovery side (``frctl cluster failover
    #: --planned``); None: such an ask is declined (``node/primary/failover_ask.py``).
    failover_stop_command: str | None = None
    #: ``[failover] server_config``: this host's recovery server's configuration; with
    #: it, this host becomes the VM's recovery side after such a failover (reverse
    #: replication, as ``frctl failover planned --server-config``).
    failover_server_config: Path | None = None
    #: ``[failover] reverse_port``: that server's port (0: the one its file names).
    failover_reverse_port: int = 0


#: Every table and key of a primary's file (anything else is refused).
PRIMARY_SCHEMA: Schema = {
    "primary": Table(
        {
            "name": str,
            "state_dir": str,
            "local_address": str,
            "compression": str,
            "resync_window": list,
            "max_sessions": int,
        }
    ),
    "bandwidth": Table({"host": (str, float), "schedule": list}),
    "tls": TLS_TABLE,
    "metrics": METRICS_TABLE,
    "hosts": Table(values=str),
    "failover": Table({"stop_command": str, "server_config": str, "reverse_port": int}),
}


def load_primary_config(path: Path) -> PrimaryConfig:
    """Read and check a primary configuration file.

    Raises:
        ConfigError: with the file and the key that is wrong.
    """
    data = read_checked(path, PRIMARY_SCHEMA)
    base = path.parent
    primary = table(data, "primary", path)
    local = primary.get("local_address")
    bandwidth = data.get("bandwidth", {})
    if not isinstance(bandwidth, dict):
        raise ConfigError(f"{path}: [bandwidth] must be a table")
    try:
        host_rate = parse_rate(bandwidth["host"]) if "host" in bandwidth else None
        schedule = tuple(
            (str(start), str(end), parse_rate(rate) if rate not in (None, "", "none") else None)
            for start, end, rate in bandwidth.get("schedule", [])
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: [bandwidth]: {exc}") from None
    sessions = primary.get("max_sessions", DEFAULT_MAX_SESSIONS)
    if isinstance(sessions, bool) or not isinstance(sessions, int) or not 1 <= sessions <= 10000:
        raise ConfigError(f"{path}: [primary] max_sessions must be an integer 1-10000")
    failover = data.get("failover", {})
    if not isinstance(failover, dict):
        raise ConfigError(f"{path}: [failover] must be a table")
    reverse_port = failover.get("reverse_port", 0)
    if isinstance(reverse_port, bool) or not isinstance(reverse_port, int):
        raise ConfigError(f"{path}: [failover] reverse_port must be an integer")
    if not 0 <= reverse_port < 65536:
        raise ConfigError(f"{path}: [failover] reverse_port must be 0-65535")
    server_config = failover.get("server_config")
    return PrimaryConfig(
        name=string(primary, "name", f"{path} [primary]"),
        state_dir=base / string(primary, "state_dir", f"{path} [primary]"),
        tls=tls_files(data, path),
        local_address=str(local) if local else None,
        bandwidth_bps=host_rate,
        bandwidth_schedule=schedule,
        compression=parse_compression(primary.get("compression", "none"), path),
        hosts=parse_hosts(data.get("hosts", {}), path),
        resync_window=_window(primary.get("resync_window"), path),
        metrics=metrics_listen(data, path),
        max_sessions=sessions,
        failover_stop_command=str(failover["stop_command"])
        if failover.get("stop_command")
        else None,
        failover_server_config=base / str(server_config) if server_config else None,
        failover_reverse_port=reverse_port,
    )


def _window(value: object, path: Path) -> tuple[str, str] | None:
    """``[primary] resync_window = ["22:00", "06:00"]`` (None when absent)."""
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise ConfigError(f'{path}: [primary] resync_window must be ["HH:MM", "HH:MM"]')
    try:
        TimeWindow(value[0], value[1])
    except ValueError as exc:
        raise ConfigError(f"{path}: [primary] resync_window: {exc}") from None
    return value[0], value[1]


def normalize_host_name(name: str) -> str:
    """A host name as looked up in a ``[hosts]`` table: lower case, no trailing dot."""
    return name.strip().lower().rstrip(".")


def parse_hosts(table: object, path: Path | str = "config") -> dict[str, str]:
    """The ``[hosts]`` table: host name -> IP address literal (v4 or v6).

    Raises:
        ConfigError: not a table, an empty name, or a value that is not an IP address.
    """
    if not isinstance(table, dict):
        raise ConfigError(f'{path}: [hosts] must be a table of "name" = "address"')
    hosts: dict[str, str] = {}
    for name, address in table.items():
        if isinstance(address, dict):  # n1.example.com = ... without quotes: nested tables
            raise ConfigError(f'{path}: [hosts]: quote dotted names: "{name}.…" = "address"')
        key = normalize_host_name(str(name))
        if not key:
            raise ConfigError(f"{path}: [hosts]: an empty host name")
        try:
            # Only literals: the table replaces DNS, it does not alias one name to another.
            hosts[key] = str(ipaddress.ip_address(str(address)))
        except ValueError:
            raise ConfigError(
                f"{path}: [hosts] {name!r}: {address!r} is not an IP address"
            ) from None
    return hosts
