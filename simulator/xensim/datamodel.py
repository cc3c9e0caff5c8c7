"""xapi's own datamodel, as data: fields, types, defaults, messages (REFERENCE §9).

``datamodel.json`` is extracted from xen-api's ``doc/data/xenapi.json`` by
``simulator/extract_datamodel.py`` (it records the commit).  xensim's records, creates and
parameter checks come from it, not from our reading of the API:

- every published field of a record exists, with the datamodel's default or, for fields
  without one (xapi requires them at create), the zero value of its type;
- ``<class>.create`` looks up each RW or RO/constructor field that has no default and
  fails ``INTERNAL_ERROR [Server_helpers.Dispatcher_FieldNotFound("<field>")]`` when one
  is missing (``ocaml/idl/ocaml_backend/gen_server.ml``, ``my_assoc`` in
  ``ocaml/xapi/server_helpers.ml``);
- parameters are unmarshalled as ocaml-rpc does for XML-RPC: a string only from a
  string, a bool only from a boolean, an int64 from an int or a decimal string, an enum
  from one of its names; anything else is an INTERNAL_ERROR (``Rpc.Runtime_error``).
"""

from __future__ import annotations

import copy
import functools
import json
import re
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ServerError

PATH = Path(__file__).with_name("datamodel.json")
NULL_REF = "OpaqueRef:NULL"
EPOCH = "19700101T00:00:00Z"
CONSTRUCTOR = ("RW", "RO/constructor")
INT = re.compile(r"^-?[0-9]+$")


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    qualifier: str
    default: Any  # a Python value; ``MISSING`` when the datamodel gives none

    @property
    def required(self) -> bool:
        """A create record must carry it (no default, set by the constructor)."""
        return self.qualifier in CONSTRUCTOR and self.default is MISSING


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


@functools.lru_cache(maxsize=1)
def data() -> dict:
    return json.loads(PATH.read_text())


def commit() -> str:
    return data()["commit"]


def classes() -> list[str]:
    return list(data()["classes"])


def enum_values(name: str) -> list[str]:
    return data()["enums"][name]


@functools.cache
def fields(cls: str) -> dict[str, Field]:
    out = {}
    for name, f in data()["classes"][cls]["fields"].items():
        default = parse_default(f["type"], f["default"]) if "default" in f else MISSING
        out[name] = Field(name, f["type"], f["qualifier"], default)
    return out


def messages(cls: str) -> dict[str, dict]:
    return data()["classes"][cls]["messages"]


def message(cls: str, name: str) -> dict | None:
    return data()["classes"].get(cls, {}).get("messages", {}).get(name)


def required(cls: str) -> list[str]:
    return [f.name for f in fields(cls).values() if f.required]


def record(cls: str) -> dict:
    """A fresh record: every published field, its default or its type's zero value."""
    return {
        f.name: copy.deepcopy(zero(f.type) if f.default is MISSING else f.default)
        for f in fields(cls).values()
    }


def datetime_fields(cls: str) -> set[str]:
    return {f.name for f in fields(cls).values() if f.type == "datetime"}


# -- types ---------------------------------------------------------------------------------
def kind(t: str) -> tuple[str, str, str]:
    """("set", element, "") · ("map", key, value) · ("ref"|"record"|"enum", name, "") ·
    (basic, "", "") for string, int, float, bool, datetime."""
    if t.endswith(" set"):
        return "set", t[: -len(" set")], ""
    if t.startswith("(") and t.endswith(") map"):
        key, _, value = t[1 : -len(") map")].partition(" -> ")
        return "map", key, value
    if t.endswith(" ref"):
        return "ref", t[: -len(" ref")], ""
    if t.endswith(" record"):
        return "record", t[: -len(" record")], ""
    if t.startswith("enum "):
        return "enum", t[len("enum ") :], ""
    return t, "", ""


def zero(t: str) -> Any:
    k, _, _ = kind(t)
    return {
        "set": [],
        "map": {},
        "ref": NULL_REF,
        "string": "",
        "int": 0,
        "float": 0.0,
        "bool": False,
        "datetime": EPOCH,
    }.get(k, enum_values(kind(t)[1])[0] if k == "enum" else None)


