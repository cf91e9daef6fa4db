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
   the bound is reached. Past the bound the log is marked overflowed: replication needs a
   resynchronization (a later issue), never a silent full IR.

State (sequence, IR progress, health) is persisted after every step, so a restarted
primary resumes without a new IR.
"""

from __future__ import annotations

import logging
import math
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import xxhash

import frproto as fp
from node.config import NO_COMPRESSION
from node.tls import TLSFailure

from .bandwidth import BandwidthLimiter, combined
from .client import IRProgress, RecoveryClient
from .digest_map import DigestMap
from .pending_log import PendingCycle, PendingLog, PendingLogCorrupt, PendingLogFull
from .scan import read_blocks, scan_changes
from .state import STATE_FILE, PrimaryStateStore, VMReplicationState
from .tracker import ChangeTracker

log = logging.getLogger("frrep.primary")

#: Default bound of a VM's pending log.
DEFAULT_PENDING_BYTES = 4 * 1024 * 1024 * 1024
#: How often IR progress is written to the VM's state file (seconds).
IR_PROGRESS_SECONDS = 0.5
_BACKOFF_START = 1.0
_BACKOFF_MAX = 60.0


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
        if not (self.dir / STATE_FILE).exists():
            return  # disabled meanwhile (enable writes the state first): do not bring it back
        self.state.pending_bytes = self.pending.size_bytes
        self.store.save(self.state)

    # -- the loop --------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Replicate until cancelled: a cycle every ``frequency_s``, retrying with backoff."""
        task_status.started()
        backoff = _BACKOFF_START
        while True:
            try:
                fresh = self.store.load(self.state.vmid)
            except FileNotFoundError:
                log.info("replication of %s was disabled", self.state.name)
                return
            self.state.paused, self.state.frequency_s = fresh.paused, fresh.frequency_s
            self.state.bandwidth_bps = fresh.bandwidth_bps
            if self.state.paused:
                await trio.sleep(min(self.state.frequency_s, 5.0))
                continue
            started = time.monotonic()
            try:
                await self.cycle()
                backoff = _BACKOFF_START
            except (ReplicationHalted, PendingLogCorrupt) as exc:
                log.error("replication of %s halted: %s", self.state.name, exc)
                self.state.health = "critical"
                self._save()
                return
            except (
                OSError,
                TLSFailure,
                trio.BrokenResourceError,
                trio.TooSlowError,
                fp.FrprotoError,
            ) as exc:
                log.warning(
                    "cycle of %s failed: %s; retry in %.0f s", self.state.name, exc, backoff
                )
                self._update_health()
                self._save()
                await trio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            elapsed = time.monotonic() - started
            await trio.sleep(max(0.0, self.state.frequency_s - elapsed))

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
        """One cycle: capture (after IR), connect, IR if needed, send every pending cycle."""
        self.state.last_cycle_started_at = time.time()
        if self.state.ir_state == "COMPLETE":
            await self.capture()
        client = await RecoveryClient.connect(
            self.state.recovery_host,
            self.state.recovery_port,
            server_name=self.state.server_name,
            ssl_context=self.ssl_context,
            local_address=self.local_address,
            compression=self.compression,
        )
        try:
            await self._session(client)
        finally:
            self.last_compression = client.negotiated.compression
            self.last_chunk_bytes_sent = client.conn.chunk_bytes_sent
            await client.aclose()
        self._update_health()
        self._save()

    async def _session(self, client: RecoveryClient) -> None:
        try:
            accepted = await client.open(
                self.vmid,
                name=self.state.name,
                disks=self.disks,
                config=self.config_blob,
                create=self.state.ir_state != "COMPLETE",
            )
        except fp.VMDeleted as exc:
            raise ReplicationHalted(str(exc)) from exc
        if self.state.ir_state != "COMPLETE":
            await self._initial_replication(client, accepted)
        elif accepted.applied_sequence < self.state.sequence:
            raise ReplicationHalted(
                f"the replica is at sequence {accepted.applied_sequence}, behind the "
                f"acknowledged {self.state.sequence}: it needs a resynchronization"
            )
        for pending in self.pending.cycles():
            await self._send_cycle(client, pending)

    async def _initial_replication(
        self, client: RecoveryClient, accepted: fp.RelationshipAccepted
    ) -> None:
        from node.oob import is_exported  # out-of-band IR (node/oob.py, docs/oob-ir.md)

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
            self._rebuild_maps_before(start)
        for index, dmap in enumerate(maps):
            dmap.save(self._map_path(index))
        self.state.ir_state = "COMPLETE"
        self.state.ir_bytes_done = self.state.ir_bytes_total = sum(d.size for d in self.disks)
        self.state.sequence = 0
        self.state.last_replicated_at = time.time()
        self._save()
        log.info("IR of %s complete", self.state.name)

    def _rebuild_maps_before(self, start: tuple[int, int]) -> None:
        """Digest what a resumed IR did not send this time (it was sent before)."""
        block = self.state.block_size
        for disk_index, path in enumerate(self.images):
            end = self.disks[disk_index].size if disk_index < start[0] else start[1]
            if disk_index > start[0] or end == 0:
                continue
            blocks = list(range(math.ceil(end / block)))
            for b, _, data in read_blocks(path, block, blocks, self.disks[disk_index].size):
                self._maps[disk_index].set(b, xxhash.xxh3_128_digest(data))

    async def capture(self) -> None:
        """Copy this cycle's changed blocks into the pending log (one consistent point)."""
        if self.pending.overflowed:
            raise ReplicationHalted("the pending log overflowed: a resynchronization is needed")
        if self.before_capture is not None:
            self.before_capture()
        try:
            changed = await trio.to_thread.run_sync(self._changed_blocks)
            if not any(changed.values()):
                return
            cycles = self.pending.cycles()
            sequence = (cycles[-1].sequence if cycles else self.state.sequence) + 1
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
                await trio.to_thread.run_sync(
                    self.pending.append_cycle, sequence, int(time.time() * 1000), chunks()
                )
            except PendingLogFull:
                if self.tracker is not None:
                    self.tracker.restore(changed)
                raise ReplicationHalted(
                    "the pending log passed its bound: a resynchronization is needed"
                ) from None
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
        self.pending.drop_through(sequence)
        self.state.sequence = sequence
        self.state.last_replicated_at = time.time()
        self._save()
        log.info(
            "%s: batch %d applied (%d chunks, %d bytes)",
            self.state.name,
            sequence,
            pending.chunk_count,
            total,
        )
