"""xencbt init, repository settings and zstd compression, through the real CLI against
the simulator.  Ground truth: the test's model of what the guest wrote."""

from __future__ import annotations

import json
import re
import stat
import subprocess

import pytest
from cli_support import BLOCK, Vm, backup, rand, restored, sampled, served, xencbt
from qemu_images import compressed_clusters

# Guest data that compresses (text) next to data that does not (random).
TEXT = (b"xencbt compresses the clusters of its images with zstd. " * 5000)[: 4 * BLOCK]


@pytest.fixture
def sim(xensim_factory):
    return xensim_factory(disk_sizes="2M", in_use_wait=0.5)


def image_compression(path) -> str | None:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", "-f", "qcow2", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)["format-specific"]["data"].get("compression-type")


def the_disk(summary: dict) -> dict:
    (vm,) = summary["vms"]
    assert vm["ok"], vm
    (disk,) = vm["disks"]
    return disk


def test_init_writes_settings_once_and_list_shows_them(sim, tmp_path):
    repo = tmp_path / "repo"
    r = xencbt(sim, "init", "--repo", str(repo), "--compression", "none")
    assert "compression none" in r.stderr
    conf = repo / "repository.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    assert "compression = none" in conf.read_text()
    assert not list(repo.glob("*.tmp"))
    # A second init would change how existing points were written: refused, unchanged.
    r = xencbt(sim, "init", "--repo", str(repo), "--compression", "zstd", check=1)
    assert "already a repository" in r.stderr and "compression none" in r.stderr
    assert "compression = none" in conf.read_text()
    assert "compression none, encryption none" in xencbt(sim, "list", "--repo", str(repo)).stdout

    vm = Vm(sim)
    vm.write(0, {0: TEXT})
    disk = the_disk(backup(sim, repo, "demo-vm"))
    assert disk["compression"] == "none"
    point = repo / vm.uuid / vm.uuids[0] / (disk["point"] + ".qcow2")
    assert compressed_clusters(point) == 0.0


