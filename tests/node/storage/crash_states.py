"""Power-loss crash states of the storage engine: workloads, the oracle, and the runner
behind ``tests/node/storage/test_power_loss.py`` and ``scripts/crashes``.

A workload runs once on real files through :class:`frtesting.powerloss.RecordingFileIO`,
marking what the engine promised (``created``, ``ckpt``, ``ack``, ...). For every crash
point (before each recorded operation) and every disk state a power cut may leave there
(:class:`frtesting.powerloss.CrashStates`), the state is written to a fresh directory, a
plain :class:`~node.storage.ReplicaStore` recovers it, and the oracle checks (the names
are the invariants of ``docs/storage.md``, "What a power cut may leave"):

* ``S1 one batch boundary``: the replica opens at exactly one sequence ``s`` with
  ``last acknowledged <= s <= last begun``, and its images equal the primary's at ``s``;
* ``S2 kept points``: every kept recovery point reads back exactly as the primary's
  image at that point, and the kept points are the newest ``keep`` up to ``s``;
* ``S3 IR cursor``: during an IR, the cursor never falls behind an acknowledged
  checkpoint, and everything before it reads as the source image;
* ``S4 created``: a replica whose create returned exists;
* ``S5 recovery is done once``: no journal is left, and a second recovery finds nothing
  to do;
* ``S6 failover decided``: an unplanned failover whose decision was written finishes at
  its point when run again; one that returned is at its point;
* ``S7 nothing outside``: the engine changed no file outside its storage root (a point
  copy writes only its own directory, and leaves the replica as it was);
* ``P1``-``P3`` (the primary's files): a VM whose enable returned has its state; the
  state never says less was acknowledged than was; every cycle captured and not
  acknowledged is still pending, whole (so no change is lost, and no acknowledged cycle
  is resent under a new sequence);
* ``S8 a finished copy is whole``: a point copy that returned reads, after the power
  cut, exactly as the primary's image at its point;
* ``S9 complete and cancel``: a failover's complete or cancel that returned is done; one
  cut short is either not begun (the failover in force, at its point) or finishes when
  run again; a cancel ends at the sequence, points and generation from before the
  failover, a complete with only the failover's point, and neither leaves its files.

``python -m tests.node.storage.crash_states --states N`` (``scripts/crashes``) runs the
workloads until ``N`` states were checked; its last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from frproto import IRState
from frtesting.powerloss import DATA_KINDS, ENTRY_KINDS, CrashState, CrashStates, RecordingFileIO
from node.primary.durable import using
from node.primary.pending_log import PendingLog
from node.primary.state import PrimaryStateStore, VMReplicationState
from node.storage import ReplicaStore
from node.storage.point_copy import copy_point
from tests.node.storage import workload as wl

KEEP = 2  # small, so that the batch workloads prune points
#: Where the states are built: a tmpfs where there is one (a state is recovered with real
#: fsyncs, which cost milliseconds each on a disk and nothing on tmpfs; what is checked
#: is the state's content, built by the layer, not the device's durability).
FAST_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
#: Where the replica store lies in a recorded run's directory, and the point copies.
STORE = "store"
COPIES = "copies"


def _inside(path: str, root: Path, workload: Workload) -> bool:
    """Whether a recorded change lies where the workload may write: the storage root,
    and for the point-copy workload the copy's directory."""
    rel = path[len(str(root)) + 1 :] if path.startswith(str(root) + "/") else path
    allowed = (STORE,) + ((COPIES,) if workload.copy_at is not None else ())
    return rel.split("/", 1)[0] in allowed or rel.split(" -> ")[0].split("/", 1)[0] in allowed


