"""``frctl failover ...``: failover at the recovery server (test failover so far)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import trio

from .failover_ending_commands import register as register_endings
from .server_commands import is_cluster_config, replica_places, replica_vmid


def _vmid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a VMID (a GUID)") from None


def _cmd_test(args: argparse.Namespace) -> int:
    import frproto as fp
    from node.failover.test import CommandHook, HookFailed, start_test_failover

    # Absolute before anything is loaded: every path the configuration names is relative
    # to its file, and the storage root's containment check needs an absolute root.
    config = Path(args.config).resolve()
    located = argparse.Namespace(**{**vars(args), "config": str(config)})
    vmid = replica_vmid(located, args.vmid)
    try:
        copy = start_test_failover(
            replica_places(located),
            vmid,
            Path(os.path.abspath(args.out)),
            sequence=args.point,
            start=CommandHook(args.start_command) if args.start_command else None,
            disk_format=args.format,
        )
    except (fp.FrprotoError, HookFailed, OSError, ValueError) as exc:
        print(f"frctl: test failover: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                {
                    "vmid": str(copy.vmid),
                    "sequence": copy.sequence,
                    "directory": str(copy.directory),
                    "config": str(copy.config),
                    "disks": [str(p) for p in copy.disks],
                    "bytes_written": copy.bytes_written,
                    "seconds": round(copy.seconds, 3),
                }
            )
        )
    else:
        print(
            f"test VM of {copy.vmid} at recovery point {copy.sequence} in {copy.directory} "
            f"({len(copy.disks)} disks, {copy.bytes_written} bytes written, "
            f"{copy.seconds:.2f} s); replication goes on; remove it with: frctl failover "
            f"cleanup {copy.directory}"
        )
    return 0


def _cmd_cleanup(args: argparse.Namespace) -> int:
    from node.failover.test import CommandHook, HookFailed, clean_up_test_failover

    directory = Path(os.path.abspath(args.directory))
    try:
        clean_up_test_failover(
            directory,
            stop=CommandHook(args.stop_command) if args.stop_command else None,
        )
    except (HookFailed, OSError, ValueError) as exc:
        print(f"frctl: cleanup: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"action": "cleanup", "directory": str(directory)}))
    else:
        print(f"removed the test failover in {directory}")
    return 0


def _cmd_unplanned(args: argparse.Namespace) -> int:
    import frproto as fp
    from node.failover.test import CommandHook, HookFailed
    from node.failover.unplanned import unplanned_failover
    from node.storage.lock import StorageBusy

    if is_cluster_config(Path(args.config)):
        # The node's agent holds the replicas (on shared storage, every node does).
        print(
            f"frctl: {args.config} is a cluster node's: use 'frctl cluster failover', "
            "which the replica's node carries out",
            file=sys.stderr,
        )
        return 1
    vmid = replica_vmid(args, args.vmid)
    try:
        result = unplanned_failover(
            replica_places(args),
            vmid,
            sequence=args.point,
            start=CommandHook(args.start_command) if args.start_command else None,
        )
    except StorageBusy:
        # A running server: it does the failover itself (node/failover/control.py).
        return _unplanned_at_running_server(args, vmid)
    except (fp.FrprotoError, HookFailed, OSError, ValueError) as exc:
        print(f"frctl: unplanned failover: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(
            f"VM {result.vmid} failed over at recovery point {result.sequence} (generation "
            f"{result.generation}); its former primary is refused from now on; disks: "
            + ", ".join(str(p) for p in result.disks)
        )
    return 0


def _unplanned_at_running_server(args: argparse.Namespace, vmid: uuid.UUID) -> int:
    from node.failover.control import ask_running_server, running_copy
    from node.failover.test import CommandHook, HookFailed, find_replica

    places = replica_places(args)
    try:
        reply = ask_running_server(places, vmid, args.point)
    except OSError as exc:
        print(
            f"frctl: unplanned failover: the recovery server holds the storage and does not "
            f"answer on its control socket ({exc}): stop it, or try again",
            file=sys.stderr,
        )
        return 1
    if not reply.get("ok"):
        print(f"frctl: unplanned failover: {reply.get('error')}", file=sys.stderr)
        return 1
    copy = running_copy(find_replica(places, vmid), vmid, int(reply["sequence"]))
    if args.start_command:
        try:
            CommandHook(args.start_command)(copy)
        except HookFailed as exc:
            print(f"frctl: unplanned failover: {exc}", file=sys.stderr)
            return 1
    result = {
        "vmid": str(vmid),
        "sequence": copy.sequence,
        "generation": int(reply["generation"]),
        "disks": [str(p) for p in copy.disks],
        "server_running": True,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"VM {vmid} failed over at recovery point {copy.sequence} (generation "
            f"{result['generation']}) by the running recovery server; its former primary is "
            "refused from now on; disks: " + ", ".join(map(str, copy.disks))
        )
    return 0


def _cmd_planned(args: argparse.Namespace) -> int:
    """At the primary, one step: stop hook, last batch, the recovery side takes the VM
    over (protocol 1.1); with --server-config this host becomes its recovery side and
    the other side replicates back by itself (node/failover/planned.py)."""
    import frproto as fp
    from node.config import ConfigError, load_recovery_server_config
    from node.failover.planned import planned_failover
    from node.failover.test import HookFailed
    from node.primary.errors import FailoverInDoubt

    from .node_commands import replicator_from_args

    replicator = replicator_from_args(args)
    # A request whose answer was lost is asked again, exactly (FOV-11): no stop hook.
    again = replicator.state.failover_in_doubt is not None
    server = None
    if args.server_config:
        try:
            server = load_recovery_server_config(Path(args.server_config))
        except ConfigError as exc:
            print(f"frctl: {exc}", file=sys.stderr)
            return 1
    try:
        result = trio.run(
            partial(
                planned_failover,
                replicator,
                stop_command=args.stop_command,
                authorization=None if server is None else server.authorization,
                reverse_port=0 if server is None else (args.reverse_port or server.port),
            )
        )
    except HookFailed as exc:
        print(f"frctl: planned failover: {exc}: not failing over", file=sys.stderr)
        return 1
    except FailoverInDoubt as exc:
        print(f"frctl: planned failover: {exc}", file=sys.stderr)
        return 3
    except (fp.FrprotoError, OSError, ValueError) as exc:
        print(f"frctl: planned failover: {exc}", file=sys.stderr)
        if again and isinstance(exc, fp.FrprotoError):
            halted = replicator.state.halted
            print(
                "frctl: the failover request asked again was refused: it is not in doubt "
                "any more; "
                + (f"the VM stays halted: {halted}" if halted else "replication goes on"),
                file=sys.stderr,
            )
        return 1
    except Exception as exc:  # the last cycle failed: nothing was switched
        print(f"frctl: planned failover: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**result.to_json(), "asked_again": again}))
        return 0
    reverse = (
        f"; this host is its recovery side now ({result.reverse.storage}) and the other "
        "side replicates back, differences first"
        if result.reverse is not None
        else ""
    )
    if again:
        print(f"{result.name}: the failover request was asked again and answered")
    print(
        f"{result.name}: failed over at sequence {result.sequence} (generation "
        f"{result.generation}), nothing lost; this primary replicates it no more{reverse}"
    )
    return 0


def _cmd_adopt(args: argparse.Namespace) -> int:
    """At the former primary: its own disks become the replica reverse replication updates."""
    import frproto as fp
    from node.config import load_recovery_server_config
    from node.failover.reverse import adopt_disks

    disks = []
    for item in args.disk:
        disk_id, sep, path = item.partition("=")
        if not sep:
            print(f"frctl: --disk {item!r}: expected ID=PATH", file=sys.stderr)
            return 2
        disks.append((disk_id, Path(path)))
    try:
        config = load_recovery_server_config(Path(args.config))
        adopted = adopt_disks(
            config.authorization,
            args.vmid,
            name=args.name,
            disks=disks,
            primary=args.primary,
            generation=args.generation,
        )
    except (fp.FrprotoError, OSError, ValueError) as exc:
        print(f"frctl: adopt: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                {
                    "action": "adopt",
                    "vmid": str(adopted.vmid),
                    "storage": str(adopted.storage),
                    "generation": adopted.generation,
                    "data_bytes": adopted.data_bytes,
                }
            )
        )
        return 0
    print(
        f"VM {adopted.vmid}: its disks are the replica in {adopted.storage} (generation "
        f"{adopted.generation}, {adopted.data_bytes} data bytes); the failed-over side may "
        "now replicate back"
    )
    return 0


def _cmd_reverse(args: argparse.Namespace) -> int:
    """At the failed-over side: replicate the VM back, differences first (no IR)."""
    import frproto as fp
    from node.failover.reverse import reverse_state
    from node.failover.test import find_replica
    from node.primary.config import load_primary_config
    from node.primary.state import PrimaryStateStore

    host, _, port = args.to.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        print(f"frctl: --to {args.to!r}: use HOST:PORT", file=sys.stderr)
        return 2
    vmid = replica_vmid(argparse.Namespace(config=args.server_config), args.vmid)
    try:
        primary = load_primary_config(Path(args.config))
        storage = find_replica(replica_places(argparse.Namespace(config=args.server_config)), vmid)
        state = reverse_state(
            PrimaryStateStore(primary.state_dir),
            storage,
            vmid,
            host=host,
            port=int(port),
            server_name=args.to_name or host,
        )
    except (fp.FrprotoError, OSError, ValueError) as exc:
        print(f"frctl: reverse: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"action": "reverse", "vmid": state.vmid, "to": args.to}))
        return 0
    print(
        f"{state.name}: replicates back to {args.to} from its replica's disks; the first "
        "cycle sends only what differs (frctl primary run replicates it)"
    )
    return 0


def register(sub: Any) -> None:
    """Add ``failover`` to frctl's subcommands."""
    failover = sub.add_parser("failover", help="failover at the recovery server")
    fsub = failover.add_subparsers(dest="failover_command", required=True, metavar="ACTION")
    test = fsub.add_parser(
        "test", help="build a VM from a kept recovery point, elsewhere, replication going on"
    )
    test.add_argument("--config", required=True, help="the recovery server's configuration")
    test.add_argument("vmid", help="the VM's VMID, or its name")
    test.add_argument("--out", required=True, help="a new directory for the test VM")
    test.add_argument("--point", type=int, default=None, help="recovery point (default: latest)")
    test.add_argument(
        "--start-command",
        help="hook: a shell command that starts the VM (FRREP_VM_DIR, FRREP_DISKS... set)",
    )
    test.add_argument(
        "--format",
        choices=("raw", "qcow2"),
        default="raw",
        help="the test VM's disk images: raw copies, or qcow2 (qemu-img convert; docs/qemu.md)",
    )
    test.add_argument("--json", action="store_true")
    test.set_defaults(func=_cmd_test)
    unplanned = fsub.add_parser(
        "unplanned", help="the primary site is lost: run the VM from its replica"
    )
    unplanned.add_argument("--config", required=True, help="the recovery server's configuration")
    unplanned.add_argument("vmid", help="the VM's VMID, or its name")
    unplanned.add_argument(
        "--point", type=int, default=None, help="recovery point (default: latest)"
    )
    unplanned.add_argument("--start-command", help="hook: a shell command that starts the VM")
    unplanned.add_argument("--json", action="store_true")
    unplanned.set_defaults(func=_cmd_unplanned)
    planned = fsub.add_parser(
        "planned",
        help="at the primary: stop the VM, send the rest, the recovery side takes it over",
    )
    planned.add_argument("--config", required=True, help="the primary's configuration")
    planned.add_argument("vmid", help="the VM's VMID, or its name")
    planned.add_argument("--stop-command", help="hook: a shell command that stops the VM")
    planned.add_argument(
        "--server-config",
        help="this host's recovery server config: become the VM's recovery side (reverse)",
    )
    planned.add_argument(
        "--reverse-port",
        type=int,
        default=None,
        help="the port the other side replicates back to (default: the server config's)",
    )
    planned.add_argument("--json", action="store_true")
    planned.set_defaults(func=_cmd_planned)
    adopt = fsub.add_parser(
        "adopt", help="at the former primary: make its disks the replica to replicate back to"
    )
    adopt.add_argument("--config", required=True, help="this host's recovery server config")
    adopt.add_argument("vmid", type=_vmid, help="the VM's VMID")
    adopt.add_argument("--name", required=True)
    adopt.add_argument("--disk", action="append", required=True, metavar="ID=PATH")
    adopt.add_argument("--primary", required=True, help="the failed-over side's name")
    adopt.add_argument("--generation", type=int, required=True, help="as failover printed")
    adopt.add_argument("--json", action="store_true", help="one JSON object: what was done")
    adopt.set_defaults(func=_cmd_adopt)
    reverse = fsub.add_parser(
        "reverse", help="at the failed-over side: replicate back, differences first"
    )
    reverse.add_argument("--config", required=True, help="this host's primary config")
    reverse.add_argument("--server-config", required=True, help="this host's server config")
    reverse.add_argument("vmid", help="the VM's VMID, or its name")
    reverse.add_argument("--to", required=True, metavar="HOST:PORT")
    reverse.add_argument("--to-name", help="the TLS name of the other side (default: HOST)")
    reverse.add_argument("--json", action="store_true", help="one JSON object: what was done")
    reverse.set_defaults(func=_cmd_reverse)
    register_endings(fsub)
    cleanup = fsub.add_parser("cleanup", help="stop and remove a test failover's VM")
    cleanup.add_argument("directory")
    cleanup.add_argument("--stop-command", help="hook: a shell command that stops the VM")
    cleanup.add_argument("--json", action="store_true", help="one JSON object: what was done")
    cleanup.set_defaults(func=_cmd_cleanup)
