"""xensim's host NBD server against the behaviour of XenServer's (REFERENCE.md section 2).

Wire details are checked byte for byte with raw sockets (nbdwire); interoperability with the
real libnbd client (python3-libnbd, nbdcopy).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import shutil
import socket
import ssl
import struct
import subprocess
import time
import urllib.parse
from pathlib import Path

import nbd
import nbdwire as w
import pytest
from cryptography import x509
from secretwatch import WATCH
from xensim.certs import make_cert
from xensim.faults import Counters, Faults
from xensim.nbdserver import CHUNK, NBDServer

SIZE = 10 * 2**20 + 512  # not a multiple of 64 KiB: the last CBT block is short
NAME = "/0d3b9a2e-5c1f-4e8a-9b7d-1f2e3d4c5b6a?session_id=OpaqueRef:6c1e1b7a-secret"
# A made-up export name, given on purpose to a third-party client (nbdcopy) in its URI: the
# secret watch's /proc sampler sees it there, percent-encoded, and must not count it.
WATCH.allow(urllib.parse.quote(NAME, safe=""), where="argv (nbdcopy)")
CIPHERS = {"ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-AES128-GCM-SHA256"}


class FileExport:
    def __init__(self, path: Path, fail_at: int | None = None) -> None:
        self.size = path.stat().st_size
        self._fd = os.open(path, os.O_RDONLY)
        self._fail_at = fail_at

    def pread(self, offset: int, length: int) -> bytes:
        if self._fail_at is not None and offset <= self._fail_at < offset + length:
            raise OSError(errno.EIO, "injected I/O error")
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        os.close(self._fd)


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> tuple[Path, bytes]:
    """A sparse raw file of SIZE bytes whose every 512-byte sector differs from the others."""
    path = tmp_path_factory.mktemp("disk") / "disk.raw"
    data = random.Random(2).randbytes(SIZE)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(data)
    return path, data


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(cert, key, libnbd certificates dir holding ca-cert.pem = the server's cert)."""
    directory = tmp_path_factory.mktemp("certs")
    cert, key = make_cert(directory, "host", ["xensim-host.test"], ["127.0.0.1"])
    tlsdir = directory / "libnbd"
    tlsdir.mkdir()
    shutil.copy(cert, tlsdir / "ca-cert.pem")
    return cert, key, tlsdir


@pytest.fixture
def make_server(disk, certs):
    """Start NBDServers on 127.0.0.1 port 0; all are stopped at the end of the test."""
    started: list[NBDServer] = []
    exports: list[FileExport] = []

    def make(mode="tls", max_connections=16, faults=None, fail_at=None):
        export = FileExport(disk[0], fail_at)
        exports.append(export)
        server = NBDServer(
            "127.0.0.1",
            0,
            mode=mode if callable(mode) else lambda: mode,
            certfile=str(certs[0]),
            keyfile=str(certs[1]),
            resolve=lambda name: export if name == NAME else None,
            faults=faults or Faults(),
            counters=Counters(),
            max_connections=max_connections,
        )
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
    for export in exports:
        export.close()


@pytest.fixture
def server(make_server) -> NBDServer:
    return make_server()


@pytest.fixture
def tls_ctx(certs) -> ssl.SSLContext:
    return w.client_context(str(certs[0]))


@contextlib.contextmanager
def raw(server: NBDServer, client_flags: int = 1):
    with w.connect(server.port) as sock:
        w.handshake(sock, client_flags)
        yield sock


@contextlib.contextmanager
def tls_session(server: NBDServer, ctx: ssl.SSLContext):
    """A connection after STARTTLS, in option haggling."""
    with raw(server) as sock, w.starttls(sock, ctx) as tls:
        yield tls


@contextlib.contextmanager
def transmission(server: NBDServer, ctx: ssl.SSLContext | None):
    """A connection in the transmission phase (TLS unless ctx is None)."""
    with raw(server) as sock:
        conn = w.starttls(sock, ctx) if ctx else sock
        with conn:
            size, flags, _ = w.export_name(conn, NAME)
            assert (size, flags) == (SIZE, 0x0003)
            yield conn


