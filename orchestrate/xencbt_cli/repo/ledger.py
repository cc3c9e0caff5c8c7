"""The snapshot VDIs a repository made on the pool, per VM: ``REPO/<vm-uuid>/.snapshots.json``.

A backup snapshots the VM, keeps each disk's snapshot VDI as CBT metadata while it is the
base of the next incremental, and destroys it once a newer point replaced it.  A run killed
in between would leak VDIs: after ``VM.destroy`` and before ``VDI.data_destroy`` a snapshot
VDI belongs to no VM and still holds a full copy of the disk.  So each snapshot VDI is
written here as soon as ``VM.snapshot`` returns and leaves only once it is gone from the
pool; the next backup of the VM destroys every listed VDI no chain needs any more and
data-destroys the needed ones that still hold data.  (A snapshot VM whose reply never
arrived, the run killed during ``VM.snapshot``, is found by its name prefix instead.)

Only the writer of the VM's chains touches it, under their locks.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import RepositoryError
from .layout import write_atomically

NAME = ".snapshots.json"


class Ledger:
    def __init__(self, vm_dir: Path):
        self.path = vm_dir / NAME

    def load(self) -> set[str]:
        if not self.path.is_file():
            return set()
        try:
            return set(json.loads(self.path.read_text(encoding="utf-8"))["vdis"])
        except (ValueError, TypeError, KeyError) as e:
            raise RepositoryError(
                "%s is unreadable (%s): remove it; snapshot VDIs it listed may then stay on "
                "the pool (xe vdi-list is-a-snapshot=true)" % (self.path, e)
            ) from None

    def _save(self, uuids: set[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, json.dumps({"vdis": sorted(uuids)}) + "\n")

    def add(self, uuids: set[str]) -> None:
        self._save(self.load() | uuids)

    def discard(self, uuids: set[str]) -> None:
        if uuids:
            self._save(self.load() - uuids)
