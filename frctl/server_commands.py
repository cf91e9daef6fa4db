"""frctl subcommands of the recovery server: ``server run``, ``server admin-password`` and
``replica list|points``."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import trio

from .logs import LOG_FORMATS, setup_logging


def _cmd_server_run(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from node.config import ConfigError, load_recovery_server_config
    from node.failover.control import serve_control
    from node.failover.reverse_service import ReverseReplication, reverse_state_dir
    from node.recovery_server import RecoveryServer
    from node.takeover import TakenOver

    from .daemon import run_daemon

    setup_logging(args.log_level, args.log_format)
    path = Path(args.config)
    try:
        config = load_recovery_server_config(path)
    except ConfigError as exc:
        print(f"frctl: {exc}", file=sys.stderr)
        return 1
    registry = CollectorRegistry()
    # A VM taken over in a planned failover is replicated back by this server's own
    # primary service (node/failover/reverse_service.py).
    reverse = ReverseReplication(
        name=config.name,
        tls=config.tls,
        listen=config.listen,
        state_dir=reverse_state_dir(config.storages),
        frequency_s=config.reverse_frequency_s,
    )

    async def taken_over(taken: TakenOver) -> None:
        await reverse.taken_over(
            taken.vmid,
            storage=taken.storage,
            primary_name=taken.primary_name,
            primary_address=taken.primary_address,
            reverse_port=taken.reverse_port,
        )

    server = RecoveryServer(config, registry=registry, on_failed_over=taken_over)

    async def serve(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # The replication listener first; then, with a [console] table, the web console
        # (frconsole/standalone.py) beside it, on the configuration the server uses now
        # (SIGHUP changes its authorization entries).
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            await nursery.start(reverse.run)
            # frctl failover unplanned asks the running server on it.
            await nursery.start(serve_control, server)
            if config.console is not None:
                from frconsole.standalone import serve_console

                await nursery.start(partial(serve_console, lambda: server.config, path))
            task_status.started()

    trio.run(
        partial(
            run_daemon,
            serve,
            registry=registry,
            ready=lambda: None if server.listening else "not listening",
            metrics=config.metrics,
            cert=config.tls.cert,
            # SIGHUP: the authorization entries, read again (a bad file is refused).
            reload=partial(server.reload_authorization, path),
        )
    )
    return 0


def _cmd_admin_password(args: argparse.Namespace) -> int:
    from broker import admin
    from frconsole.standalone import KEYS, open_console_store
    from node.config import console_database, load_recovery_server_config

    from .cluster_commands import _read_password, _who

    path = Path(args.config)
    database = console_database(load_recovery_server_config(path), path)
    try:
        password = _read_password()
    except (ValueError, EOFError, KeyboardInterrupt) as exc:
        print(f"frctl: {exc or 'no password given'}", file=sys.stderr)
        return 1
    by = _who()

    async def main() -> None:
        async with open_console_store(database) as store:
            await admin.set_console_password(store, KEYS, args.user, password, by=by)

    try:
        trio.run(main)
    except ValueError as exc:  # the password or user refused (too short...)
        print(f"frctl: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"user": args.user, "changed": True, "database": str(database)}))
    else:
        print(
            f"console administrator {args.user}: password set in {database} "
            "(every session logged out)"
        )
    return 0


def is_cluster_config(path: Path) -> bool:
    """True for a cluster node's configuration (it has a ``[cluster]`` table)."""
    import tomllib

    try:
        return "cluster" in tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False  # the configuration's loader reports it properly


def replica_places(args: argparse.Namespace) -> list[Path]:
    """The replica storage places of a recovery server's configuration, or of a cluster
    node's (a file with a ``[cluster]`` table): every storage under its root."""
    from node.config import load_recovery_server_config

    path = Path(args.config)
    if is_cluster_config(path):
        from frcluster.config import load_cluster_node_config

        root = load_cluster_node_config(path).storage
        if not root.is_dir():
            return []
        # Not the root's own bookkeeping (.staging, .trash...): a peer node's connection
        # opens the root as a store.
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    config = load_recovery_server_config(path)
    places = {e.storage for e in config.authorization.entries}
    if config.authorization.any_primary is not None:
        places.add(config.authorization.any_primary.storage)
    return sorted(places)


