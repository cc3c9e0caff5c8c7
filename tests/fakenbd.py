"""A scripted fake of the host's NBD server, for hostile-input tests.

It speaks the host's dialect (fixed newstyle, STARTTLS, EXPORT_NAME, simple replies; written
from the NBD protocol document, not from our client) and can be told to misbehave at any
step: ``Quirks`` lists every deviation.  It records what the client revealed to it (export
names, read requests), so "the client sent nothing to an unverified peer" is observed.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
OPT_EXPORT_NAME, OPT_STARTTLS = 1, 5
REP_ACK = 1
REP_ERR_POLICY = 0x80000002
CMD_READ, CMD_DISC = 0, 2


@dataclass
class Quirks:
    greeting_magic: int = NBDMAGIC
    handshake_flags: int = 1  # FIXED_NEWSTYLE, no NO_ZEROES, like the host
    close_at_greeting: bool = False
    starttls_reply: int = REP_ACK
    starttls_reply_magic: int = OPT_REPLY_MAGIC
    starttls_reply_option: int = OPT_STARTTLS
    starttls_reply_length: int = 0  # announced; no payload follows
    tls: bool = True  # False: ack STARTTLS, then go on in clear text
    plaintext_after_ack: bytes = b""  # sent instead of a TLS handshake
    silent_after_ack: bool = False  # neither TLS nor anything else: the client must time out
    export_size: int | None = None  # None: the disk's size
    close_at_export: bool = False
    export_info_bytes: int = 134  # size(8) + flags(2) + 124 zeroes
    reply_magic: int = SIMPLE_REPLY_MAGIC
    reply_handle_delta: int = 0
    reply_error: int = 0
    payload_limit: int | None = None  # close after sending this much of a read's data
    hang_on_read: bool = False


@dataclass
class Seen:
    connections: int = 0
    export_names: list[str] = field(default_factory=list)
    reads: int = 0
    cleartext_options: list[int] = field(default_factory=list)  # options sent before TLS


class FakeNBD:
    def __init__(self, certfile: Path, keyfile: Path, data: bytes, quirks: Quirks | None = None):
        self.data = data
        self.quirks = quirks or Quirks()
        self.seen = Seen()
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(str(certfile), str(keyfile))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> FakeNBD:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join(10)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.seen.connections += 1
                self._socks.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            self._session(sock)
        except (OSError, EOFError, ValueError):
            pass  # the client hung up (as it should, on a bad server)
        finally:
            sock.close()

    # -- the dialect ----------------------------------------------------------------------
    def _session(self, sock: socket.socket) -> None:
        q = self.quirks
        if q.close_at_greeting:
            return
        sock.sendall(struct.pack(">QQH", q.greeting_magic, IHAVEOPT, q.handshake_flags))
        _recv(sock, 4)  # client flags
        sock = self._starttls(sock)
        if sock is None:
            return
        name = self._export_name(sock)
        if name is None:
            return
        size = len(self.data) if q.export_size is None else q.export_size
        info = struct.pack(">QH", size, 0x0003) + bytes(124)
        sock.sendall(info[: q.export_info_bytes])
        if q.export_info_bytes < len(info):
            return
        self._transmit(sock)

    def _starttls(self, sock: socket.socket):
        q = self.quirks
        option, _ = _option(sock)
        if option != OPT_STARTTLS:
            with self._lock:
                self.seen.cleartext_options.append(option)
            if option == OPT_EXPORT_NAME:
                with self._lock:
                    self.seen.export_names.append("(in clear text)")
            return None
        sock.sendall(
            struct.pack(
                ">QIII",
                q.starttls_reply_magic,
                q.starttls_reply_option,
                q.starttls_reply,
                q.starttls_reply_length,
            )
        )
        if q.starttls_reply != REP_ACK:
            # A downgrade: carry on in clear text and see whether the client follows.
            option, payload = _option(sock)
            with self._lock:
                self.seen.cleartext_options.append(option)
                if option == OPT_EXPORT_NAME:
                    self.seen.export_names.append(payload.decode(errors="replace"))
            return None
        if q.silent_after_ack:
            self._stop.wait(30)
            return None
        if q.plaintext_after_ack:
            sock.sendall(q.plaintext_after_ack)
            return None
        if not q.tls:
            return sock
        return self._ctx.wrap_socket(sock, server_side=True)

    def _export_name(self, sock) -> str | None:
        option, payload = _option(sock)
        if option != OPT_EXPORT_NAME:
            return None
        name = payload.decode(errors="replace")
        with self._lock:
            self.seen.export_names.append(name)
        return None if self.quirks.close_at_export else name

    def _transmit(self, sock) -> None:
        q = self.quirks
        while True:
            magic, _flags, cmd, handle, offset, length = struct.unpack(">IHHQQI", _recv(sock, 28))
            if cmd == CMD_DISC:
                return
            with self._lock:
                self.seen.reads += 1
            if q.hang_on_read:
                self._stop.wait(30)
                return
            header = struct.pack(
                ">IIQ", q.reply_magic, q.reply_error, handle + q.reply_handle_delta
            )
            sock.sendall(header)
            if q.reply_error:
                continue
            payload = self.data[offset : offset + length]
            if q.payload_limit is not None:
                sock.sendall(payload[: q.payload_limit])
                return
            sock.sendall(payload)


def _recv(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _option(sock) -> tuple[int, bytes]:
    magic, option, length = struct.unpack(">QII", _recv(sock, 16))
    if magic != IHAVEOPT or length > 4096:
        raise ValueError("not an option")
    return option, _recv(sock, length)
