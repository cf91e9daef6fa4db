"""Fuzz harness: arbitrary bytes into a :class:`frproto.Connection`.

Input layout: ``data[0]`` picks the scenario (low 4 bits, see :data:`SCENARIOS`) and
options (bit 4: answer the peer's requests like a stand-alone server would, recovery
side only; bit 5: small limits; bit 7: end the stream after the input), ``data[1]`` seeds
the split positions, and the rest is what the peer sends.

Each scenario first drives a fresh connection through a valid prelude (for example a
recovery server that has negotiated as stand-alone, accepted a relationship and begun a
batch, so the chunk path is reachable), then the input is fed twice, to two fresh
connections: once in one piece, once in pieces cut at positions derived from the input
(as bytes, bytearray and memoryview objects in turn).

Invariants checked by :func:`check`:

* only :class:`frproto.RemoteProtocolError` subclasses escape ``next_event`` (anything
  else is a bug), and after one, ``next_event`` raises a RemoteProtocolError again;
* both feedings give the same sequence of events (messages compared with
  ``frproto.jsonable.message_to_dict``, other events with ``repr``), the same bytes sent by the
  auto-responder, and end with the same error class (or none);
* parsing terminates (a bounded number of events per input byte).

Run: ``.venv/bin/python fuzz/fuzz_connection.py fuzz/corpus/connection`` (see README.md).
"""

from __future__ import annotations

import contextlib
import itertools
import random
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def _instrumentation() -> contextlib.AbstractContextManager[Any]:
    """atheris's import instrumentation when run as the fuzzer; nothing when imported."""
    if __name__ != "__main__":
        return contextlib.nullcontext()
    import atheris

    return atheris.instrument_imports(include=["frproto"])  # type: ignore[no-any-return]


with _instrumentation():
    import frproto
    from frproto import (
        Ack,
        AckKind,
        BatchBegin,
        BatchEnd,
        Compression,
        Connection,
        ConnectionConfig,
        DigestMap,
        DigestMapRequest,
        DiskInfo,
        ExistingVM,
        FailoverAsk,
        FailoverDone,
        FailoverRequest,
        IRBegin,
        IREnd,
        Message,
        NegotiateRequest,
        NegotiateResponse,
        QueryRecoveryServer,
        QueryRecoveryServerResponse,
        RecoveryType,
        RelationshipAccepted,
        RelationshipCreate,
        RelationshipDelete,
        RelationshipOpen,
        Role,
        ServerPolicy,
    )

#: The VM and disks every prelude uses (small disks, so out-of-range chunks are easy).
VMID = uuid.UUID("5f0c3c2e-8d1a-4b6e-9a37-2c4d6e8f0a1b")
DISKS = (DiskInfo("disk0", 1 << 20), DiskInfo("disk1", 8192))
VM_NAME = "fuzz-vm"
Bytes = bytes | bytearray | memoryview

OPT_RESPOND = 0x10
OPT_SMALL_LIMITS = 0x20
OPT_EOF = 0x80
SMALL_LIMITS = ConnectionConfig(max_chunk_data=4096, max_control_body=512)


