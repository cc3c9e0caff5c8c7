"""Figure 4: latency tolerance.  Each upstream read waits 5 or 20 ms (nbdkit's delay
filter on the TLS upstream, like a host whose storage answers slowly); more upstream
connections should win most of the throughput back.

The reference is the plugin without delay with as many connections, same run, same
region; the client is nbdcopy with 2 MiB requests (what qemu-img convert asks for a dense
disk).
"""

from __future__ import annotations

import statistics

from .context import Context
from .figure import Figure
from .procs import Upstream, plugin_server, timed

DELAYS_MS = (5, 20)
CONNECTIONS = (1, 4, 8, 16)
TARGET = 0.75  # at 16 connections, of the throughput without delay


def tolerance(ctx: Context) -> list[Figure]:
    region = min(ctx.size, (64 if ctx.quick else 256) << 20)
    client = ["nbdcopy", "--request-size=%d" % (2 << 20)]
    results: dict[tuple[int, int], list[float]] = {}
    for delay in (0, *DELAYS_MS):
        filters = ["delay", "offset"] if delay else ["offset"]
        plugin = ["file", ctx.image, "range=%d" % region]
        if delay:
            plugin.append("rdelay=%dms" % delay)
        up = Upstream(ctx.work, ctx.certs, plugin, filters)
        with up.running():
            info = up.nbd_info()
            for n in CONNECTIONS:
                params = ctx.plugin_params(info, n)
                with plugin_server(ctx.work, params) as (uri, _):
                    for _ in range(ctx.reps):
                        seconds = timed([*client, uri, "null:"], ctx.log("latency"))
                        results.setdefault((delay, n), []).append(region / seconds / 1e6)
    figs = []
    for delay in DELAYS_MS:
        for n in CONNECTIONS:
            rates, base = results[delay, n], statistics.median(results[0, n])
            fig = Figure(
                "4 latency",
                "%d ms per read, connections=%d: MB/s / no-delay" % (delay, n),
                [r / base for r in rates],
                "x",
                note="%.0f MB/s; no delay %.0f MB/s (%d MiB region)"
                % (statistics.median(rates), base, region >> 20),
                extra={"mb_per_s": rates, "no_delay_mb_per_s": results[0, n]},
            )
            if n == 16:
                fig.target = ">= %.2f" % TARGET
                fig.passed = fig.median >= TARGET
            figs.append(fig)
    return figs
