"""The NBD connection budget of a whole cluster run (jobs/cluster.py): each pool host's 16
connections held across every worker, as ``ConnectionBudget`` holds them across the
threads of one process.

One distributed ``Semaphore`` per host (``xencbt-nbd-<host>``, 16 leases), kept on the
scheduler: a worker that dies stops refreshing its leases and the scheduler takes them
back after ``distributed.scheduler.locks.lease-timeout`` (30 s by default).  A copy takes
its connections from every host that may serve its VDIs, all at once, as the local budget
does; taking n leases is n acquires, so two copies taking leases at the same moment could
each hold a part of what the other waits for.  A gate (one more semaphore, one lease)
makes each copy's taking one step: the gate is held only while taking, never while
copying, and releasing needs no gate, so whoever waits at the gate waits only for leases
that copies in progress will give back.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

from .snapshot_copy import MAX_PER_HOST

log = logging.getLogger(__name__)

PREFIX = "xencbt-nbd-"  # on_scheduler.py reads them by these names
GATE = PREFIX + "gate"
RUNNING = "xencbt-vm-"  # + "<worker address> <vm>": held while a worker backs up a VM


def semaphore_name(host: str) -> str:
    return PREFIX + (host or "pool")


class ClusterBudget:
    """``ConnectionBudget.take`` with leases of distributed semaphores (on a worker)."""

    def __init__(self, limit: int = MAX_PER_HOST):
        self.limit = limit

    @contextlib.contextmanager
    def take(self, n: int, hosts: Sequence[str] = ("",)) -> Iterator[int]:
        from distributed import Semaphore  # only on a worker of a cluster run

        n = max(1, min(n, self.limit))
        held = [Semaphore(self.limit, semaphore_name(h)) for h in sorted(set(hosts)) or [""]]
        gate = Semaphore(1, GATE)
        taken: list[tuple[Semaphore, int]] = []
        try:
            with _lease(gate):
                for sem in held:
                    taken.append((sem, 0))
                    for _ in range(n):
                        sem.acquire()
                        taken[-1] = (sem, taken[-1][1] + 1)
            log.debug("took %d NBD connection(s) on %s", n, ", ".join(s.name for s in held))
            yield n
        finally:
            for sem, count in taken:
                for _ in range(count):
                    sem.release()


@contextlib.contextmanager
def running(worker: str, vm: str) -> Iterator[None]:
    """Held while this worker backs up ``vm``: ``xencbt status`` reads it on the scheduler.
    Not the scheduler's own task list: a task whose client went away (killed) is dropped
    from it, while the worker's thread backs the VM up to its end."""
    from distributed import Semaphore

    with _lease(Semaphore(1, "%s%s %s" % (RUNNING, worker, vm))):
        yield


@contextlib.contextmanager
def _lease(sem) -> Iterator[None]:
    sem.acquire()
    try:
        yield
    finally:
        sem.release()
