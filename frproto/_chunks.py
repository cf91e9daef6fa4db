"""The chunk pipeline: the per-chunk hot path of IR and delta batches.

A chunk frame is the envelope, a fixed 32-byte header (disk index, flags, offset,
uncompressed length, XXH3-128 digest of the uncompressed data) and the payload. This
module packs and unpacks that header with ``struct`` (see ``_wire.CHUNK_HEADER`` and the
differential test that keeps it equal to the Construct schema), and checks a received
chunk *before* anyone may write it: flags, lengths, decompression bounded by the declared
length, and the digest.

Cost model (see ``bench/frame.py``): one XXH3-128 pass over the data per side, a struct
pack or unpack, and no copy of the payload. The sender passes the digest it already has
(the change tracker digested the block when it read it), so data is digested once.
"""

from __future__ import annotations

from typing import Final

import lz4.block
import xxhash
import zstandard

from ._enums import KNOWN_CHUNK_FLAGS, ChunkFlags, Compression, MessageTag
from ._errors import (
    BadCompressedData,
    BadValue,
    DigestMismatch,
    FrameTooLarge,
    MalformedMessage,
    TruncatedFrame,
)
from ._replication import Chunk
from ._wire import CHUNK_FRAME_HEADER, CHUNK_HEADER, Bytes
from .limits import CHUNK_HEADER_SIZE, DIGEST_SIZE, MAX_CHUNK_DATA

_digest = xxhash.xxh3_128_digest
_ZERO_DIGESTS: dict[int, bytes] = {}
_COMPRESSION_FLAG: Final = {
    Compression.NONE: ChunkFlags.NONE,
    Compression.ZSTD: ChunkFlags.ZSTD,
    Compression.LZ4: ChunkFlags.LZ4,
}
_NO_FLAGS: Final = ChunkFlags.NONE
_COMPRESSED_BITS: Final = int(ChunkFlags.ZSTD | ChunkFlags.LZ4)
# int(): on Python 3.11, ~ of an IntFlag keeps only the defined bits (so it would be 0).
_KNOWN_FLAG_BITS: Final = int(KNOWN_CHUNK_FLAGS)
_ZSTD_LEVEL: Final = 1  # zstd -1/1 is the only level near the TLS link's speed here


def chunk_digest(data: Bytes) -> bytes:
    """The XXH3-128 digest of ``data`` as carried in a chunk header (16 bytes, big-endian)."""
    return _digest(data)


def zero_digest(length: int) -> bytes:
    """The digest of ``length`` zero bytes (cached: zero ranges recur with a few sizes)."""
    found = _ZERO_DIGESTS.get(length)
    if found is None:
        if len(_ZERO_DIGESTS) > 64:
            _ZERO_DIGESTS.clear()
        found = _ZERO_DIGESTS[length] = _digest(bytes(length))
    return found


class AggregateDigest:
    """The digest of a batch or IR: XXH3-128 over its chunks' digests, in order."""

    __slots__ = ("_hasher", "count")

    def __init__(self) -> None:
        self._hasher = xxhash.xxh3_128()
        self.count = 0

    def add(self, digest: bytes) -> None:
        """Account for one more chunk."""
        self._hasher.update(digest)
        self.count += 1

    def digest(self) -> bytes:
        """The aggregate so far."""
        return self._hasher.digest()


def compress(data: Bytes, kind: Compression) -> bytes | None:
    """Compress ``data``, or return None when that would not make it smaller."""
    if kind is Compression.ZSTD:
        out = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(data)
    elif kind is Compression.LZ4:
        out = lz4.block.compress(data, store_size=False)
    else:
        return None
    return out if len(out) < len(data) else None


def encode_chunk_header(
    disk_index: int, offset: int, length: int, flags: ChunkFlags, digest: bytes, payload_len: int
) -> bytes:
    """Envelope plus chunk header for a payload of ``payload_len`` bytes."""
    return CHUNK_FRAME_HEADER.pack(
        0,
        MessageTag.CHUNK,
        CHUNK_HEADER_SIZE + payload_len,
        disk_index,
        flags,
        offset,
        length,
        digest,
    )


def check_outgoing(disk_index: int, offset: int, length: int, digest: bytes) -> None:
    """Refuse a chunk we are about to send that no receiver would accept."""
    if not 0 < length <= MAX_CHUNK_DATA:
        raise BadValue(f"chunk length {length} outside 1-{MAX_CHUNK_DATA}")
    if not 0 <= disk_index <= 0xFFFF or not 0 <= offset < 1 << 64:
        raise BadValue("disk index or offset out of range")
    if len(digest) != DIGEST_SIZE:
        raise BadValue(f"digest must be {DIGEST_SIZE} bytes")


