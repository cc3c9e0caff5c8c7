"""VM.snapshot: the snapshot VM with the configuration, disks, VIFs and vTPMs the VM has
(xapi_vm_snapshot.ml, xapi_vm_clone.ml)."""

from __future__ import annotations

import copy
import uuid as uuidlib
from typing import Any

from . import records
from .database import NULL_REF, Database
from .errors import ServerError
from .storage import Storage
from .vm_operations import check_operation

# xapi_vm_clone.ml ``copy_vm_record``: what a snapshot does not copy
SNAPSHOT_RESET = {
    "snapshot_metadata": "",
    "transportable_snapshot_id": "",
    "domarch": "",
    "protection_policy": NULL_REF,
    "is_snapshot_from_vmpp": False,
    "is_vmss_snapshot": False,
    "snapshot_schedule": NULL_REF,
    "appliance": NULL_REF,
    "start_delay": 0,
    "shutdown_delay": 0,
    "order": 0,
    "suspend_SR": NULL_REF,
    "version": 0,
    "pending_guidances": [],
    "recommended_guidances": [],
    "pending_guidances_recommended": [],
    "pending_guidances_full": [],
}


def vdi_refs(db: Database, refs: Any) -> list[str]:
    """VM.snapshot's ``ignore_vdis``: a list of existing VDIs."""
    if not isinstance(refs, (list, tuple)):
        raise ServerError("FIELD_TYPE_ERROR", "ignore_vdis")
    for ref in refs:
        db.get("VDI", ref)
    return list(refs)


def snapshot(
    db: Database, storage: Storage, ref: str, name: str, ignore: list[str] | None = None
) -> str:
    """xapi_vm_snapshot.ml / xapi_vm_clone.ml ``clone`` with Disk_op_snapshot, after
    the operation check (a VM with VUSBs: VM_HAS_VUSBS).  ``copy_vm_record``: the
    snapshot copies the record but is Halted, ``is_a_snapshot`` **and**
    ``is_a_template``, with no blocked operations, the VM's bios_strings, affinity
    and other_config (mac_seed kept); it takes the VM's ``parent`` and becomes it.
    Every VBD is copied (xapi_vbd_helpers.ml ``copy``) onto its disk's snapshot,
    the same ISO for a CD, nothing for an empty one; a Disk VBD whose other_config
    lacks ``owner`` gets ``owner: ""`` (CA-58405: the snapshot owns its disks).  The
    VIFs keep their MACs (Xapi_vif_helpers.copy ~preserve_mac_address), the vTPMs
    are copied (xapi_vtpm.ml ``copy``: a unique vTPM's copy has empty contents)."""
    check_operation(db, ref, "snapshot")
    live = db.get("VM", ref)
    cloned = storage.snapshot_disks(ref, ignore)
    rec = {k: copy.deepcopy(v) for k, v in live.items() if not k.startswith("_")}
    rec.update(
        uuid=str(uuidlib.uuid4()),
        name_label=name,
        power_state="Halted",
        allowed_operations=[],
        current_operations={},
        blocked_operations={},
        is_a_template=True,
        is_default_template=False,
        is_a_snapshot=True,
        snapshot_of=ref,
        snapshot_time=records.now_stamp(),
        snapshot_info={
            "disk-snapshot-type": "crash_consistent",
            "power-state-at-snapshot": live["power_state"],
        },
        resident_on=NULL_REF,
        scheduled_to_be_resident_on=NULL_REF,
        suspend_VDI=NULL_REF,
        domid=-1,
        ha_always_run=False,
        requires_reboot=False,
    )
    for key, value in SNAPSHOT_RESET.items():
        if key in rec:
            rec[key] = copy.deepcopy(value)
    rec["other_config"] = {
        k: v
        for k, v in live["other_config"].items()
        if k not in ("default_template", "xensource_internal")
    }
    snap = db.add("VM", rec)
    live["parent"] = snap
    for vbd, vdi in cloned:
        new = db.get("VBD", storage.copy_vbd(vbd, snap, vdi))
        if new["type"] == "Disk" and "owner" not in new["other_config"]:
            new["other_config"]["owner"] = ""
    for vif in db.find("VIF", VM=ref):
        dup = {**copy.deepcopy(db.get("VIF", vif)), "VM": snap}
        dup.update(uuid=str(uuidlib.uuid4()), currently_attached=False)
        db.add("VIF", dup)
    for vtpm in db.find("VTPM", VM=ref):
        old = db.get("VTPM", vtpm)
        contents = "" if old["is_unique"] else old["_contents"]
        db.add("VTPM", records.vtpm(snap, old["is_unique"], contents))
    return snap
