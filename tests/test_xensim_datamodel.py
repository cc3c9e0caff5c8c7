"""xensim conforms to xapi's own datamodel (simulator/xensim/datamodel.json, extracted from
xen-api's doc/data/xenapi.json), and the product calls only what that datamodel publishes.

- every record of every class xensim holds has exactly the published fields, each of its
  datamodel type as XML-RPC carries it; get_<field> answers for each;
- ``<class>.create`` without a constructor field that has no default fails as xapi's
  generated dispatcher does (Dispatcher_FieldNotFound), and wrongly typed parameters fail;
- every message xensim serves exists in the datamodel with the same parameter count;
- every ``Class.message`` the plugin and the CLI call exists, with as many arguments as
  the datamodel declares and literal arguments of the declared types.
"""

from __future__ import annotations

import ast
import re
import secrets
import ssl
import xmlrpc.client
from pathlib import Path

import pytest
from xensim import datamodel
from xensim.database import CLASSES

ROOT = Path(__file__).resolve().parent.parent
METHOD = re.compile(r"^(Async\.)?([A-Za-z_]+)\.([A-Za-z_]+)$")
CALLERS = ("call", "_raw_call", "in_use")
# Parameters that xen-api's datamodel (ocaml/idl/datamodel_*.ml) gives a default, so a
# call may leave them out; xenapi.json does not carry parameter defaults.
OPTIONAL = {"VM.snapshot": 1, "VDI.copy": 2}
SID = "session_id"


def proxy(sim) -> xmlrpc.client.ServerProxy:
    ctx = ssl.create_default_context(cafile=sim.info["ca_file"])
    return xmlrpc.client.ServerProxy(sim.info["xapi"], context=ctx)


def value(reply: dict):
    assert reply["Status"] == "Success", reply["ErrorDescription"]
    return reply["Value"]


def login(p, sim) -> str:
    return value(p.session.login_with_password("root", sim.password, "1.1", "tests"))


def wire_ok(t: str, v) -> bool:
    """Whether ``v`` is what xapi sends over XML-RPC for datamodel type ``t``."""
    k, a, b = datamodel.kind(t)
    if k == "string":
        return isinstance(v, str)
    if k == "int":
        return isinstance(v, str) and bool(datamodel.INT.match(v))  # int64 as text
    if k == "float":
        return isinstance(v, float)
    if k == "bool":
        return isinstance(v, bool)
    if k == "datetime":
        return isinstance(v, xmlrpc.client.DateTime)
    if k == "ref":
        return isinstance(v, str) and v.startswith("OpaqueRef:")
    if k == "enum":
        return v in datamodel.enum_values(a)
    if k == "set":
        return isinstance(v, list) and all(wire_ok(a, x) for x in v)
    if k == "map":
        return isinstance(v, dict) and all(wire_ok(b, x) for x in v.values())
    return False


def test_the_extract_records_its_source():
    data = datamodel.data()
    assert re.fullmatch(r"[0-9a-f]{40}", data["commit"])
    assert data["generated_by"] == "simulator/extract_datamodel.py"
    # REFERENCE §9: VM.create has 25 fields without default; VBD 10, VIF 8, VDI 6
    counts = {cls: len(datamodel.required(cls)) for cls in ("VM", "VBD", "VIF", "VDI")}
    assert counts == {"VM": 25, "VBD": 10, "VIF": 8, "VDI": 6}
    assert {"is_a_template", "affinity"} <= set(datamodel.required("VM"))


def demo_objects(sim, p, s) -> None:
    """Objects of every kind the demo pool has, plus a VM snapshot and a task."""
    vm = value(p.VM.get_by_name_label(s, "demo-vm"))[0]
    value(p.VM.snapshot(s, vm, "conformance"))
    value(p.task.create(s, "conformance", ""))


