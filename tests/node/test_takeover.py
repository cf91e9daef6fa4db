"""A FailoverRequest carried out again (its FailoverDone was lost) changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

import frproto as fp
from node.storage import Replica, ReplicaStore
from node.takeover import replica_state_digest, take_over
from tests.node.storage.test_replica import apply_batch, do_ir, make

BLOCK = 64 * 1024


def _replica(root: Path) -> Replica:
    replica = make(ReplicaStore(root))
    do_ir(replica)
    apply_batch(replica, 3, 2)
    return replica


def _request(replica: Replica, sequence: int | None = None) -> fp.FailoverRequest:
    return fp.FailoverRequest(
        replica.vmid,
        replica.applied_sequence if sequence is None else sequence,
        BLOCK,
        replica_state_digest(replica, BLOCK),
    )


def test_the_same_request_again_answers_the_same_generation(tmp_path: Path) -> None:
    replica = _replica(tmp_path)
    before = replica.generation
    request = _request(replica)
    assert take_over(replica, request) == before + 1
    assert take_over(replica, request) == before + 1  # no second generation bump
    assert replica.generation == before + 1
    assert replica.failed_over
    assert replica.applied_sequence == request.sequence


def test_a_repeat_after_the_vm_wrote_is_refused(tmp_path: Path) -> None:
    replica = _replica(tmp_path)
    request = _request(replica)
    generation = take_over(replica, request)
    with replica.image_path(0).open("r+b") as f:  # the VM runs here now and wrote
        f.write(b"\xff" * 512)
    with pytest.raises(fp.OutOfSequence):
        take_over(replica, request)
    assert replica.generation == generation


def test_a_repeat_at_another_sequence_is_refused(tmp_path: Path) -> None:
    replica = _replica(tmp_path)
    request = _request(replica)
    generation = take_over(replica, request)
    other = fp.FailoverRequest(replica.vmid, request.sequence - 1, BLOCK, request.state_digest)
    with pytest.raises(fp.OutOfSequence):
        take_over(replica, other)
    assert replica.generation == generation


def test_a_request_for_a_replica_failed_over_to_an_older_point_is_refused(
    tmp_path: Path,
) -> None:
    replica = _replica(tmp_path)
    apply_batch(replica, 4, 3)
    replica.fail_over(2)  # an unplanned failover to a kept point, not a takeover
    with pytest.raises(fp.OutOfSequence):
        take_over(replica, _request(replica))


def test_a_completed_failover_is_not_taken_over_again(tmp_path: Path) -> None:
    replica = _replica(tmp_path)
    request = _request(replica)
    take_over(replica, request)
    replica.complete_failover()
    with pytest.raises(fp.OutOfSequence):
        take_over(replica, request)
