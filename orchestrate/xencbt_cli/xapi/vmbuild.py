"""What restore-vm asks of the pool (jobs/restore_vm.py, jobs/vm_builder.py): its licence
restrictions, its networks, a new VM with its VBDs, VIFs and vTPM, and destroying a VM
it built.  What it reads of the pool's VMs, VIFs, VDIs and SRs: facade.py."""

from __future__ import annotations

from .facade import NULL_REF, PoolApi


class VmBuildApi:
    """The calls that build a VM and its devices (and undo them), through a PoolApi."""

    def __init__(self, pool: PoolApi):
        self.pool = pool
        self.call = pool.call

    def pool_restrictions(self) -> dict[str, str]:
        """The pool's licence restrictions (restrict_vtpm, restrict_vif_locking, …)."""
        return self.call("pool.get_restrictions", self.call("pool.get_all")[0])

    # -- what the pool has --------------------------------------------------------------

    def network_by_uuid(self, uuid: str) -> str:
        """The network's ref; XapiError when there is none."""
        return self.call("network.get_by_uuid", uuid)

    def networks_named(self, name: str) -> list[str]:
        return self.call("network.get_by_name_label", name)

    # -- the new VM and its devices -------------------------------------------------------

    def create_vm(self, record: dict) -> str:
        """VM.create with every constructor field; the new VM's ref."""
        return self.call("VM.create", record)

    def set_blocked_operations(self, vm: str, blocked: dict[str, str]) -> None:
        """Block the operations named (keys), saying why (values)."""
        self.call("VM.set_blocked_operations", vm, blocked)

    def unblock(self, vm: str, operation: str) -> None:
        self.call("VM.remove_from_blocked_operations", vm, operation)

    def set_bios_strings(self, vm: str, strings: dict[str, str]) -> None:
        self.call("VM.set_bios_strings", vm, strings)

    def create_vbd(self, record: dict) -> str:
        return self.call("VBD.create", record)

    def create_vif(self, record: dict) -> str:
        return self.call("VIF.create", record)

    def vif_mac(self, ref: str) -> str:
        return self.call("VIF.get_MAC", ref)

    def create_vtpm(self, vm: str, unique: bool) -> str:
        return self.call("VTPM.create", vm, unique)

    def set_vtpm_contents(self, ref: str, contents: str) -> None:
        self.call("VTPM.set_contents", ref, contents)

    def remove_vm_other_config(self, vm: str, key: str) -> None:
        self.call("VM.remove_from_other_config", vm, key)

    def remove_vdi_other_config(self, vdi: str, key: str) -> None:
        self.call("VDI.remove_from_other_config", vdi, key)

    def start_vm(self, vm: str) -> None:
        """VM.start, not paused, not forced."""
        self.call("VM.start", vm, False, False)

    def destroy_vm(self, vm: str, keep_out: list[str] | None = None) -> list[str]:
        """Shut down and destroy a VM; returns its disks' VDI refs (not destroyed here)."""
        call = self.call
        vdis = []
        for vbd in call("VM.get_VBDs", vm):
            vdi = call("VBD.get_VDI", vbd)
            if vdi != NULL_REF and call("VBD.get_type", vbd) == "Disk":
                vdis.append(vdi)
        if call("VM.get_power_state", vm) != "Halted":
            call("VM.hard_shutdown", vm)
        call("VM.remove_from_blocked_operations", vm, "destroy")
        call("VM.destroy", vm)
        return [v for v in vdis if v not in (keep_out or [])]
