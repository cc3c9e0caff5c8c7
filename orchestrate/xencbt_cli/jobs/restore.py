"""Restore a point: to a file (raw or qcow2), a new VDI on an SR, or an existing VDI.

Every restore is checked against the digest recorded at backup time (repo/digest.py, computed
over what is restored, which is read whole anyway) before it counts: a damaged image (or
one it is backed by) gives an error naming the point, never silently wrong data.  A file
is written as ``PATH.partial`` and renamed, so PATH is either absent or complete.
Overwriting a pool VDI in place is refused, unless forced, when the VDI is in use or
belongs to another VM (``in_use``).

``salvage`` is the way out for a point that does not read back as recorded: it writes
what can be read (zeros where the image cannot be read at all) and names every range
whose content differs from the point's recorded chunk digests (``<point>.sums``,
repo/digest.py): the granularity of those digests, 64 MiB by default.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from xencbt_core.cbt import BLOCK_SIZE

from ..errors import CliError, CommandFailed, PointDamaged, TargetFull, UsageError, out_of_space
from ..proc import command, progress, testhook
from ..repo import digest, image
from ..repo.digest import Reading, SumsDamaged
from ..repo.manifest import Manifest, nearest
from ..repo.repository import Chain, Repository
from ..xapi.facade import PoolApi

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
            "backed by is damaged (xencbt verify names it); %s; %s (or restore --to-file "
            "... --salvage: what can be read, the damaged ranges named)"
            % (m.point, m.vdi_uuid, problem, where, advice(chain, m))
        )


def in_use(pool: PoolApi, ref: str, target: str, m: Manifest) -> None:
    """CliError naming what overwriting VDI ``target`` with point ``m`` would destroy:
    a disk attached to a running VM (or to a host's control domain: something reads or
    writes it now), or a disk of a VM other than the one the point was taken from."""
    problems = []
    for vbd in pool.vdi_vbds(ref):
        rec = pool.vbd_record(vbd)
        vm = pool.vm_record(rec["VM"])
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
        with digest.beside(update) as hash_it:
            command.stream(image.reader(path), hash_it)
        return
    if reading.chunked:
        reading.hashed(*digest.file_sums(path, reading.m.chunk_size, advance))
        return
    with open(path, "rb") as f:
        while chunk := f.read(command.CHUNK):
            update(chunk)


def point_for(repo: Repository, vdi: str, at: str | None, path: Path, force: bool):
    """(chain, manifest) of the point to restore to ``path``, which must not exist unless
    ``force``."""
    chain = repo.find(vdi)
    m = chain.get(at)
    if path.exists() and not force:
        raise CliError("%s exists: remove it or pass --force" % path)
    return chain, m


def to_file(
    repo: Repository,
    vdi: str,
    at: str | None,
    path: Path,
    fmt: str,
    force: bool = False,
    mode: int = 0o600,
) -> Manifest:
    chain, m = point_for(repo, vdi, at, path, force)
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


# -- salvage ---------------------------------------------------------------------------
@dataclass
class Salvaged:
    """What ``salvage`` wrote: the point, the ranges (offset, length) whose content does
    not match the recorded digests (or could not be checked), and why not when the
    point's digests themselves were not to be had."""

    m: Manifest
    damaged: list[tuple[int, int]] = field(default_factory=list)
    unreadable: list[tuple[int, int]] = field(default_factory=list)  # zeros written there
    unchecked: str | None = None  # why nothing could be compared (no usable .sums)

    def ranges(self) -> list[dict]:
        return [{"offset": o, "length": n, "end": o + n - 1} for o, n in self.damaged]


def salvage(
    repo: Repository,
    vdi: str,
    at: str | None,
    path: Path,
    fmt: str,
    force: bool = False,
    mode: int = 0o600,
) -> Salvaged:
    """Write what point ``at`` of ``vdi`` shows to ``path``, however damaged: each chunk
    is read and compared with its recorded digest; a block the image cannot give is
    written as zeros.  The file is kept whatever was found: the caller says which ranges
    are damaged."""
    chain, m = point_for(repo, vdi, at, path, force)
    partial = path.with_name(path.name + ".partial")
    raw = partial if fmt == "raw" else path.with_name(path.name + ".salvage.partial")
    free = free_space(path.parent)
    try:
        for created in {partial, raw}:
            os.close(os.open(created, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            os.chmod(created, 0o600)
        try:
            found = salvage_into(chain, m, raw)
            if raw != partial:
                command.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, partial])
        except CommandFailed as e:
            if out_of_space(e):
                raise full(path, m, free) from None
            raise
        except OSError as e:
            if out_of_space(e):
                raise full(path, m, free) from None
            raise
        os.chmod(partial, mode)
        os.replace(partial, path)
    finally:
        for left in (partial, raw):
            if left.exists():
                left.unlink()
    return found


