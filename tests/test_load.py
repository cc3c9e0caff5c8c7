"""Load (issue #5): 8 VMs x 2 disks backed up with --jobs 8 against a 2-host pool.

The VMs are spread over both hosts (xensim --srs local: an SR per host, so each disk is
served by its own host's NBD server), and 8 connections per copy are asked for: 4 VMs per
host x 8 = 32 wanted, twice what a host serves.  The per-host connection budget must keep
every host at or below 16 (the simulator counts and refuses the 17th, as xapi-nbd does)
while still using the hosts (peak close to 16 on each, more than 16 in total: a single
pool-wide budget would not reach that).  Nothing is lost: every disk restores
byte-identical to its source VDI.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from cli_support import content, fill, restored, xencbt
from tally import tally
from xencbt_cli.jobs.snapshot_copy import ConnectionBudget

pytestmark = pytest.mark.reliability

VMS, HOSTS, LIMIT, CONNECTIONS = 8, 2, 16, 8
HOLD = 8.0  # seconds the first reads wait (see the test)


def test_eight_vms_two_disks_jobs_8_two_hosts(xensim_factory, tmp_path):
    sim = xensim_factory(hosts=HOSTS, vms=VMS, srs="local", disk_sizes="32M,2M", in_use_wait=0.5)
    x = sim.session().xenapi
    names = ["demo-vm"] + ["demo-vm-%d" % i for i in range(2, VMS + 1)]
    sources, per_host = {}, {}
    for name in names:
        vm = x.VM.get_by_name_label(name)[0]
        host = x.host.get_name_label(x.VM.get_resident_on(vm))
        per_host[host] = per_host.get(host, 0) + 1
        address = x.host.get_address(x.VM.get_resident_on(vm))
        for vbd in x.VM.get_VBDs(vm):
            vdi = x.VBD.get_VDI(vbd)
            uuid = x.VDI.get_uuid(vdi)
            infos = x.VDI.get_nbd_info(vdi)
            assert [i["address"] for i in infos if ":" not in i["address"]] == [address]
            sources[uuid] = fill(sim, uuid, int(x.VDI.get_virtual_size(vdi)))
    assert len(sources) == 2 * VMS and sorted(per_host.values()) == [VMS // HOSTS] * HOSTS
    wanted = {h: n * CONNECTIONS for h, n in per_host.items()}
    assert all(w > LIMIT for w in wanted.values())  # without a budget a host would refuse

    # Reads wait behind a gate for the first seconds, so every copy that starts meanwhile
    # opens all its connections (each has reads queued) and the hosts reach their limit
    # however slowly this machine starts the jobs; then reads stay slow so copies overlap.
    sim.control.set_faults(hold_for=HOLD, read_latency=0.3)
    sim.control.reset_counters()
    repo = tmp_path / "repo"
    # Uncompressed: qemu-img convert -c keeps only 512 KiB in flight (the plugin reads
    # ahead instead), so compressed copies never bring a host near its limit.
    xencbt(sim, "init", "--repo", str(repo), "--compression", "none")
    t0 = time.monotonic()
    r = xencbt(
        sim,
        "--json",
        "backup",
        *names,
        "--repo",
        str(repo),
        "--jobs",
        "8",
        "--connections",
        str(CONNECTIONS),
    )
    print("backup of %d disks took %.1f s" % (2 * VMS, time.monotonic() - t0))
    sim.control.clear()
    summary = json.loads(r.stdout)
    assert summary["ok"] and len(summary["vms"]) == VMS
    counters = sim.control.counters()
    peaks = {h: c["peak_connections"] for h, c in counters.items()}
    print("wanted per host %s; peak NBD connections per host %s" % (wanted, peaks))
    for host, c in counters.items():
        assert c["refused"] == 0, "host %s refused connections: the budget failed" % host
        assert c["peak_connections"] <= LIMIT, host
        assert c["peak_connections"] >= LIMIT - 4, "%s never came near the limit" % host
    assert sum(peaks.values()) > LIMIT  # each host has its own budget of 16
    tally("load: peak NBD connections per host", max(peaks.values()))

    backed_up = {d["vdi_uuid"]: d for vm in summary["vms"] for d in vm["disks"]}
    assert set(backed_up) == set(sources)
    for uuid, digest in sources.items():
        assert backed_up[uuid]["digest"] == digest
    with ThreadPoolExecutor(4) as pool:  # 16 restores, real ones, a few at a time
        digests = pool.map(lambda u: content(restored(sim, repo, tmp_path, u)), sources)
        back = dict(zip(sources, digests))
    assert back == sources


def blocked_in(budget: ConnectionBudget, timeout: float = 5.0) -> None:
    """Return once a thread waits on the budget's condition: proof that it is blocked, not
    merely not yet run.  (A notify removes the waiter at once, so after a release this
    sees the thread only when it has re-checked and gone back to waiting.)"""
    deadline = time.monotonic() + timeout
    while not budget._cond._waiters:  # CPython's Condition: the waiting threads' locks
        assert time.monotonic() < deadline, "no thread waits for the budget"
        time.sleep(0.001)


def test_budget_is_per_host_and_a_shared_disk_counts_on_every_host():
    """16 per host at once: two hosts can each run 16; a copy whose disk both hosts may
    serve takes its share from both, atomically (never one then the other)."""
    budget = ConnectionBudget(LIMIT)
    got, done = threading.Event(), threading.Event()

    def shared_copy():
        with budget.take(4, ["h0", "h1"]):
            got.set()
            done.wait(5)

    with budget.take(16, ["h0"]):
        with budget.take(16, ["h1"]):
            assert budget.used == {"h0": 16, "h1": 16}
            waiting = threading.Thread(target=shared_copy)
            waiting.start()
            blocked_in(budget)  # both hosts are full: it waits
            assert not got.is_set()
        blocked_in(budget)  # woken by the release of h1, it waits again: h0 still is full
        assert not got.is_set()
    assert got.wait(5) and budget.used == {"h0": 4, "h1": 4}
    done.set()
    waiting.join(5)
    assert budget.used == {"h0": 0, "h1": 0}
