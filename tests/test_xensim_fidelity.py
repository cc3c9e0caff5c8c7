"""xensim behaves like xapi where backup tools fail in the field (issue #12 items 5, 6, 9):
each test names the xapi-project source the behaviour follows."""

from __future__ import annotations

import base64
import http.client
import ssl
import time
import urllib.parse
import xmlrpc.client

import pytest
import XenAPI


def raw_proxy(url: str, cafile: str) -> xmlrpc.client.ServerProxy:
    """Plain XML-RPC: sees every Status/ErrorDescription (XenAPI would re-login)."""
    return xmlrpc.client.ServerProxy(url, context=ssl.create_default_context(cafile=cafile))


def login(proxy, password: str, originator: str = "tests") -> str:
    reply = proxy.session.login_with_password("root", password, "1.1", originator)
    assert reply["Status"] == "Success", reply
    return reply["Value"]


def user_vdi(x) -> str:
    vm = x.VM.get_by_name_label("demo-vm")[0]
    return x.VBD.get_VDI(x.VM.get_VBDs(vm)[0])


# -- get_nbd_info (xen-api ocaml/xapi/xapi_vdi.ml _get_nbd_info) ---------------------------


def test_nbd_info_lists_ipv6_in_cidr_form_and_skips_unplugged_pifs_and_pbds(xensim_factory):
    sim = xensim_factory(hosts=2, disk_sizes="1M")
    x = sim.session().xenapi
    vdi = user_vdi(x)
    addresses = [i["address"] for i in x.VDI.get_nbd_info(vdi)]
    # Per host: PIF.IP, then PIF.IPv6 as stored (global and link-local, with the prefix).
    assert addresses == [
        "127.0.0.1",
        "2001:db8::1/64",
        "fe80::1/64",
        "127.0.0.2",
        "2001:db8::2/64",
        "fe80::2/64",
    ]
    nbd_net = x.network.get_by_name_label("NBD network")[0]
    member = next(h for h in x.host.get_all() if x.host.get_address(h) == "127.0.0.2")
    (pif,) = [p for p in x.network.get_PIFs(nbd_net) if x.PIF.get_host(p) == member]
    x.PIF.unplug(pif)
    assert not x.PIF.get_currently_attached(pif)
    assert [i["address"] for i in x.VDI.get_nbd_info(vdi)] == addresses[:3]
    x.PIF.plug(pif)
    assert [i["address"] for i in x.VDI.get_nbd_info(vdi)] == addresses
    (host1_pbd,) = [p for p in x.SR.get_PBDs(x.VDI.get_SR(vdi)) if x.PBD.get_host(p) == member]
    x.PBD.unplug(host1_pbd)  # demo-vm runs on the master: nothing of the SR is active here
    assert [i["address"] for i in x.VDI.get_nbd_info(vdi)] == addresses[:3]
    x.PBD.plug(host1_pbd)
    (host0_pbd,) = [p for p in x.SR.get_PBDs(x.VDI.get_SR(vdi)) if x.PBD.get_host(p) != member]
    with pytest.raises(XenAPI.Failure) as busy:
        x.PBD.unplug(host0_pbd)
    assert busy.value.details[0] == "VDI_IN_USE" and vdi in busy.value.details
    management = next(p for p in x.PIF.get_all() if x.PIF.get_management(p))
    with pytest.raises(XenAPI.Failure) as refused:
        x.PIF.unplug(management)
    assert refused.value.details[0] == "PIF_IS_MANAGEMENT_INTERFACE"


# -- sessions (ocaml/xapi/session_check.ml, xapi_session.ml, db_gc_util.ml) -----------------


def test_a_user_session_on_a_member_gets_host_is_slave(xensim_factory):
    sim = xensim_factory(hosts=2)
    master, member = sim.info["hosts"]
    ref = login(raw_proxy(master["xapi"], master["cert_file"]), sim.password)
    on_member = raw_proxy(member["xapi"], member["cert_file"])
    for reply in (on_member.pool.get_all(ref), on_member.Async.VM.get_all(ref)):
        assert reply == {"Status": "Failure", "ErrorDescription": ["HOST_IS_SLAVE", "127.0.0.1"]}
    # A member answers HOST_IS_SLAVE before it looks at the password.
    reply = on_member.session.login_with_password("root", "wrong password", "1.1", "tests")
    assert reply["ErrorDescription"] == ["HOST_IS_SLAVE", "127.0.0.1"]


def test_a_refused_password_costs_the_delay(xensim_factory):
    sim = xensim_factory(auth_fail_delay=1.5)
    proxy = raw_proxy(sim.info["xapi"], sim.info["ca_file"])
    started = time.monotonic()
    reply = proxy.session.login_with_password("root", "wrong password", "1.1", "tests")
    assert reply["ErrorDescription"][0] == "SESSION_AUTHENTICATION_FAILED"
    assert time.monotonic() - started >= 1.5
    started = time.monotonic()
    login(proxy, sim.password)
    assert time.monotonic() - started < 1.5  # only refusals wait


