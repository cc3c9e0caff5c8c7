"""TLS verification: the plugin refuses the wrong peer before the export name is sent.

Upstreams: nbdkit --tls=require (third-party) and the simulator's NBD server, whose
resolver records every export name it receives — so "never sent" is observed, not assumed.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from pki import issue, server_dir
from servers import nbd_info_file, nbdkit_upstream, run_plugin
from xencbt_core.trust import fingerprint, pem_to_der
from xensim.faults import Counters, Faults
from xensim.nbdserver import NBDServer

SIZE = 1024 * 1024
EXPORT = "/9a8b7c6d-1111-4222-8333-444455556666?session_id=OpaqueRef:trust-test-secret"


class _Disk:
    size = SIZE

    def __init__(self):
        self.data = os.urandom(SIZE)

    def pread(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


@pytest.fixture(scope="module")
def ca():
    return issue("Test CA", ca=True)


@pytest.fixture(scope="module")
def host(ca):
    return issue("host.example.test", dns=["host.example.test"], ips=["127.0.0.1"], issuer=ca)


class Recorder:
    """The simulator's NBD server with a resolver that remembers what it was asked."""

    def __init__(self, tmp: Path, cert):
        cert_path, key_path = tmp / "srv.pem", tmp / "srv.key"
        cert_path.write_text(cert.cert_pem)
        key_path.write_text(cert.key_pem)
        self.names: list[str] = []
        self.disk = _Disk()
        self.lock = threading.Lock()
        self.server = NBDServer(
            "127.0.0.1",
            0,
            mode=lambda: "tls",
            certfile=str(cert_path),
            keyfile=str(key_path),
            resolve=self._resolve,
            faults=Faults(),
            counters=Counters(),
        )

    def _resolve(self, name: str):
        with self.lock:
            self.names.append(name)
        return self.disk if name == EXPORT else None


@pytest.fixture
def recorder(tmp_path, host):
    rec = Recorder(tmp_path, host)
    rec.server.start()
    yield rec
    rec.server.stop()


def record(port: int, cert_pem: str, subject: str = "host.example.test") -> dict:
    return {
        "address": "127.0.0.1",
        "port": port,
        "cert": cert_pem,
        "subject": subject,
        "exportname": EXPORT,
    }


def copy(tmp_path: Path, rec: dict, *params: str):
    info = nbd_info_file(tmp_path, rec)
    return run_plugin(["nbd-info=+%s" % info, *params], 'nbdcopy "$uri" null:', verbose=True)


def assert_refused(r, *phrases: str):
    assert r.returncode != 0
    for phrase in phrases:
        assert phrase in r.stderr, r.stderr
    assert "trust-test-secret" not in r.stderr + r.stdout


def test_matching_certificate_is_accepted(tmp_path, recorder, host):
    r = copy(tmp_path, record(recorder.server.port, host.cert_pem))
    assert r.returncode == 0, r.stderr
    assert recorder.names and set(recorder.names) == {EXPORT}
    assert "trust-test-secret" not in r.stderr + r.stdout


def test_other_certificate_is_refused_before_the_export_name(tmp_path, recorder, host):
    impostor = issue("host.example.test", dns=["host.example.test"])
    r = copy(tmp_path, record(recorder.server.port, impostor.cert_pem))
    expected = fingerprint(pem_to_der(impostor.cert_pem))
    presented = fingerprint(pem_to_der(host.cert_pem))
    assert_refused(r, "verify=cert", expected, presented)
    assert recorder.names == []


def test_pubkey_accepts_a_reissued_certificate_with_the_same_key(tmp_path, recorder, host):
    reissued = issue("renamed.example.test", dns=["renamed.example.test"], key=host.key)
    r = copy(tmp_path, record(recorder.server.port, reissued.cert_pem), "verify=pubkey")
    assert r.returncode == 0, r.stderr
    r = copy(tmp_path, record(recorder.server.port, reissued.cert_pem), "verify=cert")
    assert_refused(r, "verify=cert")


def test_pubkey_refuses_another_key(tmp_path, recorder):
    other = issue("host.example.test", dns=["host.example.test"])
    r = copy(tmp_path, record(recorder.server.port, other.cert_pem), "verify=pubkey")
    assert_refused(r, "public key", "verify=pubkey")
    assert recorder.names == []


def test_ca_mode_checks_chain_and_subject(tmp_path, recorder, ca):
    cafile = tmp_path / "ca.pem"
    cafile.write_text(ca.cert_pem)
    ok = copy(tmp_path, record(recorder.server.port, ""), "verify=ca", "cafile=%s" % cafile)
    assert ok.returncode == 0, ok.stderr
    recorder.names.clear()

    wrong = record(recorder.server.port, "", subject="other.example.test")
    r = copy(tmp_path, wrong, "verify=ca", "cafile=%s" % cafile)
    assert_refused(r, "other.example.test", "verify=ca")

    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_text(issue("Other CA", ca=True).cert_pem)
    r = copy(tmp_path, record(recorder.server.port, ""), "verify=ca", "cafile=%s" % other_ca)
    assert_refused(r, "does not chain")
    assert recorder.names == []


def test_notls_server_needs_explicit_tls_off(tmp_path):
    image = tmp_path / "plain.raw"
    image.write_bytes(os.urandom(SIZE))
    with nbdkit_upstream(image, tmp_path, None) as port:
        r = copy(tmp_path, record(port, ""))
        assert_refused(r, "no certificate", "tls=off")
        r = copy(tmp_path, record(port, ""), "tls=off")
        assert r.returncode == 0, r.stderr


def test_server_refusing_starttls_is_not_a_silent_downgrade(tmp_path, host):
    image = tmp_path / "plain.raw"
    image.write_bytes(os.urandom(SIZE))
    with nbdkit_upstream(image, tmp_path, None) as port:
        # The record promises TLS; the server (or a man in the middle) won't do it.
        r = copy(tmp_path, record(port, host.cert_pem), "tls=off")
        assert_refused(r, "refused TLS")


def test_third_party_server_with_other_certificate_is_refused(tmp_path, host):
    image = tmp_path / "img.raw"
    image.write_bytes(os.urandom(SIZE))
    mitm = issue("host.example.test", dns=["host.example.test"], ips=["127.0.0.1"])
    certdir = server_dir(tmp_path / "mitm", mitm)
    with nbdkit_upstream(image, tmp_path, certdir) as port:
        r = copy(tmp_path, record(port, host.cert_pem))
        assert_refused(r, "verify=cert")