def salvage_into(chain: Chain, m: Manifest, out: Path) -> Salvaged:
    """The point's flattened disk into the raw file ``out`` (sparse), chunk by chunk."""
    found = Salvaged(m)
    recorded = None
    if m.digest:
        try:
            recorded = digest.load_sums(
                chain.sums_path(m.point), m.virtual_size, m.chunk_size, m.digest
            )
        except SumsDamaged as e:
            found.unchecked = str(e)
    else:
        found.unchecked = "it was backed up before chunk digests (format 1)"
    chunk = m.chunk_size or digest.CHUNK
    whole = hashlib.sha256()
    label = "%s disk %s: salvage %s" % (m.vm_name, m.userdevice, m.point)
    with (
        image.random_access(chain.image_path(m.point)) as h,
        open(out, "r+b") as f,
        progress.task(label, m.virtual_size) as advance,
    ):
        f.truncate(m.virtual_size)
        for i in range(digest.count(m.virtual_size, chunk)):
            offset, length = digest.span(i, m.virtual_size, chunk)
            data = read_range(h, offset, length, found.unreadable)
            advance(length)
            whole.update(data)
            for at in range(0, length, BLOCK_SIZE):  # holes stay holes
                block = data[at : at + BLOCK_SIZE]
                if block.count(0) != len(block):
                    os.pwrite(f.fileno(), block, offset + at)
            want = recorded[i * digest.SUM : (i + 1) * digest.SUM] if recorded else None
            if want is not None and hashlib.sha256(data).digest() != want:
                found.damaged.append((offset, length))
        f.flush()
        os.fsync(f.fileno())
    if recorded is None:
        # Nothing to compare chunk by chunk: a format-1 point's whole-disk sha256 says
        # whether it is all sound; else only what could not be read is known.
        if not m.digest and whole.hexdigest() == m.sha256:
            found.unchecked = None
        else:
            found.damaged = list(found.unreadable) or [(0, m.virtual_size)]
    elif found.unreadable:
        found.damaged = sorted({*found.damaged, *found.unreadable})
    found.damaged = merged(found.damaged)
    return found


def read_range(h, offset: int, length: int, unreadable: list) -> bytes:
    """``length`` bytes at ``offset``, in requests qemu-nbd takes (digest.READ); in a
    request that fails, block by block: a block that cannot be read is zeros, noted."""
    out = bytearray()
    for at in range(offset, offset + length, digest.READ):
        out += read_piece(h, at, min(digest.READ, offset + length - at), unreadable)
    return bytes(out)


def read_piece(h, offset: int, length: int, unreadable: list) -> bytes:
    import nbd

    try:
        return h.pread(length, offset)
    except nbd.Error:
        pass
    out = bytearray()
    for at in range(offset, offset + length, BLOCK_SIZE):
        n = min(BLOCK_SIZE, offset + length - at)
        try:
            out += h.pread(n, at)
        except nbd.Error as e:
            log.info("bytes %d-%d cannot be read: %s", at, at + n - 1, e)
            unreadable.append((at, n))
            out += bytes(n)
    return bytes(out)


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ranges (offset, length) sorted, overlapping or adjacent ones joined."""
    out: list[list[int]] = []
    for offset, length in sorted(ranges):
        if out and offset <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], offset + length - out[-1][0])
        else:
            out.append([offset, length])
    return [(o, n) for o, n in out]


def salvaged_lines(found: Salvaged, target: str) -> list[str]:
    """What a salvage tells the user: the file is kept, and which of its ranges to
    distrust."""
    m = found.m
    head = "salvaged point %s of VDI %s to %s" % (m.point, m.vdi_uuid, target)
    if not found.damaged and not found.unchecked:
        return [head + ": every byte reads back as recorded (nothing was damaged)"]
    if found.unchecked and found.damaged == [(0, m.virtual_size)]:
        return [
            head + ": SALVAGED, NOT VERIFIED: the point's checksums cannot be had (%s), so "
            "no byte of it is known to be right" % found.unchecked
        ]
    lines = [
        head + ": SALVAGED: %d damaged %s (not what was backed up; "
        "every other byte reads back as recorded):"
        % (len(found.damaged), "range" if len(found.damaged) == 1 else "ranges")
    ]
    unreadable = found.unreadable
    for offset, length in found.damaged:
        zeros = [u for u in unreadable if offset <= u[0] < offset + length]
        lines.append(
            "  damaged %s%s"
            % (
                digest.describe((offset, length)).replace(" chunk ", " range "),
                ", %d KiB of it unreadable (zeros written)" % (sum(n for _, n in zeros) >> 10)
                if zeros
                else "",
            )
        )
    if found.unchecked:
        lines.append("  the rest could not be checked: %s" % found.unchecked)
    return lines
