"""Each host's HTTPS endpoint: RPC, raw VDI import/export, and the xensim control API.

One ``WebServer`` per host, all sharing a port on different loopback addresses.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import socket
import ssl
import struct
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from . import disks, rpc
from .errors import ServerError

if TYPE_CHECKING:
    from .admin import Admin
    from .xapi import Xapi

log = logging.getLogger(__name__)

CHUNK = 1 << 20
_FRAME = struct.Struct("<QI")


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class WebServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(
        self,
        address: tuple[str, int],
        context: ssl.SSLContext,
        xapi: Xapi,
        host: str,
        admin: Admin | None,
    ) -> None:
        super().__init__(address, Handler)
        self.context = context
        self.xapi = xapi
        self.host = host
        self.admin = admin
        self.peers: dict[str, int] = {}  # host ref -> its API port (for 302 Location)

    def get_request(self) -> tuple[socket.socket, Any]:
        # The TLS handshake happens on first read, in the handler's thread, so one slow
        # client cannot stall accept().
        sock, addr = super().get_request()
        # As xapi: TCP_NODELAY on every API connection (xen-api ocaml/libs/http-lib/
        # http_svr.ml ``bind`` sets it on the listening socket; xapi_stunnel_server.ml
        # gives stunnel ``socket = a:TCP_NODELAY=1``).  Without it a reply's headers and
        # body go out in two writes and Nagle holds the body for the client's delayed
        # ACK: ~40 ms added to every call, which a real host does not cost.
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name=f"https {self.host}", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: WebServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # -- routing ------------------------------------------------------------------------
    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith("/xensim/"):
            return self._guarded(lambda: self._admin("POST", path))
        replies = {"/": rpc.xmlrpc_reply, "/RPC2": rpc.xmlrpc_reply, "/jsonrpc": rpc.jsonrpc_reply}
        if path not in replies:
            return self._send(404, b"not found\n", "text/plain")
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        invoke = lambda method, params: self.server.xapi.call(method, params, self.server.host)  # noqa: E731
        try:
            reply = replies[path](invoke, body)
        except rpc.MalformedRequest as e:
            return self._send(500, f"HTTP 500 internal server error: {e}\n".encode(), "text/html")
        ctype = "application/json" if path == "/jsonrpc" else "text/xml"
        self._send(200, reply, ctype)

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith("/xensim/"):
            return self._guarded(lambda: self._admin("GET", path))
        if path == "/export_raw_vdi":
            return self._guarded(self._export)
        self._send(404, b"not found\n", "text/plain")

    def do_PUT(self) -> None:
        if urllib.parse.urlsplit(self.path).path == "/import_raw_vdi":
            return self._guarded(self._import)
        self._send(404, b"not found\n", "text/plain")

    # -- helpers ------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _guarded(self, action: Any) -> None:
        try:
            action()
        except HttpError as e:
            self.close_connection = True
            self._send(e.status, f"{e}\n".encode(), "text/plain")

    def _query(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))

    def _basic_auth_ok(self) -> bool:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return user == "root" and hmac.compare_digest(password, self.server.xapi.options.password)

    def _authorise(self, query: dict[str, str]) -> None:
        """xen-api ocaml/xapi/xapi_http.ml ``assert_credentials_ok``: a session_id (cookie
        first, then query) decides alone, valid or not; Basic auth only without one."""
        session = self._cookies().get("session_id") or query.get("session_id")
        if session is None:
            if self._basic_auth_ok():
                return
            raise HttpError(401, "Unauthorized")
        try:
            self.server.xapi.sessions.check(session)
        except ServerError:
            raise HttpError(401, "Unauthorized") from None

    def _cookies(self) -> dict[str, str]:
        cookies = {}
        for part in self.headers.get("Cookie", "").split(";"):
            name, sep, value = part.strip().partition("=")
            if sep:
                cookies[name] = value
        return cookies

    # -- raw VDI transfer ---------------------------------------------------------------
    def _vdi_for_transfer(self) -> tuple[str, dict, dict[str, str]]:
        query = self._query()
        xapi = self.server.xapi
        self._authorise(query)
        # importexport.ml Format.of_string: raw, vhd, tar, qcow2 in any case; else 404.
        fmt = query.get("format", "raw").lower()
        if fmt not in ("raw", "vhd", "tar", "qcow2"):
            self._finish_task(query, ["INTERNAL_ERROR", f"Unknown format {query['format']}"])
            raise HttpError(404, f"unknown format {query['format']}")
        if fmt != "raw":
            raise HttpError(501, f"xensim serves only raw images, not {fmt}")
        name = query.get("vdi", "")
        with xapi.db.lock:
            if xapi.db.exists("VDI", name):
                ref = name
            else:
                found = xapi.db.find("VDI", uuid=name)
                if not found:
                    raise HttpError(404, f"no VDI {name!r}")
                ref = found[0]
            rec = dict(xapi.db.get("VDI", ref))
        if rec["type"] == "cbt_metadata":
            self._finish_task(query, ["VDI_INCOMPATIBLE_TYPE", ref, "cbt_metadata"])
            raise HttpError(500, "VDI_INCOMPATIBLE_TYPE")
        return ref, rec, query

    def _finish_task(self, query: dict[str, str], error: list[str] | None) -> None:
        task = query.get("task_id")
        if task:
            self.server.xapi.tasks.finish(task, error)

    def _redirected(self, rec: dict) -> bool:
        """xen-api ``ocaml/xapi/importexport.ml`` ``return_302_redirect`` (called from
        ``export_raw_vdi.ml`` / ``import_raw_vdi.ml``): a host that cannot see the VDI's SR
        answers 302 to one that can, same path and query (session_id included), without
        reading a request body.  xapi's Location has no port; every xensim host is on
        loopback with its own address but maybe not the same port, so the port is added."""
        xapi = self.server.xapi
        with xapi.db.lock:
            hosts = xapi.storage.hosts_seeing(rec["SR"])
            if not hosts:
                raise HttpError(400, "no host can see the SR")
            if self.server.host in hosts:
                return False
            target = hosts[0]
            address = xapi.db.get("host", target)["address"]
        port = self.server.peers.get(target, self.server.server_address[1])
        log.info("302: VDI %s is on an SR this host cannot see", rec["uuid"])
        self.close_connection = True
        self._send(302, b"", "text/plain", {"Location": f"https://{address}:{port}{self.path}"})
        return True

    def _export(self) -> None:
        ref, rec, query = self._vdi_for_transfer()
        if self._redirected(rec):
            return
        size = rec["virtual_size"]
        path = disks.data_path(self.server.xapi.options.state_dir, rec["uuid"])
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.send_header("task-id", query.get("task_id", ""))
        self.end_headers()
        with open(path, "rb") as f:
            offset = 0
            while offset < size:
                data = f.read(min(CHUNK, size - offset)) or bytes(min(CHUNK, size - offset))
                self.wfile.write(data)
                offset += len(data)
        self._finish_task(query, None)

    def _import(self) -> None:
        """xen-api ``ocaml/xapi/import_raw_vdi.ml`` ``localhost_handler``: the 200 and the
        task header go out *before* anything is written; a failure while writing (an I/O
        error, the SR full, an image larger than the VDI) only fails the task
        (``VDI_IO_ERROR``, as ``vhd_tool_wrapper.ml`` reports vhd-tool failing) and closes
        the connection, unread body and all."""
        ref, rec, query = self._vdi_for_transfer()
        if self._redirected(rec):
            return
        encoding = self.headers.get("Transfer-Encoding")
        if encoding:  # import_raw_vdi.ml: "Chunked encoding not yet implemented": 404
            self._finish_task(query, ["INTERNAL_ERROR", f"Cannot handle encoding: {encoding}"])
            raise HttpError(404, "Not Found")
        length = int(self.headers.get("Content-Length", 0))
        tasks = self.server.xapi.tasks
        task, owned = tasks.for_request(query.get("task_id"), "VDI.import", self.server.host)
        self.close_connection = True
        self.send_response(200)
        self.send_header("Connection", "close")
        self.send_header("task-id", task)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.wfile.flush()
        try:
            if "chunked" in query:
                self._receive_frames(rec, length)
            else:
                self._receive(rec, 0, length, 0)
        except (OSError, ValueError) as e:
            log.info("import into VDI %s failed: %s", rec["uuid"], e)
            tasks.finish(task, ["VDI_IO_ERROR", "Device I/O errors"])
        else:
            tasks.finish(task, None, ref)
        finally:
            tasks.end_request(task, owned)

    def _receive(self, rec: dict, offset: int, length: int, done: int) -> int:
        """Copy ``length`` bytes of the body to ``offset``; returns the bytes written so far
        in this import.  Writing past the end of the VDI fails there, as vhd-tool does."""
        state_dir = self.server.xapi.options.state_dir
        storage = self.server.xapi.storage
        with open(disks.data_path(state_dir, rec["uuid"]), "r+b") as f:
            while length > 0:
                data = self.rfile.read(min(CHUNK, length))
                if not data:
                    raise ValueError("body ended early")
                if offset + len(data) > rec["virtual_size"]:
                    raise ValueError(f"write at {offset}+{len(data)} beyond the end of the VDI")
                n = storage.import_write(rec, f.fileno(), data, offset, done)
                offset, length, done = offset + n, length - n, done + n
        return done

    def _receive_frames(self, rec: dict, length: int) -> None:
        """xapi's chunked raw format: {offset u64 LE, length u32 LE} + data, ended by an
        all-zero header; only those extents are written."""
        done = 0
        while True:
            header = self.rfile.read(_FRAME.size)
            if len(header) != _FRAME.size:
                raise ValueError("truncated chunk header")
            offset, size = _FRAME.unpack(header)
            if offset == 0 and size == 0:
                return
            done = self._receive(rec, offset, size, done)

    # -- xensim control -----------------------------------------------------------------
    def _admin(self, verb: str, path: str) -> None:
        admin = self.server.admin
        if admin is None:
            raise HttpError(404, "the control API is on the master")
        if not self._basic_auth_ok():
            self.close_connection = True
            return self._send(401, b"Unauthorized\n", "text/plain", {"WWW-Authenticate": "Basic"})
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)) or 0)
        try:
            args = json.loads(body) if body else {}
            result = admin.handle(verb, path[len("/xensim/") :], args)
        except KeyError:
            raise HttpError(404, f"no control {verb} {path}") from None
        except (ValueError, TypeError, ServerError) as e:
            raise HttpError(400, str(e)) from None
        self._send(200, json.dumps(result).encode(), "application/json")
