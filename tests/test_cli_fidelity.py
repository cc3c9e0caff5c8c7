"""The real ``xencbt`` against what real pools do (issue #12 items 5, 6, 8): NBD enabled on
a dual-stack pool, a pool set up with ``nbd enable --insecure``, the API of a member.
Ground truth: a model of what the guest wrote."""

from __future__ import annotations

import time
from pathlib import Path

from cli_support import BLOCK, Vm, backup, rand, restored_sha, xencbt


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
