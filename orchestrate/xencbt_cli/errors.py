"""Errors of the xencbt command.  Each type carries the exit code ``main`` returns."""

from __future__ import annotations

from xencbt_core.errors import AuthenticationFailed, XencbtError

OK = 0
ERROR = 1
USAGE = 2
PARTIAL = 3
VERIFY_FAILED = 4
LOCKED = 5
AUTH = 6
INTERRUPTED = 130


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


class PartialFailure(CliError):
    """A backup of several VMs where some succeeded and some failed."""

    exit_code = PARTIAL


class VerifyFailed(CliError):
    """A point failed verification; the message names it."""

    exit_code = VERIFY_FAILED


def exit_code(error: XencbtError) -> int:
    """The exit code for an error of the core library or of the command."""
    if isinstance(error, AuthenticationFailed):
        return AUTH
    return getattr(error, "exit_code", ERROR)
