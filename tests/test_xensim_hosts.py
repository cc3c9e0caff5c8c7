"""Reading VDIs from the simulated hosts' block servers as a backup tool would: connection
info from XenAPI, libnbd over TLS with the host's certificate, network purposes and their
propagation delay, injected faults (control API and CLI) and the counters."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import nbd
import pytest
import XenAPI

BLOCK = 65536


def failure(call, *args) -> list[str]:
    with pytest.raises(XenAPI.Failure) as info:
        call(*args)
    return info.value.details


def open_export(record: dict, tlsdir: Path | None) -> nbd.NBD:
    """libnbd, as the tests' consumer-side client: cert verified via ca-cert.pem."""
    h = nbd.NBD()
    h.set_export_name(record["exportname"])
    if tlsdir is None:
        h.set_tls(nbd.TLS_DISABLE)
    else:
        tlsdir.mkdir(exist_ok=True)
        (tlsdir / "ca-cert.pem").write_text(record["cert"])
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(tlsdir))
    h.connect_tcp(record["address"], str(record["port"]))
    return h


def refused(record: dict, tlsdir: Path | None) -> bool:
    try:
        open_export(record, tlsdir).shutdown()
    except nbd.Error:
        return True
    return False


class Pool:
    def __init__(self, sim, tmp_path: Path) -> None:
        self.sim = sim
        self.session = sim.session()
        self.x = self.session.xenapi
        self.tlsdir = tmp_path / "tls"
        self.vm = self.x.VM.get_by_name_label("demo-vm")[0]
        vbd = next(v for v in self.x.VM.get_VBDs(self.vm) if self.x.VBD.get_userdevice(v) == "0")
        self.live = self.x.VBD.get_VDI(vbd)

    def snapshot_with(self, *commands: str) -> str:
        with self.sim.guest_disk(self.x.VDI.get_uuid(self.live)) as uri:
            argv = ["qemu-io", "-f", "raw"]
            for command in commands:
                argv += ["-c", command]
            subprocess.run([*argv, uri], check=True, capture_output=True)
        return self.x.VDI.snapshot(self.live, {})

    def net(self, name: str) -> str:
        return self.x.network.get_by_name_label(name)[0]


def ipv4(infos: list[dict]) -> dict:
    """The one IPv4 record of a host (its NBD PIF's IPv6 addresses come too, in CIDR)."""
    (info,) = [i for i in infos if ":" not in i["address"]]
    return info


@pytest.fixture
def pool(xensim, tmp_path) -> Pool:
    return Pool(xensim, tmp_path)


def test_connection_info_and_tls_reads_of_a_snapshot(pool):
    snap = pool.snapshot_with("write -P 0xab 0 131072", f"write -P 0xcd {10 * BLOCK} 512")
    info = ipv4(pool.x.VDI.get_nbd_info(snap))
    host = pool.sim.info["hosts"][0]
    assert info["address"] == "127.0.0.1" and int(info["port"]) == host["nbd_port"]
    assert info["cert"] == Path(host["cert_file"]).read_text()
    assert info["subject"] == "host0.xensim.test"
    assert info["exportname"] == f"/{pool.x.VDI.get_uuid(snap)}?session_id={pool.session.handle}"
    h = open_export(info, pool.tlsdir)
    assert h.get_size() == 64 << 20
    assert h.is_read_only()
    assert h.pread(131072, 0) == b"\xab" * 131072
    assert h.pread(1024, 10 * BLOCK) == b"\xcd" * 512 + bytes(512)
    h.shutdown()
    pool.x.VDI.destroy(snap)
    assert refused(info, pool.tlsdir)  # the VDI is gone


def test_logout_kills_the_export_name(xensim, tmp_path):
    pool = Pool(xensim, tmp_path)
    other = xensim.session()
    snap = pool.x.VDI.snapshot(pool.live, {})
    info = ipv4(other.xenapi.VDI.get_nbd_info(snap))
    assert not refused(info, pool.tlsdir)
    other.xenapi.session.logout()
    assert refused(info, pool.tlsdir)


def test_purposes_no_mixing_and_empty_connection_info(pool):
    x, snap = pool.x, pool.x.VDI.snapshot(pool.live, {})
    nbd_net, mgmt = pool.net("NBD network"), pool.net("Pool-wide network associated with eth0")
    assert failure(x.network.add_purpose, mgmt, "insecure_nbd") == [
        "NETWORK_INCOMPATIBLE_PURPOSES",
        "insecure_nbd",
        "nbd",
    ]
    x.network.remove_purpose(nbd_net, "nbd")
    assert x.network.get_purpose(nbd_net) == []
    assert x.VDI.get_nbd_info(snap) == []
    x.network.add_purpose(nbd_net, "insecure_nbd")
    assert failure(x.network.add_purpose, mgmt, "nbd")[1:] == ["nbd", "insecure_nbd"]
    info = ipv4(x.VDI.get_nbd_info(snap))
    h = open_export(info, None)  # insecure_nbd: plain NBD, no STARTTLS
    assert h.get_size() == 64 << 20
    h.shutdown()
    assert refused(info, pool.tlsdir)  # a TLS-requiring client gets no TLS here


