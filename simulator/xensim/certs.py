"""Self-signed host certificates, like the one a XenServer host presents on HTTPS and NBD."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

VALIDITY = datetime.timedelta(days=3650)


def make_cert(
    directory: str | Path, name: str, dns_names: list[str], ips: Sequence[str] = ()
) -> tuple[Path, Path]:
    """Write NAME.pem and NAME.key (0600) in directory unless both exist; return their paths.

    RSA-2048, SHA-256, ten years, CA:TRUE so the cert can be its own trust anchor (libnbd's
    ca-cert.pem, Python's cafile), SAN = dns_names + ips, CN = dns_names[0].
    """
    if not dns_names:
        raise ValueError("make_cert needs at least one DNS name (it becomes the CN)")
    directory = Path(directory)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = _self_signed(key, dns_names, ips)
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    log.info("wrote certificate %s for %s", cert_path, ", ".join([*dns_names, *ips]))
    return cert_path, key_path


def _self_signed(
    key: rsa.RSAPrivateKey, dns_names: list[str], ips: Sequence[str]
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])])
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    # Back-date a little so a client whose clock is slightly behind still accepts it.
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    # Create with 0600 from the start: the key must never be readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
