"""A VM's backup copies all its disks through one nbdkit (vm=, issue #17): one process,
one XAPI login by the plugin; and every disk still comes out byte for byte.  `serve
--snapshot VM` serves them the same way."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import xapirec
from cli_support import BLOCK, XENCBT, Vm, cli_env, rand, restored_sha, sha
from secretwatch import WATCH
from vmdisk import children, read, serving

PLUGIN_ORIGINATOR = "xencbt-plugin"


@pytest.fixture
def sim(xensim_factory):
    return xensim_factory(disk_sizes="2M,1M+512", in_use_wait=0.5)


def counted_nbdkit(tmp: Path) -> tuple[Path, Path]:
    """A directory whose ``nbdkit`` notes each start, then runs the real one."""
    bindir, log = tmp / "bin", tmp / "nbdkit-starts"
    bindir.mkdir()
    wrapper = bindir / "nbdkit"
    wrapper.write_text(
        '#!/bin/sh\necho start >> %s\nexec %s "$@"\n' % (log, shutil.which("nbdkit"))
    )
    wrapper.chmod(0o755)
    return bindir, log


def backup_counted(sim, repo: Path, bindir: Path) -> dict:
    env = cli_env(sim)
    env["PATH"] = "%s:%s" % (bindir, env["PATH"])
    argv = [*XENCBT, "--xapi-cafile", sim.info["ca_file"], "--json", "backup", "demo-vm"]
    r = subprocess.run([*argv, "--repo", str(repo)], env=env, capture_output=True, text=True)
    WATCH.output("xencbt backup demo-vm", r.stdout, r.stderr)
    assert r.returncode == 0, r.stderr
    (vm,) = json.loads(r.stdout)["vms"]
    assert vm["ok"], vm
    return vm


def plugin_logins(sim) -> int:
    return sim.control.logins()["by_originator"].get(PLUGIN_ORIGINATOR, 0)


def test_a_two_disk_vm_is_backed_up_by_one_nbdkit_with_one_login(sim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    assert len(vm.vdis) == 2
    vm.write(0, {0: rand(2 * BLOCK), 7 * BLOCK: rand(BLOCK)})
    vm.write(1, {BLOCK: rand(BLOCK)})
    bindir, starts = counted_nbdkit(tmp_path)

    for kind in ("full", "incremental"):
        before = plugin_logins(sim)
        starts.unlink(missing_ok=True)
        result = backup_counted(sim, repo, bindir)
        assert [d["type"] for d in result["disks"]] == [kind, kind]
        assert starts.read_text().splitlines() == ["start"]  # one nbdkit for both disks
        assert plugin_logins(sim) - before == 1  # ...logged in once
        for i, uuid in enumerate(vm.uuids):
            assert restored_sha(sim, repo, tmp_path, uuid) == vm.digests()[i], i
        vm.write(0, {3 * BLOCK: rand(BLOCK)})
        vm.write(1, {0: rand(512)})


def test_a_disk_added_since_the_last_backup_is_copied_whole_with_the_others(sim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    vm.write(0, {0: rand(BLOCK)})
    vm.write(1, {0: rand(BLOCK)})
    bindir, starts = counted_nbdkit(tmp_path)
    backup_counted(sim, repo, bindir)
    # A third disk appears on the VM: its first backup is a full one, in the same nbdkit.
    x = vm.x
    sr = x.VDI.get_SR(vm.vdis[0])
    new = x.VDI.create(xapirec.vdi(sr, 1 << 20, "added"))
    x.VBD.create(xapirec.vbd(vm.ref, new, "2"))
    new_uuid = x.VDI.get_uuid(new)
    vm.uuids.append(new_uuid)
    vm.models.append(bytearray(int(x.VDI.get_virtual_size(new))))  # the SR rounds it up
    vm.write(2, {4 * BLOCK: rand(BLOCK)})
    vm.write(0, {5 * BLOCK: rand(BLOCK)})
    starts.unlink()
    result = backup_counted(sim, repo, bindir)
    kinds = {d["userdevice"]: d["type"] for d in result["disks"]}
    assert kinds == {"0": "incremental", "1": "incremental", "2": "full"}
    assert starts.read_text().splitlines() == ["start"]
    for i, uuid in enumerate(vm.uuids):
        assert restored_sha(sim, repo, tmp_path, uuid) == vm.digests()[i], i


def test_serve_snapshot_vm_serves_every_disk_through_one_nbdkit(sim, tmp_path):
    vm = Vm(sim)
    vm.write(0, {0: rand(BLOCK), 9 * BLOCK: rand(BLOCK)})
    vm.write(1, {2 * BLOCK: rand(BLOCK)})
    expected = vm.digests()
    vms_before, vdis_before = set(vm.x.VM.get_all()), set(vm.x.VDI.get_all())
    with serving(sim, "--snapshot", "demo-vm") as (info, proc):
        assert info["vm"] == vm.uuid and info["snapshot_taken"]
        assert info["exports"] == ["0", "1"]
        snap = vm.x.VM.get_by_uuid(info["snapshot"])
        assert vm.x.VM.get_is_a_snapshot(snap)
        vm.write(1, {0: rand(BLOCK)})  # the guest goes on writing: the snapshot does not
        assert len(children(proc.pid)) == 1  # one nbdkit for both disks
        sock = info["uri"].split("socket=")[1]
        for export, digest in zip(("0", "1"), expected):
            got = subprocess.run(
                ["nbdcopy", "--", "nbd+unix:///%s?socket=%s" % (export, sock), "-"],
                capture_output=True,
                check=True,
            ).stdout
            assert sha(got) == digest
        # The default export is disk 0.
        assert sha(read(info["uri"])) == expected[0]
    # The snapshot VM and its disks are gone again.
    assert set(vm.x.VM.get_all()) == vms_before
    assert set(vm.x.VDI.get_all()) == vdis_before
