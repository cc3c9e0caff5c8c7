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


def compress_options(compression: str) -> list[str]:
    """qemu-img convert options writing every cluster compressed (qcow2 v3: qemu 5.1+
    knows compression_type=zstd; a cluster that does not shrink is stored as is).  The
    compression type is the image's own header field: whoever reads it (qemu-img,
    qemu-nbd, nbdcopy through them) decompresses transparently."""
    if compression == "none":
        return []
    return ["-c", "-o", "compression_type=%s" % compression]


def flatten(path: Path, out: Path, fmt: str = "qcow2", compression: str = "none") -> None:
    """A standalone copy (sparse) of what ``path`` shows, in ``fmt``."""
    options = compress_options(compression) if fmt == "qcow2" else []
    command.run(["qemu-img", "convert", "-f", "qcow2", "-O", fmt, *options, path, out])


def onto(path: Path, base: Path, out: Path, compression: str = "none") -> None:
    """``out``: ``path``'s own clusters over ``base`` (in ``out``'s directory), which must
    show what ``path``'s backing shows (``convert -B`` trusts that, and copies no more)."""
    options = compress_options(compression)
    argv = ["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", *options]
    command.run([*argv, "-B", base.name, "-F", "qcow2", path, out])


def rebased(path: Path, base: Path, out: Path, compression: str = "none") -> None:
    """``out``: what ``path`` shows, backed by ``base`` (same directory) instead of its
    own backing chain.  A sparse copy of ``path`` is rebased in safe mode (qemu-img
    compares the old and the new backing and copies into it the clusters where they
    differ); ``convert -B`` alone would not do (it trusts that the source's backing and
    the new one show the same and copies only the source's own clusters).  qemu 7.2's
    rebase has no -c: with compression, a second pass (``convert -c -B``, now right, as
    the copy's backing is ``base``) writes it compressed."""
    work = out if compression == "none" else out.with_name(path.name + ".rebase.partial")
    command.run(["cp", "--sparse=always", "--", path, work])
    try:
        command.run(["qemu-img", "rebase", "-f", "qcow2", "-b", base.name, "-F", "qcow2", work])
        if work != out:
            options = compress_options(compression)
            argv = ["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", *options]
            command.run([*argv, "-B", base.name, "-F", "qcow2", work, out])
    finally:
        if work != out:
            with contextlib.suppress(FileNotFoundError):
                work.unlink()


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
