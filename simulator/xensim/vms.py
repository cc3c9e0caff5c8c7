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
from .database import NULL_REF, Database, new_ref
from .errors import XapiError
from .storage import Storage, as_int, device_numbers

MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
INTS = ("VCPUs_max", "VCPUs_at_startup", "user_version", "memory_static_max")
INTS += ("memory_dynamic_max", "memory_dynamic_min", "memory_static_min", "memory_target")
VIF_FIELDS = ("MTU", "locking_mode", "ipv4_allowed", "ipv6_allowed", "other_config")
VIF_FIELDS += ("qos_algorithm_type", "qos_algorithm_params")

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

# xapi-consts/constants.ml: ``generic_bios_strings`` (with ``standard_type11_strings``),
# what VM.start gives a VM that has none; ``settable_vm_bios_string_keys``.
GENERIC_BIOS_STRINGS = {
    "bios-vendor": "Xen",
    "bios-version": "",
    "system-manufacturer": "Xen",
    "system-product-name": "HVM domU",
    "system-version": "",
    "system-serial-number": "",
    "baseboard-manufacturer": "",
    "baseboard-product-name": "",
    "baseboard-version": "",
    "baseboard-serial-number": "",
    "baseboard-asset-tag": "",
    "baseboard-location-in-chassis": "",
    "enclosure-asset-tag": "",
    "hp-rombios": "",
    "oem-1": "Xen",
    "oem-2": "MS_VM_CERT/SHA1/bdbeb6e0a816d43fa6d3fe8aaef04c2bad9d3e3d",
}
SETTABLE_BIOS_KEYS = ("bios-vendor", "bios-version", "system-manufacturer")
SETTABLE_BIOS_KEYS += ("system-product-name", "system-version", "system-serial-number")
SETTABLE_BIOS_KEYS += ("baseboard-manufacturer", "baseboard-product-name", "baseboard-version")
SETTABLE_BIOS_KEYS += ("baseboard-serial-number", "baseboard-asset-tag")
SETTABLE_BIOS_KEYS += ("baseboard-location-in-chassis", "enclosure-asset-tag")
BIOS_STRING_LIMIT = 512  # constants.ml bios_string_limit_size

# xapi_vm_lifecycle.ml ``allowed_power_states`` for the operations xensim has
ALL_STATES = ("Halted", "Paused", "Suspended", "Running")
ALLOWED_STATES = {
    "start": ("Halted",),
    "start_on": ("Halted",),
    "clean_shutdown": ("Running",),
    "hard_shutdown": ("Paused", "Suspended", "Running"),
    "destroy": ("Halted", "Suspended"),
    "snapshot": ALL_STATES,
    "create_vtpm": ("Halted",),
}
# xapi_vm_lifecycle.ml ``check_template`` / ``check_snapshot``: what a template (not a
# snapshot) and a snapshot may still do
TEMPLATE_OPS = ("changing_dynamic_range", "changing_static_range", "changing_memory_limits")
TEMPLATE_OPS += ("changing_shadow_memory", "changing_VCPUs", "changing_NVRAM", "clone", "copy")
TEMPLATE_OPS += ("export", "metadata_export", "provision")
SNAPSHOT_OPS = ("revert", "clone", "copy", "export", "destroy", "hard_shutdown")
SNAPSHOT_OPS += ("metadata_export",)
# ... and the control-domain exceptions of ``check_operation_error``
CONTROL_DOMAIN_OPS = ("data_source_op", "changing_memory_live", "awaiting_memory_live")
CONTROL_DOMAIN_OPS += ("metadata_export", "changing_dynamic_range", "changing_memory_limits")
CONTROL_DOMAIN_OPS += ("changing_static_range", "start", "start_on", "changing_VCPUs", "destroy")

# Host resources xensim models for assert_can_boot_here (inventory.py sets them per host
# as internal fields; these are the fallbacks for a state dir made before they existed).
HOST_MEMORY = 64 << 30  # Host_metrics.memory_total
HOST_CPUS = 16  # host cpu_info "cpu_count"


