"""What frrep's certificates contain: the X.509 fields and extensions of the CA and of a host.

Both are signed with SHA-256 by an ECDSA P-256 key (``certs.py`` makes the keys, checks the
names and validity, and writes the files).

* The CA: subject = issuer = its name, ``BasicConstraints(ca=True, path_length=0)`` (it signs
  host certificates only, no intermediate CAs), key usage certificate and CRL signing, and a
  key identifier.
* A host: subject CN = its name, not a CA, key usage digital signature, both EKUs (serverAuth
  and clientAuth: every host is both a TLS server and a TLS client), its names as subject
  alternative names, its key identifier and the CA's.
"""

from __future__ import annotations

import contextlib
import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["ca_certificate", "host_certificate"]


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a host signs its TLS handshakes."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    """A builder with everything but the extensions: names, ``key``'s public key, a random
    serial number and the validity."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def ca_certificate(
    key: ec.EllipticCurvePrivateKey, name: str, not_before: dt.datetime, not_after: dt.datetime
) -> x509.Certificate:
    """The self-signed CA certificate named ``name``."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        _builder(subject, subject, key, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def host_certificate(
    key: ec.EllipticCurvePrivateKey,
    name: str,
    san: list[x509.GeneralName],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """The certificate of host ``name`` (subject alternative names ``san``), signed by the CA."""
    # The CA's key identifier as the CA states it, else computed from its key.
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    with contextlib.suppress(x509.ExtensionNotFound):
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (
        _builder(subject, ca_cert.subject, key, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
