"""Focused unit tests of Connection semantics, the error registry and negotiation rules."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import frproto as fp
from frproto import Role, State
from frproto._fields import table_of
from frproto.codec import CHUNK_FRAME_HEADER, ENVELOPE

from . import strategies as fs
from .pair import DEFAULT_DISKS, DEFAULT_VMID, ConnectionPair, drain, send_any, state_of

OTHER_VMID = uuid.UUID("0b7f3c2a-9e41-4d6b-8a5c-7d3e2f1a0c99")
_BIG = (fp.DiskInfo("big", 1 << 40),)


def _ir_pair(
    compression: fp.Compression = fp.Compression.NONE,
    disks: tuple[fp.DiskInfo, ...] = _BIG,
) -> ConnectionPair:
    pair = ConnectionPair().walk_to(State.SESSION, compression=compression, disks=disks)
    pair.send(Role.PRIMARY, fp.IRBegin(DEFAULT_VMID))
    return pair


def _header_fields(header: bytes | bytearray | memoryview) -> tuple[object, ...]:
    return tuple(CHUNK_FRAME_HEADER.unpack(bytes(header)))


# -- send_chunk ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda raw: raw,
        bytearray,
        memoryview,
        lambda raw: memoryview(bytearray(b"xx" + raw))[2:],
    ],
    ids=["bytes", "bytearray", "memoryview", "memoryview-slice"],
)
def test_send_chunk_passes_the_payload_through(
    make: Callable[[bytes], bytes | bytearray | memoryview],
) -> None:
    pair = _ir_pair()
    data = make(bytes(range(1, 256)) * 16)
    pieces = pair.primary.send_chunk(0, 4096, data)
    assert len(pieces) == 2
    assert pieces[1] is data
    fields = _header_fields(pieces[0])
    assert fields[:3] == (0, fp.MessageTag.CHUNK, fp.limits.CHUNK_HEADER_SIZE + len(data))
    assert fields[3:8] == (0, 0, 4096, len(data), fp.codec.chunk_digest(data))
    chunk = pair.deliver(pair.recovery, pieces)[0]
    assert isinstance(chunk, fp.Chunk)
    assert bytes(chunk.data) == bytes(data)


@pytest.mark.parametrize("compression", [fp.Compression.ZSTD, fp.Compression.LZ4])
def test_compression_off_on_request(compression: fp.Compression) -> None:
    pair = _ir_pair(compression)
    data = b"abc" * 5000
    pieces = pair.primary.send_chunk(0, 0, data, compress_data=False)
    assert pieces[1] is data
    assert _header_fields(pieces[0])[4] == fp.ChunkFlags.NONE
    pieces = pair.primary.send_chunk(0, 0, data)
    assert len(pieces[1]) < len(data)
    assert pair.deliver(pair.recovery, pieces)[0] == fp.Chunk(
        0, 0, len(data), fp.codec.chunk_digest(data), data
    )


@pytest.mark.parametrize("compression", [fp.Compression.ZSTD, fp.Compression.LZ4])
@settings(max_examples=20)
@given(data=st.binary(min_size=1, max_size=64).filter(any))
def test_compression_only_when_smaller(data: bytes, compression: fp.Compression) -> None:
    # Short or random data does not shrink: it goes as it is.
    pair = _ir_pair(compression)
    packed = fp.codec.compress(data, compression)
    pieces = pair.primary.send_chunk(0, 0, data)
    if packed is None:
        assert pieces[1] is data
        assert _header_fields(pieces[0])[4] == fp.ChunkFlags.NONE
    else:
        assert len(pieces[1]) < len(data)
    chunk = pair.deliver(pair.recovery, pieces)[0]
    assert isinstance(chunk, fp.Chunk)
    assert bytes(chunk.data) == data


def test_incompressible_data_is_not_compressed() -> None:
    import random

    data = random.Random(7).randbytes(65536)
    for compression in (fp.Compression.ZSTD, fp.Compression.LZ4):
        pair = _ir_pair(compression)
        pieces = pair.primary.send_chunk(0, 0, data)
        assert pieces[1] is data
        assert _header_fields(pieces[0])[4] == fp.ChunkFlags.NONE


_OTHER_FLAG = {
    fp.Compression.NONE: fp.ChunkFlags.ZSTD,
    fp.Compression.ZSTD: fp.ChunkFlags.LZ4,
    fp.Compression.LZ4: fp.ChunkFlags.ZSTD,
}


@pytest.mark.parametrize("negotiated", list(fp.Compression))
def test_chunk_of_a_compression_not_negotiated_is_refused(negotiated: fp.Compression) -> None:
    """CHK-24: a valid chunk compressed with another algorithm than the one negotiated
    (any compressed chunk after NONE) is BAD_VALUE, before it is decompressed."""
    data = b"A" * 4096
    flag = _OTHER_FLAG[negotiated]
    kind = fp.Compression.ZSTD if flag is fp.ChunkFlags.ZSTD else fp.Compression.LZ4
    packed = fp.codec.compress(data, kind)
    assert packed is not None
    digest = fp.codec.chunk_digest(data)
    header = fp.codec.encode_chunk_header(0, 0, len(data), flag, digest, len(packed))
    pair = _ir_pair(negotiated)
    pair.recovery.receive_data(header + packed)
    with pytest.raises(fp.BadValue, match="negotiated"):
        pair.recovery.next_event()
    assert pair.recovery.state is State.ERROR
    # The negotiated one (when there is one) is taken.
    if negotiated is not fp.Compression.NONE:
        packed = fp.codec.compress(data, negotiated)
        assert packed is not None
        own = fp.ChunkFlags.ZSTD if negotiated is fp.Compression.ZSTD else fp.ChunkFlags.LZ4
        pair = _ir_pair(negotiated)
        pair.recovery.receive_data(
            fp.codec.encode_chunk_header(0, 0, len(data), own, digest, len(packed)) + packed
        )
        chunk = pair.recovery.next_event()
        assert isinstance(chunk, fp.Chunk)
        assert bytes(chunk.data) == data


def test_supplied_digest_is_used() -> None:
    pair = _ir_pair()
    data = b"payload" * 100
    right = fp.codec.chunk_digest(data)
    pieces = pair.primary.send_chunk(0, 0, data, digest=right)
    assert _header_fields(pieces[0])[-1] == right
    pair.deliver(pair.recovery, pieces)
    wrong = bytes(16)
    pieces = pair.primary.send_chunk(0, 0, data, digest=wrong)
    assert _header_fields(pieces[0])[-1] == wrong
    assert pair.primary.chunk_count == 2
    with pytest.raises(fp.DigestMismatch) as info:
        pair.deliver(pair.recovery, pieces)
    assert info.value.code is fp.ErrorCode.DIGEST_MISMATCH
    assert state_of(pair.recovery) is State.ERROR


def test_wrong_digest_on_zero_data_is_not_sent_as_zero() -> None:
    pair = _ir_pair()
    data = bytes(4096)
    pieces = pair.primary.send_chunk(0, 0, data, digest=b"\x01" * 16)
    assert len(pieces) == 2
    assert _header_fields(pieces[0])[4] == fp.ChunkFlags.NONE
    with pytest.raises(fp.DigestMismatch):
        pair.deliver(pair.recovery, pieces)


def test_send_chunk_wrong_digest_size_refused() -> None:
    pair = _ir_pair()
    with pytest.raises(fp.LocalProtocolError):
        pair.primary.send_chunk(0, 0, b"abc", digest=b"short")
    assert pair.primary.chunk_count == 0


@pytest.mark.parametrize("length", [1, 4096, 4097, 1 << 20])
def test_zero_detection(length: int) -> None:
    pair = _ir_pair(fp.Compression.ZSTD)
    pieces = pair.primary.send_chunk(0, 0, bytearray(length))
    assert len(pieces) == 1
    assert _header_fields(pieces[0])[4] == fp.ChunkFlags.ZERO
    almost = bytearray(length)
    almost[-1] = 1
    pieces = pair.primary.send_chunk(0, 0, almost)
    assert len(pieces) == 2
    assert _header_fields(pieces[0])[4] != fp.ChunkFlags.ZERO
    events = pair.deliver(pair.recovery, pair.primary.send_chunk(0, 0, bytes(length)))
    chunk = events[0]
    assert isinstance(chunk, fp.Chunk)
    assert chunk.is_zero
    assert chunk.length == length


def test_send_of_a_chunk_message() -> None:
    pair = _ir_pair()
    data = b"0123456789"
    wire = pair.primary.send(fp.Chunk(0, 5, len(data), fp.codec.chunk_digest(data), data))
    assert wire == fp.codec.encode_frame(
        fp.Chunk(0, 5, len(data), fp.codec.chunk_digest(data), data)
    )
    zero = fp.Chunk(0, 0, 512, fp.codec.zero_digest(512), b"", fp.ChunkFlags.ZERO)
    wire += pair.primary.send(zero)
    events = pair.deliver(pair.recovery, [wire])
    assert events == [fp.Chunk(0, 5, len(data), fp.codec.chunk_digest(data), data), zero]


@pytest.mark.parametrize("length", [0, fp.limits.MAX_CHUNK_DATA + 1])
def test_chunk_length_limits_on_send(length: int) -> None:
    pair = _ir_pair()
    with pytest.raises(fp.LocalProtocolError):
        pair.primary.send_chunk(0, 0, b"\x01" * length)
    assert state_of(pair) is State.IR
    assert pair.primary.chunk_count == 0


def test_config_max_chunk_data() -> None:
    pair = ConnectionPair(config=fp.ConnectionConfig(max_chunk_data=4096))
    pair.walk_to(State.SESSION, disks=_BIG)
    pair.send(Role.PRIMARY, fp.IRBegin(DEFAULT_VMID))
    with pytest.raises(fp.LocalProtocolError):
        pair.primary.send_chunk(0, 0, b"\x01" * 4097)
    pair.send_chunk(0, 0, b"\x01" * 4096)
    pair.recovery.receive_data(
        fp.codec.encode_frame(fp.Chunk(0, 0, 4097, bytes(16), b"\x02" * 4097))
    )
    with pytest.raises(fp.FrameTooLarge):
        pair.recovery.next_event()
    with pytest.raises(ValueError, match="max_chunk_data"):
        fp.ConnectionConfig(max_chunk_data=0)
    with pytest.raises(ValueError, match="max_control_body"):
        fp.ConnectionConfig(max_control_body=fp.limits.MAX_CONTROL_BODY + 1)


# -- session checks, on send and on receive -----------------------------------------------


def _refused_both_ways(
    pair: ConnectionPair,
    role: Role,
    message: fp.Message,
    remote: type[fp.RemoteProtocolError],
) -> None:
    """``role`` cannot send ``message``; its peer, given the bytes, raises ``remote``."""
    before = pair.state
    count = pair.primary.chunk_count
    with pytest.raises(fp.LocalProtocolError):
        send_any(pair.conn(role), message)
    assert state_of(pair) is before
    assert pair.primary.chunk_count == count
    receiver = pair.peer(role)
    receiver.receive_data(fp.codec.encode_frame(message))
    with pytest.raises(remote) as info:
        receiver.next_event()
    assert type(info.value) is remote
    assert fp.Error.from_exception(info.value).code == remote.code
    assert state_of(receiver) is State.ERROR


def _chunk(disk_index: int, offset: int, data: bytes) -> fp.Chunk:
    return fp.Chunk(disk_index, offset, len(data), fp.codec.chunk_digest(data), data)


SIZE1 = DEFAULT_DISKS[1].size
P, R = Role.PRIMARY, Role.RECOVERY

SESSION_CASES: list[tuple[str, State, Role, fp.Message, type[fp.RemoteProtocolError]]] = [
    ("IRBegin wrong VMID", State.SESSION, P, fp.IRBegin(OTHER_VMID), fp.UnexpectedMessage),
    (
        "BatchBegin wrong VMID",
        State.SESSION,
        P,
        fp.BatchBegin(OTHER_VMID, 2, 1, 0),
        fp.UnexpectedMessage,
    ),
    (
        "DigestMapRequest wrong VMID",
        State.SESSION,
        P,
        fp.DigestMapRequest(OTHER_VMID, 0, 4096, 0, 1),
        fp.UnexpectedMessage,
    ),
    (
        "IRBegin resumes past the disks",
        State.SESSION,
        P,
        fp.IRBegin(DEFAULT_VMID, start_disk=3),
        fp.ChunkOutOfRange,
    ),
    (
        "IRBegin resumes past a disk's end",
        State.SESSION,
        P,
        fp.IRBegin(DEFAULT_VMID, start_disk=1, start_offset=SIZE1 + 1),
        fp.ChunkOutOfRange,
    ),
    (
        "DigestMapRequest no such disk",
        State.SESSION,
        P,
        fp.DigestMapRequest(DEFAULT_VMID, 2, 4096, 0, 1),
        fp.ChunkOutOfRange,
    ),
    (
        "DigestMapRequest past the end",
        State.SESSION,
        P,
        fp.DigestMapRequest(DEFAULT_VMID, 1, 4096, SIZE1, 1),
        fp.ChunkOutOfRange,
    ),
    (
        "RelationshipAccepted wrong VMID",
        State.OPENING,
        R,
        fp.RelationshipAccepted(OTHER_VMID, DEFAULT_DISKS),
        fp.UnexpectedMessage,
    ),
    ("chunk past disk end", State.IR, P, _chunk(1, SIZE1 - 10, b"x" * 11), fp.ChunkOutOfRange),
    ("chunk for no such disk", State.IR, P, _chunk(2, 0, b"x"), fp.ChunkOutOfRange),
    (
        "IREnd wrong VMID",
        State.IR,
        P,
        fp.IREnd(OTHER_VMID, 0, 1, bytes(16)),
        fp.UnexpectedMessage,
    ),
    (
        "IREnd wrong sequence",
        State.IR,
        P,
        fp.IREnd(DEFAULT_VMID, 1, 1, bytes(16)),
        fp.UnexpectedMessage,
    ),
    ("IREnd wrong count", State.IR, P, fp.IREnd(DEFAULT_VMID, 0, 2, bytes(16)), fp.CountMismatch),
    (
        "IREnd wrong digest",
        State.IR,
        P,
        fp.IREnd(DEFAULT_VMID, 0, 1, bytes(16)),
        fp.DigestMismatch,
    ),
    (
        "BatchEnd wrong count",
        State.BATCH,
        P,
        fp.BatchEnd(DEFAULT_VMID, 1, 1, bytes(16)),
        fp.CountMismatch,
    ),
    (
        "Ack wrong kind after IR",
        State.IR_ENDING,
        R,
        fp.Ack(DEFAULT_VMID, fp.AckKind.BATCH_APPLIED, 0),
        fp.UnexpectedMessage,
    ),
    (
        "Ack wrong sequence after IR",
        State.IR_ENDING,
        R,
        fp.Ack(DEFAULT_VMID, fp.AckKind.IR_COMPLETE, 1),
        fp.UnexpectedMessage,
    ),
    (
        "Ack wrong kind after batch",
        State.BATCH_ENDING,
        R,
        fp.Ack(DEFAULT_VMID, fp.AckKind.IR_COMPLETE, 1),
        fp.UnexpectedMessage,
    ),
    (
        "Ack wrong sequence after batch",
        State.BATCH_ENDING,
        R,
        fp.Ack(DEFAULT_VMID, fp.AckKind.BATCH_APPLIED, 2),
        fp.UnexpectedMessage,
    ),
    (
        "Ack wrong VMID",
        State.BATCH_ENDING,
        R,
        fp.Ack(OTHER_VMID, fp.AckKind.BATCH_APPLIED, 1),
        fp.UnexpectedMessage,
    ),
    (
        "DigestMap wrong count",
        State.DIGESTS,
        R,
        fp.DigestMap(DEFAULT_VMID, 0, 4096, 0, bytes(16 * 3)),
        fp.CountMismatch,
    ),
    (
        "DigestMap too many",
        State.DIGESTS,
        R,
        fp.DigestMap(DEFAULT_VMID, 0, 4096, 0, bytes(16 * 5)),
        fp.CountMismatch,
    ),
    (
        "DigestMap other range",
        State.DIGESTS,
        R,
        fp.DigestMap(DEFAULT_VMID, 0, 4096, 4096, bytes(16 * 4)),
        fp.UnexpectedMessage,
    ),
    (
        "DigestMap other block size",
        State.DIGESTS,
        R,
        fp.DigestMap(DEFAULT_VMID, 0, 8192, 0, bytes(16 * 4)),
        fp.UnexpectedMessage,
    ),
    (
        "RelationshipDelete wrong VMID",
        State.SESSION,
        P,
        fp.RelationshipDelete(OTHER_VMID),
        fp.UnexpectedMessage,
    ),
    (
        "Ack wrong VMID after delete",
        State.DELETING,
        R,
        fp.Ack(OTHER_VMID, fp.AckKind.RELATIONSHIP_DELETED, 0),
        fp.UnexpectedMessage,
    ),
    (
        "Ack IR_COMPLETE after delete",
        State.DELETING,
        R,
        fp.Ack(DEFAULT_VMID, fp.AckKind.IR_COMPLETE, 0),
        fp.UnexpectedMessage,
    ),
    (
        "Ack BATCH_APPLIED after delete",
        State.DELETING,
        R,
        fp.Ack(DEFAULT_VMID, fp.AckKind.BATCH_APPLIED, 0),
        fp.UnexpectedMessage,
    ),
    (
        "Ack after delete with a sequence",
        State.DELETING,
        R,
        fp.Ack(DEFAULT_VMID, fp.AckKind.RELATIONSHIP_DELETED, 1),
        fp.UnexpectedMessage,
    ),
    (
        "Ack RELATIONSHIP_DELETED after IR",
        State.IR_ENDING,
        R,
        fp.Ack(DEFAULT_VMID, fp.AckKind.RELATIONSHIP_DELETED, 0),
        fp.UnexpectedMessage,
    ),
    (
        "Ack RELATIONSHIP_DELETED after batch",
        State.BATCH_ENDING,
        R,
        fp.Ack(DEFAULT_VMID, fp.AckKind.RELATIONSHIP_DELETED, 1),
        fp.UnexpectedMessage,
    ),
]


@pytest.mark.parametrize(
    ("state", "role", "message", "remote"),
    [case[1:] for case in SESSION_CASES],
    ids=[case[0] for case in SESSION_CASES],
)
def test_session_checks(
    state: State, role: Role, message: fp.Message, remote: type[fp.RemoteProtocolError]
) -> None:
    pair = ConnectionPair().walk_to(state)
    _refused_both_ways(pair, role, message, remote)


def test_session_checks_leave_the_sender_usable() -> None:
    pair = ConnectionPair().walk_to(State.IR)
    with pytest.raises(fp.LocalProtocolError):
        pair.primary.send_chunk(1, SIZE1 - 1, b"ab")
    pair.send_chunk(1, SIZE1 - 2, b"ab")  # the last two bytes of the disk are fine
    pair.end_ir()
    pair.send(R, fp.Ack(DEFAULT_VMID, fp.AckKind.IR_COMPLETE, 0))
    assert state_of(pair) is State.SESSION


def test_more_chunks_than_declared() -> None:
    pair = ConnectionPair().walk_to(State.SESSION)
    pair.send(P, fp.BatchBegin(DEFAULT_VMID, 1, 0, 1))
    pair.send_chunk(0, 0, b"one")
    _refused_both_ways(pair, P, _chunk(0, 3, b"two"), fp.CountMismatch)


def test_batch_end_before_all_declared_chunks() -> None:
    pair = ConnectionPair().walk_to(State.SESSION)
    pair.send(P, fp.BatchBegin(DEFAULT_VMID, 1, 0, 2))
    pair.send_chunk(0, 0, b"one")
    end = fp.BatchEnd(DEFAULT_VMID, 1, 1, pair.primary.aggregate_digest)
    _refused_both_ways(pair, P, end, fp.CountMismatch)


def test_batch_end_digest_and_sequence() -> None:
    pair = ConnectionPair().walk_to(State.BATCH)
    pair.send_chunk(0, 0, b"one")
    pair.send_chunk(0, 3, b"two")
    good = pair.primary.aggregate_digest
    bad_digest = fp.BatchEnd(DEFAULT_VMID, 1, 2, bytes(16))
    _refused_both_ways(pair, P, bad_digest, fp.DigestMismatch)
    pair = ConnectionPair().walk_to(State.BATCH)
    pair.send_chunk(0, 0, b"one")
    pair.send_chunk(0, 3, b"two")
    assert pair.primary.aggregate_digest == good
    _refused_both_ways(pair, P, fp.BatchEnd(DEFAULT_VMID, 9, 2, good), fp.UnexpectedMessage)


def test_aggregate_digest_is_over_chunk_digests_in_order() -> None:
    pair = ConnectionPair().walk_to(State.BATCH)
    pair.send_chunk(0, 0, b"one")
    pair.send_chunk(0, 4096, bytes(4096))
    aggregate = fp.codec.AggregateDigest()
    aggregate.add(fp.codec.chunk_digest(b"one"))
    aggregate.add(fp.codec.zero_digest(4096))
    assert pair.primary.aggregate_digest == pair.recovery.aggregate_digest == aggregate.digest()
    assert pair.recovery.chunk_count == aggregate.count == 2


def test_the_connection_builds_the_end_of_an_ir_or_batch() -> None:
    pair = ConnectionPair().walk_to(State.BATCH)
    pair.send_chunk(0, 0, b"one")
    pair.send_chunk(0, 3, b"two")
    end = pair.primary.end_batch()
    assert end == pair.recovery.end_batch()
    assert end == fp.BatchEnd(DEFAULT_VMID, 1, 2, pair.primary.aggregate_digest)
    assert state_of(pair) is State.BATCH  # built, not sent
    with pytest.raises(fp.LocalProtocolError, match="no IR in progress"):
        pair.primary.end_ir()
    pair.send(P, end)
    with pytest.raises(fp.LocalProtocolError, match="no batch in progress"):
        pair.primary.end_batch()
    pair = ConnectionPair().walk_to(State.IR)  # one chunk sent: b"initial data" * 10
    pair.send_chunk(1, 0, bytes(4096))
    end_ir = pair.primary.end_ir()
    aggregate = fp.codec.AggregateDigest()
    aggregate.add(fp.codec.chunk_digest(b"initial data" * 10))
    aggregate.add(fp.codec.zero_digest(4096))
    assert end_ir == fp.IREnd(DEFAULT_VMID, 0, 2, aggregate.digest())
    with pytest.raises(fp.LocalProtocolError, match="no batch in progress"):
        pair.primary.end_batch()


def test_digest_map_cut_at_disk_end() -> None:
    pair = ConnectionPair().walk_to(State.SESSION)
    # Disk 1 is 3 blocks and 17 bytes: a request for 10 blocks from block 1 gets 3.
    pair.send(P, fp.DigestMapRequest(DEFAULT_VMID, 1, 4096, 4096, 10))
    with pytest.raises(fp.LocalProtocolError):
        pair.recovery.send(fp.DigestMap(DEFAULT_VMID, 1, 4096, 4096, bytes(16 * 10)))
    pair.send(R, fp.DigestMap(DEFAULT_VMID, 1, 4096, 4096, bytes(16 * 3)))
    assert state_of(pair) is State.SESSION


# -- RelationshipDelete ----------------------------------------------------------------------


def test_delete_closes_the_relationship() -> None:
    pair = ConnectionPair().walk_to(State.SESSION)
    pair.send(P, fp.RelationshipDelete(DEFAULT_VMID))
    assert state_of(pair) is State.DELETING
    # The relationship is still open while the answer is awaited; Keepalive may come.
    assert pair.primary.vmid == pair.recovery.vmid == DEFAULT_VMID
    pair.send(R, fp.Keepalive(3))
    pair.send(P, fp.Keepalive(4))
    assert state_of(pair) is State.DELETING
    pair.send(R, fp.Ack(DEFAULT_VMID, fp.AckKind.RELATIONSHIP_DELETED, 0))
    assert state_of(pair) is State.READY
    for conn in (pair.primary, pair.recovery):
        assert conn.vmid is None
        assert conn.disks == ()
    # Nothing is open: session messages are refused, a new relationship may follow.
    for message in (fp.IRBegin(DEFAULT_VMID), fp.RelationshipDelete(DEFAULT_VMID)):
        with pytest.raises(fp.LocalProtocolError):
            pair.primary.send(message)
    pair.open(DEFAULT_VMID, DEFAULT_DISKS, create=True)
    pair.send(P, fp.IRBegin(DEFAULT_VMID))
    pair.end_ir()
    pair.send(R, fp.Ack(DEFAULT_VMID, fp.AckKind.IR_COMPLETE, 0))
    assert state_of(pair) is State.SESSION


def test_delete_then_open_of_another_vm() -> None:
    pair = ConnectionPair().walk_to(State.SESSION)
    pair.send(P, fp.RelationshipDelete(DEFAULT_VMID))
    pair.send(R, fp.Ack(DEFAULT_VMID, fp.AckKind.RELATIONSHIP_DELETED, 0))
    pair.open(OTHER_VMID, DEFAULT_DISKS, create=False)
    assert pair.primary.vmid == pair.recovery.vmid == OTHER_VMID


@pytest.mark.parametrize(
    "code", [fp.ErrorCode.INTERNAL, fp.ErrorCode.BUSY, fp.ErrorCode.NOT_AUTHORIZED, 50]
)
def test_refused_delete_returns_to_the_session(code: int) -> None:
    pair = ConnectionPair().walk_to(State.DELETING)
    pair.send(R, fp.Error(code, "cannot remove it"))
    assert state_of(pair) is State.SESSION
    assert pair.primary.vmid == pair.recovery.vmid == DEFAULT_VMID
    assert pair.primary.disks == pair.recovery.disks == DEFAULT_DISKS
    # The relationship goes on: a batch is acknowledged as usual...
    pair.send(P, fp.BatchBegin(DEFAULT_VMID, 1, 0, 1))
    pair.send_chunk(0, 0, b"after the refusal")
    pair.end_batch(1)
    with pytest.raises(fp.LocalProtocolError):
        pair.recovery.send(fp.Ack(DEFAULT_VMID, fp.AckKind.RELATIONSHIP_DELETED, 0))
    pair.send(R, fp.Ack(DEFAULT_VMID, fp.AckKind.BATCH_APPLIED, 1))
    # ...and the delete may be asked again.
    pair.send(P, fp.RelationshipDelete(DEFAULT_VMID))
    pair.send(R, fp.Ack(DEFAULT_VMID, fp.AckKind.RELATIONSHIP_DELETED, 0))
    assert state_of(pair) is State.READY


@pytest.mark.parametrize("code", [fp.ErrorCode.PROTOCOL_MISMATCH, fp.ErrorCode.BAD_VALUE, 150])
def test_closing_code_in_deleting_closes(code: int) -> None:
    pair = ConnectionPair().walk_to(State.DELETING)
    pair.send(R, fp.Error(code, "no"))
    assert state_of(pair) is State.MUST_CLOSE


@pytest.mark.parametrize(
    "state", [State.READY, State.OPENING, State.IR, State.BATCH, State.DIGESTS, State.DELETING]
)
def test_delete_only_in_a_session(state: State) -> None:
    pair = ConnectionPair().walk_to(state)
    with pytest.raises(fp.LocalProtocolError):
        pair.primary.send(fp.RelationshipDelete(DEFAULT_VMID))
    assert state_of(pair) is state
    pair.recovery.receive_data(fp.codec.encode_frame(fp.RelationshipDelete(DEFAULT_VMID)))
    with pytest.raises(fp.UnexpectedMessage):
        pair.recovery.next_event()


def test_delete_from_the_recovery_side_is_refused() -> None:
    pair = ConnectionPair().walk_to(State.SESSION)
    with pytest.raises(fp.LocalProtocolError):
        pair.recovery.send(fp.RelationshipDelete(DEFAULT_VMID))
    pair.primary.receive_data(fp.codec.encode_frame(fp.RelationshipDelete(DEFAULT_VMID)))
    with pytest.raises(fp.UnexpectedMessage):
        pair.primary.next_event()


def test_delete_of_a_bad_vmid() -> None:
    with pytest.raises(fp.LocalProtocolError):
        fp.RelationshipDelete(uuid.UUID(int=0))
    body = uuid.UUID(int=(1 << 128) - 1).bytes
    frame = ENVELOPE.pack(0, fp.MessageTag.RELATIONSHIP_DELETE, len(body)) + body
    with pytest.raises(fp.BadVMID):
        fp.codec.decode_frame(frame)
    with pytest.raises(fp.TruncatedFrame):
        fp.codec.decode_frame(ENVELOPE.pack(0, fp.MessageTag.RELATIONSHIP_DELETE, 15) + body[:15])


# -- the end of the stream -----------------------------------------------------------------


def test_eof_between_frames() -> None:
    pair = ConnectionPair().walk_to(State.READY)
    pair.recovery.receive_data(pair.primary.send(fp.Keepalive(1)))
    pair.recovery.receive_data(b"")
    assert pair.recovery.next_event() == fp.Keepalive(1)
    assert pair.recovery.next_event() == fp.ConnectionClosed()
    assert state_of(pair.recovery) is State.CLOSED
    assert pair.recovery.next_event() == fp.ConnectionClosed()
    with pytest.raises(fp.LocalProtocolError):
        pair.recovery.receive_data(b"more")


@pytest.mark.parametrize("cut", [1, 7, 8, 9, 20])
def test_eof_mid_frame(cut: int) -> None:
    pair = ConnectionPair().walk_to(State.IR)
    frame = b"".join(pair.primary.send_chunk(0, 0, b"abcdefgh" * 10))
    pair.recovery.receive_data(frame[:cut])
    assert pair.recovery.next_event() is fp.NEED_DATA
    pair.recovery.receive_data(b"")
    with pytest.raises(fp.TruncatedFrame) as info:
        pair.recovery.next_event()
    assert info.value.code is fp.ErrorCode.TRUNCATED
    assert state_of(pair.recovery) is State.ERROR


def test_frame_size_refuses_a_hostile_length_from_8_bytes() -> None:
    conn = fp.Connection(Role.RECOVERY)
    with pytest.raises(fp.FrameTooLarge):
        conn.frame_size(ENVELOPE.pack(0, fp.MessageTag.KEEPALIVE, 0xFFFFFFFF))
    assert state_of(conn) is State.ERROR
    conn = fp.Connection(Role.RECOVERY)
    assert conn.frame_size(ENVELOPE.pack(0, fp.MessageTag.KEEPALIVE, 8)) == 16
    limit = fp.limits.CHUNK_HEADER_SIZE + fp.limits.MAX_CHUNK_DATA
    assert conn.frame_size(ENVELOPE.pack(0, fp.MessageTag.CHUNK, limit)) == 8 + limit
    with pytest.raises(fp.FrameTooLarge):
        conn.frame_size(ENVELOPE.pack(0, fp.MessageTag.CHUNK, limit + 1))
    conn = fp.Connection(Role.RECOVERY)
    control = fp.limits.MAX_CONTROL_BODY
    assert conn.frame_size(ENVELOPE.pack(0, fp.MessageTag.ERROR, control)) == 8 + control
    with pytest.raises(fp.FrameTooLarge):
        conn.frame_size(ENVELOPE.pack(0, fp.MessageTag.ERROR, control + 1))
    with pytest.raises(fp.ReservedNotZero):
        fp.Connection(Role.RECOVERY).frame_size(ENVELOPE.pack(1, 1, 0))
    with pytest.raises(fp.UnknownTag):
        fp.Connection(Role.RECOVERY).frame_size(ENVELOPE.pack(0, 0x7777, 0))
    ignorable = fp.Connection(Role.RECOVERY).frame_size(ENVELOPE.pack(0, 0x8123, 5))
    assert ignorable == 13


def test_hostile_length_refused_before_the_body() -> None:
    pair = ConnectionPair().walk_to(State.READY)
    pair.recovery.receive_data(ENVELOPE.pack(0, fp.MessageTag.KEEPALIVE, 0x7FFFFFFF))
    with pytest.raises(fp.FrameTooLarge):
        pair.recovery.next_event()


def test_unknown_ignorable_tag_is_skipped() -> None:
    pair = ConnectionPair().walk_to(State.SESSION)
    pair.recovery.receive_data(ENVELOPE.pack(0, 0x8042, 3) + b"abc")
    pair.recovery.receive_data(pair.primary.send(fp.Keepalive(3)))
    assert drain(pair.recovery) == [fp.UnknownMessage(0x8042, b"abc"), fp.Keepalive(3)]
    assert state_of(pair.recovery) is State.SESSION


# -- bugs found: decoding never raises anything but a RemoteProtocolError ----------------


def test_query_disk_size_over_limit_is_a_remote_error() -> None:
    body = table_of(fp.QueryRecoveryServer).schema.build(
        {"vmid": DEFAULT_VMID.bytes, "vm_name": b"vm", "disk_sizes": [1, 1 << 63]}
    )
    with pytest.raises(fp.BadValue):
        fp.codec.decode_frame(
            ENVELOPE.pack(0, fp.MessageTag.QUERY_RECOVERY_SERVER, len(body)) + body
        )


def test_error_text_of_bad_utf8_stays_within_the_limit() -> None:
    body = table_of(fp.Error).schema.build({"code": 8, "text": b"\xff" * fp.limits.MAX_ERROR_TEXT})
    decoded = fp.codec.decode_frame(ENVELOPE.pack(0, fp.MessageTag.ERROR, len(body)) + body)
    assert isinstance(decoded, fp.Error)
    assert decoded.code == 8
    assert 0 < len(decoded.text.encode()) <= fp.limits.MAX_ERROR_TEXT
    assert set(decoded.text) == {"\ufffd"}


@settings(max_examples=300)
@given(fs.messages(), st.data())
def test_mutated_frames_raise_only_remote_errors(message: fp.Message, data: st.DataObject) -> None:
    frame = bytearray(fp.codec.encode_frame(message))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(frame) - 1))
        frame[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    candidate = bytes(frame[:cut]) + data.draw(st.binary(max_size=8))
    with contextlib.suppress(fp.RemoteProtocolError):
        fp.codec.decode_frame(candidate)


@settings(max_examples=200)
@given(st.binary(max_size=120))
def test_random_bytes_raise_only_remote_errors(raw: bytes) -> None:
    with contextlib.suppress(fp.RemoteProtocolError):
        fp.codec.decode_frame(raw)
    for state in (State.IDLE, State.NEGOTIATING, State.IR):
        conn = ConnectionPair().walk_to(state).recovery
        if raw:
            conn.receive_data(raw)
        conn.receive_data(b"")
        try:
            drain(conn)
        except fp.RemoteProtocolError:
            assert state_of(conn) is State.ERROR


# -- the error registry --------------------------------------------------------------------


@pytest.mark.parametrize("code", [c for c in fp.ErrorCode if c], ids=lambda c: c.name)
def test_error_from_message_maps_every_code(code: fp.ErrorCode) -> None:
    cls = fp.codec.ERROR_CLASSES[code]
    assert cls.code is code
    assert fp.codec.error_class_for(code) is cls
    exc = fp.error_from_message(fp.Error(code, f"text {code.name}"))
    assert type(exc) is cls
    assert exc.message == f"text {code.name}"
    if code >= 100:
        assert issubclass(cls, fp.RemoteProtocolError)
    else:
        assert issubclass(cls, fp.ReplicationError)


def test_error_registry_is_complete_and_unknown_codes_are_internal() -> None:
    assert set(fp.codec.ERROR_CLASSES) == {c for c in fp.ErrorCode if c}
    assert fp.codec.error_class_for(0) is fp.InternalError
    assert fp.codec.error_class_for(4242) is fp.InternalError
    assert type(fp.error_from_message(fp.Error(4242, "new"))) is fp.InternalError
    assert fp.Error(4242).error_code is fp.ErrorCode.INTERNAL


LEAF_ERRORS: list[type[fp.FrprotoError]] = [fp.codec.ERROR_CLASSES[c] for c in fp.ErrorCode if c]


@pytest.mark.parametrize("cls", LEAF_ERRORS, ids=lambda c: c.__name__)
@settings(max_examples=10)
@given(text=fs.error_texts() | st.text(min_size=1000, max_size=1200))
def test_from_exception_round_trip(cls: type[fp.FrprotoError], text: str) -> None:
    text = text.encode("utf-8", "replace").decode("utf-8")
    exc = cls(text)
    message = fp.Error.from_exception(exc)
    assert message.code == cls.code
    assert len(message.text.encode()) <= fp.limits.MAX_ERROR_TEXT
    assert text.startswith(message.text)
    decoded = fp.codec.decode_frame(fp.codec.encode_frame(message))
    assert decoded == message
    assert isinstance(decoded, fp.Error)
    back = fp.error_from_message(decoded)
    assert type(back) is cls
    assert back.message == message.text


def test_remote_error_carries_its_error_message() -> None:
    exc = fp.ChunkOutOfRange("past the end")
    error = fp.Error(fp.ErrorCode.CHUNK_OUT_OF_RANGE, "past the end")
    assert fp.Error.from_exception(exc) == error
    pair = ConnectionPair().walk_to(State.IR)
    assert pair.recovery.send_error(exc) == fp.codec.encode_frame(error)
    assert state_of(pair.recovery) is State.MUST_CLOSE


def test_protocol_error_is_abstract() -> None:
    with pytest.raises(TypeError, match="abstract"):
        fp.ProtocolError("x")
    assert isinstance(fp.LocalProtocolError("x"), fp.ProtocolError)
    assert isinstance(fp.BadValue("x"), fp.ProtocolError)
    assert fp.LocalProtocolError("x").code is fp.ErrorCode.INTERNAL


def test_invalid_messages_are_local_errors() -> None:
    with pytest.raises(fp.LocalProtocolError):
        fp.RelationshipOpen(uuid.UUID(int=0))
    with pytest.raises(fp.LocalProtocolError):
        fp.RelationshipCreate(DEFAULT_VMID, "..", DEFAULT_DISKS)
    with pytest.raises(fp.LocalProtocolError):
        fp.RelationshipCreate(DEFAULT_VMID, "a/b", DEFAULT_DISKS)
    with pytest.raises(fp.LocalProtocolError):
        fp.RelationshipCreate(DEFAULT_VMID, "vm", (fp.DiskInfo("d", 1), fp.DiskInfo("d", 2)))
    with pytest.raises(fp.LocalProtocolError):
        fp.NegotiateResponse(server_name="-bad-.example")
    with pytest.raises(fp.LocalProtocolError):
        fp.BatchBegin(DEFAULT_VMID, 1, 1, 0)


# -- negotiation rules ---------------------------------------------------------------------


POLICIES = st.builds(
    fp.ServerPolicy,
    recovery_type=st.sampled_from(fp.RecoveryType),
    server_name=fs.server_names(),
    compression=st.lists(
        st.sampled_from([fp.Compression.ZSTD, fp.Compression.LZ4]), unique=True, max_size=2
    ).map(tuple),
    encryption=st.sampled_from(fp.Encryption),
    auth_types=st.frozensets(st.sampled_from(fp.AuthType)),
    version=st.tuples(st.integers(0, 255), st.integers(0, 255)),
)
_ENC_BIT = {fp.Encryption.NONE: fp.EncryptionSet.NONE, fp.Encryption.TLS13: fp.EncryptionSet.TLS13}
_COMP_BIT = {fp.Compression.ZSTD: fp.CompressionSet.ZSTD, fp.Compression.LZ4: fp.CompressionSet.LZ4}


@settings(max_examples=300)
@given(fs.negotiate_requests(), POLICIES)
def test_answer_negotiation_rules(request: fp.NegotiateRequest, policy: fp.ServerPolicy) -> None:
    answer = fp.answer_negotiation(request, policy)
    assert answer.recovery_type is policy.recovery_type
    assert answer.server_name == policy.server_name
    assert answer.encryption is policy.encryption
    if request.version[0] != policy.version[0]:
        assert answer.verdict is fp.VersionVerdict.MISMATCH
        assert answer.status == fp.ErrorCode.PROTOCOL_MISMATCH
        assert answer.version == policy.version
        assert not answer.ok
        return
    assert answer.verdict is fp.VersionVerdict.COMPATIBLE
    assert answer.version == (policy.version[0], min(policy.version[1], request.version[1]))
    if request.auth_type not in policy.auth_types:
        assert answer.status == fp.ErrorCode.NOT_AUTHORIZED
    elif not request.encryption & _ENC_BIT[policy.encryption]:
        assert answer.status == fp.ErrorCode.NOT_SUPPORTED
    else:
        assert answer.status == fp.ErrorCode.OK
        assert answer.ok
        offered = [c for c in policy.compression if request.compression & _COMP_BIT[c]]
        assert answer.compression is (offered[0] if offered else fp.Compression.NONE)
    if not answer.ok:
        assert answer.compression is fp.Compression.NONE


def test_answer_negotiation_examples() -> None:
    policy = fp.ServerPolicy(fp.RecoveryType.CLUSTER_NODE, "node.example")
    both = fp.NegotiateRequest(version=(1, 7))
    answer = fp.answer_negotiation(both, policy)
    assert (answer.status, answer.version, answer.compression) == (
        fp.ErrorCode.OK,
        (1, 1),
        fp.Compression.LZ4,  # the server's first preference
    )
    zstd_first = fp.ServerPolicy(
        fp.RecoveryType.CLUSTER_NODE, "n", compression=(fp.Compression.ZSTD, fp.Compression.LZ4)
    )
    assert fp.answer_negotiation(both, zstd_first).compression is fp.Compression.ZSTD
    only_zstd = fp.NegotiateRequest(compression=fp.CompressionSet.ZSTD)
    assert fp.answer_negotiation(only_zstd, policy).compression is fp.Compression.ZSTD
    none = fp.NegotiateRequest(compression=fp.CompressionSet(0))
    assert fp.answer_negotiation(none, policy).compression is fp.Compression.NONE
    kerberos = fp.NegotiateRequest(auth_type=fp.AuthType.INTEGRATED)
    assert fp.answer_negotiation(kerberos, policy).status == fp.ErrorCode.NOT_AUTHORIZED
    plain = fp.NegotiateRequest(encryption=fp.EncryptionSet.NONE)
    assert fp.answer_negotiation(plain, policy).status == fp.ErrorCode.NOT_SUPPORTED
    newer = fp.ServerPolicy(fp.RecoveryType.STANDALONE, "s", version=(1, 4))
    assert fp.answer_negotiation(fp.NegotiateRequest(version=(1, 2)), newer).version == (1, 2)
    assert fp.answer_negotiation(fp.NegotiateRequest(version=(1, 9)), newer).version == (1, 4)


@settings(max_examples=300)
@given(
    fs.negotiate_requests(),
    POLICIES,
    st.sampled_from([c for c in fp.ErrorCode if c != fp.ErrorCode.OK]) | st.integers(1, 0xFFFF),
)
def test_every_refusal_has_the_fields_of_the_refusal_table(
    request: fp.NegotiateRequest, policy: fp.ServerPolicy, status: int
) -> None:
    # NEG-12: a function of the request and of what the listener is; nothing chosen.
    refusal = fp.refuse_negotiation(request, policy, status)
    assert refusal.status == status
    assert not refusal.ok
    assert refusal.compression is fp.Compression.NONE
    assert refusal.recovery_type is policy.recovery_type
    assert refusal.encryption is policy.encryption
    assert refusal.auth_type is request.auth_type
    assert refusal.server_name == policy.server_name
    if request.version[0] != policy.version[0]:
        assert (refusal.verdict, refusal.version) == (fp.VersionVerdict.MISMATCH, policy.version)
    else:
        assert refusal.verdict is fp.VersionVerdict.COMPATIBLE
        assert refusal.version == (policy.version[0], min(policy.version[1], request.version[1]))
    # answer_negotiation's refusals are these very answers.
    answer = fp.answer_negotiation(request, policy)
    if not answer.ok:
        assert answer == fp.refuse_negotiation(request, policy, answer.status)
    # The refusal goes on the wire and ends the conversation on both sides (NEG-7, NEG-8).
    recovery, primary = fp.Connection(fp.Role.RECOVERY), fp.Connection(fp.Role.PRIMARY)
    recovery.receive_data(primary.send(request))
    assert recovery.next_event() == request
    primary.receive_data(recovery.send(refusal))
    assert primary.next_event() == refusal
    assert primary.state is recovery.state is fp.State.MUST_CLOSE


def test_refusal_of_an_unauthorized_peer_tells_nothing_chosen() -> None:
    policy = fp.ServerPolicy(fp.RecoveryType.CLUSTER_NODE, "node.example")
    request = fp.NegotiateRequest()  # offers ZSTD|LZ4: an OK answer would choose LZ4
    assert fp.answer_negotiation(request, policy).compression is fp.Compression.LZ4
    unauthorized = fp.refuse_negotiation(request, policy, fp.ErrorCode.NOT_AUTHORIZED)
    kerberos = fp.answer_negotiation(fp.NegotiateRequest(auth_type=fp.AuthType.INTEGRATED), policy)
    # The two NOT_AUTHORIZED answers differ in the auth type echoed, nothing else.
    assert unauthorized.compression is fp.Compression.NONE
    assert replace(kerberos, auth_type=fp.AuthType.CERTIFICATE) == unauthorized
    with pytest.raises(ValueError, match="other than OK"):
        fp.refuse_negotiation(request, policy, fp.ErrorCode.OK)


# -- Error codes that close even where a refusal may come ------------------------------------


@pytest.mark.parametrize(
    ("code", "closes"),
    [
        (fp.ErrorCode.BUSY, False),
        (fp.ErrorCode.VM_NOT_HERE, False),
        (fp.ErrorCode.PROTOCOL_MISMATCH, True),
        (fp.ErrorCode.BAD_VALUE, True),
        (fp.ErrorCode.DIGEST_MISMATCH, True),
        (150, True),  # a future protocol-violation code
        (50, False),  # a future refusal code
    ],
)
def test_error_code_decides_refusal_or_close_on_both_sides(code: int, closes: bool) -> None:
    primary = fp.Connection(fp.Role.PRIMARY)
    recovery = fp.Connection(fp.Role.RECOVERY)

    def deliver(sender: fp.Connection, receiver: fp.Connection, message: fp.Message) -> None:
        receiver.receive_data(sender.send(message))
        assert receiver.next_event() == message

    deliver(primary, recovery, fp.NegotiateRequest())
    policy = fp.ServerPolicy(fp.RecoveryType.STANDALONE, "r1.example.com")
    deliver(recovery, primary, fp.answer_negotiation(fp.NegotiateRequest(), policy))
    vmid = uuid.UUID("5b3a1f6e-2c4d-4e8f-9a0b-1c2d3e4f5a6b")
    deliver(primary, recovery, fp.RelationshipOpen(vmid))
    assert primary.state is recovery.state is fp.State.OPENING
    deliver(recovery, primary, fp.Error(code, "no"))
    expected = fp.State.MUST_CLOSE if closes else fp.State.READY
    assert primary.state is recovery.state is expected
    assert fp.closes_connection(code) is closes


@pytest.mark.parametrize("name", ["web\x7f01", "web\x8501", "web\x9f"])
def test_vm_name_with_del_or_c1_control_is_refused(name: str) -> None:
    with pytest.raises(fp.LocalProtocolError, match="control character"):
        fp.QueryRecoveryServer(uuid.UUID("5b3a1f6e-2c4d-4e8f-9a0b-1c2d3e4f5a6b"), name)


@pytest.mark.parametrize("name", ["fe80::1%eth0", "r1.example.com/x", "r1 .example.com"])
def test_server_name_outside_the_charset_is_refused(name: str) -> None:
    with pytest.raises(fp.LocalProtocolError, match="server name"):
        fp.NegotiateResponse(server_name=name)
