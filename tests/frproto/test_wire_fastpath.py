"""The struct fast paths in ``frproto.codec`` equal their Construct schemas, byte for byte."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

import frproto as fp
from frproto.codec import (
    CHUNK,
    CHUNK_FRAME_HEADER,
    CHUNK_HEADER,
    CHUNK_HEADER_SCHEMA,
    ENVELOPE,
    ENVELOPE_SCHEMA,
    encode_chunk_header,
)

from . import strategies as fs

ENVELOPES = st.tuples(fs.u16s, fs.u16s, fs.u32s)
CHUNK_HEADERS = st.tuples(fs.u16s, fs.u16s, fs.u64s, fs.u32s, fs.digests)


def test_sizes_match_the_limits() -> None:
    assert ENVELOPE.size == ENVELOPE_SCHEMA.sizeof() == fp.limits.ENVELOPE_SIZE
    assert CHUNK_HEADER.size == CHUNK_HEADER_SCHEMA.sizeof() == fp.limits.CHUNK_HEADER_SIZE
    assert CHUNK_FRAME_HEADER.size == fp.limits.ENVELOPE_SIZE + fp.limits.CHUNK_HEADER_SIZE


@given(ENVELOPES)
def test_envelope_build_equal(values: tuple[int, int, int]) -> None:
    reserved, tag, length = values
    built = ENVELOPE_SCHEMA.build({"reserved": reserved, "tag": tag, "length": length})
    assert ENVELOPE.pack(*values) == built


@given(st.binary(min_size=8, max_size=8))
def test_envelope_parse_equal(raw: bytes) -> None:
    parsed = ENVELOPE_SCHEMA.parse(raw)
    assert ENVELOPE.unpack(raw) == (parsed.reserved, parsed.tag, parsed.length)


@given(CHUNK_HEADERS)
def test_chunk_header_build_equal(values: tuple[int, int, int, int, bytes]) -> None:
    disk_index, flags, offset, length, digest = values
    fields = {
        "disk_index": disk_index,
        "flags": flags,
        "offset": offset,
        "length": length,
        "digest": digest,
    }
    assert CHUNK_HEADER.pack(*values) == CHUNK_HEADER_SCHEMA.build(fields)
    assert CHUNK_HEADER.pack(*values) == CHUNK.build({**fields, "payload": b""})


@given(st.binary(min_size=32, max_size=32), st.binary(max_size=64))
def test_chunk_header_parse_equal(raw: bytes, payload: bytes) -> None:
    parsed = CHUNK_HEADER_SCHEMA.parse(raw)
    fast = CHUNK_HEADER.unpack(raw)
    assert fast == (parsed.disk_index, parsed.flags, parsed.offset, parsed.length, parsed.digest)
    whole = CHUNK.parse(raw + payload)
    assert CHUNK_HEADER.unpack_from(raw + payload) == fast
    assert (whole.disk_index, whole.flags, whole.offset, whole.length, whole.digest) == fast
    assert whole.payload == payload


@given(ENVELOPES, CHUNK_HEADERS)
def test_chunk_frame_header_is_envelope_plus_chunk_header(
    envelope: tuple[int, int, int], header: tuple[int, int, int, int, bytes]
) -> None:
    packed = CHUNK_FRAME_HEADER.pack(*envelope, *header)
    env_fields = dict(zip(("reserved", "tag", "length"), envelope, strict=True))
    names = ("disk_index", "flags", "offset", "length", "digest")
    hdr_fields = dict(zip(names, header, strict=True))
    assert packed == ENVELOPE_SCHEMA.build(env_fields) + CHUNK_HEADER_SCHEMA.build(hdr_fields)
    assert CHUNK_FRAME_HEADER.unpack(packed) == (*envelope, *header)
    env = ENVELOPE_SCHEMA.parse(packed[:8])
    hdr = CHUNK_HEADER_SCHEMA.parse(packed[8:])
    assert (env.reserved, env.tag, env.length) == envelope
    assert (hdr.disk_index, hdr.flags, hdr.offset, hdr.length, hdr.digest) == header


@settings(max_examples=100)
@given(
    fs.u16s,
    fs.u64s,
    st.integers(1, fp.limits.MAX_CHUNK_DATA),
    st.sampled_from(fp.ChunkFlags),
    fs.digests,
    st.binary(max_size=300),
)
def test_encode_chunk_header_parses_with_construct(
    disk_index: int,
    offset: int,
    length: int,
    flags: fp.ChunkFlags,
    digest: bytes,
    payload: bytes,
) -> None:
    frame = encode_chunk_header(disk_index, offset, length, flags, digest, len(payload)) + payload
    envelope = ENVELOPE_SCHEMA.parse(frame[:8])
    assert envelope.reserved == 0
    assert envelope.tag == fp.MessageTag.CHUNK
    assert envelope.length == len(frame) - 8 == fp.limits.CHUNK_HEADER_SIZE + len(payload)
    body = CHUNK.parse(frame[8:])
    assert body.disk_index == disk_index
    assert body.flags == flags
    assert body.offset == offset
    assert body.length == length
    assert body.digest == digest
    assert body.payload == payload


@settings(max_examples=60)
@given(fs.chunks())
def test_encode_frame_of_chunk_matches_construct(chunk: fp.Chunk) -> None:
    frame = fp.codec.encode_frame(chunk)
    body = CHUNK.parse(frame[8:])
    assert (body.disk_index, body.offset, body.length, body.digest) == (
        chunk.disk_index,
        chunk.offset,
        chunk.length,
        chunk.digest,
    )
    assert body.flags == (fp.ChunkFlags.ZERO if chunk.is_zero else 0)
    assert body.payload == bytes(chunk.data)
