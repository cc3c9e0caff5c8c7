"""XAPI sessions going away under a running `xencbt backup`: invalidated, logged out, the
password changed, the pool master moved.  Pass: the run logs in again (the plugin also
fetches fresh NBD info) and its restores are byte-identical, or it stops with one clear
line and an exit code `xencbt --help` documents; never a hang (every run has a timeout)."""

from __future__ import annotations

import ssl
import xmlrpc.client
from pathlib import Path

import pytest
from cli_support import BLOCK, XENCBT, Vm, cli_env, rand, restored_sha, sha
from faultkit import assert_clear_error, counters, partials, run, running, wait_until
from tally import tally

pytestmark = pytest.mark.reliability

MiB = 1024 * 1024


@pytest.fixture
def sim(xensim_factory):
    return xensim_factory(disk_sizes="4M,1M+512", in_use_wait=0.2)


def fill(vm: Vm) -> None:
    vm.write(0, {0: rand(len(vm.models[0]))})
    vm.write(1, {0: rand(BLOCK), 4 * BLOCK: rand(BLOCK)})


def issued(sim) -> int:
    return len(sim.control.issued_secrets()["sessions"])


def log_out_everyone(sim) -> int:
    """session.logout of every session the pool ever issued, as an admin's script might."""
    ctx = ssl.create_default_context(cafile=sim.info["ca_file"])
    proxy = xmlrpc.client.ServerProxy(sim.info["xapi"], context=ctx)
    done = 0
    for ref in sim.control.issued_secrets()["sessions"]:
        done += proxy.session.logout(ref)["Status"] == "Success"
    return done


def password_file(tmp_path: Path, password: str) -> Path:
    path = tmp_path / "new-password"
    path.touch(mode=0o600)
    path.write_text(password + "\n")
    return path


def env_with(sim, password: Path) -> dict:
    return dict(cli_env(sim), XENCBT_PASSWORD_FILE=str(password))


@pytest.mark.parametrize("how", ["invalidated", "logged-out"])
def test_session_dies_mid_backup(sim, tmp_path, how):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    fill(vm)
    before = issued(sim)
    # Slow reads keep the copy running; short-lived connections make the plugin reconnect
    # (and so meet its dead session) while it copies.
    sim.control.set_faults(read_latency=0.1, drop_after_bytes=MiB)
    with running(sim, "--json", "backup", "demo-vm", "--repo", str(repo)) as finish:
        wait_until(lambda: counters(sim)["bytes_served"] > 0, what="the copy to start")
        if how == "invalidated":
            killed = sim.control.invalidate_sessions()
        else:
            killed = log_out_everyone(sim)
        r = finish()
    sim.control.clear()
    assert killed >= 2  # at least the command's and the plugin's
    assert r.returncode == 0, r
    # Logins: the command and the VM's plugin (one nbdkit for both disks, issue #17) once,
    # and, after the kill, the command and the plugin again.
    assert issued(sim) - before >= 4
    for disk, uuid in enumerate(vm.uuids):
        assert restored_sha(sim, repo, tmp_path, uuid) == sha(vm.models[disk])
    tally("faults injected", killed)