# -- workloads --------------------------------------------------------------------------------
def _create_and_ir(store: ReplicaStore, io: RecordingFileIO, seed: int) -> None:
    io.mark("creating")
    r = store.create(
        wl.VMID, name="vm", config=b"cfg", disks=wl.DISKS, primary="p", trust_group="t"
    )
    io.mark("created")
    r.begin_ir(wl.IR_SEQUENCE)
    for i, c in enumerate(wl.ir_chunks(seed), 1):
        r.write_ir_chunk(c.disk_index, c.offset, c.data, length=c.length)
        if i % 6 == 0:
            nxt = (c.disk_index, c.offset + c.length)
            r.checkpoint_ir(*nxt)
            io.mark("ckpt", *nxt)
    io.mark("completing")
    r.complete_ir(wl.IR_SEQUENCE)
    io.mark("ack", wl.IR_SEQUENCE)


def _batch(
    store: ReplicaStore, io: RecordingFileIO, seed: int, seq: int, ranges: list[wl.Range]
) -> None:
    r = store.open(wl.VMID)
    io.mark("begin", seq)
    writer = r.begin_batch(seq, seq - 1, wl.captured_at(seq))
    for rng in ranges:
        writer.add(rng.disk_index, rng.offset, rng.data, length=rng.length)
    # as the recovery server does (the pipelined commit): acknowledge once the journal is
    # durable, then apply off the acknowledgement path
    writer.make_durable()
    io.mark("ack", seq)
    r.apply_committed()


def small_batch(seed: int, seq: int) -> list[wl.Range]:
    """Three ranges (data, zero, data inside the first): few enough journal writes that
    every crash state of a one-batch run can be enumerated."""
    rng = random.Random(f"small:{seed}:{seq}")
    at = 4096 * rng.randrange(0, 200)
    return [
        wl.Range(0, at, 8192, rng.randbytes(8192)),
        wl.Range(1, 8192, 4096, None),
        wl.Range(0, at + 1024, 1024, rng.randbytes(1024)),
    ]


@dataclass(frozen=True)
class Workload:
    """A named run. ``setup`` runs before recording (its result is the durable start);
    ``run`` is recorded. ``oracle`` gives the image at a sequence."""

    name: str
    setup: Callable[[Path, int], None]
    run: Callable[[ReplicaStore, RecordingFileIO, int], None]
    batches: Callable[[int, int], list[wl.Range]]
    keep: int = KEEP
    failover_to: int | None = None
    copy_at: int | None = None
    #: The primary's files (state, pending log), not a replica's.
    primary: bool = False
    #: A failover (at 3, from 4) ended: "cancel" or "complete".
    ending: str | None = None


def _nothing(root: Path, seed: int) -> None:
    pass


def _setup_ir(root: Path, seed: int) -> None:
    with ReplicaStore(root, keep_points=KEEP) as store:
        r = store.create(
            wl.VMID, name="vm", config=b"cfg", disks=wl.DISKS, primary="p", trust_group="t"
        )
        r.begin_ir(wl.IR_SEQUENCE)
        for c in wl.ir_chunks(seed):
            r.write_ir_chunk(c.disk_index, c.offset, c.data, length=c.length)
        r.complete_ir(wl.IR_SEQUENCE)


def _setup_three_batches(root: Path, seed: int) -> None:
    _setup_ir(root, seed)
    with ReplicaStore(root, keep_points=KEEP + 1) as store:
        r = store.open(wl.VMID)
        for seq in (2, 3, 4):
            w = r.begin_batch(seq, seq - 1, wl.captured_at(seq))
            for rng in wl.batch(seed, seq):
                w.add(rng.disk_index, rng.offset, rng.data, length=rng.length)
            w.commit()


def _run_one_batch(store: ReplicaStore, io: RecordingFileIO, seed: int) -> None:
    _batch(store, io, seed, 2, small_batch(seed, 2))


def _run_ir_and_batches(store: ReplicaStore, io: RecordingFileIO, seed: int) -> None:
    _create_and_ir(store, io, seed)
    for seq in (2, 3, 4):
        _batch(store, io, seed, seq, wl.batch(seed, seq))


def _run_point_copy(store: ReplicaStore, io: RecordingFileIO, seed: int) -> None:
    out = store.root.parent / COPIES / "c1"
    copy_point(store.root, wl.VMID, out, 3, io=io)
    io.mark("copied", 3)


