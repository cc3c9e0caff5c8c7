"""xencbt: incremental, verified backup of XenServer VDIs with changed block tracking.

The one place that parses arguments, configures logging and maps errors to exit codes;
each command is a module of ``commands`` (``add_parser`` and ``run``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from xencbt_core import __version__
from xencbt_core.errors import ConfigError, XencbtError
from xencbt_core.secret import scrub

from . import errors, settings
from .commands import (
    backup_cmd,
    copy_cmd,
    drill_cmd,
    files_cmd,
    forget_cmd,
    init_cmd,
    list_cmd,
    nbd_cmd,
    prune_cmd,
    repair_cmd,
    report,
    restore_cmd,
    restore_vm_cmd,
    serve_cmd,
    status_cmd,
    verify_cmd,
)
from .commands.common import Parser, add_global_options, default_repo_help, global_options, say
from .errors import Interrupted, UsageError
from .proc import logs, progress, signals
from .proc.children import GROUP

log = logging.getLogger("xencbt_cli")

# In the order --help lists them.
COMMANDS = (
    backup_cmd,
    status_cmd,
    init_cmd,
    list_cmd,
    restore_cmd,
    restore_vm_cmd,
    drill_cmd,
    verify_cmd,
    repair_cmd,
    prune_cmd,
    copy_cmd,
    serve_cmd,
    forget_cmd,
    files_cmd,
    nbd_cmd,
)
BY_NAME = {c.NAME: c for c in COMMANDS}

EPILOG = """\
exit codes:
  0  success
  1  error (the message names the VM/VDI/point and what to do); verify of no points
  2  usage error (bad options, missing pool or password)
  3  partial failure: some VMs of a multi-VM backup failed, the others succeeded
  4  verify failed (the message names every failing point)
  5  a VDI chain is locked by another xencbt (the message names it, with its pid); see --wait
  6  authentication failed: the pool refused the user or password (password changed?),
     or the key file is not the encrypted repository's key
  7  restore-vm --start: the VM was restored whole but did not start (e.g.
     HOST_NOT_ENOUGH_FREE_MEMORY); its uuid is printed and it stays, halted
  8  restore --salvage: the file was written, but the ranges listed are damaged (what
     was read is there, zeros where nothing could be read): distrust them
  9  drill: the point was restored but its guest did not boot within --timeout (or the
     VM did not start); the drill is recorded and everything it created destroyed
 10  backup: every VM was backed up, but the CBT canary caught changes CBT missed on a
     disk, which was backed up in full instead (a failed VM's code wins over it)
130 interrupted by Ctrl-C (SIGINT); 143 by SIGTERM, 129 by SIGHUP: either way the
    copies are stopped, the snapshot destroyed, partial files removed, locks released
With --json, a failure also prints {"error": ..., "exit_code": ...} on stdout.

global options may also follow COMMAND (xencbt list --repo R --json).

connection settings: --xapi/--user/--password-file/--session-file override $XENCBT_XAPI,
$XENCBT_USER, $XENCBT_PASSWORD_FILE, $XENCBT_SESSION_FILE, which override the config file
(--config, else /etc/xencbt/xencbt.conf, else ~/.config/xencbt/xencbt.conf; INI section
[xencbt] with xapi, user, password_file, session_file, xapi_cafile, thumbprint, repo;
"; comment" after a value is a comment). The password is only ever read from a file (or
stdin with --password-file -), never taken on the command line.
"""


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="xencbt",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version="xencbt " + __version__)
    add_global_options(p, suppress=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub, [global_options()])
    default_repo_help(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Whatever xencbt or its tools create (repository directories and images, restored
    # files, temporary copies) is private whatever the caller's umask: disk images hold
    # everything a VM has.  A restore's --mode loosens its one file explicitly.
    os.umask(0o077)
    as_json = "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv
    try:
        args = parser().parse_args(argv)
    except UsageError as e:
        return fail(str(e), errors.USAGE, as_json)
    logs.configure(args.verbose + getattr(args, "verbose_after", 0))
    signals.catch()
    try:
        conf = settings.resolve(
            {
                "xapi": args.xapi,
                "user": args.user,
                "password_file": args.password_file,
                "session_file": args.session_file,
                "xapi_cafile": args.xapi_cafile,
                "thumbprint": args.thumbprint,
                "repo": getattr(args, "repo", None),
                "key_file": args.key_file,
                "cluster": getattr(args, "cluster", None),
            },
            args.config,
        )
        command = BY_NAME[args.command]
        with progress.shown(command.PROGRESS and progress.wanted(args.json)):
            return command.run(args, conf)
    except Interrupted as e:
        log.debug("interrupted at", exc_info=True)
        message = "interrupted by %s; nothing half-done was kept" % e.name
        if not e.reported:  # a backup said per VM what it undid
            say("xencbt: %s" % message)
        if args.json:
            report.emit_json({"error": message, "exit_code": e.exit_code})
        return e.exit_code
    except KeyboardInterrupt:
        return fail("interrupted", errors.INTERRUPTED, args.json)
    except BrokenPipeError:
        # stdout went away (`xencbt list | head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return errors.OK
    except ConfigError as e:
        return fail(str(e), errors.USAGE, args.json)
    except XencbtError as e:
        return fail(str(e), errors.exit_code(e), args.json)
    except OSError as e:
        # The repository's or the target's file system said no (full, read-only, gone):
        # one line naming the file, not a traceback.
        return fail(errors.describe_os_error(e), errors.ERROR, args.json)
    finally:
        GROUP.close()


def fail(message: str, code: int, as_json: bool) -> int:
    """One line on stderr; with --json also {"error", "exit_code"} on stdout."""
    message = scrub(message)
    say("xencbt: %s" % message)
    if as_json:
        report.emit_json({"error": message, "exit_code": code})
    return code


if __name__ == "__main__":
    sys.exit(main())
