"""The host's NBD server (xapi-nbd): fixed newstyle, EXPORT_NAME, read-only; TLS 1.2 forced
on an ``nbd`` network, none on an ``insecure_nbd`` one, no NBD at all without (network.py).

Behaviour follows REFERENCE.md section 2 and the real server's code (xapi-project/nbd
lib/server.ml, xen-api ocaml/nbd/src/main.ml), including its rough edges: every error
reply (writes, unknown commands, unaligned reads) ends the session, and a read that fails
after its success header (past the end of the disk, I/O error, injected fault) drops the
connection.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import struct
import threading
from typing import Callable, Protocol

from .faults import Counters, Faults

log = logging.getLogger(__name__)

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1  # the only handshake flag the host advertises (no NO_ZEROES)
TRANSMISSION_FLAGS = 0x0003  # HAS_FLAGS | READ_ONLY: no flush, trim, block status, multi-conn

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
REP_ACK = 1
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_TLS_REQD = 0x80000005

CMD_READ, CMD_WRITE, CMD_DISC, CMD_WRITE_ZEROES = 0, 1, 2, 6

SECTOR = 512
CHUNK = 128 * 4096  # the real server copies reads in 128 pages, each chunk a Block.read
MAX_OPTION_LENGTH = 65536  # the real server has no limit; ours keeps a client from eating RAM
TLS_CIPHERS = "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256"
TLS_CURVE = "secp384r1"

_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")


class NbdExport(Protocol):
    size: int

    def pread(self, offset: int, length: int) -> bytes: ...

    # Optional: ``detach(wait)`` releases what the export holds on the host (exports.py).


class Disconnect(Exception):
    """End the connection now, without an NBD error: how the host refuses most things."""


class NBDServer:
    """Listens on (address, port) and serves each connection in its own thread."""

    def __init__(
        self,
        address: str,
        port: int,
        *,
        mode: Callable[[], str | None],
        certfile: str,
        keyfile: str,
        resolve: Callable[[str], NbdExport | None],
        faults: Faults,
        counters: Counters,
        max_connections: int = 16,
    ) -> None:
        self.address = address
        self.port = port
        self._mode = mode
        self._resolve = resolve
        self._faults = faults
        self._counters = counters
        self._max = max_connections
        self._tls = tls_context(certfile, keyfile)
        self._listener: socket.socket | None = None
        self._accepter: threading.Thread | None = None
        self._lock = threading.Lock()
        self._sessions: dict[NbdSession, threading.Thread] = {}
        self._stopping = threading.Event()

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        self._listener = socket.create_server((self.address, self.port), family=family, backlog=64)
        self.port = self._listener.getsockname()[1]
        self._accepter = threading.Thread(
            target=self._accept_loop, name=f"nbd-accept-{self.port}", daemon=True
        )
        self._accepter.start()
        log.info("NBD server listening on %s:%d", self.address, self.port)

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would not.
            _shutdown(self._listener)
            self._listener.close()
        if self._accepter is not None:
            self._accepter.join()
        with self._lock:
            sessions = dict(self._sessions)
        for session, thread in sessions.items():
            session.abort()
            thread.join()
        log.info("NBD server on %s:%d stopped", self.address, self.port)

    def __enter__(self) -> NBDServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except OSError as e:
                if self._stopping.is_set():
                    return  # stop() shut the listener down
                # Transient (ECONNABORTED, EMFILE): keep serving, but don't spin on it.
                log.warning("NBD accept failed: %s", e)
                self._stopping.wait(0.1)
                continue
            self._admit(sock, peer)

    def _admit(self, sock: socket.socket, peer: tuple) -> None:
        # Admission happens on the accept thread so that the limit check and the registration
        # of the new session are one atomic step.
        with self._lock:
            full = len(self._sessions) >= self._max
            if not full and not self._faults.refusing():
                session = NbdSession(sock, peer, self)
                thread = threading.Thread(
                    target=self._run, args=(session,), name=f"nbd-{peer[1]}", daemon=True
                )
                self._sessions[session] = thread
                thread.start()
                return
        log.info("NBD connection from %s refused (%s)", peer, "limit" if full else "fault")
        self._refuse(sock)

    def _refuse(self, sock: socket.socket) -> None:
        # Count before closing: a client that sees EOF then finds the counter already bumped.
        self._counters.refuse()
        sock.close()

    def _run(self, session: NbdSession) -> None:
        try:
            mode = self._mode()
            if mode is None:
                log.info("NBD connection from %s refused: no NBD network", session.peer)
                self._refuse(session.sock)
                return
            if mode not in ("tls", "notls"):
                raise ValueError(f"NBD mode must be 'tls', 'notls' or None, not {mode!r}")
            self._counters.opened()
            try:
                session.serve(tls=mode == "tls")
            finally:
                # xapi-nbd unplugs and destroys the connection's VBD before it closes the
                # socket and frees the slot (main.ml dec_conn; dom0.py).
                session.detach()
                self._counters.closed()
        except Exception:
            log.exception("NBD connection from %s failed", session.peer)
        finally:
            # Forget the session before closing its socket: once the client sees EOF, the
            # slot is free again and a new connection is admitted.
            with self._lock:
                del self._sessions[session]
            session.close()

    @property
    def faults(self) -> Faults:
        return self._faults

    @property
    def counters(self) -> Counters:
        return self._counters

    def resolve(self, name: str) -> NbdExport | None:
        try:
            return self._resolve(name)
        except Exception:
            log.exception("resolving an NBD export name failed")
            return None

    def tls_context(self) -> ssl.SSLContext:
        return self._tls

    def wait_to_read(self) -> bool:
        """Wait while the faults hold reads; True if the server is stopping."""
        return self._faults.wait_to_read(self._stopping)

    def sleep(self, seconds: float) -> bool:
        """Sleep, cut short by stop(); True if the server is stopping."""
        return self._stopping.wait(seconds)


def tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """The host's TLS settings: TLS 1.2 only, two ECDHE-RSA-AES-GCM ciphers, curve secp384r1."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS_CIPHERS)
    ctx.set_ecdh_curve(TLS_CURVE)
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


