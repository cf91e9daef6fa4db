"""``frctl node run`` and ``frctl cluster ...``: a cluster node and the cluster's
administration, against the cluster store.

Every ``frctl cluster`` command names the store with ``--config node.toml`` (any node's
configuration) or ``--store URL [--prefix /frrep/]``; what it changes is applied by the
broker and the nodes, which watch the store.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import trio

from .node_commands import _logging


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
    """Run ``await job(store, keys)`` against the cluster store; print errors plainly."""
    from broker.records import Keys, RecordError
    from broker.store import StoreError, open_store

    url, prefix = _target(args)

    async def main() -> int:
        async with open_store(url) as store:
            result: int = await job(store, Keys(prefix))
            return result

    try:
        return trio.run(main)
    except (StoreError, RecordError, ValueError) as exc:
        print(f"frctl: {exc}", file=sys.stderr)
        return 1


def _cmd_node_run(args: argparse.Namespace) -> int:
    from frcluster.agent import ClusterNode
    from frcluster.config import load_cluster_node_config
    from frlink.config import ConfigError

    _logging(args.log_level)
    try:
        config = load_cluster_node_config(Path(args.config))
    except ConfigError as exc:
        print(f"frctl: {exc}", file=sys.stderr)
        return 1
    trio.run(ClusterNode(config).run)
    return 0


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # a bare word: a string


def _cmd_settings(args: argparse.Namespace) -> int:
    from broker.authorization import authorization_from_settings
    from broker.cluster_view import read_settings
    from broker.placement import PlacementError, load_rules
    from broker.records import Keys, Settings
    from broker.store import ClusterStore, Compare, Put

    async def job(store: ClusterStore, keys: Keys) -> int:
        if not args.assignments:
            settings = await read_settings(store, keys)
            if args.json:
                print(json.dumps(asdict(settings), indent=2))
            else:
                for name, value in asdict(settings).items():
                    print(f"{name} = {json.dumps(value)}")
            return 0
        for _ in range(10):
            kv = await store.get(keys.settings)
            current = Settings() if kv is None else Settings.from_json(kv.value)
            updates: dict[str, Any] = {}
            for item in args.assignments:
                name, sep, raw = item.partition("=")
                if not sep or name not in Settings.__dataclass_fields__:
                    known = ", ".join(Settings.__dataclass_fields__)
                    print(
                        f"frctl: {item!r}: expected NAME=VALUE, NAME one of {known}",
                        file=sys.stderr,
                    )
                    return 1
                updates[name] = _parse_value(raw)
            new = Settings.from_json(json.dumps({**asdict(current), **updates}))
            # What a node would refuse to apply is refused here, before anything is written.
            authorization_from_settings(new.authorization, Path("/"), new.default_storage)
            try:
                load_rules(new.placement_rules)
            except PlacementError as exc:
                print(f"frctl: {exc}", file=sys.stderr)
                return 1
            revision = 0 if kv is None else kv.mod_revision
            result = await store.txn(
                [Compare.mod_revision(keys.settings, "==", revision)],
                [Put(keys.settings, new.to_json())],
                [],
            )
            if result.succeeded:
                for name, (old, value) in current.changes(new).items():
                    print(f"{name}: {json.dumps(old)} -> {json.dumps(value)}")
                return 0
        print("frctl: the settings kept changing; try again", file=sys.stderr)
        return 1

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
            print(json.dumps({"broker": asdict(holder) if holder else None, "nodes": rows}))
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
    from broker.records import Keys
    from broker.store import ClusterStore

    async def job(store: ClusterStore, keys: Keys) -> int:
        view = await read_cluster(store, keys)
        vms = sorted(view.vms.values(), key=lambda v: (v.owner, v.name, v.vmid))
        if args.json:
            print(json.dumps([asdict(v) for v in vms]))
            return 0
        for v in vms:
            extra = " DELETED" if v.deleted else (f" -> {v.migrate_to}" if v.migrate_to else "")
            print(f"{v.vmid}  {v.name:<16} {v.owner:<28} {v.trust_group:<12}{extra}")
        return 0

    return _run(args, job)


async def _update_vm(store: Any, keys: Any, vmid: str, change: Any) -> int:
    from broker.records import VMRecord
    from broker.store import Compare, Put

    uuid.UUID(vmid)
    for _ in range(10):
        kv = await store.get(keys.vm(vmid))
        if kv is None:
            print(f"frctl: the cluster has no VM {vmid}", file=sys.stderr)
            return 1
        vm = VMRecord.from_json(kv.value)
        new = change(vm)
        result = await store.txn(
            [Compare.mod_revision(keys.vm(vmid), "==", kv.mod_revision)],
            [Put(keys.vm(vmid), new.to_json())],
            [],
        )
        if result.succeeded:
            return 0
    print("frctl: the VM's record kept changing; try again", file=sys.stderr)
    return 1


def _cmd_migrate(args: argparse.Namespace) -> int:
    from broker.records import FailoverState, Keys, VMRecord
    from broker.store import ClusterStore

    def request(vm: VMRecord) -> VMRecord:
        if vm.failover is not FailoverState.NONE:
            # It runs (or is about to run) from its replica where it is.
            raise ValueError(f"VM {vm.vmid} was failed over ({vm.failover}): it does not move")
        return replace(vm, migrate_to=args.node)

    async def job(store: ClusterStore, keys: Keys) -> int:
        uuid.UUID(args.vmid)  # a typo is reported as such, before anything else
        if await store.get(keys.node(args.node)) is None:
            print(f"frctl: node {args.node} is not up", file=sys.stderr)
            return 1
        kv = await store.get(keys.vm(args.vmid))
        if kv is not None and VMRecord.from_json(kv.value).owner == args.node:
            print(f"frctl: VM {args.vmid} is already on {args.node}", file=sys.stderr)
            return 1
        rc = await _update_vm(store, keys, args.vmid, request)
        if rc == 0:
            print(f"VM {args.vmid}: to move to {args.node} (its owner moves it)")
        return rc

    return _run(args, job)


def _cmd_failover(args: argparse.Namespace) -> int:
    from broker.records import FailoverState, Keys, VMRecord
    from broker.store import ClusterStore

    def request(vm: VMRecord) -> VMRecord:
        if vm.deleted:
            raise ValueError(f"VM {vm.vmid} was deleted")
        if vm.failover in (FailoverState.REQUESTED, FailoverState.DONE):
            raise ValueError(f"VM {vm.vmid}: a failover is already {vm.failover}")
        if vm.migrate_to:
            raise ValueError(f"VM {vm.vmid} is moving to {vm.migrate_to}; fail over after")
        return replace(
            vm, failover=FailoverState.REQUESTED, failover_point=args.point, failover_note=""
        )

    async def job(store: ClusterStore, keys: Keys) -> int:
        rc = await _update_vm(store, keys, args.vmid, request)
        if rc:
            return rc
        latest = args.point < 0
        point = "the latest recovery point" if latest else f"recovery point {args.point}"
        if not args.json:
            print(f"VM {args.vmid}: failover to {point} asked of its node; waiting")
        # The owner carries it out (frcluster/failover.py) and records the outcome.
        vm: VMRecord | None = None
        with trio.move_on_after(args.wait):
            while True:
                kv = await store.get(keys.vm(args.vmid))
                vm = None if kv is None else VMRecord.from_json(kv.value)
                if vm is None or vm.failover.settled:
                    break
                await trio.sleep(0.1)
        if vm is None or not vm.failover.settled:
            print(
                f"frctl: no outcome within {args.wait:g} s (is the owner up?); the request "
                "stays: its node carries it out when it can",
                file=sys.stderr,
            )
            return 1
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
        elif vm.failover is FailoverState.DONE:
            print(
                f"failed over at {vm.owner}: recovery point {vm.failover_point}, generation "
                f"{vm.failover_generation}; the former primary is refused from now on"
                + (f" ({vm.failover_note})" if vm.failover_note else "")
            )
        else:
            print(f"frctl: failover refused at {vm.owner}: {vm.failover_note}", file=sys.stderr)
        return 0 if vm.failover is FailoverState.DONE else 1

    return _run(args, job)


def _cmd_delete(args: argparse.Namespace) -> int:
    from broker.records import Keys
    from broker.store import ClusterStore

    async def job(store: ClusterStore, keys: Keys) -> int:
        rc = await _update_vm(store, keys, args.vmid, lambda vm: replace(vm, deleted=True))
        if rc == 0:
            print(f"VM {args.vmid}: deleted (its primary is told so and stops)")
        return rc

    return _run(args, job)


def _cmd_drain(args: argparse.Namespace) -> int:
    from broker.records import Keys, NodeAdmin
    from broker.store import ClusterStore

    async def job(store: ClusterStore, keys: Keys) -> int:
        kv = await store.get(keys.admin(args.node))
        admin = NodeAdmin() if kv is None else NodeAdmin.from_json(kv.value)
        await store.put(keys.admin(args.node), replace(admin, draining=not args.undo).to_json())
        what = "no longer draining" if args.undo else "draining: its replicas move away"
        print(f"{args.node}: {what}")
        return 0

    return _run(args, job)


def _cmd_label(args: argparse.Namespace) -> int:
    from broker.records import Keys, NodeAdmin
    from broker.store import ClusterStore

    async def job(store: ClusterStore, keys: Keys) -> int:
        kv = await store.get(keys.admin(args.node))
        admin = NodeAdmin() if kv is None else NodeAdmin.from_json(kv.value)
        labels = dict(admin.labels)
        for item in args.labels:
            name, sep, value = item.partition("=")
            if sep:
                labels[name] = value
            else:
                labels.pop(name, None)
        await store.put(keys.admin(args.node), replace(admin, labels=labels).to_json())
        print(f"{args.node}: labels {json.dumps(labels)}")
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
    run.set_defaults(func=_cmd_node_run)

    cluster = sub.add_parser("cluster", help="administer a cluster through its store")
    csub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")

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
    migrate.add_argument("vmid")
    migrate.add_argument("node")
    migrate.set_defaults(func=_cmd_migrate)

    drain = csub.add_parser("drain", help="move a node's replicas away, place nothing on it")
    common(drain)
    drain.add_argument("node")
    drain.add_argument("--undo", action="store_true", help="stop draining")
    drain.set_defaults(func=_cmd_drain)

    label = csub.add_parser("label", help="set NAME=VALUE (or remove NAME) labels on a node")
    common(label)
    label.add_argument("node")
    label.add_argument("labels", nargs="+")
    label.set_defaults(func=_cmd_label)

    imp = csub.add_parser(
        "import", help="out-of-band IR: send an export file to the node that owns its VM"
    )
    imp.add_argument("--config", required=True, help="this node's configuration (TOML)")
    imp.add_argument("file", help="the file made by 'frctl ir export' at the primary")
    imp.add_argument("--json", action="store_true")
    imp.set_defaults(func=_cmd_import)

    failover = csub.add_parser(
        "failover", help="unplanned failover: the VM's node starts it from its replica"
    )
    common(failover)
    failover.add_argument("vmid")
    failover.add_argument(
        "--point", type=int, default=-1, help="a kept recovery point (default: the latest)"
    )
    failover.add_argument("--wait", type=float, default=60.0, help="seconds to wait for it")
    failover.add_argument("--json", action="store_true")
    failover.set_defaults(func=_cmd_failover)

    delete = csub.add_parser("delete", help="delete a replica VM (its primary stops)")
    common(delete)
    delete.add_argument("vmid")
    delete.set_defaults(func=_cmd_delete)
