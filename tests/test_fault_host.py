"""Host-side resets between backups: CBT switched off by a host crash, the CBT chain cut
by hand, the base snapshot destroyed by someone else, the disk grown, and these combined.

tests/test_cli_backup.py already checks the reason of a fallback in the JSON summary; here
every point of such a history must also carry its reason in its manifest and in
`xencbt list`, and restore byte-identical.
"""

from __future__ import annotations

import json

import pytest
from cli_support import BLOCK, Vm, rand, restored_sha, sha
from faultkit import run
from tally import tally

pytestmark = pytest.mark.reliability


@pytest.fixture
def sim(xensim_factory):
    return xensim_factory(disk_sizes="2M,1M+512", in_use_wait=0.2)


class History:
    """Backups of the demo VM, with the model of each disk at each point."""

    def __init__(self, sim, repo):
        self.sim = sim
        self.repo = repo
        self.vm = Vm(sim)
        self.points: list[tuple[str, list[str]]] = []

    def backup(self) -> tuple[list[dict], str]:
        r = run(self.sim, "--json", "backup", "demo-vm", "--repo", str(self.repo))
        assert r.returncode == 0, r
        (result,) = r.json()["vms"]
        self.points.append((result["point"], [sha(m) for m in self.vm.models]))
        return sorted(result["disks"], key=lambda d: d["userdevice"]), r.stderr

    def manifest(self, disk: int, point: str) -> dict:
        path = self.repo / self.vm.uuid / self.vm.uuids[disk] / (point + ".json")
        return json.loads(path.read_text())

    def check(self, disks: list[dict], stderr: str, expected: list[str | None]) -> None:
        """``expected``: per disk, None for an incremental, else a phrase of the reason."""
        for disk, (d, phrase) in enumerate(zip(disks, expected)):
            m = self.manifest(disk, d["point"])
            assert m["virtual_size"] == len(self.vm.models[disk])
            if phrase is None:
                assert (d["type"], m["type"], m["reason"]) == ("incremental",) * 2 + (None,)
                continue
            assert d["type"] == m["type"] == "full", d
            assert phrase in m["reason"] and m["reason"] == d["reason"], m
            assert "FULL backup: %s" % m["reason"] in stderr


def test_host_side_resets_full_or_incremental_with_the_reason(sim, tmp_path):
    h = History(sim, tmp_path / "repo")
    vm, x = h.vm, h.vm.x
    vm.write(0, {0: rand(2 * BLOCK)})
    vm.write(1, {BLOCK: rand(BLOCK)})
    h.check(*h.backup(), ["first backup"] * 2)

    # The host crashed: CBT is off on disk 0.
    sim.control.cbt_off(vm.uuids[0])
    vm.write(0, {5 * BLOCK: rand(BLOCK)})
    vm.write(1, {2 * BLOCK: rand(BLOCK)})
    h.check(*h.backup(), ["CBT was off", None])

    # Someone switched CBT off and on again on disk 1: its chain is cut (SR_BACKEND_FAILURE_460).
    x.VDI.disable_cbt(vm.vdis[1])
    x.VDI.enable_cbt(vm.vdis[1])
    vm.write(1, {3 * BLOCK: rand(BLOCK)})
    vm.write(0, {6 * BLOCK: rand(BLOCK)})
    h.check(*h.backup(), [None, "CBT chain is broken"])

    # Someone else destroyed the base snapshot (the CBT metadata VDI) of disk 0.
    base = h.manifest(0, h.points[-1][0])["snapshot_uuid"]
    x.VDI.destroy(x.VDI.get_by_uuid(base))
    vm.write(0, {7 * BLOCK: rand(BLOCK)})
    h.check(*h.backup(), ["base snapshot %s" % base, None])

    # Both disks grow; disk 0's host also crashes.  Writes land in the new regions.
    for disk in (0, 1):
        old = len(vm.models[disk])
        vm.resize(disk, old + 6 * BLOCK)
        vm.write(disk, {-(-old // BLOCK) * BLOCK + BLOCK: rand(BLOCK)})
    sim.control.cbt_off(vm.uuids[0])
    h.check(*h.backup(), ["CBT was off", None])

    listing = run(sim, "list", "--repo", str(h.repo)).stdout
    for reason in ("CBT was off", "CBT chain is broken", "no longer on the host"):
        assert reason in listing
    for point, digests in h.points:
        for disk, uuid in enumerate(vm.uuids):
            assert restored_sha(sim, h.repo, tmp_path, uuid, point) == digests[disk], point
    assert run(sim, "verify", "--repo", str(h.repo)).returncode == 0
    tally("faults injected", 5)
