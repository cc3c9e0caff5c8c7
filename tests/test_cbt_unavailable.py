"""Issue #12 item 4: a disk that cannot have CBT is backed up in full every time, with the
reason in the output, the manifest and ``xencbt list``, instead of failing the VM.

Through the real ``xencbt backup``; each restored point is compared byte for byte with
the simulator's raw VDI file as it was when the point was taken.
"""

from __future__ import annotations

import json

import pytest
import xapirec
import XenAPI
from cli_support import BLOCK, Vm, backup, disk_rows, rand, restored, xencbt


@pytest.fixture
def sim(xensim_factory):
    return xensim_factory(disk_sizes="2M,1M+512", in_use_wait=0.5)


def raw(sim, uuid: str, size: int) -> bytes:
    data = (sim.state_dir / "vdis" / ("%s.raw" % uuid)).read_bytes()
    return data + bytes(size - len(data))


def snapshots_left(vm: Vm) -> list[dict]:
    x = vm.x
    vdis = [v for v in x.VDI.get_all_records().values() if v["is_a_snapshot"]]
    vms = [v for v in x.VM.get_all_records().values() if v["is_a_snapshot"]]
    return vdis + vms


def no_cbt_pool(sim, vm: Vm, case: str) -> None:
    if case == "licence":
        sim.control.set_licence(cbt=False)
    else:
        sim.control.set_sr_cbt(vm.x.VDI.get_SR(vm.vdis[0]), supported=False)


@pytest.mark.parametrize(
    "case, code",
    [("licence", "LICENCE_RESTRICTION"), ("sr", "SR_OPERATION_NOT_SUPPORTED")],
)
def test_disks_without_cbt_are_backed_up_in_full_every_time(sim, tmp_path, case, code):
    vm = Vm(sim)
    repo = tmp_path / "repo"
    no_cbt_pool(sim, vm, case)
    points = []  # (point, [expected bytes per disk])
    for round_ in range(2):
        vm.write(0, {round_ * BLOCK: rand(BLOCK)})
        vm.write(1, {0: rand(512)})
        r = xencbt(sim, "--json", "backup", "demo-vm", "--repo", str(repo))
        (res,) = json.loads(r.stdout)["vms"]
        assert res["ok"], res
        for d in res["disks"]:
            assert d["type"] == "full"
            assert code in d["reason"] and "in full every time" in d["reason"]
        assert code in r.stderr  # said as it happens
        truth = [raw(sim, u, len(m)) for u, m in zip(vm.uuids, vm.models)]
        assert truth == [bytes(m) for m in vm.models]  # the model agrees with the host
        points.append((res["point"], truth))
        assert snapshots_left(vm) == []  # no CBT log to keep: every snapshot is gone
        assert not vm.x.VDI.get_cbt_enabled(vm.vdis[0])
    rows = disk_rows(json.loads(xencbt(sim, "--json", "list", "--repo", str(repo)).stdout))
    assert {r["type"] for r in rows} == {"full"} and all(code in r["reason"] for r in rows)
    text = xencbt(sim, "list", "--repo", str(repo)).stdout
    assert code in text
    for point, truth in points:
        for uuid, data in zip(vm.uuids, truth):
            assert restored(sim, repo, tmp_path, uuid, point) == data


def test_licence_back_means_incrementals_again(sim, tmp_path):
    vm = Vm(sim)
    repo = tmp_path / "repo"
    sim.control.set_licence(cbt=False)
    assert {d["type"] for d in backup(sim, repo, "demo-vm")["vms"][0]["disks"]} == {"full"}
    sim.control.set_licence(cbt=True)
    first = backup(sim, repo, "demo-vm")["vms"][0]["disks"]
    assert {d["type"] for d in first} == {"full"}  # CBT just switched on: nothing to diff
    vm.write(0, {BLOCK: rand(BLOCK)})
    (res,) = backup(sim, repo, "demo-vm")["vms"]
    assert [d["type"] for d in res["disks"]] == ["incremental", "incremental"]
    assert restored(sim, repo, tmp_path, vm.uuids[0]) == raw(sim, vm.uuids[0], len(vm.models[0]))


@pytest.mark.parametrize("case", ["raw", "reset"])
def test_disk_the_host_cannot_snapshot_fails_its_vm_with_one_clear_line(sim, tmp_path, case):
    """Raw and reset-on-boot VDIs refuse CBT *and* snapshots (xapi_vdi.ml, sm), so
    VM.snapshot fails: the VM cannot be backed up and xencbt says why, leaving nothing."""
    vm = Vm(sim)
    x = vm.x
    if case == "raw":
        sr = x.VDI.get_SR(vm.vdis[0])
        fields = {"SR": sr, "virtual_size": str(1 << 20), "type": "user"}
        fields.update(name_label="raw disk", sm_config={"type": "raw"})
        fields.update(sharable=False, read_only=False, other_config={})
        vdi = x.VDI.create(fields)
        x.VBD.create(xapirec.vbd(vm.ref, vdi, "2"))
        code, what = "SR_BACKEND_FAILURE_66", "the VDI is raw"
    else:
        vdi = vm.vdis[1]
        x.VDI.set_on_boot(vdi, "reset")
        code, what = "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION", "reset on boot"
    uuid = x.VDI.get_uuid(vdi)
    with pytest.raises(XenAPI.Failure) as e:
        x.VDI.enable_cbt(vdi)
    assert e.value.details[0] == code
    with pytest.raises(XenAPI.Failure) as e:
        x.VM.snapshot(vm.ref, "by hand")
    assert e.value.details[0] == ("SR_BACKEND_FAILURE_38" if case == "raw" else code)
    r = xencbt(sim, "--json", "backup", "demo-vm", "--repo", str(tmp_path / "repo"), check=1)
    (res,) = json.loads(r.stdout)["vms"]
    assert not res["ok"]
    assert uuid in res["error"] and code in res["error"] and what in res["error"]
    assert "\n" not in res["error"]
    assert snapshots_left(vm) == []
