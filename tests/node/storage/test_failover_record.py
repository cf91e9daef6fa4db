"""``failover/record.json``: the takeover mark (FOV-11) written, read back, and refused
when it is not a boolean; records without it (unplanned failovers, older records) read as
not planned."""

from __future__ import annotations

import json

import pytest

from node.storage.failover_record import FailoverRecord


def test_the_takeover_mark_round_trips_and_is_absent_for_an_unplanned_failover() -> None:
    planned = FailoverRecord(3, 2, 7, 7, (), planned=True)
    assert json.loads(planned.to_bytes())["planned"] is True
    assert FailoverRecord.from_bytes(planned.to_bytes()) == planned
    unplanned = FailoverRecord(3, 2, 7, 5, ())
    assert "planned" not in json.loads(unplanned.to_bytes())
    assert not FailoverRecord.from_bytes(unplanned.to_bytes()).planned


def test_a_mark_that_is_not_a_boolean_is_refused() -> None:
    doc = json.loads(FailoverRecord(3, 2, 7, 7, (), planned=True).to_bytes())
    doc["planned"] = "yes"
    with pytest.raises(ValueError, match="planned is not a boolean"):
        FailoverRecord.from_bytes(json.dumps(doc).encode())
