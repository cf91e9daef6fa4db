"""frctl subcommands of the host agent: ``server``, ``primary`` and ``replication``."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import trio

#: Health values that make ``replication status --check`` exit with 3.
_UNHEALTHY = {"warning", "critical"}


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def parse_frequency(text: str) -> float:
    """``30s``, ``5m``, ``15m``, ``1h`` or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a frequency: {text!r} (use 30s, 5m, 15m...)")
    value = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    if value <= 0:
        raise argparse.ArgumentTypeError("the frequency must be positive")
    return value


def _rate(text: str) -> float:
    from node.config import parse_rate

    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_server_run(args: argparse.Namespace) -> int:
    from node.config import ConfigError, load_recovery_server_config
    from node.recovery_server import RecoveryServer

    _logging(args.log_level)
    try:
        config = load_recovery_server_config(Path(args.config))
    except ConfigError as exc:
        print(f"frctl: {exc}", file=sys.stderr)
        return 1
    trio.run(RecoveryServer(config).serve)
    return 0


def _primary_config(args: argparse.Namespace) -> Any:
    from node.config import load_primary_config

    return load_primary_config(Path(args.config))


def _cmd_primary_run(args: argparse.Namespace) -> int:
    from node.primary.service import run_primary

    _logging(args.log_level)
    trio.run(run_primary, _primary_config(args))
    return 0


def _store(args: argparse.Namespace) -> Any:
    from node.primary.state import PrimaryStateStore

    return PrimaryStateStore(_primary_config(args).state_dir)


def _cmd_enable(args: argparse.Namespace) -> int:
    from node.primary.state import VMReplicationState

    disks = []
    for spec in args.disk:
        disk_id, _, path = spec.partition("=")
        image = Path(path)
        if not disk_id or not path or not image.is_file():
            print(f"frctl: --disk {spec!r}: use ID=PATH to an existing image", file=sys.stderr)
            return 1
        disks.append(
            {"disk_id": disk_id, "path": str(image.resolve()), "size": image.stat().st_size}
        )
    host, _, port = args.server.rpartition(":")
    if not host or not port.isdigit():
        print(f"frctl: --server {args.server!r}: use HOST:PORT", file=sys.stderr)
        return 1
    state = VMReplicationState(
        vmid=str(uuid.UUID(args.vmid)),
        name=args.name,
        disks=disks,
        block_size=args.block_size,
        recovery_host=host,
        recovery_port=int(port),
        server_name=args.server_name or host,
        frequency_s=args.frequency,
        paused=False,
        ir_state="NOT_STARTED",
        ir_cursor=[0, 0],
        sequence=0,
        last_replicated_at=None,
        last_cycle_started_at=None,
        pending_bytes=0,
        health="initial replication",
        broker=None,
        bandwidth_bps=args.bandwidth,
    )
    _store(args).save(state)
    print(f"replication/{args.name} enabled")
    return 0


def _set_paused(args: argparse.Namespace, paused: bool) -> int:
    store = _store(args)
    state = store.load(str(uuid.UUID(args.vmid)))
    state.paused = paused
    if not paused and state.halted is not None:
        # A person looked at why it halted: the running service tries again. A replica
        # deleted in the cluster halts again (only disable + enable seeds a new one).
        print(f"replication/{state.name} was halted: {state.halted}", file=sys.stderr)
        state.halted = None
    store.save(state)
    print(f"replication/{state.name} {'paused' if paused else 'resumed'}")
    return 0


def _cmd_disable(args: argparse.Namespace) -> int:
    store = _store(args)
    vmid = str(uuid.UUID(args.vmid))
    name = store.load(vmid).name
    store.delete(vmid)
    print(f"replication/{name} disabled")
    return 0


def _ir_percent(state: Any) -> float:
    if state.ir_state == "COMPLETE":
        return 100.0
    total = state.ir_bytes_total or sum(int(d["size"]) for d in state.disks)
    return round(100.0 * state.ir_bytes_done / total, 1) if total else 0.0


