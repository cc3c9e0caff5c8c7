"""xencbt: incremental, verified backup of XenServer VDIs with changed block tracking.

The one place that parses arguments, configures logging and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from xencbt_core import __version__
from xencbt_core.errors import ConfigError, XencbtError
from xencbt_core.secret import ScrubFilter, scrub

from . import errors, settings
from .commands import report
from .errors import Interrupted, RepositoryError, UsageError
from .jobs import restore, verify
from .proc import progress, signals
from .proc.children import GROUP
from .repo import mend, repoconfig

log = logging.getLogger("xencbt_cli")

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
    g = [common()]

    b = sub.add_parser("backup", parents=g, help="back up VMs (full or incremental)")
    b.add_argument("vms", nargs="+", metavar="VM", help="VM name or uuid")
    b.add_argument("--repo", metavar="DIR")
    b.add_argument("--full", action="store_true", help="full backups even if CBT allows less")
    b.add_argument("--jobs", type=int, default=1, metavar="N", help="VMs in parallel")
    b.add_argument(
        "--connections",
        type=int,
        default=4,
        metavar="N",
        help="NBD connections per disk copy (1..16; 16 per host in total)",
    )
    b.add_argument("--wait", action="store_true", help="wait for a locked chain")
    b.add_argument(
        "--in-use-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="keep retrying snapshot clean-up the host refuses with VDI_IN_USE (default 30)",
    )
    b.add_argument(
        "--retry-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="keep reconnecting to a host's NBD server this long (default 60; NBD just "
        "enabled on a network takes 10 s or more to answer)",
    )

    ini = sub.add_parser("init", parents=g, help="create a repository with its settings")
    ini.add_argument("--repo", metavar="DIR")
    ini.add_argument(
        "--compression",
        choices=("zstd", "none"),
        default=None,
        help="of the clusters of new points (default zstd; none with --encrypt)",
    )
    ini.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt every image (qcow2 LUKS) and sidecar with the key of --key-file "
        "(a key given means that too)",
    )
    ini.add_argument(
        "--encryption",
        choices=("luks", "none"),
        help="luks: as --encrypt; none: a clear repository even with a key at hand "
        "(default: luks when a key is given, else none)",
    )

    s = sub.add_parser("list", parents=g, help="list backup points")
    s.add_argument("--repo", metavar="DIR")

    r = sub.add_parser("restore", parents=g, help="restore a point of a VDI")
    r.add_argument("vdi", metavar="VDI", help="VDI uuid (or unique prefix) as in list")
    r.add_argument("--repo", metavar="DIR")
    r.add_argument("--at", metavar="POINT", help="point id (default: the newest)")
    dest = r.add_mutually_exclusive_group(required=True)
    dest.add_argument(
        "--to-file",
        type=Path,
        metavar="PATH",
        help="write the disk into this file (raw or qcow2, see --format), private (0600)",
    )
    dest.add_argument("--to-sr", metavar="SR", help="new VDI on this SR (uuid or name)")
    dest.add_argument("--to-vdi", metavar="VDI", help="overwrite this VDI (differences only)")
    r.add_argument(
        "--format",
        choices=("raw", "qcow2"),
        help="of --to-file (default: from its extension, .raw/.img or .qcow2)",
    )
    r.add_argument(
        "--mode",
        type=file_mode,
        metavar="OCTAL",
        help="permissions of --to-file (default 0600)",
    )
    r.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing file, or a VDI in use or of another VM (--to-vdi)",
    )
    r.add_argument(
        "--salvage",
        action="store_true",
        help="--to-file only: a point that does not read back as recorded is written all "
        "the same (zeros where nothing can be read); the damaged ranges are listed and "
        "the exit code is 8",
    )

    rv = sub.add_parser("restore-vm", parents=g, help="rebuild a whole VM from a VM point")
    rv.add_argument("vm", metavar="VM", help="VM name or uuid as in list")
    rv.add_argument("--repo", metavar="DIR")
    rv.add_argument("--at", metavar="POINT", help="VM point id (default: the newest)")
    rv.add_argument("--to-sr", required=True, metavar="SR", help="SR for the disks (uuid or name)")
    rv.add_argument("--name", help="name of the new VM (default: the original's)")
    rv.add_argument(
        "--network",
        action="append",
        default=[],
        type=network_pair,
        metavar="FROM=TO",
        help="put the VIFs of network FROM (name or uuid) on network TO of this pool",
    )
    rv.add_argument("--new-macs", action="store_true", help="new MAC addresses for the VIFs")
    rv.add_argument("--start", action="store_true", help="start the VM once restored")

    v = sub.add_parser("verify", parents=g, help="check images, chains and checksums (read-only)")
    v.add_argument(
        "vdis", nargs="*", metavar="VM|VDI", help="VM (name or uuid) or VDI uuid (default: all)"
    )
    v.add_argument("--repo", metavar="DIR")

    rp = sub.add_parser(
        "repair",
        parents=g,
        help="remove what interrupted runs left; finish or undo interrupted prunes",
    )
    rp.add_argument(
        "vdis", nargs="*", metavar="VM|VDI", help="VM (name or uuid) or VDI uuid (default: all)"
    )
    rp.add_argument("--repo", metavar="DIR")
    rp.add_argument("--wait", action="store_true", help="wait for a locked chain")

    pr = sub.add_parser(
        "prune",
        parents=g,
        help="remove points a retention policy does not keep (restic's --keep-* rules)",
    )
    pr.add_argument("vms", nargs="*", metavar="VM", help="VM name or uuid (default: all)")
    pr.add_argument("--repo", metavar="DIR")
    pr.add_argument("--keep", type=keep_count, metavar="N", help="the same as --keep-last N")
    for rule, what in (
        ("last", "the newest N points"),
        ("hourly", "the newest point of each of the last N hours that have one"),
        ("daily", "the newest point of each of the last N days that have one"),
        ("weekly", "the newest point of each of the last N ISO weeks that have one"),
        ("monthly", "the newest point of each of the last N months that have one"),
        ("yearly", "the newest point of each of the last N years that have one"),
    ):
        pr.add_argument(
            "--keep-" + rule,
            type=keep_count,
            default=0,
            metavar="N",
            help="keep %s (UTC; N or unlimited)" % what,
        )
    pr.add_argument("--wait", action="store_true", help="wait for a locked chain")
    pr.add_argument("--dry-run", action="store_true", help="say what would go, change nothing")

    cp = sub.add_parser("copy", parents=g, help="copy the points another repository lacks")
    cp.add_argument("vms", nargs="*", metavar="VM", help="VM name or uuid (default: all)")
    cp.add_argument("--repo", metavar="DIR", help="the repository to copy from")
    cp.add_argument("--to", metavar="DIR", required=True, help="the repository to copy into")
    cp.add_argument("--wait", action="store_true", help="wait for a locked chain")
    cp.add_argument(
        "--full",
        action="store_true",
        help="copy each chain's next point as a standalone image (a full), not onto DST's "
        "newest point: the way on past a damaged chain in DST, which copy names",
    )
    cp.add_argument(
        "--to-key-file",
        metavar="FILE",
        help="key of an encrypted DST when it is not --key-file's (copy re-encrypts)",
    )
    cp.add_argument(
        "--to-encryption",
        choices=("luks", "none"),
        help="of a new DST (default: luks when SRC is encrypted or a key is given); none: "
        "copy in clear, also into an existing clear DST",
    )

    sv = sub.add_parser(
        "serve", parents=g, help="serve a point (or a live snapshot) read-only over NBD"
    )
    sv.add_argument(
        "vdi", metavar="VDI", help="uuid or prefix as in list (--snapshot: a pool VDI, or a VM)"
    )
    sv.add_argument("--repo", metavar="DIR")
    sv.add_argument("--at", metavar="POINT", help="point id (default: the newest)")
    sv.add_argument(
        "--snapshot",
        action="store_true",
        help="serve a live pool VDI via a snapshot; or every disk of a VM (name or uuid), "
        "one export per userdevice",
    )
    sv.add_argument("--listen", metavar="unix:PATH|tcp:HOST:PORT", help="default: unix socket")
    tls = sv.add_mutually_exclusive_group()
    tls.add_argument("--tls-psk", metavar="FILE", help="TLS with this PSK file (user:hexkey)")
    tls.add_argument("--tls-certificates", metavar="DIR", help="TLS with DIR/{ca,server}-*.pem")

    fg = sub.add_parser(
        "forget",
        parents=g,
        help="retire a VM: remove all its points and its disks' chains from the repository",
    )
    fg.add_argument("--repo", metavar="DIR")
    fg.add_argument(
        "--vm",
        required=True,
        metavar="VM",
        help="VM uuid (or a unique prefix, or its name) as in list",
    )
    fg.add_argument(
        "--yes", action="store_true", help="do not ask (needed when stdin is not a terminal)"
    )
    fg.add_argument("--dry-run", action="store_true", help="say what would go, change nothing")
    fg.add_argument("--wait", action="store_true", help="wait for a locked chain")

    files_parser(sub, g)

    n = sub.add_parser("nbd", parents=g, help="NBD on the pool's networks")
    n.add_argument("action", choices=("status", "enable", "disable"))
    n.add_argument("--network", metavar="NAME|UUID")
    n.add_argument("--insecure", action="store_true", help="insecure_nbd (no TLS)")
    n.add_argument(
        "--wait-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="enable: how long to wait for every host to serve NBD (default 60)",
    )
    for command in sub.choices.values():  # one help text for every command's --repo
        for action in command._actions:
            if "--repo" in action.option_strings and action.help is None:
                action.help = REPO_HELP
    return p


REPO_HELP = "the repository (default: repo= in the config)"


def keep_count(text: str) -> int:
    if text == "unlimited":
        return -1
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError("%r is not a count of 1 or more, or unlimited" % text)
    return n


def network_pair(text: str) -> str:
    """FROM=TO for restore-vm --network: checked here, so a bad one is a usage error."""
    src, sep, dst = text.partition("=")
    if not sep or not src or not dst:
        raise argparse.ArgumentTypeError(
            "%r is not FROM=TO (a network of the VM point = one of this pool, each a name "
            "or uuid)" % text
        )
    return text


def file_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError("%r is not an octal mode such as 0600 or 0640" % text)
    return mode


def common() -> argparse.ArgumentParser:
    g = argparse.ArgumentParser(add_help=False)
    add_global_options(g, suppress=True)
    return g


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time: while progress lines are drawn,
    that is rich's proxy, which prints the message above them instead of through them."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class IntermixedParser(argparse.ArgumentParser):
    """PATHs may follow options (``files get VM --at P /etc --to D``): a plain parse gives
    every positional its values at their first run and rejects the later ones."""

    def parse_known_args(self, args=None, namespace=None):
        if getattr(self, "_mixing", False):  # parse_known_intermixed_args calls us back
            return super().parse_known_args(args, namespace)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False


def files_parser(sub, parents: list) -> None:
    f = sub.add_parser(
        "files", parents=parents, help="list or extract files of a point (libguestfs, no root)"
    )
    f.__class__ = IntermixedParser
    f.add_argument("action", choices=("ls", "get"))
    f.add_argument("target", metavar="VM|VDI", help="as in list: uuid, prefix or name")
    f.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="FS:/path (FS as files ls names it) or /path under the guest OS's root",
    )
    f.add_argument("--repo", metavar="DIR")
    f.add_argument("--at", metavar="POINT", help="point id (default: the newest)")
    f.add_argument("--long", "-l", action="store_true", help="ls: type, mode, size, time")
    out = f.add_mutually_exclusive_group()
    out.add_argument("--to", metavar="DIR", help="get: extract into DIR")
    out.add_argument("--tar", metavar="FILE|-", help="get: write a tar archive")
    f.add_argument("--force", action="store_true", help="get: replace existing files")
    f.add_argument("--guest-key-file", metavar="FILE", help="passphrase of LUKS volumes")


def configure_logging(verbose: int) -> None:
    handler = StderrHandler()
    handler.addFilter(ScrubFilter())
    handler.setFormatter(logging.Formatter("xencbt: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    for name in ("xencbt_cli", "xencbt_core"):
        logging.getLogger(name).setLevel(level)


def say(text: str) -> None:
    print(scrub(text), file=sys.stderr, flush=True)


def out(text: str) -> None:
    """A line of a command's report (verify, prune, repair): stdout."""
    print(scrub(text), flush=True)


