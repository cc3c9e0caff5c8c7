"""Helpers (no tests) for VM points and ``xencbt restore-vm`` through the real CLI on the
simulator: a VM prepared and backed up, restore-vm run, and what a test compares (the VM's
configuration, VIFs, disks by userdevice, vTPM; each disk's raw data in the simulator)."""

from __future__ import annotations

import json
from pathlib import Path

from cli_support import BLOCK, Vm, backup, rand, xencbt
from xensim.vm_bios import GENERIC_BIOS_STRINGS

NULL = "OpaqueRef:NULL"
SR = "Local storage"
CONFIG = ("VCPUs_max", "VCPUs_at_startup", "memory_static_max", "memory_dynamic_min")
CONFIG += ("HVM_boot_policy", "HVM_boot_params", "platform", "NVRAM", "bios_strings", "tags")


# xapi-consts constants.ml generic_bios_strings: what a VM without BIOS strings gets at
# its first start (xapi_vm_helpers.ml consider_generic_bios_strings), and what
# VM.set_bios_strings lays the settable keys over (xapi_vm.ml set_bios_strings).
GENERIC_BIOS = GENERIC_BIOS_STRINGS


def booted_bios(strings: dict) -> dict:
    """The BIOS strings the VM boots with: its own over the generic ones."""
    return {**GENERIC_BIOS, **strings}


def settable_bios(strings: dict) -> dict:
    """What VM.set_bios_strings can give back (constants.ml settable_vm_bios_string_keys:
    the generic keys but hp-rombios and the type 11 oem-*); test_restore_vm_pool checks
    that the others are named in restore-vm's notes."""
    unsettable = ("hp-rombios", "oem-1", "oem-2")
    return {
        k: v for k, v in booted_bios(strings).items() if k in GENERIC_BIOS and k not in unsettable
    }


def raw(sim, vdi_uuid: str, size: int) -> bytes:
    """The simulator's own data file of a VDI: the independent truth."""
    data = (Path(sim.state_dir) / "vdis" / (vdi_uuid + ".raw")).read_bytes()
    return data[:size] + bytes(max(0, size - len(data)))


def snapshot_of_vm(x, ref: str) -> dict:
    """What the test compares: configuration, VIFs, disks by userdevice, vTPM."""
    rec = x.VM.get_record(ref)
    vifs = {}
    for v in rec["VIFs"]:
        vif = x.VIF.get_record(v)
        vifs[vif["device"]] = (vif["MAC"], x.network.get_name_label(vif["network"]))
    vbds = {}
    for v in rec["VBDs"]:
        vbd = x.VBD.get_record(v)
        vdi = None if vbd["VDI"] == NULL else x.VDI.get_uuid(vbd["VDI"])
        vbds[vbd["userdevice"]] = (vbd["type"], vbd["bootable"], vbd["empty"], vdi)
    tpm = [x.VTPM.get_contents(t) for t in rec["VTPMs"]]
    return {
        "name": rec["name_label"],
        "config": {k: settable_bios(rec[k]) if k == "bios_strings" else rec[k] for k in CONFIG},
        "vifs": vifs,
        "vbds": vbds,
        "vtpm": tpm,
        "power": rec["power_state"],
        "blocked": rec["blocked_operations"],
    }


def cd_drive(vm: str, userdevice: str, iso: str = NULL) -> dict:
    """A CD drive's VBD.create record, every field xapi requires (empty unless ``iso``)."""
    return {
        "VM": vm,
        "VDI": iso,
        "userdevice": userdevice,
        "bootable": False,
        "mode": "RO",
        "type": "CD",
        "empty": iso == NULL,
        "other_config": {},
        "qos_algorithm_type": "",
        "qos_algorithm_params": {},
    }


def prepared(sim, repo: Path):
    """demo-vm with data on both disks and an empty CD drive, backed up; returns the VM,
    its state before and the raw data of each disk at backup time (by userdevice)."""
    vm = Vm(sim)
    vm.write(0, {0: rand(BLOCK), 5 * BLOCK: rand(3 * BLOCK)})
    vm.write(1, {BLOCK: rand(BLOCK)})
    used = [int(vm.x.VBD.get_userdevice(v)) for v in vm.x.VM.get_VBDs(vm.ref)]
    vm.x.VBD.create(cd_drive(vm.ref, str(max(used) + 1)))  # beside the demo's ISO drive
    backup(sim, repo, "demo-vm")
    truth = {str(i): raw(sim, u, len(m)) for i, (u, m) in enumerate(zip(vm.uuids, vm.models))}
    return vm, snapshot_of_vm(vm.x, vm.ref), truth


def restore_vm(sim, repo: Path, *args: str, check: int | None = 0):
    r = xencbt(
        sim,
        "--json",
        "restore-vm",
        "--repo",
        str(repo),
        "demo-vm",
        "--to-sr",
        SR,
        *args,
        check=check,
    )
    return json.loads(r.stdout) if r.stdout else {}, r


def restore_named(sim, repo: Path, vm: str, *args: str, check: int | None = 0):
    r = xencbt(
        sim, "--json", "restore-vm", "--repo", str(repo), vm, "--to-sr", SR, *args, check=check
    )
    return json.loads(r.stdout) if r.stdout else {}, r


def destroy_vm_and_disks(x, ref: str) -> None:
    vdis = [x.VBD.get_VDI(v) for v in x.VM.get_VBDs(ref) if x.VBD.get_type(v) == "Disk"]
    if x.VM.get_power_state(ref) == "Running":
        x.VM.hard_shutdown(ref)
    x.VM.destroy(ref)
    for vdi in vdis:
        x.VDI.destroy(vdi)


def check_disks(sim, x, new: dict, truth: dict[str, bytes]) -> None:
    disks = {d: v for d, (kind, _, _, v) in new["vbds"].items() if kind == "Disk"}
    assert sorted(disks) == sorted(truth)
    for device, data in truth.items():
        assert raw(sim, disks[device], len(data)) == data, "disk %s differs" % device


def pool_state(x) -> tuple[set, set]:
    return set(x.VM.get_all()), set(x.VDI.get_all())
