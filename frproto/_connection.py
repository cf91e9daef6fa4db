"""The sans-I/O connection: bytes in, events out; messages in, bytes out.

``Connection`` never touches a socket, a clock or a file. The I/O layer (for Trio,
``frproto.trio_io``) feeds it what it reads with :meth:`Connection.receive_data`, pulls
events with :meth:`Connection.next_event` until it gets :data:`NEED_DATA`, and writes
what :meth:`Connection.send` and :meth:`Connection.send_chunk` return.

Parsing is lazy, one event per ``next_event`` call (h11, not h2's eager list), so the
state never moves past an event the caller has not seen.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Final, final

from ._buffer import ReceiveBuffer
from ._chunks import (
    COMPRESSION_FLAGS,
    check_outgoing,
    chunk_digest,
    compress,
    decode_chunk,
    encode_chunk_header,
    zero_digest,
)
from ._codec import KNOWN_TAGS, check_envelope, decode_body, message_tag
from ._enums import (
    LEGACY_RELATIONSHIP_DELETE,
    ChunkFlags,
    Compression,
    MessageTag,
    RecoveryType,
    Role,
)
from ._errors import (
    FrameTooLarge,
    FrprotoError,
    LocalProtocolError,
    RemoteProtocolError,
    TruncatedFrame,
    UnexpectedMessage,
)
from ._messages import DiskInfo, Error, Message, NegotiateResponse
from ._replication import BatchEnd, Chunk, DigestMapRequest, IREnd
from ._session import SessionTracker
from ._state import IllegalTransition, State, error_outcome, next_state
from ._wire import ENVELOPE, Bytes
from .limits import CHUNK_HEADER_SIZE, ENVELOPE_SIZE, MAX_CHUNK_DATA, MAX_CONTROL_BODY

_ZEROS = bytes(MAX_CHUNK_DATA)
_CHUNK_TAG: Final = int(MessageTag.CHUNK)  # a plain int compares faster than the IntEnum
_ZERO: Final = ChunkFlags.ZERO
_NONE: Final = ChunkFlags.NONE


@final
class NeedData:
    """Sentinel type: :meth:`Connection.next_event` needs more bytes to go on."""

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`Connection.next_event` when more bytes are needed.
NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """Event: the peer closed its side cleanly, between frames."""


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """Event: a message with an ignorable tag this version does not know (skipped)."""

    tag: int
    body: bytes


#: What :meth:`Connection.next_event` can return.
Event = Message | ConnectionClosed | UnknownMessage


@dataclass(frozen=True, slots=True)
class ConnectionConfig:
    """Limits and options of one connection.

    Attributes:
        max_chunk_data: largest chunk accepted (at most ``MAX_CHUNK_DATA``).
        max_control_body: largest control message body accepted.
        verify_digests: check every received chunk against its digest (leave on; only
            benchmarks of the framing alone turn it off).
    """

    max_chunk_data: int = MAX_CHUNK_DATA
    max_control_body: int = MAX_CONTROL_BODY
    verify_digests: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.max_chunk_data <= MAX_CHUNK_DATA:
            raise ValueError(f"max_chunk_data must be 1-{MAX_CHUNK_DATA}")
        if not 0 < self.max_control_body <= MAX_CONTROL_BODY:
            raise ValueError(f"max_control_body must be 1-{MAX_CONTROL_BODY}")


class Connection:
    """One end of a frproto conversation, without I/O.

    Args:
        our_role: ``Role.PRIMARY`` for the side that sends replication data,
            ``Role.RECOVERY`` for a recovery server, node or broker.
        config: limits; the defaults are the protocol's maxima.
    """

    def __init__(self, our_role: Role, config: ConnectionConfig | None = None) -> None:
        self.our_role = our_role
        self.their_role = Role.RECOVERY if our_role is Role.PRIMARY else Role.PRIMARY
        self.config = config or ConnectionConfig()
        self._state = State.IDLE
        self._buffer = ReceiveBuffer()
        self._eof = False
        self._negotiated: NegotiateResponse | None = None
        self._session = SessionTracker()
        # Copies of the config for the per-chunk path (attribute reads cost there).
        self._max_chunk_data = self.config.max_chunk_data
        self._max_chunk_body = CHUNK_HEADER_SIZE + self.config.max_chunk_data
        self._verify = self.config.verify_digests
        self._compression = Compression.NONE

    # -- what the connection knows -----------------------------------------------------------

    @property
    def state(self) -> State:
        """Where the conversation is (see ``frproto._state``)."""
        return self._state

    @property
    def negotiated(self) -> NegotiateResponse | None:
        """The NegotiateResponse, once sent or received."""
        return self._negotiated

    @property
    def recovery_type(self) -> RecoveryType | None:
        """What the recovery side said it is, once negotiated."""
        return self._negotiated.recovery_type if self._negotiated else None

    @property
    def compression(self) -> Compression:
        """The negotiated compression (NONE before negotiation)."""
        return self._compression

    @property
    def vmid(self) -> uuid.UUID | None:
        """The VM whose relationship is open on this connection, if any."""
        return self._session.vmid

    @property
    def disks(self) -> tuple[DiskInfo, ...]:
        """The open relationship's disks, as the recovery server reported them."""
        return self._session.disks

    @property
    def aggregate_digest(self) -> bytes:
        """Aggregate digest of the chunks of the current IR or batch so far (to end one,
        :meth:`end_ir` and :meth:`end_batch` build the whole message)."""
        return self._session.aggregate_digest

    def digest_map_size(self, request: DigestMapRequest) -> int:
        """How many digests the DigestMap answering ``request`` must hold (the range is
        cut at the disk's end); for the recovery side building its answer."""
        return self._session.expected_blocks(request)

    @property
    def chunk_count(self) -> int:
        """Chunks in the current IR or batch so far (see :meth:`end_ir`, :meth:`end_batch`)."""
        return self._session.chunk_count

    def end_ir(self) -> IREnd:
        """The IREnd for the IR in progress: its VM, sequence, and the count and aggregate
        digest of the chunks sent so far (received so far, on the recovery side).

        It is built, not sent: pass it to :meth:`send`.

        Raises:
            LocalProtocolError: no IR is in progress.
        """
        if self._state is not State.IR:
            raise LocalProtocolError(f"no IR in progress (state {self._state.name})")
        return self._session.end(IREnd)

    def end_batch(self) -> BatchEnd:
        """The BatchEnd for the batch in progress (as :meth:`end_ir` for an IR).

        Raises:
            LocalProtocolError: no batch is in progress.
        """
        if self._state is not State.BATCH:
            raise LocalProtocolError(f"no batch in progress (state {self._state.name})")
        return self._session.end(BatchEnd)

    # -- receiving ----------------------------------------------------------------------------

    def receive_data(self, data: Bytes) -> None:
        """Add bytes read from the peer; ``b""`` means the peer closed its side.

        The object is kept, not copied, when possible: do not modify it until
        :meth:`next_event` has returned NEED_DATA (chunk events may hold views of it).
        """
        if self._eof:
            raise LocalProtocolError("receive_data after end of stream")
        if len(data) == 0:
            self._eof = True
        else:
            self._buffer.feed(data)

    def frame_size(self, envelope: Bytes) -> int:
        """Check an envelope and return its frame's total size (envelope + body).

        For I/O layers that read whole frames before handing them over: call it on the
        first 8 bytes, so a hostile length is refused before the body is buffered.

        Raises:
            RemoteProtocolError: reserved not zero, unknown critical tag, or too large.
        """
        try:
            reserved, tag, length = ENVELOPE.unpack_from(envelope)
            self._check_envelope(reserved, tag, length)
        except RemoteProtocolError:
            self._state = State.ERROR
            raise
        return ENVELOPE_SIZE + int(length)

    def _check_envelope(self, reserved: int, tag: int, length: int) -> None:
        check_envelope(
            reserved,
            tag,
            length,
            max_chunk_data=self.config.max_chunk_data,
            max_control_body=self.config.max_control_body,
        )

    def next_event(self) -> Event | NeedData:
        """Parse and return the next event, or NEED_DATA.

        Returns a :class:`Message`, :class:`ConnectionClosed` (the peer ended the stream
        between frames), :class:`UnknownMessage`, or :data:`NEED_DATA`.

        Raises:
            RemoteProtocolError: the peer broke the protocol; report it with
                ``send_error(exc)`` before closing. The connection is then in ERROR
                and will raise again. Any other exception is a bug in frproto.
        """
        if self._state is State.ERROR:
            raise UnexpectedMessage("the peer already broke the protocol on this connection")
        try:
            return self._next_event()
        except RemoteProtocolError:
            self._state = State.ERROR
            raise

    def _next_event(self) -> Event | NeedData:
        buffer = self._buffer
        envelope = buffer.peek_envelope()
        if envelope is None:
            if not self._eof:
                return NEED_DATA
            if len(buffer):
                raise TruncatedFrame(f"stream ended inside an envelope ({len(buffer)} bytes)")
            if self._state is not State.CLOSED:
                self._state = State.CLOSED
            return ConnectionClosed()
        reserved, tag, length = envelope
        if tag != _CHUNK_TAG or reserved or length > self._max_chunk_body:
            self._check_envelope(reserved, tag, length)  # (a good Chunk envelope passes)
        total = ENVELOPE_SIZE + length
        if len(buffer) < total:
            if self._eof:
                raise TruncatedFrame(f"stream ended inside a frame of {total} bytes")
            return NEED_DATA
        if tag == _CHUNK_TAG:
            return self._receive_chunk(buffer.take_view(total, ENVELOPE_SIZE))
        body = buffer.take_bytes(total)[ENVELOPE_SIZE:]
        if tag not in KNOWN_TAGS:
            return UnknownMessage(tag, body)
        known = message_tag(tag)
        new_state = self._transition(self.their_role, known, legacy=tag != known)
        message = decode_body(known, body)
        if isinstance(message, Error):
            new_state = error_outcome(self._state, self.their_role, message.code)
        self._session.check(message)
        self._commit(new_state, message)
        return message

    def _receive_chunk(self, body: memoryview) -> Chunk:
        new_state = self._chunk_transition(self.their_role)
        chunk = decode_chunk(body, self._max_chunk_data, self._verify, self._compression)
        self._session.accept_chunk(chunk.disk_index, chunk.offset, chunk.length, chunk.digest)
        self._state = new_state
        return chunk

    @property
    def version_minor(self) -> int | None:
        """The negotiated minor version (None before a compatible negotiation)."""
        answer = self._negotiated
        return answer.version[1] if answer is not None and answer.ok else None

    def _transition(
        self,
        sender: Role,
        tag: MessageTag,
        error_code: int | None = None,
        *,
        legacy: bool = False,
    ) -> State:
        minor = self.version_minor
        try:
            if legacy:
                # RelationshipDelete's tag before 1.1 (NEG-15): only on a connection at 1.0,
                # where it stands for the 1.1 message.
                if minor != 0:
                    raise IllegalTransition(
                        f"tag {LEGACY_RELATIONSHIP_DELETE:#06x} (RelationshipDelete before "
                        f"1.1) on a connection at 1.{minor}"
                    )
                minor = None
            return next_state(
                self._state,
                sender,
                tag,
                self.recovery_type,
                error_code=error_code,
                version_minor=minor,
            )
        except IllegalTransition as exc:
            if sender is self.our_role:
                raise LocalProtocolError(f"cannot send: {exc}") from None
            raise UnexpectedMessage(str(exc)) from None

    def _chunk_transition(self, sender: Role) -> State:
        # Hot path: in IR and BATCH a primary's Chunk keeps the state, and no guard applies
        # to Chunk (the table says so); anything else goes through the table.
        state = self._state
        if (state is State.BATCH or state is State.IR) and sender is Role.PRIMARY:
            return state
        return self._transition(sender, MessageTag.CHUNK)

    def _commit(self, new_state: State, message: Message) -> None:
        self._session.apply(message)
        if isinstance(message, NegotiateResponse):
            self._negotiated = message
            if message.ok:
                self._compression = message.compression
            else:
                new_state = State.MUST_CLOSE
        self._state = new_state

    # -- sending ------------------------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """Bytes to write for ``message``.

        Raises:
            LocalProtocolError: the message is not allowed now, or does not fit what the
                connection knows (wrong VM, chunk out of range, counts or digest wrong).
        """
        if isinstance(message, Chunk):
            data = memoryview(_ZEROS)[: message.length] if message.is_zero else message.data
            pieces = self.send_chunk(
                message.disk_index, message.offset, data, digest=message.digest, compress_data=False
            )
            return b"".join(pieces)
        if self._state is State.ERROR and not isinstance(message, Error):
            raise LocalProtocolError("only an Error may be sent after a protocol violation")
        code = message.code if isinstance(message, Error) else None
        # A RelationshipDelete on a connection at 1.0 goes with its tag of then (NEG-15).
        legacy = message.TAG is MessageTag.RELATIONSHIP_DELETE and self.version_minor == 0
        new_state = self._transition(self.our_role, message.TAG, code, legacy=legacy)
        try:
            self._session.check(message)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"cannot send {type(message).__name__}: {exc}") from exc
        body = message.encode_body()
        if len(body) > MAX_CONTROL_BODY:
            raise LocalProtocolError(f"{type(message).__name__} body of {len(body)} bytes")
        self._commit(new_state, message)
        tag = LEGACY_RELATIONSHIP_DELETE if legacy else message.TAG
        return ENVELOPE.pack(0, tag, len(body)) + body

    def send_error(self, error: FrprotoError | Error) -> bytes:
        """Bytes of an Error message reporting ``error`` (allowed even in ERROR)."""
        return self.send(error if isinstance(error, Error) else Error.from_exception(error))

    def send_chunk(
        self,
        disk_index: int,
        offset: int,
        data: Bytes,
        *,
        digest: bytes | None = None,
        compress_data: bool = True,
    ) -> list[Bytes]:
        """Frame one chunk of the current IR or batch, passing the payload through.

        Returns ``[header, payload]`` (or just ``[header]`` for an all-zero range). When
        the data is sent uncompressed, ``payload`` *is* ``data``, the same object,
        uncopied: write both pieces in order.

        Args:
            digest: XXH3-128 of ``data`` if the caller has it already (digest once).
            compress_data: use the negotiated compression when it makes the data smaller.
        """
        length = data.nbytes if isinstance(data, memoryview) else len(data)
        if digest is None:
            digest = chunk_digest(data)
        new_state = self._chunk_transition(self.our_role)
        try:
            check_outgoing(disk_index, offset, length, digest)
            if length > self._max_chunk_data:
                raise FrameTooLarge(f"chunk of {length} bytes over {self._max_chunk_data}")
            self._session.accept_chunk(disk_index, offset, length, digest)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"cannot send chunk: {exc}") from exc
        self._state = new_state
        # startswith is a memcmp; comparing memoryviews goes element by element (2 ms/MiB).
        if digest == zero_digest(length) and _ZEROS.startswith(data):
            return [encode_chunk_header(disk_index, offset, length, _ZERO, digest, 0)]
        compression = self._compression
        if compress_data and compression is not Compression.NONE:
            packed = compress(data, compression)
            if packed is not None:
                flags = COMPRESSION_FLAGS[compression]
                header = encode_chunk_header(disk_index, offset, length, flags, digest, len(packed))
                return [header, packed]
        return [encode_chunk_header(disk_index, offset, length, _NONE, digest, length), data]
