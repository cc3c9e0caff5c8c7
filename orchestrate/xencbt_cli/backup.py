"""The backup workflow: per VM one snapshot, per disk a full or incremental point.

    enable CBT where needed → VM.snapshot "xencbt-<point>" → per disk: decide (and say
    why a full is needed) → copy through the plugin → checksum → manifest →
    VM.destroy the snapshot, VDI.data_destroy its disks (their CBT log is the next base)
    → destroy the older base no chain needs any more.

On failure the snapshot VM and the VDIs no manifest refers to are destroyed, partial
files removed; the repository keeps every point it had.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from xencbt_core.cbt import Bitmap
from xencbt_core.errors import ConfigError, XencbtError
from xencbt_core.secret import scrub

from . import errors, image
from .copier import ConnectionBudget, Copier
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

    def run(self, vms: list[str]) -> list[VmResult]:
        self.repo.root.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            return list(pool.map(self.one, vms))

    def one(self, name: str) -> VmResult:
        result = VmResult(name)
        try:
            self.backup_vm(name, result)
            result.ok = True
        except XencbtError as e:
            result.error = scrub(str(e))
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
                for disk in disks:
                    chain = chains[disk.uuid]
                    prev = chain.latest()
                    m = self.backup_disk(vm, disk, snaps[disk.vdi_ref], chain, result.point)
                    committed.add(m.snapshot_uuid)
                    result.disks.append(summary(m, prev))
            finally:
                self.pool.destroy_snapshot(snap_vm, keep=committed)
            self.forget_old_bases(result.disks)

    def clean(self, vm: Vm, chains: dict[str, Chain]) -> None:
        """Leftovers of an interrupted run: files, and snapshot VMs on the host."""
        for chain in chains.values():
            chain.clean()
        needed = self.repo.needed_snapshots()
        for ref in self.pool.leftover_snapshots(vm):
            self.say("VM %s: destroying snapshot left by an interrupted run" % vm.name)
            self.pool.destroy_snapshot(ref, keep=needed)

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
        try:
            changed = Bitmap.from_base64(bitmap, snap.virtual_size).changed_bytes()
        except ConfigError as e:
            # Damaged CBT metadata on the host: an incremental could miss changes.
            return Plan(reason="the host returned an unusable CBT bitmap (%s)" % e)
        return Plan(base=prev, changed_bytes=changed)

    def backup_disk(self, vm: Vm, disk: Disk, snap: Disk, chain: Chain, point: str) -> Manifest:
        started, t0 = now_iso(), time.monotonic()
        plan = self.plan(disk, snap, chain)
        what = "VM %s disk %s (%s)" % (vm.name, disk.userdevice, disk.uuid)
        if plan.base:
            self.say(
                "%s: incremental since %s, %s changed"
                % (what, plan.base.point, human(plan.changed_bytes))
            )
        else:
            self.say("%s: FULL backup: %s" % (what, plan.reason))
        partial = chain.partial_path(point)
        base_image = chain.image_path(plan.base.point) if plan.base else None
        try:
            self.copier.copy(
                self.budget,
                snap.uuid,
                partial,
                base_image,
                plan.base.snapshot_uuid if plan.base else None,
            )
            copy_seconds = time.monotonic() - t0
            digest = image.sha256(partial)
            final = chain.publish_image(point)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            raise
        manifest = Manifest(
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
            sha256=digest,
            changed_bytes=plan.changed_bytes if plan.base else snap.virtual_size,
            bytes_on_disk=image.disk_usage(final),
            started=started,
            finished=now_iso(),
            seconds=round(time.monotonic() - t0, 3),
            copy_seconds=round(copy_seconds, 3),
        )
        chain.commit(manifest)
        return manifest

    def forget_old_bases(self, disks: list[dict]) -> None:
        """Destroy CBT metadata VDIs no chain of the repository diffs against any more."""
        needed = self.repo.needed_snapshots()
        for d in disks:
            old = d.get("previous_snapshot")
            if old and old not in needed:
                ref = self.pool.vdi_ref(old)
                if ref is not None and self.pool.call("VDI.get_is_a_snapshot", ref):
                    self.pool.destroy_vdi(ref, old)


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
