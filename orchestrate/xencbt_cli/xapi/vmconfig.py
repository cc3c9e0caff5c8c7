"""A VM's configuration read from the pool into a VM point's record (repo/vmpoints.py
stores it).

The configuration is xapi's records (VM, VBDs with CD drives and the ISO they hold, VDIs,
VIFs with their network's uuid/name/bridge/VLAN/MTU, vTPM contents), read from the same
VM snapshot the disks are copied from, with one exception: a *unique* vTPM is copied into
a snapshot without its contents (xapi_vtpm.ml ``copy_or_create_contents``: "Contents from
unique vtpms cannot be copied!"), so its contents are read from the live VM right after
the snapshot (``VTPM.get_contents``, root only) and ``contents_from`` says so: the TPM's
state a moment after the disks' — or, when that read fails, that there are none and why.
Devices a VM point cannot carry (VUSBs: the snapshot is refused; vGPUs, PCI passthrough:
bound to one host's hardware) are listed under ``not_captured``.
"""

from __future__ import annotations

from xencbt_core.errors import XapiError

from ..repo.vmpoints import FORMAT, FROM_LIVE_VM, FROM_NOWHERE, FROM_SNAPSHOT
from .facade import NULL_REF, PoolApi

# VM fields restore-vm gives VM.create (ocaml/idl/datamodel_vm.ml names).
VM_FIELDS = (
    "name_label",
    "name_description",
    "user_version",
    "VCPUs_max",
    "VCPUs_at_startup",
    "VCPUs_params",
    "memory_static_max",
    "memory_dynamic_max",
    "memory_dynamic_min",
    "memory_static_min",
    "actions_after_shutdown",
    "actions_after_reboot",
    "actions_after_crash",
    "platform",
    "HVM_boot_policy",
    "HVM_boot_params",
    "HVM_shadow_multiplier",
    "PV_args",
    "PV_bootloader",
    "PV_bootloader_args",
    "PV_kernel",
    "PV_ramdisk",
    "PV_legacy_args",
    "PCI_bus",
    "recommendations",
    "bios_strings",
    "NVRAM",
    "tags",
    "other_config",
    "xenstore_data",
    "has_vendor_device",
    "domain_type",
    "actions_after_softreboot",
    "hardware_platform_version",
    "reference_label",
    "order",
    "start_delay",
    "shutdown_delay",
)
# Fields a VM snapshot does not copy (xapi_vm_clone.ml copy_vm_record resets them: an
# appliance's boot order and delays belong to the VM, not to its snapshots): read from
# the live VM, right after the snapshot, as a unique vTPM's contents are.
FROM_LIVE = ("order", "start_delay", "shutdown_delay")
# other_config:pci asks for a host's PCI device at start (passthrough): it is named in
# not_captured instead, since the restored VM may be on another host or pool.
PCI_KEY = "pci"
# other_config keys that belong to one VM instance, not to its configuration.
DROP_OTHER_CONFIG = ("mac_seed", "xencbt-restore", "import_task", "mac_seed_", PCI_KEY)
VBD_FIELDS = ("userdevice", "bootable", "mode", "type", "empty", "unpluggable", "other_config")
VBD_FIELDS += ("qos_algorithm_type", "qos_algorithm_params")
VDI_FIELDS = ("name_label", "name_description", "virtual_size", "sharable", "read_only")
VDI_FIELDS += ("other_config",)
VIF_FIELDS = ("device", "MAC", "MTU", "locking_mode", "ipv4_allowed", "ipv6_allowed")
VIF_FIELDS += ("other_config", "qos_algorithm_type", "qos_algorithm_params")