def test_every_record_has_every_published_field_of_its_type(xensim):
    p = proxy(xensim)
    s = login(p, xensim)
    demo_objects(xensim, p, s)
    seen = set()
    for cls in CLASSES:
        fields = datamodel.fields(cls)
        for ref, rec in value(getattr(p, cls).get_all_records(s)).items():
            seen.add(cls)
            assert set(rec) == set(fields), (cls, set(rec) ^ set(fields))
            wrong = {n: v for n, v in rec.items() if not wire_ok(fields[n].type, v)}
            assert not wrong, (cls, ref, {n: (fields[n].type, v) for n, v in wrong.items()})
    assert seen >= {"pool", "host", "network", "PIF", "SR", "PBD", "VM", "VBD", "VDI"}
    assert seen >= {"task", "VIF", "VTPM"}


def test_get_field_answers_for_every_published_field(xensim):
    p = proxy(xensim)
    s = login(p, xensim)
    for cls in ("VM", "VDI", "VBD", "VIF", "VTPM", "host", "pool", "SR", "network", "PIF"):
        ref = value(getattr(p, cls).get_all(s))[0]
        rec = value(getattr(p, cls).get_record(s, ref))
        for name in datamodel.fields(cls):
            got = value(getattr(getattr(p, cls), "get_" + name)(s, ref))
            assert got == rec[name], (cls, name)


