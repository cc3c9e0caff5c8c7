"""vm=: every disk of a VM snapshot as an export of one nbdkit (issue #17).

Real nbdinfo, qemu-img and nbdcopy read the exports; every copy is compared with the
simulator's own raw file of the snapshot VDI (the independent truth), never with a
digest the product computed.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
import xapirec
from cli_support import Vm, rand, sha
from qemu_images import flatten, top_blocks
from servers import PLUGIN, plugin_server, run_plugin
from xensim.disks import data_path

BLOCK = 64 * 1024
NULL = "OpaqueRef:" + "NULL"  # spelt so that no failure report shows a ref


class VmSnapshots:
    """demo-vm, CBT on its disks, and VM snapshots of it taken through XAPI."""

    def __init__(self, sim):
        self.sim = sim
        self.vm = Vm(sim)
        self.x = self.vm.x
        for ref in self.vm.vdis:
            self.x.VDI.enable_cbt(ref)

    def snapshot(self, name: str) -> str:
        """A VM snapshot; returns its uuid."""
        return self.x.VM.get_uuid(self.x.VM.snapshot(self.vm.ref, name))

    def disks(self, snap_uuid: str) -> dict[str, str]:
        """userdevice -> snapshot VDI uuid."""
        ref = self.x.VM.get_by_uuid(snap_uuid)
        found = {}
        for vbd in self.x.VM.get_VBDs(ref):
            rec = self.x.VBD.get_record(vbd)
            if rec["type"] == "Disk":
                found[rec["userdevice"]] = self.x.VDI.get_uuid(rec["VDI"])
        return found

    def raw(self, vdi_uuid: str) -> bytes:
        """The simulator's raw file of the VDI, to its virtual size."""
        size = int(self.x.VDI.get_virtual_size(self.x.VDI.get_by_uuid(vdi_uuid)))
        path = data_path(self.sim.state_dir, vdi_uuid)
        data = path.read_bytes() if path.exists() else b""
        return data + bytes(size - len(data))

    def params(self, vm: str, *extra: str) -> list[str]:
        info = self.sim.info
        return [
            "xapi=%s" % info["xapi"],
            "password=+%s" % info["password_file"],
            "xapi-cafile=%s" % info["ca_file"],
            "vm=%s" % vm,
            *extra,
        ]


@pytest.fixture
def pool(xensim):
    return VmSnapshots(xensim)


def connections(sim) -> int:
    return sum(c["connections_total"] for c in sim.control.counters().values())


def flat(image: Path) -> bytes:
    return flatten(image, image.with_suffix(".flat"))


def test_every_disk_is_an_export_listed_and_copied_byte_for_byte(pool, xensim, tmp_path):
    pool.vm.write(0, {0: rand(3 * BLOCK), 50 * BLOCK: rand(BLOCK)})
    pool.vm.write(1, {BLOCK: rand(2 * BLOCK)})
    snap = pool.snapshot("s1")
    disks = pool.disks(snap)
    assert sorted(disks) == ["0", "1"]
    # A CD drive and an empty VBD of the snapshot are not disks to export.
    snap_ref = pool.x.VM.get_by_uuid(snap)
    pool.x.VBD.create(xapirec.cd_drive(snap_ref, "4"))
    xensim.control.reset_counters()

    with plugin_server(pool.params(snap), tmp_path) as (uri, _):
        sock = uri.split("socket=")[1]
        listed = json.loads(
            subprocess.run(
                ["nbdinfo", "--list", "--json", uri], check=True, capture_output=True, text=True
            ).stdout
        )
        assert connections(xensim) == 0  # listing opens no upstream connection
        exports = {e["export-name"]: e for e in listed["exports"]}
        assert set(exports) == {"0", "1", disks["0"], disks["1"]}
        for dev, vdi in disks.items():
            size = len(pool.raw(vdi))
            name = pool.x.VDI.get_name_label(pool.x.VDI.get_by_uuid(vdi))
            for key in (dev, vdi):
                desc = exports[key]["description"]
                assert desc.startswith(
                    "demo-vm (snapshot s1) disk %s (%s), %d bytes" % (dev, name, size)
                )
                assert exports[key]["export-size"] == size
        # The default export is the lowest userdevice.
        default = subprocess.run(
            ["nbdinfo", "--size", uri], check=True, capture_output=True, text=True
        ).stdout
        assert int(default) == len(pool.raw(disks["0"]))

        # qemu-img reads export 0 by its userdevice, nbdcopy export 1 by its VDI uuid.
        out0, out1 = tmp_path / "d0.qcow2", tmp_path / "d1.raw"
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"]
            + ["nbd+unix:///0?socket=%s" % sock, out0],
            check=True,
        )
        subprocess.run(
            ["nbdcopy", "nbd+unix:///%s?socket=%s" % (disks["1"], sock), out1], check=True
        )
    assert sha(flat(out0)) == sha(pool.raw(disks["0"]))
    assert sha(out1.read_bytes()) == sha(pool.raw(disks["1"]))
    assert sha(pool.raw(disks["0"])) == sha(pool.vm.models[0])  # the truth is what was written


