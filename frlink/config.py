"""What every configuration file of this project shares: reading TOML, its tables and
strings, the [tls] table, rates and compression.

The recovery server (:mod:`node.config`), the primary (:mod:`node.primary.config`) and
the cluster node (:mod:`frcluster.config`) each read their own file with these, so one
mistake reads the same everywhere.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frproto import CompressionSet

from .config_keys import ConfigKeyError, Schema, Table, check_keys

__all__ = [
    "METRICS_TABLE",
    "NO_COMPRESSION",
    "TLS_TABLE",
    "ConfigError",
    "MetricsListen",
    "Schema",
    "TLSFiles",
    "Table",
    "metrics_listen",
    "parse_compression",
    "parse_rate",
    "read_checked",
    "read_toml",
    "string",
    "table",
    "tls_files",
]

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


def table(data: dict[str, Any], key: str, where: Path) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: missing [{key}] table")
    return value


def string(table: dict[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: '{key}' must be a non-empty string")
    return value


#: The [tls] table every configuration file has.
TLS_TABLE = Table({"cert": str, "key": str, "ca": str})
#: The optional [metrics] table of every service's file (:func:`metrics_listen`).
METRICS_TABLE = Table({"listen": str})


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc.reason})") from None


def _parse(path: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def read_toml(path: Path) -> dict[str, Any]:
    """The file's TOML, unchecked.

    Raises:
        ConfigError: missing, unreadable, not text, or not TOML."""
    return _parse(path, _read_text(path))


def read_checked(path: Path, schema: Schema) -> dict[str, Any]:
    """The file's TOML, every table and key known to ``schema`` and of its type.

    Raises:
        ConfigError: as :func:`read_toml`, or an unknown key or wrong type with its line
            (``server.toml:4: [server] unknown key 'prot' (did you mean 'port'?)``).
    """
    text = _read_text(path)
    data = _parse(path, text)
    try:
        check_keys(data, schema, path, text)
    except ConfigKeyError as exc:
        raise ConfigError(str(exc)) from None
    return data


def tls_files(data: dict[str, Any], path: Path) -> TLSFiles:
    """The [tls] table: certificate, key and CA, relative to the config file."""
    tls = table(data, "tls", path)
    where = f"{path} [tls]"
    return TLSFiles(*(path.parent / string(tls, key, where) for key in ("cert", "key", "ca")))


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


@dataclass(frozen=True, slots=True)
class MetricsListen:
    """Where the operations listener (``/metrics``, ``/livez``, ``/readyz``) listens."""

    host: str
    port: int


def metrics_listen(data: dict[str, Any], path: Path) -> MetricsListen | None:
    """The ``[metrics]`` table: ``listen = "127.0.0.1:9464"`` (``"[::1]:9464"`` for
    IPv6); None when the table is absent (no listener)."""
    metrics = data.get("metrics")
    if metrics is None:
        return None
    where = f"{path} [metrics]"
    if not isinstance(metrics, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(metrics) - {"listen"})
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (only 'listen')")
    text = string(metrics, "listen", where)
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{where}: 'listen' must be \"address:port\", not {text!r}")
    return MetricsListen(host, int(port))
