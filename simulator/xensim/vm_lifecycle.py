"""VM lifecycle: VM.create/destroy/start/start_on/shutdown and the blocked operations; the
``Vms`` that registers every VM call (and VIF, vTPM and network.create) with the API.

Each behaviour follows the xen-api source named beside it (``ocaml/xapi/...``).  Disks and
their VBDs stay in storage.py; the rest of a VM lives beside this module: the operation
check (vm_operations.py), host choice (vm_placement.py), BIOS strings (vm_bios.py),
snapshots (vm_snapshot.py), VIFs and vTPMs (vm_devices.py), networks (network.py).
"""

from __future__ import annotations

import copy
import uuid as uuidlib
from collections.abc import Callable

from . import network, records, vm_bios, vm_devices, vm_placement, vm_snapshot
from .database import NULL_REF, Database, new_ref
from .errors import ServerError
from .guest_boot import GuestAgents, delete_guest_metrics
from .storage import Storage, as_int, device_numbers
from .vm_operations import check_operation, devices, restricted

INTS = ("VCPUs_max", "VCPUs_at_startup", "user_version", "memory_static_max")
INTS += ("memory_dynamic_max", "memory_dynamic_min", "memory_static_min", "memory_target")

# xapi_vm.ml ``create`` passes these record fields to Db.VM.create as fixed values (or
# ignores them: ``~blocked_operations:_``, ``~bios_strings:[]``, ...), whatever the caller
# sent; power_state is Halted (a Suspended create needs a suspend image, below).
CREATE_FIXED = {
    "blocked_operations": {},
    "bios_strings": {},
    "is_a_snapshot": False,
    "snapshot_of": NULL_REF,
    "snapshot_time": "19700101T00:00:00Z",
    "is_default_template": False,
    "is_control_domain": False,
    "resident_on": NULL_REF,
    "scheduled_to_be_resident_on": NULL_REF,
    "parent": NULL_REF,
    "protection_policy": NULL_REF,
    "is_snapshot_from_vmpp": False,
    "snapshot_schedule": NULL_REF,
    "is_vmss_snapshot": False,
    "suspend_VDI": NULL_REF,
    "last_booted_record": "",
    "last_boot_CPU_flags": {},
    "domid": -1,
    "requires_reboot": False,
}


