"""frproto: the failover-replication wire protocol, without I/O.

A primary server and a recovery server (stand-alone, cluster node, or the cluster's
clustering broker at its CAP) talk through :class:`Connection`, which turns bytes into
events and messages into bytes, in the style of h11, h2 and wsproto. Each message's
bytes are defined once, by the field table of its class, and documented in
``docs/protocol.md``.

The top level holds the conversation: :class:`Connection` and its events, the messages,
the enumerations that appear in them, and the exceptions. Three public modules hold the
rest:

* :mod:`frproto.limits`: the protocol version and every size limit;
* :mod:`frproto.codec`: frames without a conversation (``encode_frame``,
  ``decode_frame``), digests, the tag and error-code registries, the struct fast paths;
* :mod:`frproto.jsonable`: messages as JSON-able dicts and one-line descriptions.

The only module that does I/O is :mod:`frproto.trio_io`, which is not imported here.

Quick look::

    from frproto import Connection, Role, NegotiateRequest, NEED_DATA

    primary = Connection(Role.PRIMARY)
    wire = primary.send(NegotiateRequest())
    recovery = Connection(Role.RECOVERY)
    recovery.receive_data(wire)
    assert isinstance(recovery.next_event(), NegotiateRequest)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import codec as codec
from . import jsonable as jsonable
from . import limits as limits
from ._connection import (
    NEED_DATA,
    Connection,
    ConnectionClosed,
    ConnectionConfig,
    Event,
    NeedData,
    UnknownMessage,
)
from ._deprecated import add_old_methods, moved
from ._enums import (
    AckKind,
    AuthType,
    ChunkFlags,
    Compression,
    CompressionSet,
    Encryption,
    EncryptionSet,
    ExistingVM,
    IRState,
    MessageTag,
    RecoveryType,
    Role,
    VersionVerdict,
)
from ._errors import (
    AlreadyExists,
    BadCompressedData,
    BadName,
    BadValue,
    BadVMID,
    Busy,
    ChunkOutOfRange,
    CountMismatch,
    DigestMismatch,
    ErrorCode,
    FrameTooLarge,
    FrprotoError,
    InternalError,
    LocalProtocolError,
    MalformedMessage,
    NoSpace,
    NotAuthorized,
    NotSupported,
    OutOfSequence,
    ProtocolError,
    ProtocolMismatch,
    RemoteProtocolError,
    ReplicationError,
    ReservedNotZero,
    TrailingBytes,
    TruncatedFrame,
    UnexpectedMessage,
    UnknownTag,
    UnknownVM,
    VMDeleted,
    VMNotHere,
    closes_connection,
)
from ._failover import FailoverAsk, FailoverDecline, FailoverDone, FailoverRequest
from ._messages import (
    DiskInfo,
    Error,
    Keepalive,
    Message,
    NegotiateRequest,
    NegotiateResponse,
    QueryRecoveryServer,
    QueryRecoveryServerResponse,
    error_from_message,
)
from ._negotiation import ServerPolicy, answer_negotiation, refuse_negotiation
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
from ._state import State

if TYPE_CHECKING:
    # The moved names, for type checkers only: at run time they come from __getattr__
    # below, with a DeprecationWarning.
    from .codec import ERROR_CLASSES as ERROR_CLASSES
    from .codec import IGNORABLE_TAG_BIT as IGNORABLE_TAG_BIT
    from .codec import MESSAGE_CLASSES as MESSAGE_CLASSES
    from .codec import AggregateDigest as AggregateDigest
    from .codec import chunk_digest as chunk_digest
    from .codec import decode_frame as decode_frame
    from .codec import encode_frame as encode_frame
    from .codec import error_class_for as error_class_for
    from .codec import zero_digest as zero_digest
    from .jsonable import describe as describe
    from .jsonable import message_from_dict as message_from_dict
    from .jsonable import message_to_dict as message_to_dict
    from .limits import CHUNK_HEADER_SIZE as CHUNK_HEADER_SIZE
    from .limits import DIGEST_SIZE as DIGEST_SIZE
    from .limits import ENVELOPE_SIZE as ENVELOPE_SIZE
    from .limits import MAX_BLOCK_SIZE as MAX_BLOCK_SIZE
    from .limits import MAX_CHUNK_DATA as MAX_CHUNK_DATA
    from .limits import MAX_CONFIG_BLOB as MAX_CONFIG_BLOB
    from .limits import MAX_CONTROL_BODY as MAX_CONTROL_BODY
    from .limits import MAX_DIGESTS as MAX_DIGESTS
    from .limits import MAX_DISK_ID as MAX_DISK_ID
    from .limits import MAX_DISKS as MAX_DISKS
    from .limits import MAX_ERROR_TEXT as MAX_ERROR_TEXT
    from .limits import MAX_FQDN as MAX_FQDN
    from .limits import MAX_NAME as MAX_NAME
    from .limits import MIN_BLOCK_SIZE as MIN_BLOCK_SIZE
    from .limits import PROTOCOL_VERSION as PROTOCOL_VERSION

__version__ = "0.1.0"

__all__ = [
    "NEED_DATA",
    "Ack",
    "AckKind",
    "AlreadyExists",
    "AuthType",
    "BadCompressedData",
    "BadName",
    "BadVMID",
    "BadValue",
    "BatchBegin",
    "BatchEnd",
    "Busy",
    "Chunk",
    "ChunkFlags",
    "ChunkOutOfRange",
    "Compression",
    "CompressionSet",
    "Connection",
    "ConnectionClosed",
    "ConnectionConfig",
    "CountMismatch",
    "DigestMap",
    "DigestMapRequest",
    "DigestMismatch",
    "DiskInfo",
    "Encryption",
    "EncryptionSet",
    "Error",
    "ErrorCode",
    "Event",
    "ExistingVM",
    "FrameTooLarge",
    "FrprotoError",
    "IRBegin",
    "IREnd",
    "IRState",
    "InternalError",
    "FailoverAsk",
    "FailoverDecline",
    "FailoverDone",
    "FailoverRequest",
    "Keepalive",
    "LocalProtocolError",
    "MalformedMessage",
    "Message",
    "MessageTag",
    "NeedData",
    "NegotiateRequest",
    "NegotiateResponse",
    "NoSpace",
    "NotAuthorized",
    "NotSupported",
    "OutOfSequence",
    "ProtocolError",
    "ProtocolMismatch",
    "QueryRecoveryServer",
    "QueryRecoveryServerResponse",
    "RecoveryType",
    "RelationshipAccepted",
    "RelationshipCreate",
    "RelationshipDelete",
    "RelationshipOpen",
    "RemoteProtocolError",
    "ReplicationError",
    "ReservedNotZero",
    "Role",
    "ServerPolicy",
    "State",
    "TrailingBytes",
    "TruncatedFrame",
    "UnexpectedMessage",
    "UnknownMessage",
    "UnknownTag",
    "UnknownVM",
    "VMDeleted",
    "VMNotHere",
    "VersionVerdict",
    "answer_negotiation",
    "closes_connection",
    "error_from_message",
    "refuse_negotiation",
]

# The names that moved to frproto.limits, .codec and .jsonable, and the exceptions'
# to_message()/error, still work for one release, with a DeprecationWarning.
add_old_methods()


def __getattr__(name: str) -> Any:
    return moved(name)
