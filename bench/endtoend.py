"""Figure 6: ``xencbt backup`` start to finish on the simulator, full then incremental.

The disk is filled with dense data through the guest-write path first.  Each backup's
wall time splits into the copy (qemu-img through the plugin: MB/s), the content digest
(chunked sha256: the whole image for a full, only changed chunks for an incremental;
with publishing and the manifest), and fixed overhead (login, VM.snapshot, list_changed_blocks,
snapshot destroy, data_destroy).  The simulator serves NBD from Python, so its own speed
bounds the copy here; figures 1–2 measure the data path against a C server.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

from .context import Context
from .figure import Figure
from .procs import BenchError, timed

BLOCK = 64 * 1024
CHANGED = 0.01  # of the blocks, for the incremental


@contextlib.contextmanager
def simulator(state: Path, disk_sizes: int | str, *options: str):
    argv = [sys.executable, "-m", "xensim.main", "serve", "--state-dir", str(state)]
    argv += ["--disk-sizes", str(disk_sizes), "--in-use-wait", "0.5", *options]
    log = open(state.parent / "xensim.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            raise BenchError("xensim serve failed; see %s" % log.name)
        yield json.loads(line)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


@contextlib.contextmanager
def guest_disk(info: dict, vdi: str):
    argv = [sys.executable, "-m", "xensim.main", "guest-disk", "--state-dir", info["state_dir"]]
    with open(Path(info["state_dir"]).parent / "guest-disk.log", "ab") as log:
        proc = subprocess.Popen([*argv, vdi], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def first_vdi(info: dict) -> str:
    import ssl

    import XenAPI

    context = ssl.create_default_context(cafile=info["ca_file"])
    session = XenAPI.Session(info["xapi"], transport=xmlrpc.client.SafeTransport(context=context))
    password = Path(info["password_file"]).read_text().strip()
    session.xenapi.login_with_password("root", password, "1.1", "xencbt-bench")
    try:
        x = session.xenapi
        vm = x.VM.get_by_name_label("demo-vm")[0]
        vbds = [x.VBD.get_record(v) for v in x.VM.get_VBDs(vm)]
        first = min(vbds, key=lambda v: int(v["userdevice"]))
        return x.VDI.get_uuid(first["VDI"])
    finally:
        session.xenapi.session.logout()


def fill(ctx: Context, info: dict, vdi: str, size: int) -> None:
    source = "driver=raw,offset=0,size=%d,file.driver=file,file.filename=%s" % (size, ctx.image)
    with guest_disk(info, vdi) as uri:
        argv = ["qemu-img", "convert", "-n", "--image-opts", source, "-O", "raw", uri]
        timed(argv, ctx.log("fill"))


def change(info: dict, vdi: str, size: int, seed: int) -> int:
    import nbd

    rng = random.Random(seed)
    blocks = rng.sample(range(size // BLOCK), max(1, int(size // BLOCK * CHANGED)))
    with guest_disk(info, vdi) as uri:
        h = nbd.NBD()
        h.connect_uri(uri)
        for b in blocks:
            h.pwrite(rng.randbytes(BLOCK), b * BLOCK)
        h.flush()
        h.shutdown()
    return len(blocks) * BLOCK


def backup(ctx: Context, info: dict, repo: Path, *args: str) -> tuple[float, dict]:
    env = dict(os.environ, XENCBT_XAPI=info["xapi"], XENCBT_PASSWORD_FILE=info["password_file"])
    env["HOME"] = str(repo.parent)
    out, calls = ctx.work / "backup.json", ctx.work / "xapi-calls.json"
    # The command as a user runs it, with each XAPI call timed (bench/xapitimer.py).
    argv = [sys.executable, "-m", "bench.xapitimer", calls, "--xapi-cafile", info["ca_file"]]
    argv += ["--json", "backup", "demo-vm", "--repo", str(repo), *args]
    t0 = time.monotonic()
    with open(out, "w") as f, open(ctx.log("xencbt"), "a") as err:
        code = subprocess.call(argv, env=env, stdout=f, stderr=err)
    wall = time.monotonic() - t0
    if code:
        raise BenchError("xencbt backup failed (exit %d); see %s" % (code, ctx.log("xencbt")))
    disks = json.loads(out.read_text())["vms"][0]["disks"]
    return wall, dict(disks[0], xapi_calls=json.loads(calls.read_text()))


def backups(ctx: Context) -> list[Figure]:
    size = (128 if ctx.quick else 1024) << 20
    size = min(size, ctx.size)
    state, repo = ctx.work / "sim", ctx.work / "repo"
    runs: dict[str, list[dict]] = {"full": [], "incremental": []}
    with simulator(state, size) as info:
        vdi = first_vdi(info)
        fill(ctx, info, vdi, size)
        for rep in range(ctx.reps):
            wall, disk = backup(ctx, info, repo, "--full")
            runs["full"].append(_split(wall, disk, size))
            changed = change(info, vdi, size, seed=rep)
            wall, disk = backup(ctx, info, repo)
            runs["incremental"].append(_split(wall, disk, changed))
    figs = []
    for kind, rows in runs.items():
        figs += [
            Figure(
                "6 end-to-end",
                "xencbt backup %s (%d MiB changed of %d): copy MB/s"
                % (kind, rows[0]["bytes"] >> 20, size >> 20),
                [r["mb_per_s"] for r in rows],
                "MB/s",
                note="wall %.2f s = copy %.2f + digest %.2f + fixed %.2f"
                % tuple(_med(rows, k) for k in ("wall", "copy", "digest", "fixed")),
                extra={"runs": rows},
            ),
            Figure(
                "6 end-to-end",
                "xencbt backup %s: fixed overhead (login, snapshot, destroy)" % kind,
                [r["fixed"] for r in rows],
                "s",
                note=_per_call(rows),
                extra={"xapi_calls": [r["xapi"] for r in rows]},
            ),
            Figure(
                "6 end-to-end",
                "xencbt backup %s: content digest after the copy (chunked sha256)" % kind,
                [r["digest"] for r in rows],
                "s",
                note="%.0f %% of the backup's wall time"
                % (100 * _med(rows, "digest") / _med(rows, "wall")),
            ),
        ]
    return figs


def _split(wall: float, disk: dict, nbytes: int) -> dict:
    copy = disk["copy_seconds"]
    after_copy = disk["seconds"] - copy  # checksum, publish, manifest
    return {
        "wall": wall,
        "copy": copy,
        "digest": after_copy,
        "fixed": wall - disk["seconds"],
        "bytes": nbytes,
        "mb_per_s": nbytes / copy / 1e6,
        "xapi": disk.get("xapi_calls", {}),
    }


def _per_call(rows: list[dict]) -> str:
    """The command's XAPI calls by median time, some of them (the plugin's session, the
    waits for dom0) overlapping the copy; the rest of the fixed overhead is process
    start-up, nbdkit's, and the repository's own work."""
    import statistics

    methods = {m for r in rows for m in r["xapi"]}
    med = {m: statistics.median(r["xapi"].get(m, [0, 0.0])[1] for r in rows) for m in methods}
    calls = {m: statistics.median(r["xapi"].get(m, [0, 0.0])[0] for r in rows) for m in methods}
    top = sorted(med, key=med.get, reverse=True)
    parts = ["%s %.2f s (%dx)" % (m, med[m], calls[m]) for m in top[:8]]
    rest = top[8:]
    return "XAPI calls of the whole run %.2f s (%d calls): %s%s" % (
        sum(med.values()),
        sum(calls.values()),
        ", ".join(parts),
        ", %d other methods %.2f s" % (len(rest), sum(med[m] for m in rest)) if rest else "",
    )


def _med(rows: list[dict], key: str) -> float:
    import statistics

    return statistics.median(r[key] for r in rows)
