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


def one_line(stderr: str) -> str:
    """A tool's complaint as one line (errors are one line each), its end kept."""
    return scrub(" / ".join(line.strip() for line in stderr.splitlines() if line.strip()))[-2000:]


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
        raise CommandFailed(
            "%s failed (exit %d): %s" % (argv[0], proc.returncode, one_line(proc.stderr or ""))
        )
    return proc.stdout or ""


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
        raise CommandFailed(
            "%s failed (exit %d): %s"
            % (argv[0], proc.returncode, one_line(err.decode(errors="replace")))
        )
