"""The recovery side of a planned failover (protocol 1.1, FailoverRequest).

The primary has stopped the VM and sent its last batch; it asks to have the VM taken over
at that final state. The replica is checked to hold exactly that state (FOV-4, FOV-5):
the primary's last acknowledged sequence, and the state digest of its disks
(``frproto.codec.state_digest``) computed here over the replica's images. Only then is
the replica failed over (:meth:`node.storage.Replica.fail_over`, at its latest point: no
revert) at the relationship's next generation, durably, before the answer (FOV-6).

One of the recovery server's own modules (``docs/architecture.md``: the failover
workflows above it may not be imported by it). Runs inside the recovery server, which
holds the storage (no lock to take), in a worker thread: reading the whole replica to
digest it is the long part, and the server goes on serving every other VM meanwhile
(FOV-8).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

import frproto as fp
from node.storage import Replica
from node.storage.failover_record import FAILED_OVER

log = logging.getLogger("frrep.failover")


@dataclass(frozen=True)
class TakenOver:
    """A VM this recovery server took over in a planned failover.

    Attributes:
        vmid: the VM.
        generation: the relationship's new generation.
        sequence: the point the VM runs from.
        storage: the storage location that holds its replica (the VM's disks now).
        primary_name: the former primary's certificate name.
        primary_address: the former primary's IP address (the connection's peer).
        reverse_port: the port of the former primary's own recovery server (0: none).
    """

    vmid: uuid.UUID
    generation: int
    sequence: int
    storage: Path
    primary_name: str
    primary_address: str | None
    reverse_port: int


def replica_state_digest(replica: Replica, block_size: int) -> bytes:
    """The state digest of ``replica`` at ``block_size`` (section 4.19 of the spec)."""
    maps = []
    for index, disk in enumerate(replica.disks):
        digests = bytearray()
        blocks = -(-disk.size // block_size)
        for first in range(0, blocks, fp.limits.MAX_DIGESTS):
            count = min(fp.limits.MAX_DIGESTS, blocks - first)
            digests += replica.digests(index, first * block_size, block_size, count)
        maps.append(bytes(digests))
    return fp.codec.state_digest(maps)


def take_over(replica: Replica, request: fp.FailoverRequest) -> int:
    """Check that ``replica`` holds the primary's final state, then fail it over there;
    the new generation.

    Raises:
        frproto.OutOfSequence: the replica is at another sequence, or its state digest
            differs (nothing is changed: the primary may send what is missing and ask
            again), or it is failed over already other than by the takeover this
            request repeats (see :func:`_check_repeat`).
    """
    replica.apply_committed()  # an acknowledged batch is part of the state (REP-16)
    if replica.failed_over:
        _check_repeat(replica, request)
    if replica.applied_sequence != request.sequence:
        raise fp.OutOfSequence(
            f"replica {replica.vmid} holds sequence {replica.applied_sequence}, the primary's "
            f"final state is {request.sequence}: not failing over"
        )
    ours = replica_state_digest(replica, request.block_size)
    if ours != request.state_digest:
        raise fp.OutOfSequence(
            f"replica {replica.vmid} at sequence {request.sequence} differs from the "
            "primary's final state (state digest): not failing over; resynchronize first"
        )
    # Failed over already (a repeat, checked above): returns that failover's generation.
    generation = replica.fail_over(request.sequence, planned=True)
    log.info(
        "planned failover of %s: taken over at sequence %d, generation %d",
        replica.vmid,
        request.sequence,
        generation,
    )
    return generation


def repeat_admissible(replica: Replica, generation: int, primary: str | None = None) -> bool:
    """Whether a RelationshipOpen presenting ``generation`` may open ``replica`` in
    repeat-only mode (FOV-11): the replica was failed over by a planned takeover from
    exactly that generation, to the next, and that failover is still in force (not
    completed, not cancelled, no reverse replication set up from it but the one to
    ``primary``, the certificate name asking: a takeover with a reverse port sets that
    one up before it answers, FOV-9).

    A primary that asked for that takeover and lost the answer presents the generation it
    knew; in repeat-only mode it may only repeat its request (:func:`check_exact_repeat`).
    The failover record says whether the failover was such a takeover
    (``FailoverRecord.planned``): after an unplanned failover, even one at the latest
    state, the former primary is refused whatever generation it presents (REP-8), so that
    it learns at once that its VM runs elsewhere. A takeover whose record was finished by
    a restart's recovery rather than by the request (a crash between the decision and the
    record) is not marked: its repeat is refused, and the primary in doubt stops for a
    person (never two sides writing).
    """
    record = replica.failover_record
    return (
        replica.failed_over
        and generation > 0
        and record is not None
        and record.phase == FAILED_OVER
        and record.generation == replica.generation
        and record.from_generation == generation
        and generation + 1 == record.generation
        and record.planned  # a takeover, not an unplanned failover
        and record.point == record.from_sequence  # at the latest state, no revert
        and _not_reversed_away(replica.reversed_to(), primary)
    )


def _not_reversed_away(reversed_to: str | None, primary: str | None) -> bool:
    """No reverse replication, or only back to ``primary`` (``reversed_to`` reads
    ``NAME (HOST:PORT)``, :func:`node.failover.reverse.reverse_state`)."""
    if reversed_to is None:
        return True
    return primary is not None and reversed_to.startswith(f"{primary} (")


def check_exact_repeat(replica: Replica, request: fp.FailoverRequest) -> int:
    """In repeat-only mode (FOV-11): ``request`` must repeat the takeover exactly (its
    sequence, and the state digest of the replica, which the failed-over VM has not
    changed); the failover's generation, nothing changed.

    Raises:
        frproto.NotAuthorized: anything else (another sequence, or the replica differs:
            the VM ran and wrote there since it was taken over).
    """
    replica.apply_committed()
    record = replica.failover_record
    if record is None or record.point != request.sequence:
        raise fp.NotAuthorized(
            f"VM {replica.vmid} was failed over here at another point: only the exact "
            "repeat of the failover request is answered"
        )
    if replica_state_digest(replica, request.block_size) != request.state_digest:
        raise fp.NotAuthorized(
            f"VM {replica.vmid} was failed over here and its disks changed since (it runs "
            "here): only the exact repeat of the failover request is answered"
        )
    log.info(
        "planned failover of %s repeated: it was taken over at sequence %d, generation %d",
        replica.vmid,
        request.sequence,
        record.generation,
    )
    return record.generation


def _check_repeat(replica: Replica, request: fp.FailoverRequest) -> None:
    """``replica`` is failed over already: the request may only repeat the one whose answer
    was lost, which changes nothing when it is carried out again.

    That is a failover at the replica's latest state (a planned one: its point is where
    replication left it), not completed nor cancelled, at the request's sequence; the
    state digest is checked after this as for any request, so a VM that wrote since it
    was taken over is refused.

    Raises:
        frproto.OutOfSequence: another failover, or one at another point.
    """
    record = replica.failover_record
    if (
        record is None
        or record.phase != FAILED_OVER
        or record.generation != replica.generation
        or record.point != record.from_sequence
        or record.point != request.sequence
    ):
        raise fp.OutOfSequence(
            f"replica {replica.vmid} is failed over already (generation "
            f"{replica.generation}), not by a takeover at sequence {request.sequence}: "
            "not failing over again"
        )
