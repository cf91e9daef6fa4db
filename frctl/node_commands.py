"""frctl subcommands of the primary: ``primary run`` and ``replication`` (a thin shell over
``node.primary.operations`` and the replicator)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

from .logs import LOG_FORMATS, setup_logging


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


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


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

    setup_logging(args.log_level, args.log_format)
    config = _primary_config(args)
    registry = CollectorRegistry()
    metrics = PrimaryMetrics(registry, PrimaryStateStore(config.state_dir))
    try:
        trio.run(
            partial(
                run_daemon,
                partial(run_primary, config, metrics=metrics, failover_ask=_failover_ask(config)),
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


def _failover_ask(config: Any) -> Any:
    """How the primary service carries out a planned failover asked at the recovery side
    (``[failover]``; node/failover/asked.py); None without a stop hook (asks declined).

    Raises:
        ConfigError: ``[failover] server_config`` cannot be read.
    """
    from node.config import load_recovery_server_config
    from node.failover.asked import AskedFailover

    if not config.failover_stop_command:
        return None
    server = None
    if config.failover_server_config is not None:
        server = load_recovery_server_config(config.failover_server_config)
    return AskedFailover(
        config.failover_stop_command,
        authorization=None if server is None else server.authorization,
        reverse_port=0 if server is None else (config.failover_reverse_port or server.port),
    )


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
        qemu_qmp=args.qemu_qmp,
        qemu_disks=args.qemu_disk or (),
        qemu_nbd=args.qemu_nbd,
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
    in_doubt = not paused and state.failover_in_doubt is not None
    state, halted = set_paused(store, state, paused)
    if halted:
        print(f"replication/{state.name} was halted: {halted}", file=sys.stderr)
    if in_doubt:
        print(
            f"replication/{state.name}: the planned failover in doubt is given up by your "
            "decision (the recovery side did not take the VM over); replication goes on",
            file=sys.stderr,
        )
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


#: ``status --check``: a VM in warning (none critical), a VM critical. Above the codes
#: every command shares (1 failure, 2 usage, 3 not in sync, 4 not found), ordered by
#: severity so that the worst of several hosts is the largest code.
EXIT_WARNING = 5
EXIT_CRITICAL = 6
#: How long ``wait`` lets "primary service not running" be (a service just started
#: writes its first heartbeat within a second or two).
_SERVICE_GRACE = 10.0


def _cmd_wait(args: argparse.Namespace) -> int:
    """Show progress until the VM's IR is complete and nothing is pending: exit 0; 3 when
    time runs out; 6 when its replication is critical for a reason that needs a person
    (halted, a disk unavailable, the primary service not running)."""
    from node.primary.operations import replication_status
    from node.primary.status import ReplicationState, Severity, Why

    store = _store(args)
    state = _vm_or_say_why(store, args.vmid)
    if state is None:
        return 4
    vmid = state.vmid
    started = time.monotonic()
    deadline = started + args.timeout
    tty = sys.stderr.isatty()
    shown = -1.0
    while True:
        report = replication_status(store.root, store=store)
        vm = next((v for v in report.vms if v.vmid == vmid), None)
        if vm is None:
            print(f"frctl: replication/{state.name} was disabled meanwhile", file=sys.stderr)
            return 4
        percent = vm.ir_percent
        late = time.monotonic() - started > args.service_grace
        stuck = [
            r
            for r in vm.reasons
            if r.code in (Why.HALTED, Why.DISK_UNAVAILABLE)
            or (r.code is Why.SERVICE_NOT_RUNNING and late)
        ]
        done = (
            vm.state in (ReplicationState.REPLICATING, ReplicationState.PAUSED)
            and vm.pending_bytes == 0
            and vm.health is not Severity.CRITICAL
        )
        if args.json:
            line = {
                "message_type": "status",
                "vmid": vmid,
                "state": vm.state.value,
                "health": vm.health.value,
                "reasons": [r.text for r in vm.reasons],
                "ir_percent": percent,
                "sequence": vm.sequence,
                "pending_bytes": vm.pending_bytes,
            }
            print(json.dumps(line), flush=True)
        elif tty or percent - shown >= 10 or done:
            bar = "#" * int(percent // 5)
            end = "\r" if tty and not done else "\n"
            print(
                f"{vm.name}: IR [{bar:<20}] {percent:5.1f}%  sequence {vm.sequence}"
                f"  pending {vm.pending_bytes} B",
                end=end,
                file=sys.stderr,
                flush=True,
            )
            shown = percent
        if done:
            print(f"replication/{vm.name} in sync at sequence {vm.sequence}")
            return 0
        if stuck or time.monotonic() > deadline:
            if tty and not args.json:
                print(file=sys.stderr)
            why = vm.health_text if stuck else f"{vm.state.value}, {vm.health_text}"
            print(f"frctl: replication/{vm.name} not in sync: {why}", file=sys.stderr)
            return EXIT_CRITICAL if stuck else 3
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


def _status_document(store: Any) -> tuple[Any, dict[str, Any]]:
    """The judged report (``node.primary.operations.replication_status``) and its JSON,
    each VM with its target (recovery server, broker, node) added."""
    from node.primary.operations import replication_status

    states = {s.vmid: s for s in store.all()}
    report = replication_status(store.root, store=store)
    doc = report.to_json()
    for row in doc["vms"]:
        state = states.get(row["vmid"])
        if state is None:
            continue
        broker, node, server = _target(state)
        row["ir"] = state.ir_state.value
        row["recovery_server"] = f"{state.recovery_host}:{state.recovery_port}"
        row["broker"] = broker  # through a clustering broker: which one
        row["recovery_node"] = node  # and the node holding the replica now
        row["server"] = server
        # Where changes come from: QEMU's dirty bitmaps (docs/qemu.md), else the files.
        row["change_source"] = "qemu" if state.qemu is not None else "files"
        row["qemu_qmp"] = None if state.qemu is None else state.qemu["qmp"]
        row["qemu_bitmap"] = state.qemu_bitmap
    return report, doc


def _paint(health: str, text: str) -> str:
    """``text`` in the colour of ``health`` on a terminal (never with NO_COLOR or a dumb
    terminal): the word carries the meaning, the colour only repeats it."""
    if not sys.stdout.isatty() or os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return text
    colour = {"normal": "32", "warning": "33", "critical": "31"}.get(health)
    return f"\x1b[{colour}m{text}\x1b[0m" if colour else text


def _status_table(report: Any, doc: dict[str, Any]) -> str:
    """The roll-up line, one row per VM, and below a VM not normal its reasons."""
    from node.primary.status import duration, rfc3339, size

    lines = [
        report.summary,
        f"{'VM':<16} {'STATE':<19} {'HEALTH':<8} {'IR':>4} {'SEQ':>5} {'LAG':>7} "
        f"{'LAST ACK (UTC)':<20} {'NEXT':>6} {'PENDING':>9} {'CYCLES OK/FAIL':>14} "
        f"{'BATCH AVG/MAX':>17}  SERVER",
    ]
    servers = {row["vmid"]: row.get("server", "") for row in doc["vms"]}
    rows = {row["vmid"]: row for row in doc["vms"]}
    for vm in report.vms:
        lag = "-" if vm.lag_seconds is None else duration(vm.lag_seconds)
        ack = rfc3339(vm.last_acknowledged_at) or "-"
        if vm.next_cycle_at is None or vm.state.value in (
            "paused",
            "halted",
            "failed over",
            "failover in doubt",
        ):
            nxt = "-"
        else:
            ahead = vm.next_cycle_at - report.at
            nxt = duration(ahead) if ahead > 0 else "due"
        c = vm.counters
        cycles = f"{c.cycles_ok}/{c.cycles_failed}"
        batches = f"{size(c.average_batch_bytes)}/{size(c.max_batch_bytes)}"
        lines.append(
            f"{vm.name:<16} {vm.state.value:<19} "
            + _paint(vm.health.value, f"{vm.health.value:<8}")
            + f" {vm.ir_percent:>3.0f}% {vm.sequence:>5} {lag:>7} {ack:<20} {nxt:>6} "
            f"{size(vm.pending_bytes):>9} {cycles:>14} {batches:>17}  {servers[vm.vmid]}"
        )
        if vm.reasons:
            lines.append(f"{'':<16} " + _paint(vm.health.value, vm.health_text))
        if vm.direction == "reverse":
            lines.append(
                f"{'':<16} reverse replication: the VM failed over to this host, which "
                f"replicates it back (generation {vm.generation})"
            )
        row = rows.get(vm.vmid, {})
        if row.get("change_source") == "qemu":
            bitmap = row.get("qemu_bitmap") or "not checked yet"
            lines.append(f"{'':<16} change source: QEMU at {row['qemu_qmp']}, bitmap {bitmap}")
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    """Every VM's health with its reasons, judged now; ``--check`` exits by the worst
    (0 normal, 5 warning, 6 critical); ``--watch`` redraws until Ctrl-C."""
    from node.primary.status import Severity

    store = _store(args)
    if args.watch is not None:
        return _watch(store, args)
    report, doc = _status_document(store)
    print(json.dumps(doc, indent=2) if args.json else _status_table(report, doc))
    if args.check:
        return {Severity.NORMAL: 0, Severity.WARNING: EXIT_WARNING}.get(
            report.health, EXIT_CRITICAL
        )
    return 0


def _watch(store: Any, args: argparse.Namespace) -> int:
    """Redraw the status every ``args.watch`` seconds until Ctrl-C (exit 0). On a
    terminal the screen is cleared and drawn again in place; into a pipe each view
    follows the last (``--json``: one object per line)."""
    tty = sys.stdout.isatty()
    try:
        while True:
            report, doc = _status_document(store)
            if args.json:
                print(json.dumps(doc), flush=True)
            else:
                clear = "\x1b[H\x1b[2J" if tty else ""
                frame = _status_table(report, doc)
                print(f"{clear}{frame}\n(every {args.watch:g}s; Ctrl-C to stop)\n", flush=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:
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
    prun.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text, or json: one object per line",
    )
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
    enable.add_argument(
        "--qemu-qmp",
        metavar="SOCKET",
        help="QEMU's QMP socket: QEMU is the change source (dirty bitmaps, a point in time "
        "per cycle without pausing the guest; docs/qemu.md)",
    )
    enable.add_argument(
        "--qemu-disk",
        action="append",
        metavar="ID=NODE",
        help="the QEMU block node of disk ID (default: a node named like the disk ID)",
    )
    enable.add_argument(
        "--qemu-nbd",
        metavar="SOCKET",
        help="the UNIX socket of an NBD server QEMU already runs (default: frrep starts "
        "one per cycle)",
    )
    enable.add_argument("--json", action="store_true", help="one JSON object: what was done")
    enable.set_defaults(func=_cmd_enable)
    status = rsub.add_parser(
        "status",
        help="every VM's health with its reasons, lag, next cycle and counters, judged now",
    )
    status.add_argument("--config", required=True)
    status.add_argument("--json", action="store_true", help="one JSON object (RFC 3339 UTC times)")
    shown = status.add_mutually_exclusive_group()
    shown.add_argument(
        "--check",
        action="store_true",
        help=f"exit 0 if every VM is normal, {EXIT_WARNING} if one is in warning, "
        f"{EXIT_CRITICAL} if one is critical",
    )
    shown.add_argument(
        "--watch",
        type=_positive_seconds,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="redraw every SECONDS (default 2) until Ctrl-C",
    )
    status.set_defaults(func=_cmd_status)
    wait = rsub.add_parser(
        "wait", help="show IR progress until the VM is in sync (exit 3: time ran out; 6: critical)"
    )
    wait.add_argument("--config", required=True)
    wait.add_argument("vmid", help="the VM's VMID, or its name")
    wait.add_argument("--timeout", type=float, default=3600.0, help="seconds (exit 3 after)")
    wait.add_argument("--interval", type=float, default=0.5, help=argparse.SUPPRESS)
    wait.add_argument("--json", action="store_true", help="JSON lines, one per poll")
    wait.add_argument("--service-grace", type=float, default=_SERVICE_GRACE, help=argparse.SUPPRESS)
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
