"""``xensim guest-disk``: serve a live VDI read-write on a unix socket, as its guest.

Runs ``nbdkit`` with ``guest_plugin.py``; prints ``nbd+unix:///?socket=PATH`` as the first
stdout line once nbdkit listens (it tells us through a pipe: no polling), then serves
until SIGTERM/SIGINT. Works next to a running ``xensim serve`` on the same state dir:
both take the VDI's file lock around every change.  ``--untracked`` is a fault for tests
and drills: the guest's writes are not recorded in the VDI's CBT log (guest_plugin.py).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from pathlib import Path

log = logging.getLogger(__name__)

PLUGIN = Path(__file__).with_name("guest_plugin.py")
TEMP_PREFIX = "xensim-guest-"


class GuestDiskError(Exception):
    """The VDI cannot be written as a guest would (unknown, snapshot, cbt_metadata)."""


def check_vdi(state_dir: Path, uuid: str) -> None:
    objects = json.loads((state_dir / "state.json").read_text())["objects"]
    for rec in objects["VDI"].values():
        if rec["uuid"] == uuid:
            if rec["is_a_snapshot"] or rec["type"] == "cbt_metadata":
                raise GuestDiskError(f"VDI {uuid} is a snapshot, not a live disk")
            return
    raise GuestDiskError(f"no VDI {uuid} in {state_dir}")


def uri(socket_path: Path) -> str:
    return "nbd+unix:///?socket=" + urllib.parse.quote(str(socket_path), safe="/")


def default_socket(state_dir: Path, uuid: str) -> Path:
    """DIR/guest/<uuid>.sock, or a private temp dir when that path is too long for a unix
    socket (108 bytes on Linux)."""
    path = state_dir / "guest" / f"{uuid}.sock"
    if len(str(path.resolve())) < 100:
        return path
    return Path(tempfile.mkdtemp(prefix=TEMP_PREFIX)) / f"{uuid[:8]}.sock"


def serve_guest_disk(
    state_dir: Path, uuid: str, socket_path: Path | None, untracked: bool = False
) -> int:
    check_vdi(state_dir, uuid)
    socket_path = (socket_path or default_socket(state_dir, uuid)).resolve()
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    read_end, write_end = os.pipe()
    argv = [
        "nbdkit",
        "--foreground",
        "--exit-with-parent",
        "--unix",
        str(socket_path),
        "python",
        str(PLUGIN),
        f"simdir={Path(__file__).resolve().parent.parent}",
        f"state_dir={state_dir}",
        f"vdi={uuid}",
        f"ready_fd={write_end}",
        *(["untracked=1"] if untracked else []),
    ]
    log.info("running %s", shlex.join(argv))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    proc = subprocess.Popen(argv, pass_fds=(write_end,), stdin=subprocess.DEVNULL)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        if not ready.readline():
            proc.wait()
            raise GuestDiskError(f"nbdkit exited ({proc.returncode}) before serving")
    sys.stdout.write(uri(socket_path) + "\n")
    sys.stdout.flush()
    threading.Thread(target=lambda: (proc.wait(), stop.set()), daemon=True).start()
    stop.wait()
    if proc.poll() is not None:
        log.error("nbdkit exited unexpectedly (%s)", proc.returncode)
        return 1
    proc.terminate()
    proc.wait()
    socket_path.unlink(missing_ok=True)
    if socket_path.parent.name.startswith(TEMP_PREFIX):
        socket_path.parent.rmdir()
    return 0
