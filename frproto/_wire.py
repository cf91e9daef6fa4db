"""The bytes: Construct schemas for every message, and the struct fast paths.

This module is the single definition of the wire format. ``docs/protocol.md`` describes
the same layouts in tables; ``tests/frproto/test_wire.py`` checks the two fast paths
(``ENVELOPE`` and ``CHUNK_HEADER`` as ``struct.Struct``) byte for byte against their
Construct schemas on generated inputs.

Conventions, for every schema below:

* Integers are unsigned and big-endian (network byte order).
* Byte strings are length-prefixed (``Prefixed(IntNub, GreedyBytes)``); text is UTF-8
  and decoded/checked in ``_validate``, not by Construct, so a bad encoding becomes a
  protocol error and never a ``UnicodeDecodeError``.
* Enumerations are plain integers here; the message classes turn them into ``IntEnum``
  members and refuse unknown values.
* Every body ends with ``Terminated``: a body longer than its message is an error.

Control messages are parsed with *plain* (never ``.compile()``-d) Construct, which is
safe on hostile input. Chunk payloads never pass through Construct: the Chunk body
schema below documents the layout, but the decoder takes the fixed header with
``CHUNK_HEADER.unpack_from`` and hands the payload out as a ``memoryview`` slice.
"""

from __future__ import annotations

import struct
from typing import Any, Final, TypeAlias

from construct import (
    Bytes,
    Construct,
    GreedyBytes,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    Prefixed,
    PrefixedArray,
    Struct,
    Terminated,
)

from ._enums import MessageTag

#: Any Construct schema (construct-typing makes Construct generic).
Schema: TypeAlias = "Construct[Any, Any]"

# -- The TLV envelope -------------------------------------------------------------------

#: Envelope: tag reserved, tag type, tag length (of the body that follows).
ENVELOPE_SCHEMA: Final[Schema] = Struct(
    "reserved" / Int16ub,
    "tag" / Int16ub,
    "length" / Int32ub,
)
#: The envelope as a struct fast path (runs once per frame).
ENVELOPE: Final = struct.Struct(">HHI")

# -- Common pieces ----------------------------------------------------------------------

_Vmid = Bytes(16)
_Digest = Bytes(16)
_ShortText = Prefixed(Int8ub, GreedyBytes)
_Text = Prefixed(Int16ub, GreedyBytes)

_Disk = Struct(
    "disk_id" / _ShortText,
    "size" / Int64ub,
)

# -- Negotiation and the broker query -----------------------------------------------------

NEGOTIATE_REQUEST: Final[Schema] = Struct(
    "version_major" / Int8ub,
    "version_minor" / Int8ub,
    "compression" / Int16ub,  # CompressionSet bits offered
    "encryption" / Int16ub,  # EncryptionSet bits offered
    "auth_type" / Int8ub,  # AuthType
    Terminated,
)

NEGOTIATE_RESPONSE: Final[Schema] = Struct(
    "status" / Int16ub,  # ErrorCode, OK = 0
    "verdict" / Int8ub,  # VersionVerdict
    "version_major" / Int8ub,
    "version_minor" / Int8ub,
    "recovery_type" / Int8ub,  # RecoveryType
    "compression" / Int8ub,  # Compression chosen
    "encryption" / Int8ub,  # Encryption chosen
    "auth_type" / Int8ub,  # AuthType chosen
    "server_name" / _ShortText,
    Terminated,
)

QUERY_RECOVERY_SERVER: Final[Schema] = Struct(
    "vmid" / _Vmid,
    "vm_name" / _Text,
    "disk_sizes" / PrefixedArray(Int16ub, Int64ub),
    Terminated,
)

QUERY_RECOVERY_SERVER_RESPONSE: Final[Schema] = Struct(
    "vmid" / _Vmid,
    "existing" / Int8ub,  # ExistingVM
    "port" / Int16ub,
    "server_name" / _ShortText,
    Terminated,
)

ERROR: Final[Schema] = Struct(
    "code" / Int16ub,  # ErrorCode; unknown codes are kept and treated as INTERNAL
    "text" / _Text,
    Terminated,
)

KEEPALIVE: Final[Schema] = Struct(
    "token" / Int64ub,
    Terminated,
)

# -- The replication session ----------------------------------------------------------------

RELATIONSHIP_CREATE: Final[Schema] = Struct(
    "vmid" / _Vmid,
    "vm_name" / _Text,
    "config" / Prefixed(Int32ub, GreedyBytes),
    "disks" / PrefixedArray(Int16ub, _Disk),
    Terminated,
)

RELATIONSHIP_OPEN: Final[Schema] = Struct(
    "vmid" / _Vmid,
    "generation" / Int32ub,
    Terminated,
)

