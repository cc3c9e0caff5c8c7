"""Issue #12 items 1–2: imports that fail after their 200, and 302 to the host that sees the SR.

xensim side (raw HTTP, as xapi answers): ``import_raw_vdi`` answers 200 with the task
header before it writes and reports a later failure only in the task (``import_raw_vdi.ml``);
a host that cannot see the VDI's SR answers 302 without reading the body
(``importexport.ml``).  Product side (the real ``xencbt``): a restore counts only when the
import's task succeeded; ``--to-sr`` leaves no VDI behind when it did not; ``--to-vdi`` says
the target is partly written and which point to restore again; restores and exports on a
member's local SR follow the 302, checking the member's certificate.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import ssl
import urllib.parse
from pathlib import Path

import pytest
import xapirec
from cli_support import BLOCK, Vm, backup, rand, xencbt

SIZE = (1 << 20) + 512  # the demo disks: not a multiple of 64 KiB


# -- raw HTTP, head first (as xapi's own clients speak to import_raw_vdi) --------------
def open_request(sim, host: dict, verb: str, target: str, length: int | None = None):
    """Send only the head of a request to ``host``; return (connection, answer head)."""
    url = urllib.parse.urlsplit(host["xapi"])
    ctx = ssl.create_default_context(cafile=host["cert_file"])
    conn = http.client.HTTPSConnection(url.hostname, url.port, context=ctx, timeout=60)
    conn.putrequest(verb, target)
    if length is not None:
        conn.putheader("Content-Length", str(length))
    conn.endheaders()
    reply = http.client.HTTPResponse(conn.sock, method=verb)
    reply.begin()
    return conn, reply


def send_all(conn, reply, body: bytes) -> None:
    """Send the body, then read the answer's body to its end: the host closes the
    connection when it is done, or when it failed (then it may not read all we send)."""
    with contextlib.suppress(OSError):
        for i in range(0, len(body), BLOCK):
            conn.sock.sendall(body[i : i + BLOCK])
    with contextlib.suppress(OSError):
        reply.read()
    conn.close()


def raw(sim, uuid: str) -> bytes:
    """The simulator's own copy of a VDI: the independent truth."""
    return (Path(sim.state_dir) / "vdis" / f"{uuid}.raw").read_bytes()


def new_vdi(x, sr: str, size: int) -> str:
    return x.VDI.create(xapirec.vdi(sr, size, "target"))


def vdi_uuids(x) -> set[str]:
    return {r["uuid"] for r in x.VDI.get_all_records().values()}


@pytest.fixture
def pool(xensim_factory):
    """Two hosts with local SRs; demo-vm-2 and its disks live on host1 (the member)."""
    sim = xensim_factory(hosts=2, vms=2, srs="local", disk_sizes="1M+512", in_use_wait=0.5)
    return sim


def member_sr(x) -> str:
    return x.SR.get_by_name_label("Local storage on host1")[0]


# -- xensim: late failure --------------------------------------------------------------
def test_import_answers_200_before_writing_and_fails_only_the_task(xensim_factory):
    sim = xensim_factory(disk_sizes="1M")
    session = sim.session()
    x = session.xenapi
    vdi = new_vdi(x, x.SR.get_all()[0], 2 << 20)
    uuid = x.VDI.get_uuid(vdi)
    sim.control.fail_imports_after(256 * 1024)
    task = x.task.create("import", "late failure")
    body = rand(1 << 20)
    target = f"/import_raw_vdi?session_id={session.handle}&vdi={vdi}&format=raw&task_id={task}"
    conn, reply = open_request(sim, sim.info["hosts"][0], "PUT", target, len(body))
    # The answer is there before a single byte of the body was sent.
    assert reply.status == 200 and reply.getheader("task-id") == task
    send_all(conn, reply, body)
    assert x.task.get_status(task) == "failure"
    assert x.task.get_error_info(task) == ["VDI_IO_ERROR", "Device I/O errors"]
    data = raw(sim, uuid)
    assert data[: 256 * 1024] == body[: 256 * 1024]  # written up to the fault, no further
    assert data[256 * 1024 :] == bytes(len(data) - 256 * 1024)


def test_import_without_task_id_loses_its_outcome(xensim_factory):
    sim = xensim_factory(disk_sizes="1M")
    session = sim.session()
    x = session.xenapi
    vdi = new_vdi(x, x.SR.get_all()[0], 2 << 20)
    body = rand(BLOCK)
    target = f"/import_raw_vdi?session_id={session.handle}&vdi={vdi}&format=raw"
    conn, reply = open_request(sim, sim.info["hosts"][0], "PUT", target, len(body))
    task = reply.getheader("task-id")
    assert reply.status == 200 and task.startswith("OpaqueRef:")
    send_all(conn, reply, body)
    # xapi made that task for the request and destroyed it: nobody can read the outcome.
    with pytest.raises(Exception, match="HANDLE_INVALID"):
        x.task.get_status(task)


