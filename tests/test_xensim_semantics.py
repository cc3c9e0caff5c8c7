"""xensim follows xapi where an audit found it kinder (issue #21 item 3; REFERENCE §9):
VM.create's ignored fields, BIOS strings, snapshots as templates with owned disks and a
blank unique vTPM, licence checks of vTPMs and VIF locking, VBD.create's validations,
VM.start's assert_can_boot_here, VM_HAS_VUSBS, and the demo VMs that exercise them.
Through the real PyPI XenAPI client over XML-RPC; each test names the xen-api function."""

from __future__ import annotations

import pytest
import xapirec
import XenAPI
from xapirec import GIB, NULL
from xapirec import vbd as vbd_record
from xapirec import vif as vif_record
from xapirec import vm as vm_record


def failure(call, *args) -> list[str]:
    with pytest.raises(XenAPI.Failure) as info:
        call(*args)
    return info.value.details


def demo(x) -> str:
    return x.VM.get_by_name_label("demo-vm")[0]


def oem(x) -> str:
    """``xensim serve --oem-vm 1``: unique vTPM, OEM BIOS strings, an ISO in the CD."""
    return x.VM.get_by_name_label("oem-vm")[0]


def new_vm(x, **extra) -> str:
    return x.VM.create(vm_record(**extra))


def new_disk(x, size: int = 1 << 20) -> str:
    sr = x.pool.get_default_SR(x.pool.get_all()[0])
    return x.VDI.create(xapirec.vdi(sr, size, "d"))


# -- VM.create (xapi_vm.ml create) ---------------------------------------------------------
def test_create_ignores_blocked_operations_and_bios_strings_and_fixes_state(xensim):
    x = xensim.session().xenapi
    vm = new_vm(
        x,
        blocked_operations={"start": "no"},
        is_a_snapshot=True,
        power_state="Running",
        other_config={"mac_seed": "kept"},
    )
    rec = x.VM.get_record(vm)
    assert rec["blocked_operations"] == {} and rec["bios_strings"] == {}
    assert rec["power_state"] == "Halted" and rec["is_a_snapshot"] is False
    assert rec["snapshot_of"] == NULL and rec["resident_on"] == NULL
    assert rec["other_config"]["mac_seed"] == "kept"
    assert rec["domain_type"] == "hvm"  # derive_domain_type: a boot policy → hvm
    assert x.VM.get_domain_type(new_vm(x, HVM_boot_policy="")) == "pv"
    assert x.VM.get_other_config(new_vm(x))["mac_seed"]  # random unless given


def test_create_validates_nothing_the_start_validates_vcpus_and_memory(xensim):
    """ "parameter validation is delayed until VM.start": VM.start finds no host
    (every host fails assert_can_boot_here: NO_HOSTS_AVAILABLE); VM.start_on and
    VM.assert_can_boot_here give the host's own error."""
    x = xensim.session().xenapi
    host = x.pool.get_master(x.pool.get_all()[0])
    vcpus = new_vm(x, VCPUs_at_startup="3")
    memory = new_vm(x, memory_dynamic_min=str(2 * GIB))  # above dynamic_max
    assert x.VM.get_VCPUs_at_startup(vcpus) == "3"
    assert failure(x.VM.start, vcpus, False, False) == ["NO_HOSTS_AVAILABLE"]
    assert failure(x.VM.assert_can_boot_here, vcpus, host) == [
        "VALUE_NOT_SUPPORTED",
        "VCPUs-at-startup",
        "3",
        "value greater than VCPUs-max",
    ]
    assert failure(x.VM.start_on, memory, host, False, False) == ["MEMORY_CONSTRAINT_VIOLATION"]
    # dynamic_min below static_min is coerced (Vm_memory_constraints.transform), not refused
    coerced = new_vm(x, memory_dynamic_min=str(128 << 20), memory_dynamic_max=str(GIB))
    x.VM.start(coerced, False, False)
    assert x.VM.get_power_state(coerced) == "Running"


