"""The plugin against the simulated pool: XAPI login, snapshots, CBT, faults.

Guest writes go through `xensim guest-disk` (libnbd), so CBT marks exactly what a guest
would; a local model of the disk is the ground truth every copy is compared with.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
from pathlib import Path

import nbd
import pytest
from qemu_images import flatten, top_blocks
from servers import plugin_server, qemu_nbd_rw, run_plugin

BLOCK = 64 * 1024


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


class Disk:
    """A VDI of the demo VM, its guest path and a model of its contents."""

    def __init__(self, sim, tmp: Path):
        self.sim = sim
        self.tmp = tmp
        self.x = sim.session().xenapi
        vm = self.x.VM.get_by_name_label("demo-vm")[0]
        vdis = [self.x.VBD.get_VDI(v) for v in self.x.VM.get_VBDs(vm)]
        # The disk whose size is not a multiple of 64 KiB: the short last block matters.
        self.ref = next(v for v in vdis if int(self.x.VDI.get_virtual_size(v)) % BLOCK)
        self.uuid = self.x.VDI.get_uuid(self.ref)
        self.size = int(self.x.VDI.get_virtual_size(self.ref))
        self.model = bytearray(self.size)
        self.x.VDI.enable_cbt(self.ref)

    def write(self, changes: dict[int, bytes | None]) -> None:
        """{offset: data or None for NBD write-zeroes} through the guest's disk."""
        with self.sim.guest_disk(self.uuid) as uri:
            h = nbd.NBD()
            h.connect_uri(uri)
            for offset, data in changes.items():
                if data is None:
                    h.zero(BLOCK, offset)
                    self.model[offset : offset + BLOCK] = bytes(BLOCK)
                else:
                    h.pwrite(data, offset)
                    self.model[offset : offset + len(data)] = data
            h.flush()
            h.shutdown()

    def snapshot(self) -> tuple[str, bytes]:
        ref = self.x.VDI.snapshot(self.ref, {})
        return self.x.VDI.get_uuid(ref), bytes(self.model)

    def resize(self, size: int) -> None:
        self.x.VDI.resize(self.ref, str(size))
        size = int(self.x.VDI.get_virtual_size(self.ref))  # the SR may round it up
        self.model.extend(bytes(size - self.size))
        self.size = size

    def params(self, vdi: str, *extra: str) -> list[str]:
        info = self.sim.info
        return [
            "xapi=%s" % info["xapi"],
            "password=+%s" % info["password_file"],
            "xapi-cafile=%s" % info["ca_file"],
            "vdi=%s" % vdi,
            *extra,
        ]


@pytest.fixture
def disk(xensim, tmp_path):
    return Disk(xensim, tmp_path)


def rand(n: int) -> bytes:
    return os.urandom(n)


def full_copy(disk: Disk, vdi: str, out: Path, *extra: str, verbose: bool = False):
    r = run_plugin(disk.params(vdi, *extra), 'nbdcopy "$uri" %s' % out, verbose=verbose)
    assert r.returncode == 0, r.stderr
    return r


