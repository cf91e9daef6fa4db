"""A planned failover whose answer was lost, at the primary (FOV-11).

The primary sends its FailoverRequest and the connection breaks (or times out) before
the answer is read: the recovery side may have taken the VM over (it does so durably
before it answers, FOV-6) and run it at generation G, while this primary still holds
G-1; or it may never have seen the request. Until it knows, this primary must not
replicate the VM again (nor should anyone start it here): the request is recorded in
the VM's state *before* it is sent (``failover_in_doubt``: its sequence, its state
digest, the generation presented), and kept when no answer comes.

Running ``frctl failover planned VMID`` again re-runs only the hand-over
(:meth:`node.primary.replicator.VMReplicator.hand_over_again`): no stop hook, no last
cycle; the disks must still have the recorded state digest; the same request is sent
over a relationship opened at the recorded generation, which a recovery side that took
the VM over by it admits in repeat-only mode (FOV-11) and answers FailoverDone at G
again, changing nothing. A definite refusal (:data:`DEFINITE`) ends the doubt: the
recovery side did not fail over by this request. ``frctl replication resume VMID`` ends
it by an operator's decision.

This module holds the record and its texts; the replicator sends and saves.
"""

from __future__ import annotations

import uuid
from typing import Any

import frproto as fp

#: Refusals that say for sure what the recovery side did with the request: nothing
#: (OUT_OF_SEQUENCE: its replica is not failed over and differs; NOT_AUTHORIZED: it is
#: failed over otherwise, or the VM changed there since; NOT_SUPPORTED: nothing was sent).
#: Anything else (a broken or silent connection, a malformed answer, INTERNAL) leaves
#: the request in doubt.
DEFINITE: tuple[type[fp.FrprotoError], ...] = (fp.OutOfSequence, fp.NotAuthorized, fp.NotSupported)


def doubt_record(request: fp.FailoverRequest, presented: int) -> dict[str, Any]:
    """What ``failover_in_doubt`` keeps of ``request``, sent over a relationship opened
    at generation ``presented`` (0: the relationship's own, not presented)."""
    return {
        "sequence": request.sequence,
        "state_digest": request.state_digest.hex(),
        "generation": presented,
        "reverse_port": request.reverse_port,
    }


def repeated_request(vmid: uuid.UUID, doubt: dict[str, Any], block_size: int) -> fp.FailoverRequest:
    """The request recorded in ``doubt``, to send again, exactly."""
    return fp.FailoverRequest(
        vmid,
        int(doubt["sequence"]),
        block_size,
        bytes.fromhex(doubt["state_digest"]),
        reverse_port=int(doubt["reverse_port"]),
    )


def in_doubt_text(name: str, doubt: dict[str, Any]) -> str:
    """Why the VM is halted while its failover is in doubt (status shows it)."""
    return (
        f"failover in doubt: the planned failover request of {name} (sequence "
        f"{doubt['sequence']}) got no answer; the recovery side may run the VM now. Do not "
        f"start it here: run 'frctl failover planned {name}' again to finish it (or learn "
        "it was not done), or 'frctl replication resume' once you know it was not"
    )


def refused_text(name: str, exc: fp.FrprotoError) -> str:
    """Why the VM stays halted after the repeat was refused NOT_AUTHORIZED: the recovery
    side is failed over (by another failover, or the VM wrote there since)."""
    return (
        f"planned failover of {name} asked again and refused ({exc}): the recovery side "
        "is failed over and does not take this request; the VM may run there. Do not start "
        "it here before checking; 'frctl replication resume' replicates it again"
    )
