"""restore-vm's builder (restore_vm.py): the VM created with every constructor field
xapi requires, start blocked, its BIOS strings, disks, VBDs, VIFs and vTPM, each object
remembered and marked (``other_config[xencbt-restore]``) until the VM is whole, and undone
on a failure."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from xencbt_core.errors import XapiError, XencbtError
from xencbt_core.params import UUID
from xencbt_core.secret import register

from ..errors import CliError
from ..proc import testhook
from ..repo.repository import Repository
from ..repo.vmpoints import FROM_LIVE_VM, FROM_NOWHERE
from ..xapi.facade import NULL_REF, PoolApi
from ..xapi.vmbuild import VmBuildApi
from .pool_restore import to_sr

MARK = "xencbt-restore"
BLOCKED = ("start", "start_on", "resume", "resume_on")
WHY = "xencbt restore-vm is building this VM"
# VM.create's constructor fields without a default (doc/data/xenapi.json; gen_server.ml
# answers Dispatcher_FieldNotFound for a missing one), with what a VM point lacking one
# gets.  is_a_template and affinity are never taken from the point: its source is a
# snapshot, a template (xapi_vm_clone.ml), and its affinity a host of another time.
VM_REQUIRED = {
    "user_version": "1",
    "is_a_template": False,
    "affinity": NULL_REF,
    "memory_static_max": "0",
    "memory_dynamic_max": "0",
    "memory_dynamic_min": "0",
    "memory_static_min": "0",
    "VCPUs_params": {},
    "VCPUs_max": "1",
    "VCPUs_at_startup": "1",
    "actions_after_shutdown": "destroy",
    "actions_after_reboot": "restart",
    "actions_after_crash": "restart",
    "PV_bootloader": "",
    "PV_kernel": "",
    "PV_ramdisk": "",
    "PV_args": "",
    "PV_bootloader_args": "",
    "PV_legacy_args": "",
    "HVM_boot_policy": "",
    "HVM_boot_params": {},
    "platform": {},
    "PCI_bus": "",
    "other_config": {},
    "recommendations": "",
}
# Fields of the point VM.create must not get: xapi ignores them (bios_strings: set after;
# xapi_vm.ml create) or they describe the snapshot, not the VM.
NOT_CREATED = ("bios_strings", "blocked_operations", "is_a_template", "affinity")
# xapi-consts constants.ml: settable_vm_bios_string_keys, generic_bios_strings.
SETTABLE_BIOS = (
    "bios-vendor",
    "bios-version",
    "system-manufacturer",
    "system-product-name",
    "system-version",
    "system-serial-number",
    "baseboard-manufacturer",
    "baseboard-product-name",
    "baseboard-version",
    "baseboard-serial-number",
    "baseboard-asset-tag",
    "baseboard-location-in-chassis",
    "enclosure-asset-tag",
)
GENERIC_BIOS = {
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


@dataclass
class Restored:
    vm_uuid: str
    name: str
    point: str
    source_vm: str
    macs_changed: bool
    notes: list[str] = field(default_factory=list)
    disks: list[dict] = field(default_factory=list)
    started: bool = False
    start_error: str = ""  # --start failed: the VM is whole and stays
    vtpm: str = ""  # where the restored vTPM's contents came from (xapi/vmconfig.py)


class Builder:
    """Creates the VM and its devices, remembering each object to undo."""

    def __init__(self, pool: PoolApi, mark: str, tags: dict[str, str] | None = None):
        self.pool = pool
        self.api = VmBuildApi(pool)
        self.mark = mark
        self.tags = dict(tags or {})  # other_config the VM and its disks keep (a drill's)
        self.vm: str | None = None
        self.vdis: list[tuple[str, str]] = []

    def map_networks(self, config: dict, pairs: list[str]) -> dict[str, str]:
        """original network uuid -> target network ref, or CliError naming the first
        network that maps nowhere (nothing is created before this)."""
        wanted = {}
        for pair in pairs:
            src, sep, dst = pair.partition("=")
            if not sep or not src or not dst:
                raise CliError("--network takes FROM=TO (network name or uuid), not %r" % pair)
            wanted[src] = dst
        nets = {vif["network"]["uuid"]: vif["network"]["name_label"] for vif in config["vifs"]}
        unknown = [n for n in wanted if n not in nets and n not in nets.values()]
        if unknown:
            raise CliError(
                "--network %s=…: the VM point has no VIF on a network %s (its networks: %s); "
                "nothing was created"
                % (
                    unknown[0],
                    unknown[0],
                    ", ".join("%s (%s)" % (n, u) for u, n in sorted(nets.items())) or "none",
                )
            )
        mapping = {}
        for vif in config["vifs"]:
            net = vif["network"]
            target = wanted.get(net["uuid"], wanted.get(net["name_label"]))
            ref = self.network(target) if target else self.same_network(net)
            if ref is None:
                raise CliError(
                    "network %s (%s) of VIF %s is not in this pool: map it with --network "
                    "'%s=NETWORK' (xe network-list); nothing was created"
                    % (net["name_label"], net["uuid"], vif["device"], net["name_label"])
                )
            mapping[net["uuid"]] = ref
        return mapping

    def network(self, name: str) -> str | None:
        with contextlib.suppress(XapiError):
            if UUID.match(name):
                return self.api.network_by_uuid(name)
        refs = self.api.networks_named(name)
        if len(refs) > 1:
            raise CliError("%d networks are named %s: give its uuid" % (len(refs), name))
        if not refs:
            raise CliError("no network %s in this pool (xe network-list)" % name)
        return refs[0]

    def same_network(self, net: dict) -> str | None:
        with contextlib.suppress(XapiError):
            return self.api.network_by_uuid(net["uuid"])
        refs = self.api.networks_named(net["name_label"])
        return refs[0] if len(refs) == 1 else None

    def create_vm(self, config: dict, name: str) -> str:
        """VM.create with every constructor field, then start blocked at once (xapi's
        create ignores blocked_operations), then the BIOS strings (ignored too)."""
        saved = config["vm"]
        record = {k: wire(v) for k, v in saved.items() if k not in NOT_CREATED}
        for key, default in VM_REQUIRED.items():
            record.setdefault(key, default)
        record["is_a_template"] = False
        record["affinity"] = NULL_REF
        record["name_label"] = name
        record["other_config"] = {**saved.get("other_config", {}), **self.tags, MARK: self.mark}
        for value in saved.get("NVRAM", {}).values():
            register(str(value))
        self.vm = self.api.create_vm(record)
        self.api.set_blocked_operations(self.vm, dict.fromkeys(BLOCKED, WHY))
        return self.vm

    def bios_strings(self, saved: dict, notes: list[str]) -> None:
        """xapi_vm.ml set_bios_strings takes the settable keys only (non-empty, printable,
        at most 512 characters) over the generic strings; a VM with none gets the generic
        ones at its first start.  Keys it cannot set are named in the notes."""
        if not saved or saved == GENERIC_BIOS:
            return
        settable = {k: v for k, v in saved.items() if k in SETTABLE_BIOS and v}
        lost = sorted(
            k for k, v in saved.items() if k not in SETTABLE_BIOS and v != GENERIC_BIOS.get(k)
        )
        if settable:
            self.api.set_bios_strings(self.vm, settable)
        if lost:
            notes.append(
                "BIOS strings %s are not restored: xapi sets only the settable keys "
                "(xapi_vm.ml set_bios_strings); the others are generic"
                % ", ".join("%s=%r" % (k, saved[k]) for k in lost)
            )

    def disk(self, repo: Repository, d: dict, sr: str, name: str | None, saved: dict) -> str:
        """The disk restored to ``sr`` with the saved VDI's description and other_config
        (a point older than their capture: to_sr's own description)."""
        other_config = {**saved.get("other_config", {}), **self.tags, MARK: self.mark}
        description = saved.get("name_description")
        m, uuid = to_sr(
            self.pool, repo, d["vdi_uuid"], d["point"], sr, name, other_config, description
        )
        ref = self.pool.vdi_by_uuid(uuid)
        self.vdis.append((ref, uuid))
        return ref

    def vbd(self, row: dict, vdi: str) -> None:
        """Every VBD.create field; a disk the restore created is owned by the VM
        (other_config:owner, as xapi's snapshots and clones own theirs: xe vm-uninstall
        destroys owned disks only); a CD drive is read-only."""
        kind = row.get("type", "Disk")
        other_config = dict(row.get("other_config", {}))
        if kind == "Disk":
            other_config.setdefault("owner", "true")
        record = {
            "VM": self.vm,
            "VDI": vdi,
            "userdevice": row["userdevice"],
            "bootable": bool(row.get("bootable")),
            "mode": "RO" if kind == "CD" else row.get("mode", "RW"),
            "type": kind,
            "empty": vdi == NULL_REF,
            "unpluggable": bool(row.get("unpluggable", True)),
            "other_config": other_config,
            "qos_algorithm_type": row.get("qos_algorithm_type", ""),
            "qos_algorithm_params": row.get("qos_algorithm_params", {}),
        }
        self.api.create_vbd(record)

    def iso(self, row: dict, notes: list[str]) -> str:
        """The ISO a CD drive held, when this pool has it (by uuid); else an empty drive."""
        iso = row.get("iso")
        if not iso:
            return NULL_REF
        with contextlib.suppress(XapiError):
            return self.pool.vdi_by_uuid(iso["uuid"])
        notes.append(
            "CD drive %s held ISO %s (%s), which is not in this pool: it is empty"
            % (row["userdevice"], iso["name_label"], iso["uuid"])
        )
        return NULL_REF

    def vif(self, vif: dict, network: str, keep_mac: bool) -> str:
        record = {
            "device": vif["device"],
            "network": network,
            "VM": self.vm,
            "MAC": vif["MAC"] if keep_mac else "",
            "MTU": str(vif.get("MTU", 1500)),
            "other_config": vif.get("other_config", {}),
            "qos_algorithm_type": vif.get("qos_algorithm_type", ""),
            "qos_algorithm_params": vif.get("qos_algorithm_params", {}),
            "locking_mode": vif.get("locking_mode", "network_default"),
            "ipv4_allowed": vif.get("ipv4_allowed", []),
            "ipv6_allowed": vif.get("ipv6_allowed", []),
        }
        ref = self.api.create_vif(record)
        return self.api.vif_mac(ref)

    def vtpm(self, vtpm: dict, result: Restored) -> None:
        register(vtpm["contents"])
        ref = self.api.create_vtpm(self.vm, bool(vtpm.get("is_unique")))
        if vtpm["contents"]:
            self.api.set_vtpm_contents(ref, vtpm["contents"])
        source = vtpm.get("contents_from") or ("snapshot" if vtpm["contents"] else FROM_NOWHERE)
        result.vtpm = source
        if source == FROM_LIVE_VM:
            result.notes.append(
                "the vTPM is unique: xapi does not copy its contents into a snapshot "
                "(xapi_vtpm.ml copy), so they were read from the VM right after the "
                "snapshot: its TPM state a moment after the disks'"
            )
        elif not vtpm["contents"]:
            result.notes.append(
                "the vTPM is blank: the VM point holds no contents for it (%s)"
                % vtpm.get("why", "none were saved")
            )

    def finish(self) -> None:
        """Unblock, then drop the marks: the VDIs' first, the VM's last (a VM without
        its mark is whole)."""
        for op in BLOCKED:
            self.api.unblock(self.vm, op)
        for ref, _ in self.vdis:
            self.api.remove_vdi_other_config(ref, MARK)
        testhook.pause("restore-vm-commit")
        self.api.remove_vm_other_config(self.vm, MARK)

    def marked_vdis(self) -> list[tuple[str, str]]:
        """VDIs of this run not yet known to it: one whose restore was interrupted."""
        known = {ref for ref, _ in self.vdis}
        try:
            records = self.pool.vdi_records()
        except (XencbtError, OSError):
            return []
        return [
            (ref, rec["uuid"])
            for ref, rec in records.items()
            if rec.get("other_config", {}).get(MARK) == self.mark and ref not in known
        ]

    def undo(self) -> str:
        """Destroy what this run created; what cannot be destroyed keeps its mark, for
        the next restore-vm or repair.  Says what became of it."""
        self.pool.session.reset_connection()  # the interrupted call may have broken it
        done, left = [], []
        if self.vm is not None:
            try:
                self.api.destroy_vm(self.vm)
                done.append("the VM")
            except (XencbtError, OSError) as e:
                left.append("the VM (%s)" % e)
        for ref, uuid in self.vdis + self.marked_vdis():
            try:
                self.pool.destroy_vdi(ref, uuid)
                done.append("VDI %s" % uuid)
            except (XencbtError, OSError) as e:
                left.append("VDI %s (%s)" % (uuid, e))
        text = ", ".join(done) or "nothing"
        if left:
            text += "; left for the next restore-vm or repair: " + ", ".join(left)
        return text


def wire(value):
    """XML-RPC carries 64-bit ints as strings (xapi's convention)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value
