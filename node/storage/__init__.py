"""Replica storage of the recovery server: replicas, IR, journaled delta batches and
recovery points, crash-consistent (see ``docs/storage.md``).

Synchronous; the server calls the long operations through ``trio.to_thread``::

    store = ReplicaStore(root)
    for line in store.recover():          # once, at startup
        log.info(line)
    replica = store.create(vmid, name=..., config=..., disks=..., primary=..., trust_group=...)
    replica.begin_ir(1); replica.write_ir_chunk(0, 0, data); replica.complete_ir(1)
    batch = replica.begin_batch(2, 1, captured_at_ms)
    batch.add(0, offset, data)
    batch.make_durable()                  # acknowledge once this returns, then
    replica.apply_committed()             # apply (readers apply it first themselves)
"""

from __future__ import annotations

from .batch import AlreadyApplied, BatchWriter
from .fileio import CRASH_POINTS, StorageFaults
from .points import RecoveryPoint
from .replica import Replica
from .store import ReplicaStore

__all__ = [
    "CRASH_POINTS",
    "AlreadyApplied",
    "BatchWriter",
    "RecoveryPoint",
    "Replica",
    "ReplicaStore",
    "StorageFaults",
]
