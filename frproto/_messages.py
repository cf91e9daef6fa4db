"""Typed message classes: what the bytes in ``_wire`` mean (base and control plane).

Each message is a frozen, slotted dataclass with a ``TAG``. The same classes go in both
directions (h11's symmetry): :meth:`Connection.send` takes them and
:meth:`Connection.next_event` returns them, so ``decode(encode(m)) == m`` for every
message, which the round-trip tests check.

Construction validates: building a message with an invalid name or VMID raises
:class:`LocalProtocolError` (our bug); decoding one raises the matching
:class:`RemoteProtocolError` subclass (the peer's). Construct objects never leave this
package: callers see only these classes.

This module holds the base class and the messages of negotiation, the broker query,
errors and keepalives; ``_replication`` holds the messages of a replication session.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import construct

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
    LocalProtocolError,
    MalformedMessage,
    RemoteProtocolError,
    TrailingBytes,
    TruncatedFrame,
)
from ._limits import MAX_DISKS, MAX_ERROR_TEXT, PROTOCOL_VERSION
from ._validate import check_server_name, check_vm_name, check_vmid
from ._wire import SCHEMAS

Bytes = bytes | bytearray | memoryview
E = TypeVar("E", bound=enum.IntEnum)
F = TypeVar("F", bound=enum.IntFlag)
M = TypeVar("M", bound="Message")


def enum_member(kind: type[E], raw: int, name: str) -> E:
    """``kind(raw)``, or :class:`BadValue` naming the field when ``raw`` is not a member."""
    try:
        return kind(raw)
    except ValueError:
        raise BadValue(f"{name}: {raw} is not a {kind.__name__}") from None


def flag_set(kind: type[F], raw: int, name: str) -> F:
    """``kind(raw)``, or :class:`BadValue` when ``raw`` has bits ``kind`` does not define."""
    known = 0
    for member in kind:
        known |= member.value
    if raw & ~known:
        raise BadValue(f"{name}: unknown bits {raw & ~known:#06x} in {kind.__name__}")
    return kind(raw)


class Message:
    """Base of every protocol message.

    Subclasses define ``TAG`` and the mapping between their fields and the Construct
    schema of that tag (``_to_fields`` / ``_from_fields``).
    """

    __slots__ = ()
    TAG: ClassVar[MessageTag]

    def _to_fields(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _from_fields(cls: type[M], c: Any) -> M:
        raise NotImplementedError

    def _validate(self) -> None:
        """Raise a RemoteProtocolError subclass if a field is invalid."""

    def __post_init__(self) -> None:
        try:
            self._validate()
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"invalid {type(self).__name__}: {exc.message}") from exc

    def encode_body(self) -> bytes:
        """The body bytes of this message (without the envelope)."""
        return bytes(SCHEMAS[self.TAG].build(self._to_fields()))

    @classmethod
    def decode_body(cls: type[M], body: Bytes) -> M:
        """Decode a body received from the peer.

        Raises:
            RemoteProtocolError: the matching subclass for each malformed-input class.
        """
        try:
            fields = SCHEMAS[cls.TAG].parse(bytes(body))
        except construct.TerminatedError:
            raise TrailingBytes(f"{cls.__name__}: bytes after the end of the message") from None
        except construct.StreamError as exc:
            raise TruncatedFrame(f"{cls.__name__}: body ends early ({_path(exc)})") from None
        except construct.ConstructError as exc:  # pragma: no cover - no schema raises others
            raise MalformedMessage(f"{cls.__name__}: {exc}") from None
        return cls._from_fields(fields)


def _path(exc: construct.ConstructError) -> str:
    return str(getattr(exc, "path", "") or "").replace("(parsing) -> ", "")


def check_vmid_uuid(vmid: uuid.UUID) -> None:
    """Refuse a VMID (already a UUID) that is not a valid GUID (see ``check_vmid``)."""
    check_vmid(vmid.bytes)


@dataclass(frozen=True, slots=True)
class DiskInfo:
    """One disk of a VM: its identifier and size in bytes."""

    disk_id: str
    size: int


@dataclass(frozen=True, slots=True)
class NegotiateRequest(Message):
    """First message of every connection, from the primary."""

    TAG: ClassVar[MessageTag] = MessageTag.NEGOTIATE_REQUEST
    version: tuple[int, int] = PROTOCOL_VERSION
    compression: CompressionSet = CompressionSet.ZSTD | CompressionSet.LZ4
    encryption: EncryptionSet = EncryptionSet.TLS13
    auth_type: AuthType = AuthType.CERTIFICATE

    def _validate(self) -> None:
        if not all(0 <= v <= 255 for v in self.version):
            raise BadValue(f"version {self.version} out of range")

    def _to_fields(self) -> dict[str, Any]:
        return {
            "version_major": self.version[0],
            "version_minor": self.version[1],
            "compression": int(self.compression),
            "encryption": int(self.encryption),
            "auth_type": int(self.auth_type),
        }

    @classmethod
    def _from_fields(cls, c: Any) -> NegotiateRequest:
        return cls(
            version=(c.version_major, c.version_minor),
            compression=flag_set(CompressionSet, c.compression, "compression"),
            encryption=flag_set(EncryptionSet, c.encryption, "encryption"),
            auth_type=enum_member(AuthType, c.auth_type, "auth_type"),
        )


@dataclass(frozen=True, slots=True)
class NegotiateResponse(Message):
    """The recovery side's answer: verdict, what it is, and what it chose."""

    TAG: ClassVar[MessageTag] = MessageTag.NEGOTIATE_RESPONSE
    status: int = ErrorCode.OK
    verdict: VersionVerdict = VersionVerdict.COMPATIBLE
    version: tuple[int, int] = PROTOCOL_VERSION
    recovery_type: RecoveryType = RecoveryType.STANDALONE
    compression: Compression = Compression.NONE
    encryption: Encryption = Encryption.TLS13
    auth_type: AuthType = AuthType.CERTIFICATE
    server_name: str = "localhost"

    @property
    def ok(self) -> bool:
        """True when the connection may go on (status OK and versions compatible)."""
        return self.status == ErrorCode.OK and self.verdict is VersionVerdict.COMPATIBLE

    def _validate(self) -> None:
        if not all(0 <= v <= 255 for v in self.version):
            raise BadValue(f"version {self.version} out of range")
        if not 0 <= self.status <= 0xFFFF:
            raise BadValue(f"status {self.status} out of range")
        check_server_name(self.server_name.encode())

    def _to_fields(self) -> dict[str, Any]:
        return {
            "status": int(self.status),
            "verdict": int(self.verdict),
            "version_major": self.version[0],
            "version_minor": self.version[1],
            "recovery_type": int(self.recovery_type),
            "compression": int(self.compression),
            "encryption": int(self.encryption),
            "auth_type": int(self.auth_type),
            "server_name": self.server_name.encode(),
        }

    @classmethod
    def _from_fields(cls, c: Any) -> NegotiateResponse:
        return cls(
            status=c.status,
            verdict=enum_member(VersionVerdict, c.verdict, "verdict"),
            version=(c.version_major, c.version_minor),
            recovery_type=enum_member(RecoveryType, c.recovery_type, "recovery_type"),
            compression=enum_member(Compression, c.compression, "compression"),
            encryption=enum_member(Encryption, c.encryption, "encryption"),
            auth_type=enum_member(AuthType, c.auth_type, "auth_type"),
            server_name=check_server_name(c.server_name),
        )