def parse_default(t: str, text: str) -> Any:
    """The datamodel's default, written as ``Datamodel_values`` prints it: ``""``,
    ``{}``, ``{"a" -> "b"}``, ``{0}``, ``1.``, ``Null``, ``OpaqueRef:NULL``, an enum name."""
    k, a, b = kind(t)
    if k == "string":
        return json.loads(text)
    if k == "int":
        return int(text)
    if k == "float":
        return float(text)
    if k == "bool":
        return text == "true"
    if k == "ref":
        return NULL_REF
    if k == "set":
        inner = text.strip("{}").strip()
        return [parse_default(a, v.strip()) for v in inner.split(",")] if inner else []
    if k == "map":
        pairs = re.findall(r'"([^"]*)" -> "([^"]*)"', text)
        return dict(pairs)
    return text  # datetime, enum


# -- unmarshalling (ocaml-rpc, XML-RPC) --------------------------------------------------
def bad(t: str, value: Any) -> ServerError:
    return ServerError("INTERNAL_ERROR", "Rpc.Runtime_error(%s, %r)" % (t, value))


def unmarshal(t: str, value: Any) -> Any:
    """``value`` as xapi would read it for type ``t``, or INTERNAL_ERROR."""
    k, a, b = kind(t)
    if k in ("string", "ref") and isinstance(value, str):
        return value
    if k == "bool" and isinstance(value, bool):
        return value
    if k == "int" and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, str) and INT.match(value):
            return int(value)
    if k == "float" and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    if k == "datetime":
        if isinstance(value, xmlrpc.client.DateTime):
            return value.value
        if isinstance(value, str):
            return value
    if k == "enum" and isinstance(value, str):
        # generated *_of_rpc functions compare lowercased names
        for name in enum_values(a):
            if name.lower() == value.lower():
                return name
    if k == "set" and isinstance(value, (list, tuple)):
        return [unmarshal(a, v) for v in value]
    if k == "map" and isinstance(value, dict):
        return {_key(a, key): unmarshal(b, v) for key, v in value.items()}
    if k == "record" and isinstance(value, dict):
        return value  # checked field by field by ``constructor_record``
    raise bad(t, value)


def _key(t: str, key: Any) -> Any:
    """XML-RPC struct keys are strings; an int key arrives as its decimal text."""
    if kind(t)[0] == "int" and isinstance(key, str) and INT.match(key):
        return key
    return unmarshal(t, key)


def constructor_record(cls: str, value: dict) -> dict:
    """The fields ``<cls>.create`` reads from its record: the RW and RO/constructor ones,
    each unmarshalled; a missing one without a default is Dispatcher_FieldNotFound, a
    missing one with a default takes it (gen_server.ml); other keys are not looked at."""
    out = {}
    for f in fields(cls).values():
        if f.qualifier not in CONSTRUCTOR:
            continue
        if f.name in value:
            out[f.name] = unmarshal(f.type, value[f.name])
        elif f.default is MISSING:
            raise ServerError(
                "INTERNAL_ERROR", 'Server_helpers.Dispatcher_FieldNotFound("%s")' % f.name
            )
        else:
            out[f.name] = copy.deepcopy(f.default)
    return out


def check_params(cls: str, name: str, params: list) -> list:
    """Unmarshal a call's parameters (session excluded) by the message's declared types;
    a ``<cls> record`` parameter is read as the constructor reads it."""
    msg = message(cls, name)
    if msg is None:
        return params
    types = [t for t, pname in msg["params"] if pname != "session_id"]
    out = []
    for t, value in zip(types, params):
        k, a, _ = kind(t)
        if k == "record":
            if not isinstance(value, dict):
                raise bad(t, value)
            out.append(constructor_record(a if a != "<class>" else cls, value))
        else:
            out.append(unmarshal(t, value))
    return out + list(params[len(types) :])
