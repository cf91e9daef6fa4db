"""FailoverAsk and FailoverDecline (protocol 1.1, ``docs/protocol.md`` 4.21, 4.22): their
encoding and bounds, where the state machine allows them, the checks of what they name,
and a connection at 1.0 that neither sends nor takes them."""

from __future__ import annotations

import uuid

import pytest

import frproto as fp
from frproto import Role, State
from frproto.codec import decode_frame, encode_frame
from tests.frproto.pair import DEFAULT_DISKS, DEFAULT_VMID, ConnectionPair, state_of

OTHER = uuid.UUID("0b7c1e6f-3a52-4c8e-9d0a-2f4b1e7c9a10")


def test_encode_decode_and_layout() -> None:
    ask = fp.FailoverAsk(DEFAULT_VMID)
    frame = encode_frame(ask)
    assert frame[:8] == bytes.fromhex("0000805200000010")
    assert frame[8:] == DEFAULT_VMID.bytes
    assert decode_frame(frame) == ask
    decline = fp.FailoverDecline(DEFAULT_VMID, "arrêt refusé")
    frame = encode_frame(decline)
    reason = "arrêt refusé".encode()
    assert frame[:4] == bytes.fromhex("00008053")
    assert frame[8:] == DEFAULT_VMID.bytes + len(reason).to_bytes(2, "big") + reason
    assert decode_frame(frame) == decline
    assert decode_frame(encode_frame(fp.FailoverDecline(OTHER))) == fp.FailoverDecline(OTHER, "")


def test_both_tags_are_ignorable_and_1_1() -> None:
    for tag in (fp.MessageTag.FAILOVER_ASK, fp.MessageTag.FAILOVER_DECLINE):
        assert tag & fp.codec.IGNORABLE_TAG_BIT
        assert fp.codec.TAG_MINOR[tag] == 1


