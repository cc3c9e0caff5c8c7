"""Verify a repository: qemu-img check, the backing chain against the manifests, and
every chunk digest of every point's whole virtual disk (one pass) against the ones
recorded at backup time (digest.py; format-1 points: their whole-disk sha256).

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

from . import command, digest, image, progress, prune
from .errors import CliError, RepositoryError, VerifyFailed
from .repository import Chain, Manifest, Repository, nearest
from .vmpoint import all_vm_points

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


def check_point(chain: Chain, m: Manifest, by_point: dict[str, Manifest]) -> str | None:
    """None when the point is sound, else what is wrong with it."""
    path = chain.image_path(m.point)
    if not path.is_file():
        return "image %s is missing" % path.name
    try:
        image.check(path)
        infos = image.info_chain(path)
    except CliError as e:
        return "qemu-img: %s" % e
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
        with progress.task(label, m.virtual_size) as advance:
            command.stream(image.reader(chain.image_path(m.point)), both(reading.update, advance))
    except CliError as e:
        return "cannot read the image: %s" % e
    problem = reading.problem()
    if problem or reading.old:
        return problem
    try:
        digest.load_sums(chain.sums_path(m.point), m.virtual_size, m.chunk_size, m.digest)
    except digest.SumsDamaged as e:
        return (
            "%s; the data itself matches the manifest, but the next backup of this VDI "
            "will be a full one" % e
        )
    return None


class Report:
    def __init__(self, say):
        self.say = say
        self.failures: list[str] = []
        self.count = 0
        self.failed_points = 0

    def ok(self, chain: Chain, point: str) -> None:
        self.say("ok     VDI %s point %s" % (chain.vdi_uuid, point))

    def fail(self, chain: Chain, point: str, problem: str) -> None:
        self.failures.append("VDI %s point %s: %s" % (chain.vdi_uuid, point, problem))
        self.say("FAILED " + self.failures[-1])

    def note(self, chain: Chain, text: str) -> None:
        self.say("note   VDI %s: %s" % (chain.vdi_uuid, text))


def pending_prune(chain: Chain, by_point: dict[str, Manifest], report: Report) -> None:
    try:
        journal = prune.load(chain)
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


def check_chain(chain: Chain, report: Report) -> None:
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
        problem = check_point(chain, by_point[m.point], by_point)
        if problem:
            report.failed_points += 1
            report.fail(chain, m.point, problem)
            bad.append(m.point)
        else:
            report.ok(chain, m.point)
            good.append(m.point)
    for point in [*bad, *damaged]:
        advise(chain, point, good, report)


def advise(chain: Chain, point: str, good: list[str], report: Report) -> None:
    """Which point to restore instead of a damaged one: the nearest sound one."""
    if not good:
        report.note(chain, "no point of this VDI is intact: take a full backup (--full)")
        return
    near = nearest(point, good)[0]
    report.note(
        chain,
        "the nearest intact point to %s is %s (%s): xencbt restore %s --at %s"
        % (point, near, "newer" if near > point else "older", chain.vdi_uuid[:8], near),
    )


def check_vm_points(repo: Repository, report: Report) -> None:
    """Each VM point's configuration is there, matches its sha256 and parses, and each
    of its disks' points exists (vmpoint.py)."""
    for points in all_vm_points(repo):
        for vm_m in points.manifests():
            try:
                points.load_config(vm_m)
                for d in vm_m.disks:
                    repo.chain(vm_m.vm_uuid, d["vdi_uuid"]).get(d["point"])
            except RepositoryError as e:
                report.failures.append("VM %s point %s: %s" % (vm_m.vm_uuid, vm_m.point, e))
                report.say("FAILED " + report.failures[-1])
                continue
            report.say("ok     VM %s point %s (configuration)" % (vm_m.vm_uuid, vm_m.point))


def verify(repo: Repository, vdis: list[str], say) -> int:
    chains = [repo.find(v) for v in vdis] if vdis else repo.chains()
    report = Report(say)
    for chain in chains:
        with chain.lock(wait=True, shared=True):
            check_chain(chain, report)
    if not vdis:
        check_vm_points(repo, report)
    if not report.count and not report.failures:
        # A monitoring check must not pass on an empty (or wrongly named) repository.
        raise RepositoryError(
            "no backup points in %s%s: nothing was verified"
            % (repo.root, " for VDI " + ", ".join(vdis) if vdis else "")
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
