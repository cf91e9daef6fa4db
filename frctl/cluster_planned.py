"""``frctl cluster failover --planned VMID``: a planned failover asked at the cluster.

The broker never connects to a primary, so the ask is recorded in the VM's record
(``planned-requested``, :func:`broker.admin.request_planned_failover`) and travels on the
primary's own next connection: the VM's node sends it a FailoverAsk (protocol 1.1,
``frcluster/planned_ask.py``). The primary carries the failover out (stop hook, last
batch, FailoverRequest: the record says ``done`` at the new generation) or declines (the
record says ``planned-declined``, with its reason; the VM replicates on as before). The
command waits for that; when ``--wait`` runs out it withdraws the ask
(``planned-declined``, "not answered within N s") and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys

#: Seconds ``--planned`` waits unless ``--wait`` says otherwise: the primary must connect
#: (its next cycle), stop the VM and send its last batch.
DEFAULT_WAIT = 120.0


def cmd_planned_failover(args: argparse.Namespace) -> int:
    """Ask for the planned failover of ``args.vmid`` and wait for its outcome."""
    from broker import admin
    from broker.records import FailoverState, Keys, VMRecord
    from broker.store import ClusterStore

    from .cluster_commands import _run, _who

    if args.point >= 0:
        print(
            "frctl: --planned fails over at the primary's final state: no --point", file=sys.stderr
        )
        return 2
    wait = DEFAULT_WAIT if args.wait is None else args.wait

    async def job(store: ClusterStore, keys: Keys) -> int:
        vmid = await admin.find_vm(store, keys, args.vmid)
        await admin.request_planned_failover(store, keys, vmid, by=_who())
        if not args.json:
            print(f"VM {vmid}: planned failover asked; its primary is asked on its next connection")
        vm: VMRecord
        try:
            vm = await admin.await_failover(store, keys, vmid, timeout=wait)
        except admin.NoFailoverOutcome:
            note = f"not answered within {wait:g} s (withdrawn)"
            vm = (
                await admin.withdraw_planned_failover(store, keys, vmid, note=note, by=_who())
            ).new
        done = vm.failover is FailoverState.DONE
        if args.json:
            print(
                json.dumps(
                    {
                        "vmid": vm.vmid,
                        "node": vm.owner,
                        "planned": True,
                        "failover": vm.failover,
                        "sequence": vm.failover_point,
                        "generation": vm.failover_generation,
                        "note": vm.failover_note,
                    }
                )
            )
        elif done:
            print(
                f"failed over at {vm.owner}: the primary handed the VM over at sequence "
                f"{vm.failover_point}, generation {vm.failover_generation}, nothing lost"
            )
        else:
            why = vm.failover_note or str(vm.failover or "no outcome")
            print(f"frctl: planned failover of {vmid} not done: {why}", file=sys.stderr)
        return 0 if done else 1

    return int(_run(args, job))
