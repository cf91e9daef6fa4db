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
    from frlink.config import parse_rate

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
    from node.primary.config import load_primary_config

    return load_primary_config(Path(args.config))


def _cmd_primary_run(args: argparse.Namespace) -> int:
    from node.primary.locks import ServiceAlreadyRunning
    from node.primary.service import run_primary

    _logging(args.log_level)
    try:
        trio.run(run_primary, _primary_config(args))
    except ServiceAlreadyRunning as exc:
        print(f"frctl: {exc}", file=sys.stderr)
        return 1
    return 0


def _store(args: argparse.Namespace) -> Any:
    from node.primary.state import PrimaryStateStore

    return PrimaryStateStore(_primary_config(args).state_dir)


class _Refused(Exception):
    """A command refused its arguments; the message says why (exit 1)."""


def _new_disks(specs: list[str]) -> list[dict[str, Any]]:
    """``ID=PATH`` specs as state disks: every image an existing regular file."""
    from node.primary.disks import DiskUnavailable, image_size

    disks = []
    for spec in specs:
        disk_id, _, path = spec.partition("=")
        if not disk_id or not path:
            raise _Refused(f"--disk {spec!r}: use ID=PATH to an existing image")
        image = Path(path).resolve()
        try:
            size = image_size(disk_id, image)
        except DiskUnavailable as exc:
            raise _Refused(f"--disk {exc}; use ID=PATH to an existing image") from None
        if size == 0:
            raise _Refused(f"--disk {spec!r}: the image {image} is empty")
        disks.append({"disk_id": disk_id, "path": str(image), "size": size})
    return disks


def _check_like_the_protocol(vmid: uuid.UUID, name: str, disks: list[dict[str, Any]]) -> None:
    """Refuse what every cycle would refuse, with the protocol layer's own words: the
    RelationshipCreate the first cycle sends is built (and so checked) here."""
    import frproto as fp

    try:
        fp.RelationshipCreate(
            vmid, name, tuple(fp.DiskInfo(d["disk_id"], int(d["size"])) for d in disks)
        )
    except fp.FrprotoError as exc:
        cause = exc.__cause__
        raise _Refused(
            cause.message if isinstance(cause, fp.FrprotoError) else exc.message
        ) from None


def _cmd_enable(args: argparse.Namespace) -> int:
    import frproto as fp
    from node.primary.state import VMReplicationState

    store = _store(args)
    try:
        try:
            vmid = uuid.UUID(args.vmid)
        except ValueError:
            raise _Refused(f"--vmid {args.vmid!r} is not a GUID") from None
        disks = _new_disks(args.disk)
        _check_like_the_protocol(vmid, args.name, disks)
        host, _, port = args.server.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise _Refused(f"--server {args.server!r}: use HOST:PORT (port 1-65535)")
        server_name = args.server_name or host
        try:
            fp.QueryRecoveryServerResponse(vmid, server_name, int(port), fp.ExistingVM.NEW)
        except fp.FrprotoError as exc:
            raise _Refused(f"--server-name {server_name!r}: not a server name ({exc})") from None
        if store.exists(str(vmid)):
            held = store.load(str(vmid))
            raise _Refused(
                f"VM {vmid} is already enabled (replication/{held.name}, {held.ir_state}, "
                f"sequence {held.sequence}); enabling it again would start its relationship "
                f"over. Change its settings with `frctl replication set`, or disable it first"
            )
        for other in store.all():
            shared = {d["path"] for d in other.disks} & {d["path"] for d in disks}
            if shared:
                raise _Refused(
                    f"{sorted(shared)[0]} is already a disk of replication/{other.name} "
                    f"({other.vmid})"
                )
        state = VMReplicationState(
            vmid=str(vmid),
            name=args.name,
            disks=disks,
            block_size=args.block_size,
            recovery_host=host,
            recovery_port=int(port),
            server_name=server_name,
            frequency_s=args.frequency,
            bandwidth_bps=args.bandwidth,
            incarnation=uuid.uuid4().hex,
        )
        try:
            state.validate()
        except ValueError as exc:
            raise _Refused(str(exc)) from None
    except _Refused as exc:
        print(f"frctl: enable: {exc}", file=sys.stderr)
        return 1
    store.save(state)
    print(f"replication/{args.name} enabled")
    return 0


def _find_vm(store: Any, text: str) -> Any:
    """The state of the VM named by ``text``: its VMID, or its name when one VM has it.

    Raises:
        LookupError: no such VM, or a name several VMs share (the message says which).
    """
    try:
        vmid = str(uuid.UUID(text))
    except ValueError:
        named = [s for s in store.all() if s.name == text]
        if len(named) == 1:
            return named[0]
        if named:
            raise LookupError(
                f"{len(named)} VMs are named {text!r}; give the VMID "
                f"({', '.join(s.vmid for s in named)})"
            ) from None
        raise LookupError(f"no VM {text!r} is enabled for replication here") from None
    try:
        return store.load(vmid)
    except FileNotFoundError:
        raise LookupError(f"VM {vmid} is not enabled for replication here") from None


def _vm_or_say_why(store: Any, text: str) -> Any:
    """:func:`_find_vm`, or None after saying on stderr why there is no such VM (exit 4)."""
    try:
        return _find_vm(store, text)
    except LookupError as exc:
        print(f"frctl: {exc}", file=sys.stderr)
        return None


