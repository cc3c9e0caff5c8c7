"""Hostile input: impostor NBD servers, TLS downgrades, malformed server replies, broken CBT
bitmaps, nonsense on the command line.

Pass: a non-zero exit with a clear error (no traceback) within a bounded time; nothing
sent to, and no data read from, a peer that failed verification.  tests/test_plugin_trust.py
covers one impostor per verify mode against the simulator and nbdkit; here every verify
mode meets every kind of impostor, with the scripted server of tests/fakenbd.py recording
what the client revealed.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from cli_support import BLOCK, Vm, rand, restored_sha, sha
from fakenbd import REP_ERR_POLICY, STRUCTURED_REPLY_MAGIC, FakeNBD, Quirks
from faultkit import run
from pki import issue
from secretwatch import WATCH
from servers import PLUGIN, nbd_info_file
from tally import tally

pytestmark = pytest.mark.reliability

SIZE = 1024 * 1024
SECRET = "OpaqueRef:hostile-test-secret"
WATCH.register(SECRET)
WATCH.allow("OpaqueRef:0123")  # a VM "name" given on the command line, on purpose
EXPORT = "/5e1f0a2b-1111-4222-8333-444455556666?session_id=" + SECRET
SUBJECT = "host.example.test"
# Short timeouts: a misbehaving server must cost seconds, not the default minute.
FAST = ["timeout=2", "retry-timeout=2", "connections=1"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = issue("Test CA", ca=True)
    other_ca = issue("Other CA", ca=True)
    host = issue(SUBJECT, dns=[SUBJECT], ips=["127.0.0.1"], issuer=ca)
    (d / "ca.pem").write_text(ca.cert_pem)
    attackers = {
        "self-signed, other key": issue(SUBJECT, dns=[SUBJECT], ips=["127.0.0.1"]),
        "self-signed, same key": issue(SUBJECT, dns=[SUBJECT], key=host.key),
        "trusted CA, other key": issue(SUBJECT, dns=[SUBJECT], issuer=ca),
        "trusted CA, wrong subject": issue(
            "evil.example.test", dns=["evil.example.test"], issuer=ca
        ),
        "other CA, right subject": issue(SUBJECT, dns=[SUBJECT], issuer=other_ca),
    }
    return {"dir": d, "ca": ca, "host": host, "attackers": attackers}


def key_files(d: Path, name: str, cert) -> tuple[Path, Path]:
    slug = "".join(c if c.isalnum() else "-" for c in name)
    c, k = d / (slug + ".pem"), d / (slug + ".key")
    c.write_text(cert.cert_pem)
    k.touch(mode=0o600)
    k.write_text(cert.key_pem)
    return c, k


def fake(pki, cert=None, data: bytes | None = None, **quirks) -> FakeNBD:
    certfile, keyfile = key_files(pki["dir"], "server", cert or pki["host"])
    return FakeNBD(certfile, keyfile, data if data is not None else DATA, Quirks(**quirks))


DATA = os.urandom(SIZE)


def record(port: int, cert_pem: str, subject: str = SUBJECT) -> dict:
    return {
        "address": "127.0.0.1",
        "port": port,
        "cert": cert_pem,
        "subject": subject,
        "exportname": EXPORT,
    }


class Copy:
    def __init__(self, proc: subprocess.CompletedProcess, out: Path, seconds: float):
        self.returncode = proc.returncode
        self.stderr = proc.stderr
        self.out = out
        self.seconds = seconds

    def __repr__(self) -> str:
        return "exit %d after %.1f s: %s" % (self.returncode, self.seconds, self.stderr)


def copy(tmp_path: Path, rec: dict | None, *params: str, port: int = 0) -> Copy:
    """nbdcopy the plugin's export (nbd-info=) to a file; a hang fails the test."""
    info = nbd_info_file(tmp_path, rec if rec is not None else record(port, ""))
    out = tmp_path / "out.raw"
    out.unlink(missing_ok=True)
    argv = ["nbdkit", "-U", "-", "python", str(PLUGIN), "nbd-info=+%s" % info, *params]
    argv += ["--run", 'nbdcopy "$uri" %s' % out]
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    WATCH.output("nbdkit xencbt nbd-info %s" % " ".join(params), proc.stdout, proc.stderr)
    return Copy(proc, out, time.monotonic() - t0)