def full_record(cls: str, **given) -> dict:
    """Every constructor field without a default, at its type's zero value, then ``given``."""
    rec = {n: datamodel.zero(datamodel.fields(cls)[n].type) for n in datamodel.required(cls)}
    rec.update(given)
    return {
        k: str(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in rec.items()
    }


def create_args(p, s) -> dict[str, dict]:
    vm = value(p.VM.get_by_name_label(s, "demo-vm"))[0]
    sr = value(p.SR.get_all(s))[0]
    net = value(p.network.get_all(s))[0]
    mem = str(1 << 30)
    return {
        "VM": full_record(
            "VM",
            name_label="conformance",
            memory_static_max=mem,
            memory_dynamic_max=mem,
            memory_dynamic_min=mem,
            memory_static_min=mem,
            VCPUs_max=1,
            VCPUs_at_startup=1,
            HVM_boot_policy="BIOS order",
            actions_after_shutdown="destroy",
            actions_after_reboot="restart",
            actions_after_crash="restart",
        ),
        "VDI": full_record("VDI", SR=sr, virtual_size=1 << 20, type="user"),
        "VBD": full_record(
            "VBD", VM=vm, VDI="OpaqueRef:NULL", userdevice="7", type="CD", empty=True, mode="RO"
        ),
        "VIF": full_record("VIF", VM=vm, network=net, device="7", MTU=1500),
    }


@pytest.mark.parametrize("cls", ["VM", "VDI", "VBD", "VIF"])
def test_create_needs_every_constructor_field_without_default(xensim, cls):
    p = proxy(xensim)
    s = login(p, xensim)
    record = create_args(p, s)[cls]
    for name in datamodel.required(cls):
        partial = {k: v for k, v in record.items() if k != name}
        reply = getattr(p, cls).create(s, partial)
        assert reply["Status"] == "Failure", (cls, name)
        assert reply["ErrorDescription"] == [
            "INTERNAL_ERROR",
            'Server_helpers.Dispatcher_FieldNotFound("%s")' % name,
        ]
    ref = value(getattr(p, cls).create(s, record))
    assert value(getattr(p, cls).get_record(s, ref))["uuid"]


def test_parameters_are_typed_as_xapi_unmarshals_them(xensim):
    p = proxy(xensim)
    s = login(p, xensim)
    vm = value(p.VM.get_by_name_label(s, "demo-vm"))[0]
    # a string parameter takes only a string
    assert p.VM.set_name_label(s, vm, 5)["ErrorDescription"][0] == "INTERNAL_ERROR"
    # a bool only a boolean (not "true", not 1)
    record = create_args(p, s)["VBD"]
    for bad in ("true", 1):
        reply = p.VBD.create(s, {**record, "bootable": bad})
        assert reply["ErrorDescription"][0] == "INTERNAL_ERROR", bad
    # an int an int or a decimal string
    vdi = create_args(p, s)["VDI"]
    assert p.VDI.create(s, {**vdi, "virtual_size": "1MiB"})["ErrorDescription"][0] == (
        "INTERNAL_ERROR"
    )
    value(p.VDI.create(s, {**vdi, "virtual_size": str(1 << 20)}))
    # an enum one of its names
    reply = p.VBD.create(s, {**record, "type": "Tape"})
    assert reply["ErrorDescription"][0] == "INTERNAL_ERROR"
    # a message the datamodel does not publish does not exist
    assert p.VM.get_mac_seed(s, vm)["ErrorDescription"] == [
        "MESSAGE_METHOD_UNKNOWN",
        "VM.get_mac_seed",
    ]


def test_every_message_xensim_serves_is_published_with_its_parameters(tmp_path):
    """Read from xensim's own method table, built in this process over a fresh pool."""
    from xensim import inventory
    from xensim.database import Database
    from xensim.xapi import Xapi, XapiOptions

    db = Database(tmp_path / "state.json")
    host = inventory.HostSpec("host0", "127.0.0.1", "PEM", "host0.xensim.test")
    inventory.build(db, tmp_path, [host], 1, [1 << 20], "nbd")
    # A random password: "unused" went to the secret watch (XENSIM_SECRETS_LOG) and was
    # then found in the appliance's /etc/iproute2/rt_dsfield (test_cli_files).
    table = Xapi(db, XapiOptions(tmp_path, secrets.token_urlsafe(16)))._methods
    assert len(table) > 300
    for method, (_, arity, session, optional) in table.items():
        cls, _, name = method.partition(".")
        msg = datamodel.message(cls, name)
        assert msg is not None, method
        params = [t for t, n in msg["params"] if n != SID]
        assert session == any(n == SID for _, n in msg["params"]), method
        if method != "session.login_with_password":  # 2..4 parameters (xapi_session.ml)
            assert arity + optional == len(params), (method, arity, optional, params)


# -- the product's calls ------------------------------------------------------------------
def product_calls() -> list[tuple[str, str, int, list]]:
    """(file:line, method, positional argument count or -1 if starred, literal args);
    the arguments after the session: ``_raw_call`` is given the session itself."""
    found = []
    for path in sorted([*ROOT.glob("plugin/**/*.py"), *ROOT.glob("orchestrate/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if name not in CALLERS or not isinstance(first, ast.Constant):
                continue
            if not isinstance(first.value, str) or not METHOD.match(first.value):
                continue
            rest = node.args[1:]
            if name == "_raw_call" and not first.value.startswith("session.login"):
                rest = rest[1:]
            count = -1 if any(isinstance(a, ast.Starred) for a in rest) else len(rest)
            literals = [a.value if isinstance(a, ast.Constant) else None for a in rest]
            where = "%s:%d" % (path.relative_to(ROOT), node.lineno)
            found.append((where, first.value, count, literals))
    return found


def test_the_product_calls_only_published_messages_with_their_parameters():
    calls = product_calls()
    assert len({m for _, m, _, _ in calls}) > 40  # the scan sees the product's calls
    for where, method, count, literals in calls:
        cls, name = METHOD.match(method).group(2, 3)
        msg = datamodel.message(cls, name)
        assert msg is not None, "%s: %s is not in xapi's datamodel" % (where, method)
        params = [t for t, n in msg["params"] if n != SID]
        if count >= 0:
            low = len(params) - OPTIONAL.get(method.removeprefix("Async."), 0)
            assert low <= count <= len(params), (where, method, count, params)
        for t, lit in zip(params, literals):
            if lit is not None:
                datamodel.unmarshal(t, lit)  # raises on a literal of the wrong type
