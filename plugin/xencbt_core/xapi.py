"""A XAPI session over XML-RPC (standard library only, so it also runs inside nbdkit).

REFERENCE §3: login and calls follow HOST_IS_SLAVE to the master (a session given with
session= too); SESSION_INVALID means log in again, which yields a *new* session ref —
``generation`` counts logins so that users of export names built from the old ref
(get_nbd_info) know to fetch new ones.
The API's HTTPS certificate is verified: a CA file, a pinned SHA-256 thumbprint, or the
system CAs; never skipped unless ``insecure`` is asked for explicitly.

The plugin's XAPI messages are typed methods of ``Session`` (``vdi_record``,
``vm_vbds``, …): the ``"Class.message"`` strings it sends live in this module only.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import socket
import ssl
import threading
import urllib.parse
import xmlrpc.client
from dataclasses import dataclass, field
from typing import Any

from .errors import (
    AuthenticationFailed,
    ConfigError,
    SessionInvalid,
    TrustError,
    XapiError,
    XencbtError,
)
from .inuse import InUseRetry
from .secret import Secret, register
from .trust import fingerprint

log = logging.getLogger(__name__)

ORIGINATOR = "xencbt"
API_VERSION = "1.1"
NULL_REF = "OpaqueRef:NULL"  # a reference field that refers to nothing


@dataclass(frozen=True)
class ApiTrust:
    """How to verify the API's certificate."""

    cafile: str = ""
    thumbprint: str = ""
    insecure: bool = False
    # Errors advise settings as the user gives them: the plugin's parameters
    # ("xapi-cafile="), or the xencbt command's options ("--xapi-cafile").
    options: bool = field(default=False, compare=False)

    def __post_init__(self):
        if sum(map(bool, (self.cafile, self.thumbprint, self.insecure))) > 1:
            raise ConfigError(
                "give at most one of %s, %s, %s"
                % (self.says("xapi-cafile"), self.says("thumbprint"), self.says("xapi-insecure"))
            )
        if self.thumbprint and len(self.normalized()) != 64:
            raise ConfigError(
                "%s must be a SHA-256 fingerprint (64 hex digits, colons allowed), "
                "e.g. from: openssl x509 -in /etc/xensource/xapi-ssl.pem -noout "
                "-fingerprint -sha256" % self.says("thumbprint")
            )

    def says(self, setting: str, value: str | None = None) -> str:
        """``setting`` (with ``value``) as the user gives it: "xapi-cafile=FILE", or
        "--xapi-cafile FILE" from the xencbt command."""
        if self.options:
            return "--" + setting + ("" if value is None else " " + value)
        return setting + "=" + ("" if value is None else value)

    def normalized(self) -> str:
        return self.thumbprint.replace(":", "").strip().upper()

    def context(self) -> ssl.SSLContext:
        if self.thumbprint or self.insecure:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            try:
                ctx = ssl.create_default_context(cafile=self.cafile or None)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(
                    "cannot load %s: %s" % (self.says("xapi-cafile", self.cafile), e)
                ) from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def unverified(self, host: str, port: int, why: str) -> str:
        """Why the server's certificate was refused, naming the one it presented, and
        what to do (never: pass the option that was passed)."""
        found = presented(host, port)
        shown = " (it presented a certificate with SHA-256 fingerprint %s)" % found if found else ""
        if self.cafile:
            return (
                "cannot verify the XAPI server %s certificate against %s: %s%s. "
                "Is that file the pool master's certificate (the certificate part of its "
                "/etc/xensource/xapi-ssl.pem), and does the URL name that host? If the "
                "fingerprint is the master's, %s pins it instead"
                % (host, self.says("xapi-cafile", self.cafile), why, shown, self.says("thumbprint"))
            )
        return (
            "cannot verify the XAPI server %s certificate: %s%s. Pass %s (the "
            "pool master's certificate) or %s (its SHA-256 fingerprint)"
            % (host, why, shown, self.says("xapi-cafile"), self.says("thumbprint"))
        )

    def check(self, sock: ssl.SSLSocket, host: str) -> None:
        if not self.thumbprint:
            return
        der = sock.getpeercert(binary_form=True) or b""
        if hashlib.sha256(der).hexdigest().upper() != self.normalized():
            raise TrustError(
                "the XAPI server %s presented a certificate with SHA256 fingerprint %s, "
                "not the pinned %s"
                % (host, fingerprint(der), self.says("thumbprint", self.thumbprint))
            )


