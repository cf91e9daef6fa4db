"""frlink.wire_errors: what an Error built from an exception may say (ERR-11, ERR-12)."""

from __future__ import annotations

import logging
import re

import pytest

import frproto as fp
from frlink.wire_errors import carries_internals, wire_error

log = logging.getLogger("test.wire_errors")
INCIDENT = re.compile(r"incident ([0-9a-f]{8})")


def test_a_refusal_keeps_its_text_and_not_its_detail() -> None:
    exc = fp.NoSpace("no space left on the storage location", detail="write /srv/x/j: ENOSPC")
    assert "/srv/x" in str(exc)  # the log's
    error = wire_error(exc, log)
    assert (error.code, error.text) == (fp.ErrorCode.NO_SPACE, exc.message)


def test_a_peer_violation_keeps_its_text() -> None:
    exc = fp.BadValue("disk size 0")
    assert wire_error(exc, log) == fp.Error(fp.ErrorCode.BAD_VALUE, "disk size 0")


@pytest.mark.parametrize(
    "exc",
    [
        fp.InternalError("state file /srv/r/1/state.json is damaged"),
        fp.LocalProtocolError("cannot send Ack: wrong state"),
        RuntimeError("a bug"),
        OSError(5, "Input/output error", "/srv/r/x"),
    ],
)
def test_a_failure_of_our_own_is_internal_with_an_incident_id(
    exc: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger=log.name)
    error = wire_error(exc, log, what="RelationshipCreate")
    assert error.code == fp.ErrorCode.INTERNAL
    found = INCIDENT.search(error.text)
    assert found
    assert "/srv" not in error.text
    assert "bug" not in error.text
    record = next(r for r in caplog.records if found.group(1) in r.getMessage())
    assert "RelationshipCreate" in record.getMessage()


def test_a_refusal_whose_text_holds_a_path_is_replaced(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=log.name)
    error = wire_error(fp.Busy("another process holds /var/lib/frrep/replicas"), log)
    assert error.code == fp.ErrorCode.BUSY
    assert "/var" not in error.text
    assert INCIDENT.search(error.text)
    assert any("/var/lib/frrep" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("text", "internal"),
    [
        ("create replica /tmp/s/.staging/x: File too large", True),
        ("open 'C:\\data\\x.img' failed", True),
        ("(/srv/a/b)", True),
        ("VM 1234 was failed over to this site (generation 2)", False),
        ("compression ZSTD|LZ4 and 1/2 of the disks", False),
        ("disk 'system' of 1125899906842624 bytes cannot be held here", False),
    ],
)
def test_what_looks_like_a_local_path(text: str, internal: bool) -> None:
    assert carries_internals(text) is internal
