"""Messages as plain JSON-able dicts, and back (golden vectors, logs, the demo, conformance).

The form: ``{"type": "<ClassName>", ...fields}`` with UUIDs as strings, bytes as hex,
enums by member name, flag sets as lists of names, and an Error's ``code`` by name when
the registry knows it. :func:`describe` renders the same thing on one readable line.
"""

from __future__ import annotations

import enum
import typing
import uuid
from dataclasses import fields
from typing import Any

from ._codec import MESSAGE_CLASSES
from ._enums import ChunkFlags, MessageTag
from ._errors import ErrorCode
from ._messages import DiskInfo, Message
from ._replication import Chunk

__all__ = ["describe", "message_from_dict", "message_to_dict", "tag_name"]

_BY_NAME: dict[str, type[Message]] = {cls.__name__: cls for cls in MESSAGE_CLASSES.values()}


def _to_json(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, enum.IntFlag):
        return [m.name for m in type(value) if m.value and m in value]
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, DiskInfo):
        return {"disk_id": value.disk_id, "size": value.size}
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


def message_to_dict(message: Message) -> dict[str, Any]:
    """``message`` as a JSON-able dict (see the module docstring for the form)."""
    out: dict[str, Any] = {"type": type(message).__name__}
    if isinstance(message, Chunk):
        out.update(
            disk_index=message.disk_index,
            offset=message.offset,
            length=message.length,
            digest=bytes(message.digest).hex(),
            zero=message.is_zero,
            data=bytes(message.data).hex(),
        )
        return out
    for f in fields(message):  # type: ignore[arg-type]
        out[f.name] = _to_json(getattr(message, f.name))
    # Codes and statuses read best by name; unknown values stay numbers.
    for key in ("code", "status"):
        value = out.get(key)
        if isinstance(value, int) and value in ErrorCode._value2member_map_:
            out[key] = ErrorCode(value).name
    return out


def _from_json(kind: Any, value: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin is tuple:
        args = typing.get_args(kind)
        item = args[0]
        return tuple(_from_json(item, v) for v in value)
    if kind is uuid.UUID:
        return uuid.UUID(value)
    if kind is bytes:
        return bytes.fromhex(value)
    if kind is DiskInfo:
        return DiskInfo(value["disk_id"], value["size"])
    if isinstance(kind, type) and issubclass(kind, enum.IntFlag):
        result = kind(0)
        for name in value:
            result |= kind[name]
        return result
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return kind[value]
    return value


def message_from_dict(data: dict[str, Any]) -> Message:
    """The message that :func:`message_to_dict` described."""
    cls = _BY_NAME[data["type"]]
    if cls is Chunk:
        payload = bytes.fromhex(data.get("data", ""))
        return Chunk(
            data["disk_index"],
            data["offset"],
            data["length"],
            bytes.fromhex(data["digest"]),
            payload,
            ChunkFlags.ZERO if data.get("zero") else ChunkFlags.NONE,
        )
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            continue
        value = data[f.name]
        if f.name in ("code", "status") and isinstance(value, str):
            value = ErrorCode[value].value
        kwargs[f.name] = _from_json(hints[f.name], value)
    return cls(**kwargs)


def describe(message: Message | object) -> str:
    """One readable line for a message or event (for logs and the demo)."""
    if not isinstance(message, Message):
        return repr(message)
    data = message_to_dict(message)
    name = data.pop("type")
    if isinstance(message, Chunk):
        data.pop("data")
    parts = []
    for key, value in data.items():
        shown = value[:37] + "..." if isinstance(value, str) and len(value) > 40 else value
        parts.append(f"{key}={shown}")
    return f"{name}({', '.join(parts)})"


def tag_name(tag: int) -> str:
    """The name of a tag, or its hex value when unknown."""
    try:
        return MessageTag(tag).name
    except ValueError:
        return f"{tag:#06x}"
