"""How xencbt answers the signals a terminal, a service manager or a scheduler sends.

SIGINT (Ctrl-C), SIGTERM and SIGHUP: stop the children (children.py), then raise
Interrupted, which unwinds through every ``finally`` that undoes a half-done step
(snapshot, partial files, locks); ``main`` exits 128 + the signal.  SIGTSTP (Ctrl-Z):
the children are not in the terminal's process group, so they are paused with us.
"""

from __future__ import annotations

import os
import signal

from ..errors import Interrupted
from .children import GROUP

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def catch() -> None:
    for s in STOP_SIGNALS:
        if not (s == signal.SIGHUP and signal.getsignal(s) == signal.SIG_IGN):  # nohup
            signal.signal(s, on_stop)
    if signal.getsignal(signal.SIGTSTP) == signal.SIG_DFL:
        signal.signal(signal.SIGTSTP, on_suspend)


def on_stop(signum, frame) -> None:
    # Later signals (Ctrl-C twice, systemd's) must not cut the cleanup short.
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    GROUP.stop(signum)
    raise Interrupted(signum)


def on_suspend(signum, frame) -> None:
    """SIGSTOP, not SIGTSTP, for ourselves: the kernel drops a SIGTSTP to an orphaned
    group (no job-control shell), which would leave the children stopped and us running."""
    GROUP.signal(signal.SIGSTOP)
    os.kill(os.getpid(), signal.SIGSTOP)  # stops here until SIGCONT (fg, bg)
    GROUP.signal(signal.SIGCONT)