def repository(args, conf: settings.Settings, key_required: bool = True):
    """The repository the command names, its key checked (repoconfig.unlock) before
    anything is read or written: a wrong or missing key stops here."""
    from .repo.repository import Repository

    root = args.repo or conf.repo
    if not root:
        raise UsageError("no repository: give --repo DIR (or repo= in the config)")
    repo = Repository(root)
    repoconfig.unlock(repo, conf.key_file, key_required)
    return repo


def cmd_backup(args, conf: settings.Settings) -> int:
    from .jobs.backup import Backup
    from .jobs.snapshot_copy import Copier
    from .xapi.facade import PoolApi
    from .xapi.networks import warn_if_insecure

    if not 1 <= args.connections <= 16:
        raise UsageError("--connections must be 1..16 (a host serves at most 16)")
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    if not 0 < args.retry_timeout < float("inf"):
        raise UsageError("--retry-timeout must be a positive number of seconds")
    if not 0 <= args.in_use_timeout < float("inf"):
        raise UsageError("--in-use-timeout must be a number of seconds, 0 or more")
    repo = repository(args, conf)
    config = repoconfig.ensure(repo, say, conf.key_file)
    if conf.key_file and not config.encrypted:
        say(
            "xencbt: warning: repository %s is not encrypted (encryption none): the key file "
            "is not used and new points are written in clear" % repo.root
        )
    with conf.session() as session, conf.plugin_password() as password:
        warn_if_insecure(session, say)
        # Progress is xencbt's own lines (progress.py), not qemu-img's -p counter.
        copier = Copier(conf, password, args.connections, False, args.retry_timeout)
        copier.compression = config.compression
        job = Backup(
            PoolApi(session, args.in_use_timeout),
            repo,
            copier,
            say,
            full=args.full,
            wait=args.wait,
            jobs=args.jobs,
        )
        results = job.run(args.vms)
    if args.json:
        report.emit_json(report.backup_json(results))
    else:
        report.print_backup(results)
    failed = [r for r in results if not r.ok]
    if not failed:
        return errors.OK
    if len(failed) < len(results):
        return errors.PARTIAL
    codes = {r.exit_code for r in failed}
    return codes.pop() if len(codes) == 1 else errors.ERROR