@dataclass(frozen=True, slots=True)
class QueryRecoveryServer(Message):
    """Primary to broker: where should (or does) this VM's replica live?"""

    TAG: ClassVar[MessageTag] = MessageTag.QUERY_RECOVERY_SERVER
    vmid: uuid.UUID
    vm_name: str
    disk_sizes: tuple[int, ...] = ()

    def _validate(self) -> None:
        check_vmid_uuid(self.vmid)
        check_vm_name(self.vm_name.encode())
        if len(self.disk_sizes) > MAX_DISKS:
            raise BadValue(f"{len(self.disk_sizes)} disks, the limit is {MAX_DISKS}")
        if not all(0 < s < 1 << 63 for s in self.disk_sizes):
            raise BadValue("disk size out of range")

    def _to_fields(self) -> dict[str, Any]:
        return {
            "vmid": self.vmid.bytes,
            "vm_name": self.vm_name.encode(),
            "disk_sizes": list(self.disk_sizes),
        }

    @classmethod
    def _from_fields(cls, c: Any) -> QueryRecoveryServer:
        sizes = tuple(c.disk_sizes)
        if len(sizes) > MAX_DISKS:
            raise BadValue(f"{len(sizes)} disks, the limit is {MAX_DISKS}")
        if not all(0 < s < 1 << 63 for s in sizes):
            raise BadValue("disk size out of range")
        return cls(check_vmid(c.vmid), check_vm_name(c.vm_name), sizes)


