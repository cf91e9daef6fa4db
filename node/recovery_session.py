"""The replication session of one authorized connection to the recovery server.

The recovery server (``recovery_server.py``) accepts a connection, checks TLS and
authorization, and hands it here; the session then runs the conversation of
``docs/protocol.md`` on the replica storage:

* RelationshipCreate makes the replica (bound to the primary's trust group);
  RelationshipOpen carries one on. Both look the VMID up in every storage location of
  the server first (REP-33): a replica held in another location is this VM's, so a
  primary of another trust group is refused NOT_AUTHORIZED and nothing is created; a
  VMID held in two locations is refused BUSY until an operator resolves it (REP-34).
  A VM this server does not hold gets VM_NOT_HERE (a primary that talks to a broker
  asks it again), a deleted one VM_DELETED, a primary of another trust group
  NOT_AUTHORIZED. A VM open on another connection gets BUSY. A create
  resent with the replica's disks opens it and keeps the create's VM name and config
  blob (a rename, REP-28; a cluster node records the name, ``on_renamed``).
* IR chunks are written straight into the sparse images; progress is made durable every
  ``IR_CHECKPOINT_BYTES``, when the connection ends during the IR (REP-27) and at IREnd,
  so a restarted server tells the primary where to resume
  (RelationshipAccepted.resume_disk/resume_offset): the end of what the IR covered without
  a gap from its resume point (:class:`node.ir_coverage.IRCoverage`), so chunks
  out of ascending order advance it only once the gap before them is filled. An IR is
  completed only when it covered every byte from its resume point (REP-32), and refused
  at IREnd otherwise (OUT_OF_SEQUENCE, the replica still IN_PROGRESS at that point), as
  is an IR that starts past the resume point (REP-31) or an IR for a replica whose IR is
  complete (EXISTS, REP-30): a refusal sent before the IREnd would close the connection
  (ERR-6). Where chunks overlap, the later one wins (CHK-25).
* A delta batch is journaled as its chunks arrive (frproto has already checked each
  chunk's digest and bounds); at BatchEnd the journal is made durable and the batch is
  acknowledged, then applied (undo capture, images, state) off the acknowledgement path,
  in the session's nursery: the pipelined commit (``docs/storage.md``). Whatever reads the
  replica next (the next batch, a digest map, a new relationship's RelationshipAccepted,
  a failover) waits for that apply, so it sees only applied, whole batches.
  A batch already applied is acknowledged again without being applied; a gap is refused
  with OUT_OF_SEQUENCE at BatchEnd (refusing earlier would have to close the connection).
* RelationshipDelete removes the open relationship's replica (images, journal, recovery
  points) without a tombstone: the primary itself asked, so seeding the VM again later is
  its choice. A cluster node then has the cluster forget the VM (``on_deleted``); only
  then is the VM let go and the Ack sent. A failure is refused (the relationship stays
  open; if only the cluster's part failed, asking again retries just that).
* FailoverAsk (1.1): a cluster node whose VM has a planned failover asked at the cluster
  (``planned_asks``) says so just before RelationshipAccepted, on a connection at 1.1;
  the primary answers with a FailoverRequest or a FailoverDecline, which is recorded.
* FailoverRequest (1.1, a planned failover): the replica is checked to hold the primary's
  final state and failed over at a new generation (``node/takeover.py``); then
  ``on_failed_over`` (reverse replication, the cluster's record) and FailoverDone. A
  replica that differs is refused (OUT_OF_SEQUENCE), nothing changed.
* A RelationshipOpen of a replica failed over by a planned takeover, presenting the
  generation before it (the former primary lost the FailoverDone), opens it in
  repeat-only mode (FOV-11, :func:`node.takeover.repeat_admissible`): the exact repeat
  of the request is answered FailoverDone again, changing nothing; anything else is
  refused NOT_AUTHORIZED.

Every refusal and every failure of a handler goes to the peer as an Error built by
:func:`frlink.wire_errors.wire_error`: no local path or other internal in its text
(ERR-11), and INTERNAL with an incident id for a failure of our own (ERR-12).

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
from frlink.connections import ANSWERING_STATES, peer_address
from frlink.wire_errors import wire_error
from frproto.trio_io import FramedStream, keep_alive, linger_and_close
from node.storage import AlreadyApplied, BatchWriter, Replica, ReplicaStore

from .config import RecoveryServerConfig
from .ir_coverage import IRCoverage
from .ir_writes import IRWriteQueue
from .metrics import ServerMetrics, failure_reason
from .takeover import TakenOver, check_exact_repeat, repeat_admissible, take_over

log = logging.getLogger("frrep.recovery")

#: ``await deleted(vmid)``: after a RelationshipDelete removed the VM's replica here and
#: before it is acknowledged (a cluster node removes the VM's record); raises a
#: ReplicationError to refuse the delete.
DeletedHook = Callable[[uuid.UUID], Awaitable[None]]
#: ``await failed_over(taken)``: after a FailoverRequest failed the VM over here, before
#: FailoverDone is sent (reverse replication starts; a cluster node records the new
#: direction); best effort, never refuses (the failover is done).
FailedOverHook = Callable[[TakenOver], Awaitable[None]]


class PlannedAsks(Protocol):
    """A cluster node's planned failovers asked at the cluster (``frctl cluster failover
    --planned``; ``frcluster/planned_ask.py``): which VMs' primaries to ask (FailoverAsk,
    protocol 1.1) and where a primary's FailoverDecline goes."""

    def asked(self, vmid: uuid.UUID) -> bool:
        """A planned failover of ``vmid`` is pending: ask its primary."""
        ...

    async def declined(self, vmid: uuid.UUID, primary: str, reason: str) -> None:
        """The primary declined (FOV-18): recorded, the VM is asked no more."""
        ...


