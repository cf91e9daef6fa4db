"""One field table per message: the wire type, conversion and check of every field.

A message class says everything about a field once, in its annotation::

    sequence: U64 = 0        # Annotated[int, UInt(64)]: 8 bytes, 0 <= value < 2**64
    vmid: Vmid               # Annotated[uuid.UUID, VmidField()]: 16 bytes, a valid GUID

:func:`table_of` reads those annotations (once per class) into a :class:`Table`, from
which the body schema is generated and which encodes, decodes and checks the message.

There is one validation path. Every check raises the ``RemoteProtocolError`` subclass
that names the fault: decoding runs the checks and lets that propagate (the peer's
fault), while building a message runs the same checks and turns the error into a
``LocalProtocolError`` (ours; ``Message.__post_init__``). Conversions (``from_wire``)
only turn wire values into Python values; they refuse only what the Python type cannot
hold (an integer that is no member of an enumeration). Names are decoded with
``surrogateescape`` so that invalid UTF-8 reaches the name check, which reports it in the
same order as every other fault of the name.

Conventions for the generated schemas (``docs/protocol.md`` has the tables):

* Integers are unsigned and big-endian (network byte order).
* Byte strings are length-prefixed (``Prefixed(IntNub, GreedyBytes)``); text is UTF-8.
* Enumerations are plain integers on the wire.
* Every body ends with ``Terminated``: a body longer than its message is an error.

Control messages are parsed with *plain* (never ``.compile()``-d) Construct, which is
safe on hostile input.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
import uuid
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Final, Generic, TypeAlias, TypeVar

from construct import Bytes as FixedBytes
from construct import GreedyBytes, Int8ub, Int16ub, Int32ub, Int64ub, Prefixed, Struct, Terminated

from ._errors import BadValue
from ._validate import check_vmid
from ._wire import Schema
from .limits import DIGEST_SIZE, MAX_ERROR_TEXT

T = TypeVar("T")
E = TypeVar("E", bound=enum.IntEnum)
F = TypeVar("F", bound=enum.IntFlag)

_UINT: Final[dict[int, Schema]] = {8: Int8ub, 16: Int16ub, 32: Int32ub, 64: Int64ub}
#: How names are decoded: invalid UTF-8 survives decoding to reach the name's check.
NAME_ERRORS: Final = "surrogateescape"


def prefixed(bits: int) -> Schema:
    """A byte string behind a ``bits``-wide length."""
    return Prefixed(_UINT[bits], GreedyBytes)


class Spec(Generic[T]):
    """How one field travels and which values it may hold (base: one wire field).

    Subclasses set ``con`` (the Construct field) and override the conversions and the
    check as needed; the defaults pass values through and accept everything.
    """

    con: Schema

    def parts(self, name: str) -> list[Schema]:
        """The named Construct fields this field occupies in the body, in order."""
        return [name / self.con]

    def put(self, name: str, value: T, out: dict[str, Any]) -> None:
        """Add the wire value(s) of ``value`` to ``out`` (the dict given to ``build``)."""
        out[name] = self.to_wire(value)

    def take(self, name: str, parsed: Mapping[str, Any]) -> T:
        """The Python value of the field from a parsed container."""
        return self.from_wire(name, parsed[name])

    def to_wire(self, value: T) -> Any:
        """The value as Construct builds it."""
        return value

    def from_wire(self, name: str, raw: Any) -> T:
        """The Python value of what Construct parsed."""
        return typing.cast(T, raw)

    def check(self, name: str, value: T, fields: Mapping[str, Any]) -> None:
        """Raise a ``RemoteProtocolError`` subclass if ``value`` may not travel.

        ``fields`` holds the values of the fields checked before this one (a rule that
        spans fields belongs to the one checked last; see :func:`table_of`).
        """


class UInt(Spec[int]):
    """An unsigned integer of ``bits`` bits, at least ``low``.

    Args:
        show: put the value in the error message.
        check: a check of its own instead of the range check (raises BadValue).
    """

    def __init__(
        self,
        bits: int,
        *,
        low: int = 0,
        show: bool = False,
        check: Callable[[int], None] | None = None,
    ) -> None:
        self.con = _UINT[bits]
        self.high = 1 << bits
        self.low = low
        self.show = show
        self.custom = check

    def check(self, name: str, value: int, fields: Mapping[str, Any]) -> None:
        if self.custom is not None:
            self.custom(value)
        elif not self.low <= value < self.high:
            shown = f" {value}" if self.show else ""
            raise BadValue(f"{name}{shown} out of range")


class EnumOf(Spec[E]):
    """A member of an ``IntEnum``, as an integer of ``bits`` bits; non-members refused."""

    def __init__(self, kind: type[E], bits: int = 8) -> None:
        self.kind = kind
        self.con = _UINT[bits]

    def to_wire(self, value: E) -> Any:
        return int(value)

    def from_wire(self, name: str, raw: Any) -> E:
        try:
            return self.kind(raw)
        except ValueError:
            raise BadValue(f"{name}: {raw} is not a {self.kind.__name__}") from None


class FlagsOf(Spec[F]):
    """A set of ``IntFlag`` bits, as an integer of ``bits`` bits; unknown bits refused."""

    def __init__(self, kind: type[F], bits: int = 16) -> None:
        self.kind = kind
        self.con = _UINT[bits]
        self.known = 0
        for member in kind:
            self.known |= member.value

    def to_wire(self, value: F) -> Any:
        return int(value)

    def from_wire(self, name: str, raw: Any) -> F:
        if raw & ~self.known:
            unknown = raw & ~self.known
            raise BadValue(f"{name}: unknown bits {unknown:#06x} in {self.kind.__name__}")
        return self.kind(raw)


class Name(Spec[str]):
    """A name, UTF-8 behind a ``bits``-wide length, checked by ``checker`` (``_validate``)."""

    def __init__(self, bits: int, checker: Callable[[bytes], str]) -> None:
        self.con = prefixed(bits)
        self.checker = checker

    def to_wire(self, value: str) -> Any:
        return value.encode()

    def from_wire(self, name: str, raw: Any) -> str:
        return bytes(raw).decode("utf-8", NAME_ERRORS)

    def check(self, name: str, value: str, fields: Mapping[str, Any]) -> None:
        self.checker(value.encode("utf-8", NAME_ERRORS))


class Blob(Spec[bytes]):
    """Opaque bytes behind a ``bits``-wide length; ``check`` bounds them."""

    def __init__(self, bits: int, check: Callable[[bytes], None]) -> None:
        self.con = prefixed(bits)
        self.custom = check

    def from_wire(self, name: str, raw: Any) -> bytes:
        return bytes(raw)

    def check(self, name: str, value: bytes, fields: Mapping[str, Any]) -> None:
        self.custom(value)


class DigestField(Spec[bytes]):
    """A 16-byte XXH3-128 digest."""

    con = FixedBytes(DIGEST_SIZE)

    def from_wire(self, name: str, raw: Any) -> bytes:
        return bytes(raw)

    def check(self, name: str, value: bytes, fields: Mapping[str, Any]) -> None:
        if len(value) != DIGEST_SIZE:
            raise BadValue(f"digest must be {DIGEST_SIZE} bytes")


class VmidField(Spec[uuid.UUID]):
    """A VMID: 16 bytes on the wire, a ``uuid.UUID`` that is a valid GUID in Python."""

    con = FixedBytes(16)

    def to_wire(self, value: uuid.UUID) -> Any:
        return value.bytes

    def from_wire(self, name: str, raw: Any) -> uuid.UUID:
        return uuid.UUID(bytes=bytes(raw))

    def check(self, name: str, value: uuid.UUID, fields: Mapping[str, Any]) -> None:
        check_vmid(value.bytes)


class VersionField(Spec[tuple[int, int]]):
    """A ``(major, minor)`` protocol version: two bytes, ``<name>_major`` and ``_minor``."""

    def parts(self, name: str) -> list[Schema]:
        return [f"{name}_major" / Int8ub, f"{name}_minor" / Int8ub]

    def put(self, name: str, value: tuple[int, int], out: dict[str, Any]) -> None:
        out[f"{name}_major"], out[f"{name}_minor"] = value

    def take(self, name: str, parsed: Mapping[str, Any]) -> tuple[int, int]:
        return (parsed[f"{name}_major"], parsed[f"{name}_minor"])

    def check(self, name: str, value: tuple[int, int], fields: Mapping[str, Any]) -> None:
        if not all(0 <= v <= 255 for v in value):
            raise BadValue(f"{name} {value} out of range")


class ErrorText(Spec[str]):
    """An Error's text: for people, so bad UTF-8 is replaced rather than refused."""

    con = prefixed(16)

    def to_wire(self, value: str) -> Any:
        return value.encode("utf-8")

    def from_wire(self, name: str, raw: Any) -> str:
        text = bytes(raw).decode("utf-8", errors="replace")
        if len(raw) <= MAX_ERROR_TEXT:
            # Replacement characters can grow a text that fit past the limit: cut it.
            text = cut_text(text, MAX_ERROR_TEXT)
        return text

    def check(self, name: str, value: str, fields: Mapping[str, Any]) -> None:
        if len(value.encode("utf-8")) > MAX_ERROR_TEXT:
            raise BadValue(f"error text over {MAX_ERROR_TEXT} bytes")


