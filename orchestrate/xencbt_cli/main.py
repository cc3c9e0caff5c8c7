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

from xencbt_core.errors import ConfigError, XencbtError
from xencbt_core.secret import ScrubFilter, scrub

from . import errors, report, restore, settings, verify
from .errors import UsageError

log = logging.getLogger("xencbt_cli")

EPILOG = """\
exit codes:
  0  success
  1  error (the message names the VM/VDI/point and what to do)
  2  usage error (bad options, missing pool or password)
  3  partial failure: some VMs of a multi-VM backup failed, the others succeeded
  4  verify failed (the message names every failing point)
  5  a VDI chain is locked by another xencbt (a backup or prune is running); see --wait
  6  authentication failed: the pool refused the user or password (password changed?)
130 interrupted

connection settings: --xapi/--user/--password-file override $XENCBT_XAPI, $XENCBT_USER,
$XENCBT_PASSWORD_FILE, which override the config file (--config, else
/etc/xencbt/xencbt.conf, else ~/.config/xencbt/xencbt.conf; INI section [xencbt] with
xapi, user, password_file, xapi_cafile, thumbprint, repo). The password is only ever read
from a file (or stdin with --password-file -), never taken on the command line.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xencbt",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--xapi", metavar="URL", help="pool API, e.g. https://pool-master")
    p.add_argument("--user", help="XAPI user (default root)")
    p.add_argument("--password-file", metavar="FILE", help="file holding the password, or -")
    p.add_argument("--xapi-cafile", metavar="FILE", help="CA or certificate of the API")
    p.add_argument("--thumbprint", metavar="SHA256", help="pin the API certificate instead")
    p.add_argument("--config", metavar="FILE", help="INI config file")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    b = sub.add_parser("backup", help="back up VMs (full or incremental)")
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
        "--retry-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="keep reconnecting to a host's NBD server this long (default 60; NBD just "
        "enabled on a network takes 10 s or more to answer)",
    )

    s = sub.add_parser("list", help="list backup points")
    s.add_argument("--repo", metavar="DIR")

    r = sub.add_parser("restore", help="restore a point of a VDI")
    r.add_argument("vdi", metavar="VDI", help="VDI uuid (or unique prefix) as in list")
    r.add_argument("--repo", metavar="DIR")
    r.add_argument("--at", metavar="POINT", help="point id (default: the newest)")
    dest = r.add_mutually_exclusive_group(required=True)
    dest.add_argument("--to-file", type=Path, metavar="PATH")
    dest.add_argument("--to-sr", metavar="SR", help="new VDI on this SR (uuid or name)")
    dest.add_argument("--to-vdi", metavar="VDI", help="overwrite this VDI (differences only)")
    r.add_argument("--format", choices=("raw", "qcow2"), default="raw")
    r.add_argument("--force", action="store_true", help="overwrite an existing file")

    v = sub.add_parser("verify", help="check images, chains and checksums (read-only)")
    v.add_argument("vdis", nargs="*", metavar="VDI")
    v.add_argument("--repo", metavar="DIR")

    rp = sub.add_parser(
        "repair", help="remove what interrupted runs left; finish or undo interrupted prunes"
    )
    rp.add_argument("vdis", nargs="*", metavar="VDI")
    rp.add_argument("--repo", metavar="DIR")
    rp.add_argument("--wait", action="store_true", help="wait for a locked chain")

    pr = sub.add_parser("prune", help="keep the newest N points of every chain")
    pr.add_argument("--repo", metavar="DIR")
    pr.add_argument("--keep", type=int, required=True, metavar="N")
    pr.add_argument("--wait", action="store_true", help="wait for a locked chain")

    sv = sub.add_parser("serve", help="serve a point (or a live snapshot) read-only over NBD")
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

    n = sub.add_parser("nbd", help="NBD on the pool's networks")
    n.add_argument("action", choices=("status", "enable", "disable"))
    n.add_argument("--network", metavar="NAME|UUID")
    n.add_argument("--insecure", action="store_true", help="insecure_nbd (no TLS)")
    return p


def configure_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
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


def repository(args, conf: settings.Settings):
    from .repository import Repository

    root = args.repo or conf.repo
    if not root:
        raise UsageError("no repository: give --repo DIR (or repo= in the config)")
    return Repository(root)


def cmd_backup(args, conf: settings.Settings) -> int:
    from .backup import Backup
    from .copier import Copier
    from .pool import Pool

    if not 1 <= args.connections <= 16:
        raise UsageError("--connections must be 1..16 (a host serves at most 16)")
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    if not 0 < args.retry_timeout < float("inf"):
        raise UsageError("--retry-timeout must be a positive number of seconds")
    repo = repository(args, conf)
    with conf.session() as session, conf.plugin_password() as password:
        progress = sys.stderr.isatty() and not args.json
        copier = Copier(conf, password, args.connections, progress, args.retry_timeout)
        job = Backup(
            Pool(session), repo, copier, say, full=args.full, wait=args.wait, jobs=args.jobs
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


def cmd_list(args, conf: settings.Settings) -> int:
    repo = repository(args, conf)
    rows = report.points(repo)
    for chain in repo.chains():
        for point, why in chain.damaged().items():
            say(
                "xencbt: warning: VDI %s: the manifest of point %s is unreadable (%s): "
                "that point is not listed; xencbt verify" % (chain.vdi_uuid, point, why)
            )
    if args.json:
        report.emit_json(rows)
    else:
        report.print_points(rows)
    return errors.OK


def cmd_restore(args, conf: settings.Settings) -> int:
    repo = repository(args, conf)
    if args.to_file:
        m = restore.to_file(repo, args.vdi, args.at, args.to_file, args.format, args.force)
        target = str(args.to_file)
    else:
        from .pool import Pool
        from .transfer import to_sr, to_vdi

        with conf.session() as session:
            pool = Pool(session)
            if args.to_sr:
                m, target = to_sr(pool, repo, args.vdi, args.at, args.to_sr)
            else:
                m, target = to_vdi(pool, repo, args.vdi, args.at, args.to_vdi)
    if args.json:
        report.emit_json({"restored": asdict(m), "to": target})
    else:
        say("restored VDI %s point %s to %s" % (m.vdi_uuid, m.point, target))
    return errors.OK


def cmd_verify(args, conf: settings.Settings) -> int:
    count = verify.verify(repository(args, conf), args.vdis, say)
    if args.json:
        report.emit_json({"ok": True, "points": count})
    else:
        say("%d points verified" % count)
    return errors.OK


def cmd_repair(args, conf: settings.Settings) -> int:
    repo = repository(args, conf)
    chains = [repo.find(v) for v in args.vdis] if args.vdis else repo.chains()
    removed = {}
    for chain in chains:
        with chain.lock(args.wait):
            gone = chain.clean()
        if gone:
            removed[chain.vdi_uuid] = gone
            say("VDI %s: removed %s" % (chain.vdi_uuid, ", ".join(gone)))
    if args.json:
        report.emit_json({"removed": removed})
    elif not removed:
        say("nothing to repair")
    return errors.OK


def cmd_prune(args, conf: settings.Settings) -> int:
    from .prune import prune

    if args.keep < 1:
        raise UsageError("--keep must be at least 1")
    removed = {}
    for chain in repository(args, conf).chains():
        with chain.lock(args.wait):
            gone = prune(chain, args.keep)
        if gone:
            removed[chain.vdi_uuid] = gone
            say("VDI %s: merged and removed %d old points" % (chain.vdi_uuid, len(gone)))
    if args.json:
        report.emit_json({"removed": removed})
    return errors.OK


def cmd_nbd(args, conf: settings.Settings) -> int:
    from .network import Networks

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
            nets.enable(args.network, args.insecure)
        else:
            nets.disable(args.network)
    return errors.OK


def cmd_serve(args, conf: settings.Settings) -> int:
    from .serve import serve

    return serve(args, conf, None if args.snapshot else repository(args, conf), say)


COMMANDS = {
    "backup": cmd_backup,
    "list": cmd_list,
    "restore": cmd_restore,
    "verify": cmd_verify,
    "prune": cmd_prune,
    "repair": cmd_repair,
    "nbd": cmd_nbd,
    "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        conf = settings.resolve(
            {
                "xapi": args.xapi,
                "user": args.user,
                "password_file": args.password_file,
                "xapi_cafile": args.xapi_cafile,
                "thumbprint": args.thumbprint,
                "repo": getattr(args, "repo", None),
            },
            args.config,
        )
        return COMMANDS[args.command](args, conf)
    except KeyboardInterrupt:
        say("xencbt: interrupted")
        return errors.INTERRUPTED
    except BrokenPipeError:
        # stdout went away (`xencbt list | head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return errors.OK
    except ConfigError as e:
        say("xencbt: %s" % e)
        return errors.USAGE
    except XencbtError as e:
        say("xencbt: %s" % scrub(str(e)))
        return errors.exit_code(e)
    except OSError as e:
        # The repository's or the target's file system said no (full, read-only, gone):
        # one line naming the file, not a traceback.
        say("xencbt: %s" % scrub(errors.describe_os_error(e)))
        return errors.ERROR


if __name__ == "__main__":
    sys.exit(main())
