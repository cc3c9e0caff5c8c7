"""A second copy: the points another repository (DST) lacks, copied from SRC.

Per chain, oldest first, only points newer than DST's newest point of that chain (a chain
grows at its end; older points DST lacks were pruned there, or never wanted).  A point
whose SRC base is DST's newest point is written as an incremental onto it (``qemu-img
convert -B``: the source's own clusters only; DST's base shows the very same disk, as its
digest proved when it was copied); any other as a standalone image of its whole view.
DST's compression applies.  Each copied image is read back whole and its chunk digests
must give the manifest's digest before it is published; then its sums and last its
manifest are written, as a backup does, under DST's chain lock (SRC's taken shared).
Then each VM point of SRC whose disks' points DST now all has gets there too: its
configuration (checked against its sha256 on both sides), then its VM manifest, last.  A
copy killed at any moment leaves only leftovers the next run (or repair) removes; running
it again copies what is still missing.

A chain that cannot be copied holds back that chain alone (and the VM points that need
it): the other chains are copied, then the command fails naming each chain held back and
why.  A copied image that does not read back as recorded is either SRC's point (the
source is damaged: it is named, ``verify --repo SRC``) or DST's point it was written onto
(DST's chain is damaged): that is told apart by reading SRC's point again, only then.
For a damaged DST chain the way on is ``copy --full``: the chain's next point is copied
as a standalone image (a full), onto nothing DST holds; DST's damaged point stays where
it is for ``verify`` to name and ``prune`` to retire, as a backup's would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shlex

from ..errors import PointDamaged, TargetDamaged
from ..proc import testhook
from ..repo import digest, image, layout, repoconfig
from ..repo.manifest import Manifest
from ..repo.repository import Chain, Repository
from ..repo.vmpoints import VmManifest, VmPoints

log = logging.getLogger(__name__)


def wanted(src: Chain, dst: Chain) -> list[Manifest]:
    """SRC's points DST should get, oldest first."""
    newest = dst.latest()
    return [m for m in src.points() if newest is None or m.point > newest.point]


def copy_repository(
    src: Repository, dst: Repository, chains: list[Chain], wait: bool, say, full: bool = False
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Copy what DST lacks of ``chains`` (SRC's); return ({vdi: [points copied]}, {vdi:
    why the rest of its chain was held back}).  ``full``: each chain's first point copied
    is a standalone image, not an incremental onto DST's newest point."""
    config = repoconfig.ensure(dst, say)
    copied: dict[str, list[str]] = {}
    held: dict[str, str] = {}
    for chain in chains:
        target = dst.chain(chain.vm_uuid, chain.vdi_uuid)
        with target.lock(wait), chain.lock(wait, shared=True):
            target.clean()
            standalone = full
            for m in wanted(chain, target):
                try:
                    copy_point(chain, target, m, config.compression, standalone)
                except PointDamaged as e:
                    held[chain.vdi_uuid] = str(e)
                    log.info("VDI %s held back: %s", chain.vdi_uuid, e)
                    break  # its later points need this one
                standalone = False
                copied.setdefault(chain.vdi_uuid, []).append(m.point)
                say("VDI %s: copied point %s" % (chain.vdi_uuid, m.point))
    return copied, held


def copy_vm_points(src: Repository, dst: Repository, chains: list[Chain], wait: bool, say):
    """SRC's VM points (of the VMs ``chains`` belong to) that DST lacks and whose disks'
    points DST has, each under DST's locks of its VM's chains; return {vm: [points]}."""
    by_vm: dict[str, list[Chain]] = {}
    for chain in chains:
        by_vm.setdefault(chain.vm_uuid, []).append(chain)
    copied: dict[str, list[str]] = {}
    for vm_uuid, vm_chains in sorted(by_vm.items()):
        source, target = VmPoints(src, vm_uuid), VmPoints(dst, vm_uuid)
        with contextlib.ExitStack() as locks:
            for chain in sorted(vm_chains, key=lambda c: c.vdi_uuid):
                locks.enter_context(dst.chain(vm_uuid, chain.vdi_uuid).lock(wait))
            have = {m.point for m in target.manifests()}
            for m in source.manifests():
                if m.point not in have and disks_in(dst, m):
                    copy_vm_point(source, target, m)
                    copied.setdefault(vm_uuid, []).append(m.point)
                    say("VM %s: copied VM point %s" % (vm_uuid, m.point))
    return copied


def disks_in(dst: Repository, m: VmManifest) -> bool:
    return all(
        dst.chain(m.vm_uuid, d["vdi_uuid"]).manifest_path(d["point"]).exists() for d in m.disks
    )


