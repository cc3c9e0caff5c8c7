"""The disks of a VM backup (backup.py): whether each one's point is full or incremental
and why (its plan), the copy of them all through one nbdkit, then each one's chunk
digests (all for a full, only the changed chunks for an incremental: repo/digest.py), sums and
manifest.  Until its manifest is written a failure removes the point's files.

Every incremental is checked by the CBT canary (canary.py): a sample of the blocks CBT
calls unchanged, read from the snapshot by the copy's nbdkit run, compared with the new
image.  A disk whose sample differs is copied again, whole, from the same snapshot,
before any disk's point is committed."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xencbt_core.cbt import Bitmap
from xencbt_core.errors import ConfigError

from ..errors import CliError, RepositoryFull, out_of_space
from ..proc import progress, qemu_img
from ..proc.sampler import SampleRead
from ..repo import digest, image, layout
from ..repo.manifest import Manifest
from ..repo.repository import Chain, Repository
from ..text import human
from ..xapi.facade import NoCbt, PoolApi, Vm, VmDisk
from . import canary
from .snapshot_copy import ConnectionBudget, Copier, DiskCopy, HostBudget

Say = Callable[[str], None]


@dataclass
class Plan:
    """How one disk is backed up: incremental from ``base`` or full because of ``reason``."""

    base: Manifest | None = None
    reason: str | None = None
    changed_bytes: int = 0
    bitmap: Bitmap | None = None  # what the copy reads: the chunks to rehash
    base_sums: bytes | None = None  # the base's recorded chunk digests, carried over
    sample: canary.Sample | None = None  # the CBT canary's blocks (an incremental's)
    canary: dict | None = None  # its outcome, for the manifest (canary.record)


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
    sums: tuple[bytes, int] | None = None  # its digests, when the canary computed them
    sums_seconds: float = 0.0  # ...and how long that took
    reading: SampleRead | None = None  # the canary's read of the snapshot, once copied

    def copy(self, point: str) -> DiskCopy:
        # The export's name: its userdevice; the VDI uuid when that is not a plain number.
        export = self.snap.userdevice if self.snap.userdevice.isdigit() else self.snap.uuid
        base = self.chain.image_path(self.plan.base.point) if self.plan.base else None
        partial = self.chain.partial_path(point)
        sample = self.plan.sample
        self.reading = SampleRead(sample.ranges) if sample is not None else None
        return DiskCopy(export, partial, base, size=self.snap.virtual_size, canary=self.reading)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class DiskBackup:
    """The disks of the VM backups of one run: each one's plan, their copy, each one's
    digests and manifest."""

    def __init__(
        self,
        pool: PoolApi,
        repo: Repository,
        copier: Copier,
        say: Say,
        full: bool,
        no_cbt: dict[str, NoCbt],
        canary_blocks: int = canary.DEFAULT_BLOCKS,
    ):
        self.pool = pool
        self.repo = repo
        self.copier = copier
        self.say = say
        self.full = full
        self.budget: HostBudget = ConnectionBudget()
        self.no_cbt = no_cbt  # disk uuid -> why it has no CBT (the run's: Backup.enable_cbt)
        self.chunk = digest.chunk_size()
        self.canary_blocks = canary_blocks  # per incremental disk; 0: no canary

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
            self.sample(plan, snap)
        else:
            self.say("%s: FULL backup: %s" % (what, plan.reason))
        return Work(disk, snap, chain, plan, what)

    def sample(self, plan: Plan, snap: VmDisk) -> None:
        """The canary's blocks for an incremental (drawn now, read during the copy)."""
        assert plan.base is not None and plan.bitmap is not None
        if not self.canary_blocks:
            plan.canary = dict(canary.OFF)
            return
        old, new = plan.base.virtual_size, snap.virtual_size
        plan.sample = canary.choose(plan.bitmap, old, new, self.canary_blocks)

    def copy(self, vm: Vm, snap_vm: str, work: list[Work], point: str) -> None:
        """All disks of the VM snapshot through one nbdkit (one XAPI login), each
        incremental one checked by its canary; the disks CBT failed are copied again,
        whole, from the same snapshot."""
        self.copy_disks(vm, snap_vm, work, point)
        caught = [w for w in work if self.canary_caught(vm, w, point)]
        for w in caught:
            w.chain.partial_path(point).unlink(missing_ok=True)
            w.plan = Plan(reason=canary.reason(w.plan.canary), canary=w.plan.canary)
        if caught:
            self.copy_disks(vm, snap_vm, caught, point)  # no sample in their plans

    def canary_caught(self, vm: Vm, w: Work, point: str) -> bool:
        """Whether the canary found the snapshot's sampled blocks different from what the
        new image shows there (the previous point's content): CBT missed changes.  When
        they match, the new point's digests are computed now, through the same qemu-nbd
        (one open of the chain: with an encrypted one, each layer's key derivation)."""
        if w.plan.sample is None or w.plan.base is None:
            return False
        read = w.reading
        assert read is not None and read.sums is not None  # the copy succeeded: it was read
        partial = w.chain.partial_path(point)
        with image.random_access(partial) as h:
            t0 = time.monotonic()
            differed = canary.differing(h, w.plan.sample, read.sums)
            t1 = time.monotonic()
            seconds = read.seconds + t1 - t0  # the two reads of the sample
            if not differed:
                label = "%s disk %s" % (vm.name, w.disk.userdevice)
                w.sums = self.content_sums(partial, w.plan, w.snap.virtual_size, label, h)
                w.sums_seconds = time.monotonic() - t1
        found = self.base_damage(w, differed) if differed else None
        # Rot in the base explains the blocks of its damaged chunks; any other is CBT's.
        damaged = found[0] if found and not found[1] else None
        rec = canary.record(w.plan.sample, len(differed), seconds, w.plan.base.point, damaged)
        w.plan.canary = rec
        if canary.failed(rec):
            self.say(
                "%s: CBT MISSED CHANGES: %s; the incremental is dropped, a FULL backup of "
                "the disk is taken now from the same snapshot" % (w.what, canary.reason(rec))
            )
        elif damaged:
            self.say("%s: FULL backup now: %s" % (w.what, canary.reason(rec)))
        return bool(differed)

    def base_damage(self, w: Work, differed: list[tuple[int, int]]) -> tuple[str, int] | None:
        """Where the previous point's image no longer matches its recorded checksums, in
        the chunks holding the blocks the canary found different (bit rot in the
        repository explains those, not CBT), and how many differing blocks lie in sound
        chunks; None when no chunk is damaged.  Read only on a mismatch (a chunk each)."""
        base, sums = w.plan.base, w.plan.base_sums
        assert base is not None and sums is not None
        chunks = sorted({offset // self.chunk for offset, _ in differed})
        path = w.chain.image_path(base.point)
        got, _ = digest.rehash(path, sums, chunks, base.virtual_size, self.chunk)
        where = digest.first_difference(got, sums, base.virtual_size, self.chunk)
        if where is None:
            return None
        bad = {
            i
            for i in chunks
            if got[i * digest.SUM : (i + 1) * digest.SUM]
            != sums[i * digest.SUM : (i + 1) * digest.SUM]
        }
        return digest.describe(where), sum(o // self.chunk not in bad for o, _ in differed)

    def copy_disks(self, vm: Vm, snap_vm: str, work: list[Work], point: str) -> None:
        """The disks through one nbdkit; the incremental ones since their base snapshot,
        the others whole (no base for them in since=).  Each disk has its progress line;
        an incremental's canary sample is read beside its copy."""
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
            # The disks share one nbdkit run: each records the VM's copy time (a disk
            # copied again after its canary, both copies).
            w.started = w.started or started
            w.copy_seconds += time.monotonic() - t0

    def finish(self, vm: Vm, w: Work, point: str) -> Manifest:
        t0 = time.monotonic()
        partial = w.chain.partial_path(point)
        label = "%s disk %s" % (vm.name, w.disk.userdevice)
        sums, hashed = w.sums or self.content_sums(partial, w.plan, w.snap.virtual_size, label)
        final = w.chain.publish_image(point)
        manifest = self.manifest(vm, w.disk, w.snap, w.plan, point, sums, final, w.started)
        manifest.hashed_bytes = hashed
        manifest.seconds = round(w.copy_seconds + w.sums_seconds + time.monotonic() - t0, 3)
        manifest.copy_seconds = round(w.copy_seconds, 3)
        manifest.ratio = manifest.compression_ratio()
        w.chain.commit(manifest, sums)
        return manifest

    def content_sums(
        self, partial: Path, plan: Plan, size: int, label: str, h=None
    ) -> tuple[bytes, int]:
        """The new point's chunk digests and how many bytes of its image that read: all of
        it for a full (one pass), only the chunks the copy changed for an incremental
        (through ``h`` if given: the canary's handle on the image)."""
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
            return digest.rehash(partial, plan.base_sums, chunks, size, self.chunk, advance, h)

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
            bytes_on_disk=layout.disk_usage(final),
            compression=self.copier.compression,
            canary=plan.canary,
            started=started,
            finished=now_iso(),
        )


def chain_damage(chain: Chain, m: Manifest) -> str | None:
    """What qemu-img finds wrong with the metadata of ``m``'s image chain (cheap: the
    data itself is only checked by verify)."""
    try:
        for info in qemu_img.info_chain(chain.image_path(m.point)):
            image.check(chain.path / Path(info["filename"]).name)
    except CliError as e:
        return " ".join(str(e).split())[-300:]
    return None
