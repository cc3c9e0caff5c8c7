"""The restore drills of a VM, kept in the repository: ``REPO/<vm-uuid>/drills.json``.

Each drill (jobs/drill.py) appends one record: when, which point, whether the guest
booted, and the measured recovery time: the restore's seconds, the boot's seconds and
their total (the RTO).  ``list`` shows each VM's last one; the file holds the trend (the
newest KEPT records).  Written whole with ``write_atomically``: a reader sees the file
before or after a drill, never half of it.  It holds no secret: uuids, times, names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import RepositoryError
from .layout import DRILLS, write_atomically

__all__ = ["DRILLS", "Drill", "last", "leftovers", "load", "record"]

KEPT = 100  # records per VM: a year of weekly drills, twice over


@dataclass
class Drill:
    started: str  # UTC, ISO 8601
    point: str
    vm_uuid: str  # the backed-up VM
    vm_name: str
    sr: str
    booted: bool
    restore_seconds: float
    boot_seconds: float | None  # None: it did not boot
    rto_seconds: float | None  # restore + boot; None: it did not boot
    timeout: float
    error: str = ""  # why it did not boot (or failed)
    isolated: bool = True  # on a network the drill made (no --network mapping)


def path(repo_root: Path, vm_uuid: str) -> Path:
    return Path(repo_root) / vm_uuid / DRILLS


def load(repo_root: Path, vm_uuid: str) -> list[Drill]:
    """The VM's drills, oldest first ([] when none ran)."""
    p = path(repo_root, vm_uuid)
    if not p.is_file():
        return []
    try:
        rows = json.loads(p.read_text(encoding="utf-8"))["drills"]
        names = {f.name for f in fields(Drill)}
        return [Drill(**{k: v for k, v in row.items() if k in names}) for row in rows]
    except (ValueError, TypeError, KeyError) as e:
        raise RepositoryError(
            "%s is unreadable (%s): move it away; the next drill starts a new record" % (p, e)
        ) from None


def record(repo_root: Path, drill: Drill) -> None:
    """Append ``drill`` to its VM's record (the oldest dropped beyond KEPT)."""
    drills = [*load(repo_root, drill.vm_uuid), drill][-KEPT:]
    text = json.dumps({"drills": [asdict(d) for d in drills]}, indent=1, sort_keys=True)
    write_atomically(path(repo_root, drill.vm_uuid), text + "\n")


def leftovers(repo_root: Path, vm_uuid: str) -> list[Path]:
    """The temp file a drill killed while recording left (``repair`` removes it)."""
    tmp = path(repo_root, vm_uuid).with_name(DRILLS + ".tmp")
    return [tmp] if tmp.is_file() else []


def last(repo_root: Path, vm_uuid: str) -> Drill | None:
    drills = load(repo_root, vm_uuid)
    return drills[-1] if drills else None
