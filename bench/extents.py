"""Figure 5: memory and block status for a 2 TiB disk (a 4 MiB bitmap, 32 Mi blocks).

The upstream is ``nbdkit --tls=require null 2T``: the figure is about the bitmap, not data.
Bitmaps: all changed, none changed, and random bits (half the blocks, ~16 M runs: the
worst case for an extent list).  A libnbd client walks block status over the whole disk;
then the plugin process's peak RSS (VmHWM) is read.
"""

from __future__ import annotations

import random
import time

import nbd
from xencbt_cli import copier
from xencbt_core.cbt import bitmap_length

from .context import Context
from .figure import Figure
from .procs import Upstream, peak_rss, plugin_server

SIZE = 2 << 40
RSS_TARGET = 100 << 20


def bitmaps(size: int) -> dict[str, bytes]:
    n = bitmap_length(size)
    return {
        "all changed": b"\xff" * n,
        "none changed": bytes(n),
        "random": random.Random(5).randbytes(n),
    }


def walk(uri: str, size: int) -> tuple[int, float]:
    """(extents, seconds) for block status over [0, size), as many requests as it takes."""
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    count = 0
    offset = 0
    t0 = time.monotonic()
    got: list[int] = []

    def answer(meta: str, at: int, entries: list[int], err) -> int:
        got.append(sum(entries[0::2]))
        got.append(len(entries) // 2)
        return 0

    while offset < size:
        h.block_status(min(size - offset, 1 << 31), offset, answer)
        covered, n = got[-2], got[-1]
        if covered <= 0:
            raise RuntimeError("block status made no progress at %d" % offset)
        offset += covered
        count += n
    seconds = time.monotonic() - t0
    h.shutdown()
    return count, seconds


def memory_and_extents(ctx: Context) -> list[Figure]:
    import base64

    size = SIZE if not ctx.quick else SIZE // 16
    up = Upstream(ctx.work, ctx.certs, ["null", "size=%d" % size])
    figs = []
    with up.running():
        info = up.nbd_info()
        for name, data in bitmaps(size).items():
            path = ctx.work / "changed-2t.b64"
            path.write_bytes(base64.b64encode(data))
            params = [*ctx.plugin_params(info), "changed=+%s" % path]
            rss, seconds, extents = [], [], 0
            for _ in range(1 if name == "random" else ctx.reps):
                with plugin_server(ctx.work, params, copier.NBDKIT_OPTIONS) as (uri, proc):
                    extents, t = walk(uri, size)
                    seconds.append(t)
                    rss.append(peak_rss(proc.pid) / (1 << 20))
            figs.append(
                Figure(
                    "5 memory",
                    "%d GiB disk, %s: plugin peak RSS" % (size >> 30, name),
                    rss,
                    "MiB",
                    "<= 100 MiB",
                    max(rss) <= RSS_TARGET >> 20,
                    extra={"extents": extents},
                )
            )
            figs.append(
                Figure(
                    "5 extents",
                    "%d GiB disk, %s: block status over the whole disk" % (size >> 30, name),
                    seconds,
                    "s",
                    note="%d extents" % extents,
                )
            )
    return figs