#: ``await renamed(vmid, name)``: after a resent RelationshipCreate gave the VM's replica
#: another name (a cluster node updates the VM's record); best effort, never refuses.
RenamedHook = Callable[[uuid.UUID, str], Awaitable[None]]

#: States in which no Error can be sent any more (a failure there just ends the session).
_SILENT = frozenset({fp.State.MUST_CLOSE, fp.State.CLOSED})

#: IR progress is made durable at least this often (and at IREnd, and when the connection
#: ends during the IR): an interrupted IR resends at most this much after a crash (REP-27).
IR_CHECKPOINT_BYTES = 256 * 1024 * 1024


class SessionHost(Protocol):
    """What a session uses of the server that accepted its connection
    (:class:`node.recovery_server.RecoveryServer`)."""

    config: RecoveryServerConfig
    recovery_type: fp.RecoveryType
    on_deleted: DeletedHook | None
    on_renamed: RenamedHook | None
    on_failed_over: FailedOverHook | None
    #: A cluster node's planned failovers asked at the cluster; None: never asks.
    planned_asks: PlannedAsks | None

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

    #: Held from a VMID's look-up across every location to the creation of its replica.
    creating: trio.Lock

    async def locate(self, vmid: uuid.UUID, default: ReplicaStore) -> ReplicaStore:
        """The store holding ``vmid`` over every location served, else ``default``;
        BUSY when two hold it (REP-33, REP-34)."""
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
        self.batch_began = 0.0  # when the BatchBegin of the batch being received came
        self.batch_began_cpu = 0.0  # this (the Trio) thread's CPU time then
        self.ir_unsynced = 0
        #: What the IR in progress has covered (None while none is, or when it is refused).
        self.ir_coverage: IRCoverage | None = None
        #: The refusal of the IR in progress, told at its IREnd (ERR-6); its chunks are
        #: drained unwritten.
        self.ir_refusal: fp.ReplicationError | None = None
        #: Between IRBegin and IREnd (a connection lost then lost part of an IR).
        self.ir_open = False
        #: The open relationship is in repeat-only mode (FOV-11): only the exact repeat
        #: of the planned failover request that failed the VM over is answered.
        self.repeat_only = False
        self.ir_writes: IRWriteQueue  # made by run(), in the session's nursery
        self.nursery: trio.Nursery  # made by run(): the applies after an Ack run in it

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
        self.repeat_only = False

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
            fp.FailoverRequest: self.on_failover,
            fp.FailoverDecline: self.on_decline,
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
            self.nursery = nursery
            self.ir_writes = IRWriteQueue(nursery)
            nursery.start_soon(ping)
            try:
                await self._serve(handlers)
            except Exception as exc:
                failure = exc
            finally:
                pinging.cancel()
            if self.ir_open:
                await self._keep_ir_progress()
            # The apply of the last acknowledged batch may still run in this nursery. The
            # VM is let go now all the same: the primary's next connection must not find
            # it BUSY, and whatever it does first waits for that apply (the replica's lock).
            self.release()
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
            what = type(event).__name__
            try:
                if isinstance(event, fp.Chunk):
                    await self.on_chunk(event)  # the hot path
                    del event  # its data views the frame buffer, which the next frame reuses
                    continue
                if isinstance(event, (fp.ConnectionClosed, fp.Error)):
                    return
                handler = handlers.get(type(event))
                if handler is None:
                    continue  # Keepalive, UnknownMessage
                await handler(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise  # the transport is gone: nobody to tell
            except Exception as exc:
                # A refusal, or a failure of our own (storage, a bug): the peer is told
                # in an Error that carries no internals (ERR-11); the detail is logged.
                if isinstance(exc, fp.ReplicationError):
                    log.info("refused %s: %s", what, exc)
                if self.conn.connection.state in _SILENT:
                    raise
                if self.metrics is not None:
                    self.metrics.failed(failure_reason(exc))
                await self.conn.send_error(wire_error(exc, log, what=what))
                if self.conn.connection.state is fp.State.MUST_CLOSE:
                    await linger_and_close(self.conn.stream)
                    return

    # -- relationships -------------------------------------------------------------------

    def _take(self, replica: Replica) -> None:
        self._let_go()
        if not self.server.hold(replica.vmid):
            raise fp.Busy(f"VM {replica.vmid} is being replicated on another connection")
        self.replica, self.claimed = replica, replica.vmid

    async def _accept(
        self,
        replica: Replica,
        generation: int = 0,
        *,
        identity: tuple[str, bytes] | None = None,
    ) -> None:
        if replica.failed_over:
            asking = self.grant.identity.name
            if generation and await trio.to_thread.run_sync(
                repeat_admissible, replica, generation, asking
            ):
                # Its former primary lost our FailoverDone: it may only ask again (FOV-11).
                self._take(replica)
                self.repeat_only = True
                await self._send_accepted(replica, generation)
                return
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
        if identity is not None:
            # A create resent with the replica's disks: its name and config blob are the
            # VM's now (renamed or reconfigured on the primary), kept before we answer.
            try:
                changed = await trio.to_thread.run_sync(replica.update_identity, *identity)
            except BaseException:
                self._let_go()  # refused: no relationship is open (SM-7)
                raise
            if changed:
                log.info("replica %s: VM name %r and config blob taken", replica.vmid, identity[0])
                if self.server.on_renamed is not None:
                    await self.server.on_renamed(replica.vmid, identity[0])
        # A batch acknowledged on an earlier connection may still be being applied: the
        # applied_sequence reported must include it (REP-12).
        await trio.to_thread.run_sync(replica.apply_committed)
        await self._ask_failover(replica.vmid)  # not in repeat-only mode: failed over
        await self._send_accepted(replica, replica.generation)

    async def _send_accepted(self, replica: Replica, generation: int) -> None:
        disk, offset = replica.ir_cursor
        await self.conn.send(
            fp.RelationshipAccepted(
                replica.vmid,
                replica.disks,
                generation=generation,
                ir_state=replica.ir_state,
                applied_sequence=replica.applied_sequence,
                resume_disk=disk,
                resume_offset=offset,
            )
        )

    def _repeat_only_refusal(self, what: str) -> fp.NotAuthorized | None:
        """In repeat-only mode (FOV-11), the refusal of anything but the repeat."""
        if not self.repeat_only:
            return None
        return fp.NotAuthorized(
            f"VM {self.claimed} was failed over to this site: its former primary may only "
            f"repeat its failover request, not send {what}"
        )

    async def _ask_failover(self, vmid: uuid.UUID) -> None:
        """Just before RelationshipAccepted: ask the primary for the VM's planned failover
        if one is pending (FailoverAsk, FOV-12), never on a connection at 1.0 (FOV-19)."""
        asks = self.server.planned_asks
        if asks is None or not asks.asked(vmid):
            return
        if (self.conn.connection.version_minor or 0) < 1:
            log.info("planned failover of %s pending: its primary speaks 1.0, not asked", vmid)
            return
        log.info("asking primary %s for the planned failover of %s", self.grant.identity.name, vmid)
        await self.conn.send(fp.FailoverAsk(vmid))

    async def on_decline(self, msg: fp.FailoverDecline) -> None:
        """The primary will not carry out the asked planned failover (frproto checked that
        it was asked on this connection, FOV-16): recorded; replication goes on."""
        name = self.grant.identity.name
        log.warning(
            "primary %s declined the planned failover of %s: %s", name, msg.vmid, msg.reason
        )
        if self.server.planned_asks is not None:
            await self.server.planned_asks.declined(msg.vmid, name, msg.reason)

    def _check_deleted(self, vmid: uuid.UUID) -> None:
        if self.store.is_deleted(vmid):
            raise fp.VMDeleted(f"the replica of {vmid} was deleted by an administrator")

    async def _check_owner(self, vmid: uuid.UUID, *, locate: bool = True) -> None:
        override = await self.server.check_owner(vmid, self.connection_grant)
        self.grant = override or self.connection_grant
        if locate:
            await self._locate(vmid)

    async def _locate(self, vmid: uuid.UUID) -> None:
        """The grant's store, or wherever else on this server the VM's replica is
        (REP-33): a replica in another location is still this VM's, bound to the trust
        group that created it (REP-9 then refuses a primary of another)."""
        store = await self.server.store_for(self.grant.storage)
        self.store = await self.server.locate(vmid, store)

    async def on_create(self, msg: fp.RelationshipCreate) -> None:
        self._let_go()  # sending it closed any open relationship (SM-7), refused or not
        # No other session may create this VM between the look-up in every location
        # and the creation (REP-33: one VMID, one replica on this server).
        await self._check_owner(msg.vmid, locate=False)
        async with self.server.creating:
            await self._locate(msg.vmid)
            self._check_deleted(msg.vmid)
            identity = self.grant.identity
            created = False
            if self.store.exists(msg.vmid):
                replica = self.store.open(msg.vmid)
            else:
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
                created = True
        if created:
            await self._accept(replica)
            return
        self.server.config.authorization.check_binding(
            identity, replica.trust_group, f"the replica of {msg.vmid}"
        )
        if replica.disks != msg.disks:
            raise fp.AlreadyExists(f"a replica of {msg.vmid} with other disks exists")
        # A primary resending its create after a restart, or after a rename (REP-28).
        await self._accept(replica, identity=(msg.vm_name, msg.config))

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
        refusal = self._repeat_only_refusal("a RelationshipDelete")
        if refusal is not None:
            raise refusal
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

    async def on_failover(self, msg: fp.FailoverRequest) -> None:
        replica = self._current()
        await self._check_owner(msg.vmid)  # a cluster node: still this node's VM
        await self.ir_writes.drain()
        if self.repeat_only:
            # Done already: answered again, nothing changed, no hook run again (FOV-11).
            generation = await trio.to_thread.run_sync(check_exact_repeat, replica, msg)
            self._let_go()
            await self.conn.send(fp.FailoverDone(msg.vmid, generation, msg.sequence))
            return
        generation = await trio.to_thread.run_sync(take_over, replica, msg)
        taken = TakenOver(
            msg.vmid,
            generation,
            msg.sequence,
            self.store.root,
            self.grant.identity.name,
            peer_address(getattr(self.conn.stream, "transport_stream", self.conn.stream)) or None,
            msg.reverse_port,
        )
        if self.server.on_failed_over is not None:
            try:
                await self.server.on_failed_over(taken)
            except Exception:
                # The failover is done and durable: say so; what follows is retried by hand.
                log.exception("after the planned failover of %s", msg.vmid)
        self._let_go()
        await self.conn.send(fp.FailoverDone(msg.vmid, generation, msg.sequence))

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
        self.ir_open = True
        self.ir_unsynced = 0
        self.ir_coverage, self.ir_refusal = None, None
        self.ir_refusal = self._repeat_only_refusal("an initial replication")
        if self.ir_refusal is not None:
            return
        # A refusal waits for the IREnd, where it leaves the connection usable (ERR-6).
        if replica.ir_state is fp.IRState.COMPLETE:
            self.ir_refusal = fp.AlreadyExists(
                f"replica {replica.vmid}: the initial replication is complete "
                f"(applied sequence {replica.applied_sequence})"
            )
            return
        resume = (0, 0)
        if replica.ir_state is fp.IRState.IN_PROGRESS and msg.sequence == replica.ir_sequence:
            resume = replica.ir_cursor  # as RelationshipAccepted reported it
        coverage = IRCoverage([d.size for d in replica.disks], resume)
        if coverage.position(msg.start_disk, msg.start_offset) > coverage.frontier:
            self.ir_refusal = fp.OutOfSequence(
                f"IR {msg.sequence} of {replica.vmid} starts at disk {msg.start_disk} offset "
                f"{msg.start_offset}, past its resume point (disk {resume[0]} offset "
                f"{resume[1]}): the bytes between would be missing"
            )
            return
        await trio.to_thread.run_sync(replica.begin_ir, msg.sequence)
        self.ir_coverage = coverage

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
        coverage = self.ir_coverage
        if coverage is None:
            return  # draining a refused IR
        replica = self._current()
        overlaps = coverage.add(chunk.disk_index, chunk.offset, chunk.length)
        if overlaps:
            # Writes in flight may land in any order: the later chunk is written only
            # after the earlier ones it may overlap, and its zeros too (CHK-25).
            await self.ir_writes.drain()
        await self.ir_writes.write(
            replica, chunk.disk_index, chunk.offset, data, length=chunk.length, overwrite=overlaps
        )
        self.ir_unsynced += chunk.length
        if self.ir_unsynced >= IR_CHECKPOINT_BYTES:
            # The cursor may only cover chunks that are on disk: drain the queued writes
            # first. A synchronous checkpoint keeps the order simple (once per 256 MiB).
            await self.ir_writes.drain()
            replica.checkpoint_ir(*coverage.cursor)
            self.ir_unsynced = 0

    async def _keep_ir_progress(self) -> None:
        """The connection ended during an IR: make what was received durable and record
        it as the resume point (REP-27), so that the primary resends none of it. A write
        that failed leaves the last checkpoint as it was."""
        replica, coverage = self.replica, self.ir_coverage
        if replica is None or coverage is None or self.ir_unsynced == 0:
            return  # no IR being written (refused, or nothing since the last checkpoint)
        cursor = coverage.cursor
        try:
            await self.ir_writes.drain()
            await trio.to_thread.run_sync(replica.checkpoint_ir, *cursor)
        except fp.FrprotoError as exc:
            log.warning(
                "IR of %s: progress not kept at the end of the connection: %s", replica.vmid, exc
            )
            return
        self.ir_unsynced = 0
        log.info("IR of %s interrupted: resumes at disk %d offset %d", replica.vmid, *cursor)

    async def on_ir_end(self, msg: fp.IREnd) -> None:
        replica = self._current()
        refusal, self.ir_refusal = self.ir_refusal, None
        coverage, self.ir_coverage = self.ir_coverage, None
        self.ir_open = False
        if refusal is not None:
            raise refusal
        assert coverage is not None
        await self.ir_writes.drain()
        if not coverage.complete:
            # Keep what was covered, from the resume point without a gap: the primary
            # resumes there (REP-13), in this conversation or the next.
            disk, offset = coverage.cursor
            await trio.to_thread.run_sync(replica.checkpoint_ir, disk, offset)
            raise fp.OutOfSequence(
                f"IR {msg.sequence} of {replica.vmid} did not cover its disks: the bytes "
                f"from disk {disk} offset {offset} on were not all received (the IR "
                "resumes there)"
            )
        await trio.to_thread.run_sync(replica.complete_ir, msg.sequence)
        log.info("IR of %s complete at sequence %d", replica.vmid, msg.sequence)
        await self.conn.send(fp.Ack(replica.vmid, fp.AckKind.IR_COMPLETE, msg.sequence))

    # -- delta batches --------------------------------------------------------------------

    async def on_batch_begin(self, msg: fp.BatchBegin) -> None:
        replica = self._current()
        self.batch_refusal = self._repeat_only_refusal("a delta batch")
        if self.batch_refusal is not None:
            return  # told at BatchEnd (the connection goes on)
        self.batch_began = time.time()
        self.batch_began_cpu = time.thread_time()
        try:
            # The previous batch's apply first (in a thread: it may hold the lock a while);
            # its failure is the new batch's refusal, and recovery retries it then.
            await trio.to_thread.run_sync(replica.apply_committed)
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
            timing = BatchTiming(
                msg.sequence,
                began=self.batch_began,
                received=time.time(),
                receive_cpu=time.thread_time() - self.batch_began_cpu,
            )
            started = time.monotonic()
            try:
                await trio.to_thread.run_sync(batch.make_durable, msg.aggregate_digest)
            except BaseException:
                batch.abort()
                raise
            timing.durable = time.time()
            await self.conn.send(fp.Ack(replica.vmid, fp.AckKind.BATCH_APPLIED, msg.sequence))
            timing.acked = time.time()
            self.nursery.start_soon(self._apply, replica, batch, timing, started)
            return
        await self.conn.send(fp.Ack(replica.vmid, fp.AckKind.BATCH_APPLIED, msg.sequence))

    async def _apply(
        self, replica: Replica, batch: BatchWriter, timing: BatchTiming, started: float
    ) -> None:
        """Apply an acknowledged batch (off the acknowledgement path). A failure is logged,
        not raised: the journal stays and recovery applies it before the replica's next
        batch or read (whose failure then reaches the primary)."""
        try:
            await trio.to_thread.run_sync(replica.apply_committed)
        except Exception:
            log.exception(
                "replica %s: the apply of acknowledged batch %d failed; its journal is kept "
                "and applied before the next batch or read",
                replica.vmid,
                timing.sequence,
            )
            return
        timing.applied = time.time()
        timing.undone = batch.undo_captured_at
        if self.metrics is not None:
            self.metrics.batch_apply.observe(time.monotonic() - started)
        log.info("%s", timing.line(replica.vmid))

    async def on_digest_request(self, msg: fp.DigestMapRequest) -> None:
        replica = self._current()
        refusal = self._repeat_only_refusal("a DigestMapRequest")
        if refusal is not None:
            raise refusal
        count = self.conn.connection.digest_map_size(msg)
        digests = await trio.to_thread.run_sync(
            replica.digests, msg.disk_index, msg.offset, msg.block_size, count
        )
        await self.conn.send(
            fp.DigestMap(msg.vmid, msg.disk_index, msg.block_size, msg.offset, digests)
        )


class BatchTiming:
    """When one batch passed each step on the recovery server (wall clock, ``time.time()``,
    so that bench/delta.py can line them up with the primary's): its BatchBegin and
    BatchEnd received, journal durable, Ack sent, undo data captured, applied. Logged as
    one line per batch (:data:`TIMING_FIELDS`, in that order), then ``receive_cpu``: the
    seconds of CPU the session's (Trio) thread ran between the BatchBegin and the
    BatchEnd, which says whether that thread bounds the batch's receipt."""

    __slots__ = (
        "acked",
        "applied",
        "began",
        "durable",
        "receive_cpu",
        "received",
        "sequence",
        "undone",
    )

    def __init__(self, sequence: int, *, began: float, received: float, receive_cpu: float) -> None:
        self.sequence = sequence
        self.began = began
        self.received = received
        self.receive_cpu = receive_cpu
        self.durable = self.acked = self.undone = self.applied = 0.0

    def line(self, vmid: uuid.UUID) -> str:
        times = " ".join(f"{k}={getattr(self, k):.6f}" for k in TIMING_FIELDS)
        return (
            f"batch {self.sequence} of {vmid} applied: timings {times} "
            f"receive_cpu={self.receive_cpu:.6f}"
        )


#: The fields of a batch's timings line, in the order they happen.
TIMING_FIELDS = ("began", "received", "durable", "acked", "undone", "applied")


class _AlreadyApplied(fp.FrprotoError):
    """Internal marker: the batch being received was applied before (re-ack it)."""