def presented(host: str, port: int) -> str | None:
    """The SHA-256 fingerprint of the certificate ``host`` presents (unverified: only to
    name it in an error), or None when it cannot be had."""
    # What ssl.get_server_certificate(timeout=) does from Python 3.10 on; EL9's nbdkit
    # embeds 3.9, whose version has no timeout and could hang on a silent server.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=10) as sock,
            ctx.wrap_socket(sock, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError, ValueError):
        return None
    return fingerprint(der) if der else None


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host, trust: ApiTrust, timeout: float):
        super().__init__(host, context=trust.context(), timeout=timeout)
        self._trust = trust

    def connect(self):
        try:
            super().connect()
        except ssl.SSLCertVerificationError as e:
            raise TrustError(
                self._trust.unverified(self.host, self.port, e.verify_message)
            ) from None
        self._trust.check(self.sock, self.host)


def https_connection(netloc: str, trust: ApiTrust, timeout: float = 60.0):
    """An HTTPSConnection verified like the API (for /import_raw_vdi and friends)."""
    return _PinnedHTTPSConnection(netloc, trust, timeout)


class _Transport(xmlrpc.client.SafeTransport):
    def __init__(self, trust: ApiTrust, timeout: float):
        super().__init__()
        self._trust = trust
        self._timeout = timeout

    def make_connection(self, host):
        if self._connection and host == self._connection[0]:
            return self._connection[1]
        chost, self._extra_headers, _x509 = self.get_host_info(host)
        self._connection = host, _PinnedHTTPSConnection(chost, self._trust, self._timeout)
        return self._connection[1]


