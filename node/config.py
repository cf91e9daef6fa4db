"""The recovery server's configuration file (TOML).

Example::

    [server]
    name = "r1.example.com"      # this host's name: SNI, certificates, negotiation
    listen = "127.0.0.2"         # address to listen on
    port = 7443
    recovery_points = 24         # recovery points kept per replica

    [metrics]                    # optional: /metrics, /livez, /readyz in plain HTTP
    listen = "127.0.0.1:9464"

    [tls]                        # paths are relative to this file
    cert = "certs/r1.example.com.pem"
    key = "certs/r1.example.com-key.pem"
    ca = "certs/ca.pem"

    [[authorization]]
    primary = "*.primary.example.com"   # exact host name or *.domain
    storage = "replicas"
    trust_group = "site-a"

    # [any_primary]                     # explicit: any primary with a certificate from our CA
    # storage = "replicas"
    # trust_group = "default"

    # [connections]                     # deadlines and bounds (docs/protocol.md 10.2)
    # negotiate_timeout = 10.0
    # ready_timeout = 60.0
    # session_timeout = 120.0
    # frame_timeout = 30.0
    # keepalive = 30.0
    # max = 512
    # max_per_address = 128
    # max_negotiating = 128
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frlink.authz import Authorization, AuthorizationEntry
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
    read_checked,
    string,
    table,
    tls_files,
)
from frlink.connections import CONNECTIONS_TABLE, ConnectionPolicy, connection_policy

__all__ = [
    "NO_COMPRESSION",
    "ConfigError",
    "RECOVERY_SERVER_SCHEMA",
    "RecoveryServerConfig",
    "TLSFiles",
    "load_recovery_server_config",
    "parse_compression",
]


@dataclass(frozen=True, slots=True)
class RecoveryServerConfig:
    """Everything a recovery server needs to start."""

    name: str
    listen: str
    port: int
    tls: TLSFiles
    authorization: Authorization
    recovery_points: int = 24
    #: The operations listener (``[metrics]``); None: none.
    metrics: MetricsListen | None = None
    #: Deadlines and connection bounds (``[connections]``, docs/protocol.md 10.2).
    connections: ConnectionPolicy = field(default_factory=ConnectionPolicy)


#: Every table and key of a recovery server's file (anything else is refused).
RECOVERY_SERVER_SCHEMA: Schema = {
    "server": Table({"name": str, "listen": str, "port": int, "recovery_points": int}),
    "tls": TLS_TABLE,
    "metrics": METRICS_TABLE,
    "authorization": Table({"primary": str, "storage": str, "trust_group": str}, array=True),
    "any_primary": Table({"storage": str, "trust_group": str}),
    "connections": CONNECTIONS_TABLE,
}


def _entry(item: Any, base: Path, where: str) -> AuthorizationEntry:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a table")
    try:
        return AuthorizationEntry(
            primary=string(item, "primary", where) if "primary" in item else "*.any",
            storage=base / string(item, "storage", where),
            trust_group=string(item, "trust_group", where),
        )
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_recovery_server_config(path: Path) -> RecoveryServerConfig:
    """Read and check a recovery server configuration file.

    Raises:
        ConfigError: with the file and the key that is wrong.
    """
    data = read_checked(path, RECOVERY_SERVER_SCHEMA)
    base = path.parent
    server = table(data, "server", path)
    port = server.get("port", 7443)
    points = server.get("recovery_points", 24)
    if not isinstance(port, int) or not 0 <= port < 65536:
        raise ConfigError(f"{path}: [server] port must be 0-65535 (0: any free port)")
    if not isinstance(points, int) or not 1 <= points <= 10_000:
        raise ConfigError(f"{path}: [server] recovery_points must be 1-10000")
    entries = data.get("authorization", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: [[authorization]] must be an array of tables")
    any_table = data.get("any_primary")
    any_entry = None
    if any_table is not None:
        any_entry = _entry(dict(any_table, primary="*.any"), base, f"{path} [any_primary]")
    try:
        connections = connection_policy(data, path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return RecoveryServerConfig(
        name=string(server, "name", f"{path} [server]"),
        listen=str(server.get("listen", "0.0.0.0")),
        port=port,
        tls=tls_files(data, path),
        authorization=Authorization(
            entries=tuple(
                _entry(item, base, f"{path} [[authorization]] #{i + 1}")
                for i, item in enumerate(entries)
            ),
            any_primary=any_entry,
        ),
        recovery_points=points,
        metrics=metrics_listen(data, path),
        connections=connections,
    )
