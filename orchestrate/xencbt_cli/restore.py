"""Restore a point: to a file (raw or qcow2), a new VDI on an SR, or an existing VDI.

Every restore is checked against the sha256 recorded at backup time before it counts: a
damaged image (or one it is backed by) gives an error naming the point, never silently
wrong data.  A file is written as ``PATH.partial`` and renamed, so PATH is either absent
or complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from . import command, image
from .errors import CliError, PointDamaged
from .repository import Manifest, Repository

log = logging.getLogger(__name__)


def check_digest(m: Manifest, digest: str, where: str) -> None:
    if digest != m.sha256:
        raise PointDamaged(
            "point %s of VDI %s reads back with sha256 %s, but it was %s at backup time: "
            "its image or one it is backed by is damaged (xencbt verify names it); %s; "
            "restore an older point" % (m.point, m.vdi_uuid, digest[:16], m.sha256[:16], where)
        )


def file_sha256(path: Path, fmt: str) -> str:
    if fmt == "qcow2":
        return image.sha256(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(command.CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def to_file(
    repo: Repository, vdi: str, at: str | None, path: Path, fmt: str, force: bool = False
) -> Manifest:
    chain = repo.find(vdi)
    m = chain.get(at)
    if path.exists() and not force:
        raise CliError("%s exists: remove it or pass --force" % path)
    partial = path.with_name(path.name + ".partial")
    try:
        command.run(
            ["qemu-img", "convert", "-f", "qcow2", "-O", fmt, chain.image_path(m.point), partial]
        )
        check_digest(m, file_sha256(partial, fmt), "nothing was written to %s" % path)
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()
    return m
