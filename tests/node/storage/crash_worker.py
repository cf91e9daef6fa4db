"""A process for the storage crash tests to kill: applies batches (or an IR) and reports.

Usage: ``python crash_worker.py ROOT SEED MODE [UPTO] [KEEP]``, with the repository root on
``PYTHONPATH``.

* ``MODE=batches``: recover the store, open the test replica and apply batches
  ``applied_sequence + 1 .. UPTO``, printing ``BEGIN <seq>`` before ``begin_batch`` and
  ``ACK <seq>`` once the batch is committed (each line flushed): for a sequence that is a
  multiple of 3 after ``commit()``, for the others after ``make_durable()`` (the pipelined
  commit: acknowledged before it is applied), then ``apply_committed()`` for ``seq % 3 ==
  1`` and a ``read`` (which applies it first) for ``seq % 3 == 2``.
* ``MODE=ir``: recover, create the replica if needed, begin or resume the IR from
  ``ir_cursor``, checkpoint every 3 chunks (``CKPT <disk> <offset>`` after it returns),
  then ``COMPLETING`` and, after ``complete_ir``, ``DONE``.

* ``MODE=failover``: fail over to the point ``UPTO``; ``MODE=cancel`` / ``complete``:
  cancel or complete the failover (``DONE <applied_sequence>`` once it returns).

``READY <applied_sequence>`` is printed after recovery. With ``FRREP_CRASH_POINT=<name>``
(and ``FRREP_CRASH_HIT=<n>``, default 1) the process SIGKILLs itself at the n-th time the
storage engine reaches that crash point. ``FRREP_SLOW=<seconds>`` sleeps after each IR
chunk, to widen the window for random kills.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from frproto import IRState
from node.storage import ReplicaStore, StorageFaults
from tests.node.storage import workload as wl


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _faults() -> StorageFaults | None:
    target = os.environ.get("FRREP_CRASH_POINT")
    if not target:
        return None
    hit = int(os.environ.get("FRREP_CRASH_HIT", "1"))
    seen = [0]

    def crash_point(name: str) -> None:
        if name == target:
            seen[0] += 1
            if seen[0] == hit:
                os.kill(os.getpid(), signal.SIGKILL)

    return StorageFaults(crash_point=crash_point)


def run_batches(store: ReplicaStore, seed: int, upto: int) -> None:
    replica = store.open(wl.VMID)
    _say(f"READY {replica.applied_sequence}")
    for seq in range(replica.applied_sequence + 1, upto + 1):
        _say(f"BEGIN {seq}")
        writer = replica.begin_batch(seq, seq - 1, wl.captured_at(seq))
        for r in wl.batch(seed, seq):
            writer.add(r.disk_index, r.offset, r.data, length=r.length)
        if seq % 3 == 0:
            writer.commit()
            _say(f"ACK {seq}")
            continue
        # The pipelined commit, as the recovery server does it: acknowledged once the
        # journal is durable, applied after; every other time by a reader, which applies
        # it first (before the next BEGIN, which the test takes as the highest batch).
        writer.make_durable()
        _say(f"ACK {seq}")
        if seq % 3 == 1:
            replica.apply_committed()
        else:
            replica.read(0, 0, 1)
    _say("DONE")


def run_ir(store: ReplicaStore, seed: int) -> None:
    if not store.exists(wl.VMID):
        store.create(
            wl.VMID, name="vm", config=b"cfg", disks=wl.DISKS, primary="p", trust_group="t"
        )
    replica = store.open(wl.VMID)
    _say(f"READY {replica.applied_sequence}")
    if replica.ir_state == IRState.COMPLETE:
        _say("DONE")
        return
    replica.begin_ir(wl.IR_SEQUENCE)
    cursor = replica.ir_cursor
    _say(f"RESUME {cursor[0]} {cursor[1]}")
    slow = float(os.environ.get("FRREP_SLOW", "0"))
    chunks = [c for c in wl.ir_chunks(seed) if (c.disk_index, c.offset) >= cursor]
    for i, c in enumerate(chunks, 1):
        replica.write_ir_chunk(c.disk_index, c.offset, c.data, length=c.length)
        if slow:
            time.sleep(slow)
        if i % 3 == 0:
            nxt = (c.disk_index, c.offset + c.length)
            replica.checkpoint_ir(*nxt)
            _say(f"CKPT {nxt[0]} {nxt[1]}")
    _say("COMPLETING")
    replica.complete_ir(wl.IR_SEQUENCE)
    _say("DONE")


def main() -> None:
    root, seed, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    upto = int(sys.argv[4]) if len(sys.argv) > 4 else 1_000_000
    keep = int(sys.argv[5]) if len(sys.argv) > 5 else 4
    with ReplicaStore(root, keep_points=keep, faults=_faults()) as store:
        for line in store.recover():
            _say(f"LOG {line}")
        if mode == "batches":
            run_batches(store, seed, upto)
        elif mode in ("failover", "cancel", "complete"):
            replica = store.open(wl.VMID)
            _say(f"READY {replica.applied_sequence}")
            if mode == "failover":
                replica.fail_over(upto)
            elif mode == "cancel":
                replica.cancel_failover()
            else:
                replica.complete_failover()
            _say(f"DONE {replica.applied_sequence}")
        else:
            run_ir(store, seed)


if __name__ == "__main__":
    main()
