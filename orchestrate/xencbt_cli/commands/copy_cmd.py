"""xencbt copy: copy the points another repository lacks."""

from __future__ import annotations

import argparse

from xencbt_core.secret import scrub

from .. import errors
from ..errors import UsageError
from ..jobs.replicate import copy_repository, copy_vm_points
from ..repo import repoconfig
from ..repo.repository import Repository
from ..settings import Settings
from . import report
from .common import repository, say

NAME = "copy"
PROGRESS = False


def add_parser(subparsers, parents: list) -> None:
    cp = subparsers.add_parser(
        "copy", parents=parents, help="copy the points another repository lacks"
    )
    cp.add_argument("vms", nargs="*", metavar="VM", help="VM name or uuid (default: all)")
    cp.add_argument("--repo", metavar="DIR", help="the repository to copy from")
    cp.add_argument("--to", metavar="DIR", required=True, help="the repository to copy into")
    cp.add_argument("--wait", action="store_true", help="wait for a locked chain")
    cp.add_argument(
        "--full",
        action="store_true",
        help="copy each chain's next point as a standalone image (a full), not onto DST's "
        "newest point: the way on past a damaged chain in DST, which copy names",
    )
    cp.add_argument(
        "--to-key-file",
        metavar="FILE",
        help="key of an encrypted DST when it is not --key-file's (copy re-encrypts)",
    )
    cp.add_argument(
        "--to-encryption",
        choices=("luks", "none"),
        help="of a new DST (default: luks when SRC is encrypted or a key is given); none: "
        "copy in clear, also into an existing clear DST",
    )


def run(args: argparse.Namespace, conf: Settings) -> int:
    src = repository(args, conf)
    dst = Repository(args.to)
    if dst.root.resolve() == src.root.resolve():
        raise UsageError("--to names the repository itself")
    # A copy of an encrypted SRC, or with a key at hand, is encrypted unless
    # --to-encryption none; DST's own key (another, or the same file) is checked before
    # anything is copied.
    dst_key = args.to_key_file or conf.key_file
    encryption = repoconfig.copy_target(
        src, dst, args.to_key_file, conf.key_file, args.to_encryption
    )
    repoconfig.unlock(dst, dst_key)
    chains = [c for cs in src.chains_by_vm(args.vms).values() for c in cs]
    if encryption is not None:  # a new DST
        repoconfig.ensure(dst, say, dst_key, encryption)
    copied, held = copy_repository(src, dst, chains, args.wait, say, args.full)
    vm_points = copy_vm_points(src, dst, chains, args.wait, say)
    say(report.copied(copied, vm_points, dst.root))
    code, failed = errors.OK, {}
    if held:
        # The others were copied; each chain held back is named with its way on.
        code = errors.VERIFY_FAILED
        message = scrub(
            "%s not copied on (the other points were): %s"
            % (report.several(len(held), "VDI"), "; ".join(held[v] for v in sorted(held)))
        )
        say("xencbt: %s" % message)
        failed = {"error": message, "exit_code": code}
    if args.json:
        report.emit_json(
            {"copied": copied, "vm_points": vm_points, "held": held, "to": str(dst.root)} | failed
        )
    return code