def cmd_init(args, conf: settings.Settings) -> int:
    from .repo.repository import Repository

    root = args.repo or conf.repo
    if not root:
        raise UsageError("no repository: give --repo DIR (or repo= in the config)")
    repo = Repository(root)  # not unlocked: it has no settings yet
    if args.encrypt and args.encryption == "none":
        raise UsageError("--encrypt and --encryption none contradict each other")
    # A key given means an encrypted repository (restic, borg), unless --encryption none.
    encryption = "luks" if args.encrypt else args.encryption
    config = repoconfig.chosen(conf.key_file, encryption, args.compression)
    opened = repoconfig.init(repo, config)
    if opened is not None:
        say(
            "xencbt: %s was open to other users (mode %04o): made private (0700)"
            % (repo.root, opened)
        )
    unused = " (the key file is not used)" if conf.key_file and not config.encrypted else ""
    if args.json:
        report.emit_json({"repository": str(repo.root), "settings": config.shown()})
    else:
        say("created repository %s (%s)%s" % (repo.root, config.describe(), unused))
    return errors.OK


def cmd_list(args, conf: settings.Settings) -> int:
    repo = repository(args, conf, key_required=False)  # manifests are clear
    listed = report.listing(repo)
    config = repoconfig.load(repo)
    listed["settings"] = config.shown() if config else None
    for chain in repo.chains():
        for point, why in chain.damaged().items():
            say(
                "xencbt: warning: VDI %s: the manifest of point %s is unreadable (%s): "
                "that point is not listed; xencbt verify" % (chain.vdi_uuid, point, why)
            )
    if args.json:
        report.emit_json(listed)
    else:
        described = config.describe() if config else "no settings file (older than xencbt init)"
        print("repository %s: %s" % (repo.root, described))
        report.print_listing(listed)
    return errors.OK