def assert_closed(sock: socket.socket, expect: bytes = b"") -> None:
    assert w.rest_until_eof(sock) == expect


# -- handshake and options before TLS -------------------------------------------------------


def test_greeting_is_fixed_newstyle_without_no_zeroes(server):
    with w.connect(server.port) as sock:
        greeting = w.recv_exact(sock, 18)
    assert greeting == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x01"


@pytest.mark.parametrize(
    "option", [w.OPT_LIST, w.OPT_INFO, w.OPT_GO, w.OPT_STRUCTURED_REPLY, w.OPT_SET_META_CONTEXT]
)
def test_options_before_starttls_get_tls_reqd(server, tls_ctx, option):
    with raw(server) as sock:
        w.send_option(sock, option, b"\x00" * 6)
        raw_reply, _, _, _ = w.option_reply(sock)
        assert raw_reply == w.expected_reply(option, w.REP_ERR_TLS_REQD)
        # The refusal does not end the haggling: STARTTLS still works afterwards.
        with w.starttls(sock, tls_ctx) as tls:
            assert tls.version() == "TLSv1.2"


@pytest.mark.parametrize("option", [w.OPT_EXPORT_NAME, w.OPT_ABORT])
def test_export_name_or_abort_before_starttls_just_closes(server, option):
    with raw(server) as sock:
        w.send_option(sock, option, NAME.encode() if option == w.OPT_EXPORT_NAME else b"")
        assert_closed(sock)


def test_tls_mode_closes_a_client_without_fixed_newstyle(server):
    with raw(server, client_flags=0) as sock:
        assert_closed(sock)


def test_starttls_is_acked_then_tls12_with_the_hosts_cipher_and_cert(server, tls_ctx, certs):
    with tls_session(server, tls_ctx) as tls:
        assert tls.version() == "TLSv1.2"
        assert tls.cipher()[0] in CIPHERS
        pem = ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True))
        assert pem.strip() == certs[0].read_text().strip()


def test_tls13_only_client_fails(server, tls_ctx):
    tls_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with raw(server) as sock, pytest.raises(ssl.SSLError):
        w.starttls(sock, tls_ctx)


@pytest.mark.parametrize(
    "tweak",
    [
        pytest.param(lambda c: c.set_ciphers("ECDHE-RSA-CHACHA20-POLY1305"), id="other-cipher"),
        pytest.param(lambda c: c.set_ecdh_curve("prime256v1"), id="other-curve"),
    ],
)
def test_tls12_client_without_the_hosts_cipher_or_curve_fails(server, tls_ctx, tweak):
    tls_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    tweak(tls_ctx)
    with raw(server) as sock, pytest.raises(ssl.SSLError):
        w.starttls(sock, tls_ctx)


# -- options after TLS ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, reply",
    [
        (w.OPT_LIST, w.REP_ERR_POLICY),
        (w.OPT_STARTTLS, w.REP_ERR_INVALID),
        (w.OPT_GO, w.REP_ERR_UNSUP),
        (w.OPT_INFO, w.REP_ERR_UNSUP),
        (w.OPT_STRUCTURED_REPLY, w.REP_ERR_UNSUP),
        (w.OPT_LIST_META_CONTEXT, w.REP_ERR_UNSUP),
        (w.OPT_SET_META_CONTEXT, w.REP_ERR_UNSUP),
        (4242, w.REP_ERR_UNSUP),
    ],
)
def test_option_replies_after_tls(server, tls_ctx, option, reply):
    with tls_session(server, tls_ctx) as tls:
        payload = struct.pack(">I", len(NAME)) + NAME.encode() + b"\x00\x00"
        w.send_option(tls, option, payload)
        assert w.option_reply(tls)[0] == w.expected_reply(option, reply)
        # Still haggling: the export can be opened on the same connection.
        assert w.export_name(tls, NAME)[:2] == (SIZE, 0x0003)


def test_abort_after_tls_is_acked_then_closed(server, tls_ctx):
    with tls_session(server, tls_ctx) as tls:
        w.send_option(tls, w.OPT_ABORT)
        assert w.option_reply(tls)[0] == w.expected_reply(w.OPT_ABORT, w.REP_ACK)
        assert_closed(tls)


