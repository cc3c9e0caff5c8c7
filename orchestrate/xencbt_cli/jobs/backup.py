"""The backup workflow: per VM one snapshot, per disk a full or incremental point.

    enable CBT where needed → VM.snapshot "xencbt-<point>" → per disk: decide (and say
    why a full is needed) → copy every disk through one nbdkit with the plugin (vm=: one
    XAPI login, one connection budget; one qemu-img per export) → per disk: chunk digests
    (all for a full, only the changed chunks for an incremental: repo/digest.py) → sums →
    manifest → VM.destroy the snapshot, VDI.data_destroy its disks (their CBT log is the
    next base) → destroy the older base no chain needs any more.

Each disk's plan, the copy, its digests and manifest: backup_disks.py; the VM's
configuration for its VM point: xapi/vmconfig.py.

On failure the snapshot VM and the VDIs no manifest refers to are destroyed, partial
files removed; the repository keeps every point it had.  SIGINT, SIGTERM and SIGHUP do the
same (the copies are stopped first, proc/children.py) and each VM says in one line what was
undone.  A run killed outright (SIGKILL,
power loss) leaves at most temp files, which the next run of the chain removes, and
snapshots on the pool, which the next backup of the VM destroys: the snapshot VM by its
name prefix, its VDIs through the ledger (repo/ledger.py).

The host refuses to destroy a VDI while dom0 still unplugs the VBDs of the copy's NBD
connections (``VDI_IN_USE``): those calls are retried (inuse.py), and clean-up that lags
past ``--in-use-timeout`` is a warning, never a failed backup; the ledger finishes it.
A disk that cannot have CBT (licence, SR) is backed up in full every time, saying why.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field

from xencbt_core.errors import XapiError, XencbtError
from xencbt_core.secret import scrub

from .. import errors
from ..errors import CliError, Interrupted, describe_os_error
from ..proc import testhook
from ..proc.children import GROUP
from ..repo import vmpoints
from ..repo.ledger import Ledger
from ..repo.manifest import Manifest, new_point_id
from ..repo.repository import Chain, Repository
from ..repo.vmpoints import VmManifest, VmPoints
from ..xapi import vmconfig
from ..xapi.facade import NO_SNAPSHOT, SNAPSHOT_PREFIX, CleanupLagged, NoCbt, PoolApi, Vm, VmDisk
from . import canary
from .backup_disks import DiskBackup
from .snapshot_copy import Copier, HostBudget

log = logging.getLogger(__name__)

Say = Callable[[str], None]


@dataclass
class VmResult:
    vm: str
    vm_uuid: str = ""
    point: str = ""
    ok: bool = False
    error: str = ""
    exit_code: int = 0
    disks: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    in_use_retries: int = 0  # calls tried again after VDI_IN_USE (dom0's NBD VBDs)
    undone: list[str] = field(default_factory=list)  # what a failure took back
    locked: bool = False  # the VM's chains were locked: its run had begun
    vtpm: str = ""  # where the VM point's vTPM contents came from (xapi/vmconfig.py), if any
    not_captured: list[str] = field(default_factory=list)  # devices no VM point carries


class Backup:
    def __init__(
        self,
        pool: PoolApi,
        repo: Repository,
        copier: Copier,
        say: Say,
        full: bool = False,
        wait: bool = False,
        jobs: int = 1,
        budget: HostBudget | None = None,
        canary_blocks: int = canary.DEFAULT_BLOCKS,
    ):
        self.pool = pool
        self.repo = repo
        self.say = say
        self.wait = wait
        self.jobs = max(1, jobs)
        self.no_cbt: dict[str, NoCbt] = {}  # disk uuid -> why it has no CBT (this run)
        # Each disk's plan, the copy, each disk's digests and manifest (backup_disks.py).
        self.disk_backup = DiskBackup(pool, repo, copier, say, full, self.no_cbt, canary_blocks)
        if budget is not None:  # a cluster run's (jobs/cluster_budget.py)
            self.disk_backup.budget = budget

    def run(self, vms: list[str]) -> list[VmResult]:
        self.repo.create()
        futures: list[Future] = []
        try:
            with ThreadPoolExecutor(max_workers=self.jobs) as pool:
                for name in vms:
                    futures.append(pool.submit(self.one, name))
                wait(futures)
        except Interrupted as e:
            self.after_stop(vms, futures, e)
            e.reported = True
            raise
        return [f.result() for f in futures]

    def after_stop(self, vms: list[str], futures: list[Future], e: Interrupted) -> None:
        """One line per VM whatever the moment the signal came.  The handler stopped the
        copies; each VM's thread undoes its work and says so (waited for here: the signal
        may have cut short the pool's own wait, and the handlers now ignore a second one).
        A VM whose backup was complete before the signal, or that was never handed to a
        thread, says so here."""
        for f in futures:
            if f.exception() is None and (result := f.result()).ok:
                self.say(
                    "VM %s: interrupted by %s after its backup completed: point %s kept"
                    % (result.vm, e.name, result.point)
                )
        for name in vms[len(futures) :]:
            self.say("VM %s: interrupted by %s: %s" % (name, e.name, undone(VmResult(name))))

    def one(self, name: str) -> VmResult:
        result = VmResult(name)
        retries = self.pool.in_use.retries_here
        try:
            GROUP.check()
            self.backup_vm(name, result)
            result.ok = True
            testhook.pause("backup-vm-done")
        except Interrupted as e:
            self.interrupted(result, e)
        except Exception as e:
            if GROUP.signum is not None:
                # It failed because the stop signal took its copies or calls away: what
                # the user asked for, not a failure of its own.
                log.debug("VM %s: stopped while %s", name, type(e).__name__, exc_info=True)
                self.interrupted(result, Interrupted(GROUP.signum))
            elif isinstance(e, (XencbtError, OSError)):
                text = describe_os_error(e) if isinstance(e, OSError) else str(e)
                result.error = scrub(text)
                result.exit_code = errors.exit_code(e)
                self.say("VM %s: backup FAILED: %s" % (name, result.error))
            else:
                raise
        finally:
            result.in_use_retries = self.pool.in_use.retries_here - retries
        return result

    def interrupted(self, result: VmResult, e: Interrupted) -> None:
        result.error, result.exit_code = "interrupted", e.exit_code
        self.say("VM %s: interrupted by %s: %s" % (result.vm, e.name, undone(result)))

    def warn(self, result: VmResult, text: str) -> None:
        result.warnings.append(scrub(text))
        self.say("VM %s: warning: %s" % (result.vm, text))

    def pick(self, name: str, result: VmResult):
        """The VM ``name`` means.  Of several VMs sharing a name (one restored beside its
        original, say), the one with points in this repository, said; with none or more
        than one of them there, the VM fails naming their uuids (PoolApi.vm)."""
        vms = self.pool.vms(name)
        if len(vms) < 2:
            return self.pool.vm(name)
        known = [v for v in vms if any(c.points() for c in self.repo.vm_chains(v.uuid))]
        if len(known) != 1:
            return self.pool.vm(name)
        others = ", ".join(sorted(v.uuid for v in vms if v is not known[0]))
        self.warn(
            result,
            "%d VMs are named %s: backing up %s, the one with points in %s (not %s); give "
            "a uuid to choose" % (len(vms), name, known[0].uuid, self.repo.root, others),
        )
        return known[0]

    def backup_vm(self, name: str, result: VmResult) -> None:
        vm = self.pick(name, result)
        result.vm_uuid = vm.uuid
        refuse_vusbs(self.pool, vm)
        disks = self.pool.disks(vm.ref)
        chains = {d.uuid: self.repo.chain(vm.uuid, d.uuid) for d in disks}
        with contextlib.ExitStack() as locks:
            for uuid in sorted(chains):
                locks.enter_context(chains[uuid].lock(self.wait))
            result.locked = True
            self.clean(vm, chains)
            self.no_cbt.update(self.enable_cbt(vm, disks))
            GROUP.check()
            result.point = new_point_id()
            snap_vm = self.pool.snapshot(vm, SNAPSHOT_PREFIX + result.point)
            committed: set[str] = set()
            try:
                # Now, while the VM is still as it was at the snapshot: a unique vTPM's
                # contents are read from the live VM (vmconfig.py).
                config = vmconfig.capture(self.pool, snap_vm, vm.name, vm.ref)
                self.tell_capture(vm, config, result)
                snaps = {d.snapshot_of: d for d in self.pool.disks(snap_vm)}
                self.ledger(vm).add({d.uuid for d in snaps.values()})
                work = [
                    self.disk_backup.prepare(vm, d, snaps[d.vdi_ref], chains[d.uuid]) for d in disks
                ]
                with contextlib.ExitStack() as files:
                    for w in work:
                        files.enter_context(
                            self.disk_backup.unpublished(
                                w.chain, result.point, w.what, result.undone
                            )
                        )
                        w.chain.reserve(result.point)
                    GROUP.check()
                    self.disk_backup.copy(vm, snap_vm, work, result.point)
                    for w in work:
                        GROUP.check()
                        prev = w.chain.latest()
                        m = self.disk_backup.finish(vm, w, result.point)
                        if w.disk.uuid not in self.no_cbt:  # no CBT log to keep: it goes
                            committed.add(m.snapshot_uuid)
                        result.disks.append(summary(m, prev))
                        if canary.failed(m.canary):  # a full instead: said loudly
                            self.warn(result, "disk %s: %s" % (m.userdevice, m.reason))
                GROUP.check()
                self.commit_vm_point(vm, config, result)
            except BaseException:
                self.release(snap_vm, committed, result)
                result.undone.append("snapshot %s destroyed" % (SNAPSHOT_PREFIX + result.point))
                raise
            self.release(snap_vm, committed, result)
            self.forget_old_bases(result.disks, result)
            self.sweep(vm)

    def tidy(self, name: str) -> None:
        """Only the clean-up a backup of ``name`` starts with (its chains' leftovers, its
        snapshots on the pool): after a cluster task whose every attempt died."""
        vm = self.pool.vm(name)
        chains = {d.uuid: self.repo.chain(vm.uuid, d.uuid) for d in self.pool.disks(vm.ref)}
        with contextlib.ExitStack() as locks:
            for uuid in sorted(chains):
                locks.enter_context(chains[uuid].lock(self.wait))
            self.clean(vm, chains)

    def tell_capture(self, vm: Vm, config: dict, result: VmResult) -> None:
        """Say where a vTPM's contents came from and which devices the point lacks."""
        for vtpm in config["vtpms"]:
            # Read from the live VM: said in the summary (commands/report.py), not on stderr, which
            # cron mails every night; a blank TPM is a warning.
            result.vtpm = vtpm["contents_from"]
            if vtpm["contents_from"] == vmpoints.FROM_NOWHERE:
                self.warn(
                    result,
                    "its unique vTPM's contents could not be read (%s; xapi does not copy "
                    "a unique vTPM into a snapshot): a VM restored from this point gets a "
                    "blank TPM" % vtpm["why"],
                )
        result.not_captured = list(config["not_captured"])
        for what in result.not_captured:
            self.say("VM %s: not in the VM point: %s" % (vm.name, what))

    def commit_vm_point(self, vm: Vm, config: dict, result: VmResult) -> None:
        """The VM's configuration, captured right after the snapshot of its disks, then
        the VM manifest, last: only then does the VM point exist (repo/vmpoints.py)."""
        points = VmPoints(self.repo, vm.uuid)
        digest_ = points.write_config(result.point, config)
        disks = [
            {"userdevice": d["userdevice"], "vdi_uuid": d["vdi_uuid"], "point": d["point"]}
            for d in result.disks
        ]
        manifest = VmManifest(
            result.point,
            vm.uuid,
            vm.name,
            disks,
            points.config_path(result.point).name,
            digest_,
        )
        points.commit(manifest)

    def release(self, snap_vm: str, committed: set[str], result: VmResult) -> None:
        """Destroy the snapshot VM; its VDIs keep only CBT metadata (committed) or go.

        When the host still holds one after every retry (dom0's NBD VBDs), the points are
        committed all the same: the VDI stays in the ledger and the next run cleans it."""
        try:
            self.pool.destroy_snapshot(snap_vm, keep=committed)
        except CleanupLagged as e:
            self.warn(result, lagging(e, self.pool.in_use.timeout))

    def enable_cbt(self, vm: Vm, disks: list[VmDisk]) -> dict[str, NoCbt]:
        """Enable CBT where it is off; the disks that cannot have it (licence, SR, raw
        VDI, reset on boot) are backed up in full, unless the host cannot even snapshot
        them (raw, reset on boot): then the VM cannot be backed up through a snapshot."""
        no_cbt = {}
        for disk in disks:
            if not disk.cbt_enabled:
                why = self.pool.enable_cbt(disk)
                if why is not None:
                    no_cbt[disk.uuid] = why
        for disk in disks:
            why = no_cbt.get(disk.uuid)
            if why is not None and why.code in NO_SNAPSHOT:
                raise CliError(
                    "disk %s (VDI %s) cannot be backed up: %s, and XenServer can neither "
                    "track nor snapshot such a disk (%s), so VM.snapshot fails; make it a "
                    "VHD-based, on-boot=persist disk, or detach it"
                    % (disk.userdevice, disk.uuid, why.why, why.code)
                )
        return no_cbt

    def ledger(self, vm: Vm) -> Ledger:
        return Ledger(self.repo.root / vm.uuid)

    def clean(self, vm: Vm, chains: dict[str, Chain]) -> None:
        """Leftovers of an interrupted run: files, and snapshots on the host."""
        for chain in chains.values():
            chain.clean()
        for path in VmPoints(self.repo, vm.uuid).strays():  # a run killed before its
            path.unlink()  # VM manifest: its configuration alone is no VM point
        needed = self.repo.needed_snapshots()
        for ref in self.pool.leftover_snapshots(vm):
            self.say("VM %s: destroying snapshot left by an interrupted run" % vm.name)
            try:
                self.pool.destroy_snapshot(ref, keep=needed)
            except CleanupLagged as e:
                log.warning("VM %s: %s", vm.name, lagging(e, self.pool.in_use.timeout))
        self.sweep(vm)

    def sweep(self, vm: Vm) -> None:
        """Destroy the VM's snapshot VDIs (ledger) no chain needs; make sure the needed
        ones hold only CBT metadata.  A VDI the pool refuses to destroy stays listed and
        is tried again next time: cleaning up never fails a backup."""
        ledger = self.ledger(vm)
        needed = self.repo.needed_snapshots()
        gone = set()
        for uuid in sorted(ledger.load()):
            try:
                ref = self.pool.vdi_ref(uuid)
                if ref is None:
                    gone.add(uuid)
                elif uuid not in needed:
                    self.pool.destroy_vdi(ref, uuid)
                    gone.add(uuid)
                elif self.pool.vdi_type(ref) != "cbt_metadata":
                    self.pool.data_destroy(ref, uuid)
            except XapiError as e:
                # The code only: the parameters are refs, which never reach the output.
                log.warning("VM %s: snapshot VDI %s stays for now: %s", vm.name, uuid, e.code)
        ledger.discard(gone)

    def forget_old_bases(self, disks: list[dict], result: VmResult) -> None:
        """Destroy CBT metadata VDIs no chain of the repository diffs against any more
        (one the host still holds stays in the ledger for the next run)."""
        needed = self.repo.needed_snapshots()
        for d in disks:
            old = d.get("previous_snapshot")
            if old and old not in needed:
                ref = self.pool.vdi_ref(old)
                if ref is None or not self.pool.vdi_is_snapshot(ref):
                    continue
                try:
                    self.pool.destroy_vdi(ref, old)
                except XapiError as e:
                    if e.code != "VDI_IN_USE":
                        raise
                    Ledger(self.repo.root / result.vm_uuid).add({old})  # the next run's job
                    self.warn(result, lagging(CleanupLagged([old], e), self.pool.in_use.timeout))


