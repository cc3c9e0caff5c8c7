"""The ``xensim`` command: argument parsing, logging set-up and exit codes, nothing else."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .dom0 import DEFAULT_CLEANUP
from .guest_boot import DEFAULT_BOOT_SECONDS

log = logging.getLogger("xensim")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'64M', '20M+512', '1G', '4096' -> bytes."""
    total = 0
    for part in text.strip().upper().split("+"):
        part = part.removesuffix("B").removesuffix("I")
        unit = part[-1] if part and part[-1] in _UNITS else ""
        total += int(part[: len(part) - len(unit)]) * _UNITS[unit]
    return total


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(parse_size(s) for s in text.split(",") if s.strip())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xensim", description="A XenServer simulator (XAPI + NBD).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "serve",
        help="run the simulated pool until SIGTERM",
        description="Run a simulated XenServer pool (one XAPI HTTPS endpoint and one TLS NBD "
        "server per host) until SIGTERM or SIGINT.  Prints one JSON line on stdout once "
        "ready (also in STATE_DIR/serve.json): the API URL, the CA file to trust and "
        "the password file of root.",
    )
    s.add_argument(
        "--state-dir",
        type=Path,
        required=True,
        help="where the pool lives: database, disks, certificates, password (kept across "
        "runs: a second serve on it is the same pool)",
    )
    s.add_argument(
        "--listen", default="127.0.0.1", help="address the API and NBD servers listen on"
    )
    s.add_argument(
        "--hosts", type=int, default=1, help="hosts in the pool (default 1; the first is master)"
    )
    s.add_argument(
        "--vms", type=int, default=1, help="VMs made on a new pool: demo-vm, demo-vm-2, ..."
    )
    s.add_argument(
        "--disk-sizes",
        type=_sizes,
        default="64M,20M+512",
        metavar="SIZE,...",
        help="the disks of each new VM, one size each (K, M, G; +N adds bytes: an odd "
        "size); default 64M,20M+512",
    )
    s.add_argument(
        "--nbd-purpose",
        choices=("nbd", "insecure_nbd", "none"),
        default="nbd",
        help="how the pool network serves NBD at the start (default nbd: TLS)",
    )
    s.add_argument(
        "--nbd-propagation",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="how long a host takes to serve NBD once enabled on a network (real hosts: "
        "10 s or more; default 0)",
    )
    s.add_argument(
        "--session-timeout",
        type=float,
        default=86400.0,
        metavar="SECONDS",
        help="an idle session expires after this long (default one day)",
    )
    s.add_argument(
        "--in-use-wait",
        type=float,
        default=4.0,
        metavar="SECONDS",
        help="how long VDI operations wait for VBDs to go before VDI_IN_USE (xapi: 4 s)",
    )
    s.add_argument(
        "--vbd-cleanup",
        type=float,
        default=DEFAULT_CLEANUP,
        metavar="SECONDS",
        help="how long dom0 takes to unplug and destroy an NBD VBD (default %s; real "
        "hosts 1-2 s)" % DEFAULT_CLEANUP,
    )
    s.add_argument(
        "--boot-seconds",
        type=float,
        default=DEFAULT_BOOT_SECONDS,
        metavar="SECONDS",
        help="how long a started guest whose boot disk has a boot sector takes to report its "
        "guest metrics (default %s); one without never does" % DEFAULT_BOOT_SECONDS,
    )
    s.add_argument(
        "--auth-fail-delay",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long a refused login waits before answering (xapi: 5 s)",
    )
    s.add_argument(
        "--srs",
        choices=("shared", "local"),
        default="shared",
        help="shared: one SR for the pool (default); local: one per host, VMs spread over "
        "the hosts",
    )
    s.add_argument(
        "--oem-vm",
        type=int,
        choices=(0, 1),
        default=0,
        help="1: also a VM 'oem-vm', a guest installed from an OEM template: a unique "
        "vTPM, the host's OEM BIOS strings, an ISO (from an ISO library SR) in its CD drive",
    )

    g = sub.add_parser("guest-disk", help="serve a live VDI read-write as its guest sees it")
    g.add_argument("--state-dir", type=Path, required=True)
    g.add_argument("--socket", type=Path, help="unix socket path (default: under DIR/guest)")
    g.add_argument(
        "--untracked",
        action="store_true",
        help="a fault for tests and drills: the writes are not recorded by CBT (a tracker "
        "that lies, what a CBT bug looks like; xencbt backup's canary should catch it)",
    )
    g.add_argument("vdi", metavar="VDI-UUID")

    f = sub.add_parser("fault", help="inject faults into a running simulator")
    f.add_argument("--state-dir", type=Path, required=True)
    f.add_argument(
        "faults",
        nargs="*",
        metavar="FAULT",
        help="drop-after-bytes=4M drop-on-read=N read-latency=SECONDS refuse-for=SECONDS "
        "invalidate-sessions cbt-off=VDI clear (no argument: show the faults)",
    )

    c = sub.add_parser("counters", help="show (or reset) the NBD counters of each host")
    c.add_argument("--state-dir", type=Path, required=True)
    c.add_argument("--reset", action="store_true")
    return p