def test_implicit_repository_gets_zstd_and_says_so(sim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    vm.write(0, {0: TEXT, 8 * BLOCK: rand(2 * BLOCK)})
    r = xencbt(sim, "backup", "demo-vm", "--repo", str(repo))
    assert "has no settings yet: using the defaults (compression zstd" in r.stderr
    assert "compression = zstd" in (repo / "repository.conf").read_text()
    # The ratio is in the backup's own output too.
    assert re.search(r"zstd \d+\.\d:1", r.stdout), r.stdout
    # The second backup finds the settings: nothing said about them.
    vm.write(0, {16 * BLOCK: TEXT})
    summary = backup(sim, repo, "demo-vm")
    disk = the_disk(summary)
    assert disk["type"] == "incremental" and disk["compression"] == "zstd"

    chain = repo / vm.uuid / vm.uuids[0]
    full, incr = sorted(chain.glob("*.json"))
    for manifest in (full, incr):
        m = json.loads(manifest.read_text())
        assert m["compression"] == "zstd"
        assert m["ratio"] == round(m["changed_bytes"] / m["bytes_on_disk"], 2)
        image = chain / (m["point"] + ".qcow2")
        assert image_compression(image) == "zstd"
        assert compressed_clusters(image) > 0
    # The full's 2 MiB (text, zeros, 2 random blocks) take far less on disk; an
    # incremental this small is mostly qcow2 metadata (header, tables: ~4 clusters).
    m = json.loads(full.read_text())
    assert m["changed_bytes"] == len(vm.models[0]) and m["ratio"] > 2, m
    assert json.loads(incr.read_text())["changed_bytes"] == 4 * BLOCK
    listing = xencbt(sim, "list", "--repo", str(repo)).stdout
    assert "compression zstd, encryption none" in listing
    assert re.search(r"zstd %.1f:1" % m["ratio"], listing), listing

    # Everything reads the compressed images unchanged: restore of both points, verify.
    full_point = json.loads(full.read_text())["point"]
    assert restored(sim, repo, tmp_path, vm.uuids[0]) == vm.models[0]
    older = bytearray(vm.models[0])
    older[16 * BLOCK : 20 * BLOCK] = bytes(4 * BLOCK)
    assert restored(sim, repo, tmp_path, vm.uuids[0], full_point) == older
    xencbt(sim, "verify", "--repo", str(repo))

    # A prune merges the full into the incremental: the kept image stays compressed.
    xencbt(sim, "prune", "--repo", str(repo), "--keep", "1")
    (kept,) = chain.glob("*.qcow2")
    assert compressed_clusters(kept) > 0 and image_compression(kept) == "zstd"
    assert restored(sim, repo, tmp_path, vm.uuids[0]) == vm.models[0]
    xencbt(sim, "verify", "--repo", str(repo))


def test_zstd_takes_less_space_than_none_for_the_same_data(sim, tmp_path):
    vm = Vm(sim)
    vm.write(0, {0: TEXT, 4 * BLOCK: TEXT, 8 * BLOCK: TEXT})
    sizes = {}
    for compression in ("none", "zstd"):
        repo = tmp_path / compression
        xencbt(sim, "init", "--repo", str(repo), "--compression", compression)
        sizes[compression] = the_disk(backup(sim, repo, "demo-vm"))["bytes_on_disk"]
        assert restored(sim, repo, tmp_path, vm.uuids[0]) == vm.models[0]
    assert sizes["zstd"] * 3 < sizes["none"], sizes


def test_zstd_incremental_of_a_grown_disk_reads_the_cut_cluster_whole(xensim_factory, tmp_path):
    """qemu-img convert -c writes whole clusters: the cluster that the old, unaligned end
    of a grown disk cuts is read whole, one block more than the changed one."""
    sim = xensim_factory(disk_sizes="1M+512", in_use_wait=0.5)
    repo = tmp_path / "repo"
    vm = Vm(sim)
    size = len(vm.models[0])
    vm.write(0, {0: rand(BLOCK), (size // BLOCK) * BLOCK: rand(size % BLOCK)})
    backup(sim, repo, "demo-vm")
    vm.resize(0, size + 8 * BLOCK)
    vm.write(0, {(size // BLOCK + 3) * BLOCK: rand(BLOCK)})
    sim.control.reset_counters()
    disk = the_disk(backup(sim, repo, "demo-vm"))
    assert disk["type"] == "incremental" and disk["compression"] == "zstd"
    assert served(sim) == 2 * BLOCK + sampled([disk])  # and the CBT canary's sample
    assert restored(sim, repo, tmp_path, vm.uuids[0]) == vm.models[0]


def host_reads(sim) -> int:
    return sum(c["reads"] for c in sim.control.counters().values())


def test_zstd_backups_read_the_host_in_2_mib_requests_and_no_more(xensim_factory, tmp_path):
    """qemu-img convert -c asks one 64 KiB cluster per request; the plugin (readahead=)
    still asks the host for 2 MiB at a time, and only for changed blocks."""
    sim = xensim_factory(disk_sizes="24M", in_use_wait=0.5)
    repo = tmp_path / "repo"
    vm = Vm(sim)
    size = len(vm.models[0])
    vm.write(0, {0: TEXT, 20 << 20: rand(3 * BLOCK)})
    sim.control.reset_counters()
    disk = the_disk(backup(sim, repo, "demo-vm"))
    assert disk["type"] == "full" and disk["compression"] == "zstd"
    # The whole disk, once, in windows of 2 MiB: 12 (without readahead: 384 clusters).
    assert served(sim) == size
    assert host_reads(sim) == size // (2 << 20), sim.control.counters()
    # An incremental: a run of 40 changed blocks (blocks 30-69: its part in each of the
    # 2 MiB windows it touches, 3) and two lone blocks: the host serves exactly the
    # changed bytes, in 5 requests (without readahead: 42), and the CBT canary's sample of
    # unchanged blocks, one request each (never read ahead: no client reads past them).
    run = 30 * BLOCK
    vm.write(0, {run: rand(40 * BLOCK), 200 * BLOCK: rand(BLOCK), 300 * BLOCK: TEXT[:BLOCK]})
    sim.control.reset_counters()
    disk = the_disk(backup(sim, repo, "demo-vm"))
    assert disk["type"] == "incremental" and disk["changed_bytes"] == 42 * BLOCK
    assert served(sim) == 42 * BLOCK + sampled([disk])
    assert host_reads(sim) == 5 + disk["canary"]["blocks"], sim.control.counters()
    assert restored(sim, repo, tmp_path, vm.uuids[0]) == vm.models[0]
