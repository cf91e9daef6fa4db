"""frctl subcommands of the primary: ``primary run`` and ``replication`` (a thin shell over
``node.primary.operations`` and the replicator)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import trio

from .logs import setup_logging


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
    from frlink.config import parse_rate

    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _primary_config(args: argparse.Namespace) -> Any:
    from node.primary.config import load_primary_config

    return load_primary_config(Path(args.config))


def _cmd_primary_run(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from node.primary.locks import ServiceAlreadyRunning
    from node.primary.metrics import PrimaryMetrics
    from node.primary.service import run_primary
    from node.primary.state import PrimaryStateStore

    from .daemon import run_daemon

    setup_logging(args.log_level)
    config = _primary_config(args)
    registry = CollectorRegistry()
    metrics = PrimaryMetrics(registry, PrimaryStateStore(config.state_dir))
    try:
        trio.run(
            partial(
                run_daemon,
                partial(run_primary, config, metrics=metrics),
                registry=registry,
                ready=metrics.ready,
                metrics=config.metrics,
                cert=config.tls.cert,
            )
        )
    except ServiceAlreadyRunning as exc:
        print(f"frctl: {exc}", file=sys.stderr)
        return 1
    return 0


def _store(args: argparse.Namespace) -> Any:
    from node.primary.state import PrimaryStateStore

    return PrimaryStateStore(_primary_config(args).state_dir)


def _cmd_enable(args: argparse.Namespace) -> int:
    from node.primary.operations import EnableRequest, Refused, enable

    request = EnableRequest(
        vmid=args.vmid,
        name=args.name,
        disk_specs=args.disk,
        server=args.server,
        server_name=args.server_name,
        frequency_s=args.frequency,
        block_size=args.block_size,
        bandwidth_bps=args.bandwidth,
    )
    try:
        state = enable(_store(args), request)
    except Refused as exc:
        print(f"frctl: enable: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"action": "enable", **_settings(state)}))
    else:
        print(f"replication/{args.name} enabled")
    return 0


def _settings(state: Any) -> dict[str, Any]:
    """What ``--json`` says of a VM after an action changed it."""
    return {
        "vmid": state.vmid,
        "name": state.name,
        "paused": state.paused,
        "frequency_s": state.frequency_s,
        "bandwidth_bps": state.bandwidth_bps,
        "compression": state.compression,
        "recovery_server": f"{state.recovery_host}:{state.recovery_port}",
    }


def _vm_or_say_why(store: Any, text: str) -> Any:
    """The VM's state (:func:`node.primary.operations.find_vm`), or None after saying on
    stderr why there is no such VM (exit 4)."""
    from node.primary.operations import NotEnabled, find_vm

    try:
        return find_vm(store, text)
    except NotEnabled as exc:
        print(f"frctl: {exc}", file=sys.stderr)
        return None


def _wait_for_cycle(store: Any, state: Any, timeout: float, doing: str) -> bool:
    """Wait until no cycle of the VM runs, up to ``timeout`` seconds, saying so on stderr
    if it must wait; False when one still runs."""
    from node.primary.operations import wait_for_cycle

    def say() -> None:
        print(
            f"replication/{state.name}: {doing}: waiting for the running cycle to end",
            file=sys.stderr,
        )

    return wait_for_cycle(store, state, timeout, say)


def _set_paused(args: argparse.Namespace, paused: bool) -> int:
    from node.primary.operations import set_paused

    store = _store(args)
    state = _vm_or_say_why(store, args.vmid)
    if state is None:
        return 4
    state, halted = set_paused(store, state, paused)
    if halted:
        print(f"replication/{state.name} was halted: {halted}", file=sys.stderr)
    action = "pause" if paused else "resume"
    if paused and not _wait_for_cycle(store, state, args.timeout, "pause"):
        # The pause is recorded and no new cycle starts, but the disks may still be read.
        print(
            f"frctl: replication/{state.name}: the pause is recorded, but a cycle still runs "
            f"after {args.timeout:.0f} s; no other will start after it (run pause again to wait)",
            file=sys.stderr,
        )
        if args.json:
            print(json.dumps({"action": action, "cycle_still_runs": True, **_settings(state)}))
        return 3
    if args.json:
        print(json.dumps({"action": action, "halted_before": halted, **_settings(state)}))
    else:
        print(f"replication/{state.name} {'paused' if paused else 'resumed'}")
    return 0


def _cmd_set(args: argparse.Namespace) -> int:
    """Change an enabled VM's frequency, bandwidth limit or compression (the service sees
    it next turn)."""
    from node.primary.operations import Refused, set_limits

    store = _store(args)
    if args.recovery_points is not None:
        print(
            "frctl: set: recovery points are kept by the recovery side, not the primary "
            "(the protocol carries no such setting): set [server] recovery_points in the "
            "recovery server's configuration, or 'frctl cluster settings "
            f"recovery_points={args.recovery_points}' for a cluster",
            file=sys.stderr,
        )
        return 1
    wanted = (args.frequency, args.bandwidth, args.compression)
    if all(w is None for w in wanted) and not args.no_bandwidth_limit:
        print(
            "frctl: set: give --frequency, --bandwidth, --no-bandwidth-limit or --compression",
            file=sys.stderr,
        )
        return 1
    state = _vm_or_say_why(store, args.vmid)
    if state is None:
        return 4
    try:
        state = set_limits(
            store,
            state,
            frequency_s=args.frequency,
            bandwidth_bps=args.bandwidth,
            no_bandwidth_limit=args.no_bandwidth_limit,
            compression=args.compression,
        )
    except Refused as exc:
        print(f"frctl: set: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"action": "set", **_settings(state)}))
        return 0
    limit = "none" if state.bandwidth_bps is None else f"{state.bandwidth_bps:.0f} B/s"
    compression = state.compression or "as configured"
    print(
        f"replication/{state.name}: frequency {state.frequency_s:g} s, bandwidth limit "
        f"{limit}, compression {compression}"
    )
    return 0


def _cmd_disable(args: argparse.Namespace) -> int:
    from node.primary.operations import CycleStillRuns, disable

    store = _store(args)
    state = _vm_or_say_why(store, args.vmid)
    if state is None:
        return 4

    def say() -> None:
        print(
            f"replication/{state.name}: disable: waiting for the running cycle to end",
            file=sys.stderr,
        )

    try:
        disable(store, state, args.timeout, say)
    except CycleStillRuns as exc:
        print(f"frctl: {exc}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps({"action": "disable", "vmid": state.vmid, "name": state.name}))
    else:
        print(f"replication/{state.name} disabled")
    return 0


def _cmd_reseed(args: argparse.Namespace) -> int:
    """Replicate a VM anew at its disks' current sizes (after a resize halted it)."""
    import frproto as fp
    from node.primary.disks import DiskProblem

    store = _store(args)
    state = _vm_or_say_why(store, args.vmid)
    if state is None:
        return 4
    if not args.yes:
        print(
            f"frctl: reseed removes the replica of replication/{state.name} at the recovery "
            f"side (every recovery point) and replicates its disks from scratch; add --yes "
            f"to do it",
            file=sys.stderr,
        )
        return 1
    was_paused = state.paused
    store.update(state.vmid, lambda st: setattr(st, "paused", True))
    if not _wait_for_cycle(store, state, args.timeout, "reseed"):
        print(f"frctl: replication/{state.name}: a cycle still runs; try again", file=sys.stderr)
        return 3
    replicator = replicator_from_args(args, state.vmid)
    try:
        fresh = trio.run(replicator.reseed)
    except (DiskProblem, fp.FrprotoError, OSError) as exc:
        print(f"frctl: reseed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.update(state.vmid, lambda st: setattr(st, "paused", was_paused))
    if args.json:
        print(json.dumps({"action": "reseed", "vmid": state.vmid, "disks": fresh.disks}))
        return 0
    sizes = ", ".join(f"{d['disk_id']} {d['size']} bytes" for d in fresh.disks)
    print(f"replication/{state.name} seeded anew ({sizes}): initial replication next")
    return 0


def _ir_percent(state: Any) -> float:
    from node.primary.operations import ir_percent

    return ir_percent(state)


def _cmd_wait(args: argparse.Namespace) -> int:
    """Show progress until the VM's IR is complete and nothing is pending (or time runs out)."""
    from node.primary.state import Health, IRStage

    store = _store(args)
    vmid = str(uuid.UUID(args.vmid))
    deadline = time.monotonic() + args.timeout
    tty = sys.stderr.isatty()
    shown = -1.0
    while True:
        state = store.load(vmid)
        percent = _ir_percent(state)
        done = state.ir_state == IRStage.COMPLETE and state.pending_bytes == 0
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
        if state.health == Health.CRITICAL or time.monotonic() > deadline:
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
    from node.primary.state import Health

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
                # Why the last cycle failed (a vanished disk, an unreachable server).
                "last_error": state.last_error,
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
            elif r["last_error"]:
                print(f"{'':<20} last cycle failed: {r['last_error']}")
    if args.check and any(r["state"] in (Health.WARNING, Health.CRITICAL) for r in rows):
        return 3
    return 0


def replicator_from_args(args: argparse.Namespace, vmid: str | None = None) -> Any:
    """A VMReplicator for one enabled VM (``vmid``, else ``args.vmid``: a VMID or a
    name), configured as the primary service would.

    Raises:
        NotEnabled: no such VM here, or a name several VMs share (frctl exits 4).
    """
    from node.primary.operations import find_vm, replicator_for
    from node.primary.state import PrimaryStateStore

    config = _primary_config(args)
    if vmid is None:
        vmid = find_vm(PrimaryStateStore(config.state_dir), args.vmid).vmid
    return replicator_for(config, vmid)


def _cmd_verify(args: argparse.Namespace) -> int:
    """Compare the replica with what was acknowledged, by digests; exit 3 if it differs."""
    from node.primary.resync import describe

    replicator = replicator_from_args(args)
    try:
        result = trio.run(replicator.verify)
    except Exception as exc:  # the server, TLS or the network said no: say why
        print(f"frctl: verify: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_json()) if args.json else describe(result))
    return 0 if result.ok else 3


def _cmd_resync(args: argparse.Namespace) -> int:
    """Send what differs between the disks and the replica (a paused VM's replication)."""
    replicator = replicator_from_args(args)
    if not replicator.state.paused:
        print(
            "frctl: pause the VM's replication first (frctl replication pause): the "
            "primary service resynchronizes by itself when it must, and the two must not "
            "run at once",
            file=sys.stderr,
        )
        return 1
    from .progress import ProgressLine

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


def register(sub: Any) -> None:
    """Add the host agent's subcommands to frctl's subparsers."""
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
    enable.add_argument("--json", action="store_true", help="one JSON object: what was done")
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
    _add_checks_and_controls(rsub)


def _cmd_test_connection(args: argparse.Namespace) -> int:
    """Reach, TLS, negotiation, authorization (and the broker at a CAP), step by step."""
    from frlink.tls import client_context
    from node.primary.connection_check import check_connection
    from node.primary.operations import find_vm

    config = _primary_config(args)
    if (args.vm is None) == (args.server is None):
        print("frctl: test-connection: give a VM or --server HOST:PORT", file=sys.stderr)
        return 2
    if args.vm is not None:
        from node.primary.state import PrimaryStateStore

        state = find_vm(PrimaryStateStore(config.state_dir), args.vm)
        host, port, name = state.recovery_host, state.recovery_port, state.server_name
    else:
        host, _, port_text = args.server.rpartition(":")
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            print(f"frctl: --server {args.server!r}: use HOST:PORT", file=sys.stderr)
            return 2
        port, name = int(port_text), args.server_name or host
    tls = config.tls
    report = trio.run(
        lambda: check_connection(
            host,
            port,
            server_name=name,
            ssl_context=client_context(tls.cert, tls.key, tls.ca),
            local_address=config.local_address,
            compression=config.compression,
            hosts=config.hosts,
            timeout=args.timeout,
        )
    )
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(f"testing the connection to {report.target}")
        for step in report.steps:
            print(f"  {step.name:<14} {'OK' if step.ok else 'FAILED':<7} {step.detail}")
    return 0 if report.ok else 1


def _add_checks_and_controls(rsub: Any) -> None:
    """``replication verify|resync|pause|resume|disable|set|reseed``."""
    verify = rsub.add_parser(
        "verify",
        help="compare the replica with what was acknowledged, by digests (exit 3: differs)",
    )
    verify.add_argument("--config", required=True)
    verify.add_argument("vmid", help="the VM's VMID, or its name")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=_cmd_verify)
    resync = rsub.add_parser("resync", help="send only what differs from the replica (a paused VM)")
    resync.add_argument("--config", required=True)
    resync.add_argument("vmid", help="the VM's VMID, or its name")
    resync.add_argument("--json", action="store_true")
    resync.set_defaults(func=_cmd_resync)
    for name, func, helptext in (
        ("pause", lambda a: _set_paused(a, True), "pause; waits for a running cycle to end"),
        ("resume", lambda a: _set_paused(a, False), "resume (also after a halt)"),
        ("disable", _cmd_disable, "stop replicating and forget the VM here"),
    ):
        action = rsub.add_parser(name, help=f"{helptext}")
        action.add_argument("--config", required=True)
        action.add_argument("vmid", help="the VM's VMID, or its name")
        action.add_argument(
            "--timeout", type=float, default=60.0, help="seconds to wait for a running cycle"
        )
        action.add_argument("--json", action="store_true", help="one JSON object: what was done")
        action.set_defaults(func=func)
    set_ = rsub.add_parser("set", help="change a VM's frequency, bandwidth limit or compression")
    set_.add_argument("--config", required=True)
    set_.add_argument("vmid", help="the VM's VMID, or its name")
    set_.add_argument("--frequency", type=parse_frequency, help="30s, 5m, 15m...")
    set_.add_argument("--bandwidth", type=_rate, help="limit of this VM, bytes/s (200M, 1.5G)")
    set_.add_argument("--no-bandwidth-limit", action="store_true")
    set_.add_argument(
        "--compression",
        metavar="METHODS",
        help="offered by this VM: zstd, lz4, zstd,lz4, none; 'default': the config's",
    )
    set_.add_argument(
        "--recovery-points",
        type=int,
        help="refused with where to set it: the recovery side keeps recovery points",
    )
    set_.add_argument("--json", action="store_true", help="one JSON object: the new settings")
    set_.set_defaults(func=_cmd_set)
    test = rsub.add_parser(
        "test-connection",
        help="test reach, TLS, negotiation and authorization to a VM's recovery server "
        "or CAP, or to --server (exit 1: a step failed)",
    )
    test.add_argument("--config", required=True, help="primary TOML file")
    test.add_argument("vm", nargs="?", help="the VM's VMID, or its name: test its target")
    test.add_argument("--server", metavar="HOST:PORT", help="a recovery server or a CAP")
    test.add_argument("--server-name", help="TLS name of the server or CAP (default: HOST)")
    test.add_argument("--timeout", type=float, default=10.0, help="seconds per step (10)")
    test.add_argument("--json", action="store_true", help="one JSON object: every step")
    test.set_defaults(func=_cmd_test_connection)
    reseed = rsub.add_parser(
        "reseed",
        help="remove the replica and replicate the VM anew at its disks' current sizes "
        "(after a disk was resized)",
    )
    reseed.add_argument("--config", required=True)
    reseed.add_argument("vmid", help="the VM's VMID, or its name")
    reseed.add_argument("--yes", action="store_true", help="remove the replica's recovery points")
    reseed.add_argument("--timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    reseed.add_argument("--json", action="store_true", help="one JSON object: what was done")
    reseed.set_defaults(func=_cmd_reseed)