def assert_refused(c: Copy, *phrases: str) -> None:
    assert c.returncode != 0, c
    assert "Traceback" not in c.stderr, c
    for phrase in phrases:
        assert phrase in c.stderr, c
    assert SECRET not in c.stderr
    assert c.seconds < 30, c
    tally("hostile inputs tried")


# -- impostors --------------------------------------------------------------------------

# (mode, attacker) -> accepted?  Accepted ones are what each mode promises to accept: pubkey
# pins the key, not the certificate; ca trusts whatever the CA signs for the subject.
ACCEPTED = {("pubkey", "self-signed, same key"), ("ca", "trusted CA, other key")}
MODES = ("cert", "pubkey", "ca")
ATTACKERS = (
    "self-signed, other key",
    "self-signed, same key",
    "trusted CA, other key",
    "trusted CA, wrong subject",
    "other CA, right subject",
)


@pytest.mark.parametrize("attacker", ATTACKERS)
@pytest.mark.parametrize("mode", MODES)
def test_impostor_for_each_verify_mode(tmp_path, pki, mode, attacker):
    params = ["verify=%s" % mode] + (
        ["cafile=%s" % (pki["dir"] / "ca.pem")] if mode == "ca" else []
    )
    with fake(pki, pki["attackers"][attacker]) as server:
        c = copy(tmp_path, record(server.port, pki["host"].cert_pem), *params, *FAST)
    if (mode, attacker) in ACCEPTED:
        assert c.returncode == 0, c
        assert sha(c.out.read_bytes()) == sha(DATA)
        return
    assert_refused(c, "verify=%s" % mode)
    assert server.seen.connections >= 1  # it was really asked...
    assert server.seen.export_names == [] and server.seen.reads == 0  # ...and told nothing
    assert not c.out.exists()


def test_the_real_host_is_accepted_in_every_mode(tmp_path, pki):
    """The control: the same fake with the host's own certificate serves the data."""
    for mode in MODES:
        params = ["verify=%s" % mode]
        if mode == "ca":
            params.append("cafile=%s" % (pki["dir"] / "ca.pem"))
        with fake(pki) as server:
            c = copy(tmp_path, record(server.port, pki["host"].cert_pem), *params, *FAST)
        assert c.returncode == 0, c
        assert sha(c.out.read_bytes()) == sha(DATA)
        assert server.seen.export_names == [EXPORT]


# -- downgrades -------------------------------------------------------------------------


@pytest.mark.parametrize("tls", ["require", "off"])
@pytest.mark.parametrize("reply", [REP_ERR_POLICY, 0x80000001, 0x80000005])
def test_starttls_refused_is_not_a_downgrade(tmp_path, pki, reply, tls):
    """The record promises TLS (it has a certificate): a server that will not do it is
    refused, even with tls=off, and the export name never crosses in clear text."""
    with fake(pki, starttls_reply=reply) as server:
        c = copy(tmp_path, record(server.port, pki["host"].cert_pem), "tls=%s" % tls, *FAST)
    assert_refused(c, "refused TLS")
    assert server.seen.export_names == [] and server.seen.cleartext_options == []


@pytest.mark.parametrize(
    "quirks, phrase",
    [
        ({"plaintext_after_ack": b"NBDMAGIC" * 8}, "TLS handshake"),
        ({"silent_after_ack": True}, "timed out"),
    ],
    ids=["plaintext-after-ack", "silent-after-ack"],
)
def test_starttls_acked_but_no_tls(tmp_path, pki, quirks, phrase):
    with fake(pki, **quirks) as server:
        c = copy(tmp_path, record(server.port, pki["host"].cert_pem), *FAST)
    assert_refused(c, phrase)
    assert server.seen.export_names == []


def test_no_tls_offered_is_refused_without_connecting(tmp_path, pki):
    with fake(pki) as server:
        c = copy(tmp_path, record(server.port, ""), *FAST)  # no certificate: insecure_nbd
    assert_refused(c, "no certificate", "tls=off")
    assert server.seen.connections == 0


