"""The initial replication (IR) of one VM: every block of its disks, from a cursor, once.

The server says on the relationship's open how far an earlier IR got; :func:`plan_ir`
(``node/primary/plan.py``) turns that into where to start. The digest maps are filled as
the blocks go out; for what an interrupted IR sent before, they come from the replica's
digests (:func:`maps_from_replica`). An IR exported to a file (``docs/oob-ir.md``) is
never sent: the session waits until the server has imported it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import xxhash

import frproto as fp

from .client import IRProgress, RecoveryClient
from .digest_map import DIGEST_SIZE, DigestMap
from .plan import IRFromCursor, IRImported, IRWaitForImport, plan_ir
from .record import VMRecord
from .state import IRStage

log = logging.getLogger("frrep.primary")

#: How often IR progress is written to the VM's state file (seconds).
IR_PROGRESS_SECONDS = 0.5


async def initial_replication(
    vm: VMRecord,
    client: RecoveryClient,
    accepted: fp.RelationshipAccepted,
    *,
    exported: bool,
    exported_maps: Callable[[], list[DigestMap]],
) -> None:
    """Complete the VM's IR over ``client`` (the relationship opened as ``accepted``).

    Args:
        exported: the IR was exported to a file (out of band).
        exported_maps: loads the digest maps the export left (once the import is done).

    The VM's digest maps then describe the replica.

    Raises:
        frproto.Busy: the out-of-band import has not happened yet.
    """
    s = vm.state
    decision = plan_ir(
        exported=exported,
        server_ir_state=accepted.ir_state,
        resume=(accepted.resume_disk, accepted.resume_offset),
        disk_count=len(vm.images),
    )
    if isinstance(decision, IRWaitForImport):
        log.info("%s: waiting for the out-of-band import of its IR", s.name)
        raise fp.Busy(f"{s.name}: waiting for the out-of-band import of its IR")
    if isinstance(decision, IRImported):
        vm.maps[:] = exported_maps()
        s.ir_state = IRStage.COMPLETE
        s.sequence = 0
        s.last_replicated_at = time.time()
        vm.save()
        log.info("IR of %s complete (imported out of band)", s.name)
        return
    await _send_from(vm, client, decision)


async def _send_from(vm: VMRecord, client: RecoveryClient, decision: IRFromCursor) -> None:
    s = vm.state
    if decision.resuming:
        log.info("resuming IR of %s at disk %d offset %d", s.name, *decision.start)
    s.ir_state = IRStage.IN_PROGRESS
    vm.save()
    block = s.block_size
    maps = vm.maps

    def on_block(disk_index: int, offset: int, data: memoryview) -> None:
        dmap = maps[disk_index]
        for i in range(0, len(data), block):
            dmap.set((offset + i) // block, xxhash.xxh3_128_digest(data[i : i + block]))

    last_saved = [time.monotonic()]

    def on_progress(progress: IRProgress) -> None:
        # Persisted now and then for `frctl replication status` / `wait` to show.
        s.ir_bytes_done = progress.bytes_done
        s.ir_bytes_total = progress.bytes_total
        if time.monotonic() - last_saved[0] >= IR_PROGRESS_SECONDS:
            last_saved[0] = time.monotonic()
            vm.save()

    if decision.sends:
        await client.send_ir(
            vm.vmid,
            vm.images,
            start=decision.start,
            on_block=on_block,
            on_progress=on_progress,
            limiter=vm.limiter(),
        )
    if decision.maps_from_replica:
        await maps_from_replica(vm, client, decision.start)
    vm.save_maps()
    s.ir_state = IRStage.COMPLETE
    s.ir_bytes_done = s.ir_bytes_total = sum(d.size for d in vm.disks)
    s.sequence = 0
    s.last_replicated_at = time.time()
    vm.save()
    log.info("IR of %s complete", s.name)


async def maps_from_replica(vm: VMRecord, client: RecoveryClient, start: tuple[int, int]) -> None:
    """Fill the digest maps for what an earlier, interrupted IR sent, from the replica.

    Digesting our images instead would be wrong: they may have changed since those
    blocks were sent, and the map would then claim content the replica never got
    (a kill mid-IR, writes, and the replica silently diverged)."""
    block = vm.state.block_size
    disks = vm.disks
    for disk_index in range(min(start[0] + 1, len(disks))):
        end = disks[disk_index].size if disk_index < start[0] else start[1]
        blocks = math.ceil(end / block)
        dmap = vm.maps[disk_index]
        for first in range(0, blocks, fp.limits.MAX_DIGESTS):
            count = min(fp.limits.MAX_DIGESTS, blocks - first)
            answer = await client.digest_map(vm.vmid, disk_index, block, first * block, count)
            digests = answer.digests
            for i in range(len(digests) // DIGEST_SIZE):
                dmap.set(first + i, digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])
