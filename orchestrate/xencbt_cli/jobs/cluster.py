"""``xencbt backup --cluster ADDRESS``: the VMs of one run backed up by the workers of a
Dask distributed cluster (several backup proxies), the client printing what ``--jobs``
prints.  We do not write a scheduler: distributed's scheduler places the tasks, re-runs
the task of a worker that died (up to ``distributed.scheduler.allowed-failures`` deaths),
and holds the budgets every worker shares.

Before any snapshot the client proves that every worker sees this repository: it writes a
random token into it and each worker must read that token at the same path (a path alone
may name another storage on another proxy); a worker that cannot read the password, CA
or key file refuses the run too.  Then each VM is one task (cluster_task.backup_vm),
at most ``jobs`` at once on each worker; their lines come back as events of the run's
topic.  The chains' locks are the repository's file locks (``flock``), which NFS clients
take on the server (Linux maps ``flock`` to NFS byte-range locks; mount without
``local_lock=flock``), so two proxies never write one chain at once.

A VM whose every attempt died has its leftovers (snapshot, partial files) removed by the
client, under the chains' locks, before the run ends: nothing of it is left.  A scheduler
that goes away ends the run with an error naming the VMs whose outcome is unknown: a
point is committed only whole (its VM manifest is written last), and the next backup of
each VM removes what an interrupted attempt left.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from pathlib import Path

from xencbt_core.secret import scrub

from .. import errors
from ..errors import CliError, Interrupted
from ..repo.layout import write_atomically
from ..repo.manifest import new_point_id
from ..repo.repository import Repository
from ..settings import Settings
from .backup import VmResult
from .cluster_task import BackupOptions, VmTask, backup_vm, probe

log = logging.getLogger(__name__)

Say = Callable[[str], None]
PROBE = ".cluster-probe.tmp"  # the token file; one a killed client left, the next run replaces
TASK_PREFIX = "xencbt-backup-"
LOST_AFTER = 10.0  # seconds without a scheduler before the run gives up
CONNECT_TIMEOUT = "10s"


class ClusterError(CliError):
    """The cluster cannot run this backup (no scheduler, no worker, a worker that does not
    see the repository), or went away during it."""


@contextlib.contextmanager
def connected(address: str) -> Iterator:
    """A distributed Client of the scheduler at ``address``; TLS and its certificates come
    from distributed's own security settings (its configuration files or DASK_* variables)."""
    try:
        from distributed import Client
    except ImportError:
        raise ClusterError(
            "--cluster needs Dask distributed (apt install python3-distributed)"
        ) from None
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as e:
        raise ClusterError(
            "cannot reach the cluster's scheduler at %s: %s" % (address, e)
        ) from None
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.close(timeout=5)


