"""Certificates for mutual TLS: a private CA, host certificates, and reading them back.

Every connection in frrep is mutual TLS between hosts that hold a certificate issued by
one private CA (see ``docs/certificates.md``). This module makes that CA and the host
certificates with ``cryptography`` (what goes into them is in ``cert_contents.py``);
``frctl cert`` is a thin shell over it.

* :func:`create_ca` writes ``ca.pem`` and ``ca-key.pem`` (ECDSA P-256, self-signed,
  ``BasicConstraints(ca=True, path_length=0)``, key usage certificate and CRL signing).
* :func:`issue_host_cert` writes ``<name>.pem``, ``<name>-key.pem`` and a copy of
  ``ca.pem``. A host certificate carries both EKUs (serverAuth and clientAuth), because
  every host is both a TLS server (recovery side) and a TLS client (primary side), and its
  names are subject alternative names: the host name first, then any extra names (the
  clustering broker's CAP name goes on every recovery node's certificate).
* :func:`describe_cert` reads one certificate back for ``frctl cert show``.

Private keys are created with mode 0600 before a byte is written, and files are never
overwritten unless asked: each file is written to a temporary name in its directory and
then linked (no overwrite) or renamed (overwrite) into place.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .cert_contents import ca_certificate, host_certificate

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CAFiles",
    "CertError",
    "CertInfo",
    "HostFiles",
    "create_ca",
    "describe_cert",
    "issue_host_cert",
    "validate_name",
]

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"

#: Certificates are backdated by this much, so that a peer whose clock is slightly behind
#: does not see a brand-new certificate as "not yet valid".
BACKDATE = dt.timedelta(minutes=5)

_KEY_MODE = 0o600
_CERT_MODE = 0o644
_DNS_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}


class CertError(Exception):
    """A certificate operation was refused: bad name, existing file, unusable CA."""


@dataclass(frozen=True, slots=True)
class CAFiles:
    """The files of a CA: its certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class HostFiles:
    """The files of a host: its certificate, its private key and the CA certificate."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What ``frctl cert show`` prints about one certificate.

    Datetimes are timezone-aware (UTC); ``fingerprint_sha256`` is lower-case hex of the
    SHA-256 of the DER certificate, without separators.
    """

    subject_cn: str | None
    issuer_cn: str | None
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    is_ca: bool
    ext_key_usages: tuple[str, ...]
    serial: int
    fingerprint_sha256: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (datetimes as ISO 8601, serial as hex)."""
        return {
            "subject_cn": self.subject_cn,
            "issuer_cn": self.issuer_cn,
            "dns_names": list(self.dns_names),
            "ip_addresses": list(self.ip_addresses),
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "is_ca": self.is_ca,
            "ext_key_usages": list(self.ext_key_usages),
            "serial": f"{self.serial:x}",
            "fingerprint_sha256": self.fingerprint_sha256,
        }


# -- names -----------------------------------------------------------------------------


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def validate_name(name: str, *, what: str = "name") -> str:
    """Check a host name (DNS label rules) or IP address; return it in canonical form.

    DNS names are returned in lower case, IP addresses in their compressed form. Since a
    host's name becomes a file name, anything that could escape a directory is refused
    with its own message: ``/``, ``\\``, ``..``, NUL, a leading ``.``.
    """
    if not isinstance(name, str) or not name:
        raise CertError(f"{what} is empty")
    for bad, label in (("\x00", "NUL"), ("/", "'/'"), ("\\", "'\\'"), ("..", "'..'")):
        if bad in name:
            raise CertError(f"{what} {name!r} contains {label}; refused")
    if name.startswith("."):
        raise CertError(f"{what} {name!r} starts with '.'; refused")
    address = _parse_ip(name)
    if address is not None:
        return address.compressed
    if len(name) > 253:
        raise CertError(f"{what} {name[:40]!r}... is longer than 253 characters")
    if name.endswith("."):
        raise CertError(f"{what} {name!r} ends with '.'; give the name without it")
    for label in name.split("."):
        if not _DNS_LABEL.match(label):
            raise CertError(
                f"{what} {name!r} is not a DNS name: label {label!r} must be 1-63 letters, "
                "digits or '-', not starting or ending with '-'"
            )
    return name.lower()


def _san_entries(names: Sequence[str], ip_addresses: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in names:
        name = validate_name(raw, what="name")
        if name in seen:
            continue
        seen.add(name)
        address = _parse_ip(name)
        if address is None:
            entries.append(x509.DNSName(name))
        else:
            entries.append(x509.IPAddress(address))
    for raw in ip_addresses:
        address = _parse_ip(raw) if isinstance(raw, str) else None
        if address is None:
            raise CertError(f"IP address {raw!r} is not an IPv4 or IPv6 address")
        if address.compressed in seen:
            continue
        seen.add(address.compressed)
        entries.append(x509.IPAddress(address))
    return entries


# -- files -----------------------------------------------------------------------------


def _refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    if overwrite:
        return
    existing = [str(p) for p in paths if os.path.lexists(p)]
    if existing:
        raise CertError(f"refusing to overwrite {', '.join(existing)} (use overwrite/--force)")


def _write_files(files: Sequence[tuple[Path, bytes, int]], *, overwrite: bool) -> None:
    """Write each (path, data, mode) atomically; all-or-nothing on the checks.

    Each file is created under a temporary name with its final mode given to ``os.open``
    (so a key is never readable by others, not even empty), fsynced, then linked into
    place (``os.link`` fails if the target exists) or, with ``overwrite``, renamed over it.
    """
    _refuse_existing([p for p, _, _ in files], overwrite)
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(tmp, flags, mode)
            temps.append((tmp, path))
            try:
                os.fchmod(fd, mode)  # the umask may only have removed bits; be exact
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        for tmp, path in temps:
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise CertError(
                        f"refusing to overwrite {path} (use overwrite/--force)"
                    ) from None
                os.unlink(tmp)
    finally:
        for tmp, _ in temps:
            if os.path.lexists(tmp):
                os.unlink(tmp)
    directories = {p.parent for p, _, _ in files}
    for directory in directories:
        _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _check_days(days: int) -> None:
    if not isinstance(days, int) or days < 1:
        raise CertError(f"days must be a positive whole number, not {days!r}")


# -- CA --------------------------------------------------------------------------------


def create_ca(
    directory: Path,
    *,
    name: str = "frrep CA",
    days: int = 3650,
    overwrite: bool = False,
) -> CAFiles:
    """Create a private CA in ``directory``: ``ca.pem`` and ``ca-key.pem`` (mode 0600).

    The CA may sign host certificates only (``path_length=0``: no intermediate CAs).
    Raises :class:`CertError` if either file exists and ``overwrite`` is false, or if
    ``name`` is unusable.
    """
    _check_days(days)
    if not name or "\x00" in name or len(name) > 64:
        raise CertError("CA name must be 1-64 characters without NUL")
    directory = Path(directory)
    files = CAFiles(cert=directory / CA_CERT, key=directory / CA_KEY)
    _refuse_existing([files.cert, files.key], overwrite)
    directory.mkdir(parents=True, exist_ok=True)

    key = ec.generate_private_key(ec.SECP256R1())
    not_before = _now() - BACKDATE
    cert = ca_certificate(key, name, not_before, not_before + BACKDATE + dt.timedelta(days=days))
    _write_files(
        [(files.key, _key_pem(key), _KEY_MODE), (files.cert, _cert_pem(cert), _CERT_MODE)],
        overwrite=overwrite,
    )
    return files


def _spki(public_key: Any) -> bytes:
    data: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bytes]:
    cert_path, key_path = Path(ca_dir) / CA_CERT, Path(ca_dir) / CA_KEY
    try:
        cert_pem = cert_path.read_bytes()
        key_pem = key_path.read_bytes()
    except FileNotFoundError as exc:
        raise CertError(
            f"CA file missing: {exc.filename} (create it with 'cert ca create')"
        ) from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise CertError(f"{cert_path}: not a PEM certificate ({exc})") from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"{key_path}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{key_path}: not an EC private key")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertError(f"{cert_path}: not a CA certificate")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise CertError(f"{key_path} does not belong to {cert_path}")
    return cert, key, cert_pem


# -- host certificates -----------------------------------------------------------------


def issue_host_cert(
    ca_dir: Path,
    out_dir: Path,
    name: str,
    *,
    extra_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    days: int = 825,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    overwrite: bool = False,
) -> HostFiles:
    """Issue a host certificate for ``name`` signed by the CA in ``ca_dir``.

    Writes ``<name>.pem``, ``<name>-key.pem`` (mode 0600) and a copy of ``ca.pem`` into
    ``out_dir``. Subject alternative names: ``name``, then ``extra_names`` (as DNS names,
    or IP addresses if they parse as one), then ``ip_addresses``. EKU serverAuth and
    clientAuth; key usage digital signature. The validity runs from five minutes ago for
    ``days`` days, cut at the CA's own expiry; ``not_before``/``not_after`` override it
    (tests use them for expired certificates).

    Raises :class:`CertError` for a bad name or address, a missing or unusable CA, or an
    existing file when ``overwrite`` is false.
    """
    _check_days(days)
    name = validate_name(name, what="host name")
    if isinstance(extra_names, str) or isinstance(ip_addresses, str):
        raise CertError("extra_names and ip_addresses must be sequences of strings")
    san = _san_entries([name, *extra_names], ip_addresses)
    ca_cert, ca_key, ca_pem = _load_ca(Path(ca_dir))
    out_dir = Path(out_dir)
    files = HostFiles(
        cert=out_dir / f"{name}.pem", key=out_dir / f"{name}-key.pem", ca=out_dir / CA_CERT
    )
    ca_copy_needed = not (files.ca.exists() and files.ca.read_bytes() == ca_pem)
    _refuse_existing([files.cert, files.key], overwrite)
    if ca_copy_needed and not overwrite and os.path.lexists(files.ca):
        raise CertError(
            f"refusing to overwrite {files.ca}: it holds a different CA (use overwrite/--force)"
        )

    start = not_before if not_before is not None else _now() - BACKDATE
    if not_after is not None:
        end = not_after
    else:
        end = min(start + BACKDATE + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    if end <= start:
        raise CertError(f"certificate would expire ({end}) before it starts ({start})")

    key = ec.generate_private_key(ec.SECP256R1())
    cert = host_certificate(key, name, san, ca_cert, ca_key, start, end)
    out_dir.mkdir(parents=True, exist_ok=True)
    writes: list[tuple[Path, bytes, int]] = [
        (files.key, _key_pem(key), _KEY_MODE),
        (files.cert, _cert_pem(cert), _CERT_MODE),
    ]
    if ca_copy_needed:
        writes.append((files.ca, ca_pem, _CERT_MODE))
    _write_files(writes, overwrite=overwrite)
    return files


# -- reading ---------------------------------------------------------------------------


def _common_name(name: x509.Name) -> str | None:
    attributes = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attributes:
        return None
    value = attributes[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def describe_cert(path: Path) -> CertInfo:
    """Read the first certificate of a PEM (or DER) file and describe it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertError(f"{path}: {exc.strerror or exc}") from exc
    try:
        if b"-----BEGIN" in data:
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise CertError(f"{path}: not a certificate ({exc})") from exc
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(a) for a in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns_names, ips = (), ()
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        ekus = tuple(_EKU_NAMES.get(oid, oid.dotted_string) for oid in eku)
    except x509.ExtensionNotFound:
        ekus = ()
    der = cert.public_bytes(serialization.Encoding.DER)
    return CertInfo(
        subject_cn=_common_name(cert.subject),
        issuer_cn=_common_name(cert.issuer),
        dns_names=dns_names,
        ip_addresses=ips,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        is_ca=is_ca,
        ext_key_usages=ekus,
        serial=cert.serial_number,
        fingerprint_sha256=hashlib.sha256(der).hexdigest(),
    )
