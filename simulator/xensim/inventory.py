"""The pool a new state dir starts with: hosts, SR, networks, demo VMs and their disks.

Shape of a small real pool: host0 is the master; one ``ext`` SR (shared when there are
several hosts, a PBD per host: a simplification, local SRs are per host in reality) or,
with ``--srs local``, one SR per host plugged on it alone; a management network and a
dedicated "NBD network", each with a PIF carrying an IP on every host (the NBD PIFs also
carry IPv6 addresses, as a dual-stack pool's do); dom0 control-domain VMs, which clients
must filter out.
"""

from __future__ import annotations

import base64
import os
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from . import disks, records, vm_bios, vm_devices
from .database import Database


@dataclass
class HostSpec:
    name: str
    address: str
    cert_pem: str
    subject: str


SR_SIZE = 1 << 40
HOST_MEMORY = 256 << 30  # each host's Host_metrics.memory_total (vm_placement.py memory checks)
HOST_CPUS = 32
ISO_SIZE = 631 << 20  # the ISO in the library's SR (sparse here)
ISO_NAME = "debian-12.7.0-amd64-netinst.iso"

# A licensed pool: every flag present and "false" (xapi-types features.ml: a missing flag
# restricts, e.g. xapi_vtpm.ml assert_not_restricted wants restrict_vtpm = "false").
LICENSED = {"restrict_cbt": "false", "restrict_vtpm": "false", "restrict_vif_locking": "false"}

# What an OEM server's SMBIOS gives host.bios_strings (dmidecode), and so the VM.bios_strings
# of a VM made from an OEM template (VM.copy_bios_strings, xapi_vm_helpers.ml): vendor
# strings, and type 11 OEM strings that no VM.set_bios_strings can write back
# (constants.ml settable_vm_bios_string_keys has no oem-* nor hp-rombios).
OEM_BIOS_STRINGS = {
    "bios-vendor": "Dell Inc.",
    "bios-version": "1.13.2",
    "system-manufacturer": "Dell Inc.",
    "system-product-name": "PowerEdge R650",
    "system-version": "",
    "system-serial-number": "5XK7Q33",
    "baseboard-manufacturer": "Dell Inc.",
    "baseboard-product-name": "0PJPW3",
    "baseboard-version": "A04",
    "baseboard-serial-number": ".5XK7Q33.CNFCP0023100F7.",
    "baseboard-asset-tag": "",
    "baseboard-location-in-chassis": "",
    "enclosure-asset-tag": "",
    "hp-rombios": "",
    "oem-1": "Dell System",
    "oem-2": "5[0000]",
    "oem-3": "14[1]",
}


def build(
    db: Database,
    state_dir: Path,
    hosts: list[HostSpec],
    vm_count: int,
    disk_sizes: list[int],
    nbd_purpose: str,
    srs: str = "shared",
    oem_vm: bool = False,
) -> None:
    host_refs = [
        db.add("host", records.host(h.name, h.address, h.cert_pem, h.subject)) for h in hosts
    ]
    for ref in host_refs:
        db.get("host", ref).update(
            bios_strings=dict(OEM_BIOS_STRINGS), _memory_total=HOST_MEMORY, _cpu_count=HOST_CPUS
        )
    if srs == "local":
        placement = _local_srs(db, host_refs, hosts)
    else:
        sr_ref = db.add("SR", records.sr("Local storage", len(hosts) > 1, SR_SIZE))
        for ref in host_refs:
            db.add("PBD", records.pbd(ref, sr_ref))
        placement = [(host_refs[0], sr_ref)]
    pool = db.add("pool", records.pool(host_refs[0], placement[0][1]))
    db.get("pool", pool)["restrictions"] = dict(LICENSED)
    purpose = [] if nbd_purpose == "none" else [nbd_purpose]
    mgmt = db.add(
        "network", records.network("Pool-wide network associated with eth0", "xenbr0", [])
    )
    nbd = db.add("network", records.network("NBD network", "xenbr1", purpose))
    for index, (ref, spec) in enumerate(zip(host_refs, hosts)):
        db.add("PIF", records.pif(ref, mgmt, "eth0", spec.address, management=True))
        nbd_pif = records.pif(ref, nbd, "eth1", spec.address, management=False)
        nbd_pif.update(IPv6=ipv6_addresses(index), ipv6_configuration_mode="Static")
        db.add("PIF", nbd_pif)
        dom0 = records.vm(f"Control domain on host: {spec.name}", control_domain=True)
        dom0["resident_on"] = ref
        db.add("VM", dom0)
    for i in range(vm_count):
        host, sr_ref = placement[i % len(placement)]
        name = "demo-vm" if i == 0 else f"demo-vm-{i + 1}"
        vm_ref = _demo_vm(db, state_dir, name, sr_ref, disk_sizes, host)
        # demo-vm: a VIF on each network and a unique vTPM (a UEFI guest); the others
        # one VIF.
        _devices(db, vm_ref, [mgmt, nbd] if i == 0 else [mgmt], vtpm=i == 0)
    if oem_vm:
        host, sr_ref = placement[0]
        vm_ref = _demo_vm(db, state_dir, "oem-vm", sr_ref, disk_sizes[:1], host)
        _devices(db, vm_ref, [mgmt], vtpm=True)
        _oem_with_cd(db, vm_ref, host, _iso_library(db, state_dir, host_refs))