# -- the primary's side: capture into the pending log, acknowledge, drop ----------------
PRIMARY_VMID = "0b9e3f51-7c2d-4a6e-9d1f-2a3b4c5d6e7f"


def primary_chunks(seq: int) -> list[tuple[int, int, bytes]]:
    rng = random.Random(f"primary:{seq}")
    return [(0, 65536 * rng.randrange(16), rng.randbytes(3000)), (0, 4096, rng.randbytes(700))]


def _primary_state() -> VMReplicationState:
    return VMReplicationState(
        vmid=PRIMARY_VMID,
        name="vm1",
        disks=[{"disk_id": "d0", "path": "/images/vm1-d0.raw", "size": 1 << 20}],
        recovery_host="r1.example.com",
        recovery_port=7443,
        server_name="r1.example.com",
        frequency_s=30.0,
    )


def _primary_paths(storage: Path) -> tuple[PrimaryStateStore, Path]:
    store = PrimaryStateStore(storage / "state")
    return store, store.vm_dir(PRIMARY_VMID) / "pending"


def _run_primary(store: ReplicaStore, io: RecordingFileIO, seed: int) -> None:
    """What a primary writes for three cycles: enable (state), capture (a cycle file),
    the acknowledgement (state), the drop (the first file kept as the spare, which the
    next capture writes over; the others unlinked); the second and third cycles are both
    captured before either is acknowledged (a send that failed once)."""
    with using(io):
        states, pending_dir = _primary_paths(store.root)
        state = _primary_state()
        states.save(state)
        io.mark("enabled")
        log = PendingLog(pending_dir, max_bytes=1 << 24)

        def capture(seq: int) -> None:
            log.append_cycle(seq, wl.captured_at(seq), primary_chunks(seq))
            io.mark("captured", seq)

        def ack(seq: int) -> None:
            state.sequence = seq
            states.save(state)
            io.mark("acked", seq)
            log.drop_through(seq)

        capture(1)
        ack(1)
        capture(2)
        capture(3)
        ack(2)
        ack(3)


def _verify_primary(storage: Path, marks: list[tuple[object, ...]]) -> str | None:
    states, pending_dir = _primary_paths(storage)
    try:
        state = states.load(PRIMARY_VMID)
    except FileNotFoundError:
        if _last(marks, "enabled") is not None:
            return "P1 enabled: the VM's state is gone after its enable returned"
        return None
    acked = [int(m[1]) for m in marks if m[0] == "acked"]  # type: ignore[call-overload]
    captured = [int(m[1]) for m in marks if m[0] == "captured"]  # type: ignore[call-overload]
    if acked and state.sequence < acked[-1]:
        return (
            f"P2 not resent as new: the state says {state.sequence} was acknowledged, "
            f"but {acked[-1]} was"
        )
    log = PendingLog(pending_dir, max_bytes=1 << 24)
    intact = {c.sequence for c in log.cycles() if c.intact}
    for seq in captured:
        if seq <= state.sequence:
            continue
        if seq not in intact:
            return f"P3 no change lost: cycle {seq} captured, not acknowledged, not pending"
        got = [(d, o, bytes(b)) for d, o, b in log.read_cycle(seq)]
        if got != primary_chunks(seq):
            return f"P3 no change lost: pending cycle {seq} differs"
    return None


def _run_failover(store: ReplicaStore, io: RecordingFileIO, seed: int) -> None:
    r = store.open(wl.VMID)
    io.mark("failing_over", 3)
    r.fail_over(3)
    io.mark("failed_over", 3)


def _setup_failed_over(root: Path, seed: int) -> None:
    _setup_three_batches(root, seed)
    with ReplicaStore(root, keep_points=KEEP + 1) as store:
        store.open(wl.VMID).fail_over(3)


def _run_cancel(store: ReplicaStore, io: RecordingFileIO, seed: int) -> None:
    io.mark("cancelling")
    store.open(wl.VMID).cancel_failover()
    io.mark("cancelled")


