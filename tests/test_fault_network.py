"""Network faults on the host's NBD server, through the real `xencbt backup` (nbdkit, the
plugin, qemu-img): dropped connections, slow reads, refusals (NBD just enabled on a network,
the host at its 16-connection limit).  Pass: byte-identical restores within a bounded
number of reconnections, or, when retries run out, one clear line and nothing half-done."""

from __future__ import annotations

import pytest
from cli_support import BLOCK, Vm, rand, restored_sha, sha
from crash_support import gate, reads_at_gate
from faultkit import assert_clear_error, counters, partials, run, running, slots_taken, wait_until
from tally import tally

pytestmark = pytest.mark.reliability

MiB = 1024 * 1024


@pytest.fixture
def sim(xensim_factory):
    return xensim_factory(disk_sizes="6M,1M+512", in_use_wait=0.2)


def fill(vm: Vm) -> None:
    vm.write(0, {0: rand(len(vm.models[0]))})
    vm.write(1, {0: rand(BLOCK), 8 * BLOCK: rand(BLOCK)})


def restores_match(sim, repo, tmp_path, vm: Vm, point: str | None = None) -> None:
    for disk, uuid in enumerate(vm.uuids):
        assert restored_sha(sim, repo, tmp_path, uuid, point) == sha(vm.models[disk])


def test_dropped_connections_and_slow_reads(sim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    fill(vm)
    limit = 3 * MiB // 2  # every connection dies 1.5 MiB into its life, mid-reply
    sim.control.set_faults(drop_after_bytes=limit, read_latency=0.002)
    r = run(sim, "-v", "--json", "backup", "demo-vm", "--repo", str(repo))
    assert r.returncode == 0, r
    assert "reconnecting in 1 s" in r.stderr  # -v shows what the copy went through
    full = counters(sim)
    drops = full["bytes_served"] // limit
    assert drops >= 4  # the faults really fired
    # Bounded: one reconnection per drop, plus the initial connections of the two copies.
    assert full["connections_total"] <= drops + 2 * 4 + 2, full
    assert r.seconds < 60, r
    first = r.json()["vms"][0]["point"]
    history = [(first, [sha(m) for m in vm.models])]

    sim.control.reset_counters()
    vm.write(0, {i * BLOCK: rand(BLOCK) for i in range(0, 96, 3)})  # 2 MiB changed
    r = run(sim, "--json", "backup", "demo-vm", "--repo", str(repo))
    assert r.returncode == 0, r
    disks = r.json()["vms"][0]["disks"]
    assert [d["type"] for d in disks] == ["incremental", "incremental"]
    incr = counters(sim)
    assert incr["connections_total"] <= incr["bytes_served"] // limit + 2 * 4 + 2, incr
    history.append((disks[0]["point"], [sha(m) for m in vm.models]))
    sim.control.clear()

    for point, digests in history:
        for disk, uuid in enumerate(vm.uuids):
            assert restored_sha(sim, repo, tmp_path, uuid, point) == digests[disk]
    tally("faults injected", drops + incr["bytes_served"] // limit)  # connections cut
    tally("reads delayed", full["reads"] + incr["reads"])


def test_nbd_just_enabled_refuses_longer_than_one_retry(xensim_factory, tmp_path):
    """`xencbt nbd enable` then at once `xencbt backup`: the host refuses NBD until the
    purpose has propagated (>= 10 s on XenServer; seconds here), and the refusal outlasts
    the first retry.  The backup waits it out."""
    sim = xensim_factory(disk_sizes="2M,1M+512", nbd_purpose="none", nbd_propagation=5)
    repo = tmp_path / "repo"
    vm = Vm(sim)
    fill(vm)
    assert run(sim, "nbd", "enable", "--network", "NBD network").returncode == 0
    with running(sim, "--json", "backup", "demo-vm", "--repo", str(repo)) as finish:
        wait_until(lambda: counters(sim)["refused"] >= 1, what="a refused NBD connection")
        # Whenever the first refusal happened, the window now lasts past the 1 s retry.
        sim.control.refuse_for(2.5)
        r = finish()
    assert r.returncode == 0, r
    refused = counters(sim)["refused"]
    assert refused >= 2, refused
    # Bounded: back-off 1 s, 2 s, 4 s…; never the whole 60 s retry budget.
    assert r.seconds < 40, r
    restores_match(sim, repo, tmp_path, vm)
    tally("faults injected", refused)


def test_seventeenth_connection_refused_the_copy_carries_on(sim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    fill(vm)
    host = sim.info["hosts"][0]
    with slots_taken(host, 15):
        r = run(sim, "backup", "demo-vm", "--repo", str(repo), "--connections", "4")
        assert r.returncode == 0, r
        seen = counters(sim)
    assert seen["peak_connections"] == 16
    assert seen["refused"] >= 1  # the host closed our second connection...
    restores_match(sim, repo, tmp_path, vm)  # ...and the one it allowed did the work
    tally("faults injected", seen["refused"])


def test_retries_run_out_one_clear_line_nothing_half_done(sim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    fill(vm)
    host = sim.info["hosts"][0]

    # At start: every slot of the host is taken by someone else.
    with slots_taken(host, 16):
        r = run(sim, "backup", "demo-vm", "--repo", str(repo), "--retry-timeout", "3")
        refused = counters(sim)["refused"]
    assert_clear_error(r, 1, "giving up on the NBD server after retrying for 3 s", "16 NBD")
    assert 2 <= refused <= 4, refused  # tries at 0 s, 1 s, (3 s): bounded by the budget
    assert r.seconds < 30, r
    assert not partials(repo)
    assert not vm.x.VM.get_snapshots(vm.ref)  # the snapshot of the failed run is gone

    # Mid-copy: the host goes away for longer than the retry budget.  One read is answered,
    # the next ones are held at the simulator's gate until the faults are set; a fault set
    # meanwhile applies to the reads held (nbdserver.py), so the copy cannot end between
    # "data flows" and the faults, however loaded the machine.
    with (
        gate(sim, after=1),
        running(sim, "backup", "demo-vm", "--repo", str(repo), "--retry-timeout", "2") as finish,
    ):
        wait_until(lambda: partials(repo), what="the copy to start")
        wait_until(lambda: reads_at_gate(sim), what="the copy to be held mid-flight")
        wait_until(lambda: counters(sim)["bytes_served"] > 0, what="data to flow")
        sim.control.set_faults(drop_on_read=1)
        sim.control.refuse_for(60)
        sim.control.set_faults(gate_after_reads=None)  # the held reads meet the faults
        r = finish()
    sim.control.clear()
    refused = counters(sim)["refused"]  # both phases: the simulator counts since its start
    assert_clear_error(r, 1, "giving up on the NBD server after retrying for 2 s")
    assert r.seconds < 60, r
    assert not partials(repo)
    # Every disk goes through one nbdkit and is committed once all are copied: a run the
    # host left mid-copy leaves no point of any disk (and no VM point).
    assert not [p.name for p in repo.rglob("2*.json")]

    # Once the host is back, the next run is a plain full backup.
    r = run(sim, "--json", "backup", "demo-vm", "--repo", str(repo))
    assert r.returncode == 0, r
    assert not vm.x.VM.get_snapshots(vm.ref)
    restores_match(sim, repo, tmp_path, vm)
    tally("faults injected", refused)
