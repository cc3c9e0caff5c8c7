"""xencbt restore-vm: rebuild a whole VM from a VM point."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from xencbt_core.secret import scrub

from .. import errors
from ..jobs.restore_vm import RestoreVmOptions, restore_vm
from ..settings import Settings
from ..xapi.facade import PoolApi
from . import report
from .common import repository, say

NAME = "restore-vm"
PROGRESS = True  # progress lines on a terminal (proc/progress.py)


def add_parser(subparsers, parents: list) -> None:
    rv = subparsers.add_parser(
        "restore-vm", parents=parents, help="rebuild a whole VM from a VM point"
    )
    rv.add_argument("vm", metavar="VM", help="VM name or uuid as in list")
    rv.add_argument("--repo", metavar="DIR")
    rv.add_argument("--at", metavar="POINT", help="VM point id (default: the newest)")
    rv.add_argument("--to-sr", required=True, metavar="SR", help="SR for the disks (uuid or name)")
    rv.add_argument("--name", help="name of the new VM (default: the original's)")
    rv.add_argument(
        "--network",
        action="append",
        default=[],
        type=network_pair,
        metavar="FROM=TO",
        help="put the VIFs of network FROM (name or uuid) on network TO of this pool",
    )
    rv.add_argument("--new-macs", action="store_true", help="new MAC addresses for the VIFs")
    rv.add_argument("--start", action="store_true", help="start the VM once restored")


def run(args: argparse.Namespace, conf: Settings) -> int:
    repo = repository(args, conf)
    opts = RestoreVmOptions(
        args.vm, args.at, args.to_sr, args.name, args.network, args.new_macs, args.start
    )
    with conf.session() as session:
        done = restore_vm(PoolApi(session), repo, opts, say)
    for note in done.notes:
        say("note: " + note)
    code, failed = errors.OK, {}
    if done.start_error:
        code = errors.START_FAILED
        message = scrub(
            "the restored VM %s did not start: %s; it is complete and stays, halted: start "
            "it when the pool can run it (xe vm-start uuid=%s)"
            % (done.vm_uuid, done.start_error, done.vm_uuid)
        )
        say("xencbt: %s" % message)
        failed = {"error": message, "exit_code": code}
    if args.json:
        report.emit_json({**asdict(done), **failed})
    else:
        say(
            "restored VM %s (uuid %s, new) from point %s of VM %s"
            % (done.name, done.vm_uuid, done.point, done.source_vm)
        )
        print(done.vm_uuid)
    return code


def network_pair(text: str) -> str:
    """FROM=TO for restore-vm --network: checked here, so a bad one is a usage error."""
    src, sep, dst = text.partition("=")
    if not sep or not src or not dst:
        raise argparse.ArgumentTypeError(
            "%r is not FROM=TO (a network of the VM point = one of this pool, each a name "
            "or uuid)" % text
        )
    return text