# -- malformed replies from a verified server ------------------------------------------

MALFORMED = {
    "greeting-bad-magic": ({"greeting_magic": 0x4E42444D41474944}, "bad greeting magic"),
    "greeting-not-fixed-newstyle": ({"handshake_flags": 0}, "fixed newstyle"),
    "greeting-eof": ({"close_at_greeting": True}, "before greeting us"),
    "starttls-reply-bad-magic": ({"starttls_reply_magic": 0x1234}, "bad option reply"),
    "starttls-reply-other-option": ({"starttls_reply_option": 1}, "bad option reply"),
    "starttls-reply-oversized": ({"starttls_reply_length": 0xFFFFFFFF}, "oversized option reply"),
    "export-name-eof": ({"close_at_export": True}, "when given the export name"),
    "export-info-short": ({"export_info_bytes": 9}, "when given the export name"),
    "export-size-absurd": ({"export_size": 2**64 - 1}, "absurd export size"),
    "export-size-over-int64": ({"export_size": 2**63}, "absurd export size"),
    "reply-bad-magic": ({"reply_magic": 0xDEADBEEF}, "bad reply magic"),
    "reply-structured": ({"reply_magic": STRUCTURED_REPLY_MAGIC}, "bad reply magic"),
    "reply-wrong-handle": ({"reply_handle_delta": 7}, "reply for handle"),
    "reply-error": ({"reply_error": 5}, "refused a read"),
    "payload-eof-midway": ({"payload_limit": 1000}, "closed the connection after 1000"),
    "read-hangs": ({"hang_on_read": True}, "timed out"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_server_replies(tmp_path, pki, case):
    quirks, phrase = MALFORMED[case]
    with fake(pki, **quirks) as server:
        c = copy(tmp_path, record(server.port, pki["host"].cert_pem), *FAST)
    assert_refused(c, phrase)
    assert server.seen.connections >= 1


# -- broken CBT bitmaps -----------------------------------------------------------------


@pytest.mark.parametrize(
    "content, phrase",
    [
        ("%%% not base64 %%%", "not valid base64"),
        ("AAAA", "has 3 bytes but a disk of 1048576 bytes needs 2"),
        ("AA==", "has 1 bytes"),
        ("", "is empty"),
    ],
    ids=["garbage", "long", "short", "empty"],
)
def test_changed_bitmap_file_malformed(tmp_path, pki, content, phrase):
    bitmap = tmp_path / "changed.b64"
    bitmap.write_text(content)
    with fake(pki) as server:
        c = copy(tmp_path, record(server.port, pki["host"].cert_pem), "changed=+%s" % bitmap)
    assert_refused(c, phrase)
    assert server.seen.reads == 0


def test_host_sends_broken_bitmaps(xensim_factory, tmp_path):
    """list_changed_blocks answers garbage, a byte too few, a byte too many: the plugin
    refuses (since=), and `xencbt backup` takes a full backup saying why."""
    sim = xensim_factory(disk_sizes="2M,1M+512", in_use_wait=0.2)
    repo = tmp_path / "repo"
    vm = Vm(sim)
    vm.write(0, {0: rand(BLOCK)})
    assert run(sim, "backup", "demo-vm", "--repo", str(repo)).returncode == 0
    for mode in ("garbage", "short", "long"):
        vm.write(0, {3 * BLOCK: rand(BLOCK)})
        sim.control.corrupt_bitmaps(mode)
        r = run(sim, "--json", "backup", "demo-vm", "--repo", str(repo))
        assert r.returncode == 0, r
        for d in r.json()["vms"][0]["disks"]:
            assert d["type"] == "full" and "unusable CBT bitmap" in d["reason"], d
        tally("hostile inputs tried")

        # The plugin asked directly, with since=, refuses the bitmap.
        x = vm.x
        base = x.VDI.snapshot(vm.vdis[0], {})
        top = x.VDI.snapshot(vm.vdis[0], {})
        params = [
            "xapi=%s" % sim.info["xapi"],
            "password=+%s" % sim.info["password_file"],
            "xapi-cafile=%s" % sim.info["ca_file"],
            "vdi=%s" % x.VDI.get_uuid(top),
            "since=%s" % x.VDI.get_uuid(base),
        ]
        p = subprocess.run(
            ["nbdkit", "-U", "-", "python", str(PLUGIN), *params, "--run", "true"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        WATCH.output("nbdkit xencbt since=", p.stdout, p.stderr)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        assert "changed-block bitmap" in p.stderr, p.stderr
        tally("hostile inputs tried")
        x.VDI.destroy(top)
        x.VDI.destroy(base)
        sim.control.corrupt_bitmaps(None)
    for disk, uuid in enumerate(vm.uuids):
        assert restored_sha(sim, repo, tmp_path, uuid) == sha(vm.models[disk])


# -- the command line -------------------------------------------------------------------

ZERO = "00000000-0000-4000-8000-000000000000"


def test_bad_names_and_uuids_on_the_command_line(xensim_factory, tmp_path):
    sim = xensim_factory(disk_sizes="1M,1M", in_use_wait=0.2)
    repo = str(tmp_path / "repo")
    r = run(sim, "--json", "backup", "demo-vm", "--repo", repo)
    assert r.returncode == 0, r
    vdi = r.json()["vms"][0]["disks"][0]["vdi_uuid"]
    out = str(tmp_path / "restored.raw")
    cases = [
        (("backup", "no-such-vm", "--repo", repo), 1, "no VM named no-such-vm"),
        (("backup", ZERO, "--repo", repo), 1, "no VM with uuid %s" % ZERO),
        (("backup", "", "--repo", repo), 1, "an empty VM name"),
        (("backup", "OpaqueRef:0123", "--repo", repo), 1, "no VM named OpaqueRef:0123"),
        (("backup", "ZZZZZZZZ-0000-4000-8000-000000000000", "--repo", repo), 1, "no VM named"),
        (("backup", "demo-vm", "--repo", repo, "--retry-timeout", "0"), 2, "--retry-timeout"),
        (("backup", "demo-vm", "--repo", repo, "--connections", "17"), 2, "--connections"),
        (("restore", "not-a-vdi", "--repo", repo, "--to-file", out), 1, "no VDI matching"),
        (("restore", "../../etc", "--repo", repo, "--to-file", out), 1, "no VDI matching"),
        (("restore", "", "--repo", repo, "--to-file", out), 1, "more than one VDI matching"),
        (("restore", vdi, "--repo", repo, "--at", "x", "--to-file", out), 1, "no point x"),
        (("restore", vdi, "--repo", repo, "--to-vdi", "not-a-uuid"), 1, "no VDI not-a-uuid"),
        (("restore", vdi, "--repo", repo, "--to-vdi", ZERO), 1, "no VDI %s" % ZERO),
        (("restore", vdi, "--repo", repo, "--to-sr", "no-such-sr"), 1, "0 SRs named no-such-sr"),
        (("restore", vdi, "--repo", repo, "--to-sr", ZERO), 1, "no SR %s" % ZERO),
        (("verify", "not-a-vdi", "--repo", repo), 1, "no VM or VDI matching"),
        (("list", "--repo", str(tmp_path / "nowhere")), 1, "does not exist"),
        (("nbd", "enable", "--network", "no-such-net"), 1, "0 networks match"),
        (("--xapi", "http://127.0.0.1:1", "nbd", "status"), 2, "only https://"),
        (("--xapi", "not a url", "nbd", "status"), 2, "is not a URL"),
        (("--xapi", "https://127.0.0.1:port", "nbd", "status"), 2, "port is not a number"),
    ]
    for args, code, phrase in cases:
        r = run(sim, *args)
        assert r.returncode == code, (args, r)
        assert "Traceback" not in r.stdout + r.stderr, (args, r)
        lines = [line for line in r.stderr.splitlines() if phrase in line]
        assert len(lines) == 1, (args, r)
        assert sim.password not in r.stdout + r.stderr
        tally("hostile inputs tried")
    assert not Path(out).exists()
    # Nothing above touched the repository or left snapshots behind.
    assert run(sim, "verify", "--repo", repo).returncode == 0
    vm = Vm(sim)
    assert not vm.x.VM.get_snapshots(vm.ref)
