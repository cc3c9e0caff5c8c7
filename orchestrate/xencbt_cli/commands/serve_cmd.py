"""xencbt serve: serve a point, or a live snapshot, read-only over NBD."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from ..jobs.serve import ServeRequest, serve
from ..settings import Settings
from .common import repository, say

NAME = "serve"
PROGRESS = False


def add_parser(subparsers, parents: list) -> None:
    sv = subparsers.add_parser(
        "serve", parents=parents, help="serve a point (or a live snapshot) read-only over NBD"
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


def run(args: argparse.Namespace, conf: Settings) -> int:
    request = ServeRequest(
        args.vdi, args.at, args.snapshot, args.listen, args.tls_psk, args.tls_certificates
    )
    repo = None if args.snapshot else repository(args, conf)
    return serve(request, conf, repo, announcer(args.json, say), say)


def announcer(as_json: bool, say: Callable[[str], None]) -> Callable[[dict], None]:
    def announce(info: dict) -> None:
        if as_json:
            print(json.dumps(info), flush=True)
        else:
            if "point" in info:
                what = "VDI %s point %s (%s)" % (info["vdi"], info["point"], info["type"])
            elif "vm" in info:
                what = "VM %s as snapshot %s, disks %s (export names; default %s)" % (
                    info["vm"],
                    info["snapshot"],
                    ", ".join(info["exports"]),
                    info["exports"][0] if info["exports"] else "none",
                )
            else:
                what = "VDI %s as snapshot %s" % (info["vdi"], info["snapshot"])
            print("serving %s read-only" % what)
            print("  uri:        %s" % info["uri"])
            if info["nbd_client"]:
                print("  nbd-client: %s" % info["nbd_client"])
            else:
                print("  (nbd-client cannot do this TLS: use qemu-nbd, nbdfuse or guestmount)")
            sys.stdout.flush()
        say("xencbt: serving until Ctrl-C or SIGTERM")

    return announce