# -- BIOS strings (xapi_vm.ml set_bios_strings, xapi_vm_helpers.ml) ----------------------
def test_set_bios_strings_settable_keys_once_over_the_generic_ones(xensim):
    x = xensim.session().xenapi
    vm = new_vm(x)
    assert failure(x.VM.set_bios_strings, vm, {"oem-1": "x"}) == [
        "INVALID_VALUE",
        "oem-1",
        "Unknown key",
    ]
    assert failure(x.VM.set_bios_strings, vm, {"bios-vendor": ""}) == [
        "INVALID_VALUE",
        "bios-vendor",
        "Value provided is empty",
    ]
    assert failure(x.VM.set_bios_strings, vm, {"bios-vendor": "a\tb"})[0] == "INVALID_VALUE"
    assert failure(x.VM.set_bios_strings, vm, {"bios-vendor": "v" * 513})[0] == "INVALID_VALUE"
    x.VM.set_bios_strings(vm, {"system-manufacturer": "Acme", "system-serial-number": "42"})
    strings = x.VM.get_bios_strings(vm)
    assert strings["system-manufacturer"] == "Acme" and strings["system-serial-number"] == "42"
    assert strings["bios-vendor"] == "Xen" and strings["oem-1"] == "Xen"  # generic
    assert failure(x.VM.set_bios_strings, vm, {"bios-vendor": "B"}) == [
        "VM_BIOS_STRINGS_ALREADY_SET"
    ]


def test_start_gives_generic_bios_strings_and_copy_gives_the_hosts(xensim):
    x = xensim.session().xenapi
    vm = new_vm(x)
    x.VM.start(vm, False, False)
    assert x.VM.get_bios_strings(vm)["system-product-name"] == "HVM domU"
    host = x.pool.get_master(x.pool.get_all()[0])
    oem = new_vm(x)
    x.VM.copy_bios_strings(oem, host)
    assert x.VM.get_bios_strings(oem) == x.host.get_bios_strings(host)
    assert x.VM.get_affinity(oem) == host
    assert failure(x.VM.copy_bios_strings, vm, host) == ["VM_BIOS_STRINGS_ALREADY_SET"]


# -- VM.snapshot (xapi_vm_clone.ml, xapi_vtpm.ml copy) --------------------------------------
def test_snapshot_is_a_template_owns_its_disks_keeps_the_cd_and_blanks_a_unique_vtpm(
    xensim_factory,
):
    x = xensim_factory(oem_vm=1).session().xenapi
    vm = oem(x)
    snap = x.VM.snapshot(vm, "s")
    rec = x.VM.get_record(snap)
    assert rec["is_a_snapshot"] and rec["is_a_template"] and rec["snapshot_of"] == vm
    assert rec["power_state"] == "Halted" and rec["blocked_operations"] == {}
    assert rec["bios_strings"] == x.VM.get_bios_strings(vm)
    assert x.VM.get_parent(vm) == snap
    vbds = [x.VBD.get_record(v) for v in rec["VBDs"]]
    disks = [v for v in vbds if v["type"] == "Disk"]
    cds = [v for v in vbds if v["type"] == "CD"]
    assert disks and all(v["other_config"].get("owner") == "" for v in disks)
    assert cds and all("owner" not in v["other_config"] for v in cds)
    live_cd = [x.VBD.get_VDI(v) for v in x.VM.get_VBDs(vm) if x.VBD.get_type(v) == "CD"]
    assert [v["VDI"] for v in cds] == live_cd  # the ISO itself, not a copy
    vtpm = rec["VTPMs"][0]
    assert x.VTPM.get_is_unique(vtpm) and x.VTPM.get_contents(vtpm) == ""
    assert x.VTPM.get_contents(x.VM.get_VTPMs(vm)[0]) != ""
    # a snapshot cannot start; a template that is not a snapshot neither
    assert failure(x.VM.start, snap, False, False) == ["VM_IS_SNAPSHOT", snap, "start"]
    template = new_vm(x, is_a_template=True)
    assert failure(x.VM.start, template, False, False) == ["VM_IS_TEMPLATE", template, "start"]
    x.VM.destroy(template)  # a (non-default) template may be destroyed
    x.VM.destroy(snap)


