"""The CBT canary (#27): every incremental checks a random sample of the blocks CBT calls
unchanged against the snapshot; a tracker that lies (``xensim guest-disk --untracked``)
is caught, the disk is backed up in full in the same run, the run exits 10.

Determinism: disk 0 has 128 blocks; 4 are written honestly and 40 of the other 124
untracked, so the 64 sampled among the 124 unchanged miss all 40 with probability
C(84, 64) / C(124, 64) < 1e-17.  The encrypted case samples every unchanged block (32 of
them, fewer than 64): it cannot miss."""

from __future__ import annotations

import json
import random
import re

import nbd
import pytest
from cbt_strategies import disks as cbt_disks
from cli_support import BLOCK, Vm, backup, rand, restored, served, sha, xencbt
from encrypt_support import assert_marker_nowhere, init_encrypted, make_key, marked
from hypothesis import given
from hypothesis import strategies as st
from qemu_images import corrupt_data_cluster
from xencbt_cli.jobs import canary
from xencbt_core.cbt import Bitmap, encode

REASON = re.compile(
    r"the CBT canary found (\d+) of (\d+) sampled unchanged blocks differ from the previous "
    r"point \(CBT missed changes\)$"
)


@pytest.fixture
def sim(xensim_factory):
    return xensim_factory(disk_sizes="8M,1M+512", in_use_wait=0.5)


def write_untracked(sim, vm: Vm, disk: int, changes: dict[int, bytes]) -> None:
    """Guest writes the VDI's CBT log does not record (the fault), kept in the model."""
    with sim.guest_disk(vm.uuids[disk], "--untracked") as uri:
        h = nbd.NBD()
        h.connect_uri(uri)
        for offset, data in changes.items():
            h.pwrite(data, offset)
            vm.models[disk][offset : offset + len(data)] = data
        h.flush()
        h.shutdown()


def live_sha(sim, vm: Vm, disk: int) -> str:
    """sha256 of the live VDI as its guest reads it now."""
    with sim.guest_disk(vm.uuids[disk]) as uri:
        h = nbd.NBD()
        h.connect_uri(uri)
        data = h.pread(h.get_size(), 0)
        h.shutdown()
    return sha(data)


def disks(summary: dict) -> list[dict]:
    (vm,) = summary["vms"]
    assert vm["ok"], vm
    return sorted(vm["disks"], key=lambda d: d["userdevice"])


def test_untracked_writes_are_caught_and_a_full_taken_in_the_same_run(sim, tmp_path):
    repo = tmp_path / "repo"
    xencbt(sim, "init", "--repo", str(repo), "--compression", "none")
    vm = Vm(sim)
    backup(sim, repo, "demo-vm")
    vm.write(0, {0: rand(4 * BLOCK)})
    vm.write(1, {0: rand(BLOCK)})
    lied = random.sample(range(4, 128), 40)
    write_untracked(sim, vm, 0, {b * BLOCK: rand(BLOCK) for b in lied})

    r = xencbt(sim, "--json", "backup", "demo-vm", "--repo", str(repo), check=10)
    summary = json.loads(r.stdout)
    assert summary["cbt_missed_changes"] is True and summary["vms"][0]["cbt_missed_changes"]
    d0, d1 = disks(summary)
    assert d0["type"] == "full" and d0["base_point"] is None
    found = REASON.match(d0["reason"])
    assert found and int(found[1]) > 0 and int(found[2]) == 64, d0["reason"]
    assert d0["canary"]["result"] == "failed" and d0["canary"]["differed"] == int(found[1])
    assert d0["canary"]["unchanged_blocks"] == 124 and isinstance(d0["canary"]["seed"], int)
    # The honest disk of the same VM stays incremental: its 16 unchanged blocks all match.
    assert d1["type"] == "incremental"
    assert d1["canary"]["result"] == "passed" and d1["canary"]["blocks"] == 16
    (warning,) = summary["vms"][0]["warnings"]
    assert "disk 0: the CBT canary found" in warning
    assert "CBT MISSED CHANGES" in r.stderr
    point = summary["vms"][0]["point"]
    manifest = json.loads((repo / vm.uuid / vm.uuids[0] / (point + ".json")).read_text())
    assert manifest["type"] == "full" and manifest["reason"] == d0["reason"]
    assert manifest["canary"] == d0["canary"]
    # The newest point is the guest's disk, byte for byte, as the live VDI reads.
    for disk, uuid in enumerate(vm.uuids):
        got = sha(restored(sim, repo, tmp_path, uuid))
        assert got == sha(vm.models[disk]) == live_sha(sim, vm, disk)
    v = xencbt(sim, "verify", "--repo", str(repo)).stdout
    assert "point %s  CBT CANARY FAILED: %s of 64" % (point, found[1]) in v

    # The CBT log goes on from the full's snapshot: honest again, incremental again.
    vm.write(0, {8 * BLOCK: rand(BLOCK)})
    (after, _) = disks(backup(sim, repo, "demo-vm"))
    assert after["type"] == "incremental" and after["canary"]["result"] == "passed"
    # The text report says it on the disk's own line, and the exit code is 10 again.
    write_untracked(sim, vm, 0, {b * BLOCK: rand(BLOCK) for b in range(0, 128, 2)})
    r = xencbt(sim, "backup", "demo-vm", "--repo", str(repo), check=10)
    assert re.search(r"demo-vm +disk 0 +CBT CANARY FAILED: \d+ of 64 sampled", r.stdout)
    assert sha(restored(sim, repo, tmp_path, vm.uuids[0])) == live_sha(sim, vm, 0)