RELATIONSHIP_ACCEPTED: Final[Schema] = Struct(
    "vmid" / _Vmid,
    "generation" / Int32ub,
    "ir_state" / Int8ub,  # IRState
    "applied_sequence" / Int64ub,
    "resume_disk" / Int16ub,
    "resume_offset" / Int64ub,
    "disks" / PrefixedArray(Int16ub, _Disk),
    Terminated,
)

RELATIONSHIP_DELETE: Final[Schema] = Struct(
    "vmid" / _Vmid,
    Terminated,
)

IR_BEGIN: Final[Schema] = Struct(
    "vmid" / _Vmid,
    "sequence" / Int64ub,
    "start_disk" / Int16ub,
    "start_offset" / Int64ub,
    "total_bytes" / Int64ub,
    Terminated,
)

IR_END: Final[Schema] = Struct(
    "vmid" / _Vmid,
    "sequence" / Int64ub,
    "chunk_count" / Int32ub,
    "aggregate_digest" / _Digest,
    Terminated,
)

BATCH_BEGIN: Final[Schema] = Struct(
    "vmid" / _Vmid,
    "sequence" / Int64ub,
    "base_sequence" / Int64ub,
    "chunk_count" / Int32ub,
    "total_bytes" / Int64ub,
    "captured_at_ms" / Int64ub,
    Terminated,
)

#: The Chunk body, for documentation and differential tests. Decoding uses
#: ``CHUNK_HEADER`` and never parses the payload with Construct.
CHUNK: Final[Schema] = Struct(
    "disk_index" / Int16ub,
    "flags" / Int16ub,  # ChunkFlags
    "offset" / Int64ub,
    "length" / Int32ub,  # uncompressed length
    "digest" / _Digest,  # XXH3-128 of the uncompressed data
    "payload" / GreedyBytes,
)
#: Just the fixed part of CHUNK, as Construct (what the struct fast path must equal).
CHUNK_HEADER_SCHEMA: Final[Schema] = Struct(
    "disk_index" / Int16ub,
    "flags" / Int16ub,
    "offset" / Int64ub,
    "length" / Int32ub,
    "digest" / _Digest,
)
#: The chunk header fast path.
CHUNK_HEADER: Final = struct.Struct(">HHQI16s")
#: Envelope and chunk header in one pack, for the sender.
CHUNK_FRAME_HEADER: Final = struct.Struct(">HHIHHQI16s")

BATCH_END: Final[Schema] = Struct(
    "vmid" / _Vmid,
    "sequence" / Int64ub,
    "chunk_count" / Int32ub,
    "aggregate_digest" / _Digest,
    Terminated,
)

ACK: Final[Schema] = Struct(
    "vmid" / _Vmid,
    "kind" / Int8ub,  # AckKind
    "sequence" / Int64ub,
    Terminated,
)

DIGEST_MAP_REQUEST: Final[Schema] = Struct(
    "vmid" / _Vmid,
    "disk_index" / Int16ub,
    "block_size" / Int32ub,
    "offset" / Int64ub,
    "block_count" / Int32ub,
    Terminated,
)

DIGEST_MAP: Final[Schema] = Struct(
    "vmid" / _Vmid,
    "disk_index" / Int16ub,
    "block_size" / Int32ub,
    "offset" / Int64ub,
    "digests" / Prefixed(Int32ub, GreedyBytes),  # block_count * 16 bytes
    Terminated,
)

#: The body schema of each tag.
SCHEMAS: Final[dict[MessageTag, Schema]] = {
    MessageTag.NEGOTIATE_REQUEST: NEGOTIATE_REQUEST,
    MessageTag.NEGOTIATE_RESPONSE: NEGOTIATE_RESPONSE,
    MessageTag.QUERY_RECOVERY_SERVER: QUERY_RECOVERY_SERVER,
    MessageTag.QUERY_RECOVERY_SERVER_RESPONSE: QUERY_RECOVERY_SERVER_RESPONSE,
    MessageTag.ERROR: ERROR,
    MessageTag.KEEPALIVE: KEEPALIVE,
    MessageTag.RELATIONSHIP_CREATE: RELATIONSHIP_CREATE,
    MessageTag.RELATIONSHIP_OPEN: RELATIONSHIP_OPEN,
    MessageTag.RELATIONSHIP_ACCEPTED: RELATIONSHIP_ACCEPTED,
    MessageTag.RELATIONSHIP_DELETE: RELATIONSHIP_DELETE,
    MessageTag.IR_BEGIN: IR_BEGIN,
    MessageTag.IR_END: IR_END,
    MessageTag.BATCH_BEGIN: BATCH_BEGIN,
    MessageTag.CHUNK: CHUNK,
    MessageTag.BATCH_END: BATCH_END,
    MessageTag.ACK: ACK,
    MessageTag.DIGEST_MAP_REQUEST: DIGEST_MAP_REQUEST,
    MessageTag.DIGEST_MAP: DIGEST_MAP,
}
