"""restore --salvage (issue #24 finding 7): a point that no longer reads back as recorded
is written all the same, the damaged ranges named from the point's chunk digests, and
the exit code says the file is salvaged, not restored."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cli_support import BLOCK, CHUNK, Vm, rand, xencbt
from qemu_images import own_data_offset


@pytest.fixture
def sim(xensim_factory):
    return xensim_factory(disk_sizes="2M", in_use_wait=0.2)


def backup(sim, repo: Path) -> str:
    r = xencbt(sim, "--json", "backup", "demo-vm", "--repo", str(repo))
    return json.loads(r.stdout)["vms"][0]["point"]


def flip(image: Path, guest_offset: int) -> None:
    """One byte of the image's own copy of a guest block, inverted."""
    where = own_data_offset(image, guest_offset)
    with open(image, "r+b") as f:
        f.seek(where)
        byte = f.read(1)
        f.seek(where)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_salvage_writes_every_readable_byte_and_names_the_damaged_range(sim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    vm.write(0, {0: rand(6 * BLOCK)})
    full = backup(sim, repo)
    at_full = bytes(vm.models[0])
    vm.write(0, {9 * BLOCK: rand(BLOCK)})  # the incremental changes another chunk
    newest = backup(sim, repo)
    model = bytes(vm.models[0])

    # One byte of block 5 of the full rots: block 5 lies in chunk 1 (4 blocks a chunk).
    flip(repo / vm.uuid / vm.uuids[0] / (full + ".qcow2"), 5 * BLOCK)
    out = tmp_path / "disk.raw"
    r = xencbt(sim, "restore", "--repo", str(repo), vm.uuids[0], "--to-file", str(out), check=4)
    assert "--salvage" in r.stderr and not out.exists()

    r = xencbt(sim, "--json", "restore", "--repo", str(repo), vm.uuids[0], "--to-file",
               str(out), "--salvage", check=8)  # fmt: skip
    shown = json.loads(r.stdout)
    assert shown["salvaged"] is True and shown["restored"]["point"] == newest
    assert shown["damaged"] == [{"offset": CHUNK, "length": CHUNK, "end": 2 * CHUNK - 1}]
    assert "SALVAGED: 1 damaged range" in r.stderr
    assert "damaged bytes %d-%d" % (CHUNK, 2 * CHUNK - 1) in r.stderr
    got = out.read_bytes()
    assert len(got) == len(model)
    assert got[:CHUNK] == model[:CHUNK] and got[2 * CHUNK :] == model[2 * CHUNK :]
    differ = [i for i in range(CHUNK, 2 * CHUNK) if got[i] != model[i]]
    assert len(differ) == 1 and differ[0] // BLOCK == 5  # the flipped byte, nothing else
    assert out.stat().st_mode & 0o777 == 0o600

    # The full itself, as qcow2: the same range; an existing file needs --force.
    qcow = tmp_path / "disk.qcow2"
    qcow.write_bytes(b"old")
    r = xencbt(sim, "restore", "--repo", str(repo), vm.uuids[0], "--at", full, "--to-file",
               str(qcow), "--salvage", check=1)  # fmt: skip
    assert "exists" in r.stderr and qcow.read_bytes() == b"old"
    xencbt(sim, "restore", "--repo", str(repo), vm.uuids[0], "--at", full, "--to-file",
           str(qcow), "--salvage", "--force", check=8)  # fmt: skip
    raw = tmp_path / "full.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(qcow), str(raw)], check=True)
    got = raw.read_bytes()
    assert got[:CHUNK] == at_full[:CHUNK] and got[2 * CHUNK :] == at_full[2 * CHUNK :]


def test_salvage_of_a_sound_point_is_a_restore_and_needs_a_file(sim, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(sim)
    vm.write(0, {0: rand(BLOCK)})
    backup(sim, repo)
    out = tmp_path / "disk.raw"
    r = xencbt(sim, "restore", "--repo", str(repo), vm.uuids[0], "--to-file", str(out),
               "--salvage")  # fmt: skip
    assert "every byte reads back as recorded" in r.stderr
    assert out.read_bytes() == bytes(vm.models[0])
    r = xencbt(sim, "restore", "--repo", str(repo), vm.uuids[0], "--to-sr", "x", "--salvage",
               check=2)  # fmt: skip
    assert "--salvage writes a file" in r.stderr
