"""restore-vm on a pool that behaves as xapi does (REFERENCE §9, issue #21 item 4), through
the real CLI on the simulator: the demo VM with a unique vTPM, OEM BIOS strings and an ISO
in its CD drive comes back after a disaster and beside its original; what would fail
later (vTPM and VIF-locking licences, SR space) is refused before anything is created; a
``--start`` that fails on memory keeps the VM, says so and exits 7; a second restore
never gives a second VM the same MACs; a VM with a VUSB is refused by backup in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import xapirec
from cli_support import BLOCK, Vm, backup, rand, xencbt
from vm_restore import (
    NULL,
    SR,
    booted_bios,
    check_disks,
    destroy_vm_and_disks,
    pool_state,
    raw,
    restore_named,
    restore_vm,
    snapshot_of_vm,
)
from xensim.vm_bios import SETTABLE_BIOS_KEYS

SETTABLE_BIOS = SETTABLE_BIOS_KEYS  # xapi-consts constants.ml, as xensim follows it
LIVE = "live VM right after the snapshot"


def devices(x, ref: str) -> dict:
    """VBDs by userdevice: type, mode, empty, the ISO of a CD, other_config."""
    out = {}
    for v in x.VM.get_VBDs(ref):
        vbd = x.VBD.get_record(v)
        iso = x.VDI.get_uuid(vbd["VDI"]) if vbd["type"] == "CD" and vbd["VDI"] != NULL else None
        out[vbd["userdevice"]] = (vbd["type"], vbd["mode"], vbd["empty"], iso, vbd["other_config"])
    return out


def backed_up(sim, repo: Path, name: str = "oem-vm"):
    """The VM with data on its disks, backed up; (vm, its state, disk truth, backup run)."""
    vm = Vm(sim, name)
    vm.write(0, {0: rand(BLOCK), 5 * BLOCK: rand(3 * BLOCK)})
    r = xencbt(sim, "--json", "backup", name, "--repo", str(repo))
    disks = {
        vm.x.VBD.get_VDI(v): vm.x.VBD.get_userdevice(v)
        for v in vm.x.VM.get_VBDs(vm.ref)
        if vm.x.VBD.get_type(v) == "Disk"
    }
    truth = {
        disks[ref]: raw(sim, u, len(m))
        for ref, u, m in zip(vm.vdis, vm.uuids, vm.models)
        if ref in disks  # not the ISO in the CD drive
    }
    rec = vm.x.VM.get_record(vm.ref)
    state = {
        **snapshot_of_vm(vm.x, vm.ref),
        "bios_strings": rec["bios_strings"],
        "devices": devices(vm.x, vm.ref),
    }
    return vm, state, truth, r


@pytest.fixture
def oem(xensim_factory):
    """A pool with "oem-vm": a unique vTPM, OEM BIOS strings, an ISO in its CD drive."""
    return xensim_factory(oem_vm=1)


def settable(strings: dict) -> dict:
    return {k: v for k, v in booted_bios(strings).items() if k in SETTABLE_BIOS}


def check_restored(x, out: dict, before: dict, stderr: str) -> dict:
    """Everything settable is back; what xapi cannot set is named in the notes."""
    ref = x.VM.get_by_uuid(out["vm_uuid"])
    rec = x.VM.get_record(ref)
    new = snapshot_of_vm(x, ref)
    assert new["config"] == before["config"]
    assert new["vtpm"] == before["vtpm"] and new["vtpm"] != [""]
    assert rec["blocked_operations"] == {} and new["power"] == "Halted"
    assert rec["is_a_template"] is False and rec["affinity"] == NULL
    assert "xencbt-restore" not in rec["other_config"]
    assert settable(rec["bios_strings"]) == settable(before["bios_strings"])
    lost = [
        k
        for k, v in before["bios_strings"].items()
        if k not in SETTABLE_BIOS and booted_bios(rec["bios_strings"]).get(k, "") != v
    ]
    assert lost, "the demo VM's OEM strings include type 11 strings no API can set"
    for key in lost:
        assert key in stderr, key
    after = devices(x, ref)
    assert {d: v[:4] for d, v in after.items()} == {d: v[:4] for d, v in before["devices"].items()}
    for kind, _, _, _, other_config in after.values():
        assert ("owner" in other_config) == (kind == "Disk")  # xe vm-uninstall takes them
    return new


def test_oem_vm_with_unique_vtpm_oem_bios_and_iso_comes_back(oem, tmp_path):
    repo = tmp_path / "repo"
    vm, before, truth, r = backed_up(oem, repo)
    assert json.loads(r.stdout)["vms"][0]["vtpm"] == LIVE
    # said in the summary on stdout (stderr, mailed by cron, stays for warnings)
    human = xencbt(oem, "backup", "oem-vm", "--repo", str(repo))
    line = "vTPM     unique: contents read from the VM right after the snapshot"
    assert line in human.stdout and "vTPM" not in human.stderr
    for config in (repo / vm.uuid / "points").glob("*.config.json"):
        assert [t["contents_from"] for t in json.loads(config.read_text())["vtpms"]] == [LIVE]
    assert any(kind == "CD" and iso for kind, _, _, iso, _ in before["devices"].values())
    destroy_vm_and_disks(vm.x, vm.ref)
    out, r = restore_named(oem, repo, "oem-vm")
    assert out["macs_changed"] is False and out["vtpm"] == LIVE
    assert "unique" in r.stderr and "right after the snapshot" in r.stderr
    new = check_restored(vm.x, out, before, r.stderr)
    assert new["vifs"] == before["vifs"]
    check_disks(oem, vm.x, new, truth)


def test_oem_vm_restored_beside_its_original(oem, tmp_path):
    repo = tmp_path / "repo"
    vm, before, truth, _ = backed_up(oem, repo)
    out, r = restore_named(oem, repo, "oem-vm", "--name", "copy")
    assert out["macs_changed"] is True and "new MAC" in r.stderr
    new = check_restored(vm.x, out, before, r.stderr)
    assert new["name"] == "copy"
    for device, (mac, network) in new["vifs"].items():
        assert mac != before["vifs"][device][0] and network == before["vifs"][device][1]
    check_disks(oem, vm.x, new, truth)


def test_a_second_restore_never_reuses_the_macs_of_the_first(xensim, tmp_path):
    repo = tmp_path / "repo"
    vm, before, _, _ = backed_up(xensim, repo, "demo-vm")
    destroy_vm_and_disks(vm.x, vm.ref)
    first, _ = restore_vm(xensim, repo)
    assert first["macs_changed"] is False
    second, r = restore_vm(xensim, repo, "--name", "again")
    assert second["macs_changed"] is True and first["vm_uuid"] in r.stderr
    macs = [
        m for m, _ in snapshot_of_vm(vm.x, vm.x.VM.get_by_uuid(second["vm_uuid"]))["vifs"].values()
    ]
    assert not set(macs) & {m for m, _ in before["vifs"].values()}


def api_vm(x, name: str, memory: int, vif: dict | None = None) -> str:
    """A VM made through the API as a client must make it: every constructor field."""
    ref = x.VM.create(
        xapirec.vm(
            name_label=name,
            memory_static_max=str(memory),
            memory_dynamic_max=str(memory),
            memory_dynamic_min=str(memory),
            memory_static_min=str(memory),
            memory_target=str(memory),
            VCPUs_max="1",
        )
    )
    sr = x.SR.get_by_name_label(SR)[0]
    vdi = x.VDI.create(xapirec.vdi(sr, 4 << 20, name + " disk"))
    x.VBD.create(xapirec.vbd(ref, vdi, "0", bootable=True, other_config={"owner": "true"}))
    network = x.network.get_by_name_label("Pool-wide network associated with eth0")[0]
    x.VIF.create(xapirec.vif(ref, network, "0", **(vif or {})))
    return ref


def test_start_that_fails_on_memory_keeps_the_vm_and_exits_7(xensim, tmp_path):
    repo = tmp_path / "repo"
    x = xensim.session().xenapi
    ref = api_vm(x, "big-vm", 1 << 40)  # more memory than any host has
    backup(xensim, repo, "big-vm")
    destroy_vm_and_disks(x, ref)
    out, r = restore_named(xensim, repo, "big-vm", "--start", check=7)
    assert out["exit_code"] == 7 and out["started"] is False
    assert "HOST_NOT_ENOUGH_FREE_MEMORY" in out["start_error"]
    assert out["vm_uuid"] in r.stderr and "xe vm-start" in r.stderr
    rec = x.VM.get_record(x.VM.get_by_uuid(out["vm_uuid"]))  # whole, and it stays
    assert rec["power_state"] == "Halted" and rec["blocked_operations"] == {}
    assert "xencbt-restore" not in rec["other_config"] and len(rec["VIFs"]) == 1
    mac = x.VIF.get_MAC(rec["VIFs"][0])
    again, r = restore_named(xensim, repo, "big-vm")  # the second run: new MACs
    assert again["macs_changed"] is True and out["vm_uuid"] in r.stderr
    new = x.VM.get_record(x.VM.get_by_uuid(again["vm_uuid"]))
    assert x.VIF.get_MAC(new["VIFs"][0]) != mac


def test_unlicensed_vtpm_is_refused_before_anything_is_created(xensim, tmp_path):
    repo = tmp_path / "repo"
    vm, _, _, _ = backed_up(xensim, repo, "demo-vm")
    destroy_vm_and_disks(vm.x, vm.ref)
    control(xensim, "licence", vtpm=False)
    before = pool_state(vm.x)
    out, r = restore_vm(xensim, repo, check=1)
    assert "restrict_vtpm" in out["error"] and "nothing was created" in out["error"]
    assert len(r.stderr.strip().splitlines()) == 1
    assert pool_state(vm.x) == before


def test_unlicensed_vif_locking_is_refused_before_anything_is_created(xensim, tmp_path):
    repo = tmp_path / "repo"
    x = xensim.session().xenapi
    api_vm(x, "locked-vm", 1 << 30, {"locking_mode": "locked", "ipv4_allowed": ["10.0.0.5"]})
    backup(xensim, repo, "locked-vm")
    control(xensim, "licence", vif_locking=False)
    before = pool_state(x)
    out, r = restore_named(xensim, repo, "locked-vm", "--name", "copy", check=1)
    assert "restrict_vif_locking" in out["error"] and "nothing was created" in out["error"]
    assert pool_state(x) == before


def test_a_full_sr_is_refused_before_anything_is_created(xensim, tmp_path):
    repo = tmp_path / "repo"
    vm, _, _, _ = backed_up(xensim, repo, "demo-vm")
    sr = vm.x.SR.get_uuid(vm.x.SR.get_by_name_label(SR)[0])
    used = xensim.control.set_sr_size(sr, 1 << 40)["used"]
    xensim.control.set_sr_size(sr, used + (1 << 20))  # less than one VHD block of data
    before = pool_state(vm.x)
    out, r = restore_vm(xensim, repo, "--name", "copy", check=1)
    assert "free" in out["error"] and "nothing was created" in out["error"], out
    assert pool_state(vm.x) == before


def test_backup_of_a_vm_with_a_vusb_says_why_not_in_one_line(xensim, tmp_path):
    vm = Vm(xensim)
    control(xensim, "passthrough", vm=vm.uuid, kind="VUSB")
    xencbt(xensim, "init", "--repo", str(tmp_path / "repo"))
    r = xencbt(xensim, "backup", "demo-vm", "--repo", str(tmp_path / "repo"), check=1)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "VUSB" in lines[0] and "VM_HAS_VUSBS" in lines[0], r.stderr
    assert vm.x.VM.get_snapshots(vm.ref) == []
    assert not any(vm.x.VDI.get_cbt_enabled(v) for v in vm.vdis)  # nothing was changed


def test_vgpu_and_pci_are_backed_up_without_and_named_by_restore(xensim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(xensim)
    control(xensim, "passthrough", vm=vm.uuid, kind="VGPU")
    control(xensim, "passthrough", vm=vm.uuid, kind="PCI")
    r = xencbt(xensim, "--json", "backup", "demo-vm", "--repo", str(repo))
    (row,) = json.loads(r.stdout)["vms"]
    assert [w.split()[0] for w in row["not_captured"]] == ["PCI", "vGPU"], row
    assert r.stderr.count("not in the VM point") == 2
    out, r = restore_vm(xensim, repo, "--name", "copy")
    notes = [n for n in out["notes"] if n.startswith("not restored")]
    assert len(notes) == 2 and any("vGPU" in n for n in notes) and any("PCI" in n for n in notes)
    new = vm.x.VM.get_record(vm.x.VM.get_by_uuid(out["vm_uuid"]))
    assert new["VGPUs"] == [] and new["attached_PCIs"] == []


def control(sim, path: str, **body):
    """A control request the client has no method for yet (admin.py routes)."""
    return sim.control._request("POST", path, body)
