"""backup --cluster (issue #26): a real Dask distributed scheduler and three workers on
loopback (distributed's own commands, tests/cluster_support.py) back up 8 VMs x 2 disks of
a two-host simulator.

* each host's 16 NBD connections hold across all workers (the simulator counts and
  refuses the 17th, as xapi-nbd does), and every disk is what its VDI holds;
* a worker SIGKILLed mid-copy of the 8 VMs: its VMs' tasks run again on another worker, which cleans
  the dead attempt's snapshot and partial file; every VM backed up, verify clean, no
  snapshot left on the pool;
* two workers never write one chain at once (the repository's file lock);
* the scheduler killed mid-run: the client says so and exits non-zero, nothing is
  half-committed, and the next backup cleans what was left;
* a worker that sees another repository at the same path: refused before any snapshot.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cli_support import XENCBT, cli_env, content, fill, restored, xencbt
from cluster_support import Cluster
from conftest import Simulator
from crash_support import gate, reads_at_gate, wait_until
from secretwatch import WATCH
from tally import tally
from xencbt_cli.jobs import cluster_budget, on_scheduler

pytestmark = pytest.mark.reliability

VMS, LIMIT = 8, 16
NAMES = ["demo-vm"] + ["demo-vm-%d" % i for i in range(2, VMS + 1)]


class Scene:
    def __init__(self, work: Path):
        self.work = work
        self.sim = Simulator(
            work / "xensim",
            ["--hosts", "2", "--vms", str(VMS), "--srs", "local", "--disk-sizes", "32M,2M"]
            + ["--in-use-wait", "0.5", "--auth-fail-delay", "0.2"],
        )
        self.x = self.sim.session().xenapi
        self.cluster = Cluster(work / "cluster")
        self.sources = {uuid: fill(self.sim, uuid, self.size(uuid)) for uuid in self.vdis()}

    def vdis(self) -> list[str]:
        found = []
        for name in NAMES:
            vm = self.x.VM.get_by_name_label(name)[0]
            for vbd in self.x.VM.get_VBDs(vm):
                found.append(self.x.VDI.get_uuid(self.x.VBD.get_VDI(vbd)))
        return found

    def size(self, uuid: str) -> int:
        return int(self.x.VDI.get_virtual_size(self.x.VDI.get_by_uuid(uuid)))

    def backup(self, repo: Path, *args: str, check: int | None = 0, popen: bool = False):
        argv = ["--json", "backup", *args, "--repo", str(repo)]
        argv += ["--cluster", self.cluster.address]
        return xencbt(self.sim, *argv, check=check, popen=popen, timeout=600)

    def snapshots_left(self) -> list[str]:
        """Snapshot VMs, and snapshot VDIs holding data (a chain's base keeps only its CBT
        metadata): what a lost attempt would leave on the pool."""
        vms = [v["name_label"] for v in self.x.VM.get_all_records().values() if v["is_a_snapshot"]]
        vdis = [
            v["name_label"]
            for v in self.x.VDI.get_all_records().values()
            if v["is_a_snapshot"] and v["type"] != "cbt_metadata"
        ]
        return vms + vdis


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    s = Scene(tmp_path_factory.mktemp("cluster"))
    yield s
    s.cluster.stop()
    assert s.sim.stop() == 0, s.sim.stderr()


def test_the_scheduler_reads_the_budgets_by_their_names():
    """on_scheduler.py is sent by value and so cannot import the budget's names."""
    assert on_scheduler.NBD_PREFIX == cluster_budget.PREFIX
    assert on_scheduler.NBD_GATE == cluster_budget.GATE
    assert on_scheduler.RUNNING == cluster_budget.RUNNING


