"""Helpers (no tests) for the fault-and-abuse suite (issue #5): timed runs of the real
command, the shape of a good error, other clients holding a host's NBD slots."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cli_support import XENCBT, cli_env
from secretwatch import WATCH

# Generous: a run that is merely slow on a loaded 2-core machine must not look hung, but
# a hang still ends the test instead of the whole suite.
RUN_TIMEOUT = 180


class Run:
    """A finished ``xencbt`` run: exit code, output, wall time."""

    def __init__(self, proc: subprocess.CompletedProcess | subprocess.Popen, out, err, seconds):
        args = proc.args[proc.args.index("xencbt_cli.main") + 1 :]
        WATCH.output("xencbt %s" % " ".join(args), out, err)
        self.returncode = proc.returncode
        self.stdout = out
        self.stderr = err
        self.seconds = seconds

    def json(self) -> dict:
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return "exit %s after %.1f s\nstdout:\n%s\nstderr:\n%s" % (
            self.returncode,
            self.seconds,
            self.stdout,
            self.stderr,
        )


def argv(sim, *args: str, cafile: str | None = None) -> list[str]:
    return [*XENCBT, "--xapi-cafile", cafile or sim.info["ca_file"], *args]


def run(sim, *args: str, env: dict | None = None, cafile: str | None = None) -> Run:
    t0 = time.monotonic()
    proc = subprocess.run(
        argv(sim, *args, cafile=cafile),
        env=env or cli_env(sim),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    return Run(proc, proc.stdout, proc.stderr, time.monotonic() - t0)


@contextlib.contextmanager
def running(sim, *args: str, env: dict | None = None, cafile: str | None = None):
    """Start ``xencbt``; yields a callable that waits for it and returns the Run."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv(sim, *args, cafile=cafile),
        env=env or cli_env(sim),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def finish() -> Run:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
        return Run(proc, out, err, time.monotonic() - t0)

    try:
        yield finish
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def wait_until(predicate: Callable[[], object], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for %s" % (what or predicate)
        time.sleep(0.05)


def assert_clear_error(r: Run, code: int, *phrases: str) -> str:
    """Exit ``code``; one stderr line carries every phrase; no traceback, no raw tool noise.

    Returns that line.
    """
    assert r.returncode == code, r
    text = r.stdout + r.stderr
    assert "Traceback" not in text, r
    lines = [line for line in r.stderr.splitlines() if phrases[0] in line]
    assert len(lines) == 1, r
    for phrase in phrases:
        assert phrase in lines[0], r
    # nbdkit's and qemu-img's own stderr is summarised, never dumped.
    assert not any(line.startswith(("nbdkit:", "qemu-img:")) for line in r.stderr.splitlines()), r
    return lines[0]


def partials(repo: Path) -> list[Path]:
    return [p for p in repo.rglob("*") if p.name.endswith((".partial", ".tmp"))]


def counters(sim) -> dict:
    """Sum of every host's NBD counters."""
    total: dict[str, int] = {}
    for host in sim.control.counters().values():
        for key, value in host.items():
            total[key] = total.get(key, 0) + value
    return total


@contextlib.contextmanager
def slots_taken(host: dict, n: int) -> Iterator[list[socket.socket]]:
    """Other clients holding ``n`` of the host's 16 NBD slots (each greeted, then idle)."""
    with contextlib.ExitStack() as stack:
        held = []
        for _ in range(n):
            s = stack.enter_context(socket.create_connection((host["address"], host["nbd_port"])))
            s.settimeout(10)
            assert len(s.recv(18)) == 18  # greeted: the slot is really taken
            held.append(s)
        yield held
