"""Round trips: every message through encode/decode_frame and through a Connection pair."""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import frproto as fp
from frproto import Role, State

from . import strategies as fs
from .pair import DEFAULT_DISKS, DEFAULT_VMID, ConnectionPair, drain, state_of

ALL_CLASSES = sorted(fs.MESSAGE_STRATEGIES, key=lambda c: c.TAG)


def test_strategies_cover_every_message_class() -> None:
    assert set(fs.MESSAGE_STRATEGIES) == set(fp.codec.MESSAGE_CLASSES.values())


# -- stateless frames ----------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=60)
@given(data=st.data())
def test_frame_roundtrip(cls: type[fp.Message], data: st.DataObject) -> None:
    message = data.draw(fs.MESSAGE_STRATEGIES[cls])
    frame = fp.codec.encode_frame(message)
    decoded = fp.codec.decode_frame(frame)
    assert type(decoded) is cls
    assert decoded == message
    # The envelope describes the frame exactly.
    reserved, tag, length = fp.codec.ENVELOPE.unpack_from(frame)
    assert (reserved, tag, length) == (0, cls.TAG, len(frame) - fp.limits.ENVELOPE_SIZE)
    if not isinstance(message, fp.Chunk):
        # A second round trip gives the same bytes (the encoding is canonical).
        assert fp.codec.encode_frame(decoded) == frame
        assert fp.Connection(Role.RECOVERY).frame_size(frame[:8]) == len(frame)


@settings(max_examples=50)
@given(fs.chunks(zero=True))
def test_zero_chunk_frame_has_no_payload(chunk: fp.Chunk) -> None:
    frame = fp.codec.encode_frame(chunk)
    assert len(frame) == fp.limits.ENVELOPE_SIZE + fp.limits.CHUNK_HEADER_SIZE
    decoded = fp.codec.decode_frame(frame)
    assert isinstance(decoded, fp.Chunk)
    assert decoded.is_zero
    assert decoded.length == chunk.length
    assert bytes(decoded.data) == b""


@settings(max_examples=50)
@given(fs.messages())
def test_frame_roundtrip_any_message_and_truncations(message: fp.Message) -> None:
    frame = fp.codec.encode_frame(message)
    assert fp.codec.decode_frame(frame) == message
    with pytest.raises(fp.TruncatedFrame):
        fp.codec.decode_frame(frame[:-1])
    with pytest.raises(fp.TrailingBytes):
        fp.codec.decode_frame(frame + b"\0")


# -- through a connection pair -------------------------------------------------------------


def _fresh(rng: random.Random) -> ConnectionPair:
    return ConnectionPair(rng)


@settings(max_examples=40)
@given(st.randoms(use_true_random=False), fs.negotiate_requests())
def test_pair_negotiate_request(rng: random.Random, message: fp.NegotiateRequest) -> None:
    pair = _fresh(rng)
    assert pair.send(Role.PRIMARY, message) == message
    assert state_of(pair) is State.NEGOTIATING


@settings(max_examples=40)
@given(st.randoms(use_true_random=False), fs.negotiate_responses())
def test_pair_negotiate_response(rng: random.Random, message: fp.NegotiateResponse) -> None:
    pair = _fresh(rng).walk_to(State.NEGOTIATING)
    if message.verdict is fp.VersionVerdict.COMPATIBLE:
        # A compatible answer may only choose among what the pair's default offer holds.
        message = replace(
            message,
            version=fp.limits.PROTOCOL_VERSION,
            encryption=fp.Encryption.TLS13,
            auth_type=fp.AuthType.CERTIFICATE,
        )
    pair.send(Role.RECOVERY, message)
    assert pair.primary.negotiated == pair.recovery.negotiated == message
    assert state_of(pair) is (State.READY if message.ok else State.MUST_CLOSE)
    assert pair.primary.recovery_type is message.recovery_type
    # A refused negotiation leaves nothing to compress.
    expected = message.compression if message.ok else fp.Compression.NONE
    assert pair.primary.compression is expected


@settings(max_examples=40)
@given(
    st.randoms(use_true_random=False),
    fs.query_recovery_servers(),
    fs.query_recovery_server_responses(),
)
def test_pair_query(
    rng: random.Random,
    query: fp.QueryRecoveryServer,
    response: fp.QueryRecoveryServerResponse,
) -> None:
    pair = _fresh(rng).walk_to(State.READY, recovery_type=fp.RecoveryType.CLUSTERING_BROKER)
    pair.send(Role.PRIMARY, query)
    assert state_of(pair) is State.QUERYING
    pair.send(Role.RECOVERY, replace(response, vmid=query.vmid))
    assert state_of(pair) is State.READY


