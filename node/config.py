"""The recovery server's configuration file (TOML).

Example::

    [server]
    name = "r1.example.com"      # this host's name: SNI, certificates, negotiation
    listen = "127.0.0.2"         # address to listen on
    port = 7443
    recovery_points = 24         # recovery points kept per replica

    [metrics]                    # optional: /metrics, /livez, /readyz in plain HTTP
    listen = "127.0.0.1:9464"

    [console]                    # optional: the web console over HTTPS
    port = 8443                  # listen: the server's own by default

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
    # max_handshaking = 64
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
    "ServerConsole",
    "console_database",
    "TLSFiles",
    "load_recovery_server_config",
    "parse_compression",
]


@dataclass(frozen=True, slots=True)
class ServerConsole:
    """The ``[console]`` table: the web console of a stand-alone recovery server."""

    port: int  #: its HTTPS port (the server's own certificate)
    listen: str  #: its address
    #: The SQLite file of the console's account and audit log.
    database: Path


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
    #: The web console (``[console]``); None: none.
    console: ServerConsole | None = None
    #: Seconds between the cycles of the reverse replication that starts after a planned
    #: failover (``[reverse] frequency``; ``node/failover/reverse_service.py``).
    reverse_frequency_s: float = 60.0

    @property
    def storages(self) -> list[Path]:
        """Every storage location the authorization entries name, sorted."""
        places = {e.storage for e in self.authorization.entries}
        if self.authorization.any_primary is not None:
            places.add(self.authorization.any_primary.storage)
        return sorted(places)


#: Every table and key of a recovery server's file (anything else is refused).
RECOVERY_SERVER_SCHEMA: Schema = {
    "server": Table({"name": str, "listen": str, "port": int, "recovery_points": int}),
    "tls": TLS_TABLE,
    "metrics": METRICS_TABLE,
    "authorization": Table({"primary": str, "storage": str, "trust_group": str}, array=True),
    "any_primary": Table({"storage": str, "trust_group": str}),
    "console": Table({"port": int, "listen": str, "database": str}),
    "connections": CONNECTIONS_TABLE,
    "reverse": Table({"frequency": (int, float)}),
}

#: The console database's file name when ``[console] database`` is not given.
CONSOLE_DATABASE = "console.db"


def default_console_database(storages: list[Path], base: Path) -> Path:
    """Where the console's account and audit log are kept by default: ``console.db``
    beside the first storage location (in its parent directory, with the server's other
    state: ``/var/lib/frrep/console.db`` for ``/var/lib/frrep/replicas``), or in
    ``base`` (the configuration's directory) when no storage is configured."""
    return (storages[0].parent if storages else base) / CONSOLE_DATABASE


def console_database(config: RecoveryServerConfig, path: Path) -> Path:
    """The console database of the server configured by the file ``path``, whether or
    not it has a ``[console]`` table (``frctl server admin-password`` may come first)."""
    if config.console is not None:
        return config.console.database
    return default_console_database(config.storages, path.parent)


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
    listen = str(server.get("listen", "0.0.0.0"))
    authorization = Authorization(
        entries=tuple(
            _entry(item, base, f"{path} [[authorization]] #{i + 1}")
            for i, item in enumerate(entries)
        ),
        any_primary=any_entry,
    )
    config = RecoveryServerConfig(
        name=string(server, "name", f"{path} [server]"),
        listen=listen,
        port=port,
        tls=tls_files(data, path),
        authorization=authorization,
        recovery_points=points,
        metrics=metrics_listen(data, path),
        connections=connections,
    )
    if "reverse" in data:
        frequency = table(data, "reverse", path).get("frequency", 60.0)
        if not 0 < frequency <= 86400:
            raise ConfigError(f"{path}: [reverse] frequency must be 0-86400 seconds (not 0)")
        config = replace(config, reverse_frequency_s=float(frequency))
    if "console" in data:
        console = table(data, "console", path)
        console_port = console.get("port", 8443)
        if not isinstance(console_port, int) or not 0 <= console_port < 65536:
            raise ConfigError(f"{path}: [console] port must be 0-65535 (0: any free port)")
        database = (
            base / string(console, "database", f"{path} [console]")
            if "database" in console
            else default_console_database(config.storages, base)
        )
        config = replace(
            config,
            console=ServerConsole(
                port=console_port,
                listen=str(console.get("listen", listen)),
                database=database,
            ),
        )
    return config
