"""xencbt status: what a cluster run is doing (backup --cluster): which VM is backed up
on which worker, and each pool host's NBD connections in use."""

from __future__ import annotations

import argparse

from .. import errors
from ..errors import UsageError
from ..jobs import cluster
from ..settings import Settings
from . import report

NAME = "status"
PROGRESS = False


def add_parser(subparsers, parents: list) -> None:
    s = subparsers.add_parser(
        "status",
        parents=parents,
        help="show what the workers of a cluster (backup --cluster) are backing up",
    )
    s.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="the Dask scheduler's address (also cluster= in the config file, XENCBT_CLUSTER)",
    )


def run(args: argparse.Namespace, conf: Settings) -> int:
    if not conf.cluster:
        raise UsageError("no cluster given: use --cluster ADDRESS, XENCBT_CLUSTER or cluster=")
    with cluster.connected(conf.cluster) as client:
        found = cluster.status(client)
    found["cluster"] = conf.cluster
    if args.json:
        report.emit_json(found)
        return errors.OK
    print("cluster %s: %d worker(s)" % (conf.cluster, len(found["workers"])))
    for w in found["workers"]:
        doing = ", ".join(w["vms"]) or "idle"
        print(
            "  worker %s (%s, %d threads): %s"
            % (w["name"] or w["address"], w["host"], w["threads"], doing)
        )
    for h in found["hosts"]:
        print(
            "  pool host %s: %d of %d NBD connections in use" % (h["host"], h["in_use"], h["limit"])
        )
    return errors.OK