def test_export_name_reply_is_size_flags_and_124_zero_bytes(server, tls_ctx):
    with tls_session(server, tls_ctx) as tls:
        w.send_option(tls, w.OPT_EXPORT_NAME, NAME.encode())
        reply = w.recv_exact(tls, 134)
        assert reply == struct.pack(">QH", SIZE, 0x0003) + bytes(124)
        # Exactly 134 bytes: the next thing on the wire is the answer to our first request.
        w.request(tls, w.CMD_DISC, 0, 0, 0)
        assert_closed(tls)


@pytest.mark.parametrize("name", ["", "/no-such-vdi?session_id=OpaqueRef:dead", NAME + "x"])
def test_wrong_export_name_closes_without_an_nbd_error(server, tls_ctx, name):
    with tls_session(server, tls_ctx) as tls:
        w.send_option(tls, w.OPT_EXPORT_NAME, name.encode())
        assert_closed(tls)


# -- transmission ---------------------------------------------------------------------------


def test_aligned_reads_match_the_file(server, tls_ctx, disk):
    data = disk[1]
    spans = [(0, 512), (SIZE - 512, 512), (CHUNK - 512, 4096), (3 * 2**20, 2 * 2**20), (512, 0)]
    with transmission(server, tls_ctx) as tls:
        for handle, (offset, length) in enumerate(spans, 1):
            assert w.read(tls, offset, length, handle) == data[offset : offset + length]


@pytest.mark.parametrize("offset, length", [(1, 512), (512, 100), (SIZE - 256, 256)])
def test_unaligned_read_gets_einval_then_the_session_ends(server, tls_ctx, disk, offset, length):
    # nbd lib/server.ml: after an error reply the server stops serving the connection.
    with transmission(server, tls_ctx) as tls:
        w.request(tls, w.CMD_READ, 7, offset, length)
        assert w.simple_reply(tls) == (errno.EINVAL, 7)
        assert_closed(tls)


def test_read_past_the_end_sends_header_then_whole_chunks_then_drops(server, tls_ctx, disk):
    # Like the host: success header first, the 512 KiB chunks that fit, then a hard close.
    offset = SIZE - CHUNK - 512
    with transmission(server, tls_ctx) as tls:
        w.request(tls, w.CMD_READ, 9, offset, 2 * CHUNK)
        assert w.simple_reply(tls) == (0, 9)
        assert w.rest_until_eof(tls) == disk[1][offset : offset + CHUNK]


@pytest.mark.parametrize(
    "command, code",
    [
        (w.CMD_WRITE, errno.EPERM),
        (w.CMD_WRITE_ZEROES, errno.EPERM),
        (w.CMD_TRIM, errno.EINVAL),
        (w.CMD_FLUSH, errno.EINVAL),
        (w.CMD_CACHE, errno.EINVAL),
        (w.CMD_BLOCK_STATUS, errno.EINVAL),
        (99, errno.EINVAL),
    ],
)
def test_other_commands_get_the_hosts_error_then_the_session_ends(server, tls_ctx, command, code):
    with transmission(server, tls_ctx) as tls:
        w.request(tls, command, 5, 0, 512)
        assert w.simple_reply(tls) == (code, 5)
        assert_closed(tls)


def test_disc_closes(server, tls_ctx):
    with transmission(server, tls_ctx) as tls:
        w.request(tls, w.CMD_DISC, 1, 0, 0)
        assert_closed(tls)
    assert server.counters.connections_now == 0


# -- connection limit, modes ----------------------------------------------------------------


def test_sixteen_connections_then_the_next_is_closed_before_the_greeting(server):
    with contextlib.ExitStack() as stack:
        live = [stack.enter_context(w.connect(server.port)) for _ in range(16)]
        for sock in live:
            assert w.recv_exact(sock, 18).startswith(b"NBDMAGIC")
        with w.connect(server.port) as extra:
            assert_closed(extra)
        assert server.counters.to_dict() == {
            "bytes_served": 0,
            "reads": 0,
            "connections_total": 16,
            "connections_now": 16,
            "peak_connections": 16,
            "refused": 1,
        }
        # ABORT before TLS closes one session; once we see its EOF its slot is free.
        live[0].sendall(struct.pack(">I", 1))
        w.send_option(live[0], w.OPT_ABORT)
        assert_closed(live[0])
        with w.connect(server.port) as again:
            assert w.recv_exact(again, 18).startswith(b"NBDMAGIC")


