"""xencbt serve without a VM: what it serves is byte-identical to the point (nbdcopy,
qemu-img, nbdinfo), TLS off loopback, the chain lock, errors, and cleanup on a signal."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pki
import pytest
from cli_support import BLOCK, Vm, backup, content, disk_rows, rand, sha, xencbt
from vmdisk import children, ready_line, serving


def read_uri(uri: str, *args: str) -> bytes:
    done = subprocess.run(["nbdcopy", *args, "--", uri, "-"], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path("/proc", str(pid), "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def chain(xensim_factory, tmp_path):
    """A simulator, a VM with one 2 MiB + 512 disk, a full and an incremental point; each
    point carries ``model``, the guest's bytes when it was taken (the test's own truth: what
    a point serves is compared with it, never with the point's digest, which the product
    computed)."""
    sim = xensim_factory(disk_sizes="2M+512")
    vm = Vm(sim)
    repo = tmp_path / "repo"
    vm.write(0, {0: rand(2 * BLOCK), 20 * BLOCK: rand(BLOCK)})
    full = backup(sim, repo, "demo-vm")["vms"][0]["disks"][0]
    full["model"] = bytes(vm.models[0])
    vm.write(0, {BLOCK: rand(BLOCK), 30 * BLOCK: None})
    incr = backup(sim, repo, "demo-vm")["vms"][0]["disks"][0]
    incr["model"] = bytes(vm.models[0])
    assert incr["type"] == "incremental"
    return sim, vm, repo, [full, incr]


def test_points_served_byte_identical_then_cleaned_up(chain, tmp_path):
    sim, vm, repo, points = chain
    for point, sig in zip(points, (signal.SIGTERM, signal.SIGINT), strict=True):
        args = ["--repo", str(repo), vm.uuids[0][:8], "--at", point["point"]]
        with serving(sim, *args) as (info, proc):
            assert (info["vdi"], info["point"], info["tls"]) == (vm.uuids[0], point["point"], False)
            sock = Path(parse_qs(urlparse(info["uri"]).query)["socket"][0])
            assert info["uri"].startswith("nbd+unix:///")
            assert sock.stat().st_mode & 0o777 == 0o600  # only our user may connect
            assert info["nbd_client"] == "nbd-client -unix %s /dev/nbd0 -readonly" % sock
            [(child, argv)] = children(proc.pid)
            assert argv.startswith("qemu-nbd --read-only")
            size = subprocess.run(
                ["nbdinfo", "--size", info["uri"]], capture_output=True, text=True, timeout=60
            )
            assert int(size.stdout) == len(vm.models[0])
            assert read_uri(info["uri"]) == point["model"]
            assert point["digest"] == content(point["model"])
            out = tmp_path / "converted.raw"
            subprocess.run(
                ["qemu-img", "convert", "-f", "raw", "-O", "raw", info["uri"], str(out)],
                check=True,
                timeout=120,
            )
            assert out.read_bytes() == point["model"]
            proc.send_signal(sig)  # SIGINT too: kill -INT ends it like Ctrl-C
        assert not sock.exists() and not sock.parent.exists()
        assert gone(child)


def test_newest_point_by_default_and_loopback_tcp(chain):
    sim, vm, repo, points = chain
    with serving(sim, "--repo", str(repo), vm.uuids[0], "--listen", "tcp:127.0.0.1:0") as (
        info,
        _,
    ):
        port = urlparse(info["uri"]).port
        assert info["uri"] == "nbd://127.0.0.1:%d/" % port
        assert info["nbd_client"] == "nbd-client 127.0.0.1 %d /dev/nbd0 -readonly" % port
        assert info["point"] == points[-1]["point"]
        assert read_uri(info["uri"]) == points[-1]["model"]


def test_non_loopback_refused_without_tls(chain, tmp_path):
    sim, vm, repo, points = chain
    for listen in ("tcp:0.0.0.0:0", "tcp:[::]:0"):
        r = xencbt(sim, "serve", "--repo", str(repo), vm.uuids[0], "--listen", listen, check=2)
        assert "refusing to serve" in r.stderr and "TLS" in r.stderr
        assert "Traceback" not in r.stderr

    # With a PSK it serves on every address, and only to clients that know the key.
    psk = tmp_path / "keys.psk"
    psk.write_text("alice:%s\n" % os.urandom(32).hex())
    psk.chmod(0o600)
    args = ["--repo", str(repo), vm.uuids[0], "--listen", "tcp:0.0.0.0:0", "--tls-psk", str(psk)]
    with serving(sim, *args) as (info, _):
        port = urlparse(info["uri"]).port
        assert info["tls"] and info["uri"].startswith("nbds://") and info["nbd_client"] is None
        uri = "nbds://alice@127.0.0.1:%d/?tls-psk-file=%s" % (port, psk)
        assert read_uri(uri) == points[-1]["model"]
        plain = subprocess.run(
            ["nbdinfo", "nbd://127.0.0.1:%d/" % port], capture_output=True, timeout=60
        )
        assert plain.returncode != 0


def test_tls_certificates_require_a_client_certificate(chain, tmp_path):
    sim, vm, repo, points = chain
    ca = pki.issue("test CA", ca=True)
    server = pki.issue("backup server", ips=["127.0.0.1"], issuer=ca)
    certs = pki.server_dir(tmp_path / "server", server, ca)
    client = pki.issue("restore client", issuer=ca)
    mine = tmp_path / "client"
    mine.mkdir()
    (mine / "ca-cert.pem").write_text(ca.cert_pem)
    (mine / "client-cert.pem").write_text(client.cert_pem)
    (mine / "client-key.pem").write_text(client.key_pem)
    anonymous = tmp_path / "anonymous"
    anonymous.mkdir()
    (anonymous / "ca-cert.pem").write_text(ca.cert_pem)

    args = ["--repo", str(repo), vm.uuids[0], "--listen", "tcp:127.0.0.1:0"]
    with serving(sim, *args, "--tls-certificates", str(certs)) as (info, _):
        port = urlparse(info["uri"]).port
        assert "-cacertfile %s/ca-cert.pem" % certs in info["nbd_client"]
        uri = "nbds://127.0.0.1:%d/?tls-certificates=%s" % (port, mine)
        assert read_uri(uri) == points[-1]["model"]
        refused = subprocess.run(
            ["nbdinfo", "nbds://127.0.0.1:%d/?tls-certificates=%s" % (port, anonymous)],
            capture_output=True,
            timeout=60,
        )
        assert refused.returncode != 0


def test_clear_errors(chain, tmp_path):
    sim, vm, repo, points = chain
    cases = [
        (["serve", "--repo", str(repo), "0000"], 1, "no VDI matching 0000"),
        (
            ["serve", "--repo", str(repo), vm.uuids[0], "--at", "20000101T000000.000000Z"],
            1,
            "no point",
        ),
        (["serve", "--repo", str(tmp_path / "nowhere"), "0000"], 1, "does not exist"),
        (["serve", vm.uuids[0]], 2, "no repository"),
        (["serve", "--repo", str(repo), vm.uuids[0], "--listen", "udp:x"], 2, "expected unix:PATH"),
        (
            ["serve", "--repo", str(repo), vm.uuids[0], "--tls-psk", "/nonexistent"],
            2,
            "no such file",
        ),
        (["serve", "--snapshot", vm.uuids[0], "--at", points[0]["point"]], 2, "--at names"),
        (["serve", "--snapshot", "not-a-uuid"], 2, "VDI uuid"),
        (["serve", "--snapshot", "00000000-0000-0000-0000-000000000000"], 1, "no VDI 0000"),
    ]
    for args, code, message in cases:
        r = xencbt(sim, *args, check=code)
        assert message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    sock = tmp_path / "taken.sock"
    sock.write_text("")
    r = xencbt(
        sim, "serve", "--repo", str(repo), vm.uuids[0], "--listen", "unix:%s" % sock, check=1
    )
    assert "exists" in r.stderr and sock.exists()  # never removes what it did not create

    # A server that cannot start is reported, not announced: a damaged image.
    image = next(repo.rglob(points[-1]["point"] + ".qcow2"))
    with open(image, "r+b") as f:
        f.write(b"garbage!")
    r = xencbt(sim, "--json", "serve", "--repo", str(repo), vm.uuids[0], check=1)
    assert "qemu-nbd exited (1) before serving" in r.stderr
    # Never announced: stdout holds only the error, as JSON (issue #13 item 10).
    assert json.loads(r.stdout) == {
        "error": "qemu-nbd exited (1) before serving: see its messages above",
        "exit_code": 1,
    }


def test_chain_lock_shared_with_servers_exclusive_for_prune(chain, tmp_path):
    sim, vm, repo, points = chain
    lock = next(repo.rglob(".lock"))
    with serving(sim, "--repo", str(repo), vm.uuids[0], "--at", points[0]["point"]) as (info, _):
        with serving(sim, "--repo", str(repo), vm.uuids[0]):
            pass  # two serves of one chain at once are fine
        r = xencbt(sim, "prune", "--repo", str(repo), "--keep", "1", check=5)
        assert "locked" in r.stderr
        assert read_uri(info["uri"]) == points[0]["model"]
    listed = json.loads(xencbt(sim, "--json", "list", "--repo", str(repo)).stdout)
    assert len(disk_rows(listed)) == 2

    with open(lock, "w") as f:  # a backup or prune holds the chain
        fcntl.flock(f, fcntl.LOCK_EX)
        r = xencbt(sim, "serve", "--repo", str(repo), vm.uuids[0], check=5)
        assert "being backed up or pruned" in r.stderr


def test_sighup_ends_a_serve_as_sigterm_does(chain):
    """The terminal went away: the server is stopped, the socket removed, exit 0."""
    sim, vm, repo, points = chain
    with serving(sim, "--repo", str(repo), vm.uuids[0]) as (info, proc):
        sock = Path(parse_qs(urlparse(info["uri"]).query)["socket"][0])
        [(child, _)] = children(proc.pid)
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(60) == 0
    assert gone(child) and not sock.exists()


def test_server_dies_with_a_killed_xencbt(chain):
    """No orphaned qemu-nbd, and the private directory a SIGKILL left behind (its socket)
    is removed by the next run that makes one (proc/scratch.py)."""
    sim, vm, repo, points = chain
    proc = xencbt(sim, "--json", "serve", "--repo", str(repo), vm.uuids[0], popen=True)
    try:
        info = ready_line(proc)
        [(child, _)] = children(proc.pid)
        proc.kill()
        proc.wait()
        assert gone(child)  # the guard (children.py): no orphaned qemu-nbd keeps the chain open
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    private = Path(parse_qs(urlparse(info["uri"]).query)["socket"][0]).parent
    assert private.is_dir()  # nothing of ours ran after the SIGKILL
    with serving(sim, "--repo", str(repo), vm.uuids[0]) as (again, _):
        mine = Path(parse_qs(urlparse(again["uri"]).query)["socket"][0]).parent
        assert mine.is_dir() and not private.exists()
    assert not mine.exists()


def test_live_snapshot_served_through_the_plugin_then_destroyed(xensim_factory, tmp_path):
    sim = xensim_factory(disk_sizes="2M+512", in_use_wait=0.5)
    vm = Vm(sim)
    repo = tmp_path / "repo"
    vm.write(0, {0: rand(BLOCK), 9 * BLOCK: rand(BLOCK)})
    backup(sim, repo, "demo-vm")
    before = set(vm.x.VDI.get_all())
    with serving(sim, "--snapshot", vm.uuids[0], "--listen", "tcp:127.0.0.1:0") as (info, proc):
        assert info["snapshot_taken"] and info["vdi"] == vm.uuids[0]
        snap = vm.x.VDI.get_by_uuid(info["snapshot"])
        assert vm.x.VDI.get_is_a_snapshot(snap)
        assert vm.x.VDI.get_name_label(snap).startswith("xencbt-serve")
        vm.write(0, {0: rand(BLOCK)})  # the guest goes on writing: the snapshot does not
        assert sha(read_uri(info["uri"])) != sha(vm.models[0])
        [(child, argv)] = children(proc.pid)
        assert argv.startswith("nbdkit -f --exit-with-parent --readonly python")
        assert "password=+" in argv
        assert sim.password not in argv and "OpaqueRef" not in argv and "session_id" not in argv
    assert gone(child)
    assert set(vm.x.VDI.get_all()) == before  # the snapshot it took is destroyed
    # The next backup is still an incremental, and exact: the CBT chain survived.
    after = backup(sim, repo, "demo-vm")["vms"][0]["disks"][0]
    assert after["type"] == "incremental" and after["changed_bytes"] == BLOCK
    assert after["digest"] == content(vm.models[0])
    # Its own session and the plugin's are logged out: only this test's remains.
    assert sim.control.invalidate_sessions() == 1


def test_given_snapshot_served_and_kept(xensim_factory):
    sim = xensim_factory(disk_sizes="2M+512")
    vm = Vm(sim)
    vm.write(0, {BLOCK: rand(BLOCK)})
    snap = vm.x.VDI.snapshot(vm.vdis[0], {})
    uuid = vm.x.VDI.get_uuid(snap)
    with serving(sim, "--snapshot", uuid) as (info, _):
        assert info["snapshot"] == uuid and not info["snapshot_taken"]
        assert sha(read_uri(info["uri"])) == sha(vm.models[0])
    assert vm.x.VDI.get_uuid(snap) == uuid  # not ours to destroy
