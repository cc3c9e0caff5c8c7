"""The upstream NBD client: the host's NBD server, read over (pinned) TLS.

REFERENCE §2 and §5: fixed newstyle, STARTTLS, NBD_OPT_EXPORT_NAME, simple replies,
512-byte aligned reads, one request at a time per connection, at most 16 connections
per host, opened one after another.  libnbd cannot pin certificates, so this is ours.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import time
from dataclasses import dataclass, field

from . import nbdproto as P
from .errors import (
    ConnectionDead,
    ExportRefused,
    PayloadCut,
    ProtocolError,
    RequestFailed,
    TrustError,
    Unreachable,
    UpstreamError,
)
from .secret import Secret
from .trust import Expectation

log = logging.getLogger(__name__)

MAX_REQUEST = 2 * 1024 * 1024  # per NBD_CMD_READ; what Xen Orchestra uses against real hosts
CONNECT_TIMEOUT = 5.0  # per address: a dead one must not stall the copy (REFERENCE §2)


@dataclass(frozen=True)
class Target:
    """One get_nbd_info record.  The export name is a Secret: it carries a live session.

    ``plain``: the address is on an insecure_nbd network (decided from the network's
    purpose read over the verified API, never from what the NBD server offers).
    """

    address: str
    port: int
    exportname: Secret = field(repr=False)
    cert: str = field(default="", repr=False)
    subject: str = ""
    plain: bool = False

    @classmethod
    def from_record(cls, record: dict) -> Target:
        try:
            name = record["exportname"]
            return cls(
                address=host_address(str(record["address"])),
                port=int(record["port"]),
                exportname=name if isinstance(name, Secret) else Secret(str(name)),
                cert=str(record.get("cert") or ""),
                subject=str(record.get("subject") or ""),
            )
        except (KeyError, TypeError, ValueError) as e:
            from .errors import ConfigError

            raise ConfigError("an NBD info record lacks a valid %s" % e) from None

    def __str__(self) -> str:
        host = "[%s]" % self.address if ":" in self.address else self.address
        return "%s:%d" % (host, self.port)


def host_address(address: str) -> str:
    """get_nbd_info gives IPv6 addresses in CIDR form, as PIF.IPv6 stores them
    (xapi_vdi.ml ``_get_nbd_info``): ``fd00::5/64`` names the host ``fd00::5``."""
    return address.strip().partition("/")[0]


def preference(target: Target) -> int:
    """Order to try addresses in: xapi-nbd listens on IPv4 only (ocaml/nbd/src/main.ml),
    so IPv4 first, then global IPv6, then link-local IPv6 (unreachable without a zone)."""
    try:
        ip = ipaddress.ip_address(target.address)
    except ValueError:
        return 1  # a host name: let the resolver decide
    if ip.version == 4:
        return 0
    return 3 if ip.is_link_local else 2


def by_preference(targets: list[Target]) -> list[Target]:
    return sorted(targets, key=preference)  # stable: the server's order within a kind


class Connection:
    """One handshaken connection to an export.  Not thread-safe: the pool lends it out."""

    def __init__(self, sock: socket.socket, size: int, target: Target):
        self.sock = sock
        self.size = size
        self.target = target
        self._handle = 0

    @classmethod
    def open(cls, target: Target, expect: Expectation | None, timeout: float) -> Connection:
        """Connect, upgrade to TLS unless ``expect`` is None, verify, send the export name."""
        try:
            connect_timeout = min(timeout, CONNECT_TIMEOUT)
            sock = socket.create_connection((target.address, target.port), connect_timeout)
            # Each message goes out in one send, so Nagle only delays: the TLS Finished
            # and the export name right behind it waited for the server's delayed ACK,
            # 40 ms per connection (qemu's NBD client sets it too).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(timeout)
        except OSError as e:
            raise Unreachable(
                "cannot connect to the NBD server %s: %s" % (target, _why(e))
            ) from None
        try:
            return cls._handshake(sock, target, expect)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def _handshake(cls, sock, target: Target, expect: Expectation | None) -> Connection:
        magic, opt, flags = P.GREETING.unpack(_recv_greeting(sock, target))
        if magic != P.NBDMAGIC or opt != P.IHAVEOPT:
            raise ProtocolError("%s is not a newstyle NBD server (bad greeting magic)" % target)
        if not flags & P.FLAG_FIXED_NEWSTYLE:
            raise ProtocolError("%s does not speak fixed newstyle NBD" % target)
        no_zeroes = flags & P.FLAG_NO_ZEROES
        _send(sock, (P.FLAG_FIXED_NEWSTYLE | no_zeroes).to_bytes(4, "big"))
        if expect is not None:
            sock = _starttls(sock, target, expect)
        name = target.exportname.reveal().encode("utf-8")
        _send(sock, P.OPTION.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, len(name)) + name)
        try:
            info = _recv_exact(sock, P.EXPORT_INFO.size + (0 if no_zeroes else P.ZERO_PAD))
        except ConnectionDead:
            raise ExportRefused(
                "the NBD server %s closed the connection when given the export name: the "
                "XAPI session behind it has expired or was logged out, or the VDI can no "
                "longer be exported" % target
            ) from None
        size, tflags = P.EXPORT_INFO.unpack_from(info)
        if size > P.MAX_EXPORT_SIZE:
            raise ProtocolError("%s announced an absurd export size (%d bytes)" % (target, size))
        log.debug("connected to %s: size=%d flags=0x%x", target, size, tflags)
        return cls(sock, size, target)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        """Read len(buf) bytes at ``offset`` (aligned, <= MAX_REQUEST) straight into buf."""
        self._handle += 1
        handle = self._handle
        _send(self.sock, P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, handle, offset, len(buf)))
        magic, error, got = P.SIMPLE_REPLY.unpack(_recv_exact(self.sock, P.SIMPLE_REPLY.size))
        if magic != P.SIMPLE_REPLY_MAGIC:
            raise ProtocolError("bad reply magic 0x%x from %s" % (magic, self.target))
        if got != handle:
            raise ProtocolError(
                "reply for handle %d, expected %d, from %s" % (got, handle, self.target)
            )
        if error:
            raise RequestFailed(
                "the NBD server %s refused a read of %d bytes at %d (errno %d)"
                % (self.target, len(buf), offset, error),
                error,
            )
        got, why = _recv_some(self.sock, buf)
        if why:
            raise PayloadCut(
                "%s after %d of the %d bytes read at %d from %s"
                % (why, got, len(buf), offset, self.target),
                got,
            )

    def close(self, polite: bool = True, linger: float = 0.0) -> None:
        """Send DISC (when ``polite``) and close.  ``linger`` > 0: first wait that long at
        most for the server to close its end, which xapi-nbd does only once dom0 has
        unplugged the connection's VBD and the host counts the connection no more."""
        try:
            if polite:
                self._handle += 1
                _send(self.sock, P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_DISC, self._handle, 0, 0))
                if linger > 0:
                    _await_eof(self.sock, linger)
        except UpstreamError:
            pass
        finally:
            try:
                self.sock.close()
            except OSError:
                pass


