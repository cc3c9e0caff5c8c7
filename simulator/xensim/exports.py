"""What the host NBD servers export: a VDI's raw file, found from the export name.

The export name is ``/<vdi-uuid>?session_id=<session ref>``; like xapi-nbd, the server
checks the session and the VDI when the client asks for the export.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from . import disks
from .xapi import Xapi

log = logging.getLogger(__name__)


@dataclass
class RawExport:
    path: Path
    size: int

    def pread(self, offset: int, length: int) -> bytes:
        """Sparse holes and any short tail read as zeros; OSError if the file is gone."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        return data + bytes(length - len(data))


def parse(name: str) -> tuple[str, str] | None:
    """(vdi uuid, session ref) from an export name, None when it is malformed."""
    if not name.startswith("/"):
        return None
    path, _, query = name[1:].partition("?")
    session = urllib.parse.parse_qs(query).get("session_id", [""])[0]
    return (path, session) if path and session else None


class Resolver:
    def __init__(self, xapi: Xapi) -> None:
        self.xapi = xapi

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
        return RawExport(path, size) if path.exists() else None