def test_since_a_vm_snapshot_maps_exactly_each_disks_changes(pool, xensim, tmp_path):
    pool.vm.write(0, {0: rand(BLOCK)})
    pool.vm.write(1, {0: rand(BLOCK)})
    s1 = pool.snapshot("s1")
    pool.vm.write(0, {5 * BLOCK: rand(BLOCK), 9 * BLOCK: bytes(BLOCK)})
    pool.vm.write(1, {2 * BLOCK + 512: rand(1024)})
    s2 = pool.snapshot("s2")
    d1, d2 = pool.disks(s1), pool.disks(s2)

    bases = {dev: tmp_path / ("base%s.qcow2" % dev) for dev in d1}
    script = " && ".join(
        'qemu-img convert -f raw -O qcow2 "nbd+unix:///%s?socket=$unixsocket" %s' % (dev, out)
        for dev, out in bases.items()
    )
    r = run_plugin(pool.params(s1), script)
    assert r.returncode == 0, r.stderr

    tops = {dev: tmp_path / ("top%s.qcow2" % dev) for dev in d2}
    script = " && ".join(
        'qemu-img convert -f raw -O qcow2 -B %s -F qcow2 "nbd+unix:///%s?socket=$unixsocket" %s'
        % (bases[dev], dev, out)
        for dev, out in tops.items()
    )
    xensim.control.reset_counters()
    r = run_plugin(pool.params(s2, "since=%s" % s1), script)
    assert r.returncode == 0, r.stderr
    assert top_blocks(tops["0"]) == {5, 9}
    assert top_blocks(tops["1"]) == {2}
    for dev in d2:
        assert sha(flat(tops[dev])) == sha(pool.raw(d2[dev]))
    served = sum(c["bytes_served"] for c in xensim.control.counters().values())
    assert served == 3 * BLOCK  # only the changed blocks moved


def test_since_disk_snapshots_cbt_metadata_and_a_disk_without_base(pool, tmp_path):
    pool.vm.write(0, {0: rand(BLOCK)})
    s1 = pool.snapshot("s1")
    base0 = pool.disks(s1)["0"]
    # As a backup keeps its base: the snapshot VM goes, disk 0's VDI keeps only its log.
    pool.x.VM.destroy(pool.x.VM.get_by_uuid(s1))
    pool.x.VDI.data_destroy(pool.x.VDI.get_by_uuid(base0))
    pool.vm.write(0, {7 * BLOCK: rand(BLOCK)})
    pool.vm.write(1, {3 * BLOCK: rand(BLOCK)})
    s2 = pool.snapshot("s2")
    d2 = pool.disks(s2)

    script = " ; ".join(
        'echo "== %s" ; nbdinfo --map --json "nbd+unix:///%s?socket=$unixsocket"' % (dev, dev)
        for dev in ("0", "1")
    )
    r = run_plugin(pool.params(s2, "since=%s" % base0), script, verbose=True)
    assert r.returncode == 0, r.stderr
    maps = {}
    for part in r.stdout.split("== ")[1:]:
        dev, _, text = part.partition("\n")
        maps[dev] = [(e["offset"], e["length"]) for e in json.loads(text) if e["type"] == 0]
    assert maps["0"] == [(7 * BLOCK, BLOCK)]
    # Disk 1 has no base among since=: all of it is data, and the debug output says why.
    assert maps["1"] == [(0, len(pool.raw(d2["1"])))]
    assert "export 1: VDI %s has no base among since=" % d2["1"] in r.stderr
    assert "exported whole" in r.stderr


def test_unknown_export_name_gets_a_clear_nbd_error(pool, tmp_path):
    snap = pool.snapshot("s1")
    run = 'nbdinfo "nbd+unix:///9?socket=$unixsocket"'
    r = run_plugin(pool.params(snap), run)
    assert r.returncode != 0
    # What the client sees: the NBD error for ENOENT on that name.
    assert "No such file or directory for export: 9" in r.stderr
    assert "no export named '9'" in r.stderr
    assert "exports 0, 1 (userdevice)" in r.stderr


