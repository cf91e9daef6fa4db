"""``frctl failover complete`` / ``cancel``: end a failover at a stand-alone recovery
server (``node/failover/complete.py``): by the server itself when it runs (it answers
on its control socket, ``node/failover/control.py``), else offline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .server_commands import is_cluster_config, replica_places, replica_vmid


def _refuse_cluster(args: argparse.Namespace, action: str) -> bool:
    if is_cluster_config(Path(args.config)):
        print(
            f"frctl: {args.config} is a cluster node's: a failover in a cluster is "
            f"{action}d at the VM's node with that node's configuration stopped, or not at "
            "all (docs/failover.md)",
            file=sys.stderr,
        )
        return True
    return False


def _server_running(args: argparse.Namespace) -> bool:
    """Whether the recovery server of ``args.config`` runs and answers on its control
    socket (a socket left by a server that was killed does not answer)."""
    from node.failover.control import ping

    try:
        ping(replica_places(args))
    except (OSError, ValueError):
        return False
    return True


def _report(args: argparse.Namespace, ending: Any) -> None:
    if args.json:
        print(json.dumps(ending.to_json()))
        return
    if ending.action == "complete":
        print(
            f"VM {ending.vmid}: failover completed at recovery point {ending.sequence} "
            f"(generation {ending.generation}); the other points are removed"
        )
    else:
        print(
            f"VM {ending.vmid}: failover cancelled; the replica is back at {ending.sequence} "
            f"(generation {ending.generation}, points {list(ending.points)}); its primary "
            "carries on replicating"
        )


def _cmd_complete(args: argparse.Namespace) -> int:
    import frproto as fp
    from node.failover.complete import (
        ServerRefused,
        complete_failover,
        end_at_running_server,
    )
    from node.storage.lock import StorageBusy

    if _refuse_cluster(args, "complete"):
        return 1
    vmid = replica_vmid(args, args.vmid)
    try:
        if _server_running(args):
            ending = end_at_running_server(replica_places(args), vmid, "complete")
        else:
            ending = complete_failover(replica_places(args), vmid)
    except StorageBusy as exc:
        print(
            f"frctl: complete: {exc}, and it does not answer on its control socket: "
            "stop it, or try again",
            file=sys.stderr,
        )
        return 1
    except (fp.FrprotoError, ServerRefused, OSError, ValueError) as exc:
        print(f"frctl: complete: {exc}", file=sys.stderr)
        return 1
    _report(args, ending)
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    import frproto as fp
    from node.failover.complete import ServerRefused, cancel_failover, end_at_running_server
    from node.failover.test import CommandHook, HookFailed
    from node.storage.lock import StorageBusy

    if _refuse_cluster(args, "cancel"):
        return 1
    vmid = replica_vmid(args, args.vmid)
    stop = CommandHook(args.stop_command) if args.stop_command else None
    try:
        if _server_running(args):
            ending = end_at_running_server(
                replica_places(args),
                vmid,
                "cancel",
                stop=stop,
                discard_writes=args.discard_writes,
            )
        else:
            ending = cancel_failover(
                replica_places(args), vmid, stop=stop, discard_writes=args.discard_writes
            )
    except StorageBusy as exc:
        print(
            f"frctl: cancel: {exc}, and it does not answer on its control socket: "
            "stop it, or try again",
            file=sys.stderr,
        )
        return 1
    except (fp.FrprotoError, HookFailed, ServerRefused, OSError, ValueError) as exc:
        print(f"frctl: cancel: {exc}", file=sys.stderr)
        return 1
    _report(args, ending)
    return 0


def register(fsub: Any) -> None:
    """Add ``complete`` and ``cancel`` to ``frctl failover``'s actions."""
    complete = fsub.add_parser(
        "complete", help="keep the failed-over point, remove the others (no going back)"
    )
    complete.add_argument("--config", required=True, help="the recovery server's configuration")
    complete.add_argument("vmid", help="the VM's VMID, or its name")
    complete.add_argument("--json", action="store_true", help="one JSON object: what was done")
    complete.set_defaults(func=_cmd_complete)
    cancel = fsub.add_parser(
        "cancel", help="undo a failover not completed: back to where replication left it"
    )
    cancel.add_argument("--config", required=True, help="the recovery server's configuration")
    cancel.add_argument("vmid", help="the VM's VMID, or its name")
    cancel.add_argument("--stop-command", help="hook: a shell command that stops the VM")
    cancel.add_argument(
        "--discard-writes",
        action="store_true",
        help="cancel even though the VM wrote to its disks (then verify or resync it)",
    )
    cancel.add_argument("--json", action="store_true", help="one JSON object: what was done")
    cancel.set_defaults(func=_cmd_cancel)