def cmd_restore(args, conf: settings.Settings) -> int:
    repo = repository(args, conf)
    if args.salvage:
        return salvage(args, repo)
    if args.to_file:
        fmt = restore.file_format(args.to_file, args.format)
        mode = 0o600 if args.mode is None else args.mode
        m = restore.to_file(repo, args.vdi, args.at, args.to_file, fmt, args.force, mode)
        target = str(args.to_file)
    else:
        if args.format or args.mode is not None:
            raise UsageError("--format and --mode are about --to-file")
        from .jobs.pool_restore import to_sr, to_vdi
        from .xapi.facade import PoolApi

        with conf.session() as session:
            pool = PoolApi(session)
            if args.to_sr:
                m, target = to_sr(pool, repo, args.vdi, args.at, args.to_sr)
            else:
                m, target = to_vdi(pool, repo, args.vdi, args.at, args.to_vdi, args.force)
    if args.json:
        report.emit_json({"restored": asdict(m), "to": target})
    else:
        say("restored VDI %s point %s to %s" % (m.vdi_uuid, m.point, target))
    return errors.OK


def salvage(args, repo) -> int:
    if not args.to_file:
        raise UsageError("--salvage writes a file: give --to-file PATH (then import it)")
    fmt = restore.file_format(args.to_file, args.format)
    mode = 0o600 if args.mode is None else args.mode
    found = restore.salvage(repo, args.vdi, args.at, args.to_file, fmt, args.force, mode)
    code = errors.SALVAGED if found.damaged or found.unchecked else errors.OK
    lines = restore.salvaged_lines(found, str(args.to_file))
    if args.json:
        report.emit_json(
            {
                "restored": asdict(found.m),
                "to": str(args.to_file),
                "salvaged": True,
                "damaged": found.ranges(),
                "unreadable": [{"offset": o, "length": n} for o, n in found.unreadable],
                "unchecked": found.unchecked,
                "exit_code": code,
            }
        )
    for line in lines:
        say(line)
    return code


