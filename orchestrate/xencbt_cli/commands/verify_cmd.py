"""xencbt verify: check images, chains and checksums (read-only)."""

from __future__ import annotations

import argparse

from .. import errors
from ..jobs import verify
from ..settings import Settings
from . import report
from .common import out, repository, say

NAME = "verify"
PROGRESS = True  # progress lines on a terminal (proc/progress.py)


def add_parser(subparsers, parents: list) -> None:
    v = subparsers.add_parser(
        "verify", parents=parents, help="check images, chains and checksums (read-only)"
    )
    v.add_argument(
        "vdis", nargs="*", metavar="VM|VDI", help="VM (name or uuid) or VDI uuid (default: all)"
    )
    v.add_argument("--repo", metavar="DIR")


def run(args: argparse.Namespace, conf: Settings) -> int:
    repo = repository(args, conf)
    # The report is the command's output (stdout, as backup's and list's); with --json
    # stdout holds the JSON, and the lines go to stderr.
    count = verify.verify(repo, args.vdis, say if args.json else out)
    if args.json:
        exposed = sorted(map(str, repo.exposed())) if repo.marked() else []
        report.emit_json({"ok": True, "points": count, "open_to_others": exposed})
    else:
        out("%d points verified" % count)
    return errors.OK