def replica_vmid(args: argparse.Namespace, text: str) -> uuid.UUID:
    """The VMID of the replica named by ``text`` (a VMID, or the name of one replica in
    the configuration's storage places).

    Raises:
        frproto.UnknownVM: no replica of that name, or a name several replicas share
            (frctl exits 4; the message lists their VMIDs).
    """
    import frproto as fp
    from node.recovery_plan.targets import replicas

    try:
        return uuid.UUID(text)
    except ValueError:
        pass
    # Read from the state files, nothing opened: a running server may hold the replicas.
    found = [v.state.vmid for v in replicas(replica_places(args)) if v.state.name == text]
    if len(found) == 1:
        return found[0]
    if found:
        raise fp.UnknownVM(
            f"{len(found)} replicas are named {text!r}; give the VMID "
            f"({', '.join(sorted(map(str, found)))})"
        )
    raise fp.UnknownVM(f"no replica {text!r} here (neither a VMID nor a replica's name)")


def _iso(seconds: float) -> str | None:
    from .timefmt import rfc3339

    return rfc3339(seconds)


def _cmd_replica_list(args: argparse.Namespace) -> int:
    import frproto as fp
    from node.storage import ReplicaStore

    rows: list[dict[str, object]] = []
    damaged = 0
    for place in replica_places(args):
        with ReplicaStore(place) as store:
            for vmid in store.vmids():
                try:
                    replica = store.open(vmid)
                except fp.InternalError as exc:
                    # One damaged replica must not hide the others, nor be hidden.
                    damaged += 1
                    rows.append(
                        {
                            "vmid": str(vmid),
                            "name": str(vmid),
                            "ir": "DAMAGED",
                            "applied_sequence": None,
                            "recovery_points": 0,
                            "latest_point_at": None,
                            "primary": "",
                            "trust_group": "",
                            "storage": str(place),
                            "damaged": str(exc),
                        }
                    )
                    continue
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
    else:
        print(f"{'VM':<20} {'IR':<12} {'SEQ':>6} {'POINTS':>6}  {'PRIMARY':<28} TRUST GROUP")
        for r in rows:
            seq = "-" if r["applied_sequence"] is None else r["applied_sequence"]
            print(
                f"{r['name']!s:<20} {r['ir']!s:<12} {seq!s:>6} "
                f"{r['recovery_points']!s:>6}  {r['primary']!s:<28} {r['trust_group']}"
            )
    if damaged:
        for r in rows:
            if "damaged" in r:
                print(
                    f"frctl: the replica of {r['vmid']} in {r['storage']} is damaged "
                    f"({r['damaged']}): its VM is refused; `frctl replica quarantine "
                    f"{r['vmid']} --storage {r['storage']} --yes` sets it aside, and the "
                    "primary's next cycle starts a new initial replication",
                    file=sys.stderr,
                )
        return 3
    return 0


def _cmd_replica_points(args: argparse.Namespace) -> int:
    import frproto as fp
    from node.storage import ReplicaStore

    vmid = replica_vmid(args, args.vmid)
    for place in replica_places(args):
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


def _cmd_replica_duplicates(args: argparse.Namespace) -> int:
    """The VMIDs held in more than one storage location (REP-34: the server refuses them
    until one copy is removed), each copy on a line; exit code 3 when there are any."""
    from node.storage.duplicates import find_duplicates

    found = find_duplicates(replica_places(args))
    if args.json:
        print(json.dumps([c.to_dict() for copies in found.values() for c in copies], indent=2))
        return 3 if found else 0
    if not found:
        print("no VMID has a replica in more than one storage location")
        return 0
    print(f"{'VMID':<36}  {'VM':<20} {'TRUST GROUP':<16} {'SEQ':>6}  STORAGE")
    for copies in found.values():
        for c in copies:
            print(
                f"{c.vmid!s:<36}  {c.name:<20} {c.trust_group:<16} "
                f"{c.applied_sequence:>6}  {c.storage}"
            )
    print(
        f"{len(found)} VMID(s) refused until one copy is removed: "
        "frctl replica remove-duplicate VMID --storage PATH --yes",
        file=sys.stderr,
    )
    return 3


def _cmd_replica_remove_duplicate(args: argparse.Namespace) -> int:
    """Remove one copy of a duplicated replica (never the last)."""
    import frproto as fp
    from node.storage.duplicates import remove_duplicate

    try:
        vmid = uuid.UUID(args.vmid)  # not a name: both copies may bear it
    except ValueError:
        raise fp.UnknownVM(f"{args.vmid!r} is not a VMID") from None
    storage = Path(args.storage)
    if not args.yes:
        print(
            f"frctl: remove-duplicate removes the replica of {vmid} in {storage} (its images "
            "and every recovery point), keeping the other copy; add --yes to do it",
            file=sys.stderr,
        )
        return 1
    removed = remove_duplicate(replica_places(args), vmid, storage)
    if args.json:
        print(json.dumps({"removed": removed.to_dict()}))
    else:
        print(
            f"removed the replica of {vmid} ({removed.name}, trust group "
            f"{removed.trust_group}, sequence {removed.applied_sequence}) from {removed.storage}"
        )
    return 0


