"""Checks on identifiers and names that come from the wire.

A VMID, VM name, disk id or server name from a peer may later become part of a path
or a log line, so every one is checked here, at decode time, before any caller sees it.
The same checks run when *we* build a message, so an invalid one is never sent.
"""

from __future__ import annotations

import ipaddress
import re
import uuid

from ._errors import BadName, BadVMID
from .limits import MAX_DISK_ID, MAX_FQDN, MAX_NAME

_FORBIDDEN_IN_NAME = frozenset("/\\\x00")
_DISK_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*\Z")
_SERVER_NAME_CHARS = re.compile(r"[A-Za-z0-9.:-]+\Z")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


def check_vmid(raw: bytes) -> uuid.UUID:
    """Decode a 16-byte VMID, refusing values that are not GUIDs.

    Raises:
        BadVMID: nil, all-ones (max), or not the RFC 9562 (RFC 4122) variant.
    """
    if len(raw) != 16:
        raise BadVMID(f"VMID must be 16 bytes, got {len(raw)}")
    value = uuid.UUID(bytes=bytes(raw))
    if value.int == 0 or value.int == (1 << 128) - 1:
        raise BadVMID(f"VMID {value} is the nil or max GUID")
    if value.variant != uuid.RFC_4122:
        raise BadVMID(f"VMID {value} is not an RFC 9562 GUID (variant bits)")
    return value


def _decode_utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise BadName(f"{what} is not valid UTF-8") from None


def check_vm_name(raw: bytes) -> str:
    """A VM's display name: 1-255 UTF-8 bytes, no ``/``, ``\\`` or NUL, not ``.``/``..``."""
    if not 1 <= len(raw) <= MAX_NAME:
        raise BadName(f"VM name must be 1-{MAX_NAME} bytes, got {len(raw)}")
    name = _decode_utf8(raw, "VM name")
    if _FORBIDDEN_IN_NAME.intersection(name) or name in (".", ".."):
        raise BadName(f"VM name {name!r} holds a path separator, NUL or is a dot name")
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for ch in name):
        raise BadName(f"VM name {name!r} holds a control character")
    return name


def check_disk_id(raw: bytes) -> str:
    """A disk identifier: 1-64 bytes of ``[A-Za-z0-9._-]``, not starting with a dot."""
    if not 1 <= len(raw) <= MAX_DISK_ID:
        raise BadName(f"disk id must be 1-{MAX_DISK_ID} bytes, got {len(raw)}")
    text = _decode_utf8(raw, "disk id")
    if not _DISK_ID.match(text):
        raise BadName(f"disk id {text!r} must match [A-Za-z0-9_-][A-Za-z0-9._-]*")
    return text


def check_server_name(raw: bytes) -> str:
    """A recovery server name: a DNS name (LDH labels) or an IPv4/IPv6 literal."""
    if not 1 <= len(raw) <= MAX_FQDN:
        raise BadName(f"server name must be 1-{MAX_FQDN} bytes, got {len(raw)}")
    text = _decode_utf8(raw, "server name")
    if not _SERVER_NAME_CHARS.match(text):
        # Also keeps out IPv6 zone ids ("fe80::1%eth0"), which may hold any byte.
        raise BadName(f"server name {text!r} holds characters outside [A-Za-z0-9.:-]")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        return text
    labels = text[:-1].split(".") if text.endswith(".") else text.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise BadName(f"server name {text!r} is neither a DNS name nor an IP address")
    return text


def encode_text(text: str, limit: int, what: str) -> bytes:
    """UTF-8 bytes of ``text``, refusing anything over ``limit`` bytes (for building)."""
    raw = text.encode("utf-8")
    if len(raw) > limit:
        raise BadName(f"{what} is {len(raw)} bytes, the limit is {limit}")
    return raw
