"""Storage operations: VDIs, VBDs and the VM operations that touch disks.

Data files and CBT logs change under each VDI's cross-process lock (``disks.locked``),
metadata under the database lock held by the caller (``Xapi.call``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from pathlib import Path

from . import cbtlog, disks, records
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
        # Opt-in fault (control API ``faults/import``): every HTTP import fails its write
        # once it has written this many bytes.
        self.fail_imports_after: int | None = None

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
        # xen-api ocaml/xapi/xapi_vdi.ml _data_destroy: the VDI is tentatively marked
        # cbt_metadata while xapi waits for its VBDs to go, and set back if they stay:
        # for those seconds every reader sees a VDI without data.
        old_type, rec["type"] = rec["type"], "cbt_metadata"
        try:
            self._wait_unplugged(ref)
        except XapiError:
            rec["type"] = old_type
            raise
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

    # -- SR space and HTTP imports -----------------------------------------------------
    def hosts_seeing(self, sr_ref: str) -> list[str]:
        """The hosts with a PBD of the SR currently attached (xen-api
        ``ocaml/xapi/xapi_vm_helpers.ml`` ``assert_can_see_specified_SRs``)."""
        pbds = [self.db.get("PBD", ref) for ref in self.db.find("PBD", SR=sr_ref)]
        return sorted(p["host"] for p in pbds if p["currently_attached"])

    def sr_usage(self, sr_ref: str) -> int:
        """Bytes the SR's VDIs really take (thin ``ext`` SR: allocated blocks only)."""
        vdis = [self.vdi(ref)["uuid"] for ref in self.db.find("VDI", SR=sr_ref)]
        return sum(disks.allocated(self.state_dir, uuid) for uuid in vdis)

    def update_sr_usage(self, ref: str) -> None:
        self.db.get("SR", ref)["physical_utilisation"] = self.sr_usage(ref)

    def set_sr_size(self, sr_ref: str, size: int) -> dict:
        """Control API: shrink (or grow) the SR's ``physical_size`` so it can fill up."""
        sr = self.db.get("SR", sr_ref)
        sr["physical_size"] = int(size)
        sr["physical_utilisation"] = self.sr_usage(sr_ref)
        return {"physical_size": sr["physical_size"], "used": sr["physical_utilisation"]}

    def import_write(self, rec: dict, fd: int, data: bytes, offset: int, done: int) -> int:
        """One write of an HTTP import (``done`` bytes written before it), marking CBT like
        a guest write.  An ``ext`` SR is thin: a write needing more blocks than the SR has
        left fails ENOSPC, as the host's file system would, and nothing of it is written.
        Locks: the database's, then the VDI's (the order VM.snapshot takes them)."""
        limit = self.fail_imports_after
        if limit is not None and done + len(data) > limit:
            self._write_marked(rec, fd, data[: max(0, limit - done)], offset)
            raise OSError(errno.EIO, "injected import fault after %d bytes" % limit)
        with self.db.lock:
            sr = self.db.get("SR", rec["SR"])
            used = self.sr_usage(rec["SR"])
            needed = len(data) - _allocated_in(fd, offset, len(data))
            if used + needed > sr["physical_size"]:
                sr["physical_utilisation"] = used
                raise OSError(errno.ENOSPC, "no space left on SR %s" % sr["uuid"])
            written = self._write_marked(rec, fd, data, offset)
            sr["physical_utilisation"] = used + needed
        return written

    def _write_marked(self, rec: dict, fd: int, data: bytes, offset: int) -> int:
        if not data:
            return 0
        with disks.locked(self.state_dir, rec["uuid"]):
            written = os.pwrite(fd, data, offset)
            cbtlog.mark(self.state_dir, rec["uuid"], offset, written)
        return written

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
    def snapshot_vm(self, vm_ref: str, name: str) -> str:
        """One snapshot VDI per disk, all taken while every disk's lock is held so the
        set is crash-consistent across the VM's disks."""
        vm = self.db.get("VM", vm_ref)
        if vm["is_control_domain"] or vm["is_a_snapshot"]:
            raise XapiError("OPERATION_NOT_ALLOWED", "VM cannot be snapshotted")
        vbds = [(r, self.db.get("VBD", r)) for r in self.db.find("VBD", VM=vm_ref)]
        disks_ = [(r, v) for r, v in vbds if v["type"] == "Disk" and v["VDI"] != NULL_REF]
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


def _allocated_in(fd: int, offset: int, length: int) -> int:
    """Bytes of [offset, offset+length) already allocated in the sparse file."""
    end, total, pos = offset + length, 0, offset
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:  # ENXIO: no data after pos
            if e.errno == errno.ENXIO:
                break
            raise
        if start >= end:
            break
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        total += stop - start
        pos = stop
    return total
