"""The field tables: one set of checks, raised as the peer's fault on decode and as ours
when building; the order of the checks for a body with several faults."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

import frproto as fp
from frproto._fields import U16, U64, table_of
from frproto._messages import Message
from frproto.codec import ENVELOPE, MESSAGE_CLASSES

from .pair import DEFAULT_VMID

NIL = bytes(16)
VM = DEFAULT_VMID.bytes


def frame(cls: type[fp.Message], fields: dict[str, Any]) -> bytes:
    """A frame whose body is built from raw wire ``fields`` with the class's schema."""
    body = table_of(cls).schema.build(fields)
    return ENVELOPE.pack(0, cls.TAG, len(body)) + body


def test_every_control_message_has_a_table() -> None:
    for cls in MESSAGE_CLASSES.values():
        if cls is not fp.Chunk:
            assert table_of(cls).fields, cls.__name__


# Bodies with several faults get the error of the first check that fails, in the order
# frproto has always checked received bodies in (pinned here).
SEVERAL_FAULTS = [
    (
        fp.QueryRecoveryServer,
        {"vmid": NIL, "vm_name": b"vm", "disk_sizes": [1] * 300},
        fp.BadValue,
        "300 disks",
    ),
    (
        fp.QueryRecoveryServerResponse,
        {"vmid": NIL, "existing": 9, "port": 0, "server_name": b"x"},
        fp.BadValue,
        "port 0",
    ),
    (
        fp.RelationshipCreate,
        {
            "vmid": VM,
            "vm_name": b"vm",
            "config": b"",
            "disks": [{"disk_id": b"d", "size": 0}, {"disk_id": b".x", "size": 1}],
        },
        fp.BadName,
        "disk id '.x'",
    ),
    (
        fp.RelationshipAccepted,
        {
            "vmid": VM,
            "generation": 0,
            "ir_state": 9,
            "applied_sequence": 0,
            "resume_disk": 5,
            "resume_offset": 0,
            "disks": [{"disk_id": b"d", "size": 1}],
        },
        fp.BadValue,
        "resume_disk 5",
    ),
    (
        fp.BatchBegin,
        {
            "vmid": NIL,
            "sequence": 1,
            "base_sequence": 1,
            "chunk_count": 0,
            "total_bytes": 0,
            "captured_at_ms": 0,
        },
        fp.BadValue,
        "sequence 1 not after base 1",
    ),
    (fp.Error, {"code": 0, "text": b"x" * 2000}, fp.BadValue, "code OK"),
]


@pytest.mark.parametrize(
    ("cls", "fields", "error", "text"), SEVERAL_FAULTS, ids=lambda v: getattr(v, "__name__", "")
)
def test_first_fault_in_check_order(
    cls: type[fp.Message], fields: dict[str, Any], error: type[fp.RemoteProtocolError], text: str
) -> None:
    with pytest.raises(error, match=text) as info:
        fp.codec.decode_frame(frame(cls, fields))
    assert type(info.value) is error  # the peer's fault, never a LocalProtocolError


def test_building_raises_the_same_check_as_ours() -> None:
    with pytest.raises(fp.LocalProtocolError, match="port 0") as info:
        fp.QueryRecoveryServerResponse(DEFAULT_VMID, "node", 0, fp.ExistingVM.NEW)
    assert type(info.value.__cause__) is fp.BadValue
    with pytest.raises(fp.LocalProtocolError, match="not after base") as info:
        fp.BatchBegin(DEFAULT_VMID, 3, 3, 0)
    assert type(info.value.__cause__) is fp.BadValue
    with pytest.raises(fp.LocalProtocolError) as info:
        fp.RelationshipOpen(uuid.UUID(int=0))
    assert type(info.value.__cause__) is fp.BadVMID


def test_a_name_that_cannot_be_utf8_is_a_bad_name_when_building() -> None:
    with pytest.raises(fp.LocalProtocolError, match="not valid UTF-8"):
        fp.QueryRecoveryServer(DEFAULT_VMID, "\udcff")


def test_table_refuses_a_field_without_a_wire_type() -> None:
    @dataclass(frozen=True, slots=True)
    class NoSpec(Message):
        token: int = 0

    with pytest.raises(TypeError, match="no wire spec"):
        table_of(NoSpec)


def test_table_refuses_an_order_that_misses_a_field() -> None:
    @dataclass(frozen=True, slots=True)
    class BadOrder(Message):
        WIRE_ORDER: ClassVar[tuple[str, ...]] = ("a",)
        a: U16 = 0
        b: U64 = 0

    with pytest.raises(TypeError, match="WIRE_ORDER"):
        table_of(BadOrder)