def test_full_then_incrementals_are_byte_identical(disk, tmp_path, xensim):
    last = (disk.size - 1) // BLOCK
    disk.write({0: rand(3 * BLOCK), 10 * BLOCK: rand(BLOCK), last * BLOCK: rand(disk.size % BLOCK)})
    s1, m1 = disk.snapshot()

    prev = tmp_path / "s1.qcow2"
    r = run_plugin(disk.params(s1), 'qemu-img convert -f raw -O qcow2 "$uri" %s' % prev)
    assert r.returncode == 0, r.stderr
    assert sha(flatten(prev, tmp_path / "f1.raw")) == sha(m1)

    # Rewrite a block with zero bytes, NBD-zero another, change the short last block.
    disk.write(
        {
            1 * BLOCK: bytes(BLOCK),
            2 * BLOCK: None,
            20 * BLOCK + 512: rand(1024),
            last * BLOCK: rand(512),
        }
    )
    s2, m2 = disk.snapshot()
    xensim.control.reset_counters()
    new = tmp_path / "s2.qcow2"
    run = 'qemu-img convert -f raw -O qcow2 -B %s -F qcow2 "$uri" %s' % (prev, new)
    r = run_plugin(disk.params(s2, "since=%s" % s1), run)
    assert r.returncode == 0, r.stderr
    assert top_blocks(new) == {1, 2, 20, last}
    assert sha(flatten(new, tmp_path / "f2.raw")) == sha(m2)
    served = sum(c["bytes_served"] for c in xensim.control.counters().values())
    assert served == 3 * BLOCK + disk.size % BLOCK  # only the changed blocks moved

    # The same change patched in place (unchanged=zero + nbdcopy) onto the s1 copy.
    patched = tmp_path / "patched.raw"
    patched.write_bytes(m1)
    with qemu_nbd_rw(patched, tmp_path) as dest:
        run = 'nbdcopy --destination-is-zero --request-size=65536 -S 0 "$uri" "%s"' % dest
        r = run_plugin(disk.params(s2, "since=%s" % s1, "unchanged=zero"), run)
        assert r.returncode == 0, r.stderr
    assert sha(patched.read_bytes()) == sha(m2)

    # libnbd reads the whole snapshot through the plugin.
    with plugin_server(disk.params(s2, "connections=2"), tmp_path) as (uri, _):
        h = nbd.NBD()
        h.connect_uri(uri)
        got = b"".join(
            h.pread(min(4 << 20, disk.size - o), o) for o in range(0, disk.size, 4 << 20)
        )
        h.shutdown()
    assert sha(got) == sha(m2)

    # The disk grows; blocks written in the new region are the only new ones.
    old_size = disk.size
    disk.resize(old_size + 40 * BLOCK)
    grown = -(-old_size // BLOCK) + 5
    disk.write({grown * BLOCK: rand(BLOCK)})
    s3, m3 = disk.snapshot()
    top = tmp_path / "s3.qcow2"
    run = 'qemu-img convert -f raw -O qcow2 -B %s -F qcow2 "$uri" %s' % (new, top)
    r = run_plugin(disk.params(s3, "since=%s" % s2), run)
    assert r.returncode == 0, r.stderr
    assert grown in top_blocks(top)
    assert sha(flatten(top, tmp_path / "f3.raw")) == sha(m3)


def test_block_status_and_zero_mode(disk, tmp_path):
    disk.write({0: rand(BLOCK)})
    s1, _ = disk.snapshot()
    disk.write({7 * BLOCK: rand(BLOCK), 8 * BLOCK: rand(BLOCK)})
    s2, m2 = disk.snapshot()
    r = run_plugin(disk.params(s2, "since=%s" % s1), 'nbdinfo --map --json "$uri"')
    assert r.returncode == 0, r.stderr
    data = [(e["offset"], e["length"]) for e in json.loads(r.stdout) if e["type"] == 0]
    assert data == [(7 * BLOCK, 2 * BLOCK)]
    # unchanged=zero: unchanged blocks read as zeros, changed ones as written.
    out = tmp_path / "z.raw"
    full_copy(disk, s2, out, "since=%s" % s1, "unchanged=zero")
    got = out.read_bytes()
    assert got[7 * BLOCK : 9 * BLOCK] == m2[7 * BLOCK : 9 * BLOCK]
    assert got[:BLOCK] == bytes(BLOCK) and m2[:BLOCK] != bytes(BLOCK)


def test_since_may_be_a_cbt_metadata_vdi_but_vdi_may_not(disk, tmp_path):
    disk.write({0: rand(BLOCK)})
    s1, _ = disk.snapshot()
    disk.write({3 * BLOCK: rand(BLOCK)})
    s2, m2 = disk.snapshot()
    disk.x.VDI.data_destroy(disk.x.VDI.get_by_uuid(s1))
    r = run_plugin(disk.params(s2, "since=%s" % s1), 'nbdinfo --map --json "$uri"')
    assert r.returncode == 0, r.stderr
    assert [e["offset"] for e in json.loads(r.stdout) if e["type"] == 0] == [3 * BLOCK]
    r = run_plugin(disk.params(s1), "true")
    assert r.returncode != 0 and "cbt_metadata" in r.stderr


def test_unrelated_since_says_a_full_copy_is_needed(disk):
    s1, _ = disk.snapshot()
    disk.x.VDI.disable_cbt(disk.ref)
    disk.x.VDI.enable_cbt(disk.ref)
    disk.write({0: rand(BLOCK)})
    s2, _ = disk.snapshot()
    r = run_plugin(disk.params(s2, "since=%s" % s1), "true")
    assert r.returncode != 0
    assert "not on one CBT chain" in r.stderr and "full copy is needed" in r.stderr


def test_unknown_vdi_and_bad_password(disk, tmp_path):
    r = run_plugin(disk.params("00000000-0000-4000-8000-000000000000"), "true")
    assert r.returncode != 0 and "no such VDI" in r.stderr
    bad = tmp_path / "badpw"
    bad.write_text("wrong-password")
    params = [
        p if not p.startswith("password=") else "password=+%s" % bad for p in disk.params(disk.uuid)
    ]
    r = run_plugin(params, "true")
    assert r.returncode != 0 and "SESSION_AUTHENTICATION_FAILED" in r.stderr
    assert "wrong-password" not in r.stderr


def test_empty_nbd_info_names_the_checks(disk):
    s1, _ = disk.snapshot()
    for net in disk.x.network.get_all():
        if "nbd" in disk.x.network.get_purpose(net):
            disk.x.network.remove_purpose(net, "nbd")
    r = run_plugin(disk.params(s1), "true")
    assert r.returncode != 0
    assert "no address" in r.stderr and "purpose nbd" in r.stderr


def test_xapi_certificate_is_verified(disk, tmp_path):
    s1, _ = disk.snapshot()
    params = [p for p in disk.params(s1) if not p.startswith("xapi-cafile=")]
    r = run_plugin(params, "true")  # system CAs do not know the simulator
    assert r.returncode != 0 and "cannot verify the XAPI server" in r.stderr
    r = run_plugin([*params, "thumbprint=" + "AB" * 32], "true")
    assert r.returncode != 0 and "not the pinned thumbprint" in r.stderr


def test_dropped_connections_and_dead_session_still_give_identical_copy(disk, tmp_path, xensim):
    disk.write({i * BLOCK: rand(BLOCK) for i in range(0, 300, 3)})
    s1, m1 = disk.snapshot()
    out = tmp_path / "out.raw"
    with plugin_server(disk.params(s1, "connections=4"), tmp_path) as (uri, _):
        # The plugin's session dies and every connection breaks after 3 MiB.
        assert xensim.control.invalidate_sessions() >= 1
        xensim.control.set_faults(drop_after_bytes=3 * 1024 * 1024)
        subprocess.run(["nbdcopy", uri, out], check=True, timeout=240)
    xensim.control.clear()
    assert sha(out.read_bytes()) == sha(m1)


def test_connections_refused_for_a_while(disk, tmp_path, xensim):
    """As after enabling NBD on a network: refused for seconds, then served."""
    disk.write({0: rand(BLOCK)})
    s1, m1 = disk.snapshot()
    out = tmp_path / "out.raw"
    xensim.control.refuse_for(3)
    r = full_copy(disk, s1, out, verbose=True)
    assert "reconnecting in" in r.stderr
    assert sha(out.read_bytes()) == sha(m1)
    assert sum(c["refused"] for c in xensim.control.counters().values()) >= 1


def test_host_at_its_connection_limit_shrinks_the_pool(disk, tmp_path, xensim):
    disk.write({0: rand(BLOCK)})
    s1, m1 = disk.snapshot()
    host = xensim.info["hosts"][0]
    out = tmp_path / "out.raw"
    with contextlib.ExitStack() as stack:
        for _ in range(12):  # other clients hold 12 of the host's 16 slots
            s = stack.enter_context(socket.create_connection((host["address"], host["nbd_port"])))
            s.recv(18)  # greeted: the slot is taken
        r = full_copy(disk, s1, out, "connections=16", verbose=True)
    assert sha(out.read_bytes()) == sha(m1)
    assert "continuing with 4 connection(s)" in r.stderr
    assert max(c["peak_connections"] for c in xensim.control.counters().values()) == 16


def test_no_secret_in_argv_or_debug_output(disk, tmp_path, xensim):
    s1, _ = disk.snapshot()
    with plugin_server(disk.params(s1), tmp_path, verbose=True) as (uri, proc):
        subprocess.run(["nbdcopy", uri, "null:"], check=True)
        cmdline = Path("/proc/%d/cmdline" % proc.pid).read_bytes().decode()
        environ = Path("/proc/%d/environ" % proc.pid).read_bytes().decode(errors="replace")
    output = proc.output
    for text in (cmdline, environ, output):
        assert xensim.password not in text
        assert "OpaqueRef:" not in text and "session_id" not in text
