"""Create records as a real client must send them: every constructor field that xapi's
datamodel gives no default (VM 25, VDI 6, VBD 10, VIF 8; REFERENCE §9), or xapi's
dispatcher answers INTERNAL_ERROR Dispatcher_FieldNotFound, as xensim does."""

from __future__ import annotations

NULL = "OpaqueRef:NULL"
GIB = 1 << 30


def vm(**fields) -> dict:
    """A plain HVM guest: 1 GiB (dynamic 512 MiB), 2 VCPUs (1 at startup)."""
    return {
        "name_label": "built",
        "name_description": "",
        "user_version": "1",
        "is_a_template": False,
        "affinity": NULL,
        "memory_target": str(GIB),
        "memory_static_max": str(GIB),
        "memory_dynamic_max": str(GIB),
        "memory_dynamic_min": str(512 << 20),
        "memory_static_min": str(256 << 20),
        "VCPUs_params": {},
        "VCPUs_max": "2",
        "VCPUs_at_startup": "1",
        "actions_after_shutdown": "destroy",
        "actions_after_reboot": "restart",
        "actions_after_crash": "restart",
        "PV_bootloader": "",
        "PV_kernel": "",
        "PV_ramdisk": "",
        "PV_args": "",
        "PV_bootloader_args": "",
        "PV_legacy_args": "",
        "HVM_boot_policy": "BIOS order",
        "HVM_boot_params": {"order": "cd"},
        "platform": {},
        "PCI_bus": "",
        "other_config": {},
        "recommendations": "",
        **fields,
    }


def vdi(sr: str, size: int, name: str = "scratch", **fields) -> dict:
    return {
        "name_label": name,
        "name_description": "",
        "SR": sr,
        "virtual_size": str(size),
        "type": "user",
        "sharable": False,
        "read_only": False,
        "other_config": {},
        **fields,
    }


def vbd(vm: str, vdi: str, userdevice: str, **fields) -> dict:
    return {
        "VM": vm,
        "VDI": vdi,
        "userdevice": userdevice,
        "bootable": False,
        "mode": "RW",
        "type": "Disk",
        "empty": False,
        "other_config": {},
        "qos_algorithm_type": "",
        "qos_algorithm_params": {},
        **fields,
    }


def cd_drive(vm: str, userdevice: str, **fields) -> dict:
    """An empty CD drive (xapi_vbd.ml: CDs are read-only)."""
    return vbd(vm, NULL, userdevice, type="CD", mode="RO", empty=True, **fields)


def vif(vm: str, network: str, device: str, **fields) -> dict:
    """MAC "" asks xapi to generate one from the VM's mac_seed."""
    return {
        "device": device,
        "network": network,
        "VM": vm,
        "MAC": "",
        "MTU": "1500",
        "other_config": {},
        "qos_algorithm_type": "",
        "qos_algorithm_params": {},
        **fields,
    }
