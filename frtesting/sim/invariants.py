"""The invariants a simulated run is checked against (the numbers are issue 19's).

* #1: once quiet, every replica equals its primary's disks at the last acknowledged
  batch, block for block (and nothing is left pending);
* #4: every primary converges without a person (no VM halted);
* #5: no acknowledged batch lost through any number of restarts (checked after every
  restart of the recovery server, and at the end);
* #6: every kept recovery point opens at a batch boundary: its content is the primary's
  disks at the capture of that sequence;
* #8: no batch applied twice with different content under one sequence (the digest a
  recovery point records for a sequence never changes).

Each check returns the violations as ``"#n vm: what"`` lines (empty: it holds).
"""

from __future__ import annotations

import frproto as fp
from node.recovery_server import RecoveryServer
from node.storage.replica import Replica

from .world import SimVM, World


async def _replica(server: RecoveryServer, world: World, vm: SimVM) -> Replica | None:
    store = await server.store_for(world.storage)
    if not store.exists(vm.vmid):
        return None
    return store.open(vm.vmid)


def _sizes(vm: SimVM) -> list[int]:
    return [p.stat().st_size for p in vm.images]


async def check_durable(world: World, digests: dict[tuple[str, int], str]) -> list[str]:
    """#5, #6 and #8 on the server as it is now (just restarted, or at the end)."""
    server = world.server
    assert server is not None
    failures = []
    for vm in world.vms:
        try:
            failures += await _check_durable(server, world, vm, digests)
        except fp.NoSpace:
            # The disk is full (a fault): reading the replica needs its pending recovery,
            # which cannot run yet; the server refuses the VM meanwhile. The next check
            # (the next restart, the end) sees it.
            continue
    return failures


async def _check_durable(
    server: RecoveryServer, world: World, vm: SimVM, digests: dict[tuple[str, int], str]
) -> list[str]:
    failures: list[str] = []
    replica = await _replica(server, world, vm)
    if replica is None:
        if vm.acked >= 0:
            failures.append(f"#5 {vm.name}: replica gone, sequence {vm.acked} was acknowledged")
        return failures
    if vm.acked >= 0 and (
        replica.ir_state != fp.IRState.COMPLETE or replica.applied_sequence < vm.acked
    ):
        failures.append(
            f"#5 {vm.name}: replica at {replica.applied_sequence} "
            f"(IR {replica.ir_state.name}), {vm.acked} was acknowledged"
        )
    return failures + check_points(vm, replica, digests)


def check_points(vm: SimVM, replica: Replica, digests: dict[tuple[str, int], str]) -> list[str]:
    """#6 and #8 on one replica: each kept recovery point is the primary's disks at the
    capture of its sequence, and records the digest every earlier look saw for that
    sequence (``digests``, kept across restarts, and across nodes in the cluster)."""
    failures: list[str] = []
    for point in replica.recovery_points():
        key = (vm.name, point.sequence)
        if point.digest:
            seen = digests.setdefault(key, point.digest)
            if seen != point.digest:
                failures.append(
                    f"#8 {vm.name}: sequence {point.sequence} applied as {seen[:12]} "
                    f"and as {point.digest[:12]}"
                )
        expected = vm.contents.get(point.sequence)
        if expected is None:
            continue
        for disk, size in enumerate(_sizes(vm)):
            try:
                got = replica.read(disk, 0, size, at_sequence=point.sequence)
            except fp.OutOfSequence:
                continue  # pruned meanwhile
            if got != expected[disk]:
                failures.append(
                    f"#6 {vm.name}: recovery point {point.sequence} of disk {disk} is not "
                    "the primary's disk at that capture"
                )
    return failures


async def check_quiet(world: World) -> list[str]:
    """#1 and #4 once the faults stopped and the system is quiet."""
    server = world.server
    assert server is not None
    failures = []
    for vm in world.vms:
        r = vm.replicator
        if r is not None and r.state.halted is not None:
            failures.append(f"#4 {vm.name}: halted: {r.state.halted}")
        await server.settle(vm.vmid)
        replica = await _replica(server, world, vm)
        if replica is None:
            failures.append(f"#1 {vm.name}: no replica once quiet")
            continue
        if r is not None and r.pending.cycles():
            failures.append(f"#1 {vm.name}: {len(r.pending.cycles())} cycles still pending")
        if replica.ir_state != fp.IRState.COMPLETE:
            failures.append(f"#1 {vm.name}: IR {replica.ir_state.name} once quiet")
            continue
        for disk, (path, size) in enumerate(zip(vm.images, _sizes(vm), strict=True)):
            if replica.read(disk, 0, size) != path.read_bytes():
                failures.append(f"#1 {vm.name}: disk {disk} differs from the primary's")
    return failures
