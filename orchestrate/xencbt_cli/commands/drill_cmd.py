"""xencbt drill: restore a VM point apart, boot it, measure the RTO, destroy it all."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from .. import errors
from ..jobs.drill import DrillOptions, describe, drill
from ..settings import Settings
from ..xapi.facade import PoolApi
from . import report
from .common import repository, say
from .restore_vm_cmd import network_pair

NAME = "drill"
PROGRESS = True  # the restore's progress lines on a terminal


def add_parser(subparsers, parents: list) -> None:
    d = subparsers.add_parser(
        "drill",
        parents=parents,
        help="boot a VM point on an isolated network, record its RTO, remove it",
    )
    d.add_argument("vm", metavar="VM", help="VM name or uuid as in list")
    d.add_argument("--repo", metavar="DIR")
    d.add_argument("--at", metavar="POINT", help="VM point id (default: the newest)")
    d.add_argument("--to-sr", required=True, metavar="SR", help="SR for the disks (uuid or name)")
    d.add_argument(
        "--network",
        action="append",
        default=[],
        type=network_pair,
        metavar="FROM=TO",
        help="put the VIFs of network FROM on network TO of this pool (default: a private "
        "network without PIFs, made for the drill and removed after it)",
    )
    d.add_argument(
        "--timeout",
        type=positive,
        default=600.0,
        metavar="SECONDS",
        help="how long the guest may take to boot once started (default 600)",
    )


def run(args: argparse.Namespace, conf: Settings) -> int:
    repo = repository(args, conf)
    opts = DrillOptions(args.vm, args.at, args.to_sr, args.network, args.timeout)
    with conf.session() as session:
        done = drill(PoolApi(session), repo, opts, say)
    for note in done.notes:
        say("note: " + note)
    d = done.drill
    say("drill: destroyed %s" % describe(done))
    if not d.booted:
        say("xencbt: drill of VM %s point %s FAILED: %s" % (d.vm_name, d.point, d.error))
    code = errors.OK if d.booted else errors.NOT_BOOTED
    if args.json:
        out = {**asdict(d), "drill_vm": done.drill_vm, "network": done.network}
        out.update(undone=done.undone, left=done.left, notes=done.notes, guest=done.guest)
        if code:
            out.update(error=d.error, exit_code=code)
        report.emit_json(out)
    else:
        print(report.drill_line(asdict(d)))
    return code


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError("%r is not a number of seconds above 0" % text)
    return value
