"""Verify a repository: what it promises for every point, from headers only
(repo/invariants.py: its settings honoured, modes, image and manifest, backing names), then
qemu-img check, the backing chain against the manifests, and every chunk digest of every
point's whole virtual disk (one pass) against the ones recorded at backup time
(repo/digest.py; format-1 points: their whole-disk sha256), and each VM point against its
disks' points.

Read-only: it takes each chain's lock shared (so it never sees a backup's or a prune's
work in progress) and changes nothing.  What an interrupted run left (temp files, images
without a manifest, a half-done prune) is reported as a note, with who removes it (the
next backup or prune of that chain, or ``xencbt repair``); a point whose expected chain
differs only because an interrupted prune already swapped its image is judged as the
prune will leave it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from ..errors import CliError, RepositoryError, VerifyFailed
from ..proc import command, progress, qemu_img
from ..repo import digest, image, invariants
from ..repo import journal as prune_journal
from ..repo.manifest import Manifest, nearest
from ..repo.repoconfig import RepoConfig
from ..repo.repository import Chain, Repository
from ..repo.vmpoints import all_vm_points
from . import canary

log = logging.getLogger(__name__)

REPAIRED_BY = "the next backup or prune of this VDI, or xencbt repair, removes them"


def expected_chain(m: Manifest, by_point: dict[str, Manifest]) -> tuple[list[str], bool]:
    """Image names from ``m`` down its bases, and whether every manifest was there (if
    not, the list ends with the image whose manifest is missing)."""
    names = []
    current: Manifest | None = m
    while current is not None:
        names.append(current.image)
        if current.base_point is None:
            return names, True
        base = current.base_point
        current = by_point.get(base)
        if current is None:
            names.append(base + ".qcow2")
    return names, False


def check_point(
    chain: Chain,
    m: Manifest,
    by_point: dict[str, Manifest],
    config: RepoConfig | None = None,
) -> str | None:
    """None when the point is sound, else what is wrong with it: the repository's
    promises first (repo/invariants.py: a clear image in an encrypted repository reads back
    as recorded all the same), then its chain and its content."""
    path = chain.image_path(m.point)
    promises = invariants.point(chain, m, config)
    if not path.is_file():
        return "; ".join(promises)
    problem = chain_problem(chain, m, by_point, path)
    return "; ".join([*promises, *([problem] if problem else [])]) or None


def chain_problem(chain: Chain, m: Manifest, by_point: dict[str, Manifest], path) -> str | None:
    try:
        image.check(path)
        infos = qemu_img.info_chain(path)
    except CliError as e:
        return str(e)  # CommandFailed names the tool itself
    got = [os.path.basename(i["filename"]) for i in infos]
    want, complete = expected_chain(m, by_point)
    if (got != want) if complete else (got[: len(want)] != want):
        return "backing chain is %s, the manifests say %s" % (" <- ".join(got), " <- ".join(want))
    if infos[0]["virtual-size"] != m.virtual_size:
        return "virtual size %d, manifest says %d" % (infos[0]["virtual-size"], m.virtual_size)
    return content_problem(chain, m)


def both(update, advance):
    """A sink feeding the digest and the progress line."""

    def sink(data: bytes) -> None:
        update(data)
        advance(len(data))

    return sink


def content_problem(chain: Chain, m: Manifest) -> str | None:
    """Whether the point's flattened content still hashes as recorded, and its sums are
    intact (the next incremental carries them over)."""
    reading = digest.Reading(m, chain.sums_path(m.point))
    label = "%s disk %s: verify %s" % (m.vm_name, m.userdevice, m.point)
    try:
        task = progress.task(label, m.virtual_size)
        with task as advance, digest.beside(reading.update) as hash_it:
            command.stream(image.reader(chain.image_path(m.point)), both(hash_it, advance))
    except CliError as e:
        return "cannot read the image: %s" % e
    problem = reading.problem()
    if problem or reading.old:
        return problem
    try:
        digest.load_sums(chain.sums_path(m.point), m.virtual_size, m.chunk_size, m.digest)
    except digest.SumsDamaged as e:
        newest = chain.latest()
        then = (
            " (until then the next backup of this VDI is a full one: it carries this "
            "point's checksums over)"
            if newest is not None and newest.point == m.point
            else ""
        )
        return "%s; the data itself matches the manifest: xencbt repair rebuilds it%s" % (e, then)
    return None


class Report:
    def __init__(self, say):
        self.say = say
        self.failures: list[str] = []
        self.count = 0
        self.failed_points = 0
        self.failed: set[tuple[str, str]] = set()  # (VDI uuid, point) that failed

    def ok(self, chain: Chain, point: str, note: str = "") -> None:
        self.say("ok     VDI %s point %s%s" % (chain.vdi_uuid, point, "  " + note if note else ""))

    def fail(self, chain: Chain, point: str, problem: str) -> None:
        self.failed.add((chain.vdi_uuid, point))
        self.failed_line("VDI %s point %s: %s" % (chain.vdi_uuid, point, problem))

    def failed_line(self, text: str) -> None:
        self.failures.append(text)
        self.say("FAILED " + text)

    def note(self, chain: Chain, text: str) -> None:
        self.say("note   VDI %s: %s" % (chain.vdi_uuid, text))


def pending_prune(chain: Chain, by_point: dict[str, Manifest], report: Report) -> None:
    try:
        journal = prune_journal.load(chain)
    except RepositoryError as e:
        report.fail(chain, "-", str(e))
        return
    if journal is None:
        return
    kept, doomed = journal["point"], ", ".join(journal["remove"])
    if journal["swapped"] and kept in by_point:
        by_point[kept] = dataclasses.replace(by_point[kept], base_point=journal["base"])
        report.note(
            chain,
            "a prune was interrupted after point %s absorbed the points before it; it still has to "
            "remove %s (%s)" % (kept, doomed, REPAIRED_BY.replace("removes them", "does")),
        )
    elif not journal["swapped"]:
        report.note(
            chain,
            "a prune was interrupted before changing anything; its journal is a leftover "
            "(%s)" % REPAIRED_BY,
        )


def check_chain(chain: Chain, config: RepoConfig | None, report: Report) -> None:
    points, damaged = chain.load()
    by_point = {m.point: m for m in points}
    pending_prune(chain, by_point, report)
    for point, why in damaged.items():
        report.fail(chain, point, "its manifest is unreadable (%s); its image is kept" % why)
    unused, needed = chain.orphans()
    for name in needed:
        report.fail(
            chain,
            name.removesuffix(".qcow2"),
            "its manifest is missing: the point is lost, but its image %s is kept because "
            "newer points are backed by it" % name,
        )
    leftovers = chain.leftovers()
    if leftovers:
        report.note(
            chain,
            "leftovers of an interrupted run: %s (%s)" % (", ".join(leftovers), REPAIRED_BY),
        )
    good, bad = [], []
    for m in points:
        report.count += 1
        problem = check_point(chain, by_point[m.point], by_point, config)
        if problem:
            report.failed_points += 1
            report.fail(chain, m.point, problem)
            bad.append(m.point)
        else:
            report.ok(chain, m.point, canary_note(m))
            good.append(m.point)
    if (bad or damaged) and not good:
        report.note(chain, "no point of this VDI is intact: take a full backup (--full)")
        return
    for point in [*bad, *damaged]:
        advise(chain, point, good, report)


def canary_note(m: Manifest) -> str:
    """What the point's CBT canary found (jobs/canary.py): for an incremental, and for a
    full its failed canary caused; nothing for other fulls."""
    return canary.describe(m.canary) if m.type == "incremental" or m.canary else ""


def advise(chain: Chain, point: str, good: list[str], report: Report) -> None:
    """Which point to restore instead of a damaged one: the nearest sound one."""
    near = nearest(point, good)[0]
    report.note(
        chain,
        "the nearest intact point to %s is %s (%s): xencbt restore %s --at %s"
        % (point, near, "newer" if near > point else "older", chain.vdi_uuid[:8], near),
    )


def check_vm_points(repo: Repository, vm_uuids: set[str] | None, report: Report) -> None:
    """Each VM point's configuration is there, matches its sha256 and parses, and each
    of its disks' points exists (repo/vmpoints.py) and passed above: a VM point is restorable
    only when all of them are."""
    for points in all_vm_points(repo):
        if vm_uuids is not None and points.vm_uuid not in vm_uuids:
            continue
        for vm_m in points.manifests():
            where = "VM %s point %s" % (vm_m.vm_uuid, vm_m.point)
            try:
                points.load_config(vm_m)
                for d in vm_m.disks:
                    repo.chain(vm_m.vm_uuid, d["vdi_uuid"]).get(d["point"])
            except RepositoryError as e:
                report.failed_line("%s: %s" % (where, e))
                continue
            failed = [d for d in vm_m.disks if (d["vdi_uuid"], d["point"]) in report.failed]
            if failed:
                report.failed_line(
                    "%s: its configuration is sound, but its disk %s failed verification "
                    "above (see there)"
                    % (
                        where,
                        ", ".join("%s (VDI %s)" % (d["userdevice"], d["vdi_uuid"]) for d in failed),
                    )
                )
                continue
            report.say("ok     %s (configuration and %d disk(s))" % (where, len(vm_m.disks)))


def targets(repo: Repository, wanted: list[str]) -> tuple[list[Chain], set[str] | None]:
    """The chains to verify and the VMs whose VM points to check (None: all): each of
    ``wanted`` a VDI (uuid or prefix) or a VM (uuid, prefix or name, Repository.chains_by_vm)."""
    if not wanted:
        return repo.chains(), None
    chains: dict[Path, Chain] = {}
    vm_uuids: set[str] = set()
    for want in wanted:
        try:
            found = {want: [repo.find(want)]}
        except RepositoryError:
            try:
                found = repo.chains_by_vm([want])
            except RepositoryError:
                raise RepositoryError(
                    "no VM or VDI matching %s in %s (or more than one; xencbt list shows "
                    "them)" % (want, repo.root)
                ) from None
            vm_uuids.update(found)
        for cs in found.values():
            chains.update((c.path, c) for c in cs)
    return list(chains.values()), vm_uuids


def verify(repo: Repository, wanted: list[str], say) -> int:
    chains, vm_uuids = targets(repo, wanted)
    report = Report(say)
    config, broken = invariants.settings(repo)
    for breach in broken + invariants.drill_records(repo):
        report.failed_line(str(breach))
    if repo.marked():
        # Named, not failed: the data is sound, and a repository opened on purpose to a
        # user who may only read it is a documented use (README, "Who may read it").
        for breach in invariants.modes(repo):
            report.say("WARN   %s" % breach)
    for chain in chains:
        with chain.lock(wait=True, shared=True):
            check_chain(chain, config, report)
    check_vm_points(repo, vm_uuids, report)
    if not report.count and not report.failures:
        # A monitoring check must not pass on an empty (or wrongly named) repository.
        raise RepositoryError(
            "no backup points in %s%s: nothing was verified"
            % (repo.root, " for " + ", ".join(wanted) if wanted else "")
        )
    if report.failures:
        others = len(report.failures) - report.failed_points
        raise VerifyFailed(
            "%d of %d points failed verification%s (each FAILED line above says why)"
            % (
                report.failed_points,
                report.count,
                " and %d other problem(s) were found" % others if others else "",
            )
        )
    return report.count