def cmd_restore_vm(args, conf: settings.Settings) -> int:
    from .jobs.restore_vm import RestoreVmOptions, restore_vm
    from .xapi.facade import PoolApi

    repo = repository(args, conf)
    opts = RestoreVmOptions(
        args.vm, args.at, args.to_sr, args.name, args.network, args.new_macs, args.start
    )
    with conf.session() as session:
        done = restore_vm(PoolApi(session), repo, opts, say)
    for note in done.notes:
        say("note: " + note)
    code, failed = errors.OK, {}
    if done.start_error:
        code = errors.START_FAILED
        message = scrub(
            "the restored VM %s did not start: %s; it is complete and stays, halted: start "
            "it when the pool can run it (xe vm-start uuid=%s)"
            % (done.vm_uuid, done.start_error, done.vm_uuid)
        )
        say("xencbt: %s" % message)
        failed = {"error": message, "exit_code": code}
    if args.json:
        report.emit_json({**asdict(done), **failed})
    else:
        say(
            "restored VM %s (uuid %s, new) from point %s of VM %s"
            % (done.name, done.vm_uuid, done.point, done.source_vm)
        )
        print(done.vm_uuid)
    return code


def cmd_verify(args, conf: settings.Settings) -> int:
    repo = repository(args, conf)
    # The report is the command's output (stdout, as backup's and list's); with --json
    # stdout holds the JSON, and the lines go to stderr.
    count = verify.verify(repo, args.vdis, say if args.json else out)
    if args.json:
        exposed = sorted(map(str, repo.exposed())) if repo.marked() else []
        report.emit_json({"ok": True, "points": count, "open_to_others": exposed})
    else:
        out("%d points verified" % count)
    return errors.OK


def cmd_repair(args, conf: settings.Settings) -> int:
    repo = repository(args, conf)
    repo.require_marked()  # never a mode changed outside a repository
    opened = repo.tighten()
    if opened:
        say(
            "made %d directories and files of %s private (directories 0700, files 0600)"
            % (len(opened), repo.root)
        )
    chains, _ = verify.targets(repo, args.vdis)
    removed, rebuilt, unmendable = {}, [], []
    for chain in chains:
        with chain.lock(args.wait):
            gone = chain.clean()
            mended = [(m.point, mend.sums(chain, m)) for m in chain.points()]
        if gone:
            removed[chain.vdi_uuid] = gone
            say("VDI %s: removed %s" % (chain.vdi_uuid, ", ".join(gone)))
        for point, done in mended:
            if done is not None:
                (rebuilt if done[0] else unmendable).append("%s/%s" % (chain.vdi_uuid, point))
                say("VDI %s point %s: %s" % (chain.vdi_uuid, point, done[1]))
    removed.update(vm_leftovers(repo, conf))
    if args.json:
        report.emit_json(
            {
                "removed": removed,
                "made_private": sorted(map(str, opened)),
                "sums_rebuilt": rebuilt,
                "not_mended": unmendable,
            }
        )
    elif not removed and not opened and not rebuilt and not unmendable:
        say("nothing to repair")
    if unmendable:
        raise RepositoryError(
            "%d point(s) could not be mended (each line above says why): xencbt verify "
            "names the nearest intact points" % len(unmendable)
        )
    return errors.OK


