"""restore-vm: rebuild a whole VM from a VM point (vmpoint.py).

    map every VIF's network (--network FROM=TO, else the same uuid, else the same name)
    → check what would make a later call fail (vTPM licence, VIF locking licence, the
    SR's free space): any of them fails before anything is created → VM.create with every
    constructor field xapi requires (is_a_template false, affinity NULL) →
    VM.set_blocked_operations (start blocked: VM.create ignores blocked_operations) →
    VM.set_bios_strings (settable keys, when the saved ones are not generic) → each disk
    through the verified disk restore (transfer.to_sr) → VBDs in the same userdevice order
    and boot flags, disks owned (other_config:owner), CD drives with their ISO when this
    pool has it → VIFs → vTPM → unblock → [start]

A ``--start`` that fails leaves the restored VM whole (it is not undone): its uuid is
printed and the exit code is START_FAILED (7).  MAC addresses are kept only when no VM
of the pool (the original, or a VM restored before) holds them; otherwise the restored VM
gets new ones and a note names the holder.

Everything the run creates carries ``other_config[xencbt-restore] = <run id>@<host>:<pid>``
until the VM is complete: a failure or SIGINT/SIGTERM destroys it all at once; after a
SIGKILL the next restore-vm or ``xencbt repair`` with pool options finds the marks of dead
runs and destroys those VMs (with their disks) and VDIs.  The VM's mark goes last, so a
VM without it is whole.  The repository is only read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import uuid as uuidlib
from dataclasses import dataclass, field

from xencbt_core.errors import XapiError, XencbtError
from xencbt_core.secret import register

from ..errors import CliError, RepositoryError
from ..proc import command, testhook
from ..repo import image
from ..repo.repository import UUID, Repository
from ..repo.vmpoints import FROM_LIVE_VM, FROM_NOWHERE, VmManifest, VmPoints, all_vm_points
from ..xapi.facade import NULL_REF, PoolApi
from ..xapi.vmbuild import VmBuildApi
from .pool_restore import to_sr

log = logging.getLogger(__name__)

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
# SR types whose VDI.create allocates the whole virtual size (LVM volumes; "thick"
# unless the SR was created with sm_config allocation=thin).  File SRs (ext, nfs, smb,
# gfs2, …) are thin: a disk takes what is written, and import_raw_vdi skips zeros into a
# new VDI (import_raw_vdi.ml: prezeroed), in VHD blocks of 2 MiB.
THICK_TYPES = ("lvm", "lvmoiscsi", "lvmohba", "lvmofcoe")
VHD_BLOCK = 2 << 20


@dataclass
class RestoreVmOptions:
    vm: str
    at: str | None
    sr: str
    name: str | None = None
    networks: list[str] = field(default_factory=list)
    new_macs: bool = False
    start: bool = False


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
    vtpm: str = ""  # where the restored vTPM's contents came from (vmpoint.py)


def find(repo: Repository, vm: str) -> VmPoints:
    """The VM's points by uuid (or unique prefix) or by the name its newest point has."""
    found = []
    for points in all_vm_points(repo):
        manifests = points.manifests()
        name = manifests[-1].vm_name if manifests else None
        if points.vm_uuid.startswith(vm) or name == vm:
            found.append(points)
    if len(found) != 1:
        raise RepositoryError(
            "%s VM matching %s has VM points in %s (xencbt list shows them)"
            % ("no" if not found else "more than one", vm, repo.root)
        )
    return found[0]


def marker() -> str:
    return "%s@%s:%d" % (uuidlib.uuid4(), socket.gethostname(), os.getpid())


def alive(mark: str) -> bool:
    """Whether the run that set ``mark`` may still be building (same machine, pid alive)."""
    _, _, where = mark.partition("@")
    host, _, pid = where.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return int(pid) != os.getpid()  # our own pid: a dead run's, reused


class Builder:
    """Creates the VM and its devices, remembering each object to undo."""

    def __init__(self, pool: PoolApi, mark: str):
        self.pool = pool
        self.api = VmBuildApi(pool)
        self.mark = mark
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
        record["other_config"] = {**saved.get("other_config", {}), MARK: self.mark}
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
        other_config = {**saved.get("other_config", {}), MARK: self.mark}
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


def clean_leftovers(pool: PoolApi) -> list[str]:
    """Destroy what killed restore-vm runs left (marked, run no longer alive): VMs with
    their disks, then marked VDIs.  Returns the uuids destroyed."""
    api = VmBuildApi(pool)
    gone = []
    for ref, rec in pool.vm_records().items():
        mark = rec.get("other_config", {}).get(MARK)
        if mark is None or alive(mark):
            continue
        uuid = rec["uuid"]
        for vdi in api.destroy_vm(ref):
            vdi_uuid = pool.vdi_uuid(vdi)
            pool.destroy_vdi(vdi, vdi_uuid)
            gone.append(vdi_uuid)
        gone.append(uuid)
    for ref, rec in pool.vdi_records().items():
        mark = rec.get("other_config", {}).get(MARK)
        if mark is not None and not alive(mark):
            pool.destroy_vdi(ref, rec["uuid"])
            gone.append(rec["uuid"])
    return gone


