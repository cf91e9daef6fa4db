"""How a node learns what is asked of its replicas: it follows the VM records.

Administrators and the broker ask a node to do something with a replica it owns by
writing the VM's record (a move: ``migrate_to``; a failover: ``failover``). The owner
finds such records by a full read at start and every ``FULL_SCAN_SECONDS`` (a failed
request is retried there), and by a watch of the records in between, so a request is
seen within the store's watch latency.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from broker.records import Keys, RecordError, VMRecord
from broker.store import ClusterStore, EventKind, KeyValue, StoreError

if TYPE_CHECKING:
    from node.recovery_server import RecoveryServer

log = logging.getLogger("frrep.node")

#: How often every VM record is read again.
FULL_SCAN_SECONDS = 5.0
#: Pause after a failed read or watch of the store, or a failed request.
RETRY_SECONDS = 2.0
#: How long a request waits for the VM's replication session to end.
HOLD_TIMEOUT = 30.0

#: Picks, among records, those that ask this node for something (with their revision).
Select = Callable[[list[KeyValue]], list[tuple[VMRecord, int]]]
#: Carries out one request; it handles its own failures (a later scan retries).
Act = Callable[[VMRecord, int], Awaitable[None]]


def owned_requests(
    node_name: str, maybe: Callable[[bytes], bool], asks: Callable[[VMRecord], bool]
) -> Select:
    """A :data:`Select` for the records of the VMs ``node_name`` owns that ``asks``.

    ``maybe`` looks at a stored record's bytes first: most records ask nothing of this
    node, and they are skipped unparsed (the agent shares its event loop with the broker,
    whose queries must not wait for thousands of JSON records)."""
    me = node_name.encode()

    def select(kvs: list[KeyValue]) -> list[tuple[VMRecord, int]]:
        out = []
        for kv in kvs:
            if me not in kv.value or not maybe(kv.value):
                continue
            try:
                vm = VMRecord.from_json(kv.value)
            except RecordError:
                continue
            if vm.owner == node_name and asks(vm):
                out.append((vm, kv.mod_revision))
        return out

    return select


async def follow_requests(store: ClusterStore, keys: Keys, select: Select, act: Act) -> None:
    """Carry out, one at a time and until cancelled, the requests ``select`` finds."""
    while True:
        try:
            kvs, revision = await store.range(keys.vms)
            for vm, mod in select(kvs):
                await act(vm, mod)
            with trio.move_on_after(FULL_SCAN_SECONDS):
                async with store.watch(keys.vms, start_revision=revision + 1) as events:
                    async for event in events:
                        if event.kind is EventKind.PUT:
                            for vm, mod in select([event.kv]):
                                await act(vm, mod)
        except StoreError as exc:
            log.warning("following the VM records: %s", exc)
            await trio.sleep(RETRY_SECONDS)


@contextlib.asynccontextmanager
async def held(server: RecoveryServer, vmid: uuid.UUID) -> AsyncIterator[bool]:
    """Hold the VM on the node's recovery server for the block (a primary's session for
    it gets BUSY meanwhile, and retries), its last acknowledged batch applied; yields
    False, holding nothing, when the VM's session did not end within ``HOLD_TIMEOUT``."""
    with trio.move_on_after(HOLD_TIMEOUT) as waited:
        while not server.hold(vmid):
            await trio.sleep(0.05)
    if waited.cancelled_caught:
        yield False
        return
    try:
        # The session may have ended with its last batch acknowledged and still being
        # applied: the block sees the replica whole.
        await server.settle(vmid)
        yield True
    finally:
        server.release(vmid)
