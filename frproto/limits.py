"""Protocol constants: the version we speak and every size limit a receiver enforces.

Each limit is checked *before* the bytes it guards are buffered or used, so a hostile
length can never make a receiver allocate or wait for more than these numbers allow.
``docs/protocol.md`` ("Limits") is the normative copy of this table.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CHUNK_HEADER_SIZE",
    "DIGEST_SIZE",
    "ENVELOPE_SIZE",
    "FRAME_TIMEOUT",
    "KEEPALIVE_INTERVAL",
    "MAX_BLOCK_SIZE",
    "MAX_CHUNK_DATA",
    "MAX_CONFIG_BLOB",
    "MAX_CONTROL_BODY",
    "MAX_DIGESTS",
    "MAX_DISKS",
    "MAX_DISK_ID",
    "MAX_ERROR_TEXT",
    "MAX_FQDN",
    "MAX_NAME",
    "MIN_BLOCK_SIZE",
    "NEGOTIATE_TIMEOUT",
    "PROTOCOL_VERSION",
    "READY_TIMEOUT",
    "SESSION_TIMEOUT",
]

#: The protocol version this library speaks, as (major, minor). Peers with a different
#: major version are incompatible; minor versions only add optional things.
PROTOCOL_VERSION: Final = (1, 1)

#: Bytes in the TLV envelope header: reserved (u16), tag type (u16), tag length (u32).
ENVELOPE_SIZE: Final = 8
#: Bytes in the fixed chunk header that follows the envelope of a Chunk frame.
CHUNK_HEADER_SIZE: Final = 32
#: Size of an XXH3-128 digest on the wire.
DIGEST_SIZE: Final = 16

#: Largest uncompressed chunk (and so the largest chunk payload).
MAX_CHUNK_DATA: Final = 4 * 1024 * 1024
#: Largest body of any control (non-Chunk) message.
MAX_CONTROL_BODY: Final = 2 * 1024 * 1024
#: Largest VM configuration blob carried by RelationshipCreate.
MAX_CONFIG_BLOB: Final = 1024 * 1024
#: Most disks a VM may have in one relationship.
MAX_DISKS: Final = 256
#: Longest VM name, in UTF-8 bytes.
MAX_NAME: Final = 255
#: Longest recovery server name (an FQDN or an IP literal), in bytes.
MAX_FQDN: Final = 253
#: Longest disk identifier, in bytes.
MAX_DISK_ID: Final = 64
#: Longest human-readable text in an Error message, in UTF-8 bytes.
MAX_ERROR_TEXT: Final = 1024
#: Most block digests in one DigestMap (64 Ki digests = 1 MiB of digests).
MAX_DIGESTS: Final = 65536
#: Smallest and largest block size a digest map may use.
MIN_BLOCK_SIZE: Final = 4096
MAX_BLOCK_SIZE: Final = MAX_CHUNK_DATA

# Deadlines (docs/protocol.md section 10.2), in seconds: the defaults, which a recovery
# side may configure (its own are what count on its connections).

#: The keepalive interval K: a primary sends a Keepalive when it sent nothing this long.
KEEPALIVE_INTERVAL: Final = 30
#: From the TCP connection to a complete NegotiateRequest, TLS handshake included.
NEGOTIATE_TIMEOUT: Final = 10
#: Nothing received for this long in READY (between frames): the recovery side closes.
READY_TIMEOUT: Final = 60
#: Nothing received for this long with a relationship open (SESSION, IR, BATCH).
SESSION_TIMEOUT: Final = 120
#: No byte for this long inside a frame.
FRAME_TIMEOUT: Final = 30
