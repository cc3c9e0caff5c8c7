"""The process group every external command runs in, its guard, and the orderly stop.

Why not ``setpriv --pdeathsig KILL`` (what xencbt used before; seen with strace and
/proc after ``kill -KILL`` of a backup): a parent-death signal is a property of one
process, set for the direct child only, cleared for that child's own children, and sent
when the *thread* that forked it ends.  ``nbdkit --run`` replaces it at start with its
own (``prctl(PR_SET_PDEATHSIG, SIGTERM)``), which its handler only notes while the
captive parent waits in system() for ``sh -c 'qemu-img …'``; the server nbdkit forks,
sh and qemu-img never had one.  So all four went on reading the whole snapshot.

What holds for every descendant instead: they all run in one process group of their
own (not xencbt's), led by a guard, ``sh`` blocked reading a pipe whose write end only
xencbt holds.  However xencbt ends (exit, SIGKILL, the OOM killer), the kernel closes
that pipe and the guard kills the whole group at once; no handler of ours has to run.
The group is inherited by everything they start (nbdkit's server and its --run command,
nbdcopy's qemu-nbd); none of these tools leaves its group.  Being outside the terminal's
foreground group also keeps Ctrl-C (SIGINT to that group) from reaching them directly:
xencbt stops them itself, clients before servers, and what they say about it is not
shown (``stop``); Ctrl-Z and ``fg`` reach them through xencbt too (``signal``).  A
systemd scope would do the same under systemd; the group works everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import Interrupted

log = logging.getLogger(__name__)

# Ignores the signals a terminal or a service manager sends; ends (killing its group,
# itself included) when the pipe from xencbt reaches EOF.
GUARD = "trap '' INT TERM HUP QUIT; read -r _; kill -s KILL 0"
SERVERS = ("nbdkit", "qemu-nbd")  # stopped after their clients, which would complain
STOP_TIMEOUT = 5.0  # per step: clients, then servers (the plugin logs out of XAPI)


class Children:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._guard: subprocess.Popen | None = None
        self.signum: int | None = None  # set once a stop was asked for

    def pgid(self) -> int:
        """The group's id (the guard's pid), starting the guard if needed."""
        with self._lock:
            if self._guard is None or self._guard.poll() is not None:
                self._guard = subprocess.Popen(
                    ["sh", "-c", GUARD],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    **in_group(0),
                )
                log.debug("children's process group %d", self._guard.pid)
            return self._guard.pid

    def popen(self, argv: Sequence[str], **options) -> subprocess.Popen:
        """Start ``argv`` in the group; Interrupted once a stop was asked for."""
        with self._lock:
            self.check()
            return subprocess.Popen(argv, **in_group(self.pgid()), **options)

    def check(self) -> None:
        """Interrupted if a stop was asked for: nothing new starts after one."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    def stop(self, signum: int) -> None:
        """Stop every child in order: clients (qemu-img, nbdcopy, sh), then the servers
        they read from, each with SIGTERM and STOP_TIMEOUT to go, then SIGKILL."""
        with self._lock:
            if self.signum is None:
                self.signum = signum
            if self._guard is None:
                return
            pgid = self._guard.pid
        members = self.members(pgid)
        _terminate([pid for pid, name in members if name not in SERVERS])
        _terminate([pid for pid, _ in self.members(pgid)])
        for pid, name in self.members(pgid):
            log.warning("%s (pid %d) did not stop on SIGTERM: killed", name, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every child (SIGSTOP/SIGCONT: Ctrl-Z and fg), never to the
        guard: stopped, it could not do its job should xencbt be killed meanwhile."""
        with self._lock:
            pgid = self._guard.pid if self._guard is not None else None
        for pid, _ in self.members(pgid) if pgid else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def members(self, pgid: int) -> list[tuple[int, str]]:
        """Live processes of the group but the guard: (pid, command name)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == pgid:
                continue
            try:
                stat = Path("/proc", entry, "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] not in "ZX" and int(fields[2]) == pgid:
                found.append((int(entry), stat[stat.index("(") + 1 : stat.rindex(")")]))
        return found

    def close(self) -> None:
        """At exit: stop what is left (normally nothing), then let the guard go."""
        with self._lock:
            guard = self._guard
            if guard is None:
                return
            if self.members(guard.pid):
                self.stop(self.signum or signal.SIGTERM)
            self._guard = None
        assert guard.stdin is not None
        guard.stdin.close()  # EOF: the guard kills the (empty) group and itself
        guard.wait()


def in_group(pgid: int) -> dict:
    """Popen's options that start a child in process group ``pgid`` (0: a new one it
    leads): setpgid(0, pgid) in the child before exec, either way."""
    if sys.version_info >= (3, 11):
        return {"process_group": pgid}
    # Python 3.9 (EL9's python3): no process_group= yet.  preexec_fn is the documented
    # way; its warning about threads is about Python code taking locks in the child,
    # and a builtin called through partial takes none (3.9 re-creates the GIL and the
    # import lock in the child before calling it).
    return {"preexec_fn": functools.partial(os.setpgid, 0, pgid)}


def _terminate(pids: list[int], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM each of ``pids``; return once all are gone or after ``timeout``."""
    fds = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
            signal.pidfd_send_signal(fd, signal.SIGTERM)
        except ProcessLookupError:
            continue
        fds.append(fd)
    deadline = time.monotonic() + timeout
    try:
        waiting = list(fds)
        while waiting and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(waiting, [], [], left)  # readable once it exits
            waiting = [fd for fd in waiting if fd not in ready]
    finally:
        for fd in fds:
            os.close(fd)


GROUP = Children()