def _run_complete(store: ReplicaStore, io: RecordingFileIO, seed: int) -> None:
    io.mark("completing")
    store.open(wl.VMID).complete_failover()
    io.mark("completed")


WORKLOADS: dict[str, Workload] = {
    "one-batch": Workload("one-batch", _setup_ir, _run_one_batch, small_batch),
    "ir-3-batches": Workload("ir-3-batches", _nothing, _run_ir_and_batches, wl.batch),
    "failover-revert": Workload(
        "failover-revert", _setup_three_batches, _run_failover, wl.batch, KEEP + 1, 3
    ),
    "primary-cycles": Workload("primary-cycles", _nothing, _run_primary, wl.batch, primary=True),
    "point-copy": Workload(
        "point-copy", _setup_three_batches, _run_point_copy, wl.batch, KEEP + 1, copy_at=3
    ),
    "failover-cancel": Workload(
        "failover-cancel", _setup_failed_over, _run_cancel, wl.batch, KEEP + 1, ending="cancel"
    ),
    "failover-complete": Workload(
        "failover-complete",
        _setup_failed_over,
        _run_complete,
        wl.batch,
        KEEP + 1,
        ending="complete",
    ),
}


# -- the oracle -------------------------------------------------------------------------------
class Expected:
    """The primary's images by sequence for one workload and seed."""

    def __init__(self, workload: Workload, seed: int) -> None:
        self._images = {wl.IR_SEQUENCE: wl.ir_image(seed)}
        self._workload = workload
        self._seed = seed

    def at(self, seq: int) -> tuple[bytes, ...]:
        top = max(self._images)
        while top < seq:
            self._images[top + 1] = wl.apply(
                self._images[top], self._workload.batches(self._seed, top + 1)
            )
            top += 1
        return self._images[seq]


def _last(marks: list[tuple[object, ...]], word: str) -> tuple[object, ...] | None:
    found = [m for m in marks if m[0] == word]
    return found[-1] if found else None


def verify(
    root: Path,
    marks: list[tuple[object, ...]],
    expected: Expected,
    workload: Workload,
    start_seq: int,
) -> str | None:
    """Recover the state under ``root`` and check it; the failed invariant, or None."""
    if workload.primary:
        return _verify_primary(root, marks)
    keep = workload.keep
    with ReplicaStore(root, keep_points=keep) as store:
        store.recover()
        if not store.exists(wl.VMID):
            if _last(marks, "created") is not None or start_seq:
                return "S4 created: the replica is gone after its create returned"
            return None
        r = store.open(wl.VMID)
        if workload.ending is not None:
            return _verify_ending(r, marks, expected, workload.ending)
        if workload.failover_to is not None:
            return _verify_failover(r, marks, expected, workload.failover_to, start_seq)
        if workload.copy_at is not None:
            return _verify_copy(root.parent / COPIES / "c1", r, marks, expected, workload.copy_at)
        acks = [int(m[1]) for m in marks if m[0] == "ack"]  # type: ignore[call-overload]
        begun = [int(m[1]) for m in marks if m[0] == "begin"]  # type: ignore[call-overload]
        if start_seq:
            acks.insert(0, start_seq)
        if not acks:
            return _verify_ir(r, marks, expected)
        low = acks[-1]
        high = max([low, *begun])
        seq = r.applied_sequence
        if not low <= seq <= high:
            return f"S1 one batch boundary: applied {seq}, not in [{low}, {high}]"
        want = expected.at(seq)
        for i in range(len(wl.DISKS)):
            if r.image_path(i).read_bytes() != want[i]:
                return f"S1 one batch boundary: disk {i} is not the image of {seq}"
        seqs = [p.sequence for p in r.recovery_points()]
        if seqs != list(range(max(wl.IR_SEQUENCE, seq - keep + 1), seq + 1)):
            return f"S2 kept points: {seqs} at {seq}"
        for p in seqs[:-1]:
            for i, d in enumerate(wl.DISKS):
                if r.read(i, 0, d.size, at_sequence=p) != expected.at(p)[i]:
                    return f"S2 kept points: point {p} disk {i} differs"
        if list((r.layout.journal_dir).iterdir()):
            return "S5 recovery is done once: a journal is left"
        if store.recover():
            return "S5 recovery is done once: a second recovery did something"
    return None


