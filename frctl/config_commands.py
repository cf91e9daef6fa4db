"""``frctl config check FILE``: is this configuration file one frrep can start with?

Which configuration it is comes from its tables (``[cluster]``/``[node]``: a cluster
node; ``[primary]``: a primary; ``[server]``: a recovery server), or ``--kind``. The
file is then read by the same loader the service uses (so ``server run`` refuses at
start exactly what this refuses: unknown tables and keys, wrong types, with the line),
and its ``[tls]`` files are loaded as the service would load them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: kind -> (what it is called, its TOML tables that tell it apart).
KINDS = {
    "node": ("a cluster node's configuration", ("cluster", "node")),
    "primary": ("a primary's configuration", ("primary",)),
    "server": ("a recovery server's configuration", ("server",)),
}


def detect_kind(path: Path) -> str:
    """``node``, ``primary`` or ``server`` from the file's tables.

    Raises:
        frlink.config.ConfigError: unreadable, not TOML, or none of those tables.
    """
    from frlink.config import ConfigError, read_toml

    data = read_toml(path)
    for kind, (_, tables) in KINDS.items():
        if any(t in data for t in tables):
            return kind
    raise ConfigError(
        f"{path}: not a frrep configuration: it has no [server] (recovery server), "
        "[primary] (primary) or [node] and [cluster] (cluster node) table"
    )


def _loader(kind: str) -> Callable[[Path], Any]:
    if kind == "node":
        from frcluster.config import load_cluster_node_config

        return load_cluster_node_config
    if kind == "primary":
        from node.primary.config import load_primary_config

        return load_primary_config
    from node.config import load_recovery_server_config

    return load_recovery_server_config


def _check_tls(kind: str, config: Any) -> None:
    """Load the certificate, key and CA as the service will (a missing file, a key
    readable by others, a key that does not match its certificate are said here)."""
    from frlink.tls import client_context, server_context

    tls = config.tls
    make = client_context if kind == "primary" else server_context
    make(tls.cert, tls.key, tls.ca)


def _cmd_check(args: argparse.Namespace) -> int:
    path = Path(args.file)
    kind = args.kind or detect_kind(path)
    config = _loader(kind)(path)
    if not args.no_tls:
        _check_tls(kind, config)
    what = KINDS[kind][0]
    if args.json:
        print(json.dumps({"file": str(path), "kind": kind, "ok": True}))
    else:
        print(f"{path}: {what}, OK")
    return 0


def register(sub: Any) -> None:
    """Add ``frctl config`` to frctl's subcommands."""
    config = sub.add_parser("config", help="check a configuration file")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = csub.add_parser(
        "check",
        help="refuse unknown keys, wrong types and values with their line (exit 1)",
        description="Check a recovery server's, primary's or cluster node's configuration "
        "as the service reads it at start: unknown tables and keys (with the closest known "
        "one), wrong types and values, with the line; then its [tls] files.",
    )
    check.add_argument("file", metavar="FILE")
    check.add_argument("--kind", choices=sorted(KINDS), help="do not guess from the tables")
    check.add_argument(
        "--no-tls", action="store_true", help="do not load the [tls] files (another host's)"
    )
    check.add_argument("--json", action="store_true", help="one JSON object")
    check.set_defaults(func=_cmd_check)