class NbdSession:
    """One client connection: handshake, option haggling, then the transmission phase."""

    def __init__(self, sock: socket.socket, peer: tuple, server: NBDServer) -> None:
        self.sock: socket.socket = sock
        # A second descriptor for the same connection: stop() can shut it down to wake this
        # session's thread even while STARTTLS is swapping self.sock for an SSLSocket.
        self._waker = sock.dup()
        self.peer = peer
        self._server = server
        self._tls = False
        self._export: NbdExport | None = None
        self._reads = 0
        self._sent = 0  # read payload bytes sent on this connection, for drop_after_bytes

    def serve(self, tls: bool) -> None:
        try:
            export = self._handshake(tls)
            if export is not None:
                self._transmit(export)
        except Disconnect as e:
            log.info("NBD connection from %s closed: %s", self.peer, e)
        except (OSError, EOFError) as e:  # ssl.SSLError is an OSError
            log.info("NBD connection from %s lost: %s", self.peer, e)

    def detach(self) -> None:
        """Release what the export holds on the host (its dom0 VBD), if it was opened."""
        detach = getattr(self._export, "detach", None)
        if detach is not None:
            detach(self._server.sleep)

    def abort(self) -> None:
        """Wake the session's thread from any blocking call (used by stop())."""
        _shutdown(self._waker)

    def close(self) -> None:
        self.sock.close()
        self._waker.close()

    # -- handshake ---------------------------------------------------------------------------

    def _handshake(self, tls: bool) -> NbdExport | None:
        self._send(NBDMAGIC + struct.pack(">QH", IHAVEOPT, FLAG_FIXED_NEWSTYLE))
        (client_flags,) = struct.unpack(">I", self._recv(4))
        if not client_flags & FLAG_FIXED_NEWSTYLE:
            if tls:
                raise Disconnect("client without FIXED_NEWSTYLE, and TLS is required")
            # NOTLS: nbd-ocaml only logs this and carries on.
            log.warning("NBD client %s does not report FIXED_NEWSTYLE", self.peer)
        if tls:
            self._before_tls()
        name = self._options()
        export = self._server.resolve(name)
        if export is None:
            raise Disconnect("export name refused")
        self._export = export
        self._send(struct.pack(">QH", export.size, TRANSMISSION_FLAGS) + bytes(124))
        return export

    def _read_option(self) -> tuple[int, bytes]:
        magic, option, length = _OPTION.unpack(self._recv(_OPTION.size))
        if magic != IHAVEOPT:
            raise Disconnect(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_LENGTH:
            raise Disconnect(f"option {option} too long ({length} bytes)")
        return option, self._recv(length)

    def _reply(self, option: int, reply: int) -> None:
        self._send(_OPTION_REPLY.pack(REPLY_MAGIC, option, reply, 0))

    def _before_tls(self) -> None:
        """Until STARTTLS, refuse every option; EXPORT_NAME and ABORT end the connection."""
        while True:
            option, _ = self._read_option()
            if option == OPT_STARTTLS:
                self._reply(option, REP_ACK)
                self.sock = self._server.tls_context().wrap_socket(self.sock, server_side=True)
                self._tls = True
                log.debug("NBD client %s: TLS %s", self.peer, self.sock.cipher())
                return
            if option == OPT_EXPORT_NAME:
                raise Disconnect("EXPORT_NAME over cleartext, TLS is required")
            if option == OPT_ABORT:
                raise Disconnect("ABORT before TLS")  # no ACK: the real server just fails
            self._reply(option, REP_ERR_TLS_REQD)

    def _options(self) -> str:
        """Haggle until EXPORT_NAME; return the export name."""
        while True:
            option, payload = self._read_option()
            if option == OPT_EXPORT_NAME:
                return payload.decode("utf-8", "replace")
            if option == OPT_ABORT:
                self._reply(option, REP_ACK)
                raise Disconnect("client aborted")
            if option == OPT_STARTTLS:
                self._reply(option, REP_ERR_INVALID if self._tls else REP_ERR_POLICY)
            elif option == OPT_LIST:
                self._reply(option, REP_ERR_POLICY)  # the host offers no export list
            else:
                # GO, INFO, STRUCTURED_REPLY, meta contexts and unknown options (REFERENCE §2)
                self._reply(option, REP_ERR_UNSUP)

    # -- transmission ------------------------------------------------------------------------

    def _transmit(self, export: NbdExport) -> None:
        """Serve requests one at a time until DISC, EOF or an error that ends the session."""
        while True:
            magic, _flags, command, handle, offset, length = _REQUEST.unpack(
                self._recv(_REQUEST.size)
            )
            if magic != REQUEST_MAGIC:
                raise Disconnect(f"bad request magic {magic:#x}")
            if command == CMD_DISC:
                return
            # After any error reply the real server stops serving the connection: nbd
            # lib/server.ml ``serve`` does not loop again once it has sent an error
            # (nbd-ocaml issue #137); the client sees EOF on its next request.
            if command != CMD_READ:
                denied = command in (CMD_WRITE, CMD_WRITE_ZEROES)
                self._error(handle, errno.EPERM if denied else errno.EINVAL)
                raise Disconnect(f"command {command} refused")
            if offset % SECTOR or length % SECTOR:
                self._error(handle, errno.EINVAL)
                raise Disconnect(f"unaligned read {offset}+{length} refused")
            self._read(export, handle, offset, length)

    def _error(self, handle: int, code: int) -> None:
        self._send(_REPLY.pack(SIMPLE_REPLY_MAGIC, code, handle))

    def _read(self, export: NbdExport, handle: int, offset: int, length: int) -> None:
        if self._server.wait_to_read():
            raise Disconnect("server stopping")
        faults = self._server.faults.snapshot()
        if faults.read_latency and self._server.sleep(faults.read_latency):
            raise Disconnect("server stopping")
        # The faults as they are now: one set while this read waited (the host went away
        # mid-read) applies to it, as on a host that dies while it reads.
        faults = self._server.faults.snapshot()
        self._reads += 1
        self._server.counters.read()
        # Like the host, the success header goes out before any data is read, so every
        # failure from here on can only drop the connection.
        self._send(_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle))
        if faults.drop_on_read is not None and self._reads >= faults.drop_on_read:
            raise Disconnect(f"fault drop_on_read={faults.drop_on_read}")
        end = offset + length
        for pos in range(offset, end, CHUNK):
            n = min(CHUNK, end - pos)
            if pos + n > export.size:
                raise Disconnect(f"read of {n} bytes at {pos} is past the end ({export.size})")
            data = export.pread(pos, n)
            if len(data) != n:
                raise Disconnect(f"short read from the export: {len(data)} of {n} at {pos}")
            self._send_data(data, faults.drop_after_bytes)

    def _send_data(self, data: bytes, limit: int | None) -> None:
        if limit is not None:
            data = data[: max(0, limit - self._sent)]
        # Counted before it goes out: a client that has its bytes must find them counted
        # (a test reads the counters as soon as its pread returns). A send that fails
        # takes them back.
        self._server.counters.served(len(data))
        try:
            self._send(data)
        except BaseException:
            self._server.counters.served(-len(data))
            raise
        self._sent += len(data)
        if limit is not None and self._sent >= limit:
            raise Disconnect(f"fault drop_after_bytes={limit}")

    # -- socket helpers ----------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError("client closed the connection")
            buf += chunk
        return bytes(buf)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected
