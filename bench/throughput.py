"""Figures 1 and 2: a whole disk through the plugin vs straight from the TLS upstream.

Both paths read the same C server (``nbdkit --tls=require file``) in the same run, taking
turns (which goes first alternates) so a load spike from elsewhere hits both.
"""

from __future__ import annotations

import shlex

from xencbt_cli.jobs import snapshot_copy

from .context import Context
from .figure import Figure, at_least
from .procs import Upstream, children_cpu, cpu_seconds, plugin_server, timed


def full_read(ctx: Context) -> list[Figure]:
    """1: nbdcopy to null: through the plugin vs nbdcopy reading the upstream itself."""
    up = Upstream(ctx.work, ctx.certs, ["file", ctx.image])
    direct, plugin = [], []
    cpu = {"direct": [0.0, 0.0, 0.0], "plugin": [0.0, 0.0, 0.0]}  # client, plugin, upstream
    with up.running():
        params = ctx.plugin_params(up.nbd_info())
        with plugin_server(ctx.work, params) as (uri, proc):
            for rep in range(ctx.reps):
                runs = [("direct", up.uri), ("plugin", uri)]
                for name, source in runs[:: 1 if rep % 2 == 0 else -1]:
                    before = [children_cpu(), cpu_seconds(proc.pid), cpu_seconds(up.pid)]
                    seconds = timed(["nbdcopy", source, "null:"], ctx.log("nbdcopy"))
                    after = [children_cpu(), cpu_seconds(proc.pid), cpu_seconds(up.pid)]
                    cpu[name] = [c + a - b for c, a, b in zip(cpu[name], after, before)]
                    (direct if name == "direct" else plugin).append(seconds)
    ratios = [d / p for d, p in zip(direct, plugin)]
    mb = ctx.size / 1e6
    gib = ctx.size / (1 << 30) * ctx.reps
    per_gib = {k: [round(c / gib, 2) for c in v] for k, v in cpu.items()}
    return [
        Figure(
            "1 full read",
            "full read (nbdcopy → null:), plugin / direct",
            ratios,
            "x",
            ">= 0.85",
            at_least(ratios, 0.85),
            note="plugin %.0f MB/s, direct TLS %.0f MB/s (medians, %d MiB, connections=%d); "
            "CPU s/GiB: direct %.2f (nbdcopy %.2f + upstream %.2f), plugin path %.2f "
            "(nbdcopy %.2f + plugin %.2f + upstream %.2f)"
            % (
                mb / _median(plugin),
                mb / _median(direct),
                ctx.size >> 20,
                ctx.connections,
                sum(per_gib["direct"]),
                per_gib["direct"][0],
                per_gib["direct"][2],
                sum(per_gib["plugin"]),
                *per_gib["plugin"],
            ),
            extra={"direct_s": direct, "plugin_s": plugin, "cpu_s_per_gib": per_gib},
        )
    ]


def full_backup(ctx: Context) -> list[Figure]:
    """2: qemu-img convert to qcow2 through the plugin (captive nbdkit, as the orchestrator
    runs it) vs qemu-img convert with qemu's own TLS client, same CA, same options."""
    up = Upstream(ctx.work, ctx.certs, ["file", ctx.image])
    out = ctx.work / "full.qcow2"
    options = snapshot_copy.convert_options(None, ctx.connections)
    direct, plugin = [], []
    with up.running():
        params = ctx.plugin_params(up.nbd_info())
        run = shlex.join(["qemu-img", "convert", "-f", "raw", *options]) + ' "$uri" ' + str(out)
        for rep in range(ctx.reps):
            runs = [
                ("direct", ["qemu-img", "convert", *options, *up.qemu_source(), out]),
                ("plugin", ctx.captive(params, run)),
            ]
            for name, argv in runs[:: 1 if rep % 2 == 0 else -1]:
                out.unlink(missing_ok=True)
                seconds = timed(argv, ctx.log("convert"))
                (direct if name == "direct" else plugin).append(seconds)
    # The last copy through the plugin (or direct: same bytes) is figure 3's base.
    ctx.shared["full_image"] = out
    ctx.shared["full_seconds"] = plugin
    ratios = [d / p for d, p in zip(direct, plugin)]
    mb = ctx.size / 1e6
    return [
        Figure(
            "2 full backup",
            "full backup (qemu-img convert → qcow2), plugin / direct",
            ratios,
            "x",
            ">= 0.90",
            at_least(ratios, 0.90),
            note="plugin %.0f MB/s incl. nbdkit start-up, direct TLS %.0f MB/s (medians)"
            % (mb / _median(plugin), mb / _median(direct)),
            extra={"direct_s": direct, "plugin_s": plugin, "options": options},
        )
    ]


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)
