"""Fresh records for each class, with the fields the real API has (the ones clients read).

Reverse links (VBDs, snapshots, PIFs, …) are computed by the database, not stored.
"""

from __future__ import annotations

import time
import uuid as uuidlib

from . import datamodel
from .database import NULL_REF

API_VERSION = (2, 21)


def now_stamp() -> str:
    """xapi's DateTime text form, e.g. 20261121T10:00:00Z."""
    return time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime())


def new(cls: str, **values: object) -> dict:
    """A record of ``cls`` with every field the datamodel publishes (its defaults, see
    datamodel.py), a fresh uuid, then ``values``."""
    rec = datamodel.record(cls)
    rec["uuid"] = str(uuidlib.uuid4())
    rec.update(values)
    return rec


def _base(cls: str, name_label: str = "", name_description: str = "") -> dict:
    return new(cls, name_label=name_label, name_description=name_description)


def pool(master: str, default_sr: str) -> dict:
    return {
        **_base("pool"),
        "master": master,
        "default_SR": default_sr,
        # licence: {"restrict_cbt": "true"} on an unlicensed pool
        "restrictions": {},
    }


def host(name: str, address: str, cert: str, subject: str = "") -> dict:
    return {
        **_base("host", name, "Simulated XenServer host"),
        "hostname": name,
        "address": address,
        "enabled": True,
        "API_version_major": API_VERSION[0],
        "API_version_minor": API_VERSION[1],
        "API_version_vendor": "XenSource",
        "software_version": {"product_brand": "XenServer", "product_version": "8.4.0"},
        "_certificate": cert,
        "_subject": subject or name,
    }


def network(name: str, bridge: str, purpose: list[str]) -> dict:
    return {
        **_base("network", name),
        "bridge": bridge,
        "MTU": 1500,
        "managed": True,
        "purpose": purpose,
    }


def pif(host_ref: str, network_ref: str, device: str, ip: str, management: bool) -> dict:
    return new(
        "PIF",
        device=device,
        host=host_ref,
        network=network_ref,
        IP=ip,
        IPv6=[],  # CIDR form, e.g. "fd00::5/64"; link-local addresses too
        ipv6_configuration_mode="None",
        primary_address_type="IPv4",
        netmask="255.0.0.0",
        ip_configuration_mode="Static",
        management=management,
        physical=True,
        currently_attached=True,
        MTU=1500,
        VLAN=-1,  # datamodel_pif.ml: -1 on a physical PIF
    )


def sr(name: str, shared: bool, size: int) -> dict:
    return {
        **_base("SR", name),
        "type": "ext",
        "content_type": "user",
        "shared": shared,
        "physical_size": size,
    }


def pbd(host_ref: str, sr_ref: str) -> dict:
    return new("PBD", host=host_ref, SR=sr_ref, currently_attached=True)


def vm(name: str, power_state: str = "Running", control_domain: bool = False) -> dict:
    return {
        **_base("VM", name),
        "power_state": power_state,
        "is_control_domain": control_domain,
        "domid": 0 if control_domain or power_state == "Running" else -1,
        **vm_config(),
    }


def vm_config() -> dict:
    """The configuration fields of a VM record, as xen-api ``ocaml/idl/datamodel_vm.ml``
    names them (defaults of a plain HVM guest; a real VM.create requires most of them)."""
    return {
        "user_version": 1,
        "VCPUs_max": 1,
        "VCPUs_at_startup": 1,
        "VCPUs_params": {},
        "memory_static_max": 1 << 30,
        "memory_dynamic_max": 1 << 30,
        "memory_dynamic_min": 1 << 30,
        "memory_static_min": 1 << 30,
        "actions_after_shutdown": "destroy",
        "actions_after_reboot": "restart",
        "actions_after_crash": "restart",
        "platform": {},
        "HVM_boot_policy": "BIOS order",
        "HVM_boot_params": {"order": "cd"},
        "HVM_shadow_multiplier": 1.0,
        "PV_args": "",
        "PV_bootloader": "",
        "PV_bootloader_args": "",
        "PV_kernel": "",
        "PV_ramdisk": "",
        "PV_legacy_args": "",
        "PCI_bus": "",
        "recommendations": "",
        "affinity": NULL_REF,
        "bios_strings": {},
        "NVRAM": {},
        "tags": [],
        "blocked_operations": {},
        "xenstore_data": {},
        "has_vendor_device": False,
        "domain_type": "hvm",
        "ha_always_run": False,
        "ha_restart_priority": "",
    }


def vif(vm_ref: str, network_ref: str, device: str, mac: str) -> dict:
    return new("VIF", VM=vm_ref, network=network_ref, device=device, MAC=mac, MTU=1500)


def vtpm(vm_ref: str, is_unique: bool, contents: str) -> dict:
    """datamodel_vtpm.ml: ``contents`` is internal_only (a secret ref in xapi), so it is
    kept as ``_contents`` here and never leaves the server but through VTPM.get_contents."""
    return new("VTPM", VM=vm_ref, is_unique=is_unique, _contents=contents)


def vbd(vm_ref: str, vdi_ref: str, userdevice: str, mode: str = "RW") -> dict:
    return new(
        "VBD",
        VM=vm_ref,
        VDI=vdi_ref,
        userdevice=userdevice,
        device=f"xvd{chr(ord('a') + int(userdevice))}" if userdevice.isdigit() else "",
        bootable=userdevice == "0",
        mode=mode,
        type="Disk",
        unpluggable=True,
    )


def vdi(name: str, sr_ref: str, size: int) -> dict:
    rec = _base("VDI", name)
    return {
        **rec,
        "SR": sr_ref,
        "virtual_size": size,
        "type": "user",
        "managed": True,
        "location": rec["uuid"],
        "on_boot": "persist",
    }


def task(name: str) -> dict:
    return {
        **_base("task", name),
        "status": "pending",
        "created": now_stamp(),
        "type": "<none/>",
    }


def field_names(cls: str) -> list[str]:
    """The fields a record of ``cls`` publishes (datamodel.py): get_<field> exists for each."""
    return list(datamodel.fields(cls))
