"""The connection state table: what may come when.

Theory of operation
-------------------
A connection is request/response, so both ends walk the *same* state machine: a single
``State`` per connection, and a table that says, for each state, which role may send
which message and where that leads. Two rules, taken from h11:

1. Everything that decides a transition lives in this file.
2. The table is role-agnostic: it names who sends a message (PRIMARY or RECOVERY), not
   who we are. :class:`~frproto.Connection` checks its own sends against the table with
   its own role (an illegal move is a ``LocalProtocolError``) and the peer's messages
   with the peer's role (an ``UnexpectedMessage``, a ``RemoteProtocolError``).

The conversation::

    IDLE --NegotiateRequest(P)--> NEGOTIATING --NegotiateResponse(R)--> READY
      (a response with a mismatch verdict or a non-OK status leads to MUST_CLOSE)
    READY --QueryRecoveryServer(P)--> QUERYING --QueryRecoveryServerResponse(R)--> READY
    READY/SESSION --RelationshipCreate|Open(P)--> OPENING --RelationshipAccepted(R)--> SESSION
    SESSION --IRBegin(P)--> IR --Chunk(P)*--> IR --IREnd(P)--> IR_ENDING --Ack(R)--> SESSION
    SESSION --BatchBegin(P)--> BATCH --Chunk(P)*--> BATCH --BatchEnd(P)--> BATCH_ENDING
        --Ack(R)--> SESSION
    SESSION --DigestMapRequest(P)--> DIGESTS --DigestMap(R)--> SESSION
    SESSION --RelationshipDelete(P)--> DELETING --Ack(R)--> READY
    SESSION --FailoverRequest(P)--> FAILING_OVER --FailoverDone(R)--> READY   (1.1)
    OPENING --FailoverAsk(R)--> OPENING                                       (1.1)
    SESSION --FailoverDecline(P)--> SESSION                                   (1.1)

An Error from the recovery side in a state that awaits its answer (QUERYING, OPENING,
IR_ENDING, BATCH_ENDING, DIGESTS, DELETING, FAILING_OVER) is a refusal, unless its code is one that
closes the connection (a protocol violation, 100 and up, or PROTOCOL_MISMATCH): the
connection goes back to READY (a refused query or open) or SESSION (a refused IR end,
batch end, digest map, delete or failover) and may carry on. Any other Error, from either side,
leads to MUST_CLOSE. Keepalive may come from either side in any state between READY and
the end of a session, and changes nothing.

Guards, which depend on what the negotiation said: QueryRecoveryServer only to a
clustering broker; relationship messages only to a stand-alone server or cluster node;
a message of a minor version above the negotiated one never (NEG-13, NEG-14).

``docs/protocol.md`` draws the same diagrams; ``tests/frproto/test_state_table.py`` walks every
(state, role, tag) triple against this table.
"""

from __future__ import annotations

import enum
from typing import Final

from ._enums import TAG_MINOR, MessageTag, RecoveryType, Role
from ._errors import closes_connection

T = MessageTag
P = Role.PRIMARY
R = Role.RECOVERY


class State(enum.Enum):
    """Where a connection is in the conversation."""

    IDLE = "IDLE"
    NEGOTIATING = "NEGOTIATING"
    READY = "READY"
    QUERYING = "QUERYING"
    OPENING = "OPENING"
    SESSION = "SESSION"
    IR = "IR"
    IR_ENDING = "IR_ENDING"
    BATCH = "BATCH"
    BATCH_ENDING = "BATCH_ENDING"
    DIGESTS = "DIGESTS"
    #: RelationshipDelete sent; awaiting the Ack (RELATIONSHIP_DELETED) or a refusal.
    DELETING = "DELETING"
    #: FailoverRequest sent (1.1); awaiting FailoverDone or a refusal.
    FAILING_OVER = "FAILING_OVER"
    #: The conversation is over (a refused negotiation or a fatal Error); only close.
    MUST_CLOSE = "MUST_CLOSE"
    #: The peer closed its side (end of stream).
    CLOSED = "CLOSED"
    #: A protocol violation happened; the only thing left to send is an Error.
    ERROR = "ERROR"


S = State