def _cmd_replica_quarantine(args: argparse.Namespace) -> int:
    """Set a damaged replica aside (docs/storage.md, "Damaged files")."""
    import frproto as fp
    from node.storage.quarantine import quarantine

    try:
        vmid = uuid.UUID(args.vmid)
    except ValueError:
        raise fp.UnknownVM(f"{args.vmid!r} is not a VMID") from None
    storage = Path(args.storage)
    if storage.resolve() not in {p.resolve() for p in replica_places(args)}:
        raise fp.UnknownVM(f"{storage} is not a storage location of this server")
    if not args.yes:
        print(
            f"frctl: quarantine moves the damaged replica of {vmid} in {storage} to "
            f"{storage}/.quarantine/ (kept, never read again); its primary's next cycle "
            "starts a new initial replication; add --yes to do it",
            file=sys.stderr,
        )
        return 1
    moved = quarantine(storage, vmid)
    if args.json:
        print(json.dumps({"quarantined": str(vmid), "to": str(moved)}))
    else:
        print(f"moved the damaged replica of {vmid} to {moved}")
    return 0


def register(sub: Any) -> None:
    """Add the recovery server's subcommands to frctl's subparsers."""
    server = sub.add_parser("server", help="the recovery server")
    ssub = server.add_subparsers(dest="server_command", required=True, metavar="ACTION")
    run = ssub.add_parser("run", help="run a recovery server from a config file")
    run.add_argument("--config", required=True, help="recovery server TOML file")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    run.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text, or json: one object per line",
    )
    run.set_defaults(func=_cmd_server_run)
    password = ssub.add_parser(
        "admin-password",
        help="set the web console's administrator password (read from stdin or a prompt)",
    )
    password.add_argument("--config", required=True, help="recovery server TOML file")
    password.add_argument("--user", default="admin", help="the administrator's user name")
    password.add_argument("--json", action="store_true")
    password.set_defaults(func=_cmd_admin_password)

    replica = sub.add_parser("replica", help="replicas held by this recovery server")
    rsub_ = replica.add_subparsers(dest="replica_command", required=True, metavar="ACTION")
    rlist = rsub_.add_parser("list", help="every replica, its sequence and recovery points")
    rlist.add_argument("--config", required=True, help="recovery server TOML file")
    rlist.add_argument("--json", action="store_true")
    rlist.set_defaults(func=_cmd_replica_list)
    rpoints = rsub_.add_parser("points", help="the recovery points kept for a VM")
    rpoints.add_argument("--config", required=True, help="recovery server TOML file")
    rpoints.add_argument("vmid", help="the VM's VMID, or its name")
    rpoints.add_argument("--json", action="store_true")
    rpoints.set_defaults(func=_cmd_replica_points)
    rdup = rsub_.add_parser(
        "duplicates",
        help="VMIDs with a replica in more than one storage location (refused until resolved)",
    )
    rdup.add_argument("--config", required=True, help="recovery server TOML file")
    rdup.add_argument("--json", action="store_true")
    rdup.set_defaults(func=_cmd_replica_duplicates)
    rrm = rsub_.add_parser(
        "remove-duplicate", help="remove one copy of a VMID held in two storage locations"
    )
    rrm.add_argument("--config", required=True, help="recovery server TOML file")
    rrm.add_argument("vmid", help="the VM's VMID")
    rrm.add_argument("--storage", required=True, help="the storage location of the copy to remove")
    rrm.add_argument("--yes", action="store_true", help="remove it (refused without)")
    rrm.add_argument("--json", action="store_true")
    rrm.set_defaults(func=_cmd_replica_remove_duplicate)
    rq = rsub_.add_parser(
        "quarantine",
        help="set a damaged replica aside (its VM starts a new initial replication)",
    )
    rq.add_argument("--config", required=True, help="recovery server TOML file")
    rq.add_argument("vmid", help="the VM's VMID")
    rq.add_argument("--storage", required=True, help="the storage location of the replica")
    rq.add_argument("--yes", action="store_true", help="move it (refused without)")
    rq.add_argument("--json", action="store_true")
    rq.set_defaults(func=_cmd_replica_quarantine)
