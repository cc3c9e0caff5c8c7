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
from pathlib import Path

from . import command, image
from .digest import Reading
from .errors import CliError, PointDamaged
from .repository import Manifest, Repository

log = logging.getLogger(__name__)


def check(reading: Reading, where: str) -> None:
    """PointDamaged unless what was read matches the manifest."""
    problem = reading.problem()
    if problem:
        m = reading.m
        raise PointDamaged(
            "point %s of VDI %s does not read back as recorded (%s): its image or one it is "
            "backed by is damaged (xencbt verify names it); %s; restore an older point"
            % (m.point, m.vdi_uuid, problem, where)
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


def read_file(path: Path, fmt: str, reading: Reading) -> None:
    if fmt == "qcow2":
        command.stream(image.reader(path), reading.update)
        return
    with open(path, "rb") as f:
        while chunk := f.read(command.CHUNK):
            reading.update(chunk)


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
        reading = Reading(m, chain.sums_path(m.point))
        read_file(partial, fmt, reading)
        check(reading, "nothing was written to %s" % path)
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()
    return m