@dataclass(frozen=True, slots=True)
class Recv:
    """Prelude step: the peer sends ``frame``; the connection must turn it into a message."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class Send:
    """Prelude step: we send ``message``."""

    message: Message


@dataclass(frozen=True, slots=True)
class SendChunk:
    """Prelude step: we send one chunk (primary side)."""

    disk_index: int
    offset: int
    data: bytes


Step = Recv | Send | SendChunk


def _frame(message: Message) -> bytes:
    return frproto.codec.encode_frame(message)


_NEGOTIATE = _frame(NegotiateRequest())
_CREATE = RelationshipCreate(VMID, VM_NAME, DISKS)
_ACCEPTED = RelationshipAccepted(VMID, DISKS)
_STANDALONE = NegotiateResponse(recovery_type=RecoveryType.STANDALONE, server_name="dr1.example")
_BROKER = NegotiateResponse(recovery_type=RecoveryType.CLUSTERING_BROKER, server_name="cap.example")
_BATCH = BatchBegin(VMID, sequence=8, base_sequence=7, chunk_count=4, total_bytes=16384)
_IR = IRBegin(VMID, sequence=1, total_bytes=sum(d.size for d in DISKS))
_PRIMARY_DATA = b"fuzz" * 1024
_PRIMARY_DIGEST = frproto.codec.chunk_digest(_PRIMARY_DATA)
_AGGREGATE = frproto.codec.AggregateDigest()
_AGGREGATE.add(_PRIMARY_DIGEST)

_RECOVERY_SESSION: tuple[Step, ...] = (
    Recv(_NEGOTIATE),
    Send(_STANDALONE),
    Recv(_frame(_CREATE)),
    Send(_ACCEPTED),
)
_PRIMARY_SESSION: tuple[Step, ...] = (
    Send(NegotiateRequest()),
    Recv(_frame(_STANDALONE)),
    Send(_CREATE),
    Recv(_frame(_ACCEPTED)),
)

#: Scenario index -> (name, our role, prelude steps). Index = ``data[0] & 0x0F``.
SCENARIOS: tuple[tuple[str, Role, tuple[Step, ...]], ...] = (
    ("recovery-fresh", Role.RECOVERY, ()),
    ("primary-fresh", Role.PRIMARY, ()),
    ("recovery-session", Role.RECOVERY, _RECOVERY_SESSION),
    ("recovery-batch", Role.RECOVERY, (*_RECOVERY_SESSION, Recv(_frame(_BATCH)))),
    ("recovery-ir", Role.RECOVERY, (*_RECOVERY_SESSION, Recv(_frame(_IR)))),
    ("primary-negotiating", Role.PRIMARY, (Send(NegotiateRequest()),)),
    ("primary-opening", Role.PRIMARY, (*_PRIMARY_SESSION[:3],)),
    (
        "primary-digests",
        Role.PRIMARY,
        (*_PRIMARY_SESSION, Send(DigestMapRequest(VMID, 0, 65536, 0, 8))),
    ),
    (
        "primary-batch-ending",
        Role.PRIMARY,
        (
            *_PRIMARY_SESSION,
            Send(BatchBegin(VMID, sequence=8, base_sequence=7, chunk_count=1)),
            SendChunk(0, 0, _PRIMARY_DATA),
            Send(BatchEnd(VMID, 8, 1, _AGGREGATE.digest())),
        ),
    ),
    (
        "recovery-broker",
        Role.RECOVERY,
        (Recv(_NEGOTIATE), Send(_BROKER)),
    ),
    (
        "primary-querying",
        Role.PRIMARY,
        (
            Send(NegotiateRequest()),
            Recv(_frame(_BROKER)),
            Send(QueryRecoveryServer(VMID, VM_NAME, tuple(d.size for d in DISKS))),
        ),
    ),
    ("primary-deleting", Role.PRIMARY, (*_PRIMARY_SESSION, Send(RelationshipDelete(VMID)))),
    (
        "primary-failing-over",
        Role.PRIMARY,
        (*_PRIMARY_SESSION, Send(FailoverRequest(VMID, 8, 65536, bytes(16), reverse_port=7443))),
    ),
    (
        # A recovery side that asked for a planned failover as it accepted the open (1.1):
        # a FailoverDecline (or a FailoverRequest) may come.
        "recovery-asked",
        Role.RECOVERY,
        (
            Recv(_NEGOTIATE),
            Send(_STANDALONE),
            Recv(_frame(_CREATE)),
            Send(FailoverAsk(VMID)),
            Send(_ACCEPTED),
        ),
    ),
)
SCENARIO_INDEX = {name: index for index, (name, _, _) in enumerate(SCENARIOS)}

_POLICY = ServerPolicy(
    RecoveryType.STANDALONE, "dr1.example", compression=(Compression.LZ4, Compression.ZSTD)
)


def make_input(
    scenario: str, stream: bytes, *, split_seed: int = 0, eof: bool = True, respond: bool = False
) -> bytes:
    """A harness input that runs ``scenario`` and then feeds ``stream`` (for seeds)."""
    head = SCENARIO_INDEX[scenario] | (OPT_EOF if eof else 0) | (OPT_RESPOND if respond else 0)
    return bytes([head, split_seed & 0xFF]) + stream


def _run_prelude(conn: Connection, steps: Sequence[Step]) -> None:
    for step in steps:
        if isinstance(step, Recv):
            conn.receive_data(step.frame)
            event = conn.next_event()
            if not isinstance(event, Message):
                raise AssertionError(f"prelude frame gave {event!r}")
        elif isinstance(step, Send):
            conn.send(step.message)
        else:
            conn.send_chunk(step.disk_index, step.offset, step.data)


def _answer(conn: Connection, event: Message) -> Message | None:
    """What a well-behaved stand-alone recovery server sends back, if anything."""
    if isinstance(event, NegotiateRequest):
        return frproto.answer_negotiation(event, _POLICY)
    if isinstance(event, RelationshipCreate):
        return RelationshipAccepted(event.vmid, event.disks)
    if isinstance(event, RelationshipOpen):
        return RelationshipAccepted(event.vmid, DISKS, generation=event.generation)
    if isinstance(event, IREnd):
        return Ack(event.vmid, AckKind.IR_COMPLETE, event.sequence)
    if isinstance(event, BatchEnd):
        return Ack(event.vmid, AckKind.BATCH_APPLIED, event.sequence)
    if isinstance(event, RelationshipDelete):
        return Ack(event.vmid, AckKind.RELATIONSHIP_DELETED, 0)
    if isinstance(event, FailoverRequest):
        return FailoverDone(event.vmid, 2, event.sequence)
    if isinstance(event, QueryRecoveryServer):
        return QueryRecoveryServerResponse(event.vmid, "node1.example", 7400, ExistingVM.NEW)
    if isinstance(event, DigestMapRequest):
        size = conn.disks[event.disk_index].size
        blocks = min(
            event.block_count,
            -(-(size - event.offset) // event.block_size),
            frproto.limits.MAX_DIGESTS,
        )
        return DigestMap(
            event.vmid, event.disk_index, event.block_size, event.offset, bytes(16 * blocks)
        )
    return None


class _Run:
    """One feeding of the input to a fresh connection, recording what happens."""

    def __init__(self, head: int, limit: int) -> None:
        _name, role, steps = SCENARIOS[(head & 0x0F) % len(SCENARIOS)]
        config = SMALL_LIMITS if head & OPT_SMALL_LIMITS else None
        self.conn = Connection(role, config)
        _run_prelude(self.conn, steps)
        self.respond = bool(head & OPT_RESPOND) and role is Role.RECOVERY
        self.trace: list[Any] = []
        self.error: type[BaseException] | None = None
        self.closed = False
        self._budget = limit

    @property
    def done(self) -> bool:
        return self.error is not None or self.closed

    def feed(self, piece: Bytes) -> None:
        if self.done:
            return
        self.conn.receive_data(piece)
        self._drain()

    def _drain(self) -> None:
        while True:
            self._budget -= 1
            if self._budget < 0:
                raise AssertionError("next_event did not settle (too many events)")
            try:
                event = self.conn.next_event()
            except frproto.RemoteProtocolError as exc:
                self.error = type(exc)
                self.trace.append(("error", type(exc).__name__))
                self._check_sticky_error()
                return
            if event is frproto.NEED_DATA:
                return
            if isinstance(event, frproto.ConnectionClosed):
                self.trace.append(("closed",))
                self.closed = True
                return
            if isinstance(event, Message):
                self.trace.append(("event", frproto.jsonable.message_to_dict(event)))
                reply = _answer(self.conn, event) if self.respond else None
                if reply is not None and self.conn.state not in (
                    frproto.State.MUST_CLOSE,
                    frproto.State.CLOSED,
                ):
                    self.trace.append(("sent", self.conn.send(reply).hex()))
            else:
                self.trace.append(("other", repr(event)))

    def _check_sticky_error(self) -> None:
        try:
            again = self.conn.next_event()
        except frproto.RemoteProtocolError:
            return
        raise AssertionError(f"next_event gave {again!r} after a protocol error")


def split_points(seed: int, size: int) -> list[int]:
    """Cut positions in ``range(1, size)`` derived from ``seed`` (sorted, unique)."""
    if size < 2:
        return []
    if seed == 0 and size <= 4096:
        return list(range(1, size))  # one byte at a time
    rng = random.Random(seed)
    count = min(size - 1, 1 + seed % 24)
    return sorted(rng.sample(range(1, size), count))


def pieces_of(stream: bytes, seed: int) -> list[Bytes]:
    """``stream`` cut at :func:`split_points`, as bytes, bytearray and memoryview in turn."""
    bounds = [0, *split_points(seed, len(stream)), len(stream)]
    out: list[Bytes] = []
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        piece = stream[start:end]
        kind = i % 3
        out.append(piece if kind == 0 else bytearray(piece) if kind == 1 else memoryview(piece))
    return out


def check(data: bytes) -> None:
    """The connection invariants on one input (raises AssertionError or the stray error)."""
    if len(data) < 2:
        return
    head, seed, stream = data[0], data[1], data[2:]
    limit = len(stream) + 16

    whole = _Run(head, limit)
    whole.feed(stream)
    if head & OPT_EOF and not whole.done:
        whole.feed(b"")

    split = _Run(head, limit)
    for piece in pieces_of(stream, seed):
        split.feed(piece)
    if head & OPT_EOF and not split.done:
        split.feed(b"")

    if whole.trace != split.trace:
        raise AssertionError(
            "feeding in pieces changed the events:\n"
            f"  whole:  {whole.trace!r}\n  pieces: {split.trace!r}"
        )
    if whole.error is not split.error:
        raise AssertionError(f"error {whole.error} in one piece, {split.error} in pieces")


def TestOneInput(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    import atheris

    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
