"""The real plugin under nbdkit against what real pools do (issue #12 items 5-8): NBD
addresses in CIDR form and dead ones, insecure_nbd networks (whose get_nbd_info still
carries a certificate), a session= used on a pool member, an NBD error reply.

Every copy is compared with an independent truth: the simulator's raw VDI file, or the
image a third-party server (nbdkit) serves.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import time
import xmlrpc.client
from pathlib import Path

import nbd
from servers import _process, free_port, nbd_info_file, plugin_server, run_plugin
from xencbt_core.backend import ORIGINATOR  # the plugin's sessions, in xapi's list
from xensim import disks

SIZE = 4 << 20


def sha_file(path: Path, size: int | None = None) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data if size is None else data[:size]).hexdigest()


@contextlib.contextmanager
def plain_upstream(tmp: Path, image: Path, address: str = "127.0.0.1", errors: bool = False):
    """Third-party ``nbdkit file`` without TLS; with ``errors``, every read fails with EIO
    while tmp/errflag exists, and tmp/upstream.log logs each connection."""
    port = free_port()
    pidfile = tmp / ("upstream-%d.pid" % port)
    argv = ["nbdkit", "-f", "-i", address, "-p", str(port), "-P", str(pidfile), "-r"]
    if errors:
        argv += ["--filter=log", "--filter=error"]
    argv += ["file", str(image)]
    if errors:
        argv += [
            "error=EIO",
            "error-pread-rate=100%",
            "error-file=%s" % (tmp / "errflag"),
            "logfile=%s" % (tmp / "upstream.log"),
        ]
    with _process(argv, pidfile):
        yield port


def image(tmp: Path) -> Path:
    path = tmp / "disk.raw"
    path.write_bytes(os.urandom(SIZE))
    return path


def record(address: str, port: int) -> dict:
    return {"address": address, "port": port, "exportname": "/disk"}


# -- item 7: an NBD error reply ends the connection (nbd lib/server.ml serve) -----------------


def test_a_connection_that_got_an_error_reply_is_dropped(tmp_path):
    disk = image(tmp_path)
    (tmp_path / "errflag").touch()
    with plain_upstream(tmp_path, disk, errors=True) as port:
        info = nbd_info_file(tmp_path, record("127.0.0.1", port))
        params = ["nbd-info=+%s" % info, "tls=off", "connections=1"]
        with plugin_server(params, tmp_path) as (uri, _):
            h = nbd.NBD()
            h.connect_uri(uri)
            try:
                h.pread(65536, 0)
                raise AssertionError("the upstream's EIO did not reach the client")
            except nbd.Error as e:
                assert e.errno == "EIO"  # passed on
            (tmp_path / "errflag").unlink()
            assert h.pread(65536, 0) == disk.read_bytes()[:65536]
            h.shutdown()
    log = (tmp_path / "upstream.log").read_text()
    # nbdkit would go on serving that connection; the host would not, so we never reuse it:
    # the first connection ends after its failed read, the next read has a new one.
    assert log.count(" Connect ") == 2, log
    first = [line for line in log.splitlines() if line.split()[2] == "connection=1"]
    assert "Disconnect transactions=1" in first[-1], log


# -- item 5: addresses in CIDR form, dead ones passed quickly (xapi_vdi.ml _get_nbd_info) -----


def test_an_ipv6_address_in_cidr_form_is_used(tmp_path):
    disk = image(tmp_path)
    with plain_upstream(tmp_path, disk, address="::1") as port:
        info = nbd_info_file(tmp_path, record("::1/128", port))
        out = tmp_path / "out.raw"
        r = run_plugin(["nbd-info=+%s" % info, "tls=off"], 'nbdcopy "$uri" %s' % out)
    assert r.returncode == 0, r.stderr
    assert sha_file(out) == sha_file(disk)


@contextlib.contextmanager
def black_hole():
    """A TCP address where connect() hangs: a listener that never accepts, whose accept
    queue (backlog 0: one connection) is already full, so further SYNs are dropped."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname())
    try:
        yield listener.getsockname()[1]
    finally:
        filler.close()
        listener.close()


def test_dead_addresses_cost_seconds_not_the_whole_timeout(tmp_path):
    disk = image(tmp_path)
    with black_hole() as dead, plain_upstream(tmp_path, disk) as port:
        records = [
            record("2001:db8::1/64", port),  # dual-stack: nothing answers there
            record("fe80::1/64", port),  # link-local: no zone, cannot even be tried
            record("127.0.0.1", dead),  # a host that does not answer
            record("127.0.0.1", port),
        ]
        info = nbd_info_file(tmp_path, records)  # type: ignore[arg-type]
        out = tmp_path / "out.raw"
        started = time.monotonic()
        r = run_plugin(["nbd-info=+%s" % info, "tls=off", "timeout=60"], 'nbdcopy "$uri" %s' % out)
        seconds = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert sha_file(out) == sha_file(disk)
    assert seconds < 30, "a dead address stalled the plugin for %.0f s" % seconds


# -- item 8: insecure_nbd pools -----------------------------------------------------------