@dataclass(frozen=True, slots=True)
class QueryRecoveryServerResponse(Message):
    """Broker to primary: the recovery node that holds (or will hold) the VM."""

    TAG: ClassVar[MessageTag] = MessageTag.QUERY_RECOVERY_SERVER_RESPONSE
    vmid: uuid.UUID
    server_name: str
    port: int
    existing: ExistingVM

    def _validate(self) -> None:
        check_vmid_uuid(self.vmid)
        check_server_name(self.server_name.encode())
        if not 0 < self.port <= 0xFFFF:
            raise BadValue(f"port {self.port} out of range")

    def _to_fields(self) -> dict[str, Any]:
        return {
            "vmid": self.vmid.bytes,
            "existing": int(self.existing),
            "port": self.port,
            "server_name": self.server_name.encode(),
        }

    @classmethod
    def _from_fields(cls, c: Any) -> QueryRecoveryServerResponse:
        if c.port == 0:
            raise BadValue("port 0")
        return cls(
            vmid=check_vmid(c.vmid),
            server_name=check_server_name(c.server_name),
            port=c.port,
            existing=enum_member(ExistingVM, c.existing, "existing"),
        )


@dataclass(frozen=True, slots=True)
class Error(Message):
    """An error report: a code from the registry and a human-readable text.

    ``code`` stays an ``int`` so that codes from newer peers survive decoding; treat an
    unknown code as ``INTERNAL`` (:attr:`error_code` does).
    """

    TAG: ClassVar[MessageTag] = MessageTag.ERROR
    code: int
    text: str = ""

    @classmethod
    def with_text(cls, code: int, text: str) -> Error:
        """An Error whose text is cut to the wire limit (on a character boundary)."""
        raw = text.encode("utf-8")[:MAX_ERROR_TEXT]
        return cls(code, raw.decode("utf-8", errors="ignore"))

    @property
    def error_code(self) -> ErrorCode:
        """The code as an :class:`ErrorCode`; codes this version does not know are INTERNAL."""
        try:
            return ErrorCode(self.code)
        except ValueError:
            return ErrorCode.INTERNAL

    def _validate(self) -> None:
        if not 0 < self.code <= 0xFFFF:
            raise BadValue(f"error code {self.code} out of range")
        if len(self.text.encode("utf-8")) > MAX_ERROR_TEXT:
            raise BadValue(f"error text over {MAX_ERROR_TEXT} bytes")

    def _to_fields(self) -> dict[str, Any]:
        return {"code": self.code, "text": self.text.encode("utf-8")}

    @classmethod
    def _from_fields(cls, c: Any) -> Error:
        if c.code == 0:
            raise BadValue("an Error cannot carry code OK (0)")
        if len(c.text) > MAX_ERROR_TEXT:
            raise BadValue(f"error text over {MAX_ERROR_TEXT} bytes")
        # The text is for people: replace bad UTF-8 rather than fail the whole report.
        # (Replacement characters can grow the text past the limit: cut it again.)
        return cls.with_text(c.code, c.text.decode("utf-8", errors="replace"))


@dataclass(frozen=True, slots=True)
class Keepalive(Message):
    """Either side, any time after negotiation; carries an opaque token, needs no reply."""

    TAG: ClassVar[MessageTag] = MessageTag.KEEPALIVE
    token: int = 0

    def _validate(self) -> None:
        if not 0 <= self.token < 1 << 64:
            raise BadValue("token out of range")

    def _to_fields(self) -> dict[str, Any]:
        return {"token": self.token}

    @classmethod
    def _from_fields(cls, c: Any) -> Keepalive:
        return cls(c.token)
