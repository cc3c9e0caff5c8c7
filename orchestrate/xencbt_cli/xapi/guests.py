"""What a restore drill (jobs/drill.py) asks of the pool: an isolated network (no PIFs),
the guest's report that it booted, and finding and destroying what a drill left.

A guest shows it booted when its agent (xe-guest-utilities, the Windows PV tools)
reported: xapi then sets VM.guest_metrics to a VM_guest_metrics record whose
PV_drivers_version / os_version come from the keys the agent wrote in xenstore
(xapi_guest_agent.ml ``create_and_set_guest_metrics``).  xapi may create that record
with empty maps for a running domain before any agent spoke (xapi_xenops.ml
``create_guest_metrics_if_needed``), so the record alone proves nothing: Xen Orchestra's
health check (@xen-orchestra/backups HealthCheckVmBackup) waits for
``PV_drivers_version.major``; an ``os_version`` name counts too (an agent that reports
the OS but no driver version)."""

from __future__ import annotations

from .facade import NULL_REF, PoolApi


class GuestApi:
    """The calls of a drill that restore-vm does not make, through a PoolApi."""

    def __init__(self, pool: PoolApi):
        self.pool = pool
        self.call = pool.call

    def create_network(self, name: str, description: str, other_config: dict) -> str:
        """network.create without a bridge (xapi chooses "xapi<N>") and so without PIFs:
        a private network of the pool, whose VIFs reach each other only
        (xapi_network.ml create).  Its ref."""
        record = {
            "name_label": name,
            "name_description": description,
            "MTU": "1500",
            "other_config": other_config,
            "bridge": "",
            "managed": True,
            "tags": [],
        }
        return self.call("network.create", record)

    def network_uuid(self, ref: str) -> str:
        return self.call("network.get_uuid", ref)

    def network_records(self) -> dict[str, dict]:
        return self.call("network.get_all_records")

    def destroy_network(self, ref: str) -> None:
        """network.destroy (its VIFs must be unplugged: NETWORK_CONTAINS_VIF)."""
        self.call("network.destroy", ref)

    def power_state(self, vm: str) -> str:
        return self.call("VM.get_power_state", vm)

    def booted(self, vm: str) -> dict[str, dict] | None:
        """The guest agent's report ({"PV_drivers_version": …, "os_version": …}) once it
        gave a driver version or an OS name; None until then."""
        gm = self.call("VM.get_guest_metrics", vm)
        if gm == NULL_REF:
            return None
        rec = self.call("VM_guest_metrics.get_record", gm)
        drivers = rec.get("PV_drivers_version") or {}
        os_version = rec.get("os_version") or {}
        if "major" not in drivers and not os_version.get("name"):
            return None
        return {"PV_drivers_version": drivers, "os_version": os_version}