def decode_chunk(
    body: memoryview,
    max_data: int = MAX_CHUNK_DATA,
    verify: bool = True,
    compression: Compression | None = None,
) -> Chunk:
    """Check and decode a Chunk body; the payload stays a slice of ``body``.

    ``compression`` is the one negotiated on the connection: a chunk compressed with
    another algorithm is refused (CHK-24; ``NONE`` refuses every compressed chunk).
    ``None`` (outside a conversation) takes either algorithm.

    Raises:
        TruncatedFrame: the body is shorter than the fixed header.
        BadValue / MalformedMessage / FrameTooLarge: inconsistent flags or lengths, or a
            compression that was not negotiated.
        BadCompressedData: the payload does not decompress to exactly ``length`` bytes.
        DigestMismatch: the data does not match the digest in the header.
    """
    if len(body) < CHUNK_HEADER_SIZE:
        raise TruncatedFrame(f"chunk body of {len(body)} bytes, header needs {CHUNK_HEADER_SIZE}")
    disk_index, raw_flags, offset, length, digest = CHUNK_HEADER.unpack_from(body)
    payload = body[CHUNK_HEADER_SIZE:]
    if not raw_flags and len(payload) == length and 0 < length <= max_data:
        # The common case, plain data, with every check of the general path below.
        if verify and _digest(payload) != digest:
            raise DigestMismatch(f"chunk at disk {disk_index} offset {offset}: digest mismatch")
        return Chunk(disk_index, offset, length, digest, payload, _NO_FLAGS)
    if raw_flags & ~_KNOWN_FLAG_BITS:
        raise BadValue(f"unknown chunk flag bits {raw_flags & ~_KNOWN_FLAG_BITS:#06x}")
    if raw_flags & (raw_flags - 1):
        raise BadValue(f"chunk flags {raw_flags:#06x} combine exclusive flags")
    if (
        compression is not None
        and raw_flags & _COMPRESSED_BITS
        and raw_flags != _COMPRESSION_FLAG[compression]
    ):
        raise BadValue(
            f"a {ChunkFlags(raw_flags).name} chunk on a connection that negotiated "
            f"{compression.name} compression"
        )
    if length == 0:
        raise MalformedMessage("chunk of length 0")
    if length > max_data:
        raise FrameTooLarge(f"chunk of {length} bytes, the limit is {max_data}")
    if raw_flags == 0:
        if len(payload) != length:
            raise MalformedMessage(f"payload of {len(payload)} bytes for length {length}")
        data: Bytes = payload
    elif raw_flags == ChunkFlags.ZERO:
        if payload:
            raise MalformedMessage("ZERO chunk with a payload")
        if verify and digest != zero_digest(length):
            raise DigestMismatch(f"ZERO chunk at {disk_index}:{offset} with a non-zero digest")
        return Chunk(disk_index, offset, length, digest, payload, ChunkFlags.ZERO)
    else:
        if not 0 < len(payload) <= length:
            raise MalformedMessage(f"compressed payload of {len(payload)} for length {length}")
        data = _decompress(payload, ChunkFlags(raw_flags), length)
    if verify and _digest(data) != digest:
        raise DigestMismatch(f"chunk at disk {disk_index} offset {offset}: digest mismatch")
    flags = _NO_FLAGS if raw_flags == 0 else ChunkFlags(raw_flags)  # skip the enum call
    return Chunk(disk_index, offset, length, digest, data, flags)


def _decompress(payload: memoryview, flags: ChunkFlags, length: int) -> bytes:
    # Both decoders are bounded by the declared length, so a small hostile payload
    # cannot expand into a large allocation.
    try:
        if flags is ChunkFlags.ZSTD:
            # zstandard ignores max_output_size when the frame declares its content size
            # and allocates what the frame claims, so the claim is checked first.
            declared = zstandard.frame_content_size(payload)
            if declared not in (-1, length):
                raise BadCompressedData(f"zstd frame declares {declared} bytes, not {length}")
            out = zstandard.ZstdDecompressor().decompress(
                payload, max_output_size=length, allow_extra_data=False
            )
        else:
            out = lz4.block.decompress(payload, uncompressed_size=length)
    except (zstandard.ZstdError, lz4.block.LZ4BlockError, ValueError, MemoryError) as exc:
        raise BadCompressedData(f"{flags.name} payload does not decompress: {exc}") from None
    if len(out) != length:
        raise BadCompressedData(f"{flags.name} payload gives {len(out)} bytes, not {length}")
    return out


COMPRESSION_FLAGS = _COMPRESSION_FLAG