def cut_text(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` UTF-8 bytes, on a character boundary."""
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


#: The common field types, as annotations.
U16: TypeAlias = Annotated[int, UInt(16)]
U32: TypeAlias = Annotated[int, UInt(32)]
U64: TypeAlias = Annotated[int, UInt(64)]
Vmid: TypeAlias = Annotated[uuid.UUID, VmidField()]
Digest: TypeAlias = Annotated[bytes, DigestField()]
Version: TypeAlias = Annotated[tuple[int, int], VersionField()]


@dataclasses.dataclass(frozen=True, slots=True)
class Table:
    """A message's fields with their specs, in the order of their checks, and its body
    schema (the fields in wire order)."""

    fields: tuple[tuple[str, Spec[Any]], ...]
    schema: Schema

    def check(self, message: object) -> None:
        """Every field's check, in order (for a message being built)."""
        values = {name: getattr(message, name) for name, _ in self.fields}
        for name, spec in self.fields:
            spec.check(name, values[name], values)

    def encode(self, message: object) -> bytes:
        """The body bytes of ``message``."""
        out: dict[str, Any] = {}
        for name, spec in self.fields:
            spec.put(name, getattr(message, name), out)
        return bytes(self.schema.build(out))

    def decode(self, parsed: Mapping[str, Any]) -> dict[str, Any]:
        """Field values from a parse, each converted and then checked, in order: the
        first fault found is the one reported."""
        values: dict[str, Any] = {}
        for name, spec in self.fields:
            value = values[name] = spec.take(name, parsed)
            spec.check(name, value, values)
        return values


_TABLES: dict[type, Table] = {}


def table_of(cls: type) -> Table:
    """The table of a message dataclass (built from its annotations on first use).

    Two orders, each the declaration order unless the class names the fields in another:

    * ``WIRE_ORDER``: the body layout, where it differs from the constructor's
      argument order;
    * ``CHECK_ORDER``: the order of the checks, so which error a body with several
      faults gets (the order frproto has always checked received bodies in). A field
      whose check reads another field comes after it.
    """
    found = _TABLES.get(cls)
    if found is None:
        found = _TABLES[cls] = _build(cls)
    return found


def _build(cls: type) -> Table:
    hints = typing.get_type_hints(cls, include_extras=True)
    specs: dict[str, Spec[Any]] = {}
    for item in dataclasses.fields(cls):
        metadata = getattr(hints[item.name], "__metadata__", ())
        spec = next((m for m in metadata if isinstance(m, Spec)), None)
        if spec is None:
            raise TypeError(f"{cls.__name__}.{item.name} has no wire spec in its annotation")
        specs[item.name] = spec
    wire = _order(cls, "WIRE_ORDER", specs)
    checks = _order(cls, "CHECK_ORDER", specs)
    parts = [part for name in wire for part in specs[name].parts(name)]
    return Table(tuple((name, specs[name]) for name in checks), Struct(*parts, Terminated))


def _order(cls: type, attribute: str, specs: dict[str, Spec[Any]]) -> tuple[str, ...]:
    order: tuple[str, ...] = getattr(cls, attribute, tuple(specs))
    if sorted(order) != sorted(specs):
        raise TypeError(f"{cls.__name__}.{attribute} must name each field once")
    return order
