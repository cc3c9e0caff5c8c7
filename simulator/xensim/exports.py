"""What the host NBD servers export: a VDI's raw file, found from the export name.

The export name is ``/<vdi-uuid>?session_id=<session ref>``; like xapi-nbd, the server
checks the session and the VDI when the client asks for the export, then plugs a VBD in
dom0 (dom0.py) that ``detach`` unplugs when the connection ends.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import disks
from .dom0 import Dom0
from .xapi import Xapi

log = logging.getLogger(__name__)


@dataclass
class RawExport:
    path: Path
    size: int
    vbd: str | None = None
    dom0: Dom0 | None = None

    def pread(self, offset: int, length: int) -> bytes:
        """Sparse holes and any short tail read as zeros; OSError if the file is gone."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        return data + bytes(length - len(data))

    def detach(self, wait: Callable[[float], bool]) -> None:
        """The connection is over: unplug and destroy its VBD (blocks until done)."""
        if self.vbd is not None and self.dom0 is not None:
            self.dom0.unplug(self.vbd, wait)


def parse(name: str) -> tuple[str, str] | None:
    """(vdi uuid, session ref) from an export name, None when it is malformed."""
    if not name.startswith("/"):
        return None
    path, _, query = name[1:].partition("?")
    session = urllib.parse.parse_qs(query).get("session_id", [""])[0]
    return (path, session) if path and session else None


class Resolver:
    def __init__(self, xapi: Xapi, dom0: Dom0) -> None:
        self.xapi = xapi
        self.dom0 = dom0

    def __call__(self, name: str) -> RawExport | None:
        parsed = parse(name)
        if parsed is None:
            log.info("NBD export name malformed")
            return None
        uuid, session = parsed
        if not self.xapi.sessions.is_live(session):
            log.info("NBD export refused: session not live")
            return None
        db = self.xapi.db
        with db.lock:
            found = db.find("VDI", uuid=uuid)
            if not found or db.get("VDI", found[0])["type"] == "cbt_metadata":
                log.info("NBD export refused: no such VDI or cbt_metadata")
                return None
            size = db.get("VDI", found[0])["virtual_size"]
        path = disks.data_path(self.xapi.options.state_dir, uuid)
        if not path.exists():
            return None
        # main.ml with_attached_vdi: the VBD is plugged before the size reply.
        vbd = self.dom0.plug(found[0])
        if vbd is None:
            log.info("NBD export refused: VBD.create failed")
            return None
        return RawExport(path, size, vbd, self.dom0)
