"""restore-vm: rebuild a whole VM from a VM point (vmpoint.py).

    map every VIF's network (--network FROM=TO, else the same uuid, else the same name):
    an unmappable one fails before anything is created → VM.create (start blocked) →
    each disk through the verified disk restore (transfer.to_sr) → VBDs in the same
    userdevice order and boot flags, empty CD drives → VIFs → vTPM → unblock → [start]

Everything the run creates carries ``other_config[xencbt-restore] = <run id>@<host>:<pid>``
until the VM is complete: a failure or SIGINT/SIGTERM destroys it all at once; after a
SIGKILL the next restore-vm or ``xencbt repair`` with pool options finds the marks of dead
runs and destroys those VMs (with their disks) and VDIs.  The VM's mark goes last, so a
VM without it is whole.  The repository is only read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid as uuidlib
from dataclasses import dataclass, field

from xencbt_core.errors import XapiError, XencbtError
from xencbt_core.secret import register

from . import testhook
from .errors import CliError, RepositoryError
from .pool import Pool
from .repository import UUID, Repository
from .transfer import resolve_sr, to_sr
from .vmpoint import NULL_REF, VmManifest, VmPoints, all_vm_points

log = logging.getLogger(__name__)

MARK = "xencbt-restore"
BLOCKED = ("start", "start_on", "resume", "resume_on")
WHY = "xencbt restore-vm is building this VM"


@dataclass
class Options:
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

    def __init__(self, pool: Pool, mark: str):
        self.pool = pool
        self.call = pool.call
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
                return self.call("network.get_by_uuid", name)
        refs = self.call("network.get_by_name_label", name)
        if len(refs) > 1:
            raise CliError("%d networks are named %s: give its uuid" % (len(refs), name))
        if not refs:
            raise CliError("no network %s in this pool (xe network-list)" % name)
        return refs[0]

    def same_network(self, net: dict) -> str | None:
        with contextlib.suppress(XapiError):
            return self.call("network.get_by_uuid", net["uuid"])
        refs = self.call("network.get_by_name_label", net["name_label"])
        return refs[0] if len(refs) == 1 else None

    def create_vm(self, config: dict, name: str) -> str:
        record = {k: wire(v) for k, v in config["vm"].items()}
        record["name_label"] = name
        record["other_config"] = {**config["vm"].get("other_config", {}), MARK: self.mark}
        record["blocked_operations"] = dict.fromkeys(BLOCKED, WHY)
        for value in config["vm"].get("NVRAM", {}).values():
            register(str(value))
        self.vm = self.call("VM.create", record)
        return self.vm

    def disk(self, repo: Repository, d: dict, sr: str, vdi_rec: dict) -> str:
        name = vdi_rec.get("name_label") or None
        m, uuid = to_sr(self.pool, repo, d["vdi_uuid"], d["point"], sr, name, {MARK: self.mark})
        ref = self.call("VDI.get_by_uuid", uuid)
        self.vdis.append((ref, uuid))
        return ref

    def vbd(self, row: dict, vdi: str) -> None:
        record = {
            "VM": self.vm,
            "VDI": vdi,
            "userdevice": row["userdevice"],
            "bootable": bool(row.get("bootable")),
            "mode": row.get("mode", "RW"),
            "type": row.get("type", "Disk"),
            "empty": vdi == NULL_REF,
            "unpluggable": bool(row.get("unpluggable", True)),
            "other_config": {},
            "qos_algorithm_type": "",
            "qos_algorithm_params": {},
        }
        self.call("VBD.create", record)

    def vif(self, vif: dict, network: str, keep_mac: bool) -> str:
        record = {
            "device": vif["device"],
            "network": network,
            "VM": self.vm,
            "MAC": vif["MAC"] if keep_mac else "",
            "MTU": str(vif.get("MTU", 1500)),
            "other_config": {},
            "qos_algorithm_type": "",
            "qos_algorithm_params": {},
            "locking_mode": vif.get("locking_mode", "network_default"),
            "ipv4_allowed": vif.get("ipv4_allowed", []),
            "ipv6_allowed": vif.get("ipv6_allowed", []),
        }
        ref = self.call("VIF.create", record)
        return self.call("VIF.get_MAC", ref)

    def vtpm(self, vtpm: dict) -> None:
        register(vtpm["contents"])
        ref = self.call("VTPM.create", self.vm, bool(vtpm.get("is_unique")))
        if vtpm["contents"]:
            self.call("VTPM.set_contents", ref, vtpm["contents"])

    def finish(self) -> None:
        """Unblock, then drop the marks: the VDIs' first, the VM's last (a VM without
        its mark is whole)."""
        for op in BLOCKED:
            self.call("VM.remove_from_blocked_operations", self.vm, op)
        for ref, _ in self.vdis:
            self.call("VDI.remove_from_other_config", ref, MARK)
        testhook.pause("restore-vm-commit")
        self.call("VM.remove_from_other_config", self.vm, MARK)

    def marked_vdis(self) -> list[tuple[str, str]]:
        """VDIs of this run not yet known to it: one whose restore was interrupted."""
        known = {ref for ref, _ in self.vdis}
        try:
            records = self.call("VDI.get_all_records")
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
                destroy_vm(self.pool, self.vm)
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


def destroy_vm(pool: Pool, vm: str, keep_out: list[str] | None = None) -> list[str]:
    """Shut down and destroy a VM; returns its disks' VDI refs (not destroyed here)."""
    call = pool.call
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


