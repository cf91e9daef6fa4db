"""Crash consistency with real processes: a worker applies batches (or an IR) and is killed
with SIGKILL, at random times and at every named crash point; the test then recovers the
store and checks it against the oracle (``workload.Oracle``).

The promise checked after every kill: the replica equals *exactly* the image of one
sequence ``s`` with ``last ACK <= s <= last BEGIN``, ``applied_sequence == s``, every
kept recovery point reads back exactly, and no journal is left behind.

``FRREP_KILLS`` (default 50) sets the number of random kills, ``FRREP_SEED`` the seed;
every failure message carries the seed.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from frproto import IRState
from node.storage import CRASH_POINTS, ReplicaStore
from tests.node.storage import workload as wl

KILLS = int(os.environ.get("FRREP_KILLS", "50"))
SEED = int(os.environ.get("FRREP_SEED", "20240611"))
KEEP = 4
WORKER = Path(__file__).with_name("crash_worker.py")
REPO = Path(__file__).resolve().parents[3]


@dataclass
class Outcome:
    lines: list[str] = field(default_factory=list)
    returncode: int = 0
    stderr: str = ""

    def last(self, word: str) -> int | None:
        found = [int(x.split()[1]) for x in self.lines if x.startswith(word + " ")]
        return found[-1] if found else None

    def has(self, word: str) -> bool:
        return any(x == word or x.startswith(word + " ") for x in self.lines)


def spawn(
    root: Path, seed: int, mode: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(root), str(seed), mode, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


def finish(proc: subprocess.Popen[str], lines: list[str] | None = None) -> Outcome:
    # Read through the same text streams readline() used: communicate() would read the
    # raw descriptors and miss what those streams already buffered.
    assert proc.stdout is not None
    assert proc.stderr is not None
    out = proc.stdout.read()
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    proc.wait(timeout=60)
    return Outcome((lines or []) + out.splitlines(), proc.returncode, err)


def run_to_end(root: Path, seed: int, mode: str, *args: str, **env: str) -> Outcome:
    return finish(spawn(root, seed, mode, *args, env=env))


def kill_after_ready(proc: subprocess.Popen[str], delay: float) -> Outcome:
    lines: list[str] = []
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("READY"):
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    return finish(proc, lines)


def setup_replica(root: Path, seed: int) -> None:
    with ReplicaStore(root, keep_points=KEEP) as store:
        r = store.create(
            wl.VMID, name="vm", config=b"cfg", disks=wl.DISKS, primary="p", trust_group="t"
        )
        r.begin_ir(wl.IR_SEQUENCE)
        for c in wl.ir_chunks(seed):
            r.write_ir_chunk(c.disk_index, c.offset, c.data, length=c.length)
        r.complete_ir(wl.IR_SEQUENCE)


def check(
    root: Path, oracle: wl.Oracle, low: int, high: int, what: str, tally: Counter[str] | None = None
) -> int:
    """Recover, check the oracle, return the applied sequence."""
    ctx = f"seed={oracle.seed} {what}"
    with ReplicaStore(root, keep_points=KEEP) as store:
        for line in store.recover():
            if tally is not None:
                kind = "re-applied" if "re-applied" in line else line.split(":")[1].split()[0]
                tally[kind] += 1
        r = store.open(wl.VMID)
        seq = r.applied_sequence
        assert low <= seq <= high, f"{ctx}: applied {seq} not in [{low}, {high}]"
        want = oracle.at(seq)
        for i in range(len(wl.DISKS)):
            assert r.image_path(i).read_bytes() == want[i], f"{ctx}: disk {i} != image {seq}"
        seqs = [p.sequence for p in r.recovery_points()]
        assert seqs == list(range(max(wl.IR_SEQUENCE, seq - KEEP + 1), seq + 1)), ctx
        for p in seqs[:-1]:
            for i, d in enumerate(wl.DISKS):
                got = r.read(i, 0, d.size, at_sequence=p)
                assert got == oracle.at(p)[i], f"{ctx}: point {p} disk {i} differs"
        vm_dir = root / str(wl.VMID)
        assert os.listdir(vm_dir / "journal") == [], ctx
        assert sorted(os.listdir(vm_dir / "undo")) == [f"{s:020d}.undo" for s in seqs[1:]], ctx
        # a second recovery finds nothing to do
        assert store.recover() == [], ctx
    oracle.forget_below(seq - KEEP)
    return seq


# The suite's 120 s per test would stop the long run the README names (FRREP_KILLS=1000)
# part-way: a kill costs a process start and a recovery check, about a second at most.
@pytest.mark.timeout(120 + KILLS)
def test_random_sigkill_during_batches(tmp_path: Path) -> None:
    root = tmp_path / "store"
    setup_replica(root, SEED)
    oracle = wl.Oracle(SEED)
    rng = random.Random(SEED)
    applied = wl.IR_SEQUENCE
    tally: Counter[str] = Counter()
    started = time.monotonic()
    for kill in range(KILLS):
        delay = rng.uniform(0.0, 0.2)
        out = kill_after_ready(spawn(root, SEED, "batches", "1000000", str(KEEP)), delay)
        assert out.returncode == -signal.SIGKILL, f"seed={SEED} kill {kill}: {out.stderr}"
        assert out.last("READY") == applied, f"seed={SEED} kill {kill}: {out.lines[-3:]}"
        low = out.last("ACK") or applied
        high = out.last("BEGIN") or applied
        applied = check(root, oracle, low, high, f"kill {kill} after {delay:.3f}s", tally)
        tally["landed after ACK" if applied == out.last("ACK") else "landed in a batch"] += 1
    elapsed = time.monotonic() - started
    print(
        f"\n{KILLS} random kills in {elapsed:.1f}s, {applied - 1} batches applied, "
        f"seed={SEED}, {dict(tally)}"
    )
    assert applied > wl.IR_SEQUENCE + KILLS // 5, "the worker hardly made progress"


def test_sigkill_at_every_batch_crash_point(tmp_path: Path) -> None:
    root = tmp_path / "store"
    setup_replica(root, SEED)
    oracle = wl.Oracle(SEED)
    applied = wl.IR_SEQUENCE
    points = [p for p in CRASH_POINTS if p.startswith("batch_") or p == "state_tmp_synced"]
    kills = 0
    for name in points:
        for hit in (1, 2, 5):
            upto = applied + 6
            out = run_to_end(
                root,
                SEED,
                "batches",
                str(upto),
                str(KEEP),
                FRREP_CRASH_POINT=name,
                FRREP_CRASH_HIT=str(hit),
            )
            ctx = f"{name}#{hit}"
            assert out.returncode == -signal.SIGKILL, f"seed={SEED} {ctx}: {out.stderr}"
            kills += 1
            low = out.last("ACK") or applied
            high = out.last("BEGIN") or applied
            applied = check(root, oracle, low, high, ctx)
            if name in ("batch_state_written", "batch_journal_removed"):
                assert applied == high, f"{ctx}: a batch past its state write was lost"
            if name in ("batch_record_written", "batch_before_commit_record"):
                assert applied == high - 1, f"{ctx}: an uncommitted batch was applied"
    assert kills == len(points) * 3


def test_sigkill_during_recovery(tmp_path: Path) -> None:
    """Compound failures: die after the commit record (undo not written), then die again
    inside recover() after regenerating the undo data, then in the middle of re-applying;
    the next recovery still brings the replica to the committed batch."""
    root = tmp_path / "store"
    setup_replica(root, SEED)
    oracle = wl.Oracle(SEED)
    plan = {
        "batch_journal_committed": ("recover_undo_regenerated", "recover_mid_apply"),
        "batch_undo_written": ("recover_mid_apply",),
        "batch_mid_apply": ("recover_mid_apply",),
    }
    for first, then in plan.items():
        with ReplicaStore(root, keep_points=KEEP) as store:
            applied = store.open(wl.VMID).applied_sequence
        env = {"FRREP_CRASH_POINT": first, "FRREP_CRASH_HIT": "1"}
        out = run_to_end(root, SEED, "batches", str(applied + 3), str(KEEP), **env)
        assert out.returncode == -signal.SIGKILL
        assert out.last("BEGIN") == applied + 1
        for point in (*then, "state_tmp_synced"):
            env = {"FRREP_CRASH_POINT": point}
            out = run_to_end(root, SEED, "batches", str(applied), str(KEEP), **env)
            assert out.returncode == -signal.SIGKILL, f"{first}/{point}: {out.lines}"
            assert not out.has("READY"), f"{first}/{point}: died after recovery"
        # the committed batch is there after the next (clean) recovery
        assert check(root, oracle, applied + 1, applied + 1, f"after {first}") == applied + 1


def _check_ir(
    root: Path, image: tuple[bytes, ...], ckpt: tuple[int, int], completing: bool
) -> tuple[IRState, tuple[int, int]]:
    with ReplicaStore(root, keep_points=KEEP) as store:
        store.recover()
        if not store.exists(wl.VMID):
            return IRState.NOT_STARTED, (0, 0)
        r = store.open(wl.VMID)
        state, cursor = r.ir_state, r.ir_cursor
        if state == IRState.COMPLETE:
            assert completing, "IR reported complete before complete_ir ran"
            assert r.applied_sequence == wl.IR_SEQUENCE
            assert [p.sequence for p in r.recovery_points()] == [wl.IR_SEQUENCE]
            cursor = (len(wl.DISKS), 0)
        else:
            assert r.applied_sequence == 0
            assert r.recovery_points() == []
        assert cursor >= ckpt, f"cursor {cursor} went back before checkpoint {ckpt}"
        for i, d in enumerate(wl.DISKS):
            upto = d.size if i < cursor[0] else (cursor[1] if i == cursor[0] else 0)
            assert r.read(i, 0, upto) == image[i][:upto], f"disk {i} before the cursor differs"
    return state, cursor


def test_sigkill_during_ir_resumes_to_the_right_image(tmp_path: Path) -> None:
    root = tmp_path / "store"
    image = wl.ir_image(SEED)
    rng = random.Random(SEED)
    ir_points = [p for p in CRASH_POINTS if p.startswith("ir_")] + ["state_tmp_synced"]
    ckpt = (0, 0)
    completing = False
    runs = 0
    state = IRState.NOT_STARTED
    while state != IRState.COMPLETE:
        runs += 1
        assert runs < 60, "the IR never completed"
        if runs % 2:  # a named crash point, then a random time
            name = ir_points[(runs // 2) % len(ir_points)]
            out = run_to_end(
                root, SEED, "ir", FRREP_CRASH_POINT=name, FRREP_CRASH_HIT=str(rng.randint(1, 3))
            )
        else:
            proc = spawn(root, SEED, "ir", env={"FRREP_SLOW": "0.002"})
            out = kill_after_ready(proc, rng.uniform(0.0, 0.03))
        assert out.returncode in (0, -signal.SIGKILL), out.stderr
        before = ckpt
        for line in out.lines:
            if line.startswith("CKPT"):
                _, d, off = line.split()
                ckpt = (int(d), int(off))
        completing = completing or out.has("COMPLETING")
        for line in out.lines:
            if line.startswith("RESUME"):
                _, d, off = line.split()
                assert (int(d), int(off)) >= before, f"resumed at {line}, checkpoint {before}"
        state, _cursor = _check_ir(root, image, ckpt, completing)
    with ReplicaStore(root, keep_points=KEEP) as store:
        r = store.open(wl.VMID)
        for i in range(len(wl.DISKS)):
            assert r.image_path(i).read_bytes() == image[i]
    assert runs >= 4


@pytest.mark.parametrize("name", sorted(CRASH_POINTS))
def test_crash_point_names_are_reached(name: str) -> None:
    """Every documented crash point is called somewhere in the engine."""
    src = "".join(
        p.read_text() for p in (REPO / "node" / "storage").glob("*.py") if p.name != "fileio.py"
    )
    assert f'"{name}"' in src or name == "state_tmp_synced"


def _failover_template(tmp_path: Path) -> Path:
    """A replica at 6 (points 3-6), ready to be copied for each kill."""
    template = tmp_path / "template"
    setup_replica(template, SEED)
    out = run_to_end(template, SEED, "batches", "6", str(KEEP))
    assert out.returncode == 0, out.stderr
    return template


def _check_ending(root: Path, oracle: wl.Oracle, ending: str, ctx: str) -> None:
    """The replica after a failover to 4 (from 6) that was cancelled or completed."""
    with ReplicaStore(root, keep_points=KEEP) as store:
        store.recover()
        r = store.open(wl.VMID)
        seq, points = (6, [3, 4, 5, 6]) if ending == "cancel" else (4, [4])
        assert r.failed_over == (ending == "complete"), ctx
        assert r.generation == (1 if ending == "cancel" else 2), ctx
        assert r.applied_sequence == seq, ctx
        for i in range(len(wl.DISKS)):
            assert r.image_path(i).read_bytes() == oracle.at(seq)[i], f"{ctx}: disk {i}"
        assert [p.sequence for p in r.recovery_points()] == points, ctx
        for p in points:
            for i, d in enumerate(wl.DISKS):
                got = r.read(i, 0, d.size, at_sequence=p)
                assert got == oracle.at(p)[i], f"{ctx}: point {p} disk {i} differs"
        assert not (root / str(wl.VMID) / "failover").exists(), ctx
        undo = sorted(os.listdir(root / str(wl.VMID) / "undo"))
        assert undo == [f"{s:020d}.undo" for s in points[1:]], ctx


FAILOVER_KILLS = {
    # the decision, the redo data, its record, the revert's state
    "failover": [("state_tmp_synced", 1), ("failover_redo_captured", 1), ("state_tmp_synced", 3)],
    "cancel": [
        ("state_tmp_synced", 1),  # the phase
        ("cancel_decided", 1),
        ("cancel_images_restored", 1),
        ("state_tmp_synced", 2),  # the state from before the failover
        ("cancel_state_written", 1),
    ],
    "complete": [
        ("state_tmp_synced", 1),
        ("complete_decided", 1),
        ("state_tmp_synced", 2),
        ("complete_state_written", 1),
    ],
}


@pytest.mark.parametrize("ending", ["cancel", "complete"])
def test_sigkill_at_every_step_of_a_failover_and_its_ending(tmp_path: Path, ending: str) -> None:
    """A failover to 4 (from 6), then its cancel or complete, each killed with SIGKILL at
    every step in turn; run again, each reaches the right end state: the failover at 4,
    then the cancel back at 6 (every point, generation 1) or the complete at 4 alone."""
    template = _failover_template(tmp_path)
    oracle = wl.Oracle(SEED)
    kills = 0
    plan = [("failover", k) for k in FAILOVER_KILLS["failover"]]
    plan += [(ending, k) for k in FAILOVER_KILLS[ending]]
    for n, (step, (point, hit)) in enumerate(plan):
        root = tmp_path / f"run-{n}"
        shutil.copytree(template, root)
        ctx = f"seed={SEED} {step} killed at {point}#{hit}"
        env = {"FRREP_CRASH_POINT": point, "FRREP_CRASH_HIT": str(hit)}
        if step != "failover":
            assert run_to_end(root, SEED, "failover", "4", str(KEEP)).last("DONE") == 4
        out = run_to_end(root, SEED, step, "4", str(KEEP), **env)
        assert out.returncode == -signal.SIGKILL, f"{ctx}: not killed: {out.lines} {out.stderr}"
        assert not out.has("DONE"), ctx
        kills += 1
        # run again: the step finishes (or is taken whole), then the ending
        out = run_to_end(root, SEED, step, "4", str(KEEP))
        assert out.returncode == 0, f"{ctx}: {out.stderr}"
        assert out.last("DONE") == (4 if step == "failover" else 6 if step == "cancel" else 4)
        if step == "failover":
            out = run_to_end(root, SEED, ending, "4", str(KEEP))
            assert out.returncode == 0, f"{ctx}: {out.stderr}"
        _check_ending(root, oracle, ending, ctx)
    assert kills == len(plan)