class ClusterBackup:
    def __init__(
        self,
        client,
        address: str,
        conf: Settings,
        repo: Repository,
        options: BackupOptions,
        say: Say,
        jobs: int = 1,
    ):
        self.client = client
        self.address = address
        self.conf = conf
        self.repo = repo
        self.options = options
        self.say = say
        self.jobs = max(1, jobs)
        self.run_id = secrets.token_hex(8)

    @property
    def topic(self) -> str:
        return "xencbt-run-" + self.run_id

    def run(self, vms: list[str]) -> list[VmResult]:
        self.check_workers()
        since = new_point_id()
        settings = self.conf.portable()
        root = str(self.repo.root.resolve())
        tasks = [VmTask(vm, settings, root, since, self.topic, self.options) for vm in vms]
        self.client.subscribe_topic(self.topic, lambda event: self.say(event[1]))
        results: dict[str, VmResult] = {}
        running: dict = {}  # future -> (task, worker it was handed to)
        try:
            self.place(tasks, running, results)
        except Interrupted as e:
            self.after_stop(tasks, running, results, e)
            e.reported = True
            raise
        return [results[t.vm] for t in tasks]

    def after_stop(self, tasks: list[VmTask], running: dict, results: dict, e: Interrupted) -> None:
        """A signal stops the client, not the workers: distributed cannot interrupt a task
        that runs.  The tasks are cancelled; one a worker has begun runs to its end there
        (its point is committed whole, or undone as any failed backup is), so each VM's
        line says what may still happen, never that nothing was kept."""
        self.client.cancel(list(running))
        for task in tasks:
            if task.vm in results:
                done = results[task.vm]
                state = "point %s kept" % done.point if done.ok else "it had failed"
                self.say(
                    "VM %s: interrupted by %s after its backup ended: %s" % (task.vm, e.name, state)
                )
            elif any(t is task for t, _ in running.values()):
                self.say(
                    "VM %s: interrupted by %s: its task is cancelled; if a worker had begun "
                    "it, it runs to its end there (xencbt status shows it; a point is "
                    "committed only whole)" % (task.vm, e.name)
                )
            else:
                self.say(
                    "VM %s: interrupted by %s: not started, nothing to undo" % (task.vm, e.name)
                )

    def workers(self) -> list[str]:
        return sorted(self.client.scheduler_info().get("workers", {}))

    def check_workers(self) -> None:
        """Refuse the run, before any snapshot, unless every worker sees this repository
        (the token) and can read the files the backup needs."""
        if not self.workers():
            raise ClusterError(
                "the cluster at %s has no workers: start `dask worker %s` on each backup "
                "proxy" % (self.address, self.address)
            )
        token = secrets.token_hex(16)
        path = self.repo.root / PROBE
        write_atomically(path, token + "\n")
        try:
            paths = [
                self.conf.password_file,
                self.conf.session_file,
                self.conf.xapi_cafile,
                self.conf.key_file,
            ]
            seen = self.client.run(probe, str(self.repo.root), PROBE, paths, on_error="return")
        finally:
            path.unlink(missing_ok=True)
        problems = [
            "%s: %s" % (worker, p)
            for worker, answer in sorted(seen.items())
            if (p := refusal(answer, token, self.repo.root))
        ]
        if problems:
            raise ClusterError(
                "not every worker can back up into %s; nothing was started:\n  %s"
                % (self.repo.root, "\n  ".join(problems))
            )

    def place(self, tasks: list[VmTask], running: dict, results: dict[str, VmResult]) -> None:
        """Hand the tasks out, at most ``jobs`` at once per worker, and collect them."""
        pending = list(tasks)
        lost_since: float | None = None
        while pending or running:
            for worker in self.workers():
                while pending and sum(w == worker for _, w in running.values()) < self.jobs:
                    task = pending.pop(0)
                    future = self.client.submit(
                        backup_vm,
                        task,
                        key="%s%s-%s" % (TASK_PREFIX, task.vm, self.run_id),
                        workers=[worker],
                        allow_other_workers=True,
                        pure=False,
                    )
                    running[future] = (task, worker)
            done = finished(list(running))
            if any(f.cancelled() for f in done):
                # The scheduler's state is gone with it: no task of the run will answer.
                self.lost([t.vm for t, _ in running.values()] + [t.vm for t in pending])
            for future in done:
                task, _ = running.pop(future)
                results[task.vm] = self.outcome(future, task)
            if self.client.status == "running":
                lost_since = None
            elif lost_since is None:
                lost_since = time.monotonic()
            elif time.monotonic() - lost_since > LOST_AFTER:
                self.lost([t.vm for t, _ in running.values()] + [t.vm for t in pending])

    def outcome(self, future, task: VmTask) -> VmResult:
        if future.status == "finished":
            return future.result()
        error = future.exception()
        result = VmResult(task.vm, error=scrub(describe(error)), exit_code=errors.ERROR)
        self.say("VM %s: backup FAILED: %s" % (task.vm, result.error))
        self.tidy(task.vm, result)
        return result

    def tidy(self, vm: str, result: VmResult) -> None:
        """Every attempt died: remove what the last one left, here, as a killed run's next
        backup would (snapshot by name, partial files, under the chains' locks)."""
        from ..xapi.facade import PoolApi
        from .backup import Backup

        try:
            with self.conf.session() as session:
                Backup(
                    PoolApi(session, self.options.in_use_timeout),
                    self.repo,
                    None,
                    self.say,
                    wait=True,
                ).tidy(vm)
            result.undone.append("what its attempts left was cleaned")
        except Exception as e:  # the VM's line says it; the next backup cleans then
            log.warning("VM %s: cleaning after its lost attempts failed: %s", vm, e)
            result.warnings.append("the next backup of this VM cleans what its attempts left")

    def lost(self, vms: list[str]) -> None:
        raise ClusterError(
            "the cluster's scheduler at %s went away (or cancelled the run's tasks); the "
            "outcome of %s is not known here: "
            "a point is committed only whole, and the next backup of each VM removes what an "
            "interrupted attempt left (xencbt list shows which points exist)"
            % (self.address, ", ".join(vms) or "no VM")
        )


def finished(futures: list) -> list:
    """The futures done now, or after at most a second (the caller checks the scheduler
    between two waits)."""
    from distributed import wait

    if not futures:
        return []
    try:
        return list(wait(futures, timeout=1, return_when="FIRST_COMPLETED").done)
    except TimeoutError:  # distributed's wait raises where concurrent.futures returns
        return []
    except CancelledError:  # the scheduler went away: the client cancels every future
        return [f for f in futures if f.cancelled()]


def refusal(answer, token: str, root: Path) -> str:
    """Why a worker's probe answer refuses the run, or ''."""
    if isinstance(answer, BaseException):
        if isinstance(answer, ImportError):
            return "xencbt is not installed for the worker's Python (%s)" % answer
        return "the probe failed: %s" % describe(answer)
    if answer["token"] != token and (answer["token"] or answer["repository"]):
        return (
            "sees another repository at %s (another storage is mounted there: mount the "
            "repository's storage at the same path on every proxy)" % root
        )
    if not answer["token"]:
        return "sees no repository at %s (%s)" % (root, answer["why"] or "no such file")
    if not answer["writable"]:
        return "may not write to %s" % root
    if answer["unreadable"]:
        return "cannot read %s" % ", ".join(answer["unreadable"])
    return ""


def describe(error: BaseException | None) -> str:
    if error is None:
        return "no result"
    name = type(error).__name__
    if name == "KilledWorker":
        return "every worker that ran its backup died (distributed's allowed-failures)"
    if name == "CancelledError":
        return "its task was cancelled (the scheduler restarted or lost it)"
    return "%s: %s" % (name, error)


def status(client) -> dict:
    """What the cluster does now: each worker with the VMs it backs up, and each pool
    host's NBD connections in use (the semaphores' leases, held on the scheduler)."""
    import cloudpickle

    from . import on_scheduler

    cloudpickle.register_pickle_by_value(on_scheduler)  # the scheduler may lack xencbt
    info = client.scheduler_info().get("workers", {})
    running = {w: [] for w in info}
    for worker, vms in client.run_on_scheduler(on_scheduler.running_vms).items():
        running.setdefault(worker, []).extend(vms)
    hosts = client.run_on_scheduler(on_scheduler.nbd_leases)
    return {
        "workers": [
            {
                "address": w,
                "name": str(info.get(w, {}).get("name", "")),
                "host": info.get(w, {}).get("host", ""),
                "threads": info.get(w, {}).get("nthreads", 0),
                "vms": sorted(running[w]),
            }
            for w in sorted(running)
        ],
        "hosts": hosts,
    }
