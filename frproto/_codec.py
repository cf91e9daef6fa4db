"""Stateless framing: one message to one frame and back, with the envelope checks.

:class:`Connection` uses :func:`check_envelope` for every frame it receives. The two
public functions are for tools that work on frames without a conversation: golden
vectors, the fuzzers, the conformance harness and the out-of-band IR file.
"""

from __future__ import annotations

from typing import Final

from ._chunks import decode_chunk, encode_chunk_header
from ._enums import IGNORABLE_TAG_BIT, LEGACY_RELATIONSHIP_DELETE, MessageTag
from ._errors import FrameTooLarge, ReservedNotZero, TrailingBytes, TruncatedFrame, UnknownTag
from ._failover import FailoverAsk, FailoverDecline, FailoverDone, FailoverRequest
from ._messages import (
    Error,
    Keepalive,
    Message,
    NegotiateRequest,
    NegotiateResponse,
    QueryRecoveryServer,
    QueryRecoveryServerResponse,
)
from ._replication import (
    Ack,
    BatchBegin,
    BatchEnd,
    Chunk,
    DigestMap,
    DigestMapRequest,
    IRBegin,
    IREnd,
    RelationshipAccepted,
    RelationshipCreate,
    RelationshipDelete,
    RelationshipOpen,
)
from ._wire import ENVELOPE, Bytes
from .limits import CHUNK_HEADER_SIZE, ENVELOPE_SIZE, MAX_CHUNK_DATA, MAX_CONTROL_BODY

#: Every tag this version decodes: the MessageTag values and the tag RelationshipDelete
#: had before 1.1 (a connection at 1.0 still carries it, NEG-15).
KNOWN_TAGS: Final = frozenset(int(t) for t in MessageTag) | {LEGACY_RELATIONSHIP_DELETE}

#: Every message class by tag.
MESSAGE_CLASSES: Final[dict[MessageTag, type[Message]]] = {
    cls.TAG: cls
    for cls in (
        NegotiateRequest,
        NegotiateResponse,
        QueryRecoveryServer,
        QueryRecoveryServerResponse,
        Error,
        Keepalive,
        RelationshipCreate,
        RelationshipOpen,
        RelationshipAccepted,
        RelationshipDelete,
        IRBegin,
        IREnd,
        BatchBegin,
        Chunk,
        BatchEnd,
        Ack,
        DigestMapRequest,
        DigestMap,
        FailoverRequest,
        FailoverDone,
        FailoverAsk,
        FailoverDecline,
    )
}


def message_tag(tag: int) -> MessageTag:
    """The MessageTag of a known wire tag (the legacy RelationshipDelete tag is
    RelationshipDelete's)."""
    if tag == LEGACY_RELATIONSHIP_DELETE:
        return MessageTag.RELATIONSHIP_DELETE
    return MessageTag(tag)


def check_envelope(
    reserved: int,
    tag: int,
    length: int,
    *,
    max_chunk_data: int = MAX_CHUNK_DATA,
    max_control_body: int = MAX_CONTROL_BODY,
) -> None:
    """Refuse an envelope before its body is read.

    Raises:
        ReservedNotZero, UnknownTag (a critical tag this version does not know),
        FrameTooLarge (a length over the limit for the tag).
    """
    if reserved:
        raise ReservedNotZero(f"envelope reserved field is {reserved:#06x}, not 0")
    if tag == MessageTag.CHUNK:
        limit = CHUNK_HEADER_SIZE + max_chunk_data
    elif tag in KNOWN_TAGS or tag & IGNORABLE_TAG_BIT:
        limit = max_control_body
    else:
        raise UnknownTag(f"unknown critical tag {tag:#06x}")
    if length > limit:
        raise FrameTooLarge(f"tag {tag:#06x} with a body of {length} bytes; limit {limit}")


def decode_body(tag: MessageTag, body: Bytes) -> Message:
    """Decode the body of a known tag (a Chunk's data is verified against its digest)."""
    if tag is MessageTag.CHUNK:
        return decode_chunk(memoryview(body), max_data=MAX_CHUNK_DATA)
    return MESSAGE_CLASSES[tag].decode_body(body)


def encode_frame(message: Message) -> bytes:
    """The frame (envelope and body) of ``message``, outside any conversation.

    A Chunk is framed as it is, uncompressed (or ZERO when its flags say so).
    """
    if isinstance(message, Chunk):
        payload = b"" if message.is_zero else bytes(message.data)
        flags = message.flags & message.flags.ZERO
        header = encode_chunk_header(
            message.disk_index, message.offset, message.length, flags, message.digest, len(payload)
        )
        return header + payload
    body = message.encode_body()
    return ENVELOPE.pack(0, message.TAG, len(body)) + body


def decode_frame(data: Bytes) -> Message | tuple[int, bytes]:
    """Decode exactly one frame, with every check a connection makes on a lone frame.

    Returns the message, or ``(tag, body)`` for an ignorable tag this version does not
    know. State-dependent checks (order, chunk bounds, counts) need a
    :class:`Connection`.

    Raises:
        RemoteProtocolError: the subclass for each malformed-input class.
    """
    view = memoryview(data)
    if len(view) < ENVELOPE_SIZE:
        raise TruncatedFrame(f"{len(view)} bytes, an envelope needs {ENVELOPE_SIZE}")
    reserved, tag, length = ENVELOPE.unpack_from(view)
    check_envelope(reserved, tag, length)
    end = ENVELOPE_SIZE + length
    if len(view) < end:
        raise TruncatedFrame(
            f"frame declares {length} body bytes, {len(view) - ENVELOPE_SIZE} present"
        )
    if len(view) > end:
        raise TrailingBytes(f"{len(view) - end} bytes after the frame")
    body = view[ENVELOPE_SIZE:end]
    if tag not in KNOWN_TAGS:
        return (tag, bytes(body))
    return decode_body(message_tag(tag), body)
