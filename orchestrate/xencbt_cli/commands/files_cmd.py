"""xencbt files: list or extract files of a point (libguestfs, no root)."""

from __future__ import annotations

import argparse

from .. import errors
from ..errors import UsageError
from ..jobs import files
from ..settings import Settings
from . import report
from .common import repository, say

NAME = "files"
PROGRESS = False


def add_parser(subparsers, parents: list) -> None:
    f = subparsers.add_parser(
        "files", parents=parents, help="list or extract files of a point (libguestfs, no root)"
    )
    f.__class__ = IntermixedParser
    f.add_argument("action", choices=("ls", "get"))
    f.add_argument("target", metavar="VM|VDI", help="as in list: uuid, prefix or name")
    f.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="FS:/path (FS as files ls names it) or /path under the guest OS's root",
    )
    f.add_argument("--repo", metavar="DIR")
    f.add_argument("--at", metavar="POINT", help="point id (default: the newest)")
    f.add_argument("--long", "-l", action="store_true", help="ls: type, mode, size, time")
    out = f.add_mutually_exclusive_group()
    out.add_argument("--to", metavar="DIR", help="get: extract into DIR")
    out.add_argument("--tar", metavar="FILE|-", help="get: write a tar archive")
    f.add_argument("--force", action="store_true", help="get: replace existing files")
    f.add_argument("--guest-key-file", metavar="FILE", help="passphrase of LUKS volumes")


def run(args: argparse.Namespace, conf: Settings) -> int:

    if args.action == "get" and not (args.to or args.tar):
        raise UsageError("files get: give --to DIR or --tar FILE|-")
    result = files.run(args, repository(args, conf), say)
    if args.json and args.tar != "-":  # stdout holds the archive then
        report.emit_json(result)
    elif args.action == "ls":
        files.print_result(result, args.long)
    else:
        say("extracted %s" % files.summary(result))
    return errors.OK


class IntermixedParser(argparse.ArgumentParser):
    """PATHs may follow options (``files get VM --at P /etc --to D``): a plain parse gives
    every positional its values at their first run and rejects the later ones."""

    def parse_known_args(self, args=None, namespace=None):
        if getattr(self, "_mixing", False):  # parse_known_intermixed_args calls us back
            return super().parse_known_args(args, namespace)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False
