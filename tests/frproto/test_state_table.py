"""The state table, triple by triple, and illegal moves through real connections."""

from __future__ import annotations

import itertools

import pytest

import frproto as fp
from frproto import MessageTag, RecoveryType, Role, State
from frproto._state import IllegalTransition, next_state

from .pair import DEFAULT_DISKS, DEFAULT_VMID, ConnectionPair, drain, send_any, state_of

T = MessageTag
P = Role.PRIMARY
R = Role.RECOVERY

# -- an independent statement of the protocol (written from the docs, not from the table) ---

#: (state, sender) -> {tag: next state} for everything but Error and Keepalive.
EXPECTED: dict[tuple[State, Role], dict[MessageTag, State]] = {
    (State.IDLE, P): {T.NEGOTIATE_REQUEST: State.NEGOTIATING},
    (State.NEGOTIATING, R): {T.NEGOTIATE_RESPONSE: State.READY},
    (State.READY, P): {
        T.QUERY_RECOVERY_SERVER: State.QUERYING,
        T.RELATIONSHIP_CREATE: State.OPENING,
        T.RELATIONSHIP_OPEN: State.OPENING,
    },
    (State.QUERYING, R): {T.QUERY_RECOVERY_SERVER_RESPONSE: State.READY},
    (State.OPENING, R): {T.RELATIONSHIP_ACCEPTED: State.SESSION, T.FAILOVER_ASK: State.OPENING},
    (State.SESSION, P): {
        T.RELATIONSHIP_CREATE: State.OPENING,
        T.RELATIONSHIP_OPEN: State.OPENING,
        T.IR_BEGIN: State.IR,
        T.BATCH_BEGIN: State.BATCH,
        T.DIGEST_MAP_REQUEST: State.DIGESTS,
        T.RELATIONSHIP_DELETE: State.DELETING,
        T.FAILOVER_REQUEST: State.FAILING_OVER,
        T.FAILOVER_DECLINE: State.SESSION,
    },
    (State.IR, P): {T.CHUNK: State.IR, T.IR_END: State.IR_ENDING},
    (State.IR_ENDING, R): {T.ACK: State.SESSION},
    (State.BATCH, P): {T.CHUNK: State.BATCH, T.BATCH_END: State.BATCH_ENDING},
    (State.BATCH_ENDING, R): {T.ACK: State.SESSION},
    (State.DIGESTS, R): {T.DIGEST_MAP: State.SESSION},
    (State.DELETING, R): {T.ACK: State.READY},
    (State.FAILING_OVER, R): {T.FAILOVER_DONE: State.READY},
}
#: Where a refusal (an Error from the recovery side) returns.
REFUSALS = {
    State.QUERYING: State.READY,
    State.OPENING: State.READY,
    State.IR_ENDING: State.SESSION,
    State.BATCH_ENDING: State.SESSION,
    State.DIGESTS: State.SESSION,
    State.DELETING: State.SESSION,
    State.FAILING_OVER: State.SESSION,
}
NO_KEEPALIVE = {
    State.IDLE,
    State.NEGOTIATING,
    State.MUST_CLOSE,
    State.CLOSED,
    State.ERROR,
}
RECOVERY_TYPES: list[RecoveryType | None] = [None, *RecoveryType]


def expected_next(
    state: State, sender: Role, tag: MessageTag, recovery_type: RecoveryType | None
) -> State | None:
    """Where the protocol says the triple leads, or None if it is illegal."""
    if tag is T.ERROR:
        if state in (State.MUST_CLOSE, State.CLOSED):
            return None
        if sender is R and state in REFUSALS:
            return REFUSALS[state]
        return State.MUST_CLOSE
    if tag is T.KEEPALIVE:
        return None if state in NO_KEEPALIVE else state
    found = EXPECTED.get((state, sender), {}).get(tag)
    if found is None:
        return None
    is_broker = recovery_type is RecoveryType.CLUSTERING_BROKER
    if tag is T.QUERY_RECOVERY_SERVER and not is_broker:
        return None
    if tag in (T.RELATIONSHIP_CREATE, T.RELATIONSHIP_OPEN) and is_broker:
        return None
    return found


ALL_TRIPLES = list(itertools.product(State, Role, MessageTag))


def _actual(
    state: State, sender: Role, tag: MessageTag, recovery_type: RecoveryType | None
) -> State | None:
    try:
        return next_state(state, sender, tag, recovery_type)
    except IllegalTransition:
        return None


@pytest.mark.parametrize("recovery_type", RECOVERY_TYPES, ids=str)
def test_every_triple_matches_the_protocol(recovery_type: RecoveryType | None) -> None:
    mismatches = [
        (state.name, sender.name, tag.name, _actual(state, sender, tag, recovery_type), want)
        for state, sender, tag in ALL_TRIPLES
        if _actual(state, sender, tag, recovery_type)
        is not (want := expected_next(state, sender, tag, recovery_type))
    ]
    assert mismatches == []