def test_eight_vms_on_three_workers_hold_each_hosts_budget(scene, tmp_path):
    sim = scene.sim
    repo = tmp_path / "repo"
    xencbt(sim, "init", "--repo", str(repo), "--compression", "none")
    # 3 workers x 2 VMs x 8 connections: 48 wanted at once, 4 VMs' worth on each host.
    # Reads wait for the first seconds, then stay slow, so the copies overlap (test_load).
    sim.control.set_faults(hold_for=6.0, read_latency=0.3)
    sim.control.reset_counters()
    run = scene.backup(repo, *NAMES, "--jobs", "2", "--connections", "8", popen=True)
    status = wait_until(lambda: busy_status(scene), run, timeout=120)
    out, err = run.communicate(timeout=600)
    sim.control.clear()
    assert run.returncode == 0, err
    summary = json.loads(out)
    assert summary["ok"] and [v["vm"] for v in summary["vms"]] == NAMES

    counters = sim.control.counters()
    peaks = {h: c["peak_connections"] for h, c in counters.items()}
    print("peak NBD connections per host %s" % peaks)
    for host, c in counters.items():
        assert c["refused"] == 0, "host %s refused connections: the budget failed" % host
        assert c["peak_connections"] <= LIMIT, host
    assert sum(peaks.values()) > LIMIT  # both hosts used at once, each to its own 16
    tally("cluster: peak NBD connections per host", max(peaks.values()))

    # status showed the run: VMs on workers, connections lent on the hosts.
    assert status is not None, "the run ended before status saw it"
    assert {vm for w in status["workers"] for vm in w["vms"]} <= set(NAMES)
    assert all(0 <= h["in_use"] <= LIMIT for h in status["hosts"])

    lines = [line for line in err.splitlines() if line.startswith("VM ")]
    assert {line.split()[1] for line in lines} == set(NAMES)  # each VM's lines reached us
    backed_up = {d["vdi_uuid"]: d for vm in summary["vms"] for d in vm["disks"]}
    assert {u: d["digest"] for u, d in backed_up.items()} == scene.sources
    some = sorted(scene.sources)[:4]
    with ThreadPoolExecutor(2) as pool:
        back = dict(zip(some, pool.map(lambda u: content(restored(sim, repo, tmp_path, u)), some)))
    assert back == {u: scene.sources[u] for u in some}


def busy_status(scene) -> dict | None:
    """xencbt status while the run holds connections, else None."""
    r = xencbt(scene.sim, "--json", "status", "--cluster", scene.cluster.address)
    found = json.loads(r.stdout)
    running = [vm for w in found["workers"] for vm in w["vms"]]
    return found if running and any(h["in_use"] for h in found["hosts"]) else None


def test_worker_killed_mid_copy_loses_nothing(scene, tmp_path):
    sim, cluster = scene.sim, scene.cluster
    repo = tmp_path / "repo"
    vms = NAMES
    with gate(sim, after=40):
        run = scene.backup(repo, *vms, "--jobs", "2", popen=True)
        assert wait_until(lambda: reads_at_gate(sim), run, timeout=180), run.communicate()
        victim = cluster.busy_worker()
        victim.kill()
        cluster.workers.remove(victim)
    out, err = run.communicate(timeout=600)
    cluster.workers.append(cluster.add_worker(victim.name))  # for the tests after this one
    victim.stop()
    assert run.returncode == 0, err
    summary = json.loads(out)
    assert summary["ok"] and [v["vm"] for v in summary["vms"]] == vms
    assert all(len(v["disks"]) == 2 for v in summary["vms"])
    points = json.loads(xencbt(sim, "--json", "list", "--repo", str(repo)).stdout)
    per_vm = {vm["vm_name"]: len(vm["points"]) for vm in points["vms"]}
    assert per_vm == dict.fromkeys(vms, 1), per_vm  # no point committed twice
    xencbt(sim, "verify", "--repo", str(repo))
    assert scene.snapshots_left() == []
    for vm in summary["vms"]:
        for d in vm["disks"]:
            assert d["digest"] == scene.sources[d["vdi_uuid"]]