def restricted(db: Database, key: str, enabled_when_unknown: bool = False) -> bool:
    """xapi-types features.ml ``of_assoc_list``: a feature whose restriction flag is
    missing from pool.restrictions is disabled, but for the few ``enabled_when_unknown``
    (VM_start among them); a present flag restricts when it reads "true"."""
    pool = db.get("pool", db.refs("pool")[0])
    value = pool.get("restrictions", {}).get(key)
    if value is None:
        return not enabled_when_unknown
    return value.lower() == "true"


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
        add("VM.start", lambda c, r, paused, force: self.start(r, paused, force), 3)
        add("VM.start_on", lambda c, r, h, paused, force: self.start_on(r, h, paused, force), 4)
        add("VM.assert_can_boot_here", lambda c, r, h: self.assert_can_boot_here(r, h), 2)
        add("VM.clean_shutdown", lambda c, r: self.shutdown(r, "clean_shutdown"), 1)
        add("VM.hard_shutdown", lambda c, r: self.shutdown(r, "hard_shutdown"), 1)
        add("VM.set_blocked_operations", lambda c, r, v: self.set_blocked(r, v), 2)
        add("VM.add_to_blocked_operations", lambda c, r, k, v: self.block(r, k, v), 3)
        add("VM.remove_from_blocked_operations", lambda c, r, k: self.unblock(r, k), 2)
        add("VM.set_bios_strings", lambda c, r, v: self.set_bios_strings(r, v), 2)
        add("VM.copy_bios_strings", lambda c, r, h: self.copy_bios_strings(r, h), 2)
        add("network.create", lambda c, rec: self.create_network(rec), 1)
        add("VIF.create", lambda c, rec: self.create_vif(rec), 1)
        add("VIF.destroy", lambda c, r: self.db.remove("VIF", r), 1)
        add("VTPM.create", lambda c, vm, unique: self.create_vtpm(vm, unique), 2)
        add("VTPM.destroy", lambda c, r: self.destroy_vtpm(r), 1)
        add("VTPM.get_contents", lambda c, r: self.db.get("VTPM", r)["_contents"], 1)
        add("VTPM.set_contents", lambda c, r, v: self.set_contents(r, v), 2)

    # -- VM -----------------------------------------------------------------------------
    def create(self, fields: dict) -> str:
        """xapi_vm.ml ``create``: adds a random ``mac_seed`` to other_config unless one is
        given; "apart from the above, parameter validation is delayed until VM.start"
        (VCPUs and memory are checked by assert_can_boot_here, below).  The record's
        blocked_operations and bios_strings are ignored (CREATE_FIXED), the VM is Halted,
        a domain_type "unspecified" is derived from HVM_boot_policy
        (xapi_vm_helpers.ml ``derive_domain_type``: "" → pv, else hvm).  A Suspended
        create without last_boot_CPU_flags, last_booted_record and suspend_VDI is
        VM_BAD_POWER_STATE [ref, halted, suspended]."""
        ref = new_ref()
        state = str(fields.get("power_state", "Halted"))
        image = fields.get("last_boot_CPU_flags") and fields.get("last_booted_record")
        if state == "Suspended" and not (image and fields.get("suspend_VDI") != NULL_REF):
            raise XapiError("VM_BAD_POWER_STATE", ref, "halted", "suspended")
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
        ``destroy`` (xapi_vm_lifecycle.ml: Halted or Suspended; dom0 never)."""
        vm = self.db.get("VM", ref)
        self._check(ref, "destroy")
        for child in self.db.find("VM", parent=ref):
            self.db.get("VM", child)["parent"] = vm.get("parent", NULL_REF)
        for vtpm in self.db.find("VTPM", VM=ref):
            self.destroy_vtpm(vtpm)
        for cls in ("VIF", "VGPU", "VUSB"):
            for dev in self._devices(cls, ref):
                self.db.remove(cls, dev)
        self.storage.destroy_vm(ref)

    def _devices(self, cls: str, vm_ref: str) -> list[str]:
        """The VM's records of ``cls`` (none when the database has no such class)."""
        try:
            return self.db.find(cls, VM=vm_ref)
        except KeyError:
            return []

    def _check(self, ref: str, op: str) -> None:
        """xapi_vm_lifecycle.ml ``check_operation_error``, in its order: a blocked
        operation (OPERATION_BLOCKED [ref, reason]); the power state
        (VM_BAD_POWER_STATE [ref, "<allowed, ...>", actual]); a template that is not a
        snapshot (``check_template``: VM_IS_TEMPLATE [ref, op]); a snapshot
        (``check_snapshot``: VM_IS_SNAPSHOT [ref, op]); dom0 and control domains
        (OPERATION_NOT_ALLOWED); a VM with VUSBs cannot suspend, snapshot, checkpoint or
        migrate (VM_HAS_VUSBS [ref])."""
        vm = self.db.get("VM", ref)
        reason = vm["blocked_operations"].get(op)
        if reason is not None:
            raise XapiError("OPERATION_BLOCKED", ref, reason)
        allowed = ALLOWED_STATES.get(op, ALL_STATES)
        if vm["power_state"] not in allowed:
            expected = ", ".join(s.lower() for s in allowed)
            raise XapiError("VM_BAD_POWER_STATE", ref, expected, vm["power_state"].lower())
        if vm["is_a_template"] and not vm["is_a_snapshot"]:
            default = vm.get("is_default_template") or vm["other_config"].get(
                "default_template", ""
            ).lower() in ("1", "true")
            if op not in TEMPLATE_OPS and not (op == "destroy" and not default):
                raise XapiError("VM_IS_TEMPLATE", ref, op)
        if vm["is_a_snapshot"] and op not in SNAPSHOT_OPS:
            raise XapiError("VM_IS_SNAPSHOT", ref, op)
        if vm["is_control_domain"]:
            # every control domain of xensim is a host's dom0 (Helpers.is_domain_zero)
            if op in ("changing_VCPUs", "destroy"):
                raise XapiError("OPERATION_NOT_ALLOWED", "This operation is not allowed on dom0")
            if op not in CONTROL_DOMAIN_OPS:
                raise XapiError(
                    "OPERATION_NOT_ALLOWED", "This operation is not allowed on a control domain"
                )
        vusb_ops = ("suspend", "snapshot", "checkpoint", "migrate_send", "pool_migrate")
        if op in vusb_ops and self._devices("VUSB", ref):
            raise XapiError("VM_HAS_VUSBS", ref)

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
        self._check(ref, "start")
        self._consider_generic_bios_strings(ref)
        vm = self.db.get("VM", ref)
        hosts = self.db.refs("host")
        order = [h for h in (vm.get("affinity"), self.master()) if h in hosts]
        order += [h for h in hosts if h not in order]
        for memory_check in (True, False):
            for host in order:
                try:
                    self.assert_can_boot_here(ref, host, memory=memory_check)
                except XapiError:
                    continue
                self._memory_check(ref, host)  # xenopsd's own, after the placement
                self._boot(ref, host, paused)
                return
        raise XapiError("NO_HOSTS_AVAILABLE")

    def start_on(self, ref: str, host: str, paused: bool = False, force: bool = False) -> None:
        """message_forwarding.ml VM ``start_on``: ``assert_matches_control_domain_affinity``,
        the operation check, generic BIOS strings, then ``reserve_memory_for_vm``:
        assert_can_boot_here on that host, whose first error is the answer."""
        self.db.get("host", host)
        self._assert_vm_start_licensed()
        vm = self.db.get("VM", ref)
        if vm["is_control_domain"] and vm.get("affinity", NULL_REF) not in (NULL_REF, host):
            raise XapiError(
                "OPERATION_NOT_ALLOWED",
                "Cannot boot a control domain on a host different from its affinity",
            )
        self._check(ref, "start_on")
        self._consider_generic_bios_strings(ref)
        self.assert_can_boot_here(ref, host)
        self._boot(ref, host, paused)

    def _assert_vm_start_licensed(self) -> None:
        """Pool_features.assert_enabled VM_start ("restrict_vm_start", enabled when the
        flag is unknown): LICENSE_RESTRICTION [VM_start]."""
        if restricted(self.db, "restrict_vm_start", enabled_when_unknown=True):
            raise XapiError("LICENSE_RESTRICTION", "VM_start")

    def _consider_generic_bios_strings(self, ref: str) -> None:
        """xapi_vm_helpers.ml ``consider_generic_bios_strings``."""
        vm = self.db.get("VM", ref)
        if not vm["bios_strings"]:
            vm["bios_strings"] = dict(GENERIC_BIOS_STRINGS)

    def _boot(self, ref: str, host: str, paused: bool) -> None:
        vm = self.db.get("VM", ref)
        self._attach(ref, True)
        vm.update(power_state="Paused" if paused else "Running", resident_on=host)

    def assert_can_boot_here(self, ref: str, host: str, memory: bool = True) -> None:
        """xapi_vm_helpers.ml ``assert_can_boot_here``, what xensim models of it, in its
        order: ``validate_basic_parameters`` (VCPUs: INVALID_VALUE / VALUE_NOT_SUPPORTED;
        memory: MEMORY_CONSTRAINT_VIOLATION when a maximum is below its minimum,
        Vm_memory_constraints.transform; HVM_shadow_multiplier < 1: INVALID_VALUE;
        actions_after_crash: VALUE_NOT_SUPPORTED), the host enabled (HOST_DISABLED), every
        non-empty VBD's SR with a PBD attached on the host (``assert_can_see_SRs``:
        VM_REQUIRES_SR [vm, sr]), every VIF's network on the host
        (xapi_network_attach_helpers.ml ``assert_can_see_named_networks``:
        VM_REQUIRES_NETWORK [vm, network]), free memory
        (``assert_enough_memory_available``: HOST_NOT_ENOUGH_FREE_MEMORY
        [needed, available]) and pCPUs (``assert_enough_pcpus``:
        HOST_NOT_ENOUGH_PCPUS [vcpus, pcpus])."""
        vm = self.db.get("VM", ref)
        host_rec = self.db.get("host", host)
        self._validate_basic_parameters(vm)
        if not vm["is_control_domain"] and not host_rec.get("enabled", True):
            raise XapiError("HOST_DISABLED", host)
        self._assert_can_see_srs(ref, host)
        self._assert_can_see_networks(ref, host)
        if memory:
            self._memory_check(ref, host)
        pcpus = int(host_rec.get("_cpu_count", HOST_CPUS))
        if int(vm["VCPUs_max"]) > pcpus and vm["platform"].get(
            "vcpu-unrestricted", ""
        ).lower() not in ("1", "true"):
            raise XapiError("HOST_NOT_ENOUGH_PCPUS", str(vm["VCPUs_max"]), str(pcpus))

    def _validate_basic_parameters(self, vm: dict) -> None:
        """xapi_vm_helpers.ml ``validate_basic_parameters``."""
        _validate_vcpus(int(vm["VCPUs_max"]), int(vm["VCPUs_at_startup"]))
        # validate_memory: Vm_memory_constraints.transform coerces the dynamic range into
        # the static one and fails only when a maximum is below its minimum
        if int(vm["memory_static_max"]) < int(vm["memory_static_min"]) or int(
            vm["memory_dynamic_max"]
        ) < int(vm["memory_dynamic_min"]):
            raise XapiError("MEMORY_CONSTRAINT_VIOLATION")
        multiplier = float(vm.get("HVM_shadow_multiplier", 1.0))
        if multiplier < 1.0:
            raise XapiError("INVALID_VALUE", "HVM_shadow_multiplier", repr(multiplier))
        crash = vm.get("actions_after_crash", "restart")
        field = "VM.actions_after_crash"
        if crash == "rename_restart":
            raise XapiError(
                "VALUE_NOT_SUPPORTED",
                field,
                "rename_restart",
                "option would leak a domain; VMs and not domains are managed by this API",
            )
        if (
            crash in ("coredump_and_destroy", "coredump_and_restart")
            and vm.get("domain_type") != "pv"
        ):
            raise XapiError(
                "VALUE_NOT_SUPPORTED",
                field,
                crash,
                "cannot invoke a coredump of an HVM, PVH or PV-in-PVH domain",
            )

    def _assert_can_see_srs(self, ref: str, host: str) -> None:
        attached = {
            self.db.get("PBD", p)["SR"]
            for p in self.db.find("PBD", host=host)
            if self.db.get("PBD", p)["currently_attached"]
        }
        for vbd in self.db.find("VBD", VM=ref):
            rec = self.db.get("VBD", vbd)
            if rec["empty"] or not self.db.exists("VDI", rec["VDI"]):
                continue
            sr = self.db.get("VDI", rec["VDI"])["SR"]
            if sr not in attached:
                raise XapiError("VM_REQUIRES_SR", ref, sr)

    def _assert_can_see_networks(self, ref: str, host: str) -> None:
        for vif in self.db.find("VIF", VM=ref):
            net = self.db.get("VIF", vif)["network"]
            if not self._network_available(net, host):
                raise XapiError("VM_REQUIRES_NETWORK", ref, net)

    def _network_available(self, net: str, host: str) -> bool:
        """``is_network_available_on``: a network with PIFs needs one on the host; one
        without (internal) is available when assumed shared, unmanaged, or while no
        running VM on it is resident elsewhere."""
        pifs = self.db.find("PIF", network=net)
        if pifs:
            return host in {self.db.get("PIF", p)["host"] for p in pifs}
        rec = self.db.get("network", net)
        if rec["other_config"].get("assume_network_is_shared") == "true":
            return True
        if not rec.get("managed", True):
            return True
        hosts = set()
        for vif in self.db.find("VIF", network=net):
            vm = self.db.get("VM", self.db.get("VIF", vif)["VM"])
            if vm["power_state"] == "Running":
                hosts.add(vm["resident_on"])
        return not hosts or host in hosts

    def host_free_memory(self, host: str, ignore: str | None = None) -> int:
        """memory_check.ml ``host_compute_free_memory_with_maximum_compression``: the
        host's memory (Host_metrics.memory_total, minus host.memory_overhead) less, for
        every VM resident (or scheduled) on it, dom0 included, its dynamic_min plus its
        memory_overhead (policy Dynamic_min); never below 0."""
        rec = self.db.get("host", host)
        total = int(rec.get("_memory_total", HOST_MEMORY)) - int(rec.get("memory_overhead", 0))
        for vm_ref in self.db.refs("VM"):
            if vm_ref == ignore:
                continue
            vm = self.db.get("VM", vm_ref)
            if host in (vm.get("resident_on"), vm.get("scheduled_to_be_resident_on")):
                total -= int(vm["memory_dynamic_min"]) + int(vm.get("memory_overhead", 0))
        return max(0, total)

    def _memory_check(self, ref: str, host: str) -> None:
        """``assert_enough_memory_available``: the VM needs its dynamic_min
        (memory_check.ml ``vm_compute_start_memory``, policy Dynamic_min; xensim counts
        no shadow or overhead memory beyond the VM's memory_overhead)."""
        vm = self.db.get("VM", ref)
        needed = int(vm["memory_dynamic_min"]) + int(vm.get("memory_overhead", 0))
        free = self.host_free_memory(host, ignore=ref)
        if free < needed:
            raise XapiError("HOST_NOT_ENOUGH_FREE_MEMORY", str(needed), str(free))

    def shutdown(self, ref: str, op: str) -> None:
        """xapi_vm.ml ``clean_shutdown`` / ``hard_shutdown``: Running → Halted."""
        self._check(ref, op)
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

    # -- BIOS strings ----------------------------------------------------------------------
    def set_bios_strings(self, ref: str, value: dict) -> None:
        """xapi_vm.ml ``set_bios_strings``: only while the VM has none
        (VM_BIOS_STRINGS_ALREADY_SET []); each key settable and each value 1..512
        printable ASCII characters (xapi_vm_helpers.ml ``assert_valid_bios_strings``:
        INVALID_VALUE [key, why]); the VM gets the generic strings with these in place."""
        vm = self.db.get("VM", ref)
        if vm["bios_strings"]:
            raise XapiError("VM_BIOS_STRINGS_ALREADY_SET")
        for key, text in value.items():
            if key not in SETTABLE_BIOS_KEYS:
                raise XapiError("INVALID_VALUE", key, "Unknown key")
            if not text:
                raise XapiError("INVALID_VALUE", key, "Value provided is empty")
            if len(text) > BIOS_STRING_LIMIT:
                why = "%s has length more than %d characters" % (text, BIOS_STRING_LIMIT)
                raise XapiError("INVALID_VALUE", key, why)
            if any(not 32 <= ord(ch) < 127 for ch in text):
                raise XapiError("INVALID_VALUE", key, text + " has non-printable ASCII characters")
        vm["bios_strings"] = {k: value.get(k, v) for k, v in GENERIC_BIOS_STRINGS.items()}

    def copy_bios_strings(self, ref: str, host: str) -> None:
        """xapi_vm_helpers.ml ``copy_bios_strings``: the host's (OEM) strings, only while
        the VM has none; the VM's affinity becomes the host."""
        vm = self.db.get("VM", ref)
        host_strings = dict(self.db.get("host", host).get("bios_strings", {}))
        if vm["bios_strings"]:
            raise XapiError("VM_BIOS_STRINGS_ALREADY_SET")
        vm.update(bios_strings=host_strings, affinity=host)

    # -- VM.snapshot -----------------------------------------------------------------------
    def _vdi_refs(self, refs: Any) -> list[str]:
        if not isinstance(refs, (list, tuple)):
            raise XapiError("FIELD_TYPE_ERROR", "ignore_vdis")
        for ref in refs:
            self.db.get("VDI", ref)
        return list(refs)

    def snapshot(self, ref: str, name: str, ignore: list[str] | None = None) -> str:
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
        self._check(ref, "snapshot")
        live = self.db.get("VM", ref)
        cloned = self.storage.snapshot_disks(ref, ignore)
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
        snap = self.db.add("VM", rec)
        live["parent"] = snap
        for vbd, vdi in cloned:
            new = self.db.get("VBD", self.storage.copy_vbd(vbd, snap, vdi))
            if new["type"] == "Disk" and "owner" not in new["other_config"]:
                new["other_config"]["owner"] = ""
        for vif in self.db.find("VIF", VM=ref):
            dup = {**copy.deepcopy(self.db.get("VIF", vif)), "VM": snap}
            dup.update(uuid=str(uuidlib.uuid4()), currently_attached=False)
            self.db.add("VIF", dup)
        for vtpm in self.db.find("VTPM", VM=ref):
            old = self.db.get("VTPM", vtpm)
            contents = "" if old["is_unique"] else old["_contents"]
            self.db.add("VTPM", records.vtpm(snap, old["is_unique"], contents))
        return snap

    # -- VIF ----------------------------------------------------------------------------
    def create_vif(self, fields: dict) -> str:
        """xapi_vif_helpers.ml ``create``: the locking licence (below), device a number
        (``INVALID_DEVICE``), unique in the VM (``DEVICE_ALREADY_EXISTS``); an empty MAC is
        generated from the VM's ``mac_seed`` (``gen_mac``), any other must be valid
        (``MAC_INVALID``)."""
        for name in ("device", "network", "VM", "MAC"):
            if name not in fields:
                raise XapiError("FIELD_TYPE_ERROR", name)
        # assert_locking_licensed (Pool_features VIF_locking, "restrict_vif_locking"):
        # only mode "locked" or a non-empty ipv4/ipv6_allowed list needs the licence
        locking = str(fields.get("locking_mode", "network_default"))
        lists = fields.get("ipv4_allowed") or fields.get("ipv6_allowed")
        if (locking == "locked" or lists) and restricted(self.db, "restrict_vif_locking"):
            raise XapiError("LICENSE_RESTRICTION", "VIF_locking")
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

    # -- network ----------------------------------------------------------------------------
    def create_network(self, fields: dict) -> str:
        """xapi_network.ml ``create``: MTU <= 0 is 1500; an empty bridge gets the next
        free "xapi<N>" (``choose_bridge_name``); a given one longer than 15 characters
        or starting with xen, xapi, vif, tap or eth is INVALID_VALUE [bridge, name], one
        in use BRIDGE_NAME_EXISTS [name].  A network without PIFs is internal."""
        bridges = [self.db.get("network", n)["bridge"] for n in self.db.refs("network")]
        bridge = str(fields.get("bridge", ""))
        if bridge == "":
            n = 0
            while f"xapi{n}" in bridges:
                n += 1
            bridge = f"xapi{n}"
        else:
            blacklisted = any(bridge.startswith(p) for p in ("xen", "xapi", "vif", "tap", "eth"))
            if len(bridge) > 15 or blacklisted:
                raise XapiError("INVALID_VALUE", "bridge", bridge)
            if bridge in bridges:
                raise XapiError("BRIDGE_NAME_EXISTS", bridge)
        mtu = as_int(fields.get("MTU", 1500), "MTU")
        rec = records.new(
            "network",
            name_label=str(fields.get("name_label", "")),
            name_description=str(fields.get("name_description", "")),
            MTU=1500 if mtu <= 0 else mtu,
            other_config=dict(fields.get("other_config") or {}),
            bridge=bridge,
            managed=bool(fields.get("managed", True)),
            tags=list(fields.get("tags") or []),
            purpose=[],
            default_locking_mode="unlocked",
        )
        return self.db.add("network", rec)

    # -- VTPM ---------------------------------------------------------------------------
    def create_vtpm(self, vm_ref: str, is_unique: bool) -> str:
        """message_forwarding.ml VTPM ``create`` checks the VM operation ``create_vtpm``
        first (xapi_vm_lifecycle.ml: Halted only); then xapi_vtpm.ml ``create'``:
        ``assert_not_restricted`` (pool.restrictions must hold ``restrict_vtpm`` =
        "false" exactly, a missing key restricts: FEATURE_RESTRICTED [restrict_vtpm]),
        ``assert_no_vtpm_associated`` (VTPM_MAX_AMOUNT_REACHED [count]),
        ``assert_initial_power_state_is`` Halted; the contents start empty."""
        self._check(vm_ref, "create_vtpm")
        pool = self.db.get("pool", self.db.refs("pool")[0])
        if pool.get("restrictions", {}).get("restrict_vtpm") != "false":
            raise XapiError("FEATURE_RESTRICTED", "restrict_vtpm")
        existing = self.db.find("VTPM", VM=vm_ref)
        if existing:
            raise XapiError("VTPM_MAX_AMOUNT_REACHED", str(len(existing)))
        return self.db.add("VTPM", records.vtpm(vm_ref, bool(is_unique), ""))

    def destroy_vtpm(self, ref: str) -> None:
        """xapi_vtpm.ml ``destroy``: ``assert_initial_power_state_in`` [Halted;
        Suspended] (VM_BAD_POWER_STATE [vm, "halted;suspended", actual])."""
        vm = self.db.get("VTPM", ref)["VM"]
        state = self.db.get("VM", vm)["power_state"]
        if state not in ("Halted", "Suspended"):
            raise XapiError("VM_BAD_POWER_STATE", vm, "halted;suspended", state.lower())
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


def _letters_of(n: int) -> str:
    """0 → "a", 25 → "z", 26 → "aa" (Linux disk names)."""
    out = ""
    n += 1
    while n:
        n, r = divmod(n - 1, 26)
        out = chr(ord("a") + r) + out
    return out


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
