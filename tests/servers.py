"""Real NBD servers and the plugin, run as processes for the tests.

Readiness is signalled by the servers' own pid files (nbdkit -P, qemu-nbd --pid-file),
which they write once they accept connections.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path

from secretwatch import WATCH, traced

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "plugin" / "xencbt.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > 0):
        if proc.poll() is not None:
            out = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError("server exited with %s: %s" % (proc.returncode, out))
        if time.monotonic() > deadline:
            raise TimeoutError("server did not get ready: %s" % path)
        time.sleep(0.02)


@contextlib.contextmanager
def _process(argv: list[str], pidfile: Path, env: dict | None = None):
    proc = subprocess.Popen(
        traced(argv),  # the secret watch sees every exec (tests/secretwatch.py)
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for_file(pidfile, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.output = proc.stderr.read()  # kept for the test: the pipe is closed here
        WATCH.output("%s (stderr)" % " ".join(argv[:2]), proc.output)
        proc.stderr.close()


@contextlib.contextmanager
def nbdkit_upstream(image: Path, tmp: Path, certdir: Path | None):
    """``nbdkit file`` on 127.0.0.1, TLS required when certdir is given."""
    port = free_port()
    pidfile = tmp / ("nbdkit-%d.pid" % port)
    argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "-P", str(pidfile), "-r"]
    if certdir:
        argv += ["--tls=require", "--tls-certificates=%s" % certdir]
    argv += ["file", str(image)]
    with _process(argv, pidfile):
        yield port


@contextlib.contextmanager
def qemu_nbd_upstream(image: Path, tmp: Path, certdir: Path, export: str):
    """qemu-nbd with x509 TLS credentials, serving ``export`` read-only."""
    port = free_port()
    pidfile = tmp / ("qemu-nbd-%d.pid" % port)
    argv = [
        "qemu-nbd",
        "-f",
        "raw",
        "-r",
        "-t",
        "-e",
        "16",
        "-b",
        "127.0.0.1",
        "-p",
        str(port),
        "-x",
        export,
        "--pid-file",
        str(pidfile),
        "--object",
        "tls-creds-x509,id=tls0,dir=%s,endpoint=server,verify-peer=off" % certdir,
        "--tls-creds",
        "tls0",
        str(image),
    ]
    with _process(argv, pidfile):
        yield port


@contextlib.contextmanager
def qemu_nbd_rw(image: Path, tmp: Path):
    """A raw image served read-write by qemu-nbd (nbdcopy must not truncate a file)."""
    sock, pid = tmp / "dest.sock", tmp / "dest.pid"
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-k", str(sock), "--pid-file", str(pid), str(image)]
    )
    try:
        wait_for_file(pid, proc)
        yield "nbd+unix:///?socket=%s" % sock
    finally:
        proc.terminate()
        proc.wait()


def nbd_info_file(tmp: Path, record: dict) -> Path:
    path = tmp / "nbd-info.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    return path


def plugin_argv(params: list[str], verbose: bool = False) -> list[str]:
    return ["nbdkit", "-f", *(["-v"] if verbose else []), "python", str(PLUGIN), *params]


def run_plugin(params: list[str], run: str, verbose: bool = False, timeout: float = 120):
    """Captive nbdkit: serve on a private unix socket while ``run`` (a shell command using
    $uri / $nbd) executes; returns the CompletedProcess (stdout+stderr captured)."""
    argv = [
        "nbdkit",
        "-U",
        "-",
        *(["-v"] if verbose else []),
        "python",
        str(PLUGIN),
        *params,
        "--run",
        run,
    ]
    r = subprocess.run(traced(argv), capture_output=True, text=True, timeout=timeout)
    WATCH.output("nbdkit xencbt --run %s" % run, r.stdout, r.stderr)
    return r


@contextlib.contextmanager
def plugin_server(params: list[str], tmp: Path, verbose: bool = False):
    """The plugin serving on a unix socket until the block ends; yields (uri, proc)."""
    sock = tmp / "plugin.sock"
    pidfile = tmp / "plugin.pid"
    argv = [
        "nbdkit",
        "-f",
        "-U",
        str(sock),
        "-P",
        str(pidfile),
        *(["-v"] if verbose else []),
        "python",
        str(PLUGIN),
        *params,
    ]
    with _process(argv, pidfile) as proc:
        yield "nbd+unix:///?socket=%s" % sock, proc