def original_exists(pool: PoolApi, uuid: str) -> bool:
    try:
        pool.vm_by_uuid(uuid)
    except XapiError as e:
        if e.code == "UUID_INVALID":
            return False
        raise
    return True


def restore_vm(pool: PoolApi, repo: Repository, opts: RestoreVmOptions, say) -> Restored:
    points = find(repo, opts.vm)
    m = points.get(opts.at)
    config = points.load_config(m)
    for vtpm in config.get("vtpms", []):
        register(vtpm.get("contents", ""))
    chains = check_disks(repo, m, config)
    for uuid in clean_leftovers(pool):
        say("destroyed %s, left by an interrupted restore-vm" % uuid)
    builder = Builder(pool, marker())
    networks = builder.map_networks(config, opts.networks)
    sr_ref = pool.sr_ref(opts.sr)
    sr = pool.sr_uuid(sr_ref)  # to_sr takes a name or uuid
    preflight(pool, repo, m, config, sr_ref)
    name = opts.name or unique_name(pool, config["vm"]["name_label"], m.point)
    result = Restored("", name, m.point, m.vm_uuid, True)
    if name != (opts.name or config["vm"]["name_label"]):
        result.notes.append(
            "a VM named %s is in this pool: the restored VM is named %s (--name chooses "
            "another)" % (config["vm"]["name_label"], name)
        )
    keep_macs = not opts.new_macs and macs_free(pool, m.vm_uuid, config, result.notes)
    result.macs_changed = not keep_macs
    result.notes.extend(not_restored(config))
    try:  # SIGINT/SIGTERM/SIGHUP raise Interrupted here (signals.py)
        build(builder, repo, config, chains, sr, networks, keep_macs, result)
    except BaseException:
        say("restore-vm failed: destroying what it created (%s)" % builder.undo())
        raise
    if opts.start:
        try:
            builder.api.start_vm(builder.vm)
            result.started = True
        except XapiError as e:  # e.g. HOST_NOT_ENOUGH_FREE_MEMORY: the VM is whole, stays
            result.start_error = str(e)
    return result


def unique_name(pool: PoolApi, name: str, point: str) -> str:
    """The original's name when no VM of the pool has it (after a disaster: the same VM
    back, the nightly backup by name goes on), else "NAME (restored POINT)" (beside the
    original: two VMs of one name would make a backup by name ambiguous), numbered when
    that one is taken too."""
    taken = {vm["name_label"] for vm in pool.vm_records().values()}
    if name not in taken:
        return name
    candidate, n = "%s (restored %s)" % (name, point), 1
    while candidate in taken:
        n += 1
        candidate = "%s (restored %s, %d)" % (name, point, n)
    return candidate


def disk_name(disk: str, vm: str, new: str, userdevice: str) -> str | None:
    """A restored disk's name: its own, the original VM's name in it replaced by the new
    VM's ("demo-vm disk 0" restored as "copy": "copy disk 0")."""
    if new == vm:
        return disk or None
    if not disk:
        return "%s disk %s" % (new, userdevice)
    if vm and vm in disk:
        return disk.replace(vm, new, 1)
    return "%s %s" % (new, disk)


def macs_free(pool: PoolApi, source_vm: str, config: dict, notes: list[str]) -> bool:
    """Whether the point's MAC addresses may be kept: no VM of this pool holds one (the
    original, or a VM restored from it before; snapshots and templates never run)."""
    if original_exists(pool, source_vm):
        notes.append(
            "the original VM %s is still in this pool: the restored VM gets new MAC "
            "addresses" % source_vm
        )
        return False
    wanted = {v["MAC"].lower() for v in config["vifs"]}
    held: dict[str, str] = {}
    vms = pool.vm_records()
    for vif in pool.vif_records().values():
        vm = vms.get(vif["VM"])
        if vm is None or vm["is_a_snapshot"] or vm["is_a_template"]:
            continue
        if vif["MAC"].lower() in wanted:
            held[vif["MAC"].lower()] = "%s (%s)" % (vm["name_label"], vm["uuid"])
    if held:
        notes.append(
            "MAC addresses %s are held by VM %s in this pool: the restored VM gets new "
            "MAC addresses" % (", ".join(sorted(held)), ", ".join(sorted(set(held.values()))))
        )
        return False
    return True


def not_restored(config: dict) -> list[str]:
    """Notes on what the point holds no way to restore."""
    return ["not restored: %s" % what for what in config.get("not_captured", [])]


