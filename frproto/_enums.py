"""Enumerations that appear on the wire.

Every enum here is an ``IntEnum``/``IntFlag`` whose values *are* the bytes on the wire;
``docs/protocol.md`` ("Enumerations") documents the same numbers. A value that is not a
member is refused by the decoder with :class:`frproto.BadValue`.
"""

from __future__ import annotations

import enum


class Role(enum.Enum):
    """Which end of a connection we are."""

    #: The primary server: opens the connection, sends replication data.
    PRIMARY = "primary"
    #: The recovery side: a stand-alone recovery server, a recovery node or a broker's CAP.
    RECOVERY = "recovery"


class MessageTag(enum.IntEnum):
    """The tag type of each message (envelope bytes 2-3).

    Bit 15 (``0x8000``) marks a tag a receiver may ignore if it does not know it; every
    tag of version 1.0 is critical (bit clear), every tag that 1.1 adds is ignorable
    (NEG-9): :data:`TAG_MINOR` says which minor version brought each tag.
    """

    NEGOTIATE_REQUEST = 0x0001
    NEGOTIATE_RESPONSE = 0x0002
    QUERY_RECOVERY_SERVER = 0x0003
    QUERY_RECOVERY_SERVER_RESPONSE = 0x0004
    ERROR = 0x0005
    KEEPALIVE = 0x0006
    RELATIONSHIP_CREATE = 0x0010
    RELATIONSHIP_OPEN = 0x0011
    RELATIONSHIP_ACCEPTED = 0x0012
    #: Version 1.1 (NEG-9). Releases before 1.1 sent it as critical ``0x0013``, which a
    #: connection at 1.0 still carries (:data:`LEGACY_RELATIONSHIP_DELETE`).
    RELATIONSHIP_DELETE = 0x8013
    IR_BEGIN = 0x0020
    IR_END = 0x0021
    BATCH_BEGIN = 0x0030
    CHUNK = 0x0031
    BATCH_END = 0x0032
    ACK = 0x0033
    DIGEST_MAP_REQUEST = 0x0040
    DIGEST_MAP = 0x0041
    #: Version 1.1: planned failover (section 4.19, 4.20 of ``docs/protocol.md``).
    FAILOVER_REQUEST = 0x8050
    FAILOVER_DONE = 0x8051
    #: Version 1.1: a failover asked at the cluster (section 4.21, 4.22).
    FAILOVER_ASK = 0x8052
    FAILOVER_DECLINE = 0x8053


#: The tag RelationshipDelete had before 1.1 (critical): sent and accepted only on a
#: connection whose negotiated version is 1.0 (NEG-15), so that 1.0 peers are still served.
LEGACY_RELATIONSHIP_DELETE = 0x0013

#: The minor version that brought each tag (1.0 for every tag not listed).
TAG_MINOR: dict[MessageTag, int] = {
    MessageTag.RELATIONSHIP_DELETE: 1,
    MessageTag.FAILOVER_REQUEST: 1,
    MessageTag.FAILOVER_DONE: 1,
    MessageTag.FAILOVER_ASK: 1,
    MessageTag.FAILOVER_DECLINE: 1,
}


#: Tag bit that lets a receiver skip a tag it does not know.
IGNORABLE_TAG_BIT = 0x8000


class RecoveryType(enum.IntEnum):
    """What answered a negotiation (patent: "recovery type")."""

    STANDALONE = 1
    CLUSTERING_BROKER = 2
    CLUSTER_NODE = 3


class VersionVerdict(enum.IntEnum):
    """Whether the primary's protocol version is acceptable."""

    COMPATIBLE = 1
    MISMATCH = 2


class AuthType(enum.IntEnum):
    """How the connection is authenticated (patent: "authentication type")."""

    #: Integrated (Kerberos) authentication. Defined for compatibility; not implemented.
    INTEGRATED = 1
    #: Mutual TLS with X.509 certificates.
    CERTIFICATE = 2


class Compression(enum.IntEnum):
    """One compression type, as chosen in a NegotiateResponse."""

    NONE = 0
    ZSTD = 1
    LZ4 = 2


class CompressionSet(enum.IntFlag):
    """The compression types a primary offers (a bit set)."""

    ZSTD = 0x0001
    LZ4 = 0x0002


class Encryption(enum.IntEnum):
    """One encryption level, as chosen in a NegotiateResponse."""

    #: No encryption of the stream (only for an explicitly configured trusted network).
    NONE = 0
    #: The stream runs inside TLS 1.3.
    TLS13 = 1


class EncryptionSet(enum.IntFlag):
    """The encryption levels a primary offers (a bit set)."""

    NONE = 0x0001
    TLS13 = 0x0002


class ExistingVM(enum.IntEnum):
    """QueryRecoveryServerResponse's "existing VM" field.

    The patent's existing-VM flag, with a distinct value for a VM that the cluster held
    and that an administrator deleted: the primary must then stop and ask for a person
    instead of seeding a new replica.
    """

    NEW = 1
    EXISTING = 2
    DELETED = 3


class IRState(enum.IntEnum):
    """Initial replication state of a relationship, as a recovery server reports it."""

    NOT_STARTED = 0
    IN_PROGRESS = 1
    COMPLETE = 2


class AckKind(enum.IntEnum):
    """What an Ack acknowledges."""

    IR_COMPLETE = 1
    BATCH_APPLIED = 2
    #: The replica is removed and the relationship closed (answers RelationshipDelete).
    RELATIONSHIP_DELETED = 3


class ChunkFlags(enum.IntFlag):
    """Flags of a chunk frame. At most one of the three may be set."""

    NONE = 0
    #: The range is all zeros; the payload is empty.
    ZERO = 0x0001
    #: The payload is a zstd frame of the data.
    ZSTD = 0x0002
    #: The payload is an LZ4 block of the data.
    LZ4 = 0x0004


#: All chunk flag bits defined in version 1.
KNOWN_CHUNK_FLAGS = ChunkFlags.ZERO | ChunkFlags.ZSTD | ChunkFlags.LZ4


#: The offer bit of each compression type (what a NegotiateResponse may choose).
COMPRESSION_OFFER_BIT = {Compression.ZSTD: CompressionSet.ZSTD, Compression.LZ4: CompressionSet.LZ4}
#: The offer bit of each encryption level.
ENCRYPTION_OFFER_BIT = {Encryption.NONE: EncryptionSet.NONE, Encryption.TLS13: EncryptionSet.TLS13}
