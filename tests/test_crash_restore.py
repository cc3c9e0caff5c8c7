"""xencbt restore killed with SIGKILL, XENCBT_KILLS confirmed kills per window (issue #5, #18).

To a file: killed while ``PATH.partial`` is written (PATH itself never appears half
written; the product's XENCBT_TEST_PAUSE=restore-partial holds it open), or at a random
moment.  Into an existing VDI: killed while the VDI is partly rewritten (some of the
blocks that differed already hold the point's data, others not yet; XENCBT_TEST_PAUSE=
vdi-extent holds each extent open a little).  Each
kill is counted only when the run, stopped first, is confirmed inside its window
(crash_support.Kills).  Afterwards: verify passes, the repository is unchanged, no child
process lingers, and the same restore run again gives a byte-identical result.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from cli_support import BLOCK, Vm, content, xencbt
from crash_support import Aftermath, Inotify, Kills, kill_if, scribble, start
from tally import tally

pytestmark = pytest.mark.reliability


@pytest.fixture
def crash(xensim_factory, tmp_path):
    sim = xensim_factory(disk_sizes="4M,1M+512", in_use_wait=0.5)
    after = Aftermath(sim, tmp_path / "repo", Vm(sim), tmp_path)
    for _ in range(2):
        scribble(after.vm)
        after.backup()
    return after


def newest(after: Aftermath, disk: int) -> dict:
    rows = [r for r in after.check_repository() if r["vdi_uuid"] == after.vm.uuids[disk]]
    return rows[-1]


def baseline(crash: Aftermath, *args: str) -> float:
    """How long the run takes when nothing kills it (kills land uniformly within)."""
    t0 = time.monotonic()
    xencbt(crash.sim, *args)
    return time.monotonic() - t0


@pytest.mark.parametrize("window", ["partial", "anywhere"])
def test_restore_to_file_killed(crash: Aftermath, window: str, tmp_path):
    point = newest(crash, 0)
    out = tmp_path / "restored.raw"
    partial = out.with_name(out.name + ".partial")
    args = ("restore", "--repo", str(crash.repo), point["vdi_uuid"], "--to-file", str(out))
    duration = baseline(crash, *args, "--force")
    kills = Kills("restore to file " + window)
    for _ in kills:
        before = crash.tree()
        watch = Inotify(tmp_path)
        # The partial file lives for tens of milliseconds (convert, checksum, rename): held
        # open 0.3 s more before the rename; a stopped run cannot rename it at all.
        proc = start(crash.sim, *args, "--force", pause="restore-partial=0.3")
        if window == "partial":
            seen = watch.wait(lambda n: n == partial.name, proc)
            confirm = partial.exists if seen else None
        else:
            time.sleep(random.uniform(0, duration))
            confirm = lambda: True  # noqa: E731 (any moment is this window)
        watch.close()
        killed = kill_if(proc, confirm or (lambda: False))
        kills.count(killed)
        # PATH is absent or whole: never half-written.
        if out.exists():
            assert content(out.read_bytes()) == point["digest"]
        assert crash.tree() == before, "a restore changed the repository"
        crash.check_repository()
        xencbt(crash.sim, *args, "--force")
        assert out.read_bytes() == bytes(crash.vm.models[0])
        out.unlink()
        if killed:
            tally("kills survived")
    kills.done()


def spoil(raw: Path) -> list[int]:
    """Random bytes at the head of every 4th 64 KiB block of the target VDI (as the host
    stores it): the restore has that much to compare and rewrite.  Returns the offsets."""
    offsets = list(range(0, raw.stat().st_size, 4 * BLOCK))
    with open(raw, "r+b") as f:
        for offset in offsets:
            f.seek(offset)
            f.write(random.randbytes(4096))
    return offsets


def rewritten(raw: Path, offsets: list[int], model: bytes) -> int:
    """How many of the spoiled places hold the point's data again (the test's model)."""
    fd = os.open(raw, os.O_RDONLY)
    try:
        return sum(os.pread(fd, 4096, o) == model[o : o + 4096] for o in offsets)
    finally:
        os.close(fd)


def partly_rewritten(proc, raw: Path, offsets: list[int], model: bytes):
    """Wait for the first rewritten block, then a random moment of the writes; the
    confirmation: some spoiled places are rewritten, not all."""
    deadline = time.monotonic() + 60
    while not rewritten(raw, offsets, model):
        if proc.poll() is not None:
            return None
        assert time.monotonic() < deadline, "no block rewritten within 60 s"
        time.sleep(0.002)
    time.sleep(random.uniform(0, 0.3))
    return lambda: 0 < rewritten(raw, offsets, model) < len(offsets)


def test_restore_to_vdi_killed(crash: Aftermath):
    x = crash.vm.x
    point = newest(crash, 0)
    size = str(point["virtual_size"])
    model = bytes(crash.vm.models[0])  # the newest point is what the guest last wrote
    assert len(model) == point["virtual_size"]
    sr = x.VDI.get_SR(crash.vm.vdis[0])
    record = {
        "name_label": "scratch",
        "name_description": "",
        "SR": sr,
        "virtual_size": size,
        "type": "user",
        "sharable": False,
        "read_only": False,
        "other_config": {},
        "xenstore_data": {},
        "sm_config": {},
        "tags": [],
    }
    target = x.VDI.get_uuid(x.VDI.create(record))
    raw = crash.sim.state_dir / "vdis" / (target + ".raw")
    args = ("restore", "--repo", str(crash.repo), point["vdi_uuid"], "--to-vdi", target)
    kills = Kills("restore to VDI")
    for _ in kills:
        offsets = spoil(raw)
        before = crash.tree()
        # 16 extents to rewrite, each held 50 ms: a window of 0.8 s.
        proc = start(crash.sim, *args, pause="vdi-extent=0.05")
        confirm = partly_rewritten(proc, raw, offsets, model)
        killed = kill_if(proc, confirm or (lambda: False))
        kills.count(killed)
        assert crash.tree() == before, "a restore changed the repository"
        crash.check_repository()
        xencbt(crash.sim, *args)
        data = raw.read_bytes()
        data += bytes(point["virtual_size"] - len(data))
        assert data[: point["virtual_size"]] == model
        if killed:
            tally("kills survived")
    kills.done()
