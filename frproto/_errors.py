"""One exception hierarchy for the whole protocol; each class carries its wire error code.

The shape follows h11 and h2:

* :class:`FrprotoError` is the root. Every class has a class-level ``code`` from
  :class:`ErrorCode` (the wire registry) and a ``message``; ``Error.from_exception``
  (beside the Error message, in ``_messages``) turns any instance into the Error that
  reports it to the peer, and ``error_from_message`` turns a received Error back into
  its exception. This module imports nothing of the messages (h11's rule).
* :class:`LocalProtocolError`: *we* tried something illegal (sent a message the state
  table forbids, built an invalid message). It is a bug in the caller.
* :class:`RemoteProtocolError`: the *peer* sent something illegal or malformed. Each
  malformed-input class has its own subclass, and its ``code`` (the "event hint") is
  what to report back, with ``Connection.send_error(exc)``, before closing.
* :class:`ReplicationError`: a well-formed request that the recovery side refuses (not
  authorized, VM not here, out of sequence...). Servers raise these and send them
  (``Connection.send_error``); clients get them back from ``error_from_message``.

One kind is raised inside, the class is swapped at the boundary (h11's move): every
check raises the specific ``RemoteProtocolError`` subclass, and only building a message
and :meth:`Connection.send` turn it into a ``LocalProtocolError``.

Any other exception escaping :meth:`Connection.next_event` is a bug in frproto.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class ErrorCode(enum.IntEnum):
    """The wire error-code registry (u16). ``docs/protocol.md`` lists the same table.

    Codes 1-99 are refusals of well-formed requests; 100-199 are protocol violations
    after which the connection closes.
    """

    OK = 0
    PROTOCOL_MISMATCH = 1
    NOT_AUTHORIZED = 2
    VM_NOT_HERE = 3
    VM_DELETED = 4
    UNKNOWN_VM = 5
    OUT_OF_SEQUENCE = 6
    BUSY = 7
    INTERNAL = 8
    EXISTS = 9
    NOT_SUPPORTED = 10
    NO_SPACE = 11

    MALFORMED = 100
    TRUNCATED = 101
    FRAME_TOO_LARGE = 102
    UNKNOWN_TAG = 103
    BAD_VALUE = 104
    TRAILING_BYTES = 105
    DIGEST_MISMATCH = 106
    BAD_VMID = 107
    BAD_NAME = 108
    UNEXPECTED_MESSAGE = 109
    CHUNK_OUT_OF_RANGE = 110
    BAD_COMPRESSED_DATA = 111
    RESERVED_NOT_ZERO = 112
    COUNT_MISMATCH = 113


class FrprotoError(Exception):
    """Root of every error frproto raises.

    ``message`` is the text an Error reporting it carries to the peer
    (:meth:`Error.from_exception`); ``detail``, if given, is for the local log only (a
    path, the system's words): ``str(exc)`` shows both, the wire never shows ``detail``
    (ERR-11).
    """

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message if detail is None else f"{message} ({detail})")
        self.message = message
        self.detail = detail


class ProtocolError(FrprotoError):
    """A violation of the protocol; abstract, raise a subclass."""

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract; raise a subclass")
        super().__init__(message, detail=detail)


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug in the caller)."""

    code = ErrorCode.INTERNAL


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids; the connection must close.

    Report it to the peer before closing: ``Connection.send_error(exc)`` sends an Error
    with its ``code`` and ``message``.
    """

    code = ErrorCode.MALFORMED


class MalformedMessage(RemoteProtocolError):
    """A body that does not decode to a valid message for another reason."""

    code = ErrorCode.MALFORMED


class TruncatedFrame(RemoteProtocolError):
    """A header or body ends before its declared length (or the stream ended mid-frame)."""

    code = ErrorCode.TRUNCATED


class FrameTooLarge(RemoteProtocolError):
    """A tag length above the limit for its tag; refused before the body is buffered."""

    code = ErrorCode.FRAME_TOO_LARGE


class UnknownTag(RemoteProtocolError):
    """A critical tag type this version does not know."""

    code = ErrorCode.UNKNOWN_TAG


class BadValue(RemoteProtocolError):
    """A field holds a value outside its enumeration or range."""

    code = ErrorCode.BAD_VALUE


class TrailingBytes(RemoteProtocolError):
    """A body longer than the message it carries."""

    code = ErrorCode.TRAILING_BYTES


class DigestMismatch(RemoteProtocolError):
    """A chunk's data (or a batch's chunks) does not match the digest sent with it."""

    code = ErrorCode.DIGEST_MISMATCH


class BadVMID(RemoteProtocolError):
    """A VMID that is not a valid GUID (nil, all ones, or not the RFC 9562 variant)."""

    code = ErrorCode.BAD_VMID


class BadName(RemoteProtocolError):
    """A name that is empty, too long, not UTF-8, or holds a path separator or NUL."""

    code = ErrorCode.BAD_NAME


class UnexpectedMessage(RemoteProtocolError):
    """A message that the state table does not allow at this point."""

    code = ErrorCode.UNEXPECTED_MESSAGE


class ChunkOutOfRange(RemoteProtocolError):
    """A chunk for a disk that does not exist or that runs past the disk's end."""

    code = ErrorCode.CHUNK_OUT_OF_RANGE


