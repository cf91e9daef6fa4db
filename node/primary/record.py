"""What the rooms of a replicator share about one VM: its state, its disks and digest
maps, and how to persist them and pace its sends.

:class:`~node.primary.replicator.VMReplicator` makes one for each step it hands to a
room (``route``, ``initial``, ``delta``, ``resync``), from its current state, so a room
never holds a stale copy and never reaches into the replicator itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import frproto as fp

from .bandwidth import BandwidthLimiter
from .digest_map import DigestMap
from .state import VMReplicationState


def disks_of(state: VMReplicationState) -> tuple[fp.DiskInfo, ...]:
    """The VM's disks as the protocol describes them."""
    return tuple(fp.DiskInfo(d["disk_id"], int(d["size"])) for d in state.disks)


def images_of(state: VMReplicationState) -> list[Path]:
    """The VM's disk image files."""
    return [Path(d["path"]) for d in state.disks]


def count_batch(state: VMReplicationState, nbytes: int) -> None:
    """Count one acknowledged delta batch of ``nbytes`` in the state's counters (what
    status shows as Measure-VMReplication's average and maximum size)."""
    state.batches_sent += 1
    state.batch_bytes_sent += nbytes
    state.batch_bytes_max = max(state.batch_bytes_max, nbytes)


@dataclass(frozen=True)
class VMRecord:
    """One VM as a room of the replicator sees it.

    Attributes:
        state: the persisted state (a room changes its fields, then calls ``save``).
        save: persist ``state`` (keeping an operator's changes, see
            :meth:`PrimaryStateStore.save_progress`).
        maps: the digest maps, one per disk, as the replicator holds them (changed in
            place; a room that builds new ones returns them instead).
        map_path: where the digest map of a disk index is saved.
        limiter: the bandwidth limit to pace a send with, asked at each send (an
            operator's new limit takes effect at the next one).
    """

    state: VMReplicationState
    save: Callable[[], None]
    maps: list[DigestMap]
    map_path: Callable[[int], Path]
    limiter: Callable[[], BandwidthLimiter | None]

    @property
    def vmid(self) -> uuid.UUID:
        """The VM's GUID."""
        return uuid.UUID(self.state.vmid)

    @property
    def name(self) -> str:
        """The VM's display name."""
        return self.state.name

    @property
    def disks(self) -> tuple[fp.DiskInfo, ...]:
        """The VM's disks as the protocol describes them."""
        return disks_of(self.state)

    @property
    def images(self) -> list[Path]:
        """The disk image files."""
        return images_of(self.state)

    def save_maps(self, indexes: list[int] | None = None) -> None:
        """Save the digest maps of ``indexes`` (None: every disk)."""
        for index in range(len(self.maps)) if indexes is None else indexes:
            self.maps[index].save(self.map_path(index))
