"""The primary replicator: initial replication, then one delta batch per cycle, per VM.

A cycle:

1. **Capture.** The changed blocks come from the attached :class:`ChangeTracker` (the
   embedding hypervisor tool reports written ranges) or, with no tracker, from a scan that
   compares each block's XXH3 digest with the digest map of the last replicated state.
   Their data is copied into the on-disk :class:`PendingLog` as one cycle. *What the
   library expects of the embedding tool:* the disk images must not change during the
   capture (a paused VM, or images that are a snapshot); the ``before_capture`` /
   ``after_capture`` hooks bracket exactly that window. After it the VM may run: the
   cycle's data is in the pending log, a consistent point in time.
2. **Send.** Every pending cycle, oldest first, goes as one delta batch; the recovery
   server applies it whole and acknowledges. Only after the ack are its blocks recorded
   in the digest map and its data dropped from the pending log.
3. **Unreachable?** The cycle stays in the pending log (bounded on disk, not in memory)
   and the replicator retries with exponential backoff; cycles keep being captured until
   the bound is reached. Past the bound the log is marked overflowed, and the next cycle
   resynchronizes instead of capturing: never a silent full IR.

**Resynchronization** (:meth:`VMReplicator.resync`) runs by itself when the pending log
overflowed, when the tracker is *lost*, or when the state asks for it (``needs_resync``),
inside the resync window if one is set. **A clustering broker** at the configured target
is followed to the node that holds the VM; a replica an administrator deleted there halts
replication (:class:`ReplicationHalted`): never a new replica without a person
(``docs/primary-and-broker.md``).

:class:`VMReplicator` is the facade; it holds the VM's state and files and hands each
step to a room, giving it only what it needs (a :class:`~node.primary.record.VMRecord`):

* ``plan.py``: what a cycle does and sends (pure decisions);
* ``route.py``: the configured target, the broker, the node it names;
* ``initial.py``: the initial replication;
* ``delta.py``: capturing cycles into the pending log and sending them;
* ``resync.py`` / ``verify.py``: resynchronization, verification.

State (sequence, IR progress, health) is persisted after every step, so a restarted
primary resumes without a new IR.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

import trio

import frproto as fp
from frlink.config import NO_COMPRESSION, parse_compression

from .bandwidth import BandwidthLimiter, RelationshipLimit
from .client import RecoveryClient
from .delta import Deltas
from .digest_map import DigestMap
from .disks import DiskResized, DiskUnavailable, check_disks, image_size
from .errors import UNREACHABLE, FailoverInDoubt, ReplicationHalted
from .failover_ask import AskState, FailoverAskHandler, answer_ask
from .failover_doubt import (
    DEFINITE,
    doubt_record,
    in_doubt_text,
    refused_text,
    repeated_request,
)
from .image_view import viewing
from .initial import IR_PROGRESS_SECONDS
from .locks import cycle_lock
from .metrics import PrimaryMetrics
from .oob_export import is_exported, map_path
from .pending_log import PendingLog, PendingLogCorrupt
from .plan import CycleStart, plan_cycle, resync_due
from .qemu import PointInTime, QemuSource
from .record import VMRecord, disks_of, images_of
from .resync import Progress, Resynchronization, ResyncResult, VerifyResult
from .route import MAX_REQUERIES, Route
from .session import replicate
from .state import (
    FailureKind,
    Health,
    IRStage,
    PrimaryStateStore,
    VMReplicationState,
    operator_fields,
)
from .status import RUNNING_HERE, saved_health, vm_status
from .tracker import ChangeTracker
from .verify import Verification
from .window import TimeWindow

__all__ = [
    "DEFAULT_PENDING_BYTES",
    "IR_PROGRESS_SECONDS",
    "MAX_REQUERIES",
    "ReplicationHalted",
    "VMReplicator",
]

log = logging.getLogger("frrep.primary")

#: Default bound of a VM's pending log.
DEFAULT_PENDING_BYTES = 4 * 1024 * 1024 * 1024
_BACKOFF_START = 1.0
_BACKOFF_MAX = 60.0


class _Outcome(Enum):
    """How one cycle of :meth:`VMReplicator.run` ended."""

    OK = "ok"
    FAILED = "failed"  # a later cycle may succeed: retried with backoff
    HALTED = "halted"  # waits for a person: the loop ends


@dataclass
class VMReplicator:
    """Replicates one VM to its recovery server.

    Attributes:
        state: the persisted state of this VM (vmid, disks, target, sequence...).
        store: where states are persisted.
        ssl_context: client TLS context (our certificate, the CA).
        tracker: the embedding tool's change tracker; None means scan for changes.
        limiter: the host's bandwidth limit (shared by its VMs), if any; the VM's own
            limit comes from ``state.bandwidth_bps``.
        before_capture / after_capture: hooks around the capture window.
        pending_bytes: bound of the pending log.
        compression: the methods offered at negotiation (none by default: on loopback
            and fast links compressing costs more than it saves; bench/ir.py measures it).
        hosts: static host name -> IP address table, consulted before DNS for every
            name connected to (the configured target, the nodes a broker names).
    """

    state: VMReplicationState
    store: PrimaryStateStore
    ssl_context: ssl.SSLContext
    tracker: ChangeTracker | None = None
    limiter: BandwidthLimiter | None = None
    before_capture: Callable[[], None] | None = None
    after_capture: Callable[[], None] | None = None
    pending_bytes: int = DEFAULT_PENDING_BYTES
    local_address: str | None = None
    config_blob: bytes = b""
    #: Compression methods offered at negotiation; the server picks one (or none).
    compression: fp.CompressionSet = NO_COMPRESSION
    #: Test seam: transforms a chunk's data *after* its digest was taken (corruption in
    #: flight). Never set in production.
    chunk_fault: Callable[[bytes], bytes] | None = None
    #: Name -> IP address table (the primary config's ``[hosts]``), used before DNS.
    hosts: Mapping[str, str] = field(default_factory=dict)
    #: An automatic resynchronization (overflowed pending log, lost tracking) runs only
    #: inside this local time window; None: whenever it is needed.
    resync_window: TimeWindow | None = None
    #: Local date and time (the window's clock; tests set it).
    wall_clock: Callable[[], datetime] = datetime.now
    #: The service's metrics (cycle durations, bytes sent, failures), if any.
    metrics: PrimaryMetrics | None = None
    #: QEMU as the change source (``docs/qemu.md``); made from ``state.qemu`` when None.
    qemu: QemuSource | None = None
    #: Shared by the VMs of one primary service: :meth:`run` holds one of its tokens for
    #: each turn, so at most so many cycles (connections) run at once (``[primary]
    #: max_sessions``). None: no bound.
    sessions: trio.CapacityLimiter | None = None
    #: How a planned failover asked at the recovery side (FailoverAsk) is carried out;
    #: None: every ask is declined (``node/primary/failover_ask.py``).
    failover_ask: FailoverAskHandler | None = None
    #: When the last cycle passed each step (``time.time()``): ``start``, ``captured``,
    #: ``batch_begin``, ``acked``, ``end`` (those it reached). The recovery server logs
    #: its own side of each batch; bench/delta.py lines both up into phases.
    phases: dict[str, float] = field(default_factory=dict, init=False)
    _maps: list[DigestMap] = field(default_factory=list, init=False)
    _point: PointInTime | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.vmid = uuid.UUID(self.state.vmid)
        self.dir = self.store.root / self.state.vmid
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pending = PendingLog(self.dir / "pending", max_bytes=self.pending_bytes)
        if self.qemu is None and self.state.qemu is not None:
            self.qemu = QemuSource.of_state(self.state.qemu, self.state.disks, self.dir / "qemu")
        self._maps = [self._load_map(i) for i in range(len(self.state.disks))]
        self._limit = RelationshipLimit()
        #: What the last session negotiated and how many chunk bytes it put on the wire.
        self.last_compression = fp.Compression.NONE
        self.last_chunk_bytes_sent = 0
        #: What the last resynchronization did (None: none since this object was made).
        self.last_resync: ResyncResult | None = None
        self._cycle_lock = cycle_lock(self.store.root, self.state.vmid)
        #: The operator's fields as last read from or written to the file (see
        #: PrimaryStateStore.save_progress: a change there since wins over memory).
        self._operator_seen: dict[str, Any] | None = operator_fields(self.state)
        #: This object's token in ``state.written_by``, and the token last seen there.
        self._writer = uuid.uuid4().hex
        self._seen_writer = self.state.written_by
        self._exclusive_depth = 0
        self._noted: RecoveryClient | None = None
        self._ask = AskState()

    # -- persisted pieces --------------------------------------------------------------

    @property
    def disks(self) -> tuple[fp.DiskInfo, ...]:
        """The VM's disks as the protocol describes them."""
        return disks_of(self.state)

    @property
    def images(self) -> list[Path]:
        """The disk image files."""
        return images_of(self.state)

    def _map_path(self, disk_index: int) -> Path:
        return map_path(self.dir, disk_index)

    def _load_map(self, disk_index: int) -> DigestMap:
        path = self._map_path(disk_index)
        if path.exists():
            return DigestMap.load(path)
        size = int(self.state.disks[disk_index]["size"])
        return DigestMap(size, self.state.block_size)

    def _limiter(self) -> BandwidthLimiter | None:
        """This relationship's limit (from its state) combined with the host's, if any."""
        return self._limit.at(self.state.bandwidth_bps, self.limiter)

    def _save(self) -> None:
        # The operator's fields (paused, frequency, bandwidth) are taken from the file,
        # never written from memory; a VM disabled or enabled anew meanwhile is left be.
        self.state.pending_bytes = self.pending.size_bytes
        self.state.written_by = self._writer
        seen = self.store.save_progress(self.state, self._operator_seen)
        if seen is not None:
            self._operator_seen, self._seen_writer = seen, self._writer

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the VM's cycle lock (``node/primary/locks.py``) for a cycle, a
        resynchronization or a failover's last cycle: an operator's pause waits for it,
        and no other process works on this VM meanwhile. Nested use is free."""
        if self._exclusive_depth == 0:
            await self._cycle_lock.acquire_async()
        self._exclusive_depth += 1
        try:
            yield
        finally:
            self._exclusive_depth -= 1
            if self._exclusive_depth == 0:
                self._cycle_lock.release()

    # -- the rooms, each given only what it needs --------------------------------------

    def _record(self) -> VMRecord:
        return VMRecord(self.state, self._save, self._maps, self._map_path, self._limiter)

    def _offered(self) -> fp.CompressionSet:
        """The compression this VM offers: its own (``replication set --compression``),
        else the primary configuration's."""
        if self.state.compression is None:
            return self.compression
        return parse_compression(self.state.compression)

    def _route(self) -> Route:
        return Route(
            self._record(), self.ssl_context, self.local_address, self._offered(), self.hosts
        )

    def _deltas(self) -> Deltas:
        return Deltas(
            self._record(),
            self.pending,
            self.tracker,
            self.before_capture,
            self.after_capture,
            self.chunk_fault,
            self.phases,
            self._point,
        )

    def _verification(self) -> Verification:
        return Verification(self._record(), self.pending, self._route().open_existing)

    def _resynchronization(self) -> Resynchronization:
        return Resynchronization(
            self._record(),
            self.pending,
            # QEMU's bitmaps are not a tracker's: its resynchronization goes by digests,
            # read through the cycle's point in time.
            self.tracker if self.qemu is None else None,
            self.before_capture,
            self.after_capture,
            self._route().open_existing,
        )

    # -- the loop --------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Replicate until cancelled: a cycle every ``frequency_s``, retrying with backoff.

        Each turn holds the VM's cycle lock from reading the operator's settings to the
        end of the cycle, so a pause that got the lock is seen before any capture. The
        loop ends when the VM is disabled, enabled anew (another incarnation: the
        service starts a fresh replicator from the file) or halted.
        """
        task_status.started()
        backoff = _BACKOFF_START
        while True:
            # The turn is taken before the VM's cycle lock: a VM waiting for its turn
            # does not keep an operator's pause waiting too.
            async with self._turn(), self.exclusive():
                if not self._still_ours():
                    return
                if self.state.paused:
                    delay = min(self.state.frequency_s, 1.0)
                else:
                    # Trio's clock, the one the sleep below runs on (a simulation's
                    # MockClock drives both; real time there would make the next cycle's
                    # moment depend on the machine).
                    started = trio.current_time()
                    outcome = await self._counted_cycle(backoff)
                    if outcome is _Outcome.OK and self._ask.handing_over:
                        outcome = await self._hand_over_asked()
                    if outcome is _Outcome.HALTED:
                        return
                    if outcome is _Outcome.OK:
                        backoff = _BACKOFF_START
                        elapsed = trio.current_time() - started
                        if self.metrics is not None:
                            self.metrics.cycle_done(elapsed)
                        delay = max(0.0, self.state.frequency_s - elapsed)
                    else:
                        delay, backoff = backoff, min(backoff * 2, _BACKOFF_MAX)
                    # Shown by status as the next cycle's time.
                    self.state.next_cycle_at = time.time() + delay
                    self._save_after_cycle()
            await trio.sleep(delay)

    def _save_after_cycle(self) -> None:
        """Save the state after a cycle; a failure (a full or failing state disk) is
        logged and the loop goes on: the next save tries again, and what matters for
        correctness (an acknowledged sequence) was saved inside the cycle or made it fail.
        Raising here ended the primary service, every VM with it."""
        try:
            self._save()
        except OSError as exc:
            log.error("%s: the replication state could not be saved: %s", self.state.name, exc)

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """One of the service's session tokens (:attr:`sessions`), if it has a bound."""
        if self.sessions is None:
            yield
            return
        async with self.sessions:
            yield

    def _count_failure(self, exc: BaseException) -> None:
        if self.metrics is not None:
            self.metrics.cycle_failed(exc)

    async def _counted_cycle(self, backoff: float) -> _Outcome:
        """Run one cycle for :meth:`run`, recording its outcome in the state: the
        counters, the error and its kind, since when the server is unreachable. ``backoff``:
        the wait before a retry, for the log."""
        s = self.state
        if s.stats_since is None:
            s.stats_since = time.time()
        attempt_started = time.time()
        try:
            await self.cycle()
        except (ReplicationHalted, PendingLogCorrupt, DiskResized) as exc:
            self._count_failure(exc)
            log.error("replication of %s halted: %s", s.name, exc)
            s.cycles_failed += 1
            s.health = Health.CRITICAL
            s.halted = str(exc)  # shown by status; waits for a person
            self._save_after_cycle()
            return _Outcome.HALTED
        except DiskUnavailable as exc:
            self._count_failure(exc)
            # Not the network: no backoff message about retrying a server.
            log.error("cycle of %s failed: %s", s.name, exc)
            kind, s.last_error, s.unreachable_since = FailureKind.DISK, str(exc), None
        except UNREACHABLE as exc:
            self._count_failure(exc)
            log.warning("cycle of %s failed: %s; retry in %.0f s", s.name, exc, backoff)
            kind, s.last_error = FailureKind.UNREACHABLE, f"{type(exc).__name__}: {exc}"
            if s.unreachable_since is None:
                s.unreachable_since = attempt_started
        except fp.FrprotoError as exc:
            self._count_failure(exc)
            log.warning("cycle of %s failed: %s; retry in %.0f s", s.name, exc, backoff)
            # The server answered: it is reachable, it said no.
            kind, s.last_error = FailureKind.REFUSED, f"{type(exc).__name__}: {exc}"
            s.unreachable_since = None
        else:
            s.cycles_ok += 1
            return _Outcome.OK
        s.cycles_failed += 1
        s.last_error_kind = kind
        self._update_health()
        return _Outcome.FAILED

    def _still_ours(self) -> bool:
        """Re-read the file: False when this object must stop (disabled, enabled anew,
        moved on by another process, halted); else take the operator's settings."""
        try:
            fresh = self.store.load(self.state.vmid)
        except FileNotFoundError:
            log.info("replication of %s was disabled", self.state.name)
            return False
        if fresh.incarnation != self.state.incarnation:
            log.info("replication of %s was enabled anew", self.state.name)
            return False
        if fresh.written_by != self._seen_writer or fresh.halted is not None:
            # Another process resynchronized it, failed it over or halted it: what this
            # object holds (sequence, digest maps) is stale. The service starts a new
            # replicator from the file.
            log.info("%s: its state was changed by another process", self.state.name)
            return False
        self.state.paused, self.state.frequency_s = fresh.paused, fresh.frequency_s
        self.state.bandwidth_bps = fresh.bandwidth_bps
        self._operator_seen = operator_fields(fresh)
        return True

    def _update_health(self) -> None:
        # Judged where status judges (node/primary/status.py), with the service alive:
        # this process is replicating.
        judged = vm_status(
            self.state,
            now=time.time(),
            service=RUNNING_HERE,
            overflowed=self.pending.overflowed,
        )
        self.state.health = saved_health(judged)

    async def cycle(self) -> None:
        """One cycle: capture (after IR), connect, IR if needed, send every pending cycle.

        With a clustering broker, a node that answers "VM not here" sends the cycle back
        to the broker and on to the node it names now (at most ``MAX_REQUERIES`` times).

        Raises:
            ReplicationHalted: only a person can decide how to go on (also recorded in
                ``state.halted``).
            OSError, TLSFailure, trio errors, frproto.FrprotoError: this cycle failed;
                a later one may succeed (nothing unacknowledged is dropped).
        """
        async with self.exclusive():
            doubt = self.state.failover_in_doubt
            if doubt is not None:
                # The recovery side may run the VM: not a byte more until it is known.
                raise FailoverInDoubt(in_doubt_text(self.state.name, doubt))
            await self._cycle()

    async def _cycle(self) -> None:
        self.state.last_cycle_started_at = time.time()
        self.phases.clear()
        self.phases["start"] = self.state.last_cycle_started_at
        if self.qemu is None:
            await self._cycle_steps()
            return
        qemu = self.qemu
        # The point in time of every disk at once (docs/qemu.md); its fleecing state is
        # removed whatever happens, its frozen bitmaps merged back unless committed.
        # Once something was sent or exported (docs/oob-ir.md), a missing bitmap is a
        # lost one; before, it is simply created.
        started = self.state.ir_state != IRStage.NOT_STARTED or is_exported(self.dir)
        point = await trio.to_thread.run_sync(
            functools.partial(qemu.open_point, expect_bitmaps=started)
        )
        self._point = point
        try:
            self._note_bitmaps(point)
            views = {str(path): view for path, view in zip(self.images, point.views, strict=True)}
            with viewing(views):
                await self._cycle_steps()
        finally:
            self._point = None
            with trio.CancelScope(shield=True):
                await self._close_point(point)

    @contextlib.asynccontextmanager
    async def _disks_seen(self) -> AsyncIterator[None]:
        """Outside a cycle, read the disks as they are: through a QEMU point in time
        (its bitmaps merged back afterwards: nothing is captured) or as the files."""
        if self.qemu is None:
            yield
            return
        point = await trio.to_thread.run_sync(
            functools.partial(self.qemu.open_point, expect_bitmaps=True)
        )
        try:
            self._note_bitmaps(point)  # a bitmap lost meanwhile: the next cycle resyncs
            views = {str(path): view for path, view in zip(self.images, point.views, strict=True)}
            with viewing(views):
                yield
        finally:
            with trio.CancelScope(shield=True):
                await self._close_point(point)

    async def _close_point(self, point: PointInTime) -> None:
        await trio.to_thread.run_sync(functools.partial(point.close, commit=point.commit))

    def _note_bitmaps(self, point: PointInTime) -> None:
        """Say what the point found of QEMU's bitmaps; a lost one means a resync."""
        s = self.state
        if point.lost and (s.ir_state != IRStage.NOT_STARTED or is_exported(self.dir)):
            # What the guest wrote while nobody tracked it is unknown: compare digests.
            s.needs_resync = True
            s.qemu_bitmap = f"lost ({'; '.join(point.lost)}): resynchronizing by digests"
            log.warning("%s: QEMU's dirty bitmap %s", s.name, s.qemu_bitmap)
            self._save()
        elif not s.needs_resync:
            s.qemu_bitmap = "intact"

    async def _cycle_steps(self) -> None:
        point = self._point
        try:
            # Before anything is read: a resized disk cannot be replicated by batches
            # (node/primary/disks.py), and a missing one must say so, not look like a
            # network failure.
            check_disks(self.state.disks, self.state.vmid)
            start = plan_cycle(
                ir_stage=self.state.ir_state,
                needs_resync=self.state.needs_resync,
                tracker_lost=self.tracker is not None and self.tracker.lost,
            )
            if start is CycleStart.CAPTURE:
                await self.capture()
                if point is not None:
                    point.commit = point.captured
            resyncing = resync_due(start, overflowed=self.pending.overflowed)
            if point is not None and start is CycleStart.CAPTURE and not resyncing:
                # The send reads the pending log, not the disks: no fleecing meanwhile.
                await self._close_point(point)
            if resyncing:
                window = self.resync_window
                if window is not None and not window.contains(self.wall_clock().time()):
                    log.info(
                        "%s: a resynchronization is needed; it waits for its window %s-%s",
                        self.state.name,
                        window.start,
                        window.end,
                    )
                    self._update_health()
                    self._save()
                    return
                await self.resync()
                if point is not None:
                    point.commit = True  # every block was compared at the point
                    self.state.qemu_bitmap = "intact"
            await self._route().follow(self._session, self._note_session)
        except (ReplicationHalted, DiskResized) as exc:
            self.state.halted = str(exc)
            self.state.health = Health.CRITICAL
            self._save()
            raise
        s = self.state
        s.halted = s.last_error = s.last_error_kind = s.unreachable_since = None
        pending = self.pending.overflowed or self.pending.cycles()
        if s.ir_state == IRStage.COMPLETE and not pending:
            # Everything captured is acknowledged: the replica is current, even when this
            # cycle had nothing to send (an idle VM is in sync, not lagging).
            s.last_synced_at = time.time()
        self._update_health()
        self._save()
        self.phases["end"] = time.time()

    def _note_session(self, client: RecoveryClient) -> None:
        self.last_compression = client.negotiated.compression
        self.last_chunk_bytes_sent = client.conn.chunk_bytes_sent
        if self.metrics is not None and client is not self._noted:
            self._noted = client  # a connection may be seen twice (a failed re-query)
            self.metrics.sent(client.conn.chunk_bytes_sent)

    async def _session(self, client: RecoveryClient) -> None:
        await replicate(
            self._deltas(),
            client,
            config_blob=self.config_blob,
            exported=lambda: is_exported(self.dir),  # out-of-band IR (docs/oob-ir.md)
            exported_maps=lambda: [self._load_map(i) for i in range(len(self.state.disks))],
        )
        # Everything pending is sent: answer a planned failover asked at the recovery side.
        not_ready = None
        if self.state.ir_state != IRStage.COMPLETE:
            not_ready = "the VM's initial replication is not complete"
        await answer_ask(
            self.failover_ask, self._ask, client, self.vmid, self.images, not_ready=not_ready
        )

    async def _hand_over_asked(self) -> _Outcome:
        """The stop hook ran for a planned failover asked at the recovery side: hand the
        VM over (HALTED: this primary replicates it no more). A failure is declined at
        the next ask, and replication goes on (FAILED: retried with backoff)."""
        assert self.failover_ask is not None  # handing_over is set only with a handler
        try:
            # Still handing over meanwhile: the hand-over's own connections are asked
            # again (the record says so until it is done), and must not stop it twice.
            await self.failover_ask.hand_over(self)
        except ReplicationHalted as exc:  # the answer was lost: a person must look
            log.error("planned failover of %s: %s", self.state.name, exc)
            self.state.halted = str(exc)
            self._save_after_cycle()
            return _Outcome.HALTED
        except Exception as exc:
            log.error(
                "planned failover of %s asked by the recovery side failed: %s", self.state.name, exc
            )
            self._ask.decline_next = f"the planned failover failed at the primary: {exc}"
            return _Outcome.FAILED
        finally:
            self._ask.handing_over = False
        return _Outcome.HALTED

    async def capture(self, *, captured_at_ms: int | None = None) -> None:
        """Copy this cycle's changed blocks into the pending log (one consistent point).
        ``captured_at_ms``: a group capture's moment (``node/primary/group_capture.py``):
        the cycle carries it, and is captured even when nothing changed."""
        deltas = self._deltas()
        if captured_at_ms is not None:
            deltas = dataclasses.replace(deltas, captured_at_ms=captured_at_ms)
        await deltas.capture()

    # -- verification, resynchronization, failover, reseeding ----------------------------

    async def verify(self) -> VerifyResult:
        """Compare the replica with what was acknowledged, by digests only (the primary's
        disks are not read): the differing ranges, if any. Replication may go on.

        It holds the VM's cycle lock, so it never races a cycle of the running service
        (whose batch would make the replica newer than the digests read here), and it
        starts from the state file as the lock found it."""
        async with self.exclusive():
            self._catch_up_with_file()
            return await self._verification().verify()

    def _catch_up_with_file(self) -> None:
        """Take the state and digest maps from the files when another process (the
        running service) moved the VM on since this object read them: the operator's
        commands make their replicator before they hold the cycle lock. A no-op for the
        process that wrote the file last."""
        try:
            fresh = self.store.load(self.state.vmid)
        except FileNotFoundError:
            return  # disabled meanwhile: what follows says so
        if (fresh.written_by, fresh.sequence) == (self.state.written_by, self.state.sequence):
            return
        self.state = fresh
        self._maps = [self._load_map(i) for i in range(len(fresh.disks))]
        self._operator_seen = operator_fields(fresh)
        self._seen_writer = fresh.written_by

    async def resync(
        self, progress: Progress | None = None, *, by_digests: bool = False
    ) -> ResyncResult:
        """Bring the replica level with the disks in one delta batch; then the pending log
        (moot) is emptied and its overflow mark cleared. For an overflowed pending log,
        lost change tracking or ``needs_resync`` (see node/primary/resync.py).

        What is known comes first: with the pending log overflowed and a tracker that
        survived (not lost, no ``needs_resync``), the pending cycles' blocks plus the
        tracker's dirty ones are exactly what changed since the last acknowledged batch,
        and only they are read and sent (``method == "dirty-bitmap"``). Otherwise, or with
        ``by_digests``, every block is digested and compared with the replica's digests
        (``method == "digests"``), and a lost tracker is trusted again afterwards.

        The disks must not change meanwhile: the capture hooks bracket the whole of it.
        ``progress(done, total)`` reports the bytes read.
        """
        async with self.exclusive():
            result = await self._resynchronization().run(progress, by_digests=by_digests)
            self.last_resync = result
            return result

    async def prepare_failover(self) -> VerifyResult:
        """The primary's side of a planned failover: with the VM stopped (the caller's
        stop hook has run), send everything still pending in a last cycle, then check
        that the replica equals the disks, block for block, by digests (the disks are
        read, the replica's digests fetched). Only then is replication stopped for good
        (``state.halted``): the recovery side may take the VM at the returned sequence,
        losing nothing.

        Raises:
            ReplicationHalted: the replica differs after the last cycle (nothing is
                switched; resynchronize and try again).
        """
        async with self.exclusive():
            started = time.monotonic()
            await self.cycle()
            async with self._disks_seen():
                result = await self._verification().compare_disks()
            result.seconds = time.monotonic() - started
            if not result.ok:
                raise ReplicationHalted(
                    f"{self.state.name}: after the last cycle the replica still differs from "
                    f"the disks ({len(result.differences)} ranges): not failing over; "
                    f"resynchronize"
                )
            self.state.halted = (
                f"planned failover: the replica holds this VM's final state (sequence "
                f"{result.sequence}, verified); this primary replicates it no more"
            )
            self._save()
        log.info("%s: ready for failover at sequence %d", self.state.name, result.sequence)
        return result

    async def hand_over(self, *, reverse_port: int = 0) -> fp.FailoverDone:
        """The primary's side of a planned failover in one step (protocol 1.1), with the
        VM's writes stopped (the caller's stop hook has run): a last cycle sends what is
        still pending, the disks are read and their state digest computed, and the
        recovery side is asked to take the VM over at that final state (FailoverRequest;
        it checks and answers, ``node/takeover.py``). Then this primary
        replicates the VM no more (``state.halted``).

        Raises:
            frproto.OutOfSequence: the recovery side's replica differs (nothing changed).
            frproto.NotSupported: the recovery side speaks 1.0 only.
            FailoverInDoubt: the answer was lost (recorded; :meth:`hand_over_again`).
        """
        from .scan import digest_image

        async with self.exclusive():
            await self.cycle()
            if self.pending.size_bytes:
                raise ReplicationHalted(
                    f"{self.state.name}: changes are still pending after the last cycle: "
                    "not failing over"
                )
            block = self.state.block_size
            async with self._disks_seen():
                maps = [
                    await digest_image(path, disk.size, block)
                    for path, disk in zip(self.images, self.disks, strict=True)
                ]
            request = fp.FailoverRequest(
                self.vmid,
                self.state.sequence,
                block,
                fp.codec.state_digest(bytes(m.digests) for m in maps),
                reverse_port=reverse_port,
            )
            done = await self._request_failover(request, presented=0)
        return done

    async def hand_over_again(self) -> fp.FailoverDone:
        """Run again only the hand-over of a planned failover whose answer was lost
        (``state.failover_in_doubt``, ``node/primary/failover_doubt.py``): no last cycle
        (the VM is stopped, everything was acknowledged); the disks must still have the
        recorded state digest; the same request goes over a relationship opened at the
        recorded generation (FOV-11).

        Raises:
            FailoverInDoubt: the disks changed since, or no answer again (still in doubt).
            frproto.OutOfSequence, frproto.NotAuthorized: refused, the doubt is over
                (see :meth:`_settle_refusal`).
            ReplicationHalted: no failover of this VM is in doubt.
        """
        from .scan import digest_image

        async with self.exclusive():
            self._catch_up_with_file()
            doubt = self.state.failover_in_doubt
            if doubt is None:
                raise ReplicationHalted(f"{self.state.name}: no planned failover is in doubt")
            block = self.state.block_size
            async with self._disks_seen():
                maps = [
                    await digest_image(path, disk.size, block)
                    for path, disk in zip(self.images, self.disks, strict=True)
                ]
            digest = fp.codec.state_digest(bytes(m.digests) for m in maps)
            if digest.hex() != doubt["state_digest"]:
                raise FailoverInDoubt(
                    f"{self.state.name}: its disks changed since the failover request "
                    f"(sequence {doubt['sequence']}): not asking again. The recovery side may "
                    "run the VM; find out there, then 'frctl replication resume' if it does not"
                )
            request = repeated_request(self.vmid, doubt, block)
            return await self._request_failover(request, presented=int(doubt["generation"]))

    async def _request_failover(
        self, request: fp.FailoverRequest, *, presented: int
    ) -> fp.FailoverDone:
        """Send ``request`` over a relationship opened presenting generation ``presented``
        (0: none: the first request), recording it in doubt until its answer comes."""
        s, again = self.state, self.state.failover_in_doubt is not None
        try:
            client, _ = await self._route().open_existing(generation=presented or s.generation)
        except DEFINITE as exc:
            if again:
                self._settle_refusal(exc, again=True)
            raise
        except Exception as exc:
            if again:  # nothing learnt: still in doubt
                raise FailoverInDoubt(
                    f"{in_doubt_text(s.name, s.failover_in_doubt or {})} ({exc})"
                ) from exc
            raise
        try:
            # Written before it is sent: a primary that dies waiting knows it asked.
            s.failover_in_doubt = doubt_record(request, presented or s.generation)
            s.halted = in_doubt_text(s.name, s.failover_in_doubt)
            self._save()
            done = await client.fail_over(request)
        except DEFINITE as exc:
            self._settle_refusal(exc, again=again)
            raise
        except Exception as exc:
            # Asked, but the answer was lost: the recovery side may have taken the VM over
            # (it is durable there before it answers, FOV-6), or not.
            log.error("%s: %s (%s)", s.name, s.halted, exc)
            raise FailoverInDoubt(f"{s.halted} ({type(exc).__name__}: {exc})") from exc
        finally:
            await client.aclose()
        s.failover_in_doubt = None
        s.halted = (
            f"planned failover: the recovery side took this VM over at sequence "
            f"{done.sequence} (generation {done.generation}); this primary replicates "
            "it no more"
        )
        s.failed_over_generation = done.generation
        self._save()
        log.info(
            "%s: failed over at sequence %d, generation %d",
            s.name,
            done.sequence,
            done.generation,
        )
        return done

    def _settle_refusal(self, exc: fp.FrprotoError, *, again: bool) -> None:
        """The failover request was refused for sure: nothing to doubt. A refusal of the
        first request, or OUT_OF_SEQUENCE (the recovery side is not failed over), lets
        replication go on; NOT_AUTHORIZED to a request asked again leaves the VM halted
        (the recovery side is failed over all the same: a person looks)."""
        s = self.state
        s.failover_in_doubt = None
        if again and isinstance(exc, fp.NotAuthorized):
            s.halted = refused_text(s.name, exc)
        else:
            s.halted = None
        self._save()
        log.warning("%s: the failover request was refused (%s): not in doubt", s.name, exc)

    async def reseed(self) -> VMReplicationState:
        """Start this VM's replication over at its disks' current sizes: remove the
        replica at the recovery side (its images and recovery points, through
        ``RelationshipDelete``), forget what this primary kept (pending log, digest maps,
        sequence) and leave a fresh state for a full initial replication.

        For a VM halted because a disk was resized (``node/primary/disks.py``); the
        caller decides it (``frctl replication reseed --yes``). A replica the recovery
        side does not hold is not an error. The operator's settings (frequency,
        bandwidth, pause) are kept; the state gets a new incarnation, so a running
        service starts a new replicator from it.

        Returns:
            The new state (also saved).
        """
        async with self.exclusive():
            async with self._disks_seen():
                sizes = [image_size(str(d["disk_id"]), Path(d["path"])) for d in self.state.disks]
            await self._route().delete_replica()
            self.pending.clear()
            self.pending.clear_overflow()
            for index in range(len(self.state.disks)):
                self._map_path(index).unlink(missing_ok=True)
            incarnation = uuid.uuid4().hex

            def start_over(state: VMReplicationState) -> None:
                for disk, size in zip(state.disks, sizes, strict=True):
                    disk["size"] = size
                state.ir_state, state.ir_cursor = IRStage.NOT_STARTED, [0, 0]
                state.ir_bytes_done = state.ir_bytes_total = 0
                state.sequence, state.generation, state.pending_bytes = 0, 0, 0
                state.last_replicated_at = state.last_captured_at = None
                state.health, state.halted = Health.INITIAL_REPLICATION, None
                state.last_error, state.needs_resync = None, False
                state.last_error_kind = state.unreachable_since = None
                state.last_synced_at = None
                state.node_name, state.node_address, state.node_port = "", "", 0
                state.incarnation = incarnation

            self.state = self.store.update(self.state.vmid, start_over)
            self._operator_seen = operator_fields(self.state)
            self._seen_writer = self.state.written_by
            self._maps = [self._load_map(i) for i in range(len(self.state.disks))]
        log.info("%s: seeded anew at %s bytes", self.state.name, sizes)
        return self.state
