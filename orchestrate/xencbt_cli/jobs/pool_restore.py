"""Restore into the pool over HTTP (REFERENCE §3): a new VDI (VDI.create + PUT
/import_raw_vdi) or an existing one, writing only the 64 KiB blocks that differ
(PUT /import_raw_vdi&chunked=true: {offset u64 LE, length u32 LE} + data frames).

A restore counts only when the host's import task says every byte was written
(hosthttp.py): a failed import into a new VDI destroys it; into an existing VDI it says
the VDI is now partly written and which point to restore again.
"""

from __future__ import annotations

import logging
import struct

from xencbt_core.errors import XencbtError

from ..errors import CliError, Interrupted
from ..proc import command, progress, testhook
from ..repo.digest import Reading
from ..repo.image import random_access, reader
from ..repo.repository import Repository
from ..xapi.facade import PoolApi
from ..xapi.hosthttp import Download, ImportFailed, Upload
from .restore import check, in_use

INCOMPLETE = " (restore incomplete)"  # name suffix until the import is proven complete

log = logging.getLogger(__name__)

BLOCK = 64 * 1024
CHUNK = 1 << 20
FRAME = struct.Struct("<QI")


def to_sr(
    pool: PoolApi,
    repo: Repository,
    vdi: str,
    at: str | None,
    sr: str,
    name: str | None = None,
    other_config: dict | None = None,
    description: str | None = None,
):
    """A new VDI on ``sr`` with the point's content; returns (manifest, new VDI uuid).
    restore-vm names it, gives it the saved disk's description and other_config, and
    marks it (``other_config``) so a killed run's VDI is found."""
    chain = repo.find(vdi)
    m = chain.get(at)
    name = name or "%s (restored %s)" % (m.vdi_name, m.point)
    if description is None:
        description = "xencbt restore of VDI %s point %s" % (m.vdi_uuid, m.point)
    record = {
        # A restore killed half-way leaves a VDI that says so; the operator deletes it.
        "name_label": name + INCOMPLETE,
        "name_description": description,
        "SR": pool.sr_ref(sr),
        "virtual_size": str(m.virtual_size),
        "type": "user",
        "sharable": False,
        "read_only": False,
        "other_config": dict(other_config or {}),
        "xenstore_data": {},
        "sm_config": {},
        "tags": [],
    }
    ref = pool.create_vdi(record)
    uuid = "(new)"  # until known: interrupted before, the cleanup still has the ref
    try:
        uuid = pool.vdi_uuid(ref)
        reading = Reading(m, chain.sums_path(m.point))
        label = "%s disk %s: restore %s" % (m.vm_name, m.userdevice, m.point)
        with Upload(pool, ref, m.virtual_size, chunked=False) as upload:
            with progress.task(label, m.virtual_size) as advance:

                def send(data: bytes) -> None:
                    reading.update(data)
                    upload.send(data)
                    advance(len(data))

                command.stream(reader(chain.image_path(m.point)), send)
            upload.finish()
        check(reading, "the new VDI is destroyed", chain)
        pool.set_vdi_name(ref, name)
    except ImportFailed as e:
        gone = _destroy(pool, ref, uuid)
        raise ImportFailed(
            "restore of VDI %s point %s to SR %s failed: %s; %s"
            % (m.vdi_uuid, m.point, sr, e.reason, gone)
        ) from None
    except BaseException as e:
        gone = _destroy(pool, ref, uuid)
        # Interrupted and cleaned up: main says "nothing half-done was kept", no more.
        quiet = isinstance(e, (Interrupted, KeyboardInterrupt)) and gone.endswith("destroyed")
        (log.info if quiet else log.warning)("restore failed: %s", gone)
        raise
    return m, uuid


def _destroy(pool: PoolApi, ref: str, uuid: str) -> str:
    """Destroy the VDI a failed restore created; say what became of it."""
    try:
        pool.destroy_vdi(ref, uuid)
    except (XencbtError, OSError) as e:
        return "the new VDI %s could not be destroyed (%s): delete it (xe vdi-destroy uuid=%s)" % (
            uuid,
            e,
            uuid,
        )
    return "the new VDI %s was destroyed" % uuid


def differing(pool: PoolApi, ref: str, h, size: int, reading: Reading) -> list[tuple[int, int]]:
    """64 KiB-aligned extents where the VDI's current content differs from ``h``; all of
    ``h`` goes through ``reading`` (it is read whole anyway)."""
    export = Download(pool, ref)
    extents: list[tuple[int, int]] = []
    try:
        for offset in range(0, size, BLOCK):
            n = min(BLOCK, size - offset)
            current = export.read(n, offset)
            wanted = h.pread(n, offset)
            reading.update(wanted)
            if current != wanted:
                if extents and sum(extents[-1]) == offset:
                    extents[-1] = (extents[-1][0], extents[-1][1] + n)
                else:
                    extents.append((offset, n))
    finally:
        export.close()
    return extents


def _send_frames(upload: Upload, h, extents: list[tuple[int, int]], advance) -> None:
    for offset, n in extents:
        testhook.pause("vdi-extent")
        upload.send(FRAME.pack(offset, n))
        for pos in range(offset, offset + n, CHUNK):
            data = h.pread(min(CHUNK, offset + n - pos), pos)
            upload.send(data)
            advance(len(data))
    upload.send(FRAME.pack(0, 0))


def to_vdi(
    pool: PoolApi, repo: Repository, vdi: str, at: str | None, target: str, force: bool = False
):
    """Overwrite VDI ``target`` with the point, writing only the blocks that differ."""
    chain = repo.find(vdi)
    m = chain.get(at)
    ref = pool.vdi_ref(target)
    if ref is None:
        raise CliError("no VDI %s in the pool" % target)
    if not force:
        in_use(pool, ref, target, m)
    size = pool.vdi_virtual_size(ref)
    if size < m.virtual_size:
        raise CliError(
            "VDI %s is %d bytes, smaller than the point (%d bytes): resize it first"
            % (target, size, m.virtual_size)
        )
    with random_access(chain.image_path(m.point)) as h:
        reading = Reading(m, chain.sums_path(m.point))
        extents = differing(pool, ref, h, m.virtual_size, reading)
        check(reading, "nothing was written to VDI %s" % target, chain)
        length = sum(FRAME.size + n for _, n in extents) + FRAME.size
        again = "xencbt restore --repo %s %s --at %s --to-vdi %s" % (
            repo.root,
            vdi,
            m.point,
            target,
        )
        if force:
            again += " --force"
        upload: Upload | None = None
        try:
            label = "%s disk %s: restore %s" % (m.vm_name, m.userdevice, m.point)
            changed = sum(n for _, n in extents)
            with Upload(pool, ref, length, chunked=True) as upload:
                with progress.task(label, changed) as advance:
                    _send_frames(upload, h, extents, advance)
                upload.finish()
        except ImportFailed as e:
            if not e.started:
                reason = "%s; nothing was written to VDI %s" % (e.reason, target)
                raise ImportFailed(reason, False) from None
            raise ImportFailed(
                "restore of VDI %s point %s into VDI %s failed: %s; VDI %s is now partly "
                "written: restore point %s to it again (%s)"
                % (m.vdi_uuid, m.point, target, e.reason, target, m.point, again)
            ) from None
        except BaseException:
            if upload is not None:  # interrupted while sending: some blocks may be written
                log.warning("VDI %s may be partly written: run again: %s", target, again)
            raise
    log.info("wrote %d extents, %d bytes", len(extents), sum(n for _, n in extents))
    return m, target
