"""xencbt serve: serve a point, or a live snapshot, read-only over NBD."""

from __future__ import annotations

import argparse

from ..jobs.serve import serve
from ..settings import Settings
from .common import repository, say

NAME = "serve"
PROGRESS = False


def add_parser(subparsers, parents: list) -> None:
    sv = subparsers.add_parser(
        "serve", parents=parents, help="serve a point (or a live snapshot) read-only over NBD"
    )
    sv.add_argument(
        "vdi", metavar="VDI", help="uuid or prefix as in list (--snapshot: a pool VDI, or a VM)"
    )
    sv.add_argument("--repo", metavar="DIR")
    sv.add_argument("--at", metavar="POINT", help="point id (default: the newest)")
    sv.add_argument(
        "--snapshot",
        action="store_true",
        help="serve a live pool VDI via a snapshot; or every disk of a VM (name or uuid), "
        "one export per userdevice",
    )
    sv.add_argument("--listen", metavar="unix:PATH|tcp:HOST:PORT", help="default: unix socket")
    tls = sv.add_mutually_exclusive_group()
    tls.add_argument("--tls-psk", metavar="FILE", help="TLS with this PSK file (user:hexkey)")
    tls.add_argument("--tls-certificates", metavar="DIR", help="TLS with DIR/{ca,server}-*.pem")


def run(args: argparse.Namespace, conf: Settings) -> int:
    return serve(args, conf, None if args.snapshot else repository(args, conf), say)