#: (state, sender role, tag) -> next state. Everything not here is illegal.
TRANSITIONS: Final[dict[tuple[State, Role, MessageTag], State]] = {
    (S.IDLE, P, T.NEGOTIATE_REQUEST): S.NEGOTIATING,
    (S.NEGOTIATING, R, T.NEGOTIATE_RESPONSE): S.READY,
    (S.READY, P, T.QUERY_RECOVERY_SERVER): S.QUERYING,
    (S.QUERYING, R, T.QUERY_RECOVERY_SERVER_RESPONSE): S.READY,
    (S.READY, P, T.RELATIONSHIP_CREATE): S.OPENING,
    (S.READY, P, T.RELATIONSHIP_OPEN): S.OPENING,
    (S.SESSION, P, T.RELATIONSHIP_CREATE): S.OPENING,
    (S.SESSION, P, T.RELATIONSHIP_OPEN): S.OPENING,
    (S.OPENING, R, T.RELATIONSHIP_ACCEPTED): S.SESSION,
    (S.SESSION, P, T.IR_BEGIN): S.IR,
    (S.IR, P, T.CHUNK): S.IR,
    (S.IR, P, T.IR_END): S.IR_ENDING,
    (S.IR_ENDING, R, T.ACK): S.SESSION,
    (S.SESSION, P, T.BATCH_BEGIN): S.BATCH,
    (S.BATCH, P, T.CHUNK): S.BATCH,
    (S.BATCH, P, T.BATCH_END): S.BATCH_ENDING,
    (S.BATCH_ENDING, R, T.ACK): S.SESSION,
    (S.SESSION, P, T.DIGEST_MAP_REQUEST): S.DIGESTS,
    (S.DIGESTS, R, T.DIGEST_MAP): S.SESSION,
    (S.SESSION, P, T.RELATIONSHIP_DELETE): S.DELETING,
    (S.DELETING, R, T.ACK): S.READY,
    (S.SESSION, P, T.FAILOVER_REQUEST): S.FAILING_OVER,
    (S.FAILING_OVER, R, T.FAILOVER_DONE): S.READY,
    (S.OPENING, R, T.FAILOVER_ASK): S.OPENING,
    (S.SESSION, P, T.FAILOVER_DECLINE): S.SESSION,
}

#: States in which an Error from the recovery side is a refusal, and where it leads.
REFUSAL_RETURNS: Final[dict[State, State]] = {
    S.QUERYING: S.READY,
    S.OPENING: S.READY,
    S.IR_ENDING: S.SESSION,
    S.BATCH_ENDING: S.SESSION,
    S.DIGESTS: S.SESSION,
    S.DELETING: S.SESSION,
    S.FAILING_OVER: S.SESSION,
}

#: States in which either side may send a Keepalive.
KEEPALIVE_STATES: Final = frozenset(
    {
        S.READY,
        S.QUERYING,
        S.OPENING,
        S.SESSION,
        S.IR,
        S.IR_ENDING,
        S.BATCH,
        S.BATCH_ENDING,
        S.DIGESTS,
        S.DELETING,
        S.FAILING_OVER,
    }
)

#: States after which nothing more may be sent but an Error (ERROR) or nothing (others).
TERMINAL_STATES: Final = frozenset({S.MUST_CLOSE, S.CLOSED, S.ERROR})

_BROKER_ONLY: Final = frozenset({T.QUERY_RECOVERY_SERVER})
_REPLICA_ONLY: Final = frozenset({T.RELATIONSHIP_CREATE, T.RELATIONSHIP_OPEN})


class IllegalTransition(Exception):
    """Internal: a message not allowed here. The connection turns it into the right error."""


def error_outcome(state: State, sender: Role, code: int) -> State:
    """The state after ``sender`` sends an Error with ``code`` in ``state`` (legal there)."""
    if sender is R and state in REFUSAL_RETURNS and not closes_connection(code):
        return REFUSAL_RETURNS[state]
    return S.MUST_CLOSE


def next_state(
    state: State,
    sender: Role,
    tag: MessageTag,
    recovery_type: RecoveryType | None,
    *,
    error_code: int | None = None,
    version_minor: int | None = None,
) -> State:
    """The state after ``sender`` sends a message with ``tag`` in ``state``.

    For an Error, ``error_code`` decides refusal or close (see :func:`error_outcome`);
    ``None`` (the code is not decoded yet) answers as for a refusal code.
    ``version_minor`` is the negotiated minor version: a message that a later minor
    version brought is illegal (NEG-13, NEG-14); ``None`` checks nothing of it.

    Raises:
        IllegalTransition: the table (or a guard) does not allow it.
    """
    if tag is T.ERROR:
        if state in (S.CLOSED, S.MUST_CLOSE):
            raise IllegalTransition(f"no Error may be sent in {state.name}")
        return error_outcome(state, sender, 0 if error_code is None else error_code)
    if tag is T.KEEPALIVE:
        if state in KEEPALIVE_STATES:
            return state
        raise IllegalTransition(f"Keepalive in {state.name}")
    found = TRANSITIONS.get((state, sender, tag))
    if found is None:
        raise IllegalTransition(f"{tag.name} from the {sender.value} side in state {state.name}")
    if tag in _BROKER_ONLY and recovery_type is not RecoveryType.CLUSTERING_BROKER:
        raise IllegalTransition(f"{tag.name} is only for a clustering broker")
    if tag in _REPLICA_ONLY and recovery_type is RecoveryType.CLUSTERING_BROKER:
        raise IllegalTransition(f"{tag.name} cannot go to a clustering broker")
    minor = TAG_MINOR.get(tag, 0)
    if version_minor is not None and minor > version_minor:
        raise IllegalTransition(
            f"{tag.name} is a version 1.{minor} message; the connection is at 1.{version_minor}"
        )
    return found
