"""Prune a chain to the points a policy keeps, crash-safely, one step at a time.

A step takes a kept point P whose base chain holds points to remove, back to the kept
point K before them (none: P becomes standalone).  P's image is rewritten into
``P.qcow2.partial`` (sparse, fsync'd): the whole chain flattened, or, with K, a copy of
P rebased onto K in safe mode (image.rebased: it gains the clusters where its old base
and K differ), compressed as the repository says.  A journal ``.prune.json`` {point,
base, remove} is written atomically, then the rewritten image is renamed over
``P.qcow2`` (atomic; newer points name it as their backing file and see the very same
bytes).  Then P's manifest gets its new base,
the removed points go newest first (manifest first, then image and sums: every point
still listed keeps its whole chain at every step), and the journal goes.  P's sums and
digest stay as they are: its view, which they hash, is the same before and after.  After
a crash the next writer of the chain looks at the journal: if ``P.qcow2`` is already
backed by K (or by nothing, without K) the swap happened and the steps after it are done
again (they are idempotent); otherwise the journal and the partial file are dropped and
the chain is exactly as before.
"""

from __future__ import annotations

import contextlib
import logging
import os

from ..repo import image, journal, layout, repoconfig
from ..repo.repository import Chain, Repository
from . import retention

log = logging.getLogger(__name__)


def prune(chain: Chain, keep: int) -> list[str]:
    """Keep the newest ``keep`` points; return the points removed.  Hold the lock."""
    chain.clean()
    return prune_to(chain, {m.point for m in chain.points()[-keep:]}, clean=False)


def prune_to(chain: Chain, kept: set[str], clean: bool = True) -> list[str]:
    """Remove every point not in ``kept`` (the newest point always stays: the next
    incremental diffs against it), each kept point absorbing what the removed points
    before it held; return the points removed, oldest first.  Hold the lock."""
    if clean:
        chain.clean()
    points = chain.points()
    if points:
        kept = kept | {points[-1].point}
    removed: list[str] = []
    for step in steps(points, kept):
        merge(chain, step)
        removed += step["remove"]
    return removed


def steps(points: list, kept: set[str]) -> list[dict]:
    """The journaled steps of a prune: each kept point after removed ones is rewritten
    onto the kept point before it (or made standalone), then those are removed."""
    found, pending, base = [], [], None
    for m in points:
        if m.point not in kept:
            pending.append(m.point)
            continue
        if pending:
            # A full stays standalone; an incremental is rewritten onto K.
            keep_base = base if m.base_point is not None else None
            found.append({"point": m.point, "base": keep_base, "remove": pending})
        pending, base = [], m.point
    return found


def merge(chain: Chain, step: dict) -> None:
    """One step: the kept point's image rewritten (``.partial``, fsync'd), the journal
    written, the image swapped in, then ``finish``."""
    m = chain.get(step["point"])
    if m.base_point != step["base"]:
        path = chain.image_path(m.point)
        partial = chain.partial_path(m.point)
        if step["base"] is None:
            image.flatten(path, partial, compression=compression_of(chain))
        else:
            base = chain.image_path(step["base"])
            image.rebased(path, base, partial, compression=compression_of(chain))
        layout.fsync(partial)
        journal.write(chain, step)
        os.replace(partial, path)
        layout.fsync_dir(chain.path)
    else:
        journal.write(chain, step)
    journal.finish(chain, step)


def disks_by_point(chains: list[Chain]) -> dict[str, list[Chain]]:
    """One VM's chains grouped by point id: point id -> the chains (disks) that have a
    point of that id.  One backup run gives every disk the same point id, so retention
    keeps or drops a run's disks together (a VM point, repo/vmpoints.py, names the same
    id)."""
    found: dict[str, list[Chain]] = {}
    for chain in chains:
        for m in chain.points():
            found.setdefault(m.point, []).append(chain)
    return dict(sorted(found.items()))


NEWEST = "newest of a disk"  # the base of that disk's next incremental: never pruned


def decide(chains: list[Chain], policy: retention.Policy) -> dict[str, list[str]]:
    """VM point -> the rules that keep it ([]: it goes), for all of its disks at once."""
    points = disks_by_point(chains)
    kept = retention.apply(policy, {p: retention.point_time(p) for p in points})
    for chain in chains:
        newest = chain.latest()
        if newest is not None and not kept[newest.point]:
            kept[newest.point].append(NEWEST)
    return kept


def retain(chains: list[Chain], policy: retention.Policy, wait: bool, dry_run: bool) -> dict:
    """Apply ``policy`` to one VM's points under the locks of all its chains (shared for
    ``dry_run``): {"points": {point: rules}, "removed": {vdi: [points]}, "freed_by_vdi",
    "freed_bytes"}.
    A dry run counts the bytes of the removed points' own files (more than a prune frees:
    the kept points absorb their data)."""
    with contextlib.ExitStack() as locks:
        for chain in sorted(chains, key=lambda c: c.vdi_uuid):
            locks.enter_context(chain.lock(wait, shared=dry_run))
        if not dry_run:
            for chain in chains:
                chain.clean()
        kept = decide(chains, policy)
        keep = {p for p, rules in kept.items() if rules}
        removed, freed = {}, {}
        for chain in chains:
            if dry_run:
                gone = [m.point for m in chain.points() if m.point not in keep]
                size = sum(usage(chain, p) for p in gone)
            else:
                before = usage(chain)
                gone = prune_to(chain, keep, clean=False)
                size = before - usage(chain)
            if gone:
                removed[chain.vdi_uuid], freed[chain.vdi_uuid] = gone, size
    return {
        "points": kept,
        "removed": removed,
        "freed_by_vdi": freed,
        "freed_bytes": sum(freed.values()),
    }


def compression_of(chain: Chain) -> str:
    """The repository's compression, which a rewritten image keeps (else a prune would
    store the merged point uncompressed)."""
    config = repoconfig.load(Repository(chain.path.parent.parent))
    return config.compression if config else "none"


def usage(chain: Chain, point: str | None = None) -> int:
    """Bytes on disk of a point's files (image, sums, manifest), or of the whole chain."""
    if point is None:
        paths = [p for p in chain.path.iterdir() if p.is_file()]
    else:
        paths = [chain.image_path(point), chain.sums_path(point), chain.manifest_path(point)]
    return sum(p.lstat().st_blocks * 512 for p in paths if p.exists())
