"""Retire a VM: every point of it, its disks' chains and its VM points, out of the
repository (``xencbt forget --vm``).

A VM restored after a disaster has a new uuid, so the old one's points would stay for
ever: no retention rule reaches a VM that is never backed up again.  Every chain of the
VM is locked (exclusive, as a prune takes it) before anything goes; then the VM points
stop existing (manifest first), then each chain's points, newest first and each
manifest before its image, so a run stopped half-way leaves whole older points that
``list`` shows and a second ``forget`` removes.  The VM's folder goes last.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field

from xencbt_core.params import UUID

from ..errors import RepositoryError
from ..repo import layout
from ..repo.repository import Chain, Repository
from ..repo.vmpoints import VmPoints


@dataclass
class Forgotten:
    vm_uuid: str
    vm_name: str
    removed: dict[str, list[str]] = field(default_factory=dict)  # vdi -> points
    vm_points: list[str] = field(default_factory=list)
    freed_bytes: int = 0


def chosen(repo: Repository, want: str) -> tuple[str, list[Chain]]:
    """The VM ``want`` names (uuid, unique prefix, or a name only one VM has), with its
    chains; RepositoryError naming what the repository holds otherwise."""
    found: dict[str, list[Chain]] = {}
    for chain in repo.chains():
        found.setdefault(chain.vm_uuid, []).append(chain)
    for points in (VmPoints(repo, d.name) for d in repo.root.iterdir() if UUID.match(d.name)):
        if points.manifests():
            found.setdefault(points.vm_uuid, [])
    if want in found:
        return want, found[want]
    matches = [u for u in found if u.startswith(want)] or [
        u for u, chains in found.items() if want in {m.vm_name for c in chains for m in c.points()}
    ]
    if len(matches) == 1:
        return matches[0], found[matches[0]]
    if matches:
        raise RepositoryError(
            "%s names %d VMs in %s (%s): give the uuid of the one to forget"
            % (want, len(matches), repo.root, ", ".join(sorted(matches)))
        )
    raise RepositoryError(
        "no VM %s in %s: nothing was removed (xencbt list shows the VMs it holds)"
        % (want, repo.root)
    )


def name_of(repo: Repository, vm_uuid: str, chains: list[Chain]) -> str:
    names = [m.vm_name for c in chains for m in c.points()]
    names += [m.vm_name for m in VmPoints(repo, vm_uuid).manifests()]
    return names[-1] if names else "?"


def plan(repo: Repository, vm_uuid: str, chains: list[Chain]) -> Forgotten:
    """What forgetting the VM removes (nothing is touched)."""
    done = Forgotten(vm_uuid, name_of(repo, vm_uuid, chains))
    for chain in chains:
        done.removed[chain.vdi_uuid] = [m.point for m in chain.points()]
    done.vm_points = [m.point for m in VmPoints(repo, vm_uuid).manifests()]
    vm_dir = repo.root / vm_uuid
    done.freed_bytes = sum(p.lstat().st_blocks * 512 for p in vm_dir.rglob("*") if p.is_file())
    return done


def forget(repo: Repository, vm_uuid: str, chains: list[Chain], wait: bool) -> Forgotten:
    """Remove the VM's points and folder, under every chain's lock (what is removed is
    told as found once the locks are held: a backup that ended meanwhile is counted)."""
    vm_points = VmPoints(repo, vm_uuid)
    with contextlib.ExitStack() as locks:
        for chain in chains:
            locks.enter_context(chain.lock(wait))
        done = plan(repo, vm_uuid, chains)
        for point in reversed(done.vm_points):
            vm_points.remove(point)
        for chain in chains:
            for m in reversed(chain.points()):
                chain.remove(m.point)
            layout.fsync_dir(chain.path)
        shutil.rmtree(repo.root / vm_uuid)
    layout.fsync_dir(repo.root)
    return done
