"""xencbt backup: back up VMs: snapshot, copy what changed into the repository, clean up."""

from __future__ import annotations

import argparse

from .. import errors
from ..errors import UsageError
from ..jobs import canary, cluster
from ..jobs.backup import Backup
from ..jobs.cluster_task import BackupOptions
from ..jobs.snapshot_copy import Copier
from ..repo import repoconfig
from ..settings import Settings
from ..xapi.facade import PoolApi
from ..xapi.networks import warn_if_insecure
from . import report
from .common import repository, say

NAME = "backup"
PROGRESS = True  # progress lines on a terminal (proc/progress.py)


def add_parser(subparsers, parents: list) -> None:
    b = subparsers.add_parser("backup", parents=parents, help="back up VMs (full or incremental)")
    b.add_argument("vms", nargs="+", metavar="VM", help="VM name or uuid")
    b.add_argument("--repo", metavar="DIR")
    b.add_argument("--full", action="store_true", help="full backups even if CBT allows less")
    b.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="VMs in parallel (with --cluster: on each worker)",
    )
    b.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="run each VM's backup as a task on the workers of the Dask distributed scheduler "
        "at ADDRESS (tcp:// or tls://HOST:8786; also cluster= in the config file, "
        "XENCBT_CLUSTER); every worker must see the repository at the same path",
    )
    b.add_argument(
        "--connections",
        type=int,
        default=4,
        metavar="N",
        help="NBD connections per disk copy (1..16; 16 per host in total)",
    )
    b.add_argument(
        "--canary-blocks",
        type=int,
        default=canary.DEFAULT_BLOCKS,
        metavar="N",
        help="per incremental disk, check N random blocks CBT reports unchanged against "
        "the snapshot; a mismatch takes a full instead, exit 10 (default %d; 0: off)"
        % canary.DEFAULT_BLOCKS,
    )
    b.add_argument("--wait", action="store_true", help="wait for a locked chain")
    b.add_argument(
        "--in-use-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="keep retrying snapshot clean-up the host refuses with VDI_IN_USE (default 30)",
    )
    b.add_argument(
        "--retry-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="keep reconnecting to a host's NBD server this long (default 60; NBD just "
        "enabled on a network takes 10 s or more to answer)",
    )


def run(args: argparse.Namespace, conf: Settings) -> int:
    if not 1 <= args.connections <= 16:
        raise UsageError("--connections must be 1..16 (a host serves at most 16)")
    if args.canary_blocks < 0:
        raise UsageError("--canary-blocks must be 0 (off) or more")
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    if not 0 < args.retry_timeout < float("inf"):
        raise UsageError("--retry-timeout must be a positive number of seconds")
    if not 0 <= args.in_use_timeout < float("inf"):
        raise UsageError("--in-use-timeout must be a number of seconds, 0 or more")
    repo = repository(args, conf)
    config = repoconfig.ensure(repo, say, conf.key_file)
    if conf.key_file and not config.encrypted:
        say(
            "xencbt: warning: repository %s is not encrypted (encryption none): the key file "
            "is not used and new points are written in clear" % repo.root
        )
    results = on_cluster(args, conf, repo) if conf.cluster else in_process(args, conf, repo, config)
    if args.json:
        report.emit_json(report.backup_json(results))
    else:
        report.print_backup(results)
    failed = [r for r in results if not r.ok]
    if not failed:
        return errors.CBT_MISSED if any(map(report.canary_caught, results)) else errors.OK
    if len(failed) < len(results):
        return errors.PARTIAL
    codes = {r.exit_code for r in failed}
    return codes.pop() if len(codes) == 1 else errors.ERROR


def in_process(args: argparse.Namespace, conf: Settings, repo, config) -> list:
    """Threads of this process (--jobs), as without a cluster."""
    with conf.session() as session, conf.plugin_password() as password:
        warn_if_insecure(session, say)
        # Progress is xencbt's own lines (proc/progress.py), not qemu-img's -p counter.
        copier = Copier(conf, password, args.connections, False, args.retry_timeout)
        copier.compression = config.compression
        job = Backup(
            PoolApi(session, args.in_use_timeout),
            repo,
            copier,
            say,
            full=args.full,
            wait=args.wait,
            jobs=args.jobs,
            canary_blocks=args.canary_blocks,
        )
        return job.run(args.vms)


def on_cluster(args: argparse.Namespace, conf: Settings, repo) -> list:
    """Each VM a task on the workers of the Dask scheduler at conf.cluster."""
    options = BackupOptions(
        full=args.full,
        wait=args.wait,
        connections=args.connections,
        retry_timeout=args.retry_timeout,
        in_use_timeout=args.in_use_timeout,
        canary_blocks=args.canary_blocks,
    )
    conf.require_pool()
    conf.portable()  # refuses a password read from stdin: the workers cannot read it
    with cluster.connected(conf.cluster) as client:
        job = cluster.ClusterBackup(client, conf.cluster, conf, repo, options, say, args.jobs)
        return job.run(args.vms)