def _verify_ir(r: object, marks: list[tuple[object, ...]], expected: Expected) -> str | None:
    from node.storage import Replica

    assert isinstance(r, Replica)
    if r.ir_state == IRState.COMPLETE:
        if _last(marks, "completing") is None:
            return "S3 IR cursor: complete before complete_ir ran"
        cursor = (len(wl.DISKS), 0)
    else:
        cursor = r.ir_cursor
    ckpt = _last(marks, "ckpt")
    if ckpt is not None and cursor < (int(ckpt[1]), int(ckpt[2])):  # type: ignore[call-overload]
        return f"S3 IR cursor: {cursor} behind the acknowledged checkpoint {ckpt[1:]}"
    image = expected.at(wl.IR_SEQUENCE)
    for i, d in enumerate(wl.DISKS):
        upto = d.size if i < cursor[0] else (cursor[1] if i == cursor[0] else 0)
        if r.read(i, 0, upto) != image[i][:upto]:
            return f"S3 IR cursor: disk {i} before the cursor {cursor} differs"
    return None


def _verify_copy(
    out: Path, r: object, marks: list[tuple[object, ...]], expected: Expected, point: int
) -> str | None:
    from node.storage import Replica

    assert isinstance(r, Replica)
    want = expected.at(r.applied_sequence)
    for i in range(len(wl.DISKS)):
        if r.image_path(i).read_bytes() != want[i]:
            return f"S7 nothing outside: the copy changed disk {i} of the replica"
    if _last(marks, "copied") is None:
        return None  # a copy cut short may be partial: nothing was promised
    config = out / "config.bin"
    if not config.exists() or config.read_bytes() != b"cfg":
        return "S8 a finished copy is whole: config.bin differs"
    for i, d in enumerate(wl.DISKS):
        img = out / "disks" / f"{d.disk_id}.img"
        if not img.exists() or img.read_bytes() != expected.at(point)[i]:
            return f"S8 a finished copy is whole: disk {i} is not the image of {point}"
    return None


def _verify_failover(
    r: object, marks: list[tuple[object, ...]], expected: Expected, target: int, start_seq: int
) -> str | None:
    from node.storage import Replica

    assert isinstance(r, Replica)
    done = _last(marks, "failed_over") is not None
    if r.failed_over:
        r.fail_over(target)  # finishes an interrupted revert (idempotent)
        seq = r.applied_sequence
        if seq != target:
            return f"S6 failover decided: at {seq} after the failover to {target}"
    else:
        if done:
            return "S6 failover decided: the failover returned but is not recorded"
        seq = r.applied_sequence
        if seq != start_seq:
            return f"S1 one batch boundary: at {seq} before any failover, want {start_seq}"
    want = expected.at(seq)
    for i in range(len(wl.DISKS)):
        if r.image_path(i).read_bytes() != want[i]:
            return f"S6 failover decided: disk {i} is not the image of {seq}"
    for p in [p.sequence for p in r.recovery_points()][:-1]:
        for i, d in enumerate(wl.DISKS):
            if r.read(i, 0, d.size, at_sequence=p) != expected.at(p)[i]:
                return f"S2 kept points: point {p} disk {i} differs"
    return None