def test_every_attempt_died_leaves_nothing_of_the_vm(scene, tmp_path):
    """With no failure allowed (distributed.scheduler.allowed-failures 0), the one worker
    death is the VM's last: its line says so and the client cleans what the attempt left."""
    sim = scene.sim
    repo = tmp_path / "repo"
    own = Cluster(
        tmp_path / "cluster",
        workers=2,
        env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"},
    )
    try:
        with gate(sim, after=0):
            argv = ["--json", "backup", NAMES[4], "--repo", str(repo), "--cluster", own.address]
            run = xencbt(sim, *argv, popen=True)
            assert wait_until(lambda: reads_at_gate(sim), run, timeout=180)
            own.busy_worker().kill()
        out, err = run.communicate(timeout=300)
    finally:
        own.stop()
    assert run.returncode == 1, err
    vm = json.loads(out)["vms"][0]
    assert not vm["ok"] and "every worker that ran its backup died" in vm["error"]
    assert "VM %s: backup FAILED: every worker that ran its backup died" % NAMES[4] in err
    assert scene.snapshots_left() == []
    assert not [
        p.name
        for p in repo.rglob("*")
        if p.is_file() and p.name != "repository.conf" and not p.name.startswith(".")
    ]


def test_client_killed_the_worker_backs_the_vm_up_and_status_shows_it(scene, tmp_path):
    """distributed cannot interrupt a running task: a client killed outright (SIGKILL)
    leaves its VM to the worker, which commits it whole; status shows it meanwhile,
    though the scheduler dropped the task with its client."""
    sim = scene.sim
    repo = tmp_path / "repo"
    with gate(sim, after=0):
        run = scene.backup(repo, NAMES[5], popen=True)
        assert wait_until(lambda: reads_at_gate(sim), run, timeout=180)
        run.kill()
        WATCH.output("xencbt backup --cluster killed", *run.communicate())
        r = xencbt(sim, "--json", "status", "--cluster", scene.cluster.address)
        shown = {vm: w["name"] for w in json.loads(r.stdout)["workers"] for vm in w["vms"]}
        assert NAMES[5] in shown, r.stdout
    deadline = time.monotonic() + 180
    while NAMES[5] in running_vms(scene):  # the worker's lease: held to the task's end
        assert time.monotonic() < deadline, "the worker never finished the VM"
        time.sleep(0.2)
    assert len(list(repo.glob("*/points/*Z.json"))) == 1  # one VM point (and its .config.json)
    xencbt(sim, "verify", "--repo", str(repo))
    assert scene.snapshots_left() == []


def running_vms(scene) -> set[str]:
    r = xencbt(scene.sim, "--json", "status", "--cluster", scene.cluster.address)
    return {vm for w in json.loads(r.stdout)["workers"] for vm in w["vms"]}


def test_two_workers_never_write_one_chain_at_once(scene, tmp_path):
    sim, cluster = scene.sim, scene.cluster
    repo = tmp_path / "repo"
    first, shared = NAMES[0], NAMES[1]
    workers = sorted(cluster.workers, key=lambda w: w.address)
    with gate(sim, after=0):
        # One VM per worker: ``first`` on the first worker, ``shared`` on the second.
        run = scene.backup(repo, first, shared, "--jobs", "1", popen=True)
        wait_until(lambda: sum(bool(copying(w)) for w in workers) == 2, run, timeout=180)
        holder = next(w for w in workers[1:] if copying(w))
        # The second run's task lands on the first worker: another process, same chain.
        r = scene.backup(repo, shared, "--jobs", "1", check=5)
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    assert "locked by another xencbt process (pid %d)" % holder.proc.pid in r.stderr, r.stderr
    assert json.loads(r.stdout)["vms"][0]["exit_code"] == 5


def copying(worker) -> bool:
    return any(
        Path("/proc/%d/comm" % pid).read_text().strip() == "nbdkit"
        for pid in worker.children()
        if Path("/proc/%d" % pid).exists()
    )


