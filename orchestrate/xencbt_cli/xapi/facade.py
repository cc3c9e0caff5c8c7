"""What the orchestrator asks of the pool through XAPI: VMs, disks, CBT, snapshots, SRs.

Every XAPI call of the CLI is a method here or in the other modules of this package
(vmconfig.py: a VM's configuration for its VM point; vmbuild.py: restore-vm's VMs and
devices; hosthttp.py: the hosts' HTTP handlers and their tasks; networks.py: NBD
networks).  Nothing above this package names a XAPI message."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from xencbt_core.errors import XapiError
from xencbt_core.inuse import IN_USE, TIMEOUT, InUseRetry
from xencbt_core.params import UUID
from xencbt_core.xapi import NULL_REF, Session

from ..errors import CliError

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "xencbt-"
BROKEN_CHAIN = ("SR_BACKEND_FAILURE_460", "SR_BACKEND_FAILURE_459")
# VDI.enable_cbt failures that mean "no CBT on this disk", not "something broke"
# (xapi_vdi.ml enable_cbt and check_operation_error, sm VDI.configure_blocktracking).
NO_CBT = {
    "LICENCE_RESTRICTION": "the pool's licence does not include changed block tracking",
    "SR_OPERATION_NOT_SUPPORTED": "the disk's SR does not support changed block tracking",
    "SR_BACKEND_FAILURE_66": "the VDI is raw, and only VHD-based VDIs track changes",
    "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION": "the VDI is reset on boot (on-boot=reset)",
}
# ...and of those, the disks the host cannot snapshot either (xapi_vdi.ml: `snapshot when
# reset_on_boot`; sm FileSR/LVHDSR _snapshot: "Raw VDI, snapshot or clone not permitted").
NO_SNAPSHOT = ("SR_BACKEND_FAILURE_66", "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION")


@dataclass
class Vm:
    ref: str
    uuid: str
    name: str


@dataclass
class VmDisk:
    """A VM's disk (or, after a snapshot, the snapshot's) by its VBD's userdevice."""

    vdi_ref: str
    uuid: str
    name: str
    userdevice: str
    virtual_size: int
    cbt_enabled: bool
    snapshot_of: str = NULL_REF


@dataclass
class NoCbt:
    """Why a disk cannot have CBT: the host's error code and what it means."""

    code: str
    why: str

    @property
    def reason(self) -> str:
        return "CBT is unavailable: %s (%s); this disk is backed up in full every time" % (
            self.why,
            self.code,
        )


class CleanupLagged(XapiError):
    """Snapshot VDIs the host still held (VDI_IN_USE) after every retry: they stay in the
    ledger and the next backup of the VM cleans them up.  Never fails a committed point."""

    def __init__(self, uuids: list[str], error: XapiError):
        super().__init__(error.code, error.params)
        self.uuids = uuids


