"""Figure 8: ``xencbt backup --cluster`` over 1, 2 and 3 Dask workers against the same
backups in one process (``--jobs`` as many as there are workers), 8 VMs x 2 disks of a
two-host simulator.  Incrementals with nothing changed, so the figure is what going
through the cluster costs per VM (planning, the repository probe, task hand-out, the
lines as events, a worker's own XAPI login per VM), not the copy: target <= 0.5 s per
VM.  On 2 cores more workers cannot go faster; the gain of more proxies is their own
CPU and network, which one machine cannot show."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .context import Context
from .endtoend import simulator
from .figure import Figure
from .procs import BenchError

VMS = 8
NAMES = ["demo-vm"] + ["demo-vm-%d" % i for i in range(2, VMS + 1)]
TARGET = 0.5  # seconds per VM


def started(argv: list[str], ready: str, log: Path) -> tuple[subprocess.Popen, str]:
    """A dask process and the line that says it is up (its stderr goes on to ``log``)."""
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    out = open(log, "a")  # noqa: SIM115
    for line in proc.stderr:
        out.write(line)
        if ready in line:
            threading.Thread(target=lambda: out.writelines(proc.stderr), daemon=True).start()
            return proc, line
    raise BenchError("%s did not start; see %s" % (argv[2], log))


@contextlib.contextmanager
def cluster(ctx: Context, workers: int):
    py = sys.executable
    scheduler, line = started(
        [py, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0"]
        + ["--no-dashboard"],
        "Scheduler at:",
        ctx.log("dask-scheduler"),
    )
    address = line.split("Scheduler at:")[1].strip()
    procs = [scheduler]
    try:
        for i in range(workers):
            argv = [py, "-m", "distributed.cli.dask_worker", address, "--nthreads", "2"]
            argv += ["--no-nanny", "--no-dashboard", "--name", "w%d" % i]
            procs.append(started(argv, "Registered to:", ctx.log("dask-worker"))[0])
        yield address
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            p.wait(30)


def backup(ctx: Context, info: dict, repo: Path, *args: str) -> float:
    env = dict(os.environ, XENCBT_XAPI=info["xapi"], XENCBT_PASSWORD_FILE=info["password_file"])
    env["HOME"] = str(repo.parent)
    argv = [sys.executable, "-m", "xencbt_cli.main", "--xapi-cafile", info["ca_file"]]
    argv += ["--json", "backup", *NAMES, "--repo", str(repo), *args]
    t0 = time.monotonic()
    with open(ctx.work / "cluster-backup.json", "w") as f, open(ctx.log("xencbt"), "a") as err:
        code = subprocess.call(argv, env=env, stdout=f, stderr=err)
    if code:
        raise BenchError("xencbt backup failed (exit %d); see %s" % (code, ctx.log("xencbt")))
    return time.monotonic() - t0


def overhead(ctx: Context) -> list[Figure]:
    sizes = "16M,2M" if ctx.quick else "64M,16M"
    state, repo = ctx.work / "cluster-sim", ctx.work / "cluster-repo"
    figs = []
    with simulator(state, sizes, "--hosts", "2", "--vms", str(VMS), "--srs", "local") as info:
        backup(ctx, info, repo, "--jobs", "3")  # the first, full backups: not measured
        for workers in (1, 2, 3):
            local, remote = [], []
            with cluster(ctx, workers) as address:
                for _ in range(ctx.reps):
                    local.append(backup(ctx, info, repo, "--jobs", str(workers)))
                    remote.append(backup(ctx, info, repo, "--cluster", address))
            per_vm = [(r - lo) / VMS for r, lo in zip(remote, local)]
            figs.append(
                Figure(
                    "8 cluster",
                    "backup of %d VMs on %d worker(s): cost per VM of the cluster" % (VMS, workers),
                    per_vm,
                    "s",
                    target="<= %.1f s" % TARGET,
                    passed=sorted(per_vm)[len(per_vm) // 2] <= TARGET,
                    note="incrementals, nothing changed: --cluster %.2f s, in one process "
                    "(--jobs %d) %.2f s (medians)" % (_med(remote), workers, _med(local)),
                    extra={"cluster_s": remote, "local_s": local},
                )
            )
    return figs


def _med(values: list[float]) -> float:
    import statistics

    return statistics.median(values)