def test_honest_cbt_passes_silently_and_zero_blocks_turns_it_off(sim, tmp_path):
    repo = tmp_path / "repo"
    xencbt(sim, "init", "--repo", str(repo), "--compression", "none")
    vm = Vm(sim)
    backup(sim, repo, "demo-vm")
    vm.write(0, {0: rand(3 * BLOCK), 50 * BLOCK: rand(BLOCK)})
    vm.write(1, {16 * BLOCK: rand(512)})  # the short last block
    sim.control.reset_counters()
    r = xencbt(sim, "--json", "backup", "demo-vm", "--repo", str(repo))
    summary = json.loads(r.stdout)
    assert summary["cbt_missed_changes"] is False and summary["vms"][0]["warnings"] == []
    assert "CANARY" not in r.stderr.upper() and "MISSED" not in r.stderr
    d0, d1 = disks(summary)
    assert [d0["type"], d1["type"]] == ["incremental", "incremental"]
    assert d0["canary"]["result"] == "passed" and d0["canary"]["differed"] == 0
    assert d0["canary"]["blocks"] == 64 and d0["canary"]["unchanged_blocks"] == 124
    assert d1["canary"]["blocks"] == 16  # every unchanged block of the 1 MiB disk
    assert isinstance(d0["canary"]["seed"], int) and d0["canary"]["seed"] != d1["canary"]["seed"]
    # The sample was read from the snapshot: the changed bytes and the sampled blocks.
    assert served(sim) == 4 * BLOCK + 512 + (64 + 16) * BLOCK
    point = summary["vms"][0]["point"]
    v = xencbt(sim, "verify", "--repo", str(repo)).stdout
    assert "point %s  canary passed: 64 sampled unchanged blocks match" % point in v

    vm.write(0, {9 * BLOCK: rand(BLOCK)})
    sim.control.reset_counters()
    (off, _) = disks(backup(sim, repo, "demo-vm", "--canary-blocks", "0"))
    assert off["type"] == "incremental" and off["canary"] == {"result": "off"}
    assert served(sim) == BLOCK  # nothing sampled
    v = xencbt(sim, "verify", "--repo", str(repo)).stdout
    assert "point %s  canary off (--canary-blocks 0)" % off["point"] in v
    assert xencbt(sim, "backup", "demo-vm", "--repo", str(repo), "--canary-blocks", "-1", check=2)


