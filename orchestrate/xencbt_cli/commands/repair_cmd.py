"""xencbt repair: remove what interrupted runs left, finish or undo interrupted prunes,
mend what is provably mendable (sums rebuilt only when they match the manifest)."""

from __future__ import annotations

import argparse

from xencbt_core.errors import XencbtError
from xencbt_core.secret import scrub

from .. import errors
from ..errors import RepositoryError
from ..jobs import drill, verify
from ..jobs.restore_vm import alive, clean_leftovers
from ..repo import drills, mend
from ..repo.vmpoints import all_vm_points
from ..settings import Settings
from ..xapi.facade import PoolApi
from . import report
from .common import repository, say

NAME = "repair"
PROGRESS = False


def add_parser(subparsers, parents: list) -> None:
    rp = subparsers.add_parser(
        "repair",
        parents=parents,
        help="remove what interrupted runs left; finish or undo interrupted prunes",
    )
    rp.add_argument(
        "vdis", nargs="*", metavar="VM|VDI", help="VM (name or uuid) or VDI uuid (default: all)"
    )
    rp.add_argument("--repo", metavar="DIR")
    rp.add_argument("--wait", action="store_true", help="wait for a locked chain")


def run(args: argparse.Namespace, conf: Settings) -> int:
    repo = repository(args, conf)
    repo.require_marked()  # never a mode changed outside a repository
    opened = repo.tighten()
    if opened:
        say(
            "made %d directories and files of %s private (directories 0700, files 0600)"
            % (len(opened), repo.root)
        )
    chains, _ = verify.targets(repo, args.vdis)
    removed, rebuilt, unmendable = {}, [], []
    for chain in chains:
        with chain.lock(args.wait):
            gone = chain.clean()
            mended = [(m.point, mend.sums(chain, m)) for m in chain.points()]
        if gone:
            removed[chain.vdi_uuid] = gone
            say("VDI %s: removed %s" % (chain.vdi_uuid, ", ".join(gone)))
        for point, done in mended:
            if done is not None:
                (rebuilt if done[0] else unmendable).append("%s/%s" % (chain.vdi_uuid, point))
                say("VDI %s point %s: %s" % (chain.vdi_uuid, point, done[1]))
    removed.update(vm_leftovers(repo, conf))
    if args.json:
        report.emit_json(
            {
                "removed": removed,
                "made_private": sorted(map(str, opened)),
                "sums_rebuilt": rebuilt,
                "not_mended": unmendable,
            }
        )
    elif not removed and not opened and not rebuilt and not unmendable:
        say("nothing to repair")
    if unmendable:
        raise RepositoryError(
            "%d point(s) could not be mended (each line above says why): xencbt verify "
            "names the nearest intact points" % len(unmendable)
        )
    return errors.OK


def vm_leftovers(repo, conf: Settings) -> dict[str, list[str]]:
    """VM points' stray configurations and drill records' temp files; with pool options,
    what killed restore-vm runs and drills left on the pool (restore_vm.py, drill.py)."""

    removed = {}
    for points in all_vm_points(repo):
        strays = points.strays() + drills.leftovers(repo.root, points.vm_uuid)
        for path in strays:
            path.unlink()
        if strays:
            removed[points.vm_uuid + "/points"] = [p.name for p in strays]
            say("VM %s: removed %s" % (points.vm_uuid, ", ".join(p.name for p in strays)))
    if conf.xapi:
        try:
            with conf.session() as session:
                pool = PoolApi(session)
                gone = clean_leftovers(pool)
                drilled, left = drill.sweep(pool, lambda mark: not alive(mark))
        except (XencbtError, OSError) as e:
            # The repository is repaired all the same; the pool waits for the next run.
            say(
                "xencbt: warning: leftovers of restore-vm runs and drills not checked: %s"
                % scrub(str(e))
            )
            gone, drilled, left = [], [], []
        if gone:
            removed["pool"] = gone
            say("destroyed what interrupted restore-vm runs left: %s" % ", ".join(gone))
        if drilled:
            removed["drills"] = drilled
            say("destroyed what interrupted drills left: %s" % ", ".join(drilled))
        for what in left:
            say("xencbt: warning: a dead drill's %s could not be destroyed" % what)
    return removed