def capture(pool: PoolApi, snap_vm: str, live_name: str, live_vm: str | None = None) -> dict:
    """The configuration of the VM whose snapshot is ``snap_vm``, as plain records; its
    unique vTPM's contents from ``live_vm`` (read now: call this right after the
    snapshot)."""
    call = pool.call
    rec = call("VM.get_record", snap_vm)
    vm = {k: rec[k] for k in VM_FIELDS if k in rec}
    vm["name_label"] = live_name  # the snapshot's own name is ours
    if live_vm is not None:
        vm.update({k: call("VM.get_%s" % k, live_vm) for k in FROM_LIVE})
    vm["other_config"] = {
        k: v for k, v in rec.get("other_config", {}).items() if k not in DROP_OTHER_CONFIG
    }
    vbds, vdis = [], {}
    for ref in rec["VBDs"]:
        vbd = call("VBD.get_record", ref)
        row = {k: vbd[k] for k in VBD_FIELDS if k in vbd}
        row["vdi_uuid"] = None
        if vbd["VDI"] != NULL_REF and vbd["type"] == "Disk":
            vdi = call("VDI.get_record", vbd["VDI"])
            uuid = vdi["snapshot_of"] and call("VDI.get_uuid", vdi["snapshot_of"])
            row["vdi_uuid"] = uuid  # the live disk: the chain's name in the repository
            vdis[uuid] = {k: vdi[k] for k in VDI_FIELDS if k in vdi}
            # A disk's snapshot need not carry its other_config: the live disk's, now.
            vdis[uuid]["other_config"] = call("VDI.get_other_config", vdi["snapshot_of"])
            vdis[uuid]["SR"] = call("SR.get_uuid", vdi["SR"])
        elif vbd["VDI"] != NULL_REF:  # a CD drive holding an ISO: not copied, named
            iso = call("VDI.get_record", vbd["VDI"])
            row["iso"] = {"uuid": iso["uuid"], "name_label": iso["name_label"]}
        vbds.append(row)
    vifs = [vif_record(pool, ref) for ref in rec.get("VIFs", [])]
    vtpms = [vtpm_record(pool, ref, live_vm) for ref in rec.get("VTPMs", [])]
    return {
        "format": FORMAT,
        "vm": vm,
        "vbds": vbds,
        "vdis": vdis,
        "vifs": vifs,
        "vtpms": vtpms,
        "not_captured": not_captured(pool, rec, live_vm),
    }


def vtpm_record(pool: PoolApi, ref: str, live_vm: str | None) -> dict:
    """A vTPM of the snapshot: a non-unique one carries its contents (xapi copied them);
    a unique one's copy is blank (xapi_vtpm.ml copy), so they are read from the live VM's
    vTPM, a moment after the snapshot was taken."""
    call = pool.call
    unique = bool(call("VTPM.get_is_unique", ref))
    if not unique:
        return {
            "is_unique": False,
            "contents": call("VTPM.get_contents", ref),
            "contents_from": FROM_SNAPSHOT,
        }
    why = "the live VM was not given"
    if live_vm is not None:
        try:
            live = call("VM.get_VTPMs", live_vm)
            if len(live) == 1:
                contents = call("VTPM.get_contents", live[0])
                return {"is_unique": True, "contents": contents, "contents_from": FROM_LIVE_VM}
            why = "the live VM has %d vTPMs" % len(live)
        except XapiError as e:  # e.g. RBAC_PERMISSION_DENIED: get_contents is root only
            why = "VTPM.get_contents of the live VM failed: %s" % e.code
    return {"is_unique": True, "contents": "", "contents_from": FROM_NOWHERE, "why": why}


def not_captured(pool: PoolApi, rec: dict, live_vm: str | None = None) -> list[str]:
    """What the VM has that a VM point does not carry, one phrase each: vGPUs, PCI
    devices (attached to the live VM, or asked for by other_config:pci)."""
    call = pool.call
    out = []
    vgpus = rec.get("VGPUs", []) if live_vm is None else call("VM.get_VGPUs", live_vm)
    if live_vm is not None:
        for ref in call("VM.get_attached_PCIs", live_vm):
            pci = call("PCI.get_record", ref)
            out.append(
                "PCI device %s (%s %s) passed through (a host's device; pass it through "
                "again where there is one)"
                % (pci.get("pci_id", ""), pci.get("vendor_name", ""), pci.get("device_name", ""))
            )
    for ref in vgpus:
        try:
            kind = call("VGPU_type.get_model_name", call("VGPU.get_type", ref))
        except XapiError:
            kind = "vGPU"
        out.append("vGPU %s (bound to a host's GPU; add it again: xe vgpu-create)" % kind)
    pci = rec.get("other_config", {}).get(PCI_KEY)
    if pci:
        out.append(
            "PCI passthrough other_config:pci=%s (a host's device; set it again where "
            "that device is)" % pci
        )
    return out


def vif_record(pool: PoolApi, ref: str) -> dict:
    call = pool.call
    vif = call("VIF.get_record", ref)
    row = {k: vif[k] for k in VIF_FIELDS if k in vif}
    net = call("network.get_record", vif["network"])
    vlans = {int(call("PIF.get_VLAN", p)) for p in net.get("PIFs", [])}
    row["network"] = {
        "uuid": net["uuid"],
        "name_label": net["name_label"],
        "bridge": net.get("bridge", ""),
        "MTU": int(net.get("MTU", 1500)),
        "VLAN": max(vlans) if vlans else -1,
    }
    return row
