"""What ``xencbt status`` runs on a cluster's scheduler, which need not have xencbt
installed (only the workers must): this module is sent by value (cloudpickle's
``register_pickle_by_value``), so it imports nothing of xencbt."""

from __future__ import annotations

NBD_PREFIX = "xencbt-nbd-"  # cluster_budget.PREFIX (tests/test_cluster.py checks they agree)
NBD_GATE = "xencbt-nbd-gate"
RUNNING = "xencbt-vm-"  # cluster_budget.RUNNING


def nbd_leases(dask_scheduler=None) -> list[dict]:
    """The connections each pool host has lent out (its semaphore's leases)."""
    ext = dask_scheduler.extensions["semaphores"]
    return [
        {
            "host": name[len(NBD_PREFIX) :],
            "in_use": len(ext.leases.get(name, {})),
            "limit": limit,
        }
        for name, limit in sorted(ext.max_leases.items())
        if name.startswith(NBD_PREFIX) and name != NBD_GATE
    ]


def running_vms(dask_scheduler=None) -> dict[str, list[str]]:
    """Worker address -> the VMs it backs up now (their leases are held)."""
    ext = dask_scheduler.extensions["semaphores"]
    found: dict[str, list[str]] = {}
    for name in sorted(ext.max_leases):
        if name.startswith(RUNNING) and ext.leases.get(name):
            worker, _, vm = name[len(RUNNING) :].partition(" ")
            found.setdefault(worker, []).append(vm)
    return found
