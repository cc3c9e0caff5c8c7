"""Client of the xensim control API, for tests and the ``xensim fault``/``counters`` commands.

``Control(serve_info)`` takes the ready line (or DIR/serve.json) as a dict.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import urllib.parse
from pathlib import Path
from typing import Any


class ControlError(Exception):
    """The simulator refused a control request (bad fault name, unknown VDI, …)."""


class Control:
    def __init__(self, serve_info: dict) -> None:
        self.url = urllib.parse.urlsplit(serve_info["control"])
        password = Path(serve_info["password_file"]).read_text().strip()
        token = base64.b64encode(f"{serve_info['user']}:{password}".encode()).decode()
        self._auth = f"Basic {token}"
        self._context = ssl.create_default_context(cafile=serve_info["ca_file"])

    @classmethod
    def from_state_dir(cls, state_dir: str | Path) -> Control:
        return cls(json.loads((Path(state_dir) / "serve.json").read_text()))

    def _request(self, verb: str, path: str, body: dict | None = None) -> Any:
        conn = http.client.HTTPSConnection(
            self.url.hostname, self.url.port, context=self._context, timeout=30
        )
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Authorization": self._auth, "Content-Type": "application/json"}
            conn.request(verb, f"{self.url.path}/{path}", body=payload, headers=headers)
            reply = conn.getresponse()
            data = reply.read()
        finally:
            conn.close()
        if reply.status != 200:
            raise ControlError(f"{verb} {path}: HTTP {reply.status}: {data.decode().strip()}")
        return json.loads(data)

    # -- faults -------------------------------------------------------------------------
    def faults(self) -> dict:
        return self._request("GET", "faults")

    def set_faults(self, **faults: Any) -> dict:
        """drop_after_bytes=N, drop_on_read=N, read_latency=S, refuse_for=S, hold_for=S (reads
        wait S seconds from now), gate_after_reads=N (N more reads, then reads wait until it
        is set to None); None clears."""
        return self._request("POST", "faults", faults)

    def clear(self) -> dict:
        return self._request("POST", "faults/clear", {})

    def refuse_for(self, seconds: float) -> dict:
        return self._request("POST", "faults/refuse", {"seconds": seconds})

    def invalidate_sessions(self, session: str | None = None) -> int:
        body = {"session": session} if session else {}
        return self._request("POST", "sessions/invalidate", body)["invalidated"]

    def cbt_off(self, vdi: str) -> dict:
        """Simulate a host crash: CBT switched off on the VDI (uuid or ref)."""
        return self._request("POST", "cbt-off", {"vdi": vdi})

    # -- CBT availability (issue #12 item 4) ----------------------------------------------
    def set_licence(self, cbt: bool) -> dict:
        """``cbt=False``: an unlicensed pool, whose restrictions hold ``restrict_cbt``:
        VDI.enable_cbt fails LICENCE_RESTRICTION. Returns the pool's restrictions."""
        return self._request("POST", "licence", {"cbt": cbt})

    def set_sr_cbt(self, sr: str, supported: bool) -> dict:
        """An SR (uuid or ref) whose driver lacks VDI_CONFIG_CBT: every CBT call on its
        VDIs fails SR_OPERATION_NOT_SUPPORTED."""
        return self._request("POST", "sr-cbt", {"sr": sr, "supported": supported})

    # -- API reply latency (crash tests, latency.py) -----------------------------------
    def api_latency(self) -> dict:
        return self._request("GET", "api-latency")

    def set_api_latency(self, delays: dict[str, float]) -> dict:
        """Replace the table, e.g. ``{"VM.snapshot": 1.0}``: the call takes effect, then
        its reply waits that long.  ``{}`` clears."""
        return self._request("POST", "api-latency", delays)

    # -- counters -----------------------------------------------------------------------
    def counters(self) -> dict:
        """host name -> {bytes_served, reads, connections_total, connections_now,
        peak_connections, refused}."""
        return self._request("GET", "counters")

    def logins(self) -> dict:
        """{"total": successful logins since start, "by_originator": {originator: n}}."""
        return self._request("GET", "logins")

    def reset_counters(self) -> dict:
        return self._request("POST", "counters/reset", {})

    # -- reliability knobs (issue #5; xensim/hostile.py) --------------------------------
    def corrupt_bitmaps(self, mode: str | None) -> dict:
        """Every list_changed_blocks answer becomes ``garbage`` (not base64), ``short``
        (a byte missing) or ``long`` (a byte too many); None repairs them."""
        return self._request("POST", "faults/api", {"bitmap": mode})

    def set_password(self, password: str) -> dict:
        """Change root's XAPI login password (this control API keeps the original)."""
        return self._request("POST", "password", {"password": password})

    def move_master(self, host: str) -> dict:
        """pool.designate_new_master: ``host`` (e.g. "host1") becomes the master and every
        session dies; the control API stays where it is."""
        return self._request("POST", "master", {"host": host})

    def issued_secrets(self) -> dict:
        """{"passwords": every login password so far, "sessions": every session ref issued}."""
        return self._request("GET", "secrets")

    # -- imports failing late (issue #12) -----------------------------------------------
    def fail_imports_after(self, nbytes: int | None) -> dict:
        """Every HTTP import's write fails (task VDI_IO_ERROR) once it has written
        ``nbytes`` bytes; None clears."""
        return self._request("POST", "faults/import", {"fail_after_bytes": nbytes})

    def set_sr_size(self, sr: str, physical_size: int) -> dict:
        """Set the SR's (uuid or ref) physical_size; imports that need more space than it
        has left fail as on a full SR.  Returns {physical_size, used}."""
        return self._request("POST", "sr-size", {"sr": sr, "physical_size": physical_size})
