"""vm= export names are the VBDs' real userdevices (issue #23): a VM whose disks sit at
userdevices 1 and 3 (none at 0 or 2, a CD drive at 0) is exported as "1" and "3" by the
plugin, by ``xencbt serve --snapshot VM`` and recorded so by ``backup``; ``restore-vm``
puts each disk back at its own userdevice.  Real nbdinfo and nbdcopy read the exports;
every copy is compared with what the guest wrote (the test's model), never with a digest
the product computed."""

from __future__ import annotations

import json
import subprocess

import pytest
import xapirec
from cli_support import BLOCK, Vm, backup, rand, restored, sha, xencbt
from servers import plugin_server
from vm_restore import NULL, SR, destroy_vm_and_disks, restore_named
from vmdisk import read, serving

NAME = "gapped-vm"
DEVICES = ("1", "3")


@pytest.fixture
def gapped(xensim) -> Vm:
    """A VM made through the API: a CD drive at 0, disks at userdevices 1 and 3 (of
    different sizes, so that one read in the other's place shows), data on both."""
    x = xensim.session().xenapi
    ref = x.VM.create(xapirec.vm(name_label=NAME))
    sr = x.SR.get_by_name_label(SR)[0]
    for device, size in zip(DEVICES, (2 << 20, 1 << 20), strict=True):
        vdi = x.VDI.create(xapirec.vdi(sr, size, "%s disk %s" % (NAME, device)))
        x.VBD.create(xapirec.vbd(ref, vdi, device, other_config={"owner": "true"}))
    vm = Vm(xensim, NAME)  # its disks by userdevice: [1, 3]
    x.VBD.create(xapirec.cd_drive(ref, "0"))  # after: Vm takes every VBD for a disk
    vm.write(0, {0: rand(BLOCK), 20 * BLOCK: rand(BLOCK)})
    vm.write(1, {3 * BLOCK: rand(2 * BLOCK)})
    return vm


def devices_of(x, ref: str) -> dict[str, str]:
    """userdevice -> VDI uuid of the VM's disks."""
    found = {}
    for v in x.VM.get_VBDs(ref):
        rec = x.VBD.get_record(v)
        if rec["type"] == "Disk" and rec["VDI"] != NULL:
            found[rec["userdevice"]] = x.VDI.get_uuid(rec["VDI"])
    return found


def test_plugin_exports_disks_at_userdevices_1_and_3_by_those_names(gapped, xensim, tmp_path):
    x = gapped.x
    snap = x.VM.get_uuid(x.VM.snapshot(gapped.ref, "gapped"))
    disks = devices_of(x, x.VM.get_by_uuid(snap))
    assert sorted(disks) == list(DEVICES)
    info = xensim.info
    params = [
        "xapi=%s" % info["xapi"],
        "password=+%s" % info["password_file"],
        "xapi-cafile=%s" % info["ca_file"],
        "vm=%s" % snap,
    ]
    with plugin_server(params, tmp_path) as (uri, _):
        sock = uri.split("socket=")[1]
        listed = json.loads(
            subprocess.run(
                ["nbdinfo", "--list", "--json", uri], check=True, capture_output=True, text=True
            ).stdout
        )
        names = {e["export-name"]: e["export-size"] for e in listed["exports"]}
        assert set(names) == {*DEVICES, *disks.values()}
        for disk, device in enumerate(DEVICES):
            model = bytes(gapped.models[disk])
            for name in (device, disks[device]):
                assert names[name] == len(model), name
                got = read("nbd+unix:///%s?socket=%s" % (name, sock))
                assert sha(got) == sha(model), "export %s is not disk %s" % (name, device)
        # The default export is the lowest userdevice: 1.
        assert sha(read(uri)) == sha(bytes(gapped.models[0]))
        r = subprocess.run(
            ["nbdinfo", "nbd+unix:///0?socket=%s" % sock], capture_output=True, text=True
        )
        assert r.returncode != 0  # no disk at 0: the CD drive is no export


def test_cli_serves_backs_up_and_restores_userdevices_1_and_3(gapped, xensim, tmp_path):
    with serving(xensim, "--snapshot", NAME) as (info, _):
        assert info["exports"] == list(DEVICES)
        sock = info["uri"].split("socket=")[1]
        for disk, device in enumerate(DEVICES):
            got = read("nbd+unix:///%s?socket=%s" % (device, sock))
            assert sha(got) == sha(bytes(gapped.models[disk])), device

    repo = tmp_path / "repo"
    (result,) = backup(xensim, repo, NAME)["vms"]
    assert result["ok"], result
    recorded = {d["userdevice"]: d["vdi_uuid"] for d in result["disks"]}
    assert recorded == dict(zip(DEVICES, gapped.uuids, strict=True))
    for disk, uuid in enumerate(gapped.uuids):
        assert restored(xensim, repo, tmp_path, uuid) == bytes(gapped.models[disk])
    listed = json.loads(xencbt(xensim, "--json", "list", "--repo", str(repo)).stdout)
    (vm_row,) = listed["vms"]
    assert sorted(d["userdevice"] for d in vm_row["points"][0]["disks"]) == list(DEVICES)

    destroy_vm_and_disks(gapped.x, gapped.ref)
    out, _ = restore_named(xensim, repo, NAME)
    x = gapped.x
    new = devices_of(x, x.VM.get_by_uuid(out["vm_uuid"]))
    assert sorted(new) == list(DEVICES)
    for disk, device in enumerate(DEVICES):
        data = (xensim.state_dir / "vdis" / (new[device] + ".raw")).read_bytes()
        model = bytes(gapped.models[disk])
        assert data[: len(model)] + bytes(len(model) - len(data[: len(model)])) == model, device
