"""The plugin's parameter rules, and that secrets never show in what they produce."""

from __future__ import annotations

import pytest
from xencbt_core.errors import ConfigError
from xencbt_core.params import Params

VDI = "0d1a2b3c-4d5e-4f60-8172-839405a6b7c8"
BASE = "11111111-2222-4333-8444-555555555555"


def make(**kv) -> Params:
    p = Params()
    for key, value in kv.items():
        p.set(key.replace("_", "-"), value)
    p.check()
    return p


def test_password_from_file_is_never_shown(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("hunter2-very-secret\n")
    p = make(xapi="https://pool", vdi=VDI, password="+%s" % pw)
    assert p.password.reveal() == "hunter2-very-secret"
    assert "hunter2" not in repr(p) and "hunter2" not in str(p.password)


@pytest.mark.parametrize(
    "kv, phrase",
    [
        (dict(xapi="https://pool"), "vdi=UUID or vm=UUID"),
        (dict(xapi="https://pool", vdi=VDI, vm=BASE, password="x" * 8), "one of vdi="),
        (dict(xapi="https://pool", vm="not-a-uuid", password="x" * 8), "vm=not-a-uuid is not"),
        (dict(xapi="https://pool", vm=VDI, since="%s,x" % BASE, password="x" * 8), "since=x is"),
        (
            dict(xapi="https://pool", vdi=VDI, since="%s,%s" % (BASE, BASE), password="x" * 8),
            "list",
        ),
        (dict(xapi="https://pool", vm=VDI, since="%s,%s" % (BASE, VDI), password="x" * 8), "older"),
        (dict(xapi="https://pool", vdi="not-a-uuid", password="x" * 8), "is not a UUID"),
        (dict(xapi="https://pool", vdi=VDI, since=VDI, password="x" * 8), "older snapshot"),
        (dict(xapi="https://pool", vdi=VDI), "password"),
        (dict(xapi="https://pool", vdi=VDI, password="x" * 8, connections="17"), "at most 16"),
        (dict(xapi="https://pool", vdi=VDI, password="x" * 8, verify="ca"), "cafile"),
        (dict(xapi="https://pool", vdi=VDI, password="x" * 8, unchanged="skip"), "hole, zero"),
        (dict(xapi="https://pool", vdi=VDI, password="x" * 8, changed="+f"), "since="),
        (dict(xapi="https://pool", vdi=VDI, password="x" * 8, readahead="65537"), "power of 2"),
        (dict(xapi="https://pool", vdi=VDI, password="x" * 8, readahead="4096"), "from 65536"),
        (dict(xapi="https://pool", vdi=VDI, password="x" * 8, readahead="4194304"), "power of 2"),
    ],
)
def test_bad_combinations_say_what_to_do(kv, phrase):
    with pytest.raises(ConfigError, match=phrase):
        make(**kv)


def test_unknown_parameter_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known: .*vdi"):
        Params().set("vid", VDI)


def test_session_must_come_from_a_file():
    with pytest.raises(ConfigError, match=r"\+FILE"):
        Params().set("session", "OpaqueRef:abc")


def test_missing_password_file_names_the_file_only(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the password file .*/nope"):
        Params().set("password", "+%s" % (tmp_path / "nope"))


def test_nbd_info_excludes_xapi(tmp_path):
    with pytest.raises(ConfigError, match="nbd-info= replaces XAPI"):
        make(nbd_info="+%s" % (tmp_path / "i.json"), vdi=VDI)


def test_since_accepted_with_uuid():
    p = make(xapi="pool.example", vdi=VDI, since=BASE, password="x" * 8, connections="16")
    assert p.since == BASE and p.connections == 16


def test_readahead_takes_a_window_of_the_host_s_request_size_or_less():
    assert make(xapi="https://pool", vdi=VDI, password="x" * 8).readahead == 0
    p = make(xapi="https://pool", vdi=VDI, password="x" * 8, readahead="2097152")
    assert p.readahead == 2 * 1024 * 1024


def test_since_with_vm_is_a_list():
    p = make(xapi="pool.example", vm=VDI, since="%s, %s" % (BASE, BASE.upper()), password="x" * 8)
    assert p.bases() == [BASE, BASE.upper()] and p.vm == VDI