def test_table_is_not_vacuous() -> None:
    legal = sum(
        expected_next(s, r, t, RecoveryType.STANDALONE) is not None for s, r, t in ALL_TRIPLES
    )
    # 25 moves of the conversation minus the broker-only query, Error (14 states x 2 roles),
    # Keepalive (11 states x 2 roles).
    assert legal == 24 + 28 + 22
    assert next_state(State.ERROR, P, T.ERROR, None) is State.MUST_CLOSE
    assert next_state(State.IDLE, R, T.ERROR, None) is State.MUST_CLOSE


# -- illegal moves through real connections ------------------------------------------------

WALKABLE = [
    State.IDLE,
    State.NEGOTIATING,
    State.READY,
    State.QUERYING,
    State.OPENING,
    State.SESSION,
    State.IR,
    State.IR_ENDING,
    State.BATCH,
    State.BATCH_ENDING,
    State.DIGESTS,
    State.DELETING,
    State.FAILING_OVER,
    State.MUST_CLOSE,
]


def sample_message(tag: MessageTag) -> fp.Message:
    """A valid message of ``tag`` that fits the pair's default session."""
    vmid = DEFAULT_VMID
    digest = bytes(16)
    samples: dict[MessageTag, fp.Message] = {
        T.NEGOTIATE_REQUEST: fp.NegotiateRequest(),
        T.NEGOTIATE_RESPONSE: fp.NegotiateResponse(server_name="r.example"),
        T.QUERY_RECOVERY_SERVER: fp.QueryRecoveryServer(vmid, "vm"),
        T.QUERY_RECOVERY_SERVER_RESPONSE: fp.QueryRecoveryServerResponse(
            vmid, "node1.example", 7000, fp.ExistingVM.NEW
        ),
        T.ERROR: fp.Error(fp.ErrorCode.BUSY, "busy"),
        T.KEEPALIVE: fp.Keepalive(9),
        T.RELATIONSHIP_CREATE: fp.RelationshipCreate(vmid, "vm", DEFAULT_DISKS),
        T.RELATIONSHIP_OPEN: fp.RelationshipOpen(vmid),
        T.RELATIONSHIP_ACCEPTED: fp.RelationshipAccepted(vmid, DEFAULT_DISKS),
        T.RELATIONSHIP_DELETE: fp.RelationshipDelete(vmid),
        T.IR_BEGIN: fp.IRBegin(vmid),
        T.IR_END: fp.IREnd(vmid, 0, 0, digest),
        T.BATCH_BEGIN: fp.BatchBegin(vmid, 1, 0, 1),
        T.CHUNK: fp.Chunk(0, 0, 4, fp.codec.chunk_digest(b"data"), b"data"),
        T.BATCH_END: fp.BatchEnd(vmid, 1, 0, digest),
        T.ACK: fp.Ack(vmid, fp.AckKind.IR_COMPLETE, 0),
        T.DIGEST_MAP_REQUEST: fp.DigestMapRequest(vmid, 0, 4096, 0, 1),
        T.DIGEST_MAP: fp.DigestMap(vmid, 0, 4096, 0, digest),
        T.FAILOVER_REQUEST: fp.FailoverRequest(vmid, 0, 4096, digest),
        T.FAILOVER_DONE: fp.FailoverDone(vmid, 2, 0),
        T.FAILOVER_ASK: fp.FailoverAsk(vmid),
        T.FAILOVER_DECLINE: fp.FailoverDecline(vmid, "no stop hook"),
    }
    return samples[tag]


def _recovery_type_for(state: State) -> RecoveryType:
    return RecoveryType.CLUSTERING_BROKER if state is State.QUERYING else RecoveryType.STANDALONE


ILLEGAL = [
    (state, role, tag)
    for state in WALKABLE
    for role in Role
    for tag in MessageTag
    if expected_next(state, role, tag, _recovery_type_for(state)) is None
]


def test_illegal_sample_is_large() -> None:
    assert len(ILLEGAL) > 300