def test_rot_in_the_previous_point_is_named_as_such_not_blamed_on_cbt(sim, tmp_path):
    """A block that differs because the repository's copy rotted is no CBT bug: the
    previous point's checksums say so; a full is taken all the same, exit 0."""
    repo = tmp_path / "repo"
    xencbt(sim, "init", "--repo", str(repo), "--compression", "none")
    vm = Vm(sim)
    vm.write(1, {3 * BLOCK: rand(BLOCK)})
    (_, full) = disks(backup(sim, repo, "demo-vm"))
    corrupt_data_cluster(repo / vm.uuid / vm.uuids[1] / (full["point"] + ".qcow2"))
    vm.write(1, {0: rand(BLOCK)})
    # Disk 1: 17 blocks, the first changed: its 16 others are all sampled.
    summary = backup(sim, repo, "demo-vm")
    assert summary["cbt_missed_changes"] is False and summary["vms"][0]["warnings"] == []
    (_, d) = disks(summary)
    assert d["type"] == "full" and d["canary"]["result"] == "damaged"
    assert "no longer matches its own checksums there (bytes 0-262143 " in d["reason"]
    assert "its image is damaged, not CBT; run xencbt verify" in d["reason"]
    assert restored(sim, repo, tmp_path, vm.uuids[1]) == bytes(vm.models[1])


def test_encrypted_repository_catches_every_missed_block(xensim_factory, tmp_path, monkeypatch):
    sim = xensim_factory(disk_sizes="2M+512", in_use_wait=0.5)
    key = make_key(tmp_path / "repo.key")
    repo = tmp_path / "repo"
    init_encrypted(sim, repo, key)
    monkeypatch.setenv("XENCBT_KEY_FILE", str(key))
    vm = Vm(sim)
    backup(sim, repo, "demo-vm")
    vm.write(0, {0: marked(BLOCK)})
    write_untracked(sim, vm, 0, {b * BLOCK: marked(BLOCK) for b in (3, 17, 31)})
    r = xencbt(sim, "--json", "backup", "demo-vm", "--repo", str(repo), check=10)
    (d,) = disks(json.loads(r.stdout))
    # 33 blocks, the last short and unchanged (the size did not change): 32 candidates,
    # every one sampled.
    assert d["type"] == "full" and d["canary"]["blocks"] == 32
    assert d["canary"]["differed"] == 3
    assert restored(sim, repo, tmp_path, vm.uuids[0]) == bytes(vm.models[0])
    xencbt(sim, "verify", "--repo", str(repo))
    assert_marker_nowhere(repo)


