"""Issue #12 item 10: the 16-connections-per-host budget holds across processes.

Slots are flock'ed files (plugin/xencbt_core/slots.py).  The last tests run two real
plugin instances (nbdkit + nbdcopy), then three `xencbt backup` processes, at once against
one simulated host whose NBD server counts its peak and its refusals; the copies are
compared with the simulator's raw VDI files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import nbd
import pytest
from cli_support import Vm, restored, xencbt
from secretwatch import WATCH
from servers import PLUGIN
from xencbt_core.slots import PER_HOST, Slots, host_key

HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from xencbt_core.slots import Slots
held = [Slots(sys.argv[1]).try_take("host") for _ in range(16)]
assert all(held)
print("ready", flush=True)
time.sleep(600)
"""


def test_sixteen_slots_per_host_shared_by_every_user(tmp_path):
    slots = Slots(tmp_path / "run")
    held = [slots.try_take("a") for _ in range(PER_HOST)]
    assert all(held) and slots.try_take("a") is None
    assert slots.try_take("b") is not None  # another host has its own 16
    held.pop().release()
    assert slots.try_take("a") is not None
    # Shared by users like /tmp; a slot file needs only to be readable to be locked.
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o1777
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir()} == {0o644}


OTHER_USER = """
import sys
sys.path.insert(0, sys.argv[2])
from xencbt_core.slots import Slots
slots = Slots(sys.argv[1])
got = [s for s in (slots.try_take("host") for _ in range(16)) if s is not None]
print(len(got))
"""


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a process as nobody")
def test_two_users_share_one_budget():
    """root holds 15 of a host's slots; a process running as nobody gets the 16th only."""
    # Not under the run's TMPDIR: the secret watch's tmpfs is private to root.
    top = Path(tempfile.mkdtemp(prefix="xencbt-slots-", dir="/var/tmp"))
    try:
        top.chmod(0o755)  # nobody may traverse it; the runtime dir below is made 1777
        held = [Slots(top / "run").try_take("host") for _ in range(15)]
        assert all(held)
        core = str(Path(PLUGIN).parent)
        # The checkout may not be readable by nobody: give the child a copy of the core.
        shutil.copytree(Path(core) / "xencbt_core", top / "lib" / "xencbt_core")
        os.chmod(top / "lib", 0o755)
        r = subprocess.run(
            [sys.executable, "-c", OTHER_USER, str(top / "run"), str(top / "lib")],
            capture_output=True,
            text=True,
            user="nobody",
            group="nogroup",
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "1"
    finally:
        shutil.rmtree(top)


def test_host_key_is_the_certificate_whatever_the_address():
    assert host_key("PEM", "10.0.0.1", 10809) == host_key("PEM", "fd00::5", 10809)
    assert host_key("", "10.0.0.1", 10809) != host_key("", "10.0.0.2", 10809)


def test_a_killed_process_frees_its_slots(tmp_path):
    core = str(Path(PLUGIN).parent)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), core], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert Slots(tmp_path).try_take("host") is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert Slots(tmp_path).try_take("host") is not None


def test_two_plugin_instances_stay_within_the_hosts_16_connections(
    xensim_factory, tmp_path, monkeypatch
):
    monkeypatch.setenv("XENCBT_RUNTIME_DIR", str(tmp_path / "run"))
    sim = xensim_factory(disk_sizes="8M", vbd_cleanup=0.05)
    x = sim.session().xenapi
    vm = x.VM.get_by_name_label("demo-vm")[0]
    live = x.VBD.get_VDI(x.VM.get_VBDs(vm)[0])
    with sim.guest_disk(x.VDI.get_uuid(live)) as uri:
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pwrite(os.urandom(8 << 20), 0)
        h.flush()
        h.shutdown()
    snap = x.VDI.get_uuid(x.VDI.snapshot(live, {}))
    truth = (sim.state_dir / "vdis" / ("%s.raw" % snap)).read_bytes()
    info = sim.info
    params = [
        "xapi=%s" % info["xapi"],
        "password=+%s" % info["password_file"],
        "xapi-cafile=%s" % info["ca_file"],
        "vdi=%s" % snap,
        "connections=16",
    ]
    # Reads wait at the gate, so each instance's pool grows as far as it is let.
    sim.control.set_faults(hold_for=3)
    procs = []
    for i in range(2):
        out = tmp_path / ("copy%d.raw" % i)
        run = 'nbdcopy --connections=4 --requests=16 --request-size=262144 "$uri" %s' % out
        argv = ["nbdkit", "-U", "-", "-v", "python", str(PLUGIN), *params, "--run", run]
        procs.append((out, subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)))
    logs = []
    for out, proc in procs:
        _, err = proc.communicate(timeout=120)
        WATCH.output("nbdkit xencbt (concurrent)", "", err)
        assert proc.returncode == 0, err[-3000:]
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(truth).digest()
        logs.append(err)
    (counters,) = sim.control.counters().values()
    assert counters["peak_connections"] <= 16
    assert counters["refused"] == 0  # never pushed past the limit: both kept to the budget
    # They really competed: one carried on with fewer connections, or waited for a slot.
    assert any("connection slots" in err for err in logs), logs[0][-2000:]


def test_three_concurrent_backups_share_one_hosts_budget(xensim_factory, tmp_path, monkeypatch):
    """Three scheduled jobs at once (three xencbt processes, three VMs on one host), each
    asking for 16 connections: the host never sees more than 16, refuses none, and every
    disk restores byte-identical to the simulator's raw VDI file."""
    monkeypatch.setenv("XENCBT_RUNTIME_DIR", str(tmp_path / "run"))
    # 64 MiB: qemu-img's 8 parallel 2 MiB reads each, so each copy may want 8 connections.
    sim = xensim_factory(vms=3, disk_sizes="64M", vbd_cleanup=0.05)
    vms = [Vm(sim, name) for name in ("demo-vm", "demo-vm-2", "demo-vm-3")]
    for vm in vms:
        vm.write(0, {i << 20: os.urandom(1 << 20) for i in range(0, 64, 7)})
    sim.control.set_faults(hold_for=3)  # reads wait at the gate: every copy piles up
    procs = [
        xencbt(
            sim,
            "--json",
            "backup",
            vm.name,
            "--repo",
            str(tmp_path / vm.name),
            "--connections",
            "16",
            popen=True,
        )
        for vm in vms
    ]
    for vm, proc in zip(vms, procs):
        out, err = proc.communicate(timeout=180)
        WATCH.output("xencbt backup %s (concurrent)" % vm.name, out, err)
        assert proc.returncode == 0, err[-3000:]
        (res,) = json.loads(out)["vms"]
        assert res["ok"], res
    (counters,) = sim.control.counters().values()
    assert counters["peak_connections"] <= 16 and counters["refused"] == 0, counters
    for vm in vms:
        truth = (sim.state_dir / "vdis" / ("%s.raw" % vm.uuids[0])).read_bytes()
        assert truth == bytes(vm.models[0])
        assert restored(sim, tmp_path / vm.name, tmp_path, vm.uuids[0]) == truth
