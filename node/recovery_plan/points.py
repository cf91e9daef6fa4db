"""The point a plan's VM fails over to, at the recovery side.

With ``consistent = true`` the plan's VMs fail over to their *group point*: the newest
capture time that every VM of the plan keeps a recovery point of. The primary's group
capture (``node/primary/group_capture.py``) stamps every VM's cycle of one moment with
that moment, so points with the same capture time belong together. Otherwise each VM
fails over to its own latest point (or, for a planned failover, the sequence the
primary verified).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

from node.storage import RecoveryPoint


class NoGroupPoint(Exception):
    """The plan's VMs keep no point of one common moment."""


def group_point(points: Mapping[uuid.UUID, Sequence[RecoveryPoint]]) -> dict[uuid.UUID, int]:
    """Each VM's sequence of the newest moment every VM keeps a point of.

    Raises:
        NoGroupPoint: there is none (no group capture yet, or pruned since).
    """
    if not points:
        return {}
    moments = [{p.captured_at_ms for p in kept} for kept in points.values()]
    common = set.intersection(*moments)
    if not common:
        raise NoGroupPoint(
            "the plan's VMs keep no recovery point of one moment: run a group capture at "
            "the primary (frctl plan capture), or fail over each VM to its own point"
        )
    moment = max(common)
    chosen = {}
    for vmid, kept in points.items():
        # The newest point of that moment (a VM has one per group capture).
        chosen[vmid] = max(p.sequence for p in kept if p.captured_at_ms == moment)
    return chosen
