"""qcow2 images through qemu-img and nbdcopy: check, chain, flatten, checksum."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from . import command
from .errors import CliError

log = logging.getLogger(__name__)


def info_chain(path: Path) -> list[dict]:
    """``qemu-img info --backing-chain``: the image first, then its backing files."""
    out = command.run(
        ["qemu-img", "info", "--backing-chain", "--output=json", "-U", "-f", "qcow2", path]
    )
    return json.loads(out)


def backing(path: Path) -> str | None:
    """The image's backing file name as recorded in its header (relative), or None."""
    out = command.run(["qemu-img", "info", "--output=json", "-U", "-f", "qcow2", path])
    return json.loads(out).get("backing-filename")


def check(path: Path) -> None:
    command.run(["qemu-img", "check", "-q", "-U", "-f", "qcow2", path])


def sha256(path: Path) -> str:
    """sha256 of the whole virtual disk the image shows (its chain flattened)."""
    digest = hashlib.sha256()
    command.stream(reader(path), digest.update)
    return digest.hexdigest()


def reader(path: Path) -> list[str]:
    """nbdcopy streaming the image's whole virtual disk to stdout.  qemu-nbd is bound to
    nbdcopy: if nbdcopy dies before connecting, a socket-activated qemu-nbd would
    otherwise wait for its first client forever."""
    server = command.bound(["qemu-nbd", "-r", "-f", "qcow2", str(path)])
    return ["nbdcopy", "--", "[", *server, "]", "-"]


@contextlib.contextmanager
def random_access(path: Path) -> Iterator:
    """What the image shows, random access: qemu-nbd (socket activated by libnbd, in the
    children's process group, so it never outlives us) read through libnbd."""
    import nbd

    h = nbd.NBD()
    argv = command.joined(["qemu-nbd", "-r", "-f", "qcow2", str(path)])
    log.debug("running %s", command.shown(argv))
    try:
        h.connect_systemd_socket_activation(argv)
    except nbd.Error as e:
        raise CliError("cannot read %s through qemu-nbd: %s" % (path.name, e)) from None
    try:
        yield h
    finally:
        h.shutdown()


def flatten(path: Path, out: Path, fmt: str = "qcow2") -> None:
    """A standalone copy (sparse) of what ``path`` shows, in ``fmt``."""
    command.run(["qemu-img", "convert", "-f", "qcow2", "-O", fmt, path, out])


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fsync(path)


def disk_usage(path: Path) -> int:
    return path.stat().st_blocks * 512
