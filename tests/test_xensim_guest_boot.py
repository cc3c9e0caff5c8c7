"""The simulator's guest boot (simulator/xensim/guest_boot.py), through the real PyPI
XenAPI client: after VM.start, a guest whose boot disk carries a boot sector reports its
guest metrics (VM_guest_metrics, xapi's datamodel fields); one whose disk does not never
does; VM.start clears stale metrics, VM.destroy destroys them; network.destroy as
xapi_network.ml has it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import XenAPI
from xensim import datamodel

NULL = "OpaqueRef:NULL"


def failure(call, *args) -> list[str]:
    with pytest.raises(XenAPI.Failure) as info:
        call(*args)
    return info.value.details


def reported(x, vm: str, timeout: float = 30.0) -> str:
    """Poll VM.guest_metrics (as a client does) until the agent reported; its ref."""
    deadline = time.monotonic() + timeout
    while (gm := x.VM.get_guest_metrics(vm)) == NULL:
        assert time.monotonic() < deadline, "no guest metrics within %s s" % timeout
        time.sleep(0.01)
    return gm


def boot_disk(sim, x, vm: str) -> Path:
    vbds = [x.VBD.get_record(v) for v in x.VM.get_VBDs(vm)]
    (vbd,) = [v for v in vbds if v["userdevice"] == "0"]
    return Path(sim.state_dir) / "vdis" / (x.VDI.get_uuid(vbd["VDI"]) + ".raw")


def test_a_started_guest_reports_its_metrics_and_a_restart_clears_them(xensim_factory):
    sim = xensim_factory(boot_seconds=0.2)
    x = sim.session().xenapi
    vm = x.VM.get_by_name_label("demo-vm")[0]
    assert boot_disk(sim, x, vm).read_bytes()[510:512] == b"\x55\xaa"  # demo-vm boots
    x.VM.hard_shutdown(vm)
    x.VM.start(vm, False, False)
    gm = reported(x, vm)
    rec = x.VM_guest_metrics.get_record(gm)
    assert set(rec) == set(datamodel.fields("VM_guest_metrics"))  # xapi's fields, no more
    assert rec["PV_drivers_version"]["major"] and rec["os_version"]["name"]
    assert rec["live"] is True and rec["PV_drivers_detected"] is True
    x.VM.hard_shutdown(vm)
    assert x.VM.get_guest_metrics(vm) == gm  # a halted VM keeps its last report
    x.VM.start(vm, False, False)  # xapi_vm.ml start: delete_guest_metrics
    assert failure(x.VM_guest_metrics.get_record, gm)[0] == "HANDLE_INVALID"
    again = reported(x, vm)
    assert again != gm
    x.VM.hard_shutdown(vm)
    x.VM.destroy(vm)  # xapi_vm_helpers.ml destroy: the metrics go with the VM
    assert x.VM_guest_metrics.get_all() == []


def test_a_guest_whose_boot_disk_has_no_boot_sector_never_reports(xensim_factory):
    """Never is not observable; a second VM that does boot, started after it, is: once it
    reported, the first (same delay, started earlier) would have too."""
    sim = xensim_factory(boot_seconds=0.2, vms=2)
    x = sim.session().xenapi
    wiped, booting = (x.VM.get_by_name_label(n)[0] for n in ("demo-vm", "demo-vm-2"))
    for vm in (wiped, booting):
        x.VM.hard_shutdown(vm)
    disk = boot_disk(sim, x, wiped)
    with open(disk, "r+b") as f:
        f.write(bytes(1024))  # as a guest that wiped its disk (no CBT needed here)
    x.VM.start(wiped, False, False)
    x.VM.start(booting, False, False)
    reported(x, booting)
    assert x.VM.get_guest_metrics(wiped) == NULL


def test_network_destroy_refuses_attached_vifs_and_pifs_and_takes_the_others(xensim):
    x = xensim.session().xenapi
    vm = x.VM.get_by_name_label("demo-vm")[0]
    (vif, *_) = x.VM.get_VIFs(vm)
    net = x.VIF.get_network(vif)
    assert x.network.get_PIFs(net)
    assert failure(x.network.destroy, net)[0] == "NETWORK_CONTAINS_VIF"
    private = x.network.create(
        {
            "name_label": "private",
            "name_description": "",
            "MTU": "1500",
            "other_config": {},
            "bridge": "",
            "managed": True,
            "tags": [],
        }
    )
    assert x.network.get_PIFs(private) == []
    x.VM.hard_shutdown(vm)  # the VIFs unplugged
    x.VIF.destroy(vif)
    halted_vif = x.VIF.create(
        {
            "device": "5",
            "network": private,
            "VM": vm,
            "MAC": "",
            "MTU": "1500",
            "other_config": {},
            "qos_algorithm_type": "",
            "qos_algorithm_params": {},
            "locking_mode": "network_default",
            "ipv4_allowed": [],
            "ipv6_allowed": [],
        }
    )
    x.network.destroy(private)  # its unplugged VIF goes with it
    assert halted_vif not in x.VIF.get_all() and private not in x.network.get_all()
    assert failure(x.network.destroy, net)[0] == "NETWORK_CONTAINS_PIF"
