"""Figures 1 and 2: a whole disk through the plugin vs straight from the TLS upstream.

Both paths read the same C server (``nbdkit --tls=require file``) in the same run, taking
turns (which goes first alternates) so a load spike from elsewhere hits both.
"""

from __future__ import annotations

import contextlib
import shlex

from xencbt_cli.jobs import snapshot_copy

from .context import Context
from .figure import Figure, at_least
from .procs import Upstream, children_cpu, cpu_seconds, plugin_server, timed


def full_read(ctx: Context) -> list[Figure]:
    """1: nbdcopy to null: through the plugin vs nbdcopy reading the upstream itself; on 4
    connections (the default, with the target), 1 and 16; each side with that many."""
    return [_full_read_at(ctx, connections) for connections in (ctx.connections, 1, 16)]


def _full_read_at(ctx: Context, connections: int) -> Figure:
    up = Upstream(ctx.work, ctx.certs, ["file", ctx.image])
    seconds: dict[str, list[float]] = {"direct": [], "plugin": []}
    cpu = {name: [0.0, 0.0, 0.0] for name in seconds}  # client, plugin, upstream
    names = list(seconds)
    with up.running():
        info = up.nbd_info()
        for rep in range(ctx.reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                with _source(ctx, up, info, connections, name) as (source, pid):
                    pids = [pid, up.pid]
                    before = [children_cpu()] + [cpu_seconds(p) if p else 0.0 for p in pids]
                    argv = ["nbdcopy", "--connections=%d" % connections, source, "null:"]
                    seconds[name].append(timed(argv, ctx.log("nbdcopy")))
                    after = [children_cpu()] + [cpu_seconds(p) if p else 0.0 for p in pids]
                cpu[name] = [c + a - b for c, a, b in zip(cpu[name], after, before)]
    gib = ctx.size / (1 << 30) * ctx.reps
    per_gib = {k: [round(c / gib, 2) for c in v] for k, v in cpu.items()}
    return _read_figure(ctx, connections, seconds, per_gib)


@contextlib.contextmanager
def _source(ctx: Context, up: Upstream, info, connections: int, name: str):
    """(URI, plugin pid or None) to read from: the upstream itself, or the plugin over it
    (started for this run only, with ``connections``)."""
    if name == "direct":
        yield up.uri, None
        return
    with plugin_server(ctx.work, ctx.plugin_params(info, connections)) as (uri, proc):
        yield uri, proc.pid


def _read_figure(ctx, connections: int, seconds: dict, per_gib: dict) -> Figure:
    direct, plugin = seconds["direct"], seconds["plugin"]
    ratios = [d / p for d, p in zip(direct, plugin)]
    client = {k: v[0] + v[1] for k, v in per_gib.items()}  # the backup machine's share
    cpu_ratio = client["plugin"] / client["direct"] if client["direct"] else float("inf")
    judged = connections == ctx.connections
    mb = ctx.size / 1e6
    return Figure(
        "1 full read" if judged else "1 full read, %d connection(s)" % connections,
        "full read (nbdcopy → null:, %d conn), plugin / direct" % connections,
        ratios,
        "x",
        ">= 0.85" if judged else "",
        at_least(ratios, 0.85) if judged else None,
        note="plugin %.0f MB/s, direct TLS %.0f MB/s (medians, %d MiB); client CPU "
        "(nbdcopy + plugin) %.2f s/GiB = %.2f x direct's %.2f (target <= 1.3 x); "
        "upstream %.2f vs %.2f"
        % (
            mb / _median(plugin),
            mb / _median(direct),
            ctx.size >> 20,
            client["plugin"],
            cpu_ratio,
            client["direct"],
            per_gib["plugin"][2],
            per_gib["direct"][2],
        ),
        extra={
            "direct_s": direct,
            "plugin_s": plugin,
            "cpu_s_per_gib": per_gib,
            "client_cpu_ratio": cpu_ratio,
        },
    )


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