def test_a_vm_snapshot_whose_disk_is_being_data_destroyed_is_refused(xensim_factory, tmp_path):
    sim = xensim_factory(in_use_wait=60)
    pool = VmSnapshots(sim)
    snap = pool.snapshot("s1")
    snap_ref = pool.x.VM.get_by_uuid(snap)
    vbd = next(v for v in pool.x.VM.get_VBDs(snap_ref) if pool.x.VBD.get_userdevice(v) == "1")
    vdi = pool.x.VBD.get_VDI(vbd)
    # data_destroy marks the VDI cbt_metadata while it waits for the snapshot's VBD to go.
    other = sim.session().xenapi
    destroyer = threading.Thread(target=other.VDI.data_destroy, args=(vdi,))
    destroyer.start()
    deadline = time.monotonic() + 30
    while pool.x.VDI.get_type(vdi) != "cbt_metadata":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    r = run_plugin(pool.params(snap), "true")
    pool.x.VBD.destroy(vbd)  # lets the data_destroy finish
    destroyer.join(30)
    assert r.returncode != 0
    assert "disk 1 (VDI %s" % pool.x.VDI.get_uuid(vdi) in r.stderr
    assert "cbt_metadata VDI: its data was destroyed" in r.stderr
    assert "Traceback" not in r.stderr


def test_exports_share_the_connection_budget(pool, xensim, tmp_path):
    pool.vm.write(0, {i * BLOCK: rand(BLOCK) for i in range(0, 200, 7)})
    pool.vm.write(1, {i * BLOCK: rand(BLOCK) for i in range(0, 100, 5)})
    snap = pool.snapshot("s1")
    disks = pool.disks(snap)
    xensim.control.reset_counters()
    # Both disks copied at once, each with 4 client connections, through connections=2.
    run = (
        'nbdcopy -C 4 "nbd+unix:///0?socket=$unixsocket" %s & '
        'nbdcopy -C 4 "nbd+unix:///1?socket=$unixsocket" %s; wait'
    ) % (tmp_path / "d0.raw", tmp_path / "d1.raw")
    r = run_plugin(pool.params(snap, "connections=2"), run)
    assert r.returncode == 0, r.stderr
    assert sha((tmp_path / "d0.raw").read_bytes()) == sha(pool.raw(disks["0"]))
    assert sha((tmp_path / "d1.raw").read_bytes()) == sha(pool.raw(disks["1"]))
    counters = xensim.control.counters().values()
    assert max(c["peak_connections"] for c in counters) <= 2
    assert sum(c["connections_total"] for c in counters) >= 2  # both disks were read


def test_vdi_keeps_one_default_export(pool, tmp_path):
    pool.vm.write(1, {0: rand(BLOCK)})
    snap = pool.disks(pool.snapshot("s1"))["1"]
    params = [p if not p.startswith("vm=") else "vdi=%s" % snap for p in pool.params("x")]
    out = tmp_path / "d.raw"
    r = run_plugin(params, 'nbdinfo --list --json "$uri" && nbdcopy "$uri" %s' % out)
    assert r.returncode == 0, r.stderr
    assert [e["export-name"] for e in json.loads(r.stdout)["exports"]] == [""]
    assert sha(out.read_bytes()) == sha(pool.raw(snap))


def test_dump_plugin_names_the_export_kinds():
    out = subprocess.run(
        ["nbdkit", "python", str(PLUGIN), "--dump-plugin"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "xencbt_export_kinds=vdi,vm" in out
    assert "xencbt_param_vm=UUID of a VM snapshot" in out


def test_since_must_match_the_disks_once(pool, xensim):
    s1 = pool.snapshot("s1")
    s2 = pool.snapshot("s2")
    # A VDI snapshot that is not of this VM's disks.
    other = pool.x.VDI.create(xapirec.vdi(pool.x.VDI.get_SR(pool.vm.vdis[0]), 1 << 20, "x"))
    pool.x.VDI.enable_cbt(other)
    stranger = pool.x.VDI.get_uuid(pool.x.VDI.snapshot(other, {}))
    r = run_plugin(pool.params(s2, "since=%s" % stranger), "true")
    assert r.returncode != 0
    assert "since=: %s is not a snapshot of any disk of vm=%s" % (stranger, s2) in r.stderr
    # Two bases for one disk: the VM snapshot s1 and its own disk 0.
    r = run_plugin(pool.params(s2, "since=%s,%s" % (s1, pool.disks(s1)["0"])), "true")
    assert r.returncode != 0 and "names two snapshots of the same disk" in r.stderr
    r = run_plugin(pool.params(s2, "since=00000000-0000-4000-8000-000000000000"), "true")
    assert r.returncode != 0 and "no such VDI or VM snapshot in this pool" in r.stderr
    assert "Traceback" not in r.stderr