def test_snapshot_of_a_shared_vtpm_copies_its_contents_and_owner_is_kept(xensim):
    x = xensim.session().xenapi
    vm = new_vm(x)
    vtpm = x.VTPM.create(vm, False)
    x.VTPM.set_contents(vtpm, "c2hhcmVk")
    disk = x.VBD.create(vbd_record(vm, new_disk(x), "0", other_config={"owner": "true"}))
    snap = x.VM.snapshot(vm, "s")
    assert x.VTPM.get_contents(x.VM.get_VTPMs(snap)[0]) == "c2hhcmVk"
    (copy,) = x.VM.get_VBDs(snap)
    assert x.VBD.get_other_config(copy)["owner"] == "true"
    assert x.VBD.get_other_config(disk) == {"owner": "true"}


def test_snapshot_of_a_vm_with_a_vusb_is_vm_has_vusbs(xensim):
    """xapi_vm_lifecycle.ml check_operation_error: snapshot, checkpoint, suspend and
    migrations of a VM with a VUSB; a VGPU or a PCI device does not stop a snapshot."""
    x = xensim.session().xenapi
    vm = demo(x)
    uuid = x.VM.get_uuid(vm)
    xensim.control._request("POST", "passthrough", {"vm": uuid, "kind": "VGPU"})
    xensim.control._request("POST", "passthrough", {"vm": uuid, "kind": "PCI"})
    assert len(x.VM.get_VGPUs(vm)) == 1 and len(x.VM.get_attached_PCIs(vm)) == 1
    x.VM.destroy(x.VM.snapshot(vm, "fine"))
    xensim.control._request("POST", "passthrough", {"vm": uuid, "kind": "VUSB"})
    assert failure(x.VM.snapshot, vm, "s") == ["VM_HAS_VUSBS", vm]


# -- licences (xapi_vtpm.ml assert_not_restricted, xapi_vif_helpers.ml) --------------------
def test_vtpm_create_needs_restrict_vtpm_false(xensim):
    x = xensim.session().xenapi
    pool = x.pool.get_all()[0]
    assert x.pool.get_restrictions(pool)["restrict_vtpm"] == "false"
    vm = new_vm(x)
    xensim.control._request("POST", "licence", {"vtpm": False})
    assert x.pool.get_restrictions(pool)["restrict_vtpm"] == "true"
    assert failure(x.VTPM.create, vm, True) == ["FEATURE_RESTRICTED", "restrict_vtpm"]
    xensim.control._request("POST", "licence", {"vtpm": True})
    x.VTPM.create(vm, True)
    # CBT's flag is untouched by the vTPM's, and the old call still works
    assert xensim.control.set_licence(cbt=False)["restrict_vtpm"] == "false"


def test_vif_locking_needs_the_licence_but_not_for_unlocked_or_disabled(xensim):
    x = xensim.session().xenapi
    vm = new_vm(x)
    net = x.network.get_all()[0]
    xensim.control._request("POST", "licence", {"vif_locking": False})
    locked = vif_record(vm, net, "0", locking_mode="locked")
    assert failure(x.VIF.create, locked) == ["LICENSE_RESTRICTION", "VIF_locking"]
    listed = vif_record(vm, net, "0", ipv4_allowed=["10.0.0.5"])
    assert failure(x.VIF.create, listed) == ["LICENSE_RESTRICTION", "VIF_locking"]
    x.VIF.create(vif_record(vm, net, "0", locking_mode="disabled"))
    x.VIF.create(vif_record(vm, net, "1", locking_mode="unlocked"))
    xensim.control._request("POST", "licence", {"vif_locking": True})
    vif = x.VIF.create(vif_record(vm, net, "2", locking_mode="locked"))
    assert x.VIF.get_locking_mode(vif) == "locked"


