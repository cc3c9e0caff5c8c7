"""Errors of the xencbt command.  Each type carries the exit code ``main`` returns."""

from __future__ import annotations

import errno
import os
import signal

from xencbt_core.errors import AuthenticationFailed, XencbtError

OK = 0
ERROR = 1
USAGE = 2
PARTIAL = 3
VERIFY_FAILED = 4
LOCKED = 5
AUTH = 6
START_FAILED = 7  # restore-vm --start: the VM is restored whole but did not start
SALVAGED = 8  # restore --salvage: the file is written, but ranges of it are damaged
NOT_BOOTED = 9  # drill: the point restored, but its guest did not boot (or start)
CBT_MISSED = 10  # backup: complete, but the CBT canary caught missed changes (fulls taken)
HUNG_UP = 129  # 128 + the signal, as a shell reports it: SIGHUP
INTERRUPTED = 130  # SIGINT (Ctrl-C)
TERMINATED = 143  # SIGTERM


class CliError(XencbtError):
    """Something failed; the message says what and what to do."""

    exit_code = ERROR


class UsageError(CliError):
    """Bad or contradictory options."""

    exit_code = USAGE


class CommandFailed(CliError):
    """An external command (nbdkit, qemu-img, nbdcopy) exited non-zero."""


class LockBusy(CliError):
    """Another xencbt process holds the lock of a VDI chain."""

    exit_code = LOCKED


class RepositoryError(CliError):
    """The repository is missing, malformed, or has no such VDI / point."""


class WrongKey(CliError):
    """The key given is not the encrypted repository's (its key check differs)."""

    exit_code = AUTH


class RepositoryFull(RepositoryError):
    """The repository's file system has no space left; nothing half-written is kept."""


class TargetFull(CliError):
    """A restore's destination file system has no space left (the point is fine)."""


class PointDamaged(CliError):
    """A point's data does not match the checksum recorded at backup time."""

    exit_code = VERIFY_FAILED


class TargetDamaged(PointDamaged):
    """copy: the point of the target repository a copied point would be written onto is
    damaged (the source's point is intact): that chain is held back, ``copy --full``
    copies past it."""


class VerifyFailed(CliError):
    """A point failed verification; the message names it."""

    exit_code = VERIFY_FAILED


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived: the children are stopped, what the run had
    half done is undone on the way out.  A KeyboardInterrupt, so that ``except
    Exception`` never swallows it; exit code 128 + the signal, as a shell reports it."""

    def __init__(self, signum: int, reported: bool = False):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum
        self.reported = reported  # the command already said what was undone

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def out_of_space(e: BaseException) -> bool:
    """Whether a failed file operation or tool ran out of space (or quota)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    # qemu-img says so on its stderr, which CommandFailed carries.
    return isinstance(e, CommandFailed) and (
        "No space left on device" in str(e) or "Disk quota exceeded" in str(e)
    )


def exit_code(error: BaseException) -> int:
    """The exit code for an error of the core library or of the command."""
    if isinstance(error, AuthenticationFailed):
        return AUTH
    return getattr(error, "exit_code", ERROR)


def describe_os_error(e: OSError) -> str:
    """One line for a failed file operation, with what to do when we know it."""
    what = "%s: %s" % (e.filename, e.strerror) if e.filename else str(e.strerror or e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "%s: free space there and try again; nothing half-written was kept" % what
    if e.errno == errno.EROFS:
        return (
            "%s: the file system is read-only (list, verify, restore and serve work "
            "there; backup, prune and repair need it writable)" % what
        )
    if e.errno in (errno.EACCES, errno.EPERM):
        return "%s: run as a user allowed to do that there (see ls -l %s)" % (
            what,
            os.path.dirname(str(e.filename or ".")) or ".",
        )
    return what