def _cmd_wait(args: argparse.Namespace) -> int:
    """Show progress until the VM's IR is complete and nothing is pending (or time runs out)."""
    store = _store(args)
    vmid = str(uuid.UUID(args.vmid))
    deadline = time.monotonic() + args.timeout
    tty = sys.stderr.isatty()
    shown = -1.0
    while True:
        state = store.load(vmid)
        percent = _ir_percent(state)
        done = state.ir_state == "COMPLETE" and state.pending_bytes == 0
        if args.json:
            print(
                json.dumps(
                    {
                        "message_type": "status",
                        "vmid": vmid,
                        "ir_percent": percent,
                        "sequence": state.sequence,
                        "pending_bytes": state.pending_bytes,
                    }
                )
            )
        elif tty or percent - shown >= 10 or done:
            bar = "#" * int(percent // 5)
            end = "\r" if tty and not done else "\n"
            print(
                f"{state.name}: IR [{bar:<20}] {percent:5.1f}%  sequence {state.sequence}"
                f"  pending {state.pending_bytes} B",
                end=end,
                file=sys.stderr,
                flush=True,
            )
            shown = percent
        if done:
            print(f"replication/{state.name} in sync at sequence {state.sequence}")
            return 0
        if state.health == "critical" or time.monotonic() > deadline:
            if tty:
                print(file=sys.stderr)
            print(f"frctl: replication/{state.name} not in sync ({state.health})", file=sys.stderr)
            return 3
        time.sleep(args.interval)


def _target(state: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str]:
    """The broker and the recovery node of a VM (JSON objects or None), and the text of
    status's SERVER column."""
    if state.broker is None:
        return None, None, f"{state.recovery_host}:{state.recovery_port}"
    broker = {"name": state.broker, "host": state.broker_host, "port": state.broker_port}
    if not state.node_name:
        return broker, None, f"(no node yet) via broker {state.broker}"
    node = {"name": state.node_name, "address": state.node_address, "port": state.node_port}
    return broker, node, f"{state.node_name}:{state.node_port} via broker {state.broker}"


def _cmd_status(args: argparse.Namespace) -> int:
    now = time.time()
    rows = []
    for state in sorted(_store(args).all(), key=lambda s: s.name):
        lag = None if state.last_replicated_at is None else now - state.last_replicated_at
        broker, node, server = _target(state)
        rows.append(
            {
                "vmid": state.vmid,
                "name": state.name,
                "state": "paused" if state.paused else state.health,
                "ir": state.ir_state,
                "ir_percent": _ir_percent(state),
                "sequence": state.sequence,
                "last_replicated_at": state.last_replicated_at,
                "lag_seconds": None if lag is None else round(lag, 1),
                "pending_bytes": state.pending_bytes,
                "recovery_server": f"{state.recovery_host}:{state.recovery_port}",
                # Through a clustering broker: which one, and the node holding it now.
                "broker": broker,
                "recovery_node": node,
                "server": server,
                "halted": state.halted,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'VM':<20} {'STATE':<20} {'IR':>6} {'SEQ':>6} {'LAG':>8} {'PENDING':>12}  SERVER")
        for r in rows:
            lag = "-" if r["lag_seconds"] is None else f"{r['lag_seconds']:.0f}s"
            print(
                f"{r['name']:<20} {r['state']:<20} {r['ir_percent']:>5.0f}% {r['sequence']:>6} "
                f"{lag:>8} "
                f"{r['pending_bytes']:>12}  {r['server']}"
            )
            if r["halted"]:
                print(f"{'':<20} halted: {r['halted']}")
    if args.check and any(r["state"] in _UNHEALTHY for r in rows):
        return 3
    return 0


def is_cluster_config(path: Path) -> bool:
    """True for a cluster node's configuration (it has a ``[cluster]`` table)."""
    import tomllib

    try:
        return "cluster" in tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False  # the configuration's loader reports it properly


def _stores(args: argparse.Namespace) -> list[Path]:
    """The replica storage places of a recovery server's configuration, or of a cluster
    node's (a file with a ``[cluster]`` table): every storage under its root."""
    from node.config import load_recovery_server_config

    path = Path(args.config)
    if is_cluster_config(path):
        from node.cluster.config import load_cluster_node_config

        root = load_cluster_node_config(path).storage
        return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    config = load_recovery_server_config(path)
    places = {e.storage for e in config.authorization.entries}
    if config.authorization.any_primary is not None:
        places.add(config.authorization.any_primary.storage)
    return sorted(places)


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _replicator(args: argparse.Namespace) -> Any:
    """A VMReplicator for one enabled VM, configured as the primary service would."""
    from node.primary.replicator import VMReplicator
    from node.primary.state import PrimaryStateStore
    from node.tls import client_context

    config = _primary_config(args)
    store = PrimaryStateStore(config.state_dir)
    state = store.load(str(uuid.UUID(args.vmid)))
    tls = config.tls
    return VMReplicator(
        state,
        store,
        client_context(tls.cert, tls.key, tls.ca),
        local_address=config.local_address,
        compression=config.compression,
        hosts=config.hosts,
    )


def _cmd_verify(args: argparse.Namespace) -> int:
    """Compare the replica with what was acknowledged, by digests; exit 3 if it differs."""
    from node.primary.resync import describe

    try:
        result = trio.run(_replicator(args).verify)
    except FileNotFoundError:
        print(f"frctl: VM {args.vmid} is not enabled for replication here", file=sys.stderr)
        return 4
    except Exception as exc:  # the server, TLS or the network said no: say why
        print(f"frctl: verify: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_json()) if args.json else describe(result))
    return 0 if result.ok else 3


def _cmd_resync(args: argparse.Namespace) -> int:
    """Send what differs between the disks and the replica (a paused VM's replication)."""
    try:
        replicator = _replicator(args)
    except FileNotFoundError:
        print(f"frctl: VM {args.vmid} is not enabled for replication here", file=sys.stderr)
        return 4
    if not replicator.state.paused:
        print(
            "frctl: pause the VM's replication first (frctl replication pause): the "
            "primary service resynchronizes by itself when it must, and the two must not "
            "run at once",
            file=sys.stderr,
        )
        return 1
    from .oob_commands import ProgressLine

    progress = ProgressLine(f"resynchronizing {replicator.state.name}")
    try:
        result = trio.run(replicator.resync, progress)
    except Exception as exc:  # the server, TLS or the network said no: say why
        progress.finish()
        print(f"frctl: resync: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    progress.finish()
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        found = (
            f"{result.blocks_sent} of {result.blocks} blocks differed"
            if result.method == "digests"
            else f"{result.blocks_sent} blocks known changed"
        )
        print(
            f"resynchronized ({result.method}): {found}, {result.bytes_sent} bytes sent as "
            f"batch {result.sequence or '-'} ({result.seconds:.2f} s)"
        )
    return 0


def _cmd_replica_list(args: argparse.Namespace) -> int:
    from node.storage import ReplicaStore

    rows = []
    for place in _stores(args):
        with ReplicaStore(place) as store:
            for vmid in store.vmids():
                replica = store.open(vmid)
                points = replica.recovery_points()
                rows.append(
                    {
                        "vmid": str(vmid),
                        "name": replica.name,
                        "ir": replica.ir_state.name,
                        "applied_sequence": replica.applied_sequence,
                        "recovery_points": len(points),
                        "latest_point_at": _iso(points[-1].applied_at) if points else None,
                        "primary": replica.primary,
                        "trust_group": replica.trust_group,
                        "storage": str(place),
                    }
                )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'VM':<20} {'IR':<12} {'SEQ':>6} {'POINTS':>6}  {'PRIMARY':<28} TRUST GROUP")
    for r in rows:
        print(
            f"{r['name']:<20} {r['ir']:<12} {r['applied_sequence']:>6} "
            f"{r['recovery_points']:>6}  {r['primary']:<28} {r['trust_group']}"
        )
    return 0


def _cmd_replica_points(args: argparse.Namespace) -> int:
    import frproto as fp
    from node.storage import ReplicaStore

    vmid = uuid.UUID(args.vmid)
    for place in _stores(args):
        with ReplicaStore(place) as store:
            if not store.exists(vmid):
                continue
            points = store.open(vmid).recovery_points()
            rows = [
                {
                    "sequence": p.sequence,
                    "captured_at": _iso(p.captured_at_ms / 1000) if p.captured_at_ms else None,
                    "applied_at": _iso(p.applied_at),
                }
                for p in points
            ]
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                print(f"{'SEQUENCE':>8}  {'CAPTURED (primary)':<22} APPLIED (here)")
                for r in rows:
                    print(f"{r['sequence']:>8}  {r['captured_at'] or '-':<22} {r['applied_at']}")
            return 0
    print(f"frctl: {fp.UnknownVM(f'no replica of {vmid} here').message}", file=sys.stderr)
    return 4


def register(sub: Any) -> None:
    """Add the host agent's subcommands to frctl's subparsers."""
    server = sub.add_parser("server", help="the recovery server")
    ssub = server.add_subparsers(dest="server_command", required=True, metavar="ACTION")
    run = ssub.add_parser("run", help="run a recovery server from a config file")
    run.add_argument("--config", required=True, help="recovery server TOML file")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    run.set_defaults(func=_cmd_server_run)

    replica = sub.add_parser("replica", help="replicas held by this recovery server")
    rsub_ = replica.add_subparsers(dest="replica_command", required=True, metavar="ACTION")
    rlist = rsub_.add_parser("list", help="every replica, its sequence and recovery points")
    rlist.add_argument("--config", required=True, help="recovery server TOML file")
    rlist.add_argument("--json", action="store_true")
    rlist.set_defaults(func=_cmd_replica_list)
    rpoints = rsub_.add_parser("points", help="the recovery points kept for a VM")
    rpoints.add_argument("--config", required=True, help="recovery server TOML file")
    rpoints.add_argument("vmid")
    rpoints.add_argument("--json", action="store_true")
    rpoints.set_defaults(func=_cmd_replica_points)

    primary = sub.add_parser("primary", help="the primary replicator service")
    psub = primary.add_subparsers(dest="primary_command", required=True, metavar="ACTION")
    prun = psub.add_parser("run", help="replicate every enabled VM until stopped")
    prun.add_argument("--config", required=True, help="primary TOML file")
    prun.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    prun.set_defaults(func=_cmd_primary_run)

    rep = sub.add_parser("replication", help="enable, inspect and control VM replication")
    rsub = rep.add_subparsers(dest="replication_command", required=True, metavar="ACTION")
    enable = rsub.add_parser("enable", help="enable replication of a VM")
    enable.add_argument("--config", required=True, help="primary TOML file")
    enable.add_argument("--vmid", required=True)
    enable.add_argument("--name", required=True)
    enable.add_argument("--disk", action="append", required=True, metavar="ID=PATH")
    enable.add_argument(
        "--server",
        required=True,
        metavar="HOST:PORT",
        help="recovery server, or a recovery cluster's CAP (its broker is found by "
        "negotiation); names resolve through the config's [hosts] table, then DNS",
    )
    enable.add_argument("--server-name", help="TLS name of the server or CAP (default: HOST)")
    enable.add_argument("--frequency", type=parse_frequency, default=300.0, help="30s, 5m, 15m...")
    enable.add_argument("--block-size", type=int, default=65536)
    enable.add_argument(
        "--bandwidth", type=_rate, help="limit of this VM, bytes/s (200M, 1.5G; K/M/G = 10^3..)"
    )
    enable.set_defaults(func=_cmd_enable)
    status = rsub.add_parser(
        "status", help="health and lag of each VM, and its broker and recovery node"
    )
    status.add_argument("--config", required=True)
    status.add_argument("--json", action="store_true")
    status.add_argument("--check", action="store_true", help="exit 3 if any VM is unhealthy")
    status.set_defaults(func=_cmd_status)
    wait = rsub.add_parser("wait", help="show IR progress until the VM is in sync")
    wait.add_argument("--config", required=True)
    wait.add_argument("vmid")
    wait.add_argument("--timeout", type=float, default=3600.0, help="seconds (exit 3 after)")
    wait.add_argument("--interval", type=float, default=0.5, help=argparse.SUPPRESS)
    wait.add_argument("--json", action="store_true", help="JSON lines, one per poll")
    wait.set_defaults(func=_cmd_wait)
    verify = rsub.add_parser(
        "verify",
        help="compare the replica with what was acknowledged, by digests (exit 3: differs)",
    )
    verify.add_argument("--config", required=True)
    verify.add_argument("vmid")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=_cmd_verify)
    resync = rsub.add_parser("resync", help="send only what differs from the replica (a paused VM)")
    resync.add_argument("--config", required=True)
    resync.add_argument("vmid")
    resync.add_argument("--json", action="store_true")
    resync.set_defaults(func=_cmd_resync)
    for name, func in (
        ("pause", lambda a: _set_paused(a, True)),
        ("resume", lambda a: _set_paused(a, False)),
        ("disable", _cmd_disable),
    ):
        action = rsub.add_parser(name, help=f"{name} replication of a VM")
        action.add_argument("--config", required=True)
        action.add_argument("vmid")
        action.set_defaults(func=func)
