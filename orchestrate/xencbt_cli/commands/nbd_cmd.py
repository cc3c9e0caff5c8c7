"""xencbt nbd: NBD on the pool's networks: status, enable, disable."""

from __future__ import annotations

import argparse

from .. import errors
from ..settings import Settings
from ..xapi.networks import Networks
from . import report
from .common import say

NAME = "nbd"
PROGRESS = False


def add_parser(subparsers, parents: list) -> None:
    n = subparsers.add_parser("nbd", parents=parents, help="NBD on the pool's networks")
    n.add_argument("action", choices=("status", "enable", "disable"))
    n.add_argument("--network", metavar="NAME|UUID")
    n.add_argument("--insecure", action="store_true", help="insecure_nbd (no TLS)")
    n.add_argument(
        "--wait-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="enable: how long to wait for every host to serve NBD (default 60)",
    )


def run(args: argparse.Namespace, conf: Settings) -> int:
    with conf.session() as session:
        nets = Networks(session, say)
        if args.action == "status":
            rows = nets.status()
            if args.json:
                report.emit_json(rows)
            else:
                for r in rows:
                    print("%-40s %-36s %s" % (r["name"], r["uuid"], r["mode"] or "-"))
            return errors.OK
        if args.action == "enable":
            nets.enable(args.network, args.insecure, args.wait_timeout)
        else:
            nets.disable(args.network)
    return errors.OK