def _serve(args: argparse.Namespace) -> int:
    from .serve import ServeOptions, run

    if args.hosts < 1 or args.vms < 0:
        raise ValueError("--hosts must be >= 1 and --vms >= 0")
    opts = ServeOptions(
        state_dir=args.state_dir.resolve(),
        listen=args.listen,
        hosts=args.hosts,
        vms=args.vms,
        disk_sizes=args.disk_sizes,
        nbd_purpose=args.nbd_purpose,
        propagation=args.nbd_propagation,
        session_timeout=args.session_timeout,
        in_use_wait=args.in_use_wait,
        vbd_cleanup=args.vbd_cleanup,
        auth_fail_delay=args.auth_fail_delay,
        srs=args.srs,
        oem_vm=args.oem_vm,
        boot_seconds=args.boot_seconds,
    )
    return run(opts)


def _guest_disk(args: argparse.Namespace) -> int:
    from .guestdisk import serve_guest_disk

    return serve_guest_disk(args.state_dir.resolve(), args.vdi, args.socket, args.untracked)


def _fault(args: argparse.Namespace) -> int:
    from .control import Control

    control = Control.from_state_dir(args.state_dir)
    changes: dict[str, object] = {}
    for item in args.faults:
        name, _, value = item.partition("=")
        if name == "clear":
            control.clear()
        elif name == "invalidate-sessions":
            print(json.dumps({"invalidated": control.invalidate_sessions(value or None)}))
        elif name == "cbt-off":
            print(json.dumps(control.cbt_off(value)))
        elif name == "refuse-for":
            control.refuse_for(float(value))
        elif name in ("drop-after-bytes", "drop-on-read"):
            changes[name.replace("-", "_")] = None if value == "none" else parse_size(value)
        elif name == "read-latency":
            changes["read_latency"] = float(value)
        else:
            raise ValueError(f"unknown fault {item!r}")
    if changes:
        control.set_faults(**changes)
    print(json.dumps(control.faults()))
    return 0


def _counters(args: argparse.Namespace) -> int:
    from .control import Control

    control = Control.from_state_dir(args.state_dir)
    print(json.dumps(control.reset_counters() if args.reset else control.counters()))
    return 0


def _logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.INFO
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if args.command in ("serve", "guest-disk"):
        args.state_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(args.state_dir / "xensim.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
    logging.basicConfig(level=level, handlers=handlers, force=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _logging(args)
    commands = {"serve": _serve, "guest-disk": _guest_disk, "fault": _fault, "counters": _counters}
    try:
        return commands[args.command](args)
    except (ValueError, OSError) as e:
        log.error("%s", e)
        return 1
    except Exception as e:  # the control API said no, or a bug: one line, non-zero
        log.error("%s: %s", type(e).__name__, e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
