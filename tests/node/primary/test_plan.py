"""Every decision of node/primary/plan.py, from plain values."""

from __future__ import annotations

import pytest

import frproto as fp
from node.primary.pending_log import PendingLogCorrupt
from node.primary.plan import (
    Capture,
    CycleStart,
    DropAcknowledged,
    IRFromCursor,
    IRImported,
    IRWaitForImport,
    Resend,
    ResyncByDigests,
    ResyncKnown,
    bitmap_survived,
    known_blocks,
    next_capture_sequence,
    next_resync_sequence,
    plan_capture,
    plan_cycle,
    plan_ir,
    plan_pending_cycle,
    plan_resync,
    refusal,
    resync_due,
    with_dirty,
)
from node.primary.state import IRStage

VMID = "00000000-0000-0000-0000-000000000001"


@pytest.mark.parametrize("stage", [IRStage.NOT_STARTED, IRStage.IN_PROGRESS])
def test_an_unfinished_ir_comes_first(stage: IRStage) -> None:
    start = plan_cycle(ir_stage=stage, needs_resync=True, tracker_lost=True)
    assert start is CycleStart.INITIAL_REPLICATION
    assert not resync_due(start, overflowed=True)


def test_a_complete_ir_captures() -> None:
    start = plan_cycle(ir_stage=IRStage.COMPLETE, needs_resync=False, tracker_lost=False)
    assert start is CycleStart.CAPTURE
    assert not resync_due(start, overflowed=False)
    assert resync_due(start, overflowed=True)  # the capture passed the log's bound


@pytest.mark.parametrize(("needs_resync", "lost"), [(True, False), (False, True), (True, True)])
def test_asked_or_lost_resynchronizes_instead_of_capturing(needs_resync: bool, lost: bool) -> None:
    start = plan_cycle(ir_stage=IRStage.COMPLETE, needs_resync=needs_resync, tracker_lost=lost)
    assert start is CycleStart.RESYNC
    assert resync_due(start, overflowed=False)


def test_capture_source() -> None:
    assert plan_capture(overflowed=True, has_tracker=True) is Capture.NOTHING
    assert plan_capture(overflowed=True, has_tracker=False) is Capture.NOTHING
    assert plan_capture(overflowed=False, has_tracker=True) is Capture.FROM_TRACKER
    assert plan_capture(overflowed=False, has_tracker=False) is Capture.SCAN


def test_capture_sequence_follows_pending_and_acknowledged() -> None:
    assert next_capture_sequence([], 0) == 1
    assert next_capture_sequence([], 7) == 8
    assert next_capture_sequence([8, 9], 7) == 10
    assert next_capture_sequence([3], 7) == 8


def _refusal(
    *,
    replica_sizes: tuple[int, ...] = (4096,),
    ir_stage: IRStage = IRStage.COMPLETE,
    applied_sequence: int = 5,
    acknowledged: int = 5,
) -> str | None:
    return refusal(
        vmid=VMID,
        replica_sizes=list(replica_sizes),
        disk_sizes=(4096,),
        ir_stage=ir_stage,
        applied_sequence=applied_sequence,
        acknowledged=acknowledged,
    )


def test_refusal() -> None:
    assert _refusal() is None
    assert _refusal(applied_sequence=6) is None
    behind = _refusal(applied_sequence=4)
    assert behind is not None
    assert "behind the acknowledged 5" in behind
    # During an IR the replica's sequence says nothing yet.
    assert _refusal(ir_stage=IRStage.IN_PROGRESS, applied_sequence=0, acknowledged=3) is None
    resized = _refusal(replica_sizes=(8192,))
    assert resized is not None
    assert f"frctl replication reseed {VMID}" in resized


def test_ir_from_the_start() -> None:
    plan = plan_ir(
        exported=False, server_ir_state=fp.IRState.NOT_STARTED, resume=(1, 9), disk_count=2
    )
    assert plan == IRFromCursor((0, 0), 2)
    assert plan.sends
    assert not plan.maps_from_replica
    assert not plan.resuming


def test_ir_resumed_at_the_servers_cursor() -> None:
    plan = plan_ir(
        exported=False, server_ir_state=fp.IRState.IN_PROGRESS, resume=(1, 65536), disk_count=2
    )
    assert isinstance(plan, IRFromCursor)
    assert plan.start == (1, 65536)
    assert plan.resuming
    assert plan.sends
    assert plan.maps_from_replica


