"""Which operations a VM allows: xapi_vm_lifecycle.ml ``check_operation_error`` (blocked
operations, power states, templates, snapshots, control domains, VUSBs) and the pool's
licence restrictions that gate some calls.

The VM calls (vm_lifecycle.py, vm_snapshot.py, vm_devices.py) check here first.
"""

from __future__ import annotations

from .database import Database
from .errors import ServerError

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


def restricted(db: Database, key: str, enabled_when_unknown: bool = False) -> bool:
    """xapi-types features.ml ``of_assoc_list``: a feature whose restriction flag is
    missing from pool.restrictions is disabled, but for the few ``enabled_when_unknown``
    (VM_start among them); a present flag restricts when it reads "true"."""
    pool = db.get("pool", db.refs("pool")[0])
    value = pool.get("restrictions", {}).get(key)
    if value is None:
        return not enabled_when_unknown
    return value.lower() == "true"


def devices(db: Database, cls: str, vm_ref: str) -> list[str]:
    """The VM's records of ``cls`` (none when the database has no such class)."""
    try:
        return db.find(cls, VM=vm_ref)
    except KeyError:
        return []


def check_operation(db: Database, ref: str, op: str) -> None:
    """xapi_vm_lifecycle.ml ``check_operation_error``, in its order: a blocked
    operation (OPERATION_BLOCKED [ref, reason]); the power state
    (VM_BAD_POWER_STATE [ref, "<allowed, ...>", actual]); a template that is not a
    snapshot (``check_template``: VM_IS_TEMPLATE [ref, op]); a snapshot
    (``check_snapshot``: VM_IS_SNAPSHOT [ref, op]); dom0 and control domains
    (OPERATION_NOT_ALLOWED); a VM with VUSBs cannot suspend, snapshot, checkpoint or
    migrate (VM_HAS_VUSBS [ref])."""
    vm = db.get("VM", ref)
    reason = vm["blocked_operations"].get(op)
    if reason is not None:
        raise ServerError("OPERATION_BLOCKED", ref, reason)
    allowed = ALLOWED_STATES.get(op, ALL_STATES)
    if vm["power_state"] not in allowed:
        expected = ", ".join(s.lower() for s in allowed)
        raise ServerError("VM_BAD_POWER_STATE", ref, expected, vm["power_state"].lower())
    if vm["is_a_template"] and not vm["is_a_snapshot"]:
        default = vm.get("is_default_template") or vm["other_config"].get(
            "default_template", ""
        ).lower() in ("1", "true")
        if op not in TEMPLATE_OPS and not (op == "destroy" and not default):
            raise ServerError("VM_IS_TEMPLATE", ref, op)
    if vm["is_a_snapshot"] and op not in SNAPSHOT_OPS:
        raise ServerError("VM_IS_SNAPSHOT", ref, op)
    if vm["is_control_domain"]:
        # every control domain of xensim is a host's dom0 (Helpers.is_domain_zero)
        if op in ("changing_VCPUs", "destroy"):
            raise ServerError("OPERATION_NOT_ALLOWED", "This operation is not allowed on dom0")
        if op not in CONTROL_DOMAIN_OPS:
            raise ServerError(
                "OPERATION_NOT_ALLOWED", "This operation is not allowed on a control domain"
            )
    vusb_ops = ("suspend", "snapshot", "checkpoint", "migrate_send", "pool_migrate")
    if op in vusb_ops and devices(db, "VUSB", ref):
        raise ServerError("VM_HAS_VUSBS", ref)
