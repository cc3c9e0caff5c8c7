"""xencbt files: list or extract files of a point (libguestfs, no root)."""

from __future__ import annotations

import argparse
import time

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
    request = files.FilesRequest(
        args.action,
        args.target,
        args.paths,
        args.at,
        args.to,
        args.tar,
        args.force,
        args.guest_key_file,
    )
    result = files.run(request, repository(args, conf), say)
    if args.json and args.tar != "-":  # stdout holds the archive then
        report.emit_json(result)
    elif args.action == "ls":
        print_result(result, args.long)
    else:
        say("extracted %s" % summary(result))
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


def print_overview(info: dict) -> None:
    print("%s at point %s" % (info["target"], info["point"]))
    for d in info["disks"]:
        print("  disk %s = VDI %s (userdevice %s)" % (d["drive"], d["vdi"], d["userdevice"]))
    print("file systems (PATH = FS:/dir):")
    for f in info["filesystems"]:
        print("  %-24s %s" % (f["device"], f["type"]))
    for dev in info["encrypted"]:
        print("  %-24s encrypted (LUKS): --guest-key-file FILE opens it" % dev)
    for found in info["os"]:
        print("operating system: %s (PATH = /dir under its root):" % found["product"])
        for mp, dev in found["mountpoints"].items():
            print("  %-24s %s" % (mp, dev))


def print_listing(rows: list[dict], long: bool) -> None:
    for r in rows:
        if not long:
            print(r["name"] + ("/" if r["type"] == "directory" else ""))
            continue
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["mtime"]))
        link = " -> %s" % r["target"] if "target" in r else ""
        print("%-10s %s %12d  %s  %s%s" % (r["type"], r["mode"], r["size"], when, r["name"], link))


def print_result(result: dict | list, long: bool) -> None:
    if isinstance(result, dict):
        print_overview(result)
    else:
        print_listing(result, long)


def summary(result: dict) -> str:
    where = "to %s" % result["to"] if "to" in result else "into tar %s" % result["tar"]
    text = "%d files %s" % (result["files"], where)
    if result.get("skipped"):
        text += "; skipped (not files, links or directories): %s" % ", ".join(result["skipped"])
    return text
