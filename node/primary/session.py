"""One session with the recovery server: open the VM's relationship, check the replica
can take this primary's batches, finish the initial replication if it is not done, then
send every pending cycle, oldest first.
"""

from __future__ import annotations

from collections.abc import Callable

import frproto as fp

from .client import RecoveryClient
from .delta import Deltas
from .digest_map import DigestMap
from .errors import ReplicationHalted
from .initial import initial_replication
from .plan import DropAcknowledged, plan_pending_cycle, refusal
from .state import IRStage


async def replicate(
    deltas: Deltas,
    client: RecoveryClient,
    *,
    config_blob: bytes,
    exported: Callable[[], bool],
    exported_maps: Callable[[], list[DigestMap]],
) -> None:
    """Run one session over ``client`` for the VM of ``deltas``.

    Args:
        config_blob: the VM's configuration, sent with the relationship's open.
        exported: whether the IR was exported to a file (out of band).
        exported_maps: loads the digest maps that export left.

    Raises:
        ReplicationHalted: the replica was deleted, or cannot take the batches.
    """
    vm, s = deltas.vm, deltas.vm.state
    try:
        accepted = await client.open(
            vm.vmid,
            name=s.name,
            disks=vm.disks,
            config=config_blob,
            create=s.ir_state != IRStage.COMPLETE,
            generation=s.generation,
        )
        if accepted.generation != s.generation:
            s.generation = accepted.generation
            vm.save()
    except fp.VMDeleted as exc:
        where = f" in the recovery cluster (broker {s.broker})" if s.broker else ""
        raise ReplicationHalted(
            f"{exc}{where}; replication stopped and will not seed a new replica on its "
            f"own: a person must decide (to replicate the VM again from scratch, disable "
            f"and enable its replication)"
        ) from exc
    why = refusal(
        vmid=s.vmid,
        replica_sizes=[d.size for d in accepted.disks],
        disk_sizes=[d.size for d in vm.disks],
        ir_stage=s.ir_state,
        applied_sequence=accepted.applied_sequence,
        acknowledged=s.sequence,
    )
    if why is not None:
        raise ReplicationHalted(why)
    if s.ir_state != IRStage.COMPLETE:
        await initial_replication(
            vm, client, accepted, exported=exported(), exported_maps=exported_maps
        )
    for pending in deltas.pending.cycles():
        if isinstance(plan_pending_cycle(pending.sequence, s.sequence), DropAcknowledged):
            # Acknowledged, then the primary stopped before dropping it.
            deltas.pending.drop_through(pending.sequence)
            continue
        await deltas.send(client, pending)