def test_password_changed_between_runs(sim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    fill(vm)
    assert run(sim, "backup", "demo-vm", "--repo", str(repo)).returncode == 0
    new = "changed-" + sim.password[::-1]
    sim.control.set_password(new)
    vm.write(0, {BLOCK: rand(BLOCK)})

    r = run(sim, "backup", "demo-vm", "--repo", str(repo))
    assert_clear_error(r, 6, "SESSION_AUTHENTICATION_FAILED", "refused the user name or password")
    assert r.seconds < 30, r
    assert sim.password not in r.stdout + r.stderr

    r = run(
        sim,
        "--json",
        "backup",
        "demo-vm",
        "--repo",
        str(repo),
        env=env_with(sim, password_file(tmp_path, new)),
    )
    assert r.returncode == 0, r
    disks = r.json()["vms"][0]["disks"]
    assert [d["type"] for d in disks] == ["incremental", "incremental"]
    for disk, uuid in enumerate(vm.uuids):
        assert restored_sha(sim, repo, tmp_path, uuid) == sha(vm.models[disk])
    tally("faults injected", 1)


def test_password_changed_mid_backup_fails_clearly_then_recovers(sim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    fill(vm)
    new = "changed-" + sim.password[::-1]
    sim.control.set_faults(read_latency=0.1, drop_after_bytes=MiB)
    with running(sim, "backup", "demo-vm", "--repo", str(repo)) as finish:
        wait_until(lambda: counters(sim)["bytes_served"] > 0, what="the copy to start")
        sim.control.set_password(new)
        sim.control.invalidate_sessions()
        r = finish()
    sim.control.clear()
    assert_clear_error(r, 6, "SESSION_AUTHENTICATION_FAILED")
    assert r.seconds < 90, r
    assert not partials(repo)

    # The snapshot the failed run could not destroy is cleaned by the next one.
    r = run(
        sim,
        "--json",
        "backup",
        "demo-vm",
        "--repo",
        str(repo),
        env=env_with(sim, password_file(tmp_path, new)),
    )
    assert r.returncode == 0, r
    assert "interrupted run" in r.stderr
    x = sim.session(password=new).xenapi
    assert not x.VM.get_snapshots(vm.ref)
    for disk, uuid in enumerate(vm.uuids):
        assert restored_sha(sim, repo, tmp_path, uuid) == sha(vm.models[disk])
    tally("faults injected", 2)


def test_master_moves_mid_backup_and_between_runs(xensim_factory, tmp_path):
    sim = xensim_factory(hosts=2, disk_sizes="4M,1M+512", in_use_wait=0.2)
    host0, host1 = sim.info["hosts"]
    # The administrator trusts both hosts' certificates: either may become the master.
    bundle = tmp_path / "pool-ca.pem"
    bundle.write_text(Path(host0["cert_file"]).read_text() + Path(host1["cert_file"]).read_text())
    repo = tmp_path / "repo"
    vm = Vm(sim)
    fill(vm)
    assert run(sim, "backup", "demo-vm", "--repo", str(repo), cafile=str(bundle)).returncode == 0

    vm.write(0, {i * BLOCK: rand(BLOCK) for i in range(0, 64, 2)})
    sim.control.set_faults(read_latency=0.1, drop_after_bytes=MiB)
    args = ("--json", "backup", "demo-vm", "--repo", str(repo))
    with running(sim, *args, cafile=str(bundle)) as finish:
        wait_until(lambda: counters(sim)["bytes_served"] > 0, what="the copy to start")
        sim.control.move_master("host1")  # every session dies; host0 says HOST_IS_SLAVE
        r = finish()
    sim.control.clear()
    assert r.returncode == 0, r
    assert [d["type"] for d in r.json()["vms"][0]["disks"]] == ["incremental"] * 2
    second = [sha(m) for m in vm.models]

    # Next run: still configured with host0, now a member.
    vm.write(1, {0: rand(BLOCK)})
    r = run(sim, *args, cafile=str(bundle))
    assert r.returncode == 0, r
    for disk, uuid in enumerate(vm.uuids):
        assert restored_sha(sim, repo, tmp_path, uuid) == sha(vm.models[disk])
    # Points are the disks' manifests; dot files (the snapshot ledger) and the VM points
    # (REPO/<vm>/points/) are not.
    points = sorted(
        {
            p.stem
            for p in repo.rglob("*.json")
            if not p.name.startswith(".") and p.parent.name != "points"
        }
    )
    assert restored_sha(sim, repo, tmp_path, vm.uuids[0], points[1]) == second[0]
    x = sim.session(url=host1["xapi"], cafile=host1["cert_file"]).xenapi
    assert not x.VM.get_snapshots(vm.ref)

    # Trusting only the old master's certificate: a clear refusal, not a hang.
    r = run(sim, "backup", "demo-vm", "--repo", str(repo))
    assert_clear_error(r, 1, "cannot verify the XAPI server")
    assert r.seconds < 30, r
    tally("faults injected", 2)


def test_help_documents_every_exit_code():
    import subprocess

    out = subprocess.run([*XENCBT, "--help"], capture_output=True, text=True).stdout
    for code in ("0", "1", "2", "3", "4", "5", "6", "130"):
        assert "\n  %s " % code in out or "\n%s " % code in out, code