def test_purpose_change_reaches_the_servers_after_the_delay(xensim_factory, tmp_path):
    sim = xensim_factory(nbd_purpose="none", nbd_propagation=1.0)
    pool = Pool(sim, tmp_path)
    snap = pool.x.VDI.snapshot(pool.live, {})
    assert pool.x.VDI.get_nbd_info(snap) == []
    pool.x.network.add_purpose(pool.net("NBD network"), "nbd")
    changed = time.monotonic()
    info = ipv4(pool.x.VDI.get_nbd_info(snap))  # the API knows at once…
    assert refused(info, pool.tlsdir)  # …the server does not yet
    time.sleep(max(0.0, changed + 1.1 - time.monotonic()))
    assert not refused(info, pool.tlsdir)


def test_every_host_seeing_the_sr_is_offered(xensim_factory, tmp_path):
    sim = xensim_factory(hosts=2, disk_sizes="4M")
    pool = Pool(sim, tmp_path)
    snap = pool.snapshot_with("write -P 7 0 512")
    infos = [i for i in pool.x.VDI.get_nbd_info(snap) if ":" not in i["address"]]
    assert sorted(i["address"] for i in infos) == ["127.0.0.1", "127.0.0.2"]
    for info, host in zip(sorted(infos, key=lambda i: i["address"]), sim.info["hosts"]):
        assert info["cert"] == Path(host["cert_file"]).read_text()
        assert info["subject"] == f"{host['name']}.xensim.test"
        h = open_export(info, tmp_path / host["name"])
        assert h.pread(512, 0) == b"\x07" * 512
        h.shutdown()
    counters = sim.control.counters()
    assert counters["host0"]["reads"] == counters["host1"]["reads"] == 1


def test_faults_through_the_control_api_and_counters(pool):
    sim = pool.sim
    snap = pool.x.VDI.snapshot(pool.live, {})
    info = ipv4(pool.x.VDI.get_nbd_info(snap))
    sim.control.reset_counters()
    handles = [open_export(info, pool.tlsdir) for _ in range(3)]
    for h in handles:
        h.pread(BLOCK, 0)
    counters = sim.control.counters()["host0"]
    assert counters["peak_connections"] == 3 and counters["reads"] == 3
    assert counters["bytes_served"] == 3 * BLOCK
    for h in handles:
        h.shutdown()

    sim.control.set_faults(drop_on_read=2)
    h = open_export(info, pool.tlsdir)
    h.pread(512, 0)
    with pytest.raises(nbd.Error):
        h.pread(512, 0)  # the second read drops the connection
    sim.control.clear()

    sim.control.set_faults(read_latency=0.2)
    h = open_export(info, pool.tlsdir)
    started = time.monotonic()
    h.pread(512, 0)
    assert time.monotonic() - started >= 0.2
    h.shutdown()
    sim.control.clear()

    sim.control.refuse_for(30)
    assert refused(info, pool.tlsdir)
    assert sim.control.faults()["refuse_for_remaining"] > 20
    sim.control.clear()
    assert not refused(info, pool.tlsdir)

    assert sim.control.invalidate_sessions() >= 1
    assert refused(info, pool.tlsdir)  # its session is gone
    # the PyPI client logs in again by itself: a new session, so new export names
    fresh = ipv4(pool.x.VDI.get_nbd_info(snap))
    assert fresh["exportname"] != info["exportname"]
    assert not refused(fresh, pool.tlsdir)


def xensim_cli(sim, *args: str) -> list[dict]:
    """Run ``xensim COMMAND --state-dir DIR ARGS…``; its stdout, one JSON object a line."""
    argv = [
        sys.executable,
        "-m",
        "xensim.main",
        *args[:1],
        "--state-dir",
        sim.info["state_dir"],
        *args[1:],
    ]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.strip().splitlines()]


def test_faults_and_counters_from_the_command_line(pool):
    sim = pool.sim
    snap = pool.x.VDI.snapshot(pool.live, {})
    info = ipv4(pool.x.VDI.get_nbd_info(snap))
    (faults,) = xensim_cli(sim, "fault", "drop-after-bytes=1M", "read-latency=0.01")
    assert faults["drop_after_bytes"] == 1 << 20 and faults["read_latency"] == 0.01
    h = open_export(info, pool.tlsdir)
    h.pread(BLOCK, 0)
    with pytest.raises(nbd.Error):
        h.pread(1 << 20, BLOCK)  # crosses the 1 MiB budget: dropped mid-reply
    assert xensim_cli(sim, "fault", "clear")[0]["drop_after_bytes"] is None
    assert xensim_cli(sim, "counters")[0]["host0"]["reads"] == 2
    assert xensim_cli(sim, "counters", "--reset")[0]["host0"]["reads"] == 0
    assert xensim_cli(sim, "fault", "refuse-for=30")[0]["refuse_for_remaining"] > 20
    assert refused(info, pool.tlsdir)
    xensim_cli(sim, "fault", "clear")
    assert xensim_cli(sim, "fault", "invalidate-sessions")[0]["invalidated"] >= 1
    assert refused(info, pool.tlsdir)
    uuid = pool.x.VDI.get_uuid(pool.live)
    pool.x.VDI.enable_cbt(pool.live)
    assert pool.x.VDI.get_cbt_enabled(pool.live) is True
    crash, _ = xensim_cli(sim, "fault", f"cbt-off={uuid}")
    assert crash == {"vdi": uuid, "cbt_enabled": False}
    assert pool.x.VDI.get_cbt_enabled(pool.live) is False
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "xensim.main",
            "fault",
            "--state-dir",
            sim.info["state_dir"],
            "bogus=1",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "bogus" in bad.stderr