def refuse_vusbs(pool: PoolApi, vm: Vm) -> None:
    """xapi refuses to snapshot a VM with a VUSB (VM_HAS_VUSBS, xapi_vm_lifecycle.ml
    check_operation_error), whatever its power state: say so before anything changes."""
    vusbs = pool.vm_record(vm.ref).get("VUSBs", [])
    if vusbs:
        raise CliError(
            "VM %s cannot be backed up: it has %d USB device(s) passed through (VUSB) and "
            "XenServer refuses to snapshot such a VM (VM_HAS_VUSBS); detach them "
            "(xe vusb-unplug, xe vusb-destroy) and back it up again; nothing was changed"
            % (vm.name, len(vusbs))
        )


def lagging(e: CleanupLagged, timeout: float) -> str:
    return (
        "the host still holds snapshot VDI(s) %s (VDI_IN_USE for %g s: dom0 is still "
        "unplugging NBD connections); the backup is complete, the next backup of this VM "
        "cleans them up" % (", ".join(e.uuids), timeout)
    )


def summary(m: Manifest, prev: Manifest | None) -> dict:
    d = asdict(m)
    d["previous_snapshot"] = prev.snapshot_uuid if prev else None
    return d


def undone(result: VmResult) -> str:
    """What an interrupted VM's run took back, and what it kept, in one line."""
    if not result.locked:
        return "not started, nothing to undo"
    parts = result.undone or ["nothing was started on the pool"]
    kept = ["disk %s" % d["userdevice"] for d in result.disks]
    if kept:
        parts.append("point %s kept for %s" % (result.point, ", ".join(kept)))
    return "; ".join(parts) + "; locks released"
