"""The simulator's XAPI through the real PyPI XenAPI client (and raw XML-RPC/JSON-RPC where
the client hides the wire): sessions, enumeration, errors, tasks, persistence."""

from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.parse
import xmlrpc.client
from pathlib import Path

import pytest
import xapirec
import XenAPI


def raw_proxy(sim, url=None, cafile=None) -> xmlrpc.client.ServerProxy:
    """Plain XML-RPC: sees every Status/ErrorDescription, unlike XenAPI (which re-logs in)."""
    ctx = ssl.create_default_context(cafile=cafile or sim.info["ca_file"])
    return xmlrpc.client.ServerProxy(url or sim.info["xapi"], context=ctx)


def login(proxy, password) -> str:
    reply = proxy.session.login_with_password("root", password, "1.1", "tests")
    assert reply["Status"] == "Success", reply
    return reply["Value"]


def jsonrpc(sim, method, params, version="2.0"):
    url = urllib.parse.urlsplit(sim.info["xapi"])
    ctx = ssl.create_default_context(cafile=sim.info["ca_file"])
    conn = http.client.HTTPSConnection(url.hostname, url.port, context=ctx)
    body = {"method": method, "params": params, "id": 7}
    if version:
        body["jsonrpc"] = version
    conn.request("POST", "/jsonrpc", json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    data = reply.read()
    conn.close()
    return reply.status, (json.loads(data) if reply.status == 200 else data)


def failure(call, *args) -> list[str]:
    with pytest.raises(XenAPI.Failure) as info:
        call(*args)
    return info.value.details


def test_login_logout_and_session_invalid(xensim):
    proxy = raw_proxy(xensim)
    ref = login(proxy, xensim.password)
    assert ref.startswith("OpaqueRef:")
    assert proxy.pool.get_all(ref)["Status"] == "Success"
    assert proxy.session.logout(ref) == {"Status": "Success", "Value": ""}
    assert proxy.pool.get_all(ref) == {
        "Status": "Failure",
        "ErrorDescription": ["SESSION_INVALID", ref],
    }


def test_wrong_password_is_authentication_failure(xensim):
    reply = raw_proxy(xensim).session.login_with_password("root", "nope", "1.1", "tests")
    assert reply == {
        "Status": "Failure",
        "ErrorDescription": ["SESSION_AUTHENTICATION_FAILED", "root", "Authentication failure"],
    }


def test_session_expires_when_idle(xensim_factory):
    sim = xensim_factory(session_timeout=0.3)
    proxy = raw_proxy(sim)
    ref = login(proxy, sim.password)
    assert proxy.pool.get_all(ref)["Status"] == "Success"
    time.sleep(0.5)  # the idle timeout itself is what is under test
    assert proxy.pool.get_all(ref)["ErrorDescription"] == ["SESSION_INVALID", ref]


def test_member_host_answers_host_is_slave_with_the_master_address(xensim_factory):
    sim = xensim_factory(hosts=2)
    master, member = sim.info["hosts"]
    assert master["address"] == "127.0.0.1" and member["address"] == "127.0.0.2"
    assert urllib.parse.urlsplit(member["xapi"]).port == urllib.parse.urlsplit(master["xapi"]).port
    assert member["nbd_port"] == master["nbd_port"]
    proxy = raw_proxy(sim, member["xapi"], member["cert_file"])
    reply = proxy.session.login_with_password("root", sim.password, "1.1", "tests")
    assert reply == {"Status": "Failure", "ErrorDescription": ["HOST_IS_SLAVE", "127.0.0.1"]}
    x = sim.session().xenapi
    hosts = x.host.get_all_records()
    assert sorted(h["address"] for h in hosts.values()) == ["127.0.0.1", "127.0.0.2"]
    pool = x.pool.get_all()[0]
    assert x.host.get_address(x.pool.get_master(pool)) == "127.0.0.1"
    sr = x.SR.get_by_name_label("Local storage")[0]
    assert x.SR.get_shared(sr) is True and len(x.SR.get_PBDs(sr)) == 2


def test_enumeration_shapes(xensim):
    x = xensim.session().xenapi
    vms = x.VM.get_all_records()
    guests = [v for v in vms.values() if not v["is_control_domain"] and not v["is_a_snapshot"]]
    assert [v["name_label"] for v in guests] == ["demo-vm"]
    assert any(v["is_control_domain"] for v in vms.values())  # dom0 must be filtered
    vm = x.VM.get_by_name_label("demo-vm")[0]
    assert x.VM.get_by_uuid(vms[vm]["uuid"]) == vm
    sizes = {}
    for vbd in x.VM.get_VBDs(vm):
        vdi = x.VBD.get_VDI(vbd)
        assert x.VBD.get_VM(vbd) == vm and x.VBD.get_type(vbd) == "Disk"
        rec = x.VDI.get_record(vdi)
        assert rec["VBDs"] == [vbd] and rec["SR"] == x.SR.get_all()[0]
        assert isinstance(rec["virtual_size"], str)  # int64 travels as a string
        sizes[x.VBD.get_userdevice(vbd)] = int(rec["virtual_size"])
    assert sizes == {"0": 64 << 20, "1": (20 << 20) + 512}
    assert x.SR.get_type(x.SR.get_all()[0]) == "ext"
    nets = {r["name_label"]: r for r in x.network.get_all_records().values()}
    assert nets["NBD network"]["purpose"] == ["nbd"]
    for pif in nets["NBD network"]["PIFs"]:
        assert x.PIF.get_IP(pif) == "127.0.0.1"
    host = x.host.get_all()[0]
    assert x.host.get_server_certificate(host) == Path(xensim.info["ca_file"]).read_text()
    assert x.host.get_API_version_major(host) == "2"


def test_errors_have_xapi_shapes(xensim):
    proxy = raw_proxy(xensim)
    s = login(proxy, xensim.password)
    assert proxy.VM.get_record(s, "OpaqueRef:nope")["ErrorDescription"] == [
        "HANDLE_INVALID",
        "VM",
        "OpaqueRef:nope",
    ]
    assert proxy.VDI.get_by_uuid(s, "0000")["ErrorDescription"] == ["UUID_INVALID", "VDI", "0000"]
    assert proxy.VM.no_such_call(s)["ErrorDescription"] == [
        "MESSAGE_METHOD_UNKNOWN",
        "VM.no_such_call",
    ]
    # gen_server.ml: expected and received both exclude the session
    assert proxy.VM.get_all(s, "extra")["ErrorDescription"] == [
        "MESSAGE_PARAMETER_COUNT_MISMATCH",
        "VM.get_all",
        "0",
        "1",
    ]
    # class names are case-insensitive, as in xapi
    assert proxy.Task.get_all(s)["Status"] == "Success"


def test_jsonrpc_v2_and_v1(xensim):
    status, reply = jsonrpc(
        xensim, "session.login_with_password", ["root", xensim.password, "1.1", "t"]
    )
    assert status == 200 and reply["jsonrpc"] == "2.0" and reply["id"] == 7
    session = reply["result"]
    _, reply = jsonrpc(xensim, "VDI.get_all_records", [session])
    sizes = sorted(r["virtual_size"] for r in reply["result"].values())
    assert sizes == [(20 << 20) + 512, 64 << 20]  # JSON-RPC ints are numbers
    _, reply = jsonrpc(xensim, "session.login_with_password", ["root", "bad", "1.1", "t"])
    assert reply == {
        "jsonrpc": "2.0",
        "id": 7,
        "error": {
            "code": 1,
            "message": "SESSION_AUTHENTICATION_FAILED",
            "data": ["root", "Authentication failure"],
        },
    }
    _, reply = jsonrpc(xensim, "VM.get_all", ["OpaqueRef:dead"], version=None)
    assert reply == {"result": None, "error": ["SESSION_INVALID", "OpaqueRef:dead"], "id": 7}
    status, _ = jsonrpc(xensim, "session.logout", None)
    assert status == 500  # malformed request: HTTP 500 as in xapi


def test_async_snapshot_task_lifecycle(xensim):
    x = xensim.session().xenapi
    vm = x.VM.get_by_name_label("demo-vm")[0]
    task = x.Async.VM.snapshot(vm, "via-task")
    assert task.startswith("OpaqueRef:")
    deadline = time.monotonic() + 30
    while x.task.get_status(task) == "pending":  # the documented client pattern
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert x.task.get_status(task) == "success"
    assert float(x.task.get_progress(task)) == 1.0
    result = x.task.get_result(task)
    assert result.startswith("<value>OpaqueRef:") and result.endswith("</value>")
    snap = result[len("<value>") : -len("</value>")]
    assert x.VM.get_is_a_snapshot(snap) and x.VM.get_snapshot_of(snap) == vm
    assert x.VM.get_name_label(snap) == "via-task"
    x.task.destroy(task)
    assert task not in x.task.get_all()


def test_async_failure_lands_in_error_info(xensim):
    x = xensim.session().xenapi
    vm = x.VM.get_by_name_label("demo-vm")[0]
    vdi = x.VBD.get_VDI(x.VM.get_VBDs(vm)[0])
    task = x.Async.VDI.data_destroy(vdi)  # a live VDI: not allowed
    while x.task.get_status(task) == "pending":
        time.sleep(0.05)
    assert x.task.get_status(task) == "failure"
    assert x.task.get_error_info(task)[0] == "OPERATION_NOT_ALLOWED"


def test_vm_snapshot_is_one_vm_with_one_snapshot_vdi_per_disk(xensim):
    x = xensim.session().xenapi
    vm = x.VM.get_by_name_label("demo-vm")[0]
    live = {x.VBD.get_userdevice(v): x.VBD.get_VDI(v) for v in x.VM.get_VBDs(vm)}
    snap = x.VM.snapshot(vm, "nightly")
    assert x.VM.get_snapshots(vm) == [snap]
    copies = {x.VBD.get_userdevice(v): x.VBD.get_VDI(v) for v in x.VM.get_VBDs(snap)}
    assert copies.keys() == live.keys()
    for dev, vdi in copies.items():
        rec = x.VDI.get_record(vdi)
        assert rec["is_a_snapshot"] and rec["snapshot_of"] == live[dev]
        assert rec["virtual_size"] == x.VDI.get_virtual_size(live[dev])
    x.VM.destroy(snap)  # destroys the VM and its VBDs, not the VDIs
    assert x.VM.get_snapshots(vm) == []
    for vdi in copies.values():
        assert x.VDI.get_VBDs(vdi) == []
        x.VDI.destroy(vdi)
    details = failure(x.VM.destroy, vm)
    assert details[0] == "VM_BAD_POWER_STATE"


def test_vdi_create_rounds_like_a_vhd_sr_and_resize_grows_only(xensim):
    x = xensim.session().xenapi
    sr = x.SR.get_all()[0]
    vdi = x.VDI.create(
        {
            "name_label": "scratch",
            "SR": sr,
            "virtual_size": str(3 << 20),
            "type": "user",
            "sharable": False,
            "read_only": False,
            "other_config": {},
        }
    )
    assert x.VDI.get_virtual_size(vdi) == str(4 << 20)
    tagged = x.VDI.create(xapirec.vdi(sr, 1 << 20, tags=["t"], xenstore_data={"k": "v"}))
    assert (x.VDI.get_tags(tagged), x.VDI.get_xenstore_data(tagged)) == (["t"], {"k": "v"})
    with pytest.raises(XenAPI.Failure) as e:  # xapi_vdi.ml create
        x.VDI.create(xapirec.vdi(sr, 1 << 20, type="cbt_metadata"))
    assert e.value.details == ["VDI_INCOMPATIBLE_TYPE", "", "cbt_metadata"]
    x.VDI.resize(vdi, str(6 << 20))
    assert x.VDI.get_virtual_size(vdi) == str(6 << 20)
    assert failure(x.VDI.resize, vdi, str(2 << 20))[0] == "SR_BACKEND_FAILURE_79"
    x.VDI.set_name_label(vdi, "renamed")
    assert x.VDI.get_by_name_label("renamed") == [vdi]
    x.VDI.destroy(vdi)
    assert failure(x.VDI.get_record, vdi) == ["HANDLE_INVALID", "VDI", vdi]


def test_state_persists_across_restart_and_sessions_do_not(xensim_factory, tmp_path):
    state_dir = tmp_path / "persist"
    sim = xensim_factory(state_dir=state_dir)
    x = sim.session().xenapi
    vm = x.VM.get_by_name_label("demo-vm")[0]
    vdi = x.VBD.get_VDI(x.VM.get_VBDs(vm)[0])
    x.VDI.enable_cbt(vdi)
    snap = x.VM.snapshot(vm, "kept")
    proxy = raw_proxy(sim)
    old = login(proxy, sim.password)
    assert sim.stop() == 0
    assert not (state_dir / "serve.json").exists()
    again = xensim_factory(state_dir=state_dir, hosts=3)  # options of a new dir are ignored now
    assert len(again.info["hosts"]) == 1
    assert again.password == sim.password
    proxy = raw_proxy(again)
    assert proxy.VM.get_all(old)["ErrorDescription"] == ["SESSION_INVALID", old]
    y = again.session().xenapi
    assert y.VM.get_name_label(snap) == "kept" and y.VDI.get_cbt_enabled(vdi) is True
    assert y.VM.get_snapshots(vm) == [snap]


def test_api_connections_are_tcp_nodelay_as_xapi_sets_them():
    """xapi sets TCP_NODELAY on its API sockets (http_svr.ml ``bind``, stunnel's
    ``a:TCP_NODELAY=1``); without it Nagle held every reply's body for the client's
    delayed ACK, ~40 ms a call."""
    import socket

    from xensim.web import WebServer

    server = WebServer(("127.0.0.1", 0), ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), None, "h", None)
    try:
        with socket.create_connection(server.server_address):
            conn, _ = server.get_request()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        server.server_close()
