"""xencbt under stress: interrupted runs, secrets, locks, parallel VMs, partial failure."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_support import BLOCK, Vm, backup, disk_rows, rand, restored_sha, sha, xencbt


def cmdlines() -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                found.append(Path("/proc", pid, "cmdline").read_bytes().decode(errors="replace"))
            except OSError:
                pass
    return found


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_interrupted_run_leaves_nothing_visible_and_next_run_cleans(xensim_factory, tmp_path):
    sim = xensim_factory(disk_sizes="2M,1M+512", in_use_wait=0.5)
    repo = tmp_path / "repo"
    vm = Vm(sim)
    vm.write(0, {0: rand(BLOCK)})
    first = backup(sim, repo, "demo-vm")
    vm.write(0, {BLOCK: rand(BLOCK)})

    sim.control.set_faults(read_latency=0.5)
    proc = xencbt(sim, "backup", "demo-vm", "--repo", str(repo), "--full", popen=True)
    try:
        wait_for(lambda: any(repo.rglob("*.partial")))
        # While it runs: no password, session ref or export name on any command line.
        secrets = (sim.password, "OpaqueRef:", "session_id")
        for line in cmdlines():
            assert not any(s in line for s in secrets), line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    sim.control.clear()
    snaps = vm.x.VM.get_snapshots(vm.ref)
    assert len(snaps) == 1 and vm.x.VM.get_name_label(snaps[0]).startswith("xencbt-")
    listing = disk_rows(json.loads(xencbt(sim, "--json", "list", "--repo", str(repo)).stdout))
    assert len(listing) == 2  # the interrupted point does not exist

    r = xencbt(sim, "--json", "backup", "demo-vm", "--repo", str(repo))
    assert "interrupted run" in r.stderr
    assert not vm.x.VM.get_snapshots(vm.ref)
    assert not list(repo.rglob("*.partial")) and not list(repo.rglob("*.tmp"))
    disks = json.loads(r.stdout)["vms"][0]["disks"]
    assert disks[0]["type"] == "incremental"
    assert disks[0]["base_point"] == first["vms"][0]["point"]
    live = {r["uuid"] for r in vm.x.VDI.get_all_records().values() if r["is_a_snapshot"]}
    assert live == {d["snapshot_uuid"] for d in disks}
    assert restored_sha(sim, repo, tmp_path, vm.uuids[0]) == sha(vm.models[0])

    # Nothing secret in what we print or store either.
    for path in repo.rglob("*.json"):
        text = path.read_text()
        assert sim.password not in text and "OpaqueRef" not in text
    assert sim.password not in r.stdout + r.stderr and "session_id" not in r.stderr


def test_second_backup_of_a_locked_chain_fails_clearly(xensim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(xensim)
    chain = repo / vm.uuid / vm.uuids[1]
    chain.mkdir(parents=True)
    fd = os.open(chain / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        r = xencbt(xensim, "backup", "demo-vm", "--repo", str(repo), check=5)
        assert "VDI %s is locked by another xencbt" % vm.uuids[1] in r.stderr
        assert "--wait" in r.stderr
    finally:
        os.close(fd)
    assert not vm.x.VM.get_snapshots(vm.ref)  # nothing was started


def test_two_vms_in_parallel_stay_within_16_connections(xensim_factory, tmp_path):
    sim = xensim_factory(vms=2, disk_sizes="3M,1M")
    repo = tmp_path / "repo"
    sim.control.set_faults(read_latency=0.02)  # keep copies overlapping
    r = xencbt(
        sim,
        "--json",
        "backup",
        "demo-vm",
        "demo-vm-2",
        "--repo",
        str(repo),
        "--jobs",
        "2",
        "--connections",
        "12",
    )
    summary = json.loads(r.stdout)
    assert summary["ok"] and len(summary["vms"]) == 2
    for host in sim.control.counters().values():
        assert 1 <= host["peak_connections"] <= 16
        assert host["refused"] == 0


def test_partial_failure_exit_code(xensim, tmp_path):
    repo = tmp_path / "repo"
    r = xencbt(xensim, "--json", "backup", "demo-vm", "no-such-vm", "--repo", str(repo), check=3)
    vms = {v["vm"]: v for v in json.loads(r.stdout)["vms"]}
    assert vms["demo-vm"]["ok"] and not vms["no-such-vm"]["ok"]
    assert "no VM named no-such-vm" in vms["no-such-vm"]["error"]


@pytest.mark.parametrize("missing", ["XENCBT_XAPI", "XENCBT_PASSWORD_FILE"])
def test_missing_settings_are_usage_errors(xensim, tmp_path, missing, monkeypatch):
    import subprocess

    from cli_support import XENCBT, cli_env

    env = cli_env(xensim)
    del env[missing]
    r = subprocess.run(
        [*XENCBT, "backup", "demo-vm", "--repo", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2, r.stderr
    assert "--xapi" in r.stderr or "--password-file" in r.stderr


def test_password_from_stdin_serves_session_and_plugin(xensim, tmp_path):
    """--password-file - is read once and handed to the plugin through a memfd (no file)."""
    from cli_support import XENCBT, cli_env

    env = {k: v for k, v in cli_env(xensim).items() if k != "XENCBT_PASSWORD_FILE"}
    argv = [
        *XENCBT,
        "--xapi-cafile",
        xensim.info["ca_file"],
        "--password-file",
        "-",
        "--json",
        "backup",
        "demo-vm",
        "--repo",
        str(tmp_path / "repo"),
    ]
    r = subprocess.run(
        argv, input=xensim.password + "\n", env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert all(d["type"] == "full" for d in json.loads(r.stdout)["vms"][0]["disks"])
    assert xensim.password not in r.stdout + r.stderr