# -- VBD.create (xapi_vbd.ml create) ---------------------------------------------------------
def test_vbd_create_validations(xensim):
    x = xensim.session().xenapi
    vm = new_vm(x)
    disk = new_disk(x)
    cd_rw = vbd_record(vm, NULL, "3", type="CD", empty=True, mode="RW")
    assert failure(x.VBD.create, cd_rw) == ["VBD_CDS_MUST_BE_READONLY"]
    empty_disk = vbd_record(vm, NULL, "1", empty=True, mode="RO")
    assert failure(x.VBD.create, empty_disk) == ["VBD_NOT_REMOVABLE_MEDIA", "in constructor"]
    assert failure(x.VBD.create, vbd_record(vm, disk, "nope"))[0:2] == ["INVALID_DEVICE", "nope"]
    assert failure(x.VBD.create, vbd_record(vm, NULL, "1"))[0] == "HANDLE_INVALID"
    assert failure(x.VBD.create, vbd_record(NULL, disk, "1"))[0] == "HANDLE_INVALID"
    first = x.VBD.create(vbd_record(vm, disk, "1"))
    assert x.VBD.get_device(first) == "" and not x.VBD.get_currently_attached(first)
    other = new_disk(x)
    assert failure(x.VBD.create, vbd_record(vm, other, "1")) == ["DEVICE_ALREADY_EXISTS", "1"]
    # "xvdb" is disk 1 too (possible_VBD_devices_of_string)
    assert failure(x.VBD.create, vbd_record(vm, other, "xvdb")) == [
        "DEVICE_ALREADY_EXISTS",
        "xvdb",
    ]
    auto = x.VBD.create(vbd_record(vm, other, "autodetect"))
    assert x.VBD.get_userdevice(auto) == "0"
    cd = x.VBD.create(vbd_record(vm, NULL, "3", type="CD", empty=True, mode="RO"))
    assert x.VBD.get_empty(cd)


def test_oem_vm_cd_drive_holds_an_iso_read_only(xensim_factory):
    x = xensim_factory(oem_vm=1).session().xenapi
    vm = oem(x)
    cds = [x.VBD.get_record(v) for v in x.VM.get_VBDs(vm)]
    cds = [v for v in cds if v["type"] == "CD"]
    assert len(cds) == 1 and cds[0]["mode"] == "RO" and not cds[0]["empty"]
    vdi = x.VDI.get_record(cds[0]["VDI"])
    assert vdi["name_label"].endswith(".iso")
    sr = x.SR.get_record(vdi["SR"])
    assert sr["type"] == "iso" and sr["content_type"] == "iso"


def test_oem_vm_has_a_unique_vtpm_and_oem_bios_strings(xensim_factory):
    x = xensim_factory(oem_vm=1).session().xenapi
    vm = oem(x)
    vtpm = x.VM.get_VTPMs(vm)[0]
    assert x.VTPM.get_is_unique(vtpm) and x.VTPM.get_contents(vtpm)
    strings = x.VM.get_bios_strings(vm)
    host = x.VM.get_resident_on(vm)
    assert strings == x.host.get_bios_strings(host)  # VM.copy_bios_strings of an OEM host
    assert strings["system-manufacturer"] != "Xen" and strings["oem-1"] != "Xen"
    assert x.VM.get_affinity(vm) == host
    # the default pool has no such VM; its demo VMs have the generic strings
    plain = x.VM.get_bios_strings(demo(x))
    assert plain["system-product-name"] == "HVM domU" and plain["oem-1"] == "Xen"


