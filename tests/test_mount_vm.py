"""Mounting with the Linux kernel's NBD client, proven in a VM (tests/vmharness.py).

(a) the plugin's re-export of a simulator snapshot, (b) a backup point served by
``xencbt serve`` after an incremental changed some files.  In both the guest mounts the
ext4 file system read-only through ``nbd-client`` and prints the sha256 of every file;
they must equal the checksums of the originals computed here.

``XENCBT_VM_SABOTAGE=1`` alters one expected checksum: both tests must then fail (a
check that the comparison is real; never set in CI).
"""

from __future__ import annotations

import hashlib
import os
from urllib.parse import urlparse

import pytest
import servers
import vmharness
from cli_support import Vm, backup
from vmdisk import Ext4, serving

DISK = 24 << 20


@pytest.fixture(scope="module")
def vm() -> vmharness.Vm:
    return vmharness.build()


def original_files() -> dict[str, bytes]:
    return {
        "hello.txt": b"Hello from a guest file system.\n",
        "notes/todo.txt": b"version 1\n" * 50,
        "data/random.bin": os.urandom(700_000),
        "data/keep.bin": os.urandom(200_000),
        "empty": b"",
    }


def expected(fs: Ext4) -> dict[str, str]:
    sums = fs.sums()
    if os.environ.get("XENCBT_VM_SABOTAGE"):
        first = sorted(sums)[0]
        sums[first] = hashlib.sha256(b"deliberately wrong").hexdigest()
    return sums


def test_plugin_reexport_of_a_snapshot_mounts(vm, xensim_factory, tmp_path):
    sim = xensim_factory(disk_sizes="24M")
    disk = Vm(sim)
    fs = Ext4(tmp_path, DISK, original_files())
    fs.write_to(sim, disk.uuids[0])
    snap = disk.x.VDI.get_uuid(disk.x.VDI.snapshot(disk.vdis[0], {}))

    port = servers.free_port()
    pidfile = tmp_path / "nbdkit.pid"
    params = [
        "xapi=%s" % sim.info["xapi"],
        "password=+%s" % sim.info["password_file"],
        "xapi-cafile=%s" % sim.info["ca_file"],
        "vdi=%s" % snap,
    ]
    argv = ["nbdkit", "-f", "--exit-with-parent", "--readonly", "-i", "127.0.0.1"]
    argv += ["-p", str(port), "-P", str(pidfile), "python", str(servers.PLUGIN), *params]
    with servers._process(argv, pidfile):
        guest = vm.mount_and_hash(port)

    assert "XENCBT-MOUNTED" in guest.log
    assert guest.sums == expected(fs), guest.log[-2000:]


def test_incremental_point_served_by_xencbt_mounts(vm, xensim_factory, tmp_path):
    sim = xensim_factory(disk_sizes="24M")
    disk = Vm(sim)
    repo = tmp_path / "repo"
    fs = Ext4(tmp_path, DISK, original_files())
    fs.write_to(sim, disk.uuids[0])
    backup(sim, repo, "demo-vm")
    old = fs.sums()

    # Changed, added and removed files; data/keep.bin and empty stay.  The file system
    # is marked as needing journal recovery, as a snapshot of a mounted one is: the
    # read-only device then mounts only with -o noload (the README's recipe).
    fs.edit(
        {
            "notes/todo.txt": b"version 2\n" * 80,
            "data/random.bin": os.urandom(700_000),
            "data/added.bin": os.urandom(100_000),
            "hello.txt": None,
        },
        extra=["feature needs_recovery"],
    )
    fs.write_to(sim, disk.uuids[0])
    incr = backup(sim, repo, "demo-vm")["vms"][0]["disks"][0]
    assert incr["type"] == "incremental" and incr["changed_bytes"] < DISK // 4

    listen = "tcp:127.0.0.1:0"
    with serving(
        sim, "--repo", str(repo), disk.uuids[0], "--at", incr["point"], "--listen", listen
    ) as (
        info,
        _,
    ):
        assert info["point"] == incr["point"]
        guest = vm.mount_and_hash(urlparse(info["uri"]).port)

    want = expected(fs)
    assert guest.sums == want, guest.log[-2000:]
    for path in ("notes/todo.txt", "data/random.bin"):
        assert guest.sums[path] != old[path]  # new contents
    for path in ("data/keep.bin", "empty"):
        assert guest.sums[path] == old[path]  # the full point's contents, through the chain
    assert "hello.txt" not in guest.sums
