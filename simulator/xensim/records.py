"""Fresh records for each class, with the fields the real API has (the ones clients read).

Reverse links (VBDs, snapshots, PIFs, …) are computed by the database, not stored.
"""

from __future__ import annotations

import time
import uuid as uuidlib

from . import datamodel
from .database import NULL_REF, REVERSE

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


def _base(name_label: str = "", name_description: str = "") -> dict:
    return {
        "uuid": str(uuidlib.uuid4()),
        "name_label": name_label,
        "name_description": name_description,
        "other_config": {},
    }


def pool(master: str, default_sr: str) -> dict:
    return {
        **_base(""),
        "master": master,
        "default_SR": default_sr,
        "suspend_image_SR": NULL_REF,
        "restrictions": {},  # licence: {"restrict_cbt": "true"} on an unlicensed pool
    }


def host(name: str, address: str, cert: str, subject: str = "") -> dict:
    return {
        **_base(name, "Simulated XenServer host"),
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
    return {**_base(name), "bridge": bridge, "MTU": 1500, "managed": True, "purpose": purpose}


def pif(host_ref: str, network_ref: str, device: str, ip: str, management: bool) -> dict:
    return {
        **_base(),
        "device": device,
        "host": host_ref,
        "network": network_ref,
        "IP": ip,
        "IPv6": [],  # CIDR form, e.g. "fd00::5/64"; link-local addresses too
        "ipv6_configuration_mode": "None",
        "primary_address_type": "IPv4",
        "netmask": "255.0.0.0",
        "gateway": "",
        "ip_configuration_mode": "Static",
        "management": management,
        "physical": True,
        "currently_attached": True,
        "MAC": "",
        "VLAN": -1,  # datamodel_pif.ml: -1 on a physical PIF
    }


def sr(name: str, shared: bool, size: int) -> dict:
    return {
        **_base(name),
        "type": "ext",
        "content_type": "user",
        "shared": shared,
        "physical_size": size,
        "physical_utilisation": 0,
        "virtual_allocation": 0,
        "sm_config": {},
    }


def pbd(host_ref: str, sr_ref: str) -> dict:
    return {
        "uuid": str(uuidlib.uuid4()),
        "host": host_ref,
        "SR": sr_ref,
        "device_config": {},
        "currently_attached": True,
        "other_config": {},
    }


def vm(name: str, power_state: str = "Running", control_domain: bool = False) -> dict:
    return {
        **_base(name),
        "power_state": power_state,
        "is_a_template": False,
        "is_control_domain": control_domain,
        "is_a_snapshot": False,
        "snapshot_of": NULL_REF,
        "snapshot_time": "19700101T00:00:00Z",
        "resident_on": NULL_REF,
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
    """datamodel_vif.ml fields clients read (and VIF.create takes)."""
    return {
        "uuid": str(uuidlib.uuid4()),
        "VM": vm_ref,
        "network": network_ref,
        "device": device,
        "MAC": mac,
        "MAC_autogenerated": False,
        "MTU": 1500,
        "currently_attached": False,
        "locking_mode": "network_default",
        "ipv4_allowed": [],
        "ipv6_allowed": [],
        "qos_algorithm_type": "",
        "qos_algorithm_params": {},
        "other_config": {},
    }


def vtpm(vm_ref: str, is_unique: bool, contents: str) -> dict:
    """datamodel_vtpm.ml: ``contents`` is internal_only (a secret ref in xapi), so it is
    kept as ``_contents`` here and never leaves the server but through VTPM.get_contents."""
    return {
        "uuid": str(uuidlib.uuid4()),
        "VM": vm_ref,
        "backend": NULL_REF,
        "persistence_backend": "xapi",
        "is_unique": is_unique,
        "is_protected": False,
        "allowed_operations": [],
        "current_operations": {},
        "_contents": contents,
    }


def vbd(vm_ref: str, vdi_ref: str, userdevice: str, mode: str = "RW") -> dict:
    return {
        "uuid": str(uuidlib.uuid4()),
        "VM": vm_ref,
        "VDI": vdi_ref,
        "userdevice": userdevice,
        "device": f"xvd{chr(ord('a') + int(userdevice))}" if userdevice.isdigit() else "",
        "bootable": userdevice == "0",
        "mode": mode,
        "type": "Disk",
        "empty": False,
        "unpluggable": True,
        "currently_attached": False,
        "other_config": {},
    }


def vdi(name: str, sr_ref: str, size: int) -> dict:
    uuid = str(uuidlib.uuid4())
    return {
        **_base(name),
        "uuid": uuid,
        "SR": sr_ref,
        "virtual_size": size,
        "physical_utilisation": 0,
        "type": "user",
        "sharable": False,
        "read_only": False,
        "managed": True,
        "missing": False,
        "location": uuid,
        "is_a_snapshot": False,
        "snapshot_of": NULL_REF,
        "snapshot_time": "19700101T00:00:00Z",
        "cbt_enabled": False,
        "sm_config": {},
        "xenstore_data": {},
        "on_boot": "persist",
        "allow_caching": False,
        "is_tools_iso": False,
    }


def task(name: str) -> dict:
    return {
        **_base(name),
        "status": "pending",
        "progress": 0.0,
        "result": "",
        "error_info": [],
        "created": now_stamp(),
        "finished": "19700101T00:00:00Z",
        "type": "<none/>",
        "resident_on": NULL_REF,
    }


_TEMPLATES = {
    "pool": lambda: pool(NULL_REF, NULL_REF),
    "host": lambda: host("", "", ""),
    "network": lambda: network("", "", []),
    "PIF": lambda: pif(NULL_REF, NULL_REF, "", "", False),
    "SR": lambda: sr("", False, 0),
    "PBD": lambda: pbd(NULL_REF, NULL_REF),
    "VM": lambda: vm(""),
    "VBD": lambda: vbd(NULL_REF, NULL_REF, "0"),
    "VDI": lambda: vdi("", NULL_REF, 0),
    "task": lambda: task(""),
    "VIF": lambda: vif(NULL_REF, NULL_REF, "0", ""),
    "VTPM": lambda: vtpm(NULL_REF, False, ""),
}

DATETIME_FIELDS = {"snapshot_time", "created", "finished"}


def field_names(cls: str) -> set[str]:
    names = {k for k in _TEMPLATES[cls]() if not k.startswith("_")}
    return names | {name for (owner, name) in REVERSE if owner == cls}