def test_sr_that_runs_out_of_space_fails_the_import_task(xensim_factory):
    sim = xensim_factory(disk_sizes="1M")
    session = sim.session()
    x = session.xenapi
    sr = x.SR.get_all()[0]
    vdi = new_vdi(x, sr, 2 << 20)
    used = sim.control.set_sr_size(x.SR.get_uuid(sr), 1 << 40)["used"]
    sim.control.set_sr_size(x.SR.get_uuid(sr), used + 256 * 1024)
    task = x.task.create("import", "full SR")
    body = rand(1 << 20)
    target = f"/import_raw_vdi?session_id={session.handle}&vdi={vdi}&format=raw&task_id={task}"
    conn, reply = open_request(sim, sim.info["hosts"][0], "PUT", target, len(body))
    assert reply.status == 200
    send_all(conn, reply, body)
    assert x.task.get_error_info(task) == ["VDI_IO_ERROR", "Device I/O errors"]
    # The 1 MiB write did not fit: nothing of it was written, and the SR says so.
    record = x.SR.get_record(sr)
    assert int(record["physical_size"]) == used + 256 * 1024
    assert int(record["physical_utilisation"]) == used
    assert not any(raw(sim, x.VDI.get_uuid(vdi)))


# -- xensim: 302 -----------------------------------------------------------------------
@pytest.mark.parametrize("verb", ["PUT", "GET"])
def test_host_that_cannot_see_the_sr_redirects_to_the_one_that_can(pool, verb):
    session = pool.session()
    x = session.xenapi
    vm = x.VM.get_by_name_label("demo-vm-2")[0]
    vdi = x.VBD.get_VDI(x.VM.get_VBDs(vm)[0])
    master, member = pool.info["hosts"]
    path = "/import_raw_vdi" if verb == "PUT" else "/export_raw_vdi"
    target = f"{path}?session_id={session.handle}&vdi={vdi}&format=raw"
    conn, reply = open_request(pool, master, verb, target, 4096 if verb == "PUT" else None)
    # Answered without the body having been sent: the PUT body is not read.
    assert reply.status == 302
    port = urllib.parse.urlsplit(member["xapi"]).port
    assert reply.getheader("Location") == f"https://{member['address']}:{port}{target}"
    conn.close()
    conn, reply = open_request(pool, member, verb, target, 0 if verb == "PUT" else None)
    assert reply.status == 200
    reply.read()
    conn.close()


# -- the product -----------------------------------------------------------------------
def restore(sim, repo, vdi, point, *target, check=0):
    args = ["restore", "--repo", str(repo), vdi, "--at", point, *target]
    return xencbt(sim, "--json", *args, check=check)


def one_line_error(r) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_two_hosts_local_srs_backup_and_restore_on_the_member(pool, tmp_path):
    """The acceptance: a VM whose disks live on the member, restored --to-sr on the
    member's SR and --to-vdi in place, both byte-identical to the simulator's raw data."""
    repo = tmp_path / "repo"
    vm = Vm(pool, "demo-vm-2")
    size = len(vm.models[0])
    vm.write(0, {0: rand(2 * BLOCK), 9 * BLOCK: rand(BLOCK), size - 512: rand(512)})
    source = raw(pool, vm.uuids[0])
    assert source == bytes(vm.models[0])
    point = backup(pool, repo, "demo-vm-2")["vms"][0]["disks"][0]["point"]

    sr = member_sr(vm.x)
    r = restore(pool, repo, vm.uuids[0], point, "--to-sr", vm.x.SR.get_uuid(sr))
    new = json.loads(r.stdout)["to"]
    assert vm.x.VDI.get_SR(vm.x.VDI.get_by_uuid(new)) == sr
    data = raw(pool, new)
    assert data[:size] == source and not any(data[size:])

    vm.write(0, {BLOCK: rand(BLOCK), 12 * BLOCK: rand(BLOCK)})
    assert raw(pool, vm.uuids[0]) != source
    # In place onto the disk of its own VM, which xensim shows running (it has no power
    # operations yet): --force, as an administrator who stopped the guest would say.
    restore(pool, repo, vm.uuids[0], point, "--to-vdi", vm.uuids[0], "--force")
    assert raw(pool, vm.uuids[0]) == source
    assert vm.x.task.get_all() == []  # the imports' tasks were read, then destroyed


