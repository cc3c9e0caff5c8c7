"""The real ``xencbt`` against what real pools do (issue #12 items 5, 6, 8): NBD enabled on
a dual-stack pool, a pool set up with ``nbd enable --insecure``, the API of a member.
Ground truth: a model of what the guest wrote."""

from __future__ import annotations

import os
import ssl
import subprocess
import time
import xmlrpc.client
from pathlib import Path

from cli_support import BLOCK, XENCBT, Vm, backup, cli_env, rand, restored_sha, xencbt
from secretwatch import WATCH


def test_nbd_enable_completes_when_each_host_answers_on_one_address(xensim_factory):
    # Every host's NBD PIF also lists IPv6 addresses (CIDR, link-local too) on which
    # xapi-nbd does not listen: one answering address per host is enough.
    sim = xensim_factory(hosts=2, nbd_purpose="none", nbd_propagation=1.0, disk_sizes="1M")
    x = sim.session().xenapi
    vdi = x.VBD.get_VDI(x.VM.get_VBDs(x.VM.get_by_name_label("demo-vm")[0])[0])
    started = time.monotonic()
    r = xencbt(sim, "nbd", "enable", "--network", "NBD network")
    assert "NBD is served" in r.stderr
    assert time.monotonic() - started < 30
    addresses = [i["address"] for i in x.VDI.get_nbd_info(vdi)]
    assert "2001:db8::2/64" in addresses and "127.0.0.2" in addresses


def test_nbd_enable_names_a_host_that_never_answers(xensim_factory):
    sim = xensim_factory(hosts=2, nbd_purpose="none", nbd_propagation=600, disk_sizes="1M")
    r = xencbt(sim, "nbd", "enable", "--network", "NBD network", "--wait-timeout", "3", check=1)
    assert "2 host(s) did not answer" in r.stderr, r.stderr


def test_backup_of_an_insecure_nbd_pool_works_and_warns_every_run(xensim_factory, tmp_path):
    # get_nbd_info carries the host's certificate even on insecure_nbd (xapi_vdi.ml): the
    # network's purpose, not the record, says there is no TLS.
    sim = xensim_factory(nbd_purpose="insecure_nbd", disk_sizes="2M,1M+512", in_use_wait=0.5)
    repo = tmp_path / "repo"
    vm = Vm(sim)
    vm.write(0, {0: rand(2 * BLOCK), 20 * BLOCK: rand(BLOCK)})
    for run in range(2):
        r = xencbt(sim, "backup", "demo-vm", "--repo", str(repo))
        assert "insecure_nbd" in r.stderr and "UNENCRYPTED" in r.stderr, (run, r.stderr)
        vm.write(1, {BLOCK: rand(BLOCK)})
    summary = backup(sim, repo, "demo-vm")
    (result,) = summary["vms"]
    assert result["ok"] and {d["type"] for d in result["disks"]} == {"incremental"}
    for disk, uuid in enumerate(vm.uuids):
        assert restored_sha(sim, repo, tmp_path, uuid) == vm.digests()[disk]


def test_backup_through_a_members_api(xensim_factory, tmp_path):
    # Login on a member gets HOST_IS_SLAVE [master]; so do the calls of a session used
    # there (session_check.ml): the command moves to the master for everything.
    sim = xensim_factory(hosts=2, disk_sizes="1M", in_use_wait=0.5)
    master, member = sim.info["hosts"]
    bundle = tmp_path / "certs.pem"
    bundle.write_text("".join(Path(h["cert_file"]).read_text() for h in (master, member)))
    vm = Vm(sim)
    vm.write(0, {3 * BLOCK: rand(BLOCK)})
    repo = tmp_path / "repo"
    r = xencbt(
        sim,
        "--xapi",
        member["xapi"],
        "--xapi-cafile",
        str(bundle),
        "backup",
        "demo-vm",
        "--repo",
        str(repo),
    )
    assert r.returncode == 0
    assert restored_sha(sim, repo, tmp_path, vm.uuids[0]) == vm.digests()[0]


def test_backup_with_a_session_file_given_to_a_member(xensim_factory, tmp_path):
    # An orchestrator's session, used through a member's API: the command and the plugin
    # (session=+FILE) take it to the master, and neither logs it out.
    sim = xensim_factory(hosts=2, disk_sizes="1M", in_use_wait=0.5)
    master, member = sim.info["hosts"]
    bundle = tmp_path / "certs.pem"
    bundle.write_text("".join(Path(h["cert_file"]).read_text() for h in (master, member)))
    vm = Vm(sim)
    vm.write(0, {5 * BLOCK: rand(BLOCK)})
    session = sim.session()
    session_file = tmp_path / "session"
    fd = os.open(session_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(session.handle + "\n")
    env = cli_env(sim)
    del env["XENCBT_PASSWORD_FILE"]
    env.update(XENCBT_XAPI=member["xapi"], XENCBT_SESSION_FILE=str(session_file))
    repo = tmp_path / "repo"
    argv = [*XENCBT, "--xapi-cafile", str(bundle), "backup", "demo-vm", "--repo", str(repo)]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    WATCH.output("xencbt backup (session file)", r.stdout, r.stderr)
    assert r.returncode == 0, r.stderr
    assert restored_sha(sim, repo, tmp_path, vm.uuids[0]) == vm.digests()[0]
    # Still live: a given session is never logged out.  (Plain XML-RPC: the XenAPI module
    # would silently log in again.)
    ctx = ssl.create_default_context(cafile=master["cert_file"])
    proxy = xmlrpc.client.ServerProxy(master["xapi"], context=ctx)
    assert proxy.pool.get_all(session.handle)["Status"] == "Success"
