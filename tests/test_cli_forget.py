"""xencbt forget --vm (issue #24 finding 9): a VM that is gone (restored under a new uuid
after a disaster) is retired from the repository, its points, chains and VM points,
after a confirmation; an unknown VM is refused and nothing is removed."""

from __future__ import annotations

import json

import pytest
from cli_support import BLOCK, Vm, rand, xencbt


@pytest.fixture
def sim(xensim_factory):
    return xensim_factory(disk_sizes="1M,1M", vms=2, in_use_wait=0.2)


def test_forget_removes_one_vm_and_leaves_the_other(sim, tmp_path):
    repo = tmp_path / "repo"
    x = sim.session().xenapi
    vms = [x.VM.get_record(r) for r in x.VM.get_all()]
    names = sorted(
        v["name_label"]
        for v in vms
        if not (v["is_a_template"] or v["is_control_domain"] or v["is_a_snapshot"])
    )
    assert len(names) == 2, names
    gone, kept = Vm(sim, names[0]), Vm(sim, names[1])
    for _ in range(2):
        gone.write(0, {0: rand(BLOCK)})
        xencbt(sim, "backup", *names, "--repo", str(repo))
    before = json.loads(xencbt(sim, "--json", "list", "--repo", str(repo)).stdout)
    kept_points = [v for v in before["vms"] if v["vm_uuid"] == kept.uuid]

    r = xencbt(sim, "forget", "--repo", str(repo), "--vm", "0123abcd", "--yes", check=1)
    assert "no VM 0123abcd in %s: nothing was removed" % repo in r.stderr
    # No terminal to ask on: --yes is needed, and nothing goes without it.
    r = xencbt(sim, "forget", "--repo", str(repo), "--vm", gone.uuid, check=2)
    assert "add --yes" in r.stderr and (repo / gone.uuid).is_dir()
    r = xencbt(sim, "forget", "--repo", str(repo), "--vm", gone.uuid, "--dry-run")
    assert r.stderr.startswith(
        "would remove VM %s (%s): 2 points of 2 disks" % (gone.name, gone.uuid)
    )
    assert (repo / gone.uuid).is_dir()

    r = xencbt(sim, "--json", "forget", "--repo", str(repo), "--vm", gone.uuid[:8], "--yes")
    done = json.loads(r.stdout)
    assert done["vm_uuid"] == gone.uuid and sorted(done["removed"]) == sorted(gone.uuids)
    assert all(len(points) == 2 for points in done["removed"].values())
    assert len(done["vm_points"]) == 2 and done["freed_bytes"] > 0
    assert "removed VM %s (%s)" % (gone.name, gone.uuid) in r.stderr
    assert not (repo / gone.uuid).exists()
    after = json.loads(xencbt(sim, "--json", "list", "--repo", str(repo)).stdout)
    assert [v["vm_uuid"] for v in after["vms"]] == [kept.uuid]
    assert [v for v in after["vms"] if v["vm_uuid"] == kept.uuid] == kept_points
    xencbt(sim, "verify", "--repo", str(repo))
    r = xencbt(sim, "forget", "--repo", str(repo), "--vm", gone.uuid, "--yes", check=1)
    assert "no VM %s" % gone.uuid in r.stderr