def test_the_sample_is_uniform_among_whole_old_unchanged_blocks():
    size = 10 * BLOCK + 100
    bitmap = Bitmap.from_base64(encode([0, 1, 5], size), size)
    same = canary.choose(bitmap, size, size, 64, seed=7)
    blocks = sorted(o // BLOCK for o, _ in same.ranges)
    assert blocks == [2, 3, 4, 6, 7, 8, 9, 10] and same.unchanged == 8
    assert same.ranges[-1] == (10 * BLOCK, 100)  # the short last block, its length
    # Grown: the old partial last block and all past the old end have no previous content.
    grown = 20 * BLOCK
    bitmap = Bitmap.from_base64(encode([0, 1, 5], grown), grown)
    sample = canary.choose(bitmap, size, grown, 64, seed=7)
    assert sorted(o // BLOCK for o, _ in sample.ranges) == [2, 3, 4, 6, 7, 8, 9]
    # The seed replays the sample; a smaller n draws a subset of the candidates.
    assert canary.choose(bitmap, size, grown, 3, seed=11) == canary.choose(
        bitmap, size, grown, 3, seed=11
    )
    big = 4096 * BLOCK
    bitmap = Bitmap.from_base64(encode(list(range(0, 4096, 3)), big), big)
    counts = [0, 0]
    for seed in range(200):
        for offset, _ in canary.choose(bitmap, big, big, 64, seed=seed).ranges:
            assert (offset // BLOCK) % 3 != 0
            counts[offset < big // 2] += 1
    assert abs(counts[0] - counts[1]) < 0.1 * sum(counts)


@given(cbt_disks(), st.integers(min_value=0, max_value=40), st.integers(min_value=0), st.booleans())
def test_the_sample_holds_only_old_unchanged_blocks(disk, n, seed, grows):
    size, changed = disk
    new = size + 3 * BLOCK + 100 if grows else size
    bitmap = Bitmap.from_base64(encode(sorted(changed), new), new)
    sample = canary.choose(bitmap, size, new, n, seed)
    whole = size // BLOCK if grows else -(-size // BLOCK)
    candidates = [b for b in range(whole) if b not in changed]
    assert sample.unchanged == len(candidates)
    blocks = [o // BLOCK for o, _ in sample.ranges]
    assert len(blocks) == len(set(blocks)) == min(n, len(candidates))
    assert set(blocks) <= set(candidates)
    for offset, length in sample.ranges:
        assert offset % BLOCK == 0 and length == min(BLOCK, new - offset) and length > 0
        assert offset + length <= size  # each compared range had previous content
    assert canary.choose(bitmap, size, new, n, seed) == sample  # the seed replays it


@pytest.mark.parametrize(
    "copy, sample, ok",
    [("true", "true", True), ("false", "true", False), ("true", "false", False)],
)
def test_the_sample_read_beside_the_copy_fails_if_either_fails(tmp_path, copy, sample, ok):
    """The copy's nbdkit runs the disk's qemu-img and the sample's read side by side
    (snapshot_copy.beside): the disk's step fails if either does, and waits for both."""
    import subprocess

    from xencbt_cli.jobs.snapshot_copy import beside

    done, started = tmp_path / "copy-done", tmp_path / "sample-started"
    # The copy ends only after the sample has started: the step must wait for it.
    slow_copy = "until [ -e %s ]; do sleep 0.01; done; touch %s && %s" % (started, done, copy)
    script = beside(slow_copy, "touch %s && %s" % (started, sample)) + " && echo next"
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert (r.returncode == 0) == ok and (r.stdout == "next\n") == ok
    assert done.exists()  # the copy's end was waited for, whichever failed


def sampled_by_nbdkit(ranges, plugin=("pattern", "1M")):
    """nbdkit serving ``plugin`` runs the canary's read of ``ranges`` as the copy's
    script does, answered by a Sampler of this process; (exit code, stderr, digests)."""
    import subprocess

    from xencbt_cli.proc.sampler import Sampler, SampleRead

    reading = SampleRead(ranges)
    with Sampler() as sampler:
        script = sampler.ask("", reading)
        with sampler.serving() as fds:  # returns only once the thread has ended
            r = subprocess.run(
                ["nbdkit", "-U", "-", *plugin, "--run", script],
                capture_output=True,
                text=True,
                pass_fds=fds,
                timeout=60,
            )
    return r.returncode, r.stderr, reading.sums


def test_the_sampler_thread_reads_the_sample_through_the_copys_nbdkit():
    """The digests come from the export the script names: nbdkit's pattern plugin holds
    each 8-byte offset big-endian, so every range's content is known."""
    import hashlib

    ranges = [(0, BLOCK), (5 * BLOCK, BLOCK), (15 * BLOCK + 512, 1000)]
    code, err, sums = sampled_by_nbdkit(ranges)
    assert code == 0, err

    def pattern(offset, length):
        first = offset - offset % 8
        data = b"".join(o.to_bytes(8, "big") for o in range(first, offset + length + 8, 8))
        return data[offset - first : offset - first + length]

    want = [hashlib.sha256(pattern(o, n)).hexdigest() for o, n in ranges]
    assert sums == want


def test_a_failed_sample_read_fails_the_step_and_says_why():
    code, err, sums = sampled_by_nbdkit([(0, BLOCK), (2 << 20, BLOCK)])
    assert code != 0 and sums is None
    assert "the CBT canary's read of the snapshot failed:" in err, err


def test_the_sampler_ends_when_nbdkit_never_runs_the_script():
    """nbdkit refusing its parameters never asks: serving() still returns (EOF)."""
    code, err, sums = sampled_by_nbdkit([(0, BLOCK)], ("pattern", "size=nonsense"))
    assert code != 0 and sums is None
