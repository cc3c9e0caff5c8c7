"""Figure 9: restores, the recovery time an administrator promises.

A disk with 50 % data (1 MiB runs of dense data every other MiB; 128 MiB in a quick run,
1 GiB otherwise) is backed up in full and then incrementally (1 % changed), so the chain
has two images.  Then, taking turns in each repetition:

- ``xencbt restore --to-file`` (raw) against ``qemu-img convert -O raw`` of the same chain's
  top image: what the repository adds over reading a qcow2 chain;
- ``xencbt restore --to-sr`` against a bare ``PUT /import_raw_vdi`` of the restored bytes
  into a fresh VDI (http.client, nothing else): what the restore adds over the simulator's
  import path.  The simulator is Python, so the import path bounds this one.
"""

from __future__ import annotations

import http.client
import os
import ssl
import statistics
import sys
import time
import urllib.parse
import xmlrpc.client
from pathlib import Path

from .context import Context
from .endtoend import backup, change, first_vdi, guest_disk, simulator
from .figure import Figure, at_least
from .procs import BenchError, timed

RUN = 1 << 20  # data, then a hole of the same size


def restores(ctx: Context) -> list[Figure]:
    size = min((128 if ctx.quick else 1024) << 20, ctx.size)
    state, repo = ctx.work / "sim-restore", ctx.work / "repo-restore"
    times: dict[str, list[float]] = {"to_file": [], "convert": [], "to_sr": [], "import": []}
    with simulator(state, size) as info:
        vdi = first_vdi(info)
        _half_fill(ctx, info, vdi, size)
        backup(ctx, info, repo, "--full")
        change(info, vdi, size, seed=9)
        backup(ctx, info, repo)
        top = _top_image(repo)
        out, ref = ctx.work / "restored.raw", ctx.work / "reference.raw"
        raw = ctx.work / "import.raw"  # what the bare import sends: the restored disk
        _xencbt(ctx, info, repo, vdi, "--to-file", raw)
        with _Pool(info) as pool:
            for rep in range(ctx.reps):
                runs = [
                    ("to_file", lambda: _xencbt(ctx, info, repo, vdi, "--to-file", out)),
                    ("convert", lambda: _convert(ctx, top, ref)),
                    ("to_sr", lambda: _xencbt(ctx, info, repo, vdi, "--to-sr", pool.sr)),
                    ("import", lambda: pool.import_raw(raw, size)),
                ]
                for name, run in runs[:: 1 if rep % 2 == 0 else -1]:
                    times[name].append(run())
                    if name in ("to_file", "convert"):
                        (out if name == "to_file" else ref).unlink()
    return _figures(times, size)


def _figures(times: dict[str, list[float]], size: int) -> list[Figure]:
    mb = size / 1e6
    pairs = [
        ("to_file", "convert", "restore --to-file / qemu-img convert of the chain"),
        ("to_sr", "import", "restore --to-sr / bare PUT /import_raw_vdi"),
    ]
    figs = []
    for ours, base, name in pairs:
        ratios = [b / o for o, b in zip(times[ours], times[base])]
        figs.append(
            Figure(
                "9 restore",
                "%s (%d MiB, 50 %% data)" % (name, size >> 20),
                ratios,
                "x",
                ">= 0.80",
                at_least(ratios, 0.80),
                note="%s %.0f MB/s, %s %.0f MB/s (medians, MB of the whole disk)"
                % (ours, mb / _median(times[ours]), base, mb / _median(times[base])),
                extra={ours + "_s": times[ours], base + "_s": times[base]},
            )
        )
    return figs


def _half_fill(ctx: Context, info: dict, vdi: str, size: int) -> None:
    """Every other MiB from the dense image; the rest stays zero (a fresh disk is)."""
    half = ctx.work / "half.raw"
    with open(ctx.image, "rb") as src, open(half, "wb") as dst:
        dst.truncate(size)
        for offset in range(0, size, 2 * RUN):
            src.seek(offset)
            dst.seek(offset)
            dst.write(src.read(RUN))
    with guest_disk(info, vdi) as uri:
        argv = ["qemu-img", "convert", "-n", "--target-is-zero", "-f", "raw", half]
        timed([*argv, "-O", "raw", uri], ctx.log("fill"))
    half.unlink()


def _top_image(repo: Path) -> Path:
    """The newest point's qcow2 (its backing chain is the full before it)."""
    images = sorted(repo.rglob("*.qcow2"), key=lambda p: p.stat().st_mtime)
    if not images:
        raise BenchError("no qcow2 image in %s after the backups" % repo)
    return images[-1]


def _xencbt(ctx: Context, info: dict, repo: Path, vdi: str, *target) -> float:
    env = dict(os.environ, XENCBT_XAPI=info["xapi"], XENCBT_PASSWORD_FILE=info["password_file"])
    env["HOME"] = str(repo.parent)
    argv = [sys.executable, "-m", "xencbt_cli.main", "--xapi-cafile", info["ca_file"]]
    argv += ["restore", "--repo", str(repo), vdi, *map(str, target)]
    return timed(argv, ctx.log("restore"), env=env)


def _convert(ctx: Context, top: Path, out: Path) -> float:
    return timed(["qemu-img", "convert", "-O", "raw", top, out], ctx.log("convert"))


class _Pool:
    """A XenAPI session of the bench's own, for the bare import (never on an argv)."""

    def __init__(self, info: dict):
        import XenAPI

        self.info = info
        self.context = ssl.create_default_context(cafile=info["ca_file"])
        transport = xmlrpc.client.SafeTransport(context=self.context)
        self.session = XenAPI.Session(info["xapi"], transport=transport)
        password = Path(info["password_file"]).read_text().strip()
        self.session.xenapi.login_with_password("root", password, "1.1", "xencbt-bench")
        x = self.session.xenapi
        disk = x.VDI.get_by_uuid(first_vdi(info))
        self.sr = x.SR.get_uuid(x.VDI.get_SR(disk))

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.session.xenapi.session.logout()

    def import_raw(self, path: Path, size: int) -> float:
        """Seconds to PUT ``path`` into a new VDI, until the host closes (all written)."""
        x = self.session.xenapi
        record = {
            "name_label": "bench import",
            "name_description": "",
            "SR": x.SR.get_by_uuid(self.sr),
            "virtual_size": str(size),
            "type": "user",
            "sharable": False,
            "read_only": False,
            "other_config": {},
            "xenstore_data": {},
            "sm_config": {},
            "tags": [],
        }
        vdi = x.VDI.create(record)
        try:
            return self._put(path, vdi, size)
        finally:
            x.VDI.destroy(vdi)

    def _put(self, path: Path, vdi: str, size: int) -> float:
        url = urllib.parse.urlsplit(self.info["xapi"])
        query = urllib.parse.urlencode(
            {"vdi": vdi, "format": "raw", "session_id": self.session._session}
        )
        t0 = time.monotonic()
        conn = http.client.HTTPSConnection(url.hostname, url.port, context=self.context)
        conn.putrequest("PUT", "/import_raw_vdi?" + query)
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        reply = http.client.HTTPResponse(conn.sock, method="PUT")
        reply.begin()
        if reply.status != 200:
            raise BenchError("PUT /import_raw_vdi: HTTP %d" % reply.status)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                conn.sock.sendall(chunk)
        reply.read()
        conn.close()
        return time.monotonic() - t0


def _median(values: list[float]) -> float:
    return statistics.median(values)
