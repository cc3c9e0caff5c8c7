"""What every command shares: the parser class, the global options, the repository a
command names, and the two ways a command speaks (``say`` on stderr, ``out`` on stdout)."""

from __future__ import annotations

import argparse
import sys

from xencbt_core.secret import scrub

from ..errors import UsageError
from ..repo import repoconfig
from ..repo.repository import Repository
from ..settings import Settings

REPO_HELP = "the repository (default: repo= in the config)"


class Parser(argparse.ArgumentParser):
    """Usage errors become UsageError, so ``--json`` can report them as JSON too.  No
    option is taken by an abbreviation (``--keep-w``): a cron line must say what it
    means, and a later option sharing the prefix would change it silently."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError("%s (see %s --help)" % (message, self.prog))


def add_global_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    """The options every command takes, before or after its name.  Repeated on each
    subcommand with SUPPRESS defaults, so one given after the command overrides the same
    one given before it and one not given there leaves the main parser's value alone."""

    def default(value):
        return argparse.SUPPRESS if suppress else value

    p.add_argument(
        "--xapi", metavar="URL", default=default(None), help="pool API, e.g. https://pool-master"
    )
    p.add_argument("--user", default=default(None), help="XAPI user (default root)")
    p.add_argument(
        "--password-file",
        metavar="FILE",
        default=default(None),
        help="file holding the password, or -",
    )
    p.add_argument(
        "--session-file",
        metavar="FILE",
        default=default(None),
        help="file holding a logged-in session ref to reuse instead (never logged out)",
    )
    p.add_argument(
        "--xapi-cafile", metavar="FILE", default=default(None), help="CA or certificate of the API"
    )
    p.add_argument(
        "--thumbprint",
        metavar="SHA256",
        default=default(None),
        help="pin the API certificate instead",
    )
    p.add_argument(
        "--key-file",
        metavar="FILE",
        default=default(None),
        help="key of an encrypted repository (at least 32 bytes of text; trailing "
        "whitespace, such as a final newline or CRLF, is not part of the key)",
    )
    p.add_argument("--config", metavar="FILE", default=default(None), help="INI config file")
    p.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="machine-readable output on stdout (errors too)",
    )
    # Counted apart after the command (a subcommand's count starts again from 0): -v
    # before it and -v after it add up.
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        dest="verbose_after" if suppress else "verbose",
        default=default(0),
        help="-v info, -vv debug",
    )


def global_options() -> argparse.ArgumentParser:
    g = argparse.ArgumentParser(add_help=False)
    add_global_options(g, suppress=True)
    return g


def default_repo_help(subparsers) -> None:
    """One help text for every command's --repo that does not say more."""
    for command in subparsers.choices.values():
        for action in command._actions:
            if "--repo" in action.option_strings and action.help is None:
                action.help = REPO_HELP


def say(text: str) -> None:
    print(scrub(text), file=sys.stderr, flush=True)


def out(text: str) -> None:
    """A line of a command's report (verify, prune, repair): stdout."""
    print(scrub(text), flush=True)


def repository(args: argparse.Namespace, conf: Settings, key_required: bool = True) -> Repository:
    """The repository the command names, its key checked (repoconfig.unlock) before
    anything is read or written: a wrong or missing key stops here."""
    root = args.repo or conf.repo
    if not root:
        raise UsageError("no repository: give --repo DIR (or repo= in the config)")
    repo = Repository(root)
    repoconfig.unlock(repo, conf.key_file, key_required)
    return repo
