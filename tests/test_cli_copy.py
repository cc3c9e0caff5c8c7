"""xencbt copy --repo SRC --to DST through the real CLI against the simulator: the points
DST lacks, chains intact, DST's own compression, digests checked, and SIGKILL at random
moments then a re-run leaving DST complete and verifying.  Ground truth: the test's model
of what the guest wrote at each point."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest
from cli_support import (
    Vm,
    backups,
    manifests,
    same_as_model,
    same_vm_points,
    xencbt,
)
from crash_support import start, wait_gone
from qemu_images import compressed_clusters, corrupt_data_cluster
from tally import tally

pytestmark = pytest.mark.reliability


@pytest.fixture
def sim(xensim_factory):
    return xensim_factory(disk_sizes="1M,512K", in_use_wait=0.5)


def test_copy_what_dst_lacks_with_its_own_compression(sim, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    vm = Vm(sim)
    history: dict[str, list[bytes]] = {}
    backups(sim, src, vm, 3, history)
    xencbt(sim, "init", "--repo", str(dst), "--compression", "none")
    out = json.loads(xencbt(sim, "--json", "copy", "--repo", str(src), "--to", str(dst)).stdout)
    points = sorted(history)
    assert out["copied"] == {vdi: points for vdi in vm.uuids}
    assert out["vm_points"] == {vm.uuid: points}
    same_vm_points(src, dst, vm, points)
    for chain in manifests(dst, vm):
        assert [m["base_point"] for m in chain.values()] == [None, *points[:2]]
        for point, m in chain.items():
            assert m["compression"] == "none"
            image = dst / vm.uuid / m["vdi_uuid"] / (point + ".qcow2")
            assert compressed_clusters(image) == 0.0
            # The ratio is the image's here, not SRC's (zstd) one.
            assert m["bytes_on_disk"] == image.stat().st_blocks * 512
            assert m["ratio"] == round(m["changed_bytes"] / m["bytes_on_disk"], 2), m
    # SRC's points are zstd (its default): DST's own choice applied.
    assert {m["compression"] for c in manifests(src, vm) for m in c.values()} == {"zstd"}
    xencbt(sim, "verify", "--repo", str(dst))
    same_as_model(sim, dst, vm, history, tmp_path)

    # DST keeps its own retention; later copies add only newer points, onto DST's newest.
    xencbt(sim, "prune", "--repo", str(dst), "--keep", "1")
    r = xencbt(sim, "copy", "--repo", str(src), "--to", str(dst))
    assert "nothing to copy" in r.stderr
    backups(sim, src, vm, 1, history)
    out = json.loads(xencbt(sim, "--json", "copy", "--repo", str(src), "--to", str(dst)).stdout)
    newest = max(history)
    assert out["copied"] == {vdi: [newest] for vdi in vm.uuids}
    for chain in manifests(dst, vm):
        assert list(chain) == [points[-1], newest]
        assert chain[newest]["base_point"] == points[-1]
    xencbt(sim, "verify", "--repo", str(dst))
    same_as_model(sim, dst, vm, history, tmp_path)


def test_copy_of_a_damaged_point_keeps_nothing_of_it(sim, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    vm = Vm(sim)
    history: dict[str, list[bytes]] = {}
    xencbt(sim, "init", "--repo", str(src), "--compression", "none")
    backups(sim, src, vm, 2, history)
    newest = max(history)
    corrupt_data_cluster(src / vm.uuid / vm.uuids[0] / (newest + ".qcow2"))
    r = xencbt(sim, "copy", "--repo", str(src), "--to", str(dst), check=4)
    assert "point %s of VDI %s does not read back as recorded" % (newest, vm.uuids[0]) in r.stderr
    left = {p.name for p in (dst / vm.uuid / vm.uuids[0]).iterdir()}
    assert not any(name.startswith(newest) for name in left), left
    assert min(history) + ".json" in left  # the sound older point was copied


def test_copy_killed_at_random_moments_then_rerun_is_complete(sim, tmp_path):
    src, scratch, dst = tmp_path / "src", tmp_path / "scratch", tmp_path / "dst"
    vm = Vm(sim)
    history: dict[str, list[bytes]] = {}
    backups(sim, src, vm, 4, history)
    xencbt(sim, "copy", "--repo", str(src), "--to", str(scratch))
    # The time a copy of one new point per disk takes: the least each run below has to
    # do (a copy of these small disks takes well under a second, so a run left with
    # nothing new would end before any kill).
    backups(sim, src, vm, 1, history)
    t0 = time.monotonic()
    xencbt(sim, "copy", "--repo", str(src), "--to", str(scratch))
    duration = time.monotonic() - t0
    rng = random.Random(1515)
    killed = 0
    for _ in range(6):
        backups(sim, src, vm, 1, history)
        proc = start(sim, "copy", "--repo", str(src), "--to", str(dst))
        time.sleep(rng.uniform(0, duration))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
        proc.wait()
        # The children's guard ends everything xencbt started once xencbt is gone
        # (children.py); what is left is named, ended, and fails the test.
        left = wait_gone(proc.pid, time.monotonic() + 5.0)
        for entry in left:
            os.kill(int(entry.split()[0]), signal.SIGKILL)
        assert not left, "still running 5 s after the kill: %s" % left
    tally("kills survived", killed)
    assert killed >= 3
    xencbt(sim, "copy", "--repo", str(src), "--to", str(dst))
    r = xencbt(sim, "copy", "--repo", str(src), "--to", str(dst))
    assert "nothing to copy" in r.stderr
    assert [list(c) for c in manifests(dst, vm)] == [sorted(history)] * 2
    same_vm_points(src, dst, vm, sorted(history))
    assert not [p for p in dst.rglob("*") if p.name.endswith((".partial", ".tmp"))]
    xencbt(sim, "verify", "--repo", str(dst))
    same_as_model(sim, dst, vm, history, tmp_path)
