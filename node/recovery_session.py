"""The replication session of one authorized connection to the recovery server.

The recovery server (``recovery_server.py``) accepts a connection, checks TLS and
authorization, and hands it here; the session then runs the conversation of
``docs/protocol.md`` on the replica storage:

* RelationshipCreate makes the replica (bound to the primary's trust group);
  RelationshipOpen carries one on. A VM this server does not hold gets VM_NOT_HERE (a
  primary that talks to a broker asks it again), a deleted one VM_DELETED, a primary of
  another trust group NOT_AUTHORIZED. A VM open on another connection gets BUSY.
* IR chunks are written straight into the sparse images; progress is made durable every
  ``IR_CHECKPOINT_BYTES`` and at IREnd, so a restarted server tells the primary where to
  resume (RelationshipAccepted.resume_disk/resume_offset). IR chunks must come in
  ascending (disk, offset) order for the resume point to advance.
* A delta batch is journaled as its chunks arrive (frproto has already checked each
  chunk's digest and bounds), then applied whole at BatchEnd and only then acknowledged.
  A batch already applied is acknowledged again without being applied; a gap is refused
  with OUT_OF_SEQUENCE at BatchEnd (refusing earlier would have to close the connection).
* RelationshipDelete removes the open relationship's replica (images, journal, recovery
  points) without a tombstone: the primary itself asked, so seeding the VM again later is
  its choice. A cluster node then has the cluster forget the VM (``on_deleted``); only
  then is the VM let go and the Ack sent. A failure is refused (the relationship stays
  open; if only the cluster's part failed, asking again retries just that).

What the session needs of the server is :class:`SessionHost`, so this module does not
import the server's.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import trio

import frproto as fp
from frlink.authz import Grant
from frlink.connections import ANSWERING_STATES
from frproto.trio_io import FramedStream, keep_alive, linger_and_close
from node.storage import AlreadyApplied, BatchWriter, Replica, ReplicaStore

from .config import RecoveryServerConfig
from .ir_writes import IRWriteQueue
from .metrics import ServerMetrics, failure_reason

log = logging.getLogger("frrep.recovery")

#: ``await deleted(vmid)``: after a RelationshipDelete removed the VM's replica here and
#: before it is acknowledged (a cluster node removes the VM's record); raises a
#: ReplicationError to refuse the delete.
DeletedHook = Callable[[uuid.UUID], Awaitable[None]]

#: IR progress is made durable at least this often (and at IREnd).
IR_CHECKPOINT_BYTES = 256 * 1024 * 1024


class SessionHost(Protocol):
    """What a session uses of the server that accepted its connection
    (:class:`node.recovery_server.RecoveryServer`)."""

    config: RecoveryServerConfig
    recovery_type: fp.RecoveryType
    on_deleted: DeletedHook | None

    def hold(self, vmid: uuid.UUID) -> bool:
        """Take the VM for this session; False if another session (or task) has it."""
        ...

    def release(self, vmid: uuid.UUID) -> None: ...

    def forget(self, vmid: uuid.UUID) -> None:
        """Drop any open handle on the VM's replica, in every store."""
        ...

    async def check_owner(self, vmid: uuid.UUID, grant: Grant) -> Grant | None:
        """Refuse a VM this node does not own; a grant to use instead, or None."""
        ...

    async def store_for(self, storage: Path) -> ReplicaStore:
        """The replica store at ``storage``, opened (and recovered) on first use."""
        ...


