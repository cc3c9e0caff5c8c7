"""``xencbt drill`` through the real CLI on the simulator: demo-vm's point restored on a
network of its own, booted (xensim's guest agent reports once the boot disk carries a
boot sector, guest_boot.py), its RTO reported and recorded, and nothing left on the pool
afterwards; a point whose boot disk was zeroed never boots; a drill killed or stopped
mid-way leaves nothing once repair (or the drill itself) has run."""

from __future__ import annotations

import json
import signal

import pytest
from cli_support import BLOCK, Vm, backup, xencbt
from crash_support import kill, start, wait_until
from vm_restore import SR

CLASSES = ("VM", "VBD", "VIF", "VDI", "network", "VM_guest_metrics")
MARK = "xencbt-drill"


def pool_objects(x) -> dict[str, set]:
    """Every object of the classes a drill creates (VM_guest_metrics: the boot's)."""
    return {cls: set(getattr(x, cls).get_all()) for cls in CLASSES}


def marked(x) -> list[str]:
    return [
        "%s %s" % (cls, rec["uuid"])
        for cls in ("VM", "VDI", "network")
        for rec in getattr(x, cls).get_all_records().values()
        if MARK in rec["other_config"]
    ]


def drill(sim, repo, *args: str, check: int | None = 0):
    r = xencbt(
        sim, "--json", "drill", "--repo", str(repo), "demo-vm", "--to-sr", SR, *args, check=check
    )
    return json.loads(r.stdout), r


def running_drill(x) -> str | None:
    """The drill's VM once it runs (started, its guest not necessarily up)."""
    for ref, rec in x.VM.get_all_records().items():
        if MARK in rec["other_config"] and rec["power_state"] == "Running":
            return ref
    return None


