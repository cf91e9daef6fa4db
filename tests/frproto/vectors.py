"""Typed loader for the golden test vectors in ``tests/vectors/`` (format: its README.md).

Two kinds of vector files:

* ``messages/<snake_case_message>.json``: valid frames and the message each one carries
  (:class:`MessageVectors`, one :class:`MessageCase` per frame);
* ``errors/<snake_case_error_class>.json``: inputs that a receiver must refuse with one
  :class:`frproto.RemoteProtocolError` subclass (:class:`ErrorVectors`, one
  :class:`ErrorCase` each), with the prelude that brings the receiver into the needed state.

Besides loading, this module can replay a case against a :class:`frproto.Connection`
(:func:`run_prelude`, :func:`feed`, :func:`run_error_case`), and it holds the small
conversation builders (:func:`handshake`, :func:`open_session`) that both the generator
and the tests use, so that a fuzz corpus builder or a conformance harness can reuse all of
it. It uses only the public ``frproto`` API.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import frproto
from frproto import (
    NEED_DATA,
    Connection,
    DiskInfo,
    Event,
    Message,
    RecoveryType,
    RemoteProtocolError,
    Role,
)

#: The directory that holds the checked-in vectors.
VECTORS_DIR = Path(__file__).resolve().parents[1] / "vectors"
#: Where the message vectors live, under a vectors directory.
MESSAGES_SUBDIR = "messages"
#: Where the error vectors live, under a vectors directory.
ERRORS_SUBDIR = "errors"

Direction = Literal["recv", "send"]
_DIRECTIONS: tuple[Direction, ...] = ("recv", "send")

# -- The shared conversation context --------------------------------------------------------

#: The VM of every relationship that a prelude opens, unless a case says otherwise.
CONTEXT_VMID = uuid.UUID("5f0c6f1e-3a4b-4c2d-8e9f-0a1b2c3d4e5f")
#: The disks that the recovery side reports in every prelude's RelationshipAccepted.
CONTEXT_DISKS = (DiskInfo("system", 1 << 20), DiskInfo("data-1", 1 << 16))
#: The server name the recovery side gives in every prelude's NegotiateResponse.
CONTEXT_SERVER = "recovery.example.net"


def snake_case(name: str) -> str:
    """``NegotiateRequest`` -> ``negotiate_request``, ``BadVMID`` -> ``bad_vmid``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