def test_failed_import_to_sr_exits_non_zero_and_leaves_no_vdi(pool, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(pool, "demo-vm-2")
    vm.write(0, {0: rand(8 * BLOCK)})
    point = backup(pool, repo, "demo-vm-2")["vms"][0]["disks"][0]["point"]
    before = vdi_uuids(vm.x)
    pool.control.fail_imports_after(3 * BLOCK)
    r = restore(pool, repo, vm.uuids[0], point, "--to-sr", "Local storage on host1", check=1)
    line = one_line_error(r)
    assert "VDI_IO_ERROR" in line and "was destroyed" in line, line
    assert json.loads(r.stdout) == {"error": line.removeprefix("xencbt: "), "exit_code": 1}
    assert vdi_uuids(vm.x) == before


def test_sr_running_out_of_space_fails_the_restore_the_same_way(pool, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(pool, "demo-vm-2")
    vm.write(0, {0: rand(8 * BLOCK)})
    point = backup(pool, repo, "demo-vm-2")["vms"][0]["disks"][0]["point"]
    before = vdi_uuids(vm.x)
    sr_uuid = vm.x.SR.get_uuid(member_sr(vm.x))
    used = pool.control.set_sr_size(sr_uuid, 1 << 40)["used"]
    pool.control.set_sr_size(sr_uuid, used + 4 * BLOCK)
    r = restore(pool, repo, vm.uuids[0], point, "--to-sr", sr_uuid, check=1)
    line = one_line_error(r)
    assert "VDI_IO_ERROR" in line and "was destroyed" in line, line
    assert vdi_uuids(vm.x) == before


def test_failed_import_to_vdi_says_partly_written_and_which_point(pool, tmp_path):
    repo = tmp_path / "repo"
    vm = Vm(pool, "demo-vm-2")
    vm.write(0, {0: rand(8 * BLOCK)})
    point = backup(pool, repo, "demo-vm-2")["vms"][0]["disks"][0]["point"]
    source = raw(pool, vm.uuids[0])
    vm.write(0, {0: rand(8 * BLOCK)})
    pool.control.fail_imports_after(3 * BLOCK)
    r = restore(pool, repo, vm.uuids[0], point, "--to-vdi", vm.uuids[0], "--force", check=1)
    line = one_line_error(r)
    assert "partly written" in line and f"--at {point} --to-vdi {vm.uuids[0]}" in line, line
    assert raw(pool, vm.uuids[0]) != source
    pool.control.fail_imports_after(None)
    restore(pool, repo, vm.uuids[0], point, "--to-vdi", vm.uuids[0], "--force")  # as the line says
    assert raw(pool, vm.uuids[0]) == source


def test_redirect_to_a_member_with_an_unexpected_certificate_is_not_followed(
    xensim_factory, tmp_path
):
    """The member's certificate must be the one the master reports for it
    (host.get_server_certificate): here the member presents another one."""
    sim = xensim_factory(hosts=2, vms=2, srs="local", disk_sizes="1M+512")
    repo = tmp_path / "repo"
    vm = Vm(sim, "demo-vm-2")
    vm.write(0, {0: rand(BLOCK)})
    point = backup(sim, repo, "demo-vm-2")["vms"][0]["disks"][0]["point"]
    before = raw(sim, vm.uuids[0])
    state = sim.state_dir
    assert sim.stop() == 0
    for suffix in (".pem", ".key"):  # host1 gets a new key pair; the pool's record keeps the old
        os.unlink(state / "certs" / f"host1{suffix}")
    sim = xensim_factory(state_dir=state)
    vm = Vm(sim, "demo-vm-2")
    vm.write(0, {0: rand(BLOCK)})
    changed = raw(sim, vm.uuids[0])
    r = restore(sim, repo, vm.uuids[0], point, "--to-vdi", vm.uuids[0], "--force", check=1)
    line = one_line_error(r)
    assert "host1" in line and "certificate" in line, line
    assert raw(sim, vm.uuids[0]) == changed != before


def test_redirect_is_followed_only_to_a_host_of_the_pool_over_https(pool):
    """hosthttp._member over a real session: a Location that names no host of the pool,
    or a plain-HTTP one, is refused; a member's is pinned to the master's record of it."""
    from xencbt_cli.errors import CliError
    from xencbt_cli.xapi.facade import PoolApi as Pool
    from xencbt_cli.xapi.hosthttp import _member
    from xencbt_core.secret import Secret
    from xencbt_core.xapi import ApiTrust, Session

    trust = ApiTrust(cafile=pool.info["ca_file"])
    with Session(pool.info["xapi"], trust, password=Secret(pool.password)) as session:
        p = Pool(session)
        member = pool.info["hosts"][1]
        netloc = urllib.parse.urlsplit(member["xapi"]).netloc
        with pytest.raises(CliError, match="not one of its hosts"):
            _member(p, "https://192.0.2.7:%s/import_raw_vdi?x=1" % netloc.split(":")[1])
        with pytest.raises(CliError, match="non-HTTPS"):
            _member(p, "http://%s/import_raw_vdi?x=1" % netloc)
        where, pinned, name = _member(p, "https://%s/import_raw_vdi?x=1" % netloc)
        der = ssl.PEM_cert_to_DER_cert(Path(member["cert_file"]).read_text())
        assert (where, name) == (netloc, "host1")
        assert pinned.normalized() == hashlib.sha256(der).hexdigest().upper()
