"""Test certificates: a CA, certificates it signs, and self-signed ones (cryptography).

Written in the layouts third-party servers want: nbdkit --tls-certificates=DIR and
qemu-nbd's tls-creds-x509 dir both read ca-cert.pem, server-cert.pem, server-key.pem.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


@dataclass
class Issued:
    cert_pem: str
    key_pem: str
    key: rsa.RSAPrivateKey
    cert: x509.Certificate


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def issue(
    name: str,
    dns: list[str] = (),
    ips: list[str] = (),
    issuer: Issued | None = None,
    key: rsa.RSAPrivateKey | None = None,
    ca: bool = False,
) -> Issued:
    key = key or new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca or issuer is None, path_length=None), True)
    )
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), False)
    signer = issuer.key if issuer else key
    cert = builder.sign(signer, hashes.SHA256())
    return Issued(
        cert.public_bytes(serialization.Encoding.PEM).decode(),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ).decode(),
        key,
        cert,
    )


def server_dir(directory: Path, server: Issued, ca: Issued | None = None) -> Path:
    """A --tls-certificates / tls-creds-x509 directory for ``server``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca-cert.pem").write_text((ca or server).cert_pem)
    (directory / "server-cert.pem").write_text(server.cert_pem)
    key = directory / "server-key.pem"
    key.write_text(server.key_pem)
    key.chmod(0o600)
    return directory
