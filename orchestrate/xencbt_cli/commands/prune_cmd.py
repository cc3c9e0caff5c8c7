"""xencbt prune: remove the points a retention policy does not keep."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from .. import errors
from ..errors import UsageError
from ..jobs.prune import retain
from ..jobs.retention import Policy
from ..settings import Settings
from . import report
from .common import out, repository, say

NAME = "prune"
PROGRESS = False


def add_parser(subparsers, parents: list) -> None:
    pr = subparsers.add_parser(
        "prune",
        parents=parents,
        help="remove points a retention policy does not keep (restic's --keep-* rules)",
    )
    pr.add_argument("vms", nargs="*", metavar="VM", help="VM name or uuid (default: all)")
    pr.add_argument("--repo", metavar="DIR")
    pr.add_argument("--keep", type=keep_count, metavar="N", help="the same as --keep-last N")
    for rule, what in (
        ("last", "the newest N points"),
        ("hourly", "the newest point of each of the last N hours that have one"),
        ("daily", "the newest point of each of the last N days that have one"),
        ("weekly", "the newest point of each of the last N ISO weeks that have one"),
        ("monthly", "the newest point of each of the last N months that have one"),
        ("yearly", "the newest point of each of the last N years that have one"),
    ):
        pr.add_argument(
            "--keep-" + rule,
            type=keep_count,
            default=0,
            metavar="N",
            help="keep %s (UTC; N or unlimited)" % what,
        )
    pr.add_argument("--wait", action="store_true", help="wait for a locked chain")
    pr.add_argument("--dry-run", action="store_true", help="say what would go, change nothing")


def run(args: argparse.Namespace, conf: Settings) -> int:
    if args.keep is not None and args.keep_last:
        raise UsageError("--keep is --keep-last: give one of them")
    policy = Policy(
        last=args.keep if args.keep is not None else args.keep_last,
        hourly=args.keep_hourly,
        daily=args.keep_daily,
        weekly=args.keep_weekly,
        monthly=args.keep_monthly,
        yearly=args.keep_yearly,
    )
    if policy.empty():
        raise UsageError("say what to keep: --keep-last N (or --keep N), --keep-daily N, ...")
    repo = repository(args, conf, key_required=not args.dry_run)  # a plan reads manifests
    tell = say if args.json else out  # the report is the output; --json's is on stdout
    removed, freed, vms = {}, 0, []
    for vm_uuid, chains in repo.chains_by_vm(args.vms).items():
        done = retain(chains, policy, args.wait, args.dry_run)
        vms.append(report.retained(vm_uuid, chains, done))
        if not args.json:
            for line in report.retained_lines(vms[-1], args.dry_run):
                out(line)
        for vdi, gone in done["removed"].items():
            tell(report.pruned_chain(vdi, gone, done["freed_by_vdi"][vdi], args.dry_run))
        removed.update(done["removed"])
        freed += done["freed_bytes"]
    if args.json:
        report.emit_json(
            {
                "removed": removed,
                "freed_bytes": freed,
                "dry_run": args.dry_run,
                "policy": asdict(policy),
                "vms": vms,
            }
        )
    tell(report.pruned(removed, freed, policy, args.dry_run))
    return errors.OK


def keep_count(text: str) -> int:
    if text == "unlimited":
        return -1
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError("%r is not a count of 1 or more, or unlimited" % text)
    return n
