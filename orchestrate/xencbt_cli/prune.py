"""Prune a chain to its newest N points, crash-safely.

The oldest kept point P is made standalone: its whole chain is flattened into
``P.qcow2.partial`` (sparse, fsync'd).  A journal ``.prune.json`` {point, remove} is
written atomically, then the flattened image is renamed over ``P.qcow2`` (atomic; the
newer points name it as their backing file and see the very same bytes).  Then P's
manifest loses its base, the older points are removed newest first (manifest first,
then image and sums: every point still listed keeps its whole chain at every step), and
the journal goes.  P's sums and digest stay as they are: its flattened view, which they
hash, is the same before and after.  After a crash the next writer of the chain looks at
the journal: if ``P.qcow2`` already has no backing file the swap happened and the steps after it are
done again (they are idempotent); otherwise the journal and the partial file are dropped
and the chain is exactly as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

from . import image, repoconfig
from .errors import RepositoryError
from .repository import Chain, Repository, write_atomically

log = logging.getLogger(__name__)

JOURNAL = ".prune.json"


def prune(chain: Chain, keep: int) -> list[str]:
    """Keep the newest ``keep`` points; return the points removed.  Hold the lock."""
    chain.clean()
    points = chain.points()
    old = doomed(chain, keep)
    if not old:
        return []
    new_base = points[-keep]
    journal = {"point": new_base.point, "remove": [m.point for m in old]}
    if new_base.base_point is not None:
        path = chain.image_path(new_base.point)
        partial = chain.partial_path(new_base.point)
        image.flatten(path, partial, compression=compression_of(chain))
        image.fsync(partial)
        write_atomically(chain.path / JOURNAL, json.dumps(journal))
        os.replace(partial, path)
        image.fsync_dir(chain.path)
    else:
        write_atomically(chain.path / JOURNAL, json.dumps(journal))
    finish(chain, journal)
    return journal["remove"]


def prune_chain(chain: Chain, keep: int, wait: bool, dry_run: bool) -> tuple[list[str], int]:
    """Prune one chain under its lock: (the points removed, the bytes that freed); with
    ``dry_run`` (under a shared lock, changing nothing) the points a prune would remove
    and the bytes their own files take (more than it frees: the kept point absorbs their
    data)."""
    if dry_run:
        with chain.lock(wait, shared=True):
            gone = [m.point for m in doomed(chain, keep)]
            return gone, sum(usage(chain, p) for p in gone)
    with chain.lock(wait):
        before = usage(chain)
        gone = prune(chain, keep)
        return gone, before - usage(chain)


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


def doomed(chain: Chain, keep: int) -> list:
    """The points a prune to ``keep`` removes, oldest first (changes nothing)."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    points = chain.points()
    return points[:-keep] if len(points) > keep else []


def finish(chain: Chain, journal: dict) -> None:
    m = chain.get(journal["point"])
    if m.base_point is not None:
        m.history.append("merged %s into this point (prune)" % ", ".join(journal["remove"]))
        m.base_point = None
        m.bytes_on_disk = image.disk_usage(chain.image_path(m.point))
        chain.commit(m)
    for point in reversed(journal["remove"]):
        chain.remove(point)
    with contextlib.suppress(FileNotFoundError):
        (chain.path / JOURNAL).unlink()
    image.fsync_dir(chain.path)


def load(chain: Chain) -> dict | None:
    """The journal of an interrupted prune, with ``swapped``: whether the flattened image
    already replaced the kept point's (then the prune is rolled forward, else back)."""
    path = chain.path / JOURNAL
    if not path.is_file():
        return None
    try:
        journal = json.loads(path.read_text())
        target = chain.image_path(journal["point"])
        journal["remove"] = list(journal["remove"])
    except (ValueError, TypeError, KeyError) as e:
        raise RepositoryError(
            "%s: the journal of an interrupted prune (%s) is unreadable (%s): the chain "
            "is as before the prune or after it; xencbt verify tells which" % (chain, path, e)
        ) from None
    journal["swapped"] = target.is_file() and image.backing(target) is None
    return journal


def recover(chain: Chain) -> None:
    """Roll an interrupted prune forward (swap done) or back (not done)."""
    journal = load(chain)
    if journal is None:
        return
    if journal.pop("swapped"):
        log.info("%s: finishing an interrupted prune", chain)
        finish(chain, journal)
    else:
        log.info("%s: undoing an interrupted prune", chain)
        (chain.path / JOURNAL).unlink()
