"""xencbt init: create a repository with its settings (compression, encryption)."""

from __future__ import annotations

import argparse

from .. import errors
from ..errors import UsageError
from ..repo import repoconfig
from ..repo.repository import Repository
from ..settings import Settings
from . import report
from .common import say

NAME = "init"
PROGRESS = False


def add_parser(subparsers, parents: list) -> None:
    ini = subparsers.add_parser(
        "init", parents=parents, help="create a repository with its settings"
    )
    ini.add_argument("--repo", metavar="DIR")
    ini.add_argument(
        "--compression",
        choices=("zstd", "none"),
        default=None,
        help="of the clusters of new points (default zstd; none with --encrypt)",
    )
    ini.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt every image (qcow2 LUKS) and sidecar with the key of --key-file "
        "(a key given means that too)",
    )
    ini.add_argument(
        "--encryption",
        choices=("luks", "none"),
        help="luks: as --encrypt; none: a clear repository even with a key at hand "
        "(default: luks when a key is given, else none)",
    )


def run(args: argparse.Namespace, conf: Settings) -> int:
    root = args.repo or conf.repo
    if not root:
        raise UsageError("no repository: give --repo DIR (or repo= in the config)")
    repo = Repository(root)  # not unlocked: it has no settings yet
    if args.encrypt and args.encryption == "none":
        raise UsageError("--encrypt and --encryption none contradict each other")
    # A key given means an encrypted repository (restic, borg), unless --encryption none.
    encryption = "luks" if args.encrypt else args.encryption
    config = repoconfig.chosen(conf.key_file, encryption, args.compression)
    opened = repoconfig.init(repo, config)
    if opened is not None:
        say(
            "xencbt: %s was open to other users (mode %04o): made private (0700)"
            % (repo.root, opened)
        )
    unused = " (the key file is not used)" if conf.key_file and not config.encrypted else ""
    if args.json:
        report.emit_json({"repository": str(repo.root), "settings": config.shown()})
    else:
        say("created repository %s (%s)%s" % (repo.root, config.describe(), unused))
    return errors.OK
