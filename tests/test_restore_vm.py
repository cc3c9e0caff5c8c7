"""VM points and ``xencbt restore-vm`` through the real CLI on the simulator: a whole VM
(2 disks, 2 VIFs on different networks, a vTPM, an empty CD drive) comes back after a
disaster, beside its original, and in another pool; every disk byte-identical to the
simulator's raw data captured at backup time (not the product's digest)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import stat
import time
from pathlib import Path

import pytest
import XenAPI
from cli_support import BLOCK, backup, rand, xencbt
from crash_support import kill, kills_per_point, start, stop, wait_until
from vm_restore import (
    SR,
    check_disks,
    destroy_vm_and_disks,
    pool_state,
    prepared,
    restore_vm,
    snapshot_of_vm,
)


def test_vm_point_holds_the_configuration_privately_and_is_listed(xensim, tmp_path):
    repo = tmp_path / "repo"
    vm, before, _ = prepared(xensim, repo)
    points = repo / vm.uuid / "points"
    manifests = sorted(points.glob("*Z.json"))
    assert len(manifests) == 1
    manifest = json.loads(manifests[0].read_text())
    assert sorted(d["userdevice"] for d in manifest["disks"]) == ["0", "1"]
    config = points / manifest["config"]
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    records = json.loads(config.read_text())
    assert records["vtpms"][0]["contents"] == before["vtpm"][0]
    assert {v["network"]["name_label"] for v in records["vifs"]} == {
        n for _, n in before["vifs"].values()
    }
    assert [r["type"] for r in records["vbds"] if r["empty"]] == ["CD"]
    text = xencbt(xensim, "list", "--repo", str(repo)).stdout
    assert "VM point %s" % manifest["point"] in text and before["vtpm"][0] not in text
    listed = json.loads(xencbt(xensim, "--json", "list", "--repo", str(repo)).stdout)
    (vm_row,) = listed["vms"]  # the same structure as the text: VM > points > disks
    (point,) = vm_row["points"]
    assert (vm_row["vm_uuid"], point["point"], point["vm_point"]) == (
        vm.uuid,
        manifest["point"],
        True,
    )
    assert [(d["userdevice"], d["vdi_uuid"]) for d in point["disks"]] == sorted(
        (d["userdevice"], d["vdi_uuid"]) for d in manifest["disks"]
    )
    xencbt(xensim, "verify", "--repo", str(repo))
    records["vm"]["VCPUs_max"] = "8"  # a change that still parses: only the sha256 tells
    config.write_text(json.dumps(records))
    r = xencbt(xensim, "verify", "--repo", str(repo), check=4)
    assert "configuration" in r.stdout and before["vtpm"][0] not in r.stderr + r.stdout


def test_restore_vm_after_disaster_is_the_same_vm_with_the_same_macs(xensim, tmp_path):
    repo = tmp_path / "repo"
    vm, before, truth = prepared(xensim, repo)
    destroy_vm_and_disks(vm.x, vm.ref)
    out, r = restore_vm(xensim, repo)
    assert out["macs_changed"] is False and not out["started"]
    new = snapshot_of_vm(vm.x, vm.x.VM.get_by_uuid(out["vm_uuid"]))
    for key in ("name", "config", "vifs", "vtpm"):
        assert new[key] == before[key], key
    assert {d: v[:3] for d, v in new["vbds"].items()} == {
        d: v[:3] for d, v in before["vbds"].items()
    }
    assert new["power"] == "Halted" and new["blocked"] == {}
    check_disks(xensim, vm.x, new, truth)
    assert before["vtpm"][0] not in r.stdout + r.stderr


def test_restore_vm_from_a_second_copy_made_by_xencbt_copy(xensim, tmp_path):
    """#15's copy carries the VM points: after a disaster the second repository alone
    rebuilds the same VM (its disks are DST's, recompressed, as the point had them)."""
    repo, second = tmp_path / "repo", tmp_path / "second"
    vm, before, truth = prepared(xensim, repo)
    xencbt(xensim, "init", "--repo", str(second), "--compression", "none")
    xencbt(xensim, "copy", "--repo", str(repo), "--to", str(second))
    destroy_vm_and_disks(vm.x, vm.ref)
    out, _ = restore_vm(xensim, second)
    new = snapshot_of_vm(vm.x, vm.x.VM.get_by_uuid(out["vm_uuid"]))
    for key in ("name", "config", "vifs", "vtpm"):
        assert new[key] == before[key], key
    check_disks(xensim, vm.x, new, truth)


def test_restore_vm_beside_the_original_gets_new_macs_and_can_start(xensim, tmp_path):
    repo = tmp_path / "repo"
    vm, before, truth = prepared(xensim, repo)
    out, r = restore_vm(xensim, repo, "--name", "copy", "--start")
    assert out["macs_changed"] is True and "new MAC" in r.stderr
    new = snapshot_of_vm(vm.x, vm.x.VM.get_by_uuid(out["vm_uuid"]))
    assert new["name"] == "copy" and new["power"] == "Running"
    assert sorted(new["vifs"]) == sorted(before["vifs"])
    for device, (mac, network) in new["vifs"].items():
        assert mac != before["vifs"][device][0] and network == before["vifs"][device][1]
    check_disks(xensim, vm.x, new, truth)


def test_restore_vm_into_another_pool_maps_networks_or_refuses(xensim_factory, tmp_path):
    repo = tmp_path / "repo"
    first = xensim_factory()
    vm, before, truth = prepared(first, repo)
    second = xensim_factory()
    x = second.session().xenapi
    x.network.set_name_label(x.network.get_by_name_label("NBD network")[0], "storage")
    vms, vdis = set(x.VM.get_all()), set(x.VDI.get_all())
    out, r = restore_vm(second, repo, check=1)
    assert (
        "NBD network" in r.stderr and "--network" in r.stderr and "nothing was created" in r.stderr
    )
    assert set(x.VM.get_all()) == vms and set(x.VDI.get_all()) == vdis
    out, _ = restore_vm(second, repo, "--network", "NBD network=storage")
    new = snapshot_of_vm(x, x.VM.get_by_uuid(out["vm_uuid"]))
    assert out["macs_changed"] is False and new["config"] == before["config"]
    assert {d: mac for d, (mac, _) in new["vifs"].items()} == {
        d: mac for d, (mac, _) in before["vifs"].items()
    }
    assert sorted(n for _, n in new["vifs"].values()) == sorted(
        ["Pool-wide network associated with eth0", "storage"]
    )
    check_disks(second, x, new, truth)


def test_prune_removes_a_vm_point_with_its_disks_and_keeps_the_newer_ones(xensim, tmp_path):
    repo = tmp_path / "repo"
    vm, _, _ = prepared(xensim, repo)
    vm.write(0, {2 * BLOCK: rand(BLOCK)})
    second = backup(xensim, repo, "demo-vm")["vms"][0]["point"]
    points = repo / vm.uuid / "points"
    assert len(list(points.glob("*Z.json"))) == 2
    xencbt(xensim, "prune", "--repo", str(repo), "--keep", "1")
    assert sorted(p.name for p in points.iterdir()) == [
        second + ".config.json",
        second + ".json",
    ]
    xencbt(xensim, "verify", "--repo", str(repo))


def repository_state(repo: Path) -> dict[str, str]:
    return {
        str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(repo.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def marked(x) -> list[str]:
    found = []
    for cls in (x.VM, x.VDI):
        for rec in cls.get_all_records().values():
            if "xencbt-restore" in rec["other_config"]:
                found.append(rec["uuid"])
    return found


def discard_restored(x, before: tuple[set, set], vbds: int) -> int:
    """Destroy whole VMs a run completed before its kill (unmarked, unblocked, with the
    ``vbds`` VBDs of the original)."""
    vms, _ = pool_state(x)
    for ref in vms - before[0]:
        rec = x.VM.get_record(ref)
        assert "xencbt-restore" not in rec["other_config"] and rec["blocked_operations"] == {}
        assert len(rec["VIFs"]) == 2 and len(rec["VTPMs"]) == 1 and len(rec["VBDs"]) == vbds
        destroy_vm_and_disks(x, ref)
    return len(vms - before[0])


def test_restore_vm_killed_at_random_moments_leaves_nothing_after_repair(xensim, tmp_path):
    repo = tmp_path / "repo"
    vm, original, _ = prepared(xensim, repo)
    vbds = len(original["vbds"])
    x = vm.x
    destroy_vm_and_disks(x, vm.ref)
    xensim.control.set_api_latency({m: 0.05 for m in ("VBD.create", "VIF.create", "VTPM.create")})
    files, before = repository_state(repo), pool_state(x)
    t0 = time.monotonic()
    out, _ = restore_vm(xensim, repo)
    duration = time.monotonic() - t0
    discard_restored(x, before, vbds)
    runs, landed = max(10, kills_per_point()), 0
    for run in range(runs):
        proc = start(xensim, "restore-vm", "--repo", str(repo), "demo-vm", "--to-sr", SR)
        time.sleep(random.uniform(0.3, duration))  # the kill moment, not a poll
        if stop(proc):
            kill(proc)
            landed += bool(marked(x))
        else:
            assert proc.wait(timeout=120) == 0, proc.stderr.read()
        if run % 2:
            xencbt(xensim, "repair", "--repo", str(repo))
        else:  # the next restore-vm cleans up first, then restores whole
            restore_vm(xensim, repo)
        assert marked(x) == []
        discard_restored(x, before, vbds)
        assert pool_state(x) == before
        assert repository_state(repo) == files
    print("restore-vm: %d of %d kills landed while a VM was being built" % (landed, runs))
    assert landed >= runs // 3, "too few kills landed inside restore-vm's building"


def building(x) -> str | None:
    """The VM a restore-vm run is building, once its first VBD exists."""
    for ref, rec in x.VM.get_all_records().items():
        if "xencbt-restore" in rec["other_config"] and rec["VBDs"]:
            return ref
    return None


def test_restore_vm_cannot_be_started_while_built_and_sigterm_undoes_it(xensim, tmp_path):
    repo = tmp_path / "repo"
    vm, _, _ = prepared(xensim, repo)
    x = vm.x
    before = pool_state(x)
    xensim.control.set_api_latency({"VBD.create": 0.5})
    proc = start(xensim, "restore-vm", "--repo", str(repo), "demo-vm", "--to-sr", SR)
    ref = wait_until(lambda: building(x), proc)
    assert ref is not None, proc.communicate()
    assert stop(proc)
    with pytest.raises(XenAPI.Failure) as info:
        x.VM.start(ref, False, False)  # blocked while it is being built
    assert info.value.details[0] == "OPERATION_BLOCKED"
    os.kill(proc.pid, signal.SIGCONT)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err  # 128 + SIGTERM, as #13 has it
    assert "destroying what it created" in err
    assert marked(x) == [] and pool_state(x) == before  # no repair needed


def test_restore_vm_failure_destroys_what_it_created(xensim, tmp_path):
    repo = tmp_path / "repo"
    vm, _, _ = prepared(xensim, repo)
    x = vm.x
    before = pool_state(x)
    xensim.control.fail_imports_after(BLOCK)  # the host fails the first import
    out, r = restore_vm(xensim, repo, check=1)
    assert out["exit_code"] == 1 and "destroying what it created" in r.stderr
    assert marked(x) == [] and pool_state(x) == before


def test_killed_after_the_disks_lost_their_mark_repair_still_takes_them(xensim, tmp_path, hold):
    """The VM's mark goes last: a run killed just before leaves a marked VM whose disks
    are no longer marked, and repair destroys them with it."""
    repo = tmp_path / "repo"
    vm, _, _ = prepared(xensim, repo)
    x = vm.x
    before = pool_state(x)
    proc = start(
        xensim,
        "restore-vm",
        "--repo",
        str(repo),
        "demo-vm",
        "--to-sr",
        SR,
        pause=hold("restore-vm-commit"),
    )

    def committing():
        ref = building(x)
        if ref is None or x.VM.get_blocked_operations(ref):
            return None
        disks = [x.VBD.get_VDI(v) for v in x.VM.get_VBDs(ref) if x.VBD.get_type(v) == "Disk"]
        return all("xencbt-restore" not in x.VDI.get_other_config(d) for d in disks)

    assert wait_until(committing, proc, timeout=120), proc.communicate()
    kill(proc)
    assert len(marked(x)) == 1  # the VM alone
    xencbt(xensim, "repair", "--repo", str(repo))
    assert marked(x) == [] and pool_state(x) == before


def test_a_configuration_without_its_vm_manifest_is_no_vm_point_and_goes(xensim, tmp_path):
    repo = tmp_path / "repo"
    vm, _, _ = prepared(xensim, repo)
    points = repo / vm.uuid / "points"
    (manifest,) = points.glob("*Z.json")
    manifest.unlink()  # as a run killed between the configuration and the manifest
    text = xencbt(xensim, "list", "--repo", str(repo)).stdout
    assert "VM point" not in text and "disk points only, no VM configuration" in text
    backup(xensim, repo, "demo-vm")  # the next backup removes the stray configuration
    assert len(list(points.glob("*.config.json"))) == len(list(points.glob("*Z.json"))) == 1


def test_a_network_mapping_that_matches_no_network_of_the_point_is_refused(xensim, tmp_path):
    """#24 finding 3: --network FROM=TO whose FROM is none of the VM point's networks is
    an error before anything is created, not a mapping silently ignored."""
    repo = tmp_path / "repo"
    vm, before, _ = prepared(xensim, repo)
    pool = (set(vm.x.VM.get_all()), set(vm.x.VDI.get_all()), set(vm.x.VIF.get_all()))
    mapping = "Pool-wide network associated with eth9=NBD network"
    out, r = restore_vm(xensim, repo, "--name", "copy", "--network", mapping, check=1)
    (line,) = r.stderr.splitlines()
    assert "eth9" in line and "nothing was created" in line, line
    for _, network in before["vifs"].values():  # the point's networks, to choose from
        assert network in line, line
    assert (set(vm.x.VM.get_all()), set(vm.x.VDI.get_all()), set(vm.x.VIF.get_all())) == pool


def test_restore_beside_the_original_keeps_names_unique_and_backup_by_name_goes_on(
    xensim, tmp_path
):
    """#24 finding 4: without --name, a VM restored beside its original is named
    "NAME (restored POINT)", its disks after it; and when two VMs share a name, backup by
    name takes the one with points in the repository and says so, or names their uuids."""
    repo = tmp_path / "repo"
    vm, before, truth = prepared(xensim, repo)
    x = vm.x
    out, r = restore_vm(xensim, repo)
    name = "demo-vm (restored %s)" % out["point"]
    assert out["name"] == name and name in r.stderr
    ref = x.VM.get_by_uuid(out["vm_uuid"])
    new = snapshot_of_vm(x, ref)
    assert new["name"] == name
    check_disks(xensim, x, new, truth)
    disks = [v for kind, _, _, v in new["vbds"].values() if kind == "Disk"]
    assert sorted(x.VDI.get_name_label(x.VDI.get_by_uuid(v)) for v in disks) == [
        name + " disk 0",
        name + " disk 1",
    ]
    assert x.VM.get_name_label(vm.ref) == "demo-vm"  # the original is left alone
    again, _ = restore_vm(xensim, repo)  # the same point once more: still unique
    assert again["name"] not in ("demo-vm", name) and again["name"].startswith(name[:-1])
    assert len(x.VM.get_by_name_label(again["name"])) == 1
    x.VM.destroy(x.VM.get_by_uuid(again["vm_uuid"]))

    # Two VMs named demo-vm (the restored one renamed by hand): the nightly backup by
    # name takes the one with points in the repository and says which.
    x.VM.set_name_label(ref, "demo-vm")
    r = xencbt(xensim, "--json", "backup", "demo-vm", "--repo", str(repo))
    (done,) = json.loads(r.stdout)["vms"]
    assert done["ok"] and done["vm_uuid"] == vm.uuid
    assert out["vm_uuid"] in r.stderr and "points in" in r.stderr, r.stderr
    # A repository where neither has points: that VM fails, naming both uuids.
    r = xencbt(xensim, "backup", "demo-vm", "--repo", str(tmp_path / "other"), check=1)
    assert vm.uuid in r.stderr and out["vm_uuid"] in r.stderr and "uuid" in r.stderr
