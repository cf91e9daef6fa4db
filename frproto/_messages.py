"""Typed message classes: the base class and the control plane.

Each message is a frozen, slotted dataclass with a ``TAG``. The same classes go in both
directions (h11's symmetry): :meth:`Connection.send` takes them and
:meth:`Connection.next_event` returns them, so ``decode(encode(m)) == m`` for every
message, which the round-trip tests check.

Each field is declared once, with its wire type and check in its annotation (see
``_fields``); the body schema, encoding, decoding and validation all come from that one
table. The checks raise the :class:`RemoteProtocolError` subclass that names the fault:
decoding lets it propagate (the peer's fault), building a message turns it into a
:class:`LocalProtocolError` (ours). Construct objects never leave this package: callers
see only these classes.

This module holds the base class and the messages of negotiation, the broker query,
errors and keepalives, with the two conversions between an Error message and an
exception (:meth:`Error.from_exception`, :func:`error_from_message`); ``_replication``
holds the messages of a replication session.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeAlias, TypeVar

import construct
from construct import Int16ub, Int64ub, PrefixedArray

from ._enums import (
    AuthType,
    Compression,
    CompressionSet,
    Encryption,
    EncryptionSet,
    ExistingVM,
    MessageTag,
    RecoveryType,
    VersionVerdict,
)
from ._errors import (
    BadValue,
    ErrorCode,
    FrprotoError,
    LocalProtocolError,
    MalformedMessage,
    RemoteProtocolError,
    TrailingBytes,
    TruncatedFrame,
    error_class_for,
)
from ._fields import (
    U64,
    EnumOf,
    ErrorText,
    FlagsOf,
    Name,
    Spec,
    UInt,
    Version,
    Vmid,
    cut_text,
    table_of,
)
from ._validate import check_server_name, check_vm_name
from ._wire import Bytes
from .limits import MAX_DISKS, MAX_ERROR_TEXT, PROTOCOL_VERSION

M = TypeVar("M", bound="Message")


class Message:
    """Base of every protocol message.

    Subclasses are frozen dataclasses that define ``TAG`` and annotate each field with
    its wire spec (``_fields``), which says how it travels and which values it may hold.
    """

    __slots__ = ()
    TAG: ClassVar[MessageTag]

    def __post_init__(self) -> None:
        try:
            table_of(type(self)).check(self)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"invalid {type(self).__name__}: {exc.message}") from exc

    def encode_body(self) -> bytes:
        """The body bytes of this message (without the envelope)."""
        return table_of(type(self)).encode(self)

    @classmethod
    def decode_body(cls: type[M], body: Bytes) -> M:
        """Decode a body received from the peer.

        Raises:
            RemoteProtocolError: the matching subclass for each malformed-input class.
        """
        table = table_of(cls)
        try:
            parsed = table.schema.parse(bytes(body))
        except construct.TerminatedError:
            raise TrailingBytes(f"{cls.__name__}: bytes after the end of the message") from None
        except construct.StreamError as exc:
            raise TruncatedFrame(f"{cls.__name__}: body ends early ({_path(exc)})") from None
        except construct.ConstructError as exc:  # pragma: no cover - no schema raises others
            raise MalformedMessage(f"{cls.__name__}: {exc}") from None
        # Not through the constructor: that would run the checks a second time and
        # report the peer's fault as ours. (h11's readers build events the same way.)
        message = cls.__new__(cls)
        for name, value in table.decode(parsed).items():
            object.__setattr__(message, name, value)
        return message


def _path(exc: construct.ConstructError) -> str:
    return str(getattr(exc, "path", "") or "").replace("(parsing) -> ", "")


@dataclass(frozen=True, slots=True)
class DiskInfo:
    """One disk of a VM: its identifier and size in bytes."""

    disk_id: str
    size: int


class _DiskSizes(Spec[tuple[int, ...]]):
    """The sizes of a VM's disks (a broker query): at most MAX_DISKS, each below 2**63."""

    con = PrefixedArray(Int16ub, Int64ub)

    def to_wire(self, value: tuple[int, ...]) -> Any:
        return list(value)

    def from_wire(self, name: str, raw: Any) -> tuple[int, ...]:
        return tuple(raw)

    def check(self, name: str, value: tuple[int, ...], fields: Mapping[str, Any]) -> None:
        if len(value) > MAX_DISKS:
            raise BadValue(f"{len(value)} disks, the limit is {MAX_DISKS}")
        if not all(0 < s < 1 << 63 for s in value):
            raise BadValue("disk size out of range")


#: A recovery server's name (a DNS name or an IP literal) behind a u8 length.
ServerName: TypeAlias = Annotated[str, Name(8, check_server_name)]
#: A VM's display name behind a u16 length.
VMName: TypeAlias = Annotated[str, Name(16, check_vm_name)]