def _verify_ending(
    r: object, marks: list[tuple[object, ...]], expected: Expected, ending: str
) -> str | None:
    from node.storage import Replica

    assert isinstance(r, Replica)
    done = _last(marks, "cancelled" if ending == "cancel" else "completed") is not None
    record = r.failover_record  # a read: settles a complete or cancel that was decided
    if record is not None:
        if done:
            return f"S9 complete and cancel: the {ending} returned, the failover is in force"
        if r.applied_sequence != 3 or images_of(r) != expected.at(3):
            return "S9 complete and cancel: the failover in force is not at its point 3"
        for p in r.recovery_points():
            for i, d in enumerate(wl.DISKS):
                if r.read(i, 0, d.size, at_sequence=p.sequence) != expected.at(p.sequence)[i]:
                    return f"S2 kept points: point {p.sequence} disk {i} differs"
        if ending == "cancel":
            r.cancel_failover()
        else:
            r.complete_failover()
    elif ending == "cancel" and r.failed_over:
        return "S9 complete and cancel: failed over without its record (the points are lost)"
    want = [2, 3, 4] if ending == "cancel" else [3]
    seq = want[-1]
    if r.failed_over != (ending == "complete"):
        return f"S9 complete and cancel: failed_over={r.failed_over} after the {ending}"
    if r.generation != (1 if ending == "cancel" else 2):
        return f"S9 complete and cancel: generation {r.generation} after the {ending}"
    if r.applied_sequence != seq or images_of(r) != expected.at(seq):
        return f"S9 complete and cancel: not the image of {seq} after the {ending}"
    got = [p.sequence for p in r.recovery_points()]
    if got != want:
        return f"S9 complete and cancel: points {got} after the {ending}, want {want}"
    for kept in got:
        for i, d in enumerate(wl.DISKS):
            if r.read(i, 0, d.size, at_sequence=kept) != expected.at(kept)[i]:
                return f"S2 kept points: point {kept} disk {i} differs after the {ending}"
    if (r.layout.dir / "failover").exists():
        return f"S9 complete and cancel: failover/ is left after the {ending}"
    return None


def images_of(r: object) -> tuple[bytes, ...]:
    from node.storage import Replica

    assert isinstance(r, Replica)
    return tuple(r.image_path(i).read_bytes() for i in range(len(wl.DISKS)))


# -- the runner -------------------------------------------------------------------------------
@dataclass
class Failure:
    workload: str
    seed: int
    state: CrashState
    what: str
    description: str

    def replay(self) -> str:
        choices = "".join(str(c) for c in self.state.choices)
        tears = ",".join(str(t) for t in self.state.tears)
        return (
            f"scripts/crashes --workload {self.workload} --seed {self.seed} "
            f"--point {self.state.point} --choices {choices or '-'} --tears {tears or '-'}"
        )


@dataclass
class Tally:
    states: int = 0
    crash_points: int = 0
    failures: list[Failure] = field(default_factory=list)


@dataclass
class Recorded:
    workload: Workload
    seed: int
    crashes: CrashStates
    start_seq: int
    expected: Expected
    workdir: Path


def record(workload: Workload, seed: int, workdir: Path) -> Recorded:
    """Run ``workload`` once through the recording layer."""
    root = workdir / "run"
    storage = root / STORE
    storage.mkdir(parents=True)
    workload.setup(storage, seed)
    start_seq = 0
    if workload.setup is not _nothing:
        with ReplicaStore(storage, keep_points=workload.keep) as store:
            start_seq = store.open(wl.VMID).applied_sequence
    io = RecordingFileIO(root, workdir / "snapshot")
    with ReplicaStore(storage, keep_points=workload.keep, io=io) as store:
        workload.run(store, io, seed)
    outside = [
        op.path
        for op in io.ops
        if op.kind in DATA_KINDS | ENTRY_KINDS and not _inside(op.path, root, workload)
    ]
    if outside:
        raise AssertionError(f"S7 nothing outside: changed {outside}")
    if io.violations:
        raise AssertionError(f"S7 nothing outside: changed {io.violations}")
    return Recorded(workload, seed, CrashStates(io), start_seq, Expected(workload, seed), workdir)


def check_state(rec: Recorded, state: CrashState, serial: int) -> str | None:
    target = rec.workdir / f"state-{serial}"
    rec.crashes.materialize(state, target)
    try:
        return verify(
            target / STORE,
            rec.crashes.marks(state.point),
            rec.expected,
            rec.workload,
            rec.start_seq,
        )
    except Exception as exc:  # recovery refusing the state is a failure, not a crash
        return f"recovery raised {type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(target, ignore_errors=True)


