"""The journal of a prune step (``<chain>/.prune.json``): {point, base, remove}.

jobs/prune.py writes it once a kept point's rewritten image is ready and before it is
swapped in; ``recover`` (run by every writer of the chain before anything else,
Chain.clean) rolls an interrupted step forward (the swap happened) or back (it did
not).  Below the repository: it works on a chain it is given, and never on the
repository as a whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Protocol

from ..errors import RepositoryError
from ..proc import qemu_img
from . import layout
from .layout import VM_POINTS, write_atomically
from .manifest import Manifest


class JournaledChain(Protocol):
    """What the journal needs of a chain (repository.Chain, which imports this module)."""

    path: Path

    def get(self, point: str | None) -> Manifest: ...
    def image_path(self, point: str) -> Path: ...
    def commit(self, manifest: Manifest, sums: bytes | None = None) -> None: ...
    def remove(self, point: str) -> None: ...


log = logging.getLogger(__name__)

JOURNAL = ".prune.json"


def write(chain: JournaledChain, journal: dict) -> None:
    write_atomically(chain.path / JOURNAL, json.dumps(journal))


def finish(chain: JournaledChain, journal: dict) -> None:
    m = chain.get(journal["point"])
    base = journal.get("base")
    if m.base_point != base:
        m.history.append("merged %s into this point (prune)" % ", ".join(journal["remove"]))
        m.base_point = base
        m.bytes_on_disk = layout.disk_usage(chain.image_path(m.point))
        chain.commit(m)
    for point in reversed(journal["remove"]):
        forget_vm_point(chain.path.parent, point)  # the VM point first
        chain.remove(point)
    with contextlib.suppress(FileNotFoundError):
        (chain.path / JOURNAL).unlink()
    layout.fsync_dir(chain.path)


def load(chain: JournaledChain) -> dict | None:
    """The journal of an interrupted prune, with ``swapped``: whether the flattened image
    already replaced the kept point's (then the prune is rolled forward, else back)."""
    path = chain.path / JOURNAL
    if not path.is_file():
        return None
    try:
        journal = json.loads(path.read_text())
        target = chain.image_path(journal["point"])
        journal["remove"] = list(journal["remove"])
        journal["base"] = journal.get("base")  # absent: made standalone (older xencbt)
        backing = None if journal["base"] is None else chain.image_path(journal["base"]).name
    except (ValueError, TypeError, KeyError) as e:
        raise RepositoryError(
            "%s: the journal of an interrupted prune (%s) is unreadable (%s): the chain "
            "is as before the prune or after it; xencbt verify tells which" % (chain, path, e)
        ) from None
    journal["swapped"] = target.is_file() and qemu_img.backing(target) == backing
    return journal


def recover(chain: JournaledChain) -> None:
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


def forget_vm_point(vm_dir: Path, point: str) -> None:
    """A disk's point goes (prune): the VM point it belongs to stops existing first,
    manifest before configuration; the kept points keep theirs."""
    path = vm_dir / VM_POINTS
    for name in (point + ".json", point + ".config.json"):
        with contextlib.suppress(FileNotFoundError):
            (path / name).unlink()
    if path.is_dir():
        layout.fsync_dir(path)
