"""xencbt list: list the repository's points, per VM and disk."""

from __future__ import annotations

import argparse

from .. import errors
from ..repo import repoconfig
from ..settings import Settings
from . import report
from .common import repository, say

NAME = "list"
PROGRESS = False


def add_parser(subparsers, parents: list) -> None:
    s = subparsers.add_parser("list", parents=parents, help="list backup points")
    s.add_argument("--repo", metavar="DIR")


def run(args: argparse.Namespace, conf: Settings) -> int:
    repo = repository(args, conf, key_required=False)  # manifests are clear
    listed = report.listing(repo)
    config = repoconfig.load(repo)
    listed["settings"] = config.shown() if config else None
    for chain in repo.chains():
        for point, why in chain.damaged().items():
            say(
                "xencbt: warning: VDI %s: the manifest of point %s is unreadable (%s): "
                "that point is not listed; xencbt verify" % (chain.vdi_uuid, point, why)
            )
    if args.json:
        report.emit_json(listed)
    else:
        described = config.describe() if config else "no settings file (older than xencbt init)"
        print("repository %s: %s" % (repo.root, described))
        report.print_listing(listed)
    return errors.OK
