"""The backup workflow: per VM one snapshot, per disk a full or incremental point.

    enable CBT where needed → VM.snapshot "xencbt-<point>" → per disk: decide (and say
    why a full is needed) → copy every disk through one nbdkit with the plugin (vm=: one
    XAPI login, one connection budget; one qemu-img per export) → per disk: chunk digests
    (all for a full, only the changed chunks for an incremental: digest.py) → sums →
    manifest → VM.destroy the snapshot, VDI.data_destroy its disks (their CBT log is the
    next base) → destroy the older base no chain needs any more.

On failure the snapshot VM and the VDIs no manifest refers to are destroyed, partial
files removed; the repository keeps every point it had.  A run killed outright (SIGKILL,
power loss) leaves at most temp files, which the next run of the chain removes, and
snapshots on the pool, which the next backup of the VM destroys: the snapshot VM by its
name prefix, its VDIs through the ledger (ledger.py).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xencbt_core.cbt import Bitmap
from xencbt_core.errors import ConfigError, XapiError, XencbtError
from xencbt_core.secret import scrub

from . import digest, errors, image
from .copier import ConnectionBudget, Copier, DiskCopy
from .errors import CliError, CommandFailed, RepositoryFull, describe_os_error
from .ledger import Ledger
from .pool import SNAPSHOT_PREFIX, Disk, Pool, Vm
from .repository import Chain, Manifest, Repository, new_point_id

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

    disk: Disk
    snap: Disk
    chain: Chain
    plan: Plan
    what: str
    started: str = ""
    copy_seconds: float = 0.0

    def copy(self, point: str) -> DiskCopy:
        # The export's name: its userdevice; the VDI uuid when that is not a plain number.
        export = self.snap.userdevice if self.snap.userdevice.isdigit() else self.snap.uuid
        base = self.chain.image_path(self.plan.base.point) if self.plan.base else None
        return DiskCopy(export, self.chain.partial_path(point), base)


@dataclass
class VmResult:
    vm: str
    vm_uuid: str = ""
    point: str = ""
    ok: bool = False
    error: str = ""
    exit_code: int = 0
    disks: list[dict] = field(default_factory=list)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Backup:
    def __init__(
        self,
        pool: Pool,
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
        self.chunk = digest.chunk_size()

    def run(self, vms: list[str]) -> list[VmResult]:
        self.repo.root.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            return list(pool.map(self.one, vms))

    def one(self, name: str) -> VmResult:
        result = VmResult(name)
        try:
            self.backup_vm(name, result)
            result.ok = True
        except (XencbtError, OSError) as e:
            text = describe_os_error(e) if isinstance(e, OSError) else str(e)
            result.error = scrub(text)
            result.exit_code = errors.exit_code(e)
            self.say("VM %s: backup FAILED: %s" % (name, result.error))
        return result

    def backup_vm(self, name: str, result: VmResult) -> None:
        vm = self.pool.vm(name)
        result.vm_uuid = vm.uuid
        disks = self.pool.disks(vm.ref)
        chains = {d.uuid: self.repo.chain(vm.uuid, d.uuid) for d in disks}
        with contextlib.ExitStack() as locks:
            for uuid in sorted(chains):
                locks.enter_context(chains[uuid].lock(self.wait))
            self.clean(vm, chains)
            for disk in disks:
                if not disk.cbt_enabled:
                    self.pool.enable_cbt(disk)
            result.point = new_point_id()
            snap_vm = self.pool.snapshot(vm, SNAPSHOT_PREFIX + result.point)
            committed: set[str] = set()
            try:
                snaps = {d.snapshot_of: d for d in self.pool.disks(snap_vm)}
                self.ledger(vm).add({d.uuid for d in snaps.values()})
                work = [self.prepare(vm, d, snaps[d.vdi_ref], chains[d.uuid]) for d in disks]
                with contextlib.ExitStack() as files:
                    for w in work:
                        files.enter_context(self.unpublished(w.chain, result.point, w.what))
                    self.copy(snap_vm, work, result.point)
                    for w in work:
                        prev = w.chain.latest()
                        m = self.finish(vm, w, result.point)
                        committed.add(m.snapshot_uuid)
                        result.disks.append(summary(m, prev))
            finally:
                self.pool.destroy_snapshot(snap_vm, keep=committed)
            self.forget_old_bases(result.disks)
            self.sweep(vm)

    def ledger(self, vm: Vm) -> Ledger:
        return Ledger(self.repo.root / vm.uuid)

    def clean(self, vm: Vm, chains: dict[str, Chain]) -> None:
        """Leftovers of an interrupted run: files, and snapshots on the host."""
        for chain in chains.values():
            chain.clean()
        needed = self.repo.needed_snapshots()
        for ref in self.pool.leftover_snapshots(vm):
            self.say("VM %s: destroying snapshot left by an interrupted run" % vm.name)
            self.pool.destroy_snapshot(ref, keep=needed)
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
                elif self.pool.call("VDI.get_type", ref) != "cbt_metadata":
                    self.pool.data_destroy(ref, uuid)
            except XapiError as e:
                log.warning("VM %s: snapshot VDI %s stays for now: %s", vm.name, uuid, e)
        ledger.discard(gone)

    def plan(self, disk: Disk, snap: Disk, chain: Chain) -> Plan:
        prev = chain.latest()
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

    def prepare(self, vm: Vm, disk: Disk, snap: Disk, chain: Chain) -> Work:
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

    def copy(self, snap_vm: str, work: list[Work], point: str) -> None:
        """All disks of the VM snapshot through one nbdkit; the incremental ones since
        their base snapshot, the others whole (no base for them in since=)."""
        started, t0 = now_iso(), time.monotonic()
        hosts = sorted({h for w in work for h in self.pool.nbd_hosts(w.snap.vdi_ref)})
        since = [w.plan.base.snapshot_uuid for w in work if w.plan.base]
        uuid = self.pool.call("VM.get_uuid", snap_vm)
        self.copier.copy_vm(self.budget, hosts, uuid, [w.copy(point) for w in work], since)
        for w in work:
            # The disks share one nbdkit run: each records the VM's copy time.
            w.started, w.copy_seconds = started, time.monotonic() - t0

    def finish(self, vm: Vm, w: Work, point: str) -> Manifest:
        t0 = time.monotonic()
        partial = w.chain.partial_path(point)
        sums, hashed = self.content_sums(partial, w.plan, w.snap.virtual_size)
        final = w.chain.publish_image(point)
        manifest = self.manifest(vm, w.disk, w.snap, w.plan, point, sums, final, w.started)
        manifest.hashed_bytes = hashed
        manifest.seconds = round(w.copy_seconds + time.monotonic() - t0, 3)
        manifest.copy_seconds = round(w.copy_seconds, 3)
        w.chain.commit(manifest, sums)
        return manifest

    def content_sums(self, partial: Path, plan: Plan, size: int) -> tuple[bytes, int]:
        """The new point's chunk digests and how many bytes of its image that read: all of
        it for a full (one pass), only the chunks the copy changed for an incremental."""
        if plan.base is None:
            sums, got = digest.image_sums(partial, self.chunk)
            if got != size:
                raise CliError("the copied image shows %d bytes, the snapshot %d" % (got, size))
            return sums, got
        assert plan.bitmap is not None and plan.base_sums is not None
        chunks = digest.dirty(plan.bitmap, plan.base.virtual_size, size, self.chunk)
        return digest.rehash(partial, plan.base_sums, chunks, size, self.chunk)

    @contextlib.contextmanager
    def unpublished(self, chain: Chain, point: str, what: str):
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
            started=started,
            finished=now_iso(),
        )

    def forget_old_bases(self, disks: list[dict]) -> None:
        """Destroy CBT metadata VDIs no chain of the repository diffs against any more."""
        needed = self.repo.needed_snapshots()
        for d in disks:
            old = d.get("previous_snapshot")
            if old and old not in needed:
                ref = self.pool.vdi_ref(old)
                if ref is not None and self.pool.call("VDI.get_is_a_snapshot", ref):
                    self.pool.destroy_vdi(ref, old)


def chain_damage(chain: Chain, m: Manifest) -> str | None:
    """What qemu-img finds wrong with the metadata of ``m``'s image chain (cheap: the
    data itself is only checked by verify)."""
    try:
        for info in image.info_chain(chain.image_path(m.point)):
            image.check(chain.path / Path(info["filename"]).name)
    except CliError as e:
        return " ".join(str(e).split())[-300:]
    return None


def out_of_space(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    # qemu-img says so on its stderr, which CommandFailed carries.
    return isinstance(e, CommandFailed) and (
        "No space left on device" in str(e) or "Disk quota exceeded" in str(e)
    )


def summary(m: Manifest, prev: Manifest | None) -> dict:
    d = asdict(m)
    d["previous_snapshot"] = prev.snapshot_uuid if prev else None
    return d


def human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return ("%d %s" if unit == "bytes" else "%.1f %s") % (n, unit)
        n /= 1024
    return str(n)
