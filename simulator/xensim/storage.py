"""Storage operations: VDIs, VBDs and the VM operations that touch disks.

Data files and CBT logs change under each VDI's cross-process lock (``disks.locked``),
metadata under the database lock held by the caller (``Xapi.call``).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import logging
import os
import re
import time
from pathlib import Path

from . import cbtlog, disks, records
from .cbt import Tracker
from .database import NULL_REF, Database
from .errors import ServerError, sr_backend_failure

log = logging.getLogger(__name__)

VHD_BLOCK = 2 * 1024 * 1024
VDI_CREATE_KEEPS = ("name_description", "sharable", "read_only", "other_config", "sm_config")
VDI_CREATE_KEEPS += ("tags", "xenstore_data")  # sm rounds VHD-based (ext) VDI sizes up to this


def vhd_size(size: int) -> int:
    return max(VHD_BLOCK, -(-size // VHD_BLOCK) * VHD_BLOCK)


# xapi_vbd.ml create: the VDI types a VBD may point at
VBD_VDI_TYPES = ("system", "user", "ephemeral", "suspend", "crashdump", "metadata", "rrd")
VBD_VDI_TYPES += ("pvs_cache",)
OCAML_INT = re.compile(
    r"^[-+]?(0[xX][0-9a-fA-F][0-9a-fA-F_]*|0[oO][0-7][0-7_]*|0[bB][01][01_]*|[0-9][0-9_]*)$"
)
LINUX_DEVICE = re.compile(r"^(xvd|hd|sd)([a-z]+)([0-9]*)$")


def _letters(text: str) -> int:
    n = 0
    for ch in text:
        n = n * 26 + (ord(ch) - ord("a") + 1)
    return n - 1


def device_numbers(name: str) -> set[int]:
    """xapi_vm_helpers.ml ``possible_VBD_devices_of_string`` (Device_number.of_string,
    HVM and PV readings), reduced to the disk number: "1", "xvdb", "hdb", "sdb" are
    disk 1; "" and unparsable names are none."""
    if re.fullmatch(r"[0-9]+", name):
        return {int(name)}
    m = LINUX_DEVICE.match(name)
    return {_letters(m.group(2))} if m else set()


def valid_device(name: str, kind: str) -> bool:
    """xapi_vbd_helpers.ml ``valid_device``: "autodetect", a Linux device name, or (not
    for a floppy) anything OCaml's int_of_string reads (its ``n >= 0 || n < 16`` test
    holds for every int)."""
    if name == "autodetect" or LINUX_DEVICE.match(name):
        return True
    return kind != "Floppy" and OCAML_INT.match(name) is not None


def as_int(value: object, name: str) -> int:
    """XML-RPC clients send 64-bit ints as strings; accept both."""
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ServerError("FIELD_TYPE_ERROR", name) from None


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
            raise ServerError("VDI_INCOMPATIBLE_TYPE", ref, "cbt_metadata")

    def _vbds(self, vdi_ref: str) -> list[str]:
        return self.db.find("VBD", VDI=vdi_ref)

    def _attached(self, vdi_ref: str) -> list[str]:
        """VBDs plugged to the VDI (xapi_vdi.ml check_operation_error: my_active_vbd_records)."""
        return [r for r in self._vbds(vdi_ref) if self.db.get("VBD", r)["currently_attached"]]

    def refuse_attached(self, vdi_ref: str, operation: str) -> None:
        """``VDI.destroy`` and ``list_changed_blocks`` cannot run while a VBD is plugged
        (xapi_vdi.ml check_operation_error, blocked_by_attach: VDI_IN_USE [vdi, op]);
        list_changed_blocks still may when every plugged VBD belongs to a snapshot VM."""
        attached = self._attached(vdi_ref)
        if operation == "list_changed_blocks":
            vms = [self.db.get("VBD", r)["VM"] for r in attached]
            attached = [
                vm for vm in vms if not (self.db.exists("VM", vm) and self._is_snapshot_vm(vm))
            ]
        if attached:
            raise ServerError("VDI_IN_USE", vdi_ref, operation)

    def _is_snapshot_vm(self, vm_ref: str) -> bool:
        return bool(self.db.get("VM", vm_ref)["is_a_snapshot"])

    def changed_blocks(self, from_ref: str, to_ref: str) -> str:
        """message_forwarding.ml checks the operation on ``vdi_to`` only."""
        self.db.get("VDI", from_ref)
        self.refuse_attached(to_ref, "list_changed_blocks")
        self.cbt.require_sr_support(to_ref)
        return self.cbt.changed_blocks(from_ref, to_ref)

    def update_usage(self, ref: str) -> None:
        rec = self.vdi(ref)
        rec["physical_utilisation"] = disks.allocated(self.state_dir, rec["uuid"])

    # -- VDI ----------------------------------------------------------------------------
    def create_vdi(self, fields: dict, exact_size: bool = False) -> str:
        """xapi_vdi.ml ``create``: a cbt_metadata VDI is refused; sm makes the VDI from
        name, description, type, read_only, size, sharable and sm_config, then xapi sets
        other_config, sharable, tags and xenstore_data.  ``fields`` is the record as the
        dispatcher read it (every constructor field, datamodel.py); internal callers may
        give fewer."""
        self.db.get("SR", fields["SR"])
        if fields.get("type") == "cbt_metadata":
            raise ServerError("VDI_INCOMPATIBLE_TYPE", "", "cbt_metadata")
        size = as_int(fields["virtual_size"], "virtual_size")
        if size < 0:
            raise sr_backend_failure(79, "negative size")
        rec = records.vdi(str(fields.get("name_label", "")), fields["SR"], size)
        raw = dict(fields.get("sm_config") or {}).get("type") == "raw"  # sm: no VHD rounding
        rec["virtual_size"] = size if exact_size or raw else vhd_size(size)
        for key in VDI_CREATE_KEEPS:
            if key in fields:
                rec[key] = fields[key]
        rec["type"] = str(fields.get("type", "user"))
        ref = self.db.add("VDI", rec)
        disks.create(self.state_dir, rec["uuid"], rec["virtual_size"])
        return ref

    def destroy_vdi(self, ref: str) -> None:
        """Refused while a VBD is plugged; unplugged VBDs go with the VDI
        (xapi_vdi.ml destroy_and_data_destroy_common)."""
        rec = self.vdi(ref)
        self.refuse_attached(ref, "destroy")
        self.cbt.forget(ref)
        with disks.locked(self.state_dir, rec["uuid"]):
            self.db.remove("VDI", ref)
            for vbd in self._vbds(ref):
                self.db.remove("VBD", vbd)
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

    def refuse_snapshot(self, ref: str) -> None:
        """What xapi and sm refuse to snapshot: a cbt_metadata VDI, a reset-on-boot one
        (xapi_vdi.ml check_operation_error: `snapshot when reset_on_boot`) and a raw one
        (sm FileSR/LVHDSR _snapshot: "Raw VDI, snapshot or clone not permitted")."""
        self.refuse_metadata(ref)
        rec = self.vdi(ref)
        if rec.get("on_boot") == "reset":
            raise ServerError("VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION")
        if rec["sm_config"].get("type") == "raw":
            raise sr_backend_failure(38, "Raw VDI, snapshot or clone not permitted")

    def set_on_boot(self, ref: str, value: str) -> None:
        """xapi_vdi.ml set_on_boot; refused while CBT is on (allowed_when_cbt_enabled)."""
        if value not in ("persist", "reset"):
            raise ServerError("INVALID_VALUE", "on_boot", value)
        self.refuse_metadata(ref)
        if self.vdi(ref)["cbt_enabled"]:
            raise ServerError("VDI_CBT_ENABLED", ref)
        self.vdi(ref)["on_boot"] = value

    def snapshot_vdi(self, ref: str, locked: bool = False) -> str:
        """Copy the data (sparse) and hand over the CBT log, atomically w.r.t. guest
        writes: the caller may already hold the VDI's lock (VM.snapshot holds all)."""
        self.refuse_snapshot(ref)
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
        if self.vdi(ref)["sm_config"].get("type") == "raw":
            raise sr_backend_failure(38, "Raw VDI, snapshot or clone not permitted")
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
        self.cbt.require_sr_support(ref)
        rec = self.vdi(ref)
        if not rec["is_a_snapshot"]:
            raise ServerError("OPERATION_NOT_ALLOWED", "VDI is not a snapshot")
        if not rec["cbt_enabled"]:
            raise ServerError("VDI_NO_CBT_METADATA", ref)
        if rec["type"] == "cbt_metadata":
            return
        # xapi_vdi.ml _data_destroy marks the VDI cbt_metadata while it waits, "to minimize
        # the chance of new VBDs referring to this VDI being created", and puts the type
        # back when the wait fails: meanwhile get_nbd_info and new NBD connections fail.
        kind = rec["type"]
        rec["type"] = "cbt_metadata"
        try:
            self._wait_unplugged(ref)
        except ServerError:
            if self.db.exists("VDI", ref):
                rec["type"] = kind
            raise
        with disks.locked(self.state_dir, rec["uuid"]):
            disks.data_path(self.state_dir, rec["uuid"]).unlink(missing_ok=True)
            rec.update(type="cbt_metadata", physical_utilisation=0)

    def _wait_unplugged(self, ref: str) -> None:
        """xapi waits a few seconds for VBDs to go away before VDI_IN_USE (xapi_vdi.ml
        wait_for_vbds_to_be_unplugged_and_destroyed, 4 s: ``--in-use-wait``)."""
        deadline = time.monotonic() + self.in_use_wait
        while self._vbds(ref):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerError("VDI_IN_USE", ref, "data_destroy")
            self.db.changed.wait(left)
            if not self.db.exists("VDI", ref):
                raise ServerError("HANDLE_INVALID", "VDI", ref)

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
        """xapi_vbd.ml ``create``, in its order: the VM must exist; a non-empty VBD's VDI
        must be of a type a VBD may use (VDI_INCOMPATIBLE_TYPE); CDs are read-only
        (VBD_CDS_MUST_BE_READONLY), only CDs may be empty (VBD_NOT_REMOVABLE_MEDIA
        ["in constructor"]); no RW VBD on a read-only VDI (VDI_READONLY); the userdevice
        must be valid (xapi_vbd_helpers.ml ``valid_device``: INVALID_DEVICE), "autodetect"
        takes the first free one, and it must not clash with a device of the VM's other
        VBDs (DEVICE_ALREADY_EXISTS).  ``device`` and ``currently_attached`` are taken
        from the record only for a suspended VM ("" and false otherwise)."""
        vm_ref = fields.get("VM", NULL_REF)
        vm = self.db.get("VM", vm_ref)
        vdi_ref = fields.get("VDI", NULL_REF)
        empty = bool(fields.get("empty", False))
        kind = str(fields.get("type", "Disk"))
        mode = str(fields.get("mode", "RW"))
        if not empty:
            vdi_type = self.vdi(vdi_ref)["type"]  # HANDLE_INVALID for a bad VDI ref
            if vdi_type not in VBD_VDI_TYPES:
                raise ServerError("VDI_INCOMPATIBLE_TYPE", vdi_ref, vdi_type)
        if kind == "CD" and mode != "RO":
            raise ServerError("VBD_CDS_MUST_BE_READONLY")
        if kind != "CD" and empty:
            raise ServerError("VBD_NOT_REMOVABLE_MEDIA", "in constructor")
        if mode == "RW" and self.vdi(vdi_ref)["read_only"]:
            raise ServerError("VDI_READONLY", vdi_ref)
        userdevice = str(fields.get("userdevice", ""))
        if not valid_device(userdevice, kind):
            raise ServerError("INVALID_DEVICE", userdevice)
        used = self._used_devices(vm_ref)
        if userdevice == "autodetect":
            # xapi_vm_helpers.ml allowed_VBD_devices: HVM 0..254 (PV too), minus the used
            free = [n for n in range(255) if n not in used]
            if kind == "Floppy" or not free:
                raise ServerError("INVALID_DEVICE", userdevice)
            userdevice = str(free[0])
        if device_numbers(userdevice) & used:
            raise ServerError("DEVICE_ALREADY_EXISTS", userdevice)
        suspended = vm["power_state"] == "Suspended"
        rec = records.new(
            "VBD",
            VM=vm_ref,
            VDI=vdi_ref,
            userdevice=userdevice,
            device=str(fields.get("device", "")) if suspended else "",
            currently_attached=bool(fields.get("currently_attached")) if suspended else False,
            bootable=bool(fields.get("bootable", False)),
            mode=mode,
            type=kind,
            empty=empty,
            unpluggable=bool(fields.get("unpluggable", True)),
            other_config=dict(fields.get("other_config") or {}),
            qos_algorithm_type=str(fields.get("qos_algorithm_type", "")),
            qos_algorithm_params=dict(fields.get("qos_algorithm_params") or {}),
        )
        return self.db.add("VBD", rec)

    def _used_devices(self, vm_ref: str) -> set[int]:
        """xapi_vm_helpers.ml ``all_used_VBD_devices``: both the device and the
        userdevice of every VBD of the VM, each read as a disk number."""
        used: set[int] = set()
        for ref in self.db.find("VBD", VM=vm_ref):
            rec = self.db.get("VBD", ref)
            used |= device_numbers(str(rec.get("device", ""))) | device_numbers(rec["userdevice"])
        return used

    def copy_vbd(self, vbd: dict, vm_ref: str, vdi_ref: str) -> str:
        """xapi_vbd_helpers.ml ``copy``: a straight database copy (no create checks) onto
        another VM and VDI; empty when the VDI is NULL.  currently_attached is false:
        the copy's VM is halted (xapi_vm_clone.ml resets its state)."""
        rec = records.new("VBD")
        for key in rec:
            if key in vbd and key != "uuid":
                rec[key] = copy.deepcopy(vbd[key])
        rec.update(
            VM=vm_ref,
            VDI=vdi_ref,
            empty=bool(vbd.get("empty")) or vdi_ref == NULL_REF,
            currently_attached=False,
        )
        return self.db.add("VBD", rec)

    def destroy_vbd(self, ref: str) -> None:
        self.db.remove("VBD", ref)

    # -- VM -----------------------------------------------------------------------------
    def snapshot_disks(self, vm_ref: str, ignore: list[str] | None = None) -> list:
        """xapi_vm_clone.ml ``clone`` / ``safe_clone_disks`` for a snapshot: the VM's VBDs
        (but those of the ``ignore``d VDIs), each with the VDI its copy gets: NULL for an
        empty one, the same VDI for a CD ("we cannot make copies of ISOs"), a snapshot
        for a disk.  All disk snapshots are taken while every disk's lock is held, so the
        set is crash-consistent across the VM's disks.  Returns [(vbd record, VDI)]."""
        vbds = [self.db.get("VBD", r) for r in self.db.find("VBD", VM=vm_ref)]
        vbds = [v for v in vbds if v["VDI"] not in (ignore or [])]
        disks_ = [v for v in vbds if not v["empty"] and v["type"] != "CD"]
        for vbd in disks_:
            # safe_clone_disks destroys the snapshots it made when one fails: checking
            # them all first leaves the same nothing behind.
            self.refuse_snapshot(vbd["VDI"])
        uuids = sorted({self.vdi(v["VDI"])["uuid"] for v in disks_})
        with contextlib.ExitStack() as stack:
            for uuid in uuids:
                stack.enter_context(disks.locked(self.state_dir, uuid))
            snaps = {id(v): self.snapshot_vdi(v["VDI"], locked=True) for v in disks_}
        out = []
        for vbd in vbds:
            if vbd["empty"]:
                out.append((vbd, NULL_REF))
            else:
                out.append((vbd, snaps.get(id(vbd), vbd["VDI"])))
        return out

    def destroy_vm(self, vm_ref: str) -> None:
        """The VM's VBDs and the VM record (the caller, vm_lifecycle.py, checked the operation)."""
        self.db.get("VM", vm_ref)
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