class Session:
    """The replication session of one authorized connection."""

    def __init__(
        self,
        server: SessionHost,
        conn: FramedStream,
        grant: Grant,
        store: ReplicaStore,
        *,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.server = server
        self.metrics = metrics
        self.conn = conn
        self.grant = grant
        self.connection_grant = grant  # what the certificate was granted; grant may differ per VM
        self.store = store
        self.replica: Replica | None = None
        #: The VM this session holds (``SessionHost.hold``): its open relationship's.
        self.claimed: uuid.UUID | None = None
        #: The open relationship's replica was removed by a RelationshipDelete that is not
        #: acknowledged yet (``on_deleted`` failed): asking again retries only that part.
        self.removed = False
        self.batch: BatchWriter | None = None
        self.batch_refusal: fp.FrprotoError | None = None
        self.ir_unsynced = 0
        self.ir_cursor = (0, 0)
        #: Between IRBegin and IREnd (a connection lost then lost part of an IR).
        self.ir_open = False
        self.ir_writes: IRWriteQueue  # made by run(), in the session's nursery

    def release(self) -> None:
        if self.batch is not None:
            self.batch.abort()
            self.batch = None
        self._let_go()

    def _let_go(self) -> None:
        """Give back the VM this session holds (no relationship is open any more)."""
        if self.claimed is not None:
            self.server.release(self.claimed)
        self.replica, self.claimed, self.removed = None, None, False

    async def run(self) -> None:
        handlers: dict[type[Any], Callable[[Any], Any]] = {
            fp.RelationshipCreate: self.on_create,
            fp.RelationshipOpen: self.on_open,
            fp.IRBegin: self.on_ir_begin,
            fp.IREnd: self.on_ir_end,
            fp.BatchBegin: self.on_batch_begin,
            fp.BatchEnd: self.on_batch_end,
            fp.DigestMapRequest: self.on_digest_request,
            fp.RelationshipDelete: self.on_delete,
        }
        failure: Exception | None = None
        pinging = trio.CancelScope()

        async def ping() -> None:
            # While the primary awaits an answer we work on (an IREnd's or a batch's
            # durable write, a delete), a Keepalive now and then (TIM-9).
            with pinging:
                await keep_alive(
                    self.conn, self.server.config.connections.keepalive, states=ANSWERING_STATES
                )

        async with trio.open_nursery() as nursery:
            self.ir_writes = IRWriteQueue(nursery)
            nursery.start_soon(ping)
            try:
                await self._serve(handlers)
            except Exception as exc:
                failure = exc
            finally:
                pinging.cancel()
        if failure is not None:
            # Re-raised bare once the queued writes are done, so that the caller sees
            # the peer's or the transport's error, not an ExceptionGroup.
            raise failure

    async def _serve(self, handlers: dict[type[Any], Callable[[Any], Any]]) -> None:
        while True:
            try:
                event = await self.conn.next_event()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if self.batch is None and self.batch_refusal is None and not self.ir_open:
                    # Gone between two messages, every one answered: how a primary ends
                    # its cycle, not a failure (none is counted).
                    log.info("the peer closed the connection (%s)", exc)
                    return
                raise
            if isinstance(event, fp.Chunk):
                await self.on_chunk(event)  # the hot path
                del event  # its data views the frame buffer, which the next frame reuses
                continue
            if isinstance(event, (fp.ConnectionClosed, fp.Error)):
                return
            handler = handlers.get(type(event))
            if handler is None:
                continue  # Keepalive, UnknownMessage
            try:
                await handler(event)
            except fp.ReplicationError as exc:
                log.info("refused %s: %s", type(event).__name__, exc)
                if self.metrics is not None:
                    self.metrics.failed(failure_reason(exc))
                await self.conn.send_error(exc)
                if self.conn.connection.state is fp.State.MUST_CLOSE:
                    await linger_and_close(self.conn.stream)
                    return

    # -- relationships -------------------------------------------------------------------

    def _take(self, replica: Replica) -> None:
        self._let_go()
        if not self.server.hold(replica.vmid):
            raise fp.Busy(f"VM {replica.vmid} is being replicated on another connection")
        self.replica, self.claimed = replica, replica.vmid

    async def _accept(self, replica: Replica, generation: int = 0) -> None:
        if replica.failed_over:
            # After a failover the VM runs from this replica: its former primary must
            # never write to it again (no split brain).
            raise fp.NotAuthorized(
                f"VM {replica.vmid} was failed over to this site (generation "
                f"{replica.generation}): replication from its former primary is refused"
            )
        if generation and generation != replica.generation:
            raise fp.NotAuthorized(
                f"VM {replica.vmid}: the primary knows generation {generation}, the "
                f"relationship is at {replica.generation}"
            )
        self._take(replica)
        disk, offset = replica.ir_cursor
        await self.conn.send(
            fp.RelationshipAccepted(
                replica.vmid,
                replica.disks,
                generation=replica.generation,
                ir_state=replica.ir_state,
                applied_sequence=replica.applied_sequence,
                resume_disk=disk,
                resume_offset=offset,
            )
        )

    def _check_deleted(self, vmid: uuid.UUID) -> None:
        if self.store.is_deleted(vmid):
            raise fp.VMDeleted(f"the replica of {vmid} was deleted by an administrator")

    async def _check_owner(self, vmid: uuid.UUID) -> None:
        override = await self.server.check_owner(vmid, self.connection_grant)
        grant = override or self.connection_grant
        if grant != self.grant:
            self.grant = grant
            self.store = await self.server.store_for(grant.storage)

    async def on_create(self, msg: fp.RelationshipCreate) -> None:
        self._let_go()  # sending it closed any open relationship (SM-7), refused or not
        await self._check_owner(msg.vmid)
        self._check_deleted(msg.vmid)
        identity = self.grant.identity
        if self.store.exists(msg.vmid):
            replica = self.store.open(msg.vmid)
            self.server.config.authorization.check_binding(
                identity, replica.trust_group, f"the replica of {msg.vmid}"
            )
            if replica.disks != msg.disks:
                raise fp.AlreadyExists(f"a replica of {msg.vmid} with other disks exists")
            await self._accept(replica)  # a primary resending its create after a restart
            return
        replica = await trio.to_thread.run_sync(
            partial(
                self.store.create,
                msg.vmid,
                name=msg.vm_name,
                config=msg.config,
                disks=msg.disks,
                primary=identity.name,
                trust_group=identity.trust_group,
            )
        )
        log.info("created replica %s (%s) for %s", msg.vmid, msg.vm_name, identity.name)
        await self._accept(replica)

    async def on_open(self, msg: fp.RelationshipOpen) -> None:
        self._let_go()  # sending it closed any open relationship (SM-7), refused or not
        await self._check_owner(msg.vmid)
        self._check_deleted(msg.vmid)
        if not self.store.exists(msg.vmid):
            name = self.server.config.name
            if self.server.recovery_type is fp.RecoveryType.CLUSTER_NODE:
                # It may live on another node: the primary asks the broker again.
                raise fp.VMNotHere(f"{name} does not hold VM {msg.vmid}")
            raise fp.UnknownVM(f"{name} holds no replica of VM {msg.vmid}")
        replica = self.store.open(msg.vmid)
        self.server.config.authorization.check_binding(
            self.grant.identity, replica.trust_group, f"the replica of {msg.vmid}"
        )
        await self._accept(replica, msg.generation)

    async def on_delete(self, msg: fp.RelationshipDelete) -> None:
        vmid = msg.vmid  # frproto checked that it is the open relationship's
        if not self.removed:
            self._current()
            # Still this node's to remove (a cluster node: not moved or deleted meanwhile).
            await self._check_owner(vmid)
            await self.ir_writes.drain()
            try:
                await trio.to_thread.run_sync(partial(self.store.delete, vmid, tombstone=False))
            except BaseException:
                self._after_failed_delete(vmid)
                raise
            self.server.forget(vmid)
            self.replica, self.removed = None, True
            log.info("removed replica %s (its primary %s asked)", vmid, self.grant.identity.name)
        if self.server.on_deleted is not None:
            # The VM stays claimed meanwhile: no other connection re-creates it before the
            # cluster has forgotten it.
            await self.server.on_deleted(vmid)
        self._let_go()
        await self.conn.send(fp.Ack(vmid, fp.AckKind.RELATIONSHIP_DELETED, 0))

    def _after_failed_delete(self, vmid: uuid.UUID) -> None:
        """A delete failed (it is refused): open the replica again so that the relationship
        goes on (the store closed it); if it is gone all the same, only the rest is left."""
        self.replica = None
        try:
            if self.store.exists(vmid):
                self.replica = self.store.open(vmid)
            else:
                self.removed = True
        except fp.FrprotoError as exc:
            log.error("replica %s after a failed delete: %s", vmid, exc)

    # -- initial replication --------------------------------------------------------------

    def _current(self) -> Replica:
        if self.replica is None:
            # frproto allows these only inside a relationship: its replica was lost by a
            # delete that failed half-way.
            raise fp.InternalError("the replica of this relationship is gone")
        return self.replica

    async def on_ir_begin(self, msg: fp.IRBegin) -> None:
        replica = self._current()
        await trio.to_thread.run_sync(replica.begin_ir, msg.sequence)
        self.ir_open = True
        self.ir_unsynced = 0
        self.ir_cursor = (msg.start_disk, msg.start_offset)

    async def on_chunk(self, chunk: fp.Chunk) -> None:
        data = None if chunk.is_zero else chunk.data
        if data is not None and self.metrics is not None:
            self.metrics.received_bytes += chunk.length
        if self.batch is not None:
            if self.batch_refusal is None:
                self.batch.add(chunk.disk_index, chunk.offset, data, length=chunk.length)
            return
        if self.batch_refusal is not None:
            return  # draining a refused (or already applied) batch
        replica = self._current()
        await self.ir_writes.write(
            replica, chunk.disk_index, chunk.offset, data, length=chunk.length
        )
        end = (chunk.disk_index, chunk.offset + chunk.length)
        self.ir_cursor = max(self.ir_cursor, end)
        self.ir_unsynced += chunk.length
        if self.ir_unsynced >= IR_CHECKPOINT_BYTES:
            # The cursor may only cover chunks that are on disk: drain the queued writes
            # first. A synchronous checkpoint keeps the order simple (once per 256 MiB).
            await self.ir_writes.drain()
            replica.checkpoint_ir(*self.ir_cursor)
            self.ir_unsynced = 0

    async def on_ir_end(self, msg: fp.IREnd) -> None:
        replica = self._current()
        await self.ir_writes.drain()
        await trio.to_thread.run_sync(replica.complete_ir, msg.sequence)
        self.ir_open = False
        log.info("IR of %s complete at sequence %d", replica.vmid, msg.sequence)
        await self.conn.send(fp.Ack(replica.vmid, fp.AckKind.IR_COMPLETE, msg.sequence))

    # -- delta batches --------------------------------------------------------------------

    async def on_batch_begin(self, msg: fp.BatchBegin) -> None:
        replica = self._current()
        self.batch_refusal = None
        try:
            self.batch = replica.begin_batch(msg.sequence, msg.base_sequence, msg.captured_at_ms)
        except AlreadyApplied:
            self.batch_refusal = _AlreadyApplied(f"batch {msg.sequence} already applied")
        except fp.ReplicationError as exc:
            self.batch_refusal = exc  # told at BatchEnd, where a refusal keeps the connection

    async def on_batch_end(self, msg: fp.BatchEnd) -> None:
        replica = self._current()
        refusal, self.batch_refusal = self.batch_refusal, None
        batch, self.batch = self.batch, None
        if isinstance(refusal, _AlreadyApplied):
            applied = replica.applied_digest(msg.sequence)
            if applied and applied != msg.aggregate_digest.hex():
                # The same sequence with other content: the primary lost track of what it
                # sent (acknowledging it would lose these changes without a trace).
                raise fp.OutOfSequence(
                    f"batch {msg.sequence} of {replica.vmid} was applied with other content "
                    "(a different aggregate digest): the primary must resynchronize"
                )
            log.info("batch %d of %s was already applied: ack again", msg.sequence, replica.vmid)
        elif refusal is not None:
            raise refusal
        else:
            assert batch is not None
            started = time.monotonic()
            try:
                await trio.to_thread.run_sync(batch.commit, msg.aggregate_digest)
            except BaseException:
                batch.abort()
                raise
            if self.metrics is not None:
                self.metrics.batch_apply.observe(time.monotonic() - started)
        await self.conn.send(fp.Ack(replica.vmid, fp.AckKind.BATCH_APPLIED, msg.sequence))

    async def on_digest_request(self, msg: fp.DigestMapRequest) -> None:
        replica = self._current()
        count = self.conn.connection.digest_map_size(msg)
        digests = await trio.to_thread.run_sync(
            replica.digests, msg.disk_index, msg.offset, msg.block_size, count
        )
        await self.conn.send(
            fp.DigestMap(msg.vmid, msg.disk_index, msg.block_size, msg.offset, digests)
        )


class _AlreadyApplied(fp.FrprotoError):
    """Internal marker: the batch being received was applied before (re-ack it)."""
