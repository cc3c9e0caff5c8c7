"""restore --to-vdi refuses to overwrite a disk in use or of another VM (issue #13 item 7).

Refused unless --force: a VDI attached to a running VM (the point's own VM included),
a VDI of a VM other than the one the point was taken from (running or not, plugged or
not).  Allowed: a VDI no VM has, or one of the point's own VM that is not attached.
A refusal names what would be overwritten and writes nothing (the simulator's raw file
of the target is compared byte for byte).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import xapirec
from cli_support import BLOCK, Vm, backup, rand, xencbt

SIZE = "1M+512"


@pytest.fixture
def pool(xensim_factory, tmp_path):
    """Two running VMs; a point of demo-vm's disk 0."""
    sim = xensim_factory(disk_sizes=SIZE, vms=2, in_use_wait=0.2)
    vm, other = Vm(sim), Vm(sim, "demo-vm-2")
    vm.write(0, {0: rand(BLOCK), 5 * BLOCK: rand(BLOCK)})
    other.write(0, {0: rand(2 * BLOCK)})
    repo = tmp_path / "repo"
    point = backup(sim, repo, "demo-vm")["vms"][0]["disks"][0]
    return sim, vm, other, repo, point


def raw(sim, uuid: str) -> bytes:
    """The VDI's bytes as the simulated host stores them."""
    path = Path(sim.state_dir, "vdis", uuid + ".raw")
    return path.read_bytes() if path.exists() else b""


def padded(data: bytes, size: int) -> bytes:
    """The first ``size`` bytes of a sparse raw file (a new VDI may be rounded up)."""
    return data[:size] + bytes(max(0, size - len(data)))


def scratch(vm: Vm, size: int, attach_to: Vm | None = None) -> str:
    """A new VDI of ``size`` bytes; with ``attach_to`` a VBD of that VM (created, not
    plugged: currently_attached is false, as after xapi's VBD.create)."""
    x = vm.x
    ref = x.VDI.create(xapirec.vdi(x.VDI.get_SR(vm.vdis[0]), size, "scratch"))
    if attach_to is not None:
        x.VBD.create(xapirec.vbd(attach_to.ref, ref, "3", unpluggable=True))
    return x.VDI.get_uuid(ref)


def restore(sim, repo, point, target: str, *extra: str, check: int | None = 0):
    args = ("restore", "--repo", str(repo), point["vdi_uuid"], "--to-vdi", target, *extra)
    return xencbt(sim, *args, check=check)


def refused(sim, repo, point, target: str) -> str:
    before = raw(sim, target)
    r = restore(sim, repo, point, target, check=1)
    assert raw(sim, target) == before, "a refused restore wrote to the VDI"
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("xencbt: refusing to overwrite VDI %s " % target), line
    assert "--force" in line and "Traceback" not in r.stderr
    return line


def test_disk_of_another_running_vm_is_refused(pool):
    sim, vm, other, repo, point = pool
    line = refused(sim, repo, point, other.uuids[0])
    assert "disk 0 of the running VM demo-vm-2 (%s, running)" % other.uuid in line, line
    assert "point %s of VM demo-vm (%s)" % (point["point"], vm.uuid) in line, line


def test_disk_of_another_vm_is_refused_even_unplugged(pool):
    sim, vm, other, repo, point = pool
    target = scratch(vm, len(vm.models[0]), attach_to=other)
    line = refused(sim, repo, point, target)
    assert "it is disk 3 of VM demo-vm-2 (%s, running)" % other.uuid in line, line
    assert "the running" not in line, line


def test_attached_disk_of_the_running_vm_itself_needs_force(pool):
    sim, vm, other, repo, point = pool
    at_point = bytes(vm.models[0])
    vm.write(0, {5 * BLOCK: rand(BLOCK)})  # the guest wrote since the point
    line = refused(sim, repo, point, vm.uuids[0])
    assert "disk 0 of the running VM demo-vm (%s, running)" % vm.uuid in line, line
    restore(sim, repo, point, vm.uuids[0], "--force")
    assert padded(raw(sim, vm.uuids[0]), len(at_point)) == at_point


@pytest.mark.parametrize("attached_to_own_vm", [False, True])
def test_free_disk_is_overwritten_without_force(pool, attached_to_own_vm):
    sim, vm, other, repo, point = pool
    target = scratch(vm, len(vm.models[0]), attach_to=vm if attached_to_own_vm else None)
    restore(sim, repo, point, target)
    model = bytes(vm.models[0])
    assert padded(raw(sim, target), len(model)) == model
