"""The one place external commands run: argv is logged with secrets masked."""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence

from xencbt_core.secret import scrub

from .errors import CommandFailed

log = logging.getLogger(__name__)

CHUNK = 1 << 20
SETPRIV = shutil.which("setpriv")  # util-linux


def bound(argv: Sequence[str]) -> list[str]:
    """``argv`` made to die with us: if xencbt is killed (SIGKILL, OOM), an nbdkit or
    qemu-img left running would go on reading a snapshot the next run destroys and hold
    NBD connections the host counts against its limit."""
    argv = [str(a) for a in argv]
    return [SETPRIV, "--pdeathsig", "KILL", "--", *argv] if SETPRIV else argv


def shown(argv: Sequence[str]) -> str:
    return scrub(shlex.join(str(a) for a in argv))


def run(argv: Sequence[str], *, passthrough: bool = False) -> str:
    """Run ``argv``; return its stdout (text).  Raise CommandFailed naming it on failure.

    ``passthrough``: the command talks to the user's terminal (progress): its output goes
    to our stderr, never to stdout, which belongs to --json.
    """
    log.debug("running %s", shown(argv))
    proc = subprocess.run(
        bound(argv),
        stdin=subprocess.DEVNULL,
        stdout=sys.stderr if passthrough else subprocess.PIPE,
        stderr=None if passthrough else subprocess.PIPE,
        text=True,
    )
    if proc.returncode != 0:
        raise failed(argv[0], proc.returncode, proc.stderr or "")
    # Warnings of a run that succeeded (the plugin reconnecting, a host at its connection
    # limit) are worth knowing: shown with -v.
    for line in (proc.stderr or "").splitlines()[:50]:
        if line.strip():
            log.info("%s: %s", argv[0], scrub(line.strip()))
    return proc.stdout or ""


def failed(name: str, code: int, stderr: str) -> CommandFailed:
    """One line saying why: the tool's own explanation, the rest only with -vv."""
    text = scrub(stderr)
    log.debug("%s stderr:\n%s", name, text.strip())
    return CommandFailed("%s failed (exit %d): %s" % (name, code, summary(text)))


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
    log.debug("running %s", shown(argv))
    proc = subprocess.Popen(
        bound(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(CHUNK):
            sink(chunk)
    finally:
        proc.stdout.close()
        _, err = proc.communicate()
    if proc.returncode != 0:
        raise failed(argv[0], proc.returncode, err.decode(errors="replace"))