class PoolApi:
    """The pool through one XAPI session: typed methods, one per thing asked."""

    def __init__(self, session: Session, in_use_timeout: float = TIMEOUT):
        self.session = session
        self.call = session.call
        # data_destroy, destroy and list_changed_blocks wait out dom0's NBD VBDs (inuse.py)
        self.in_use = InUseRetry(session.call, in_use_timeout)

    def vm(self, name_or_uuid: str) -> Vm:
        vms = self.vms(name_or_uuid)
        if not vms:
            raise CliError("no VM named %s in the pool (xe vm-list)" % name_or_uuid)
        if len(vms) > 1:
            raise CliError(
                "more than one VM named %s in the pool (%s): give the uuid of the one meant"
                % (name_or_uuid, ", ".join(sorted(v.uuid for v in vms)))
            )
        return vms[0]

    def vms(self, name_or_uuid: str) -> list[Vm]:
        """The VMs (not snapshots, templates or control domains) of a uuid or a name."""
        if not name_or_uuid.strip():
            raise CliError("an empty VM name was given (give a VM name or uuid: xe vm-list)")
        if UUID.match(name_or_uuid):
            try:
                refs = [self.vm_by_uuid(name_or_uuid)]
            except XapiError as e:
                if e.code != "UUID_INVALID":
                    raise
                refs = []
        else:
            refs = self.vms_named(name_or_uuid)
        vms = []
        for ref in refs:
            rec = self.vm_record(ref)
            if not (rec["is_a_snapshot"] or rec["is_a_template"] or rec["is_control_domain"]):
                vms.append(Vm(ref, rec["uuid"], rec["name_label"]))
        if not vms and UUID.match(name_or_uuid):
            raise CliError("no VM with uuid %s in the pool (xe vm-list)" % name_or_uuid)
        return vms

    def disks(self, vm_ref: str) -> list[VmDisk]:
        found = []
        for vbd in self.call("VM.get_VBDs", vm_ref):
            rec = self.call("VBD.get_record", vbd)
            if rec["type"] != "Disk" or rec["VDI"] == NULL_REF:
                continue
            vdi = self.call("VDI.get_record", rec["VDI"])
            found.append(
                VmDisk(
                    rec["VDI"],
                    vdi["uuid"],
                    vdi["name_label"],
                    rec["userdevice"],
                    int(vdi["virtual_size"]),
                    bool(vdi["cbt_enabled"]),
                    vdi.get("snapshot_of", NULL_REF),
                )
            )
        return sorted(found, key=lambda d: d.userdevice)

    def enable_cbt(self, disk: VmDisk) -> NoCbt | None:
        """Enable CBT; a NoCbt when the pool, SR or VDI cannot have it."""
        log.info("enabling CBT on VDI %s (%s)", disk.uuid, disk.name)
        try:
            self.call("VDI.enable_cbt", disk.vdi_ref)
        except XapiError as e:
            if e.code in NO_CBT:
                return NoCbt(e.code, NO_CBT[e.code])
            raise CliError(
                "cannot enable CBT on VDI %s (%s): %s" % (disk.uuid, disk.name, e.code)
            ) from None
        return None

    def snapshot(self, vm: Vm, name: str) -> str:
        log.info("snapshotting VM %s (%s) as %s", vm.uuid, vm.name, name)
        return self.call("VM.snapshot", vm.ref, name)

    def leftover_snapshots(self, vm: Vm) -> list[str]:
        """Snapshot VMs an interrupted run of ours left behind."""
        refs = []
        for ref in self.call("VM.get_snapshots", vm.ref):
            if self.call("VM.get_name_label", ref).startswith(SNAPSHOT_PREFIX):
                refs.append(ref)
        return refs

    def destroy_snapshot(self, snap_vm: str, keep: set[str]) -> None:
        """Destroy a snapshot VM; its VDIs whose uuid is in ``keep`` lose only their data
        (their CBT log is the next backup's base), the others are destroyed."""
        disks = self.disks(snap_vm)
        self.call("VM.destroy", snap_vm)
        lagged: list[str] = []
        error = None
        for disk in disks:
            try:
                if disk.uuid in keep:
                    self.data_destroy(disk.vdi_ref, disk.uuid)
                else:
                    self.destroy_vdi(disk.vdi_ref, disk.uuid)
            except XapiError as e:
                if e.code != IN_USE:
                    raise
                lagged.append(disk.uuid)
                error = e
        if error is not None:
            raise CleanupLagged(lagged, error)

    def data_destroy(self, ref: str, uuid: str) -> None:
        try:
            self.in_use("VDI.data_destroy", ref)
        except XapiError as e:
            if e.code not in ("VDI_NO_CBT_METADATA", "SR_OPERATION_NOT_SUPPORTED"):
                raise
            log.warning("VDI %s has no CBT log (%s); destroying it", uuid, e.code)
            self.destroy_vdi(ref, uuid)

    def destroy_vdi(self, ref: str, uuid: str) -> None:
        log.info("destroying VDI %s", uuid)
        self.in_use("VDI.destroy", ref)

    def vdi_ref(self, uuid: str) -> str | None:
        try:
            return self.call("VDI.get_by_uuid", uuid)
        except XapiError as e:
            if e.code == "UUID_INVALID":
                return None
            raise

    def nbd_hosts(self, vdi_ref: str) -> list[str]:
        """The uuids of the hosts whose NBD server may serve the VDI: those that have its
        SR plugged (get_nbd_info offers exactly those; the plugin may connect to any of
        them).  Uuids, not refs: a cluster's budgets are named after them (and shown)."""
        sr = self.call("VDI.get_SR", vdi_ref)
        hosts = {self.call("PBD.get_host", pbd) for pbd in self.call("SR.get_PBDs", sr)}
        return sorted(self.call("host.get_uuid", h) for h in hosts)

    def changed_blocks(self, base_ref: str, snap_ref: str) -> str | None:
        """The base64 bitmap, or None when the CBT chain is broken between the two."""
        try:
            return self.in_use("VDI.list_changed_blocks", base_ref, snap_ref)
        except XapiError as e:
            if e.code in BROKEN_CHAIN:
                log.info("list_changed_blocks: %s", e)
                return None
            raise

    # -- VMs --------------------------------------------------------------------------

    def vm_by_uuid(self, uuid: str) -> str:
        """The VM (or VM snapshot) ref; XapiError UUID_INVALID when there is none."""
        return self.call("VM.get_by_uuid", uuid)

    def vms_named(self, name: str) -> list[str]:
        """Refs of every VM, snapshot or template whose name_label is ``name``."""
        return self.call("VM.get_by_name_label", name)

    def vm_record(self, ref: str) -> dict:
        return self.call("VM.get_record", ref)

    def vm_uuid(self, ref: str) -> str:
        return self.call("VM.get_uuid", ref)

    def vm_records(self) -> dict[str, dict]:
        """Every VM record of the pool (snapshots, templates, control domains too), by ref."""
        return self.call("VM.get_all_records")

    def vif_records(self) -> dict[str, dict]:
        """Every VIF record of the pool, by ref."""
        return self.call("VIF.get_all_records")

    # -- VDIs and VBDs ----------------------------------------------------------------

    def vdi_by_uuid(self, uuid: str) -> str:
        """The VDI's ref; XapiError UUID_INVALID when there is none (vdi_ref: None)."""
        return self.call("VDI.get_by_uuid", uuid)

    def vdi_records(self) -> dict[str, dict]:
        """Every VDI record of the pool, by ref."""
        return self.call("VDI.get_all_records")

    def vdi_record(self, ref: str) -> dict:
        return self.call("VDI.get_record", ref)

    def vdi_uuid(self, ref: str) -> str:
        return self.call("VDI.get_uuid", ref)

    def vdi_type(self, ref: str) -> str:
        """user, cbt_metadata, …"""
        return self.call("VDI.get_type", ref)

    def vdi_is_snapshot(self, ref: str) -> bool:
        return self.call("VDI.get_is_a_snapshot", ref)

    def vdi_virtual_size(self, ref: str) -> int:
        return int(self.call("VDI.get_virtual_size", ref))

    def vdi_vbds(self, ref: str) -> list[str]:
        return self.call("VDI.get_VBDs", ref)

    def vbd_record(self, ref: str) -> dict:
        return self.call("VBD.get_record", ref)

    def create_vdi(self, record: dict) -> str:
        """VDI.create with the constructor's record; the new VDI's ref."""
        return self.call("VDI.create", record)

    def snapshot_vdi(self, ref: str) -> str:
        """A snapshot of one VDI (no driver params); its ref."""
        return self.call("VDI.snapshot", ref, {})

    def set_vdi_name(self, ref: str, name: str) -> None:
        self.call("VDI.set_name_label", ref, name)

    # -- SRs --------------------------------------------------------------------------

    def sr_ref(self, sr: str) -> str:
        """The SR by uuid or by its unique name; CliError when there is none or several."""
        try:
            if UUID.match(sr):
                return self.call("SR.get_by_uuid", sr)
            refs = self.call("SR.get_by_name_label", sr)
        except XapiError as e:
            raise CliError("no SR %s: %s" % (sr, e)) from None
        if len(refs) != 1:
            raise CliError("%d SRs named %s: give its uuid (xe sr-list)" % (len(refs), sr))
        return refs[0]

    def sr_uuid(self, ref: str) -> str:
        return self.call("SR.get_uuid", ref)

    def sr_record(self, ref: str) -> dict:
        return self.call("SR.get_record", ref)
