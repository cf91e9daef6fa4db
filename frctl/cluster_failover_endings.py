"""``frctl cluster failover-complete`` / ``failover-cancel``: end a failover in a
cluster, carried out by the VM's node (``frcluster/failover_endings.py``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any


def _cmd_ending(args: argparse.Namespace) -> int:
    from broker import admin
    from broker.records import FailoverState, Keys
    from broker.store import ClusterStore

    from .cluster_commands import _run, _who

    cancel = args.cancel

    async def job(store: ClusterStore, keys: Keys) -> int:
        vmid = await admin.find_vm(store, keys, args.vmid)
        await admin.request_failover_ending(store, keys, vmid, cancel=cancel, by=_who())
        what = "cancel" if cancel else "complete"
        if not args.json:
            print(f"VM {vmid}: failover {what} asked of its node; waiting")
        vm = await admin.await_failover_ending(store, keys, vmid, timeout=args.wait)
        ok = vm.failover is (FailoverState.NONE if cancel else FailoverState.COMPLETED)
        if args.json:
            print(
                json.dumps(
                    {
                        "action": what,
                        "vmid": vm.vmid,
                        "node": vm.owner,
                        "failover": vm.failover,
                        "sequence": vm.failover_point,
                        "generation": vm.failover_generation,
                        "note": vm.failover_note,
                    }
                )
            )
        elif ok and cancel:
            print(
                f"failover cancelled at {vm.owner}: the replica is back at "
                f"{vm.failover_point} (generation {vm.failover_generation}); its primary "
                "carries on replicating"
            )
        elif ok:
            print(f"failover completed at {vm.owner}: recovery point {vm.failover_point} kept")
        else:
            print(
                f"frctl: failover {what} refused at {vm.owner}: {vm.failover_note}", file=sys.stderr
            )
        return 0 if ok else 1

    return int(_run(args, job))


def register(csub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``failover-complete`` and ``failover-cancel`` to ``frctl cluster``."""
    for name, cancel, helptext in (
        ("failover-complete", False, "keep the failed-over point, remove the others"),
        ("failover-cancel", True, "undo a failover: the replica back to where it was"),
    ):
        p = csub.add_parser(name, help=helptext)
        common(p)
        p.add_argument("vmid", help="the VM's VMID, or its name")
        p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for it")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=_cmd_ending, cancel=cancel)
