"""The primary server's side of replication: its building blocks.

* :class:`ChangeTracker`: written ranges reported by an embedding hypervisor tool.
* :class:`DigestMap`: block digests of the last replicated state, per disk.
* :func:`scan_changes` / :func:`read_blocks`: find changed blocks without a tracker; read
  chosen blocks with coalesced large reads.
* :class:`PendingLog`: the bounded on-disk log of cycles not yet acknowledged.
* :class:`BandwidthLimiter` / :class:`BandwidthSchedule` / :func:`combined`: bandwidth
  limits per relationship and per host, by time of day.
* :class:`PrimaryStateStore` / :class:`VMReplicationState`: the persisted per-VM state.

All of them are synchronous (call the long operations through ``trio.to_thread``), typed
and free of global state; the replicator (``node.primary.replicator``) puts them together.
"""

from __future__ import annotations

from .bandwidth import (
    BandwidthLimiter,
    BandwidthRule,
    BandwidthSchedule,
    CombinedLimiter,
    combined,
)
from .digest_map import DIGEST_SIZE, UNKNOWN, DigestMap, DigestMapCorrupt
from .pending_log import (
    PendingCycle,
    PendingLog,
    PendingLogCorrupt,
    PendingLogError,
    PendingLogFull,
)
from .scan import MAX_READ, SCAN_BUFFER, read_blocks, scan_changes
from .state import (
    IR_STATES,
    Health,
    IRStage,
    PrimaryStateStore,
    StateCorrupt,
    VMReplicationState,
    write_file_atomic,
)
from .tracker import ChangeTracker, TrackerCorrupt

__all__ = [
    "DIGEST_SIZE",
    "IR_STATES",
    "MAX_READ",
    "SCAN_BUFFER",
    "UNKNOWN",
    "BandwidthLimiter",
    "BandwidthRule",
    "BandwidthSchedule",
    "ChangeTracker",
    "Health",
    "IRStage",
    "CombinedLimiter",
    "DigestMap",
    "DigestMapCorrupt",
    "PendingCycle",
    "PendingLog",
    "PendingLogCorrupt",
    "PendingLogError",
    "PendingLogFull",
    "PrimaryStateStore",
    "StateCorrupt",
    "TrackerCorrupt",
    "VMReplicationState",
    "combined",
    "read_blocks",
    "scan_changes",
    "write_file_atomic",
]