def copy_vm_point(source: VmPoints, target: VmPoints, m: VmManifest) -> None:
    """The configuration (its sha256 checked as read, and as written), then the VM
    manifest, last: the VM point exists in DST only once whole."""
    config = source.load_config(m)
    if target.write_config(m.point, config) != m.config_sha256:
        target.config_path(m.point).unlink(missing_ok=True)
        raise PointDamaged(
            "the configuration of VM point %s of VM %s does not read back as recorded "
            "after the copy: nothing of it was kept" % (m.point, m.vm_uuid)
        )
    testhook.pause("copy-vm-config")
    target.commit(m)


def copy_point(src: Chain, dst: Chain, m: Manifest, compression: str, standalone=False) -> None:
    """Image (``.partial``, checked, renamed), then its sums, then its manifest, each
    durable before the next (repository.Chain.commit); nothing of it kept on failure."""
    newest = dst.latest()
    onto = newest if newest is not None and m.base_point == newest.point else None
    if standalone:
        onto = None
    if onto is not None and not dst.image_path(onto.point).exists():
        raise target_damaged(src, dst, m, onto, "its image is missing")
    partial = dst.reserve(m.point)
    try:
        if onto is None:
            image.flatten(src.image_path(m.point), partial, compression=compression)
        else:
            image.onto(src.image_path(m.point), dst.image_path(onto.point), partial, compression)
        try:
            sums = check(m, partial, src)
        except PointDamaged:
            if onto is None or not reads_as_recorded(m, src.image_path(m.point)):
                raise
            raise target_damaged(src, dst, m, onto, "it does not read back as recorded") from None
        testhook.pause("copy-checked")
        final = dst.publish_image(m.point)
        testhook.pause("copy-published")
        copy = dataclasses.replace(
            m,
            base_point=onto.point if onto else None,
            compression=compression,
            bytes_on_disk=layout.disk_usage(final),
            history=[*m.history, "copied from %s" % src.path.parent.parent],
        )
        copy.ratio = copy.compression_ratio()  # of the image here, not of SRC's
        dst.commit(copy, sums)
    except BaseException:
        if not dst.manifest_path(m.point).exists():
            for path in (partial, dst.image_path(m.point), dst.sums_path(m.point)):
                path.unlink(missing_ok=True)
        raise


def target_damaged(src: Chain, dst: Chain, m: Manifest, onto: Manifest, why: str):
    """DST's point ``onto``, which SRC's point ``m`` (intact) would be written onto, is
    damaged: the error naming DST's chain and the way on."""
    root, source = dst.path.parent.parent, src.path.parent.parent
    # The VM by uuid: names need not be unique; paths and all quoted for a shell.
    redo = "xencbt copy --repo %s --to %s %s --full" % (
        shlex.quote(str(source)),
        shlex.quote(str(root)),
        dst.vm_uuid,
    )
    return TargetDamaged(
        "VDI %s (%s disk %s) in %s: its point %s, which point %s would be copied onto, is "
        "damaged (%s): nothing of %s was kept; xencbt verify --repo %s %s names the "
        "damage; %s copies %s standalone (the damaged point stays for verify to name "
        "and prune to retire)"
        % (
            dst.vdi_uuid,
            m.vm_name,
            m.userdevice,
            root,
            onto.point,
            m.point,
            why,
            m.point,
            shlex.quote(str(root)),
            dst.vdi_uuid,
            redo,
            m.point,
        )
    )


def reads_as_recorded(m: Manifest, path) -> bool:
    """Whether SRC's point (the view of its chain) still gives its manifest's digest."""
    try:
        check(m, path, None)
    except PointDamaged:
        return False
    return True


def check(m: Manifest, path, src: Chain | None) -> bytes | None:
    """The copied image's chunk sums, once they give the manifest's digest (format-1
    points: its whole-disk sha256); PointDamaged otherwise, naming SRC (``src``) as the
    place to look, nothing published."""
    where = ""
    if src is not None:
        where = " (xencbt verify --repo %s %s)" % (
            shlex.quote(str(src.path.parent.parent)),
            src.vdi_uuid,
        )
    damaged = PointDamaged(
        "point %s of VDI %s does not read back as recorded after the copy: nothing of it "
        "was kept%s" % (m.point, m.vdi_uuid, where)
    )
    if m.digest is None:
        if image.sha256(path) != m.sha256:
            raise damaged
        return None
    assert m.chunk_size is not None
    sums, size = digest.image_sums(path, m.chunk_size)
    if size != m.virtual_size or digest.combine(sums, size) != m.digest:
        raise damaged
    return sums
