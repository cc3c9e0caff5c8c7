"""Processes the benchmarks start: TLS upstreams, the plugin, timed clients.

Every server logs to a file in the work directory (a pipe nobody reads would fill up and
stall it) and is ready once its pid file exists; everything started is stopped on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "plugin" / "xencbt.py"
SUBJECT = "bench.xencbt.test"


class BenchError(Exception):
    """A benchmark could not run (a tool failed); the message says which and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


@contextlib.contextmanager
def server(argv: Sequence[str], pidfile: Path, log: Path) -> Iterator[subprocess.Popen]:
    """Run ``argv`` until the block ends; ready when it has written ``pidfile``."""
    pidfile.unlink(missing_ok=True)
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=err, stderr=err
        )
    try:
        deadline = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.stat().st_size):
            if proc.poll() is not None:
                raise BenchError("%s exited at start: %s" % (argv[0], _tail(log)))
            if time.monotonic() > deadline:
                raise BenchError("%s did not get ready in 60 s" % argv[0])
            time.sleep(0.02)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def timed(
    argv: Sequence[str], log: Path, env: dict | None = None, fds: Sequence[int] = ()
) -> float:
    """Wall seconds of one run of ``argv``; a failure raises with the tail of its output.
    ``fds``: descriptors it inherits."""
    t0 = time.monotonic()
    with open(log, "ab") as out:
        code = subprocess.call(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            pass_fds=tuple(fds),
        )
    seconds = time.monotonic() - t0
    if code != 0:
        raise BenchError("%s failed (exit %d): %s" % (argv[0], code, _tail(log)))
    return seconds


class Upstream:
    """``nbdkit --tls=require`` (C, multi-threaded) serving a disk on 127.0.0.1."""

    def __init__(self, work: Path, certs: Path, plugin: list[str], filters: Sequence[str] = ()):
        """``plugin``: name and parameters (filters' parameters too); ``filters``: names."""
        self.work, self.certs = work, certs
        self.port = free_port()
        self.argv = [
            "nbdkit",
            "-f",
            "-r",
            "-i",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-P",
            work / ("up-%d.pid" % self.port),
            "--tls=require",
            "--tls-certificates=%s" % certs,
            *("--filter=%s" % f for f in filters),
            *plugin,
        ]

    @contextlib.contextmanager
    def running(self) -> Iterator[Upstream]:
        pid = self.work / ("up-%d.pid" % self.port)
        with server(self.argv, pid, self.work / "upstream.log") as proc:
            self.pid = proc.pid
            yield self

    @property
    def uri(self) -> str:
        """libnbd's URI: verifies the certificate against ca-cert.pem in the same dir."""
        return "nbds://127.0.0.1:%d/?tls-certificates=%s" % (self.port, self.certs)

    def qemu_source(self) -> list[str]:
        """qemu's own TLS client with the same CA (for qemu-img convert)."""
        return [
            "--object",
            "tls-creds-x509,id=tls0,dir=%s,endpoint=client" % self.certs,
            "--image-opts",
            "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,"
            "file.server.port=%d,file.tls-creds=tls0" % self.port,
        ]

    def nbd_info(self) -> Path:
        """The get_nbd_info record the plugin takes with nbd-info=+FILE (0600)."""
        path = self.work / ("nbd-info-%d.json" % self.port)
        record = {
            "address": "127.0.0.1",
            "port": self.port,
            "exportname": "",
            "cert": (self.certs / "server-cert.pem").read_text(),
            "subject": SUBJECT,
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return path


def plugin_argv(params: Sequence[str], nbdkit_options: Sequence[str] = ()) -> list[str]:
    return [*nbdkit_options, "python", str(PLUGIN), *params]


@contextlib.contextmanager
def plugin_server(work: Path, params: Sequence[str], nbdkit_options: Sequence[str] = ()):
    """The plugin on a unix socket until the block ends; yields (uri, process)."""
    sock, pid = work / "plugin.sock", work / "plugin.pid"
    sock.unlink(missing_ok=True)
    argv = ["nbdkit", "-f", "-U", sock, "-P", pid, *plugin_argv(params, nbdkit_options)]
    with server(argv, pid, work / "plugin.log") as proc:
        yield "nbd+unix:///?socket=%s" % sock, proc


def cpu_seconds(pid: int) -> float:
    """User + system CPU a live process has used so far."""
    fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def peak_rss(pid: int) -> int:
    """VmHWM of a live process, in bytes."""
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise BenchError("no VmHWM for pid %d" % pid)