def clean_leftovers(pool: Pool) -> list[str]:
    """Destroy what killed restore-vm runs left (marked, run no longer alive): VMs with
    their disks, then marked VDIs.  Returns the uuids destroyed."""
    call = pool.call
    gone = []
    for ref, rec in call("VM.get_all_records").items():
        mark = rec.get("other_config", {}).get(MARK)
        if mark is None or alive(mark):
            continue
        uuid = rec["uuid"]
        for vdi in destroy_vm(pool, ref):
            vdi_uuid = call("VDI.get_uuid", vdi)
            pool.destroy_vdi(vdi, vdi_uuid)
            gone.append(vdi_uuid)
        gone.append(uuid)
    for ref, rec in call("VDI.get_all_records").items():
        mark = rec.get("other_config", {}).get(MARK)
        if mark is not None and not alive(mark):
            pool.destroy_vdi(ref, rec["uuid"])
            gone.append(rec["uuid"])
    return gone


def original_exists(pool: Pool, uuid: str) -> bool:
    try:
        pool.call("VM.get_by_uuid", uuid)
    except XapiError as e:
        if e.code == "UUID_INVALID":
            return False
        raise
    return True


def restore_vm(pool: Pool, repo: Repository, opts: Options, say) -> Restored:
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
    sr = pool.call("SR.get_uuid", resolve_sr(pool, opts.sr))  # to_sr takes a name or uuid
    exists = original_exists(pool, m.vm_uuid)
    keep_macs = not (opts.new_macs or exists)
    name = opts.name or config["vm"]["name_label"]
    result = Restored("", name, m.point, m.vm_uuid, not keep_macs)
    if exists and not opts.new_macs:
        result.notes.append(
            "the original VM %s is still in this pool: the restored VM gets new MAC "
            "addresses" % m.vm_uuid
        )
    try:  # SIGINT/SIGTERM/SIGHUP raise Interrupted here (signals.py)
        build(builder, repo, config, chains, sr, networks, keep_macs, result)
    except BaseException:
        say("restore-vm failed: destroying what it created (%s)" % builder.undo())
        raise
    if opts.start:
        pool.call("VM.start", builder.vm, False, False)
        result.started = True
    return result


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
    result.vm_uuid = builder.call("VM.get_uuid", builder.vm)
    for row in sorted(config["vbds"], key=lambda r: r["userdevice"]):
        vdi = NULL_REF
        if row.get("vdi_uuid"):
            d = chains[row["userdevice"]]
            vdi = builder.disk(repo, d, sr, config["vdis"].get(row["vdi_uuid"], {}))
            result.disks.append({"userdevice": row["userdevice"], "vdi_uuid": builder.vdis[-1][1]})
        testhook.pause("restore-vm-device")
        builder.vbd(row, vdi)
    for vif in sorted(config["vifs"], key=lambda v: int(v["device"])):
        builder.vif(vif, networks[vif["network"]["uuid"]], keep_macs)
    for vtpm in config.get("vtpms", []):
        builder.vtpm(vtpm)
    builder.finish()
