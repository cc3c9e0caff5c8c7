"""CBT as REFERENCE §1 describes it, driven the way a guest and a backup tool would:
guest writes through ``xensim guest-disk`` with qemu-io, snapshots and diffs via XenAPI."""

from __future__ import annotations

import base64
import subprocess
import time
from pathlib import Path

import pytest
import XenAPI

BLOCK = 65536
DISK1 = (20 << 20) + 512  # the default second disk: 320 full blocks + a 512-byte tail


def blocks(encoded: str) -> list[int]:
    bits = base64.b64decode(encoded)
    return [i for i in range(len(bits) * 8) if bits[i // 8] & (0x80 >> (i % 8))]


def qemu_io(uri: str, *commands: str) -> None:
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, uri], check=True, capture_output=True)


def failure(call, *args) -> list[str]:
    with pytest.raises(XenAPI.Failure) as info:
        call(*args)
    return info.value.details


class Disk:
    """The demo VM's second disk, CBT enabled, with helpers to write and snapshot it."""

    def __init__(self, sim) -> None:
        self.sim = sim
        self.x = sim.session().xenapi
        self.vm = self.x.VM.get_by_name_label("demo-vm")[0]
        vbd = next(v for v in self.x.VM.get_VBDs(self.vm) if self.x.VBD.get_userdevice(v) == "1")
        self.ref = self.x.VBD.get_VDI(vbd)
        self.uuid = self.x.VDI.get_uuid(self.ref)
        self.x.VDI.enable_cbt(self.ref)

    def write(self, *commands: str) -> None:
        with self.sim.guest_disk(self.uuid) as uri:
            qemu_io(uri, *commands)

    def snapshot(self) -> str:
        return self.x.VDI.snapshot(self.ref, {})

    def changed(self, a: str, b: str) -> list[int]:
        return blocks(self.x.VDI.list_changed_blocks(a, b))


@pytest.fixture
def disk(xensim) -> Disk:
    return Disk(xensim)


def test_known_write_pattern(disk):
    s1 = disk.snapshot()
    disk.write(
        "write -P 0x55 65536 512",  # inside block 1
        "write -P 0x11 1048575 2",  # straddles blocks 15 and 16
        f"write -P 0x22 {DISK1 - 512} 512",  # the partial last block (320)
    )
    s2 = disk.snapshot()
    encoded = disk.x.VDI.list_changed_blocks(s1, s2)
    assert len(base64.b64decode(encoded)) == 41  # ceil(ceil(size/64K)/8)
    assert blocks(encoded) == [1, 15, 16, 320]


