"""Create records as a real client must send them: every constructor field that xapi's
datamodel gives no default (VDI 6, VBD 10; REFERENCE §9), or xapi's dispatcher answers
INTERNAL_ERROR Dispatcher_FieldNotFound, as xensim does."""

from __future__ import annotations

NULL = "OpaqueRef:NULL"


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
