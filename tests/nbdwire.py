"""Raw-socket NBD client pieces for tests that must see the bytes a library would hide.

Everything here is written from the protocol document (NetworkBlockDevice/nbd doc/proto.md),
not from xensim's server, so the tests compare the server against the spec.
"""

from __future__ import annotations

import socket
import ssl
import struct

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_ERR_UNSUP = 2**31 + 1
REP_ERR_POLICY = 2**31 + 2
REP_ERR_INVALID = 2**31 + 3
REP_ERR_TLS_REQD = 2**31 + 5

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

TIMEOUT = 5.0


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def rest_until_eof(sock: socket.socket) -> bytes:
    """Everything the server still sends before it closes (TimeoutError if it never does)."""
    buf = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLEOFError, ConnectionResetError):
            # A TLS peer that closes without close_notify, like a dropped connection.
            return bytes(buf)
        if not chunk:
            return bytes(buf)
        buf += chunk


def handshake(sock: socket.socket, client_flags: int = 1) -> bytes:
    """Read the 18-byte greeting and answer it; return the greeting."""
    greeting = recv_exact(sock, 18)
    sock.sendall(struct.pack(">I", client_flags))
    return greeting


def send_option(sock: socket.socket, option: int, payload: bytes = b"") -> None:
    sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(payload)) + payload)


def option_reply(sock: socket.socket) -> tuple[bytes, int, int, bytes]:
    """(raw 20-byte header, option, reply type, reply data)."""
    raw = recv_exact(sock, 20)
    magic, option, reply, length = struct.unpack(">QIII", raw)
    assert magic == OPTION_REPLY_MAGIC, hex(magic)
    return raw, option, reply, recv_exact(sock, length)


def expected_reply(option: int, reply: int) -> bytes:
    return struct.pack(">QIII", OPTION_REPLY_MAGIC, option, reply, 0)


def client_context(cafile: str) -> ssl.SSLContext:
    """Verify the server's cert as its own anchor; the tests connect by IP, not by name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile)
    return ctx


def starttls(sock: socket.socket, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    send_option(sock, OPT_STARTTLS)
    raw, _, _, _ = option_reply(sock)
    assert raw == expected_reply(OPT_STARTTLS, REP_ACK)
    return ctx.wrap_socket(sock)


def export_name(sock: socket.socket, name: str) -> tuple[int, int, bytes]:
    """Send EXPORT_NAME; return (size, transmission flags, the trailing pad)."""
    send_option(sock, OPT_EXPORT_NAME, name.encode())
    raw = recv_exact(sock, 134)
    size, flags = struct.unpack(">QH", raw[:10])
    return size, flags, raw[10:]


def request(sock: socket.socket, command: int, handle: int, offset: int, length: int) -> None:
    sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, command, handle, offset, length))


def simple_reply(sock: socket.socket) -> tuple[int, int]:
    """(error, handle) of a simple reply; asserts its magic."""
    magic, error, handle = struct.unpack(">IIQ", recv_exact(sock, 16))
    assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
    return error, handle


def read(sock: socket.socket, offset: int, length: int, handle: int = 1) -> bytes:
    request(sock, CMD_READ, handle, offset, length)
    assert simple_reply(sock) == (0, handle)
    return recv_exact(sock, length)
