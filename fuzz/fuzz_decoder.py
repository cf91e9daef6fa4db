"""Fuzz harness: ``frproto.codec.decode_frame`` on arbitrary bytes.

Invariants checked by :func:`check`:

* ``decode_frame`` raises nothing but :class:`frproto.RemoteProtocolError` subclasses
  (anything else, including ``LocalProtocolError``, is a bug and a crash here);
* every accepted control frame re-encodes to exactly the input:
  ``encode_frame(decode_frame(x)) == x`` (an ignorable unknown tag comes back as
  ``(tag, body)`` and is re-framed by hand). The one documented lossy case is an Error
  whose text was not UTF-8 (the decoder replaces bad bytes): there the re-encoded frame
  must decode to the same message;
* an accepted Chunk has a defined flag value (none, or exactly one of ZERO/ZSTD/LZ4);
* an accepted Chunk (whose payload may have been compressed on the wire) re-encodes,
  uncompressed, to a frame that decodes to the same fields and data; an uncompressed
  Chunk frame re-encodes byte for byte.

Run: ``.venv/bin/python fuzz/fuzz_decoder.py fuzz/corpus/decoder`` (libFuzzer flags
accepted; see fuzz/README.md).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports(include=["frproto"]):
        import frproto
        from frproto.codec import ENVELOPE
else:
    import frproto
    from frproto.codec import ENVELOPE


#: NONE, ZERO, ZSTD, LZ4: the only flag values version 1 defines (at most one bit).
_VALID_CHUNK_FLAGS = frozenset({0x0000, 0x0001, 0x0002, 0x0004})


def _chunk_fields(chunk: frproto.Chunk) -> tuple[int, int, int, bytes, bool, bytes]:
    return (
        chunk.disk_index,
        chunk.offset,
        chunk.length,
        bytes(chunk.digest),
        chunk.is_zero,
        bytes(chunk.data),
    )


def _check_chunk(data: bytes, chunk: frproto.Chunk) -> None:
    if int(chunk.flags) not in _VALID_CHUNK_FLAGS:
        raise AssertionError(f"accepted a Chunk with flags {int(chunk.flags):#06x}")
    encoded = frproto.codec.encode_frame(chunk)
    again = frproto.codec.decode_frame(encoded)
    if not isinstance(again, frproto.Chunk):
        raise AssertionError(f"re-encoded Chunk decodes as {again!r}")
    if _chunk_fields(again) != _chunk_fields(chunk):
        raise AssertionError(f"Chunk fields changed by re-encoding: {chunk!r} -> {again!r}")
    if not chunk.flags & (frproto.ChunkFlags.ZSTD | frproto.ChunkFlags.LZ4) and encoded != data:
        raise AssertionError("uncompressed Chunk frame does not re-encode byte for byte")
    if len(chunk.data) != (0 if chunk.is_zero else chunk.length):
        raise AssertionError(f"Chunk data of {len(chunk.data)} bytes for {chunk!r}")


def check(data: bytes) -> None:
    """The decoder invariants on one input (raises AssertionError or the stray error)."""
    try:
        decoded = frproto.codec.decode_frame(data)
    except frproto.RemoteProtocolError:
        return
    if isinstance(decoded, tuple):
        tag, body = decoded
        if not tag & frproto.codec.IGNORABLE_TAG_BIT:
            raise AssertionError(f"critical tag {tag:#06x} returned as unknown")
        if ENVELOPE.pack(0, tag, len(body)) + body != data:
            raise AssertionError("unknown ignorable frame does not re-frame to the input")
        return
    if isinstance(decoded, frproto.Chunk):
        _check_chunk(data, decoded)
        return
    encoded = frproto.codec.encode_frame(decoded)
    if encoded == data:
        return
    # A RelationshipDelete under its 1.0 tag decodes to the message its 1.1 tag encodes
    # (NEG-15); the rest of the frame must be the same.
    legacy = frproto.codec.LEGACY_RELATIONSHIP_DELETE
    as_legacy = data[2:4] == legacy.to_bytes(2, "big")
    if isinstance(decoded, frproto.RelationshipDelete) and as_legacy and encoded[4:] == data[4:]:
        return
    # Bad UTF-8 in an Error's text is replaced on purpose; the result must be stable.
    lossy_text = isinstance(decoded, frproto.Error) and "\ufffd" in decoded.text
    if lossy_text and frproto.codec.decode_frame(encoded) == decoded:
        return
    raise AssertionError(
        f"{type(decoded).__name__} does not re-encode to its frame:\n"
        f"  input     {data.hex()}\n  re-encoded {encoded.hex()}"
    )


def TestOneInput(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
