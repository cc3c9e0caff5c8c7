"""What a cluster run (jobs/cluster.py) runs on a worker: the repository probe, and one
VM's whole backup (snapshot, copies, digests, commit, clean-up) as one task.

A task carries no secret: the connection settings are paths and names (the password file
is read on the worker, from the same path, as the CLI reads it), so neither the task's
arguments nor the scheduler's state ever hold a password, a session or a key.  Each VM's
lines go to the client as events of the run's topic (``Worker.log_event``).

A task that runs again (its worker died mid-copy and the scheduler handed it to another)
starts like any backup after a killed one: under the chains' locks, the dead attempt's
partial files and its snapshot (named ``xencbt-<point>``) are recognised and removed
(``Backup.clean``).  A VM point at or after the run's start means an earlier attempt of
this run committed it (it died before its answer reached the client): that point is the
answer, none is taken twice.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from ..repo import repoconfig
from ..repo.layout import SETTINGS
from ..repo.repository import Repository
from ..repo.vmpoints import VmManifest, VmPoints
from ..settings import Settings
from ..xapi.facade import PoolApi
from . import canary
from .backup import Backup, VmResult, summary
from .cluster_budget import ClusterBudget, running
from .snapshot_copy import Copier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackupOptions:
    full: bool = False
    wait: bool = False
    connections: int = 4
    retry_timeout: float = 60.0
    in_use_timeout: float = 30.0
    canary_blocks: int = canary.DEFAULT_BLOCKS


@dataclass(frozen=True)
class VmTask:
    """One VM's backup as the client hands it to a worker."""

    vm: str
    settings: dict  # Settings' fields: URLs, user name and paths, never a secret
    repo: str  # an absolute path every worker sees
    since: str  # the run's start, as a point id: see the module's docstring
    topic: str  # where the VM's lines go (the client subscribes to it)
    options: BackupOptions = field(default_factory=BackupOptions)


def probe(repo: str, token_name: str, paths: list[str]) -> dict:
    """What this worker sees: the token the client wrote into the repository (its
    identity: a path alone may name another storage on another proxy), whether it may
    write there, and which of ``paths`` (password, CA, key files) it cannot read."""
    token = Path(repo) / token_name
    try:
        seen = token.read_text(encoding="ascii").strip()
    except OSError as e:
        seen, why = "", os.strerror(e.errno or 0) or str(e)
    else:
        why = ""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "token": seen,
        "why": why,
        "repository": (Path(repo) / SETTINGS).is_file(),
        "writable": os.access(repo, os.W_OK),
        "unreadable": [p for p in paths if p and not os.access(p, os.R_OK)],
    }


def backup_vm(task: VmTask) -> VmResult:
    """The whole backup of one VM, on this worker; the same result ``--jobs`` gives."""
    from distributed import get_worker

    worker = get_worker()

    def say(line: str) -> None:
        log.info("%s", line)
        worker.log_event(task.topic, line)

    conf = Settings(**task.settings)
    repo = Repository(task.repo)
    config = repoconfig.unlock(repo, conf.key_file)
    done = committed_since(repo, task)
    if done is not None:
        # An earlier attempt of this run died after its commit (or another backup of the
        # VM ran meanwhile): that point is this run's, none is taken twice.
        say(
            "VM %s: point %s was committed since this run began: kept as its point"
            % (task.vm, done.point)
        )
        return earlier_result(repo, task.vm, done)
    opts = task.options
    with (
        running(worker.address, task.vm),
        conf.session() as session,
        conf.plugin_password() as password,
    ):
        copier = Copier(conf, password, opts.connections, False, opts.retry_timeout)
        copier.compression = config.compression if config else "none"
        job = Backup(
            PoolApi(session, opts.in_use_timeout),
            repo,
            copier,
            say,
            full=opts.full,
            wait=opts.wait,
            budget=ClusterBudget(),
            canary_blocks=opts.canary_blocks,
        )
        return job.one(task.vm)


def committed_since(repo: Repository, task: VmTask) -> VmManifest | None:
    """The VM point an earlier attempt of this run committed for ``task.vm`` (a name or a
    uuid), if any."""
    if not repo.root.is_dir():
        return None
    for vm_dir in sorted(p for p in repo.root.iterdir() if p.is_dir()):
        for m in reversed(VmPoints(repo, vm_dir.name).manifests()):
            if m.point < task.since:
                break
            if task.vm in (m.vm_uuid, m.vm_name):
                return m
    return None


def earlier_result(repo: Repository, name: str, m: VmManifest) -> VmResult:
    """The result the earlier attempt would have returned, read back from its point."""
    result = VmResult(name, vm_uuid=m.vm_uuid, point=m.point, ok=True, locked=True)
    for d in m.disks:
        chain = repo.chain(m.vm_uuid, d["vdi_uuid"])
        points = chain.points()
        at = [i for i, p in enumerate(points) if p.point == d["point"]]
        if at:
            prev = points[at[0] - 1] if at[0] > 0 else None
            result.disks.append(summary(points[at[0]], prev))
    return result
