"""xencbt restore: restore a point of a VDI: to a file, a new VDI, or over a VDI."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from .. import errors
from ..errors import UsageError
from ..jobs import restore
from ..jobs.pool_restore import to_sr, to_vdi
from ..settings import Settings
from ..xapi.facade import PoolApi
from . import report
from .common import repository, say

NAME = "restore"
PROGRESS = True  # progress lines on a terminal (proc/progress.py)


def add_parser(subparsers, parents: list) -> None:
    r = subparsers.add_parser("restore", parents=parents, help="restore a point of a VDI")
    r.add_argument("vdi", metavar="VDI", help="VDI uuid (or unique prefix) as in list")
    r.add_argument("--repo", metavar="DIR")
    r.add_argument("--at", metavar="POINT", help="point id (default: the newest)")
    dest = r.add_mutually_exclusive_group(required=True)
    dest.add_argument(
        "--to-file",
        type=Path,
        metavar="PATH",
        help="write the disk into this file (raw or qcow2, see --format), private (0600)",
    )
    dest.add_argument("--to-sr", metavar="SR", help="new VDI on this SR (uuid or name)")
    dest.add_argument("--to-vdi", metavar="VDI", help="overwrite this VDI (differences only)")
    r.add_argument(
        "--format",
        choices=("raw", "qcow2"),
        help="of --to-file (default: from its extension, .raw/.img or .qcow2)",
    )
    r.add_argument(
        "--mode",
        type=file_mode,
        metavar="OCTAL",
        help="permissions of --to-file (default 0600)",
    )
    r.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing file, or a VDI in use or of another VM (--to-vdi)",
    )
    r.add_argument(
        "--salvage",
        action="store_true",
        help="--to-file only: a point that does not read back as recorded is written all "
        "the same (zeros where nothing can be read); the damaged ranges are listed and "
        "the exit code is 8",
    )


def run(args: argparse.Namespace, conf: Settings) -> int:
    repo = repository(args, conf)
    if args.salvage:
        return salvage(args, repo)
    if args.to_file:
        fmt = restore.file_format(args.to_file, args.format)
        mode = 0o600 if args.mode is None else args.mode
        m = restore.to_file(repo, args.vdi, args.at, args.to_file, fmt, args.force, mode)
        target = str(args.to_file)
    else:
        if args.format or args.mode is not None:
            raise UsageError("--format and --mode are about --to-file")

        with conf.session() as session:
            pool = PoolApi(session)
            if args.to_sr:
                m, target = to_sr(pool, repo, args.vdi, args.at, args.to_sr)
            else:
                m, target = to_vdi(pool, repo, args.vdi, args.at, args.to_vdi, args.force)
    if args.json:
        report.emit_json({"restored": asdict(m), "to": target})
    else:
        say("restored VDI %s point %s to %s" % (m.vdi_uuid, m.point, target))
    return errors.OK


def salvage(args, repo) -> int:
    if not args.to_file:
        raise UsageError("--salvage writes a file: give --to-file PATH (then import it)")
    fmt = restore.file_format(args.to_file, args.format)
    mode = 0o600 if args.mode is None else args.mode
    found = restore.salvage(repo, args.vdi, args.at, args.to_file, fmt, args.force, mode)
    code = errors.SALVAGED if found.damaged or found.unchecked else errors.OK
    lines = restore.salvaged_lines(found, str(args.to_file))
    if args.json:
        report.emit_json(
            {
                "restored": asdict(found.m),
                "to": str(args.to_file),
                "salvaged": True,
                "damaged": found.ranges(),
                "unreadable": [{"offset": o, "length": n} for o, n in found.unreadable],
                "unchecked": found.unchecked,
                "exit_code": code,
            }
        )
    for line in lines:
        say(line)
    return code


def file_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError("%r is not an octal mode such as 0600 or 0640" % text)
    return mode