def test_notls_mode_serves_without_starttls(make_server, disk):
    server = make_server(mode="notls")
    with raw(server) as sock:
        for option, reply in [
            (w.OPT_STARTTLS, w.REP_ERR_POLICY),
            (w.OPT_LIST, w.REP_ERR_POLICY),
            (w.OPT_GO, w.REP_ERR_UNSUP),
            (w.OPT_STRUCTURED_REPLY, w.REP_ERR_UNSUP),
        ]:
            w.send_option(sock, option)
            assert w.option_reply(sock)[0] == w.expected_reply(option, reply)
        assert w.export_name(sock, NAME) == (SIZE, 0x0003, bytes(124))
        assert w.read(sock, 4096, 8192) == disk[1][4096 : 4096 + 8192]


def test_notls_mode_tolerates_a_client_without_fixed_newstyle(make_server):
    server = make_server(mode="notls")
    with raw(server, client_flags=0) as sock:
        assert w.export_name(sock, NAME)[:2] == (SIZE, 0x0003)


def test_mode_is_read_per_connection_and_none_closes_at_once(make_server):
    mode = {"now": None}
    server = make_server(mode=lambda: mode["now"])
    with w.connect(server.port) as sock:
        assert_closed(sock)
    assert server.counters.refused == 1
    assert server.counters.connections_total == 0
    mode["now"] = "notls"
    with raw(server) as sock:
        assert w.export_name(sock, NAME)[0] == SIZE
    mode["now"] = "insecure_nbd"  # a purpose, not a mode: a caller's bug, refused loudly
    with w.connect(server.port) as sock:
        assert_closed(sock)
    assert server.counters.connections_total == 1


# -- faults and counters --------------------------------------------------------------------


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "notls"])
def test_drop_after_bytes_drops_mid_read_after_the_header(make_server, tls_ctx, disk, tls):
    server = make_server(mode="tls" if tls else "notls")
    server.faults.update(drop_after_bytes=5000)
    with transmission(server, tls_ctx if tls else None) as conn:
        assert w.read(conn, 0, 4096) == disk[1][:4096]
        w.request(conn, w.CMD_READ, 2, 8192, 4096)
        assert w.simple_reply(conn) == (0, 2)
        assert w.rest_until_eof(conn) == disk[1][8192 : 8192 + 904]
    assert server.counters.bytes_served == 5000


def test_drop_on_read_drops_the_nth_read(server, tls_ctx, disk):
    server.faults.update(drop_on_read=3)
    with transmission(server, tls_ctx) as tls:
        assert w.read(tls, 0, 512, 1) == disk[1][:512]
        assert w.read(tls, 512, 512, 2) == disk[1][512:1024]
        w.request(tls, w.CMD_READ, 3, 1024, 512)
        assert w.simple_reply(tls) == (0, 3)
        assert_closed(tls)


def test_failing_pread_drops_after_the_header(make_server, tls_ctx):
    server = make_server(fail_at=2 * 2**20)
    with transmission(server, tls_ctx) as tls:
        w.request(tls, w.CMD_READ, 4, 2 * 2**20, 512)
        assert w.simple_reply(tls) == (0, 4)
        assert_closed(tls)


def test_read_latency_delays_each_read(server, tls_ctx):
    with transmission(server, tls_ctx) as tls:
        start = time.monotonic()
        w.read(tls, 0, 512)
        fast = time.monotonic() - start
        server.faults.update(read_latency=0.3)
        start = time.monotonic()
        w.read(tls, 0, 512)
        slow = time.monotonic() - start
    assert fast < 0.3 <= slow