def _await_eof(sock: socket.socket, timeout: float) -> None:
    """Read and drop whatever comes until the peer closes, an error, or ``timeout``."""
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                return
    except (OSError, ValueError):
        return  # reset, TLS EOF without close_notify, timeout: the wait is over either way


def _starttls(sock: socket.socket, target: Target, expect: Expectation) -> ssl.SSLSocket:
    _send(sock, P.OPTION.pack(P.IHAVEOPT, P.OPT_STARTTLS, 0))
    magic, opt, rtype, length = P.OPTION_REPLY.unpack(_recv_exact(sock, P.OPTION_REPLY.size))
    if magic != P.OPT_REPLY_MAGIC or opt != P.OPT_STARTTLS:
        raise ProtocolError("bad option reply from %s" % target)
    if length > 65536:
        raise ProtocolError("oversized option reply (%d bytes) from %s" % (length, target))
    _recv_exact(sock, length)
    if rtype != P.REP_ACK:
        raise TrustError(
            "the NBD server %s refused TLS (%s); refusing to continue without it: the "
            "network's purpose may have changed less than ~10 s ago (see `xencbt nbd "
            "status`), or something between us is stripping TLS"
            % (target, P.REP_NAMES.get(rtype, hex(rtype)))
        )
    try:
        tls = expect.context().wrap_socket(sock, server_hostname=None)
    except ssl.SSLCertVerificationError as e:
        raise TrustError(
            "the NBD server %s certificate does not chain to cafile=%s (verify=ca): %s"
            % (target, expect.cafile, e.verify_message)
        ) from None
    except ssl.SSLError as e:
        raise TrustError("TLS handshake with the NBD server %s failed: %s" % (target, e)) from None
    except OSError as e:
        raise ConnectionDead("TLS handshake with %s broke off: %s" % (target, _why(e))) from None
    expect.check(tls.getpeercert(binary_form=True))
    return tls


def _recv_greeting(sock, target: Target) -> bytes:
    try:
        return _recv_exact(sock, P.GREETING.size)
    except ConnectionDead:
        raise ConnectionDead(
            "the NBD server %s closed the connection before greeting us: the host may "
            "already serve its limit of 16 NBD connections, or NBD was enabled on this "
            "network less than ~10 s ago" % target
        ) from None


def _why(e: OSError) -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    return e.strerror or str(e) or type(e).__name__


def _send(sock, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError as e:
        raise ConnectionDead("connection lost while sending: %s" % _why(e)) from None


def _recv_exact(sock, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return bytes(buf)


def _recv_into(sock, view: memoryview) -> None:
    got, why = _recv_some(sock, view)
    if why:
        raise ConnectionDead(why)


def _recv_some(sock, view: memoryview) -> tuple[int, str]:
    """Receive until ``view`` is full or the connection ends: (bytes received, why it ended
    early or "")."""
    got, n = 0, len(view)
    while got < n:
        try:
            r = sock.recv_into(view[got:], n - got)
        except OSError as e:
            return got, "connection lost while receiving: %s" % _why(e)
        if r == 0:
            return got, "the NBD server closed the connection"
        got += r
    return got, ""
