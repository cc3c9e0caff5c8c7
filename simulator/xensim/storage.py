"""Storage operations: VDIs, VBDs and the VM operations that touch disks.

Data files and CBT logs change under each VDI's cross-process lock (``disks.locked``),
metadata under the database lock held by the caller (``Xapi.call``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from . import disks, records
from .cbt import Tracker
from .database import NULL_REF, Database
from .errors import XapiError, sr_backend_failure

log = logging.getLogger(__name__)

VHD_BLOCK = 2 * 1024 * 1024  # sm rounds VHD-based (ext) VDI sizes up to this


def vhd_size(size: int) -> int:
    return max(VHD_BLOCK, -(-size // VHD_BLOCK) * VHD_BLOCK)


def as_int(value: object, name: str) -> int:
    """XML-RPC clients send 64-bit ints as strings; accept both."""
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise XapiError("FIELD_TYPE_ERROR", name) from None


class Storage:
    def __init__(self, db: Database, state_dir: Path, in_use_wait: float) -> None:
        self.db = db
        self.state_dir = Path(state_dir)
        self.cbt = Tracker(db, state_dir)
        self.in_use_wait = in_use_wait

    # -- helpers ------------------------------------------------------------------------
    def vdi(self, ref: str) -> dict:
        return self.db.get("VDI", ref)

    def refuse_metadata(self, ref: str) -> None:
        if self.vdi(ref)["type"] == "cbt_metadata":
            raise XapiError("VDI_INCOMPATIBLE_TYPE", ref, "cbt_metadata")

    def _vbds(self, vdi_ref: str) -> list[str]:
        return self.db.find("VBD", VDI=vdi_ref)

    def update_usage(self, ref: str) -> None:
        rec = self.vdi(ref)
        rec["physical_utilisation"] = disks.allocated(self.state_dir, rec["uuid"])

    # -- VDI ----------------------------------------------------------------------------
    def create_vdi(self, fields: dict, exact_size: bool = False) -> str:
        for name in ("SR", "virtual_size"):
            if name not in fields:
                raise XapiError("FIELD_TYPE_ERROR", name)
        self.db.get("SR", fields["SR"])
        size = as_int(fields["virtual_size"], "virtual_size")
        if size < 0:
            raise sr_backend_failure(79, "negative size")
        rec = records.vdi(str(fields.get("name_label", "")), fields["SR"], size)
        rec["virtual_size"] = size if exact_size else vhd_size(size)
        for key in ("name_description", "sharable", "read_only", "other_config", "sm_config"):
            if key in fields:
                rec[key] = fields[key]
        rec["type"] = str(fields.get("type", "user"))
        ref = self.db.add("VDI", rec)
        disks.create(self.state_dir, rec["uuid"], rec["virtual_size"])
        return ref

    def destroy_vdi(self, ref: str) -> None:
        rec = self.vdi(ref)
        if self._vbds(ref):
            raise XapiError("VDI_IN_USE", ref, "destroy")
        self.cbt.forget(ref)
        with disks.locked(self.state_dir, rec["uuid"]):
            self.db.remove("VDI", ref)
        disks.remove(self.state_dir, rec["uuid"])

    def resize(self, ref: str, size_value: object) -> None:
        self.refuse_metadata(ref)
        rec = self.vdi(ref)
        size = vhd_size(as_int(size_value, "new_size"))
        if size < rec["virtual_size"]:
            raise sr_backend_failure(79, "shrinking not allowed")
        with disks.locked(self.state_dir, rec["uuid"]):
            disks.grow(self.state_dir, rec["uuid"], size)
            self.cbt.resize(ref, size)
            rec["virtual_size"] = size

    def snapshot_vdi(self, ref: str, locked: bool = False) -> str:
        """Copy the data (sparse) and hand over the CBT log, atomically w.r.t. guest
        writes: the caller may already hold the VDI's lock (VM.snapshot holds all)."""
        self.refuse_metadata(ref)
        live = self.vdi(ref)
        snap = dict(records.vdi(live["name_label"], live["SR"], live["virtual_size"]))
        for key in ("name_description", "type", "sharable", "sm_config"):
            snap[key] = live[key]
        snap.update(is_a_snapshot=True, snapshot_of=ref, snapshot_time=records.now_stamp())
        guard = contextlib.nullcontext() if locked else disks.locked(self.state_dir, live["uuid"])
        with guard:
            snap_ref = self.db.add("VDI", snap)
            disks.copy_sparse(
                disks.data_path(self.state_dir, live["uuid"]),
                disks.data_path(self.state_dir, snap["uuid"]),
            )
            self.cbt.snapshot(ref, snap_ref)
        self.update_usage(snap_ref)
        return snap_ref

    def clone(self, ref: str) -> str:
        self.refuse_metadata(ref)
        live = self.vdi(ref)
        copy = records.vdi(live["name_label"], live["SR"], live["virtual_size"])
        copy_ref = self.db.add("VDI", copy)
        with disks.locked(self.state_dir, live["uuid"]):
            disks.copy_sparse(
                disks.data_path(self.state_dir, live["uuid"]),
                disks.data_path(self.state_dir, copy["uuid"]),
            )
        return copy_ref

    def data_destroy(self, ref: str) -> None:
        rec = self.vdi(ref)
        if not rec["is_a_snapshot"]:
            raise XapiError("OPERATION_NOT_ALLOWED", "VDI is not a snapshot")
        if not rec["cbt_enabled"]:
            raise XapiError("VDI_NO_CBT_METADATA", ref)
        if rec["type"] == "cbt_metadata":
            return
        self._wait_unplugged(ref)
        with disks.locked(self.state_dir, rec["uuid"]):
            disks.data_path(self.state_dir, rec["uuid"]).unlink(missing_ok=True)
            rec.update(type="cbt_metadata", physical_utilisation=0)

    def _wait_unplugged(self, ref: str) -> None:
        """xapi waits a few seconds for VBDs to go away before VDI_IN_USE."""
        deadline = time.monotonic() + self.in_use_wait
        while self._vbds(ref):
            left = deadline - time.monotonic()
            if left <= 0:
                raise XapiError("VDI_IN_USE", ref, "data_destroy")
            self.db.changed.wait(left)
            if not self.db.exists("VDI", ref):
                raise XapiError("HANDLE_INVALID", "VDI", ref)

    # -- VBD ----------------------------------------------------------------------------
    def create_vbd(self, fields: dict) -> str:
        for name in ("VM", "VDI", "userdevice"):
            if name not in fields:
                raise XapiError("FIELD_TYPE_ERROR", name)
        self.db.get("VM", fields["VM"])
        if fields["VDI"] != NULL_REF:
            self.refuse_metadata(fields["VDI"])
        rec = records.vbd(fields["VM"], fields["VDI"], str(fields["userdevice"]))
        for key in ("mode", "type", "bootable", "empty", "other_config", "unpluggable"):
            if key in fields:
                rec[key] = fields[key]
        return self.db.add("VBD", rec)

    def destroy_vbd(self, ref: str) -> None:
        self.db.remove("VBD", ref)

    # -- VM -----------------------------------------------------------------------------
    def snapshot_vm(self, vm_ref: str, name: str, ignore: list[str] | None = None) -> str:
        """One snapshot VDI per disk (but the ``ignore``d VDIs), all taken while every
        disk's lock is held so the set is crash-consistent across the VM's disks."""
        vm = self.db.get("VM", vm_ref)
        if vm["is_control_domain"] or vm["is_a_snapshot"]:
            raise XapiError("OPERATION_NOT_ALLOWED", "VM cannot be snapshotted")
        vbds = [(r, self.db.get("VBD", r)) for r in self.db.find("VBD", VM=vm_ref)]
        disks_ = [(r, v) for r, v in vbds if v["type"] == "Disk" and v["VDI"] != NULL_REF]
        disks_ = [(r, v) for r, v in disks_ if v["VDI"] not in (ignore or [])]
        for _, vbd in disks_:
            self.refuse_metadata(vbd["VDI"])
        uuids = sorted({self.vdi(v["VDI"])["uuid"] for _, v in disks_})
        with contextlib.ExitStack() as stack:
            for uuid in uuids:
                stack.enter_context(disks.locked(self.state_dir, uuid))
            snaps = [(vbd, self.snapshot_vdi(vbd["VDI"], locked=True)) for _, vbd in disks_]
        snap_vm = records.vm(name, power_state="Halted")
        snap_vm.update(is_a_snapshot=True, snapshot_of=vm_ref, snapshot_time=records.now_stamp())
        snap_vm_ref = self.db.add("VM", snap_vm)
        for vbd, snap_vdi in snaps:
            self.create_vbd({**vbd, "VM": snap_vm_ref, "VDI": snap_vdi})
        return snap_vm_ref

    def destroy_vm(self, vm_ref: str) -> None:
        vm = self.db.get("VM", vm_ref)
        if vm["is_control_domain"]:
            raise XapiError("OPERATION_NOT_ALLOWED", "cannot destroy a control domain")
        if not vm["is_a_snapshot"] and vm["power_state"] != "Halted":
            raise XapiError("VM_BAD_POWER_STATE", vm_ref, "halted", vm["power_state"].lower())
        for vbd in self.db.find("VBD", VM=vm_ref):
            self.db.remove("VBD", vbd)
        self.db.remove("VM", vm_ref)