class BadCompressedData(RemoteProtocolError):
    """A compressed payload that does not decompress to exactly the declared length."""

    code = ErrorCode.BAD_COMPRESSED_DATA


class ReservedNotZero(RemoteProtocolError):
    """The envelope's reserved field, or a reserved bit, is not zero."""

    code = ErrorCode.RESERVED_NOT_ZERO


class CountMismatch(RemoteProtocolError):
    """A batch or IR ends with a chunk count other than the one declared or sent."""

    code = ErrorCode.COUNT_MISMATCH


class ReplicationError(FrprotoError):
    """A well-formed request that the recovery side refuses."""


class ProtocolMismatch(ReplicationError):
    """The peers share no protocol version; the connection closes."""

    code = ErrorCode.PROTOCOL_MISMATCH


class NotAuthorized(ReplicationError):
    """The primary is not authorized for this recovery server, VM or storage."""

    code = ErrorCode.NOT_AUTHORIZED


class VMNotHere(ReplicationError):
    """This recovery node does not hold the VM (it moved); ask the broker again."""

    code = ErrorCode.VM_NOT_HERE


class VMDeleted(ReplicationError):
    """The replica was deleted by an administrator; do not re-seed without a person."""

    code = ErrorCode.VM_DELETED


class UnknownVM(ReplicationError):
    """No relationship exists for this VMID."""

    code = ErrorCode.UNKNOWN_VM


class OutOfSequence(ReplicationError):
    """A delta batch whose base is not the replica's applied sequence (a gap)."""

    code = ErrorCode.OUT_OF_SEQUENCE


class Busy(ReplicationError):
    """The recovery side cannot take this now; retry later."""

    code = ErrorCode.BUSY


class InternalError(ReplicationError):
    """The recovery side failed for a reason of its own."""

    code = ErrorCode.INTERNAL


class AlreadyExists(ReplicationError):
    """RelationshipCreate for a VM that already has a relationship."""

    code = ErrorCode.EXISTS


class NotSupported(ReplicationError):
    """A well-formed request for something this endpoint does not do."""

    code = ErrorCode.NOT_SUPPORTED


class NoSpace(ReplicationError):
    """The recovery side has no room to store this."""

    code = ErrorCode.NO_SPACE


def closes_connection(code: int) -> bool:
    """Whether an Error with ``code`` ends the conversation even where a refusal may come.

    Protocol violations (100 and up, including codes this version does not know) and
    PROTOCOL_MISMATCH close the connection; other codes are refusals of one request.
    """
    return code >= 100 or code == ErrorCode.PROTOCOL_MISMATCH


def _leaf_classes() -> dict[ErrorCode, type[FrprotoError]]:
    table: dict[ErrorCode, type[FrprotoError]] = {}
    stack: list[type[FrprotoError]] = [FrprotoError]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__ == __name__ and cls not in (
            FrprotoError,
            ProtocolError,
            LocalProtocolError,
            RemoteProtocolError,
            ReplicationError,
        ):
            table[cls.code] = cls
    return table


#: The exception class for each wire code (the reverse of ``cls.code``).
ERROR_CLASSES: dict[ErrorCode, type[FrprotoError]] = _leaf_classes()


def error_class_for(code: int) -> type[FrprotoError]:
    """The exception class for a wire code; unknown codes map to :class:`InternalError`."""
    try:
        return ERROR_CLASSES[ErrorCode(code)]
    except (ValueError, KeyError):
        return InternalError
