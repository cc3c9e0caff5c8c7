"""Figure 5: memory and block status for a 2 TiB disk (a 4 MiB bitmap, 32 Mi blocks).

The upstream is ``nbdkit --tls=require null 2T``: the figure is about the bitmap, not data.
Bitmaps: all changed, none changed, and random bits (half the blocks, ~16 M runs: the
worst case for an extent list).  nbdinfo --map (C) walks block status over the whole
disk; then the plugin process's peak RSS (VmHWM) is read.
"""

from __future__ import annotations

import random

from xencbt_core.cbt import BLOCK_SIZE, bitmap_length

from .context import Context
from .figure import Figure
from .procs import Upstream, peak_rss, plugin_server, timed

SIZE = 2 << 40
RSS_TARGET = 100 << 20


def bitmaps(size: int) -> dict[str, bytes]:
    n = bitmap_length(size)
    return {
        "all changed": b"\xff" * n,
        "none changed": bytes(n),
        "random": random.Random(5).randbytes(n),
    }


def walk(ctx: Context, uri: str) -> float:
    """Seconds for nbdinfo (C) to map the whole disk: every block status request it takes."""
    return timed(["nbdinfo", "--map", "--totals", uri], ctx.log("nbdinfo"))


def runs(data: bytes, nblocks: int) -> int:
    """How many extents a bitmap makes: one more than its changes of bit value."""
    bits = int.from_bytes(data, "big") >> (len(data) * 8 - nblocks)
    return bin((bits ^ (bits >> 1)) & ((1 << (nblocks - 1)) - 1)).count("1") + 1


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
            rss, seconds, extents = [], [], runs(data, size // BLOCK_SIZE)
            for _ in range(1 if name == "random" else ctx.reps):
                with plugin_server(ctx.work, params) as (uri, proc):
                    seconds.append(walk(ctx, uri))
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
