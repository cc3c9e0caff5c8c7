"""Wire encodings of API calls: XML-RPC (``/``, ``/RPC2``) and JSON-RPC (``/jsonrpc``).

XML-RPC: ``{"Status": "Success", "Value": v}`` or ``{"Status": "Failure",
"ErrorDescription": [code, params…]}``, with 64-bit ints sent as decimal strings.
JSON-RPC v2: ``result`` or ``error: {code: 1, message: CODE, data: [params…]}``;
v1: ``result``/``error`` (the description list) both present, one of them null.
"""

from __future__ import annotations

import json
import logging
import xmlrpc.client
from typing import Any, Callable

from .errors import ServerError

log = logging.getLogger(__name__)

Invoke = Callable[[str, list], Any]


class MalformedRequest(Exception):
    """Not a parsable call: xapi answers HTTP 500."""


def _outcome(invoke: Invoke, method: str, params: list) -> tuple[bool, Any]:
    try:
        return True, invoke(method, params)
    except ServerError as e:
        return False, e.description
    except Exception as e:
        log.exception("%s failed", method)
        return False, ["INTERNAL_ERROR", str(e)]


def _stringify_ints(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, dict, list, tuple)):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _stringify_ints(v) for k, v in value.items()}
    return [_stringify_ints(v) for v in value]


def xmlrpc_reply(invoke: Invoke, body: bytes) -> bytes:
    try:
        params, method = xmlrpc.client.loads(body)
    except Exception as e:
        raise MalformedRequest(str(e)) from e
    if not method:
        raise MalformedRequest("no methodName")
    ok, value = _outcome(invoke, method, list(params))
    if ok:
        reply = {"Status": "Success", "Value": _stringify_ints("" if value is None else value)}
    else:
        reply = {"Status": "Failure", "ErrorDescription": value}
    return xmlrpc.client.dumps((reply,), methodresponse=True, allow_none=True).encode()


def _jsonable(value: Any) -> Any:
    if isinstance(value, xmlrpc.client.DateTime):
        return value.value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return "" if value is None else value


def jsonrpc_reply(invoke: Invoke, body: bytes) -> bytes:
    try:
        request = json.loads(body)
        method, params, call_id = request["method"], request.get("params", []), request["id"]
    except Exception as e:
        raise MalformedRequest(str(e)) from e
    if not isinstance(method, str) or not isinstance(params, list) or call_id is None:
        raise MalformedRequest("bad method, params or id")
    ok, value = _outcome(invoke, method, params)
    if request.get("jsonrpc") == "2.0":
        reply: dict = {"jsonrpc": "2.0", "id": call_id}
        if ok:
            reply["result"] = _jsonable(value)
        else:
            reply["error"] = {"code": 1, "message": value[0], "data": value[1:]}
    else:
        reply = {
            "result": _jsonable(value) if ok else None,
            "error": None if ok else value,
            "id": call_id,
        }
    return json.dumps(reply).encode()
