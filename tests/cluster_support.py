"""A real Dask distributed cluster on loopback for the cluster tests (tests/test_cluster.py):
distributed's own scheduler and worker commands, each a process of its own, the workers
under the secret watch's exec recorder (tests/execwatch.sh) like every xencbt run.

Leases of the host semaphores expire after LEASE_TIMEOUT here (30 s by default), so a
worker killed mid-copy gives its connections back within a test's patience."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

from cli_support import CHUNK
from secretwatch import WATCH, traced

LEASE_TIMEOUT = "6s"
DASK_ENV = {
    "DASK_DISTRIBUTED__SCHEDULER__LOCKS__LEASE_TIMEOUT": LEASE_TIMEOUT,
    "DASK_DISTRIBUTED__SCHEDULER__LOCKS__LEASE_VALIDATION_INTERVAL": "1s",
}
SCHEDULER = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
WORKER = [sys.executable, "-m", "distributed.cli.dask_worker"]


class Process:
    """One cluster process; its stderr read line by line (the ready line is awaited, never
    a timer) and, at the end, handed to the secret watch."""

    def __init__(self, name: str, argv: list[str], ready: str, env: dict, cwd: Path):
        self.name = name
        self.lines: list[str] = []
        self._ready: queue.Queue = queue.Queue()
        self.proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        line = self._ready.get(timeout=120)
        if line is None:
            raise RuntimeError("%s did not start:\n%s" % (name, self.stderr()))
        self.ready_line = line

    def _read(self, ready: str) -> None:
        told = False
        for line in self.proc.stderr:
            self.lines.append(line)
            if not told and ready in line:
                self._ready.put(line)
                told = True
        if not told:
            self._ready.put(None)

    @property
    def address(self) -> str:
        """A worker's address, as the scheduler knows it."""
        line = next(x for x in self.lines if "Start worker at:" in x)
        return line.split("Start worker at:")[1].strip()

    def stderr(self) -> str:
        return "".join(self.lines)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)
        self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        WATCH.output("dask %s" % self.name, self.stderr())

    def children(self) -> list[int]:
        """Pids of this process's descendants (the nbdkit and qemu-img of its copies)."""
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            with contextlib.suppress(OSError):
                for task in os.listdir("/proc/%d/task" % pid):
                    kids = Path("/proc/%d/task/%s/children" % (pid, task)).read_text().split()
                    found += map(int, kids)
                    todo += map(int, kids)
        return found


class Cluster:
    def __init__(
        self, workdir: Path, workers: int = 3, threads: int = 2, wrap=None, env: dict | None = None
    ):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        # Workers run as the CLI does in the tests (cli_support.cli_env): same chunk size.
        self.env = {**os.environ, **DASK_ENV, "XENCBT_CHUNK_SIZE": str(CHUNK), **(env or {})}
        self.scheduler = Process(
            "scheduler",
            [*SCHEDULER, "--host", "127.0.0.1", "--port", "0", "--no-dashboard"],
            "Scheduler at:",
            self.env,
            workdir,
        )
        self.address = self.scheduler.ready_line.split("Scheduler at:")[1].strip()
        self.threads = threads
        self.workers = [self.add_worker("w%d" % i, wrap) for i in range(workers)]

    def add_worker(self, name: str, wrap=None) -> Process:
        """A worker as on a proxy of its own: its own runtime directory, so the plugin's
        machine-wide connection slots (xencbt_core/budget.py) are its own too, and only
        the cluster's semaphores hold a host's 16 across workers."""
        argv = [*WORKER, self.address, "--nthreads", str(self.threads), "--no-nanny"]
        argv += ["--no-dashboard", "--name", name]
        runtime = self.workdir / ("runtime-" + name)
        runtime.mkdir(mode=0o700, exist_ok=True)
        return Process(
            "worker " + name,
            (wrap or (lambda a: a))(traced(argv)),
            "Registered to:",
            {**self.env, "XENCBT_RUNTIME_DIR": str(runtime)},
            self.workdir,
        )

    def busy_worker(self) -> Process:
        """The worker that has a copy running (an nbdkit among its descendants)."""
        for w in self.workers:
            for pid in w.children():
                with contextlib.suppress(OSError):
                    if Path("/proc/%d/comm" % pid).read_text().strip() == "nbdkit":
                        return w
        raise AssertionError("no worker runs a copy")

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        self.scheduler.stop()
