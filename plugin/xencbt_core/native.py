"""The upstream connection over libnbd (C, GnuTLS): a read's bytes never cross the GIL.

Python's ssl hands back one 16 KiB TLS record per recv_into, so a 2 MiB read takes the
GIL ~128 times; libnbd decrypts and fills the buffer in C with the GIL released.

Trust stays ours (trust.py); GnuTLS only enforces it.  libnbd 1.14 verifies a server
only with ``set_tls_certificates(dir)`` + ``set_tls_verify_peer`` + a TCP connect it makes
itself (over a socket we hand it, it accepts any certificate: CVE-2024-7383), and it checks
the certificate against the address it connects to (no ``set_tls_hostname`` before 1.22;
REFERENCE §5).  So each connection gets a private directory whose ``ca-cert.pem`` is the one
certificate already checked against the expectation (cert: get_nbd_info's own; pubkey and
ca: the one a Python-ssl handshake presented and trust.py accepted).  GnuTLS then accepts
that exact certificate and nothing else: a server that shows another one, as a MITM
swapping certificates between two handshakes would, fails the handshake before the export
name is sent.  Where GnuTLS would refuse a certificate we accept (it does not name the
address, e.g. an NBD network apart from the management one; or it is out of its validity
dates), ``reason_not_to_pin`` says so and the caller keeps the Python client.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import shutil
import ssl
import tempfile
import time

from cryptography import x509

from .errors import ConnectionDead, ExportRefused, RequestFailed, TrustError, Unreachable
from .slots import runtime_dir

try:  # python3-libnbd: in the system Python that nbdkit embeds (REFERENCE §4)
    import nbd
except ImportError:  # pragma: no cover - depends on the machine
    nbd = None

log = logging.getLogger(__name__)

POLL_MS = 1000  # how often a wait looks at its deadline


def available() -> bool:
    return nbd is not None


def reason_not_to_pin(der: bytes, address: str) -> str:
    """Why GnuTLS would refuse this (already trusted) certificate at ``address``, or ""."""
    cert = x509.load_der_x509_certificate(der)
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    # naive UTC: the *_utc properties are newer than Debian 12's cryptography (38)
    if not _naive(cert, "not_valid_before") <= now <= _naive(cert, "not_valid_after"):
        return "the certificate is outside its validity dates"
    try:
        ip = ipaddress.ip_address(address)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return "the certificate names no IP address (it has no subjectAltName)"
    if ip not in san.get_values_for_type(x509.IPAddress):
        return "the certificate does not name %s" % address
    return ""


def _naive(cert, name: str) -> datetime.datetime:
    aware = getattr(cert, name + "_utc", None)
    return aware.replace(tzinfo=None) if aware else getattr(cert, name)


class NativeConnection:
    """One handshaken libnbd connection; the same surface as upstream.Connection."""

    def __init__(self, handle, size: int, target, timeout: float):
        self.handle = handle
        self.size = size
        self.target = target
        self.timeout = timeout

    @classmethod
    def open(cls, target, pinned_der: bytes, timeout: float) -> NativeConnection:
        """Connect over TLS that accepts exactly ``pinned_der``; send the export name."""
        h = nbd.NBD()
        h.set_debug(False)  # LIBNBD_DEBUG would print the export name (a secret)
        h.set_request_structured_replies(False)  # xapi-nbd refuses it (REFERENCE §2)
        h.set_pread_initialize(False)  # the buffer is nbdkit's, and filled or failed whole
        h.set_export_name(target.exportname.reveal())
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_verify_peer(True)
        pin = tempfile.mkdtemp(prefix="pin-", dir=_pin_parent())  # 0700
        try:
            with open(pin + "/ca-cert.pem", "w") as f:
                f.write(ssl.DER_cert_to_PEM_cert(pinned_der))
            h.set_tls_certificates(pin)
            _connect(h, target, timeout)
        finally:
            shutil.rmtree(pin, ignore_errors=True)
        size = h.get_size()
        log.debug("connected to %s over libnbd: size=%d", target, size)
        return cls(h, size, target, timeout)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        """Read len(buf) bytes at ``offset`` straight into buf (GnuTLS decrypts into it)."""
        h = self.handle
        try:
            cookie = h.aio_pread(nbd.Buffer.from_buffer(buf), offset)
            _wait(h, lambda: h.aio_command_completed(cookie), self.timeout, self.target)
        except nbd.Error as e:
            if h.aio_is_dead() or h.aio_is_closed():
                raise ConnectionDead(
                    "connection to %s lost during a read: %s" % (self.target, _why(e))
                ) from None
            raise RequestFailed(
                "the NBD server %s refused a read of %d bytes at %d (%s)"
                % (self.target, len(buf), offset, _why(e)),
                e.errno or 0,
            ) from None

    def close(self, polite: bool = True, linger: float = 0.0) -> None:
        """As upstream.Connection.close: DISC, then wait ``linger`` at most for EOF."""
        h, self.handle = self.handle, None
        if h is None:
            return
        try:
            if polite and h.aio_is_ready():
                h.aio_disconnect()
                deadline = time.monotonic() + linger
                while not (h.aio_is_closed() or h.aio_is_dead()):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    h.poll(max(1, int(left * 1000)))
        except nbd.Error:
            pass
        finally:
            del h  # the last reference: nbd_close() frees the handle and closes the socket


def _pin_parent() -> str | None:
    parent = runtime_dir()
    return str(parent) if parent.is_dir() else None


def _connect(h, target, timeout: float) -> None:
    try:
        h.aio_connect_tcp(target.address, str(target.port))
        _wait(h, h.aio_is_ready, timeout, target)
    except nbd.Error as e:
        raise _handshake_error(e, target) from None


def _handshake_error(e, target) -> Exception:
    why = _why(e)
    if "certificate" in why.lower() or "gnutls" in why.lower():
        return TrustError(
            "the NBD server %s did not present the certificate already verified for it "
            "(the TLS handshake of libnbd refused it: %s). Someone may be intercepting the "
            "connection, or the host certificate changed a moment ago" % (target, why)
        )
    if "export" in why.lower() or "server" in why.lower() and "closed" in why.lower():
        return ExportRefused(
            "the NBD server %s closed the connection when given the export name: the XAPI "
            "session behind it has expired or was logged out, or the VDI can no longer be "
            "exported (%s)" % (target, why)
        )
    if e.errno and e.errno in (111, 113, 101, 110):  # refused, no route, unreachable, timed out
        return Unreachable("cannot connect to the NBD server %s: %s" % (target, why))
    return ConnectionDead("connection to the NBD server %s failed: %s" % (target, why))


def _wait(h, done, timeout: float, target) -> None:
    """Drive libnbd until ``done()`` (GIL released in poll), or time out."""
    deadline = time.monotonic() + timeout
    while not done():
        if h.aio_is_dead() or h.aio_is_closed():
            raise nbd.Error("the NBD server closed the connection", 0)
        if time.monotonic() > deadline:
            raise ConnectionDead("the NBD server %s did not answer in %g s" % (target, timeout))
        h.poll(POLL_MS)


def _why(e) -> str:
    # libnbd's message names the call and the cause; it never holds the export name
    # (set_export_name's argument is not echoed by errors).
    return str(getattr(e, "string", "") or e)
