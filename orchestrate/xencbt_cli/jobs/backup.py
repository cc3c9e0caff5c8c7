"""The backup workflow: per VM one snapshot, per disk a full or incremental point.

    enable CBT where needed → VM.snapshot "xencbt-<point>" → per disk: decide (and say
    why a full is needed) → copy every disk through one nbdkit with the plugin (vm=: one
    XAPI login, one connection budget; one qemu-img per export) → per disk: chunk digests
    (all for a full, only the changed chunks for an incremental: digest.py) → sums →
    manifest → VM.destroy the snapshot, VDI.data_destroy its disks (their CBT log is the
    next base) → destroy the older base no chain needs any more.

On failure the snapshot VM and the VDIs no manifest refers to are destroyed, partial
files removed; the repository keeps every point it had.  SIGINT, SIGTERM and SIGHUP do the
same (the copies are stopped first, children.py) and each VM says in one line what was
undone.  A run killed outright (SIGKILL,
power loss) leaves at most temp files, which the next run of the chain removes, and
snapshots on the pool, which the next backup of the VM destroys: the snapshot VM by its
name prefix, its VDIs through the ledger (ledger.py).

The host refuses to destroy a VDI while dom0 still unplugs the VBDs of the copy's NBD
connections (``VDI_IN_USE``): those calls are retried (inuse.py), and clean-up that lags
past ``--in-use-timeout`` is a warning, never a failed backup; the ledger finishes it.
A disk that cannot have CBT (licence, SR) is backed up in full every time, saying why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xencbt_core.cbt import Bitmap
from xencbt_core.errors import ConfigError, XapiError, XencbtError
from xencbt_core.secret import scrub

from .. import errors
from ..errors import (
    CliError,
    Interrupted,
    RepositoryFull,
    describe_os_error,
    out_of_space,
)
from ..proc import progress, testhook
from ..proc.children import GROUP
from ..repo import digest, image, vmpoints
from ..repo.ledger import Ledger
from ..repo.repository import Chain, Manifest, Repository, new_point_id
from ..repo.vmpoints import VmManifest, VmPoints
from ..text import human
from ..xapi import vmconfig
from ..xapi.facade import NO_SNAPSHOT, SNAPSHOT_PREFIX, CleanupLagged, NoCbt, PoolApi, Vm, VmDisk
from .snapshot_copy import ConnectionBudget, Copier, DiskCopy

log = logging.getLogger(__name__)

Say = Callable[[str], None]


@dataclass
class Plan:
    """How one disk is backed up: incremental from ``base`` or full because of ``reason``."""

    base: Manifest | None = None
    reason: str | None = None
    changed_bytes: int = 0
    bitmap: Bitmap | None = None  # what the copy reads: the chunks to rehash
    base_sums: bytes | None = None  # the base's recorded chunk digests, carried over


@dataclass
class Work:
    """One disk of a VM backup between its plan and its manifest."""

    disk: VmDisk
    snap: VmDisk
    chain: Chain
    plan: Plan
    what: str
    started: str = ""
    copy_seconds: float = 0.0

    def copy(self, point: str) -> DiskCopy:
        # The export's name: its userdevice; the VDI uuid when that is not a plain number.
        export = self.snap.userdevice if self.snap.userdevice.isdigit() else self.snap.uuid
        base = self.chain.image_path(self.plan.base.point) if self.plan.base else None
        partial = self.chain.partial_path(point)
        return DiskCopy(export, partial, base, size=self.snap.virtual_size)


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
    vtpm: str = ""  # where the VM point's vTPM contents came from (vmpoints.py), if any
    not_captured: list[str] = field(default_factory=list)  # devices no VM point carries


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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
    ):
        self.pool = pool
        self.repo = repo
        self.copier = copier
        self.say = say
        self.full = full
        self.wait = wait
        self.jobs = max(1, jobs)
        self.budget = ConnectionBudget()
        self.no_cbt: dict[str, NoCbt] = {}  # disk uuid -> why it has no CBT (this run)
        self.chunk = digest.chunk_size()

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
                work = [self.prepare(vm, d, snaps[d.vdi_ref], chains[d.uuid]) for d in disks]
                with contextlib.ExitStack() as files:
                    for w in work:
                        files.enter_context(
                            self.unpublished(w.chain, result.point, w.what, result.undone)
                        )
                        w.chain.reserve(result.point)
                    GROUP.check()
                    self.copy(vm, snap_vm, work, result.point)
                    for w in work:
                        GROUP.check()
                        prev = w.chain.latest()
                        m = self.finish(vm, w, result.point)
                        if w.disk.uuid not in self.no_cbt:  # no CBT log to keep: it goes
                            committed.add(m.snapshot_uuid)
                        result.disks.append(summary(m, prev))
                GROUP.check()
                self.commit_vm_point(vm, config, result)
            except BaseException:
                self.release(snap_vm, committed, result)
                result.undone.append("snapshot %s destroyed" % (SNAPSHOT_PREFIX + result.point))
                raise
            self.release(snap_vm, committed, result)
            self.forget_old_bases(result.disks, result)
            self.sweep(vm)

    def tell_capture(self, vm: Vm, config: dict, result: VmResult) -> None:
        """Say where a vTPM's contents came from and which devices the point lacks."""
        for vtpm in config["vtpms"]:
            # Read from the live VM: said in the summary (report.py), not on stderr, which
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
        the VM manifest, last: only then does the VM point exist (vmpoints.py)."""
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

    def plan(self, disk: VmDisk, snap: VmDisk, chain: Chain) -> Plan:
        prev = chain.latest()
        if disk.uuid in self.no_cbt:
            return Plan(reason=self.no_cbt[disk.uuid].reason)
        if self.full:
            return Plan(reason="a full backup was asked for (--full)")
        if prev is None:
            return Plan(reason="first backup of this disk")
        if not disk.cbt_enabled:
            return Plan(
                reason="CBT was off on the VDI (host crash, storage migration or "
                "disabled by hand): it is enabled again, the next backup is incremental"
            )
        if not chain.image_path(prev.point).is_file():
            return Plan(reason="the image of the previous point %s is missing" % prev.point)
        if snap.virtual_size < prev.virtual_size:
            return Plan(
                reason="the disk shrank from %d to %d bytes"
                % (prev.virtual_size, snap.virtual_size)
            )
        base_ref = self.pool.vdi_ref(prev.snapshot_uuid)
        if base_ref is None:
            return Plan(
                reason="the base snapshot %s of point %s is no longer on the host"
                % (prev.snapshot_uuid, prev.point)
            )
        bitmap = self.pool.changed_blocks(base_ref, snap.vdi_ref)
        if bitmap is None:
            return Plan(
                reason="the CBT chain is broken since point %s (list_changed_blocks "
                "failed: CBT was reset or the log is inconsistent)" % prev.point
            )
        # Only the metadata is checked here, never the data (O(disk)): the unchanged
        # chunks' digests are carried over from the base's sums, recorded when its data
        # was good, so damage since then shows in verify of every point built on it.
        damage = chain_damage(chain, prev)
        if damage:
            return Plan(
                reason="the image of the previous point %s, or one it is backed by, is "
                "damaged (%s): run xencbt verify" % (prev.point, damage)
            )
        try:
            changes = Bitmap.from_base64(bitmap, snap.virtual_size)
        except ConfigError as e:
            # Damaged CBT metadata on the host: an incremental could miss changes.
            return Plan(reason="the host returned an unusable CBT bitmap (%s)" % e)
        if prev.digest and prev.chunk_size != self.chunk:
            return Plan(
                reason="the checksums of the previous point %s use %d-byte chunks, this run "
                "%d (XENCBT_CHUNK_SIZE)" % (prev.point, prev.chunk_size, self.chunk)
            )
        try:
            sums = digest.trusted_sums(
                prev, chain.image_path(prev.point), chain.sums_path(prev.point), self.chunk
            )
        except digest.SumsDamaged as e:
            return Plan(
                reason="the previous point %s cannot be built on, it is damaged (%s): run "
                "xencbt verify" % (prev.point, e)
            )
        return Plan(
            base=prev, changed_bytes=changes.changed_bytes(), bitmap=changes, base_sums=sums
        )

    def prepare(self, vm: Vm, disk: VmDisk, snap: VmDisk, chain: Chain) -> Work:
        plan = self.plan(disk, snap, chain)
        what = "VM %s disk %s (%s)" % (vm.name, disk.userdevice, disk.uuid)
        if plan.base:
            self.say(
                "%s: incremental since %s, %s changed"
                % (what, plan.base.point, human(plan.changed_bytes))
            )
        else:
            self.say("%s: FULL backup: %s" % (what, plan.reason))
        return Work(disk, snap, chain, plan, what)

    def copy(self, vm: Vm, snap_vm: str, work: list[Work], point: str) -> None:
        """All disks of the VM snapshot through one nbdkit (one XAPI login); the
        incremental ones since their base snapshot, the others whole (no base for them
        in since=).  Each disk has its progress line."""
        started, t0 = now_iso(), time.monotonic()
        hosts = sorted({h for w in work for h in self.pool.nbd_hosts(w.snap.vdi_ref)})
        since = [w.plan.base.snapshot_uuid for w in work if w.plan.base]
        uuid = self.pool.vm_uuid(snap_vm)
        with contextlib.ExitStack() as lines:
            copies = []
            for w in work:
                label = "%s disk %s: copy" % (vm.name, w.disk.userdevice)
                report = lines.enter_context(progress.percent(label, w.snap.virtual_size))
                copies.append(dataclasses.replace(w.copy(point), report=report))
            self.copier.copy_vm(self.budget, hosts, uuid, copies, since)
        for w in work:
            # The disks share one nbdkit run: each records the VM's copy time.
            w.started, w.copy_seconds = started, time.monotonic() - t0

    def finish(self, vm: Vm, w: Work, point: str) -> Manifest:
        t0 = time.monotonic()
        partial = w.chain.partial_path(point)
        label = "%s disk %s" % (vm.name, w.disk.userdevice)
        sums, hashed = self.content_sums(partial, w.plan, w.snap.virtual_size, label)
        final = w.chain.publish_image(point)
        manifest = self.manifest(vm, w.disk, w.snap, w.plan, point, sums, final, w.started)
        manifest.hashed_bytes = hashed
        manifest.seconds = round(w.copy_seconds + time.monotonic() - t0, 3)
        manifest.copy_seconds = round(w.copy_seconds, 3)
        manifest.ratio = manifest.compression_ratio()
        w.chain.commit(manifest, sums)
        return manifest

    def content_sums(self, partial: Path, plan: Plan, size: int, label: str) -> tuple[bytes, int]:
        """The new point's chunk digests and how many bytes of its image that read: all of
        it for a full (one pass), only the chunks the copy changed for an incremental."""
        if plan.base is None:
            with progress.task(label + ": digest", size) as advance:
                sums, got = digest.image_sums(partial, self.chunk, advance)
            if got != size:
                raise CliError("the copied image shows %d bytes, the snapshot %d" % (got, size))
            return sums, got
        assert plan.bitmap is not None and plan.base_sums is not None
        chunks = digest.dirty(plan.bitmap, plan.base.virtual_size, size, self.chunk)
        reading = sum(digest.span(i, size, self.chunk)[1] for i in chunks)
        with progress.task(label + ": digest", reading) as advance:
            return digest.rehash(partial, plan.base_sums, chunks, size, self.chunk, advance)

    @contextlib.contextmanager
    def unpublished(self, chain: Chain, point: str, what: str, undone: list[str]):
        """Until the manifest is written, a failure removes the point's files (the point
        never existed); a full repository gets one line saying so."""
        try:
            yield
        except BaseException as e:
            if not chain.manifest_path(point).exists():
                paths = (chain.partial_path(point), chain.image_path(point), chain.sums_path(point))
                for path in paths:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        undone.append("%s removed (VDI %s)" % (path.name, chain.vdi_uuid))
            if out_of_space(e):
                raise RepositoryFull(
                    "the repository %s is full (no space left on device) while writing %s "
                    "point %s: nothing of it was kept, the earlier points are intact; free "
                    "space (xencbt prune) and run the backup again" % (self.repo.root, what, point)
                ) from None
            raise

    def manifest(self, vm, disk, snap, plan, point, sums, final, started) -> Manifest:
        return Manifest(
            point=point,
            vm_uuid=vm.uuid,
            vm_name=vm.name,
            vdi_uuid=disk.uuid,
            vdi_name=disk.name,
            userdevice=disk.userdevice,
            snapshot_uuid=snap.uuid,
            type="incremental" if plan.base else "full",
            reason=plan.reason,
            base_point=plan.base.point if plan.base else None,
            virtual_size=snap.virtual_size,
            digest=digest.combine(sums, snap.virtual_size),
            digest_kind=digest.KIND,
            chunk_size=self.chunk,
            changed_bytes=plan.changed_bytes if plan.base else snap.virtual_size,
            bytes_on_disk=image.disk_usage(final),
            compression=self.copier.compression,
            started=started,
            finished=now_iso(),
        )

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


def chain_damage(chain: Chain, m: Manifest) -> str | None:
    """What qemu-img finds wrong with the metadata of ``m``'s image chain (cheap: the
    data itself is only checked by verify)."""
    try:
        for info in image.info_chain(chain.image_path(m.point)):
            image.check(chain.path / Path(info["filename"]).name)
    except CliError as e:
        return " ".join(str(e).split())[-300:]
    return None


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
