"""The one place external commands run: argv is logged with secrets masked."""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence

from xencbt_core.secret import scrub

from ..errors import CommandFailed
from .children import GROUP

log = logging.getLogger(__name__)

CHUNK = 1 << 20
SETPRIV = shutil.which("setpriv")  # util-linux
# Run by libnbd instead of us: join the children's group, then become the command.
JOIN = "import os, sys; os.setpgid(0, int(sys.argv[1])); os.execvp(sys.argv[2], sys.argv[2:])"


def bound(argv: Sequence[str]) -> list[str]:
    """``argv`` made to die with its parent process, for a server that a client starts
    (nbdcopy's ``[ qemu-nbd ]``): should the client die before connecting, the server
    would wait for its first client for as long as xencbt runs.  Only the direct child
    of a single process gets this (children.py says why it is no guard against our
    own death: the process group is)."""
    argv = [str(a) for a in argv]
    return [SETPRIV, "--pdeathsig", "KILL", "--", *argv] if SETPRIV else argv


def joined(argv: Sequence[str]) -> list[str]:
    """``argv`` for a command a library starts for us (libnbd's socket activation):
    it joins the children's process group first, as if started by ``start``."""
    return [sys.executable, "-I", "-S", "-c", JOIN, str(GROUP.pgid()), *bound(argv)]


LISTEN_FD = 3  # sd_listen_fds(3): passed sockets start at fd 3
PR_SET_PDEATHSIG = 1


def activated(sock: socket.socket) -> Callable[[], None]:
    """preexec_fn: the socket as fd 3 with LISTEN_PID/LISTEN_FDS, and death with us."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = sock.fileno()

    def setup() -> None:
        os.dup2(fd, LISTEN_FD)
        os.set_inheritable(LISTEN_FD, True)
        os.putenv("LISTEN_PID", str(os.getpid()))
        os.putenv("LISTEN_FDS", "1")
        os.unsetenv("LISTEN_FDNAMES")
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # even if we are SIGKILLed

    return setup


def start(argv: Sequence[str], **options) -> subprocess.Popen:
    """Every external command starts here, in the children's process group (children.py):
    it never outlives xencbt and a stop signal reaches it through us only."""
    log.debug("running %s", shown(argv))
    return GROUP.popen([str(a) for a in argv], stdin=subprocess.DEVNULL, **options)


def shown(argv: Sequence[str]) -> str:
    return scrub(shlex.join(str(a) for a in argv))


def run(argv: Sequence[str], *, passthrough: bool = False, pass_fds: Sequence[int] = ()) -> str:
    """Run ``argv``; return its stdout (text).  Raise CommandFailed naming it on failure.

    ``passthrough``: the command talks to the user's terminal (progress): its output goes
    to our stderr, never to stdout, which belongs to --json.  Its stderr is kept either
    way: errors are summed up in one line, an interrupted run's never shown.
    ``pass_fds``: descriptors it inherits (proc/sampler.py's pipes).
    """
    proc = start(
        argv,
        stdout=sys.stderr if passthrough else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=tuple(pass_fds),
    )
    with proc:
        out, err = proc.communicate()
    GROUP.check()  # Interrupted if we stopped it: its complaints are not news
    if proc.returncode != 0:
        raise failed(argv[0], proc.returncode, err or "")
    # Warnings of a run that succeeded (the plugin reconnecting, a host at its connection
    # limit) are worth knowing: shown with -v.
    for line in (err or "").splitlines()[:50]:
        if line.strip():
            log.info("%s: %s", argv[0], scrub(line.strip()))
    return out or ""


def failed(name: str, code: int, stderr: str) -> CommandFailed:
    """One line saying why: the tool's own explanation, the rest only with -vv."""
    text = scrub(stderr)
    log.debug("%s stderr:\n%s", name, text.strip())
    line = summary(text)
    # The tool is named once: "qemu-img failed (exit 1): Could not open …", not
    # "… (exit 1): qemu-img: Could not open …".
    own = os.path.basename(str(name)) + ": "
    line = line[len(own) :] if line.startswith(own) else line
    return CommandFailed("%s failed (exit %d): %s" % (name, code, line))


def summary(stderr: str) -> str:
    """The line of ``stderr`` that explains a failure, without nbdkit's prefixes.

    nbdkit's own error line names the plugin callback ("nbdkit: error: …/xencbt.py:
    pread: error: <why>"); qemu-img's ("error while reading …: Input/output error")
    only echoes it, so the plugin's line wins, then any error line, then the last line.
    """
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return "no error message"
    errors = [line for line in lines if "error" in line.lower()]
    plugin = [line for line in errors if line.startswith("nbdkit:") and ".py: " in line]
    line = (plugin or errors or lines)[-1]
    if plugin:
        line = line.split(": error: ", 2)[-1]
    return line[:1000]


def stream(argv: Sequence[str], sink: Callable[[bytes], None]) -> None:
    """Run ``argv`` and feed its stdout to ``sink`` chunk by chunk."""
    proc = start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(CHUNK):
            sink(chunk)
    finally:
        proc.stdout.close()
        _, err = proc.communicate()
    GROUP.check()  # Interrupted if we stopped it: its complaints are not news
    if proc.returncode != 0:
        raise failed(argv[0], proc.returncode, err.decode(errors="replace"))
