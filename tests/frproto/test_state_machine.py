"""A stateful test: a primary and a recovery Connection through whole conversations.

Hypothesis picks the moves (negotiate, broker query, relationship create/open/delete, IR
with chunks, delta batches, digest maps, refusals, keepalives, illegal sends) and the byte
split points; a model of the conversation says what must happen, and every step checks
that both ends agree with it.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import frproto as fp
from frproto import Role, State
from frproto._state import IllegalTransition, next_state

from . import strategies as fs
from .pair import ConnectionPair, send_any

P, R = Role.PRIMARY, Role.RECOVERY
REFUSAL_CODES = [
    fp.ErrorCode.NOT_AUTHORIZED,
    fp.ErrorCode.VM_NOT_HERE,
    fp.ErrorCode.UNKNOWN_VM,
    fp.ErrorCode.OUT_OF_SEQUENCE,
    fp.ErrorCode.BUSY,
    fp.ErrorCode.EXISTS,
    fp.ErrorCode.NO_SPACE,
]
SESSION_DISKS = fs.disk_lists(max_disks=4, min_size=4096)
KEEPALIVE_STATES = {
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
}
#: States that await the recovery side's answer (an Error there may be a refusal).
AWAITING = (
    State.QUERYING,
    State.OPENING,
    State.IR_ENDING,
    State.BATCH_ENDING,
    State.DIGESTS,
    State.DELETING,
)


class Conversation(RuleBasedStateMachine):
    """Model: the expected state, plus what the session needs to build valid messages."""

    def __init__(self) -> None:
        super().__init__()
        self.pair = ConnectionPair()
        self.state = State.IDLE
        self.recovery_type: fp.RecoveryType | None = None
        self.pending_vmid: uuid.UUID | None = None
        self.vmid: uuid.UUID | None = None
        self.disks: tuple[fp.DiskInfo, ...] = ()
        self.sequence = 0
        self.declared: int | None = None
        self.sent_chunks = 0
        self.request: fp.DigestMapRequest | None = None
        self.received = 0

    @initialize(rng=st.randoms(use_true_random=False), split=st.booleans())
    def setup(self, rng: random.Random, split: bool) -> None:
        self.pair.rng = rng if split else None

    def send(self, role: Role, message: fp.Message) -> None:
        self.pair.send(role, message)  # asserts the peer got an equal message
        self.received += 1

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def same_state(self) -> None:
        assert self.pair.primary.state is self.pair.recovery.state is self.state
        assert self.pair.primary.vmid == self.pair.recovery.vmid
        assert self.pair.primary.chunk_count == self.pair.recovery.chunk_count
        assert self.pair.primary.aggregate_digest == self.pair.recovery.aggregate_digest

    # -- negotiation and the broker ----------------------------------------------------------

    @precondition(lambda self: self.state is State.IDLE)
    @rule(
        recovery_type=st.sampled_from(fp.RecoveryType),
        compression=st.sampled_from(fp.Compression),
        name=fs.server_names(),
    )
    def negotiate(
        self, recovery_type: fp.RecoveryType, compression: fp.Compression, name: str
    ) -> None:
        request = fp.NegotiateRequest()
        self.send(P, request)
        assert self.pair.state is State.NEGOTIATING
        policy = fp.ServerPolicy(
            recovery_type, name, compression=(compression,) if compression else ()
        )
        response = fp.answer_negotiation(request, policy)
        assert response.ok
        self.send(R, response)
        self.state = State.READY
        self.recovery_type = recovery_type
        assert self.pair.primary.compression is compression

    @precondition(
        lambda self: (
            self.state is State.READY and self.recovery_type is fp.RecoveryType.CLUSTERING_BROKER
        )
    )
    @rule(query=fs.query_recovery_servers(), response=fs.query_recovery_server_responses())
    def query(
        self, query: fp.QueryRecoveryServer, response: fp.QueryRecoveryServerResponse
    ) -> None:
        self.send(P, query)
        self.state = State.QUERYING
        self.same_state()
        # The broker answers about the VM asked for (the primary checks that).
        self.send(R, replace(response, vmid=query.vmid))
        self.state = State.READY

    # -- relationships ---------------------------------------------------------------------

    def _replica(self) -> bool:
        return self.recovery_type not in (None, fp.RecoveryType.CLUSTERING_BROKER)

    @precondition(lambda self: self.state in (State.READY, State.SESSION) and self._replica())
    @rule(vmid=fs.vmids(), create=st.booleans(), name=fs.vm_names(), disks=SESSION_DISKS)
    def open_relationship(
        self, vmid: uuid.UUID, create: bool, name: str, disks: tuple[fp.DiskInfo, ...]
    ) -> None:
        message: fp.Message = (
            fp.RelationshipCreate(vmid, name, disks) if create else fp.RelationshipOpen(vmid)
        )
        self.send(P, message)
        self.state = State.OPENING
        self.pending_vmid = vmid
        self.vmid, self.disks = None, ()

    @precondition(lambda self: self.state is State.OPENING)
    @rule(disks=SESSION_DISKS, data=st.data())
    def accept(self, disks: tuple[fp.DiskInfo, ...], data: st.DataObject) -> None:
        assert self.pending_vmid is not None
        accepted = data.draw(fs.relationship_accepteds(vmid=self.pending_vmid, disks=disks))
        self.send(R, accepted)
        self.state = State.SESSION
        self.vmid, self.disks = self.pending_vmid, disks
        assert self.pair.primary.disks == disks

    # -- refusals and fatal errors -----------------------------------------------------------

    @precondition(lambda self: self.state in AWAITING)
    @rule(code=st.sampled_from(REFUSAL_CODES), text=fs.error_texts())
    def refuse(self, code: fp.ErrorCode, text: str) -> None:
        error = fp.Error(code, text)
        self.send(R, error)
        back = fp.error_from_message(error)
        assert isinstance(back, fp.ReplicationError)
        assert back.code is code
        if self.state in (State.QUERYING, State.OPENING):
            self.state = State.READY
            if self.vmid is None:
                self.vmid, self.disks = None, ()
        else:
            self.state = State.SESSION
        self.request = None

    # It ends the conversation, so only once a good part of one has happened.
    @precondition(
        lambda self: self.state not in (State.MUST_CLOSE, State.IDLE) and self.received >= 25
    )
    @rule(role=st.sampled_from(Role), error=fs.errors())
    def fatal_error(self, role: Role, error: fp.Error) -> None:
        refusal = role is R and self.state in AWAITING
        if refusal and not fp.closes_connection(error.code):
            return  # a refusal, not fatal: the refuse rule covers it
        self.send(role, error)
        self.state = State.MUST_CLOSE

    # -- keepalives ------------------------------------------------------------------------

    @precondition(lambda self: self.state in KEEPALIVE_STATES)
    @rule(role=st.sampled_from(Role), message=fs.keepalives())
    def keepalive(self, role: Role, message: fp.Keepalive) -> None:
        self.send(role, message)

    # -- IR --------------------------------------------------------------------------------

    @precondition(lambda self: self.state is State.SESSION)
    @rule(data=st.data())
    def ir_begin(self, data: st.DataObject) -> None:
        assert self.vmid is not None
        begin = data.draw(fs.ir_begins(vmid=self.vmid, disks=self.disks))
        self.send(P, begin)
        self.state = State.IR
        self.sequence, self.declared, self.sent_chunks = begin.sequence, None, 0

    @precondition(
        lambda self: (
            self.state is State.IR
            or (self.state is State.BATCH and self.sent_chunks < (self.declared or 0))
        )
    )
    @rule(data=st.data(), payload=fs.chunk_data(), compress=st.booleans())
    def chunk(self, data: st.DataObject, payload: bytes, compress: bool) -> None:
        index = data.draw(st.integers(0, len(self.disks) - 1))
        size = self.disks[index].size
        payload = payload[:size]
        offset = data.draw(st.integers(0, size - len(payload)))
        chunk = self.pair.send_chunk(index, offset, payload, compress_data=compress)
        if not compress:
            assert not chunk.flags & (fp.ChunkFlags.ZSTD | fp.ChunkFlags.LZ4)
        self.sent_chunks += 1
        self.received += 1

    @precondition(lambda self: self.state is State.IR)
    @rule()
    def ir_end(self) -> None:
        self.pair.end_ir(self.sequence)
        self.state = State.IR_ENDING

    @precondition(lambda self: self.state is State.IR_ENDING)
    @rule()
    def ir_ack(self) -> None:
        assert self.vmid is not None
        self.send(R, fp.Ack(self.vmid, fp.AckKind.IR_COMPLETE, self.sequence))
        self.state = State.SESSION

    # -- delta batches ---------------------------------------------------------------------

    @precondition(lambda self: self.state is State.SESSION)
    @rule(data=st.data())
    def batch_begin(self, data: st.DataObject) -> None:
        assert self.vmid is not None
        begin = data.draw(fs.batch_begins(vmid=self.vmid, max_chunks=4))
        self.send(P, begin)
        self.state = State.BATCH
        self.sequence, self.declared, self.sent_chunks = begin.sequence, begin.chunk_count, 0

    @precondition(lambda self: self.state is State.BATCH and self.sent_chunks == self.declared)
    @rule()
    def batch_end(self) -> None:
        self.pair.end_batch(self.sequence)
        self.state = State.BATCH_ENDING

    @precondition(lambda self: self.state is State.BATCH_ENDING)
    @rule()
    def batch_ack(self) -> None:
        assert self.vmid is not None
        self.send(R, fp.Ack(self.vmid, fp.AckKind.BATCH_APPLIED, self.sequence))
        self.state = State.SESSION

    # -- digest maps -----------------------------------------------------------------------

    @precondition(lambda self: self.state is State.SESSION)
    @rule(data=st.data())
    def digest_request(self, data: st.DataObject) -> None:
        assert self.vmid is not None
        request = data.draw(fs.digest_map_requests(vmid=self.vmid, disks=self.disks, max_blocks=40))
        self.send(P, request)
        self.state = State.DIGESTS
        self.request = request

    @precondition(lambda self: self.state is State.DIGESTS)
    @rule(data=st.data())
    def digest_answer(self, data: st.DataObject) -> None:
        request = self.request
        assert request is not None
        left = self.disks[request.disk_index].size - request.offset
        count = min(request.block_count, -(-left // request.block_size))
        blob = data.draw(st.binary(min_size=16 * count, max_size=16 * count))
        answer = fp.DigestMap(
            request.vmid, request.disk_index, request.block_size, request.offset, blob
        )
        self.send(R, answer)
        assert answer.block_count == count
        self.state = State.SESSION
        self.request = None

    # -- deleting the relationship ------------------------------------------------------------

    @precondition(lambda self: self.state is State.SESSION)
    @rule()
    def delete(self) -> None:
        assert self.vmid is not None
        self.send(P, fp.RelationshipDelete(self.vmid))
        self.state = State.DELETING

    @precondition(lambda self: self.state is State.DELETING)
    @rule()
    def delete_ack(self) -> None:
        assert self.vmid is not None
        self.send(R, fp.Ack(self.vmid, fp.AckKind.RELATIONSHIP_DELETED, 0))
        self.state = State.READY
        self.vmid, self.disks = None, ()
        assert self.pair.primary.disks == self.pair.recovery.disks == ()

    # -- illegal sends -----------------------------------------------------------------------

    @rule(role=st.sampled_from(Role), message=fs.messages())
    def illegal_send(self, role: Role, message: fp.Message) -> None:
        try:
            next_state(self.state, role, message.TAG, self.recovery_type)
        except IllegalTransition:
            pass
        else:
            return  # legal here: the other rules cover it
        conn = self.pair.conn(role)
        before = (conn.state, conn.chunk_count, conn.aggregate_digest, conn.vmid)
        with pytest.raises(fp.LocalProtocolError):
            send_any(conn, message)
        assert (conn.state, conn.chunk_count, conn.aggregate_digest, conn.vmid) == before


TestConversation = Conversation.TestCase
TestConversation.settings = settings(
    max_examples=80,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
