"""TLS verification of the host's NBD server, as seed 000 requires.

``cert``   the presented certificate must equal the one get_nbd_info returned (DER);
``pubkey`` its public key (SubjectPublicKeyInfo) must equal that certificate's;
``ca``     it must chain to ``cafile`` and name get_nbd_info's ``subject`` in its SAN
           (or CN when there is no SAN).

Pinning is checked after the handshake and before any NBD data (the export name) is
sent: the handshake already proved the peer holds the key of the certificate it showed,
so comparing that certificate with the expected one is all that is left to do.
"""

from __future__ import annotations

import hashlib
import ipaddress
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .errors import ConfigError, TrustError

MODES = ("cert", "pubkey", "ca")


def fingerprint(der: bytes) -> str:
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def pem_to_der(pem: str) -> bytes:
    try:
        return x509.load_pem_x509_certificate(pem.encode("ascii")).public_bytes(
            serialization.Encoding.DER
        )
    except (ValueError, UnicodeEncodeError) as e:
        raise ConfigError(
            "the NBD info's certificate is not a valid PEM certificate: %s" % e
        ) from None


def spki(der: bytes) -> bytes:
    key = x509.load_der_x509_certificate(der).public_key()
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def names(der: bytes) -> list[str]:
    """DNS and IP names of a certificate: the SAN, else the subject's CN."""
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return [str(a.value) for a in cns]
    dns = san.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return list(dns) + ips


def name_matches(pattern: str, subject: str) -> bool:
    pattern, subject = pattern.lower().rstrip("."), subject.lower().rstrip(".")
    try:
        return ipaddress.ip_address(pattern) == ipaddress.ip_address(subject)
    except ValueError:
        pass
    if pattern.startswith("*."):
        head, _, rest = subject.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == subject


@dataclass(frozen=True)
class Expectation:
    """What the server must present: built from one get_nbd_info record."""

    mode: str
    cert_pem: str = ""
    subject: str = ""
    cafile: str = ""

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # Hostname checks are ours (the host is reached by IP, its cert names a DNS host).
        ctx.check_hostname = False
        if self.mode == "ca":
            ctx.verify_mode = ssl.CERT_REQUIRED
            try:
                ctx.load_verify_locations(cafile=self.cafile)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError("cannot load cafile=%s: %s" % (self.cafile, e)) from None
        else:
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def check(self, peer_der: bytes | None) -> None:
        """Raise TrustError unless the presented certificate is the expected one."""
        if not peer_der:
            raise TrustError("the NBD server presented no certificate")
        if self.mode == "cert":
            self._check_cert(peer_der)
        elif self.mode == "pubkey":
            self._check_pubkey(peer_der)
        else:
            self._check_subject(peer_der)

    def _check_cert(self, peer: bytes) -> None:
        expected = pem_to_der(self.cert_pem)
        if peer != expected:
            raise TrustError(
                "the NBD server's certificate is not the one XAPI reported for this host "
                "(verify=cert): server presented SHA256 %s, expected %s. Someone may be "
                "intercepting the connection, or the host certificate changed since "
                "get_nbd_info was called" % (fingerprint(peer), fingerprint(expected))
            )

    def _check_pubkey(self, peer: bytes) -> None:
        expected = pem_to_der(self.cert_pem)
        if spki(peer) != spki(expected):
            raise TrustError(
                "the NBD server's public key is not the one XAPI reported (verify=pubkey): "
                "server certificate SHA256 %s, expected a certificate with the key of %s"
                % (fingerprint(peer), fingerprint(expected))
            )

    def _check_subject(self, peer: bytes) -> None:
        if not self.subject:
            raise TrustError("verify=ca needs the subject from get_nbd_info, which is empty")
        presented = names(peer)
        if not any(name_matches(n, self.subject) for n in presented):
            raise TrustError(
                "the NBD server's certificate is signed by a trusted CA but names %s, not "
                "the expected subject %r (verify=ca); certificate SHA256 %s"
                % (", ".join(presented) or "nothing", self.subject, fingerprint(peer))
            )