# -- VM.start: assert_can_boot_here (xapi_vm_helpers.ml) ----------------------------------
def test_start_needs_free_memory_on_the_host(xensim):
    x = xensim.session().xenapi
    host = x.pool.get_master(x.pool.get_all()[0])
    vm = new_vm(
        x,
        memory_static_max=str(1 << 40),
        memory_dynamic_max=str(1 << 40),
        memory_dynamic_min=str(1 << 40),
        memory_target=str(1 << 40),
    )
    details = failure(x.VM.start, vm, False, False)
    assert details[0] == "HOST_NOT_ENOUGH_FREE_MEMORY" and details[1] == str(1 << 40)
    assert int(details[2]) < 1 << 40
    assert x.VM.get_power_state(vm) == "Halted"
    assert failure(x.VM.assert_can_boot_here, vm, host)[0] == "HOST_NOT_ENOUGH_FREE_MEMORY"
    # a smaller host: the running demo VM and dom0 take their dynamic_min
    small = new_vm(x)
    name = x.host.get_name_label(host)
    result = xensim.control._request(
        "POST", "host-memory", {"host": name, "memory_total": 2 * GIB + (256 << 20)}
    )
    assert result["free"] == 256 << 20  # 2 GiB - dom0's 1 GiB - demo-vm's 1 GiB
    assert failure(x.VM.start, small, False, False) == [
        "HOST_NOT_ENOUGH_FREE_MEMORY",
        str(512 << 20),
        str(256 << 20),
    ]


def test_start_needs_the_vms_srs_and_networks_on_the_host(xensim_factory):
    sim = xensim_factory(hosts=2, srs="local")
    x = sim.session().xenapi
    hosts = {x.host.get_name_label(h): h for h in x.host.get_all()}
    srs = {x.SR.get_name_label(s): s for s in x.SR.get_all()}
    local1 = srs["Local storage on " + x.host.get_name_label(sorted(hosts.values())[0])]
    vm = new_vm(x)
    sr_host = [x.PBD.get_host(p) for p in x.SR.get_PBDs(local1)][0]
    other = [h for h in hosts.values() if h != sr_host][0]
    record = {
        "name_label": "d",
        "name_description": "",
        "SR": local1,
        "virtual_size": str(1 << 20),
        "type": "user",
        "sharable": False,
        "read_only": False,
        "other_config": {},
    }
    x.VBD.create(vbd_record(vm, x.VDI.create(record), "0"))
    assert failure(x.VM.assert_can_boot_here, vm, other) == ["VM_REQUIRES_SR", vm, local1]
    x.VM.start(vm, False, False)  # placed on the host that sees the SR
    assert x.VM.get_resident_on(vm) == sr_host
    x.VM.hard_shutdown(vm)


def test_start_needs_the_vifs_networks_on_the_host(xensim_factory):
    """assert_can_see_named_networks: an internal network (no PIF) is pinned to the host
    where a running VM uses it; VM_REQUIRES_NETWORK elsewhere."""
    sim = xensim_factory(hosts=2)
    x = sim.session().xenapi
    net = x.network.create(
        {
            "name_label": "internal",
            "name_description": "",
            "MTU": "0",
            "other_config": {},
            "bridge": "",
            "managed": True,
            "tags": [],
        }
    )
    assert x.network.get_MTU(net) == "1500" and x.network.get_bridge(net).startswith("xapi")
    first, second = new_vm(x), new_vm(x)
    for vm in (first, second):
        x.VIF.create(vif_record(vm, net, "0"))
    hosts = x.host.get_all()
    x.VM.start_on(first, hosts[1], False, False)
    assert x.VM.get_resident_on(first) == hosts[1]
    assert failure(x.VM.start_on, second, hosts[0], False, False) == [
        "VM_REQUIRES_NETWORK",
        second,
        net,
    ]
    x.VM.start(second, False, False)  # placed where the network is
    assert x.VM.get_resident_on(second) == hosts[1]


def test_start_and_destroy_follow_the_lifecycle_table(xensim):
    x = xensim.session().xenapi
    vm = new_vm(x)
    x.VM.start(vm, True, False)  # paused
    assert x.VM.get_power_state(vm) == "Paused"
    assert failure(x.VM.clean_shutdown, vm) == ["VM_BAD_POWER_STATE", vm, "running", "paused"]
    assert failure(x.VM.destroy, vm) == ["VM_BAD_POWER_STATE", vm, "halted, suspended", "paused"]
    x.VM.hard_shutdown(vm)
    x.VM.destroy(vm)
    dom0 = [v for v in x.VM.get_all() if x.VM.get_is_control_domain(v)][0]
    assert failure(x.VM.start, dom0, False, False)[0] == "VM_BAD_POWER_STATE"
