"""Crash-consistent group points: the VMs of a group captured at one moment.

The VMs of a recovery plan (an application spread over several VMs: a database and the
servers that use it) must fail over to points that belong together: each VM's point of
the same instant. The primary therefore captures them in one window:

1. every VM's cycle lock is taken (sorted by VMID: two group captures never wait on
   each other), so no cycle of the service runs inside the window;
2. the group's ``freeze`` hook runs once (the embedding tool pauses the VMs, or holds
   their writes), then every VM's changed blocks go to its pending log, each cycle
   stamped with the same capture time (``captured_at_ms``), and one even for a VM that
   did not change, so that every VM has a recovery point of that moment; then ``thaw``;
3. the cycles are sent as every other cycle (:func:`replicate_group` runs one cycle of
   each VM, which sends what is pending; what changed after the thaw is captured as
   the VM's next point, not mixed into the group's).

At the recovery side the group's point is the newest capture time that every VM of the
group keeps a point of (``node/recovery_plan/points.py``): no table crosses the wire,
the batches' capture time (``BatchBegin.captured_at_ms``) says it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .replicator import VMReplicator
from .state import IRStage


class GroupNotReady(Exception):
    """A VM of the group cannot be captured with the others (no complete IR yet)."""


@dataclass(frozen=True)
class GroupPoint:
    """One group capture: the moment, and each VM's sequence of it."""

    captured_at_ms: int
    sequences: dict[str, int]  #: VMID -> the sequence of its cycle of that moment

    def to_json(self) -> dict[str, object]:
        """For ``--json``."""
        return {"captured_at_ms": self.captured_at_ms, "sequences": dict(self.sequences)}


async def capture_group(
    replicators: Sequence[VMReplicator],
    *,
    freeze: Callable[[], None] | None = None,
    thaw: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> GroupPoint:
    """Capture every VM of ``replicators`` at one moment (see the module docstring);
    nothing is sent yet.

    Raises:
        GroupNotReady: a VM has no complete IR, or its pending log overflowed (its next
            cycle resynchronizes: there is no point of the moment to make).
    """
    ordered = sorted(replicators, key=lambda r: r.state.vmid)
    for rep in ordered:
        if rep.state.ir_state != IRStage.COMPLETE or rep.pending.overflowed:
            raise GroupNotReady(
                f"{rep.state.name}: no complete initial replication (or a resynchronization "
                "is due): it cannot be captured with its group yet"
            )
    async with contextlib.AsyncExitStack() as held:
        for rep in ordered:
            await held.enter_async_context(rep.exclusive())
        stamp = int(clock() * 1000)
        if freeze is not None:
            freeze()
        try:
            for rep in ordered:
                await rep.capture(captured_at_ms=stamp)
        finally:
            if thaw is not None:
                thaw()
        sequences = {}
        for rep in ordered:
            ours = [c.sequence for c in rep.pending.cycles() if c.captured_at_ms == stamp]
            if not ours:
                raise GroupNotReady(f"{rep.state.name}: its cycle of the group's moment is gone")
            sequences[rep.state.vmid] = ours[-1]
    return GroupPoint(stamp, sequences)


async def replicate_group(
    replicators: Sequence[VMReplicator],
    *,
    freeze: Callable[[], None] | None = None,
    thaw: Callable[[], None] | None = None,
) -> GroupPoint:
    """A group capture, then one cycle of each VM, which sends it."""
    point = await capture_group(replicators, freeze=freeze, thaw=thaw)
    for rep in replicators:
        await rep.cycle()
    return point
