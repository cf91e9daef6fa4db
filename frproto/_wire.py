"""The frame layouts written out by hand: the envelope and the chunk header.

Every frame starts with the 8-byte envelope; a Chunk body starts with a fixed 32-byte
header. Both are defined here as Construct schemas and as the ``struct`` fast paths the
per-frame code uses; ``tests/frproto/test_wire_fastpath.py`` (and the ``fastpath`` fuzz
harness) check the two byte for byte against each other on generated inputs.

The body of every other message is generated from that message's field table (see
``_fields`` and the message classes in ``_messages`` and ``_replication``);
``docs/protocol.md`` describes all the layouts in tables. Chunk payloads never pass
through Construct: the :data:`CHUNK` schema documents the layout, but the decoder takes
the fixed header with ``CHUNK_HEADER.unpack_from`` and hands the payload out as a
``memoryview`` slice.

Integers are unsigned and big-endian (network byte order).
"""

from __future__ import annotations

import struct
from typing import Any, Final, TypeAlias

from construct import Bytes as FixedBytes
from construct import Construct, GreedyBytes, Int16ub, Int32ub, Int64ub, Struct

#: Any buffer of bytes that frproto accepts as input.
Bytes: TypeAlias = bytes | bytearray | memoryview
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

# -- The Chunk frame ----------------------------------------------------------------------

#: The Chunk body, for documentation and differential tests. Decoding uses
#: ``CHUNK_HEADER`` and never parses the payload with Construct.
CHUNK: Final[Schema] = Struct(
    "disk_index" / Int16ub,
    "flags" / Int16ub,  # ChunkFlags
    "offset" / Int64ub,
    "length" / Int32ub,  # uncompressed length
    "digest" / FixedBytes(16),  # XXH3-128 of the uncompressed data
    "payload" / GreedyBytes,
)
#: Just the fixed part of CHUNK, as Construct (what the struct fast path must equal).
CHUNK_HEADER_SCHEMA: Final[Schema] = Struct(
    "disk_index" / Int16ub,
    "flags" / Int16ub,
    "offset" / Int64ub,
    "length" / Int32ub,
    "digest" / FixedBytes(16),
)
#: The chunk header fast path.
CHUNK_HEADER: Final = struct.Struct(">HHQI16s")
#: Envelope and chunk header in one pack, for the sender.
CHUNK_FRAME_HEADER: Final = struct.Struct(">HHIHHQI16s")
