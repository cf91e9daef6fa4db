"""frlink.certs: the CA, host certificates, file modes, names, and reading them back."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from frlink.certs import (
    CertError,
    create_ca,
    describe_cert,
    issue_host_cert,
    validate_name,
)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ca")
    create_ca(directory, name="test CA")
    return directory


def test_ca_fields_and_key_mode(tmp_path: Path) -> None:
    files = create_ca(tmp_path / "ca", name="frrep test CA", days=100)
    assert files.cert == tmp_path / "ca" / "ca.pem"
    assert files.key == tmp_path / "ca" / "ca-key.pem"
    assert mode(files.key) == 0o600
    cert = load(files.cert)
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == "CN=frrep test CA"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert not usage.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=100) <= lifetime <= dt.timedelta(days=100, minutes=10)
    assert [f.name for f in (tmp_path / "ca").iterdir() if f.name.startswith(".")] == []


def test_key_mode_is_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        files = create_ca(tmp_path)
        host = issue_host_cert(tmp_path, tmp_path / "out", "r1.example.com")
    finally:
        os.umask(old)
    assert mode(files.key) == 0o600
    assert mode(host.key) == 0o600
    assert mode(host.cert) == 0o644


def test_ca_refuses_overwrite(tmp_path: Path) -> None:
    create_ca(tmp_path)
    before = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(CertError, match="refusing to overwrite"):
        create_ca(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == before
    (tmp_path / "ca.pem").unlink()  # only the key is left: still refused, nothing written
    with pytest.raises(CertError, match=r"ca-key\.pem"):
        create_ca(tmp_path)
    assert not (tmp_path / "ca.pem").exists()
    files = create_ca(tmp_path, overwrite=True)
    assert load(files.cert).subject.rfc4514_string() == "CN=frrep CA"
    assert mode(files.key) == 0o600


def test_host_cert_fields(ca_dir: Path, tmp_path: Path) -> None:
    files = issue_host_cert(
        ca_dir,
        tmp_path,
        "R1.Example.com",
        extra_names=["brkr.example.com", "10.0.0.5"],
        ip_addresses=["127.0.0.11", "::1"],
        days=90,
    )
    assert files.cert == tmp_path / "r1.example.com.pem"
    assert files.key == tmp_path / "r1.example.com-key.pem"
    assert files.ca.read_bytes() == (ca_dir / "ca.pem").read_bytes()
    assert mode(files.key) == 0o600
    cert = load(files.cert)
    ca = load(ca_dir / "ca.pem")
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    assert cert.subject.rfc4514_string() == "CN=r1.example.com"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["r1.example.com", "brkr.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("127.0.0.11"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=90) <= lifetime <= dt.timedelta(days=90, minutes=10)
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def test_host_cert_is_cut_at_ca_expiry(tmp_path: Path) -> None:
    create_ca(tmp_path / "ca", days=30)
    files = issue_host_cert(tmp_path / "ca", tmp_path, "r2.example.com")  # 825 days > 30
    assert load(files.cert).not_valid_after_utc == load(files.ca).not_valid_after_utc


def test_host_cert_validity_override(ca_dir: Path, tmp_path: Path) -> None:
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    end = dt.datetime(2020, 2, 1, tzinfo=dt.UTC)
    files = issue_host_cert(ca_dir, tmp_path, "old.example.com", not_before=start, not_after=end)
    cert = load(files.cert)
    assert cert.not_valid_before_utc == start
    assert cert.not_valid_after_utc == end
    with pytest.raises(CertError, match="before it starts"):
        issue_host_cert(ca_dir, tmp_path, "x.example.com", not_before=end, not_after=start)


def test_host_cert_refuses_overwrite(ca_dir: Path, tmp_path: Path) -> None:
    first = issue_host_cert(ca_dir, tmp_path, "r1.example.com")
    before = first.cert.read_bytes()
    with pytest.raises(CertError, match="refusing to overwrite"):
        issue_host_cert(ca_dir, tmp_path, "r1.example.com")
    assert first.cert.read_bytes() == before
    # A second host in the same directory shares the (identical) ca.pem: allowed.
    issue_host_cert(ca_dir, tmp_path, "r2.example.com")
    again = issue_host_cert(ca_dir, tmp_path, "r1.example.com", overwrite=True)
    assert again.cert.read_bytes() != before
    assert mode(again.key) == 0o600


def test_host_cert_refuses_a_different_ca_copy(ca_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(b"another CA\n")
    with pytest.raises(CertError, match="different CA"):
        issue_host_cert(ca_dir, tmp_path, "r1.example.com")
    assert not (tmp_path / "r1.example.com.pem").exists()
    files = issue_host_cert(ca_dir, tmp_path, "r1.example.com", overwrite=True)
    assert files.ca.read_bytes() == (ca_dir / "ca.pem").read_bytes()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../evil", "'/'"),
        ("a/b", "'/'"),
        ("..", r"'\.\.'"),
        ("a\\b", r"'\\'"),
        ("a\x00b", "NUL"),
        (".hidden", "starts with '.'"),
        ("", "empty"),
        ("-bad.example.com", "not a DNS name"),
        ("bad-.example.com", "not a DNS name"),
        ("under_score.example.com", "not a DNS name"),
        ("a..b", r"'\.\.'"),
        ("trailing.", "ends with '.'"),
        ("*.example.com", "not a DNS name"),
        ("x" * 64 + ".example.com", "not a DNS name"),
        ("a." * 127 + "com", "longer than 253"),
    ],
)
def test_bad_names_refused(ca_dir: Path, tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(CertError, match=message):
        issue_host_cert(ca_dir, tmp_path / "out", name)
    with pytest.raises(CertError, match=message):
        issue_host_cert(ca_dir, tmp_path / "out", "ok.example.com", extra_names=[name])
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "evil").exists()


def test_bad_ip_refused(ca_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CertError, match="not an IPv4 or IPv6"):
        issue_host_cert(ca_dir, tmp_path, "r1.example.com", ip_addresses=["300.1.1.1"])


def test_validate_name_canonical_forms() -> None:
    assert validate_name("R1.EXAMPLE.com") == "r1.example.com"
    assert validate_name("localhost") == "localhost"
    assert validate_name("0:0:0:0:0:0:0:1") == "::1"
    assert validate_name("127.0.0.11") == "127.0.0.11"


def test_ip_as_host_name(ca_dir: Path, tmp_path: Path) -> None:
    files = issue_host_cert(ca_dir, tmp_path, "127.0.0.11")
    info = describe_cert(files.cert)
    assert info.dns_names == ()
    assert info.ip_addresses == ("127.0.0.11",)


def test_missing_or_bad_ca(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="CA file missing"):
        issue_host_cert(tmp_path / "nope", tmp_path, "r1.example.com")
    create_ca(tmp_path / "a")
    create_ca(tmp_path / "b")
    (tmp_path / "a" / "ca-key.pem").write_bytes((tmp_path / "b" / "ca-key.pem").read_bytes())
    with pytest.raises(CertError, match="does not belong"):
        issue_host_cert(tmp_path / "a", tmp_path / "out", "r1.example.com")
    host = issue_host_cert(tmp_path / "b", tmp_path / "host", "h.example.com")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "ca.pem").write_bytes(host.cert.read_bytes())
    (tmp_path / "c" / "ca-key.pem").write_bytes(host.key.read_bytes())
    with pytest.raises(CertError, match="not a CA"):
        issue_host_cert(tmp_path / "c", tmp_path / "out", "r1.example.com")


def test_describe_cert(ca_dir: Path, tmp_path: Path) -> None:
    files = issue_host_cert(
        ca_dir, tmp_path, "p1.example.com", extra_names=["brkr.example.com"], ip_addresses=["::1"]
    )
    info = describe_cert(files.cert)
    assert info.subject_cn == "p1.example.com"
    assert info.issuer_cn == "test CA"
    assert info.dns_names == ("p1.example.com", "brkr.example.com")
    assert info.ip_addresses == ("::1",)
    assert not info.is_ca
    assert info.ext_key_usages == ("serverAuth", "clientAuth")
    assert info.not_before.tzinfo is not None
    assert len(info.fingerprint_sha256) == 64
    ca_info = describe_cert(ca_dir / "ca.pem")
    assert ca_info.is_ca
    assert ca_info.subject_cn == ca_info.issuer_cn == "test CA"
    assert info.to_dict()["dns_names"] == ["p1.example.com", "brkr.example.com"]
    with pytest.raises(CertError, match="not a certificate"):
        describe_cert(files.key)
    with pytest.raises(CertError):
        describe_cert(tmp_path / "missing.pem")


# -- frctl cert, run as a real process --------------------------------------------------


def frctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "frctl.main", "cert", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_create_issue_show(tmp_path: Path) -> None:
    ca, out = tmp_path / "ca", tmp_path / "r1"
    created = frctl("ca", "create", "--dir", str(ca), "--name", "lab CA", "--days", "30")
    assert created.returncode == 0, created.stderr
    assert created.stdout.splitlines() == [f"wrote {ca / 'ca-key.pem'}", f"wrote {ca / 'ca.pem'}"]
    assert "fingerprint" in created.stderr
    assert mode(ca / "ca-key.pem") == 0o600

    issued = frctl(
        "issue", "--ca", str(ca), "--out", str(out), "r1.example.com",
        "--san", "brkr.example.com", "--san", "r1", "--ip", "127.0.0.11", "--days", "7",
    )  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    assert issued.stdout.splitlines() == [
        f"wrote {out / 'r1.example.com-key.pem'}",
        f"wrote {out / 'r1.example.com.pem'}",
        f"wrote {out / 'ca.pem'}",
    ]
    assert mode(out / "r1.example.com-key.pem") == 0o600

    second = frctl("issue", "--ca", str(ca), "--out", str(out), "r2.example.com")
    assert second.returncode == 0, second.stderr
    assert len(second.stdout.splitlines()) == 2  # ca.pem is already there, unchanged

    shown = frctl("show", str(out / "r1.example.com.pem"), "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["subject_cn"] == "r1.example.com"
    assert info["issuer_cn"] == "lab CA"
    assert info["dns_names"] == ["r1.example.com", "brkr.example.com", "r1"]
    assert info["ip_addresses"] == ["127.0.0.11"]
    assert info["ext_key_usages"] == ["serverAuth", "clientAuth"]
    assert info["is_ca"] is False
    lifetime = dt.datetime.fromisoformat(info["not_after"]) - dt.datetime.fromisoformat(
        info["not_before"]
    )
    assert dt.timedelta(days=7) <= lifetime <= dt.timedelta(days=7, minutes=10)
    assert (
        info["fingerprint_sha256"] == describe_cert(out / "r1.example.com.pem").fingerprint_sha256
    )

    text = frctl("show", str(ca / "ca.pem"))
    assert text.returncode == 0, text.stderr
    assert "subject CN:    lab CA" in text.stdout
    assert "CA:            yes" in text.stdout
    assert "days left" in text.stdout


def test_cli_errors(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    assert frctl("ca", "create", "--dir", str(ca)).returncode == 0
    again = frctl("ca", "create", "--dir", str(ca))
    assert again.returncode == 1
    assert again.stdout == ""
    assert "refusing to overwrite" in again.stderr
    assert frctl("ca", "create", "--dir", str(ca), "--force").returncode == 0

    evil = frctl("issue", "--ca", str(ca), "--out", str(tmp_path / "o"), "../../etc/x")
    assert evil.returncode == 1
    assert "refused" in evil.stderr
    assert not (tmp_path / "o").exists()

    no_ca = frctl("issue", "--ca", str(tmp_path / "none"), "--out", str(tmp_path), "h.example")
    assert no_ca.returncode == 1
    assert "CA file missing" in no_ca.stderr

    bad_ip = frctl("issue", "--ca", str(ca), "--out", str(tmp_path), "h.example", "--ip", "x")
    assert bad_ip.returncode == 1
    assert "not an IPv4 or IPv6 address" in bad_ip.stderr

    assert frctl("issue", "--ca", str(ca), "h.example").returncode == 2  # --out missing
    assert frctl("ca", "create", "--dir", str(ca), "--days", "0").returncode == 2
    missing = frctl("show", str(tmp_path / "nope.pem"))
    assert missing.returncode == 1
    assert "nope.pem" in missing.stderr