class Session:
    """A logged-in XAPI session.  Thread-safe: calls are serialised."""

    def __init__(
        self,
        url: str,
        trust: ApiTrust,
        user: str = "root",
        password: Secret | None = None,
        session_ref: Secret | None = None,
        timeout: float = 60.0,
        originator: str = ORIGINATOR,
    ):
        if not (password or session_ref):
            raise ConfigError("XAPI needs password= or session=")
        self.url = _normalise_url(url)
        self.trust = trust
        self.user = user
        self._password = password
        self._ref = session_ref
        self.owned = session_ref is None  # we log out only what we logged in
        self.timeout = timeout
        self.originator = originator  # how xapi's session list names us
        self.generation = 0 if session_ref is None else 1
        self._lock = threading.RLock()
        self._proxy = self._make_proxy()

    def _make_proxy(self) -> xmlrpc.client.ServerProxy:
        return xmlrpc.client.ServerProxy(
            self.url, transport=_Transport(self.trust, self.timeout), allow_none=True
        )

    @property
    def netloc(self) -> str:
        return urllib.parse.urlsplit(self.url).netloc

    def ref(self) -> Secret:
        with self._lock:
            if self._ref is None:
                self.login()
            assert self._ref is not None
            return self._ref

    def login(self) -> None:
        """Log in, following HOST_IS_SLAVE to the master once."""
        if self._password is None:
            raise SessionInvalid(
                "SESSION_INVALID",
                hint="the session given with session= is no longer valid and there is no "
                "password to log in again",
            )
        with self._lock:
            for _ in range(2):
                try:
                    ref = self._raw_call(
                        "session.login_with_password",
                        self.user,
                        self._password.reveal(),
                        API_VERSION,
                        self.originator,
                    )
                except XapiError as e:
                    if e.code == "HOST_IS_SLAVE" and e.params:
                        self._move_to(e.params[0])
                        continue
                    if e.code == "SESSION_AUTHENTICATION_FAILED":
                        raise AuthenticationFailed(
                            e.code,
                            [self.user],
                            hint="XAPI at %s refused the user name or password (changed "
                            "since the password file was written?)" % self.netloc,
                        ) from None
                    raise
                self._ref = Secret(register(ref))
                self.generation += 1
                log.debug("logged in to %s as %s", self.url, self.user)
                return
            raise XapiError("HOST_IS_SLAVE", hint="the master kept redirecting")

    def _move_to(self, master: str) -> None:
        parts = urllib.parse.urlsplit(self.url)
        host = "[%s]" % master if ":" in master else master
        netloc = host + (":%d" % parts.port if parts.port else "")
        self.url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        log.info("%s is a pool member; talking to the master %s", parts.netloc, netloc)
        self._proxy = self._make_proxy()

    def call(self, method: str, *args):
        """Call ``method`` with the session, on the master: a member answers a user
        session's calls with HOST_IS_SLAVE [master] (session_check.ml), so move there,
        as login does; the session ref stays valid pool-wide."""
        with self._lock:
            for _ in range(2):
                try:
                    return self._call_once(method, *args)
                except XapiError as e:
                    if e.code != "HOST_IS_SLAVE" or not e.params:
                        raise
                    self._move_to(e.params[0])
            raise XapiError("HOST_IS_SLAVE", hint="the master kept redirecting")

    def _call_once(self, method: str, *args):
        """One call; log in again once if the session died."""
        with self._lock:
            try:
                return self._raw_call(method, self.ref().reveal(), *args)
            except SessionInvalid:
                if self._password is None:
                    raise
                log.info("XAPI session expired; logging in again")
                self._ref = None
                return self._raw_call(method, self.ref().reveal(), *args)

    def reset_connection(self) -> None:
        """A fresh HTTPS connection for the next call: one interrupted mid-request (a
        signal while undoing work) cannot carry another request."""
        with self._lock:
            self._proxy = self._make_proxy()

    def _raw_call(self, method: str, *args):
        try:
            result = getattr(self._proxy, method)(*args)
        except TrustError:
            raise
        except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError) as e:
            raise XencbtError("cannot reach XAPI at %s: %s" % (self.url, _describe(e))) from None
        except xmlrpc.client.Fault as e:
            raise XencbtError("XAPI at %s: %s" % (self.url, e.faultString)) from None
        except BaseException:
            # Interrupted mid-call (Ctrl-C, SIGTERM): xmlrpc.client resets its connection
            # after an Exception only; left half-way, every later call (the cleanup's, the
            # logout) would fail with "Request-sent".  Reconnect instead.
            self._proxy("close")()
            raise
        return _parse(result)

    def logout(self) -> None:
        with self._lock:
            if self._ref is None or not self.owned:
                return
            try:
                self._raw_call("session.logout", self._ref.reveal())
            except XencbtError as e:
                log.debug("logout failed: %s", e)
            self._ref = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.logout()

    # -- the messages the plugin sends, typed (refs are "OpaqueRef:…" strings) ------------
    def pool_refs(self) -> list[str]:
        """pool.get_all: the pool's ref (one); cheap, so it also keeps the session alive."""
        return self.call("pool.get_all")

    def network_records(self) -> dict[str, dict[str, Any]]:
        """network.get_all_records: {network ref: record}."""
        return self.call("network.get_all_records")

    def pif_records(self) -> dict[str, dict[str, Any]]:
        """PIF.get_all_records: {PIF ref: record}."""
        return self.call("PIF.get_all_records")

    def vm_by_uuid(self, uuid: str) -> str:
        """VM.get_by_uuid: the VM's (or VM snapshot's) ref."""
        return self.call("VM.get_by_uuid", uuid)

    def vm_is_a_snapshot(self, vm: str) -> bool:
        """VM.get_is_a_snapshot."""
        return self.call("VM.get_is_a_snapshot", vm)

    def vm_name_label(self, vm: str) -> str:
        """VM.get_name_label."""
        return self.call("VM.get_name_label", vm)

    def vm_snapshot_of(self, vm: str) -> str:
        """VM.get_snapshot_of: the ref of the VM a snapshot was taken of, or NULL_REF."""
        return self.call("VM.get_snapshot_of", vm)

    def vm_vbds(self, vm: str) -> list[str]:
        """VM.get_VBDs: the refs of the VM's VBDs (disks, CD drives, empty ones)."""
        return self.call("VM.get_VBDs", vm)

    def vbd_record(self, vbd: str) -> dict[str, Any]:
        """VBD.get_record."""
        return self.call("VBD.get_record", vbd)

    def vbd_vdi(self, vbd: str) -> str:
        """VBD.get_VDI: the ref of the VDI in the VBD, or NULL_REF when it is empty."""
        return self.call("VBD.get_VDI", vbd)

    def vbd_type(self, vbd: str) -> str:
        """VBD.get_type: "Disk", "CD" or "Floppy"."""
        return self.call("VBD.get_type", vbd)

    def vdi_by_uuid(self, uuid: str) -> str:
        """VDI.get_by_uuid: the VDI's ref."""
        return self.call("VDI.get_by_uuid", uuid)

    def vdi_record(self, vdi: str) -> dict[str, Any]:
        """VDI.get_record."""
        return self.call("VDI.get_record", vdi)

    def vdi_uuid(self, vdi: str) -> str:
        """VDI.get_uuid."""
        return self.call("VDI.get_uuid", vdi)

    def vdi_snapshot_of(self, vdi: str) -> str:
        """VDI.get_snapshot_of: the ref of the VDI a snapshot was taken of, or NULL_REF."""
        return self.call("VDI.get_snapshot_of", vdi)

    def vdi_nbd_info(self, vdi: str) -> list[dict[str, Any]]:
        """VDI.get_nbd_info: one record (address, port, exportname, cert, subject) per
        host address that serves the VDI over NBD; empty when none can."""
        return self.call("VDI.get_nbd_info", vdi)

    def vdi_changed_blocks(self, since: str, vdi: str) -> str:
        """VDI.list_changed_blocks: the blocks changed from snapshot ``since`` to ``vdi``,
        a base64 bitmap (cbt.Bitmap.from_base64).  Refused with VDI_IN_USE while a closed
        NBD connection's VBD is still plugged: retried for a while (inuse.py)."""
        in_use = InUseRetry(self.call)
        return in_use("VDI.list_changed_blocks", since, vdi)


def _parse(result):
    if not isinstance(result, dict) or "Status" not in result:
        raise XencbtError("XAPI returned a malformed answer (no Status)")
    if result["Status"] == "Success":
        return result.get("Value")
    desc = [str(x) for x in result.get("ErrorDescription") or ["UNKNOWN_ERROR"]]
    if desc[0] == "SESSION_INVALID":
        raise SessionInvalid(desc[0])  # its parameter is the session ref: never shown
    raise XapiError(desc[0], desc[1:])


def _describe(e: Exception) -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _normalise_url(url: str) -> str:
    if "://" not in url:
        url = "https://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https":
        raise ConfigError("xapi=%s: only https:// is supported (credentials travel on it)" % url)
    if not parts.hostname:
        raise ConfigError("xapi=%s has no host name" % url)
    try:
        parts.port  # noqa: B018 -- raises on a port that is not a number
    except ValueError:
        raise ConfigError("xapi=%s: the port is not a number" % url) from None
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise ConfigError("xapi=%r is not a URL (it contains spaces or control characters)" % url)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path or "/"))