def test_at_most_500_sessions_per_originator_least_recently_active_go(xensim):
    proxy = raw_proxy(xensim.info["xapi"], xensim.info["ca_file"])
    first, second = login(proxy, xensim.password, "flood"), login(proxy, xensim.password, "flood")
    other = login(proxy, xensim.password, "someone else")
    refs = [login(proxy, xensim.password, "flood") for _ in range(498)]  # 500 of "flood"
    assert proxy.pool.get_all(second)["Status"] == "Success"  # used: now recently active
    assert proxy.pool.get_all(refs[-1])["Status"] == "Success"
    refs.append(login(proxy, xensim.password, "flood"))  # 501: the least recently active goes
    assert proxy.pool.get_all(first)["ErrorDescription"][0] == "SESSION_INVALID"
    for ref in (second, other, refs[-1]):
        assert proxy.pool.get_all(ref)["Status"] == "Success"
    refs.append(login(proxy, xensim.password, "flood"))  # 502: then the next least recent
    assert proxy.pool.get_all(refs[0])["ErrorDescription"][0] == "SESSION_INVALID"
    assert proxy.pool.get_all(refs[1])["Status"] == "Success"
    assert proxy.pool.get_all(second)["Status"] == "Success"


# -- HTTP (xapi_http.ml, importexport.ml, import_raw_vdi.ml), API TLS ------------------------


def http_request(sim, verb, path, body=None, headers=None):
    url = urllib.parse.urlsplit(sim.info["xapi"])
    ctx = ssl.create_default_context(cafile=sim.info["ca_file"])
    conn = http.client.HTTPSConnection(url.hostname, url.port, context=ctx, timeout=60)
    try:
        conn.request(verb, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def test_session_decides_before_basic_auth_and_cookies_count(xensim):
    session = xensim.session()
    vdi = user_vdi(session.xenapi)
    basic = "Basic " + base64.b64encode(b"root:" + xensim.password.encode()).decode()
    path = f"/export_raw_vdi?vdi={vdi}&format=raw"
    assert http_request(xensim, "GET", path, headers={"Authorization": basic})[0] == 200
    status, _ = http_request(
        xensim, "GET", path + "&session_id=OpaqueRef:dead", headers={"Authorization": basic}
    )
    assert status == 401  # a dead session is refused even with good Basic credentials
    status, _ = http_request(
        xensim, "GET", path, headers={"Cookie": "session_id=OpaqueRef:dead", "Authorization": basic}
    )
    assert status == 401
    status, body = http_request(
        xensim,
        "GET",
        path.replace("format=raw", "format=RAW"),
        headers={"Cookie": f"session_id={session.handle}"},
    )
    assert status == 200 and len(body) == int(session.xenapi.VDI.get_virtual_size(vdi))


def test_chunked_import_body_gets_404_and_fails_the_task(xensim):
    session = xensim.session()
    x = session.xenapi
    vdi = user_vdi(x)
    task = x.task.create("import", "chunked")
    path = f"/import_raw_vdi?session_id={session.handle}&vdi={vdi}&task_id={task}"
    status, _ = http_request(
        xensim, "PUT", path, iter([b"x" * 512]), {"Transfer-Encoding": "chunked"}
    )
    assert status == 404
    assert x.task.get_status(task) == "failure"
    assert x.task.get_error_info(task) == ["INTERNAL_ERROR", "Cannot handle encoding: chunked"]


def test_api_speaks_tls_12_only(xensim):
    url = urllib.parse.urlsplit(xensim.info["xapi"])
    ctx = ssl.create_default_context(cafile=xensim.info["ca_file"])
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    conn = http.client.HTTPSConnection(url.hostname, url.port, context=ctx, timeout=30)
    with pytest.raises(ssl.SSLError):
        conn.request("POST", "/", body=b"")
    conn.close()
    ctx = ssl.create_default_context(cafile=xensim.info["ca_file"])
    conn = http.client.HTTPSConnection(url.hostname, url.port, context=ctx, timeout=30)
    conn.connect()
    assert conn.sock.version() == "TLSv1.2"
    conn.close()


# -- VM.snapshot (ocaml/idl/datamodel_vm.ml, xapi_vm_clone.ml) -------------------------------


def test_vm_snapshot_takes_optional_ignore_vdis(xensim):
    x = xensim.session().xenapi
    vm = x.VM.get_by_name_label("demo-vm")[0]
    disks = [x.VBD.get_VDI(v) for v in x.VM.get_VBDs(vm)]
    assert len(disks) == 2
    snap = x.VM.snapshot(vm, "without disk 1", [disks[1]])
    taken = [x.VDI.get_snapshot_of(x.VBD.get_VDI(v)) for v in x.VM.get_VBDs(snap)]
    assert taken == [disks[0]]
    assert x.VDI.get_snapshots(disks[1]) == []
    snap = x.VM.snapshot(vm, "all disks")
    assert len(x.VM.get_VBDs(snap)) == 2