def test_scheduler_killed_mid_run_ends_the_client_and_commits_nothing_half(scene, tmp_path):
    sim = scene.sim
    repo = tmp_path / "repo"
    own = Cluster(tmp_path / "cluster", workers=1)
    try:
        with gate(sim, after=0):
            argv = ["--json", "backup", NAMES[2], "--repo", str(repo), "--cluster", own.address]
            run = xencbt(sim, *argv, popen=True)
            assert wait_until(lambda: reads_at_gate(sim), run, timeout=180)
            own.scheduler.kill()
            out, err = run.communicate(timeout=120)
            own.workers[0].kill()  # the proxy is lost too: its copy dies mid-flight
    finally:
        own.stop()
    assert run.returncode == 1, err
    assert "scheduler at %s went away" % own.address in err
    assert "demo-vm-3" in json.loads(out)["error"]
    # Nothing half-committed: no VM point, no disk point; the next backup cleans the rest.
    assert not list(repo.glob("*/points/*.json")) and not list(repo.glob("*/*/*.json"))
    xencbt(sim, "backup", NAMES[2], "--repo", str(repo))
    xencbt(sim, "verify", "--repo", str(repo))
    assert scene.snapshots_left() == []


def test_worker_that_sees_another_repository_is_refused(scene, tmp_path):
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root: a mount namespace is needed for this test")
        pytest.skip("needs root (a mount namespace for the worker)")
    sim = scene.sim
    repo, other = tmp_path / "repo", tmp_path / "other"
    for r in (repo, other):
        xencbt(sim, "init", "--repo", str(r))
    # The worker's proxy mounts other storage at the same path, as an NFS mount gone
    # wrong would: it sees a repository there, but not this one.
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    own = Cluster(
        tmp_path / "cluster",
        workers=1,
        wrap=lambda argv: (
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
            + ["sh", str(other), str(repo), *argv]
        ),
    )
    try:
        before = scene.snapshots_left()
        argv = ["backup", NAMES[3], "--repo", str(repo), "--cluster", own.address]
        r = xencbt(sim, *argv, check=1)
    finally:
        own.stop()
    assert "sees another repository at %s" % repo in r.stderr, r.stderr
    assert "nothing was started" in r.stderr
    assert scene.snapshots_left() == before
    assert not list(repo.glob("*/*"))  # no chain, no point
    assert sorted(p.name for p in repo.iterdir()) == ["repository.conf"]


def test_a_password_from_stdin_cannot_reach_the_workers(scene, tmp_path):
    """Workers read the password file themselves: one read from stdin is refused, before
    the scheduler is even contacted."""
    argv = [*XENCBT, "--xapi-cafile", scene.sim.info["ca_file"], "--password-file", "-"]
    argv += ["backup", NAMES[0], "--repo", str(tmp_path / "repo"), "--cluster", "tcp://127.0.0.1:9"]
    r = subprocess.run(
        argv,
        env=cli_env(scene.sim),
        input=scene.sim.password + "\n",
        capture_output=True,
        text=True,
    )
    WATCH.output("xencbt backup --cluster --password-file -", r.stdout, r.stderr)
    assert r.returncode == 2, r.stderr
    assert "the workers cannot read a password from this stdin" in r.stderr


def test_what_a_task_carries_holds_no_secret(tmp_path):
    """A task's settings are names and paths: the password is read on the worker."""
    from xencbt_cli.settings import Settings

    password = tmp_path / "password"
    password.write_text("s3cret-for-the-pool\n")
    password.chmod(0o600)
    conf = Settings(xapi="https://pool", password_file=str(password), key_file="rel/key")
    assert conf.password().reveal() == "s3cret-for-the-pool"  # read, as a run would
    carried = conf.portable()
    assert "s3cret" not in repr(carried)
    assert carried["password_file"] == str(password)
    assert carried["key_file"] == os.path.abspath("rel/key")  # the same path on a worker