def test_a_block_rewritten_to_zeros_is_changed(disk):
    disk.write("write -P 0x77 0 131072")
    s1 = disk.snapshot()
    disk.write("write -z 65536 65536")  # NBD write-zeroes over data
    s2 = disk.snapshot()
    assert disk.changed(s1, s2) == [1]
    with disk.sim.guest_disk(disk.uuid) as uri:
        out = subprocess.run(
            [
                "qemu-io",
                "-f",
                "raw",
                "-c",
                "read -P 0 65536 65536",
                "-c",
                "read -P 0x77 0 65536",
                uri,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    assert "Pattern verification failed" not in out


def test_logs_are_ored_along_the_chain(disk):
    s1 = disk.snapshot()
    disk.write("write 0 1")
    s2 = disk.snapshot()
    disk.write("write 655360 1")
    s3 = disk.snapshot()
    assert disk.changed(s1, s2) == [0]
    assert disk.changed(s2, s3) == [10]
    assert disk.changed(s1, s3) == [0, 10]
    disk.write(f"write {3 * BLOCK} 1")
    # The live VDI is plugged to the running VM: xapi refuses it as vdi_to
    # (xapi_vdi.ml check_operation_error); its log reaches the next snapshot.
    assert failure(disk.x.VDI.list_changed_blocks, s1, disk.ref) == [
        "VDI_IN_USE",
        disk.ref,
        "list_changed_blocks",
    ]
    assert disk.changed(s1, disk.snapshot()) == [0, 3, 10]


def test_grown_disk_zero_extends_and_flags_only_written_blocks(disk):
    s1 = disk.snapshot()
    disk.write("write 0 512")
    disk.x.VDI.resize(disk.ref, str(24 << 20))
    disk.write(f"write {23 << 20} 512")
    s2 = disk.snapshot()
    encoded = disk.x.VDI.list_changed_blocks(s1, s2)
    assert len(base64.b64decode(encoded)) == (24 << 20) // BLOCK // 8
    assert blocks(encoded) == [0, (23 << 20) // BLOCK]


def test_destroying_a_middle_snapshot_keeps_later_diffs_right(disk):
    s1 = disk.snapshot()
    disk.write("write 0 1")
    s2 = disk.snapshot()
    disk.write(f"write {5 * BLOCK} 1")
    s3 = disk.snapshot()
    disk.x.VDI.destroy(s2)
    assert disk.changed(s1, s3) == [0, 5]


def test_failures_460_and_459(disk, xensim):
    x = disk.x
    s1 = disk.snapshot()
    s2 = disk.snapshot()
    details = failure(x.VDI.list_changed_blocks, s1, s1)
    assert details[0] == "SR_BACKEND_FAILURE_460" and details[1] == "" and details[3] == ""
    assert "Source and target VDI are same" in details[2]
    other = x.VBD.get_VDI(next(v for v in x.VM.get_VBDs(disk.vm) if x.VBD.get_userdevice(v) == "0"))
    x.VDI.enable_cbt(other)
    o1 = x.VDI.snapshot(other, {})
    details = failure(x.VDI.list_changed_blocks, s1, o1)
    assert details[0] == "SR_BACKEND_FAILURE_460" and "unrelated" in details[2]
    assert failure(x.VDI.list_changed_blocks, s2, s1)[0] == "SR_BACKEND_FAILURE_460"  # wrong order
    log = Path(xensim.info["state_dir"]) / "cbt" / f"{x.VDI.get_uuid(s2)}.cbtlog"
    log.write_bytes(log.read_bytes()[:20])  # a damaged log
    assert failure(x.VDI.list_changed_blocks, s1, s2)[0] == "SR_BACKEND_FAILURE_459"


def test_disable_then_enable_breaks_the_chain(disk):
    x = disk.x
    s1 = disk.snapshot()
    x.VDI.disable_cbt(disk.ref)
    x.VDI.disable_cbt(disk.ref)  # idempotent
    assert x.VDI.get_cbt_enabled(disk.ref) is False
    x.VDI.enable_cbt(disk.ref)
    x.VDI.enable_cbt(disk.ref)
    s2 = disk.snapshot()
    assert x.VDI.get_cbt_enabled(s2) is True  # snapshots inherit cbt_enabled
    assert failure(x.VDI.enable_cbt, s2)[0] == "OPERATION_NOT_ALLOWED"
    assert "unrelated" in failure(x.VDI.list_changed_blocks, s1, s2)[2]


def test_host_crash_switches_cbt_off(disk, xensim):
    s1 = disk.snapshot()
    assert xensim.control.cbt_off(disk.uuid) == {"vdi": disk.uuid, "cbt_enabled": False}
    assert disk.x.VDI.get_cbt_enabled(disk.ref) is False
    disk.x.VDI.enable_cbt(disk.ref)
    s2 = disk.snapshot()
    assert failure(disk.x.VDI.list_changed_blocks, s1, s2)[0] == "SR_BACKEND_FAILURE_460"


def test_data_destroy_rules_and_cbt_metadata_refusals(xensim_factory):
    sim = xensim_factory(in_use_wait=0.5)
    disk = Disk(sim)
    x = disk.x
    assert failure(x.VDI.data_destroy, disk.ref)[0] == "OPERATION_NOT_ALLOWED"
    plain = x.VDI.snapshot(x.VBD.get_VDI(x.VM.get_VBDs(disk.vm)[0]), {})
    assert x.VDI.get_cbt_enabled(plain) is False
    assert failure(x.VDI.data_destroy, plain) == ["VDI_NO_CBT_METADATA", plain]
    s1 = disk.snapshot()
    disk.write("write 0 1")
    vm_snap = x.VM.snapshot(disk.vm, "backup")
    s2 = next(
        x.VBD.get_VDI(v)
        for v in x.VM.get_VBDs(vm_snap)
        if x.VDI.get_snapshot_of(x.VBD.get_VDI(v)) == disk.ref
    )
    started = time.monotonic()
    assert failure(x.VDI.data_destroy, s2) == ["VDI_IN_USE", s2, "data_destroy"]
    assert time.monotonic() - started >= 0.5  # it waited for the VBD to go first
    x.VM.destroy(vm_snap)
    x.VDI.data_destroy(s2)
    assert x.VDI.get_type(s2) == "cbt_metadata"
    for call, args in [
        (x.VDI.clone, (s2, {})),
        (x.VDI.snapshot, (s2, {})),
        (x.VDI.resize, (s2, str(64 << 20))),
        (x.VDI.get_nbd_info, (s2,)),
    ]:
        assert failure(call, *args) == ["VDI_INCOMPATIBLE_TYPE", s2, "cbt_metadata"]
    assert disk.changed(s1, s2) == [0]  # the log survives data_destroy
    disk.write(f"write {2 * BLOCK} 1")
    s3 = disk.snapshot()
    assert disk.changed(s2, s3) == [2]  # and a cbt_metadata VDI can be vdi_from
    x.VDI.destroy(s2)


def test_data_destroy_waits_for_the_snapshot_vm_to_go(xensim):
    disk = Disk(xensim)
    x = disk.x
    vm_snap = x.VM.snapshot(disk.vm, "backup")
    snap_vdi = next(
        x.VBD.get_VDI(v)
        for v in x.VM.get_VBDs(vm_snap)
        if x.VDI.get_snapshot_of(x.VBD.get_VDI(v)) == disk.ref
    )
    task = x.Async.VDI.data_destroy(snap_vdi)
    x.VM.destroy(vm_snap)  # within the grace period
    while x.task.get_status(task) == "pending":
        time.sleep(0.05)
    assert x.task.get_status(task) == "success"
    assert x.VDI.get_type(snap_vdi) == "cbt_metadata"