def vm_leftovers(repo, conf: settings.Settings) -> dict[str, list[str]]:
    """VM points' stray configurations; with pool options, what killed restore-vm runs
    left on the pool (restore_vm.py)."""
    from .repo.vmpoints import all_vm_points

    removed = {}
    for points in all_vm_points(repo):
        strays = points.strays()
        for path in strays:
            path.unlink()
        if strays:
            removed[points.vm_uuid + "/points"] = [p.name for p in strays]
            say("VM %s: removed %s" % (points.vm_uuid, ", ".join(p.name for p in strays)))
    if conf.xapi:
        from .jobs.restore_vm import clean_leftovers
        from .xapi.facade import PoolApi

        try:
            with conf.session() as session:
                gone = clean_leftovers(PoolApi(session))
        except (XencbtError, OSError) as e:
            # The repository is repaired all the same; the pool waits for the next run.
            say("xencbt: warning: leftovers of restore-vm runs not checked: %s" % scrub(str(e)))
            gone = []
        if gone:
            removed["pool"] = gone
            say("destroyed what interrupted restore-vm runs left: %s" % ", ".join(gone))
    return removed


def cmd_prune(args, conf: settings.Settings) -> int:
    from .jobs.prune import retain
    from .jobs.retention import Policy

    if args.keep is not None and args.keep_last:
        raise UsageError("--keep is --keep-last: give one of them")
    policy = Policy(
        last=args.keep if args.keep is not None else args.keep_last,
        hourly=args.keep_hourly,
        daily=args.keep_daily,
        weekly=args.keep_weekly,
        monthly=args.keep_monthly,
        yearly=args.keep_yearly,
    )
    if policy.empty():
        raise UsageError("say what to keep: --keep-last N (or --keep N), --keep-daily N, ...")
    repo = repository(args, conf, key_required=not args.dry_run)  # a plan reads manifests
    tell = say if args.json else out  # the report is the output; --json's is on stdout
    removed, freed, vms = {}, 0, []
    for vm_uuid, chains in report.vms(repo, args.vms).items():
        done = retain(chains, policy, args.wait, args.dry_run)
        vms.append(report.retained(vm_uuid, chains, done))
        if not args.json:
            for line in report.retained_lines(vms[-1], args.dry_run):
                out(line)
        for vdi, gone in done["removed"].items():
            tell(report.pruned_chain(vdi, gone, done["freed_by_vdi"][vdi], args.dry_run))
        removed.update(done["removed"])
        freed += done["freed_bytes"]
    if args.json:
        report.emit_json(
            {
                "removed": removed,
                "freed_bytes": freed,
                "dry_run": args.dry_run,
                "policy": asdict(policy),
                "vms": vms,
            }
        )
    tell(report.pruned(removed, freed, policy, args.dry_run))
    return errors.OK


def cmd_copy(args, conf: settings.Settings) -> int:
    from .jobs.replicate import copy_repository, copy_vm_points
    from .repo.repository import Repository

    src = repository(args, conf)
    dst = Repository(args.to)
    if dst.root.resolve() == src.root.resolve():
        raise UsageError("--to names the repository itself")
    # A copy of an encrypted SRC, or with a key at hand, is encrypted unless
    # --to-encryption none; DST's own key (another, or the same file) is checked before
    # anything is copied.
    dst_key = args.to_key_file or conf.key_file
    encryption = repoconfig.copy_target(
        src, dst, args.to_key_file, conf.key_file, args.to_encryption
    )
    repoconfig.unlock(dst, dst_key)
    chains = [c for cs in report.vms(src, args.vms).values() for c in cs]
    if encryption is not None:  # a new DST
        repoconfig.ensure(dst, say, dst_key, encryption)
    copied, held = copy_repository(src, dst, chains, args.wait, say, args.full)
    vm_points = copy_vm_points(src, dst, chains, args.wait, say)
    say(report.copied(copied, vm_points, dst.root))
    code, failed = errors.OK, {}
    if held:
        # The others were copied; each chain held back is named with its way on.
        code = errors.VERIFY_FAILED
        message = scrub(
            "%s not copied on (the other points were): %s"
            % (report.several(len(held), "VDI"), "; ".join(held[v] for v in sorted(held)))
        )
        say("xencbt: %s" % message)
        failed = {"error": message, "exit_code": code}
    if args.json:
        report.emit_json(
            {"copied": copied, "vm_points": vm_points, "held": held, "to": str(dst.root)} | failed
        )
    return code


