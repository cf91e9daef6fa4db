"""Where a plan's VMs are: their replicas at the recovery server (read-only: the dry run
must change nothing, and the server may be running), their state at the primary."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from node.storage.state import ReplicaState

from .hooks import StepFailed


@dataclass(frozen=True)
class ReplicaView:
    """A replica as its ``state.json`` says (nothing opened, nothing written)."""

    storage: Path
    state: ReplicaState


def replicas(storages: list[Path]) -> list[ReplicaView]:
    """Every replica of ``storages`` whose state file reads."""
    found = []
    for storage in storages:
        if not storage.is_dir():
            continue
        for entry in sorted(storage.iterdir()):
            path = entry / "state.json"
            if entry.name.startswith(".") or not path.is_file():
                continue
            try:
                found.append(ReplicaView(storage, ReplicaState.from_bytes(path.read_bytes())))
            except (OSError, ValueError, json.JSONDecodeError):
                continue  # a damaged replica: resolving it by name fails below
    return found


def resolve(views: list[ReplicaView], vm: str) -> ReplicaView:
    """The replica the plan names ``vm`` (a VMID, or one replica's name).

    Raises:
        StepFailed: none, or a name several replicas share.
    """
    try:
        vmid: uuid.UUID | None = uuid.UUID(vm)
    except ValueError:
        vmid = None
    found = [v for v in views if (v.state.vmid == vmid if vmid else v.state.name == vm)]
    if len(found) == 1:
        return found[0]
    if found:
        raise StepFailed(f"{len(found)} replicas are named {vm!r}: give the VMID in the plan")
    raise StepFailed(f"no replica {vm!r} at the recovery server")
