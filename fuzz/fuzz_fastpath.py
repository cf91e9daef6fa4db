"""Fuzz harness: the struct fast paths against their Construct schemas.

``frproto.codec`` has each frame layout as Construct; the per-frame hot path uses
``struct`` instead (``ENVELOPE`` for the 8-byte envelope, ``CHUNK_HEADER`` for the 32-byte
chunk header). Invariants checked by :func:`check`, on ``data[:8]`` and ``data[:32]``:

* parsing: the fast path and the schema give the same field values, or both refuse a
  short input (``struct.error`` and a Construct ``StreamError``);
* building: packing the parsed fields gives the input bytes back, with both.

Run: ``.venv/bin/python fuzz/fuzz_fastpath.py fuzz/corpus/fastpath`` (see README.md).
"""

from __future__ import annotations

import struct
import sys
from typing import Any

import construct

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports(include=["frproto"]):
        from frproto.codec import CHUNK_HEADER, CHUNK_HEADER_SCHEMA, ENVELOPE, ENVELOPE_SCHEMA
else:
    from frproto.codec import CHUNK_HEADER, CHUNK_HEADER_SCHEMA, ENVELOPE, ENVELOPE_SCHEMA

_ENVELOPE_FIELDS = ("reserved", "tag", "length")
_CHUNK_FIELDS = ("disk_index", "flags", "offset", "length", "digest")


def _compare(
    raw: bytes, fast: struct.Struct, schema: Any, names: tuple[str, ...], what: str
) -> None:
    try:
        fast_values: tuple[Any, ...] | None = fast.unpack_from(raw)
    except struct.error:
        fast_values = None
    try:
        parsed = schema.parse(raw)
    except construct.StreamError:
        parsed = None
    if fast_values is None or parsed is None:
        if (fast_values is None) != (parsed is None):
            raise AssertionError(
                f"{what}: struct {fast_values!r} vs Construct {parsed!r} on {raw.hex()}"
            )
        if len(raw) >= fast.size:
            raise AssertionError(f"{what}: refused a full-size input {raw.hex()}")
        return
    schema_values = tuple(parsed[name] for name in names)
    if fast_values != schema_values:
        raise AssertionError(
            f"{what}: struct {fast_values!r} != Construct {schema_values!r} on {raw.hex()}"
        )
    packed = fast.pack(*fast_values)
    built = bytes(schema.build(dict(zip(names, schema_values, strict=True))))
    if packed != raw[: fast.size] or built != packed:
        raise AssertionError(
            f"{what}: rebuild differs: input {raw.hex()}, struct {packed.hex()}, "
            f"Construct {built.hex()}"
        )
    if schema.sizeof() != fast.size:
        raise AssertionError(f"{what}: sizes {schema.sizeof()} != {fast.size}")


def check(data: bytes) -> None:
    """The fast-path invariants on one input (raises AssertionError on a difference)."""
    _compare(data[: ENVELOPE.size], ENVELOPE, ENVELOPE_SCHEMA, _ENVELOPE_FIELDS, "envelope")
    _compare(data[: CHUNK_HEADER.size], CHUNK_HEADER, CHUNK_HEADER_SCHEMA, _CHUNK_FIELDS, "chunk")


def TestOneInput(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