def _devices(db: Database, vm_ref: str, networks: list[str], vtpm: bool) -> None:
    vm = db.get("VM", vm_ref)
    seed = vm["other_config"]["mac_seed"]
    for device, net in enumerate(networks):
        vif = records.vif(vm_ref, net, str(device), vm_devices.gen_mac(device, seed))
        vif["currently_attached"] = True
        db.add("VIF", vif)
    if vtpm:
        vm["HVM_boot_params"] = {"firmware": "uefi", "order": "dc"}
        vm["platform"]["secureboot"] = "true"
        vm["NVRAM"] = {"EFI-variables": base64.b64encode(os.urandom(96)).decode()}
        contents = base64.b64encode(os.urandom(64)).decode()
        db.add("VTPM", records.vtpm(vm_ref, True, contents))


def _iso_library(db: Database, state_dir: Path, host_refs: list[str]) -> str:
    """An ISO library: a shared SR of type iso (an NFS or SMB ISO SR, a PBD plugged on
    every host) holding one installer ISO.  Returns the ISO's VDI."""
    sr = records.sr("ISO library", True, 64 << 30)
    sr.update(type="iso", content_type="iso")
    sr_ref = db.add("SR", sr)
    for ref in host_refs:
        db.add("PBD", records.pbd(ref, sr_ref))
    vdi = records.vdi(ISO_NAME, sr_ref, ISO_SIZE)
    vdi.update(location=ISO_NAME, name_description="Debian installer")
    vdi_ref = db.add("VDI", vdi)
    disks.create(state_dir, vdi["uuid"], ISO_SIZE)
    return vdi_ref


def _oem_with_cd(db: Database, vm_ref: str, host: str, iso_vdi: str) -> None:
    """``--oem-vm``: a VM made from an OEM template: VM.copy_bios_strings gave it the host's strings
    and made the host its affinity (xapi_vm_helpers.ml copy_bios_strings); its CD drive
    (userdevice 3, the installer's default) holds the ISO, read-only as every CD VBD
    (xapi_vbd.ml create: VBD_CDS_MUST_BE_READONLY)."""
    vm = db.get("VM", vm_ref)
    vm.update(bios_strings=dict(OEM_BIOS_STRINGS), affinity=host)
    used = {int(db.get("VBD", v)["userdevice"]) for v in db.find("VBD", VM=vm_ref)}
    cd = records.vbd(vm_ref, iso_vdi, str(max(3, max(used, default=-1) + 1)), mode="RO")
    cd.update(type="CD", bootable=False, currently_attached=True)
    db.add("VBD", cd)


def ipv6_addresses(index: int) -> list[str]:
    """A dual-stack NBD PIF's PIF.IPv6: a global address and the link-local one, in CIDR
    form as xapi stores them.  xapi-nbd listens on IPv4 only, so neither answers NBD; the
    global one is from the documentation prefix (RFC 3849) so that nothing answers it."""
    return [f"2001:db8::{index + 1:x}/64", f"fe80::{index + 1:x}/64"]


def _local_srs(db: Database, host_refs: list[str], hosts: list[HostSpec]) -> list[tuple]:
    """``--srs local``: each host has its own SR, plugged on it alone, as real local
    storage is, and VMs are placed round-robin over the hosts; ``get_nbd_info`` of a VM's
    disks then names only its host, so a pool's NBD load spreads over the hosts.
    Returns (host, SR) per host."""
    placement = []
    for ref, spec in zip(host_refs, hosts):
        local = db.add("SR", records.sr(f"Local storage on {spec.name}", False, SR_SIZE))
        db.add("PBD", records.pbd(ref, local))
        placement.append((ref, local))
    return placement


def _demo_vm(
    db: Database, state_dir: Path, name: str, sr_ref: str, sizes: list[int], host: str
) -> str:
    vm = records.vm(name)
    vm.update(
        resident_on=host,
        name_description="A simulated guest",
        VCPUs_max=4,
        VCPUs_at_startup=2,
        memory_static_max=2 << 30,
        memory_dynamic_max=2 << 30,
        memory_dynamic_min=1 << 30,
        memory_static_min=512 << 20,
        platform={"acpi": "1", "apic": "true", "pae": "true", "viridian": "true", "nx": "true"},
        # what VM.start gave it at first boot (xapi_vm_helpers.ml
        # consider_generic_bios_strings)
        bios_strings=dict(vm_bios.GENERIC_BIOS_STRINGS),
        tags=["demo"],
        other_config={
            "mac_seed": str(uuidlib.uuid4()),
            "base_template_name": "Other install media",
        },
    )
    vm_ref = db.add("VM", vm)
    for device, size in enumerate(sizes):
        vdi = records.vdi(f"{name} disk {device}", sr_ref, size)
        vdi_ref = db.add("VDI", vdi)
        disks.create(state_dir, vdi["uuid"], size)
        if device == 0:  # the boot disk: a guest that boots (guest_boot.py)
            disks.write_boot_sector(state_dir, vdi["uuid"])
        vbd = records.vbd(vm_ref, vdi_ref, str(device))
        vbd["currently_attached"] = True
        db.add("VBD", vbd)
    return vm_ref