class Vms:
    def __init__(
        self, db: Database, storage: Storage, master: Callable[[], str], agents: GuestAgents
    ) -> None:
        self.db = db
        self.storage = storage
        self.master = master
        self.agents = agents  # the simulated guests' boots (guest_boot.py)

    def register(self, add: Callable[..., None]) -> None:
        db = self.db
        add("VM.create", lambda c, rec: self.create(rec), 1)
        add("VM.destroy", lambda c, r: self.destroy(r), 1)
        # ocaml/idl/datamodel_vm.ml: snapshot(vm, new_name[, ignore_vdis]); the VDIs listed
        # get no snapshot and no VBD in the snapshot VM (xapi_vm_clone.ml ``clone``).
        add(
            "VM.snapshot",
            lambda c, r, name, ignore=(): vm_snapshot.snapshot(
                db, self.storage, r, name, vm_snapshot.vdi_refs(db, ignore)
            ),
            2,
            optional=1,
        )
        add("VM.start", lambda c, r, paused, force: self.start(r, paused, force), 3)
        add("VM.start_on", lambda c, r, h, paused, force: self.start_on(r, h, paused, force), 4)
        add(
            "VM.assert_can_boot_here",
            lambda c, r, h: vm_placement.assert_can_boot_here(db, r, h),
            2,
        )
        add("VM.clean_shutdown", lambda c, r: self.shutdown(r, "clean_shutdown"), 1)
        add("VM.hard_shutdown", lambda c, r: self.shutdown(r, "hard_shutdown"), 1)
        add("VM.set_blocked_operations", lambda c, r, v: self.set_blocked(r, v), 2)
        add("VM.add_to_blocked_operations", lambda c, r, k, v: self.block(r, k, v), 3)
        add("VM.remove_from_blocked_operations", lambda c, r, k: self.unblock(r, k), 2)
        add("VM.set_bios_strings", lambda c, r, v: vm_bios.set_bios_strings(db, r, v), 2)
        add("VM.copy_bios_strings", lambda c, r, h: vm_bios.copy_bios_strings(db, r, h), 2)
        add("network.create", lambda c, rec: network.create(db, rec), 1)
        add("network.destroy", lambda c, r: network.destroy(db, r), 1)
        add("VIF.create", lambda c, rec: vm_devices.create_vif(db, rec), 1)
        add("VIF.destroy", lambda c, r: db.remove("VIF", r), 1)
        add("VTPM.create", lambda c, vm, unique: vm_devices.create_vtpm(db, vm, unique), 2)
        add("VTPM.destroy", lambda c, r: vm_devices.destroy_vtpm(db, r), 1)
        add("VTPM.get_contents", lambda c, r: db.get("VTPM", r)["_contents"], 1)
        add("VTPM.set_contents", lambda c, r, v: vm_devices.set_contents(db, r, v), 2)

    # -- VM -----------------------------------------------------------------------------
    def create(self, fields: dict) -> str:
        """xapi_vm.ml ``create``: adds a random ``mac_seed`` to other_config unless one is
        given; "apart from the above, parameter validation is delayed until VM.start"
        (VCPUs and memory are checked by assert_can_boot_here, vm_placement.py).  The record's
        blocked_operations and bios_strings are ignored (CREATE_FIXED), the VM is Halted,
        a domain_type "unspecified" is derived from HVM_boot_policy
        (xapi_vm_helpers.ml ``derive_domain_type``: "" → pv, else hvm).  A Suspended
        create without last_boot_CPU_flags, last_booted_record and suspend_VDI is
        VM_BAD_POWER_STATE [ref, halted, suspended]."""
        ref = new_ref()
        state = str(fields.get("power_state", "Halted"))
        image = fields.get("last_boot_CPU_flags") and fields.get("last_booted_record")
        if state == "Suspended" and not (image and fields.get("suspend_VDI") != NULL_REF):
            raise ServerError("VM_BAD_POWER_STATE", ref, "halted", "suspended")
            # xensim has no suspend images: such a VM is created halted all the same
        rec = records.vm(str(fields.get("name_label", "")), power_state="Halted")
        for key, value in fields.items():
            if key in rec and key != "uuid" and not key.startswith("_"):
                rec[key] = as_int(value, key) if key in INTS else copy.deepcopy(value)
        rec.update(copy.deepcopy(CREATE_FIXED))
        rec["power_state"] = "Halted"
        if rec.get("domain_type", "unspecified") == "unspecified":
            rec["domain_type"] = "pv" if rec["HVM_boot_policy"] == "" else "hvm"
        rec["other_config"] = dict(rec["other_config"])
        rec["other_config"].setdefault("mac_seed", str(uuidlib.uuid4()))
        return self.db.add("VM", rec, ref)

    def destroy(self, ref: str) -> None:
        """xapi_vm.ml ``destroy``: the children are rebased onto the VM's parent, the
        vTPMs go (Xapi_vtpm.destroy), then xapi_vm_helpers.ml ``destroy`` removes the
        VBDs, VIFs, VGPUs and VUSBs; VDIs stay.  Checked first as the operation
        ``destroy`` (xapi_vm_lifecycle.ml: Halted or Suspended; dom0 never).  Its guest
        metrics go too (xapi_vm_helpers.ml ``destroy``: Db.VM_guest_metrics.destroy)."""
        vm = self.db.get("VM", ref)
        check_operation(self.db, ref, "destroy")
        self.agents.stopped(ref)
        delete_guest_metrics(self.db, ref)
        for child in self.db.find("VM", parent=ref):
            self.db.get("VM", child)["parent"] = vm.get("parent", NULL_REF)
        for vtpm in self.db.find("VTPM", VM=ref):
            vm_devices.destroy_vtpm(self.db, vtpm)
        for cls in ("VIF", "VGPU", "VUSB"):
            for dev in devices(self.db, cls, ref):
                self.db.remove(cls, dev)
        self.storage.destroy_vm(ref)

    # -- VM.start ------------------------------------------------------------------------
    def start(self, ref: str, paused: bool = False, force: bool = False) -> None:
        """message_forwarding.ml VM ``start``: the VM_start feature (LICENCE_RESTRICTION),
        the operation check, ``consider_generic_bios_strings`` (a VM without BIOS strings
        gets the generic ones, even if the start then fails), then
        ``forward_to_suitable_host``: xapi_vm_helpers.ml ``choose_host_for_vm_no_wlb``
        tries the hosts (the affinity first, Xapi_vm_placement) with
        ``assert_can_boot_here``, then again without its memory check; no host at all is
        NO_HOSTS_AVAILABLE [].  A host chosen without the memory check fails in xenopsd
        (xapi_xenops.ml Cannot_free_this_much_memory → HOST_NOT_ENOUGH_FREE_MEMORY
        [needed, free])."""
        self._assert_vm_start_licensed()
        check_operation(self.db, ref, "start")
        vm_bios.consider_generic_bios_strings(self.db, ref)
        vm = self.db.get("VM", ref)
        hosts = self.db.refs("host")
        order = [h for h in (vm.get("affinity"), self.master()) if h in hosts]
        order += [h for h in hosts if h not in order]
        for memory_check in (True, False):
            for host in order:
                try:
                    vm_placement.assert_can_boot_here(self.db, ref, host, memory=memory_check)
                except ServerError:
                    continue
                vm_placement.memory_check(self.db, ref, host)  # xenopsd's own, after the placement
                self._boot(ref, host, paused)
                return
        raise ServerError("NO_HOSTS_AVAILABLE")

    def start_on(self, ref: str, host: str, paused: bool = False, force: bool = False) -> None:
        """message_forwarding.ml VM ``start_on``: ``assert_matches_control_domain_affinity``,
        the operation check, generic BIOS strings, then ``reserve_memory_for_vm``:
        assert_can_boot_here on that host, whose first error is the answer."""
        self.db.get("host", host)
        self._assert_vm_start_licensed()
        vm = self.db.get("VM", ref)
        if vm["is_control_domain"] and vm.get("affinity", NULL_REF) not in (NULL_REF, host):
            raise ServerError(
                "OPERATION_NOT_ALLOWED",
                "Cannot boot a control domain on a host different from its affinity",
            )
        check_operation(self.db, ref, "start_on")
        vm_bios.consider_generic_bios_strings(self.db, ref)
        vm_placement.assert_can_boot_here(self.db, ref, host)
        self._boot(ref, host, paused)

    def _assert_vm_start_licensed(self) -> None:
        """Pool_features.assert_enabled VM_start ("restrict_vm_start", enabled when the
        flag is unknown): LICENSE_RESTRICTION [VM_start]."""
        if restricted(self.db, "restrict_vm_start", enabled_when_unknown=True):
            raise ServerError("LICENSE_RESTRICTION", "VM_start")

    def _boot(self, ref: str, host: str, paused: bool) -> None:
        vm = self.db.get("VM", ref)
        self._attach(ref, True)
        vm.update(power_state="Paused" if paused else "Running", resident_on=host)
        self.agents.started(ref, running=not paused)  # guest_boot.py

    def shutdown(self, ref: str, op: str) -> None:
        """xapi_vm.ml ``clean_shutdown`` / ``hard_shutdown``: Running → Halted."""
        check_operation(self.db, ref, op)
        self.agents.stopped(ref)
        self._attach(ref, False)
        self.db.get("VM", ref).update(power_state="Halted", resident_on=NULL_REF)

    def _attach(self, ref: str, on: bool) -> None:
        for cls in ("VBD", "VIF"):
            for dev in self.db.find(cls, VM=ref):
                rec = self.db.get(cls, dev)
                rec["currently_attached"] = on and not rec.get("empty", False)
                if cls == "VBD" and on and not rec.get("device"):
                    # the plug names the device (xenopsd): xvd<letter> of the userdevice
                    numbers = device_numbers(rec["userdevice"])
                    if numbers:
                        rec["device"] = "xvd" + _letters_of(min(numbers))

    def set_blocked(self, ref: str, value: dict) -> None:
        """datamodel_vm.ml ``blocked_operations``: (vm_operations → reason) map."""
        self.db.get("VM", ref)["blocked_operations"] = {str(k): str(v) for k, v in value.items()}

    def block(self, ref: str, key: str, value: str) -> None:
        self.db.get("VM", ref)["blocked_operations"][str(key)] = str(value)

    def unblock(self, ref: str, key: str) -> None:
        self.db.get("VM", ref)["blocked_operations"].pop(str(key), None)


def _letters_of(n: int) -> str:
    """0 → "a", 25 → "z", 26 → "aa" (Linux disk names)."""
    out = ""
    n += 1
    while n:
        n, r = divmod(n - 1, 26)
        out = chr(ord("a") + r) + out
    return out
