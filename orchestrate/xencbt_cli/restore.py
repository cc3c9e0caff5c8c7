"""Restore a point: to a file (raw or qcow2), a new VDI on an SR, or an existing VDI.

Every restore is checked against the digest recorded at backup time (digest.py, computed
over what is restored, which is read whole anyway) before it counts: a damaged image (or
one it is backed by) gives an error naming the point, never silently wrong data.  A file
is written as ``PATH.partial`` and renamed, so PATH is either absent or complete.
Overwriting a pool VDI in place is refused, unless forced, when the VDI is in use or
belongs to another VM (``in_use``).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from . import command, image, progress, testhook
from .digest import Reading
from .errors import CliError, CommandFailed, PointDamaged, TargetFull, UsageError, out_of_space
from .repository import Chain, Manifest, Repository, nearest

log = logging.getLogger(__name__)


FORMATS = {".raw": "raw", ".img": "raw", ".qcow2": "qcow2"}
NEAREST = 5  # points tried for the advice after a damaged one: each is read whole


def file_format(path: Path, fmt: str | None) -> str:
    """``--format``, else what the extension says; never a guess."""
    if fmt:
        return fmt
    found = FORMATS.get(path.suffix.lower())
    if found is None:
        raise UsageError(
            "cannot tell the format of %s from its name: give --format raw or --format "
            "qcow2 (or name it .raw, .img or .qcow2)" % path
        )
    return found


def check(reading: Reading, where: str, chain: Chain | None = None) -> None:
    """PointDamaged unless what was read matches the manifest; the advice names the
    nearest point (newer or older) that does read back as recorded."""
    problem = reading.problem()
    if problem:
        m = reading.m
        raise PointDamaged(
            "point %s of VDI %s does not read back as recorded (%s): its image or one it is "
            "backed by is damaged (xencbt verify names it); %s; %s"
            % (m.point, m.vdi_uuid, problem, where, advice(chain, m))
        )


def in_use(pool, ref: str, target: str, m: Manifest) -> None:
    """CliError naming what overwriting VDI ``target`` with point ``m`` would destroy:
    a disk attached to a running VM (or to a host's control domain: something reads or
    writes it now), or a disk of a VM other than the one the point was taken from."""
    problems = []
    for vbd in pool.call("VDI.get_VBDs", ref):
        rec = pool.call("VBD.get_record", vbd)
        vm = pool.call("VM.get_record", rec["VM"])
        if vm["is_control_domain"]:
            if rec["currently_attached"]:
                problems.append("it is attached to the control domain of a host right now")
            continue
        who = "VM %s (%s, %s)" % (vm["name_label"], vm["uuid"], vm["power_state"].lower())
        if rec["currently_attached"] and vm["power_state"] != "Halted":
            problems.append("it is disk %s of the running %s" % (rec["userdevice"], who))
        elif vm["uuid"] != m.vm_uuid:
            problems.append("it is disk %s of %s" % (rec["userdevice"], who))
    if problems:
        raise CliError(
            "refusing to overwrite VDI %s with point %s of VM %s (%s): %s; shut the VM down "
            "or detach the disk, restore --to-sr a new VDI, or pass --force to overwrite it "
            "anyway" % (target, m.point, m.vm_name, m.vm_uuid, "; ".join(problems))
        )


def intact(chain: Chain, m: Manifest) -> bool:
    reading = Reading(m, chain.sums_path(m.point))
    try:
        command.stream(image.reader(chain.image_path(m.point)), reading.update)
    except CliError:
        return False
    return reading.problem() is None


def advice(chain: Chain | None, damaged: Manifest) -> str:
    if chain is None:
        return "restore another point"
    others = {m.point: m for m in chain.points() if m.point != damaged.point}
    for point in nearest(damaged.point, list(others))[:NEAREST]:
        if intact(chain, others[point]):
            when = "newer" if point > damaged.point else "older"
            return "the nearest intact point is %s (%s): --at %s" % (point, when, point)
    if not others:
        return "it is the only point of this VDI"
    return "none of the %d nearest points reads back as recorded either: xencbt verify" % min(
        NEAREST, len(others)
    )


def read_file(path: Path, fmt: str, reading: Reading, advance) -> None:
    def update(data: bytes) -> None:
        reading.update(data)
        advance(len(data))

    if fmt == "qcow2":
        command.stream(image.reader(path), update)
        return
    with open(path, "rb") as f:
        while chunk := f.read(command.CHUNK):
            update(chunk)


def to_file(
    repo: Repository,
    vdi: str,
    at: str | None,
    path: Path,
    fmt: str,
    force: bool = False,
    mode: int = 0o600,
) -> Manifest:
    chain = repo.find(vdi)
    m = chain.get(at)
    if path.exists() and not force:
        raise CliError("%s exists: remove it or pass --force" % path)
    partial = path.with_name(path.name + ".partial")
    free = free_space(path.parent)
    try:
        # Created private before qemu-img writes a byte of the disk into it.
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        os.chmod(partial, 0o600)
        label = "%s disk %s" % (m.vm_name, m.userdevice)
        # The restored file is in clear: it is the disk the user asked for.
        options, name = image.opening(chain.image_path(m.point))
        convert = ["qemu-img", "convert", *options, "-O", fmt]
        try:
            with progress.percent(label + ": restore " + m.point, m.virtual_size) as report:
                counted = [*convert, *(["-p"] if report else []), name]
                command.run(progress.reporting([*counted, partial], report))
        except CommandFailed as e:
            if out_of_space(e):  # the destination's fault: the point is fine
                raise full(path, m, free) from None
            # an image of the chain too damaged to read at all
            raise CommandFailed("%s; %s" % (e, advice(chain, m))) from None
        reading = Reading(m, chain.sums_path(m.point))
        with progress.task(label + ": check", m.virtual_size) as advance:
            read_file(partial, fmt, reading, advance)
        check(reading, "nothing was written to %s" % path, chain)
        testhook.pause("restore-partial")
        os.chmod(partial, mode)  # --mode: what the user asked for, whatever the umask
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()
    return m


def free_space(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None  # the restore itself says why it cannot write there


def full(path: Path, m: Manifest, free: int | None) -> TargetFull:
    had = "" if free is None else " and had %s free" % size(free)
    return TargetFull(
        "the file system of %s is full (no space left on device): restoring point %s of VDI "
        "%s needs up to %s (the disk's virtual size; holes take nothing)%s; free space "
        "there or restore elsewhere; nothing was kept"
        % (path, m.point, m.vdi_uuid, size(m.virtual_size), had)
    )


def size(n: int) -> str:
    return "%.1f GiB" % (n / (1 << 30)) if n >= 1 << 30 else "%.1f MiB" % (n / (1 << 20))
