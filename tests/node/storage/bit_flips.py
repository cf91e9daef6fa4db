"""Single-bit flips in the first 4 KiB of each on-disk file kind of a replica (journal,
undo data, ``state.json`` with its recovery-point records), behind
``test_bit_flips.py`` and ``scripts/crashes --flips``.

Each flip is made in a copy of a storage root that a real run left, the store is opened
and recovered as at a restart, and the check is that the flip was *detected*: refused with
a clear error (``frproto.InternalError`` naming the damaged file) or, for a journal,
discarded as uncommitted; never applied, never read back as other data. What mends each
kind (docs/storage.md, "Damaged files"):

* journal: discarded at recovery; the replica stays at the previous batch, and the
  primary resends the batch (or, if it had been acknowledged, its next batch is refused
  OUT_OF_SEQUENCE and the primary resynchronizes by digests);
* undo data: reads of the older points, and a failover to them, are refused; the newest
  point still reads and replicates; the damaged point goes when it is pruned;
* state: the replica is refused (INTERNAL, "state file ... is damaged"); an operator
  moves the replica's directory aside and the primary's next cycle starts a new IR.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import frproto
from frtesting.powerloss import CrashState
from node.storage import ReplicaStore
from tests.node.storage import crash_states as cs
from tests.node.storage import workload as wl

#: Bytes of each file whose every bit is flipped in turn.
FLIP_SPAN = 4096
KINDS = ("journal", "undo", "state")


@dataclass(frozen=True)
class FlipBase:
    kind: str
    root: Path  # a run's directory (holds cs.STORE)
    rel: str  # the file flipped, relative to root

    def bits(self) -> int:
        return min(FLIP_SPAN, (self.root / self.rel).stat().st_size) * 8


def bases(tmp: Path) -> dict[str, FlipBase]:
    """A storage root per file kind, from a real run of the one-batch workload."""
    out: dict[str, FlipBase] = {}
    with tempfile.TemporaryDirectory() as work:
        rec = cs.record(cs.WORKLOADS["one-batch"], 1, Path(work))
        crashes = rec.crashes

        def at(name: str, point: int) -> Path:
            unc = tuple(crashes.uncertain(point))
            crashes.materialize(
                CrashState(point, unc, (1,) * len(unc), (0,) * len(unc)), tmp / name
            )
            return tmp / name

        committed = next(
            op.index
            for op in crashes.ops
            if op.kind == "mark" and op.mark == ("crash_point", "batch_journal_committed")
        )
        vm = f"{cs.STORE}/{wl.VMID}"
        out["journal"] = FlipBase(
            "journal", at("journal", committed), f"{vm}/journal/{2:020d}.jrnl"
        )
        end = at("end", len(crashes.ops))
        out["undo"] = FlipBase("undo", end, f"{vm}/undo/{2:020d}.undo")
        out["state"] = FlipBase("state", end, f"{vm}/state.json")
    return out


def check_flip(base: FlipBase, bit: int, work: Path, expected: cs.Expected) -> str | None:
    """Flip ``bit`` of the base's file in a copy, restart, and check it was detected."""
    target = work / f"{base.kind}-{bit}"
    shutil.copytree(base.root, target)
    path = target / base.rel
    data = bytearray(path.read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))
    try:
        with ReplicaStore(target / cs.STORE, keep_points=cs.KEEP) as store:
            log = store.recover()
            try:
                r = store.open(wl.VMID)
            except frproto.InternalError as exc:
                if base.kind == "state" and "damaged" in str(exc):
                    return None
                return f"refused to open: {exc}"
            if base.kind == "state":
                return "a flipped state.json was read as a valid state"
            if base.kind == "journal":
                if r.applied_sequence != 1 or not any("discarded" in line for line in log):
                    return f"a flipped journal was not discarded: {log}"
                for i in range(len(wl.DISKS)):
                    if r.image_path(i).read_bytes() != expected.at(1)[i]:
                        return f"a flipped journal touched disk {i}"
                return None
            # undo: the newest point still reads; the older one is refused or exact
            for i, d in enumerate(wl.DISKS):
                if r.read(i, 0, d.size) != expected.at(2)[i]:
                    return f"the newest point of disk {i} changed"
                try:
                    old = r.read(i, 0, d.size, at_sequence=1)
                except frproto.InternalError as exc:
                    if "damaged" not in str(exc):
                        return f"unclear error: {exc}"
                    continue
                if old != expected.at(1)[i]:
                    return f"a flipped undo file was read as point 1 of disk {i}"
            return None
    finally:
        shutil.rmtree(target, ignore_errors=True)


def sample(base: FlipBase, count: int | None, seed: int) -> Iterator[int]:
    """Every bit (``count=None``) or ``count`` seeded ones."""
    bits = base.bits()
    if count is None or count >= bits:
        yield from range(bits)
        return
    yield from random.Random(f"{seed}:{base.kind}").sample(range(bits), count)


@dataclass
class FlipReport:
    flips: int
    failures: list[str]


def run_flips(count: int | None, seed: int = 1) -> dict[str, FlipReport]:
    """Flip ``count`` bits (all with None) of each kind; what each kind gave."""
    expected = cs.Expected(cs.WORKLOADS["one-batch"], 1)
    report: dict[str, FlipReport] = {}
    with tempfile.TemporaryDirectory(prefix="frflip-", dir=cs.FAST_TMP) as tmp:
        work = Path(tmp)
        (work / "bases").mkdir()
        for kind, base in bases(work / "bases").items():
            failures = []
            flips = 0
            for bit in sample(base, count, seed):
                flips += 1
                what = check_flip(base, bit, work, expected)
                if what is not None:
                    failures.append(f"bit {bit}: {what}")
            report[kind] = FlipReport(flips, failures)
    return report