def cmd_forget(args, conf: settings.Settings) -> int:
    from .jobs import forget
    from .text import human

    repo = repository(args, conf, key_required=False)  # nothing is read, only removed
    repo.require_marked()
    vm_uuid, chains = forget.chosen(repo, args.vm)
    plan = forget.plan(repo, vm_uuid, chains)
    points = sorted({p for ps in plan.removed.values() for p in ps} | set(plan.vm_points))
    what = "VM %s (%s): %s of %s (%s), %s" % (
        plan.vm_name,
        vm_uuid,
        report.several(len(points), "point"),
        report.several(len(plan.removed), "disk"),
        "%s to %s" % (points[0], points[-1]) if points else "none",
        human(plan.freed_bytes),
    )
    if not args.dry_run and not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(
                "forget removes every point of %s for good: add --yes (or --dry-run to see "
                "what would go)" % what
            )
        print("remove every point of %s for good? [y/N] " % what, end="", file=sys.stderr)
        if input().strip().lower() not in ("y", "yes"):
            say("nothing was removed")
            return errors.OK
    done = plan if args.dry_run else forget.forget(repo, vm_uuid, chains, args.wait)
    if args.json:
        report.emit_json({**asdict(done), "dry_run": args.dry_run})
    say("%s %s" % ("would remove" if args.dry_run else "removed", what))
    for vdi, gone in sorted(done.removed.items()):
        say("  VDI %s: %s" % (vdi, ", ".join(gone) or "no readable point"))
    return errors.OK


def cmd_nbd(args, conf: settings.Settings) -> int:
    from .xapi.networks import Networks

    with conf.session() as session:
        nets = Networks(session, say)
        if args.action == "status":
            rows = nets.status()
            if args.json:
                report.emit_json(rows)
            else:
                for r in rows:
                    print("%-40s %-36s %s" % (r["name"], r["uuid"], r["mode"] or "-"))
            return errors.OK
        if args.action == "enable":
            nets.enable(args.network, args.insecure, args.wait_timeout)
        else:
            nets.disable(args.network)
    return errors.OK


def cmd_serve(args, conf: settings.Settings) -> int:
    from .jobs.serve import serve

    return serve(args, conf, None if args.snapshot else repository(args, conf), say)


SHOWS_PROGRESS = ("backup", "restore", "restore-vm", "verify")


def cmd_files(args, conf: settings.Settings) -> int:
    from .jobs import files

    if args.action == "get" and not (args.to or args.tar):
        raise UsageError("files get: give --to DIR or --tar FILE|-")
    result = files.run(args, repository(args, conf), say)
    if args.json and args.tar != "-":  # stdout holds the archive then
        report.emit_json(result)
    elif args.action == "ls":
        files.print_result(result, args.long)
    else:
        say("extracted %s" % files.summary(result))
    return errors.OK


COMMANDS = {
    "backup": cmd_backup,
    "init": cmd_init,
    "list": cmd_list,
    "restore": cmd_restore,
    "restore-vm": cmd_restore_vm,
    "verify": cmd_verify,
    "prune": cmd_prune,
    "copy": cmd_copy,
    "repair": cmd_repair,
    "nbd": cmd_nbd,
    "serve": cmd_serve,
    "files": cmd_files,
    "forget": cmd_forget,
}


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
    configure_logging(args.verbose + getattr(args, "verbose_after", 0))
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
            },
            args.config,
        )
        shown = args.command in SHOWS_PROGRESS and progress.wanted(args.json)
        with progress.shown(shown):
            return COMMANDS[args.command](args, conf)
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