def test_hold_for_holds_every_read_until_its_deadline(server, tls_ctx):
    with transmission(server, tls_ctx) as tls:
        server.faults.update(hold_for=0.5)
        start = time.monotonic()
        w.read(tls, 0, 512)
        held = time.monotonic() - start
        start = time.monotonic()
        w.read(tls, 0, 512)  # the deadline has passed: no wait any more
        after = time.monotonic() - start
    assert after < 0.3 < 0.45 <= held


def test_hold_for_cleared_early_lets_the_held_read_go(server, tls_ctx):
    with transmission(server, tls_ctx) as tls:
        server.faults.update(hold_for=600)
        w.request(tls, w.CMD_READ, 1, 0, 512)
        wait_for(lambda: server.faults.to_dict()["reads_at_gate"] == 1)
        server.faults.clear()  # wakes the read at once, not at the deadline
        assert w.simple_reply(tls) == (0, 1)


def test_gate_answers_n_reads_then_holds_the_rest_until_released(server, tls_ctx):
    with transmission(server, tls_ctx) as one, transmission(server, tls_ctx) as two:
        server.faults.update(gate_after_reads=2)
        w.read(one, 0, 512)
        w.read(two, 512, 512)
        w.request(one, w.CMD_READ, 7, 0, 512)
        w.request(two, w.CMD_READ, 8, 0, 512)
        wait_for(lambda: server.faults.to_dict()["reads_at_gate"] == 2)
        assert server.counters.to_dict()["reads"] == 2  # the held ones were not answered
        server.faults.update(gate_after_reads=None)
        assert w.simple_reply(one) == (0, 7)
        assert w.simple_reply(two) == (0, 8)
    assert server.faults.to_dict()["reads_at_gate"] == 0


def test_stop_ends_a_read_held_at_the_gate(make_server, tls_ctx):
    server = make_server()
    with transmission(server, tls_ctx) as tls:
        server.faults.update(gate_after_reads=0)
        w.request(tls, w.CMD_READ, 1, 0, 512)
        wait_for(lambda: server.faults.to_dict()["reads_at_gate"] == 1)
        server.stop()
        assert_closed(tls)


