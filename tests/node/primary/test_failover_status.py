"""Failover and reverse state in the primary's status, with the generation: each made
true and made false (node/primary/status.py)."""

from __future__ import annotations

from typing import Any

from node.primary.state import IRStage, VMReplicationState
from node.primary.status import (
    RUNNING_HERE,
    ReplicationState,
    Severity,
    Why,
    vm_status,
)

NOW = 1_800_000_000.0


def judged(**fields: Any) -> dict[str, Any]:
    state = VMReplicationState(
        vmid="00000000-0000-4000-8000-000000000002",
        name="web01",
        disks=[{"disk_id": "disk0", "path": "/x", "size": 1 << 20}],
        frequency_s=300.0,
        ir_state=IRStage.COMPLETE,
        last_replicated_at=NOW - 60,
        last_synced_at=NOW - 60,
        generation=1,
    )
    for name, value in fields.items():
        setattr(state, name, value)
    status = vm_status(state, now=NOW, service=RUNNING_HERE, overflowed=False)
    return {"status": status, "json": status.to_json()}


def test_a_vm_handed_over_by_a_planned_failover_is_failed_over_not_halted() -> None:
    done = judged(
        generation=2,
        failed_over_generation=2,
        halted="planned failover: the recovery side took this VM over",
    )
    status = done["status"]
    assert status.state is ReplicationState.FAILED_OVER
    assert status.health is Severity.NORMAL  # not a fault: the operator asked for it
    assert [r.code for r in status.reasons] == [Why.FAILED_OVER]
    assert status.next_cycle_at is None
    assert done["json"]["state"] == "failed over"
    assert done["json"]["failover"] == {"generation": 2}
    assert done["json"]["generation"] == 2


def test_a_vm_not_failed_over_shows_no_failover() -> None:
    plain = judged()
    assert plain["status"].state is ReplicationState.REPLICATING
    assert plain["json"]["failover"] is None
    assert plain["json"]["generation"] == 1
    halted = judged(halted="the replica was deleted")  # halted, but not by a failover
    assert halted["status"].state is ReplicationState.HALTED
    assert halted["json"]["failover"] is None


def test_reverse_replication_is_shown_with_its_direction() -> None:
    assert judged(reverse=True, generation=2)["json"]["direction"] == "reverse"
    assert judged()["json"]["direction"] == "forward"


DOUBT = {"sequence": 7, "state_digest": "ab" * 16, "generation": 1, "reverse_port": 0}


def test_a_failover_in_doubt_is_critical_and_not_replicating() -> None:
    doubt = judged(failover_in_doubt=dict(DOUBT), halted="failover in doubt: ...")
    status = doubt["status"]
    assert status.state is ReplicationState.FAILOVER_IN_DOUBT
    assert status.health is Severity.CRITICAL
    assert [r.code for r in status.reasons] == [Why.FAILOVER_IN_DOUBT]
    assert "sequence 7" in status.reasons[0].text
    assert status.next_cycle_at is None
    assert doubt["json"]["state"] == "failover in doubt"
    assert doubt["json"]["failover"] is None  # not failed over (as far as we know)


def test_no_failover_in_doubt_once_answered_or_given_up() -> None:
    answered = judged(generation=1, failed_over_generation=2, halted="planned failover: taken over")
    assert answered["status"].state is ReplicationState.FAILED_OVER
    given_up = judged()  # resumed by the operator: the record is gone
    assert given_up["status"].state is ReplicationState.REPLICATING
    assert Why.FAILOVER_IN_DOUBT not in [r.code for r in given_up["status"].reasons]