@settings(max_examples=40)
@given(
    st.randoms(use_true_random=False),
    fs.errors(),
    st.sampled_from([State.READY, State.SESSION, State.IR, State.NEGOTIATING, State.IDLE]),
    st.sampled_from(Role),
)
def test_pair_fatal_error(rng: random.Random, error: fp.Error, state: State, role: Role) -> None:
    pair = _fresh(rng).walk_to(state)
    pair.send(role, error)
    assert state_of(pair) is State.MUST_CLOSE


@settings(max_examples=40)
@given(
    st.randoms(use_true_random=False),
    fs.errors(),
    st.sampled_from(
        [State.OPENING, State.IR_ENDING, State.BATCH_ENDING, State.DIGESTS, State.DELETING]
    ),
)
def test_pair_refusal_error(rng: random.Random, error: fp.Error, state: State) -> None:
    pair = _fresh(rng).walk_to(state)
    pair.send(Role.RECOVERY, error)
    if fp.closes_connection(error.code):  # a protocol-violation code closes even here
        assert state_of(pair) is State.MUST_CLOSE
    else:
        assert state_of(pair) is (State.READY if state is State.OPENING else State.SESSION)


@settings(max_examples=40)
@given(st.randoms(use_true_random=False), fs.keepalives(), st.sampled_from(Role))
def test_pair_keepalive(rng: random.Random, message: fp.Keepalive, role: Role) -> None:
    pair = _fresh(rng).walk_to(State.READY)
    pair.send(role, message)
    assert state_of(pair) is State.READY


@settings(max_examples=40)
@given(st.randoms(use_true_random=False), fs.relationship_creates(), st.data())
def test_pair_relationship_create(
    rng: random.Random, message: fp.RelationshipCreate, data: st.DataObject
) -> None:
    pair = _fresh(rng).walk_to(State.READY)
    pair.send(Role.PRIMARY, message)
    assert state_of(pair) is State.OPENING
    accepted = data.draw(fs.relationship_accepteds(vmid=message.vmid))
    pair.send(Role.RECOVERY, accepted)
    assert state_of(pair) is State.SESSION
    assert pair.primary.disks == pair.recovery.disks == accepted.disks


@settings(max_examples=40)
@given(st.randoms(use_true_random=False), fs.relationship_opens(), st.data())
def test_pair_relationship_open_in_session(
    rng: random.Random, message: fp.RelationshipOpen, data: st.DataObject
) -> None:
    pair = _fresh(rng).walk_to(State.SESSION)
    pair.send(Role.PRIMARY, message)
    assert state_of(pair) is State.OPENING
    assert pair.primary.vmid is None
    accepted = data.draw(fs.relationship_accepteds(vmid=message.vmid))
    pair.send(Role.RECOVERY, accepted)
    assert pair.primary.vmid == pair.recovery.vmid == message.vmid


@settings(max_examples=40)
@given(st.randoms(use_true_random=False), fs.vmids(), fs.disk_lists(min_size=4096), st.data())
def test_pair_ir(
    rng: random.Random,
    vmid: uuid.UUID,
    disks: tuple[fp.DiskInfo, ...],
    data: st.DataObject,
) -> None:
    pair = _fresh(rng).walk_to(State.SESSION, vmid=vmid, disks=disks)
    begin = data.draw(fs.ir_begins(vmid=vmid, disks=disks))
    pair.send(Role.PRIMARY, begin)
    assert state_of(pair) is State.IR
    for _ in range(data.draw(st.integers(0, 3))):
        index = data.draw(st.integers(0, len(disks) - 1))
        payload = data.draw(fs.chunk_data())[: disks[index].size]
        offset = data.draw(st.integers(0, disks[index].size - len(payload)))
        pair.send_chunk(index, offset, payload)
    assert pair.recovery.chunk_count == pair.primary.chunk_count
    pair.end_ir(begin.sequence)
    assert state_of(pair) is State.IR_ENDING
    pair.send(Role.RECOVERY, fp.Ack(vmid, fp.AckKind.IR_COMPLETE, begin.sequence))
    assert state_of(pair) is State.SESSION


@settings(max_examples=40)
@given(st.randoms(use_true_random=False), st.data())
def test_pair_batch(rng: random.Random, data: st.DataObject) -> None:
    pair = _fresh(rng).walk_to(State.SESSION)
    begin = data.draw(fs.batch_begins(vmid=DEFAULT_VMID, max_chunks=4))
    pair.send(Role.PRIMARY, begin)
    assert state_of(pair) is State.BATCH
    for i in range(begin.chunk_count):
        chunk = data.draw(fs.chunk_data())[:4096]
        pair.send_chunk(0, 4096 * i, chunk)
    pair.end_batch(begin.sequence)
    assert state_of(pair) is State.BATCH_ENDING
    pair.send(Role.RECOVERY, fp.Ack(DEFAULT_VMID, fp.AckKind.BATCH_APPLIED, begin.sequence))
    assert state_of(pair) is State.SESSION


