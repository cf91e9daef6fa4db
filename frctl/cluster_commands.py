"""``frctl node run`` and ``frctl cluster ...``: a cluster node and the cluster's
administration, against the cluster store.

Every ``frctl cluster`` command names the store with ``--config node.toml`` (any node's
configuration) or ``--store URL [--prefix /frrep/]``; what it changes is applied by the
broker and the nodes, which watch the store. The changes themselves, and the rules for
when each may be asked, are ``broker/admin.py``'s: this module parses and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import trio

from .logs import LOG_FORMATS, setup_logging


def _target(args: argparse.Namespace) -> tuple[str, str]:
    """(store URL, key prefix) from ``--config`` or ``--store``/``--prefix``."""
    if args.config:
        from frcluster.config import load_cluster_node_config

        config = load_cluster_node_config(Path(args.config))
        return config.store_url, config.prefix
    if not args.store:
        raise SystemExit("frctl: give --config NODE.toml or --store URL")
    return args.store, args.prefix


def _run(args: argparse.Namespace, job: Any) -> int:
    """Run ``await job(store, keys)`` against the cluster store. The store's and the
    administration's errors are said by frctl's one handler (``frctl.errors``: a VM the
    cluster does not have exits 4)."""
    from broker.records import Keys
    from broker.store import open_store

    url, prefix = _target(args)

    async def main() -> int:
        async with open_store(url) as store:
            result: int = await job(store, Keys(prefix))
            return result

    try:
        return trio.run(main)
    except ValueError as exc:  # a value the operator gave (a setting, a label)
        print(f"frctl: {exc}", file=sys.stderr)
        return 1


def _who() -> str:
    """Who changes the cluster, as the audit log names a change made with frctl."""
    import getpass
    import socket

    return f"{getpass.getuser()}@{socket.gethostname()} (frctl)"


def _cmd_node_run(args: argparse.Namespace) -> int:
    from frcluster.agent import ClusterNode
    from frcluster.config import load_cluster_node_config
    from frlink.config import ConfigError

    from .daemon import run_daemon

    setup_logging(args.log_level, args.log_format)
    try:
        config = load_cluster_node_config(Path(args.config))
    except ConfigError as exc:
        print(f"frctl: {exc}", file=sys.stderr)
        return 1
    node = ClusterNode(config)
    trio.run(
        partial(
            run_daemon,
            node.run,
            registry=node.registry,
            ready=node.ready,
            metrics=config.metrics,
            cert=config.tls.cert,
        )
    )
    return 0


def _cmd_settings(args: argparse.Namespace) -> int:
    from broker import admin
    from broker.cluster_view import read_settings
    from broker.records import Keys, Settings
    from broker.store import ClusterStore

    async def job(store: ClusterStore, keys: Keys) -> int:
        if not args.assignments:
            settings = await read_settings(store, keys)
            if args.json:
                print(json.dumps(asdict(settings), indent=2))
            else:
                for name, value in asdict(settings).items():
                    print(f"{name} = {json.dumps(value)}")
            return 0
        updates = admin.parse_assignments(args.assignments)
        done = await admin.update_settings(store, keys, updates, by=_who())
        changes = (done.old or Settings()).changes(done.new)
        if args.json:
            print(
                json.dumps(
                    {
                        "action": "settings",
                        "changed": {n: {"old": o, "new": v} for n, (o, v) in changes.items()},
                    }
                )
            )
            return 0
        for name, (old, value) in changes.items():
            print(f"{name}: {json.dumps(old)} -> {json.dumps(value)}")
        return 0

    return _run(args, job)


def _cmd_nodes(args: argparse.Namespace) -> int:
    from broker.cluster_view import read_cluster
    from broker.election import current_holder
    from broker.records import Keys, NodeState
    from broker.store import ClusterStore

    async def job(store: ClusterStore, keys: Keys) -> int:
        view = await read_cluster(store, keys)
        holder = await current_holder(store, keys)
        names = sorted({*view.nodes, *view.admin, *(v.owner for v in view.vms.values())})
        rows = []
        for name in names:
            node = view.nodes.get(name)
            rows.append(
                {
                    "name": name,
                    "state": (node.state if node else NodeState.DOWN).value,
                    "address": node.record.address if node else "",
                    "port": node.record.port if node else 0,
                    "vms": len(view.owned_by(name)),
                    "broker": holder is not None and holder.holder == name,
                    "labels": view.admin[name].labels if name in view.admin else {},
                }
            )
        if args.json:
            from .timefmt import rfc3339

            broker = None
            if holder is not None:
                broker = {**asdict(holder), "elected_at": rfc3339(holder.elected_at)}
            print(json.dumps({"broker": broker, "nodes": rows}))
            return 0
        if holder is not None:
            print(
                f"broker: {holder.holder} at the CAP {holder.cap_name} "
                f"({holder.cap_address}:{holder.cap_port})"
            )
        else:
            print("broker: none elected")
        for r in rows:
            where = f"{r['address']}:{r['port']}" if r["port"] else "-"
            mark = "  (broker)" if r["broker"] else ""
            print(f"{r['name']:<28} {r['state']:<9} {where:<22} {r['vms']:>4} VMs{mark}")
        return 0

    return _run(args, job)


def _cmd_vms(args: argparse.Namespace) -> int:
    from broker.cluster_view import read_cluster
    from broker.records import FailoverState, Keys
    from broker.store import ClusterStore

    async def job(store: ClusterStore, keys: Keys) -> int:
        view = await read_cluster(store, keys)
        vms = sorted(view.vms.values(), key=lambda v: (v.owner, v.name, v.vmid))
        if args.json:
            print(json.dumps([asdict(v) for v in vms]))
            return 0
        for v in vms:
            extra = " DELETED" if v.deleted else (f" -> {v.migrate_to}" if v.migrate_to else "")
            if v.failover is FailoverState.PLANNED_REQUESTED:
                extra += " planned failover requested"
            elif v.failover is FailoverState.PLANNED_DECLINED:
                extra += f" planned failover declined ({v.failover_note})"
            elif v.failover:
                extra += f" failover {v.failover} (generation {v.failover_generation})"
            if v.reverse_to:
                extra += f" reverse -> {v.reverse_to}"
            print(f"{v.vmid}  {v.name:<16} {v.owner:<28} {v.trust_group:<12}{extra}")
        return 0

    return _run(args, job)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from broker import admin
    from broker.records import Keys
    from broker.store import ClusterStore

    async def job(store: ClusterStore, keys: Keys) -> int:
        vmid = await admin.find_vm(store, keys, args.vmid)
        await admin.request_migration(store, keys, vmid, args.node, by=_who())
        if args.json:
            print(json.dumps({"action": "migrate", "vmid": vmid, "to": args.node}))
        else:
            print(f"VM {vmid}: to move to {args.node} (its owner moves it)")
        return 0

    return _run(args, job)


def _cmd_failover(args: argparse.Namespace) -> int:
    from broker import admin
    from broker.records import FailoverState, Keys
    from broker.store import ClusterStore

    if args.planned:
        from .cluster_planned import cmd_planned_failover

        return cmd_planned_failover(args)
    if args.wait is None:
        args.wait = 60.0

    async def job(store: ClusterStore, keys: Keys) -> int:
        vmid = await admin.find_vm(store, keys, args.vmid)
        await admin.request_failover(store, keys, vmid, point=args.point, by=_who())
        point = "the latest recovery point" if args.point < 0 else f"recovery point {args.point}"
        if not args.json:
            print(f"VM {vmid}: failover to {point} asked of its node; waiting")
        # The owner carries it out (frcluster/failover.py) and records the outcome.
        vm = await admin.await_failover(store, keys, vmid, timeout=args.wait)
        done = vm.failover is FailoverState.DONE
        if args.json:
            print(
                json.dumps(
                    {
                        "vmid": vm.vmid,
                        "node": vm.owner,
                        "failover": vm.failover,
                        "sequence": vm.failover_point,
                        "generation": vm.failover_generation,
                        "note": vm.failover_note,
                    }
                )
            )
        elif done:
            print(
                f"failed over at {vm.owner}: recovery point {vm.failover_point}, generation "
                f"{vm.failover_generation}; the former primary is refused from now on"
                + (f" ({vm.failover_note})" if vm.failover_note else "")
            )
        else:
            print(f"frctl: failover refused at {vm.owner}: {vm.failover_note}", file=sys.stderr)
        return 0 if done else 1

    return _run(args, job)


def _cmd_reverse(args: argparse.Namespace) -> int:
    from broker import admin
    from broker.records import Keys
    from broker.store import ClusterStore

    host, _, port = args.to.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        print(f"frctl: --to {args.to!r}: use HOST:PORT", file=sys.stderr)
        return 2
    name = args.to_name or host

    async def job(store: ClusterStore, keys: Keys) -> int:
        vmid = await admin.find_vm(store, keys, args.vmid)
        await admin.request_reverse(store, keys, vmid, to=args.to, name=name, by=_who())
        if args.json:
            print(json.dumps({"action": "reverse", "vmid": vmid, "to": args.to, "name": name}))
        else:
            print(
                f"VM {vmid}: its node replicates it back to {args.to} ({name}), differences first"
            )
        return 0

    return _run(args, job)


def _cmd_delete(args: argparse.Namespace) -> int:
    from broker import admin
    from broker.records import Keys
    from broker.store import ClusterStore

    async def job(store: ClusterStore, keys: Keys) -> int:
        vmid = await admin.find_vm(store, keys, args.vmid)
        await admin.delete_vm(store, keys, vmid, by=_who())
        if args.json:
            print(json.dumps({"action": "delete", "vmid": vmid}))
        else:
            print(f"VM {vmid}: deleted (its primary is told so and stops)")
        return 0

    return _run(args, job)


def _cmd_drain(args: argparse.Namespace) -> int:
    from broker import admin
    from broker.records import Keys
    from broker.store import ClusterStore

    async def job(store: ClusterStore, keys: Keys) -> int:
        await admin.set_draining(store, keys, args.node, draining=not args.undo, by=_who())
        if args.json:
            print(json.dumps({"action": "drain", "node": args.node, "draining": not args.undo}))
            return 0
        what = "no longer draining" if args.undo else "draining: its replicas move away"
        print(f"{args.node}: {what}")
        return 0

    return _run(args, job)


def _cmd_label(args: argparse.Namespace) -> int:
    from broker import admin
    from broker.records import Keys
    from broker.store import ClusterStore

    async def job(store: ClusterStore, keys: Keys) -> int:
        changes: dict[str, str | None] = {}
        for item in args.labels:
            name, sep, value = item.partition("=")
            changes[name] = value if sep else None  # NAME alone: remove it
        done = await admin.set_labels(store, keys, args.node, changes, by=_who())
        if args.json:
            print(json.dumps({"action": "label", "node": args.node, "labels": done.new.labels}))
        else:
            print(f"{args.node}: labels {json.dumps(done.new.labels)}")
        return 0

    return _run(args, job)


def _read_password() -> str:
    """The new password: asked twice at a terminal, else the first line of stdin (never
    from the command line, where other users would see it in the process list)."""
    import getpass

    if sys.stdin.isatty():
        first = getpass.getpass("New console password: ")
        if getpass.getpass("Again: ") != first:
            raise ValueError("the two passwords differ; nothing was changed")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def _cmd_admin_password(args: argparse.Namespace) -> int:
    from broker import admin
    from broker.records import Keys
    from broker.store import ClusterStore

    try:
        password = _read_password()
    except (ValueError, EOFError, KeyboardInterrupt) as exc:
        print(f"frctl: {exc or 'no password given'}", file=sys.stderr)
        return 1
    by = _who()

    async def job(store: ClusterStore, keys: Keys) -> int:
        await admin.set_console_password(store, keys, args.user, password, by=by)
        if args.json:
            print(json.dumps({"user": args.user, "changed": True}))
        else:
            print(f"console administrator {args.user}: password set (every session logged out)")
        return 0

    return _run(args, job)


def _cmd_import(args: argparse.Namespace) -> int:
    from frcluster.config import load_cluster_node_config
    from frcluster.oob_import import import_through_cluster
    from frlink.config import ConfigError
    from node.oob_file import OOBError

    try:
        config = load_cluster_node_config(Path(args.config))
        result = trio.run(import_through_cluster, config, Path(args.file))
    except (ConfigError, OOBError, OSError) as exc:
        print(f"frctl: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # frproto and store errors: the owner refused, the file lied
        print(f"frctl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(
            f"imported {args.file}: IR of {result.vmid} completed by {result.node} "
            f"({result.data_bytes} data bytes, {result.zero_bytes} zero, {result.chunks} chunks, "
            f"{result.seconds:.2f} s)"
        )
    return 0


def register(sub: Any) -> None:
    """Add ``node`` and ``cluster`` to frctl's subcommands."""
    node = sub.add_parser("node", help="a recovery node of a cluster")
    nsub = node.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    run = nsub.add_parser("run", help="run the node agent (and the broker when elected)")
    run.add_argument("--config", required=True, help="the node's configuration (TOML)")
    run.add_argument("--log-level", default="INFO")
    run.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text, or json: one object per line",
    )
    run.set_defaults(func=_cmd_node_run)

    cluster = sub.add_parser("cluster", help="administer a cluster through its store")
    csub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")

    from .cluster_failover_endings import register as register_failover_endings

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="any node's configuration (names the store)")
        p.add_argument("--store", help="the store URL (sqlite:///... or etcd://...)")
        p.add_argument("--prefix", default="/frrep/", help="the cluster's key prefix")

    settings = csub.add_parser("settings", help="show, or set NAME=VALUE ... (JSON values)")
    common(settings)
    settings.add_argument("assignments", nargs="*", metavar="NAME=VALUE")
    settings.add_argument("--json", action="store_true")
    settings.set_defaults(func=_cmd_settings)

    nodes = csub.add_parser("nodes", help="the nodes, their state and the broker")
    common(nodes)
    nodes.add_argument("--json", action="store_true")
    nodes.set_defaults(func=_cmd_nodes)

    vms = csub.add_parser("vms", help="the replica VMs and their owners")
    common(vms)
    vms.add_argument("--json", action="store_true")
    vms.set_defaults(func=_cmd_vms)

    migrate = csub.add_parser("migrate", help="move a replica to another node")
    common(migrate)
    migrate.add_argument("vmid", help="the VM's VMID, or its name")
    migrate.add_argument("node")
    migrate.add_argument("--json", action="store_true", help="one JSON object: what was done")
    migrate.set_defaults(func=_cmd_migrate)

    drain = csub.add_parser("drain", help="move a node's replicas away, place nothing on it")
    common(drain)
    drain.add_argument("node")
    drain.add_argument("--undo", action="store_true", help="stop draining")
    drain.add_argument("--json", action="store_true", help="one JSON object: what was done")
    drain.set_defaults(func=_cmd_drain)

    label = csub.add_parser("label", help="set NAME=VALUE (or remove NAME) labels on a node")
    common(label)
    label.add_argument("node")
    label.add_argument("labels", nargs="+")
    label.add_argument("--json", action="store_true", help="one JSON object: what was done")
    label.set_defaults(func=_cmd_label)

    password = csub.add_parser(
        "admin-password",
        help="set the web console's administrator password (read from stdin or a prompt)",
    )
    common(password)
    password.add_argument("--user", default="admin", help="the administrator's user name")
    password.add_argument("--json", action="store_true")
    password.set_defaults(func=_cmd_admin_password)

    imp = csub.add_parser(
        "import", help="out-of-band IR: send an export file to the node that owns its VM"
    )
    imp.add_argument("--config", required=True, help="this node's configuration (TOML)")
    imp.add_argument("file", help="the file made by 'frctl ir export' at the primary")
    imp.add_argument("--json", action="store_true")
    imp.set_defaults(func=_cmd_import)

    failover = csub.add_parser(
        "failover",
        help="failover: the VM's node starts it from its replica (unplanned), or its "
        "primary hands it over (--planned)",
    )
    common(failover)
    failover.add_argument("vmid", help="the VM's VMID, or its name")
    failover.add_argument(
        "--point", type=int, default=-1, help="a kept recovery point (default: the latest)"
    )
    failover.add_argument(
        "--planned",
        action="store_true",
        help="planned: the VM's primary is asked on its next connection to stop the VM and "
        "hand it over, nothing lost (protocol 1.1; see docs/failover.md)",
    )
    failover.add_argument(
        "--wait",
        type=float,
        default=None,
        help="seconds to wait for it (default 60; 120 with --planned, after which the ask "
        "is withdrawn)",
    )
    failover.add_argument("--json", action="store_true")
    failover.set_defaults(func=_cmd_failover)
    register_failover_endings(csub, common)

    reverse = csub.add_parser(
        "reverse", help="after a failover: the VM's node replicates it back to a server"
    )
    common(reverse)
    reverse.add_argument("vmid", help="the VM's VMID, or its name")
    reverse.add_argument("--to", required=True, metavar="HOST:PORT", help="the recovery server")
    reverse.add_argument("--to-name", help="its TLS name (default: HOST)")
    reverse.add_argument("--json", action="store_true", help="one JSON object: what was done")
    reverse.set_defaults(func=_cmd_reverse)

    delete = csub.add_parser("delete", help="delete a replica VM (its primary stops)")
    common(delete)
    delete.add_argument("vmid", help="the VM's VMID, or its name")
    delete.add_argument("--json", action="store_true", help="one JSON object: what was done")
    delete.set_defaults(func=_cmd_delete)