def test_the_reason_is_bounded() -> None:
    longest = "é" * (fp.limits.MAX_ERROR_TEXT // 2)
    decoded = decode_frame(encode_frame(fp.FailoverDecline(DEFAULT_VMID, longest)))
    assert decoded == fp.FailoverDecline(DEFAULT_VMID, longest)
    with pytest.raises(fp.LocalProtocolError, match="over 1024 bytes"):
        fp.FailoverDecline(DEFAULT_VMID, "x" * (fp.limits.MAX_ERROR_TEXT + 1))
    body = DEFAULT_VMID.bytes + (1025).to_bytes(2, "big") + b"x" * 1025
    frame = fp.codec.ENVELOPE.pack(0, 0x8053, len(body)) + body
    with pytest.raises(fp.BadValue):
        decode_frame(frame)


def _opening(pair: ConnectionPair, vmid: uuid.UUID = DEFAULT_VMID) -> None:
    pair.negotiate()
    pair.send(Role.PRIMARY, fp.RelationshipOpen(vmid))
    assert state_of(pair) is State.OPENING


def test_ask_in_opening_then_decline_in_session() -> None:
    pair = ConnectionPair()
    _opening(pair)
    pair.send(Role.RECOVERY, fp.FailoverAsk(DEFAULT_VMID))
    assert state_of(pair) is State.OPENING
    pair.send(Role.RECOVERY, fp.RelationshipAccepted(DEFAULT_VMID, DEFAULT_DISKS))
    assert state_of(pair) is State.SESSION
    pair.send(Role.PRIMARY, fp.FailoverDecline(DEFAULT_VMID, "no stop hook"))
    assert state_of(pair) is State.SESSION
    # Replication goes on; a second decline of the same ask is one too many (FOV-16).
    pair.send(Role.PRIMARY, fp.BatchBegin(DEFAULT_VMID, 2, 1, 0))
    with pytest.raises(fp.LocalProtocolError):
        pair.primary.send(fp.FailoverDecline(DEFAULT_VMID, "again"))


def test_ask_then_failover_request_is_allowed() -> None:
    pair = ConnectionPair()
    _opening(pair)
    pair.send(Role.RECOVERY, fp.FailoverAsk(DEFAULT_VMID))
    pair.send(Role.RECOVERY, fp.RelationshipAccepted(DEFAULT_VMID, DEFAULT_DISKS))
    pair.send(Role.PRIMARY, fp.FailoverRequest(DEFAULT_VMID, 0, 4096, bytes(16)))
    assert state_of(pair) is State.FAILING_OVER
    pair.send(Role.RECOVERY, fp.FailoverDone(DEFAULT_VMID, 2, 0))
    assert state_of(pair) is State.READY


def test_a_decline_nobody_asked_for_is_refused() -> None:
    pair = ConnectionPair().walk_to(State.SESSION)
    with pytest.raises(fp.LocalProtocolError):
        pair.primary.send(fp.FailoverDecline(DEFAULT_VMID, "unasked"))
    # Sent anyway (bytes of another implementation): the recovery side refuses it.
    frame = encode_frame(fp.FailoverDecline(DEFAULT_VMID, "unasked"))
    pair.recovery.receive_data(frame)
    with pytest.raises(fp.UnexpectedMessage, match="FOV-16"):
        pair.recovery.next_event()


def test_a_decline_for_another_vm_is_refused() -> None:
    pair = ConnectionPair()
    _opening(pair)
    pair.send(Role.RECOVERY, fp.FailoverAsk(DEFAULT_VMID))
    pair.send(Role.RECOVERY, fp.RelationshipAccepted(DEFAULT_VMID, DEFAULT_DISKS))
    pair.recovery.receive_data(encode_frame(fp.FailoverDecline(OTHER, "other")))
    with pytest.raises(fp.UnexpectedMessage):
        pair.recovery.next_event()


def test_an_ask_is_for_the_vm_being_opened_and_only_in_opening() -> None:
    pair = ConnectionPair()
    _opening(pair)
    with pytest.raises(fp.LocalProtocolError):
        pair.recovery.send(fp.FailoverAsk(OTHER))
    pair.primary.receive_data(encode_frame(fp.FailoverAsk(OTHER)))
    with pytest.raises(fp.UnexpectedMessage, match="FOV-13"):
        pair.primary.next_event()
    pair = ConnectionPair().walk_to(State.SESSION)
    with pytest.raises(fp.LocalProtocolError):
        pair.recovery.send(fp.FailoverAsk(DEFAULT_VMID))
    with pytest.raises(fp.LocalProtocolError):
        ConnectionPair().walk_to(State.READY).recovery.send(fp.FailoverAsk(DEFAULT_VMID))


def test_an_ask_of_a_previous_relationship_does_not_carry_over() -> None:
    pair = ConnectionPair()
    _opening(pair)
    pair.send(Role.RECOVERY, fp.FailoverAsk(DEFAULT_VMID))
    pair.send(Role.RECOVERY, fp.RelationshipAccepted(DEFAULT_VMID, DEFAULT_DISKS))
    pair.send(Role.PRIMARY, fp.RelationshipOpen(DEFAULT_VMID))
    pair.send(Role.RECOVERY, fp.RelationshipAccepted(DEFAULT_VMID, DEFAULT_DISKS))
    with pytest.raises(fp.LocalProtocolError):
        pair.primary.send(fp.FailoverDecline(DEFAULT_VMID, "asked on the earlier open"))


def _pair_at_1_0() -> ConnectionPair:
    pair = ConnectionPair()
    pair.send(Role.PRIMARY, fp.NegotiateRequest(version=(1, 0)))
    pair.send(Role.RECOVERY, fp.NegotiateResponse(server_name="recovery.example", version=(1, 0)))
    pair.send(Role.PRIMARY, fp.RelationshipOpen(DEFAULT_VMID))
    return pair


def test_a_connection_at_1_0_refuses_to_send_or_take_them() -> None:
    pair = _pair_at_1_0()
    with pytest.raises(fp.LocalProtocolError):
        pair.recovery.send(fp.FailoverAsk(DEFAULT_VMID))
    pair.primary.receive_data(encode_frame(fp.FailoverAsk(DEFAULT_VMID)))
    with pytest.raises(fp.UnexpectedMessage, match=r"1\.1"):
        pair.primary.next_event()
    pair = _pair_at_1_0()
    pair.send(Role.RECOVERY, fp.RelationshipAccepted(DEFAULT_VMID, DEFAULT_DISKS))
    with pytest.raises(fp.LocalProtocolError):
        pair.primary.send(fp.FailoverDecline(DEFAULT_VMID, "no"))