@dataclass(frozen=True, slots=True)
class NegotiateRequest(Message):
    """First message of every connection, from the primary."""

    TAG: ClassVar[MessageTag] = MessageTag.NEGOTIATE_REQUEST
    version: Version = PROTOCOL_VERSION
    #: CompressionSet bits offered.
    compression: Annotated[CompressionSet, FlagsOf(CompressionSet)] = (
        CompressionSet.ZSTD | CompressionSet.LZ4
    )
    #: EncryptionSet bits offered.
    encryption: Annotated[EncryptionSet, FlagsOf(EncryptionSet)] = EncryptionSet.TLS13
    auth_type: Annotated[AuthType, EnumOf(AuthType)] = AuthType.CERTIFICATE


@dataclass(frozen=True, slots=True)
class NegotiateResponse(Message):
    """The recovery side's answer: verdict, what it is, and what it chose."""

    TAG: ClassVar[MessageTag] = MessageTag.NEGOTIATE_RESPONSE
    #: An ErrorCode, OK (0) when the connection may go on.
    status: Annotated[int, UInt(16, show=True)] = ErrorCode.OK
    verdict: Annotated[VersionVerdict, EnumOf(VersionVerdict)] = VersionVerdict.COMPATIBLE
    version: Version = PROTOCOL_VERSION
    recovery_type: Annotated[RecoveryType, EnumOf(RecoveryType)] = RecoveryType.STANDALONE
    compression: Annotated[Compression, EnumOf(Compression)] = Compression.NONE
    encryption: Annotated[Encryption, EnumOf(Encryption)] = Encryption.TLS13
    auth_type: Annotated[AuthType, EnumOf(AuthType)] = AuthType.CERTIFICATE
    server_name: ServerName = "localhost"

    @property
    def ok(self) -> bool:
        """True when the connection may go on (status OK and versions compatible)."""
        return self.status == ErrorCode.OK and self.verdict is VersionVerdict.COMPATIBLE


@dataclass(frozen=True, slots=True)
class QueryRecoveryServer(Message):
    """Primary to broker: where should (or does) this VM's replica live?"""

    TAG: ClassVar[MessageTag] = MessageTag.QUERY_RECOVERY_SERVER
    CHECK_ORDER: ClassVar[tuple[str, ...]] = ("disk_sizes", "vmid", "vm_name")
    vmid: Vmid
    vm_name: VMName
    disk_sizes: Annotated[tuple[int, ...], _DiskSizes()] = ()


def _check_port(port: int) -> None:
    if port == 0:
        raise BadValue("port 0")
    if not 0 < port <= 0xFFFF:
        raise BadValue(f"port {port} out of range")


@dataclass(frozen=True, slots=True)
class QueryRecoveryServerResponse(Message):
    """Broker to primary: the recovery node that holds (or will hold) the VM."""

    TAG: ClassVar[MessageTag] = MessageTag.QUERY_RECOVERY_SERVER_RESPONSE
    WIRE_ORDER: ClassVar[tuple[str, ...]] = ("vmid", "existing", "port", "server_name")
    CHECK_ORDER: ClassVar[tuple[str, ...]] = ("port", "vmid", "server_name", "existing")
    vmid: Vmid
    server_name: ServerName
    port: Annotated[int, UInt(16, check=_check_port)]
    existing: Annotated[ExistingVM, EnumOf(ExistingVM)]


def _check_error_code(code: int) -> None:
    if code == 0:
        raise BadValue("an Error cannot carry code OK (0)")
    if not 0 < code <= 0xFFFF:
        raise BadValue(f"error code {code} out of range")


@dataclass(frozen=True, slots=True)
class Error(Message):
    """An error report: a code from the registry and a human-readable text.

    ``code`` stays an ``int`` so that codes from newer peers survive decoding; treat an
    unknown code as ``INTERNAL`` (:attr:`error_code` does).
    """

    TAG: ClassVar[MessageTag] = MessageTag.ERROR
    code: Annotated[int, UInt(16, check=_check_error_code)]
    text: Annotated[str, ErrorText()] = ""

    @classmethod
    def with_text(cls, code: int, text: str) -> Error:
        """An Error whose text is cut to the wire limit (on a character boundary)."""
        return cls(code, cut_text(text, MAX_ERROR_TEXT))

    @classmethod
    def from_exception(cls, exc: FrprotoError) -> Error:
        """The Error that reports ``exc`` to the peer: its class's code and its message."""
        return cls.with_text(exc.code, exc.message)

    @property
    def error_code(self) -> ErrorCode:
        """The code as an :class:`ErrorCode`; codes this version does not know are INTERNAL."""
        try:
            return ErrorCode(self.code)
        except ValueError:
            return ErrorCode.INTERNAL


def error_from_message(error: Error) -> FrprotoError:
    """The exception that an Error message received from the peer stands for."""
    return error_class_for(error.code)(error.text)


@dataclass(frozen=True, slots=True)
class Keepalive(Message):
    """Either side, any time after negotiation; carries an opaque token, needs no reply."""

    TAG: ClassVar[MessageTag] = MessageTag.KEEPALIVE
    token: U64 = 0