def states_of(rec: Recorded, *, exhaustive_up_to: int, samples: int) -> Iterator[CrashState]:
    for point in rec.crashes.crash_points:
        yield from rec.crashes.states(
            point, exhaustive_up_to=exhaustive_up_to, samples=samples, seed=rec.seed
        )


def run(
    workload: Workload,
    seed: int,
    tally: Tally,
    *,
    exhaustive_up_to: int,
    samples: int,
    limit: int | None = None,
) -> None:
    """Check the crash states of one recorded run of ``workload``."""
    with tempfile.TemporaryDirectory(prefix="frcrash-", dir=FAST_TMP) as tmp:
        rec = record(workload, seed, Path(tmp))
        tally.crash_points += len(rec.crashes.crash_points)
        for state in states_of(rec, exhaustive_up_to=exhaustive_up_to, samples=samples):
            if limit is not None and tally.states >= limit:
                return
            tally.states += 1
            what = check_state(rec, state, tally.states)
            if what is not None:
                tally.failures.append(
                    Failure(workload.name, seed, state, what, state.describe(rec.crashes.ops))
                )


def replay(workload: Workload, seed: int, point: int, choices: str, tears: str) -> str | None:
    with tempfile.TemporaryDirectory(prefix="frcrash-", dir=FAST_TMP) as tmp:
        rec = record(workload, seed, Path(tmp))
        unc = tuple(rec.crashes.uncertain(point))
        ch = tuple(int(c) for c in choices) if choices != "-" else ()
        te = tuple(int(t) for t in tears.split(",")) if tears != "-" else ()
        state = CrashState(point, unc, ch, te)
        print(state.describe(rec.crashes.ops))
        return check_state(rec, state, 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/crashes", description=__doc__.split("\n")[0])
    parser.add_argument("--states", type=int, default=20000, help="states to check in all")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workload", choices=sorted(WORKLOADS))
    parser.add_argument("--samples", type=int, default=64, help="sampled states per crash point")
    parser.add_argument("--point", type=int, help="replay one state (with --choices, --tears)")
    parser.add_argument("--choices", default="-")
    parser.add_argument("--tears", default="-")
    parser.add_argument(
        "--flips",
        action="store_true",
        help="instead: flip every bit of the first 4 KiB of each on-disk file kind",
    )
    args = parser.parse_args(argv)
    if args.flips:
        from tests.node.storage import bit_flips

        started = time.monotonic()
        report = bit_flips.run_flips(None, args.seed)
        for kind, got in report.items():
            for line in got.failures[:20]:
                print(f"FAIL {kind} {line}")
        print(
            json.dumps(
                {
                    "flips": {kind: got.flips for kind, got in report.items()},
                    "failures": sum(len(got.failures) for got in report.values()),
                    "seconds": round(time.monotonic() - started, 1),
                }
            )
        )
        return 1 if any(got.failures for got in report.values()) else 0
    if args.point is not None:
        what = replay(WORKLOADS[args.workload], args.seed, args.point, args.choices, args.tears)
        print(json.dumps({"states": 1, "failures": [what] if what else []}))
        return 1 if what else 0
    tally = Tally()
    started = time.monotonic()
    names = [args.workload] if args.workload else sorted(WORKLOADS)
    seed = args.seed
    while tally.states < args.states:
        for name in names:
            run(
                WORKLOADS[name],
                seed,
                tally,
                exhaustive_up_to=4096,
                samples=args.samples,
                limit=args.states,
            )
        seed += 1
    for f in tally.failures[:20]:
        print(
            f"FAIL {f.workload} seed={f.seed}: {f.what}\n  {f.description}\n  replay: {f.replay()}"
        )
    print(
        json.dumps(
            {
                "states": tally.states,
                "crash_points": tally.crash_points,
                "failures": len(tally.failures),
                "failing_seeds": sorted({f.seed for f in tally.failures}),
                "replay": [f.replay() for f in tally.failures[:5]],
                "seconds": round(time.monotonic() - started, 1),
            }
        )
    )
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