def test_an_ir_in_progress_at_its_very_end_still_gets_its_irend() -> None:
    # The server's last save came after the last chunk, before the IREnd: it reports the
    # IR in progress with its resume point at the end of the last disk. Only an IR (no
    # chunk left, then the IREnd) completes it; sending nothing left the primary
    # believing the IR complete while the server held it IN_PROGRESS.
    plan = plan_ir(
        exported=False, server_ir_state=fp.IRState.IN_PROGRESS, resume=(2, 0), disk_count=2
    )
    assert plan == IRFromCursor((2, 0), 2, resuming=True)
    assert plan.sends
    assert plan.maps_from_replica


def test_ir_the_server_completed_is_not_sent_again() -> None:
    plan = plan_ir(exported=False, server_ir_state=fp.IRState.COMPLETE, resume=(0, 0), disk_count=2)
    assert plan == IRFromCursor((2, 0), 2)
    assert not plan.sends
    assert plan.maps_from_replica


@pytest.mark.parametrize("state", [fp.IRState.NOT_STARTED, fp.IRState.IN_PROGRESS])
def test_exported_ir_waits_for_its_import(state: fp.IRState) -> None:
    plan = plan_ir(exported=True, server_ir_state=state, resume=(0, 0), disk_count=1)
    assert plan == IRWaitForImport()


def test_exported_ir_imported() -> None:
    plan = plan_ir(exported=True, server_ir_state=fp.IRState.COMPLETE, resume=(0, 0), disk_count=1)
    assert plan == IRImported()


def test_pending_cycles_resent_or_dropped() -> None:
    assert plan_pending_cycle(3, 5) == DropAcknowledged(3)
    assert plan_pending_cycle(5, 5) == DropAcknowledged(5)
    assert plan_pending_cycle(6, 5) == Resend(6)


def test_bitmap_survived_only_with_everything_known() -> None:
    def survived(
        overflowed: bool = True,
        has_tracker: bool = True,
        tracker_lost: bool = False,
        needs_resync: bool = False,
        maps_on_disk: bool = True,
    ) -> bool:
        return bitmap_survived(
            overflowed=overflowed,
            has_tracker=has_tracker,
            tracker_lost=tracker_lost,
            needs_resync=needs_resync,
            maps_on_disk=maps_on_disk,
        )

    assert survived()
    assert not survived(overflowed=False)
    assert not survived(has_tracker=False)
    assert not survived(tracker_lost=True)
    assert not survived(needs_resync=True)
    assert not survived(maps_on_disk=False)


def test_known_blocks_from_extents() -> None:
    sizes, block = [3 * 4096 + 100, 4096], 4096
    extents = [
        (4, [(0, 0, 4096), (0, 3 * 4096, 100)]),  # the last block cut at the disk's end
        (5, [(1, 0, 4096), (0, 4096, 4096)]),
    ]
    assert known_blocks(extents, sizes, block) == {0: {0, 1, 3}, 1: {0}}
    assert known_blocks([], sizes, block) == {}


@pytest.mark.parametrize(
    "extent",
    [
        (2, 0, 4096),  # no such disk
        (-1, 0, 4096),
        (0, 100, 4096),  # not at a block offset
        (0, 5 * 4096, 4096),  # past the disk's end
        (0, 0, 100),  # not a whole block
        (0, 3 * 4096, 4096),  # the last block is 100 bytes
    ],
)
def test_known_blocks_refuse_what_capture_never_writes(extent: tuple[int, int, int]) -> None:
    with pytest.raises(PendingLogCorrupt, match="cycle 7"):
        known_blocks([(7, [extent])], [3 * 4096 + 100, 4096], 4096)


def test_resync_by_known_blocks() -> None:
    known = {0: {1, 2}}
    assert plan_resync(known, applied_sequence=5, acknowledged=5) == ResyncKnown(known)
    assert plan_resync(known, applied_sequence=6, acknowledged=5) == ResyncKnown(known)


def test_resync_by_digests() -> None:
    assert plan_resync(None, applied_sequence=5, acknowledged=5) == ResyncByDigests()
    behind = plan_resync({0: {1}}, applied_sequence=4, acknowledged=5)
    assert behind == ResyncByDigests(replica_behind=True)


def test_dirty_blocks_join_the_known_ones() -> None:
    known = {0: {1}}
    assert with_dirty(known, {0: [2], 1: [0]}) == {0: {1, 2}, 1: {0}}
    assert known == {0: {1}}  # not changed in place


def test_resync_sequence_after_either_side() -> None:
    assert next_resync_sequence(3, 5) == 6
    assert next_resync_sequence(7, 5) == 8
