"""Whether a VM can boot on a host: xapi_vm_helpers.ml ``assert_can_boot_here`` (the
VM's parameters, the host enabled, its SRs and networks, free memory and pCPUs) and the
memory a host has free (memory_check.ml).  VM.start (vm_lifecycle.py) chooses its host
with these.
"""

from __future__ import annotations

from .database import Database
from .errors import ServerError

# Host resources xensim models for assert_can_boot_here (inventory.py sets them per host
# as internal fields; these are the fallbacks for a state dir made before they existed).
HOST_MEMORY = 64 << 30  # Host_metrics.memory_total
HOST_CPUS = 16  # host cpu_info "cpu_count"


def assert_can_boot_here(db: Database, ref: str, host: str, memory: bool = True) -> None:
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
    vm = db.get("VM", ref)
    host_rec = db.get("host", host)
    _validate_basic_parameters(vm)
    if not vm["is_control_domain"] and not host_rec.get("enabled", True):
        raise ServerError("HOST_DISABLED", host)
    _assert_can_see_srs(db, ref, host)
    _assert_can_see_networks(db, ref, host)
    if memory:
        memory_check(db, ref, host)
    pcpus = int(host_rec.get("_cpu_count", HOST_CPUS))
    if int(vm["VCPUs_max"]) > pcpus and vm["platform"].get("vcpu-unrestricted", "").lower() not in (
        "1",
        "true",
    ):
        raise ServerError("HOST_NOT_ENOUGH_PCPUS", str(vm["VCPUs_max"]), str(pcpus))


def _validate_basic_parameters(vm: dict) -> None:
    """xapi_vm_helpers.ml ``validate_basic_parameters``."""
    _validate_vcpus(int(vm["VCPUs_max"]), int(vm["VCPUs_at_startup"]))
    # validate_memory: Vm_memory_constraints.transform coerces the dynamic range into
    # the static one and fails only when a maximum is below its minimum
    if int(vm["memory_static_max"]) < int(vm["memory_static_min"]) or int(
        vm["memory_dynamic_max"]
    ) < int(vm["memory_dynamic_min"]):
        raise ServerError("MEMORY_CONSTRAINT_VIOLATION")
    multiplier = float(vm.get("HVM_shadow_multiplier", 1.0))
    if multiplier < 1.0:
        raise ServerError("INVALID_VALUE", "HVM_shadow_multiplier", repr(multiplier))
    crash = vm.get("actions_after_crash", "restart")
    field = "VM.actions_after_crash"
    if crash == "rename_restart":
        raise ServerError(
            "VALUE_NOT_SUPPORTED",
            field,
            "rename_restart",
            "option would leak a domain; VMs and not domains are managed by this API",
        )
    if crash in ("coredump_and_destroy", "coredump_and_restart") and vm.get("domain_type") != "pv":
        raise ServerError(
            "VALUE_NOT_SUPPORTED",
            field,
            crash,
            "cannot invoke a coredump of an HVM, PVH or PV-in-PVH domain",
        )


def _validate_vcpus(vcpus_max: int, at_startup: int) -> None:
    """xapi_vm_helpers.ml ``validate_vcpus``."""
    if vcpus_max < 1:
        raise ServerError("INVALID_VALUE", "VCPUs_max", str(vcpus_max))
    if at_startup < 1:
        raise ServerError("INVALID_VALUE", "VCPUs-at-startup", str(at_startup))
    if at_startup > vcpus_max:
        raise ServerError(
            "VALUE_NOT_SUPPORTED",
            "VCPUs-at-startup",
            str(at_startup),
            "value greater than VCPUs-max",
        )


def _assert_can_see_srs(db: Database, ref: str, host: str) -> None:
    attached = {
        db.get("PBD", p)["SR"]
        for p in db.find("PBD", host=host)
        if db.get("PBD", p)["currently_attached"]
    }
    for vbd in db.find("VBD", VM=ref):
        rec = db.get("VBD", vbd)
        if rec["empty"] or not db.exists("VDI", rec["VDI"]):
            continue
        sr = db.get("VDI", rec["VDI"])["SR"]
        if sr not in attached:
            raise ServerError("VM_REQUIRES_SR", ref, sr)


def _assert_can_see_networks(db: Database, ref: str, host: str) -> None:
    for vif in db.find("VIF", VM=ref):
        net = db.get("VIF", vif)["network"]
        if not _network_available(db, net, host):
            raise ServerError("VM_REQUIRES_NETWORK", ref, net)


def _network_available(db: Database, net: str, host: str) -> bool:
    """``is_network_available_on``: a network with PIFs needs one on the host; one
    without (internal) is available when assumed shared, unmanaged, or while no
    running VM on it is resident elsewhere."""
    pifs = db.find("PIF", network=net)
    if pifs:
        return host in {db.get("PIF", p)["host"] for p in pifs}
    rec = db.get("network", net)
    if rec["other_config"].get("assume_network_is_shared") == "true":
        return True
    if not rec.get("managed", True):
        return True
    hosts = set()
    for vif in db.find("VIF", network=net):
        vm = db.get("VM", db.get("VIF", vif)["VM"])
        if vm["power_state"] == "Running":
            hosts.add(vm["resident_on"])
    return not hosts or host in hosts


def host_free_memory(db: Database, host: str, ignore: str | None = None) -> int:
    """memory_check.ml ``host_compute_free_memory_with_maximum_compression``: the
    host's memory (Host_metrics.memory_total, minus host.memory_overhead) less, for
    every VM resident (or scheduled) on it, dom0 included, its dynamic_min plus its
    memory_overhead (policy Dynamic_min); never below 0."""
    rec = db.get("host", host)
    total = int(rec.get("_memory_total", HOST_MEMORY)) - int(rec.get("memory_overhead", 0))
    for vm_ref in db.refs("VM"):
        if vm_ref == ignore:
            continue
        vm = db.get("VM", vm_ref)
        if host in (vm.get("resident_on"), vm.get("scheduled_to_be_resident_on")):
            total -= int(vm["memory_dynamic_min"]) + int(vm.get("memory_overhead", 0))
    return max(0, total)


def memory_check(db: Database, ref: str, host: str) -> None:
    """``assert_enough_memory_available``: the VM needs its dynamic_min
    (memory_check.ml ``vm_compute_start_memory``, policy Dynamic_min; xensim counts
    no shadow or overhead memory beyond the VM's memory_overhead)."""
    vm = db.get("VM", ref)
    needed = int(vm["memory_dynamic_min"]) + int(vm.get("memory_overhead", 0))
    free = host_free_memory(db, host, ignore=ref)
    if free < needed:
        raise ServerError("HOST_NOT_ENOUGH_FREE_MEMORY", str(needed), str(free))
