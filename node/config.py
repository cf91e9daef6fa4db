"""The recovery server's configuration file (TOML).

Example::

    [server]
    name = "r1.example.com"      # this host's name: SNI, certificates, negotiation
    listen = "127.0.0.2"         # address to listen on
    port = 7443
    recovery_points = 24         # recovery points kept per replica

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
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frproto import CompressionSet

from .authz import Authorization, AuthorizationEntry

#: Offer no compression by default: on links faster than about 0.5 GB/s (measured in
#: perf-baselines, and by bench/ir.py --compression) compressing costs more time than it
#: saves.
NO_COMPRESSION = CompressionSet(0)


class ConfigError(Exception):
    """The configuration file is missing, unreadable or wrong; the message says where."""


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """Certificate, key and CA of this host."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True, slots=True)
class RecoveryServerConfig:
    """Everything a recovery server needs to start."""

    name: str
    listen: str
    port: int
    tls: TLSFiles
    authorization: Authorization
    recovery_points: int = 24


def _table(data: dict[str, Any], key: str, where: Path) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: missing [{key}] table")
    return value


def _str(table: dict[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: '{key}' must be a non-empty string")
    return value


def _entry(item: Any, base: Path, where: str) -> AuthorizationEntry:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a table")
    try:
        return AuthorizationEntry(
            primary=_str(item, "primary", where) if "primary" in item else "*.any",
            storage=base / _str(item, "storage", where),
            trust_group=_str(item, "trust_group", where),
        )
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _tls_files(data: dict[str, Any], path: Path) -> TLSFiles:
    """The [tls] table: certificate, key and CA, relative to the config file."""
    tls = _table(data, "tls", path)
    where = f"{path} [tls]"
    return TLSFiles(*(path.parent / _str(tls, key, where) for key in ("cert", "key", "ca")))


def load_recovery_server_config(path: Path) -> RecoveryServerConfig:
    """Read and check a recovery server configuration file.

    Raises:
        ConfigError: with the file and the key that is wrong.
    """
    data = _read_toml(path)
    base = path.parent
    server = _table(data, "server", path)
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
    return RecoveryServerConfig(
        name=_str(server, "name", f"{path} [server]"),
        listen=str(server.get("listen", "0.0.0.0")),
        port=port,
        tls=_tls_files(data, path),
        authorization=Authorization(
            entries=tuple(
                _entry(item, base, f"{path} [[authorization]] #{i + 1}")
                for i, item in enumerate(entries)
            ),
            any_primary=any_entry,
        ),
        recovery_points=points,
    )


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

        [bandwidth]                  # optional: for all VMs of this host together
        host = "200M"                # bytes per second; K, M, G = 10^3, 10^6, 10^9
        schedule = [["08:00", "18:00", "50M"]]   # office hours: less

        [tls]
        cert = "certs/p1.example.com.pem"
        key = "certs/p1.example.com-key.pem"
        ca = "certs/ca.pem"

        [hosts]                      # optional: like /etc/hosts, looked up before DNS
        "n1.example.com" = "10.0.0.11"
        "cap.example.com" = "10.0.0.10"

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


def load_primary_config(path: Path) -> PrimaryConfig:
    """Read and check a primary configuration file.

    Raises:
        ConfigError: with the file and the key that is wrong.
    """
    data = _read_toml(path)
    base = path.parent
    primary = _table(data, "primary", path)
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
    return PrimaryConfig(
        name=_str(primary, "name", f"{path} [primary]"),
        state_dir=base / _str(primary, "state_dir", f"{path} [primary]"),
        tls=_tls_files(data, path),
        local_address=str(local) if local else None,
        bandwidth_bps=host_rate,
        bandwidth_schedule=schedule,
        compression=parse_compression(primary.get("compression", "none"), path),
        hosts=parse_hosts(data.get("hosts", {}), path),
        resync_window=_window(primary.get("resync_window"), path),
    )


def _window(value: object, path: Path) -> tuple[str, str] | None:
    """``[primary] resync_window = ["22:00", "06:00"]`` (None when absent)."""
    if value is None:
        return None
    from .primary.window import TimeWindow

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


def parse_compression(text: object, path: Path | str = "config") -> CompressionSet:
    """The methods of ``"zstd"``, ``"lz4"``, ``"zstd,lz4"`` or ``"none"``."""
    offered = NO_COMPRESSION
    for word in str(text).lower().replace(" ", "").split(","):
        if word in ("", "none"):
            continue
        if word not in ("zstd", "lz4"):
            raise ConfigError(f"{path}: [primary] compression: {word!r} is not zstd, lz4 or none")
        offered |= CompressionSet[word.upper()]
    return offered


def parse_rate(text: object) -> float:
    """Bytes per second from ``"200M"``, ``"1.5G"``, ``"500K"`` or a plain number."""
    raw = str(text).strip().upper().removesuffix("B/S").removesuffix("/S")
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(raw[-1:], 1.0)
    value = float(raw[:-1] if scale != 1.0 else raw)
    if not value > 0:
        raise ValueError(f"a rate must be positive, not {text!r}")
    return value * scale