def wait_for(predicate, timeout: float = 10.0) -> None:
    """The test waits for the server's state (an event), polling a cheap counter."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not within %.0f s" % timeout
        time.sleep(0.005)


def test_refuse_for_closes_new_connections_before_the_greeting(server):
    with w.connect(server.port) as before:
        assert w.recv_exact(before, 18).startswith(b"NBDMAGIC")
        server.faults.refuse_for(60)
        assert server.faults.to_dict()["refuse_for_remaining"] > 50
        with w.connect(server.port) as refused:
            assert_closed(refused)
        assert server.counters.refused == 1
        server.faults.clear()
        with w.connect(server.port) as after:
            assert w.recv_exact(after, 18).startswith(b"NBDMAGIC")
        # The connection made before the fault was untouched by it.
        before.sendall(struct.pack(">I", 1))
        w.send_option(before, w.OPT_LIST)
        assert w.option_reply(before)[2] == w.REP_ERR_TLS_REQD


def test_counters_count_reads_bytes_and_peak(server, tls_ctx):
    with transmission(server, tls_ctx) as one, transmission(server, tls_ctx) as two:
        w.read(one, 0, 4096)
        w.read(two, 0, 1024)
        w.read(two, 1024, 512)
    counts = server.counters.to_dict()
    assert counts["reads"] == 3
    assert counts["bytes_served"] == 4096 + 1024 + 512
    assert counts["peak_connections"] == 2
    assert counts["connections_total"] == 2
    server.counters.reset()
    assert server.counters.to_dict() == {
        "bytes_served": 0,
        "reads": 0,
        "connections_total": 0,
        "connections_now": server.counters.connections_now,
        "peak_connections": server.counters.connections_now,
        "refused": 0,
    }


def test_faults_update_validates_and_is_all_or_nothing():
    faults = Faults()
    with pytest.raises(ValueError, match="unknown fault"):
        faults.update(drop_after_bytes=10, drop_everything=True)
    for bad in [{"drop_on_read": 0}, {"drop_after_bytes": "10"}, {"read_latency": -1}]:
        with pytest.raises(ValueError):
            faults.update(**bad)
    assert faults.drop_after_bytes is None
    faults.update(drop_after_bytes=10, read_latency=1, refuse_for=0)
    assert faults.to_dict() == {
        "drop_after_bytes": 10,
        "drop_on_read": None,
        "read_latency": 1.0,
        "refuse_for_remaining": 0.0,
        "hold_for_remaining": 0.0,
        "gate_after_reads": None,
        "reads_at_gate": 0,
    }
    with pytest.raises(ValueError):
        faults.update(gate_after_reads=-1)
    faults.clear()
    assert faults.to_dict()["drop_after_bytes"] is None


def test_stop_closes_live_connections(make_server, tls_ctx):
    server = make_server()
    with transmission(server, tls_ctx) as tls:
        server.stop()
        assert_closed(tls)
    with pytest.raises(OSError):
        w.connect(server.port).close()


# -- the real client: libnbd ----------------------------------------------------------------


def libnbd_handle(server: NBDServer, tlsdir: Path | None):
    h = nbd.NBD()
    h.set_export_name(NAME)
    if tlsdir is not None:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(tlsdir))
    h.connect_tcp("127.0.0.1", str(server.port))
    return h


def test_libnbd_reads_the_whole_export_over_tls(server, certs, disk):
    h = libnbd_handle(server, certs[2])
    try:
        assert h.get_tls_negotiated()
        assert h.get_protocol() == "newstyle-fixed"
        assert h.get_size() == SIZE
        assert h.is_read_only()
        assert not (h.can_flush() or h.can_trim() or h.can_multi_conn())
        assert not h.get_structured_replies_negotiated()
        step = 2**21
        digest = hashlib.sha256()
        for offset in range(0, SIZE, step):
            digest.update(h.pread(min(step, SIZE - offset), offset))
        assert digest.hexdigest() == hashlib.sha256(disk[1]).hexdigest()
    finally:
        h.shutdown()


def test_libnbd_rejects_a_server_cert_it_does_not_trust(server, tmp_path):
    other, _ = make_cert(tmp_path, "other", ["xensim-host.test"], ["127.0.0.1"])
    shutil.copy(other, tmp_path / "ca-cert.pem")
    with pytest.raises(nbd.Error):
        libnbd_handle(server, tmp_path)


def test_libnbd_without_tls_against_notls_mode(make_server, disk):
    server = make_server(mode="notls")
    h = libnbd_handle(server, None)
    try:
        assert not h.get_tls_negotiated()
        assert h.pread(65536, SIZE - 65536) == disk[1][-65536:]
    finally:
        h.shutdown()


def test_nbdcopy_copies_the_export_byte_for_byte(server, certs, disk, tmp_path):
    # The export name carries '?' and '/': percent-encode it into the URI path.
    uri = (
        f"nbds://127.0.0.1:{server.port}/{urllib.parse.quote(NAME, safe='')}"
        f"?tls-certificates={certs[2]}"
    )
    out = tmp_path / "copy.raw"
    subprocess.run(["nbdcopy", uri, str(out)], check=True, timeout=30)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(disk[1]).digest()
    assert server.counters.bytes_served == SIZE


# -- certificates ---------------------------------------------------------------------------


def test_make_cert_writes_a_self_signed_ca_cert_and_a_private_key(tmp_path):
    cert_path, key_path = make_cert(tmp_path, "h1", ["h1.test", "alias.test"], ["10.0.0.7"])
    assert (cert_path, key_path) == (tmp_path / "h1.pem", tmp_path / "h1.key")
    assert key_path.stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == "CN=h1.test"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["h1.test", "alias.test"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert cert.public_key().key_size == 2048
    assert cert.signature_hash_algorithm.name == "sha256"
    assert (cert.not_valid_after - cert.not_valid_before).days >= 3650
    # A second call reuses the files instead of minting a new key.
    again = make_cert(tmp_path, "h1", ["other.test"])
    assert again == (cert_path, key_path)
    assert x509.load_pem_x509_certificate(cert_path.read_bytes()) == cert
