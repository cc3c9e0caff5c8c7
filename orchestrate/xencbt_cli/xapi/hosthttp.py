"""The hosts' HTTP disk endpoints, as xapi serves them (REFERENCE §3).

- The answer comes before the body: ``import_raw_vdi`` sends its ``200`` (or ``302``,
  ``401``…) before reading anything (xen-api ``import_raw_vdi.ml`` ``localhost_handler``),
  so a request's head is sent, the answer read, and only then the body.
- ``302``: a host that cannot see the VDI's SR names one that can (``importexport.ml``
  ``return_302_redirect``).  We follow only to a host of this pool, and only over TLS
  pinned to the certificate the master reports for it (``host.get_server_certificate``,
  read over the already verified master session): never unverified.
- An import's outcome is its task's, never the HTTP status: the ``200`` comes before
  the writes, a failure while writing only fails the task and closes the socket.  So an
  import carries our own task (``task_id=``) and ends by reading that task.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import ssl
import time
import urllib.parse

from xencbt_core.errors import TrustError, XencbtError
from xencbt_core.secret import scrub
from xencbt_core.xapi import ApiTrust, https_connection

from ..errors import CliError
from .facade import PoolApi

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)
TASK_WAIT = 120.0  # seconds a task may stay pending once the host closed the connection


class ImportFailed(CliError):
    """The host did not write all of an import; ``reason`` says what it reported."""

    def __init__(self, reason: str, started: bool = True):
        super().__init__(reason)
        self.reason = reason
        self.started = started  # False: refused before the host wrote anything


def _member(pool: PoolApi, location: str) -> tuple[str, ApiTrust, str]:
    """(netloc, pinned trust, host name) for a redirect target, which must be a host of
    this pool; its certificate is the one the master reports for it."""
    url = urllib.parse.urlsplit(location)
    if url.scheme != "https" or not url.hostname:
        raise CliError("the pool redirected a disk transfer to a non-HTTPS address: not followed")
    for ref in pool.call("host.get_all"):
        if pool.call("host.get_address", ref) == url.hostname:
            pem = pool.call("host.get_server_certificate", ref)
            der = ssl.PEM_cert_to_DER_cert(pem)
            trust = ApiTrust(thumbprint=hashlib.sha256(der).hexdigest())
            return url.netloc, trust, pool.call("host.get_name_label", ref)
    raise CliError(
        "the pool redirected a disk transfer to %s, which is not one of its hosts: not followed"
        % url.hostname
    )


def request(
    pool: PoolApi, verb: str, path: str, query: dict[str, str], length: int | None = None
) -> tuple[http.client.HTTPSConnection, http.client.HTTPResponse]:
    """Send the head of ``verb path?query`` (with ``session_id``), following redirects;
    return the connection and the answer's head (its body, if any, still unread)."""
    session = pool.session
    netloc, trust, host = session.netloc, session.trust, ""
    target = path + "?" + urllib.parse.urlencode(dict(query, session_id=session.ref().reveal()))
    for _ in range(MAX_REDIRECTS + 1):
        conn = https_connection(netloc, trust)
        try:
            conn.putrequest(verb, target)
            if length is not None:
                conn.putheader("Content-Length", str(length))
                conn.putheader("Content-Type", "application/octet-stream")
            conn.endheaders()
            reply = http.client.HTTPResponse(conn.sock, method=verb)
            reply.begin()
        except TrustError as e:
            conn.close()
            if not host:
                raise
            raise CliError(
                "host %s does not present the certificate the pool master reports for it "
                "(host.get_server_certificate): disk transfer refused (%s)" % (host, e)
            ) from None
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise CliError("%s %s on %s failed: %s" % (verb, path, netloc, e)) from None
        if reply.status not in REDIRECTS:
            return conn, reply
        location = reply.getheader("Location", "")
        reply.close()
        conn.close()
        netloc, trust, host = _member(pool, location)
        # The Location carries the session ref: log the host only.
        log.info("%s %s: redirected to host %s (%s)", verb, path, host, netloc)
    raise CliError("%s %s: more than %d redirects" % (verb, path, MAX_REDIRECTS))


class Download:
    """GET /export_raw_vdi of a whole VDI; ``read(n)`` gives exactly n bytes or fails."""

    def __init__(self, pool: PoolApi, vdi_ref: str):
        query = {"vdi": vdi_ref, "format": "raw"}
        self.conn, self.reply = request(pool, "GET", "/export_raw_vdi", query)
        if self.reply.status != 200:
            self.close()
            raise CliError("reading the VDI failed: HTTP %d" % self.reply.status)

    def read(self, n: int, offset: int) -> bytes:
        try:
            data = self.reply.read(n)
        except (OSError, http.client.HTTPException) as e:
            raise CliError("the VDI's export broke at byte %d: %s" % (offset, e)) from None
        if len(data) != n:
            raise CliError("the VDI's export ended early at byte %d" % offset)
        return data

    def close(self) -> None:
        self.reply.close()
        self.conn.close()


class Upload:
    """PUT /import_raw_vdi of ``length`` bytes, sent piece by piece, followed by our task.

    ``send`` raises ImportFailed as soon as the host stops reading; ``finish`` returns
    only when the host's task says every byte was written.  Use as a context manager
    (the task is destroyed at the end)."""

    def __init__(self, pool: PoolApi, vdi_ref: str, length: int, chunked: bool):
        self.pool = pool
        self.length = length
        self.sent = 0
        self.task = pool.call("task.create", "xencbt restore", "import into a VDI")
        query = {"vdi": vdi_ref, "format": "raw", "task_id": self.task}
        if chunked:
            query["chunked"] = "true"
        try:
            self.conn, self.reply = request(pool, "PUT", "/import_raw_vdi", query, length)
        except BaseException:
            self._destroy_task()
            raise
        if self.reply.status != 200:
            body = self.reply.read(200).decode(errors="replace").strip()
            self.close()
            status = self.reply.status
            raise ImportFailed("the host refused the import: HTTP %d %s" % (status, body), False)

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        try:
            self.conn.sock.sendall(data)
        except OSError as e:
            log.info("the host stopped reading the import after %d bytes: %s", self.sent, e)
            raise ImportFailed(self._outcome() or "the connection broke (%s)" % e) from None
        self.sent += len(data)

    def finish(self) -> None:
        try:
            self.reply.read()  # the host closes once it has written everything (or failed)
        except (OSError, http.client.HTTPException) as e:
            log.info("reading the end of the import: %s", e)
        failure = self._outcome()
        if failure:
            raise ImportFailed(failure)
        if self.sent != self.length:
            raise ImportFailed("only %d of %d bytes were sent" % (self.sent, self.length))

    def _outcome(self) -> str:
        """'' when the task succeeded, else what the host reported."""
        delay, deadline = 0.05, time.monotonic() + TASK_WAIT
        while True:
            status = self.pool.call("task.get_status", self.task)
            if status != "pending":
                break
            if time.monotonic() >= deadline:
                return "the host has not said whether it wrote the data (task still pending)"
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        if status == "success":
            return ""
        info = self.pool.call("task.get_error_info", self.task) or [status]
        return "the host reports %s" % scrub(" ".join(str(i) for i in info))

    def close(self) -> None:
        self.reply.close()
        self.conn.close()
        self._destroy_task()

    def _destroy_task(self) -> None:
        if self.task:
            try:
                self.pool.call("task.destroy", self.task)
            except (XencbtError, OSError) as e:
                log.warning("could not destroy task of the import: %s", e)
            self.task = ""