def preflight(pool: PoolApi, repo: Repository, m: VmManifest, config: dict, sr: str) -> None:
    """What would make a later call fail, checked before anything is created."""
    restrictions = VmBuildApi(pool).pool_restrictions()
    # features.ml: both are Negative features, enabled only by "false"; a missing key is
    # restricted (neither is in enabled_when_unknown).
    if config.get("vtpms") and restrictions.get("restrict_vtpm") != "false":
        raise CliError(
            "the VM has a vTPM and this pool's licence does not allow vTPMs "
            "(pool restrictions: restrict_vtpm=%s; xapi_vtpm.ml assert_not_restricted): "
            "license the pool or restore elsewhere; nothing was created"
            % restrictions.get("restrict_vtpm", "(unset)")
        )
    for vif in config["vifs"]:
        locked = vif.get("locking_mode") == "locked"
        if (locked or vif.get("ipv4_allowed") or vif.get("ipv6_allowed")) and restrictions.get(
            "restrict_vif_locking"
        ) != "false":
            raise CliError(
                "VIF %s has locking mode %s (ipv4_allowed %s, ipv6_allowed %s) and this "
                "pool's licence does not allow VIF locking (pool restrictions: "
                "restrict_vif_locking=%s; xapi_vif_helpers.ml assert_locking_licensed): "
                "license the pool; nothing was created"
                % (
                    vif["device"],
                    vif.get("locking_mode"),
                    vif.get("ipv4_allowed") or "none",
                    vif.get("ipv6_allowed") or "none",
                    restrictions.get("restrict_vif_locking", "(unset)"),
                )
            )
    check_space(pool, repo, m, sr)


def check_space(pool: PoolApi, repo: Repository, m: VmManifest, sr: str) -> None:
    """The SR must have room for the disks: their virtual sizes on a thick SR, their
    data (in 2 MiB VHD blocks) on a thin one.  physical_size - physical_utilisation is
    what xapi knows the SR has free; it lags a little behind the storage (SR.scan)."""
    rec = pool.sr_record(sr)
    thick = rec["type"] in THICK_TYPES and rec.get("sm_config", {}).get("allocation") != "thin"
    need = 0
    for d in m.disks:
        chain = repo.chain(m.vm_uuid, d["vdi_uuid"])
        point = chain.get(d["point"])
        size = point.virtual_size
        need += size if thick else min(size, data_size(chain.image_path(point.point)))
    free = int(rec["physical_size"]) - int(rec["physical_utilisation"])
    if need > free:
        raise CliError(
            "SR %s has %s free and the disks need %s (%s): free space there or choose "
            "another SR (--to-sr); nothing was created"
            % (
                rec["name_label"],
                gib(free),
                gib(need),
                "their virtual sizes: a %s SR allocates them whole" % rec["type"]
                if thick
                else "their data: a thin %s SR allocates what is written" % rec["type"],
            )
        )


def data_size(path) -> int:
    """Bytes of 2 MiB blocks holding data in the point (its whole chain): what a restore
    writes into a new VDI on a thin SR, zeros skipped."""
    options, name = image.opening(path)
    extents = json.loads(command.run(["qemu-img", "map", "--output=json", "-U", *options, name]))
    blocks: set[int] = set()
    for e in extents:
        if e.get("data") and not e.get("zero"):
            first, last = e["start"] // VHD_BLOCK, (e["start"] + e["length"] - 1) // VHD_BLOCK
            blocks.update(range(first, last + 1))
    return len(blocks) * VHD_BLOCK


def gib(n: int) -> str:
    return "%.1f GiB" % (n / (1 << 30)) if n >= 1 << 30 else "%d MiB" % (n >> 20)


def check_disks(repo: Repository, m: VmManifest, config: dict) -> dict[str, dict]:
    """userdevice -> disk entry; every disk's point must exist before anything starts."""
    chains = {}
    for d in m.disks:
        repo.chain(m.vm_uuid, d["vdi_uuid"]).get(d["point"])
        chains[d["userdevice"]] = d
    for row in config["vbds"]:
        if row.get("vdi_uuid") and row["userdevice"] not in chains:
            raise RepositoryError(
                "VM point %s has no disk point for userdevice %s" % (m.point, row["userdevice"])
            )
    return chains


def build(builder, repo, config, chains, sr, networks, keep_macs, result) -> None:
    builder.create_vm(config, result.name)
    result.vm_uuid = builder.pool.vm_uuid(builder.vm)
    builder.bios_strings(config["vm"].get("bios_strings", {}), result.notes)
    for row in sorted(config["vbds"], key=lambda r: r["userdevice"]):
        vdi = NULL_REF
        if row.get("vdi_uuid"):
            d = chains[row["userdevice"]]
            saved = config["vdis"].get(row["vdi_uuid"], {})
            name = disk_name(
                saved.get("name_label", ""),
                config["vm"]["name_label"],
                result.name,
                row["userdevice"],
            )
            vdi = builder.disk(repo, d, sr, name, saved)
            result.disks.append({"userdevice": row["userdevice"], "vdi_uuid": builder.vdis[-1][1]})
        elif row.get("type") == "CD":
            vdi = builder.iso(row, result.notes)
        testhook.pause("restore-vm-device")
        builder.vbd(row, vdi)
    for vif in sorted(config["vifs"], key=lambda v: int(v["device"])):
        builder.vif(vif, networks[vif["network"]["uuid"]], keep_macs)
    for vtpm in config.get("vtpms", []):
        builder.vtpm(vtpm, result)
    builder.finish()
