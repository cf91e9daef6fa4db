"""Frames without a conversation: one message to one frame and back, digests, fast paths.

For tools that work on frames rather than on a :class:`~frproto.Connection`: the golden
vectors, the fuzzers, the conformance harness, the out-of-band IR file and the
benchmarks. A connection does all of this itself.

* :func:`encode_frame` / :func:`decode_frame`: one message to one frame and back, with
  every check a connection makes on a lone frame.
* :func:`chunk_digest`, :func:`zero_digest`, :class:`AggregateDigest`: the XXH3-128
  digests a chunk, a ZERO chunk and the end of an IR or batch carry.
* :func:`state_digest`: the digest of a VM's whole state a FailoverRequest carries.
* :data:`LEGACY_RELATIONSHIP_DELETE`, :data:`TAG_MINOR`: which minor version brought a tag.
* The two registries: :data:`MESSAGE_CLASSES` (tag to message class) and
  :data:`ERROR_CLASSES` / :func:`error_class_for` (wire error code to exception class).
* The chunk fast path (:func:`encode_chunk_header`, :func:`compress`) and the
  hand-written frame layouts, each as a ``struct`` fast path and as the Construct
  schema it must equal: ``ENVELOPE``/``ENVELOPE_SCHEMA``, ``CHUNK_HEADER``/
  ``CHUNK_HEADER_SCHEMA``, ``CHUNK`` (a whole Chunk body) and ``CHUNK_FRAME_HEADER``
  (envelope and chunk header in one pack).
"""

from __future__ import annotations

from ._chunks import AggregateDigest, chunk_digest, compress, encode_chunk_header, zero_digest
from ._codec import MESSAGE_CLASSES, decode_frame, encode_frame
from ._enums import IGNORABLE_TAG_BIT, LEGACY_RELATIONSHIP_DELETE, TAG_MINOR
from ._errors import ERROR_CLASSES, error_class_for
from ._failover import state_digest
from ._wire import (
    CHUNK,
    CHUNK_FRAME_HEADER,
    CHUNK_HEADER,
    CHUNK_HEADER_SCHEMA,
    ENVELOPE,
    ENVELOPE_SCHEMA,
)

__all__ = [
    "CHUNK",
    "CHUNK_FRAME_HEADER",
    "CHUNK_HEADER",
    "CHUNK_HEADER_SCHEMA",
    "ENVELOPE",
    "ENVELOPE_SCHEMA",
    "ERROR_CLASSES",
    "IGNORABLE_TAG_BIT",
    "LEGACY_RELATIONSHIP_DELETE",
    "MESSAGE_CLASSES",
    "TAG_MINOR",
    "AggregateDigest",
    "chunk_digest",
    "compress",
    "decode_frame",
    "encode_chunk_header",
    "encode_frame",
    "error_class_for",
    "state_digest",
    "zero_digest",
]
