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

**Resynchronization** (:meth:`VMReplicator.resync`, ``node/primary/resync.py``) runs by
itself when the pending log overflowed, when the tracker is *lost* (its dirty set cannot
be trusted), or when the state asks for it (``needs_resync``), inside the resync window
if one is set. It first uses what is known: after an overflow, with a tracker that
survived, the pending cycles' blocks plus the tracker's dirty blocks are exactly what
changed, and only they are read and sent. Otherwise it compares digests with the replica.

**A clustering broker.** The configured target may be a recovery cluster's CAP: when it
negotiates as ``CLUSTERING_BROKER`` the replicator remembers the broker (in the VM's
state), asks it which recovery node holds the VM (``QueryRecoveryServer``), and
replicates to that node over a new connection whose TLS name is the node's FQDN. Later
cycles go straight to the remembered node; a node that answers ``VM_NOT_HERE`` (the
replica moved) sends the replicator back to the broker, at most ``MAX_REQUERIES`` times
per cycle. A replica that an administrator deleted in the cluster halts replication
(:class:`ReplicationHalted`): never a new replica without a person. Node names are
resolved through the primary's ``[hosts]`` table, then DNS (``node.primary.resolve``).
``docs/primary-and-broker.md`` describes it for operators.

State (sequence, IR progress, health) is persisted after every step, so a restarted
primary resumes without a new IR.
"""

from __future__ import annotations

import contextlib
import logging
import math
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio
import xxhash

import frproto as fp
from frlink.config import NO_COMPRESSION
from frlink.tls import TLSFailure

from .bandwidth import BandwidthLimiter, combined
from .client import IRProgress, RecoveryClient
from .digest_map import DIGEST_SIZE, DigestMap
from .disks import DiskResized, DiskUnavailable, check_disks, image_size, size_differences
from .locks import cycle_lock
from .pending_log import PendingCycle, PendingLog, PendingLogCorrupt, PendingLogFull
from .resolve import resolve_host
from .resync import (
    BY_DIGESTS,
    FROM_DIRTY_BITMAP,
    Progress,
    ResyncResult,
    VerifyResult,
    coalesce,
    differing_blocks,
    pending_blocks,
    replica_map,
)
from .scan import read_blocks, scan_changes
from .state import PrimaryStateStore, VMReplicationState, operator_fields
from .tracker import ChangeTracker
from .window import TimeWindow

log = logging.getLogger("frrep.primary")

#: Default bound of a VM's pending log.
DEFAULT_PENDING_BYTES = 4 * 1024 * 1024 * 1024
#: How often IR progress is written to the VM's state file (seconds).
IR_PROGRESS_SECONDS = 0.5
_BACKOFF_START = 1.0
_BACKOFF_MAX = 60.0
#: How often one cycle asks the broker again after a node said "VM not here" (or could
#: not be reached) before the cycle fails and the normal retry with backoff takes over.
#: Bounded so that a broker and a node that disagree cannot keep a cycle spinning.
MAX_REQUERIES = 3
#: A peer that cannot be reached (or stopped answering): retryable.
_UNREACHABLE = (OSError, TLSFailure, trio.BrokenResourceError, trio.TooSlowError)


def _report_scan(progress: Progress, before: int, total: int, done: int) -> None:
    progress(before + done, total)


class ReplicationHalted(Exception):
    """Replication of a VM cannot go on without a person (deleted replica, lost data)."""


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
    _maps: list[DigestMap] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.vmid = uuid.UUID(self.state.vmid)
        self.dir = self.store.root / self.state.vmid
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pending = PendingLog(self.dir / "pending", max_bytes=self.pending_bytes)
        self._maps = [self._load_map(i) for i in range(len(self.state.disks))]
        self._own_rate: float | None = None
        self._own: BandwidthLimiter | None = None
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

    # -- persisted pieces --------------------------------------------------------------

    @property
    def disks(self) -> tuple[fp.DiskInfo, ...]:
        """The VM's disks as the protocol describes them."""
        return tuple(fp.DiskInfo(d["disk_id"], int(d["size"])) for d in self.state.disks)

    @property
    def images(self) -> list[Path]:
        """The disk image files."""
        return [Path(d["path"]) for d in self.state.disks]

    def _map_path(self, disk_index: int) -> Path:
        return self.dir / f"digests-{disk_index}.map"

    def _load_map(self, disk_index: int) -> DigestMap:
        path = self._map_path(disk_index)
        if path.exists():
            return DigestMap.load(path)
        size = int(self.state.disks[disk_index]["size"])
        return DigestMap(size, self.state.block_size)

    def _limiter(self) -> BandwidthLimiter | None:
        """This relationship's limit (from its state) combined with the host's, if any."""
        rate = self.state.bandwidth_bps
        if rate != self._own_rate:  # (re)built when the state's limit changes
            self._own_rate = rate
            self._own = BandwidthLimiter(rate) if rate else None
        if self._own is None:
            return self.limiter
        return combined([self._own, self.limiter])

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
            async with self.exclusive():
                try:
                    fresh = self.store.load(self.state.vmid)
                except FileNotFoundError:
                    log.info("replication of %s was disabled", self.state.name)
                    return
                if fresh.incarnation != self.state.incarnation:
                    log.info("replication of %s was enabled anew", self.state.name)
                    return
                if fresh.written_by != self._seen_writer or fresh.halted is not None:
                    # Another process resynchronized it, failed it over or halted it: what
                    # this object holds (sequence, digest maps) is stale. The service
                    # starts a new replicator from the file.
                    log.info("%s: its state was changed by another process", self.state.name)
                    return
                self.state.paused, self.state.frequency_s = fresh.paused, fresh.frequency_s
                self.state.bandwidth_bps = fresh.bandwidth_bps
                self._operator_seen = operator_fields(fresh)
                if self.state.paused:
                    delay = min(self.state.frequency_s, 1.0)
                else:
                    started = time.monotonic()
                    try:
                        await self.cycle()
                    except (ReplicationHalted, PendingLogCorrupt, DiskResized) as exc:
                        log.error("replication of %s halted: %s", self.state.name, exc)
                        self.state.health = "critical"
                        self.state.halted = str(exc)  # shown by status; waits for a person
                        self._save()
                        return
                    except DiskUnavailable as exc:
                        # Not the network: no backoff message about retrying a server.
                        log.error("cycle of %s failed: %s", self.state.name, exc)
                        self.state.health = "critical"
                        self.state.last_error = str(exc)
                        self._save()
                        delay, backoff = backoff, min(backoff * 2, _BACKOFF_MAX)
                    except (*_UNREACHABLE, fp.FrprotoError) as exc:
                        log.warning(
                            "cycle of %s failed: %s; retry in %.0f s", self.state.name, exc, backoff
                        )
                        self.state.last_error = f"{type(exc).__name__}: {exc}"
                        self._update_health()
                        self._save()
                        delay, backoff = backoff, min(backoff * 2, _BACKOFF_MAX)
                    else:
                        backoff = _BACKOFF_START
                        elapsed = time.monotonic() - started
                        delay = max(0.0, self.state.frequency_s - elapsed)
            await trio.sleep(delay)

    def _update_health(self) -> None:
        last = self.state.last_replicated_at
        if self.pending.overflowed:
            self.state.health = "critical"
        elif self.state.ir_state != "COMPLETE":
            self.state.health = "initial replication"
        elif last is not None and time.time() - last > 2 * self.state.frequency_s:
            self.state.health = "warning"
        else:
            self.state.health = "normal"

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
            await self._cycle()

    async def _cycle(self) -> None:
        self.state.last_cycle_started_at = time.time()
        try:
            # Before anything is read: a resized disk cannot be replicated by batches
            # (node/primary/disks.py), and a missing one must say so, not look like a
            # network failure.
            check_disks(self.state.disks, self.state.vmid)
            if self.state.ir_state == "COMPLETE":
                # A lost tracker's dirty set is incomplete: capturing from it would replicate
                # some writes and silently miss others.
                by_digests = self.state.needs_resync or (
                    self.tracker is not None and self.tracker.lost
                )
                if not by_digests:
                    await self.capture()
                if self.pending.overflowed or by_digests:
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
            client = await self._connect()
            try:
                requeries = 0
                while True:
                    try:
                        await self._session(client)
                        break
                    except fp.VMNotHere as exc:
                        if self.state.broker is None or requeries >= MAX_REQUERIES:
                            raise
                        requeries += 1
                        log.info("%s: %s; asking the broker again", self.state.name, exc)
                    self._note_session(client)
                    await client.aclose()
                    client = await self._discover()
            finally:
                self._note_session(client)
                await client.aclose()
        except (ReplicationHalted, DiskResized) as exc:
            self.state.halted = str(exc)
            self.state.health = "critical"
            self._save()
            raise
        self.state.halted = None
        self.state.last_error = None
        self._update_health()
        self._save()

    def _note_session(self, client: RecoveryClient) -> None:
        self.last_compression = client.negotiated.compression
        self.last_chunk_bytes_sent = client.conn.chunk_bytes_sent

    # -- where to replicate: the configured target, a broker, the node it names -----------

    async def _dial(self, host: str, port: int, server_name: str) -> RecoveryClient:
        """Resolve ``host`` (``[hosts]`` table, then DNS), connect and negotiate with SNI
        ``server_name``."""
        address = await resolve_host(host, port, self.hosts)
        return await RecoveryClient.connect(
            address,
            port,
            server_name=server_name,
            ssl_context=self.ssl_context,
            local_address=self.local_address,
            compression=self.compression,
        )

    async def _connect(self) -> RecoveryClient:
        """This cycle's connection: the remembered node, else the configured target."""
        s = self.state
        # During an IR the broker is asked every cycle: a Create sent to a node that no
        # longer holds the VM would seed a second replica there instead of being refused.
        if s.broker is None or not s.node_name or s.ir_state != "COMPLETE":
            return await self._discover()
        try:
            return await self._connect_node()
        except _UNREACHABLE as exc:
            # The node may be down and the cluster may have moved the replica elsewhere:
            # the broker knows. If it still names the same node, this cycle fails.
            log.warning(
                "%s: recovery node %s unreachable (%s); asking the broker %s",
                s.name,
                s.node_name,
                exc,
                s.broker,
            )
            before = (s.node_name.lower(), s.node_port)
            client = await self._discover()
            if (s.node_name.lower(), s.node_port) == before:
                await client.aclose()
                raise
            return client

    async def _discover(self) -> RecoveryClient:
        """Connect to the configured target. A clustering broker there is remembered and
        asked for the VM's node, and the connection to that node is returned; any other
        recovery server is replicated to directly."""
        s = self.state
        client = await self._dial(s.recovery_host, s.recovery_port, s.server_name)
        if not client.is_broker:
            if s.broker is not None:
                log.warning(
                    "%s: %s answers as %s, no longer as a clustering broker; replicating "
                    "to it directly",
                    s.name,
                    s.server_name,
                    client.negotiated.recovery_type.name,
                )
                s.broker, s.broker_host, s.broker_port = None, "", 0
                s.node_name, s.node_address, s.node_port = "", "", 0
                self._save()
            return client
        if s.broker is None:
            log.info("%s: %s is a clustering broker", s.name, s.server_name)
        s.broker, s.broker_host, s.broker_port = s.server_name, s.recovery_host, s.recovery_port
        try:
            await self._ask_broker(client)
        finally:
            await client.aclose()  # the protocol: a new connection to the named node
        return await self._connect_node()

    async def _ask_broker(self, client: RecoveryClient) -> None:
        """Ask the broker where the VM lives; remember the node it names."""
        s = self.state
        answer = await client.query(
            self.vmid, name=s.name, disk_sizes=tuple(d.size for d in self.disks)
        )
        if answer.existing is fp.ExistingVM.DELETED:
            s.node_name, s.node_address, s.node_port = "", "", 0
            self._save()
            raise ReplicationHalted(
                f"an administrator deleted the replica of VM {s.name} ({s.vmid}) in the "
                f"recovery cluster (broker {s.broker}); replication stopped and will not "
                f"seed a new replica on its own: a person must decide (to replicate the "
                f"VM again from scratch, disable and enable its replication)"
            )
        if answer.existing is fp.ExistingVM.NEW and s.ir_state == "COMPLETE":
            # Our IR completed, yet the cluster knows no replica: replicating on would
            # need a new full IR, which is never started silently.
            raise ReplicationHalted(
                f"the recovery cluster (broker {s.broker}) holds no replica of VM {s.name} "
                f"({s.vmid}) although its initial replication completed"
                f"{f' on {s.node_name}' if s.node_name else ''}; a person must decide (to "
                f"replicate the VM again from scratch, disable and enable its replication)"
            )
        before = s.node_name
        if before and (before.lower(), s.node_port) != (answer.server_name.lower(), answer.port):
            log.warning("vm %s moved: %s -> %s", s.name, before, answer.server_name)
        elif before:
            log.info("%s: the broker still names %s", s.name, before)
        else:
            log.info(
                "%s: the broker names %s:%d (%s)",
                s.name,
                answer.server_name,
                answer.port,
                answer.existing.name,
            )
        if (before, s.node_port) != (answer.server_name, answer.port):
            s.node_address = ""
        s.node_name, s.node_port = answer.server_name, answer.port
        self._save()

    async def _connect_node(self) -> RecoveryClient:
        """Connect to the remembered recovery node, its FQDN as the TLS name."""
        s = self.state
        client = await self._dial(s.node_name, s.node_port, s.node_name)
        if client.is_broker:
            await client.aclose()
            raise fp.FrprotoError(f"{s.node_name} answered as a clustering broker, not a node")
        address = client.peer_address
        if address is not None and address != s.node_address:
            s.node_address = address
            self._save()
        return client

    async def _session(self, client: RecoveryClient) -> None:
        try:
            accepted = await client.open(
                self.vmid,
                name=self.state.name,
                disks=self.disks,
                config=self.config_blob,
                create=self.state.ir_state != "COMPLETE",
                generation=self.state.generation,
            )
            if accepted.generation != self.state.generation:
                self.state.generation = accepted.generation
                self._save()
        except fp.VMDeleted as exc:
            where = (
                f" in the recovery cluster (broker {self.state.broker})"
                if self.state.broker
                else ""
            )
            raise ReplicationHalted(
                f"{exc}{where}; replication stopped and will not seed a new replica on its "
                f"own: a person must decide (to replicate the VM again from scratch, disable "
                f"and enable its replication)"
            ) from exc
        theirs = tuple(d.size for d in accepted.disks)
        ours = tuple(d.size for d in self.disks)
        if theirs != ours:
            raise ReplicationHalted(
                f"the replica's disks are {theirs} bytes, this VM's {ours}: batches would "
                f"not fit; replication halted (`frctl replication reseed {self.state.vmid}` "
                f"replicates the VM anew)"
            )
        if self.state.ir_state != "COMPLETE":
            await self._initial_replication(client, accepted)
        elif accepted.applied_sequence < self.state.sequence:
            raise ReplicationHalted(
                f"the replica is at sequence {accepted.applied_sequence}, behind the "
                f"acknowledged {self.state.sequence}: it needs a resynchronization"
            )
        for pending in self.pending.cycles():
            if pending.sequence <= self.state.sequence:
                # Acknowledged, then the primary stopped before dropping it.
                self.pending.drop_through(pending.sequence)
                continue
            await self._send_cycle(client, pending)

    async def _initial_replication(
        self, client: RecoveryClient, accepted: fp.RelationshipAccepted
    ) -> None:
        from .oob_export import is_exported  # out-of-band IR (docs/oob-ir.md)

        if is_exported(self.dir):
            # The IR travels as a file: never send IR data; wait for the import.
            if accepted.ir_state is not fp.IRState.COMPLETE:
                log.info("%s: waiting for the out-of-band import of its IR", self.state.name)
                raise fp.Busy(f"{self.state.name}: waiting for the out-of-band import of its IR")
            self._maps = [self._load_map(i) for i in range(len(self.state.disks))]  # exported
            self.state.ir_state = "COMPLETE"
            self.state.sequence = 0
            self.state.last_replicated_at = time.time()
            self._save()
            log.info("IR of %s complete (imported out of band)", self.state.name)
            return
        start = (0, 0)
        if accepted.ir_state is fp.IRState.IN_PROGRESS:
            start = (accepted.resume_disk, accepted.resume_offset)
            log.info("resuming IR of %s at disk %d offset %d", self.state.name, *start)
        elif accepted.ir_state is fp.IRState.COMPLETE:
            # The server completed the IR but we did not record its ack: redo from scratch
            # would be wasteful and wrong; rebuild the digest maps from our images instead.
            start = (len(self.images), 0)
        self.state.ir_state = "IN_PROGRESS"
        self._save()
        block = self.state.block_size
        maps = self._maps

        def on_block(disk_index: int, offset: int, data: memoryview) -> None:
            dmap = maps[disk_index]
            for i in range(0, len(data), block):
                dmap.set((offset + i) // block, xxhash.xxh3_128_digest(data[i : i + block]))

        last_saved = [time.monotonic()]

        def on_progress(progress: IRProgress) -> None:
            # Persisted now and then for `frctl replication status` / `wait` to show.
            self.state.ir_bytes_done = progress.bytes_done
            self.state.ir_bytes_total = progress.bytes_total
            if time.monotonic() - last_saved[0] >= IR_PROGRESS_SECONDS:
                last_saved[0] = time.monotonic()
                self._save()

        if start[0] < len(self.images):
            await client.send_ir(
                self.vmid,
                self.images,
                start=start,
                on_block=on_block,
                on_progress=on_progress,
                limiter=self._limiter(),
            )
        if start != (0, 0):
            await self._maps_from_replica(client, start)
        for index, dmap in enumerate(maps):
            dmap.save(self._map_path(index))
        self.state.ir_state = "COMPLETE"
        self.state.ir_bytes_done = self.state.ir_bytes_total = sum(d.size for d in self.disks)
        self.state.sequence = 0
        self.state.last_replicated_at = time.time()
        self._save()
        log.info("IR of %s complete", self.state.name)

    async def _maps_from_replica(self, client: RecoveryClient, start: tuple[int, int]) -> None:
        """Fill the digest maps for what an earlier, interrupted IR sent, from the replica.

        Digesting our images instead would be wrong: they may have changed since those
        blocks were sent, and the map would then claim content the replica never got
        (a kill mid-IR, writes, and the replica silently diverged)."""
        block = self.state.block_size
        for disk_index in range(min(start[0] + 1, len(self.images))):
            end = self.disks[disk_index].size if disk_index < start[0] else start[1]
            blocks = math.ceil(end / block)
            dmap = self._maps[disk_index]
            for first in range(0, blocks, fp.MAX_DIGESTS):
                count = min(fp.MAX_DIGESTS, blocks - first)
                answer = await client.digest_map(self.vmid, disk_index, block, first * block, count)
                digests = answer.digests
                for i in range(len(digests) // DIGEST_SIZE):
                    dmap.set(first + i, digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])

    # -- verification and resynchronization (node/primary/resync.py) ---------------------

    async def _open_existing(self) -> tuple[RecoveryClient, fp.RelationshipAccepted]:
        """A connection to where the replica lives, its relationship opened."""
        if self.state.ir_state != "COMPLETE":
            raise fp.OutOfSequence(f"{self.state.name}: its initial replication is not done")
        client = await self._connect()
        try:
            try:
                accepted = await client.open(
                    self.vmid, name=self.state.name, disks=self.disks, create=False
                )
            except fp.VMNotHere:
                if self.state.broker is None:
                    raise
                await client.aclose()
                client = await self._discover()
                accepted = await client.open(
                    self.vmid, name=self.state.name, disks=self.disks, create=False
                )
        except BaseException:
            await client.aclose()
            raise
        return client, accepted

    async def verify(self) -> VerifyResult:
        """Compare the replica with what was acknowledged, by digests only (the primary's
        disks are not read): the differing ranges, if any. Replication may go on."""
        started = time.monotonic()
        block = self.state.block_size
        client, accepted = await self._open_existing()
        try:
            result = VerifyResult(self.state.vmid, accepted.applied_sequence)
            # A disk that grew or shrank is not "verified" because its old extent matches.
            result.size_differences = size_differences(
                self.state.disks, [d.size for d in accepted.disks]
            )
            skip: dict[int, set[int]] = {}
            for cycle in self.pending.cycles():
                if cycle.sequence > accepted.applied_sequence:
                    for disk_index, blocks in pending_blocks(
                        self.pending.read_cycle(cycle.sequence), block
                    ).items():
                        skip.setdefault(disk_index, set()).update(blocks)
            for index, disk in enumerate(self.disks):
                theirs = await replica_map(client, self.vmid, index, disk.size, block)
                ours = self._maps[index]
                left_out = skip.get(index, set())
                bad = [b for b in differing_blocks(ours, theirs) if b not in left_out]
                result.blocks += ours.block_count - len(left_out)
                result.skipped += len(left_out)
                result.differences += coalesce(index, bad, block, disk.size)
        finally:
            await client.aclose()
        result.seconds = time.monotonic() - started
        return result

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
            return await self._resync(progress, by_digests=by_digests)

    async def _resync(self, progress: Progress | None, *, by_digests: bool) -> ResyncResult:
        check_disks(self.state.disks, self.state.vmid)
        started = time.monotonic()
        known: dict[int, set[int]] | None = None
        if not by_digests and self._bitmap_survived():
            known = await trio.to_thread.run_sync(self._pending_blocks)
        client, accepted = await self._open_existing()
        taken: dict[int, list[int]] = {}
        try:
            try:
                if known is not None and accepted.applied_sequence < self.state.sequence:
                    # The maps assume the replica holds every acknowledged batch; it does
                    # not, so only a comparison can tell what it lacks.
                    log.warning(
                        "%s: the replica is at sequence %d, behind the acknowledged %d: "
                        "resynchronizing by digests",
                        self.state.name,
                        accepted.applied_sequence,
                        self.state.sequence,
                    )
                    known = None
                sequence = max(accepted.applied_sequence, self.state.sequence) + 1
                if self.before_capture is not None:
                    self.before_capture()
                try:
                    if self.tracker is not None:
                        # By digests, the comparison covers these blocks; from the bitmap,
                        # they are part of what is sent.
                        taken = self.tracker.take()
                    if known is None:
                        result, maps, sent = await self._resync_by_digests(
                            client, sequence, progress
                        )
                        touched: list[int] = list(range(len(maps)))
                    else:
                        for disk_index, blocks in taken.items():
                            known.setdefault(disk_index, set()).update(blocks)
                        result, sent = await self._resync_known(client, sequence, known, progress)
                        maps, touched = self._maps, sorted(sent)
                finally:
                    if self.after_capture is not None:
                        self.after_capture()
            finally:
                await client.aclose()
            # The maps now describe what the replica holds: updated where we sent. From
            # the bitmap, the blocks not sent were captured and acknowledged unchanged
            # since (else they would be in the log or the tracker), so their maps stand.
            for index in touched:
                dmap = maps[index]
                for b, digest in sent.get(index, {}).items():
                    dmap.set(b, digest)
                dmap.save(self._map_path(index))
            self._maps = maps
            self.state.sequence = max(
                self.state.sequence, accepted.applied_sequence, result.sequence
            )
            self.state.last_replicated_at = time.time()
            self._save()
        except BaseException:
            # Perhaps not applied, perhaps not recorded: sending them again is harmless,
            # and a later resynchronization from the bitmap must not miss them.
            self._give_back(taken)
            raise
        self.pending.clear()
        self.pending.clear_overflow()
        self.state.needs_resync = False
        if result.method == BY_DIGESTS and self.tracker is not None:
            self.tracker.clear_lost()  # the comparison covered what it had missed
        self._save()
        result.seconds = time.monotonic() - started
        self.last_resync = result
        if result.method == BY_DIGESTS:
            log.info(
                "%s: resynchronized by digests: %d of %d blocks differed (%d bytes sent)",
                self.state.name,
                result.blocks_sent,
                result.blocks,
                result.bytes_sent,
            )
        else:
            log.info(
                "%s: resynchronized from the dirty bitmap: %d blocks (%d bytes) sent",
                self.state.name,
                result.blocks_sent,
                result.bytes_sent,
            )
        return result

    def _bitmap_survived(self) -> bool:
        """Whether the pending log and the tracker together know every block changed since
        the last acknowledged batch (their union is then exact)."""
        return (
            self.pending.overflowed
            and self.tracker is not None
            and not self.tracker.lost
            and not self.state.needs_resync
            # The maps of the blocks not sent are kept as they are: a missing map file
            # was replaced by an empty map on load, which describes nothing.
            and all(self._map_path(i).exists() for i in range(len(self.state.disks)))
        )

    def _pending_blocks(self) -> dict[int, set[int]] | None:
        """The blocks of every cycle in the pending log, from its record headers; None when
        the log cannot be trusted (only digests can tell what changed then)."""
        block = self.state.block_size
        sizes = [d.size for d in self.disks]
        blocks: dict[int, set[int]] = {}
        try:
            for cycle in self.pending.cycles():
                for disk_index, offset, length in self.pending.extents(cycle.sequence):
                    # capture() writes whole blocks at block offsets, the last one cut at
                    # the disk's end. Anything else is damage that the record checksums
                    # (not read here: they cover the data) would have shown.
                    if not (
                        0 <= disk_index < len(sizes)
                        and offset % block == 0
                        and offset < sizes[disk_index]
                        and length == min(block, sizes[disk_index] - offset)
                    ):
                        raise PendingLogCorrupt(
                            f"cycle {cycle.sequence}: a chunk of disk {disk_index} at "
                            f"offset {offset}, {length} bytes, is not a captured block"
                        )
                    blocks.setdefault(disk_index, set()).add(offset // block)
        except (PendingLogCorrupt, KeyError, OSError) as exc:
            log.warning(
                "%s: the pending log cannot be trusted (%s): resynchronizing by digests",
                self.state.name,
                exc,
            )
            return None
        return blocks

    async def _resync_known(
        self,
        client: RecoveryClient,
        sequence: int,
        known: dict[int, set[int]],
        progress: Progress | None,
    ) -> tuple[ResyncResult, dict[int, dict[int, bytes]]]:
        """Send the ``known`` blocks (``{disk: blocks}``) as batch ``sequence``; the result
        and, once acknowledged, ``{disk: {block: digest}}`` of what was sent."""
        block = self.state.block_size
        sizes = [d.size for d in self.disks]
        wanted = {index: sorted(blocks) for index, blocks in known.items() if blocks}
        result = ResyncResult(self.state.vmid, 0, method=FROM_DIRTY_BITMAP)
        result.blocks_sent = sum(len(blocks) for blocks in wanted.values())
        total = sum(
            min(block, sizes[index] - b * block) for index, blocks in wanted.items() for b in blocks
        )
        sent: dict[int, dict[int, bytes]] = {}
        if not result.blocks_sent:
            return result, sent

        def chunks() -> Any:
            for index, blocks in sorted(wanted.items()):
                digests = sent.setdefault(index, {})
                for b, offset, data in read_blocks(self.images[index], block, blocks, sizes[index]):
                    # Digested as read: the map records exactly the bytes that crossed.
                    digest = xxhash.xxh3_128_digest(data)
                    digests[b] = digest
                    result.bytes_sent += len(data)
                    if progress is not None:
                        progress(result.bytes_sent, total)
                    yield index, offset, data, digest

        await client.send_batch(
            self.vmid,
            sequence,
            chunks(),
            chunk_count=result.blocks_sent,
            total_bytes=total,
            captured_at_ms=int(time.time() * 1000),
            limiter=self._limiter(),
        )
        result.sequence = sequence
        return result, sent

    async def _resync_by_digests(
        self, client: RecoveryClient, sequence: int, progress: Progress | None
    ) -> tuple[ResyncResult, list[DigestMap], dict[int, dict[int, bytes]]]:
        """Compare every block with the replica's digests and send those that differ as
        batch ``sequence``: the result, the replica's maps as fetched, and ``{disk:
        {block: digest}}`` of what was sent."""
        block = self.state.block_size
        theirs = [
            await replica_map(client, self.vmid, i, d.size, block) for i, d in enumerate(self.disks)
        ]
        changed: dict[int, dict[int, bytes]] = {}
        total = sum(d.size for d in self.disks)
        for index, path in enumerate(self.images):
            before = sum(d.size for d in self.disks[:index])
            report = None if progress is None else partial(_report_scan, progress, before, total)
            blocks, digests = await trio.to_thread.run_sync(
                partial(scan_changes, path, theirs[index], progress=report)
            )
            changed[index] = {b: digests[b] for b in blocks}
        result = ResyncResult(self.state.vmid, 0, method=BY_DIGESTS)
        result.blocks = sum(m.block_count for m in theirs)
        result.blocks_sent = sum(len(c) for c in changed.values())
        if result.blocks_sent:

            def chunks() -> Any:
                for index, blocks in sorted(changed.items()):
                    size = self.disks[index].size
                    for b, offset, data in read_blocks(
                        self.images[index], block, sorted(blocks), size
                    ):
                        result.bytes_sent += len(data)
                        # Digested once, by the scan: if the disk changed since (outside
                        # the capture window), the server refuses the chunk instead of the
                        # map believing it.
                        yield index, offset, data, blocks[b]

            await client.send_batch(
                self.vmid,
                sequence,
                chunks(),
                chunk_count=result.blocks_sent,
                total_bytes=sum(
                    min(block, self.disks[i].size - b * block)
                    for i, blocks in changed.items()
                    for b in blocks
                ),
                captured_at_ms=int(time.time() * 1000),
                limiter=self._limiter(),
            )
            result.sequence = sequence
        return result, theirs, changed

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
            return await self._prepare_failover()

    async def _prepare_failover(self) -> VerifyResult:
        started = time.monotonic()
        await self.cycle()
        block = self.state.block_size
        client, accepted = await self._open_existing()
        try:
            result = VerifyResult(self.state.vmid, accepted.applied_sequence)
            for index, disk in enumerate(self.disks):
                theirs = await replica_map(client, self.vmid, index, disk.size, block)
                blocks, _ = await trio.to_thread.run_sync(scan_changes, self.images[index], theirs)
                result.blocks += theirs.block_count
                result.differences += coalesce(index, blocks, block, disk.size)
        finally:
            await client.aclose()
        result.seconds = time.monotonic() - started
        if not result.ok:
            raise ReplicationHalted(
                f"{self.state.name}: after the last cycle the replica still differs from the "
                f"disks ({len(result.differences)} ranges): not failing over; resynchronize"
            )
        self.state.halted = (
            f"planned failover: the replica holds this VM's final state (sequence "
            f"{result.sequence}, verified); this primary replicates it no more"
        )
        self._save()
        log.info("%s: ready for failover at sequence %d", self.state.name, result.sequence)
        return result

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
            sizes = [image_size(str(d["disk_id"]), Path(d["path"])) for d in self.state.disks]
            await self._delete_replica()
            self.pending.clear()
            self.pending.clear_overflow()
            for index in range(len(self.state.disks)):
                self._map_path(index).unlink(missing_ok=True)
            incarnation = uuid.uuid4().hex

            def start_over(state: VMReplicationState) -> None:
                for disk, size in zip(state.disks, sizes, strict=True):
                    disk["size"] = size
                state.ir_state, state.ir_cursor = "NOT_STARTED", [0, 0]
                state.ir_bytes_done = state.ir_bytes_total = 0
                state.sequence, state.generation, state.pending_bytes = 0, 0, 0
                state.last_replicated_at = None
                state.health, state.halted, state.last_error = "initial replication", None, None
                state.needs_resync = False
                state.node_name, state.node_address, state.node_port = "", "", 0
                state.incarnation = incarnation

            self.state = self.store.update(self.state.vmid, start_over)
            self._operator_seen = operator_fields(self.state)
            self._seen_writer = self.state.written_by
            self._maps = [self._load_map(i) for i in range(len(self.state.disks))]
        log.info("%s: seeded anew at %s bytes", self.state.name, sizes)
        return self.state

    async def _delete_replica(self) -> None:
        """Remove the replica where it lives (a broker is asked where that is)."""
        s = self.state
        client = await (self._connect_node() if s.broker and s.node_name else self._discover())
        try:
            for attempt in range(MAX_REQUERIES + 1):
                try:
                    await client.open(
                        self.vmid,
                        name=s.name,
                        disks=self.disks,
                        create=False,
                        generation=s.generation,
                    )
                except fp.UnknownVM:
                    log.info("%s: the recovery side holds no replica to remove", s.name)
                    return
                except fp.VMNotHere:
                    if s.broker is None or attempt == MAX_REQUERIES:
                        raise
                    await client.aclose()
                    client = await self._discover()
                    continue
                await client.delete_relationship(self.vmid)
                log.info("%s: the recovery side removed its replica", s.name)
                return
        finally:
            await client.aclose()

    async def capture(self) -> None:
        """Copy this cycle's changed blocks into the pending log (one consistent point)."""
        if self.pending.overflowed:
            return  # cycle() resynchronizes instead
        if self.before_capture is not None:
            self.before_capture()
        try:
            changed = await trio.to_thread.run_sync(self._changed_blocks)
            if not any(changed.values()):
                return
            block = self.state.block_size
            captured: list[tuple[int, int, bytes]] = []

            def chunks() -> Any:
                for disk_index, blocks in sorted(changed.items()):
                    size = self.disks[disk_index].size
                    for b, offset, data in read_blocks(
                        self.images[disk_index], block, blocks, size
                    ):
                        captured.append((disk_index, b, xxhash.xxh3_128_digest(data)))
                        yield disk_index, offset, data

            try:
                cycles = self.pending.cycles()
                sequence = max(cycles[-1].sequence if cycles else 0, self.state.sequence) + 1
                await trio.to_thread.run_sync(
                    self.pending.append_cycle, sequence, int(time.time() * 1000), chunks()
                )
            except PendingLogFull:
                # The tracker must keep these blocks: with the log overflowed, the
                # resynchronization trusts the tracker's dirty set plus the log's cycles
                # as the whole of what changed.
                self._give_back(changed)
                log.warning(
                    "%s: the pending log passed its bound (%d bytes): the next step is a "
                    "resynchronization",
                    self.state.name,
                    self.pending_bytes,
                )
                return
            except BaseException:
                # Nothing of this cycle was kept: its blocks are dirty again for the next.
                self._give_back(changed)
                raise
            # The maps now describe what was *captured* (durable in the pending log), so
            # the next scan finds only what changed since, not this cycle again.
            for disk_index, b, digest in captured:
                self._maps[disk_index].set(b, digest)
            for index in {d for d, _, _ in captured}:
                self._maps[index].save(self._map_path(index))
        finally:
            if self.after_capture is not None:
                self.after_capture()
        self._save()

    def _give_back(self, taken: dict[int, list[int]]) -> None:
        """Blocks taken from the tracker that were not captured or sent: dirty again."""
        if self.tracker is not None and taken:
            self.tracker.restore(taken)

    def _changed_blocks(self) -> dict[int, list[int]]:
        if self.tracker is not None:
            return self.tracker.take()
        changed: dict[int, list[int]] = {}
        for disk_index, path in enumerate(self.images):
            blocks, _digests = scan_changes(path, self._maps[disk_index])
            if blocks:
                changed[disk_index] = blocks
        return changed

    async def _send_cycle(self, client: RecoveryClient, pending: PendingCycle) -> None:
        sequence = pending.sequence

        def chunks() -> Any:
            # Streamed from the pending log: a large cycle never sits in memory whole.
            for disk_index, offset, data in self.pending.read_cycle(sequence):
                digest = xxhash.xxh3_128_digest(data)
                fault = self.chunk_fault
                yield disk_index, offset, data if fault is None else fault(data), digest

        total = pending.nbytes
        await client.send_batch(
            self.vmid,
            sequence,
            chunks(),
            chunk_count=pending.chunk_count,
            total_bytes=total,
            captured_at_ms=pending.captured_at_ms,
            limiter=self._limiter(),
        )
        # The acknowledged sequence is recorded *before* the cycle leaves the pending log:
        # killed in between, the primary finds a cycle it already had acknowledged (it is
        # dropped unsent, see _session). The other order could let a restarted primary
        # number new changes with a sequence the replica already applied, and the
        # replica would acknowledge them without applying them.
        self.state.sequence = sequence
        self.state.last_replicated_at = time.time()
        self._save()
        self.pending.drop_through(sequence)
        self._save()
        log.info(
            "%s: batch %d applied (%d chunks, %d bytes)",
            self.state.name,
            sequence,
            pending.chunk_count,
            total,
        )
