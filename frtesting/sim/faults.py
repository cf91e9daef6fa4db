"""The fault schedule of one run: drawn from the seed, applied by the runner.

A schedule is a list of :class:`Fault` in time order; the runner can replay any subset of
it (``scripts/simulate --seed N --faults 0,3``), which is how a failing run is shrunk.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

#: Fault kinds, in the order of the summary table.
_DRAWN = (
    "server_kill",
    "server_power_loss",
    "link_cut",
    "link_slow",
    "primary_restart",
    "primary_power_loss",
)
#: Every kind, for the summary table (a full disk is drawn apart: see draw_schedule).
KINDS = (*_DRAWN, "server_disk_full")
#: Kinds that kill a host (the others cut or slow a link).
KILL_KINDS = frozenset(
    {"server_kill", "server_power_loss", "primary_restart", "primary_power_loss"}
)
#: How long an armed kill waits for its file change before striking anyway.
ARMED_SECONDS = 30.0
#: The kinds aimed at one primary (``Fault.target``); the others hit the server.
PRIMARY_KINDS = frozenset({"link_cut", "link_slow", "primary_restart", "primary_power_loss"})


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault: at ``at`` seconds, of ``kind``, on primary ``target`` (links and
    primary restarts), lasting ``length`` seconds (down, cut, slowed). A kill with
    ``ops`` > 0 is armed at ``at`` and strikes at the host's ``ops``-th file change from
    then (in the middle of whatever it was writing), or ``ARMED_SECONDS`` later."""

    at: float
    kind: str
    target: int
    length: float
    ops: int = 0

    def describe(self) -> str:
        if self.kind.startswith("server"):
            what = "server"
        elif self.kind in PRIMARY_KINDS:
            what = f"p{self.target + 1}"
        else:  # the cluster's faults (frtesting/sim/cluster.py)
            what = "the broker's node" if self.target < 0 else f"#{self.target}"
        armed = f" at its file change #{self.ops}" if self.ops else ""
        return f"{self.kind} {what}{armed} for {self.length:.1f}s"


def draw_schedule(seed: int, primaries: int, window: float, frequency: float) -> list[Fault]:
    """The faults of run ``seed`` within ``window`` seconds: 2 to 8 of them. Half of them
    fall just after a cycle's start (cycles start every ``frequency`` seconds, once the
    primaries are caught up), when a batch is most likely on the wire or being applied."""
    rng = random.Random(f"{seed}:faults")
    faults = []
    for _ in range(rng.randint(2, 8)):
        kind = rng.choice(_DRAWN)
        if rng.random() < 0.5:
            cycle = rng.randrange(1, int((window - 20.0) // frequency))
            at = round(cycle * frequency + rng.uniform(0.0, 0.4), 3)
        else:
            at = round(rng.uniform(5.0, window - 20.0), 3)
        length = round(rng.choice([rng.uniform(0.0, 3.0), rng.uniform(3.0, 40.0)]), 3)
        ops = rng.choice([0, 0, rng.randint(1, 8), rng.randint(1, 60)]) if kind in KILL_KINDS else 0
        faults.append(Fault(at, kind, rng.randrange(primaries), length, ops))
    # A full disk comes from a generator of its own: the faults above stay as they were
    # before it existed (the seeds named in tests and reports keep their schedules).
    full = random.Random(f"{seed}:disk-full")
    for _ in range(full.choice([0, 0, 1, 2])):
        at = round(full.uniform(5.0, window - 20.0), 3)
        faults.append(Fault(at, "server_disk_full", 0, round(full.uniform(1.0, 40.0), 3)))
    faults.sort(key=lambda f: (f.at, f.kind, f.target))
    return faults
