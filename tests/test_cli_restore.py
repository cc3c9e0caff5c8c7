"""xencbt restore into the pool: --to-sr (a new VDI) and --to-vdi (only differing blocks)."""

from __future__ import annotations

import json

import nbd
import pytest
from cli_support import BLOCK, CHUNK, Vm, backup, content, rand, sha, xencbt
from encrypt_support import init_encrypted, make_key
from qemu_images import image_info, own_data_offset


def read_vdi(sim, uuid: str, size: int) -> bytes:
    with sim.guest_disk(uuid) as uri:
        h = nbd.NBD()
        h.connect_uri(uri)
        data = h.pread(size, 0)
        h.shutdown()
    return data


@pytest.mark.parametrize("encrypted", [False, True], ids=["clear", "encrypted"])
def test_restore_to_sr_and_to_vdi(xensim_factory, tmp_path, monkeypatch, encrypted):
    """Encrypted: the chain is read through its LUKS layers (the key as XENCBT_KEY_FILE)."""
    sim = xensim_factory(disk_sizes="1M+512", in_use_wait=0.5)
    repo = tmp_path / "repo"
    if encrypted:
        key = make_key(tmp_path / "repo.key")
        init_encrypted(sim, repo, key)
        monkeypatch.setenv("XENCBT_KEY_FILE", str(key))
    vm = Vm(sim)
    size = len(vm.models[0])
    vm.write(0, {0: rand(2 * BLOCK), 7 * BLOCK: rand(BLOCK), size - 512: rand(512)})
    first = backup(sim, repo, "demo-vm")["vms"][0]["disks"][0]
    point = repo / vm.uuid / vm.uuids[0] / (first["point"] + ".qcow2")
    assert image_info(point).get("encrypted", False) is encrypted
    old = bytes(vm.models[0])
    vm.write(0, {BLOCK: rand(BLOCK), 12 * BLOCK: rand(BLOCK)})
    backup(sim, repo, "demo-vm")

    sr = vm.x.VDI.get_SR(vm.vdis[0])
    r = xencbt(
        sim,
        "--json",
        "restore",
        "--repo",
        str(repo),
        vm.uuids[0],
        "--at",
        first["point"],
        "--to-sr",
        vm.x.SR.get_uuid(sr),
    )
    new_uuid = json.loads(r.stdout)["to"]
    assert new_uuid != vm.uuids[0]
    assert sha(read_vdi(sim, new_uuid, size)) == sha(old)

    # Back to the first point in place: only the two blocks changed since are written,
    # which the next backup's CBT diff shows.  The simulated VM runs: --force.
    xencbt(
        sim,
        "restore",
        "--repo",
        str(repo),
        vm.uuids[0],
        "--at",
        first["point"],
        "--to-vdi",
        vm.uuids[0],
        "--force",
    )
    assert sha(read_vdi(sim, vm.uuids[0], size)) == sha(old)
    vm.models[0][:] = old
    again = backup(sim, repo, "demo-vm")["vms"][0]["disks"][0]
    assert again["type"] == "incremental" and again["changed_bytes"] == 2 * BLOCK
    assert again["digest"] == content(old)


def rot(path, guest_offset: int) -> None:
    """Four bytes of the image's own copy of a guest block change (bit rot)."""
    with open(path, "r+b") as f:
        f.seek(own_data_offset(path, guest_offset) + 100)
        f.write(b"\xde\xad\xbe\xef")


def test_damaged_point_is_refused_into_the_pool_and_nothing_is_written(xensim_factory, tmp_path):
    sim = xensim_factory(disk_sizes="1M+512", in_use_wait=0.5)
    repo = tmp_path / "repo"
    vm = Vm(sim)
    size = len(vm.models[0])
    vm.write(0, {0: rand(BLOCK), 9 * BLOCK: rand(BLOCK)})
    first = backup(sim, repo, "demo-vm")["vms"][0]["disks"][0]
    rot(repo / vm.uuid / vm.uuids[0] / (first["point"] + ".qcow2"), 9 * BLOCK)
    vdis_before = set(vm.x.VDI.get_all())
    sr = vm.x.SR.get_uuid(vm.x.VDI.get_SR(vm.vdis[0]))
    r = xencbt(sim, "restore", "--repo", str(repo), vm.uuids[0], "--to-sr", sr, check=4)
    chunk = 9 * BLOCK // CHUNK * CHUNK
    assert "does not read back as recorded (bytes %d-%d " % (chunk, chunk + CHUNK - 1) in r.stderr
    assert "the new VDI is destroyed" in r.stderr and "Traceback" not in r.stderr
    assert set(vm.x.VDI.get_all()) == vdis_before

    vm.write(0, {3 * BLOCK: rand(BLOCK)})
    current = bytes(vm.models[0])
    args = ("restore", "--repo", str(repo), vm.uuids[0], "--to-vdi", vm.uuids[0], "--force")
    r = xencbt(sim, *args, check=4)
    assert "nothing was written to VDI %s" % vm.uuids[0] in r.stderr
    assert read_vdi(sim, vm.uuids[0], size) == current