# -- The cases ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageCase:
    """One valid frame and the message it carries."""

    name: str
    description: str
    #: ``frproto.jsonable.message_to_dict`` of the message.
    fields: dict[str, Any]
    #: The whole frame (envelope and body), as lowercase hex.
    hex: str

    @property
    def frame(self) -> bytes:
        """The frame bytes."""
        return bytes.fromhex(self.hex)

    def message(self) -> Message:
        """The message that ``fields`` describes."""
        return frproto.jsonable.message_from_dict(self.fields)

    def to_json(self) -> dict[str, Any]:
        """The JSON form of this case (as written in the vector file)."""
        return {
            "name": self.name,
            "description": self.description,
            "fields": self.fields,
            "hex": self.hex,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MessageCase:
        """Parse one case of a message vector file."""
        return cls(
            name=str(data["name"]),
            description=str(data["description"]),
            fields=dict(data["fields"]),
            hex=str(data["hex"]),
        )


@dataclass(frozen=True, slots=True)
class MessageVectors:
    """The vectors of one message class (one ``messages/*.json`` file)."""

    #: The message class name (``frproto.<message>``).
    message: str
    #: Its tag type (``MessageTag`` value).
    tag: int
    cases: tuple[MessageCase, ...]

    @property
    def message_class(self) -> type[Message]:
        """The message class these vectors are for."""
        return frproto.codec.MESSAGE_CLASSES[frproto.MessageTag(self.tag)]

    @property
    def file_name(self) -> str:
        """The file name of these vectors (``<snake_case_message>.json``)."""
        return f"{snake_case(self.message)}.json"

    def to_json(self) -> dict[str, Any]:
        """The JSON form of the file."""
        return {
            "message": self.message,
            "tag": self.tag,
            "cases": [case.to_json() for case in self.cases],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MessageVectors:
        """Parse a message vector file."""
        return cls(
            message=str(data["message"]),
            tag=int(data["tag"]),
            cases=tuple(MessageCase.from_json(case) for case in data["cases"]),
        )


@dataclass(frozen=True, slots=True)
class PreludeStep:
    """One frame of a prelude: received by the receiver (``recv``) or sent by it (``send``)."""

    dir: Direction
    hex: str

    @property
    def frame(self) -> bytes:
        """The frame bytes."""
        return bytes.fromhex(self.hex)

    def to_json(self) -> dict[str, Any]:
        """The JSON form of the step."""
        return {"dir": self.dir, "hex": self.hex}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PreludeStep:
        """Parse one prelude step."""
        direction = data["dir"]
        if direction not in _DIRECTIONS:
            raise ValueError(f"prelude step direction {direction!r}")
        return cls(dir=direction, hex=str(data["hex"]))

    @classmethod
    def of(cls, direction: Direction, message: Message) -> PreludeStep:
        """The step for ``message`` (framed with ``frproto.codec.encode_frame``)."""
        return cls(direction, frproto.codec.encode_frame(message).hex())


@dataclass(frozen=True, slots=True)
class ErrorCase:
    """An input that a receiver in a given state must refuse with one error class."""

    name: str
    description: str
    #: Which end receives the input.
    receiver: Role
    #: Frames that bring the receiver's Connection into the needed state.
    prelude: tuple[PreludeStep, ...]
    #: The hex fed to the receiver after the prelude.
    input: str
    #: Whether the stream ends (``receive_data(b"")``) after the input.
    eof: bool
    #: How many events (not NEED_DATA) the input gives before the error is raised.
    events_before_error: int

    @property
    def input_bytes(self) -> bytes:
        """The input bytes."""
        return bytes.fromhex(self.input)

    def to_json(self) -> dict[str, Any]:
        """The JSON form of this case."""
        return {
            "name": self.name,
            "description": self.description,
            "receiver": self.receiver.value,
            "prelude": [step.to_json() for step in self.prelude],
            "input": self.input,
            "eof": self.eof,
            "events_before_error": self.events_before_error,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ErrorCase:
        """Parse one case of an error vector file."""
        return cls(
            name=str(data["name"]),
            description=str(data["description"]),
            receiver=Role(data["receiver"]),
            prelude=tuple(PreludeStep.from_json(step) for step in data["prelude"]),
            input=str(data["input"]),
            eof=bool(data["eof"]),
            events_before_error=int(data["events_before_error"]),
        )


@dataclass(frozen=True, slots=True)
class ErrorVectors:
    """The vectors of one error class (one ``errors/*.json`` file)."""

    #: The exception class name (``frproto.<error>``).
    error: str
    #: Its wire code.
    code: int
    #: The ``ErrorCode`` member name of the code.
    code_name: str
    cases: tuple[ErrorCase, ...]

    @property
    def error_class(self) -> type[RemoteProtocolError]:
        """The exception class these vectors are for."""
        cls = getattr(frproto, self.error)
        if not (isinstance(cls, type) and issubclass(cls, RemoteProtocolError)):
            raise TypeError(f"{self.error} is not a RemoteProtocolError subclass")
        return cls

    @property
    def file_name(self) -> str:
        """The file name of these vectors (``<snake_case_error_class>.json``)."""
        return f"{snake_case(self.error)}.json"

    def to_json(self) -> dict[str, Any]:
        """The JSON form of the file."""
        return {
            "error": self.error,
            "code": self.code,
            "code_name": self.code_name,
            "cases": [case.to_json() for case in self.cases],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ErrorVectors:
        """Parse an error vector file."""
        return cls(
            error=str(data["error"]),
            code=int(data["code"]),
            code_name=str(data["code_name"]),
            cases=tuple(ErrorCase.from_json(case) for case in data["cases"]),
        )


# -- Loading -------------------------------------------------------------------------------------


def dump_json(data: dict[str, Any]) -> str:
    """The exact text of a vector file: sorted keys, indent 2, a final newline."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=True) + "\n"


def _json_files(directory: Path) -> Iterator[Path]:
    return iter(sorted(directory.glob("*.json")))


def _load(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def load_message_vectors(directory: Path | None = None) -> list[MessageVectors]:
    """Every message vector file under ``directory`` (default: the checked-in vectors)."""
    base = (directory or VECTORS_DIR) / MESSAGES_SUBDIR
    return [MessageVectors.from_json(_load(path)) for path in _json_files(base)]


def load_error_vectors(directory: Path | None = None) -> list[ErrorVectors]:
    """Every error vector file under ``directory`` (default: the checked-in vectors)."""
    base = (directory or VECTORS_DIR) / ERRORS_SUBDIR
    return [ErrorVectors.from_json(_load(path)) for path in _json_files(base)]


def message_cases(
    vectors: Iterable[MessageVectors] | None = None,
) -> list[tuple[MessageVectors, MessageCase]]:
    """Every (file, case) pair of the message vectors, flattened."""
    files = load_message_vectors() if vectors is None else vectors
    return [(v, case) for v in files for case in v.cases]


def error_cases(
    vectors: Iterable[ErrorVectors] | None = None,
) -> list[tuple[ErrorVectors, ErrorCase]]:
    """Every (file, case) pair of the error vectors, flattened."""
    files = load_error_vectors() if vectors is None else vectors
    return [(v, case) for v in files for case in v.cases]


def all_frames(directory: Path | None = None) -> list[bytes]:
    """Every frame and input in the vectors, for seeding a fuzz corpus (sorted, unique)."""
    frames: set[bytes] = set()
    for _, mcase in message_cases(load_message_vectors(directory)):
        frames.add(mcase.frame)
    for _, ecase in error_cases(load_error_vectors(directory)):
        frames.update(step.frame for step in ecase.prelude)
        frames.add(ecase.input_bytes)
    return sorted(frames)


# -- Replaying ---------------------------------------------------------------------------------


class PreludeFailed(AssertionError):
    """A prelude step did not do what it must (a broken vector or a changed library)."""


def run_prelude(conn: Connection, steps: Sequence[PreludeStep]) -> None:
    """Bring ``conn`` into a case's state.

    A ``recv`` step is fed to ``conn`` and must give exactly its message and then
    NEED_DATA; a ``send`` step is decoded and passed to ``conn.send``, whose output must be
    the step's bytes.

    Raises:
        PreludeFailed: a step went otherwise.
    """
    for index, step in enumerate(steps):
        frame = step.frame
        expected = frproto.codec.decode_frame(frame)
        if not isinstance(expected, Message):
            raise PreludeFailed(f"step {index}: an unknown tag cannot be a prelude step")
        if step.dir == "send":
            out = conn.send(expected)
            if out != frame:
                raise PreludeFailed(f"step {index}: send gave {out.hex()}, not {step.hex}")
            continue
        conn.receive_data(frame)
        event = conn.next_event()
        if not _same_event(event, expected):
            raise PreludeFailed(f"step {index}: received {event!r}, expected {expected!r}")
        after = conn.next_event()
        if after is not NEED_DATA:
            raise PreludeFailed(f"step {index}: a second event {after!r}")


def _same_event(event: Event | object, expected: Message) -> bool:
    if isinstance(event, frproto.Chunk) and isinstance(expected, frproto.Chunk):
        return frproto.jsonable.message_to_dict(event) == frproto.jsonable.message_to_dict(expected)
    return event == expected


@dataclass(slots=True)
class FeedResult:
    """What a receiver made of some input: the events and the error that ended them."""

    events: list[Event]
    error: RemoteProtocolError | None


def _drain(conn: Connection, events: list[Event]) -> None:
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return
        assert not isinstance(event, frproto.NeedData)
        events.append(event)
        if isinstance(event, frproto.ConnectionClosed):
            return


def feed(conn: Connection, data: bytes, *, eof: bool, byte_at_a_time: bool = False) -> FeedResult:
    """Feed ``data`` (then EOF when ``eof``) and pull every event until NEED_DATA or an error.

    With ``byte_at_a_time`` the data goes in one byte per ``receive_data`` call, and the
    events are pulled after each one.
    """
    events: list[Event] = []
    pieces = [data[i : i + 1] for i in range(len(data))] if byte_at_a_time else [data]
    try:
        for piece in pieces:
            if piece:
                conn.receive_data(piece)
                _drain(conn, events)
        if eof:
            conn.receive_data(b"")
        _drain(conn, events)
    except RemoteProtocolError as exc:
        return FeedResult(events, exc)
    return FeedResult(events, None)


def run_error_case(
    case: ErrorCase, *, byte_at_a_time: bool = False
) -> tuple[Connection, FeedResult]:
    """A fresh receiver, the case's prelude run, and the result of feeding the input."""
    conn = Connection(case.receiver)
    run_prelude(conn, case.prelude)
    return conn, feed(conn, case.input_bytes, eof=case.eof, byte_at_a_time=byte_at_a_time)


# -- Building preludes -------------------------------------------------------------------------


def handshake(
    receiver: Role,
    recovery_type: RecoveryType = RecoveryType.STANDALONE,
    compression: frproto.Compression = frproto.Compression.NONE,
    version: tuple[int, int] = frproto.limits.PROTOCOL_VERSION,
) -> list[PreludeStep]:
    """Negotiation, seen from ``receiver``: the connection ends up READY, with
    ``compression`` chosen (the request offers both algorithms), at ``version``."""
    request = frproto.NegotiateRequest(version=version)
    response = frproto.NegotiateResponse(
        recovery_type=recovery_type,
        compression=compression,
        server_name=CONTEXT_SERVER,
        version=version,
    )
    if receiver is Role.RECOVERY:
        return [PreludeStep.of("recv", request), PreludeStep.of("send", response)]
    return [PreludeStep.of("send", request), PreludeStep.of("recv", response)]


def open_session(
    receiver: Role,
    vmid: uuid.UUID = CONTEXT_VMID,
    disks: tuple[DiskInfo, ...] = CONTEXT_DISKS,
    compression: frproto.Compression = frproto.Compression.NONE,
    version: tuple[int, int] = frproto.limits.PROTOCOL_VERSION,
) -> list[PreludeStep]:
    """Negotiation (choosing ``compression``, at ``version``) and a RelationshipOpen
    accepted: the connection ends up in SESSION."""
    opening = frproto.RelationshipOpen(vmid, generation=1)
    accepted = frproto.RelationshipAccepted(vmid, disks, generation=1)
    primary_side: Direction = "send" if receiver is Role.PRIMARY else "recv"
    recovery_side: Direction = "recv" if receiver is Role.PRIMARY else "send"
    return [
        *handshake(receiver, compression=compression, version=version),
        PreludeStep.of(primary_side, opening),
        PreludeStep.of(recovery_side, accepted),
    ]


def message_context(
    message: Message, chunks: Sequence[frproto.Chunk] = ()
) -> tuple[Role, list[PreludeStep]]:
    """The receiver of ``message`` and a prelude after which it may receive it.

    Session messages are taken for the relationship of their own VMID, opened with
    :data:`CONTEXT_DISKS`; a Chunk for one of :data:`CONTEXT_VMID`. An IREnd or a BatchEnd
    with ``chunk_count`` n is preceded by the first n of ``chunks`` (the convention of the
    vectors: their aggregate digest is that of the first n Chunk vectors).

    Raises:
        ValueError: ``chunks`` holds fewer chunks than an IREnd or BatchEnd counts.
    """
    primary, recovery = Role.PRIMARY, Role.RECOVERY
    m = message
    if isinstance(m, frproto.NegotiateRequest):
        return recovery, []
    if isinstance(m, frproto.NegotiateResponse):
        return primary, [PreludeStep.of("send", frproto.NegotiateRequest())]
    if isinstance(m, frproto.QueryRecoveryServer):
        return recovery, handshake(recovery, RecoveryType.CLUSTERING_BROKER)
    if isinstance(m, frproto.QueryRecoveryServerResponse):
        query = frproto.QueryRecoveryServer(m.vmid, "vm")
        return primary, [
            *handshake(primary, RecoveryType.CLUSTERING_BROKER),
            PreludeStep.of("send", query),
        ]
    if isinstance(m, frproto.Error):
        # The usual way in: the recovery side refuses a request.
        opening = frproto.RelationshipOpen(CONTEXT_VMID, generation=1)
        return primary, [*handshake(primary), PreludeStep.of("send", opening)]
    if isinstance(m, (frproto.Keepalive, frproto.RelationshipCreate, frproto.RelationshipOpen)):
        return recovery, handshake(recovery)
    if isinstance(m, frproto.RelationshipAccepted):
        opening = frproto.RelationshipOpen(m.vmid, m.generation)
        return primary, [*handshake(primary), PreludeStep.of("send", opening)]
    if isinstance(
        m,
        (
            frproto.IRBegin,
            frproto.BatchBegin,
            frproto.DigestMapRequest,
            frproto.RelationshipDelete,
            frproto.FailoverRequest,
        ),
    ):
        return recovery, open_session(recovery, m.vmid)
    if isinstance(m, frproto.Chunk):
        begin = frproto.BatchBegin(CONTEXT_VMID, sequence=1, base_sequence=0, chunk_count=1)
        return recovery, [*open_session(recovery), PreludeStep.of("recv", begin)]
    if isinstance(m, (frproto.IREnd, frproto.BatchEnd)):
        if m.chunk_count > len(chunks):
            raise ValueError(f"{m!r} counts {m.chunk_count} chunks, {len(chunks)} given")
        start: Message
        if isinstance(m, frproto.IREnd):
            start = frproto.IRBegin(m.vmid, sequence=m.sequence)
        else:
            start = frproto.BatchBegin(m.vmid, m.sequence, m.sequence - 1, m.chunk_count)
        sent = [PreludeStep.of("recv", chunk) for chunk in chunks[: m.chunk_count]]
        return recovery, [*open_session(recovery, m.vmid), PreludeStep.of("recv", start), *sent]
    if isinstance(m, frproto.Ack):
        empty = frproto.codec.AggregateDigest().digest()
        steps: list[Message]
        if m.kind is frproto.AckKind.RELATIONSHIP_DELETED:
            steps = [frproto.RelationshipDelete(m.vmid)]
        elif m.kind is frproto.AckKind.IR_COMPLETE:
            steps = [
                frproto.IRBegin(m.vmid, sequence=m.sequence),
                frproto.IREnd(m.vmid, m.sequence, 0, empty),
            ]
        else:
            steps = [
                frproto.BatchBegin(m.vmid, m.sequence, m.sequence - 1, 0),
                frproto.BatchEnd(m.vmid, m.sequence, 0, empty),
            ]
        return primary, [
            *open_session(primary, m.vmid),
            *(PreludeStep.of("send", s) for s in steps),
        ]
    if isinstance(m, frproto.DigestMap):
        request = frproto.DigestMapRequest(
            m.vmid, m.disk_index, m.block_size, m.offset, m.block_count
        )
        return primary, [*open_session(primary, m.vmid), PreludeStep.of("send", request)]
    if isinstance(m, frproto.FailoverDone):
        asked = frproto.FailoverRequest(m.vmid, m.sequence, 4096, bytes(16))
        return primary, [*open_session(primary, m.vmid), PreludeStep.of("send", asked)]
    if isinstance(m, frproto.FailoverAsk):
        # Answering the primary's RelationshipOpen, before its RelationshipAccepted.
        opening = frproto.RelationshipOpen(m.vmid, generation=1)
        return primary, [*handshake(primary), PreludeStep.of("send", opening)]
    if isinstance(m, frproto.FailoverDecline):
        opening = frproto.RelationshipOpen(m.vmid, generation=1)
        accepted = frproto.RelationshipAccepted(m.vmid, CONTEXT_DISKS, generation=1)
        return recovery, [
            *handshake(recovery),
            PreludeStep.of("recv", opening),
            PreludeStep.of("send", frproto.FailoverAsk(m.vmid)),
            PreludeStep.of("send", accepted),
        ]
    raise TypeError(f"no context for {type(m).__name__}")