def _wait_for_cycle(store: Any, state: Any, timeout: float, doing: str) -> bool:
    """Wait until no cycle of the VM runs (its cycle lock is free), up to ``timeout``
    seconds; False when one still runs."""
    from node.primary.locks import LockBusy, cycle_lock

    lock = cycle_lock(store.root, state.vmid)
    if lock.try_acquire():
        lock.release()
        return True
    print(
        f"replication/{state.name}: {doing}: waiting for the running cycle to end", file=sys.stderr
    )
    try:
        lock.acquire(timeout)
    except LockBusy:
        return False
    lock.release()
    return True


def _set_paused(args: argparse.Namespace, paused: bool) -> int:
    store = _store(args)
    state = _vm_or_say_why(store, args.vmid)
    if state is None:
        return 4
    halted: list[str] = []

    def change(st: Any) -> None:
        st.paused = paused
        if not paused and st.halted is not None:
            # A person looked at why it halted: the running service tries again. A replica
            # deleted in the cluster halts again (only disable + enable seeds a new one).
            halted.append(st.halted)
            st.halted = None

    state = store.update(state.vmid, change)
    if halted:
        print(f"replication/{state.name} was halted: {halted[0]}", file=sys.stderr)
    if paused and not _wait_for_cycle(store, state, args.timeout, "pause"):
        # The pause is recorded and no new cycle starts, but the disks may still be read.
        print(
            f"frctl: replication/{state.name}: the pause is recorded, but a cycle still runs "
            f"after {args.timeout:.0f} s; no other will start after it (run pause again to wait)",
            file=sys.stderr,
        )
        return 3
    print(f"replication/{state.name} {'paused' if paused else 'resumed'}")
    return 0


def _cmd_set(args: argparse.Namespace) -> int:
    """Change an enabled VM's frequency or bandwidth limit (the service sees it next turn)."""
    store = _store(args)
    if args.frequency is None and args.bandwidth is None and not args.no_bandwidth_limit:
        print("frctl: set: give --frequency, --bandwidth or --no-bandwidth-limit", file=sys.stderr)
        return 1
    state = _vm_or_say_why(store, args.vmid)
    if state is None:
        return 4

    def change(st: Any) -> None:
        if args.frequency is not None:
            st.frequency_s = args.frequency
        if args.bandwidth is not None:
            st.bandwidth_bps = args.bandwidth
        if args.no_bandwidth_limit:
            st.bandwidth_bps = None

    state = store.update(state.vmid, change)
    limit = "none" if state.bandwidth_bps is None else f"{state.bandwidth_bps:.0f} B/s"
    print(f"replication/{state.name}: frequency {state.frequency_s:g} s, bandwidth limit {limit}")
    return 0


def _cmd_disable(args: argparse.Namespace) -> int:
    from node.primary.locks import LockBusy, cycle_lock, holding

    store = _store(args)
    state = _vm_or_say_why(store, args.vmid)
    if state is None:
        return 4
    # Paused first, so that no new cycle starts; then the running one (if any) is waited
    # for, and the files are removed while no cycle can write them.
    store.update(state.vmid, lambda st: setattr(st, "paused", True))
    _wait_for_cycle(store, state, args.timeout, "disable")
    try:
        with holding(cycle_lock(store.root, state.vmid), timeout=0):
            store.delete(state.vmid)
    except LockBusy:
        print(
            f"frctl: replication/{state.name}: a cycle still runs after {args.timeout:.0f} s; "
            f"it is paused now, not disabled (run disable again)",
            file=sys.stderr,
        )
        return 3
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
    replicator = _replicator(args, state.vmid)
    try:
        fresh = trio.run(replicator.reseed)
    except (DiskProblem, fp.FrprotoError, OSError) as exc:
        print(f"frctl: reseed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.update(state.vmid, lambda st: setattr(st, "paused", was_paused))
    sizes = ", ".join(f"{d['disk_id']} {d['size']} bytes" for d in fresh.disks)
    print(f"replication/{state.name} seeded anew ({sizes}): initial replication next")
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
        from frcluster.config import load_cluster_node_config

        root = load_cluster_node_config(path).storage
        return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    config = load_recovery_server_config(path)
    places = {e.storage for e in config.authorization.entries}
    if config.authorization.any_primary is not None:
        places.add(config.authorization.any_primary.storage)
    return sorted(places)


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _replicator(args: argparse.Namespace, vmid: str | None = None) -> Any:
    """A VMReplicator for one enabled VM, configured as the primary service would."""
    from frlink.tls import client_context
    from node.primary.replicator import VMReplicator
    from node.primary.state import PrimaryStateStore

    config = _primary_config(args)
    store = PrimaryStateStore(config.state_dir)
    state = store.load(vmid or str(uuid.UUID(args.vmid)))
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
        action.set_defaults(func=func)
    set_ = rsub.add_parser("set", help="change a VM's frequency or bandwidth limit")
    set_.add_argument("--config", required=True)
    set_.add_argument("vmid", help="the VM's VMID, or its name")
    set_.add_argument("--frequency", type=parse_frequency, help="30s, 5m, 15m...")
    set_.add_argument("--bandwidth", type=_rate, help="limit of this VM, bytes/s (200M, 1.5G)")
    set_.add_argument("--no-bandwidth-limit", action="store_true")
    set_.set_defaults(func=_cmd_set)
    reseed = rsub.add_parser(
        "reseed",
        help="remove the replica and replicate the VM anew at its disks' current sizes "
        "(after a disk was resized)",
    )
    reseed.add_argument("--config", required=True)
    reseed.add_argument("vmid", help="the VM's VMID, or its name")
    reseed.add_argument("--yes", action="store_true", help="remove the replica's recovery points")
    reseed.add_argument("--timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    reseed.set_defaults(func=_cmd_reseed)
