"""The repository's qcow2 images through qemu-img and nbdcopy, opened with their keys:
check, create, flatten, rebase, checksum, serve.

The one place that says how qemu opens an image (``opening``) and creates one
(``create``, ``target``): an image of an encrypted repository (repokey.py) is qcow2 LUKS,
opened as a ``json:`` description of its whole backing chain, each encrypted layer with
``encrypt.key-secret`` naming a secret object that qemu reads from the key file itself
(``--object secret,id=…,file=KEYFILE``).  qemu-img does not hand an image's secret on to
its backing files, hence the whole chain spelled out; ``qemu-img info`` needs no key
(it opens without I/O) and tells the chain.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from ..errors import CliError, CommandFailed
from ..proc import command
from ..proc.qemu_img import compress_options, dedupe, info, info_chain, stopped, virtual_size
from ..proc.scratch import private_dir
from . import repokey

log = logging.getLogger(__name__)


# LUKS's PBKDF is kept short: the key file is >= 32 random bytes (repokey.py), and every
# layer of a chain runs it once per open.  qemu's default (2 s each) makes a chain of ten
# points take 20 s of CPU to open.
ITER_TIME_MS = 100
# qemu 7.2 times its PBKDF with per-thread CPU time and gives up when the clock did not
# move ("Unable to get accurate CPU usage", crypto/pbkdf.c): seen on a busy machine.
# Nothing was written then: creating again is safe.
FLAKY = "Unable to get accurate CPU usage"
CREATE_TRIES = 8


def secret_id(unlocked: repokey.Unlocked) -> str:
    return "xencbt-key-%s" % hashlib.sha256(str(unlocked.root).encode()).hexdigest()[:12]


def objects(*keys: repokey.Unlocked | None) -> list[str]:
    """``--object secret`` options for the repositories' keys (each once): qemu reads
    the key file itself; only its path is on the command line."""
    argv: list[str] = []
    for u in {secret_id(u): u for u in keys if u is not None}.values():
        path = u.key.qemu_file().replace(",", ",,")
        argv += ["--object", "secret,id=%s,file=%s" % (secret_id(u), path)]
    return argv


def tree(path: Path, unlocked: repokey.Unlocked, chain: bool = True) -> dict:
    """qemu's description of ``path`` and (``chain``) each of its backing files, with
    the key for each encrypted layer."""
    path = Path(os.path.abspath(path))
    infos = info_chain(path) if chain else [info(path)]
    node: dict | None = None
    for one in reversed(infos):
        layer = {"driver": "qcow2", "file": {"driver": "file", "filename": one["filename"]}}
        if one.get("encrypted"):
            layer["encrypt"] = {"key-secret": secret_id(unlocked)}
        layer["backing"] = node  # null: the header's backing name is not followed
        node = layer
    assert node is not None
    return node


def described(node: dict) -> str:
    return "json:" + json.dumps(node, sort_keys=True)


def opening(path: Path) -> tuple[list[str], str]:
    """(options, file name) opening ``path`` with its chain in qemu-img, qemu-nbd."""
    unlocked = repokey.of(path)
    if unlocked is None:
        return ["-f", "qcow2"], str(path)
    return objects(unlocked), described(tree(path, unlocked))


def check(path: Path) -> None:
    options, name = opening(path)
    command.run(["qemu-img", "check", "-q", "-U", *options, name])


def create(out: Path, size: int, base: Path | None = None) -> None:
    """An empty encrypted qcow2 at ``out`` (in an unlocked repository), backed by
    ``base`` (its name: same directory) if given."""
    unlocked = repokey.of(out)
    assert unlocked is not None, "create is for encrypted repositories"
    assert size > 0, "an encrypted image is created with its size"
    luks = "encrypt.format=luks,encrypt.key-secret=%s,encrypt.iter-time=%d" % (
        secret_id(unlocked),
        ITER_TIME_MS,
    )
    argv = ["qemu-img", "create", "-q", *objects(unlocked), "-f", "qcow2", "-o", luks]
    if base is not None:
        # -u: the base is not opened (it would need its key); its name is recorded.
        argv += ["-u", "-b", base.name, "-F", "qcow2"]
    for attempt in range(1, CREATE_TRIES + 1):
        try:
            command.run([*argv, out, str(size)])
            return
        except CommandFailed as e:
            if FLAKY not in str(e) or attempt == CREATE_TRIES:
                raise
            log.info("qemu-img create: %s; trying again", FLAKY)


def target(out: Path, size: int, base: Path | None = None) -> tuple[list[str], str] | None:
    """For ``qemu-img convert -O qcow2`` into ``out`` of an encrypted repository: the
    image created (``create``), then (options, file name) writing into it (``-n``); None
    when ``out`` is not encrypted (convert creates it)."""
    unlocked = repokey.of(out)
    if unlocked is None:
        return None
    create(out, size, base)
    options = [*objects(unlocked), "-n"]
    if base is None:
        options.append("--target-is-zero")  # a new image reads zeros: skip writing them
    return options, described(tree(out, unlocked))


def sha256(path: Path) -> str:
    """sha256 of the whole virtual disk the image shows (its chain flattened)."""
    digest = hashlib.sha256()
    command.stream(reader(path), digest.update)
    return digest.hexdigest()


def reader(path: Path) -> list[str]:
    """nbdcopy streaming the image's whole virtual disk to stdout.  qemu-nbd is bound to
    nbdcopy: if nbdcopy dies before connecting, a socket-activated qemu-nbd would
    otherwise wait for its first client forever."""
    options, name = opening(path)
    server = command.bound(["qemu-nbd", "-r", *options, name])
    return ["nbdcopy", "--", "[", *server, "]", "-"]


@contextlib.contextmanager
def random_access(path: Path) -> Iterator:
    """What the image shows, random access: qemu-nbd (socket activated by libnbd, in the
    children's process group, so it never outlives us) read through libnbd."""
    import nbd

    h = nbd.NBD()
    options, name = opening(path)
    argv = command.joined(["qemu-nbd", "-r", *options, name])
    log.debug("running %s", command.shown(argv))
    try:
        h.connect_systemd_socket_activation(argv)
    except nbd.Error as e:
        raise CliError("cannot read %s through qemu-nbd: %s" % (path.name, e)) from None
    try:
        yield h
    finally:
        h.shutdown()


@contextlib.contextmanager
def exported(paths: list[Path]) -> Iterator[list[str]]:
    """Each image (its chain, with its key) served read-only by its own qemu-nbd on a unix
    socket in a private directory, for a reader that cannot open an encrypted chain
    itself (libguestfs); yields the sockets' paths.  Socket activation: each socket
    listens before its qemu-nbd starts, so a client may connect at once."""
    with (
        private_dir("xencbt-nbd-") as private,
        contextlib.ExitStack() as stack,
    ):
        found = []
        for i, path in enumerate(paths):
            where = os.path.join(private, "disk%d.sock" % i)
            options, name = opening(path)
            argv = ["qemu-nbd", "--read-only", *options, "--persistent", "--shared=0", name]
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.bind(where)
                sock.listen(16)
                proc = command.start(
                    argv, pass_fds=(command.LISTEN_FD,), preexec_fn=command.activated(sock)
                )
            # Only qemu-nbd holds the socket now: should it die, a client is refused
            # instead of waiting in a backlog nobody reads.
            stack.callback(stopped, proc)
            found.append(where)
        yield found


def flatten(path: Path, out: Path, fmt: str = "qcow2", compression: str = "none") -> None:
    """A standalone copy (sparse) of what ``path`` shows, in ``fmt``; encrypted when
    ``out`` is in an encrypted repository (with that repository's key)."""
    options = compress_options(compression) if fmt == "qcow2" else []
    source, name = opening(path)
    into = target(out, virtual_size(path)) if fmt == "qcow2" else None
    if into is not None:
        options, out = [*into[0], *options], into[1]
    argv = ["qemu-img", "convert", *source, "-O", fmt, *options]
    command.run([*dedupe(argv), name, out])


def onto(path: Path, base: Path, out: Path, compression: str = "none") -> None:
    """``out``: ``path``'s own clusters over ``base`` (in ``out``'s directory), which must
    show what ``path``'s backing shows (``convert -B`` trusts that, and copies no more)."""
    options = compress_options(compression)
    source, name = opening(path)
    into = target(out, virtual_size(path), base)
    if into is not None:
        options, out = [*into[0], *options], into[1]
    argv = ["qemu-img", "convert", *source, "-O", "qcow2", *options]
    command.run([*dedupe(argv), "-B", base.name, "-F", "qcow2", name, out])


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
        if repokey.of(work) is not None:
            rebase_encrypted(work, base)
        else:
            argv = ["qemu-img", "rebase", "-f", "qcow2", "-b", base.name, "-F", "qcow2", work]
            command.run(argv)
        if work != out:
            options = compress_options(compression)
            argv = ["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", *options]
            command.run([*argv, "-B", base.name, "-F", "qcow2", work, out])
    finally:
        if work != out:
            with contextlib.suppress(FileNotFoundError):
                work.unlink()


def rebase_encrypted(work: Path, base: Path) -> None:
    """Safe-mode rebase of ``work`` onto ``base`` when both are encrypted: qemu-img
    rebase opens a new backing given by name without a key, so it is given as a
    ``json:`` description (its whole chain, keys named); that description then stands in
    ``work``'s header, and an unsafe rebase (only the header changes) puts ``base``'s
    name (relative: the repository stays movable) in its place."""
    unlocked = repokey.of(work)
    assert unlocked is not None
    keys = objects(unlocked)
    new = described(tree(base, unlocked))
    command.run(
        ["qemu-img", "rebase", *keys, "-F", "qcow2", "-b", new, described(tree(work, unlocked))]
    )
    alone = described(tree(work, unlocked, chain=False))
    command.run(["qemu-img", "rebase", *keys, "-u", "-F", "qcow2", "-b", base.name, alone])