def test_drill_boots_reports_and_records_the_rto_and_leaves_nothing(xensim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(xensim)
    point = backup(xensim, repo, "demo-vm")["vms"][0]["point"]
    before = pool_objects(vm.x)
    out, r = drill(xensim, repo)
    assert out["booted"] is True and out["point"] == point and out["vm_uuid"] == vm.uuid
    assert out["isolated"] is True and out["network"]
    assert out["restore_seconds"] > 0 and out["boot_seconds"] > 0
    assert abs(out["rto_seconds"] - out["restore_seconds"] - out["boot_seconds"]) < 0.02
    assert out["guest"]["PV_drivers_version"]["major"]
    assert (
        "VM %s" % out["drill_vm"] in out["undone"]
        and "network %s" % out["network"] in (out["undone"])
    )
    assert out["left"] == [] and "destroyed" in r.stderr
    assert pool_objects(vm.x) == before and marked(vm.x) == []
    listed = json.loads(xencbt(xensim, "--json", "list", "--repo", str(repo)).stdout)
    (row,) = listed["vms"]
    assert row["last_drill"]["rto_seconds"] == out["rto_seconds"]
    assert row["last_drill"]["booted"] is True
    text = xencbt(xensim, "list", "--repo", str(repo)).stdout
    assert "last drill" in text and "booted, RTO %.1f s" % out["rto_seconds"] in text
    records = json.loads((repo / vm.uuid / "drills.json").read_text())["drills"]
    assert [d["point"] for d in records] == [point]
    xencbt(xensim, "verify", "--repo", str(repo))
    (repo / vm.uuid / "drills.json").write_text("{not json")  # damaged: named, not fatal
    text = xencbt(xensim, "list", "--repo", str(repo)).stdout
    assert "drills.json is unreadable" in text and "VM point %s" % point in text
    r = xencbt(xensim, "verify", "--repo", str(repo), check=4)
    assert "drills.json" in r.stdout


def test_a_point_whose_boot_disk_was_zeroed_does_not_boot_and_leaves_nothing(xensim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(xensim)
    good = backup(xensim, repo, "demo-vm")["vms"][0]["point"]
    vm.write(0, {0: None})  # the boot sector gone
    bad = backup(xensim, repo, "demo-vm")["vms"][0]["point"]
    before = pool_objects(vm.x)
    out, r = drill(xensim, repo, "--timeout", "2", check=9)
    assert out["booted"] is False and out["point"] == bad and out["exit_code"] == 9
    assert "did not boot within 2 s" in out["error"] and "did not boot within 2 s" in r.stderr
    assert out["rto_seconds"] is None
    assert pool_objects(vm.x) == before and marked(vm.x) == []
    text = xencbt(xensim, "list", "--repo", str(repo)).stdout
    assert "point %s: FAILED" % bad in text
    out, _ = drill(xensim, repo, "--at", good)  # the older point still boots
    assert out["booted"] is True and pool_objects(vm.x) == before
    records = json.loads((repo / vm.uuid / "drills.json").read_text())["drills"]
    assert [(d["point"], d["booted"]) for d in records] == [(bad, False), (good, True)]


def held_drill(xensim, repo, hold):
    """demo-vm backed up, then a drill of it held once its VM started: the pool's objects
    before, the drill's process and its VM."""
    x = Vm(xensim).x
    backup(xensim, repo, "demo-vm")
    before = pool_objects(x)
    argv = ["drill", "--repo", str(repo), "demo-vm", "--to-sr", SR]
    proc = start(xensim, *argv, pause=hold("drill-started"))
    ref = wait_until(lambda: running_drill(x), proc, timeout=120)
    assert ref is not None, proc.communicate()
    return x, before, proc, ref


@pytest.mark.parametrize("cleaner", ["repair", "drill"])
def test_a_drill_killed_after_the_start_is_cleaned_by_the_next_one(xensim, tmp_path, hold, cleaner):
    """SIGKILL (the OOM killer, a timeout's kill -9): the next repair, or the next drill
    before it starts its own, destroys what the dead one left."""
    repo = tmp_path / "repo"
    x, before, proc, ref = held_drill(xensim, repo, hold)
    # Apart from every other network: each VIF on the drill's own, which has no PIF.
    networks = {x.VIF.get_network(v) for v in x.VM.get_VIFs(ref)}
    (net,) = networks
    assert x.network.get_PIFs(net) == [] and MARK in x.network.get_other_config(net)
    assert len(x.VM.get_VIFs(ref)) == 2
    kill(proc)
    left = marked(x)
    assert len([m for m in left if m.startswith("VDI")]) == 2 and len(left) == 4, left
    if cleaner == "repair":
        r = xencbt(xensim, "repair", "--repo", str(repo))
        assert "destroyed what interrupted drills left" in r.stderr
    else:
        out, r = drill(xensim, repo)
        assert out["booted"] is True and "left by an interrupted drill" in r.stderr
    assert marked(x) == [] and pool_objects(x) == before


def test_a_drill_stopped_by_sigterm_cleans_up_itself_and_says_what(xensim, tmp_path, hold):
    repo = tmp_path / "repo"
    x, before, proc, _ = held_drill(xensim, repo, hold)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "drill interrupted by SIGTERM: destroyed VM" in err and "network" in err, err
    assert marked(x) == [] and pool_objects(x) == before
    assert not list(repo.glob("*/drills.json"))  # an interrupted drill proves nothing


def test_a_boot_disk_with_a_gpt_header_boots_with_a_network_mapped(xensim, tmp_path):
    """xensim's boot: the MBR signature (demo disks) or a GPT header at byte 512."""
    repo = tmp_path / "repo"
    vm = Vm(xensim)
    header = bytearray(BLOCK)
    header[512:520] = b"EFI PART"
    vm.write(0, {0: bytes(header)})
    backup(xensim, repo, "demo-vm")
    before = pool_objects(vm.x)
    # One network mapped by --network, the other on the drill's own: not isolated.
    out, _ = drill(xensim, repo, "--network", "NBD network=NBD network")
    assert out["booted"] is True and out["isolated"] is False and out["network"]
    assert pool_objects(vm.x) == before