@settings(max_examples=40)
@given(st.randoms(use_true_random=False), fs.disk_lists(), st.data())
def test_pair_digest_map(
    rng: random.Random, disks: tuple[fp.DiskInfo, ...], data: st.DataObject
) -> None:
    pair = _fresh(rng).walk_to(State.SESSION, disks=disks)
    request = data.draw(fs.digest_map_requests(vmid=DEFAULT_VMID, disks=disks, max_blocks=300))
    pair.send(Role.PRIMARY, request)
    assert state_of(pair) is State.DIGESTS
    left = disks[request.disk_index].size - request.offset
    count = min(request.block_count, (left + request.block_size - 1) // request.block_size)
    blob = data.draw(st.binary(min_size=16 * count, max_size=16 * count))
    answer = fp.DigestMap(
        DEFAULT_VMID, request.disk_index, request.block_size, request.offset, blob
    )
    pair.send(Role.RECOVERY, answer)
    assert state_of(pair) is State.SESSION


@settings(max_examples=40)
@given(
    st.randoms(use_true_random=False),
    fs.vmids(),
    fs.disk_lists(min_size=4096),
    fs.relationship_creates(),
    st.data(),
)
def test_pair_relationship_delete(
    rng: random.Random,
    vmid: uuid.UUID,
    disks: tuple[fp.DiskInfo, ...],
    create: fp.RelationshipCreate,
    data: st.DataObject,
) -> None:
    pair = _fresh(rng).walk_to(State.SESSION, vmid=vmid, disks=disks)
    pair.send(Role.PRIMARY, fp.RelationshipDelete(vmid))
    assert state_of(pair) is State.DELETING
    pair.send(Role.RECOVERY, fp.Ack(vmid, fp.AckKind.RELATIONSHIP_DELETED, 0))
    assert state_of(pair) is State.READY
    assert pair.primary.vmid is pair.recovery.vmid is None
    # A new relationship may follow on the same connection (the same VM or another).
    pair.send(Role.PRIMARY, create)
    accepted = data.draw(fs.relationship_accepteds(vmid=create.vmid))
    pair.send(Role.RECOVERY, accepted)
    assert state_of(pair) is State.SESSION
    assert pair.primary.vmid == pair.recovery.vmid == create.vmid


# -- chunks through a pair -----------------------------------------------------------------

_BIG_DISKS = (fp.DiskInfo("big", 1 << 40),)


def _ir_pair(rng: random.Random | None, compression: fp.Compression) -> ConnectionPair:
    pair = ConnectionPair(rng).walk_to(State.SESSION, compression=compression, disks=_BIG_DISKS)
    pair.send(Role.PRIMARY, fp.IRBegin(DEFAULT_VMID))
    return pair


@settings(max_examples=40)
@given(st.randoms(use_true_random=False), fs.random_data(65536), st.integers(0, 1 << 30))
def test_chunk_random_data(rng: random.Random, data: bytes, offset: int) -> None:
    pair = _ir_pair(rng, fp.Compression.NONE)
    pieces = pair.primary.send_chunk(0, offset, data)
    assert pieces[1] is data
    events = pair.deliver(pair.recovery, pieces)
    assert len(events) == 1
    chunk = events[0]
    assert isinstance(chunk, fp.Chunk)
    assert bytes(chunk.data) == data
    assert chunk.digest == fp.codec.chunk_digest(data)
    assert chunk.flags is fp.ChunkFlags.NONE


@settings(max_examples=40)
@given(st.randoms(use_true_random=False), fs.zero_lengths(), st.sampled_from(fp.Compression))
def test_chunk_zero_data(rng: random.Random, length: int, compression: fp.Compression) -> None:
    pair = _ir_pair(rng, compression)
    data = bytes(length)
    pieces = pair.primary.send_chunk(0, 0, data)
    assert len(pieces) == 1  # ZERO: the payload is not sent at all
    assert len(pieces[0]) == fp.limits.ENVELOPE_SIZE + fp.limits.CHUNK_HEADER_SIZE
    chunk = pair.deliver(pair.recovery, pieces)[0]
    assert isinstance(chunk, fp.Chunk)
    assert chunk.is_zero
    assert chunk.length == length
    assert bytes(chunk.data) == b""
    assert chunk.digest == fp.codec.zero_digest(length) == fp.codec.chunk_digest(data)


@pytest.mark.parametrize("compression", [fp.Compression.ZSTD, fp.Compression.LZ4])
@settings(max_examples=30)
@given(rng=st.randoms(use_true_random=False), data=fs.compressible_data())
def test_chunk_compressed(rng: random.Random, data: bytes, compression: fp.Compression) -> None:
    pair = _ir_pair(rng, compression)
    assert pair.primary.compression is pair.recovery.compression is compression
    pieces = pair.primary.send_chunk(0, 0, data)
    assert len(pieces) == 2
    assert pieces[1] is not data
    assert len(pieces[1]) < len(data)
    flag = fp.ChunkFlags.ZSTD if compression is fp.Compression.ZSTD else fp.ChunkFlags.LZ4
    head = pieces[0]
    assert isinstance(head, bytes)
    assert fp.codec.CHUNK_FRAME_HEADER.unpack(head)[4] == flag
    chunk = pair.deliver(pair.recovery, pieces)[0]
    assert isinstance(chunk, fp.Chunk)
    assert chunk.flags is flag
    assert bytes(chunk.data) == data
    assert chunk.length == len(data)


# -- random split points -------------------------------------------------------------------


def _ir_transcript(payloads: list[bytes], compression: fp.Compression) -> bytes:
    """The primary's bytes for an IR of ``payloads`` with keepalives between."""
    pair = ConnectionPair().walk_to(State.SESSION, compression=compression, disks=_BIG_DISKS)
    out = [pair.primary.send(fp.IRBegin(DEFAULT_VMID, 5))]
    for i, payload in enumerate(payloads):
        out.extend(bytes(p) for p in pair.primary.send_chunk(0, i * 65536, payload))
        out.append(pair.primary.send(fp.Keepalive(i)))
    out.append(
        pair.primary.send(
            fp.IREnd(DEFAULT_VMID, 5, pair.primary.chunk_count, pair.primary.aggregate_digest)
        )
    )
    return b"".join(out)


def _receive(stream: list[bytes], compression: fp.Compression) -> tuple[list[fp.Event], State]:
    pair = ConnectionPair().walk_to(State.SESSION, compression=compression, disks=_BIG_DISKS)
    events: list[fp.Event] = []
    for piece in stream:
        pair.recovery.receive_data(piece)
        events.extend(drain(pair.recovery))
    return events, pair.recovery.state


@settings(max_examples=40)
@given(
    st.lists(fs.chunk_data(), min_size=1, max_size=6),
    st.sampled_from(fp.Compression),
    st.lists(st.integers(1, 200), min_size=1, max_size=60),
)
def test_random_split_points_give_same_events(
    payloads: list[bytes], compression: fp.Compression, sizes: list[int]
) -> None:
    stream = _ir_transcript(payloads, compression)
    whole, whole_state = _receive([stream], compression)
    pieces = []
    pos = 0
    i = 0
    while pos < len(stream):
        size = sizes[i % len(sizes)] if i < len(sizes) else len(stream)
        pieces.append(stream[pos : pos + size])
        pos += size
        i += 1
    split, split_state = _receive(pieces, compression)
    assert split == whole
    assert whole_state is split_state is State.IR_ENDING
    assert len(whole) == 2 + 2 * len(payloads)
    for event, payload in zip(whole[1::2], payloads, strict=False):
        assert isinstance(event, fp.Chunk)
        data = bytes(event.length) if event.is_zero else bytes(event.data)
        assert data == payload


class _OneByte(ConnectionPair):
    """A pair that feeds every frame one byte per ``receive_data`` call."""

    def deliver(
        self, receiver: fp.Connection, pieces: Sequence[bytes | bytearray | memoryview]
    ) -> list[fp.Event]:
        events: list[fp.Event] = []
        for piece in pieces:
            raw = bytes(piece)
            for i in range(len(raw)):
                receiver.receive_data(raw[i : i + 1])
                events.extend(drain(receiver))
        return events


@pytest.mark.parametrize("target", [State.BATCH_ENDING, State.IR_ENDING, State.DIGESTS])
def test_byte_at_a_time_conversation(target: State) -> None:
    whole = ConnectionPair().walk_to(target)
    one = _OneByte().walk_to(target)
    assert state_of(one) is state_of(whole) is target
    assert one.recovery.aggregate_digest == whole.recovery.aggregate_digest
    assert one.recovery.chunk_count == whole.recovery.chunk_count
    assert one.recovery.disks == whole.recovery.disks == DEFAULT_DISKS
