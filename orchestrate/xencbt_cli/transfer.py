"""Restore into the pool over HTTP (REFERENCE §3): a new VDI (VDI.create + PUT
/import_raw_vdi) or an existing one, writing only the 64 KiB blocks that differ
(PUT /import_raw_vdi&chunked=true: {offset u64 LE, length u32 LE} + data frames)."""

from __future__ import annotations

import contextlib
import http.client
import logging
import struct
import urllib.parse

from xencbt_core.errors import XapiError
from xencbt_core.xapi import https_connection

from . import command
from .digest import Reading
from .errors import CliError
from .image import random_access, reader
from .pool import Pool
from .repository import UUID, Repository
from .restore import check, in_use

INCOMPLETE = " (restore incomplete)"  # name suffix until the import is proven complete

log = logging.getLogger(__name__)

BLOCK = 64 * 1024
CHUNK = 1 << 20
FRAME = struct.Struct("<QI")


class Upload:
    """One PUT with a known Content-Length, body sent piece by piece."""

    def __init__(self, pool: Pool, vdi_ref: str, length: int, chunked: bool):
        self.pool = pool
        self.vdi_ref = vdi_ref
        self.length = length
        self.query = {"vdi": vdi_ref, "format": "raw"}
        if chunked:
            self.query["chunked"] = "true"
        self.conn: http.client.HTTPSConnection | None = None

    def open(self, netloc: str | None = None, path: str = "/import_raw_vdi") -> None:
        session = self.pool.session
        query = dict(self.query, session_id=session.ref().reveal())
        self.conn = https_connection(netloc or session.netloc, session.trust)
        self.conn.putrequest("PUT", path + "?" + urllib.parse.urlencode(query))
        self.conn.putheader("Content-Length", str(self.length))
        self.conn.putheader("Content-Type", "application/octet-stream")
        self.conn.endheaders()

    def send(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.send(data)

    def finish(self) -> None:
        assert self.conn is not None
        reply = self.conn.getresponse()
        body = reply.read().decode(errors="replace").strip()
        self.conn.close()
        if reply.status != 200:
            raise CliError("import into VDI failed: HTTP %d %s" % (reply.status, body[:200]))


def resolve_sr(pool: Pool, sr: str) -> str:
    try:
        if UUID.match(sr):
            return pool.call("SR.get_by_uuid", sr)
        refs = pool.call("SR.get_by_name_label", sr)
    except XapiError as e:
        raise CliError("no SR %s: %s" % (sr, e)) from None
    if len(refs) != 1:
        raise CliError("%d SRs named %s: give its uuid (xe sr-list)" % (len(refs), sr))
    return refs[0]


def to_sr(pool: Pool, repo: Repository, vdi: str, at: str | None, sr: str):
    """A new VDI on ``sr`` with the point's content; returns (manifest, new VDI uuid)."""
    chain = repo.find(vdi)
    m = chain.get(at)
    name = "%s (restored %s)" % (m.vdi_name, m.point)
    record = {
        # A restore killed half-way leaves a VDI that says so; the operator deletes it.
        "name_label": name + INCOMPLETE,
        "name_description": "xencbt restore of VDI %s point %s" % (m.vdi_uuid, m.point),
        "SR": resolve_sr(pool, sr),
        "virtual_size": str(m.virtual_size),
        "type": "user",
        "sharable": False,
        "read_only": False,
        "other_config": {},
        "xenstore_data": {},
        "sm_config": {},
        "tags": [],
    }
    ref = pool.call("VDI.create", record)
    uuid = "(new)"  # until known: interrupted before, the cleanup still has the ref
    try:
        uuid = pool.call("VDI.get_uuid", ref)
        upload = Upload(pool, ref, m.virtual_size, chunked=False)
        upload.open()
        reading = Reading(m, chain.sums_path(m.point))

        def send(data: bytes) -> None:
            reading.update(data)
            upload.send(data)

        command.stream(reader(chain.image_path(m.point)), send)
        upload.finish()
        check(reading, "the new VDI is destroyed")
        pool.call("VDI.set_name_label", ref, name)
    except BaseException:
        with contextlib.suppress(Exception):
            pool.destroy_vdi(ref, uuid)
        raise
    return m, uuid


def differing(pool: Pool, ref: str, h, size: int, reading: Reading) -> list[tuple[int, int]]:
    """64 KiB-aligned extents where the VDI's current content differs from ``h``; all of
    ``h`` goes through ``reading`` (it is read whole anyway)."""
    session = pool.session
    query = urllib.parse.urlencode(
        {"session_id": session.ref().reveal(), "vdi": ref, "format": "raw"}
    )
    conn = https_connection(session.netloc, session.trust)
    conn.request("GET", "/export_raw_vdi?" + query)
    reply = conn.getresponse()
    if reply.status != 200:
        raise CliError("reading the VDI failed: HTTP %d" % reply.status)
    extents: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        n = min(BLOCK, size - offset)
        current = reply.read(n)
        if len(current) != n:
            raise CliError("the VDI's export ended early at byte %d" % offset)
        wanted = h.pread(n, offset)
        reading.update(wanted)
        if current != wanted:
            if extents and sum(extents[-1]) == offset:
                extents[-1] = (extents[-1][0], extents[-1][1] + n)
            else:
                extents.append((offset, n))
        offset += n
    conn.close()
    return extents


def to_vdi(
    pool: Pool, repo: Repository, vdi: str, at: str | None, target: str, force: bool = False
):
    """Overwrite VDI ``target`` with the point, writing only the blocks that differ."""
    chain = repo.find(vdi)
    m = chain.get(at)
    ref = pool.vdi_ref(target)
    if ref is None:
        raise CliError("no VDI %s in the pool" % target)
    if not force:
        in_use(pool, ref, target, m)
    size = int(pool.call("VDI.get_virtual_size", ref))
    if size < m.virtual_size:
        raise CliError(
            "VDI %s is %d bytes, smaller than the point (%d bytes): resize it first"
            % (target, size, m.virtual_size)
        )
    with random_access(chain.image_path(m.point)) as h:
        reading = Reading(m, chain.sums_path(m.point))
        extents = differing(pool, ref, h, m.virtual_size, reading)
        check(reading, "nothing was written to VDI %s" % target)
        length = sum(FRAME.size + n for _, n in extents) + FRAME.size
        upload = Upload(pool, ref, length, chunked=True)
        upload.open()
        for offset, n in extents:
            upload.send(FRAME.pack(offset, n))
            for pos in range(offset, offset + n, CHUNK):
                upload.send(h.pread(min(CHUNK, offset + n - pos), pos))
        upload.send(FRAME.pack(0, 0))
        upload.finish()
    log.info("wrote %d extents, %d bytes", len(extents), sum(n for _, n in extents))
    return m, target
