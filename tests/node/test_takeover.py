"""A FailoverRequest carried out again (its FailoverDone was lost) changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

import frproto as fp
from node.storage import Replica, ReplicaStore
from node.takeover import check_exact_repeat, repeat_admissible, replica_state_digest, take_over
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


# -- FOV-11: repeat-only admission ---------------------------------------------------------


def test_a_planned_takeover_admits_the_generation_before_it_in_repeat_only_mode(
    tmp_path: Path,
) -> None:
    replica = _replica(tmp_path)
    before = replica.generation
    assert not repeat_admissible(replica, before)  # not failed over: an ordinary open
    request = _request(replica)
    generation = take_over(replica, request)
    assert replica.failover_record is not None
    assert replica.failover_record.planned  # recorded as a takeover
    assert repeat_admissible(replica, before)
    assert not repeat_admissible(replica, generation)  # only the generation before it
    assert not repeat_admissible(replica, 0)
    assert check_exact_repeat(replica, request) == generation
    assert replica.generation == generation
    assert replica.failed_over


def test_repeat_only_refuses_what_is_not_the_exact_repeat(tmp_path: Path) -> None:
    replica = _replica(tmp_path)
    request = _request(replica)
    generation = take_over(replica, request)
    other = fp.FailoverRequest(replica.vmid, request.sequence - 1, BLOCK, request.state_digest)
    with pytest.raises(fp.NotAuthorized):
        check_exact_repeat(replica, other)
    with replica.image_path(0).open("r+b") as f:  # the VM runs here now and wrote
        f.write(b"\xff" * 512)
    with pytest.raises(fp.NotAuthorized):
        check_exact_repeat(replica, request)
    assert replica.generation == generation


def test_no_repeat_only_after_an_unplanned_failover_a_complete_or_a_reverse_elsewhere(
    tmp_path: Path,
) -> None:
    unplanned = _replica(tmp_path / "unplanned")
    apply_batch(unplanned, 4, 3)
    before = unplanned.generation
    unplanned.fail_over(2)  # to a kept point: not a takeover at the latest state
    assert not repeat_admissible(unplanned, before)
    # An unplanned failover at the latest state: its former primary is refused all the
    # same (REP-8), it learns at its next open that the VM runs elsewhere.
    latest = _replica(tmp_path / "latest")
    before = latest.generation
    latest.fail_over()
    assert latest.failover_record is not None
    assert not latest.failover_record.planned
    assert not repeat_admissible(latest, before)
    completed = _replica(tmp_path / "completed")
    before = completed.generation
    take_over(completed, _request(completed))
    completed.complete_failover()
    assert not repeat_admissible(completed, before)
    reversed_ = _replica(tmp_path / "reversed")
    before = reversed_.generation
    take_over(reversed_, _request(reversed_))
    reversed_.mark_reversed("a (127.0.0.1:1)")
    assert reversed_.reversed_to() == "a (127.0.0.1:1)"
    assert not repeat_admissible(reversed_, before)
    assert not repeat_admissible(reversed_, before, "b")  # reversed to another
    # Reversed back to the primary asking (its own takeover set that up, FOV-9): admitted.
    assert repeat_admissible(reversed_, before, "a")