def snapshot(sim) -> tuple[str, Path, int]:
    """A snapshot of demo-vm's first disk after a guest write: (uuid, raw file, size)."""
    x = sim.session().xenapi
    vm = x.VM.get_by_name_label("demo-vm")[0]
    vdi = x.VBD.get_VDI(x.VM.get_VBDs(vm)[0])
    with sim.guest_disk(x.VDI.get_uuid(vdi)) as uri:
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pwrite(os.urandom(1 << 20), 65536)
        h.flush()
        h.shutdown()
    snap = x.VDI.snapshot(vdi, {})
    uuid = x.VDI.get_uuid(snap)
    return uuid, disks.data_path(sim.state_dir, uuid), int(x.VDI.get_virtual_size(snap))


def xapi_params(sim, vdi: str, *extra: str) -> list[str]:
    return [
        "xapi=%s" % sim.info["xapi"],
        "password=+%s" % sim.info["password_file"],
        "xapi-cafile=%s" % sim.info["ca_file"],
        "vdi=%s" % vdi,
        *extra,
    ]


def test_an_insecure_nbd_pool_is_read_without_tls_and_says_so(xensim_factory, tmp_path):
    sim = xensim_factory(nbd_purpose="insecure_nbd", disk_sizes="4M")
    uuid, raw, size = snapshot(sim)
    out = tmp_path / "out.raw"
    r = run_plugin(xapi_params(sim, uuid), 'nbdcopy "$uri" %s' % out)
    assert r.returncode == 0, r.stderr
    assert sha_file(out) == sha_file(raw, size)
    assert "WITHOUT TLS" in r.stderr and "insecure_nbd" in r.stderr


def test_an_nbd_network_whose_server_offers_no_tls_is_refused(xensim_factory, tmp_path):
    # The API says nbd (TLS) while the host's server still serves plain NBD: what a
    # stripping middlebox would look like too.  No fallback to clear text.
    sim = xensim_factory(nbd_purpose="insecure_nbd", nbd_propagation=600, disk_sizes="4M")
    uuid, _, _ = snapshot(sim)
    x = sim.session().xenapi
    net = x.network.get_by_name_label("NBD network")[0]
    x.network.remove_purpose(net, "insecure_nbd")
    x.network.add_purpose(net, "nbd")
    r = run_plugin(xapi_params(sim, uuid, "retry-timeout=2"), 'nbdinfo --size "$uri"')
    assert r.returncode != 0
    assert "refused TLS" in r.stderr, r.stderr
    assert sim.control.counters()["host0"]["reads"] == 0


# -- item 6: session= on a pool member (session_check.ml) -----------------------------------


def test_a_session_given_to_a_member_follows_the_master(xensim_factory, tmp_path):
    sim = xensim_factory(hosts=2, disk_sizes="4M")
    uuid, raw, size = snapshot(sim)
    master, member = sim.info["hosts"]
    bundle = tmp_path / "certs.pem"
    bundle.write_text(Path(master["cert_file"]).read_text() + Path(member["cert_file"]).read_text())
    session_file = tmp_path / "session"
    fd = os.open(session_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(sim.session().handle)
    params = [
        "xapi=%s" % member["xapi"],
        "session=+%s" % session_file,
        "xapi-cafile=%s" % bundle,
        "vdi=%s" % uuid,
    ]
    out = tmp_path / "out.raw"
    r = run_plugin(params, 'nbdcopy "$uri" %s' % out)
    assert r.returncode == 0, r.stderr
    assert sha_file(out) == sha_file(raw, size)


# -- item 9: at most 500 sessions per originator (db_gc_util.ml timeout_sessions) ----------


def test_plugin_whose_session_the_pool_destroyed_logs_in_again(xensim_factory, tmp_path):
    # 500 newer sessions of the plugin's originator make the pool destroy the plugin's own
    # (the least recently active); its next connection's export name is then dead, so it
    # logs in again and fetches new NBD info instead of failing.
    sim = xensim_factory(disk_sizes="4M")
    uuid, raw, size = snapshot(sim)
    want = raw.read_bytes()[:size]
    proxy = xmlrpc.client.ServerProxy(
        sim.info["xapi"], context=ssl.create_default_context(cafile=sim.info["ca_file"])
    )
    before = set(sim.control.issued_secrets()["sessions"])
    with plugin_server(xapi_params(sim, uuid, "connections=2"), tmp_path) as (uri, _):
        h = nbd.NBD()
        h.connect_uri(uri)
        assert h.pread(65536, 0) == want[:65536]  # one upstream connection, now idle
        (plugin_session,) = set(sim.control.issued_secrets()["sessions"]) - before
        for _ in range(500):
            reply = proxy.session.login_with_password("root", sim.password, "1.1", ORIGINATOR)
            assert reply["Status"] == "Success"
        assert proxy.pool.get_all(plugin_session)["ErrorDescription"][0] == "SESSION_INVALID"
        sim.control.set_faults(hold_for=1.0)  # both reads wait: the second needs a new connection
        buffers = [nbd.Buffer(65536) for _ in range(2)]
        pending = {h.aio_pread(b, o) for b, o in zip(buffers, (65536, 2 * 65536))}
        while pending:
            h.poll(-1)
            pending = {c for c in pending if not h.aio_command_completed(c)}
        assert buffers[0].to_bytearray() == want[65536 : 2 * 65536]
        assert buffers[1].to_bytearray() == want[2 * 65536 : 3 * 65536]
        h.shutdown()
    assert len(set(sim.control.issued_secrets()["sessions"]) - before) == 502  # logged in again
