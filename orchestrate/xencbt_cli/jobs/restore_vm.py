"""restore-vm: rebuild a whole VM from a VM point (repo/vmpoints.py).

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

This module checks and decides; vm_builder.py creates the VM and its devices and undoes
them; what either asks of the pool is in xapi/ (facade.py, vmbuild.py).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid as uuidlib
from dataclasses import dataclass, field

from xencbt_core.errors import XapiError
from xencbt_core.secret import register

from ..errors import CliError, RepositoryError
from ..proc import command, testhook
from ..repo import image
from ..repo.repository import Repository
from ..repo.vmpoints import VmManifest, VmPoints, all_vm_points
from ..xapi.facade import NULL_REF, PoolApi
from ..xapi.vmbuild import VmBuildApi
from .vm_builder import MARK, Builder, Restored

log = logging.getLogger(__name__)

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
    # Added to the other_config of the VM and the disks it creates, and kept there once
    # the VM is whole (a drill's mark: jobs/drill.py finds what a dead drill left by it).
    other_config: dict[str, str] = field(default_factory=dict)


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
    builder = Builder(pool, marker(), opts.other_config)
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
    try:  # SIGINT/SIGTERM/SIGHUP raise Interrupted here (proc/signals.py)
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
