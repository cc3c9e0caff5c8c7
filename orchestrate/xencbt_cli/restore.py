"""Restore a point: to a file (raw or qcow2), a new VDI on an SR, or an existing VDI."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from . import command
from .errors import CliError
from .repository import Manifest, Repository

log = logging.getLogger(__name__)


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
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()
    return m
