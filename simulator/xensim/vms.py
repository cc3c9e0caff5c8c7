"""VM lifecycle and devices: VM.create/destroy/start/shutdown, blocked operations, VIFs,
vTPMs, and the configuration a VM snapshot carries.

Each behaviour follows the xen-api source named beside it (``ocaml/xapi/...``).  Disks and
their VBDs stay in storage.py; this module adds what a whole VM has besides its disks.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import re
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

from . import records
from .database import NULL_REF, Database
from .errors import XapiError
from .storage import Storage, as_int

MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
# VM.create requires these (xapi's generated server rejects a record missing a field
# without a default_value in ocaml/idl/datamodel_vm.ml).
REQUIRED = (
    "name_label",
    "memory_static_max",
    "memory_dynamic_max",
    "memory_dynamic_min",
    "memory_static_min",
    "VCPUs_max",
    "VCPUs_at_startup",
    "HVM_boot_policy",
)
INTS = ("VCPUs_max", "VCPUs_at_startup", "user_version", *REQUIRED[1:5])
VIF_FIELDS = ("MTU", "locking_mode", "ipv4_allowed", "ipv6_allowed", "other_config")
VIF_FIELDS += ("qos_algorithm_type", "qos_algorithm_params")


class Vms:
    def __init__(self, db: Database, storage: Storage, master: Callable[[], str]) -> None:
        self.db = db
        self.storage = storage
        self.master = master

    def register(self, add: Callable[..., None]) -> None:
        add("VM.create", lambda c, rec: self.create(rec), 1)
        add("VM.destroy", lambda c, r: self.destroy(r), 1)
        # ocaml/idl/datamodel_vm.ml: snapshot(vm, new_name[, ignore_vdis]); the VDIs listed
        # get no snapshot and no VBD in the snapshot VM (xapi_vm_clone.ml ``clone``).
        add(
            "VM.snapshot",
            lambda c, r, name, ignore=(): self.snapshot(r, name, self._vdi_refs(ignore)),
            2,
            optional=1,
        )
        add("VM.start", lambda c, r, paused, force: self.start(r), 3)
        add("VM.clean_shutdown", lambda c, r: self.shutdown(r, "clean_shutdown"), 1)
        add("VM.hard_shutdown", lambda c, r: self.shutdown(r, "hard_shutdown"), 1)
        add("VM.set_blocked_operations", lambda c, r, v: self.set_blocked(r, v), 2)
        add("VM.add_to_blocked_operations", lambda c, r, k, v: self.block(r, k, v), 3)
        add("VM.remove_from_blocked_operations", lambda c, r, k: self.unblock(r, k), 2)
        add("VIF.create", lambda c, rec: self.create_vif(rec), 1)
        add("VIF.destroy", lambda c, r: self.db.remove("VIF", r), 1)
        add("VTPM.create", lambda c, vm, unique: self.create_vtpm(vm, unique), 2)
        add("VTPM.destroy", lambda c, r: self.destroy_vtpm(r), 1)
        add("VTPM.get_contents", lambda c, r: self.db.get("VTPM", r)["_contents"], 1)
        add("VTPM.set_contents", lambda c, r, v: self.set_contents(r, v), 2)

    # -- VM -----------------------------------------------------------------------------
    def create(self, fields: dict) -> str:
        """xapi_vm.ml ``create``: validates VCPUs (xapi_vm_helpers.ml ``validate_vcpus``)
        and memory (``validate_memory``: static_min <= dynamic_min <= dynamic_max <=
        static_max), adds a random ``mac_seed`` to other_config; the VM is Halted."""
        for name in REQUIRED:
            if name not in fields:
                raise XapiError("FIELD_TYPE_ERROR", name)
        rec = records.vm(str(fields["name_label"]), power_state="Halted")
        for key, value in fields.items():
            if key in rec and key not in ("uuid", "power_state", "is_a_snapshot", "snapshot_of"):
                rec[key] = as_int(value, key) if key in INTS else value
        _validate_vcpus(rec["VCPUs_max"], rec["VCPUs_at_startup"])
        mem = [rec[k] for k in REQUIRED[4:0:-1]]  # static_min, dynamic_min, ...max
        if mem != sorted(mem) or mem[0] < 0:
            raise XapiError("MEMORY_CONSTRAINT_VIOLATION")
        rec["other_config"] = dict(rec["other_config"])
        rec["other_config"].setdefault("mac_seed", str(uuidlib.uuid4()))
        return self.db.add("VM", rec)

    def destroy(self, ref: str) -> None:
        """xapi_vm.ml ``destroy``: the vTPMs go (Xapi_vtpm.destroy), then
        xapi_vm_helpers.ml ``destroy`` removes the VBDs and VIFs; VDIs stay.  Only a
        halted VM may go (xapi_vm_lifecycle.ml: destroy is allowed in `Halted)."""
        vm = self.db.get("VM", ref)
        self._check(ref, "destroy")
        for vtpm in self.db.find("VTPM", VM=ref):
            self.db.remove("VTPM", vtpm)
        for vif in self.db.find("VIF", VM=ref):
            self.db.remove("VIF", vif)
        if vm["is_control_domain"]:
            raise XapiError("OPERATION_NOT_ALLOWED", "cannot destroy a control domain")
        self.storage.destroy_vm(ref)

    def _check(self, ref: str, op: str, state: str = "Halted") -> None:
        """xapi_vm_lifecycle.ml ``check_operation_error``: a blocked operation fails
        ``OPERATION_BLOCKED [ref, reason]`` first, then the power state is checked
        (``VM_BAD_POWER_STATE [ref, expected, actual]``)."""
        vm = self.db.get("VM", ref)
        reason = vm["blocked_operations"].get(op)
        if reason is not None:
            raise XapiError("OPERATION_BLOCKED", ref, reason)
        if vm["is_a_snapshot"] or vm["power_state"] == state:
            return
        raise XapiError("VM_BAD_POWER_STATE", ref, state.lower(), vm["power_state"].lower())

    def start(self, ref: str) -> None:
        """xapi_vm.ml ``start``: Halted → Running on the master; disks are plugged."""
        vm = self.db.get("VM", ref)
        if vm["is_a_snapshot"] or vm["is_a_template"] or vm["is_control_domain"]:
            raise XapiError("OPERATION_NOT_ALLOWED", "VM cannot be started")
        self._check(ref, "start")
        self._attach(ref, True)
        vm.update(power_state="Running", resident_on=self.master())

    def shutdown(self, ref: str, op: str) -> None:
        """xapi_vm.ml ``clean_shutdown`` / ``hard_shutdown``: Running → Halted."""
        self._check(ref, op, "Running")
        self._attach(ref, False)
        self.db.get("VM", ref).update(power_state="Halted", resident_on=NULL_REF)

    def _attach(self, ref: str, on: bool) -> None:
        for cls in ("VBD", "VIF"):
            for dev in self.db.find(cls, VM=ref):
                rec = self.db.get(cls, dev)
                rec["currently_attached"] = on and not rec.get("empty", False)

    def set_blocked(self, ref: str, value: dict) -> None:
        """datamodel_vm.ml ``blocked_operations``: (vm_operations → reason) map."""
        self.db.get("VM", ref)["blocked_operations"] = {str(k): str(v) for k, v in value.items()}

    def block(self, ref: str, key: str, value: str) -> None:
        self.db.get("VM", ref)["blocked_operations"][str(key)] = str(value)

    def unblock(self, ref: str, key: str) -> None:
        self.db.get("VM", ref)["blocked_operations"].pop(str(key), None)

    def _vdi_refs(self, refs: Any) -> list[str]:
        if not isinstance(refs, (list, tuple)):
            raise XapiError("FIELD_TYPE_ERROR", "ignore_vdis")
        for ref in refs:
            self.db.get("VDI", ref)
        return list(refs)

    def snapshot(self, ref: str, name: str, ignore: list[str] | None = None) -> str:
        """xapi_vm_snapshot.ml / xapi_vm_clone.ml ``clone``: the snapshot VM copies the
        record's configuration, every VBD (disks snapshotted, CD drives kept as they are),
        the VIFs with their MACs and the vTPMs with their contents (Xapi_vtpm.copy)."""
        snap = self.storage.snapshot_vm(ref, name, ignore)
        live, rec = self.db.get("VM", ref), self.db.get("VM", snap)
        for key in records.vm_config():
            rec[key] = copy.deepcopy(live[key])
        rec["name_description"] = live["name_description"]
        rec["other_config"] = copy.deepcopy(live["other_config"])
        rec["blocked_operations"] = {}
        for vbd in self.db.find("VBD", VM=ref):
            fields = self.db.get("VBD", vbd)
            if fields["type"] != "Disk" or fields["VDI"] == NULL_REF:
                self.storage.create_vbd({**copy.deepcopy(fields), "VM": snap})
        for vif in self.db.find("VIF", VM=ref):
            dup = {
                **copy.deepcopy(self.db.get("VIF", vif)),
                "VM": snap,
                "currently_attached": False,
            }
            dup["uuid"] = str(uuidlib.uuid4())
            self.db.add("VIF", dup)
        for vtpm in self.db.find("VTPM", VM=ref):
            old = self.db.get("VTPM", vtpm)
            self.db.add("VTPM", records.vtpm(snap, old["is_unique"], old["_contents"]))
        return snap

    # -- VIF ----------------------------------------------------------------------------
    def create_vif(self, fields: dict) -> str:
        """xapi_vif_helpers.ml ``create``: device a number (``INVALID_DEVICE``), unique in
        the VM (``DEVICE_ALREADY_EXISTS``); an empty MAC is generated from the VM's
        ``mac_seed`` (``gen_mac``), any other must be valid (``MAC_INVALID``)."""
        for name in ("device", "network", "VM", "MAC"):
            if name not in fields:
                raise XapiError("FIELD_TYPE_ERROR", name)
        vm = self.db.get("VM", fields["VM"])
        self.db.get("network", fields["network"])
        device = str(fields["device"])
        if not device.isdigit():
            raise XapiError("INVALID_DEVICE", device)
        used = {int(self.db.get("VIF", v)["device"]) for v in self.db.find("VIF", VM=fields["VM"])}
        if int(device) in used:
            raise XapiError("DEVICE_ALREADY_EXISTS", device)
        mac, generated = str(fields["MAC"]), False
        seed = vm["other_config"].get("mac_seed")
        if not mac and seed is not None:
            mac, generated = gen_mac(int(device), seed), True
        if not MAC.match(mac):
            raise XapiError("MAC_INVALID", mac)
        rec = records.vif(fields["VM"], fields["network"], device, mac)
        rec["MAC_autogenerated"] = generated
        for key in VIF_FIELDS:
            if key in fields:
                rec[key] = as_int(fields[key], key) if key == "MTU" else fields[key]
        return self.db.add("VIF", rec)

    # -- VTPM ---------------------------------------------------------------------------
    def create_vtpm(self, vm_ref: str, is_unique: bool) -> str:
        """xapi_vtpm.ml ``create``: the pool's licence may restrict vTPMs
        (``FEATURE_RESTRICTED [restrict_vtpm]``), a VM has at most one
        (``VTPM_MAX_AMOUNT_REACHED``) and must be halted; the contents start empty."""
        pool = self.db.get("pool", self.db.refs("pool")[0])
        if pool["restrictions"].get("restrict_vtpm") == "true":
            raise XapiError("FEATURE_RESTRICTED", "restrict_vtpm")
        existing = self.db.find("VTPM", VM=vm_ref)
        if existing:
            raise XapiError("VTPM_MAX_AMOUNT_REACHED", str(len(existing)))
        self._check(vm_ref, "create_vtpm")
        return self.db.add("VTPM", records.vtpm(vm_ref, bool(is_unique), ""))

    def destroy_vtpm(self, ref: str) -> None:
        """xapi_vtpm.ml ``destroy``: only while the VM is halted (or suspended)."""
        vm = self.db.get("VTPM", ref)["VM"]
        if self.db.get("VM", vm)["power_state"] not in ("Halted", "Suspended"):
            raise XapiError(
                "VM_BAD_POWER_STATE", vm, "halted", self.db.get("VM", vm)["power_state"].lower()
            )
        self.db.remove("VTPM", ref)

    def set_contents(self, ref: str, contents: str) -> None:
        """xapi_vtpm.ml ``set_contents``: the contents must be base64.  Both get_contents
        and set_contents are ``_R_LOCAL_ROOT_ONLY`` (datamodel_vtpm.ml): no RBAC role may
        call them, only the pool's root account, the only user xensim knows."""
        try:
            base64.b64decode(str(contents), validate=True)
        except (binascii.Error, ValueError):
            raise XapiError("INVALID_VALUE", "contents", "not base64") from None
        self.db.get("VTPM", ref)["_contents"] = str(contents)


def _validate_vcpus(vcpus_max: int, at_startup: int) -> None:
    """xapi_vm_helpers.ml ``validate_vcpus``."""
    if vcpus_max < 1:
        raise XapiError("INVALID_VALUE", "VCPUs_max", str(vcpus_max))
    if at_startup < 1:
        raise XapiError("INVALID_VALUE", "VCPUs-at-startup", str(at_startup))
    if at_startup > vcpus_max:
        raise XapiError(
            "VALUE_NOT_SUPPORTED",
            "VCPUs-at-startup",
            str(at_startup),
            "value greater than VCPUs-max",
        )


def gen_mac(device: int, seed: str) -> str:
    """xapi_vif_helpers.ml ``gen_mac``: md5 chained 2*device times over the seed."""
    digest = hashlib.md5(seed.encode()).digest()
    for _ in range(device * 2):
        digest = hashlib.md5(digest).digest()
    second = hashlib.md5(digest).digest()
    # Record_util.mac_from_int_array: locally administered, unicast
    octets = [(digest[0] | 0x2) & ~0x1, digest[1], digest[2], digest[3], second[1], second[2]]
    return ":".join("%02x" % b for b in octets)