@pytest.mark.parametrize(
    ("state", "role", "tag"), ILLEGAL, ids=lambda v: getattr(v, "name", str(v))
)
def test_illegal_move_refused_on_both_sides(state: State, role: Role, tag: MessageTag) -> None:
    pair = ConnectionPair().walk_to(state)
    sender, receiver = pair.conn(role), pair.peer(role)
    message = sample_message(tag)
    # The sender refuses to send it, and nothing changes.
    with pytest.raises(fp.LocalProtocolError):
        send_any(sender, message)
    assert state_of(sender) is state
    # The receiver, given the bytes anyway, names the violation and stops.
    receiver.receive_data(fp.codec.encode_frame(message))
    with pytest.raises(fp.UnexpectedMessage) as info:
        receiver.next_event()
    assert info.value.code is fp.ErrorCode.UNEXPECTED_MESSAGE
    assert fp.Error.from_exception(info.value).code == fp.ErrorCode.UNEXPECTED_MESSAGE
    assert state_of(receiver) is State.ERROR
    with pytest.raises(fp.UnexpectedMessage):
        receiver.next_event()
    # In ERROR, only an Error may still be sent.
    with pytest.raises(fp.LocalProtocolError):
        receiver.send(fp.Keepalive())
    receiver.send_error(info.value)
    assert state_of(receiver) is State.MUST_CLOSE


@pytest.mark.parametrize("tag", [T.QUERY_RECOVERY_SERVER])
@pytest.mark.parametrize("recovery_type", [RecoveryType.STANDALONE, RecoveryType.CLUSTER_NODE])
def test_guard_query_needs_broker(tag: MessageTag, recovery_type: RecoveryType) -> None:
    pair = ConnectionPair().walk_to(State.READY, recovery_type=recovery_type)
    with pytest.raises(fp.LocalProtocolError):
        pair.primary.send(sample_message(tag))
    pair.recovery.receive_data(fp.codec.encode_frame(sample_message(tag)))
    with pytest.raises(fp.UnexpectedMessage):
        pair.recovery.next_event()


@pytest.mark.parametrize("tag", [T.RELATIONSHIP_CREATE, T.RELATIONSHIP_OPEN])
def test_guard_relationship_not_to_broker(tag: MessageTag) -> None:
    pair = ConnectionPair().walk_to(State.READY, recovery_type=RecoveryType.CLUSTERING_BROKER)
    with pytest.raises(fp.LocalProtocolError):
        pair.primary.send(sample_message(tag))
    assert state_of(pair) is State.READY
    pair.recovery.receive_data(fp.codec.encode_frame(sample_message(tag)))
    with pytest.raises(fp.UnexpectedMessage):
        pair.recovery.next_event()


# -- negotiation outcomes ------------------------------------------------------------------


def _assert_closed_for_good(pair: ConnectionPair) -> None:
    assert state_of(pair) is State.MUST_CLOSE
    for conn in (pair.primary, pair.recovery):
        for message in (fp.Keepalive(), fp.Error(fp.ErrorCode.INTERNAL), fp.NegotiateRequest()):
            with pytest.raises(fp.LocalProtocolError):
                conn.send(message)
        assert state_of(conn) is State.MUST_CLOSE
    with pytest.raises(fp.LocalProtocolError):
        pair.primary.send(fp.RelationshipOpen(DEFAULT_VMID))
    # The peer's end of stream is still a clean close.
    pair.primary.receive_data(b"")
    assert pair.primary.next_event() == fp.ConnectionClosed()
    assert state_of(pair.primary) is State.CLOSED


@pytest.mark.parametrize("major", [0, 2, 255])
def test_mismatched_major(major: int) -> None:
    pair = ConnectionPair()
    request = fp.NegotiateRequest(version=(major, 3))
    pair.send(P, request)
    response = fp.answer_negotiation(
        request, fp.ServerPolicy(fp.RecoveryType.STANDALONE, "r.example")
    )
    assert response.verdict is fp.VersionVerdict.MISMATCH
    assert response.status == fp.ErrorCode.PROTOCOL_MISMATCH
    assert not response.ok
    pair.send(R, response)
    _assert_closed_for_good(pair)


@pytest.mark.parametrize(
    "status", [fp.ErrorCode.NOT_AUTHORIZED, fp.ErrorCode.NOT_SUPPORTED, fp.ErrorCode.BUSY, 4242]
)
def test_non_ok_status(status: int) -> None:
    pair = ConnectionPair().walk_to(State.NEGOTIATING)
    pair.send(R, fp.NegotiateResponse(status=status, server_name="r.example"))
    _assert_closed_for_good(pair)


def test_mismatch_verdict_with_ok_status_still_closes() -> None:
    pair = ConnectionPair().walk_to(State.NEGOTIATING)
    pair.send(R, fp.NegotiateResponse(verdict=fp.VersionVerdict.MISMATCH, server_name="r.example"))
    _assert_closed_for_good(pair)


def test_end_of_stream_moves_receiver_to_closed() -> None:
    pair = ConnectionPair().walk_to(State.SESSION)
    pair.recovery.receive_data(b"")
    assert drain(pair.recovery) == [fp.ConnectionClosed()]
    assert state_of(pair.recovery) is State.CLOSED
    for message in (fp.Keepalive(), fp.Error(fp.ErrorCode.INTERNAL)):
        with pytest.raises(fp.LocalProtocolError):
            pair.recovery.send(message)
