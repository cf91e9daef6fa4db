"""Reverse replication after a failover: the former recovery side, where the VM now runs,
replicates back to the former primary, sending only what differs.

Two steps, one at each side:

1. **At the former primary** (it becomes a recovery server): :func:`adopt_disks` makes a
   replica of the VM in its recovery server's storage from its own disk files, as they
   are (read locally, zero ranges left as holes), complete at sequence 0 and at the
   failed-over relationship's generation, bound to the trust group that admits the
   failed-over side's certificate. Nothing crosses the network for it.
2. **At the failed-over side** (it becomes the primary): :func:`reverse_state` enables
   replication of the VM from the replica's own image files (the VM runs from them) to
   the former primary, marked to resynchronize first: its first cycle compares the two
   sides' block digests and sends only the blocks that differ, no full IR. Deltas follow.

Failing back is the same again in the other direction: a planned failover at the side
that now runs the VM, the takeover at the other, and reverse replication.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import frproto as fp
from frlink.authz import Authorization
from node.primary.state import IRStage, PrimaryStateStore, VMReplicationState
from node.storage import ReplicaStore

#: Bytes read per piece of a disk when it is adopted.
PIECE = 4 * 1024 * 1024


@dataclass(frozen=True)
class Adopted:
    """A replica made from local disks."""

    vmid: uuid.UUID
    storage: Path
    generation: int
    data_bytes: int


def adopt_disks(
    authorization: Authorization,
    vmid: uuid.UUID,
    *,
    name: str,
    disks: list[tuple[str, Path]],
    primary: str,
    generation: int,
    config: bytes = b"",
) -> Adopted:
    """Make the replica of ``vmid`` from local disk files ``[(disk_id, path)]``, for the
    primary named ``primary`` (the failed-over side's certificate name), at
    ``generation``. The storage location and trust group are those the recovery server's
    ``authorization`` gives that primary.

    Raises:
        frproto.NotAuthorized: ``primary`` is not authorized here.
        frproto.AlreadyExists: a replica of the VM exists in that storage.
    """
    grant = authorization.authorize([primary])
    infos = tuple(fp.DiskInfo(disk_id, path.stat().st_size) for disk_id, path in disks)
    written = 0
    with ReplicaStore(grant.storage) as store:
        if store.exists(vmid):
            raise fp.AlreadyExists(f"a replica of {vmid} already exists in {grant.storage}")
        replica = store.create(
            vmid,
            name=name,
            config=config,
            disks=infos,
            primary=primary,
            trust_group=grant.identity.trust_group,
        )
        replica.begin_ir(0)
        for index, (_, path) in enumerate(disks):
            fd = os.open(path, os.O_RDONLY)
            try:
                size = infos[index].size
                for offset in range(0, size, PIECE):
                    data = os.pread(fd, min(PIECE, size - offset), offset)
                    if any(data):
                        replica.write_ir_chunk(index, offset, data)
                        written += len(data)
                    else:
                        replica.write_ir_chunk(index, offset, None, length=len(data))
            finally:
                os.close(fd)
        replica.complete_ir(0)
        replica.set_generation(generation)
    return Adopted(vmid, grant.storage, generation, written)


def reverse_state(
    store: PrimaryStateStore,
    replica_storage: Path,
    vmid: uuid.UUID,
    *,
    host: str,
    port: int,
    server_name: str,
    frequency_s: float = 300.0,
    block_size: int = 64 * 1024,
) -> VMReplicationState:
    """Enable replication of the failed-over VM (its replica under ``replica_storage``)
    back to the recovery server at ``host:port`` named ``server_name``: from the
    replica's image files, marked to resynchronize first (no IR)."""
    with ReplicaStore(replica_storage) as replicas:
        replica = replicas.open(vmid)
        if not replica.failed_over:
            raise fp.OutOfSequence(
                f"VM {vmid} was not failed over here: nothing to reverse (fail over first)"
            )
        state = VMReplicationState(
            vmid=str(vmid),
            name=replica.name,
            disks=[
                {"disk_id": d.disk_id, "path": str(replica.image_path(i)), "size": d.size}
                for i, d in enumerate(replica.disks)
            ],
            block_size=block_size,
            recovery_host=host,
            recovery_port=port,
            server_name=server_name,
            frequency_s=frequency_s,
        )
        state.ir_state = IRStage.COMPLETE  # the other side holds the VM's former disks
        state.sequence = 0
        state.generation = replica.generation
        state.needs_resync = True
        state.reverse = True
    store.save(state)
    return state
