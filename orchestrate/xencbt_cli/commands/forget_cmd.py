"""xencbt forget: retire a VM: remove all its points and its disks' chains."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from .. import errors
from ..errors import UsageError
from ..jobs import forget
from ..settings import Settings
from ..text import human
from . import report
from .common import repository, say

NAME = "forget"
PROGRESS = False


def add_parser(subparsers, parents: list) -> None:
    fg = subparsers.add_parser(
        "forget",
        parents=parents,
        help="retire a VM: remove all its points and its disks' chains from the repository",
    )
    fg.add_argument("--repo", metavar="DIR")
    fg.add_argument(
        "--vm",
        required=True,
        metavar="VM",
        help="VM uuid (or a unique prefix, or its name) as in list",
    )
    fg.add_argument(
        "--yes", action="store_true", help="do not ask (needed when stdin is not a terminal)"
    )
    fg.add_argument("--dry-run", action="store_true", help="say what would go, change nothing")
    fg.add_argument("--wait", action="store_true", help="wait for a locked chain")


def run(args: argparse.Namespace, conf: Settings) -> int:
    repo = repository(args, conf, key_required=False)  # nothing is read, only removed
    repo.require_marked()
    vm_uuid, chains = forget.chosen(repo, args.vm)
    plan = forget.plan(repo, vm_uuid, chains)
    points = sorted({p for ps in plan.removed.values() for p in ps} | set(plan.vm_points))
    what = "VM %s (%s): %s of %s (%s), %s" % (
        plan.vm_name,
        vm_uuid,
        report.several(len(points), "point"),
        report.several(len(plan.removed), "disk"),
        "%s to %s" % (points[0], points[-1]) if points else "none",
        human(plan.freed_bytes),
    )
    if not args.dry_run and not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(
                "forget removes every point of %s for good: add --yes (or --dry-run to see "
                "what would go)" % what
            )
        print("remove every point of %s for good? [y/N] " % what, end="", file=sys.stderr)
        if input().strip().lower() not in ("y", "yes"):
            say("nothing was removed")
            return errors.OK
    done = plan if args.dry_run else forget.forget(repo, vm_uuid, chains, args.wait)
    if args.json:
        report.emit_json({**asdict(done), "dry_run": args.dry_run})
    say("%s %s" % ("would remove" if args.dry_run else "removed", what))
    for vdi, gone in sorted(done.removed.items()):
        say("  VDI %s: %s" % (vdi, ", ".join(gone) or "no readable point"))
    return errors.OK
